//! The content-addressed image store under husk's root (`<root>/images`).
//!
//! ```text
//! images/
//!   blobs/sha256/<hex>   manifests, configs, layers: verified when written
//!                        (and layers again when unpacked)
//!   ingest/<hex>         downloads under way, kept for resuming
//!   layers/<hex>/        each layer unpacked once, by diff ID, overlayfs
//!                        whiteouts; shared by every image that has it
//!   images.json          name -> manifest, config, layers
//!   index.lock           held while images.json changes
//!   gc.lock              shared by whatever adds content, exclusive for GC
//! ```
//!
//! Two husk processes may pull at once: blobs and layers are written
//! under unique temporary names and renamed into place (the same digest
//! twice is the same content, so the second rename is dropped), a download
//! is written by one process at a time (a lock on its ingest file), and
//! `images.json` is read, changed and replaced under `index.lock`. Garbage
//! collection takes `gc.lock` exclusively, so it never removes the blobs of
//! a pull that has not recorded its image yet. What a layer is referenced
//! by is counted at collection time, from the images and the containers
//! that use it.

use std::collections::{BTreeMap, HashSet};
use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use rustix::fs::FlockOperation;
use rustix::io::Errno;
use rustix::process::Pid;
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use super::reference::digest_ok;
use super::unpack;

/// What can go wrong in the store; each names the blob, layer or image.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A file operation failed.
    #[error(transparent)]
    Io(#[from] husk_sys::PathError),
    /// A manifest, index or config larger than any is.
    #[error(
        "blob {digest} is {size} bytes: more than a manifest or config may be ({limit} bytes): refused"
    )]
    TooLarge {
        /// The blob.
        digest: String,
        /// Its size.
        size: u64,
        /// The most read.
        limit: u64,
    },
    /// Content does not have the digest it was asked for under.
    #[error("blob {expected}: content has digest {actual}: refused")]
    DigestMismatch {
        /// The digest asked for.
        expected: String,
        /// What the content hashes to.
        actual: String,
    },
    /// A digest is not `sha256:<64 hex>`.
    #[error("{0:?} is not a sha256 digest")]
    BadDigest(String),
    /// A blob is not in the store.
    #[error("blob {0} is not in the image store")]
    MissingBlob(String),
    /// An unpacked layer is not the layer its image's config names.
    #[error(
        "layer {blob}: unpacked content has diff ID {actual}, the image's config says {expected}"
    )]
    DiffIdMismatch {
        /// The layer's blob.
        blob: String,
        /// The config's diff ID.
        expected: String,
        /// What the layer unpacked to.
        actual: String,
    },
    /// A layer could not be unpacked.
    #[error("layer {blob}: {source}")]
    Unpack {
        /// The layer's blob.
        blob: String,
        /// What failed.
        source: unpack::UnpackError,
    },
    /// No image by that name or ID.
    #[error("no such image: {0}")]
    NoImage(String),
    /// `images.json` is not what husk writes.
    #[error("image store: {path} is corrupt: {message}")]
    Corrupt {
        /// The index.
        path: PathBuf,
        /// The parse error.
        message: String,
    },
}

type Result<T> = std::result::Result<T, StoreError>;

fn io(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> StoreError {
    let path = path.to_owned();
    move |source| husk_sys::PathError { what, path, source }.into()
}

/// `sha256:<hex>` of `bytes`.
pub fn sha256(bytes: &[u8]) -> String {
    format!("sha256:{}", hex(&Sha256::digest(bytes)))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn hex_of(digest: &str) -> Result<&str> {
    if !digest_ok(digest) {
        return Err(StoreError::BadDigest(digest.to_owned()));
    }
    Ok(&digest["sha256:".len()..])
}

/// A reader that hashes what passes through it.
pub struct Hashing<R> {
    inner: R,
    hasher: Sha256,
    /// Bytes read so far.
    pub count: u64,
}

impl<R: Read> Hashing<R> {
    /// Wraps `inner`.
    pub fn new(inner: R) -> Self {
        Self {
            inner,
            hasher: Sha256::new(),
            count: 0,
        }
    }

    /// `sha256:<hex>` of everything read.
    pub fn digest(self) -> String {
        format!("sha256:{}", hex(&self.hasher.finalize()))
    }
}

impl<R: Read> Read for Hashing<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        self.count += n as u64;
        Ok(n)
    }
}

/// One layer of an image.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Layer {
    /// The (compressed) blob's digest.
    pub digest: String,
    /// The uncompressed tar's digest (the config's `rootfs.diff_ids`).
    pub diff_id: String,
    /// The blob's size.
    pub size: u64,
    /// The blob's media type, as the manifest gave it.
    pub media_type: String,
}

/// An image the store knows by name.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Image {
    /// Full reference: `docker.io/library/busybox:latest`.
    pub name: String,
    /// The manifest's digest (what a registry knows it by).
    pub manifest: String,
    /// The config's digest: the image ID, as docker has it.
    pub config: String,
    /// Its layers, bottom first.
    pub layers: Vec<Layer>,
    /// When it was stored (RFC 3339).
    pub stored: String,
}

impl Image {
    /// Sum of the layers' blob sizes.
    pub fn size(&self) -> u64 {
        self.layers.iter().map(|l| l.size).sum()
    }

    /// The first 12 hex digits of the image ID.
    pub fn short_id(&self) -> &str {
        let hex = self.config.strip_prefix("sha256:").unwrap_or(&self.config);
        &hex[..hex.len().min(12)]
    }
}

/// An exclusive or shared `flock` held until dropped.
pub struct Lock(#[allow(dead_code)] File);

impl Lock {
    fn take(path: &Path, exclusive: bool) -> Result<Self> {
        let file = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)
            .map_err(io("open", path))?;
        let op = if exclusive {
            FlockOperation::LockExclusive
        } else {
            FlockOperation::LockShared
        };
        rustix::fs::flock(&file, op).map_err(|e| io("lock", path)(std::io::Error::from(e)))?;
        Ok(Self(file))
    }
}

/// What a garbage collection removed.
#[derive(Debug, Default)]
pub struct Collected {
    /// Blobs removed.
    pub blobs: usize,
    /// Unpacked layers removed.
    pub layers: usize,
}

/// The store under one husk root.
pub struct Store {
    dir: PathBuf,
}

impl Store {
    /// Opens (and makes) the store under husk's root.
    pub fn open(root: &Path) -> Result<Self> {
        let dir = root.join("images");
        for sub in ["blobs/sha256", "ingest", "layers"] {
            let path = dir.join(sub);
            std::fs::create_dir_all(&path).map_err(io("create", &path))?;
        }
        let store = Self { dir };
        store.sweep_scratch();
        Ok(store)
    }

    /// Removes the scratch of husk processes that ended without removing
    /// it (killed mid-load, mid-unpack): `ingest/load-PID-N`,
    /// `ingest/busybox-PID.tar` and `.NAME.tmp-PID-N` in `blobs/sha256`
    /// and `layers`, for every PID no longer running. Returns how many.
    pub fn sweep_scratch(&self) -> usize {
        fn pid_of(name: &str) -> Option<Pid> {
            let rest = name
                .strip_prefix("load-")
                .or_else(|| name.strip_prefix("busybox-"))
                .or_else(|| name.split_once(".tmp-").map(|(_, r)| r))?;
            // Never negative ('-' ends the number); 0, which `kill` takes
            // for this process's group, is no scratch's PID: left alone.
            rest.split(['-', '.'])
                .next()?
                .parse()
                .ok()
                .and_then(Pid::from_raw)
        }
        let mut swept = 0;
        for sub in ["ingest", "blobs/sha256", "layers"] {
            let Ok(entries) = std::fs::read_dir(self.dir.join(sub)) else {
                continue;
            };
            for entry in entries.flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                let Some(pid) = pid_of(&name) else { continue };
                let gone = rustix::process::test_kill_process(pid) == Err(Errno::SRCH);
                if !gone {
                    continue;
                }
                let path = entry.path();
                let removed = if path.is_dir() {
                    std::fs::remove_dir_all(&path)
                } else {
                    std::fs::remove_file(&path)
                };
                swept += usize::from(removed.is_ok());
            }
        }
        swept
    }

    /// The store's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Held by whatever adds content, so that GC waits for it.
    pub fn adding(&self) -> Result<Lock> {
        Lock::take(&self.dir.join("gc.lock"), false)
    }

    /// Where a blob lives.
    pub fn blob_path(&self, digest: &str) -> Result<PathBuf> {
        Ok(self.dir.join("blobs/sha256").join(hex_of(digest)?))
    }

    /// Whether the blob is stored.
    pub fn has_blob(&self, digest: &str) -> bool {
        self.blob_path(digest).is_ok_and(|p| p.exists())
    }

    /// A stored blob's bytes, verified against its digest.
    pub fn read_blob(&self, digest: &str) -> Result<Vec<u8>> {
        let path = self.blob_path(digest)?;
        // Only JSON documents are read whole: a blob an image claims as
        // its config may be anything (issue 14: memory bounded).
        if let Ok(meta) = std::fs::metadata(&path)
            && meta.len() > super::MANIFEST_LIMIT
        {
            return Err(StoreError::TooLarge {
                digest: digest.to_owned(),
                size: meta.len(),
                limit: super::MANIFEST_LIMIT,
            });
        }
        let bytes = std::fs::read(&path).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => StoreError::MissingBlob(digest.to_owned()),
            _ => io("read", &path)(e),
        })?;
        let actual = sha256(&bytes);
        if actual != digest {
            return Err(StoreError::DigestMismatch {
                expected: digest.to_owned(),
                actual,
            });
        }
        Ok(bytes)
    }

    /// Stores `bytes`; when `expected` is given they must hash to it.
    /// Returns their digest.
    pub fn put_blob(&self, expected: Option<&str>, bytes: &[u8]) -> Result<String> {
        let digest = sha256(bytes);
        if let Some(expected) = expected {
            if expected != digest {
                return Err(StoreError::DigestMismatch {
                    expected: expected.to_owned(),
                    actual: digest,
                });
            }
        }
        let path = self.blob_path(&digest)?;
        if !path.exists() {
            let tmp = self.temp_path(&path);
            let write = || -> std::io::Result<()> {
                let mut f = File::create(&tmp)?;
                f.write_all(bytes)?;
                f.sync_data()?;
                std::fs::rename(&tmp, &path)
            };
            write().map_err(|e| {
                let _ = std::fs::remove_file(&tmp);
                io("write", &path)(e)
            })?;
        }
        Ok(digest)
    }

    /// Stores a blob from a stream, verifying it as it is copied.
    pub fn put_blob_from(&self, digest: &str, reader: impl Read) -> Result<()> {
        let path = self.blob_path(digest)?;
        let tmp = self.temp_path(&path);
        let result = (|| {
            let mut reader = Hashing::new(reader);
            let mut f = File::create(&tmp).map_err(io("create", &tmp))?;
            std::io::copy(&mut reader, &mut f).map_err(io("write", &tmp))?;
            let actual = reader.digest();
            if actual != digest {
                return Err(StoreError::DigestMismatch {
                    expected: digest.to_owned(),
                    actual,
                });
            }
            f.sync_data().map_err(io("write", &tmp))?;
            std::fs::rename(&tmp, &path).map_err(io("store", &path))
        })();
        if result.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        result
    }

    /// Moves a finished download into the store once it hashes to
    /// `digest`; a download that does not is deleted (it cannot be
    /// resumed into the right content).
    pub fn commit_ingest(&self, digest: &str, partial: &Path) -> Result<()> {
        let file = File::open(partial).map_err(io("open", partial))?;
        let mut reader = Hashing::new(std::io::BufReader::new(file));
        std::io::copy(&mut reader, &mut std::io::sink()).map_err(io("read", partial))?;
        let actual = reader.digest();
        if actual != digest {
            let _ = std::fs::remove_file(partial);
            return Err(StoreError::DigestMismatch {
                expected: digest.to_owned(),
                actual,
            });
        }
        let path = self.blob_path(digest)?;
        std::fs::rename(partial, &path).map_err(io("store", &path))
    }

    /// Where a download of `digest` is written, and a lock that makes this
    /// process its only writer.
    pub fn ingest(&self, digest: &str) -> Result<(PathBuf, Lock)> {
        let hex = hex_of(digest)?;
        let lock = Lock::take(&self.dir.join("ingest").join(format!("{hex}.lock")), true)?;
        Ok((self.dir.join("ingest").join(hex), lock))
    }

    fn temp_path(&self, near: &Path) -> PathBuf {
        static SEQ: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let seq = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let name = near.file_name().unwrap_or_default().to_string_lossy();
        near.with_file_name(format!(".{name}.tmp-{}-{seq}", std::process::id()))
    }

    /// Where a layer is unpacked.
    pub fn layer_path(&self, diff_id: &str) -> Result<PathBuf> {
        Ok(self.dir.join("layers").join(hex_of(diff_id)?))
    }

    /// Unpacks a stored layer blob (once: a layer unpacked before is
    /// reused). The blob is verified against its digest as it is read,
    /// and what it unpacks to against the config's diff ID; a layer that
    /// fails either is removed. A blob whose layer is unpacked already is
    /// still read in full and checked against both: an image must not be
    /// taken in on the strength of another image's layer.
    pub fn unpack(&self, layer: &Layer) -> Result<PathBuf> {
        let dest = self.layer_path(&layer.diff_id)?;
        if dest.exists() {
            self.verify_blob(&layer.digest, &layer.diff_id)?;
            return Ok(dest);
        }
        self.unpack_blob(&layer.digest, Some(&layer.diff_id))
            .map(|(_, path)| path)
    }

    /// Reads the blob `digest` in full: refused unless it hashes to its
    /// digest and decompresses to `diff_id`.
    fn verify_blob(&self, digest: &str, diff_id: &str) -> Result<()> {
        let (blob, mut reader) = self.open_layer_blob(digest)?;
        let actual_diff =
            unpack::diff_id(&mut reader, unpack::Limits::current()).map_err(|source| {
                StoreError::Unpack {
                    blob: digest.to_owned(),
                    source,
                }
            })?;
        Self::read_to_digest(reader, &blob, digest)?;
        if actual_diff != diff_id {
            return Err(StoreError::DiffIdMismatch {
                blob: digest.to_owned(),
                expected: diff_id.to_owned(),
                actual: actual_diff,
            });
        }
        Ok(())
    }

    /// The layer blob `digest`, for reading through its hash.
    fn open_layer_blob(
        &self,
        digest: &str,
    ) -> Result<(PathBuf, Hashing<std::io::BufReader<File>>)> {
        let blob = self.blob_path(digest)?;
        let file = File::open(&blob).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => StoreError::MissingBlob(digest.to_owned()),
            _ => io("open", &blob)(e),
        })?;
        Ok((
            blob,
            Hashing::new(std::io::BufReader::with_capacity(1 << 20, file)),
        ))
    }

    /// Reads the rest of `blob` through its hash: refused unless it is
    /// `digest`.
    fn read_to_digest(
        mut reader: Hashing<std::io::BufReader<File>>,
        blob: &Path,
        digest: &str,
    ) -> Result<()> {
        std::io::copy(&mut reader, &mut std::io::sink()).map_err(io("read", blob))?;
        let actual = reader.digest();
        if actual != digest {
            return Err(StoreError::DigestMismatch {
                expected: digest.to_owned(),
                actual,
            });
        }
        Ok(())
    }

    /// Unpacks a stored layer blob whose diff ID is not known yet (an
    /// imported root filesystem); returns its diff ID and directory.
    pub fn unpack_new(&self, digest: &str) -> Result<(String, PathBuf)> {
        self.unpack_blob(digest, None)
    }

    fn unpack_blob(&self, digest: &str, expected: Option<&str>) -> Result<(String, PathBuf)> {
        let (blob, mut reader) = self.open_layer_blob(digest)?;
        let tmp = self.temp_path(&self.dir.join("layers").join(hex_of(digest)?));
        std::fs::create_dir(&tmp).map_err(io("create", &tmp))?;
        let result = (|| {
            let diff_id = unpack::unpack_layer(&mut reader, &tmp, unpack::Limits::current())
                .map_err(|source| StoreError::Unpack {
                    blob: digest.to_owned(),
                    source,
                })?;
            Self::read_to_digest(reader, &blob, digest)?;
            if let Some(expected) = expected {
                if diff_id != expected {
                    return Err(StoreError::DiffIdMismatch {
                        blob: digest.to_owned(),
                        expected: expected.to_owned(),
                        actual: diff_id,
                    });
                }
            }
            let dest = self.layer_path(&diff_id)?;
            match std::fs::rename(&tmp, &dest) {
                Ok(()) => {}
                // Another process unpacked the same layer meanwhile.
                Err(_) if dest.exists() => {
                    let _ = std::fs::remove_dir_all(&tmp);
                }
                Err(e) => return Err(io("store", &dest)(e)),
            }
            Ok((diff_id, dest))
        })();
        if result.is_err() {
            let _ = std::fs::remove_dir_all(&tmp);
        }
        result
    }

    fn index_path(&self) -> PathBuf {
        self.dir.join("images.json")
    }

    fn read_index(&self) -> Result<BTreeMap<String, Image>> {
        let path = self.index_path();
        match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| StoreError::Corrupt {
                path,
                message: e.to_string(),
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(BTreeMap::new()),
            Err(e) => Err(io("read", &path)(e)),
        }
    }

    fn write_index(&self, index: &BTreeMap<String, Image>) -> Result<()> {
        let path = self.index_path();
        let tmp = self.temp_path(&path);
        let json = serde_json::to_vec_pretty(index).expect("images serialise");
        std::fs::write(&tmp, json)
            .and_then(|()| std::fs::rename(&tmp, &path))
            .map_err(io("write", &path))
    }

    /// Changes `images.json` under its lock.
    fn edit<T>(&self, f: impl FnOnce(&mut BTreeMap<String, Image>) -> Result<T>) -> Result<T> {
        let _lock = Lock::take(&self.dir.join("index.lock"), true)?;
        let mut index = self.read_index()?;
        let out = f(&mut index)?;
        self.write_index(&index)?;
        Ok(out)
    }

    /// Every named image, by name.
    pub fn images(&self) -> Result<Vec<Image>> {
        Ok(self.read_index()?.into_values().collect())
    }

    /// Records an image under its name (replacing what had that name).
    pub fn add_image(&self, image: Image) -> Result<()> {
        self.edit(|index| {
            index.insert(image.name.clone(), image);
            Ok(())
        })
    }

    /// An image by reference (`busybox`, `127.0.0.1:5000/app:v1`), or by
    /// ID or a prefix of at least 4 hex digits of it.
    pub fn find(&self, what: &str) -> Result<Image> {
        let index = self.read_index()?;
        if let Ok(r) = super::reference::Reference::parse(what) {
            if let Some(image) = index.get(&r.to_string()) {
                return Ok(image.clone());
            }
            if let Some(digest) = &r.digest {
                if let Some(image) = index
                    .values()
                    .find(|i| i.name.starts_with(&r.name()) && &i.manifest == digest)
                {
                    return Ok(image.clone());
                }
            }
        }
        let id = what.strip_prefix("sha256:").unwrap_or(what);
        if id.len() >= 4 && id.bytes().all(|b| b.is_ascii_hexdigit()) {
            if let Some(image) = index.values().find(|i| i.config[7..].starts_with(id)) {
                return Ok(image.clone());
            }
        }
        Err(StoreError::NoImage(what.to_owned()))
    }

    /// Removes a name; returns the image it named.
    pub fn remove_name(&self, name: &str) -> Result<Image> {
        self.edit(|index| {
            index
                .remove(name)
                .ok_or_else(|| StoreError::NoImage(name.to_owned()))
        })
    }

    /// Removes every blob and unpacked layer that no image references and
    /// no layer in `in_use` (the containers' layers) needs.
    pub fn collect_garbage(&self, in_use: &HashSet<String>) -> Result<Collected> {
        let _gc = Lock::take(&self.dir.join("gc.lock"), true)?;
        let index = self.read_index()?;
        let mut blobs = HashSet::new();
        let mut layers: HashSet<String> = in_use
            .iter()
            .filter_map(|d| hex_of(d).ok())
            .map(str::to_owned)
            .collect();
        for image in index.values() {
            for d in [&image.manifest, &image.config] {
                blobs.insert(hex_of(d)?.to_owned());
            }
            for l in &image.layers {
                blobs.insert(hex_of(&l.digest)?.to_owned());
                layers.insert(hex_of(&l.diff_id)?.to_owned());
            }
        }
        let mut collected = Collected::default();
        let remove = |dir: &Path, keep: &HashSet<String>, count: &mut usize| -> Result<()> {
            for entry in std::fs::read_dir(dir).map_err(io("read", dir))? {
                let entry = entry.map_err(io("read", dir))?;
                let name = entry.file_name().to_string_lossy().into_owned();
                if keep.contains(&name) {
                    continue;
                }
                let path = entry.path();
                let gone = if path.is_dir() {
                    std::fs::remove_dir_all(&path)
                } else {
                    std::fs::remove_file(&path)
                };
                gone.map_err(io("remove", &path))?;
                *count += 1;
            }
            Ok(())
        };
        remove(&self.dir.join("blobs/sha256"), &blobs, &mut collected.blobs)?;
        remove(&self.dir.join("layers"), &layers, &mut collected.layers)?;
        // Partial downloads (kept for resuming) that no pull is writing.
        let ingest = self.dir.join("ingest");
        for entry in std::fs::read_dir(&ingest)
            .map_err(io("read", &ingest))?
            .flatten()
        {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.ends_with(".lock") || hex_of(&format!("sha256:{name}")).is_err() {
                continue;
            }
            let lock = ingest.join(format!("{name}.lock"));
            let free = File::open(&lock).map_or(true, |f| {
                rustix::fs::flock(&f, FlockOperation::NonBlockingLockExclusive).is_ok()
            });
            if free {
                let _ = std::fs::remove_file(entry.path());
                let _ = std::fs::remove_file(&lock);
                collected.blobs += 1;
            }
        }
        collected.blobs += self.sweep_scratch();
        Ok(collected)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_root(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("husk-store-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }

    #[test]
    fn blobs_are_verified_when_written_and_read() {
        let root = temp_root("blobs");
        let store = Store::open(&root).unwrap();
        let d = store.put_blob(None, b"hello").unwrap();
        assert_eq!(store.read_blob(&d).unwrap(), b"hello");
        // Issue 14: a "config" of any size is not read whole.
        let big = vec![b' '; (super::super::MANIFEST_LIMIT + 1) as usize];
        let b = store.put_blob(None, &big).unwrap();
        let e = store.read_blob(&b).unwrap_err().to_string();
        assert!(
            e.contains("4194305 bytes: more than a manifest or config may be"),
            "{e}"
        );
        let wrong = sha256(b"other");
        let e = store
            .put_blob(Some(&wrong), b"hello")
            .unwrap_err()
            .to_string();
        assert!(e.contains(&wrong) && e.contains(&d), "{e}");
        assert!(!store.has_blob(&wrong));
        // A blob changed on disk is refused when read.
        std::fs::write(store.blob_path(&d).unwrap(), b"jello").unwrap();
        let e = store.read_blob(&d).unwrap_err().to_string();
        assert!(e.contains(&d) && e.contains("refused"), "{e}");
        let e = store.read_blob("sha256:12").unwrap_err().to_string();
        assert!(e.contains("not a sha256 digest"), "{e}");
        std::fs::remove_dir_all(&root).unwrap();
    }

    fn layer_tar(name: &str) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_gnu();
        h.set_size(3);
        h.set_mode(0o644);
        h.set_cksum();
        b.append_data(&mut h, name, &b"abc"[..]).unwrap();
        b.into_inner().unwrap()
    }

    #[test]
    fn layers_unpack_once_and_are_checked() {
        let root = temp_root("layers");
        let store = Store::open(&root).unwrap();
        let tar = layer_tar("f");
        let digest = store.put_blob(None, &tar).unwrap();
        let layer = Layer {
            digest: digest.clone(),
            diff_id: digest.clone(),
            size: tar.len() as u64,
            media_type: "application/vnd.oci.image.layer.v1.tar".into(),
        };
        let dir = store.unpack(&layer).unwrap();
        assert_eq!(std::fs::read(dir.join("f")).unwrap(), b"abc");
        // A diff ID that does not match is refused and nothing is kept.
        let other = Layer {
            diff_id: sha256(b"x"),
            ..layer.clone()
        };
        let e = store.unpack(&other).unwrap_err().to_string();
        assert!(e.contains("diff ID") && e.contains(&digest), "{e}");
        assert!(!store.layer_path(&other.diff_id).unwrap().exists());
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn names_ids_and_garbage_collection() {
        let root = temp_root("gc");
        let store = Store::open(&root).unwrap();
        let tar = layer_tar("f");
        let digest = store.put_blob(None, &tar).unwrap();
        let config = store.put_blob(None, b"{}").unwrap();
        let manifest = store.put_blob(None, b"{\"m\":1}").unwrap();
        let orphan = store.put_blob(None, b"orphan").unwrap();
        let layer = Layer {
            digest: digest.clone(),
            diff_id: digest.clone(),
            size: tar.len() as u64,
            media_type: String::new(),
        };
        store.unpack(&layer).unwrap();
        let image = Image {
            name: "docker.io/library/a:latest".into(),
            manifest: manifest.clone(),
            config: config.clone(),
            layers: vec![layer.clone()],
            stored: String::new(),
        };
        store.add_image(image.clone()).unwrap();
        assert_eq!(store.find("a").unwrap(), image);
        assert_eq!(store.find(&config[7..19]).unwrap(), image);
        assert!(
            store
                .find("b")
                .unwrap_err()
                .to_string()
                .contains("no such image: b")
        );
        let c = store.collect_garbage(&HashSet::new()).unwrap();
        assert_eq!((c.blobs, c.layers), (1, 0));
        assert!(!store.has_blob(&orphan) && store.has_blob(&digest));
        store.remove_name(&image.name).unwrap();
        // A container still using the layer keeps it.
        let in_use = HashSet::from([digest.clone()]);
        let c = store.collect_garbage(&in_use).unwrap();
        assert_eq!((c.blobs, c.layers), (3, 0));
        assert!(store.layer_path(&digest).unwrap().exists());
        let c = store.collect_garbage(&HashSet::new()).unwrap();
        assert_eq!(c.layers, 1);
        std::fs::remove_dir_all(&root).unwrap();
    }
}
