/* What one `cpuid` costs on this host (docs/benchmarks.md, issue 18):
 * where the host is itself a VM, each one exits to its hypervisor.
 * usage: cc -O2 -o /tmp/bench-cpuid scripts/bench-cpuid.c && /tmp/bench-cpuid
 * (prints the mean of 1000 `cpuid`s, and of 1000 `rdtsc`s beside it). */
#include <cpuid.h>
#include <stdio.h>
#include <time.h>

static double since(struct timespec a) {
  struct timespec b;
  clock_gettime(CLOCK_MONOTONIC, &b);
  return ((b.tv_sec - a.tv_sec) * 1e9 + (b.tv_nsec - a.tv_nsec)) / 1000.0;
}

int main(void) {
  unsigned a, b, c, d, lo, hi;
  unsigned long long sum = 0;
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  for (int i = 0; i < 1000; i++) __cpuid_count(7, 0, a, b, c, d);
  printf("cpuid %.3f us\n", since(t) / 1000);
  clock_gettime(CLOCK_MONOTONIC, &t);
  for (int i = 0; i < 1000; i++) {
    __asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi));
    sum += lo;
  }
  printf("rdtsc %.3f us (%llu)\n", since(t) / 1000, sum & 1);
  return 0;
}
