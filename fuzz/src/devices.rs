//! The VMM's virtio devices as the fuzz targets make them, each with its
//! host side: the real device types of husk-vmm, with a scratch share for
//! virtio-fs, a Unix socket pair in the TAP's place for virtio-net (as the
//! device's own tests have it) and Unix sockets for vsock.

use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Once};

use husk_vmm::devices::virtio::VirtioDevice;
use husk_vmm::devices::virtio::fs::{Fs, Share};
use husk_vmm::devices::virtio::net::{Net, NetHost};
use husk_vmm::devices::virtio::rng::Rng;
use husk_vmm::devices::virtio::vsock::{Vsock, VsockHost};

use crate::Input;
use crate::scratch::Scratch;
use crate::virtq::{Guest, Host, NoHost};

/// The devices a target can make.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// virtio-rng.
    Rng,
    /// virtio-vsock.
    Vsock,
    /// virtio-net.
    Net,
    /// virtio-fs.
    Fs,
}

impl Kind {
    /// The kind a byte names.
    pub fn from_byte(b: u8) -> Self {
        [Kind::Rng, Kind::Vsock, Kind::Net, Kind::Fs][usize::from(b % 4)]
    }

    /// The kind of a virtio device type, if the harness can make it.
    pub fn of_type(device_type: u32) -> Option<Self> {
        use husk_vmm::devices::virtio::{fs, net, rng, vsock};
        match device_type {
            rng::TYPE_RNG => Some(Kind::Rng),
            vsock::TYPE_VSOCK => Some(Kind::Vsock),
            net::TYPE_NET => Some(Kind::Net),
            fs::TYPE_FS => Some(Kind::Fs),
            _ => None,
        }
    }
}

/// A device and its host side.
pub struct Made {
    /// The device, for a transport.
    pub device: Box<dyn VirtioDevice>,
    /// What drives its host side.
    pub host: Box<dyn Host>,
}

/// The guest port the vsock harness listens on, as a host service
/// (`<socket>_5000`).
pub const VSOCK_SERVICE_PORT: u32 = 5000;

/// Makes a device of `kind`. `scratch` holds the vsock sockets and, as its
/// `work` directory, the virtio-fs share (filled by [`fill_share`]).
pub fn make(kind: Kind, scratch: &Scratch, read_only: bool) -> Made {
    match kind {
        Kind::Rng => Made {
            device: Box::new(Rng),
            host: Box::new(NoHost),
        },
        Kind::Vsock => {
            let (device, host) = vsock(&scratch.harness());
            Made {
                device: Box::new(device),
                host: Box::new(host),
            }
        }
        Kind::Net => {
            let (device, host) = net();
            Made {
                device: Box::new(device),
                host: Box::new(host),
            }
        }
        Kind::Fs => {
            confine_fs_harness();
            let share = Share {
                tag: "rootfs".into(),
                dir: scratch.work(),
                read_only,
            };
            Made {
                device: Box::new(Fs::new(&share).expect("virtio-fs share")),
                host: Box::new(NoHost),
            }
        }
    }
}

/// A share's contents: a file, a directory, and symlinks that point at
/// the sentinels outside it (a server that followed one and wrote would
/// be caught by [`Scratch::check`]).
pub fn fill_share(scratch: &Scratch) {
    let work = scratch.work();
    std::fs::create_dir_all(work.join("d/e")).expect("share");
    std::fs::write(work.join("f"), b"inside the share\n").expect("share");
    std::fs::write(work.join("d/g"), b"below\n").expect("share");
    std::os::unix::fs::symlink("../sentinel", work.join("up")).expect("share");
    std::os::unix::fs::symlink(scratch.sentinel(), work.join("abs")).expect("share");
    std::os::unix::fs::symlink("..", work.join("d/dotdot")).expect("share");
}

/// The fs harness runs the file server without the VMM's seccomp filter
/// (its vCPU filter kills on anything else this process needs). Two
/// things of what a guest may ask must still not reach this machine:
/// device nodes (a guest's `mknod` of the host's disk, then a write to it;
/// the VMM's filter refuses those) and FIFOs (an open of one blocks the
/// thread until a writer comes, a hang that is the guest's own loss in
/// the VMM but stops the fuzzer). `mknod` of either fails with EPERM, and
/// the file size is capped at 64 MiB (EFBIG, SIGXFSZ ignored) so that a
/// guest's `fallocate` or truncate fills no disk.
fn confine_fs_harness() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        use std::collections::BTreeMap;

        use seccompiler::{
            BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition,
            SeccompFilter, SeccompRule,
        };
        let kinds = [libc::S_IFCHR, libc::S_IFBLK, libc::S_IFIFO];
        let rules = |mode_arg: u8| -> Vec<SeccompRule> {
            kinds
                .iter()
                .map(|&kind| {
                    SeccompRule::new(vec![
                        SeccompCondition::new(
                            mode_arg,
                            SeccompCmpArgLen::Dword,
                            SeccompCmpOp::MaskedEq(u64::from(libc::S_IFMT)),
                            u64::from(kind),
                        )
                        .expect("condition"),
                    ])
                    .expect("rule")
                })
                .collect()
        };
        let mut map = BTreeMap::new();
        map.insert(libc::SYS_mknodat, rules(2));
        map.insert(libc::SYS_mknod, rules(1));
        let filter = SeccompFilter::new(
            map,
            SeccompAction::Allow,
            SeccompAction::Errno(libc::EPERM as u32),
            std::env::consts::ARCH.try_into().expect("arch"),
        )
        .expect("filter");
        let program: BpfProgram = filter.try_into().expect("bpf");
        seccompiler::apply_filter_all_threads(&program).expect("seccomp");
        let limit = libc::rlimit {
            rlim_cur: 64 << 20,
            rlim_max: 64 << 20,
        };
        // SAFETY: setrlimit reads the struct; SIG_IGN needs no handler.
        unsafe {
            libc::setrlimit(libc::RLIMIT_FSIZE, &limit);
            libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
        }
    });
}

/// vsock: the device, with its host side driven in the harness's turns.
/// Host operations (operation 5, a byte modulo 6 then its operands):
/// 0, a host client connects and asks for guest port `u32`; 1, a host
/// stream (`u8`, modulo their number) writes bytes (`u16` length, bytes);
/// 2, one reads up to `u16` bytes; 3, one shuts its writing half; 4, one
/// is closed; 5, connections the guest made to the host service
/// ([`VSOCK_SERVICE_PORT`]) are accepted.
pub struct VsockHarness {
    host: VsockHost,
    uds: PathBuf,
    service: Service,
    streams: Vec<UnixStream>,
}

/// The host service the guest may connect to, accepting on a thread of
/// its own: the device's `connect` to it blocks once the listener's
/// backlog is full, which a guest re-posting its chains can reach between
/// two turns of the harness. What the service accepted waits for host
/// operation 5.
struct Service {
    path: PathBuf,
    accepted: Arc<Mutex<Vec<UnixStream>>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Service {
    fn new(path: PathBuf) -> Self {
        let listener = UnixListener::bind(&path).expect("vsock service");
        let accepted = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (accepted, stop) = (accepted.clone(), stop.clone());
            std::thread::spawn(move || {
                while let Ok((s, _)) = listener.accept() {
                    if stop.load(Ordering::SeqCst) {
                        return;
                    }
                    let _ = s.set_nonblocking(true);
                    let mut accepted = accepted.lock().unwrap();
                    if accepted.len() < 64 {
                        accepted.push(s);
                    }
                }
            })
        };
        Self {
            path,
            accepted,
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = UnixStream::connect(&self.path);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn vsock(dir: &Path) -> (Vsock, VsockHarness) {
    let uds = dir.join("v.sock");
    let service_path = PathBuf::from(format!("{}_{VSOCK_SERVICE_PORT}", uds.display()));
    let _ = std::fs::remove_file(&uds);
    let _ = std::fs::remove_file(&service_path);
    let (device, host) = Vsock::new(3, &uds).expect("vsock device");
    let service = Service::new(service_path);
    (
        device,
        VsockHarness {
            host,
            uds,
            service,
            streams: Vec::new(),
        },
    )
}

impl VsockHarness {
    fn stream(&mut self, input: &mut Input) -> Option<usize> {
        let i = usize::from(input.u8());
        (!self.streams.is_empty()).then(|| i % self.streams.len())
    }
}

impl Host for VsockHarness {
    fn op(&mut self, _guest: &mut Guest, input: &mut Input) {
        match input.u8() % 6 {
            0 => {
                let port = input.u32();
                if self.streams.len() < 32
                    && let Ok(mut s) = UnixStream::connect(&self.uds)
                {
                    let _ = s.write_all(format!("CONNECT {port}\n").as_bytes());
                    let _ = s.set_nonblocking(true);
                    self.streams.push(s);
                }
            }
            1 => {
                let len = input.u16();
                let bytes = input.bytes(len.into());
                if let Some(i) = self.stream(input) {
                    let _ = self.streams[i].write(bytes);
                }
            }
            2 => {
                let len = usize::from(input.u16());
                if let Some(i) = self.stream(input) {
                    let mut buf = vec![0u8; len];
                    let _ = self.streams[i].read(&mut buf);
                }
            }
            3 => {
                if let Some(i) = self.stream(input) {
                    let _ = self.streams[i].shutdown(std::net::Shutdown::Write);
                }
            }
            4 => {
                if let Some(i) = self.stream(input) {
                    self.streams.remove(i);
                }
            }
            _ => self.accept(),
        }
    }

    fn tick(&mut self, guest: &mut Guest) {
        self.host.turn(&guest.transport, 0);
    }
}

impl VsockHarness {
    fn accept(&mut self) {
        let mut accepted = self.service.accepted.lock().unwrap();
        let room = 64usize.saturating_sub(self.streams.len());
        let n = accepted.len().min(room);
        self.streams.extend(accepted.drain(..n));
    }
}

/// virtio-net: the device with a `SOCK_SEQPACKET` pair bound in the TAP's
/// place. Host operations (operation 5, a byte modulo 2): 0, a frame
/// arrives from the "TAP" (`u16` length, the bytes, virtio header
/// included); 1, what the guest sent is read off it. The host's turn is
/// the device thread's ([`NetHost::turn`]).
pub struct NetHarness {
    host: NetHost,
    peer: OwnedFd,
}

fn seqpacket_pair() -> (OwnedFd, OwnedFd) {
    let mut fds = [0; 2];
    // SAFETY: socketpair writes two descriptors into `fds`.
    let r = unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
            0,
            fds.as_mut_ptr(),
        )
    };
    assert_eq!(r, 0, "socketpair: {}", std::io::Error::last_os_error());
    // SAFETY: both were just made and are owned here alone.
    unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) }
}

fn net() -> (Net, NetHarness) {
    let (device, host) = Net::new().expect("net device");
    let (tap, peer) = seqpacket_pair();
    host.handle().bind(tap).expect("bind the stand-in TAP");
    (device, NetHarness { host, peer })
}

impl NetHarness {
    fn drain(&self) {
        let mut buf = vec![0u8; 70_000];
        // SAFETY: recv writes at most `len` bytes into the live buffer.
        while unsafe {
            libc::recv(
                self.peer.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                libc::MSG_DONTWAIT,
            )
        } > 0
        {}
    }
}

impl Host for NetHarness {
    fn op(&mut self, _guest: &mut Guest, input: &mut Input) {
        if input.u8() % 2 == 0 {
            let len = input.u16();
            let frame = input.bytes(len.into());
            // SAFETY: send reads `len` bytes of the live slice.
            unsafe {
                libc::send(
                    self.peer.as_raw_fd(),
                    frame.as_ptr().cast(),
                    frame.len(),
                    libc::MSG_DONTWAIT,
                )
            };
        } else {
            self.drain();
        }
    }

    fn tick(&mut self, guest: &mut Guest) {
        self.host.turn(&guest.transport, 0);
        self.drain();
    }
}
