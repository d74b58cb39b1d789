#!/usr/bin/env bash
# Everything Husk needs from outside the repository, installed explicitly so
# that a fresh Debian 12 machine gets it from the README's commands alone.
# Fast when it is all there already.
set -euo pipefail

pkgs=(
	# guest kernel build (kernel-config/build-kernel.sh)
	linux-source-6.12 build-essential flex bison bc libelf-dev libssl-dev xz-utils
	# tests: unshare, setpriv, script; busybox for the guest and the
	# built-in image; containerd (with ctr and the runc v2 shim) drives husk
	util-linux bsdutils busybox-static containerd
	# benchmark baselines: QEMU microvm with the same kernel; crun, runc
	# and gVisor's runsc on the same bundle
	qemu-system-x86 crun runc runsc
	# tests compare checksums
	coreutils
	# husk ships static (musl) and speaks HTTPS to registries: rustls's
	# ring is built with musl-gcc
	musl-tools
	# image tests: a local registry, skopeo to push to it and as the pull
	# benchmark's baseline, zstd-compressed layers
	docker-registry skopeo zstd
	# htpasswd (bcrypt) for the registry the basic-auth test starts
	apache2-utils
	# network tests: namespaces, TAPs and addresses (ip); the CNI plugins
	# husk's networks are built on (issue 16); podman driving husk on a
	# CNI network of its own, whose portmap and bridge plugins need
	# iptables
	iproute2 containernetworking-plugins podman iptables
	# dockerd driving husk (its own daemon per test); iperf3 for the
	# network benchmark
	docker.io iperf3
	# husk build's images compared with buildah bud's (issue 20)
	buildah
	# the Kubernetes tests' CRI client (k8s-cri) compiles CRI's protos
	protobuf-compiler
)
missing=()
for p in "${pkgs[@]}"; do
	dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
	echo "install-deps: installing ${missing[*]}" >&2
	export DEBIAN_FRONTEND=noninteractive
	apt-get update -qq
	apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

# The guest binaries (test init, agent) are static musl builds.
if ! rustup target list --installed | grep -qx x86_64-unknown-linux-musl; then
	rustup target add x86_64-unknown-linux-musl
fi
if ! cargo nextest --version >/dev/null 2>&1; then
	cargo install --locked cargo-nextest
fi
