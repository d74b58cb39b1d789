//! The sources of COPY and ADD: found in the build context (or a stage's
//! root) by docker's rules, never outside it, and copied into the image's
//! root without following any link on the host.
//!
//! - A source is a path or a glob relative to the context; `..` that
//!   climbs out of it is refused, and so is a source that is a symbolic
//!   link leading out of it. Paths `.dockerignore` excludes are not seen.
//! - Everything is opened relative to directory descriptors: in the
//!   context with `RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS`, so a link swapped
//!   in meanwhile fails the open; in the image, the destination is
//!   resolved as in a chroot (`RESOLVE_IN_ROOT`) and entries are made with
//!   `*at` calls that do not follow links.
//! - A directory source copies its contents; a file goes to the
//!   destination, or into it when the destination ends in `/` or there
//!   are several sources. Symbolic links inside are copied as links.
//!   Owners are 0:0 unless `--chown`; modes are kept unless `--chmod`;
//!   modification times are kept.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::io::Read;
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use rustix::fs::{AtFlags, FileType, Mode, OFlags, ResolveFlags, Timespec, Timestamps};
use sha2::{Digest, Sha256};

use crate::ignore::Ignore;

fn open_beneath(root: &OwnedFd, rel: &str, flags: OFlags) -> Result<OwnedFd, String> {
    rustix::fs::openat2(
        root,
        if rel.is_empty() { "." } else { rel },
        flags | OFlags::CLOEXEC | OFlags::NOFOLLOW,
        Mode::empty(),
        ResolveFlags::BENEATH | ResolveFlags::NO_SYMLINKS | ResolveFlags::NO_MAGICLINKS,
    )
    .map_err(|e| format!("{}: {e}", if rel.is_empty() { "." } else { rel }))
}

fn open_root(root: &Path) -> Result<OwnedFd, String> {
    rustix::fs::open(
        root,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| format!("open the context {}: {e}", root.display()))
}

fn names(dir: &OwnedFd) -> Result<Vec<String>, String> {
    let mut out = Vec::new();
    for e in rustix::fs::Dir::read_from(dir).map_err(|e| e.to_string())? {
        let e = e.map_err(|e| e.to_string())?;
        let n = e.file_name().to_bytes();
        if n != b"." && n != b".." {
            out.push(String::from_utf8_lossy(n).into_owned());
        }
    }
    out.sort();
    Ok(out)
}

/// The paths (relative to `root`) that `pattern` names: a path, or a
/// glob per element; none is an error naming the pattern.
pub fn select(root: &Path, pattern: &str, ignore: Option<&Ignore>) -> Result<Vec<String>, String> {
    let mut parts: Vec<&str> = Vec::new();
    for p in pattern.split('/') {
        match p {
            "" | "." => {}
            ".." => {
                if parts.pop().is_none() {
                    return Err(format!("{pattern}: leaves the build context"));
                }
            }
            p => parts.push(p),
        }
    }
    let root_fd = open_root(root)?;
    let mut found = vec![String::new()];
    for part in &parts {
        let glob = part.contains(['*', '?', '[']);
        let mut next = Vec::new();
        for base in &found {
            let join = |n: &str| {
                if base.is_empty() {
                    n.to_string()
                } else {
                    format!("{base}/{n}")
                }
            };
            if glob {
                let Ok(dir) = open_beneath(&root_fd, base, OFlags::RDONLY | OFlags::DIRECTORY)
                else {
                    continue;
                };
                for n in names(&dir)? {
                    if crate::ignore::element_matches(part, &n) {
                        next.push(join(&n));
                    }
                }
            } else {
                next.push(join(part));
            }
        }
        found = next;
    }
    let mut out = Vec::new();
    for rel in found {
        if ignore.is_some_and(|i| !rel.is_empty() && i.excludes(&rel)) {
            continue;
        }
        // It exists, and is not a link leading out of the context.
        let parent = match rel.rsplit_once('/') {
            Some((p, _)) => p,
            None => "",
        };
        let dir = match open_beneath(&root_fd, parent, OFlags::RDONLY | OFlags::DIRECTORY) {
            Ok(d) => d,
            Err(e) if e.contains("No such file") => continue,
            Err(e) => {
                return Err(format!(
                    "{pattern}: {e} (a source must not lead out of the build context)"
                ));
            }
        };
        let base = rel.rsplit('/').next().unwrap_or(".");
        let st = match rustix::fs::statat(
            &dir,
            if rel.is_empty() { "." } else { base },
            AtFlags::SYMLINK_NOFOLLOW,
        ) {
            Ok(st) => st,
            Err(_) => continue,
        };
        if FileType::from_raw_mode(st.st_mode) == FileType::Symlink {
            let target =
                rustix::fs::readlinkat(&dir, base, Vec::new()).map_err(|e| e.to_string())?;
            let t = target.to_string_lossy();
            let mut depth = parent.split('/').filter(|p| !p.is_empty()).count() as i64;
            let mut escapes = t.starts_with('/');
            for c in t.split('/') {
                match c {
                    "" | "." => {}
                    ".." => depth -= 1,
                    _ => depth += 1,
                }
                escapes |= depth < 0;
            }
            if escapes {
                return Err(format!(
                    "{pattern}: {rel} is a symbolic link to {t}, which leads out of the build context"
                ));
            }
        }
        out.push(rel);
    }
    if out.is_empty() {
        return Err(format!(
            "{pattern}: no such file or directory in the build context"
        ));
    }
    Ok(out)
}

/// What kind of archive ADD finds at `rel` (in the context `root`):
/// read through a descriptor opened beneath it without following links,
/// so only a regular file is looked into (a FIFO or device swapped in
/// does not block or feed the build).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Archive {
    /// Not an archive: copied as it is.
    No,
    /// A tar stream, plain, gzip or zstd: unpacked.
    Tar,
    /// bzip2 or xz, which docker unpacks and husk does not (yet): refused.
    Unsupported(&'static str),
}

/// Whether the source `rel` under `root` is an archive ADD unpacks.
pub fn archive_kind(root: &Path, rel: &str) -> Archive {
    let Ok(root) = open_root(root) else {
        return Archive::No;
    };
    let Ok(fd) = open_beneath(&root, rel, OFlags::RDONLY | OFlags::NONBLOCK) else {
        return Archive::No;
    };
    match rustix::fs::fstat(&fd) {
        Ok(st) if FileType::from_raw_mode(st.st_mode) == FileType::RegularFile => {}
        _ => return Archive::No,
    }
    let mut head = [0u8; 262];
    let mut file = std::fs::File::from(fd);
    let mut n = 0;
    while n < head.len() {
        match file.read(&mut head[n..]) {
            Ok(0) | Err(_) => break,
            Ok(k) => n += k,
        }
    }
    let head = &head[..n];
    if head.starts_with(&[0x1f, 0x8b])
        || head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd])
        || (n >= 262 && &head[257..262] == b"ustar")
    {
        Archive::Tar
    } else if head.starts_with(b"BZh") {
        Archive::Unsupported("bzip2")
    } else if head.starts_with(&[0xfd, b'7', b'z', b'X', b'Z', 0]) {
        Archive::Unsupported("xz")
    } else {
        Archive::No
    }
}

/// Unpacks the archive `rel` (in the context `root`) into `into`, an
/// empty directory on the host, with husk-image's layer unpacker (every
/// entry made relative to directory descriptors, nothing followed, paths
/// leaving the archive refused, the unpacker's size limits). Its devices
/// and whiteouts (which the unpacker makes as overlayfs's 0:0 devices)
/// are then refused by the copy, by name.
pub fn unpack_archive(root: &Path, rel: &str, into: &Path) -> Result<(), String> {
    let root = open_root(root)?;
    let fd = open_beneath(&root, rel, OFlags::RDONLY | OFlags::NONBLOCK)?;
    let file = std::fs::File::from(fd);
    husk_image::unpack::unpack_layer(
        std::io::BufReader::new(file),
        into,
        husk_image::unpack::Limits::current(),
    )
    .map_err(|e| format!("{rel}: cannot unpack: {e}"))?;
    Ok(())
}

/// The digest of what `sources` hold (names, types, modes, contents and
/// link targets, walked in order): the cache key's part for COPY.
pub fn digest(root: &Path, sources: &[String], ignore: Option<&Ignore>) -> Result<String, String> {
    let root_fd = open_root(root)?;
    let mut h = Sha256::new();
    fn walk(
        root: &OwnedFd,
        rel: &str,
        h: &mut Sha256,
        ignore: Option<&Ignore>,
    ) -> Result<(), String> {
        let parent = rel.rsplit_once('/').map_or("", |(p, _)| p);
        let base = rel.rsplit('/').next().unwrap_or(".");
        let dir = open_beneath(root, parent, OFlags::RDONLY | OFlags::DIRECTORY)?;
        let st = rustix::fs::statat(
            &dir,
            if rel.is_empty() { "." } else { base },
            AtFlags::SYMLINK_NOFOLLOW,
        )
        .map_err(|e| format!("{rel}: {e}"))?;
        h.update(format!("{rel}\0{:o}\0", st.st_mode).as_bytes());
        match FileType::from_raw_mode(st.st_mode) {
            FileType::Directory => {
                let d = open_beneath(root, rel, OFlags::RDONLY | OFlags::DIRECTORY)?;
                for n in names(&d)? {
                    let child = if rel.is_empty() {
                        n.clone()
                    } else {
                        format!("{rel}/{n}")
                    };
                    if skipped(ignore, &child, || is_dir_at(&d, &n)) {
                        continue;
                    }
                    walk(root, &child, h, ignore)?;
                }
            }
            FileType::Symlink => {
                let t =
                    rustix::fs::readlinkat(&dir, base, Vec::new()).map_err(|e| e.to_string())?;
                h.update(t.as_bytes());
            }
            FileType::RegularFile => {
                let f = open_beneath(root, rel, OFlags::RDONLY)?;
                let mut f = std::fs::File::from(f);
                let mut buf = vec![0u8; 1 << 16];
                loop {
                    let n = f.read(&mut buf).map_err(|e| format!("{rel}: {e}"))?;
                    if n == 0 {
                        break;
                    }
                    h.update(&buf[..n]);
                }
            }
            _ => {}
        }
        Ok(())
    }
    for s in sources {
        walk(&root_fd, s, &mut h, ignore)?;
    }
    Ok(Sha256::digest(h.finalize())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect())
}

/// How COPY places what it copies.
#[derive(Clone, Copy)]
pub struct How<'a> {
    /// Owner (`--chown`); `None` keeps each source's own (an archive
    /// ADD unpacks). COPY passes 0:0 without `--chown`.
    pub owner: Option<(u32, u32)>,
    /// Mode (`--chmod`), else each source's own.
    pub chmod: Option<u32>,
    /// What `.dockerignore` leaves out (the context only).
    pub ignore: Option<&'a Ignore>,
}

/// Copies `sources` (relative to `root`) to `dest` (absolute, in the
/// image whose root is `rootfs`): into it when `into_dir`.
pub fn copy_into(
    root: &Path,
    sources: &[String],
    rootfs: &Path,
    dest: &str,
    into_dir: bool,
    how: &How<'_>,
) -> Result<(), String> {
    let owner = how.owner;
    let mut walk = Walk {
        how: *how,
        links: HashMap::new(),
    };
    let root_fd = open_root(root)?;
    let dest = dest.trim_end_matches('/');
    for s in sources {
        let parent = s.rsplit_once('/').map_or("", |(p, _)| p);
        let base = s.rsplit('/').next().unwrap_or(".");
        let dir = open_beneath(&root_fd, parent, OFlags::RDONLY | OFlags::DIRECTORY)?;
        let st = rustix::fs::statat(
            &dir,
            if s.is_empty() { "." } else { base },
            AtFlags::SYMLINK_NOFOLLOW,
        )
        .map_err(|e| format!("{s}: {e}"))?;
        let is_dir = FileType::from_raw_mode(st.st_mode) == FileType::Directory;
        // A directory's contents go to the destination; anything else to
        // the destination, or into it.
        let (at_dir, name) = if is_dir {
            (dest.to_string(), None)
        } else if into_dir {
            (dest.to_string(), Some(base.to_string()))
        } else {
            match dest.rsplit_once('/') {
                Some((p, n)) => (p.to_string(), Some(n.to_string())),
                None => (String::new(), Some(dest.to_string())),
            }
        };
        let target = crate::exec::mkdir_in_root(rootfs, at_dir.trim_start_matches('/'), owner)?;
        match name {
            None => {
                let src = open_beneath(&root_fd, s, OFlags::RDONLY | OFlags::DIRECTORY)?;
                copy_dir(&src, s, &target, &mut walk)?;
            }
            Some(n) => copy_entry(&dir, base, s, &target, &n, &mut walk)?,
        }
    }
    Ok(())
}

/// Whether `.dockerignore` leaves `rel` out: a directory an exception
/// may reach into is still walked.
fn skipped(ignore: Option<&Ignore>, rel: &str, is_dir: impl FnOnce() -> bool) -> bool {
    match ignore {
        Some(i) if i.excludes(rel) => !(is_dir() && i.may_include_below(rel)),
        _ => false,
    }
}

fn is_dir_at(dir: &OwnedFd, name: &str) -> bool {
    rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW)
        .is_ok_and(|st| FileType::from_raw_mode(st.st_mode) == FileType::Directory)
}

/// One copy's walk: how it places entries, and the files with more than
/// one link it has copied, by their source's device and inode, with where
/// each went (its directory's descriptor and name), so that a second
/// name is made as a link to the first, as BuildKit's copy keeps hard
/// links.
struct Walk<'a> {
    how: How<'a>,
    links: HashMap<(u64, u64), (OwnedFd, String)>,
}

fn copy_dir(src: &OwnedFd, rel: &str, dest: &OwnedFd, walk: &mut Walk<'_>) -> Result<(), String> {
    let ignore = walk.how.ignore;
    for n in names(src)? {
        let child = if rel.is_empty() {
            n.clone()
        } else {
            format!("{rel}/{n}")
        };
        if skipped(ignore, &child, || is_dir_at(src, &n)) {
            continue;
        }
        copy_entry(src, &n, &child, dest, &n, walk)?;
    }
    Ok(())
}

fn times(st: &rustix::fs::Stat) -> Timestamps {
    let t = Timespec {
        tv_sec: st.st_mtime,
        tv_nsec: st.st_mtime_nsec as _,
    };
    Timestamps {
        last_access: t,
        last_modification: t,
    }
}

fn copy_entry(
    src_dir: &OwnedFd,
    name: &str,
    rel: &str,
    dest_dir: &OwnedFd,
    dest_name: &str,
    walk: &mut Walk<'_>,
) -> Result<(), String> {
    let (chown, chmod) = (walk.how.owner, walk.how.chmod);
    let fail = |what: &str, e: rustix::io::Errno| format!("{what} {dest_name}: {e}");
    let st = rustix::fs::statat(src_dir, name, AtFlags::SYMLINK_NOFOLLOW)
        .map_err(|e| fail("read", e))?;
    let mode = chmod.unwrap_or(st.st_mode & 0o7777);
    let (uid, gid) = chown.unwrap_or((st.st_uid, st.st_gid));
    let owner = (
        Some(rustix::fs::Uid::from_raw_unchecked(uid)),
        Some(rustix::fs::Gid::from_raw_unchecked(gid)),
    );
    match FileType::from_raw_mode(st.st_mode) {
        FileType::Directory => {
            match rustix::fs::mkdirat(dest_dir, dest_name, Mode::from_raw_mode(0o700)) {
                Ok(()) | Err(rustix::io::Errno::EXIST) => {}
                Err(e) => return Err(fail("create", e)),
            }
            let d = rustix::fs::openat(
                dest_dir,
                dest_name,
                OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                Mode::empty(),
            )
            .map_err(|e| fail("open", e))?;
            let s = rustix::fs::openat(
                src_dir,
                name,
                OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                Mode::empty(),
            )
            .map_err(|e| fail("open", e))?;
            copy_dir(&s, rel, &d, walk)?;
            rustix::fs::fchown(&d, owner.0, owner.1).map_err(|e| fail("chown", e))?;
            rustix::fs::fchmod(&d, Mode::from_raw_mode(mode)).map_err(|e| fail("chmod", e))?;
            let _ = rustix::fs::futimens(&d, &times(&st));
        }
        FileType::Symlink => {
            let t =
                rustix::fs::readlinkat(src_dir, name, Vec::new()).map_err(|e| fail("read", e))?;
            let _ = rustix::fs::unlinkat(dest_dir, dest_name, AtFlags::empty());
            rustix::fs::symlinkat(t.as_c_str(), dest_dir, dest_name)
                .map_err(|e| fail("create", e))?;
            rustix::fs::chownat(
                dest_dir,
                dest_name,
                owner.0,
                owner.1,
                AtFlags::SYMLINK_NOFOLLOW,
            )
            .map_err(|e| fail("chown", e))?;
            let _ =
                rustix::fs::utimensat(dest_dir, dest_name, &times(&st), AtFlags::SYMLINK_NOFOLLOW);
        }
        FileType::RegularFile => {
            let s = rustix::fs::openat(
                src_dir,
                name,
                OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                Mode::empty(),
            )
            .map_err(|e| fail("open", e))?;
            // An existing file is replaced, never written through (it may
            // be a link).
            match rustix::fs::unlinkat(dest_dir, dest_name, AtFlags::empty()) {
                Ok(()) | Err(rustix::io::Errno::NOENT) => {}
                Err(e) => return Err(fail("replace", e)),
            }
            // Another name of a file this copy already made: a link to it.
            let key = (st.st_dev, st.st_ino);
            if st.st_nlink > 1
                && let Some((dir, first)) = walk.links.get(&key)
            {
                rustix::fs::linkat(dir, first.as_str(), dest_dir, dest_name, AtFlags::empty())
                    .map_err(|e| fail("link", e))?;
                return Ok(());
            }
            let d = rustix::fs::openat(
                dest_dir,
                dest_name,
                OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                Mode::from_raw_mode(0o600),
            )
            .map_err(|e| fail("create", e))?;
            let mut from = std::fs::File::from(s);
            let mut to = std::fs::File::from(d);
            std::io::copy(&mut from, &mut to).map_err(|e| format!("copy {dest_name}: {e}"))?;
            rustix::fs::fchown(&to, owner.0, owner.1).map_err(|e| fail("chown", e))?;
            rustix::fs::fchmod(&to, Mode::from_raw_mode(mode)).map_err(|e| fail("chmod", e))?;
            let _ = rustix::fs::futimens(&to, &times(&st));
            if st.st_nlink > 1 {
                let dir = dest_dir
                    .try_clone()
                    .map_err(|e| format!("{dest_name}: {e}"))?;
                walk.links.insert(key, (dir, dest_name.to_string()));
            }
        }
        // Devices, FIFOs and sockets in a context are not copied, as
        // docker's builder refuses them.
        _ => {
            return Err(format!(
                "{}: only files, directories and symbolic links can be copied",
                OsStr::from_bytes(name.as_bytes()).to_string_lossy()
            ));
        }
    }
    Ok(())
}
