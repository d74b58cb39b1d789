#!/usr/bin/env python3
"""`husk build` against Debian's `buildah bud` in one run (issue 20):
a build of N `RUN` steps with no cache, and a fully cached rebuild.

Both build the same Dockerfile from the same context on the same base
(husk's busybox, loaded into buildah's storage). buildah runs each step
with runc, its storage vfs, `--network none` (it takes no `RUN
--network`); husk's steps are `RUN --network=none` to match (loopback
only), the Dockerfiles otherwise the same. husk also builds the same
steps on its build network (docker build's default: CNI and a bridge),
reported apart. buildah's cached rebuild uses `--layers`. Runs alternate between the two
tools, the order swapped every round.

husk's cost per RUN step is split into:
- guest: the vCPU threads' CPU less their device-model time (the VMM's
  `HUSK_TIMINGS` figures; every step runs the same command, so the last
  step's figures stand for each);
- host-side: the CPU of husk and all its children (getrusage) less the
  guest's and less the VMM's own measuring, per step.

usage: scripts/bench-build.py DIR [N] [RUNS]      (as root)
  DIR: a directory holding husk, husk-vmm and husk-agent, e.g.
       target/x86_64-unknown-linux-musl/release
"""

import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

args = sys.argv[1:]
if not args:
    sys.exit(__doc__)
d = os.path.abspath(args[0])
n = int(args[1]) if len(args) > 1 else 5
runs = int(args[2]) if len(args) > 2 else 3
work = tempfile.mkdtemp(prefix="husk-bench-build-")


def context(name, flags):
    """A context whose Dockerfile runs the n steps with `flags`."""
    path = os.path.join(work, name)
    os.makedirs(path)
    with open(os.path.join(path, "Dockerfile"), "w") as f:
        f.write("FROM husk/busybox\n")
        for i in range(n):
            f.write(f"RUN {flags}echo step {i} > /step-{i}\n")
    return path


ctx = context("ctx", "--network=none ")
# The same steps on husk's build network (docker build's default), which
# buildah's `--network none` runs have no counterpart of.
ctx_net = context("ctx-net", "")
root = os.path.join(work, "husk-root")
husk = [d + "/husk", "--root", root]
env = dict(os.environ, HUSK_VMM=d + "/husk-vmm")
with open(os.path.join(work, "registries.conf"), "w") as f:
    f.write("unqualified-search-registries = []\n")
with open(os.path.join(work, "policy.json"), "w") as f:
    f.write('{"default":[{"type":"insecureAcceptAnything"}]}')
buildah = ["buildah", "--root", os.path.join(work, "b-root"), "--runroot",
           os.path.join(work, "b-runroot"), "--storage-driver", "vfs",
           "--cgroup-manager", "cgroupfs", "--registries-conf",
           os.path.join(work, "registries.conf")]
quiet = dict(stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
archive = os.path.join(work, "busybox.tar")
subprocess.run(husk + ["busybox-image", "--output", archive], check=True, env=env, **quiet)
image = subprocess.run(buildah + ["pull", "--signature-policy", os.path.join(work, "policy.json"),
                                  "--quiet", "oci-archive:" + archive],
                       check=True, capture_output=True, text=True).stdout.strip()
subprocess.run(buildah + ["tag", image, "localhost/husk/busybox:latest"], check=True, **quiet)


def cleanup():
    """buildah's containers and images, husk's root and the context go."""
    subprocess.run(buildah + ["rm", "--all"], **quiet)
    subprocess.run(buildah + ["rmi", "--all", "--force"], **quiet)
    shutil.rmtree(work, ignore_errors=True)


def timed(cmd, env=env):
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.monotonic()
    done = subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                          stdin=subprocess.DEVNULL)
    if done.returncode != 0:
        cleanup()
        sys.exit(f"{cmd}: {done.stderr.decode()}")
    wall = time.monotonic() - t
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    return wall * 1000, cpu * 1e6


rows = {k: [] for k in ["husk", "buildah", "husk cached", "buildah cached", "host", "guest",
                        "husk net", "host net"]}
for i in range(runs + 1):
    order = ["husk", "buildah"] if i % 2 == 0 else ["buildah", "husk"]
    for tool in order:
        if tool == "husk":
            prefix = os.path.join(work, f"t{i}")
            wall, cpu = timed(husk + ["build", "--no-cache", "-t", "localhost/bench:1", ctx],
                              env=dict(env, HUSK_TIMINGS=prefix))
            cached, _ = timed(husk + ["build", "-t", "localhost/bench:1", ctx])
            vmm = json.load(open(prefix + ".vmm.json"))
            guest = vmm["vcpu_cpu_us"] - vmm["device_us"]
            host = (cpu - n * (guest + (vmm.get("timings_cpu_us") or 0))) / n
            net_wall, net_cpu = timed(husk + ["build", "--no-cache", "-t", "localhost/bench:2",
                                              ctx_net], env=dict(env, HUSK_TIMINGS=prefix))
            vmm = json.load(open(prefix + ".vmm.json"))
            net_guest = vmm["vcpu_cpu_us"] - vmm["device_us"]
            net_host = (net_cpu - n * (net_guest + (vmm.get("timings_cpu_us") or 0))) / n
        else:
            # buildah's cache is its --layers; the first build fills it.
            subprocess.run(buildah + ["rmi", "--all", "--force"], **quiet)
            subprocess.run(buildah + ["pull", "--signature-policy",
                                      os.path.join(work, "policy.json"), "--quiet",
                                      "oci-archive:" + archive], check=True, **quiet)
            subprocess.run(buildah + ["tag", image, "localhost/husk/busybox:latest"], check=True,
                           **quiet)
            # buildah 1.28 takes no `RUN --network`: its flag does it.
            wall, _ = timed(buildah + ["bud", "--pull=never", "--runtime", "runc", "--network", "none", "--layers",
                                       "-t", "localhost/bench:1", ctx_net])
            cached, _ = timed(buildah + ["bud", "--pull=never", "--runtime", "runc", "--network", "none", "--layers",
                                         "-t", "localhost/bench:1", ctx_net])
        if i == 0:
            continue
        rows[tool].append(wall)
        rows[tool + " cached"].append(cached)
        if tool == "husk":
            rows["host"].append(host / 1000)
            rows["guest"].append(guest / 1000)
            rows["husk net"].append(net_wall)
            rows["host net"].append(net_host / 1000)
cleanup()

m = {k: statistics.median(v) for k, v in rows.items()}
print(f"{n} RUN steps, {runs} runs each, medians")
print("| | husk | buildah bud | husk / buildah |")
print("|---|---|---|---|")
print(f"| build, no cache | {m['husk']:.0f} ms | {m['buildah']:.0f} ms | {m['husk'] / m['buildah']:.2f} |")
print(f"| per RUN step | {m['husk'] / n:.0f} ms | {m['buildah'] / n:.0f} ms | |")
print(f"| fully cached rebuild | {m['husk cached']:.0f} ms | {m['buildah cached']:.0f} ms | "
      f"{m['husk cached'] / m['buildah cached']:.2f} |")
print(f"husk per RUN step: host-side CPU {m['host']:.1f} ms, guest CPU {m['guest']:.1f} ms")
print(f"husk on its build network (RUN without --network=none): {m['husk net']:.0f} ms, "
      f"{m['husk net'] / n:.0f} ms a step, host-side CPU {m['host net']:.1f} ms a step")
