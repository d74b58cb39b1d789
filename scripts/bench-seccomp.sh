#!/usr/bin/env bash
# The cost of a seccomp profile in the guest (docs/benchmarks.md):
# 6000 system calls (dd's one-byte reads and writes) timed inside a
# container with no profile and with podman's default profile (the
# containers-common one, its x86_64 allow list: ~370 names), alternately,
# ROUNDS times each, on the warm snapshot of ROOT.
#
#   scripts/bench-seccomp.sh [HUSK] [ROOT] [ROUNDS]
set -euo pipefail
husk=$(realpath "${1:-target/release/husk}")
root=${2:-/var/cache/husk/test-root}
rounds=${3:-5}
d=$(mktemp -d /tmp/husk-bench-seccomp.XXXXXX)
trap 'rm -rf "$d"' EXIT
"$husk" busybox-bundle "$d/b" -- sh >/dev/null
python3 - "$d" <<'PY'
import json, sys
d = sys.argv[1]
src = json.load(open('/usr/share/containers/seccomp.json'))
allow = []
for s in src['syscalls']:
    inc = s.get('includes') or {}
    if inc.get('caps') or (inc.get('arches') and 'amd64' not in inc['arches']) or s.get('args'):
        continue
    if s['action'] == 'SCMP_ACT_ALLOW':
        allow += s['names']
profile = {"defaultAction": "SCMP_ACT_ERRNO", "defaultErrnoRet": 1, "syscalls": [
    {"names": allow, "action": "SCMP_ACT_ALLOW"},
    {"names": ["personality"], "action": "SCMP_ACT_ALLOW",
     "args": [{"index": 0, "value": 0, "op": "SCMP_CMP_EQ"}]},
    {"names": ["clone3"], "action": "SCMP_ACT_ERRNO", "errnoRet": 38}]}
cmd = ["sh", "-c", "read a b </proc/uptime; dd if=/dev/zero of=/dev/null bs=1 count=3000 "
       "2>/dev/null; read c d </proc/uptime; echo $a $c"]
for name, p in [("none", None), ("podman-default", profile)]:
    c = json.load(open(f'{d}/b/config.json'))
    c['process']['args'] = cmd
    c['process']['terminal'] = False
    c['linux'].pop('seccomp', None)
    if p:
        c['linux']['seccomp'] = p
    json.dump(c, open(f'{d}/config-{name}.json', 'w'))
PY
for i in $(seq "$rounds"); do
	for name in none podman-default; do
		cp "$d/config-$name.json" "$d/b/config.json"
		"$husk" --root "$root" run --bundle "$d/b" "bench-seccomp-$$-$i" </dev/null |
			awk -v n="$name" '{ printf "%s %.0f\n", n, ($2 - $1) * 1000 }'
	done
done | sort | awk '{ s[$1] = s[$1] " " $2 } END { for (n in s) print n ":" s[n] " ms" }'
