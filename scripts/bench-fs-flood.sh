#!/usr/bin/env bash
# The VMM's memory while its guest floods virtio-fs (docs/benchmarks.md):
# the test init (`-- fs-flood`) creates and holds open files on the share
# `flood` until an open fails (the VMM's open-file limit, set to NOFILE
# here so that the flood ends in seconds: two descriptors a file), holds
# them 3 s, closes them and drops its caches, then writes a 16 MiB file;
# against the same guest ticking (`-- ticks`) with the same share.
# husk-vmm's VmRSS sampled every 100 ms, VmHWM and its own resident set
# (less the guest's memory) at the end. ROUNDS of each, alternately.
#
#   scripts/bench-fs-flood.sh [VMM] [TEST_INITRAMFS] [ROUNDS] [NOFILE]
set -euo pipefail
vmm=$(realpath "${1:-target/x86_64-unknown-linux-musl/release/husk-vmm}")
initramfs=$(realpath "${2:-target/test-init.cpio}")
rounds=${3:-3}
nofile=${4:-4096}
d=$(mktemp -d /tmp/husk-bench-fs.XXXXXX)
trap 'rm -rf "$d"' EXIT
. "$(dirname "$0")/flood-sample.sh"
for _ in $(seq "$rounds"); do
	rm -rf "$d/share" && mkdir "$d/share"
	sample quiet "husk-test-init: tick 4" -- prlimit --nofile="$nofile:$nofile" \
		"$vmm" --initramfs "$initramfs" --share "flood=$d/share" --cmdline="-- ticks"
	rm -rf "$d/share" && mkdir "$d/share"
	sample flood "big_write=" -- prlimit --nofile="$nofile:$nofile" \
		"$vmm" --initramfs "$initramfs" --share "flood=$d/share" --cmdline="-- fs-flood"
done
