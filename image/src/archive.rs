//! Images in files: `husk load` (a `docker save` archive, or an OCI image
//! layout as a tar or a directory), `husk save` (an OCI image layout in a
//! tar that also carries docker's `manifest.json`, so both `docker load`
//! and OCI tools read it), and `husk import` (a root filesystem tarball
//! made into a one-layer image).
//!
//! An archive is untrusted input: only its regular files are read, each
//! is hashed as it is copied out, and a blob is only stored under the
//! digest its content has (an OCI layout's `blobs/sha256/<hex>` whose
//! content hashes otherwise is refused, naming it).

use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::reference::Reference;
use super::store::{Hashing, Image, Store, sha256};
use super::{ImageError, OCI_MANIFEST};

/// One file read out of an archive: where its copy is, and its digest.
struct Member {
    copy: PathBuf,
    digest: String,
}

/// The regular files of an archive, copied into a scratch directory.
struct Members {
    scratch: PathBuf,
    files: HashMap<String, Member>,
    source: String,
}

impl Drop for Members {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.scratch);
    }
}

impl Members {
    fn err(&self, message: impl Into<String>) -> ImageError {
        ImageError::Archive {
            path: self.source.clone(),
            message: message.into(),
        }
    }

    fn read(&self, name: &str) -> Result<Vec<u8>, ImageError> {
        let m = self
            .files
            .get(name)
            .ok_or_else(|| self.err(format!("has no {name}")))?;
        let size = std::fs::metadata(&m.copy).map_or(0, |meta| meta.len());
        if size > super::MANIFEST_LIMIT {
            return Err(self.err(format!(
                "{name} is {size} bytes: more than a manifest or index may be ({} bytes)",
                super::MANIFEST_LIMIT
            )));
        }
        std::fs::read(&m.copy).map_err(|e| self.err(format!("{name}: {e}")))
    }

    /// Stores the member that is blob `digest` in an OCI layout.
    fn store_blob(&self, store: &Store, digest: &str) -> Result<(), ImageError> {
        let name = format!("blobs/{}", digest.replacen(':', "/", 1));
        self.store_file(store, &name, Some(digest)).map(|_| ())
    }

    /// Stores a member as a blob; when `expected` is given its content
    /// must have that digest. Returns the digest.
    fn store_file(
        &self,
        store: &Store,
        name: &str,
        expected: Option<&str>,
    ) -> Result<String, ImageError> {
        let m = self
            .files
            .get(name)
            .ok_or_else(|| self.err(format!("has no {name}")))?;
        if let Some(expected) = expected {
            if m.digest != expected {
                return Err(self.err(format!(
                    "{name}: content has digest {}, not {expected}: refused",
                    m.digest
                )));
            }
        }
        if !store.has_blob(&m.digest) {
            let dest = store.blob_path(&m.digest)?;
            std::fs::rename(&m.copy, &dest)
                .or_else(|_| std::fs::copy(&m.copy, &dest).map(|_| ()))
                .map_err(|e| self.err(format!("{name}: cannot store: {e}")))?;
        }
        Ok(m.digest.clone())
    }
}

/// A member name as husk accepts it: relative, no `..`.
fn member_name(raw: &Path) -> Option<String> {
    let s = raw.to_str()?.trim_start_matches("./");
    let ok = !s.is_empty() && !s.starts_with('/') && !s.split('/').any(|c| c == "..");
    ok.then(|| s.trim_end_matches('/').to_owned())
}

fn scratch_dir(store: &Store) -> Result<PathBuf, ImageError> {
    static SEQ: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let seq = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = store
        .dir()
        .join("ingest")
        .join(format!("load-{}-{seq}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| ImageError::Archive {
        path: dir.display().to_string(),
        message: e.to_string(),
    })?;
    Ok(dir)
}

fn read_tar(store: &Store, reader: impl Read, source: &str) -> Result<Members, ImageError> {
    let mut members = Members {
        scratch: scratch_dir(store)?,
        files: HashMap::new(),
        source: source.to_owned(),
    };
    let mut archive = tar::Archive::new(reader);
    let entries = archive
        .entries()
        .map_err(|e| members.err(format!("not a tar archive: {e}")))?;
    for (n, entry) in entries.enumerate() {
        let mut entry = entry.map_err(|e| members.err(format!("cannot read the archive: {e}")))?;
        if entry.header().entry_type() != tar::EntryType::Regular {
            continue;
        }
        let raw = entry
            .path()
            .map_err(|e| members.err(e.to_string()))?
            .into_owned();
        let name = member_name(&raw).ok_or_else(|| {
            members.err(format!(
                "entry {:?}: not a relative path inside the archive",
                raw
            ))
        })?;
        let copy = members.scratch.join(n.to_string());
        let mut file = std::fs::File::create(&copy).map_err(|e| members.err(e.to_string()))?;
        let mut hashing = Hashing::new(&mut entry);
        std::io::copy(&mut hashing, &mut file)
            .map_err(|e| members.err(format!("{name}: cannot read: {e}")))?;
        let digest = hashing.digest();
        members.files.insert(name, Member { copy, digest });
    }
    Ok(members)
}

fn read_dir(store: &Store, dir: &Path) -> Result<Members, ImageError> {
    let mut members = Members {
        scratch: scratch_dir(store)?,
        files: HashMap::new(),
        source: dir.display().to_string(),
    };
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let here = dir.join(&rel);
        let entries =
            std::fs::read_dir(&here).map_err(|e| members.err(format!("{}: {e}", rel.display())))?;
        for entry in entries {
            let entry = entry.map_err(|e| members.err(e.to_string()))?;
            let rel = rel.join(entry.file_name());
            let kind = entry.file_type().map_err(|e| members.err(e.to_string()))?;
            if kind.is_dir() {
                stack.push(rel);
            } else if kind.is_file() {
                let name = member_name(&rel).unwrap_or_default();
                let copy = members.scratch.join(members.files.len().to_string());
                let mut src = std::fs::File::open(entry.path())
                    .map_err(|e| members.err(format!("{name}: {e}")))?;
                let mut file =
                    std::fs::File::create(&copy).map_err(|e| members.err(e.to_string()))?;
                let mut hashing = Hashing::new(&mut src);
                std::io::copy(&mut hashing, &mut file)
                    .map_err(|e| members.err(format!("{name}: {e}")))?;
                let digest = hashing.digest();
                members.files.insert(name, Member { copy, digest });
            }
        }
    }
    Ok(members)
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct DockerManifest {
    config: String,
    #[serde(default)]
    repo_tags: Vec<String>,
    layers: Vec<String>,
}

/// Loads every image of an archive (a tar file, `-` for stdin, or an OCI
/// layout directory). Returns what it named.
pub fn load(store: &Store, path: &Path) -> Result<Vec<Image>, ImageError> {
    let _adding = store.adding()?;
    let source = path.display().to_string();
    let members = if path == Path::new("-") {
        read_tar(store, std::io::stdin().lock(), "stdin")?
    } else if path.is_dir() {
        read_dir(store, path)?
    } else {
        let file = std::fs::File::open(path).map_err(|e| ImageError::Archive {
            path: source.clone(),
            message: e.to_string(),
        })?;
        read_tar(store, std::io::BufReader::new(file), &source)?
    };
    if members.files.contains_key("index.json") {
        load_oci(store, &members)
    } else if members.files.contains_key("manifest.json") {
        load_docker(store, &members)
    } else {
        Err(members.err(
            "neither an OCI image layout (index.json) nor a docker save archive (manifest.json)",
        ))
    }
}

fn load_oci(store: &Store, members: &Members) -> Result<Vec<Image>, ImageError> {
    let index: serde_json::Value = serde_json::from_slice(&members.read("index.json")?)
        .map_err(|e| members.err(format!("index.json: {e}")))?;
    let mut images = Vec::new();
    for m in index["manifests"].as_array().into_iter().flatten() {
        let annotation = |k: &str| m["annotations"][k].as_str().map(str::to_owned);
        let name = annotation("io.containerd.image.name")
            .or_else(|| annotation("org.opencontainers.image.ref.name").filter(|n| n.contains(['/', ':'])))
            .ok_or_else(|| members.err("a manifest in index.json has no image name (io.containerd.image.name annotation)"))?;
        let reference = Reference::parse(&name)?;
        let mut digest = m["digest"].as_str().unwrap_or_default().to_owned();
        members.store_blob(store, &digest)?;
        let mut bytes = store.read_blob(&digest)?;
        let media_type = m["mediaType"].as_str();
        if super::is_index(media_type, &bytes) {
            digest = super::select_platform(&name, &bytes)?;
            members.store_blob(store, &digest)?;
            bytes = store.read_blob(&digest)?;
        }
        let (config, layers) = super::manifest_blobs(&name, &bytes)?;
        members.store_blob(store, &config)?;
        for layer in &layers {
            members.store_blob(store, &layer.digest)?;
        }
        images.push(super::record(store, &reference, &digest, &bytes)?);
    }
    if images.is_empty() {
        return Err(members.err("index.json lists no images"));
    }
    Ok(images)
}

fn load_docker(store: &Store, members: &Members) -> Result<Vec<Image>, ImageError> {
    let list: Vec<DockerManifest> = serde_json::from_slice(&members.read("manifest.json")?)
        .map_err(|e| members.err(format!("manifest.json: {e}")))?;
    let mut images = Vec::new();
    for entry in list {
        if entry.repo_tags.is_empty() {
            return Err(members.err(format!(
                "image {} has no RepoTags: husk names every image",
                entry.config
            )));
        }
        let config = members.store_file(store, &entry.config, None)?;
        let config_size = std::fs::metadata(store.blob_path(&config)?)
            .map(|m| m.len())
            .unwrap_or(0);
        let mut layers = Vec::new();
        for path in &entry.layers {
            let digest = members.store_file(store, path, None)?;
            let size = std::fs::metadata(store.blob_path(&digest)?)
                .map(|m| m.len())
                .unwrap_or(0);
            layers.push(serde_json::json!({
                "mediaType": layer_media_type(&store.blob_path(&digest)?),
                "digest": digest,
                "size": size,
            }));
        }
        let manifest = serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": config,
                "size": config_size,
            },
            "layers": layers,
        }))
        .expect("a manifest serialises");
        let digest = store.put_blob(None, &manifest)?;
        for tag in &entry.repo_tags {
            images.push(super::record(
                store,
                &Reference::parse(tag)?,
                &digest,
                &manifest,
            )?);
        }
    }
    Ok(images)
}

/// A layer blob's OCI media type, from its first bytes.
fn layer_media_type(blob: &Path) -> &'static str {
    let mut magic = [0u8; 4];
    let _ = std::fs::File::open(blob).and_then(|mut f| f.read_exact(&mut magic));
    match magic {
        [0x1f, 0x8b, ..] => "application/vnd.oci.image.layer.v1.tar+gzip",
        [0x28, 0xb5, 0x2f, 0xfd] => "application/vnd.oci.image.layer.v1.tar+zstd",
        _ => "application/vnd.oci.image.layer.v1.tar",
    }
}

/// Writes images to a tar: an OCI image layout with docker's
/// `manifest.json` beside it.
pub fn save(store: &Store, images: &[Image], out: impl std::io::Write) -> Result<(), ImageError> {
    let err = |message: String| ImageError::Archive {
        path: "the archive".into(),
        message,
    };
    let mut tar = tar::Builder::new(out);
    let add_bytes = |tar: &mut tar::Builder<_>, name: &str, bytes: &[u8]| {
        let mut h = tar::Header::new_gnu();
        h.set_size(bytes.len() as u64);
        h.set_mode(0o644);
        h.set_cksum();
        tar.append_data(&mut h, name, bytes)
            .map_err(|e| err(format!("{name}: {e}")))
    };
    add_bytes(&mut tar, "oci-layout", br#"{"imageLayoutVersion":"1.0.0"}"#)?;
    let mut index = Vec::new();
    let mut docker = Vec::new();
    let mut written = std::collections::HashSet::new();
    for image in images {
        let reference = Reference::parse(&image.name)?;
        let manifest = store.read_blob(&image.manifest)?;
        index.push(serde_json::json!({
            "mediaType": OCI_MANIFEST,
            "digest": image.manifest,
            "size": manifest.len(),
            "annotations": {
                "io.containerd.image.name": image.name,
                "org.opencontainers.image.ref.name": reference.tag.clone().unwrap_or_else(|| "latest".into()),
            },
        }));
        let blob_name = |d: &str| format!("blobs/{}", d.replacen(':', "/", 1));
        docker.push(serde_json::json!({
            "Config": blob_name(&image.config),
            "RepoTags": [format!("{}:{}", reference.short_name(), reference.tag.clone().unwrap_or_else(|| "latest".into()))],
            "Layers": image.layers.iter().map(|l| blob_name(&l.digest)).collect::<Vec<_>>(),
        }));
        let mut digests = vec![image.manifest.clone(), image.config.clone()];
        digests.extend(image.layers.iter().map(|l| l.digest.clone()));
        for d in digests {
            if !written.insert(d.clone()) {
                continue;
            }
            let path = store.blob_path(&d)?;
            let mut file = std::fs::File::open(&path).map_err(|e| err(format!("{d}: {e}")))?;
            tar.append_file(blob_name(&d), &mut file)
                .map_err(|e| err(format!("{d}: {e}")))?;
        }
    }
    let index = serde_json::to_vec(&serde_json::json!({"schemaVersion": 2, "manifests": index}))
        .expect("serialises");
    add_bytes(&mut tar, "index.json", &index)?;
    add_bytes(
        &mut tar,
        "manifest.json",
        &serde_json::to_vec(&docker).expect("serialises"),
    )?;
    tar.into_inner().map_err(|e| err(e.to_string()))?;
    Ok(())
}

/// Makes a one-layer image named `name` from a root filesystem tarball
/// (plain, gzip or zstd), as `docker import` does.
pub fn import(store: &Store, path: &Path, name: &Reference) -> Result<Image, ImageError> {
    let _adding = store.adding()?;
    let source = path.display().to_string();
    let file = std::fs::File::open(path).map_err(|e| ImageError::Archive {
        path: source.clone(),
        message: e.to_string(),
    })?;
    let size = file.metadata().map(|m| m.len()).unwrap_or(0);
    let mut hashing = Hashing::new(std::io::BufReader::new(file));
    let scratch = scratch_dir(store)?;
    let copy = scratch.join("layer");
    let result = (|| {
        let mut out = std::fs::File::create(&copy).map_err(|e| ImageError::Archive {
            path: copy.display().to_string(),
            message: e.to_string(),
        })?;
        std::io::copy(&mut hashing, &mut out).map_err(|e| ImageError::Archive {
            path: source.clone(),
            message: e.to_string(),
        })?;
        let digest = hashing.digest();
        store.put_blob_from(
            &digest,
            std::fs::File::open(&copy).map_err(|e| ImageError::Archive {
                path: copy.display().to_string(),
                message: e.to_string(),
            })?,
        )?;
        let (diff_id, _) = store.unpack_new(&digest)?;
        let config = serde_json::to_vec(&serde_json::json!({
            "architecture": "amd64",
            "os": "linux",
            "created": crate::now_rfc3339(),
            "config": {"Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"]},
            "rootfs": {"type": "layers", "diff_ids": [diff_id]},
        }))
        .expect("serialises");
        let config_digest = store.put_blob(None, &config)?;
        let manifest = serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest, "size": config.len()},
            "layers": [{"mediaType": layer_media_type(&store.blob_path(&digest)?), "digest": digest, "size": size}],
        }))
        .expect("serialises");
        let manifest_digest = sha256(&manifest);
        store.put_blob(Some(&manifest_digest), &manifest)?;
        super::record(store, name, &manifest_digest, &manifest)
    })();
    let _ = std::fs::remove_dir_all(&scratch);
    result
}
