#!/usr/bin/env bash
# Build Husk's guest kernel: an uncompressed vmlinux with a PVH entry point,
# from Debian's linux-source-6.12, husk.config and patches/.
#
# Idempotent: the result is cached outside the repository under
#   $HUSK_CACHE/kernel/<key>/vmlinux      (HUSK_CACHE defaults to /var/cache/husk)
# where <key> hashes the config fragment, the patches, this script and the
# source package's version; $HUSK_CACHE/kernel/vmlinux links to the newest
# build and is where the VMM and the runtime look by default.
#
# Prints the path of the vmlinux on its last line.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
cache=${HUSK_CACHE:-/var/cache/husk}
log() { echo "build-kernel: $*" >&2; }

need_pkgs=()
dpkg -s linux-source-6.12 >/dev/null 2>&1 || need_pkgs+=(linux-source-6.12)
for p in build-essential flex bison bc libelf-dev libssl-dev xz-utils; do
	dpkg -s "$p" >/dev/null 2>&1 || need_pkgs+=("$p")
done
if [ ${#need_pkgs[@]} -gt 0 ]; then
	log "installing ${need_pkgs[*]}"
	export DEBIAN_FRONTEND=noninteractive
	apt-get update -qq >&2
	apt-get install -y -qq --no-install-recommends "${need_pkgs[@]}" >&2
fi

mkdir -p "$cache/kernel"
# One build at a time: a second caller waits, then finds the cached result.
exec 9>"$cache/kernel/.lock"
flock 9

src_version=$(dpkg-query -W -f='${Version}' linux-source-6.12)
key=$( {
	echo "linux-source-6.12 $src_version"
	cat "$here/husk.config" "$here/build-kernel.sh"
	for p in "$here"/patches/*.patch; do cat "$p"; done
} | sha256sum | cut -c1-16)
out="$cache/kernel/$key"

if [ -f "$out/vmlinux" ]; then
	ln -sfn "$out/vmlinux" "$cache/kernel/vmlinux"
	echo "$out/vmlinux"
	exit 0
fi

# The patched source tree is kept, keyed by source version and patches; the
# object tree beside it is reused, so a config change rebuilds incrementally.
src_key=$( {
	echo "linux-source-6.12 $src_version"
	for p in "$here"/patches/*.patch; do cat "$p"; done
} | sha256sum | cut -c1-16)
tree="$cache/kernel/src-$src_key/linux-source-6.12"
objdir="$cache/kernel/obj"
if [ ! -f "$tree/.husk-ready" ]; then
	log "unpacking linux-source-6.12 $src_version and applying patches"
	rm -rf "$cache"/kernel/src-* "$objdir"
	mkdir -p "$cache/kernel/src-$src_key"
	tar -C "$cache/kernel/src-$src_key" -xf /usr/src/linux-source-6.12.tar.xz
	for p in "$here"/patches/*.patch; do
		log "applying $(basename "$p")"
		patch -d "$tree" -p1 --quiet --forward < "$p"
	done
	touch "$tree/.husk-ready"
fi
log "building kernel $key (linux-source-6.12 $src_version)"
mkdir -p "$objdir"

start=$(date +%s)
cd "$objdir"
KCONFIG_ALLCONFIG="$here/husk.config" make -s -C "$tree" O="$objdir" allnoconfig >&2
# Every option the fragment sets must have survived Kconfig's dependency
# resolution: a silently dropped option is a guest that lacks a feature.
missing=0
while IFS= read -r line; do
	case "$line" in
	CONFIG_*=n) opt=${line%%=*}
		if grep -q "^$opt=" .config; then log "option not disabled: $line"; missing=1; fi ;;
	CONFIG_*=*) if ! grep -qx "$line" .config; then log "option not set: $line"; missing=1; fi ;;
	esac
done < "$here/husk.config"
if [ "$missing" -ne 0 ]; then
	log "the config fragment does not hold; fix husk.config"
	exit 1
fi
make -s -C "$tree" O="$objdir" -j"$(nproc)" vmlinux >&2
end=$(date +%s)

mkdir -p "$out.tmp"
cp vmlinux "$out.tmp/vmlinux"
cp .config "$out.tmp/config"
cp System.map "$out.tmp/System.map"
echo "$((end - start))" > "$out.tmp/build-seconds"
rm -rf "$out"
mv "$out.tmp" "$out"
ln -sfn "$out/vmlinux" "$cache/kernel/vmlinux"
# Keep the three newest builds (other checkouts may still boot them).
ls -1dt "$cache"/kernel/[0-9a-f]*/ 2>/dev/null | tail -n +4 | xargs -r rm -rf
log "built in $((end - start)) s: $out/vmlinux"
echo "$out/vmlinux"
