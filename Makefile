# Husk's one developer entry point. The README's quick start is `make run`
# and `make test`; .ci/run calls `make test` and nothing else.

MUSL := x86_64-unknown-linux-musl
TEST_INIT := target/$(MUSL)/release/husk-test-init
AGENT := target/$(MUSL)/release/husk-agent
# husk-vmm ships as a static musl binary, as Firecracker does: no shared
# libraries to load or map, half the resident memory of the glibc build.
VMM := target/$(MUSL)/release/husk-vmm
TEST_INITRAMFS := target/test-init.cpio
AGENT_INITRAMFS := target/agent.cpio

.PHONY: all deps kernel test-init agent build run boot test lint bench fuzz clean

all: build

# Debian packages, the musl target, cargo-nextest.
deps:
	scripts/install-deps.sh

# The guest kernel, cached under /var/cache/husk/kernel (or $$HUSK_CACHE).
kernel: deps
	kernel-config/build-kernel.sh

test-init: deps
	cargo build --release --target $(MUSL) -p husk-test-init

# The guest agent, PID 1 of container guests: static, packed into the
# initramfs by the runtime.
agent: deps
	cargo build --release --target $(MUSL) -p husk-agent

# husk and husk-vmm ship static (musl): no dynamic loader on the path of
# every command (husk exec's start-up halves).
HUSK := target/$(MUSL)/release/husk

build: deps
	cargo build --release --bins
	cargo build --release --target $(MUSL) -p husk-vmm
	# husk itself is linked at a fixed address (not PIE): no relocation of
	# its 350 KiB of read-only data at every start, 0.1-0.2 ms of each
	# command (docs/benchmarks.md, husk exec). husk-vmm, the trust
	# boundary with the guest, stays position-independent.
	cargo rustc --release --target $(MUSL) -p husk --bin husk -- -C relocation-model=static

$(TEST_INITRAMFS): test-init build
	target/release/husk mkinitramfs --init $(TEST_INIT) --output $(TEST_INITRAMFS)

$(AGENT_INITRAMFS): agent build
	target/release/husk mkinitramfs --init $(AGENT) --output $(AGENT_INITRAMFS)

# The built-in default container: `husk/busybox`, an image husk makes
# itself from Debian's busybox-static the first time it is asked for (no
# registry needed), run as docker would run it.
DEMO_IMAGE := husk/busybox
DEMO_CMD := sh -c 'echo "Hello from a Husk microVM: $$(uname -sr), hostname $$(hostname), PID $$$$"; ls /'

# The main job: a container of the default image in its own microVM
# (warm-started from a snapshot made on the first run), removed after.
run: kernel agent build
	$(HUSK) run --rm $(DEMO_IMAGE) $(DEMO_CMD)

# The guest kernel and the test init alone, without the runtime.
boot: kernel $(TEST_INITRAMFS)
	$(VMM) --initramfs $(TEST_INITRAMFS)

lint: deps
	cargo fmt --all -- --check
	cargo clippy --workspace --all-targets -- -D warnings

# The whole suite: unit tests, and tests that boot real microVMs. The
# static binaries `make run` uses are built too, so that a change that
# breaks their (musl) build fails here.
# The tests that drive containerd find its shim next to the debug husk:
# no test target builds that binary, so it is built here.
test: kernel test-init agent build lint
	cargo build -p husk-shim
	cargo nextest run --workspace --no-fail-fast
	# Every fuzz target briefly (docs/fuzzing.md); `make fuzz` runs longer.
	scripts/fuzz.sh 5

# Benchmarks (docs/benchmarks.md): boot against QEMU microvm, snapshot
# restore against cold boot, husk run against crun/runc/runsc, and the
# virtio-fs server against host system calls, the virtio-net device against
# a raw TAP loop.
bench: kernel $(TEST_INITRAMFS) $(AGENT_INITRAMFS)
	target/release/husk-bench-boot --vmm $(VMM) --initramfs $(TEST_INITRAMFS)
	target/release/husk-bench-snapshot --vmm $(VMM) --initramfs $(TEST_INITRAMFS) \
		--agent-initramfs $(AGENT_INITRAMFS)
	target/release/husk-bench-run --husk $(HUSK) --vmm $(VMM)
	target/release/husk-bench-seccomp
	target/release/husk-bench-fs
	target/release/husk-bench-ctr --husk $(HUSK)
	target/release/husk-bench-net
	target/release/husk-bench-image --husk $(HUSK)
	target/release/husk-bench-checkpoint --husk $(HUSK)

# Every fuzz target for FUZZ_SECONDS seconds each (docs/fuzzing.md).
FUZZ_SECONDS ?= 300
fuzz:
	scripts/fuzz.sh $(FUZZ_SECONDS)

clean:
	cargo clean
