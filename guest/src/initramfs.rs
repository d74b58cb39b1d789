//! The guest's initramfs, written by Husk itself as an uncompressed newc
//! cpio archive (the format the kernel unpacks into its rootfs; see the
//! kernel's Documentation/driver-api/early-userspace/buffer-format.rst).
//!
//! No external tool is involved, and the archive is deterministic: the same
//! entries give the same bytes (mtime 0, inode numbers in order), so it can
//! take part in a cache key.

use std::io::{self, Write};
use std::path::Path;

use thiserror::Error;

const MAGIC: &str = "070701";
const TRAILER: &str = "TRAILER!!!";
const S_IFDIR: u32 = 0o040000;
const S_IFREG: u32 = 0o100000;
const S_IFCHR: u32 = 0o020000;

/// Errors building an initramfs.
#[derive(Debug, Error)]
pub enum InitramfsError {
    /// A file to pack cannot be read.
    #[error("cannot read {} for the initramfs", .0.display())]
    Read(std::path::PathBuf, #[source] io::Error),
    /// An entry name that the kernel would not unpack where meant.
    #[error("invalid initramfs entry name {0:?}: names are relative, without `..` or NUL")]
    BadName(String),
    /// Writing the archive failed.
    #[error("cannot write the initramfs")]
    Write(#[source] io::Error),
}

#[derive(Debug, Clone)]
struct Entry {
    name: String,
    mode: u32,
    rdev: (u32, u32),
    data: Vec<u8>,
}

/// An initramfs being assembled, entry by entry, in the order given.
#[derive(Debug, Default, Clone)]
pub struct Initramfs {
    entries: Vec<Entry>,
}

fn check_name(name: &str) -> Result<(), InitramfsError> {
    let bad = name.is_empty()
        || name.starts_with('/')
        || name.contains('\0')
        || name.split('/').any(|c| c == ".." || c.is_empty());
    if bad {
        Err(InitramfsError::BadName(name.to_owned()))
    } else {
        Ok(())
    }
}

impl Initramfs {
    /// An empty archive.
    pub fn new() -> Self {
        Self::default()
    }

    /// The minimal root every Husk guest gets: /dev with the console node
    /// (the kernel opens /dev/console as init's stdio), /proc and /sys.
    pub fn with_base() -> Self {
        let mut fs = Self::new();
        for dir in ["dev", "proc", "sys"] {
            fs.entries.push(Entry {
                name: dir.into(),
                mode: S_IFDIR | 0o755,
                rdev: (0, 0),
                data: Vec::new(),
            });
        }
        fs.entries.push(Entry {
            name: "dev/console".into(),
            mode: S_IFCHR | 0o600,
            rdev: (5, 1),
            data: Vec::new(),
        });
        fs
    }

    /// Adds a directory.
    pub fn dir(&mut self, name: &str, perm: u32) -> Result<&mut Self, InitramfsError> {
        check_name(name)?;
        self.entries.push(Entry {
            name: name.into(),
            mode: S_IFDIR | (perm & 0o7777),
            rdev: (0, 0),
            data: Vec::new(),
        });
        Ok(self)
    }

    /// Adds a regular file with the given contents.
    pub fn file(
        &mut self,
        name: &str,
        perm: u32,
        data: Vec<u8>,
    ) -> Result<&mut Self, InitramfsError> {
        check_name(name)?;
        self.entries.push(Entry {
            name: name.into(),
            mode: S_IFREG | (perm & 0o7777),
            rdev: (0, 0),
            data,
        });
        Ok(self)
    }

    /// Adds a host file, read now, as `name`.
    pub fn host_file(
        &mut self,
        name: &str,
        perm: u32,
        path: &Path,
    ) -> Result<&mut Self, InitramfsError> {
        let data = std::fs::read(path).map_err(|e| InitramfsError::Read(path.to_owned(), e))?;
        self.file(name, perm, data)
    }

    /// Writes the archive.
    pub fn write_to<W: Write>(&self, mut out: W) -> Result<(), InitramfsError> {
        let mut written = 0usize;
        for (ino, e) in self.entries.iter().enumerate() {
            let nlink = if e.mode & S_IFDIR != 0 { 2 } else { 1 };
            write_entry(&mut out, &mut written, ino as u32 + 1, e, nlink)
                .map_err(InitramfsError::Write)?;
        }
        let trailer = Entry {
            name: TRAILER.into(),
            mode: 0,
            rdev: (0, 0),
            data: Vec::new(),
        };
        write_entry(&mut out, &mut written, 0, &trailer, 1).map_err(InitramfsError::Write)?;
        out.flush().map_err(InitramfsError::Write)
    }

    /// The archive as bytes.
    pub fn to_bytes(&self) -> Result<Vec<u8>, InitramfsError> {
        let mut bytes = Vec::new();
        self.write_to(&mut bytes)?;
        Ok(bytes)
    }
}

fn pad4<W: Write>(out: &mut W, written: &mut usize) -> io::Result<()> {
    let pad = (4 - *written % 4) % 4;
    out.write_all(&[0u8; 3][..pad])?;
    *written += pad;
    Ok(())
}

fn write_entry<W: Write>(
    out: &mut W,
    written: &mut usize,
    ino: u32,
    e: &Entry,
    nlink: u32,
) -> io::Result<()> {
    let fields = [
        ino,
        e.mode,
        0, // uid
        0, // gid
        nlink,
        0, // mtime
        e.data.len() as u32,
        0, // dev major
        0, // dev minor
        e.rdev.0,
        e.rdev.1,
        e.name.len() as u32 + 1,
        0, // check
    ];
    let mut header = String::with_capacity(110);
    header.push_str(MAGIC);
    for f in fields {
        header.push_str(&format!("{f:08x}"));
    }
    out.write_all(header.as_bytes())?;
    out.write_all(e.name.as_bytes())?;
    out.write_all(&[0])?;
    *written += header.len() + e.name.len() + 1;
    pad4(out, written)?;
    out.write_all(&e.data)?;
    *written += e.data.len();
    pad4(out, written)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// (name, mode, rdev, data) of one archived entry.
    type Parsed = (String, u32, (u32, u32), Vec<u8>);

    /// A reader for the archive, to check what the writer produced.
    fn parse(mut b: &[u8]) -> Vec<Parsed> {
        let total = b.len();
        let mut out = Vec::new();
        loop {
            assert_eq!(&b[..6], MAGIC.as_bytes());
            let field = |i: usize| {
                u32::from_str_radix(std::str::from_utf8(&b[6 + i * 8..14 + i * 8]).unwrap(), 16)
                    .unwrap()
            };
            let (mode, size, rmaj, rmin, namesize) =
                (field(1), field(6), field(9), field(10), field(11));
            let name = std::str::from_utf8(&b[110..110 + namesize as usize - 1])
                .unwrap()
                .to_owned();
            let off = (110 + namesize as usize).div_ceil(4) * 4;
            let data = b[off..off + size as usize].to_vec();
            let next = (off + size as usize).div_ceil(4) * 4;
            assert_eq!((total - b.len() + next) % 4, 0);
            b = &b[next..];
            if name == TRAILER {
                assert!(b.is_empty());
                return out;
            }
            out.push((name, mode, (rmaj, rmin), data));
        }
    }

    #[test]
    fn base_and_files_round_trip() {
        let mut fs = Initramfs::with_base();
        fs.file("init", 0o755, b"#!hello".to_vec()).unwrap();
        fs.dir("etc", 0o755).unwrap();
        fs.file("etc/hostname", 0o644, b"husk\n".to_vec()).unwrap();
        let bytes = fs.to_bytes().unwrap();
        let entries = parse(&bytes);
        let names: Vec<_> = entries.iter().map(|e| e.0.as_str()).collect();
        assert_eq!(
            names,
            [
                "dev",
                "proc",
                "sys",
                "dev/console",
                "init",
                "etc",
                "etc/hostname"
            ]
        );
        let console = &entries[3];
        assert_eq!((console.1, console.2), (S_IFCHR | 0o600, (5, 1)));
        assert_eq!(entries[4].1, S_IFREG | 0o755);
        assert_eq!(entries[4].3, b"#!hello");
        assert_eq!(entries[6].3, b"husk\n");
        // Deterministic: the same entries give the same bytes.
        assert_eq!(bytes, fs.to_bytes().unwrap());
    }

    #[test]
    fn refuses_names_that_escape_or_are_absolute() {
        let mut fs = Initramfs::new();
        for bad in ["/init", "../x", "a/../b", "", "a//b", "nul\0"] {
            let err = fs.file(bad, 0o644, Vec::new()).unwrap_err();
            assert!(err.to_string().contains("invalid initramfs entry name"));
        }
    }

    #[test]
    fn missing_host_file_is_named() {
        let mut fs = Initramfs::new();
        let err = fs
            .host_file("init", 0o755, Path::new("/nonexistent/husk-init"))
            .unwrap_err();
        assert!(err.to_string().contains("/nonexistent/husk-init"), "{err}");
    }
}
