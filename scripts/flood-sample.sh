# Sourced by scripts/bench-*-flood.sh: runs one VM and samples husk-vmm's
# memory every 100 ms until the console shows DONE, then 3 s more.
#
#   sample NAME DONE -- VMM ARGS...   (the console goes to $d/console.log)
# prints: NAME hwm_kib= rss_first_kib= rss_last_kib= own_kib= (own: the
# resident set less the guest's memory, the one mapping of 64 MiB or more)
own_kib() {
	python3 - "$1" <<'PY' 2>/dev/null || true
import sys
total, guest = 0, False
for line in open(f"/proc/{sys.argv[1]}/smaps"):
    head = line.split(" ", 1)[0]
    if "-" in head and not line.startswith(("Rss", "Pss")) and ":" not in head:
        lo, hi = (int(x, 16) for x in head.split("-"))
        guest = hi - lo >= 64 << 20
    elif line.startswith("Rss:") and not guest:
        total += int(line.split()[1])
print(total)
PY
}
sample() {
	local name=$1 done=$2 first="" last="" hwm="" own="" rss h until=""
	shift 3
	: >"$d/console.log"
	"$@" --console "$d/console.log" &
	local pid=$! start=$SECONDS
	while kill -0 "$pid" 2>/dev/null; do
		rss=$(awk '/^VmRSS/ { print $2 }' "/proc/$pid/status" 2>/dev/null || true)
		h=$(awk '/^VmHWM/ { print $2 }' "/proc/$pid/status" 2>/dev/null || true)
		[ -n "$rss" ] && { [ -z "$first" ] && first=$rss; last=$rss; }
		[ -n "$h" ] && hwm=$h
		if [ -z "$until" ] && grep -q -- "$done" "$d/console.log"; then until=$((SECONDS + 3)); fi
		if { [ -n "$until" ] && [ "$SECONDS" -ge "$until" ]; } || [ $((SECONDS - start)) -ge 300 ]; then
			own=$(own_kib "$pid")
			kill "$pid"
		fi
		sleep 0.1
	done
	wait "$pid" || true
	echo "$name hwm_kib=$hwm rss_first_kib=$first rss_last_kib=$last own_kib=$own seconds=$((SECONDS - start))"
	grep -h "husk-test-init: \(vsock\|fs\)-" "$d/console.log" | head -3 | sed 's/^/  /' || true
}
