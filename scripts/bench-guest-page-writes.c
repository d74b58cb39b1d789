/* What writing fresh guest pages costs the host, as a virtio-fs read
 * into guest memory does (issue 18, docs/benchmarks.md, "Tried and
 * left"): 1.6 MB read with preadv, in 128 KiB pieces, into a private
 * mapping of a warm snapshot's memory file at OFFSET MiB, the pages
 * prepared by MODE first: 0 none (copy-on-write on the fault), 1
 * MADV_POPULATE_WRITE, 2 anonymous memory mapped over them. Prints the
 * thread's CPU time.
 *
 *   gcc -O2 -o /tmp/guest-page-writes scripts/bench-guest-page-writes.c
 *   for m in 0 1 2; do /tmp/guest-page-writes SNAPSHOT/memory SOURCE_FILE $m 40; done
 */
#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <fcntl.h>
#include <unistd.h>
#include <time.h>
#include <sys/uio.h>
#ifndef MADV_POPULATE_WRITE
#define MADV_POPULATE_WRITE 23
#endif
static double now(){struct timespec t;clock_gettime(CLOCK_THREAD_CPUTIME_ID,&t);return t.tv_sec*1e6+t.tv_nsec/1e3;}
int main(int argc,char**argv){
  int mode=atoi(argv[3]);
  int mf=open(argv[1],O_RDONLY); int src=open(argv[2],O_RDONLY);
  size_t msz=256<<20; size_t chunk=128<<10; size_t total=1600<<10;
  char*m=mmap(0,msz,PROT_READ|PROT_WRITE,MAP_PRIVATE|MAP_NORESERVE,mf,0);
  // destination: data region near start offset given argv[4] (MiB)
  char*dst=m+((size_t)atoi(argv[4])<<20);
  double t0=now();
  for(size_t off=0;off<total;off+=chunk){
    if(mode==1) madvise(dst+off,chunk,MADV_POPULATE_WRITE);
    if(mode==2){ mmap(dst+off,chunk,PROT_READ|PROT_WRITE,MAP_PRIVATE|MAP_ANONYMOUS|MAP_FIXED|MAP_NORESERVE,-1,0);}
    struct iovec iov={dst+off,chunk};
    preadv(src,&iov,1,off);
  }
  double t1=now();
  printf("mode %d: %.0f us\n",mode,t1-t0);
}
