//! Helpers for tests that run the real `husk-vmm` binary on real KVM.

#![allow(dead_code)]

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use husk_guest::initramfs::Initramfs;

/// The VMM binary cargo built for these tests.
pub const VMM: &str = env!("CARGO_BIN_EXE_husk-vmm");

/// How long any one guest may take before the test gives up on it. Boots
/// take seconds to a minute where guest kernel mode is emulated.
pub const BOOT_TIMEOUT: Duration = Duration::from_secs(600);

/// The guest kernel: `$HUSK_KERNEL`, else the cached build. A missing
/// kernel fails the test: the setup (`make test`) builds it.
pub fn kernel() -> PathBuf {
    let path = husk_vmm::paths::default_kernel();
    assert!(
        path.exists(),
        "no guest kernel at {}: build it with kernel-config/build-kernel.sh (make test does)",
        path.display()
    );
    path
}

/// The static test init (tests/test-init).
pub fn test_init_binary() -> PathBuf {
    husk_test_support::musl_binary("husk-test-init", "test-init")
}

/// The guest agent (agent/).
pub fn agent_binary() -> PathBuf {
    husk_test_support::musl_binary("husk-agent", "agent")
}

/// Spawns husk-vmm with `args`, its console read line by line on a thread.
pub fn spawn_vmm(
    args: &[&std::ffi::OsStr],
) -> (std::process::Child, std::sync::mpsc::Receiver<String>) {
    let mut child = vmm_command()
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn husk-vmm");
    let stdout = child.stdout.take().unwrap();
    let (tx, lines) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    (child, lines)
}

/// A scratch directory for one test, removed when dropped.
pub struct Scratch(pub PathBuf);

impl Scratch {
    pub fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("husk-test-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Writes an initramfs whose /init is the test init.
pub fn test_initramfs(scratch: &Scratch) -> PathBuf {
    let mut fs = Initramfs::with_base();
    fs.host_file("init", 0o755, &test_init_binary()).unwrap();
    let path = scratch.path("initramfs.cpio");
    fs.write_to(std::fs::File::create(&path).unwrap()).unwrap();
    path
}

/// Runs a command to its end, killing it after `BOOT_TIMEOUT`.
pub fn run_with_timeout(mut cmd: Command) -> Output {
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    wait_with_timeout(child)
}

/// Waits for a child spawned with piped stdout and stderr, killing it
/// after `BOOT_TIMEOUT`.
pub fn wait_with_timeout(child: std::process::Child) -> Output {
    husk_test_support::output_within(child, BOOT_TIMEOUT, "the VMM")
}

/// `husk-vmm` with the given arguments.
pub fn vmm(args: &[&str]) -> Command {
    let mut cmd = vmm_command();
    cmd.args(args);
    cmd
}

/// `husk-vmm`, killed by the kernel when the test that runs it ends, even
/// by nextest's timeout (issue 14: timed-out tests left VMs running).
pub fn vmm_command() -> Command {
    use std::os::unix::process::CommandExt;
    let mut cmd = Command::new(VMM);
    // SAFETY: prctl in the forked child, before exec.
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0);
            Ok(())
        });
    }
    cmd
}

/// A minimal ELF64 "kernel" whose PVH entry (32-bit protected mode) runs
/// `code`; with `pvh_note` false it has no PVH entry at all.
pub fn tiny_elf(code: &[u8], pvh_note: bool) -> Vec<u8> {
    const LOAD_ADDR: u64 = 0x100_0000;
    const EHDR: usize = 64;
    const PHDR: usize = 56;
    let phnum: u16 = if pvh_note { 2 } else { 1 };
    let note_off = EHDR + PHDR * phnum as usize;
    let mut note = Vec::new();
    note.extend_from_slice(&4u32.to_le_bytes()); // namesz
    note.extend_from_slice(&4u32.to_le_bytes()); // descsz
    note.extend_from_slice(&18u32.to_le_bytes()); // XEN_ELFNOTE_PHYS32_ENTRY
    note.extend_from_slice(b"Xen\0");
    note.extend_from_slice(&(LOAD_ADDR as u32).to_le_bytes());
    let code_off = 0x1000usize;

    let mut elf = Vec::new();
    elf.extend_from_slice(b"\x7fELF\x02\x01\x01\x00");
    elf.extend_from_slice(&[0; 8]);
    elf.extend_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    elf.extend_from_slice(&0x3eu16.to_le_bytes()); // x86-64
    elf.extend_from_slice(&1u32.to_le_bytes());
    elf.extend_from_slice(&LOAD_ADDR.to_le_bytes()); // entry
    elf.extend_from_slice(&(EHDR as u64).to_le_bytes()); // phoff
    elf.extend_from_slice(&0u64.to_le_bytes()); // shoff
    elf.extend_from_slice(&0u32.to_le_bytes()); // flags
    elf.extend_from_slice(&(EHDR as u16).to_le_bytes());
    elf.extend_from_slice(&(PHDR as u16).to_le_bytes());
    elf.extend_from_slice(&phnum.to_le_bytes());
    elf.extend_from_slice(&64u16.to_le_bytes()); // shentsize
    elf.extend_from_slice(&0u16.to_le_bytes()); // shnum
    elf.extend_from_slice(&0u16.to_le_bytes()); // shstrndx
    let phdr = |elf: &mut Vec<u8>, kind: u32, off: u64, addr: u64, size: u64| {
        elf.extend_from_slice(&kind.to_le_bytes());
        elf.extend_from_slice(&5u32.to_le_bytes()); // R+X
        elf.extend_from_slice(&off.to_le_bytes());
        elf.extend_from_slice(&addr.to_le_bytes()); // vaddr
        elf.extend_from_slice(&addr.to_le_bytes()); // paddr
        elf.extend_from_slice(&size.to_le_bytes()); // filesz
        elf.extend_from_slice(&size.to_le_bytes()); // memsz
        elf.extend_from_slice(&4u64.to_le_bytes()); // align
    };
    phdr(&mut elf, 1, code_off as u64, LOAD_ADDR, code.len() as u64);
    if pvh_note {
        phdr(&mut elf, 4, note_off as u64, 0, note.len() as u64);
    }
    assert_eq!(elf.len(), note_off);
    if pvh_note {
        elf.extend_from_slice(&note);
    }
    elf.resize(code_off, 0);
    elf.extend_from_slice(code);
    elf
}

/// A network namespace of the test's own (tests/support).
#[allow(unused_imports)]
pub use husk_test_support::Netns;

/// Opens a TAP `name` (IFF_TAP | IFF_NO_PI | IFF_VNET_HDR) in the calling
/// thread's namespace; inheritable, for `--net 0=FD`.
pub fn open_tap(name: &str) -> OwnedFd {
    // SAFETY: open of a NUL-terminated path; without O_CLOEXEC on purpose.
    let fd = unsafe { libc::open(c"/dev/net/tun".as_ptr(), libc::O_RDWR) };
    assert!(fd >= 0, "/dev/net/tun: {}", std::io::Error::last_os_error());
    // SAFETY: `fd` was just opened and is owned here alone.
    let tap = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut req = [0u8; 40];
    req[..name.len()].copy_from_slice(name.as_bytes());
    let flags: u16 = 0x0002 | 0x1000 | 0x4000; // IFF_TAP | IFF_NO_PI | IFF_VNET_HDR
    req[16..18].copy_from_slice(&flags.to_ne_bytes());
    // SAFETY: TUNSETIFF reads one 40-byte ifreq, which `req` is.
    let r = unsafe { libc::ioctl(tap.as_raw_fd(), 0x4004_54ca, req.as_mut_ptr()) };
    assert_eq!(r, 0, "TUNSETIFF: {}", std::io::Error::last_os_error());
    tap
}

/// Bytes as text.
#[allow(unused_imports)]
pub use husk_test_support::text;

/// Reads one `\n`-terminated line byte by byte, so that nothing after it
/// is taken from the stream (the hybrid vsock's `OK <port>` line may be
/// followed at once by the guest's first bytes).
pub fn read_line_unbuffered(stream: &mut impl std::io::Read) -> std::io::Result<String> {
    let mut line = Vec::new();
    let mut byte = [0u8];
    loop {
        if stream.read(&mut byte)? == 0 {
            break;
        }
        line.push(byte[0]);
        if byte[0] == b'\n' {
            break;
        }
    }
    Ok(String::from_utf8_lossy(&line).into_owned())
}
