//! A build step's changes as an OCI layer: the upper directory of the
//! overlay the step ran on, written as a tar stream with OCI whiteouts.
//!
//! - A character device 0:0 in the upper directory (overlayfs's record of
//!   a removal) becomes an empty `.wh.NAME` entry.
//! - A directory marked opaque (`trusted.overlay.opaque` = `y`: it replaced
//!   a lower one) is followed by a `.wh..wh..opq` entry.
//! - Everything else is written as it is: type, mode, owner, contents,
//!   link target, device numbers, file capabilities
//!   (`security.capability`, as a PAX `SCHILY.xattr` record); files hard
//!   linked together within the step as tar hard links.
//! - Entries are sorted by name, each directory before what is in it, so
//!   the same changes give the same tar; modification times later than
//!   `epoch` (`SOURCE_DATE_EPOCH`) are set to it, as BuildKit's
//!   `rewrite-timestamp` does.
//!
//! The upper directory was written by the guest: it is walked through
//! directory descriptors opened without following links, never by path,
//! and an overlay record this layer cannot express (a redirected
//! directory, a metadata-only copy) is refused by name. Its diff ID (the
//! SHA-256 of the tar) is returned.

use std::collections::HashMap;
use std::ffi::{CStr, CString, OsStr};
use std::io::{self, Read, Write};
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use rustix::fs::{AtFlags, FileType, Mode, OFlags};
use sha2::{Digest, Sha256};

/// A layer that could not be written.
#[derive(Debug, thiserror::Error)]
pub enum LayerError {
    /// A file of the upper directory could not be read.
    #[error("read {path} of the step's changes: {source}")]
    Read {
        /// The path in the layer.
        path: String,
        /// Why.
        source: io::Error,
    },
    /// The tar could not be written.
    #[error("write the layer: {0}")]
    Write(#[from] io::Error),
    /// An overlayfs record no OCI layer can hold.
    #[error(
        "{path}: the overlay's {what} cannot be written as a layer (the build mounts without it)"
    )]
    Unsupported {
        /// The path in the layer.
        path: String,
        /// `redirect`, `metacopy`.
        what: &'static str,
    },
}

/// A writer that hashes what passes through it.
struct Hashing<W> {
    inner: W,
    hash: Sha256,
    size: u64,
}

impl<W: Write> Write for Hashing<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hash.update(&buf[..n]);
        self.size += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// The layer's diff ID (`sha256:...`) and its size in bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Written {
    /// `sha256:` and the tar's digest.
    pub diff_id: String,
    /// Bytes of tar.
    pub size: u64,
}

struct Walk<W: Write> {
    tar: tar::Builder<Hashing<W>>,
    epoch: Option<u64>,
    /// (device, inode) of files with more than one link, to their first
    /// path in the layer.
    links: HashMap<(u64, u64), String>,
}

fn xattr(fd: &OwnedFd, name: &CStr) -> Option<Vec<u8>> {
    let mut buf = vec![0u8; 256];
    let n = rustix::fs::fgetxattr(fd, name, &mut buf[..]).ok()?;
    buf.truncate(n);
    Some(buf)
}

/// A PAX extended header's records (`len key=value\n`).
fn pax(records: &[(&str, &[u8])]) -> Vec<u8> {
    let mut out = Vec::new();
    for (key, value) in records {
        // The length counts its own digits: one more when adding them
        // carried it to a longer number (98 + 2 = 100).
        let body = key.len() + value.len() + 3;
        let mut len = body + body.to_string().len();
        if len.to_string().len() > body.to_string().len() {
            len += 1;
        }
        out.extend_from_slice(format!("{len} {key}=").as_bytes());
        out.extend_from_slice(value);
        out.push(b'\n');
    }
    out
}

impl<W: Write> Walk<W> {
    fn header(&self, st: &rustix::fs::Stat, kind: tar::EntryType) -> tar::Header {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.set_mode(st.st_mode & 0o7777);
        h.set_uid(u64::from(st.st_uid));
        h.set_gid(u64::from(st.st_gid));
        let mtime = st.st_mtime.max(0) as u64;
        h.set_mtime(self.epoch.map_or(mtime, |e| mtime.min(e)));
        h.set_size(0);
        h
    }

    fn empty(&mut self, path: &str, mode: u32) -> Result<(), LayerError> {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Regular);
        h.set_mode(mode);
        h.set_size(0);
        h.set_mtime(self.epoch.unwrap_or(0));
        self.tar.append_data(&mut h, path, io::empty())?;
        Ok(())
    }

    /// Writes what is in directory `dir` (its path in the layer `at`,
    /// empty for the root), sorted by name.
    fn dir(&mut self, dir: &OwnedFd, at: &str) -> Result<(), LayerError> {
        let read = |source| LayerError::Read {
            path: if at.is_empty() { "/".into() } else { at.into() },
            source,
        };
        let mut names: Vec<CString> = Vec::new();
        let listing = rustix::fs::Dir::read_from(dir).map_err(|e| read(e.into()))?;
        for entry in listing {
            let entry = entry.map_err(|e| read(e.into()))?;
            let name = entry.file_name();
            if name != c"." && name != c".." {
                names.push(name.to_owned());
            }
        }
        // By the name each is written under (a removal's is `.wh.NAME`).
        let key = |name: &CString| -> Vec<u8> {
            let removal =
                rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW).is_ok_and(|st| {
                    FileType::from_raw_mode(st.st_mode) == FileType::CharacterDevice
                        && st.st_rdev == 0
                });
            match removal {
                true => [b".wh.", name.as_bytes()].concat(),
                false => name.as_bytes().to_vec(),
            }
        };
        names.sort_by_cached_key(key);
        for name in names {
            let path = format!(
                "{at}{}{}",
                if at.is_empty() { "" } else { "/" },
                OsStr::from_bytes(name.as_bytes()).to_string_lossy()
            );
            self.entry(dir, &name, &path)?;
        }
        Ok(())
    }

    fn entry(&mut self, parent: &OwnedFd, name: &CStr, path: &str) -> Result<(), LayerError> {
        let read = |source: io::Error| LayerError::Read {
            path: path.to_string(),
            source,
        };
        let st = rustix::fs::statat(parent, name, AtFlags::SYMLINK_NOFOLLOW)
            .map_err(|e| read(e.into()))?;
        let kind = FileType::from_raw_mode(st.st_mode);
        let (parent_path, base) = match path.rsplit_once('/') {
            Some((p, b)) => (format!("{p}/"), b.to_string()),
            None => (String::new(), path.to_string()),
        };
        match kind {
            FileType::CharacterDevice if st.st_rdev == 0 => {
                // A removal.
                self.empty(&format!("{parent_path}.wh.{base}"), 0o644)
            }
            FileType::Directory => {
                let fd = rustix::fs::openat(
                    parent,
                    name,
                    OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                    Mode::empty(),
                )
                .map_err(|e| read(e.into()))?;
                for (key, what) in [
                    (c"trusted.overlay.redirect", "redirect"),
                    (c"trusted.overlay.metacopy", "metacopy"),
                ] {
                    if xattr(&fd, key).is_some() {
                        return Err(LayerError::Unsupported {
                            path: path.into(),
                            what,
                        });
                    }
                }
                let mut h = self.header(&st, tar::EntryType::Directory);
                self.tar
                    .append_data(&mut h, format!("{path}/"), io::empty())?;
                if xattr(&fd, c"trusted.overlay.opaque").as_deref() == Some(b"y") {
                    self.empty(&format!("{path}/.wh..wh..opq"), 0o644)?;
                }
                self.dir(&fd, path)
            }
            FileType::Symlink => {
                let target =
                    rustix::fs::readlinkat(parent, name, Vec::new()).map_err(|e| read(e.into()))?;
                let mut h = self.header(&st, tar::EntryType::Symlink);
                self.tar.append_link(
                    &mut h,
                    path,
                    Path::new(OsStr::from_bytes(target.as_bytes())),
                )?;
                Ok(())
            }
            FileType::RegularFile => {
                if st.st_nlink > 1 {
                    let key = (st.st_dev, st.st_ino);
                    if let Some(first) = self.links.get(&key).cloned() {
                        let mut h = self.header(&st, tar::EntryType::Link);
                        self.tar.append_link(&mut h, path, PathBuf::from(first))?;
                        return Ok(());
                    }
                    self.links.insert(key, path.to_string());
                }
                let fd = rustix::fs::openat(
                    parent,
                    name,
                    OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                    Mode::empty(),
                )
                .map_err(|e| read(e.into()))?;
                if xattr(&fd, c"trusted.overlay.metacopy").is_some() {
                    return Err(LayerError::Unsupported {
                        path: path.into(),
                        what: "metacopy",
                    });
                }
                if let Some(cap) = xattr(&fd, c"security.capability") {
                    let records = pax(&[("SCHILY.xattr.security.capability", &cap)]);
                    let mut x = tar::Header::new_ustar();
                    x.set_entry_type(tar::EntryType::XHeader);
                    x.set_size(records.len() as u64);
                    x.set_mode(0o644);
                    x.set_path("PaxHeader")?;
                    x.set_cksum();
                    self.tar.append(&x, &records[..])?;
                }
                let mut h = self.header(&st, tar::EntryType::Regular);
                h.set_size(st.st_size as u64);
                let file = std::fs::File::from(fd);
                // Exactly the size stated: a file that changed meanwhile
                // is an error, not a short or long entry.
                let mut data = file.take(st.st_size as u64);
                self.tar.append_data(&mut h, path, &mut data)?;
                Ok(())
            }
            FileType::CharacterDevice | FileType::BlockDevice | FileType::Fifo => {
                let mut h = self.header(
                    &st,
                    match kind {
                        FileType::CharacterDevice => tar::EntryType::Char,
                        FileType::BlockDevice => tar::EntryType::Block,
                        _ => tar::EntryType::Fifo,
                    },
                );
                if kind != FileType::Fifo {
                    h.set_device_major(rustix::fs::major(st.st_rdev))?;
                    h.set_device_minor(rustix::fs::minor(st.st_rdev))?;
                }
                self.tar.append_data(&mut h, path, io::empty())?;
                Ok(())
            }
            // Sockets and the like are not kept, as docker's differ skips
            // them.
            _ => Ok(()),
        }
    }
}

/// Writes the layer of overlay upper directory `upper` to `out` (an
/// uncompressed tar), times clamped to `epoch` (seconds) where given.
pub fn write(upper: &Path, out: impl Write, epoch: Option<u64>) -> Result<Written, LayerError> {
    let root = rustix::fs::open(
        upper,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| LayerError::Read {
        path: "/".into(),
        source: e.into(),
    })?;
    let mut tar = tar::Builder::new(Hashing {
        inner: out,
        hash: Sha256::new(),
        size: 0,
    });
    tar.mode(tar::HeaderMode::Complete);
    let mut walk = Walk {
        tar,
        epoch,
        links: HashMap::new(),
    };
    walk.dir(&root, "")?;
    let hashing = walk.tar.into_inner()?;
    let digest = hashing.hash.finalize();
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    Ok(Written {
        diff_id: format!("sha256:{hex}"),
        size: hashing.size,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{MetadataExt, PermissionsExt};

    /// A tree as a container sees it: each path with its type, mode,
    /// owner, contents or link target.
    fn tree(root: &Path) -> Vec<String> {
        fn walk(root: &Path, dir: &Path, out: &mut Vec<String>) {
            let mut entries: Vec<_> = std::fs::read_dir(dir).unwrap().flatten().collect();
            entries.sort_by_key(|e| e.file_name());
            for e in entries {
                let p = e.path();
                let m = std::fs::symlink_metadata(&p).unwrap();
                let rel = p.strip_prefix(root).unwrap().display().to_string();
                let what = if m.is_dir() {
                    "dir".to_string()
                } else if m.file_type().is_symlink() {
                    format!("-> {}", std::fs::read_link(&p).unwrap().display())
                } else {
                    format!("file {:?}", std::fs::read_to_string(&p).unwrap())
                };
                out.push(format!(
                    "{rel} {what} {:o} {}:{}",
                    m.permissions().mode() & 0o7777,
                    m.uid(),
                    m.gid()
                ));
                if m.is_dir() {
                    walk(root, &p, out);
                }
            }
        }
        let mut out = Vec::new();
        walk(root, root, &mut out);
        out
    }

    fn mount(lower: &str, upper: Option<(&Path, &Path)>, at: &Path) {
        let data = match upper {
            Some((u, w)) => format!(
                "lowerdir={lower},upperdir={},workdir={},redirect_dir=off,metacopy=off",
                u.display(),
                w.display()
            ),
            None => format!("lowerdir={lower}"),
        };
        rustix::mount::mount(
            c"overlay",
            at,
            c"overlay",
            rustix::mount::MountFlags::empty(),
            Some(CString::new(data).unwrap().as_c_str()),
        )
        .unwrap();
    }

    /// The layer of a step's changes, unpacked by husk's own unpacker and
    /// stacked on the same lower layer, shows exactly what the step saw:
    /// new files, a changed mode, a removed file, a replaced directory, a
    /// symlink, a hard link.
    #[test]
    fn a_steps_changes_come_back_from_its_layer() {
        let base = std::env::temp_dir().join(format!("husk-layer-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&base);
        let d = |n: &str| {
            let p = base.join(n);
            std::fs::create_dir_all(&p).unwrap();
            p
        };
        let (lower, upper, work, merged) = (d("lower"), d("upper"), d("work"), d("merged"));
        std::fs::write(lower.join("gone"), "old").unwrap();
        std::fs::write(lower.join("kept"), "same").unwrap();
        std::fs::write(lower.join("chmod"), "mode").unwrap();
        std::fs::create_dir_all(lower.join("dir/sub")).unwrap();
        std::fs::write(lower.join("dir/old"), "hidden").unwrap();
        mount(&lower.display().to_string(), Some((&upper, &work)), &merged);
        // The step.
        std::fs::remove_file(merged.join("gone")).unwrap();
        std::fs::set_permissions(merged.join("chmod"), std::fs::Permissions::from_mode(0o600))
            .unwrap();
        std::fs::remove_dir_all(merged.join("dir")).unwrap();
        std::fs::create_dir(merged.join("dir")).unwrap();
        std::fs::write(merged.join("dir/new"), "fresh").unwrap();
        std::fs::write(merged.join("made"), "made").unwrap();
        std::fs::hard_link(merged.join("made"), merged.join("twin")).unwrap();
        std::os::unix::fs::symlink("/made", merged.join("link")).unwrap();
        std::os::unix::fs::chown(merged.join("made"), Some(1000), Some(100)).unwrap();
        let seen = tree(&merged);
        rustix::mount::unmount(&merged, rustix::mount::UnmountFlags::empty()).unwrap();

        let mut bytes = Vec::new();
        let written = write(&upper, &mut bytes, Some(1_000)).unwrap();
        assert_eq!(written.size, bytes.len() as u64);
        // The tar: sorted, whiteouts in OCI form, times clamped.
        let mut archive = tar::Archive::new(&bytes[..]);
        let mut names = Vec::new();
        for e in archive.entries().unwrap() {
            let e = e.unwrap();
            assert!(e.header().mtime().unwrap() <= 1_000);
            names.push(e.path().unwrap().display().to_string());
        }
        assert_eq!(
            names,
            [
                ".wh.gone",
                "chmod",
                "dir/",
                "dir/.wh..wh..opq",
                "dir/new",
                "link",
                "made",
                "twin"
            ]
        );
        // The same bytes for the same changes.
        let mut again = Vec::new();
        assert_eq!(write(&upper, &mut again, Some(1_000)).unwrap(), written);
        assert_eq!(again, bytes);

        // Unpacked by husk's unpacker and stacked: what the step saw.
        let unpacked = d("unpacked");
        let diff_id = husk_image::unpack::unpack_layer(
            &bytes[..],
            &unpacked,
            husk_image::unpack::Limits::current(),
        )
        .unwrap();
        assert_eq!(diff_id, written.diff_id);
        let view = d("view");
        mount(
            &format!("{}:{}", unpacked.display(), lower.display()),
            None,
            &view,
        );
        let back = tree(&view);
        rustix::mount::unmount(&view, rustix::mount::UnmountFlags::empty()).unwrap();
        assert_eq!(back, seen);
        assert!(
            seen.iter()
                .any(|l| l.starts_with("made file \"made\" 644 1000:100")),
            "{seen:?}"
        );
        assert!(
            !seen
                .iter()
                .any(|l| l.starts_with("gone") || l.starts_with("dir/old"))
        );
        std::fs::remove_dir_all(&base).unwrap();
    }

    #[test]
    fn pax_records_count_their_own_length() {
        let r = pax(&[("k", b"v")]);
        assert_eq!(r, b"6 k=v\n");
        let long = vec![b'x'; 95];
        let r = pax(&[("key", &long)]);
        // "NNN key=" + 95 + "\n": 3 digits + 1 + 4 + 95 + 1 = 104.
        assert!(r.starts_with(b"104 key="), "{:?}", &r[..10]);
        assert_eq!(r.len(), 104);
    }
}
