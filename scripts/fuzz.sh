#!/usr/bin/env bash
# Runs every fuzz target (fuzz/, docs/fuzzing.md) for SECONDS_PER_TARGET
# seconds each (default 10), on the stable toolchain: cargo-fuzz with no
# sanitizer (-s none) and debug assertions (-a). Fails when any target
# crashes, hangs (10 s for one input) or runs out of memory; what made it
# fail is left in fuzz/artifacts/<target>/ and named here.
#
# Each target starts from its committed corpus (fuzz/corpus/<target>:
# seeds and the regression inputs of crashes fixed) and keeps what it
# finds in fuzz/target/corpus/<target>, outside git, for the next run.
#
# usage: scripts/fuzz.sh [SECONDS_PER_TARGET] [TARGET...]
set -euo pipefail
cd "$(dirname "$0")/.."

seconds=${1:-10}
shift || true

# Installed explicitly: CI's machine may not have it. The version is the
# one docs/fuzzing.md was written against.
if ! cargo fuzz --version >/dev/null 2>&1; then
	echo "fuzz: installing cargo-fuzz"
	cargo install cargo-fuzz --locked --version 0.13.2
fi

# 16 codegen units: a quicker build, for somewhat slower runs.
flags=(-s none -a --codegen-units 16)
cargo fuzz build "${flags[@]}"
bin=fuzz/target/x86_64-unknown-linux-gnu/release

if [ $# -gt 0 ]; then
	targets=("$@")
else
	mapfile -t targets < <(cargo fuzz list)
fi

failed=()
for t in "${targets[@]}"; do
	echo "fuzz: $t for ${seconds}s"
	mkdir -p "fuzz/target/corpus/$t" "fuzz/artifacts/$t"
	# The binary as built above, not `cargo fuzz run`, which would build
	# again if a source changed meanwhile.
	if ! "$bin/$t" -artifact_prefix="fuzz/artifacts/$t/" \
		-max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 \
		-print_final_stats=1 "fuzz/target/corpus/$t" "fuzz/corpus/$t" \
		2>"fuzz/target/$t.log"; then
		failed+=("$t")
		tail -n 60 "fuzz/target/$t.log"
	fi
	grep -h '^stat::number_of_executed_units\|^stat::new_units_added' "fuzz/target/$t.log" |
		sed "s/^/fuzz: $t: /" || true
done

# A crashed target leaves its scratch directories behind.
for d in /tmp/husk-fuzz-*; do
	[ -e "$d" ] || continue
	pid=${d##*-}
	kill -0 "$pid" 2>/dev/null || rm -rf "$d"
done

if [ ${#failed[@]} -gt 0 ]; then
	echo "fuzz: FAILED: ${failed[*]}"
	for t in "${failed[@]}"; do
		ls -1 "fuzz/artifacts/$t"/* 2>/dev/null | sed 's/^/fuzz: input: /'
	done
	echo "fuzz: reproduce with: $bin/TARGET INPUT (or cargo fuzz run ${flags[*]} TARGET INPUT)"
	exit 1
fi
echo "fuzz: ${#targets[@]} targets, ${seconds}s each, no crash"
