//! Image references as docker writes them: `busybox`, `busybox:1.36`,
//! `127.0.0.1:5000/team/app:v2`, `ghcr.io/x/y@sha256:...`.
//!
//! A name without a registry is Docker Hub's (`docker.io`), and a
//! one-component Docker Hub name is an official image (`library/`). A
//! reference without a tag or digest means `:latest`.

use std::fmt;

/// Docker Hub, the registry of names that name none.
pub const DEFAULT_REGISTRY: &str = "docker.io";

/// A parsed image reference.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reference {
    /// Registry host (and port).
    pub registry: String,
    /// Repository path in the registry.
    pub repository: String,
    /// Tag, when the reference has one (or none and no digest: `latest`).
    pub tag: Option<String>,
    /// `sha256:<hex>`, when the reference pins a manifest.
    pub digest: Option<String>,
}

/// A reference that cannot be parsed.
#[derive(Debug, thiserror::Error)]
#[error("invalid image reference {reference:?}: {why}")]
pub struct ReferenceError {
    reference: String,
    why: &'static str,
}

fn component_ok(c: &str) -> bool {
    // [a-z0-9]+ separated by one of `.`, `_`, `__`, `-`+.
    !c.is_empty()
        && c.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b))
        && c.as_bytes()[0].is_ascii_alphanumeric()
        && c.as_bytes()[c.len() - 1].is_ascii_alphanumeric()
}

fn tag_ok(t: &str) -> bool {
    (1..=128).contains(&t.len())
        && t.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b))
        && (t.as_bytes()[0].is_ascii_alphanumeric() || t.as_bytes()[0] == b'_')
}

/// Whether `d` is `sha256:` and 64 lowercase hex digits.
pub fn digest_ok(d: &str) -> bool {
    d.strip_prefix("sha256:").is_some_and(|h| {
        h.len() == 64
            && h.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    })
}

impl Reference {
    /// Parses a reference as docker does.
    pub fn parse(s: &str) -> Result<Self, ReferenceError> {
        let bad = |why| ReferenceError {
            reference: s.to_owned(),
            why,
        };
        let (rest, digest) = match s.split_once('@') {
            Some((rest, d)) if digest_ok(d) => (rest, Some(d.to_owned())),
            Some(_) => return Err(bad("the digest is not sha256:<64 hex digits>")),
            None => (s, None),
        };
        let (name, tag) = match rest.rsplit_once(':') {
            Some((name, tag)) if !tag.contains('/') => {
                if !tag_ok(tag) {
                    return Err(bad("the tag has characters a tag cannot have"));
                }
                (name, Some(tag.to_owned()))
            }
            _ => (rest, None),
        };
        if name.is_empty() {
            return Err(bad("no name"));
        }
        let (registry, path) = match name.split_once('/') {
            Some((first, path))
                if first.contains('.') || first.contains(':') || first == "localhost" =>
            {
                (first.to_owned(), path.to_owned())
            }
            _ => (DEFAULT_REGISTRY.to_owned(), name.to_owned()),
        };
        if !path.split('/').all(component_ok) {
            return Err(bad(
                "a name is lowercase letters, digits and separators (. _ -) between slashes",
            ));
        }
        let repository = if registry == DEFAULT_REGISTRY && !path.contains('/') {
            format!("library/{path}")
        } else {
            path
        };
        let tag = if tag.is_none() && digest.is_none() {
            Some("latest".to_owned())
        } else {
            tag
        };
        Ok(Self {
            registry,
            repository,
            tag,
            digest,
        })
    }

    /// The name without tag or digest: `docker.io/library/busybox`.
    pub fn name(&self) -> String {
        format!("{}/{}", self.registry, self.repository)
    }

    /// What to ask the registry for: the digest if pinned, else the tag.
    pub fn manifest_ref(&self) -> &str {
        self.digest
            .as_deref()
            .or(self.tag.as_deref())
            .unwrap_or("latest")
    }

    /// The shortest form docker would print: `busybox`, `husk/busybox`,
    /// `127.0.0.1:5000/app` (no tag).
    pub fn short_name(&self) -> String {
        if self.registry == DEFAULT_REGISTRY {
            self.repository
                .strip_prefix("library/")
                .unwrap_or(&self.repository)
                .to_owned()
        } else {
            self.name()
        }
    }
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "{}", self.name())?;
        if let Some(tag) = &self.tag {
            write!(f, ":{tag}")?;
        }
        if let Some(digest) = &self.digest {
            write!(f, "@{digest}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn docker_hub_names() {
        let r = Reference::parse("busybox").unwrap();
        assert_eq!(r.to_string(), "docker.io/library/busybox:latest");
        assert_eq!(r.short_name(), "busybox");
        let r = Reference::parse("husk/busybox:1.36").unwrap();
        assert_eq!(r.to_string(), "docker.io/husk/busybox:1.36");
        assert_eq!(r.short_name(), "husk/busybox");
    }

    #[test]
    fn registries_ports_and_digests() {
        let r = Reference::parse("127.0.0.1:5000/team/app:v2").unwrap();
        assert_eq!(r.registry, "127.0.0.1:5000");
        assert_eq!(r.repository, "team/app");
        assert_eq!(r.manifest_ref(), "v2");
        let d = format!("sha256:{}", "a".repeat(64));
        let r = Reference::parse(&format!("localhost/app@{d}")).unwrap();
        assert_eq!(
            (r.registry.as_str(), r.tag.as_deref(), r.manifest_ref()),
            ("localhost", None, d.as_str())
        );
        // A port is not a tag.
        let r = Reference::parse("localhost:5000/app").unwrap();
        assert_eq!(
            (r.registry.as_str(), r.tag.as_deref()),
            ("localhost:5000", Some("latest"))
        );
    }

    #[test]
    fn bad_references_are_named() {
        for (bad, why) in [
            ("", "no name"),
            ("Busybox", "lowercase"),
            ("busy box", "lowercase"),
            ("busybox:-x", "tag"),
            ("busybox@sha256:12", "digest"),
            ("a//b", "lowercase"),
        ] {
            let e = Reference::parse(bad).unwrap_err().to_string();
            assert!(
                e.contains(why) && e.contains(&format!("{bad:?}")),
                "{bad}: {e}"
            );
        }
    }
}
