#!/usr/bin/env bash
# The VMM's memory while its guest floods vsock (docs/benchmarks.md): the
# test init (`-- vsock-flood vsock-sink`) opens 300 connections to a host
# listener at `<socket>_5000` that accepts and never reads, fills each to
# its credit, then accepts connections on its port 1235 and never reads
# while 32 host clients write into them as far as they can; against the
# same guest ticking (`-- ticks`) beside the same listener. husk-vmm's
# VmRSS sampled every 100 ms, VmHWM and its own resident set (less the
# guest's memory) at the end. ROUNDS of each, alternately.
#
#   scripts/bench-vsock-flood.sh [VMM] [TEST_INITRAMFS] [ROUNDS]
set -euo pipefail
vmm=$(realpath "${1:-target/x86_64-unknown-linux-musl/release/husk-vmm}")
initramfs=$(realpath "${2:-target/test-init.cpio}")
rounds=${3:-3}
d=$(mktemp -d /tmp/husk-bench-vsock.XXXXXX)
helper=""
trap '[ -n "$helper" ] && kill "$helper" 2>/dev/null; rm -rf "$d"' EXIT
. "$(dirname "$0")/flood-sample.sh"
# The host side: the listener that never reads, and the clients that
# write into the guest's sink once it listens.
python3 - "$d" <<'PY' &
import os, socket, sys, threading, time
d = sys.argv[1]
lst = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
lst.bind(os.path.join(d, "v.sock_5000")); lst.listen(4096)
held, clients = [], []
threading.Thread(target=lambda: [held.append(lst.accept()[0]) for _ in iter(int, 1)], daemon=True).start()
while True:
    if len(clients) >= 32:
        time.sleep(0.5)
        if not os.path.exists(os.path.join(d, "v.sock")):
            clients.clear()
        continue
    try:
        c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        c.connect(os.path.join(d, "v.sock")); c.sendall(b"CONNECT 1235\n")
        c.settimeout(5)
        if not c.recv(64).startswith(b"OK"):
            raise OSError("no OK")
        c.setblocking(False)
        while True:
            try:
                c.send(b"3" * 65536)
            except BlockingIOError:
                break
        clients.append(c)
    except OSError:
        time.sleep(0.5)
PY
helper=$!
for _ in $(seq "$rounds"); do
	sample quiet "husk-test-init: tick 4" -- "$vmm" --initramfs "$initramfs" \
		--vsock-socket "$d/v.sock" --cmdline="-- ticks"
	sample flood "husk-test-init: tick 4" -- "$vmm" --initramfs "$initramfs" \
		--vsock-socket "$d/v.sock" --cmdline="-- vsock-flood vsock-sink"
done
