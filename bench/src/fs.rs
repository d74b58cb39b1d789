//! The virtio-fs server on its own, on the host: FUSE requests put on a
//! split virtqueue in memory, as the guest's driver would, answered by the
//! VMM's device (husk_vmm::devices::virtio::fs), against the same
//! operations made as host system calls, in one run.
//!
//! - lookup: every name of a tree of 100 directories x 100 files (FUSE
//!   LOOKUP, a new inode each) vs `fstatat` of each name;
//! - getattr: every file of the tree again by inode (FUSE GETATTR) vs
//!   `fstatat`;
//! - read: a 64 MiB file in 128 KiB requests, already in the host's page
//!   cache (FUSE READ) vs `pread` of the same chunks.
//!
//! Each is measured `--rounds` times; the median round is reported.

use std::ffi::CString;
use std::time::Instant;

use anyhow::{Context, bail};
use clap::Parser;
use husk_bench::percentile;
use husk_vmm::devices::virtio::VirtioDevice;
use husk_vmm::devices::virtio::fs::{Fs, Share};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

#[derive(Parser)]
#[command(about = "virtio-fs server vs host system calls: lookup, getattr, cached reads")]
struct Args {
    /// Rounds of each measurement.
    #[arg(long, default_value_t = 5)]
    rounds: usize,
}

const QSIZE: u16 = 256;
const DESC: u64 = 0x1000;
const AVAIL: u64 = 0x3000;
const USED: u64 = 0x4000;
const REQ: u64 = 0x10000;
const REPLY: u64 = 0x100000;
const REPLY_LEN: u32 = 256 * 1024;
const CHUNK: u32 = 128 * 1024;

const LOOKUP: u32 = 1;
const GETATTR: u32 = 3;
const OPEN: u32 = 14;
const READ: u32 = 15;
const INIT: u32 = 26;

/// A guest driver of one request queue, in memory.
struct Driver {
    mem: GuestMemoryMmap,
    queue: Queue,
    dev: Fs,
    next: u16,
    unique: u64,
}

impl Driver {
    fn new(share: &Share) -> anyhow::Result<Self> {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 4 << 20)])?;
        let mut queue = Queue::new(QSIZE)?;
        queue.set_size(QSIZE);
        queue.set_desc_table_address(Some(DESC as u32), Some(0));
        queue.set_avail_ring_address(Some(AVAIL as u32), Some(0));
        queue.set_used_ring_address(Some(USED as u32), Some(0));
        queue.set_ready(true);
        Ok(Self {
            mem,
            queue,
            dev: Fs::new(share)?,
            next: 0,
            unique: 0,
        })
    }

    /// Sends one request; returns the reply's error and its body's length.
    fn call(&mut self, opcode: u32, nodeid: u64, body: &[u8]) -> anyhow::Result<(i32, u32)> {
        self.unique += 1;
        let len = 40 + body.len() as u32;
        let mut req = Vec::with_capacity(len as usize);
        req.extend_from_slice(&len.to_le_bytes());
        req.extend_from_slice(&opcode.to_le_bytes());
        req.extend_from_slice(&self.unique.to_le_bytes());
        req.extend_from_slice(&nodeid.to_le_bytes());
        req.extend_from_slice(&[0u8; 16]); // uid, gid, pid, extlen, padding
        req.extend_from_slice(body);
        self.mem.write_slice(&req, GuestAddress(REQ))?;
        // Descriptor 0: the request (device-readable), then 1: the reply.
        let desc = |addr: u64, len: u32, flags: u16, next: u16| {
            let mut d = [0u8; 16];
            d[..8].copy_from_slice(&addr.to_le_bytes());
            d[8..12].copy_from_slice(&len.to_le_bytes());
            d[12..14].copy_from_slice(&flags.to_le_bytes());
            d[14..].copy_from_slice(&next.to_le_bytes());
            d
        };
        self.mem
            .write_slice(&desc(REQ, len, 1, 1), GuestAddress(DESC))?;
        self.mem
            .write_slice(&desc(REPLY, REPLY_LEN, 2, 0), GuestAddress(DESC + 16))?;
        let slot = AVAIL + 4 + u64::from(self.next % QSIZE) * 2;
        self.mem.write_obj(0u16, GuestAddress(slot))?;
        self.next = self.next.wrapping_add(1);
        self.mem.write_obj(self.next, GuestAddress(AVAIL + 2))?;
        self.dev.process_queue(1, &mut self.queue, &self.mem);
        let used: u16 = self.mem.read_obj(GuestAddress(USED + 2))?;
        if used != self.next {
            bail!("the device did not answer request {}", self.unique);
        }
        let error: i32 = self.mem.read_obj(GuestAddress(REPLY + 4))?;
        let out_len: u32 = self.mem.read_obj(GuestAddress(REPLY))?;
        Ok((error, out_len.saturating_sub(16)))
    }

    fn ok(&mut self, opcode: u32, nodeid: u64, body: &[u8]) -> anyhow::Result<u32> {
        match self.call(opcode, nodeid, body)? {
            (0, n) => Ok(n),
            (e, _) => bail!("FUSE opcode {opcode} on {nodeid} failed: errno {}", -e),
        }
    }

    fn reply_u64(&self, at: u64) -> u64 {
        self.mem
            .read_obj(GuestAddress(REPLY + 16 + at))
            .unwrap_or(0)
    }

    fn lookup(&mut self, parent: u64, name: &str) -> anyhow::Result<u64> {
        let mut body = name.as_bytes().to_vec();
        body.push(0);
        self.ok(LOOKUP, parent, &body)?;
        Ok(self.reply_u64(0))
    }
}

fn median(rounds: &mut [f64]) -> f64 {
    percentile(rounds, 50.0)
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let dir = std::env::temp_dir().join(format!("husk-bench-fs-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let tree = dir.join("tree");
    let (dirs, files) = (100, 100);
    for d in 0..dirs {
        let sub = tree.join(format!("d{d}"));
        std::fs::create_dir_all(&sub)?;
        for f in 0..files {
            std::fs::write(sub.join(format!("f{f}")), b"x")?;
        }
    }
    let big = dir.join("big");
    std::fs::write(&big, vec![0x5au8; 64 << 20])?;
    let share = Share {
        tag: "bench".into(),
        dir: dir.clone(),
        read_only: true,
    };

    let (mut fuse_lookup, mut host_lookup) = (Vec::new(), Vec::new());
    let (mut fuse_getattr, mut host_getattr) = (Vec::new(), Vec::new());
    let (mut fuse_read, mut host_read) = (Vec::new(), Vec::new());
    let n = f64::from(dirs * files);
    for _ in 0..args.rounds {
        // A fresh server each round: every lookup makes its inode.
        let mut drv = Driver::new(&share)?;
        let mut init = Vec::new();
        for v in [7u32, 31, 128 * 1024, 0] {
            init.extend_from_slice(&v.to_le_bytes());
        }
        drv.ok(INIT, 0, &init)?;
        let tree_ino = drv.lookup(1, "tree")?;
        let mut subs = Vec::new();
        for d in 0..dirs {
            subs.push(drv.lookup(tree_ino, &format!("d{d}"))?);
        }
        let names: Vec<String> = (0..files).map(|f| format!("f{f}")).collect();
        let t = Instant::now();
        let mut inodes = Vec::with_capacity((dirs * files) as usize);
        for &sub in &subs {
            for name in &names {
                inodes.push(drv.lookup(sub, name)?);
            }
        }
        fuse_lookup.push(t.elapsed().as_nanos() as f64 / n);

        let getattr = [0u8; 16];
        let t = Instant::now();
        for &ino in &inodes {
            drv.ok(GETATTR, ino, &getattr)?;
        }
        fuse_getattr.push(t.elapsed().as_nanos() as f64 / n);

        // Host: the same names, with fstatat from their directory.
        let dir_fds: Vec<std::fs::File> = (0..dirs)
            .map(|d| std::fs::File::open(tree.join(format!("d{d}"))))
            .collect::<Result<_, _>>()?;
        let cnames: Vec<CString> = names
            .iter()
            .map(|s| CString::new(s.as_str()).unwrap())
            .collect();
        let stat_all = || {
            for fd in &dir_fds {
                for name in &cnames {
                    rustix::fs::statat(fd, name.as_c_str(), rustix::fs::AtFlags::SYMLINK_NOFOLLOW)
                        .expect("fstatat");
                }
            }
        };
        let t = Instant::now();
        stat_all();
        host_lookup.push(t.elapsed().as_nanos() as f64 / n);
        let t = Instant::now();
        stat_all();
        host_getattr.push(t.elapsed().as_nanos() as f64 / n);

        // Cached sequential reads, 128 KiB at a time.
        let big_ino = drv.lookup(1, "big")?;
        let mut open = Vec::new();
        open.extend_from_slice(&(libc::O_RDONLY as u32).to_le_bytes());
        open.extend_from_slice(&0u32.to_le_bytes());
        drv.ok(OPEN, big_ino, &open)?;
        let fh = drv.reply_u64(0);
        let read_all = |drv: &mut Driver| -> anyhow::Result<u64> {
            let mut total = 0u64;
            let mut offset = 0u64;
            while offset < 64 << 20 {
                let mut body = Vec::with_capacity(40);
                body.extend_from_slice(&fh.to_le_bytes());
                body.extend_from_slice(&offset.to_le_bytes());
                body.extend_from_slice(&CHUNK.to_le_bytes());
                body.extend_from_slice(&[0u8; 20]);
                let got = drv.ok(READ, big_ino, &body)?;
                if got == 0 {
                    break;
                }
                total += u64::from(got);
                offset += u64::from(got);
            }
            Ok(total)
        };
        read_all(&mut drv)?; // into the host's page cache
        let t = Instant::now();
        let bytes = read_all(&mut drv)?;
        fuse_read.push(bytes as f64 / (1 << 20) as f64 / t.elapsed().as_secs_f64());

        let file = std::fs::File::open(&big).context("open the big file")?;
        let mut buf = vec![0u8; CHUNK as usize];
        let t = Instant::now();
        let mut offset = 0u64;
        loop {
            let got = std::os::unix::fs::FileExt::read_at(&file, &mut buf, offset).unwrap_or(0);
            if got == 0 {
                break;
            }
            offset += got as u64;
        }
        host_read.push(offset as f64 / (1 << 20) as f64 / t.elapsed().as_secs_f64());
    }
    let _ = std::fs::remove_dir_all(&dir);

    let (fl, hl) = (median(&mut fuse_lookup), median(&mut host_lookup));
    let (fg, hg) = (median(&mut fuse_getattr), median(&mut host_getattr));
    let (fr, hr) = (median(&mut fuse_read), median(&mut host_read));
    println!("| operation | virtio-fs server | host syscall | ratio |");
    println!("|---|---|---|---|");
    println!("| lookup (ns/op) | {fl:.0} | {hl:.0} | {:.2}x |", fl / hl);
    println!("| getattr (ns/op) | {fg:.0} | {hg:.0} | {:.2}x |", fg / hg);
    println!(
        "| cached sequential read, 128 KiB (MiB/s) | {fr:.0} | {hr:.0} | {:.0}% of host |",
        100.0 * fr / hr
    );
    Ok(())
}
