//! The kernel file as linux-loader reads it, except that the bulk of each
//! loadable segment is mapped into guest memory copy-on-write from the file
//! instead of copied.
//!
//! Copying a 13 MiB vmlinux into fresh guest memory was four fifths of the
//! VMM's set-up time. linux-loader still parses and checks the ELF file and
//! finds the PVH entry; only its bulk reads (`ReadVolatile`) land here. A
//! page-aligned run of a segment becomes a `MAP_PRIVATE | MAP_FIXED` file
//! mapping at the guest memory's host address (the guest's writes go to
//! private copies, the file is never written); the unaligned head and tail
//! are read as usual. Every VM booting the same kernel then shares its page
//! cache pages.
//!
//! The file must not be truncated while a VM runs from it: the kernels
//! kernel-config/build-kernel.sh caches are never modified in place.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;

use vm_memory::bitmap::BitmapSlice;
use vm_memory::{ReadVolatile, VolatileMemoryError, VolatileSlice};

const PAGE_SIZE: usize = 4096;

/// A kernel file that maps what it can into the guest.
pub struct KernelFile {
    file: File,
    pos: u64,
    /// Bytes mapped rather than copied, for the record.
    pub mapped: u64,
}

impl KernelFile {
    /// Wraps an open kernel file.
    pub fn new(file: File) -> Self {
        Self {
            file,
            pos: 0,
            mapped: 0,
        }
    }

    /// Reads exactly `buf.len()` bytes at `offset` into `buf`.
    fn pread_exact(&self, buf: &mut [u8], offset: u64) -> Result<(), VolatileMemoryError> {
        self.file
            .read_exact_at(buf, offset)
            .map_err(VolatileMemoryError::IOError)
    }
}

impl Read for KernelFile {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.file.read_at(buf, self.pos)?;
        self.pos += n as u64;
        Ok(n)
    }
}

impl Seek for KernelFile {
    fn seek(&mut self, pos: SeekFrom) -> std::io::Result<u64> {
        let target = match pos {
            SeekFrom::Start(n) => Some(n),
            SeekFrom::Current(d) => self.pos.checked_add_signed(d),
            SeekFrom::End(d) => self.file.metadata()?.len().checked_add_signed(d),
        };
        self.pos = target.ok_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "seek before the file start",
            )
        })?;
        Ok(self.pos)
    }
}

impl ReadVolatile for KernelFile {
    fn read_volatile<B: BitmapSlice>(
        &mut self,
        buf: &mut VolatileSlice<B>,
    ) -> Result<usize, VolatileMemoryError> {
        let len = buf.len();
        let file_len = self
            .file
            .metadata()
            .map_err(VolatileMemoryError::IOError)?
            .len();
        let len = len.min(file_len.saturating_sub(self.pos) as usize);
        if len == 0 {
            return Ok(0);
        }
        let guard = buf.ptr_guard_mut();
        let host = guard.as_ptr() as usize;
        // SAFETY: the VolatileSlice covers `buf.len()` bytes of guest memory
        // mapped in this process; `len` is no more than that, and no other
        // reference to these bytes exists while linux-loader loads the
        // kernel (vCPUs have not run yet).
        let dest = unsafe { std::slice::from_raw_parts_mut(host as *mut u8, len) };

        let head = (PAGE_SIZE - host % PAGE_SIZE) % PAGE_SIZE;
        let aligned = (self.pos as usize + head) % PAGE_SIZE == 0;
        let middle = len.saturating_sub(head) & !(PAGE_SIZE - 1);
        if aligned && middle > 0 {
            self.pread_exact(&mut dest[..head], self.pos)?;
            let file_off = self.pos + head as u64;
            // SAFETY: maps `middle` bytes of the file over guest memory we
            // own, at a page-aligned address inside the slice; MAP_FIXED
            // replaces exactly those pages of the anonymous mapping, which
            // stays owned by the same GuestMemoryMmap. MAP_PRIVATE: guest
            // writes never reach the file.
            let addr = unsafe {
                libc::mmap(
                    (host + head) as *mut libc::c_void,
                    middle,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_FIXED,
                    self.file.as_raw_fd(),
                    file_off as libc::off_t,
                )
            };
            if addr == libc::MAP_FAILED {
                return Err(VolatileMemoryError::IOError(std::io::Error::last_os_error()));
            }
            self.mapped += middle as u64;
            let tail = head + middle;
            self.pread_exact(&mut dest[tail..], self.pos + tail as u64)?;
        } else {
            self.pread_exact(dest, self.pos)?;
        }
        self.pos += len as u64;
        Ok(len)
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use vm_memory::{Bytes, GuestAddress, GuestMemory, GuestMemoryMmap};

    use super::*;

    #[test]
    fn mapped_and_copied_bytes_read_back_as_the_file() {
        let path = std::env::temp_dir().join(format!("husk-kfile-{}", std::process::id()));
        let data: Vec<u8> = (0..5 * PAGE_SIZE + 123)
            .map(|i| (i * 7 % 251) as u8)
            .collect();
        std::fs::File::create(&path)
            .unwrap()
            .write_all(&data)
            .unwrap();
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();

        // Aligned: file offset 100 lands at guest 0x2000 + 100.
        let mut kf = KernelFile::new(File::open(&path).unwrap());
        kf.seek(SeekFrom::Start(100)).unwrap();
        mem.read_exact_volatile_from(GuestAddress(0x2000 + 100), &mut kf, data.len() - 100)
            .unwrap();
        assert_eq!(kf.mapped, 4 * PAGE_SIZE as u64);
        let mut back = vec![0u8; data.len() - 100];
        mem.read_slice(&mut back, GuestAddress(0x2000 + 100))
            .unwrap();
        assert_eq!(back, data[100..]);

        // Guest writes stay private: the file is unchanged.
        mem.write_slice(&[0xee; 16], GuestAddress(0x3000)).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), data);

        // Misaligned: everything is copied, still byte-exact.
        let mut kf = KernelFile::new(File::open(&path).unwrap());
        kf.seek(SeekFrom::Start(1)).unwrap();
        mem.read_exact_volatile_from(GuestAddress(0x10000), &mut kf, data.len() - 1)
            .unwrap();
        assert_eq!(kf.mapped, 0);
        let mut back = vec![0u8; data.len() - 1];
        mem.read_slice(&mut back, GuestAddress(0x10000)).unwrap();
        assert_eq!(back, data[1..]);
        assert!(mem.address_in_range(GuestAddress(0xfffff)));
        std::fs::remove_file(&path).unwrap();
    }
}
