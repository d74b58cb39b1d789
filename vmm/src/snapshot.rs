//! Snapshots of a running VM: the state of every vCPU, the in-kernel
//! irqchip, PIT and clock, the devices, and guest memory.
//!
//! A snapshot is a directory with two files:
//! - `state`: one JSON header line (format, version, the Husk version that
//!   wrote it, a CRC32 of the rest, the memory file's size), then the state
//!   as JSON;
//! - `memory`: guest RAM, region after region. A restore maps it
//!   `MAP_PRIVATE`, so many VMs restored from one snapshot share its pages
//!   until they write them.
//!
//! Reading a snapshot never trusts it: the header, the checksum, the Husk
//! version and the memory file's size are all checked before any VM is made.

use std::io::{Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use kvm_bindings::{
    kvm_clock_data, kvm_cpuid_entry2, kvm_debugregs, kvm_irqchip, kvm_lapic_state, kvm_mp_state,
    kvm_pit_state2, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave,
};
use serde::{Deserialize, Serialize};
use thiserror::Error;

pub use crate::devices::serial::SerialRegs;
pub use husk_protocol::snapshot::{FORMAT, MEMORY_FILE, STATE_FILE, VERSION};
/// The Husk version that writes snapshots; only the same version restores
/// them (device and vCPU state are not promised to be stable across
/// versions yet).
pub const HUSK_VERSION: &str = env!("CARGO_PKG_VERSION");

/// Errors reading or writing a snapshot.
#[derive(Debug, Error)]
pub enum SnapshotError {
    /// A snapshot file cannot be read or written.
    #[error(transparent)]
    Io(#[from] husk_sys::PathError),
    /// The snapshot's directory is not one a snapshot may be written into.
    #[error("refused to write a snapshot into {}: {why}", .path.display())]
    UnsafeDir {
        /// The directory.
        path: PathBuf,
        /// What is wrong with it.
        why: String,
    },
    /// The state file is not a Husk snapshot at all.
    #[error("{} is not a Husk snapshot", .0.display())]
    NotASnapshot(PathBuf),
    /// A snapshot of another format version or Husk version.
    #[error(
        "{} was written by Husk {found} (snapshot format {format_version}); \
         this is Husk {HUSK_VERSION} (format {VERSION})",
        .path.display()
    )]
    Foreign {
        /// The state file.
        path: PathBuf,
        /// Husk version in the header.
        found: String,
        /// Format version in the header.
        format_version: u32,
    },
    /// The checksum does not match: the state was altered or cut short.
    #[error("{} is corrupted: its checksum does not match", .0.display())]
    Corrupted(PathBuf),
    /// The memory file has the wrong size (truncated, or another VM's).
    #[error("{} is {found} bytes; the snapshot's guest has {expected}", .path.display())]
    MemorySize {
        /// The memory file.
        path: PathBuf,
        /// Its size.
        found: u64,
        /// The size the state says.
        expected: u64,
    },
    /// The state does not parse.
    #[error("cannot parse the state in {}", .0.display())]
    Parse(PathBuf, #[source] serde_json::Error),
}

/// One vCPU, as KVM reports it.
#[derive(Serialize, Deserialize)]
pub struct VcpuState {
    /// General registers.
    pub regs: kvm_regs,
    /// Segment and control registers.
    pub sregs: kvm_sregs,
    /// FPU, SSE and extended state.
    pub xsave: kvm_xsave,
    /// Extended control registers (XCR0: the state user mode may use).
    pub xcrs: kvm_xcrs,
    /// Model-specific registers KVM can save, (index, value).
    pub msrs: Vec<(u32, u64)>,
    /// Local APIC.
    pub lapic: kvm_lapic_state,
    /// Pending exceptions, interrupts, NMIs.
    pub events: kvm_vcpu_events,
    /// Runnable, halted, waiting for SIPI.
    pub mp_state: kvm_mp_state,
    /// Debug registers.
    pub debugregs: kvm_debugregs,
    /// The CPUID table the vCPU ran with. A restore sets it again rather
    /// than asking KVM for the host's supported table (KVM_GET_SUPPORTED_CPUID
    /// costs ~0.5 ms of host CPU here: each CPUID it runs traps to the
    /// outer hypervisor), as Firecracker restores its snapshots' CPUID.
    pub cpuid: Vec<kvm_cpuid_entry2>,
}

/// Everything but guest memory.
#[derive(Serialize, Deserialize)]
pub struct VmState {
    /// Guest memory in MiB (the shape of the VM).
    pub memory_mib: u64,
    /// The kernel command line the guest booted with.
    pub cmdline: String,
    /// Per vCPU, in order of their IDs.
    pub vcpus: Vec<VcpuState>,
    /// PIC master, PIC slave, IOAPIC.
    pub irqchips: Vec<kvm_irqchip>,
    /// The in-kernel PIT.
    pub pit: kvm_pit_state2,
    /// kvm-clock's time base.
    pub clock: kvm_clock_data,
    /// COM1.
    pub serial: SerialRegs,
    /// The virtio-mmio devices.
    pub virtio: Vec<VirtioSlot>,
}

/// One virtio-mmio device: where it sits and its transport's state.
#[derive(Serialize, Deserialize)]
pub struct VirtioSlot {
    /// Base of its MMIO window.
    pub base: u64,
    /// Its interrupt.
    pub gsi: u32,
    /// Registers and queues.
    pub transport: crate::devices::virtio::mmio::MmioState,
    /// A virtio-fs device's tag, which binds it to a share on restore.
    #[serde(default)]
    pub share_tag: Option<String>,
    /// A virtio-net device's slot, which binds it to a TAP on restore.
    #[serde(default)]
    pub net_slot: Option<u8>,
}

#[derive(Serialize, Deserialize)]
struct Header {
    format: String,
    version: u32,
    husk_version: String,
    checksum: u32,
    memory_bytes: u64,
}

/// Whether every byte of `bytes` is zero: words OR'd together without an
/// early exit, which the compiler turns into vector instructions.
fn is_zero(bytes: &[u8]) -> bool {
    // SAFETY: any bytes are valid u64s; align_to splits off what is not
    // aligned.
    let (head, words, tail) = unsafe { bytes.align_to::<u64>() };
    head.iter().all(|&b| b == 0)
        && tail.iter().all(|&b| b == 0)
        && words.iter().fold(0, |acc, &w| acc | w) == 0
}

/// Writes `state` to `dir/state` and guest memory (given as host slices,
/// in guest address order) to `dir/memory`, both made private
/// ([`husk_sys::private::create_files`]).
pub fn write(dir: &Path, state: &VmState, memory: &[&[u8]]) -> Result<(), SnapshotError> {
    let files = create_files(dir)?;
    write_files(files, dir, state, memory)
}

/// The snapshot files `dir/state` and `dir/memory`, made empty and
/// private: the owner's alone, whatever the process's umask, and never
/// through a link.
pub fn create_files(dir: &Path) -> Result<SnapshotFiles, SnapshotError> {
    let mut files =
        husk_sys::private::create_files(dir, &[STATE_FILE, MEMORY_FILE]).map_err(|e| match e {
            husk_sys::private::PrivateError::Io(e) => SnapshotError::Io(e),
            husk_sys::private::PrivateError::Unsafe { path, why } => {
                SnapshotError::UnsafeDir { path, why }
            }
        })?;
    let memory = files.pop().expect("two files made");
    let state = files.pop().expect("two files made");
    Ok(SnapshotFiles { state, memory })
}

/// A snapshot's two files, open for writing: made by [`create_files`], or
/// by the runtime and handed over with the API's `snapshot` request (a
/// jailed VMM cannot see a checkpoint's directory).
#[derive(Debug)]
pub struct SnapshotFiles {
    /// Where the VM's state goes.
    pub state: std::fs::File,
    /// Where guest memory goes.
    pub memory: std::fs::File,
}

/// Writes `state` and guest memory into `files`; `dir` names them in
/// errors. Each file is emptied first.
pub fn write_files(
    files: SnapshotFiles,
    dir: &Path,
    state: &VmState,
    memory: &[&[u8]],
) -> Result<(), SnapshotError> {
    let io = |what, path: &Path| {
        let path = path.to_owned();
        move |source| husk_sys::PathError { what, path, source }.into()
    };
    let SnapshotFiles {
        state: mut state_file,
        memory: mut mem_file,
    } = files;
    let mem_path = dir.join(MEMORY_FILE);
    mem_file.set_len(0).map_err(io("write", &mem_path))?;
    mem_file
        .seek(SeekFrom::Start(0))
        .map_err(io("write", &mem_path))?;
    // Pages the guest never wrote are zero: left as holes, which read
    // back as zeros, so a snapshot takes the disk its guest used.
    let mut total = 0u64;
    for region in memory {
        for chunk in region.chunks(64 << 10) {
            if is_zero(chunk) {
                mem_file
                    .seek(SeekFrom::Current(chunk.len() as i64))
                    .map_err(io("write", &mem_path))?;
            } else {
                mem_file.write_all(chunk).map_err(io("write", &mem_path))?;
            }
        }
        total += region.len() as u64;
    }
    mem_file.set_len(total).map_err(io("write", &mem_path))?;
    let body = serde_json::to_vec(state).expect("VM state serializes");
    let header = Header {
        format: FORMAT.into(),
        version: VERSION,
        husk_version: HUSK_VERSION.into(),
        checksum: checksum(&body),
        memory_bytes: memory.iter().map(|r| r.len() as u64).sum(),
    };
    let mut out = serde_json::to_vec(&header).expect("header serializes");
    out.push(b'\n');
    out.extend_from_slice(&body);
    let state_path = dir.join(STATE_FILE);
    state_file.set_len(0).map_err(io("write", &state_path))?;
    state_file
        .seek(SeekFrom::Start(0))
        .map_err(io("write", &state_path))?;
    state_file.write_all(&out).map_err(io("write", &state_path))
}

/// The state's checksum: CRC-32 (ISO-HDLC, zlib's), by tables alone.
/// crc32fast computes the same but asks the CPU for its features on its
/// first use in a process (std's feature detection, a dozen `cpuid`s);
/// where the host is itself a VM each `cpuid` exits to its hypervisor, 7
/// µs apiece on this project's machines, and a VMM reads one state per
/// start (docs/benchmarks.md).
pub fn checksum(body: &[u8]) -> u32 {
    const CRC: crc::Crc<u32, crc::Table<16>> =
        crc::Crc::<u32, crc::Table<16>>::new(&crc::CRC_32_ISO_HDLC);
    CRC.checksum(body)
}

/// Reads and checks `dir/state`, and checks that `dir/memory` is as large
/// as the state says. Returns the state and the memory file's path.
pub fn read(dir: &Path) -> Result<(VmState, PathBuf), SnapshotError> {
    let state_path = dir.join(STATE_FILE);
    let bytes = std::fs::read(&state_path).map_err(|source| {
        SnapshotError::Io(husk_sys::PathError {
            what: "read",
            path: state_path.clone(),
            source,
        })
    })?;
    let newline = bytes
        .iter()
        .position(|&b| b == b'\n')
        .ok_or_else(|| SnapshotError::NotASnapshot(state_path.clone()))?;
    let header: Header = serde_json::from_slice(&bytes[..newline])
        .ok()
        .filter(|h: &Header| h.format == FORMAT)
        .ok_or_else(|| SnapshotError::NotASnapshot(state_path.clone()))?;
    if header.version != VERSION || header.husk_version != HUSK_VERSION {
        return Err(SnapshotError::Foreign {
            path: state_path,
            found: header.husk_version,
            format_version: header.version,
        });
    }
    let body = &bytes[newline + 1..];
    if checksum(body) != header.checksum {
        return Err(SnapshotError::Corrupted(state_path));
    }
    let state: VmState =
        serde_json::from_slice(body).map_err(|e| SnapshotError::Parse(state_path.clone(), e))?;
    let mem_path = dir.join(MEMORY_FILE);
    let found = std::fs::metadata(&mem_path)
        .map_err(|source| {
            SnapshotError::Io(husk_sys::PathError {
                what: "read",
                path: mem_path.clone(),
                source,
            })
        })?
        .len();
    // A guest of more MiB than bytes fit in 64 bits (a forged state) must
    // not wrap to a size that matches a small file.
    let expected = state.memory_mib.saturating_mul(1 << 20);
    if state.memory_mib >= 1 << 44 || found != expected || header.memory_bytes != expected {
        return Err(SnapshotError::MemorySize {
            path: mem_path,
            found,
            expected,
        });
    }
    Ok((state, mem_path))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> VmState {
        VmState {
            memory_mib: 1,
            cmdline: "console=ttyS0".into(),
            vcpus: Vec::new(),
            irqchips: vec![kvm_irqchip::default(); 3],
            pit: kvm_pit_state2::default(),
            clock: kvm_clock_data::default(),
            serial: SerialRegs {
                line_status: 0x60,
                ..Default::default()
            },
            virtio: Vec::new(),
        }
    }

    fn read_err(dir: &Path) -> SnapshotError {
        match read(dir) {
            Err(e) => e,
            Ok(_) => panic!("reading {} should fail", dir.display()),
        }
    }

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("husk-snap-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }

    /// Issue 14: a snapshot is never written through a link someone
    /// planted, nor into a directory another user owns or may write to.
    /// The victim file keeps its bytes; the error names what was wrong.
    #[test]
    fn the_checksum_is_zlibs_crc32() {
        // What every snapshot written so far holds, and what crc32fast
        // (the fuzz targets' and the tests' forger) computes.
        for body in [&b""[..], b"123456789", &[0xa5; 70_000]] {
            assert_eq!(checksum(body), crc32fast::hash(body));
        }
        assert_eq!(checksum(b"123456789"), 0xcbf4_3926);
    }

    #[test]
    fn a_snapshot_is_not_written_through_links_or_into_open_directories() {
        use std::os::unix::fs::PermissionsExt;
        let base = scratch("links");
        std::fs::create_dir_all(&base).unwrap();
        let victim = base.join("victim");
        std::fs::write(&victim, b"root's file").unwrap();
        let mem = vec![1u8; 4096];
        // Other tests change the process's umask (the passthrough's
        // import does): each directory's mode is set, not inherited.
        let mkdir = |dir: &Path| {
            std::fs::create_dir(dir).unwrap();
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        };
        let refused = |dir: &Path, want: &str| {
            let e = write(dir, &sample(), &[&mem]).unwrap_err();
            let text = format!(
                "{e}: {}",
                std::error::Error::source(&e)
                    .map(|s| s.to_string())
                    .unwrap_or_default()
            );
            assert!(text.contains(want), "{}: {text}", dir.display());
            assert_eq!(std::fs::read(&victim).unwrap(), b"root's file");
        };
        // The directory itself is a symlink.
        let real = base.join("real");
        mkdir(&real);
        std::os::unix::fs::symlink(&real, base.join("dirlink")).unwrap();
        refused(&base.join("dirlink"), "it is a symlink");
        // A symlink planted where the memory file goes.
        let planted = base.join("planted");
        mkdir(&planted);
        std::os::unix::fs::symlink(&victim, planted.join(MEMORY_FILE)).unwrap();
        refused(&planted, "cannot create");
        // A hard link planted where the state file goes.
        let hard = base.join("hard");
        mkdir(&hard);
        std::fs::hard_link(&victim, hard.join(STATE_FILE)).unwrap();
        refused(&hard, "not a file of its own");
        // A directory anyone may write to.
        let open = base.join("open");
        mkdir(&open);
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();
        refused(&open, "others may write to it");
        // A directory of another user.
        let theirs = base.join("theirs");
        mkdir(&theirs);
        std::os::unix::fs::chown(&theirs, Some(65534), Some(65534)).unwrap();
        refused(&theirs, "belongs to uid 65534");
        // A fresh directory is made the owner's alone.
        let fresh = base.join("fresh/snap");
        write(&fresh, &sample(), &[&mem]).unwrap();
        let mode = std::fs::metadata(&fresh).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700);
        let mode = std::fs::metadata(fresh.join(MEMORY_FILE))
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o600);
        std::fs::remove_dir_all(&base).unwrap();
    }

    #[test]
    fn round_trip() {
        let dir = scratch("rt");
        // Written pages around half a megabyte never written (zeros).
        let mut mem = vec![7u8; 1 << 20];
        mem[(256 << 10)..(768 << 10)].fill(0);
        write(&dir, &sample(), &[&mem[..4096], &mem[4096..]]).unwrap();
        let (state, mem_path) = read(&dir).unwrap();
        assert_eq!(state.cmdline, "console=ttyS0");
        assert_eq!(state.serial.line_status, 0x60);
        assert_eq!(std::fs::read(&mem_path).unwrap(), mem);
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        let meta = std::fs::metadata(&mem_path).unwrap();
        // The zeros are a hole: less on disk than the file's length.
        assert!(meta.blocks() * 512 < meta.len(), "{} blocks", meta.blocks());
        // Guest memory is the owner's alone.
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        let dir_mode = std::fs::metadata(&dir).unwrap().permissions().mode();
        assert_eq!(dir_mode & 0o777, 0o700);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// Found by reading the code for the fuzz harness: a forged state
    /// whose guest has 2^44 + 2 MiB wrapped to 2 MiB and matched a 2 MiB
    /// memory file. A valid header and checksum are written, so only the
    /// size check stands in the way.
    #[test]
    fn a_guest_size_that_wraps_is_refused() {
        let dir = scratch("wrap");
        let mut state = sample();
        state.memory_mib = (1 << 44) + 2;
        let mem = vec![0u8; 2 << 20];
        write(&dir, &state, &[&mem]).unwrap();
        // write() records the bytes it was given: forge the header's too.
        let state_path = dir.join(STATE_FILE);
        let text = std::fs::read_to_string(&state_path).unwrap();
        assert!(text.contains(&format!("\"memory_bytes\":{}", 2u64 << 20)));
        assert!(matches!(read_err(&dir), SnapshotError::MemorySize { .. }));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn corrupted_truncated_and_foreign_snapshots_are_refused() {
        let dir = scratch("bad");
        let mem = vec![0u8; 1 << 20];
        write(&dir, &sample(), &[&mem]).unwrap();
        let state_path = dir.join(STATE_FILE);
        let good = std::fs::read(&state_path).unwrap();

        // One byte of the state changed.
        let mut bad = good.clone();
        let last = bad.len() - 2;
        bad[last] ^= 1;
        std::fs::write(&state_path, &bad).unwrap();
        let err = read_err(&dir);
        assert!(
            err.to_string()
                .ends_with("is corrupted: its checksum does not match")
        );

        // Cut short.
        std::fs::write(&state_path, &good[..good.len() / 2]).unwrap();
        assert!(matches!(read_err(&dir), SnapshotError::Corrupted(_)));

        // Another Husk version.
        let text = String::from_utf8(good.clone()).unwrap();
        let foreign = text.replacen(
            &format!("\"husk_version\":\"{HUSK_VERSION}\""),
            "\"husk_version\":\"0.0.1\"",
            1,
        );
        std::fs::write(&state_path, foreign).unwrap();
        let err = read_err(&dir).to_string();
        assert!(err.contains("was written by Husk 0.0.1"), "{err}");

        // Not a snapshot at all.
        std::fs::write(&state_path, b"hello\n{}").unwrap();
        assert!(matches!(read_err(&dir), SnapshotError::NotASnapshot(_)));

        // The memory file truncated.
        std::fs::write(&state_path, &good).unwrap();
        std::fs::write(dir.join(MEMORY_FILE), vec![0u8; 4096]).unwrap();
        let err = read_err(&dir).to_string();
        assert!(
            err.ends_with("is 4096 bytes; the snapshot's guest has 1048576"),
            "{err}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
