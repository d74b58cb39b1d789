//! The clone seed: a guest restored from a snapshot starts with the RNG
//! state and the clock of the moment the snapshot was taken, as does every
//! other guest restored from it. The host's `clone` request brings fresh
//! entropy and the time; this module mixes them in.

use std::fs::File;
use std::io::Read;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;

use husk_protocol::CloneSeed;
use rustix::event::{PollFd, PollFlags, Timespec};

/// `RNDADDENTROPY`: mix bytes into the pool, crediting entropy.
const RNDADDENTROPY: libc::c_ulong = 0x4008_5203;
/// `RNDRESEEDCRNG`: reseed the CRNG from the pool now.
const RNDRESEEDCRNG: libc::c_ulong = 0x5207;

/// Makes this guest differ from every other restored from the same
/// snapshot: the host's entropy and 64 bytes from the virtio-rng device
/// (fresh per VM) mixed into the RNG, which is reseeded at once, and the
/// wall clock set to the host's.
pub(crate) fn make_clone_unique(clone: &CloneSeed) -> Result<(), String> {
    let mut seed = clone.entropy.clone();
    // The device's bytes are a bonus: never wait on them for long.
    if let Ok(hwrng) = File::options()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open("/dev/hwrng")
    {
        let mut buf = [0u8; 64];
        let mut pfd = [PollFd::new(&hwrng, PollFlags::IN)];
        let timeout = Timespec {
            tv_sec: 0,
            tv_nsec: 200_000_000,
        };
        if rustix::event::poll(&mut pfd, Some(&timeout)).is_ok_and(|n| n > 0)
            && let Ok(n) = (&hwrng).read(&mut buf)
        {
            seed.extend_from_slice(&buf[..n]);
        }
    }
    if seed.is_empty() {
        return Err(
            "no entropy to reseed the guest with: neither the host's nor /dev/hwrng".into(),
        );
    }
    // struct rand_pool_info { int entropy_count; int buf_size; u32 buf[]; }
    let mut info = Vec::with_capacity(8 + seed.len());
    info.extend_from_slice(&((seed.len() * 8) as i32).to_ne_bytes());
    info.extend_from_slice(&(seed.len() as i32).to_ne_bytes());
    info.extend_from_slice(&seed);
    info.resize(info.len().next_multiple_of(4), 0);
    let random = File::options()
        .write(true)
        .open("/dev/urandom")
        .map_err(|e| format!("open /dev/urandom: {e}"))?;
    // SAFETY: the ioctls read a rand_pool_info of the stated size, and
    // take no argument.
    unsafe {
        if libc::ioctl(random.as_raw_fd(), RNDADDENTROPY as _, info.as_ptr()) < 0
            || libc::ioctl(random.as_raw_fd(), RNDRESEEDCRNG as _) < 0
        {
            return Err(format!(
                "reseed the guest's RNG: {}",
                std::io::Error::last_os_error()
            ));
        }
    }
    if clone.realtime_ns > 0 {
        let now = rustix::time::Timespec {
            tv_sec: (clone.realtime_ns / 1_000_000_000) as _,
            tv_nsec: (clone.realtime_ns % 1_000_000_000) as _,
        };
        rustix::time::clock_settime(rustix::time::ClockId::Realtime, now)
            .map_err(|e| format!("set the guest's clock: {}", std::io::Error::from(e)))?;
    }
    Ok(())
}
