//! A client of OCI distribution registries: pull and push.
//!
//! HTTPS, or plain HTTP for registries on this host (`localhost`,
//! `127.0.0.0/8`, `::1`) and those named in `HUSK_INSECURE_REGISTRIES`
//! (comma-separated `host[:port]`), as docker treats them. Anonymous
//! access, basic auth, and bearer tokens: a `401` names the scheme in
//! `WWW-Authenticate`; for `Bearer` a token is asked of its realm (with the
//! credentials, when there are any) and the request sent again.
//! Credentials come from `HUSK_REGISTRY_AUTH` (`user:password`).
//!
//! Layers are downloaded in parallel (up to [`PARALLEL`] at once) into the
//! store's ingest directory; a download that is cut off is resumed with a
//! `Range` request, in the same pull (up to [`ATTEMPTS`] times) or a later
//! one, and verified against its digest before it enters the store.

use std::io::{Read, Write};
use std::path::Path;
use std::sync::Mutex;
use std::time::Duration;

use base64::Engine as _;

use super::reference::Reference;
use super::store::{Image, Store};
use super::{DOCKER_LIST, DOCKER_MANIFEST, ImageError, OCI_INDEX, OCI_MANIFEST};

/// Layers downloaded at once.
pub const PARALLEL: usize = 4;
/// Tries per blob (the first and the resumptions).
pub const ATTEMPTS: usize = 4;

/// What a registry did wrong, or could not be asked.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// Nothing answered.
    #[error("cannot reach registry {registry}: {message}")]
    Unreachable {
        /// host[:port].
        registry: String,
        /// Why.
        message: String,
    },
    /// The registry answered with an error status.
    #[error("registry {registry}: {what}: HTTP {status}{detail}")]
    Status {
        /// host[:port].
        registry: String,
        /// What was asked.
        what: String,
        /// The status code.
        status: u16,
        /// The registry's error message, if it gave one.
        detail: String,
    },
    /// Authentication failed or is needed.
    #[error("registry {registry}: {message}")]
    Auth {
        /// host[:port].
        registry: String,
        /// Why.
        message: String,
    },
    /// A blob download failed every attempt.
    #[error(
        "registry {registry}: download of {digest} failed after {attempts} attempts: {message}"
    )]
    Download {
        /// host[:port].
        registry: String,
        /// The blob.
        digest: String,
        /// How many tries.
        attempts: usize,
        /// The last failure.
        message: String,
    },
}

/// Whether husk talks plain HTTP to `registry`.
pub fn insecure(registry: &str) -> bool {
    let host = match registry.rsplit_once(':') {
        Some((h, port)) if port.bytes().all(|b| b.is_ascii_digit()) => h,
        _ => registry,
    };
    let listed = std::env::var("HUSK_INSECURE_REGISTRIES").unwrap_or_default();
    host == "localhost"
        || host
            .parse::<std::net::Ipv4Addr>()
            .is_ok_and(|a| a.is_loopback())
        || host == "[::1]"
        || listed
            .split(',')
            .any(|r| r.trim() == registry || r.trim() == host)
}

/// What a request carries.
#[derive(Clone, Copy)]
enum Body<'a> {
    None,
    Bytes(&'a [u8]),
    File(&'a Path),
}

/// A client of one registry.
pub struct Client {
    agent: ureq::Agent,
    registry: String,
    base: String,
    credentials: Option<(String, String)>,
    auth: Mutex<Option<String>>,
    /// Progress lines go here (stderr for the CLI).
    progress: Mutex<Box<dyn Write + Send>>,
}

impl Client {
    /// A client of `registry` (a host[:port] as in a reference).
    pub fn new(registry: &str) -> Self {
        let host = if registry == super::reference::DEFAULT_REGISTRY {
            "registry-1.docker.io"
        } else {
            registry
        };
        let scheme = if insecure(registry) { "http" } else { "https" };
        let credentials = std::env::var("HUSK_REGISTRY_AUTH")
            .ok()
            .and_then(|a| a.split_once(':').map(|(u, p)| (u.to_owned(), p.to_owned())));
        Self {
            agent: ureq::AgentBuilder::new()
                .timeout_connect(Duration::from_secs(10))
                .timeout_read(Duration::from_secs(60))
                .build(),
            registry: registry.to_owned(),
            base: format!("{scheme}://{host}"),
            credentials,
            auth: Mutex::new(None),
            progress: Mutex::new(Box::new(std::io::stderr())),
        }
    }

    /// Sends progress lines to `w` instead of stderr.
    pub fn progress_to(&mut self, w: Box<dyn Write + Send>) {
        self.progress = Mutex::new(w);
    }

    fn say(&self, line: &str) {
        let mut w = self.progress.lock().unwrap();
        let _ = writeln!(w, "{line}");
    }

    fn status(&self, what: &str, status: u16, resp: ureq::Response) -> RegistryError {
        let body = resp.into_string().unwrap_or_default();
        let detail = serde_json::from_str::<serde_json::Value>(&body)
            .ok()
            .and_then(|v| {
                v["errors"][0]["message"]
                    .as_str()
                    .map(|m| format!(" ({m})"))
            })
            .unwrap_or_default();
        RegistryError::Status {
            registry: self.registry.clone(),
            what: what.to_owned(),
            status,
            detail,
        }
    }

    /// Sends a request, authenticating once when the registry asks to.
    fn send(
        &self,
        what: &str,
        build: impl Fn() -> ureq::Request,
        body: Body,
    ) -> Result<ureq::Response, RegistryError> {
        for attempt in 0..2 {
            let mut req = build();
            if let Some(auth) = self.auth.lock().unwrap().as_deref() {
                req = req.set("Authorization", auth);
            }
            let result = match body {
                Body::None => req.call(),
                Body::Bytes(bytes) => req.send_bytes(bytes),
                Body::File(path) => match std::fs::File::open(path) {
                    Ok(f) => req.send(f),
                    Err(e) => Err(ureq::Error::from(std::io::Error::other(format!(
                        "{}: {e}",
                        path.display()
                    )))),
                },
            };
            match result {
                Ok(resp) => return Ok(resp),
                Err(ureq::Error::Status(401, resp)) if attempt == 0 => {
                    let challenge = resp.header("WWW-Authenticate").unwrap_or("").to_owned();
                    self.authenticate(&challenge)?;
                }
                Err(ureq::Error::Status(401, _)) => break,
                Err(ureq::Error::Status(code, resp)) => return Err(self.status(what, code, resp)),
                Err(ureq::Error::Transport(t)) => {
                    return Err(RegistryError::Unreachable {
                        registry: self.registry.clone(),
                        message: t.to_string(),
                    });
                }
            }
        }
        Err(RegistryError::Auth {
            registry: self.registry.clone(),
            message: format!("{what}: refused after authenticating (HTTP 401)"),
        })
    }

    fn basic(&self) -> Option<String> {
        self.credentials.as_ref().map(|(u, p)| {
            format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode(format!("{u}:{p}"))
            )
        })
    }

    /// Answers a `WWW-Authenticate` challenge: basic credentials, or a
    /// bearer token from the challenge's realm.
    fn authenticate(&self, challenge: &str) -> Result<(), RegistryError> {
        let auth_err = |message: String| RegistryError::Auth {
            registry: self.registry.clone(),
            message,
        };
        let (scheme, params) = challenge.split_once(' ').unwrap_or((challenge, ""));
        let param = |name: &str| {
            params.split(',').find_map(|kv| {
                let (k, v) = kv.trim().split_once('=')?;
                (k == name).then(|| v.trim_matches('"').to_owned())
            })
        };
        match scheme.to_ascii_lowercase().as_str() {
            "basic" => {
                let basic = self.basic().ok_or_else(|| {
                    auth_err(
                        "asks for a user name and password (set HUSK_REGISTRY_AUTH=user:password)"
                            .into(),
                    )
                })?;
                *self.auth.lock().unwrap() = Some(basic);
                Ok(())
            }
            "bearer" => {
                let realm = param("realm").ok_or_else(|| {
                    auth_err(format!("bearer challenge without a realm: {challenge}"))
                })?;
                let mut req = self.agent.get(&realm);
                for name in ["service", "scope"] {
                    if let Some(v) = param(name) {
                        req = req.query(name, &v);
                    }
                }
                if let Some(basic) = self.basic() {
                    req = req.set("Authorization", &basic);
                }
                let resp = req
                    .call()
                    .map_err(|e| auth_err(format!("token from {realm}: {e}")))?;
                let body: serde_json::Value =
                    serde_json::from_reader(resp.into_reader().take(1 << 20))
                        .map_err(|e| auth_err(format!("token from {realm}: {e}")))?;
                let token = body["token"]
                    .as_str()
                    .or(body["access_token"].as_str())
                    .ok_or_else(|| {
                        auth_err(format!("token from {realm}: no token in the answer"))
                    })?;
                *self.auth.lock().unwrap() = Some(format!("Bearer {token}"));
                Ok(())
            }
            _ => Err(auth_err(format!(
                "asks for authentication husk does not speak: {challenge:?}"
            ))),
        }
    }

    fn url(&self, repository: &str, tail: &str) -> String {
        format!("{}/v2/{repository}/{tail}", self.base)
    }

    /// A manifest or index: its bytes and media type.
    fn manifest(
        &self,
        r: &Reference,
        what: &str,
    ) -> Result<(Vec<u8>, Option<String>), RegistryError> {
        let url = self.url(&r.repository, &format!("manifests/{what}"));
        let accept = [OCI_MANIFEST, DOCKER_MANIFEST, OCI_INDEX, DOCKER_LIST].join(", ");
        let resp = self.send(
            &format!("manifest of {}:{what}", r.name()),
            || self.agent.get(&url).set("Accept", &accept),
            Body::None,
        )?;
        let media_type = resp
            .header("Content-Type")
            .map(|t| t.split(';').next().unwrap_or(t).trim().to_owned());
        let mut bytes = Vec::new();
        resp.into_reader()
            .take(super::MANIFEST_LIMIT)
            .read_to_end(&mut bytes)
            .map_err(|e| RegistryError::Unreachable {
                registry: self.registry.clone(),
                message: format!("reading the manifest of {}: {e}", r.name()),
            })?;
        Ok((bytes, media_type))
    }

    /// Downloads a blob into the store (resuming what an earlier attempt
    /// left), unless it is there already.
    fn blob(
        &self,
        store: &Store,
        repository: &str,
        digest: &str,
        size: u64,
    ) -> Result<(), ImageError> {
        if store.has_blob(digest) {
            return Ok(());
        }
        let (partial, _lock) = store.ingest(digest)?;
        if store.has_blob(digest) {
            return Ok(());
        }
        let short = &digest[7..19];
        let url = self.url(repository, &format!("blobs/{digest}"));
        let mut last = String::new();
        for attempt in 1..=ATTEMPTS {
            let have = std::fs::metadata(&partial).map(|m| m.len()).unwrap_or(0);
            if size > 0 && have == size {
                break;
            }
            if have > 0 {
                self.say(&format!("{short}: resuming at {have} of {size} bytes"));
            } else {
                self.say(&format!("{short}: downloading {size} bytes"));
            }
            let resp = self.send(
                &format!("blob {digest}"),
                || {
                    let req = self.agent.get(&url);
                    if have > 0 {
                        req.set("Range", &format!("bytes={have}-"))
                    } else {
                        req
                    }
                },
                Body::None,
            );
            let resp = match resp {
                Ok(r) => r,
                Err(RegistryError::Status { status: 416, .. }) => {
                    let _ = std::fs::remove_file(&partial);
                    continue;
                }
                Err(e @ RegistryError::Unreachable { .. }) => {
                    last = e.to_string();
                    std::thread::sleep(Duration::from_millis(200 * attempt as u64));
                    continue;
                }
                Err(e) => return Err(e.into()),
            };
            let append = resp.status() == 206;
            let file = std::fs::OpenOptions::new()
                .create(true)
                .write(true)
                .append(append)
                .truncate(!append)
                .open(&partial)
                .map_err(|e| ImageError::Archive {
                    path: partial.display().to_string(),
                    message: e.to_string(),
                })?;
            let mut file = std::io::BufWriter::with_capacity(1 << 20, file);
            let copied = std::io::copy(&mut resp.into_reader(), &mut file).and_then(|n| {
                file.flush()?;
                Ok(n)
            });
            let now = std::fs::metadata(&partial).map(|m| m.len()).unwrap_or(0);
            match copied {
                Ok(_) if size == 0 || now == size => break,
                Ok(_) => last = format!("the connection ended after {now} of {size} bytes"),
                Err(e) => last = format!("cut off after {now} of {size} bytes: {e}"),
            }
            self.say(&format!("{short}: {last}"));
            if attempt == ATTEMPTS {
                return Err(RegistryError::Download {
                    registry: self.registry.clone(),
                    digest: digest.to_owned(),
                    attempts: ATTEMPTS,
                    message: last,
                }
                .into());
            }
        }
        if !partial.exists() {
            return Err(RegistryError::Download {
                registry: self.registry.clone(),
                digest: digest.to_owned(),
                attempts: ATTEMPTS,
                message: last,
            }
            .into());
        }
        store.commit_ingest(digest, &partial)?;
        self.say(&format!("{short}: done"));
        Ok(())
    }

    /// Pulls an image into the store and names it.
    pub fn pull(&self, store: &Store, r: &Reference) -> Result<Image, ImageError> {
        let _adding = store.adding()?;
        let image = r.to_string();
        let (mut bytes, media_type) = self.manifest(r, r.manifest_ref())?;
        let mut digest = super::store::sha256(&bytes);
        if let Some(pinned) = &r.digest {
            if &digest != pinned {
                return Err(super::store::StoreError::DigestMismatch {
                    expected: pinned.clone(),
                    actual: digest,
                }
                .into());
            }
        }
        if super::is_index(media_type.as_deref(), &bytes) {
            let chosen = super::select_platform(&image, &bytes)?;
            store.put_blob(Some(&digest), &bytes)?;
            let (m, _) = self.manifest(r, &chosen)?;
            digest = super::store::sha256(&m);
            if digest != chosen {
                return Err(super::store::StoreError::DigestMismatch {
                    expected: chosen,
                    actual: digest,
                }
                .into());
            }
            bytes = m;
        }
        store.put_blob(Some(&digest), &bytes)?;
        let (config, layers) = super::manifest_blobs(&image, &bytes)?;
        self.blob(store, &r.repository, &config, 0)?;
        let next = Mutex::new(layers.iter());
        let failed: Mutex<Option<ImageError>> = Mutex::new(None);
        std::thread::scope(|s| {
            for _ in 0..PARALLEL.min(layers.len()) {
                s.spawn(|| {
                    loop {
                        let Some(layer) = next.lock().unwrap().next() else {
                            return;
                        };
                        if failed.lock().unwrap().is_some() {
                            return;
                        }
                        if let Err(e) = self.blob(store, &r.repository, &layer.digest, layer.size) {
                            failed.lock().unwrap().get_or_insert(e);
                            return;
                        }
                    }
                });
            }
        });
        if let Some(e) = failed.into_inner().unwrap() {
            return Err(e);
        }
        let image = super::record(store, r, &digest, &bytes)?;
        self.say(&format!("{}: {}", r, image.manifest));
        Ok(image)
    }

    /// Whether the registry has a blob.
    fn has(&self, repository: &str, digest: &str) -> bool {
        let url = self.url(repository, &format!("blobs/{digest}"));
        self.send("blob", || self.agent.head(&url), Body::None)
            .is_ok()
    }

    fn upload(&self, repository: &str, digest: &str, path: &Path) -> Result<(), ImageError> {
        let short = &digest[7..19];
        if self.has(repository, digest) {
            self.say(&format!("{short}: already there"));
            return Ok(());
        }
        let start = self.url(repository, "blobs/uploads/");
        let resp = self.send(
            &format!("upload of {digest}"),
            || self.agent.post(&start),
            Body::Bytes(&[]),
        )?;
        let location = resp.header("Location").unwrap_or_default().to_owned();
        let location = if location.starts_with('/') {
            format!("{}{location}", self.base)
        } else {
            location
        };
        let sep = if location.contains('?') { '&' } else { '?' };
        let put = format!("{location}{sep}digest={digest}");
        let size = std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
        self.say(&format!("{short}: uploading {size} bytes"));
        self.send(
            &format!("upload of {digest}"),
            || {
                self.agent
                    .put(&put)
                    .set("Content-Type", "application/octet-stream")
                    .set("Content-Length", &size.to_string())
            },
            Body::File(path),
        )?;
        Ok(())
    }

    /// Pushes a stored image to `r` (blobs the registry lacks, then the
    /// manifest under `r`'s tag).
    pub fn push(&self, store: &Store, image: &Image, r: &Reference) -> Result<String, ImageError> {
        let mut blobs: Vec<&str> = image.layers.iter().map(|l| l.digest.as_str()).collect();
        blobs.push(&image.config);
        for digest in blobs {
            self.upload(&r.repository, digest, &store.blob_path(digest)?)?;
        }
        let manifest = store.read_blob(&image.manifest)?;
        let media_type = serde_json::from_slice::<serde_json::Value>(&manifest)
            .ok()
            .and_then(|v| v["mediaType"].as_str().map(str::to_owned))
            .unwrap_or_else(|| OCI_MANIFEST.to_owned());
        let url = self.url(&r.repository, &format!("manifests/{}", r.manifest_ref()));
        self.send(
            &format!("manifest of {r}"),
            || self.agent.put(&url).set("Content-Type", &media_type),
            Body::Bytes(&manifest),
        )?;
        self.say(&format!("{r}: {}", image.manifest));
        Ok(image.manifest.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_registries_are_plain_http() {
        assert!(insecure("localhost:5000"));
        assert!(insecure("127.0.0.1:5000"));
        assert!(insecure("localhost"));
        assert!(!insecure("docker.io"));
        assert!(!insecure("ghcr.io"));
        assert!(!insecure("127.example.com"));
    }
}
