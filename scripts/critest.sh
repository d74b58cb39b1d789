#!/usr/bin/env bash
# CRI conformance by hand (not CI): cri-tools' critest against one
# containerd with CRI on, once with the `runc` handler and once with
# `husk` (docs/kubernetes.md, "critest").
#
#   scripts/critest.sh CRITEST [BIN_DIR]
#
# CRITEST: a critest binary built offline from cri-tools' public source
# (it vendors its modules; nothing of it is in this repository), e.g.
#   git archive v1.26.1 | tar -x -C /tmp/cri-tools   (from a fetched clone)
#   cd /tmp/cri-tools && GOFLAGS=-mod=vendor GOPROXY=off \
#     /usr/lib/go-1.23/bin/go test -c -o /tmp/critest ./cmd/critest
# BIN_DIR: where husk and containerd-shim-husk-v2 are (target/release).
# HANDLERS: which to run (default: "runc husk").
#
# There is no registry on the internet here: the images critest pulls are
# busybox images husk makes, pushed to a docker-registry of the script's
# own on 127.0.0.1, which containerd uses as the mirror of registry.k8s.io
# and gcr.io. Images whose content critest checks (a set user, a digest)
# cannot be made so, and fail alike for both handlers.
set -euo pipefail

critest=$(realpath "$1")
bin=$(realpath "${2:-target/release}")
d=/tmp/husk-critest
port=5123
bridge=huskcrit
rm -rf "$d"
mkdir -p "$d"/{cni,tmp,reports,storage}
netns_before=$(ip netns list | awk '{print $1}' | sort)
sockets_before=$(ls /run/containerd/s 2>/dev/null | sort)
cleanup() {
	set +e
	[ -n "${ctd:-}" ] && kill "$ctd" && wait "$ctd"
	[ -n "${reg:-}" ] && kill "$reg" && wait "$reg"
	pkill -KILL -f "$d/" 2>/dev/null
	sleep 1
	# Whatever the killed shims left: mounts (deepest first), CRI's
	# network namespaces and the shims' sockets made since the start.
	grep " $d/" /proc/self/mountinfo | awk '{print length($5), $5}' | sort -rn |
		while read -r _ m; do umount -l "$m"; done
	comm -13 <(echo "$netns_before") <(ip netns list | awk '{print $1}' | sort) |
		while read -r n; do [ -n "$n" ] && ip netns del "$n"; done
	comm -13 <(echo "$sockets_before") <(ls /run/containerd/s 2>/dev/null | sort) |
		while read -r s; do [ -n "$s" ] && rm -f "/run/containerd/s/$s"; done
	ip link del "$bridge" 2>/dev/null
	rm -rf "$d"
}
trap cleanup EXIT

cat >"$d/registry.yml" <<EOF
version: 0.1
log:
  level: warn
storage:
  filesystem:
    rootdirectory: $d/storage
http:
  addr: 127.0.0.1:$port
EOF
docker-registry serve "$d/registry.yml" >"$d/registry.log" 2>&1 &
reg=$!

image() { # NAME [CMD...]: husk's busybox as NAME in the local registry
	local name=$1
	shift
	local args=()
	for a in "$@"; do args+=("--cmd=$a"); done
	"$bin/husk" busybox-image --output "$d/image.tar" --name "$name" "${args[@]}" >/dev/null
	skopeo copy -q --dest-tls-verify=false "oci-archive:$d/image.tar" "docker://127.0.0.1:$port/${name#*/}"
}
sleep 1
image registry.k8s.io/e2e-test-images/busybox:1.29-2
image registry.k8s.io/e2e-test-images/nginx:1.14-2 sh -c 'mkdir -p /www && echo ok >/www/index.html && exec httpd -f -p 80 -h /www'
# The multi-container specs look for apache's start line in its log.
image registry.k8s.io/e2e-test-images/httpd:2.4.39-4 sh -c 'echo "httpd -D FOREGROUND"; mkdir -p /www && echo ok >/www/index.html && exec httpd -f -p 80 -h /www'
for i in test-image-latest:latest test-image-tag:test test-image-tag:all test-image-1:latest \
	test-image-2:latest test-image-3:latest test-image-user-uid:latest \
	test-image-user-username:latest test-image-user-uid-group:latest \
	test-image-user-username-group:latest test-image-predefined-group:latest; do
	# Each a different image (its command names it): the image specs
	# count images and their tags.
	image "gcr.io/k8s-staging-cri-tools/$i" echo "$i"
done

cat >"$d/cni/10-husk.conflist" <<EOF
{"cniVersion":"1.0.0","name":"$bridge","plugins":[{"type":"bridge","bridge":"$bridge","isGateway":true,
 "ipam":{"type":"host-local","ranges":[[{"subnet":"10.94.0.0/16"}]],"dataDir":"$d/ipam"}},
 {"type":"portmap","capabilities":{"portMappings":true}}]}
EOF
# One containerd per handler, each with a root of its own: the image
# specs count the images a store holds.
start_containerd() { # HANDLER
	local c=$d/$1
	mkdir -p "$c"
	cat >"$c/config.toml" <<EOF
version = 2
root = "$c/root"
state = "$c/state"
[grpc]
  address = "$c/containerd.sock"
[ttrpc]
  address = "$c/containerd.sock.ttrpc"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "docker.io/husk/pause:critest"
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.husk]
      runtime_type = "io.containerd.husk.v2"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "$d/cni"
  [plugins."io.containerd.grpc.v1.cri".registry.mirrors."registry.k8s.io"]
    endpoint = ["http://127.0.0.1:$port"]
  [plugins."io.containerd.grpc.v1.cri".registry.mirrors."gcr.io"]
    endpoint = ["http://127.0.0.1:$port"]
EOF
	PATH="$bin:$PATH" TMPDIR="$d/tmp" HUSK_WARM_CACHE=/var/lib/husk \
		containerd --config "$c/config.toml" >"$c/containerd.log" 2>&1 &
	ctd=$!
	for _ in $(seq 100); do [ -S "$c/containerd.sock" ] && break; sleep 0.1; done
	ctr --address "$c/containerd.sock" -n k8s.io images import "$d/pause.tar" >/dev/null
}
"$bin/husk" busybox-image --output "$d/pause.tar" --name docker.io/husk/pause:critest \
	--cmd sleep --cmd inf >/dev/null

for handler in ${HANDLERS:-runc husk}; do
	echo "== critest, handler $handler"
	start_containerd "$handler"
	"$critest" --runtime-endpoint "unix://$d/$handler/containerd.sock" \
		--image-endpoint "unix://$d/$handler/containerd.sock" \
		--runtime-handler "$handler" --ginkgo.no-color \
		--report-dir "$d/reports" --report-prefix "$handler" \
		>"$d/critest-$handler.log" 2>&1 || true
	grep -E "^(Ran|PASS|FAIL|SUCCESS)|Passed|Failed" "$d/critest-$handler.log" | tail -3
	grep -E "^\s*\[FAIL\]" "$d/critest-$handler.log" | sort -u >"/tmp/critest-$handler-failures.txt" || true
	cp "$d/critest-$handler.log" "/tmp/critest-$handler.log"
	kill "$ctd" && wait "$ctd" || true
	ctd=
done
