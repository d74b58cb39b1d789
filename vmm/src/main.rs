//! `husk-vmm`: boot one microVM from a kernel and an initramfs.
//!
//! Exits 0 when the guest powers off or reboots, and non-zero with one line
//! on stderr naming what failed: a bad argument, a host without KVM, a
//! kernel that cannot be loaded, a guest panic, a vCPU that died, or (5) a
//! system call a thread's seccomp filter does not allow.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::Parser;
use husk_vmm::devices::virtio::fs::Share;
use husk_vmm::paths;
use husk_vmm::timing::Clock;
use husk_vmm::vm::{Console, SnapshotAt, Vm, VmConfig, VmError};

/// Boot a Linux guest in a KVM microVM.
#[derive(Parser, Debug)]
#[command(name = "husk-vmm", version)]
struct Args {
    /// Guest kernel: an uncompressed ELF vmlinux with a PVH entry point.
    /// Defaults to $HUSK_KERNEL, else the one kernel-config/build-kernel.sh built.
    #[arg(long)]
    kernel: Option<PathBuf>,
    /// Initramfs (newc cpio) for the guest.
    #[arg(long)]
    initramfs: Option<PathBuf>,
    /// Appended to the default kernel command line (may start with `--`:
    /// what follows `--` goes to the guest's init).
    #[arg(long, default_value = "", allow_hyphen_values = true)]
    cmdline: String,
    /// Number of vCPUs.
    #[arg(long, default_value_t = 1)]
    cpus: u8,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = 128)]
    memory: u64,
    /// Write the guest console here instead of to stdout.
    #[arg(long)]
    console: Option<PathBuf>,
    /// The most bytes the `--console` file holds: past it, its older half
    /// is dropped (at least 4096).
    #[arg(long, default_value_t = husk_vmm::devices::console_log::DEFAULT_LIMIT)]
    console_limit: u64,
    /// Write boot timings (JSON) here when the VM ends.
    #[arg(long)]
    timings: Option<PathBuf>,
    /// Snapshot the VM into this directory, and end, when the guest writes
    /// the `--snapshot-at-mark` value to the debug port.
    #[arg(long, requires = "snapshot_at_mark")]
    snapshot_dir: Option<PathBuf>,
    /// The debug-port value that triggers the snapshot (2: the kernel has
    /// just executed init).
    #[arg(long, requires = "snapshot_dir", value_parser = parse_mark)]
    snapshot_at_mark: Option<u8>,
    /// Give the guest no virtio-rng device (by default it has one, fed
    /// from the host's getrandom, so it has entropy at boot).
    #[arg(long)]
    no_rng: bool,
    /// Run without the per-thread seccomp filters (for debugging only).
    #[arg(long)]
    no_seccomp: bool,
    /// Give the guest a vsock device (CID 3) whose host side is this Unix
    /// socket: connect, write `CONNECT <port>\n`, read `OK <n>\n`.
    #[arg(long)]
    vsock_socket: Option<PathBuf>,
    /// Share a host directory with the guest over virtio-fs: TAG=DIR, or
    /// TAG=DIR:ro for one the guest may not change (the guest mounts it
    /// with `mount -t virtiofs TAG DIR`). Repeatable. With --restore, binds
    /// the snapshot's share of that tag to DIR.
    #[arg(long = "share", value_name = "TAG=DIR[:ro]")]
    shares: Vec<Share>,
    /// Give the guest this many network slots (virtio-net devices after
    /// the shares: eth0, eth1, ...; at most 4). A slot with no TAP drops
    /// what the guest sends until one is bound (`--net`, or the API's
    /// `attach_net`).
    #[arg(long, default_value_t = 0)]
    nets: u8,
    /// Bind network slot SLOT to the TAP open at descriptor FD (inherited;
    /// opened IFF_TAP | IFF_NO_PI | IFF_VNET_HDR). Repeatable. With
    /// --restore, binds the snapshot's slot.
    #[arg(long = "net", value_name = "SLOT=FD", value_parser = parse_net)]
    taps: Vec<(u8, i32)>,
    /// The read end of the pipe its starter holds the write end of
    /// (`husk_sys::child::spawn_vmm`): the VMM takes a clean signal
    /// state and dies with the thread that spawned it.
    #[arg(long, value_name = "FD", hide = true)]
    starter_pipe: Option<i32>,
    /// The write end of a pipe (inherited) on which the VMM writes one
    /// byte once its sockets are bound, then closes it: its starter
    /// connects then, instead of trying until the socket is there.
    #[arg(long, value_name = "FD", hide = true)]
    ready_fd: Option<i32>,
    /// Keep the network namespace this process starts in instead of
    /// making an empty one: its starter made that namespace for this VM's
    /// container alone (husk's monitor, for a spec that asks for a new
    /// one), so it holds only the container's own network.
    #[arg(long)]
    container_netns: bool,
    /// Serve the control socket (pause, resume, stop) at this path.
    #[arg(long)]
    api_socket: Option<PathBuf>,
    /// Run in the host's mount namespace instead of a root of its own that
    /// holds only this VM's files (for debugging only).
    #[arg(long)]
    no_jail: bool,
    /// Jail this process as for a VM, then try, from a thread set up as a
    /// vCPU thread is, what a guest that took over the VMM would (tests
    /// only): one JSON line per attempt, exit 0 if all were refused.
    #[arg(long, hide = true)]
    self_test: bool,
    /// For --self-test: another VMM's process ID.
    #[arg(long, hide = true, requires = "self_test")]
    self_test_pid: Option<u32>,
    /// For --self-test: a file outside this VM's shares.
    #[arg(long, hide = true, requires = "self_test")]
    self_test_file: Option<PathBuf>,
    /// For --self-test: a TCP port listening on the host's 127.0.0.1.
    #[arg(long, hide = true, requires = "self_test")]
    self_test_port: Option<u16>,
    /// Restore the VM saved in this snapshot directory instead of booting.
    #[arg(
        long,
        conflicts_with_all = ["kernel", "initramfs", "cmdline", "cpus", "memory", "snapshot_dir", "no_rng", "nets"]
    )]
    restore: Option<PathBuf>,
}

fn parse_mark(s: &str) -> Result<u8, String> {
    let parsed = match s.strip_prefix("0x") {
        Some(hex) => u8::from_str_radix(hex, 16),
        None => s.parse(),
    };
    parsed.map_err(|_| format!("{s} is not a debug-port value (0-255)"))
}

/// Exit status when the guest kernel panicked (2 is clap's, for usage errors).
fn parse_net(s: &str) -> Result<(u8, i32), String> {
    let bad = || format!("--net {s:?} is not SLOT=FD (a slot number and an open descriptor)");
    let (slot, fd) = s.split_once('=').ok_or_else(bad)?;
    let slot: u8 = slot.parse().map_err(|_| bad())?;
    let fd: i32 = fd.parse().map_err(|_| bad())?;
    if fd < 3 {
        return Err(format!("--net {s:?}: descriptor {fd} is stdio, not a TAP"));
    }
    Ok((slot, fd))
}

/// Takes the descriptors `--net` named; one that is not open is refused.
fn take_taps(taps: &[(u8, i32)]) -> Result<husk_vmm::vm::Taps, String> {
    let mut taken = husk_vmm::vm::Taps::new();
    for &(slot, fd) in taps {
        if taken.iter().any(|(s, _)| *s == slot) {
            return Err(format!("--net: slot {slot} is given twice"));
        }
        // SAFETY: F_GETFD reads no memory; it only tells whether `fd` is
        // open in this process.
        if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
            return Err(format!("--net {slot}={fd}: descriptor {fd} is not open"));
        }
        // SAFETY: `fd` is open, was inherited for this use, and nothing
        // else in the VMM owns it (each is taken once: checked above, and
        // a descriptor named twice is refused below by the second take).
        let owned = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        if taken
            .iter()
            .any(|(_, f)| std::os::fd::AsRawFd::as_raw_fd(f) == fd)
        {
            std::mem::forget(owned);
            return Err(format!("--net: descriptor {fd} is given twice"));
        }
        taken.push((slot, owned));
    }
    Ok(taken)
}

const EXIT_GUEST_PANIC: u8 = 4;
/// Exit status when a vCPU died (emulation failure, triple fault, ...).
const EXIT_VCPU_DIED: u8 = 3;
/// Exit status for every set-up error.
const EXIT_SETUP: u8 = 1;

/// dlmalloc, not musl's mallocng: mallocng maps and unmaps small groups
/// as they fill and empty (about 40 mmap/munmap pairs per container run on
/// the vCPU thread alone, each munmap a TLB flush across the VMM's
/// threads); dlmalloc keeps freed memory for the next request.
#[global_allocator]
static ALLOCATOR: dlmalloc::GlobalDlmalloc = dlmalloc::GlobalDlmalloc;

fn main() -> ExitCode {
    // Whatever the VMM makes (sockets, snapshots, timings) is its user's
    // alone; vCPU threads take a umask of their own (confine).
    // SAFETY: umask only sets the process's mask.
    unsafe { libc::umask(husk_vmm::confine::PROCESS_UMASK) };
    let clock = Arc::new(Clock::from_env());
    let args = Args::parse();
    // First, while it has one thread: signals as a fresh process's, and
    // its end with its starter's.
    if let Some(fd) = args.starter_pipe {
        husk_sys::child::adopt_starter(fd);
    }
    if args.timings.is_some() {
        clock.collect_at_exit();
    }
    // Before any thread starts: SIGTERM, SIGINT and SIGHUP remove the
    // sockets and end the VMM, taken on the main thread only. First of
    // all: as PID 1 of a namespace of its own, the VMM gets no signal
    // from its starter for which it has no handler.
    husk_vmm::stop::block(
        &args
            .api_socket
            .iter()
            .chain(&args.vsock_socket)
            .cloned()
            .collect::<Vec<_>>(),
    );
    // Still one thread: close what was inherited, set the rlimits, leave
    // the host's IPC, UTS and network namespaces (confine::process).
    let taps: Vec<i32> = args
        .taps
        .iter()
        .map(|&(_, fd)| fd)
        .chain(args.ready_fd)
        .collect();
    let max_file_size = husk_vmm::confine::MAX_FILE_SIZE.max(args.memory << 20);
    if let Err(e) = husk_vmm::confine::process(&taps, max_file_size, args.container_netns) {
        eprintln!("husk-vmm: cannot confine the process: {e}");
        return ExitCode::from(EXIT_SETUP);
    }
    clock.setup_step("confine");
    // Then its jail: a root of its own and a uid of its own
    // (docs/security.md, "The VMM process").
    if !args.no_jail && husk_vmm::confine::may_make_namespaces() {
        // Its PID on the host: in a PID namespace of its own it is 1.
        let pid = husk_vmm::confine::host_pid();
        let id = husk_vmm::confine::vmm_id(pid);
        if let Err(e) = husk_vmm::jail::enter(&jail_binds(&args, pid))
            .and_then(|()| husk_vmm::confine::become_own_user(id))
        {
            eprintln!("husk-vmm: cannot enter the jail: {e}");
            return ExitCode::from(EXIT_SETUP);
        }
        clock.setup_step("jail");
    }
    if !args.no_seccomp
        && let Err(e) = husk_vmm::seccomp::prepare()
    {
        eprintln!("husk-vmm: cannot build the seccomp filters: {e}");
        return ExitCode::from(EXIT_SETUP);
    }
    if args.self_test {
        let targets = husk_vmm::self_test::Targets {
            pid: args.self_test_pid,
            file: args.self_test_file.clone(),
            port: args.self_test_port,
            read_only: args
                .kernel
                .clone()
                .or_else(|| args.restore.is_none().then(paths::default_kernel)),
            shares: args.shares.clone(),
        };
        return if husk_vmm::self_test::run(&targets) {
            ExitCode::SUCCESS
        } else {
            ExitCode::from(EXIT_SETUP)
        };
    }
    let console = args.console.map_or(Console::Stdout, |path| {
        Console::File(path, args.console_limit)
    });
    let taps = match take_taps(&args.taps) {
        Ok(taps) => taps,
        Err(e) => {
            eprintln!("husk-vmm: {e}");
            return ExitCode::from(EXIT_SETUP);
        }
    };
    let vm = match &args.restore {
        Some(dir) => Vm::restore(
            dir,
            &console,
            args.vsock_socket.as_deref(),
            &args.shares,
            taps,
            clock,
        ),
        None => {
            let config = VmConfig {
                kernel: args.kernel.unwrap_or_else(paths::default_kernel),
                initramfs: args.initramfs,
                extra_cmdline: args.cmdline,
                vcpus: args.cpus,
                memory_mib: args.memory,
                console,
                snapshot_at: args
                    .snapshot_dir
                    .zip(args.snapshot_at_mark)
                    .map(|(dir, mark)| SnapshotAt { mark, dir }),
                rng: !args.no_rng,
                vsock: args.vsock_socket.clone(),
                shares: args.shares.clone(),
                nets: args.nets,
                taps,
            };
            Vm::new(config, clock)
        }
    };
    let sockets: Vec<PathBuf> = args
        .api_socket
        .iter()
        .chain(&args.vsock_socket)
        .cloned()
        .collect();
    let vm = match vm {
        Ok(vm) => vm,
        Err(e) => {
            // Set-up may have bound the vsock socket before it failed.
            if !matches!(e, VmError::VsockSocket(..)) {
                if let Some(path) = &args.vsock_socket {
                    husk_vmm::api::remove_socket(path);
                }
            }
            eprintln!("husk-vmm: {}", error_chain(&e));
            return ExitCode::from(EXIT_SETUP);
        }
    };
    if let Some(path) = &args.api_socket
        && let Err(e) = vm.serve_api(path)
    {
        if let Some(path) = &args.vsock_socket {
            husk_vmm::api::remove_socket(path);
        }
        eprintln!("husk-vmm: {}", error_chain(&e));
        return ExitCode::from(EXIT_SETUP);
    }
    // Its sockets are bound: its starter may connect now.
    if let Some(fd) = args.ready_fd {
        husk_sys::child::tell_ready(fd);
    }
    let (result, times) = vm.run();
    for path in &sockets {
        husk_vmm::api::remove_socket(path);
    }
    if let Some(path) = &args.timings {
        let json = serde_json::to_string_pretty(&times).unwrap_or_default();
        if let Err(e) = std::fs::write(path, json) {
            eprintln!("husk-vmm: cannot write timings to {}: {e}", path.display());
        }
    }
    // The vCPU threads are still inside KVM_RUN: end the process here.
    match result {
        Ok(_) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("husk-vmm: {}", error_chain(&e));
            ExitCode::from(match e {
                VmError::GuestPanic => EXIT_GUEST_PANIC,
                VmError::VcpuDied(..) => EXIT_VCPU_DIED,
                _ => EXIT_SETUP,
            })
        }
    }
}

/// What this VM's jail holds (vmm/src/jail.rs): the files and
/// directories named by its arguments, each at its own path. The files
/// it will write (console, timings) and a new snapshot's directory are
/// made first, so that the jail can hold them.
fn jail_binds(args: &Args, pid: u32) -> Vec<husk_vmm::jail::Bind> {
    use husk_vmm::jail::{self, Bind};
    let mut binds = vec![
        Bind {
            devices: true,
            ..Bind::rw("/dev/kvm")
        },
        jail::own_proc(pid),
    ];
    if args.restore.is_none() {
        let kernel = args.kernel.clone().unwrap_or_else(paths::default_kernel);
        binds.push(Bind::ro(jail::absolute(&kernel)));
    }
    binds.extend(args.initramfs.iter().map(|p| Bind::ro(jail::absolute(p))));
    binds.extend(args.restore.iter().map(|p| Bind::ro(jail::absolute(p))));
    if let Some(dir) = &args.snapshot_dir {
        use std::os::unix::fs::DirBuilderExt;
        let _ = std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir);
        binds.push(Bind::rw(jail::absolute(dir)));
    }
    for file in args.console.iter().chain(&args.timings) {
        jail::touch(file);
        binds.push(Bind::rw(jail::absolute(file)));
    }
    for socket in args.api_socket.iter().chain(&args.vsock_socket) {
        let dir = jail::socket_dir(socket);
        if !binds.iter().any(|b| b.path == dir) {
            binds.push(Bind::rw(dir));
        }
    }
    for share in &args.shares {
        jail::add_once(
            &mut binds,
            Bind {
                read_only: share.read_only,
                ..Bind::rw(jail::absolute(&share.dir))
            },
        );
    }
    binds
}

/// The error and its sources on one line.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut line = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        line.push_str(": ");
        line.push_str(&s.to_string());
        source = s.source();
    }
    line
}
