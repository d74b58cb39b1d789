//! A virtio-fs share as the runtime names it to the VMM:
//! `--share TAG=DIR[:ro]`.

use std::path::PathBuf;

/// Bytes of the tag in the device's configuration space (NUL-padded).
pub const TAG_LEN: usize = 36;

/// One shared directory, as given on the command line: `TAG=DIR[:ro]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Share {
    /// The name the guest mounts it by (`mount -t virtiofs TAG /mnt`).
    pub tag: String,
    /// The host directory.
    pub dir: PathBuf,
    /// Whether the guest may change it.
    pub read_only: bool,
}

impl std::str::FromStr for Share {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let (tag, rest) = s
            .split_once('=')
            .ok_or_else(|| format!("share {s:?} is not TAG=DIR[:ro]"))?;
        if tag.is_empty() || tag.len() > TAG_LEN || tag.contains('\0') {
            return Err(format!(
                "share tag {tag:?} must be 1 to {TAG_LEN} bytes without NUL"
            ));
        }
        let (dir, read_only) = match rest.strip_suffix(":ro") {
            Some(dir) => (dir, true),
            None => (rest.strip_suffix(":rw").unwrap_or(rest), false),
        };
        if dir.is_empty() {
            return Err(format!("share {tag:?} names no directory"));
        }
        Ok(Share {
            tag: tag.to_owned(),
            dir: PathBuf::from(dir),
            read_only,
        })
    }
}

impl std::fmt::Display for Share {
    /// The mode is always written (`:rw` too), so that a directory whose
    /// own name ends in `:ro` or `:rw` reads back as itself: the parser
    /// takes off exactly one suffix.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mode = if self.read_only { ":ro" } else { ":rw" };
        write!(f, "{}={}{mode}", self.tag, self.dir.display())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What the runtime writes, the VMM reads back as the same share,
    /// whatever the directory's name ends in.
    #[test]
    fn a_share_reads_back_as_itself() {
        for dir in ["/x/a", "/x/a:rw", "/x/a:ro", "/x/a:ro:rw", "/x/=b"] {
            for read_only in [false, true] {
                let share = Share {
                    tag: "t".into(),
                    dir: dir.into(),
                    read_only,
                };
                let back: Share = share.to_string().parse().unwrap();
                assert_eq!(back, share, "{share}");
            }
        }
    }

    #[test]
    fn shares_parse_with_clear_errors() {
        let s: Share = "rootfs=/var/lib/x:ro".parse().unwrap();
        assert_eq!(
            s,
            Share {
                tag: "rootfs".into(),
                dir: "/var/lib/x".into(),
                read_only: true
            }
        );
        assert_eq!(s.to_string(), "rootfs=/var/lib/x:ro");
        let s: Share = "data=/tmp/d".parse().unwrap();
        assert!(!s.read_only);
        assert_eq!(s.to_string(), "data=/tmp/d:rw");
        for (bad, why) in [
            ("/tmp/d", "is not TAG=DIR"),
            ("=/tmp/d", "must be 1 to 36 bytes"),
            (&format!("{}=/d", "t".repeat(37)), "must be 1 to 36 bytes"),
            ("t=", "names no directory"),
            ("t=:ro", "names no directory"),
        ] {
            let err = bad.parse::<Share>().unwrap_err();
            assert!(err.contains(why), "{bad}: {err}");
        }
    }
}
