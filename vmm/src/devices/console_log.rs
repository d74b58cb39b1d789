//! The console's file, held to a size: a guest that writes its console
//! without end cannot fill the host's disk.
//!
//! When a write would take the file past its limit, the newest half of
//! what it holds (from the first line that starts in that half) is moved
//! to its start and the file is cut there; the write follows. So the file
//! always ends with the newest output, in order, and is never longer than
//! the limit. The move is done in place with positioned reads and writes
//! through a fixed buffer (the vCPU threads' seccomp filter allows those,
//! and Landlock leaves an open file alone): the VMM's memory does not grow
//! with the flood, and each byte is moved at most once per half-limit
//! written.

use std::fs::File;
use std::io::{self, Write};
use std::os::unix::fs::FileExt;

/// The smallest limit: a few lines of a kernel's panic.
pub const MIN_LIMIT: u64 = 4096;
/// The default limit: 1 MiB, a boot's log many times over.
pub const DEFAULT_LIMIT: u64 = 1 << 20;
/// Bytes moved per read and write.
const CHUNK: usize = 16 * 1024;

/// Creates (or empties) the console file at `path`, open for reading too:
/// keeping the newest half reads it back.
pub fn create(path: &std::path::Path) -> io::Result<File> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)
}

/// A file that keeps its newest `limit` bytes at most.
pub struct CappedLog {
    file: File,
    len: u64,
    limit: u64,
}

impl CappedLog {
    /// Writes to `file` (empty) up to `limit` bytes (at least
    /// [`MIN_LIMIT`]).
    pub fn new(file: File, limit: u64) -> Self {
        Self {
            file,
            len: 0,
            limit: limit.max(MIN_LIMIT),
        }
    }

    /// Keeps the newest half, from a line's start where one is in it.
    fn compact(&mut self) -> io::Result<()> {
        let mut from = self.len - self.limit / 2;
        let mut buf = [0u8; CHUNK];
        // The first line that starts in the kept half.
        let n = self.file.read_at(&mut buf, from)?;
        if let Some(nl) = buf[..n].iter().position(|&b| b == b'\n') {
            from += nl as u64 + 1;
        }
        let mut to = 0u64;
        while from < self.len {
            let want = CHUNK.min((self.len - from) as usize);
            let n = self.file.read_at(&mut buf[..want], from)?;
            if n == 0 {
                break;
            }
            self.file.write_all_at(&buf[..n], to)?;
            from += n as u64;
            to += n as u64;
        }
        self.file.set_len(to)?;
        self.len = to;
        Ok(())
    }
}

impl Write for CappedLog {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        // A write longer than half the limit keeps its own tail only.
        let keep = (self.limit / 2) as usize;
        let tail = &buf[buf.len().saturating_sub(keep)..];
        if self.len + tail.len() as u64 > self.limit {
            self.compact()?;
        }
        self.file.write_all_at(tail, self.len)?;
        self.len += tail.len() as u64;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A scratch file, removed when dropped (a failed test's too).
    struct Scratch(std::path::PathBuf);

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    fn scratch(name: &str) -> (Scratch, File) {
        let path = std::env::temp_dir().join(format!("husk-console-{name}-{}", std::process::id()));
        let file = create(&path).unwrap();
        (Scratch(path), file)
    }

    #[test]
    fn a_flood_keeps_the_newest_lines_in_order_within_the_limit() {
        let (path, file) = scratch("flood");
        let mut log = CappedLog::new(file, 8192);
        // Byte by byte, as the UART writes.
        let mut all = String::new();
        for n in 0..2000 {
            let line = format!("line {n:05} {}\n", "x".repeat(n % 50));
            for b in line.bytes() {
                log.write_all(&[b]).unwrap();
            }
            all.push_str(&line);
            let len = std::fs::metadata(&path.0).unwrap().len();
            assert!(len <= 8192, "{len} bytes after line {n}");
        }
        let kept = std::fs::read_to_string(&path.0).unwrap();
        assert!(kept.len() >= 4096 - 64, "only {} bytes kept", kept.len());
        // Whole lines, the newest, in order: a suffix of everything written.
        assert!(all.ends_with(&kept), "not the newest output in order");
        assert!(kept.starts_with("line "), "{}", &kept[..20]);
        assert!(kept.ends_with("line 01999 xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx\n"));
    }

    #[test]
    fn one_huge_write_keeps_its_tail() {
        let (path, file) = scratch("huge");
        let mut log = CappedLog::new(file, 4096);
        let big: Vec<u8> = (0..100_000u32).map(|i| b'a' + (i % 26) as u8).collect();
        assert_eq!(log.write(&big).unwrap(), big.len());
        let kept = std::fs::read(&path.0).unwrap();
        assert_eq!(kept, big[big.len() - 2048..]);
    }

    #[test]
    fn a_limit_below_the_minimum_is_raised() {
        let (_path, file) = scratch("min");
        let log = CappedLog::new(file, 10);
        assert_eq!(log.limit, MIN_LIMIT);
    }
}
