#!/usr/bin/env python3
"""`husk run true` host-side CPU, split by process, for two builds side by
side in one run (issue 18's bar: host-side p50 <= 20 ms).

Each build is a directory holding `husk`, `husk-vmm` and `husk-agent`
(a `target/x86_64-unknown-linux-musl/release`), with a husk root of its
own (its warm snapshot is made by the first, unmeasured, run). Runs
alternate between the builds, the order swapped every round.

Host-side = the CPU time of husk and its children (getrusage) less guest
time (the vCPU threads' CPU less their device-model time, from the VMM's
timings), less the VMM's own measuring at exit where it reports it. Split:
- client: the `husk run` process (where it reports it, per step too);
- monitor: the container's monitor;
- device: device models run on the vCPU threads (virtio-fs requests);
- vmm: the VMM's other threads and its set-up and teardown, what is left.

usage: scripts/bench-run-split.py DIR ROOT [BASE_DIR BASE_ROOT] [RUNS]
  e.g. scripts/bench-run-split.py target/x86_64-unknown-linux-musl/release \\
         /var/lib/husk /tmp/base-target/x86_64-unknown-linux-musl/release \\
         /tmp/base-root 10        (as root)
"""

import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile

args = sys.argv[1:]
runs = int(args.pop()) if args and args[-1].isdigit() else 10
builds = []
while len(args) >= 2:
    builds.append((os.path.abspath(args.pop(0)), args.pop(0)))
if not builds:
    sys.exit(__doc__)
work = tempfile.mkdtemp(prefix="husk-bench-split-")
bundle = os.path.join(work, "bundle")
subprocess.run([builds[0][0] + "/husk", "busybox-bundle", bundle, "--", "true"], check=True,
               stdout=subprocess.DEVNULL)
rows = {d: [] for d, _ in builds}
for i in range(runs + 1):
    order = builds if i % 2 == 0 else builds[::-1]
    for d, root in order:
        prefix = os.path.join(work, f"t{builds.index((d, root))}-{i}")
        env = dict(os.environ, HUSK_TIMINGS=prefix, HUSK_VMM=d + "/husk-vmm")
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        subprocess.run([d + "/husk", "--root", root, "run", "--bundle", bundle,
                        f"split-{os.getpid()}-{builds.index((d, root))}-{i}"], env=env, check=True,
                       stdin=subprocess.DEVNULL)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        if i == 0:
            continue
        total = (after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime) * 1e6
        mon = json.load(open(prefix + ".runtime.json"))
        vmm = json.load(open(prefix + ".vmm.json"))
        try:
            client = json.load(open(prefix + ".client.json"))
        except OSError:
            client = {}
        guest = vmm["vcpu_cpu_us"] - vmm["device_us"]
        host = total - guest - (vmm.get("timings_cpu_us") or 0)
        c = client.get("client_cpu_us")
        rows[d].append({
            "host": host,
            "client": c,
            "monitor": mon["runtime_cpu_us"],
            "device": vmm["device_us"],
            "vmm": host - (c or 0) - mon["runtime_cpu_us"] - vmm["device_us"],
            "steps": dict(client.get("steps_cpu_us", [])),
        })
shutil.rmtree(work, ignore_errors=True)


def p(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q / 100 * (len(values) - 1))))] / 1000


print("| build | runs | host-side p50 ms | p90 ms | client p50 | monitor p50 | device p50 | VMM and the rest p50 |")
print("|---|---|---|---|---|---|---|---|")
for d, _ in builds:
    r = rows[d]
    client = [x["client"] for x in r if x["client"] is not None]
    rest = "VMM, client and the rest" if not client else ""
    print(f"| {d} | {len(r)} | {p([x['host'] for x in r], 50):.2f} | {p([x['host'] for x in r], 90):.2f} | "
          f"{p(client, 50) if client else float('nan'):.2f} | {p([x['monitor'] for x in r], 50):.2f} | "
          f"{p([x['device'] for x in r], 50):.2f} | {p([x['vmm'] for x in r], 50):.2f} {rest}|")
    steps = [x["steps"] for x in r if x["steps"]]
    if steps:
        names = list(steps[0])
        cuts = [(names[k], [s[names[k]] - (s[names[k - 1]] if k else 0) for s in steps])
                for k in range(len(names))]
        print("  client CPU per step, p50 ms: " +
              ", ".join(f"{n} {statistics.median(v) / 1000:.2f}" for n, v in cuts))
