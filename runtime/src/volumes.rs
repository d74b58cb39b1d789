//! Bind mounts of host paths: the spec's `bind` mounts whose sources are
//! host directories or files reach the guest through the volume shares
//! ([`VOLUME_TAGS`]), and the spec the agent gets names them by their
//! guest path (`<VOLUMES_DIR>/<tag>/...`).
//!
//! A host directory gets a share of its own (read-only when the mount is
//! `ro`; the VMM enforces it). Host files are copied into one staging
//! share in the container's state directory: serving a file's parent
//! directory would hand the guest its siblings too (`/etc/resolv.conf`
//! would expose `/etc`). The copy is made at `create`; a change to the
//! host file later is not seen, and the container's writes to it stay in
//! the copy.

use std::path::{Path, PathBuf};

use husk_protocol::share::Share;
use husk_protocol::{VOLUME_TAGS, VOLUMES_DIR};

/// Whether a spec mount (as JSON) is a bind mount.
pub(crate) fn is_bind(m: &serde_json::Value) -> bool {
    m["type"] == "bind"
        || m["options"]
            .as_array()
            .is_some_and(|o| o.iter().any(|x| x == "bind" || x == "rbind"))
}

pub(crate) fn read_only(m: &serde_json::Value) -> bool {
    m["options"]
        .as_array()
        .is_some_and(|o| o.iter().any(|x| x == "ro"))
}

/// The spec's JSON with host bind sources rewritten to guest paths, and
/// the volume shares (every tag of [`VOLUME_TAGS`], unused ones on
/// `empty`). Files are staged under `state_dir`.
pub fn plan(
    spec_json: &str,
    state_dir: &Path,
    empty: &Path,
) -> Result<(String, Vec<Share>), String> {
    let mut spec: serde_json::Value =
        serde_json::from_str(spec_json).map_err(|e| format!("the spec: {e}"))?;
    let mut dirs: Vec<(PathBuf, bool)> = Vec::new();
    let staging = state_dir.join("files");
    let mut staged = 0usize;
    if let Some(mounts) = spec["mounts"].as_array_mut() {
        for m in mounts.iter_mut().filter(|m| is_bind(m)) {
            let Some(source) = m["source"].as_str().map(PathBuf::from) else {
                continue;
            };
            let destination = m["destination"].as_str().unwrap_or("?").to_owned();
            let meta = std::fs::metadata(&source).map_err(|e| {
                format!(
                    "mount {destination}: bind source {} cannot be used: {e}",
                    source.display()
                )
            })?;
            let guest = if meta.is_dir() {
                let ro = read_only(m);
                let slot = match dirs.iter().position(|(d, r)| *d == source && *r == ro) {
                    Some(slot) => slot,
                    None => {
                        dirs.push((source.clone(), ro));
                        dirs.len() - 1
                    }
                };
                format!("{VOLUMES_DIR}/{{{slot}}}")
            } else {
                std::fs::create_dir_all(&staging)
                    .map_err(|e| format!("create {}: {e}", staging.display()))?;
                let name = format!("{staged}");
                staged += 1;
                std::fs::copy(&source, staging.join(&name))
                    .map_err(|e| format!("mount {destination}: copy {}: {e}", source.display()))?;
                format!("{VOLUMES_DIR}/{{files}}/{name}")
            };
            m["source"] = guest.into();
        }
    }
    let needed = dirs.len() + usize::from(staged > 0);
    if needed > VOLUME_TAGS.len() {
        return Err(format!(
            "the spec binds {} host directories{}: a container takes at most {}",
            dirs.len(),
            if staged > 0 { " and files" } else { "" },
            VOLUME_TAGS.len() - usize::from(staged > 0)
        ));
    }
    // Slots: directories first, then the staged files.
    let mut json = serde_json::to_string(&spec).map_err(|e| e.to_string())?;
    let mut shares = Vec::new();
    for (slot, (dir, ro)) in dirs.iter().enumerate() {
        json = json.replace(
            &format!("{VOLUMES_DIR}/{{{slot}}}"),
            &format!("{VOLUMES_DIR}/{}", VOLUME_TAGS[slot]),
        );
        shares.push(Share {
            tag: VOLUME_TAGS[slot].into(),
            dir: dir.clone(),
            read_only: *ro,
        });
    }
    if staged > 0 {
        let tag = VOLUME_TAGS[dirs.len()];
        json = json.replace(
            &format!("{VOLUMES_DIR}/{{files}}"),
            &format!("{VOLUMES_DIR}/{tag}"),
        );
        shares.push(Share {
            tag: tag.into(),
            dir: staging,
            read_only: false,
        });
    }
    for tag in &VOLUME_TAGS[shares.len()..] {
        shares.push(Share {
            tag: (*tag).into(),
            dir: empty.to_owned(),
            read_only: true,
        });
    }
    Ok((json, shares))
}

/// Makes the mount points the spec's mounts need in the container's root
/// on the host, before the VM starts: a read-only root is read-only to
/// the guest from the start, so the agent could not make them (runc makes
/// them in the root too). The walk never follows a symlink: where one
/// is, the agent resolves it in the guest instead.
pub fn make_mount_points(spec: &oci_spec::runtime::Spec, rootfs: &Path) {
    let mounts = spec.mounts().clone().unwrap_or_default();
    for (i, m) in mounts.iter().enumerate() {
        // Beneath an earlier mount (/dev/pts under a tmpfs /dev) the agent
        // makes it, inside that mount.
        if mounts[..i]
            .iter()
            .any(|earlier| m.destination().starts_with(earlier.destination()))
        {
            continue;
        }
        let file =
            m.typ().as_deref() == Some("bind") && m.source().as_ref().is_some_and(|s| s.is_file());
        let parts: Vec<_> = m
            .destination()
            .components()
            .filter_map(|c| match c {
                std::path::Component::Normal(p) => Some(p.to_owned()),
                _ => None,
            })
            .collect();
        let mut path = rootfs.to_owned();
        for (i, part) in parts.iter().enumerate() {
            path.push(part);
            let last = i + 1 == parts.len();
            match std::fs::symlink_metadata(&path) {
                Ok(meta) if meta.is_dir() => continue,
                Ok(_) => break,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    let made = if last && file {
                        std::fs::File::create(&path).map(drop)
                    } else {
                        std::fs::create_dir(&path)
                    };
                    if made.is_err() {
                        break;
                    }
                }
                Err(_) => break,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_paths_become_volume_shares() {
        let base = std::env::temp_dir().join(format!("husk-vol-{}", std::process::id()));
        let (data, state, empty) = (base.join("data"), base.join("state"), base.join("empty"));
        for d in [&data, &state, &empty] {
            std::fs::create_dir_all(d).unwrap();
        }
        std::fs::write(base.join("hosts"), "127.0.0.1 localhost\n").unwrap();
        let spec = serde_json::json!({
            "mounts": [
                {"destination": "/proc", "type": "proc", "source": "proc"},
                {"destination": "/data", "type": "bind", "source": data, "options": ["rbind", "rw"]},
                {"destination": "/data-ro", "type": "bind", "source": data, "options": ["rbind", "ro"]},
                {"destination": "/etc/hosts", "type": "bind", "source": base.join("hosts"), "options": ["rbind", "ro"]},
            ]
        })
        .to_string();
        let (json, shares) = plan(&spec, &state, &empty).unwrap();
        let v: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert_eq!(v["mounts"][0]["source"], "proc");
        assert_eq!(v["mounts"][1]["source"], "/run/husk/volumes/vol0");
        assert_eq!(v["mounts"][2]["source"], "/run/husk/volumes/vol1");
        assert_eq!(v["mounts"][3]["source"], "/run/husk/volumes/vol2/0");
        assert_eq!(shares.len(), 4);
        assert_eq!(
            (shares[0].dir.clone(), shares[0].read_only),
            (data.clone(), false)
        );
        assert_eq!(
            (shares[1].dir.clone(), shares[1].read_only),
            (data.clone(), true)
        );
        assert_eq!(shares[2].dir, state.join("files"));
        assert_eq!(
            std::fs::read_to_string(state.join("files/0")).unwrap(),
            "127.0.0.1 localhost\n"
        );
        assert_eq!(
            (shares[3].dir.clone(), shares[3].read_only),
            (empty.clone(), true)
        );

        // A source that does not exist is named; too many directories too.
        let bad = serde_json::json!({"mounts": [{"destination": "/x", "type": "bind", "source": "/nonexistent/husk"}]});
        let err = plan(&bad.to_string(), &state, &empty).unwrap_err();
        assert!(
            err.starts_with("mount /x: bind source /nonexistent/husk cannot be used"),
            "{err}"
        );
        let many: Vec<serde_json::Value> = (0..5)
            .map(|i| {
                let d = base.join(format!("d{i}"));
                std::fs::create_dir_all(&d).unwrap();
                serde_json::json!({"destination": format!("/d{i}"), "type": "bind", "source": d})
            })
            .collect();
        let err = plan(
            &serde_json::json!({"mounts": many}).to_string(),
            &state,
            &empty,
        )
        .unwrap_err();
        assert_eq!(
            err,
            "the spec binds 5 host directories: a container takes at most 4"
        );
        std::fs::remove_dir_all(&base).unwrap();
    }

    #[test]
    fn mount_points_are_made_without_following_symlinks() {
        let base = std::env::temp_dir().join(format!("husk-mp-{}", std::process::id()));
        let rootfs = base.join("rootfs");
        std::fs::create_dir_all(&rootfs).unwrap();
        std::fs::create_dir_all(base.join("outside")).unwrap();
        std::os::unix::fs::symlink(base.join("outside"), rootfs.join("link")).unwrap();
        let spec: oci_spec::runtime::Spec = serde_json::from_value(serde_json::json!({
            "ociVersion": "1.0.2",
            "mounts": [
                {"destination": "/a/b", "type": "tmpfs", "source": "tmpfs"},
                {"destination": "/link/escape", "type": "tmpfs", "source": "tmpfs"},
            ]
        }))
        .unwrap();
        make_mount_points(&spec, &rootfs);
        assert!(rootfs.join("a/b").is_dir());
        assert!(
            !base.join("outside/escape").exists(),
            "a symlink was followed"
        );
        std::fs::remove_dir_all(&base).unwrap();
    }
}
