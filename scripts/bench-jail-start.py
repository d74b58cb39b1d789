#!/usr/bin/env python3
"""The cost of husk-vmm's jail with no VM (docs/benchmarks.md, "The VMM's jail").

Usage: scripts/bench-jail-start.py VMM [BASELINE_VMM] [RUNS]

Runs `VMM --kernel /nonexistent` (it jails itself, then fails to load the
kernel and ends), then the same with `--no-jail`, then BASELINE_VMM (say,
a build from before the jail), RUNS times each, in three alternating
rounds, and prints the children's CPU time per run (getrusage).
"""
import os
import resource
import subprocess
import sys
import tempfile


def cpu_per_run(cmd, runs):
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    for _ in range(runs):
        subprocess.run(cmd, stderr=subprocess.DEVNULL, check=False)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    spent = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return spent / runs * 1000


def main():
    vmm = sys.argv[1]
    baseline = sys.argv[2] if len(sys.argv) > 2 else None
    runs = int(sys.argv[3]) if len(sys.argv) > 3 else 60
    with tempfile.TemporaryDirectory(prefix="husk-bench-jail-") as d:
        args = ["--kernel", "/nonexistent", "--api-socket", os.path.join(d, "api.sock"),
                "--vsock-socket", os.path.join(d, "v.sock")]
        variants = [("this build", [vmm] + args), ("this build, --no-jail", [vmm, "--no-jail"] + args)]
        if baseline:
            variants.append(("baseline build", [baseline] + args))
        print("| round | husk-vmm | CPU ms per run |\n|---|---|---|")
        for rnd in range(3):
            for name, cmd in variants:
                print(f"| {rnd + 1} | {name} | {cpu_per_run(cmd, runs):.2f} |")


if __name__ == "__main__":
    main()
