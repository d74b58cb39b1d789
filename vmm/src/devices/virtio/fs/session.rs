//! The guest's side of a share's FUSE session, kept so that it can be
//! saved with a snapshot and taken up again by another VMM.
//!
//! The guest's FUSE client names files by node IDs and open files by
//! handles, both chosen by the server and remembered by the guest's
//! kernel for as long as it caches the inode or keeps the file open. The
//! passthrough file system's own IDs live only in this process, so the
//! guest never sees them: every ID it gets is one of this session's, and
//! each request's IDs are translated to the passthrough's on the way in.
//! Per node the session keeps the name it was last found by (its parent
//! node and the entry's name, followed through renames and unlinks) and
//! the guest's lookup count; per handle its node and open flags. That is
//! what a snapshot saves ([`SessionState`]). A new VMM looks every name up
//! again from the share's root, reopens every handle, and from then on
//! translates the same guest IDs to its own passthrough's.
//!
//! A node whose name is gone (unlinked, or never known, as for `..`) cannot
//! be found again: after a restore it answers `ESTALE`, and the guest's
//! kernel looks the name up afresh. An open file whose name is gone cannot
//! be reopened, so a snapshot of a session holding one is refused, naming
//! the file (CRIU refuses the same).

use std::collections::HashMap;
use std::ffi::CString;
use std::io;

use serde::{Deserialize, Serialize};

/// FUSE's ID of the root directory, in the guest and the passthrough alike.
pub const ROOT: u64 = 1;

/// No passthrough inode: a node that could not be found again.
const STALE: u64 = 0;

struct Node {
    /// The passthrough's inode, or [`STALE`].
    inner: u64,
    /// Parent node and name it was last found by.
    name: Option<(u64, Vec<u8>)>,
    /// The name was unlinked (kept for messages).
    unlinked: bool,
    /// File type bits (`S_IFMT` of its mode).
    kind: u32,
    /// The guest's lookup count.
    lookups: u64,
    /// The passthrough's lookup count of `inner`, held by this node.
    refs: u64,
}

struct OpenFile {
    inner: u64,
    node: u64,
    flags: u32,
    dir: bool,
}

/// The IDs the guest holds, and what they stand for.
pub struct Session {
    nodes: HashMap<u64, Node>,
    /// Passthrough inode to guest node, for the nodes whose replies gave it.
    by_inner: HashMap<u64, u64>,
    /// (parent, name) to the node recorded under it.
    by_name: HashMap<(u64, Vec<u8>), u64>,
    handles: HashMap<u64, OpenFile>,
    next_node: u64,
    next_handle: u64,
}

/// A node as a snapshot keeps it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedNode {
    /// The guest's node ID.
    pub id: u64,
    /// Parent node and name, when it has one.
    pub name: Option<(u64, Vec<u8>)>,
    /// File type bits.
    pub kind: u32,
    /// The guest's lookup count.
    pub lookups: u64,
}

/// An open file as a snapshot keeps it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedHandle {
    /// The guest's handle.
    pub id: u64,
    /// Its node.
    pub node: u64,
    /// The flags it was opened with.
    pub flags: u32,
    /// Opened as a directory.
    pub dir: bool,
}

/// A session as a snapshot keeps it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionState {
    /// The FUSE_INIT options the guest offered.
    pub capable: u64,
    /// Every node but the root.
    pub nodes: Vec<SavedNode>,
    /// Every open file.
    pub handles: Vec<SavedHandle>,
    /// The next IDs to give out.
    pub next_node: u64,
    /// See `next_node`.
    pub next_handle: u64,
}

fn ebadf<T>() -> io::Result<T> {
    Err(io::Error::from_raw_os_error(libc::EBADF))
}

/// Open flags that only make sense the first time a file is opened.
const FIRST_OPEN_ONLY: u32 = (libc::O_CREAT | libc::O_EXCL | libc::O_TRUNC) as u32;

/// The guest's open flags as the share opens files with them: `O_PATH`
/// and `O_TMPFILE` are refused (the guest's kernel never sends them; an
/// `O_TMPFILE` open of a directory would make a file in the share that no
/// name holds), and `O_DIRECT` is dropped (the share is read and written
/// through the host's page cache).
///
/// A read or write then passes the flags its handle was opened with
/// ([`Session::open_file`]), never the request's: fuse-backend-rs 0.14
/// sets a request's differing flags with `F_SETFL` and, when that fails
/// (`O_DIRECT` on tmpfs, `O_NOATIME` on a file the VMM does not own),
/// closes the handle's descriptor while the handle still holds it: a
/// second close later could close whatever reused the number.
pub fn open_flags(flags: u32) -> io::Result<u32> {
    // O_TMPFILE without its O_DIRECTORY bit, which opendir sets.
    let tmpfile = libc::O_TMPFILE & !libc::O_DIRECTORY;
    if flags & (libc::O_PATH | tmpfile) as u32 != 0 {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    }
    Ok(flags & !(libc::O_DIRECT as u32))
}

impl Default for Session {
    fn default() -> Self {
        Self::new()
    }
}

impl Session {
    /// A session of a share just mounted: the root only.
    pub fn new() -> Self {
        let mut nodes = HashMap::new();
        nodes.insert(
            ROOT,
            Node {
                inner: ROOT,
                name: None,
                unlinked: false,
                kind: libc::S_IFDIR,
                lookups: 1,
                refs: 0,
            },
        );
        Self {
            nodes,
            by_inner: HashMap::from([(ROOT, ROOT)]),
            by_name: HashMap::new(),
            handles: HashMap::new(),
            next_node: ROOT + 1,
            next_handle: 1,
        }
    }

    /// The passthrough's inode for guest node `node`.
    pub fn inner(&self, node: u64) -> io::Result<u64> {
        match self.nodes.get(&node) {
            Some(n) if n.inner == STALE => Err(io::Error::from_raw_os_error(libc::ESTALE)),
            Some(n) => Ok(n.inner),
            None => ebadf(),
        }
    }

    /// The passthrough's handle for guest handle `handle`.
    pub fn handle(&self, handle: u64) -> io::Result<u64> {
        self.open_file(handle).map(|(inner, _)| inner)
    }

    /// The passthrough's handle for guest handle `handle`, and the flags
    /// the passthrough opened it with.
    pub fn open_file(&self, handle: u64) -> io::Result<(u64, u32)> {
        self.handles
            .get(&handle)
            .map_or_else(ebadf, |h| Ok((h.inner, h.flags)))
    }

    /// The passthrough answered a lookup (or a create) of `name` in
    /// `parent` with its inode `inner`, of type `kind`, counting one more
    /// lookup of it: returns the guest's node ID for it.
    pub fn entered(&mut self, parent: u64, name: &[u8], inner: u64, kind: u32) -> u64 {
        let named = name != b"." && name != b"..";
        let id = match self.by_inner.get(&inner) {
            Some(&id) => id,
            None => {
                let id = self.next_node;
                self.next_node += 1;
                self.nodes.insert(
                    id,
                    Node {
                        inner,
                        name: None,
                        unlinked: false,
                        kind,
                        lookups: 0,
                        refs: 0,
                    },
                );
                self.by_inner.insert(inner, id);
                id
            }
        };
        let node = self.nodes.get_mut(&id).expect("indexed nodes exist");
        node.lookups += 1;
        node.refs += 1;
        // The first name it was found by, or a new one once that is gone.
        if named && id != ROOT && (node.name.is_none() || node.unlinked) {
            let key = (parent, name.to_vec());
            if let Some((p, n)) = node.name.take() {
                self.by_name.remove(&(p, n));
            }
            node.name = Some(key.clone());
            node.unlinked = false;
            if let Some(other) = self.by_name.insert(key, id)
                && other != id
                && let Some(o) = self.nodes.get_mut(&other)
            {
                o.unlinked = true;
            }
        }
        id
    }

    /// The parent of directory `node` as this session recorded it: the
    /// root is its own parent. This, never the host's `..`, answers a
    /// lookup of `..`: a directory moved out of the share behind the
    /// session's back (through an overlapping share) still climbs only
    /// to the session's nodes, and no further than the root
    /// (docs/security.md).
    pub fn parent(&self, node: u64) -> io::Result<u64> {
        if node == ROOT {
            return Ok(ROOT);
        }
        let n = self.nodes.get(&node).map_or_else(ebadf, Ok)?;
        if n.kind != libc::S_IFDIR {
            return Err(io::Error::from_raw_os_error(libc::ENOTDIR));
        }
        match &n.name {
            Some((parent, _)) if self.nodes.contains_key(parent) => Ok(*parent),
            _ => Err(io::Error::from_raw_os_error(libc::ENOENT)),
        }
    }

    /// The guest forgot `count` lookups of `node`: returns the
    /// passthrough's inode and the count to forget there once the guest
    /// holds none.
    pub fn forget(&mut self, node: u64, count: u64) -> Option<(u64, u64)> {
        if node == ROOT {
            return None;
        }
        let n = self.nodes.get_mut(&node)?;
        n.lookups = n.lookups.saturating_sub(count);
        if n.lookups > 0 {
            return None;
        }
        self.drop_node(node)
    }

    /// The passthrough took back the lookup it counted for an entry it
    /// could not fit into a directory listing.
    pub fn unentered(&mut self, node: u64) -> Option<(u64, u64)> {
        let n = self.nodes.get_mut(&node)?;
        n.refs = n.refs.saturating_sub(1);
        self.forget(node, 1)
    }

    fn drop_node(&mut self, node: u64) -> Option<(u64, u64)> {
        let n = self.nodes.remove(&node)?;
        if self.by_inner.get(&n.inner) == Some(&node) {
            self.by_inner.remove(&n.inner);
        }
        if let Some(key) = n.name
            && self.by_name.get(&key) == Some(&node)
        {
            self.by_name.remove(&key);
        }
        (n.inner != STALE && n.refs > 0).then_some((n.inner, n.refs))
    }

    /// `name` in `parent` was unlinked (or removed as a directory).
    pub fn unlinked(&mut self, parent: u64, name: &[u8]) {
        if let Some(id) = self.by_name.remove(&(parent, name.to_vec()))
            && let Some(n) = self.nodes.get_mut(&id)
        {
            n.unlinked = true;
        }
    }

    /// `oldname` in `olddir` was renamed to `newname` in `newdir`; with
    /// `exchange` the two swapped (RENAME_EXCHANGE).
    pub fn renamed(
        &mut self,
        olddir: u64,
        oldname: &[u8],
        newdir: u64,
        newname: &[u8],
        exchange: bool,
    ) {
        let old = (olddir, oldname.to_vec());
        let new = (newdir, newname.to_vec());
        let moved = self.by_name.remove(&old);
        let replaced = self.by_name.remove(&new);
        if let Some(id) = moved
            && let Some(n) = self.nodes.get_mut(&id)
        {
            n.name = Some(new.clone());
            self.by_name.insert(new, id);
        }
        if let Some(id) = replaced
            && let Some(n) = self.nodes.get_mut(&id)
        {
            if exchange {
                n.name = Some(old.clone());
                self.by_name.insert(old, id);
            } else {
                n.unlinked = true;
            }
        }
    }

    /// The passthrough opened `node` as its handle `inner` with `flags`:
    /// returns the guest's handle.
    pub fn opened(&mut self, node: u64, inner: u64, flags: u32, dir: bool) -> u64 {
        let id = self.next_handle;
        self.next_handle += 1;
        self.handles.insert(
            id,
            OpenFile {
                inner,
                node,
                flags,
                dir,
            },
        );
        id
    }

    /// The guest released `handle`: returns the passthrough's.
    pub fn released(&mut self, handle: u64) -> io::Result<u64> {
        self.handles
            .remove(&handle)
            .map_or_else(ebadf, |h| Ok(h.inner))
    }

    /// The node's path in the share, as far as it is known.
    pub fn path(&self, node: u64) -> String {
        let mut parts = Vec::new();
        let mut at = node;
        while at != ROOT && parts.len() < 256 {
            match self.nodes.get(&at).and_then(|n| n.name.as_ref()) {
                Some((parent, name)) => {
                    parts.push(String::from_utf8_lossy(name).into_owned());
                    at = *parent;
                }
                None => {
                    parts.push(format!("<node {at}>"));
                    break;
                }
            }
        }
        parts.reverse();
        format!("/{}", parts.join("/"))
    }

    /// The session as a snapshot keeps it; refused when an open file's
    /// name is gone, naming it.
    pub fn save(&self, capable: u64) -> Result<SessionState, String> {
        let mut handles: Vec<SavedHandle> = Vec::with_capacity(self.handles.len());
        for (&id, h) in &self.handles {
            let node = self.nodes.get(&h.node);
            if h.node != ROOT && node.is_none_or(|n| n.unlinked || n.name.is_none()) {
                return Err(format!(
                    "the guest holds open {}, which was deleted: it cannot be reopened",
                    self.path(h.node)
                ));
            }
            handles.push(SavedHandle {
                id,
                node: h.node,
                flags: h.flags,
                dir: h.dir,
            });
        }
        handles.sort_by_key(|h| h.id);
        let mut nodes: Vec<SavedNode> = self
            .nodes
            .iter()
            .filter(|&(&id, _)| id != ROOT)
            .map(|(&id, n)| SavedNode {
                id,
                name: n.name.clone().filter(|_| !n.unlinked),
                kind: n.kind,
                lookups: n.lookups,
            })
            .collect();
        nodes.sort_by_key(|n| n.id);
        Ok(SessionState {
            capable,
            nodes,
            handles,
            next_node: self.next_node,
            next_handle: self.next_handle,
        })
    }

    /// Takes up a saved session on another passthrough: `lookup(parent,
    /// name)` finds a name again (its inode and type, one lookup counted),
    /// `open(inode, flags, dir)` reopens a file. A node that cannot be
    /// found again, or is now of another type, is stale; a handle that
    /// cannot be reopened fails the restore, naming the file.
    pub fn restore(
        state: &SessionState,
        mut lookup: impl FnMut(u64, &CString) -> Option<(u64, u32)>,
        mut forget: impl FnMut(u64, u64),
        mut open: impl FnMut(u64, u32, bool) -> io::Result<u64>,
    ) -> Result<Self, String> {
        let mut session = Self::new();
        for n in &state.nodes {
            if n.id == ROOT || n.id >= state.next_node {
                return Err(format!("saved virtio-fs node {} is out of range", n.id));
            }
            session.nodes.insert(
                n.id,
                Node {
                    inner: STALE,
                    name: n.name.clone(),
                    unlinked: false,
                    kind: n.kind,
                    lookups: n.lookups,
                    refs: 0,
                },
            );
            if let Some(key) = &n.name {
                session.by_name.insert(key.clone(), n.id);
            }
        }
        session.next_node = state.next_node;
        session.next_handle = state.next_handle;
        // Parents before children: a node is resolved once its parent is.
        let mut resolved: HashMap<u64, u64> = HashMap::from([(ROOT, ROOT)]);
        let mut pending: Vec<u64> = state.nodes.iter().map(|n| n.id).collect();
        while !pending.is_empty() {
            let before = pending.len();
            pending.retain(|&id| {
                let node = &session.nodes[&id];
                let Some((parent, name)) = node.name.clone() else {
                    resolved.insert(id, STALE);
                    return false;
                };
                let Some(&parent_inner) = resolved.get(&parent) else {
                    // Its parent is not resolved yet, or not saved at all.
                    if session.nodes.contains_key(&parent) {
                        return true;
                    }
                    resolved.insert(id, STALE);
                    return false;
                };
                let inner = match CString::new(name) {
                    Ok(name) if parent_inner != STALE => match lookup(parent_inner, &name) {
                        Some((inner, kind)) if kind == node.kind => inner,
                        Some((inner, _)) => {
                            forget(inner, 1);
                            STALE
                        }
                        None => STALE,
                    },
                    _ => STALE,
                };
                resolved.insert(id, inner);
                false
            });
            if pending.len() == before {
                // A loop of parents: none of them can be found.
                for id in pending.drain(..) {
                    resolved.insert(id, STALE);
                }
            }
        }
        for (id, inner) in resolved {
            if id == ROOT {
                continue;
            }
            let node = session.nodes.get_mut(&id).expect("saved node");
            node.inner = inner;
            if inner != STALE {
                node.refs = 1;
                session.by_inner.entry(inner).or_insert(id);
            } else {
                // Gone: its name no longer stands for it (kept for
                // messages).
                node.unlinked = true;
                if let Some(key) = &node.name
                    && session.by_name.get(key) == Some(&id)
                {
                    session.by_name.remove(key);
                }
            }
        }
        for h in &state.handles {
            let inner = session.inner(h.node).map_err(|_| {
                format!(
                    "cannot reopen {}: it is no longer in the share",
                    session.path(h.node)
                )
            })?;
            let reopened = open_flags(h.flags)
                .map(|f| f & !FIRST_OPEN_ONLY)
                .and_then(|flags| Ok((open(inner, flags, h.dir)?, flags)));
            let (handle, flags) =
                reopened.map_err(|e| format!("cannot reopen {}: {e}", session.path(h.node)))?;
            session.handles.insert(
                h.id,
                OpenFile {
                    inner: handle,
                    node: h.node,
                    flags,
                    dir: h.dir,
                },
            );
        }
        Ok(session)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FILE: u32 = libc::S_IFREG;
    const DIR: u32 = libc::S_IFDIR;

    #[test]
    fn the_guest_sees_session_ids_and_names_follow_renames() {
        let mut s = Session::new();
        let dir = s.entered(ROOT, b"dir", 40, DIR);
        let file = s.entered(dir, b"f", 41, FILE);
        assert_ne!(dir, 40);
        assert_eq!(s.inner(file).unwrap(), 41);
        // The same inode found again is the same node, counted twice.
        assert_eq!(s.entered(dir, b"f", 41, FILE), file);
        assert_eq!(s.path(file), "/dir/f");
        s.renamed(dir, b"f", ROOT, b"g", false);
        assert_eq!(s.path(file), "/g");
        // Forgotten once: still there; twice: gone, with the
        // passthrough's count to forget.
        assert_eq!(s.forget(file, 1), None);
        assert_eq!(s.forget(file, 1), Some((41, 2)));
        assert_eq!(s.inner(file).unwrap_err().raw_os_error(), Some(libc::EBADF));
        assert_eq!(s.inner(ROOT).unwrap(), ROOT);
    }

    #[test]
    fn an_open_file_that_was_deleted_refuses_the_save_naming_it() {
        let mut s = Session::new();
        let file = s.entered(ROOT, b"tmp", 7, FILE);
        let h = s.opened(file, 3, libc::O_RDWR as u32, false);
        assert!(s.save(0).is_ok());
        s.unlinked(ROOT, b"tmp");
        let err = s.save(0).unwrap_err();
        assert!(err.contains("/tmp, which was deleted"), "{err}");
        assert_eq!(s.released(h).unwrap(), 3);
        assert!(s.save(0).is_ok());
    }

    #[test]
    fn a_restored_session_keeps_the_guests_ids_on_new_inodes() {
        let mut s = Session::new();
        let dir = s.entered(ROOT, b"dir", 50, DIR);
        let file = s.entered(dir, b"f", 51, FILE);
        let gone = s.entered(dir, b"gone", 52, FILE);
        let moved = s.entered(ROOT, b"a", 53, DIR);
        let inside = s.entered(moved, b"x", 54, FILE);
        // A directory renamed under a node made after it: its parent has
        // a larger ID and must be resolved first.
        let late = s.entered(ROOT, b"late", 55, DIR);
        s.renamed(ROOT, b"a", late, b"a", false);
        let h = s.opened(file, 9, (libc::O_RDWR | libc::O_TRUNC) as u32, false);
        let d = s.opened(dir, 10, 0, true);
        let saved = s.save(0x42).unwrap();
        let json = serde_json::to_string(&saved).unwrap();
        let saved: SessionState = serde_json::from_str(&json).unwrap();
        assert_eq!(saved.capable, 0x42);
        // The new passthrough: every path gets a new inode; "gone" is not
        // there any more.
        let inodes: HashMap<(u64, &[u8]), (u64, u32)> = HashMap::from([
            ((ROOT, &b"dir"[..]), (500, DIR)),
            ((500, &b"f"[..]), (501, FILE)),
            ((ROOT, &b"late"[..]), (505, DIR)),
            ((505, &b"a"[..]), (503, DIR)),
            ((503, &b"x"[..]), (504, FILE)),
        ]);
        let mut opened = Vec::new();
        let r = Session::restore(
            &saved,
            |parent, name| inodes.get(&(parent, name.as_bytes())).copied(),
            |_, _| panic!("nothing to forget"),
            |inner, flags, dir| {
                opened.push((inner, flags, dir));
                Ok(900 + inner)
            },
        )
        .unwrap();
        assert_eq!(r.inner(dir).unwrap(), 500);
        assert_eq!(r.inner(file).unwrap(), 501);
        assert_eq!(r.inner(inside).unwrap(), 504);
        assert_eq!(r.path(inside), "/late/a/x");
        assert_eq!(
            r.inner(gone).unwrap_err().raw_os_error(),
            Some(libc::ESTALE)
        );
        // Handles are reopened, without the flags of a first open.
        assert_eq!(r.handle(h).unwrap(), 1401);
        assert_eq!(r.handle(d).unwrap(), 1400);
        assert!(opened.contains(&(501, libc::O_RDWR as u32, false)));
        // New IDs do not reuse the guest's old ones.
        let mut r = r;
        let new = r.entered(ROOT, b"new", 600, FILE);
        assert!(new > late);
        // An inode found again maps to the guest's node.
        assert_eq!(r.entered(dir, b"f", 501, FILE), file);
    }

    #[test]
    fn an_open_file_missing_at_restore_fails_it_naming_the_file() {
        let mut s = Session::new();
        let file = s.entered(ROOT, b"data", 5, FILE);
        s.opened(file, 1, 0, false);
        let saved = s.save(0).unwrap();
        let err = Session::restore(&saved, |_, _| None, |_, _| {}, |_, _, _| Ok(1))
            .err()
            .unwrap();
        assert_eq!(err, "cannot reopen /data: it is no longer in the share");
        // Found, but now a directory: stale too, and its lookup given back.
        let mut forgot = Vec::new();
        let err = Session::restore(
            &saved,
            |_, _| Some((77, DIR)),
            |i, c| forgot.push((i, c)),
            |_, _, _| Ok(1),
        )
        .err()
        .unwrap();
        assert!(err.contains("/data"), "{err}");
        assert_eq!(forgot, vec![(77, 1)]);
    }
}
