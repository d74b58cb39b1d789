#!/usr/bin/env python3
"""The CPU cost of replacing a small file, as husk writes a container's
state.json (docs/benchmarks.md): a rename over the old file (the tree
before husk_sys::replace) against a swap with renameat2(RENAME_EXCHANGE)
and an unlink of the old one (husk_sys::replace), side by side in one
run, ROUNDS alternating rounds of N writes of 1400 bytes each.

usage: scripts/bench-state-write.py [DIR] [N] [ROUNDS]
  DIR: a directory on the file system to measure (default: a new one
  under /var/lib, the root file system husk's root lives on); removed after.
"""

import ctypes
import os
import resource
import shutil
import statistics
import sys
import tempfile

args = sys.argv[1:]
parent = args[0] if args else "/var/lib"
n = int(args[1]) if len(args) > 1 else 200
rounds = int(args[2]) if len(args) > 2 else 5
libc = ctypes.CDLL(None, use_errno=True)
AT_FDCWD, RENAME_EXCHANGE = -100, 2
d = tempfile.mkdtemp(prefix="husk-bench-state-", dir=parent)
state, tmp = os.path.join(d, "state.json"), os.path.join(d, ".state.json.tmp")
data = b"x" * 1400


def cpu():
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def rename_over():
    with open(tmp, "wb") as f:
        f.write(data)
    os.rename(tmp, state)


def swap():
    with open(tmp, "wb") as f:
        f.write(data)
    if libc.renameat2(AT_FDCWD, tmp.encode(), AT_FDCWD, state.encode(), RENAME_EXCHANGE) != 0:
        sys.exit(f"renameat2: errno {ctypes.get_errno()}")
    os.unlink(tmp)


results = {"rename over": [], "swap and unlink": []}
try:
    with open(state, "wb") as f:
        f.write(data)
    for _ in range(rounds):
        for name, write in (("rename over", rename_over), ("swap and unlink", swap)):
            t = cpu()
            for _ in range(n):
                write()
            results[name].append((cpu() - t) / n * 1e6)
finally:
    shutil.rmtree(d, ignore_errors=True)
print(f"| replace of a 1400-byte file ({parent}) | rounds | CPU µs per write, median | min | max |")
print("|---|---|---|---|---|")
for name, v in results.items():
    print(f"| {name} | {rounds} | {statistics.median(v):.1f} | {min(v):.1f} | {max(v):.1f} |")
