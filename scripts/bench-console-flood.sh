#!/usr/bin/env bash
# The VMM's memory while its guest floods the console (docs/benchmarks.md):
# the test init writes 3000 lines (~300 KB, byte by byte through the UART)
# to a console file capped at 64 KiB, against a boot that writes a few
# lines; husk-vmm's VmRSS sampled every 100 ms, its peak (VmHWM) read at
# the last sample. ROUNDS of each, alternately.
#
#   scripts/bench-console-flood.sh [VMM] [TEST_INITRAMFS] [ROUNDS]
set -euo pipefail
vmm=$(realpath "${1:-target/x86_64-unknown-linux-musl/release/husk-vmm}")
initramfs=$(realpath "${2:-target/test-init.cpio}")
rounds=${3:-3}
d=$(mktemp -d /tmp/husk-bench-console.XXXXXX)
trap 'rm -rf "$d"' EXIT
run() { # NAME CMDLINE
	"$vmm" --initramfs "$initramfs" --console "$d/console.log" --console-limit 65536 \
		--cmdline="$2" &
	local pid=$! first="" last="" hwm=""
	while kill -0 "$pid" 2>/dev/null; do
		rss=$(awk '/^VmRSS/ { print $2 }' "/proc/$pid/status" 2>/dev/null || true)
		h=$(awk '/^VmHWM/ { print $2 }' "/proc/$pid/status" 2>/dev/null || true)
		[ -n "$rss" ] && { [ -z "$first" ] && first=$rss; last=$rss; }
		[ -n "$h" ] && hwm=$h
		sleep 0.1
	done
	wait "$pid"
	echo "$1 rss_first_kib=$first rss_last_kib=$last hwm_kib=$hwm console_bytes=$(stat -c %s "$d/console.log")"
}
for _ in $(seq "$rounds"); do
	run quiet "--"
	run flood "-- flood"
done
