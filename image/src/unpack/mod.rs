//! Unpacking of one OCI image layer (a tar stream) into a host directory,
//! so that layers can be stacked with overlayfs (`lowerdir=...`).
//!
//! # Design
//!
//! A layer is untrusted input: its entries name paths, link targets and
//! owners chosen by whoever built the image. Unpacking must never read or
//! write outside the destination directory, and must never follow a
//! symbolic link on the host (a link stored in the layer only makes sense
//! inside the container, where `/` is the container's root).
//!
//! So every entry is unpacked relative to directory file descriptors:
//!
//! - The destination is opened once; for an entry `a/b/c`, the parents `a`
//!   and `b` are opened one at a time with
//!   `openat(O_DIRECTORY | O_NOFOLLOW)`, each relative to the one before
//!   (missing ones are made with `mkdirat`, as tar does). A parent that is a
//!   symbolic link fails to open (`ELOOP`/`ENOTDIR`) and the entry is
//!   refused.
//! - The entry itself is then made with an `*at` call relative to its
//!   parent's fd (`mkdirat`, `openat(O_CREAT | O_EXCL | O_NOFOLLOW)`,
//!   `symlinkat`, `linkat` without `AT_SYMLINK_FOLLOW`, `mknodat`), and its
//!   metadata is set the same way (`fchownat`, `fchmodat`, `utimensat`, all
//!   with `AT_SYMLINK_NOFOLLOW`; extended attributes with `lsetxattr`
//!   through `/proc/self/fd/<parent>/<name>`).
//! - Paths are checked before anything is made: absolute paths and `..`
//!   components are refused, hard links must point at something this layer
//!   made, inside it.
//!
//! The tar crate's own `unpack` is not used: it resolves paths through the
//! host's file system (following symbolic links in some cases, e.g. in
//! parents made by earlier entries), it does not convert OCI whiteouts to
//! the form overlayfs understands, and it cannot defer directory times.
//! The tar crate is used only to parse the stream (including GNU long names
//! and PAX headers).
//!
//! # Whiteouts
//!
//! OCI layers mark deletions with whiteout files; overlayfs has its own
//! form. They are converted as the layer is unpacked:
//!
//! - `dir/.wh.NAME` (NAME deleted) becomes a character device 0:0 at
//!   `dir/NAME`;
//! - `dir/.wh..wh..opq` (`dir`'s lower contents hidden) sets the extended
//!   attribute `trusted.overlay.opaque` to `y` on `dir`.
//!
//! # Diff ID
//!
//! The layer's diff ID is the SHA-256 of its uncompressed tar stream. The
//! decompressed bytes are hashed as the tar reader reads them; once the
//! archive ends, the rest of the stream (the end-of-archive blocks and any
//! padding) is read into the hash too.

mod entry;
mod fsops;
mod stream;

use self::entry::*;
use self::fsops::*;
use self::stream::*;

use std::ffi::{CStr, CString};
use std::fs::OpenOptions;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use rustix::fs::{AtFlags, Dev, FileType, Stat, Timespec};
use ruzstd::decoding::errors::{FrameDecoderError, ReadFrameHeaderError};
use ruzstd::decoding::{BlockDecodingStrategy, FrameDecoder};
use sha2::{Digest, Sha256};
use tar::EntryType;

/// The tar block size: headers and data are padded to it.
const BLOCK_SIZE: u64 = 512;

/// The prefix of an OCI whiteout's name.
const WHITEOUT_PREFIX: &[u8] = b".wh.";

/// An OCI opaque whiteout's name, less [`WHITEOUT_PREFIX`].
const OPAQUE_WHITEOUT: &[u8] = b".wh..opq";

/// The extended attribute that makes an overlayfs directory opaque.
const OVERLAY_OPAQUE: &CStr = c"trusted.overlay.opaque";

/// The PAX record prefix of an extended attribute.
const PAX_XATTR_PREFIX: &[u8] = b"SCHILY.xattr.";

/// What one layer may unpack to (docs/security.md, "Limits"): an image is
/// untrusted input, and a small compressed layer can expand without end.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Bytes of the uncompressed tar stream (file data, headers, padding).
    pub max_bytes: u64,
    /// Entries in the layer.
    pub max_entries: u64,
    /// Bytes of one entry's extended headers (PAX records, GNU long
    /// names), which are held in memory while the entry is read.
    pub max_header_bytes: u64,
}

impl Limits {
    /// The defaults: 8 GiB, a million entries, 1 MiB of headers.
    pub const DEFAULT: Self = Self {
        max_bytes: 8 << 30,
        max_entries: 1_000_000,
        max_header_bytes: 1 << 20,
    };

    /// The limits in force in this process: the defaults, or what
    /// [`Limits::set`] made them (husk's `--max-layer-*` flags).
    pub fn current() -> Self {
        *CURRENT.get().unwrap_or(&Self::DEFAULT)
    }

    /// Sets the limits for this process (once, at start).
    pub fn set(limits: Self) {
        let _ = CURRENT.set(limits);
    }
}

static CURRENT: std::sync::OnceLock<Limits> = std::sync::OnceLock::new();

/// Header blocks one entry may have before its own: GNU long name and
/// link, PAX global and local, with room to spare.
const HEADER_BLOCKS: u64 = 8;

/// Why a layer cannot be unpacked.
///
/// Each message includes the underlying I/O error, so the variants do not
/// also report it as their `source` (`{:#}` would print it twice).
#[derive(Debug, thiserror::Error)]
pub enum UnpackError {
    /// The destination directory cannot be opened.
    #[error("layer: cannot open the destination {}: {error}", .path.display())]
    Destination {
        /// The destination.
        path: PathBuf,
        /// Why.
        error: io::Error,
    },
    /// The layer's stream cannot be read, decompressed or parsed as tar.
    #[error("layer: cannot {what}: {error}")]
    Stream {
        /// What was being done, e.g. `decompress the gzip stream`.
        what: &'static str,
        /// Why.
        error: io::Error,
    },
    /// An entry is refused: it leaves the layer, or cannot be in one.
    #[error("layer entry {entry:?}: {why}")]
    Refused {
        /// The entry's path, as in the tar stream.
        entry: String,
        /// Why it is refused.
        why: String,
    },
    /// The layer goes beyond one of its [`Limits`].
    #[error("layer refused: {0}")]
    Limit(String),
    /// An entry cannot be made on the host.
    #[error("layer entry {entry:?}: cannot {what}: {error}")]
    Entry {
        /// The entry's path, as in the tar stream.
        entry: String,
        /// What was being done, e.g. `create`.
        what: String,
        /// Why.
        error: io::Error,
    },
}

/// Unpacks one layer into `dest` (an existing, empty directory). The stream may be
/// gzip, zstd or plain tar (detected by magic bytes, not by media type).
/// Returns the layer's diff ID: "sha256:<hex>" of the uncompressed tar stream
/// (the whole stream read to its end, including the trailing zero blocks/padding).
pub fn unpack_layer(reader: impl Read, dest: &Path, limits: Limits) -> Result<String, UnpackError> {
    let root = open_destination(dest)?;
    let (compression, decompressed) = decompress(reader).map_err(|error| UnpackError::Stream {
        what: Compression::None.reading(),
        error,
    })?;
    let stream = LayerStream::new(decompressed, limits);
    let until = stream.until.clone();
    let mut archive = tar::Archive::new(stream);
    let mut unpacker = Unpacker::new(root, limits, until);
    let result = unpacker.unpack_all(&mut archive);

    let mut stream = archive.into_inner();
    let result = result.and_then(|archive_end| stream.finish(archive_end));
    if let Some(why) = stream.refused.take() {
        return Err(UnpackError::Limit(why));
    }
    if let Err(UnpackError::Stream { .. }) = result {
        // The decompressor's errors reach the tar reader as plain I/O
        // errors: report the original, saying what failed.
        if let Some(error) = stream.error.take() {
            return Err(UnpackError::Stream {
                what: compression.reading(),
                error,
            });
        }
    }
    result?;
    unpacker.set_directory_times()?;
    Ok(format!("sha256:{:x}", stream.hasher.finalize()))
}

/// The diff ID of a layer blob, read in full but not unpacked (a layer
/// already unpacked is still checked against the blob that claims it).
pub fn diff_id(reader: impl Read, limits: Limits) -> Result<String, UnpackError> {
    let (compression, decompressed) = decompress(reader).map_err(|error| UnpackError::Stream {
        what: Compression::None.reading(),
        error,
    })?;
    let mut stream = LayerStream::new(decompressed, limits);
    stream.until.set(u64::MAX);
    let copied = io::copy(&mut stream, &mut io::sink());
    if let Some(why) = stream.refused.take() {
        return Err(UnpackError::Limit(why));
    }
    copied.map_err(|_| UnpackError::Stream {
        what: compression.reading(),
        error: stream
            .error
            .take()
            .unwrap_or_else(|| io::Error::other("read failed")),
    })?;
    Ok(format!("sha256:{:x}", stream.hasher.finalize()))
}

/// Opens the destination directory.
fn open_destination(dest: &Path) -> Result<OwnedFd, UnpackError> {
    OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY | libc::O_CLOEXEC)
        .open(dest)
        .map(OwnedFd::from)
        .map_err(|error| UnpackError::Destination {
            path: dest.to_path_buf(),
            error,
        })
}

/// An error in the tar stream, outside an entry.
fn tar_error(error: io::Error) -> UnpackError {
    UnpackError::Stream {
        what: Compression::None.reading(),
        error,
    }
}

/// Unpacks the entries of one layer below a root directory.
struct Unpacker {
    /// The destination directory.
    root: OwnedFd,
    limits: Limits,
    /// The stream's allowance ([`LayerStream::until`]).
    until: std::rc::Rc<std::cell::Cell<u64>>,
    /// The directories made, with their modification times: set once all
    /// entries are in, since making entries inside changes them.
    directory_times: Vec<(LayerPath, Timespec)>,
    /// A buffer for copying file contents.
    buf: Vec<u8>,
}

impl Unpacker {
    fn new(root: OwnedFd, limits: Limits, until: std::rc::Rc<std::cell::Cell<u64>>) -> Self {
        Self {
            root,
            limits,
            until,
            directory_times: Vec::new(),
            buf: vec![0; 64 * 1024],
        }
    }

    /// Unpacks all entries of `archive`. Returns where, in the stream, the
    /// last entry's data ends.
    fn unpack_all<R: Read>(&mut self, archive: &mut tar::Archive<R>) -> Result<u64, UnpackError> {
        let mut archive_end = 0;
        for (count, entry) in archive.entries().map_err(tar_error)?.enumerate() {
            let mut entry = entry.map_err(tar_error)?;
            if count as u64 >= self.limits.max_entries {
                return Err(UnpackError::Limit(format!(
                    "it has more than {} entries (--max-layer-entries)",
                    self.limits.max_entries
                )));
            }
            // The tar reader has checked that this does not overflow.
            archive_end = entry.raw_file_position() + entry.size().next_multiple_of(BLOCK_SIZE);
            // This entry's data, then the next entry's headers, at most.
            self.until.set(
                archive_end.saturating_add(
                    self.limits
                        .max_header_bytes
                        .saturating_add((HEADER_BLOCKS + 1) * BLOCK_SIZE),
                ),
            );
            let path = entry.path_bytes().into_owned();
            self.unpack_entry(&path, &mut entry)
                .map_err(|e| e.naming(&path))?;
        }
        Ok(archive_end)
    }

    /// Unpacks one entry, whose path (as in the tar stream) is `raw_path`.
    fn unpack_entry<R: Read>(
        &mut self,
        raw_path: &[u8],
        entry: &mut tar::Entry<'_, R>,
    ) -> Result<(), EntryError> {
        let Some(kind) = Kind::of(entry)? else {
            return Ok(());
        };
        let path = parse_path(raw_path).map_err(|e| EntryError::Refused(e.why().to_string()))?;
        let Some((name, dirs)) = path.split_last() else {
            // The layer's root itself (`./`): the destination is made already.
            return Ok(());
        };
        let meta = Metadata::read(entry)?;
        if let Some(hidden) = name.as_bytes().strip_prefix(WHITEOUT_PREFIX) {
            return self.whiteout(dirs, hidden, &meta);
        }

        let parent = self.open_dir(dirs, true).map_err(WalkError::for_parent)?;
        let parent = parent.as_fd();
        match kind {
            Kind::File => {
                let size = entry.size();
                self.make_file(parent, name, entry, size)?;
                set_metadata(parent, name, &meta, false)
            }
            Kind::Directory => {
                make_directory(parent, name)?;
                set_owner_mode_xattrs(parent, name, &meta, false)?;
                self.directory_times.push((path.clone(), meta.mtime));
                Ok(())
            }
            Kind::Symlink(target) => {
                remove_existing(parent, name)?;
                sys::symlinkat(&target, parent, name).map_err(failed("create"))?;
                set_metadata(parent, name, &meta, true)
            }
            // A hard link shares its target's metadata: leave it.
            Kind::HardLink(target) => self.make_hard_link(parent, name, &target),
            Kind::Node(file_type, device) => {
                remove_existing(parent, name)?;
                sys::mknodat(parent, name, file_type, 0o600, device).map_err(failed("create"))?;
                set_metadata(parent, name, &meta, false)
            }
        }
    }

    /// Opens the directory `dirs` below the root, one component at a time,
    /// never following a symbolic link. With `create`, missing directories
    /// are made (mode 0755, as tar does).
    fn open_dir(&self, dirs: &[CString], create: bool) -> Result<OwnedFd, WalkError> {
        let mut dir = self
            .root
            .try_clone()
            .map_err(|e| WalkError::Io("open the destination".to_string(), e))?;
        for (i, name) in dirs.iter().enumerate() {
            let shown = || show(&dirs[..=i]);
            dir = match sys::open_dir(dir.as_fd(), name) {
                Ok(fd) => fd,
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {
                    if !create {
                        return Err(WalkError::Missing(shown()));
                    }
                    make_missing_dir(dir.as_fd(), name)
                        .map_err(|e| WalkError::Io(format!("create directory {:?}", shown()), e))?
                }
                Err(e) if matches!(e.raw_os_error(), Some(libc::ELOOP | libc::ENOTDIR)) => {
                    return Err(match sys::fstatat(dir.as_fd(), name) {
                        Ok(st) if is_type(&st, FileType::Symlink) => WalkError::Symlink(shown()),
                        _ => WalkError::NotDirectory(shown()),
                    });
                }
                Err(e) => return Err(WalkError::Io(format!("open directory {:?}", shown()), e)),
            };
        }
        Ok(dir)
    }

    /// Makes the regular file `name` in `parent` with the `size` bytes of
    /// the entry's contents.
    fn make_file(
        &mut self,
        parent: BorrowedFd<'_>,
        name: &CStr,
        entry: &mut impl Read,
        size: u64,
    ) -> Result<(), EntryError> {
        remove_existing(parent, name)?;
        let mut file = sys::create_file(parent, name).map_err(failed("create"))?;
        let mut written = 0;
        loop {
            let len = match entry.read(&mut self.buf) {
                Ok(0) => break,
                Ok(len) => len,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(EntryError::Stream(e)),
            };
            file.write_all(&self.buf[..len]).map_err(failed("write"))?;
            written += len as u64;
        }
        if written < size {
            return Err(EntryError::Stream(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the stream ends inside a file",
            )));
        }
        Ok(())
    }

    /// Makes `name` in `parent` a hard link to `target`, a path in the layer.
    fn make_hard_link(
        &self,
        parent: BorrowedFd<'_>,
        name: &CStr,
        target: &[u8],
    ) -> Result<(), EntryError> {
        let shown = String::from_utf8_lossy(target);
        let target_path = parse_path(target).map_err(|e| {
            EntryError::Refused(match e {
                BadPath::Absolute | BadPath::DotDot => {
                    format!("hard link to {shown:?} leaves the layer")
                }
                BadPath::Empty | BadPath::Nul => format!("hard link to {shown:?}: {}", e.why()),
            })
        })?;
        let Some((target_name, target_dirs)) = target_path.split_last() else {
            return Err(EntryError::Refused(format!(
                "hard link to {shown:?}: the layer's root"
            )));
        };
        let target_dir = self
            .open_dir(target_dirs, false)
            .map_err(|e| e.for_link_target(target))?;
        let target_dir = target_dir.as_fd();
        let target_stat = match sys::fstatat(target_dir, target_name) {
            Ok(st) => st,
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {
                return Err(WalkError::Missing(String::new()).for_link_target(target));
            }
            Err(e) => return Err(failed(format!("inspect {shown:?}"))(e)),
        };
        if is_type(&target_stat, FileType::Directory) {
            return Err(EntryError::Refused(format!(
                "hard link to directory {shown:?}"
            )));
        }
        if let Ok(st) = sys::fstatat(parent, name) {
            if (st.st_dev, st.st_ino) == (target_stat.st_dev, target_stat.st_ino) {
                return Ok(()); // Linked already.
            }
        }
        remove_existing(parent, name)?;
        sys::linkat(target_dir, target_name, parent, name).map_err(failed("link"))
    }

    /// Converts the OCI whiteout `dirs/.wh.<hidden>` to overlayfs's form.
    fn whiteout(&self, dirs: &[CString], hidden: &[u8], meta: &Metadata) -> Result<(), EntryError> {
        let parent = self.open_dir(dirs, true).map_err(WalkError::for_parent)?;
        if hidden == OPAQUE_WHITEOUT {
            return sys::fsetxattr(parent.as_fd(), OVERLAY_OPAQUE, b"y")
                .map_err(failed("make the directory opaque"));
        }
        if hidden.starts_with(WHITEOUT_PREFIX) {
            // Other `.wh..wh.` names are AUFS metadata, meaningless here.
            return Ok(());
        }
        let name = match hidden {
            b".." => return Err(EntryError::Refused(BadPath::DotDot.why().to_string())),
            b"" | b"." => return Err(EntryError::Refused("whiteout names no file".to_string())),
            _ => {
                CString::new(hidden).map_err(|_| EntryError::Refused(BadPath::Nul.why().into()))?
            }
        };
        let parent = parent.as_fd();
        // A whiteout hides lower layers' files only: one of this layer stays.
        match sys::fstatat(parent, &name) {
            Ok(_) => return Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
            Err(e) => return Err(failed("inspect the whited-out file")(e)),
        }
        sys::mknodat(
            parent,
            &name,
            FileType::CharacterDevice,
            0,
            rustix::fs::makedev(0, 0),
        )
        .map_err(failed("create the whiteout device"))?;
        sys::fchownat(parent, &name, meta.uid, meta.gid).map_err(failed("set the owner"))
    }

    /// Sets the modification times of the directories made, now that all
    /// entries are in. Directories replaced since by other entries are left.
    fn set_directory_times(&self) -> Result<(), UnpackError> {
        for (path, mtime) in &self.directory_times {
            let naming = |what: String, error| UnpackError::Entry {
                entry: show(path),
                what,
                error,
            };
            let dir = match self.open_dir(path, false) {
                Ok(dir) => dir,
                Err(WalkError::Io(what, error)) => return Err(naming(what, error)),
                Err(_) => continue,
            };
            sys::futimens(dir.as_fd(), mtime)
                .map_err(|e| naming("set the modification time".to_string(), e))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::ffi::OsStr;
    use std::fs;
    use std::io::Write;
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    use std::path::{Path, PathBuf};
    use std::process::{Command, Stdio};
    use std::sync::atomic::{AtomicU32, Ordering};

    use flate2::Compression as GzLevel;
    use flate2::write::GzEncoder;
    use sha2::{Digest, Sha256};
    use tar::{EntryType, Header};

    use super::*;

    /// The modification time of test entries.
    const MTIME: u64 = 1_600_000_000;

    /// A fresh directory under /tmp, removed when dropped.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new() -> Self {
            static COUNT: AtomicU32 = AtomicU32::new(0);
            let name = format!(
                "husk-unpack-test-{}-{}",
                std::process::id(),
                COUNT.fetch_add(1, Ordering::Relaxed)
            );
            let path = std::env::temp_dir().join(name);
            let _ = fs::remove_dir_all(&path);
            fs::create_dir(&path).unwrap();
            Self(path)
        }

        fn path(&self) -> &Path {
            &self.0
        }

        /// The names in the directory, sorted.
        fn names(&self) -> Vec<String> {
            names(&self.0)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    fn names(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    /// A PAX record, as in a PAX header's data.
    fn pax_record(key: &str, value: &[u8]) -> Vec<u8> {
        // "<len> <key>=<value>\n", where <len> counts itself too.
        let rest = key.len() + value.len() + 3;
        let mut len = rest;
        while len != rest + len.to_string().len() {
            len = rest + len.to_string().len();
        }
        let mut record = format!("{len} {key}=").into_bytes();
        record.extend_from_slice(value);
        record.push(b'\n');
        record
    }

    /// A tar stream, built entry by entry with raw names (the tar crate's
    /// builder refuses hostile ones).
    struct Layer(tar::Builder<Vec<u8>>);

    impl Layer {
        fn new() -> Self {
            Self(tar::Builder::new(Vec::new()))
        }

        /// Adds an entry; `edit` changes its header from the defaults
        /// (mode 0644, owner 0:0, [`MTIME`]).
        fn entry(
            mut self,
            path: &[u8],
            kind: EntryType,
            data: &[u8],
            edit: impl FnOnce(&mut Header),
        ) -> Self {
            let mut header = Header::new_gnu();
            header.set_entry_type(kind);
            header.set_mode(0o644);
            header.set_uid(0);
            header.set_gid(0);
            header.set_mtime(MTIME);
            header.set_size(data.len() as u64);
            header.as_gnu_mut().unwrap().name[..path.len()].copy_from_slice(path);
            edit(&mut header);
            header.set_cksum();
            self.0.append(&header, data).unwrap();
            self
        }

        fn file(self, path: &str, data: &[u8]) -> Self {
            self.entry(path.as_bytes(), EntryType::Regular, data, |_| {})
        }

        fn dir(self, path: &str) -> Self {
            self.entry(path.as_bytes(), EntryType::Directory, b"", |h| {
                h.set_mode(0o755)
            })
        }

        fn link(self, kind: EntryType, path: &str, target: &str) -> Self {
            self.entry(path.as_bytes(), kind, b"", |h| {
                let slot = &mut h.as_gnu_mut().unwrap().linkname;
                slot[..target.len()].copy_from_slice(target.as_bytes());
            })
        }

        fn symlink(self, path: &str, target: &str) -> Self {
            self.link(EntryType::Symlink, path, target)
        }

        fn hard_link(self, path: &str, target: &str) -> Self {
            self.link(EntryType::Link, path, target)
        }

        /// Adds a PAX header for the next entry.
        fn pax(self, records: &[(&str, &[u8])]) -> Self {
            let data: Vec<u8> = records
                .iter()
                .flat_map(|(key, value)| pax_record(key, value))
                .collect();
            self.entry(b"PaxHeaders/next", EntryType::XHeader, &data, |_| {})
        }

        fn finish(self) -> Vec<u8> {
            self.0.into_inner().unwrap()
        }
    }

    fn sha256(data: &[u8]) -> String {
        format!("sha256:{:x}", Sha256::digest(data))
    }

    fn gzip(data: &[u8]) -> Vec<u8> {
        let mut encoder = GzEncoder::new(Vec::new(), GzLevel::default());
        encoder.write_all(data).unwrap();
        encoder.finish().unwrap()
    }

    /// Compresses with the `zstd` tool.
    fn zstd(data: &[u8]) -> Vec<u8> {
        let mut child = Command::new("zstd")
            .args(["-c", "-q", "--check"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("the zstd tool");
        let mut stdin = child.stdin.take().unwrap();
        let data = data.to_vec();
        let writer = std::thread::spawn(move || stdin.write_all(&data).unwrap());
        let output = child.wait_with_output().unwrap();
        writer.join().unwrap();
        assert!(output.status.success());
        output.stdout
    }

    /// An extended attribute of `path` (of the link, for a symbolic link).
    fn xattr(path: &Path, key: &str) -> Option<Vec<u8>> {
        let mut value = vec![0u8; 256];
        let len = rustix::fs::lgetxattr(path, key, &mut value[..]).ok()?;
        value.truncate(len);
        Some(value)
    }

    /// Unpacks `layer` into a fresh directory `dest` inside `root`.
    fn unpack_in(root: &TempDir, layer: &[u8]) -> (PathBuf, Result<String, UnpackError>) {
        let dest = root.path().join("dest");
        fs::create_dir(&dest).unwrap();
        let result = unpack_layer(layer, &dest, Limits::DEFAULT);
        (dest, result)
    }

    /// Unpacks `layer`, which must be refused; returns the message, and
    /// checks that nothing was made beside the destination.
    fn refused(layer: &[u8]) -> String {
        let root = TempDir::new();
        let (_, result) = unpack_in(&root, layer);
        let message = result.expect_err("the layer must be refused").to_string();
        assert_eq!(root.names(), ["dest"], "{message}");
        message
    }

    #[test]
    fn unpacks_all_entry_types_with_metadata() {
        let layer = Layer::new()
            .entry(b"./", EntryType::Directory, b"", |_| {})
            .entry(b"d/", EntryType::Directory, b"", |h| {
                h.set_mode(0o750);
                h.set_uid(1000);
                h.set_gid(1000);
                h.set_mtime(1_500_000_000);
            })
            .pax(&[("SCHILY.xattr.user.foo", b"bar")])
            .entry(b"d/f", EntryType::Regular, b"hello", |h| {
                h.set_mode(0o4755);
                h.set_uid(1000);
                h.set_gid(1000);
            })
            .entry(b"d/s", EntryType::Symlink, b"", |h| {
                h.set_link_name("/etc/passwd").unwrap();
                h.set_uid(1000);
                h.set_gid(1001);
            })
            .hard_link("d/h", "./d/f")
            .entry(b"p", EntryType::Fifo, b"", |h| h.set_mode(0o640))
            .entry(b"null", EntryType::Char, b"", |h| {
                h.set_mode(0o666);
                h.set_device_major(1).unwrap();
                h.set_device_minor(3).unwrap();
            })
            .entry(b"loop0", EntryType::Block, b"", |h| {
                h.set_mode(0o660);
                h.set_device_major(7).unwrap();
                h.set_device_minor(0).unwrap();
            })
            .dir(".//e//")
            .file("e/./g", b"in e")
            .finish();
        let root = TempDir::new();
        let (dest, result) = unpack_in(&root, &layer);
        assert_eq!(result.unwrap(), sha256(&layer));
        assert_eq!(names(&dest), ["d", "e", "loop0", "null", "p"]);

        let d = fs::symlink_metadata(dest.join("d")).unwrap();
        assert!(d.is_dir());
        assert_eq!(d.mode() & 0o7777, 0o750);
        assert_eq!((d.uid(), d.gid()), (1000, 1000));
        // Set after the entries inside were made.
        assert_eq!(d.mtime(), 1_500_000_000);

        let f = fs::symlink_metadata(dest.join("d/f")).unwrap();
        assert_eq!(fs::read(dest.join("d/f")).unwrap(), b"hello");
        assert!(f.is_file());
        assert_eq!(f.mode() & 0o7777, 0o4755);
        assert_eq!((f.uid(), f.gid()), (1000, 1000));
        assert_eq!(f.mtime(), MTIME as i64);
        assert_eq!(f.nlink(), 2);
        assert_eq!(xattr(&dest.join("d/f"), "user.foo").unwrap(), b"bar");

        let h = fs::symlink_metadata(dest.join("d/h")).unwrap();
        assert_eq!(h.ino(), f.ino());

        let s = fs::symlink_metadata(dest.join("d/s")).unwrap();
        assert!(s.file_type().is_symlink());
        assert_eq!(
            fs::read_link(dest.join("d/s")).unwrap(),
            Path::new("/etc/passwd")
        );
        assert_eq!((s.uid(), s.gid()), (1000, 1001));
        assert_eq!(s.mtime(), MTIME as i64);

        let p = fs::symlink_metadata(dest.join("p")).unwrap();
        assert!(p.file_type().is_fifo());
        assert_eq!(p.mode() & 0o7777, 0o640);

        let null = fs::symlink_metadata(dest.join("null")).unwrap();
        assert!(null.file_type().is_char_device());
        assert_eq!(null.rdev(), rustix::fs::makedev(1, 3));
        assert_eq!(null.mode() & 0o7777, 0o666);

        let loop0 = fs::symlink_metadata(dest.join("loop0")).unwrap();
        assert!(loop0.file_type().is_block_device());
        assert_eq!(loop0.rdev(), rustix::fs::makedev(7, 0));

        assert!(dest.join("e").is_dir());
        assert_eq!(fs::read(dest.join("e/g")).unwrap(), b"in e");
    }

    #[test]
    fn unpacks_long_and_non_utf8_names_and_pax_times() {
        let long = format!("{}/{}", "x".repeat(120), "y".repeat(120));
        let mut builder = tar::Builder::new(Vec::new());
        let mut header = Header::new_gnu();
        header.set_mode(0o644);
        header.set_uid(0);
        header.set_gid(0);
        header.set_mtime(MTIME);
        header.set_size(4);
        builder
            .append_data(&mut header, &long, &b"long"[..])
            .unwrap();
        let layer = Layer(builder)
            .entry(b"caf\xe9", EntryType::Regular, b"latin-1", |_| {})
            .pax(&[("mtime", b"1600000000.25")])
            .file("precise", b"")
            .finish();
        let root = TempDir::new();
        let (dest, result) = unpack_in(&root, &layer);
        assert_eq!(result.unwrap(), sha256(&layer));
        assert_eq!(fs::read(dest.join(&long)).unwrap(), b"long");
        let latin = dest.join(OsStr::from_bytes(b"caf\xe9"));
        assert_eq!(fs::read(latin).unwrap(), b"latin-1");
        let precise = fs::metadata(dest.join("precise")).unwrap();
        assert_eq!(
            (precise.mtime(), precise.mtime_nsec()),
            (MTIME as i64, 250_000_000)
        );
    }

    #[test]
    fn compressed_layers_give_the_same_diff_id_and_tree() {
        let mut layer = Layer::new()
            .dir("d")
            .file("d/f", &[7; 100_000])
            .file("g", b"g")
            .finish();
        // Padding after the end-of-archive blocks, as GNU tar writes it.
        layer.extend_from_slice(&[0; 8192]);
        let (first, second) = layer.split_at(20_000);
        let variants = [
            ("plain", layer.clone()),
            ("gzip", gzip(&layer)),
            ("gzip, two members", [gzip(first), gzip(second)].concat()),
            ("zstd", zstd(&layer)),
            ("zstd, two frames", [zstd(first), zstd(second)].concat()),
        ];
        for (what, stream) in variants {
            let root = TempDir::new();
            let (dest, result) = unpack_in(&root, &stream);
            assert_eq!(result.unwrap(), sha256(&layer), "{what}");
            assert_eq!(fs::read(dest.join("d/f")).unwrap(), [7; 100_000], "{what}");
            assert_eq!(fs::read(dest.join("g")).unwrap(), b"g", "{what}");
        }
    }

    #[test]
    fn converts_whiteouts() {
        let layer = Layer::new()
            .dir("d")
            .file("d/.wh.gone", b"")
            .file("d/.wh..wh..opq", b"")
            .file("d/kept", b"kept")
            .file("d/.wh.kept", b"")
            .file("missing/.wh..wh..opq", b"")
            .file(".wh.top", b"")
            .finish();
        let root = TempDir::new();
        let (dest, result) = unpack_in(&root, &layer);
        result.unwrap();

        assert_eq!(names(&dest.join("d")), ["gone", "kept"]);
        let gone = fs::symlink_metadata(dest.join("d/gone")).unwrap();
        assert!(gone.file_type().is_char_device());
        assert_eq!(gone.rdev(), rustix::fs::makedev(0, 0));
        // A file of the layer itself stays.
        assert_eq!(fs::read(dest.join("d/kept")).unwrap(), b"kept");
        let top = fs::symlink_metadata(dest.join("top")).unwrap();
        assert!(top.file_type().is_char_device());

        let opaque = "trusted.overlay.opaque";
        assert_eq!(xattr(&dest.join("d"), opaque).unwrap(), b"y");
        assert_eq!(xattr(&dest.join("missing"), opaque).unwrap(), b"y");
        assert_eq!(names(&dest.join("missing")), Vec::<String>::new());
        assert_eq!(names(&dest), ["d", "missing", "top"]);
    }

    #[test]
    fn refuses_paths_leaving_the_layer() {
        let outside = TempDir::new();
        let absolute = format!("{}/abs", outside.path().display());
        let cases = [
            (
                "../escape",
                r#"layer entry "../escape": path leaves the layer ("..")"#,
            ),
            ("./../escape", r#"path leaves the layer ("..")"#),
            ("a/../../x", r#"path leaves the layer ("..")"#),
            ("d/.wh...", r#"path leaves the layer ("..")"#),
            (&absolute, "absolute path"),
        ];
        for (path, why) in cases {
            let layer = Layer::new()
                .entry(path.as_bytes(), EntryType::Regular, b"x", |_| {})
                .finish();
            let message = refused(&layer);
            assert!(message.contains(&format!("{path:?}")), "{message}");
            assert!(message.contains(why), "{message}");
        }
        assert_eq!(
            refused(&Layer::new().file("/etc/passwd", b"x").finish()),
            r#"layer entry "/etc/passwd": absolute path"#
        );
        assert_eq!(outside.names(), Vec::<String>::new());
    }

    #[test]
    fn refuses_writing_through_a_symbolic_link() {
        let outside = TempDir::new();
        let target = outside.path().to_str().unwrap();
        for (second, kind) in [
            ("link/file", EntryType::Regular),
            ("link/dir/", EntryType::Directory),
            ("link/sub/file", EntryType::Regular),
            ("link/.wh.x", EntryType::Regular),
            ("link/.wh..wh..opq", EntryType::Regular),
        ] {
            let layer = Layer::new()
                .symlink("link", target)
                .entry(second.as_bytes(), kind, b"x", |_| {})
                .finish();
            let root = TempDir::new();
            let (dest, result) = unpack_in(&root, &layer);
            let message = result.unwrap_err().to_string();
            assert_eq!(
                message,
                format!(r#"layer entry "{second}": parent "link" is a symbolic link"#)
            );
            assert_eq!(names(&dest), ["link"]);
        }

        let layer = Layer::new()
            .symlink("up", "..")
            .file("up/escape", b"x")
            .finish();
        let message = refused(&layer);
        assert!(message.contains(r#""up/escape""#), "{message}");
        assert_eq!(outside.names(), Vec::<String>::new());
    }

    #[test]
    fn refuses_hard_links_leaving_the_layer() {
        let root = TempDir::new();
        let secret = root.path().join("secret");
        fs::write(&secret, b"secret").unwrap();
        let dest = root.path().join("dest");
        let cases = [
            (
                Layer::new().hard_link("x", "../secret"),
                r#"layer entry "x": hard link to "../secret" leaves the layer"#.to_string(),
            ),
            (
                Layer::new().hard_link("x", "../../etc/shadow"),
                r#"layer entry "x": hard link to "../../etc/shadow" leaves the layer"#
                    .to_string(),
            ),
            (
                Layer::new().hard_link("x", secret.to_str().unwrap()),
                format!(r#"layer entry "x": hard link to {secret:?} leaves the layer"#),
            ),
            (
                Layer::new()
                    .symlink("l", root.path().to_str().unwrap())
                    .hard_link("x", "l/secret"),
                r#"layer entry "x": hard link to "l/secret" goes through symbolic link "l""#
                    .to_string(),
            ),
            (
                Layer::new().hard_link("x", "missing"),
                r#"layer entry "x": hard link to "missing": target does not exist in the layer"#
                    .to_string(),
            ),
            (
                Layer::new().hard_link("x", "nodir/missing"),
                r#"layer entry "x": hard link to "nodir/missing": target does not exist in the layer"#
                    .to_string(),
            ),
        ];
        for (layer, expected) in cases {
            fs::create_dir(&dest).unwrap();
            let message = unpack_layer(&layer.finish()[..], &dest, Limits::DEFAULT)
                .unwrap_err()
                .to_string();
            assert_eq!(message, expected);
            assert!(!dest.join("x").exists());
            fs::remove_dir_all(&dest).unwrap();
            assert_eq!(fs::metadata(&secret).unwrap().nlink(), 1);
            assert_eq!(root.names(), ["secret"]);
        }
    }

    #[test]
    fn refuses_unsupported_entry_types() {
        let layer = Layer::new()
            .entry(b"volume", EntryType::new(b'V'), b"", |_| {})
            .finish();
        let message = refused(&layer);
        assert_eq!(
            message,
            r#"layer entry "volume": unsupported entry type 'V'"#
        );
    }

    #[test]
    fn reports_truncated_and_corrupt_streams() {
        let layer = Layer::new()
            .file("a", b"a")
            .file("big", &[1; 4000])
            .finish();
        // Where the last entry's data ends: the end-of-archive blocks follow.
        let end = layer.len() - 1024;
        let message = refused(&layer[..2048]);
        assert_eq!(
            message,
            "layer: cannot read the tar stream: the stream ends inside a file"
        );
        let message = refused(&layer[..end]);
        assert_eq!(
            message,
            "layer: cannot read the tar stream: the stream ends before the end-of-archive marker"
        );
        let message = refused(&[]);
        assert!(message.contains("end-of-archive marker"), "{message}");

        let gz = gzip(&layer);
        let mut bad_method = gz.clone();
        bad_method[2] = 7;
        let mut bad_crc = gz.clone();
        let crc = bad_crc.len() - 8;
        bad_crc[crc] ^= 0xff;
        for stream in [&gz[..gz.len() / 2], &bad_method, &bad_crc] {
            let message = refused(stream);
            assert!(
                message.starts_with("layer: cannot decompress the gzip stream: "),
                "{message}"
            );
        }

        let zst = zstd(&layer);
        let mut bad_checksum = zst.clone();
        let last = bad_checksum.len() - 1;
        bad_checksum[last] ^= 0xff;
        for stream in [&zst[..zst.len() / 2], &bad_checksum] {
            let message = refused(stream);
            assert!(
                message.starts_with("layer: cannot decompress the zstd stream: "),
                "{message}"
            );
        }
    }

    #[test]
    fn later_entries_replace_earlier_ones() {
        let layer = Layer::new()
            .dir("a")
            .file("a/b", b"b")
            .dir("a/c")
            .symlink("a/c/l", "/")
            .file("a", b"now a file")
            .file("f", b"f")
            .symlink("f", "target")
            .file("g", b"g")
            .dir("g")
            .symlink("s", "/tmp")
            .dir("s")
            .file("s/inside", b"inside")
            .file("h", b"h")
            .hard_link("h", "h")
            .dir("keep")
            .entry(b"keep", EntryType::Directory, b"", |h| h.set_mode(0o700))
            .file("keep/x", b"x")
            .finish();
        let root = TempDir::new();
        let (dest, result) = unpack_in(&root, &layer);
        result.unwrap();
        assert_eq!(fs::read(dest.join("a")).unwrap(), b"now a file");
        assert_eq!(fs::read_link(dest.join("f")).unwrap(), Path::new("target"));
        assert!(fs::symlink_metadata(dest.join("g")).unwrap().is_dir());
        assert!(fs::symlink_metadata(dest.join("s")).unwrap().is_dir());
        assert_eq!(fs::read(dest.join("s/inside")).unwrap(), b"inside");
        assert_eq!(fs::read(dest.join("h")).unwrap(), b"h");
        let keep = fs::metadata(dest.join("keep")).unwrap();
        assert_eq!(keep.mode() & 0o7777, 0o700);
        assert_eq!(keep.mtime(), MTIME as i64);
        assert_eq!(names(&dest.join("keep")), ["x"]);
    }

    #[test]
    fn parses_pax_times() {
        let time = |s: &str| parse_pax_time(s.as_bytes()).map(|t| (t.tv_sec, t.tv_nsec));
        assert_eq!(time("12"), Some((12, 0)));
        assert_eq!(time("1.5"), Some((1, 500_000_000)));
        assert_eq!(time("1.1234567891"), Some((1, 123_456_789)));
        assert_eq!(time("-1.5"), Some((-2, 500_000_000)));
        assert_eq!(time("-3"), Some((-3, 0)));
        assert_eq!(time(""), None);
        assert_eq!(time(".5"), None);
        assert_eq!(time("1e3"), None);
    }
}
