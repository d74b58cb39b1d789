#!/usr/bin/env python3
"""How soon `state` says `stopped` (issue 19), husk and Debian's runc side
by side in one run, on the same busybox bundle.

For each runtime and run: create and start a container whose shell traps
TERM and exits, wait until it runs its loop, then time from the start of
`kill ID TERM` to the first `state ID` that says `stopped` (polled as fast
as `state` answers), and `delete` it. Runs alternate between the runtimes.

For husk it also reads the monitor's timings (HUSK_TIMINGS): from the
agent's exit report (`exited`) to the state recorded `stopped`
(`stopped_recorded`): the host-side part of the wait.

usage: scripts/bench-stop.py HUSK [RUNS]   (as root)
"""

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

husk = os.path.abspath(sys.argv[1])
runs = int(sys.argv[2]) if len(sys.argv) > 2 else 10
work = tempfile.mkdtemp(prefix="husk-bench-stop-")
bundle = os.path.join(work, "bundle")
script = "trap 'exit 0' TERM; while :; do sleep 0.1; done"
subprocess.run([husk, "busybox-bundle", bundle, "--", "sh", "-c", script],
               check=True, stdout=subprocess.DEVNULL)
roots = {"husk": os.path.join(work, "husk-root"), "runc": os.path.join(work, "runc-root")}
binaries = {"husk": husk, "runc": shutil.which("runc")}


def cmd(rt, *args, env=None, check=True):
    return subprocess.run([binaries[rt], "--root", roots[rt], *args], check=check,
                          capture_output=True, text=True, env=env)


def create(rt, *args, env=None):
    # The container's process (and husk's monitor) keep its stdio: never
    # a pipe this script would wait on.
    subprocess.run([binaries[rt], "--root", roots[rt], "create", *args], check=True, env=env,
                   stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)


def status(rt, cid):
    out = cmd(rt, "state", cid, check=False)
    return json.loads(out.stdout)["status"] if out.returncode == 0 else None


sys.stdout.reconfigure(line_buffering=True)
results = {"husk": [], "runc": []}
host_side = []
for i in range(runs + 1):
    for rt in ("husk", "runc"):
        cid = f"stop-{os.getpid()}-{rt}-{i}"
        env = dict(os.environ)
        timings = os.path.join(work, f"t-{i}")
        if rt == "husk":
            env["HUSK_TIMINGS"] = timings
        create(rt, "--bundle", bundle, cid, env=env)
        cmd(rt, "start", cid)
        # The loop runs once a sleep is there (husk's `ps` lists PIDs only).
        deadline = time.time() + 120
        look = ("exec", cid, "sh", "-c", "pidof sleep || true")
        while not cmd(rt, *look, check=False).stdout.strip():
            if time.time() > deadline:
                sys.exit(f"{rt}: the loop never ran")
            time.sleep(0.05)
        t0 = time.monotonic()
        cmd(rt, "kill", cid, "TERM")
        while status(rt, cid) != "stopped":
            if time.monotonic() - t0 > 120:
                sys.exit(f"{rt}: never stopped")
        took = (time.monotonic() - t0) * 1000
        if rt == "husk":
            # The monitor writes its timings as it ends, once the VM is
            # down: waited for here (a `delete` now would end it first).
            end = time.time() + 30
            while not os.path.exists(timings + ".runtime.json") and time.time() < end:
                time.sleep(0.05)
        cmd(rt, "delete", cid)
        if i == 0:
            continue  # warm-up
        results[rt].append(took)
        if rt == "husk":
            try:
                with open(timings + ".runtime.json") as f:
                    phases = dict(json.load(f)["phases_us"])
                host_side.append((phases["stopped_recorded"] - phases["exited"]) / 1000)
            except (OSError, KeyError, ValueError):
                pass


def pct(v, p):
    v = sorted(v)
    return v[round(p / 100 * (len(v) - 1))]


print("| runtime | runs | kill TERM to `stopped` p50 ms | p90 ms |")
print("|---|---|---|---|")
for rt, v in results.items():
    print(f"| {rt} | {len(v)} | {pct(v, 50):.1f} | {pct(v, 90):.1f} |")
if host_side:
    print(f"\nhusk, exit report to `stopped` recorded (host-side): p50 {pct(host_side, 50):.2f} ms,"
          f" p90 {pct(host_side, 90):.2f} ms ({len(host_side)} runs)")
shutil.rmtree(work, ignore_errors=True)
