//! virtio-fs: a host directory shared with the guest (virtio 1.2, section
//! 5.11), served inside the VMM process.
//!
//! The guest's FUSE requests arrive on the request queue; fuse-backend-rs's
//! [`Server`] decodes each one and its [`PassthroughFs`] answers it from the
//! shared directory, writing the reply straight into the guest's buffers.
//! The passthrough file system is what keeps the guest inside the share: it
//! holds an `O_PATH` descriptor per inode and resolves every name with
//! `openat(2)` relative to its parent and `O_NOFOLLOW`, refuses names with a
//! `/`, and never follows a symlink on the host (the guest gets the link's
//! text and resolves it in its own namespace). [`Confined`] answers `..`
//! itself, from the session's record of each directory's parent with the
//! root as a fixed point: the host's `..` of a directory moved out of the
//! share (through another share that overlaps it) would climb the host's
//! tree. It refuses `.` and `..` as the name of anything made, moved or
//! removed, and refuses every request that would change a read-only share
//! here, in the VMM, whatever the guest's kernel believes.
//!
//! The device's FUSE session (inode numbers, open handles) is kept by
//! [`session`] as a path per node and handle beneath the share, saved with
//! a snapshot ([`VirtioDevice::save_state`]) and opened again, beneath the
//! share it is bound to, when the snapshot is restored (a checkpoint). A
//! warm-start snapshot is taken before the agent mounts anything, so its
//! share can be bound to another directory when it is restored.

pub mod session;

use std::ffi::{CStr, CString};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fuse_backend_rs::abi::fuse_abi::{CreateIn, FsOptions, OpenOptions, SetattrValid, stat64};
use fuse_backend_rs::api::filesystem::{
    Context, DirEntry, Entry, FileSystem, GetxattrReply, ListxattrReply, ZeroCopyReader,
    ZeroCopyWriter,
};
use fuse_backend_rs::api::server::Server;
use fuse_backend_rs::passthrough::{CachePolicy, Config, PassthroughFs};
use fuse_backend_rs::transport::{Reader, VirtioFsWriter};
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;

use self::session::{Session, SessionState};
use super::{DeviceState, PersistError, VirtioDevice};
use crate::devices::lock;

/// virtio device type of a file system device.
pub const TYPE_FS: u32 = 26;
/// High-priority queue (FORGET, INTERRUPT) and one request queue.
const QUEUE_SIZES: [u16; 2] = [128, 1024];
pub use husk_protocol::share::{Share, TAG_LEN};

/// Why a share cannot be served.
#[derive(Debug, thiserror::Error)]
#[error("cannot share {}", .0.display())]
pub struct ShareError(PathBuf, #[source] io::Error);

/// The passthrough file system of one share, with the share's write
/// policy applied: every method delegates to [`PassthroughFs`], and those
/// that would change a read-only share answer `EROFS` instead.
pub struct Confined {
    inner: PassthroughFs<()>,
    read_only: bool,
    /// Set once the guest has sent FUSE_INIT, i.e. mounted the share.
    mounted: AtomicBool,
    /// The FUSE_INIT options the guest offered (for a restore).
    capable: AtomicU64,
    /// The guest's IDs and what they stand for ([`session`]).
    session: Mutex<Session>,
}

fn erofs<T>() -> io::Result<T> {
    Err(io::Error::from_raw_os_error(libc::EROFS))
}

impl Confined {
    /// Serves `dir`: fails when it cannot be opened or is not a directory.
    pub fn new(dir: &Path, read_only: bool) -> Result<Self, ShareError> {
        let fail = |e| ShareError(dir.to_owned(), e);
        if !std::fs::metadata(dir).map_err(fail)?.is_dir() {
            return Err(fail(io::Error::from_raw_os_error(libc::ENOTDIR)));
        }
        let root_dir = dir
            .to_str()
            .ok_or_else(|| fail(io::Error::from_raw_os_error(libc::EINVAL)))?
            .to_owned();
        let cfg = Config {
            root_dir,
            // The share belongs to this VM: the guest keeps what it read
            // in its page cache across opens (FOPEN_KEEP_CACHE) instead of
            // dropping it at every open; a container's binaries are read
            // over FUSE once, not once per exec. A change made on the host
            // while the container runs may be seen late (docs/virtio-fs.md).
            cache_policy: CachePolicy::Always,
            entry_timeout: Duration::from_secs(5),
            attr_timeout: Duration::from_secs(5),
            xattr: false,
            do_import: true,
            ..Default::default()
        };
        let inner = PassthroughFs::new(cfg).map_err(fail)?;
        // import() clears the process's umask (the passthrough applies
        // the guest's own): put it back. The threads that serve the
        // guest take a umask of 0 of their own (crate::confine).
        // SAFETY: umask only reads and sets the mask.
        let umask = unsafe { libc::umask(0) };
        let imported = inner.import();
        // SAFETY: as above.
        unsafe { libc::umask(umask) };
        imported.map_err(fail)?;
        Ok(Self {
            inner,
            read_only,
            mounted: AtomicBool::new(false),
            capable: AtomicU64::new(0),
            session: Mutex::new(Session::new()),
        })
    }

    fn writable(&self) -> io::Result<()> {
        if self.read_only { erofs() } else { Ok(()) }
    }

    /// A change to the share that names entries: refused on a read-only
    /// share, and for `.` and `..`, which name no entry of their own.
    fn changes(&self, names: &[&CStr]) -> io::Result<()> {
        self.writable()?;
        if names.iter().any(|n| matches!(n.to_bytes(), b"." | b"..")) {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        Ok(())
    }

    /// The passthrough's inode for the guest's node.
    fn node(&self, node: u64) -> io::Result<u64> {
        lock(&self.session).inner(node)
    }

    /// The passthrough's handle for the guest's.
    fn handle(&self, handle: u64) -> io::Result<u64> {
        lock(&self.session).handle(handle)
    }

    fn some_handle(&self, handle: Option<u64>) -> io::Result<Option<u64>> {
        handle.map(|h| self.handle(h)).transpose()
    }

    /// The passthrough's entry for `name` in `parent`, as the guest gets it.
    fn entered(&self, parent: u64, name: &CStr, mut entry: Entry) -> Entry {
        if entry.inode != 0 {
            entry.inode = lock(&self.session).entered(
                parent,
                name.to_bytes(),
                entry.inode,
                entry.attr.st_mode & libc::S_IFMT,
            );
        }
        entry
    }

    /// Gives `entry`, just made beneath `parent` (the passthrough's inode)
    /// by the VMM's own uid, the owners the guest asked for: `ctx`'s uid,
    /// and `ctx`'s gid unless `parent` is set-gid (then the parent's group,
    /// which the kernel gave it). The set-uid and set-gid bits a chown
    /// clears from a file are set again. `entry.attr` becomes what the
    /// file is now.
    ///
    /// fuse-backend-rs makes files as the guest's user by switching the
    /// thread's effective uid and back to 0 (`set_creds`): a VMM that runs
    /// as a uid of its own with CAP_SETUID would end each such request as
    /// uid 0. Confined hands it uid 0 and gid 0, which it leaves alone, and
    /// sets the owners here (CAP_CHOWN; docs/security.md).
    fn give_owners(&self, ctx: &Context, parent: u64, entry: &mut Entry) -> io::Result<()> {
        let as_vmm = Context::default();
        let made = entry.attr;
        let uid = ctx.uid;
        let gid = {
            let (dir, _) = self.inner.getattr(&as_vmm, parent, None)?;
            if dir.st_mode & libc::S_ISGID != 0 {
                made.st_gid
            } else {
                ctx.gid
            }
        };
        if made.st_uid == uid && made.st_gid == gid {
            return Ok(());
        }
        // SAFETY: stat64 is plain data; all zeroes is a valid value.
        let mut attr: stat64 = unsafe { std::mem::zeroed() };
        attr.st_uid = uid;
        attr.st_gid = gid;
        let (mut now, _) = self.inner.setattr(
            &as_vmm,
            entry.inode,
            attr,
            None,
            SetattrValid::UID | SetattrValid::GID,
        )?;
        let special = made.st_mode & (libc::S_ISUID | libc::S_ISGID);
        let is_dir = made.st_mode & libc::S_IFMT == libc::S_IFDIR;
        let is_link = made.st_mode & libc::S_IFMT == libc::S_IFLNK;
        if special != 0 && !is_dir && !is_link && now.st_mode & special != special {
            attr.st_mode = made.st_mode & 0o7777;
            now = self
                .inner
                .setattr(&as_vmm, entry.inode, attr, None, SetattrValid::MODE)?
                .0;
        }
        entry.attr = now;
        Ok(())
    }

    /// Runs `make` (a create beneath `parent`) as the VMM, then gives what
    /// it made the guest's owners; on failure to, the entry is removed
    /// again and the guest gets the error.
    fn made_as_guest<T>(
        &self,
        ctx: &Context,
        parent: u64,
        name: &CStr,
        make: impl FnOnce(&Context) -> io::Result<T>,
        entry_of: impl Fn(&mut T) -> &mut Entry,
    ) -> io::Result<T> {
        let as_vmm = Context::default();
        let mut made = make(&as_vmm)?;
        let entry = entry_of(&mut made);
        if let Err(e) = self.give_owners(ctx, parent, entry) {
            let is_dir = entry.attr.st_mode & libc::S_IFMT == libc::S_IFDIR;
            let _ = if is_dir {
                self.inner.rmdir(&as_vmm, parent, name)
            } else {
                self.inner.unlink(&as_vmm, parent, name)
            };
            self.inner.forget(&as_vmm, entry.inode, 1);
            return Err(e);
        }
        Ok(made)
    }

    fn forget_inner(&self, ctx: &Context, counts: Option<(u64, u64)>) {
        if let Some((inode, count)) = counts {
            self.inner.forget(ctx, inode, count);
        }
    }

    fn opened(&self, node: u64, handle: Option<u64>, flags: u32, dir: bool) -> Option<u64> {
        handle.map(|h| lock(&self.session).opened(node, h, flags, dir))
    }

    /// The session as a snapshot keeps it: none before the guest mounted
    /// the share; refused (naming the file) when it cannot be taken up
    /// again.
    pub fn save(&self) -> Result<Option<SessionState>, String> {
        if !self.mounted.load(Ordering::SeqCst) {
            return Ok(None);
        }
        lock(&self.session)
            .save(self.capable.load(Ordering::SeqCst))
            .map(Some)
    }

    /// Takes up a session saved by another VMM on this share: every name
    /// looked up again, every file reopened.
    pub fn restore(&self, state: &SessionState) -> Result<(), String> {
        let capable = FsOptions::from_bits_truncate(state.capable);
        // init() imports the share again, which clears the calling
        // thread's umask, as in `new`: a restore runs on the main thread,
        // whose umask is the process's (the API socket is bound after).
        // SAFETY: umask only reads and sets the mask.
        let umask = unsafe { libc::umask(0) };
        let initialised = self.inner.init(capable);
        // SAFETY: as above.
        unsafe { libc::umask(umask) };
        initialised.map_err(|e| format!("virtio-fs init: {e}"))?;
        let ctx = Context::default();
        let session = Session::restore(
            state,
            |parent, name| {
                let e = self.inner.lookup(&ctx, parent, name).ok()?;
                (e.inode != 0).then_some((e.inode, e.attr.st_mode & libc::S_IFMT))
            },
            |inode, count| self.inner.forget(&ctx, inode, count),
            |inode, flags, dir| {
                let handle = if dir {
                    self.inner.opendir(&ctx, inode, flags)?.0
                } else {
                    self.inner.open(&ctx, inode, flags, 0)?.0
                };
                handle.ok_or_else(|| io::Error::from_raw_os_error(libc::EBADF))
            },
        )?;
        *lock(&self.session) = session;
        self.capable.store(state.capable, Ordering::SeqCst);
        self.mounted.store(true, Ordering::SeqCst);
        Ok(())
    }
}

/// Open flags that would let the caller change the file.
const WRITE_FLAGS: u32 =
    (libc::O_WRONLY | libc::O_RDWR | libc::O_TRUNC | libc::O_APPEND | libc::O_CREAT) as u32;

/// Every method translates the guest's node IDs and handles to the
/// passthrough's and back ([`Session`]), and refuses changes to a
/// read-only share.
impl FileSystem for Confined {
    type Inode = u64;
    type Handle = u64;

    fn init(&self, capable: FsOptions) -> io::Result<FsOptions> {
        self.capable.store(capable.bits(), Ordering::SeqCst);
        *lock(&self.session) = Session::new();
        self.mounted.store(true, Ordering::SeqCst);
        self.inner.init(capable)
    }
    fn destroy(&self) {
        *lock(&self.session) = Session::new();
        self.inner.destroy()
    }
    fn lookup(&self, ctx: &Context, parent: u64, name: &CStr) -> io::Result<Entry> {
        if name.to_bytes() == b".." {
            // The session's own record answers `..`: the host's `..` of a
            // directory that left the share climbs the host's tree.
            let up = lock(&self.session).parent(parent)?;
            let entry = self.inner.lookup(ctx, self.node(up)?, c".")?;
            return Ok(self.entered(up, c".", entry));
        }
        let entry = self.inner.lookup(ctx, self.node(parent)?, name)?;
        Ok(self.entered(parent, name, entry))
    }
    fn forget(&self, ctx: &Context, inode: u64, count: u64) {
        let counts = lock(&self.session).forget(inode, count);
        self.forget_inner(ctx, counts);
    }
    fn batch_forget(&self, ctx: &Context, requests: Vec<(u64, u64)>) {
        for (inode, count) in requests {
            self.forget(ctx, inode, count);
        }
    }
    fn getattr(
        &self,
        ctx: &Context,
        inode: u64,
        handle: Option<u64>,
    ) -> io::Result<(stat64, Duration)> {
        self.inner
            .getattr(ctx, self.node(inode)?, self.some_handle(handle)?)
    }
    fn setattr(
        &self,
        ctx: &Context,
        inode: u64,
        attr: stat64,
        handle: Option<u64>,
        valid: SetattrValid,
    ) -> io::Result<(stat64, Duration)> {
        self.writable()?;
        self.inner.setattr(
            ctx,
            self.node(inode)?,
            attr,
            self.some_handle(handle)?,
            valid,
        )
    }
    fn readlink(&self, ctx: &Context, inode: u64) -> io::Result<Vec<u8>> {
        self.inner.readlink(ctx, self.node(inode)?)
    }
    fn symlink(&self, ctx: &Context, link: &CStr, parent: u64, name: &CStr) -> io::Result<Entry> {
        self.changes(&[name])?;
        let dir = self.node(parent)?;
        let entry = self.made_as_guest(
            ctx,
            dir,
            name,
            |as_vmm| self.inner.symlink(as_vmm, link, dir, name),
            |e| e,
        )?;
        Ok(self.entered(parent, name, entry))
    }
    fn mknod(
        &self,
        ctx: &Context,
        parent: u64,
        name: &CStr,
        mode: u32,
        rdev: u32,
        umask: u32,
    ) -> io::Result<Entry> {
        self.changes(&[name])?;
        let dir = self.node(parent)?;
        let entry = self.made_as_guest(
            ctx,
            dir,
            name,
            |as_vmm| self.inner.mknod(as_vmm, dir, name, mode, rdev, umask),
            |e| e,
        )?;
        Ok(self.entered(parent, name, entry))
    }
    fn mkdir(
        &self,
        ctx: &Context,
        parent: u64,
        name: &CStr,
        mode: u32,
        umask: u32,
    ) -> io::Result<Entry> {
        self.changes(&[name])?;
        let dir = self.node(parent)?;
        let entry = self.made_as_guest(
            ctx,
            dir,
            name,
            |as_vmm| self.inner.mkdir(as_vmm, dir, name, mode, umask),
            |e| e,
        )?;
        Ok(self.entered(parent, name, entry))
    }
    fn unlink(&self, ctx: &Context, parent: u64, name: &CStr) -> io::Result<()> {
        self.changes(&[name])?;
        self.inner.unlink(ctx, self.node(parent)?, name)?;
        lock(&self.session).unlinked(parent, name.to_bytes());
        Ok(())
    }
    fn rmdir(&self, ctx: &Context, parent: u64, name: &CStr) -> io::Result<()> {
        self.changes(&[name])?;
        self.inner.rmdir(ctx, self.node(parent)?, name)?;
        lock(&self.session).unlinked(parent, name.to_bytes());
        Ok(())
    }
    fn rename(
        &self,
        ctx: &Context,
        olddir: u64,
        oldname: &CStr,
        newdir: u64,
        newname: &CStr,
        flags: u32,
    ) -> io::Result<()> {
        self.changes(&[oldname, newname])?;
        self.inner.rename(
            ctx,
            self.node(olddir)?,
            oldname,
            self.node(newdir)?,
            newname,
            flags,
        )?;
        lock(&self.session).renamed(
            olddir,
            oldname.to_bytes(),
            newdir,
            newname.to_bytes(),
            flags & libc::RENAME_EXCHANGE != 0,
        );
        Ok(())
    }
    fn link(&self, ctx: &Context, inode: u64, newparent: u64, newname: &CStr) -> io::Result<Entry> {
        self.changes(&[newname])?;
        let entry = self
            .inner
            .link(ctx, self.node(inode)?, self.node(newparent)?, newname)?;
        Ok(self.entered(newparent, newname, entry))
    }
    fn open(
        &self,
        ctx: &Context,
        inode: u64,
        flags: u32,
        fuse_flags: u32,
    ) -> io::Result<(Option<u64>, OpenOptions, Option<u32>)> {
        let flags = session::open_flags(flags)?;
        if flags & WRITE_FLAGS != 0 {
            self.writable()?;
        }
        let (handle, options, passthrough) =
            self.inner.open(ctx, self.node(inode)?, flags, fuse_flags)?;
        Ok((
            self.opened(inode, handle, flags, false),
            options,
            passthrough,
        ))
    }
    fn create(
        &self,
        ctx: &Context,
        parent: u64,
        name: &CStr,
        args: CreateIn,
    ) -> io::Result<(Entry, Option<u64>, OpenOptions, Option<u32>)> {
        self.changes(&[name])?;
        let args = CreateIn {
            flags: session::open_flags(args.flags)?,
            ..args
        };
        let dir = self.node(parent)?;
        let as_vmm = Context::default();
        // A create of a file that is there opens it, owners untouched; one
        // that is not makes it exclusively, for the guest's owners (a file
        // made meanwhile by another request is then opened as it is).
        let existed = match self.inner.lookup(&as_vmm, dir, name) {
            Ok(there) => {
                self.inner.forget(&as_vmm, there.inode, 1);
                true
            }
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => false,
            Err(e) => return Err(e),
        };
        let exclusive = CreateIn {
            flags: args.flags | libc::O_EXCL as u32,
            ..args
        };
        let made = if existed {
            Err(io::Error::from_raw_os_error(libc::EEXIST))
        } else {
            self.made_as_guest(
                ctx,
                dir,
                name,
                |as_vmm| self.inner.create(as_vmm, dir, name, exclusive),
                |made| &mut made.0,
            )
        };
        // The flags the passthrough's handle holds (see `read`).
        let (made, flags) = match made {
            Err(e)
                if e.raw_os_error() == Some(libc::EEXIST)
                    && args.flags & libc::O_EXCL as u32 == 0 =>
            {
                (self.inner.create(&as_vmm, dir, name, args)?, args.flags)
            }
            made => (made?, exclusive.flags),
        };
        let (entry, handle, options, passthrough) = made;
        let entry = self.entered(parent, name, entry);
        let handle = self.opened(entry.inode, handle, flags, false);
        Ok((entry, handle, options, passthrough))
    }
    fn read(
        &self,
        ctx: &Context,
        inode: u64,
        handle: u64,
        w: &mut dyn ZeroCopyWriter,
        size: u32,
        offset: u64,
        lock_owner: Option<u64>,
        _flags: u32,
    ) -> io::Result<usize> {
        // The flags the handle was opened with, never the request's
        // ([`session::open_flags`]).
        let (handle, flags) = lock(&self.session).open_file(handle)?;
        self.inner.read(
            ctx,
            self.node(inode)?,
            handle,
            w,
            size,
            offset,
            lock_owner,
            flags,
        )
    }
    fn write(
        &self,
        ctx: &Context,
        inode: u64,
        handle: u64,
        r: &mut dyn ZeroCopyReader,
        size: u32,
        offset: u64,
        lock_owner: Option<u64>,
        delayed_write: bool,
        _flags: u32,
        fuse_flags: u32,
    ) -> io::Result<usize> {
        self.writable()?;
        // As in `read`.
        let (handle, flags) = lock(&self.session).open_file(handle)?;
        self.inner.write(
            ctx,
            self.node(inode)?,
            handle,
            r,
            size,
            offset,
            lock_owner,
            delayed_write,
            flags,
            fuse_flags,
        )
    }
    fn flush(&self, ctx: &Context, inode: u64, handle: u64, lock_owner: u64) -> io::Result<()> {
        self.inner
            .flush(ctx, self.node(inode)?, self.handle(handle)?, lock_owner)
    }
    fn fsync(&self, ctx: &Context, inode: u64, datasync: bool, handle: u64) -> io::Result<()> {
        self.inner
            .fsync(ctx, self.node(inode)?, datasync, self.handle(handle)?)
    }
    fn fallocate(
        &self,
        ctx: &Context,
        inode: u64,
        handle: u64,
        mode: u32,
        offset: u64,
        length: u64,
    ) -> io::Result<()> {
        self.writable()?;
        self.inner.fallocate(
            ctx,
            self.node(inode)?,
            self.handle(handle)?,
            mode,
            offset,
            length,
        )
    }
    fn release(
        &self,
        ctx: &Context,
        inode: u64,
        flags: u32,
        handle: u64,
        flush: bool,
        flock_release: bool,
        lock_owner: Option<u64>,
    ) -> io::Result<()> {
        let inner = self.node(inode);
        let handle = lock(&self.session).released(handle)?;
        self.inner
            .release(ctx, inner?, flags, handle, flush, flock_release, lock_owner)
    }
    fn statfs(&self, ctx: &Context, inode: u64) -> io::Result<libc::statvfs64> {
        let mut st = self.inner.statfs(ctx, self.node(inode)?)?;
        if self.read_only {
            st.f_flag |= libc::ST_RDONLY;
        }
        Ok(st)
    }
    fn setxattr(
        &self,
        ctx: &Context,
        inode: u64,
        name: &CStr,
        value: &[u8],
        flags: u32,
    ) -> io::Result<()> {
        self.writable()?;
        self.inner
            .setxattr(ctx, self.node(inode)?, name, value, flags)
    }
    fn getxattr(
        &self,
        ctx: &Context,
        inode: u64,
        name: &CStr,
        size: u32,
    ) -> io::Result<GetxattrReply> {
        self.inner.getxattr(ctx, self.node(inode)?, name, size)
    }
    fn listxattr(&self, ctx: &Context, inode: u64, size: u32) -> io::Result<ListxattrReply> {
        self.inner.listxattr(ctx, self.node(inode)?, size)
    }
    fn removexattr(&self, ctx: &Context, inode: u64, name: &CStr) -> io::Result<()> {
        self.writable()?;
        self.inner.removexattr(ctx, self.node(inode)?, name)
    }
    fn opendir(
        &self,
        ctx: &Context,
        inode: u64,
        flags: u32,
    ) -> io::Result<(Option<u64>, OpenOptions)> {
        let flags = session::open_flags(flags)?;
        let (handle, options) = self.inner.opendir(ctx, self.node(inode)?, flags)?;
        Ok((self.opened(inode, handle, flags, true), options))
    }
    fn readdir(
        &self,
        ctx: &Context,
        inode: u64,
        handle: u64,
        size: u32,
        offset: u64,
        add_entry: &mut dyn FnMut(DirEntry) -> io::Result<usize>,
    ) -> io::Result<()> {
        self.inner.readdir(
            ctx,
            self.node(inode)?,
            self.handle(handle)?,
            size,
            offset,
            add_entry,
        )
    }
    fn readdirplus(
        &self,
        ctx: &Context,
        inode: u64,
        handle: u64,
        size: u32,
        offset: u64,
        add_entry: &mut dyn FnMut(DirEntry, Entry) -> io::Result<usize>,
    ) -> io::Result<()> {
        self.inner.readdirplus(
            ctx,
            self.node(inode)?,
            self.handle(handle)?,
            size,
            offset,
            &mut |dir_entry, entry| {
                // The entry's name, without its NUL.
                let name = CString::new(dir_entry.name).unwrap_or_default();
                let entry = self.entered(inode, &name, entry);
                let node = entry.inode;
                let added = add_entry(dir_entry, entry)?;
                if added == 0 && node != 0 {
                    // Out of room: the passthrough takes its lookup back.
                    let counts = lock(&self.session).unentered(node);
                    self.forget_inner(ctx, counts);
                }
                Ok(added)
            },
        )
    }
    fn fsyncdir(&self, ctx: &Context, inode: u64, datasync: bool, handle: u64) -> io::Result<()> {
        self.inner
            .fsyncdir(ctx, self.node(inode)?, datasync, self.handle(handle)?)
    }
    fn releasedir(&self, ctx: &Context, inode: u64, flags: u32, handle: u64) -> io::Result<()> {
        let inner = self.node(inode);
        let handle = lock(&self.session).released(handle)?;
        self.inner.releasedir(ctx, inner?, flags, handle)
    }
    fn access(&self, ctx: &Context, inode: u64, mask: u32) -> io::Result<()> {
        if mask & libc::W_OK as u32 != 0 {
            self.writable()?;
        }
        self.inner.access(ctx, self.node(inode)?, mask)
    }
    fn lseek(
        &self,
        ctx: &Context,
        inode: u64,
        handle: u64,
        offset: u64,
        whence: u32,
    ) -> io::Result<u64> {
        self.inner
            .lseek(ctx, self.node(inode)?, self.handle(handle)?, offset, whence)
    }
}

/// The virtio-fs device of one share.
pub struct Fs {
    tag: String,
    fs: Arc<Confined>,
    server: Server<Arc<Confined>>,
}

impl Fs {
    /// A save or restore of this share's session that failed, and why.
    fn failed(&self, why: String) -> PersistError {
        PersistError::Device {
            device: format!("virtio-fs share {:?}", self.tag),
            why,
        }
    }

    /// A device serving `share`.
    pub fn new(share: &Share) -> Result<Self, ShareError> {
        let fs = Arc::new(Confined::new(&share.dir, share.read_only)?);
        Ok(Self {
            tag: share.tag.clone(),
            server: Server::new(fs.clone()),
            fs,
        })
    }

    /// The tag the guest mounts it by.
    pub fn tag(&self) -> &str {
        &self.tag
    }

    /// Answers one FUSE request; returns the bytes written into the
    /// guest's reply buffers.
    fn serve(
        &self,
        mem: &GuestMemoryMmap,
        chain: virtio_queue::DescriptorChain<&GuestMemoryMmap>,
    ) -> u32 {
        let Ok(reader) = Reader::from_descriptor_chain(mem, chain.clone()) else {
            return 0;
        };
        let Ok(writer) = VirtioFsWriter::new(mem, chain) else {
            return 0;
        };
        // A request the server cannot decode gets no reply bytes; the
        // guest's driver fails that request and goes on.
        self.server
            .handle_message(reader, writer.into(), None, None)
            .map_or(0, |n| n as u32)
    }
}

impl VirtioDevice for Fs {
    fn device_type(&self) -> u32 {
        TYPE_FS
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_SIZES
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // struct virtio_fs_config { u8 tag[36]; le32 num_request_queues; }
        let mut config = [0u8; TAG_LEN + 4];
        config[..self.tag.len()].copy_from_slice(self.tag.as_bytes());
        config[TAG_LEN..].copy_from_slice(&1u32.to_le_bytes());
        data.fill(0);
        if let Some(src) = config.get(offset as usize..) {
            let n = src.len().min(data.len());
            data[..n].copy_from_slice(&src[..n]);
        }
    }

    fn process_queue(&mut self, _index: usize, queue: &mut Queue, mem: &GuestMemoryMmap) -> bool {
        let mut used = false;
        while let Some(chain) = queue.pop_descriptor_chain(mem) {
            let head = chain.head_index();
            let written = self.serve(mem, chain);
            if queue.add_used(mem, head, written).is_err() {
                break;
            }
            used = true;
        }
        used
    }

    fn save_state(&self) -> Result<Option<DeviceState>, PersistError> {
        let saved = self.fs.save().map_err(|why| self.failed(why))?;
        Ok(saved.map(DeviceState::Fs))
    }

    fn restore_state(&mut self, state: &DeviceState) -> Result<(), PersistError> {
        let DeviceState::Fs(state) = state else {
            return Err(PersistError::NotMine { device: TYPE_FS });
        };
        self.fs.restore(state).map_err(|why| self.failed(why))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A share with a file, a directory, and symlinks that point out of
    /// it; a secret next to the share.
    fn tree(name: &str) -> PathBuf {
        let base = std::env::temp_dir().join(format!("husk-fs-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&base);
        let share = base.join("share");
        std::fs::create_dir_all(share.join("dir")).unwrap();
        std::fs::write(share.join("file"), b"inside").unwrap();
        std::fs::write(base.join("secret"), b"HOST-SECRET").unwrap();
        std::os::unix::fs::symlink(base.join("secret"), share.join("abs")).unwrap();
        std::os::unix::fs::symlink("..", share.join("up")).unwrap();
        std::os::unix::fs::symlink(&base, share.join("outside")).unwrap();
        share
    }

    fn name(s: &str) -> std::ffi::CString {
        std::ffi::CString::new(s).unwrap()
    }

    const ROOT: u64 = 1;

    #[test]
    fn requests_a_hostile_guest_kernel_could_send_stay_in_the_share() {
        let share = tree("confine");
        let fs = Confined::new(&share, false).unwrap();
        fs.init(FsOptions::empty()).unwrap();
        let ctx = Context::default();
        // `..` of the root is the root.
        let up = fs.lookup(&ctx, ROOT, &name("..")).unwrap();
        assert_eq!(up.inode, ROOT);
        // Names with a slash are refused, whatever they say.
        for bad in ["../secret", "dir/../../secret", "/etc"] {
            let err = fs.lookup(&ctx, ROOT, &name(bad)).unwrap_err();
            assert_eq!(err.raw_os_error(), Some(libc::EINVAL), "{bad}");
        }
        // A symlink is an inode of its own: its text is returned, never
        // followed, and nothing can be looked up through it.
        for link in ["abs", "up", "outside"] {
            let entry = fs.lookup(&ctx, ROOT, &name(link)).unwrap();
            assert_eq!(entry.attr.st_mode & libc::S_IFMT, libc::S_IFLNK, "{link}");
            assert!(fs.readlink(&ctx, entry.inode).is_ok());
            assert!(
                fs.lookup(&ctx, entry.inode, &name("secret")).is_err(),
                "{link}"
            );
            // Opening it is refused too (O_NOFOLLOW on the host).
            assert!(
                fs.open(&ctx, entry.inode, libc::O_RDONLY as u32, 0)
                    .is_err(),
                "{link}"
            );
        }
        // Hard links and renames take names in the share only: a target
        // name with a slash is refused before the host sees it.
        let file = fs.lookup(&ctx, ROOT, &name("file")).unwrap();
        let err = fs
            .link(&ctx, file.inode, ROOT, &name("../stolen"))
            .unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EINVAL));
        let err = fs
            .rename(&ctx, ROOT, &name("file"), ROOT, &name("../moved"), 0)
            .unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EINVAL));
        assert!(!share.parent().unwrap().join("stolen").exists());
        assert!(!share.parent().unwrap().join("moved").exists());
        assert!(share.join("file").exists());
        std::fs::remove_dir_all(share.parent().unwrap()).unwrap();
    }

    /// Issue 18: what the guest makes gets the guest's owners, made by the
    /// VMM's own uid and chowned (the passthrough's uid switch is never
    /// used): files, directories, FIFOs, symlinks; the parent's group in a
    /// set-gid directory; set-uid bits kept; a create of a file that is
    /// there leaves its owners alone.
    #[test]
    fn files_the_guest_makes_get_its_owners() {
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        let share = tree("owners");
        let sgid = share.join("sgid");
        std::fs::create_dir(&sgid).unwrap();
        std::os::unix::fs::chown(&sgid, None, Some(2000)).unwrap();
        std::fs::set_permissions(&sgid, std::fs::Permissions::from_mode(0o2777)).unwrap();
        let fs = Confined::new(&share, false).unwrap();
        fs.init(FsOptions::empty()).unwrap();
        let guest = Context {
            uid: 1000,
            gid: 1001,
            pid: 1,
        };
        let owners = |p: &str| {
            let m = std::fs::symlink_metadata(share.join(p)).unwrap();
            (m.uid(), m.gid())
        };
        let args = |mode: u32, flags: i32| CreateIn {
            flags: flags as u32,
            mode: libc::S_IFREG | mode,
            umask: 0,
            fuse_flags: 0,
        };
        let (made, _, _, _) = fs
            .create(&guest, ROOT, &name("new"), args(0o644, libc::O_RDWR))
            .unwrap();
        assert_eq!((made.attr.st_uid, made.attr.st_gid), (1000, 1001));
        assert_eq!(owners("new"), (1000, 1001));
        fs.mkdir(&guest, ROOT, &name("d"), 0o755, 0).unwrap();
        assert_eq!(owners("d"), (1000, 1001));
        fs.mknod(&guest, ROOT, &name("fifo"), libc::S_IFIFO | 0o600, 0, 0)
            .unwrap();
        assert_eq!(owners("fifo"), (1000, 1001));
        fs.symlink(&guest, &name("target"), ROOT, &name("link"))
            .unwrap();
        assert_eq!(owners("link"), (1000, 1001));
        // A set-gid directory gives its group.
        let dir = fs.lookup(&guest, ROOT, &name("sgid")).unwrap().inode;
        fs.create(&guest, dir, &name("f"), args(0o644, libc::O_RDWR))
            .unwrap();
        assert_eq!(owners("sgid/f"), (1000, 2000));
        // Set-uid and set-gid bits survive the chown.
        fs.create(&guest, ROOT, &name("suid"), args(0o6755, libc::O_RDWR))
            .unwrap();
        let mode = std::fs::metadata(share.join("suid")).unwrap().mode();
        assert_eq!(mode & 0o7777, 0o6755, "{mode:o}");
        // Root's file, opened with O_CREAT by the guest's user: untouched.
        let (there, _, _, _) = fs
            .create(&guest, ROOT, &name("file"), args(0o644, libc::O_RDWR))
            .unwrap();
        assert_eq!(there.attr.st_uid, 0);
        assert_eq!(owners("file"), (0, 0));
        // O_EXCL on a file that is there: EEXIST, as on any file system.
        let err = fs
            .create(
                &guest,
                ROOT,
                &name("file"),
                args(0o644, libc::O_RDWR | libc::O_EXCL),
            )
            .unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EEXIST));
        std::fs::remove_dir_all(share.parent().unwrap()).unwrap();
    }

    fn ino(path: &Path) -> u64 {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(path).unwrap().ino()
    }

    /// Issue 14: two shares that overlap on the host, one inside the
    /// other (a volume inside the rootfs). The guest moves a directory of
    /// the inner share out of it through the outer one, then climbs `..`
    /// from its node in the inner share: the session's record answers,
    /// so it stops at the inner share's root and never reaches the
    /// outer share's directories, the host's, or `/`.
    #[test]
    fn dotdot_after_a_move_through_an_overlapping_share_stops_at_the_root() {
        let outer = tree("overlap");
        let base = outer.parent().unwrap().to_owned();
        let inner = outer.join("dir");
        std::fs::create_dir_all(inner.join("sub/deep")).unwrap();
        std::fs::create_dir_all(inner.join("x")).unwrap();
        std::fs::write(inner.join("sub/deep/f"), b"f").unwrap();
        std::fs::create_dir_all(outer.join("y")).unwrap();
        let x_ino = ino(&inner.join("x"));
        let ctx = Context::default();
        let a = Confined::new(&outer, false).unwrap();
        let b = Confined::new(&inner, false).unwrap();
        a.init(FsOptions::empty()).unwrap();
        b.init(FsOptions::empty()).unwrap();
        let sub = b.lookup(&ctx, ROOT, &name("sub")).unwrap().inode;
        let deep = b.lookup(&ctx, sub, &name("deep")).unwrap().inode;
        let x = b.lookup(&ctx, ROOT, &name("x")).unwrap().inode;
        let f = b.lookup(&ctx, deep, &name("f")).unwrap().inode;

        // Through the outer share: sub leaves the inner share; x and the
        // outer share's y swap places (RENAME_EXCHANGE).
        let a_dir = a.lookup(&ctx, ROOT, &name("dir")).unwrap().inode;
        a.rename(&ctx, a_dir, &name("sub"), ROOT, &name("sub"), 0)
            .unwrap();
        a.rename(
            &ctx,
            a_dir,
            &name("x"),
            ROOT,
            &name("y"),
            libc::RENAME_EXCHANGE,
        )
        .unwrap();
        assert!(outer.join("sub/deep/f").exists());
        assert_eq!(ino(&outer.join("y")), x_ino);

        // Every `..` chain from the moved nodes ends at the inner root.
        let forbidden = [ino(&outer), ino(&base), ino(Path::new("/"))];
        for start in [deep, sub, x] {
            let mut at = start;
            for _ in 0..8 {
                let up = b.lookup(&ctx, at, &name("..")).unwrap();
                assert!(
                    !forbidden.contains(&up.attr.st_ino),
                    "`..` from node {start} reached a directory outside the share"
                );
                at = up.inode;
            }
            assert_eq!(at, ROOT, "from node {start}");
        }
        assert_eq!(b.getattr(&ctx, ROOT, None).unwrap().0.st_ino, ino(&inner));
        // From the inner root, nothing of the host is a name.
        for gone in ["secret", "share", "overlap"] {
            assert!(b.lookup(&ctx, ROOT, &name(gone)).is_err(), "{gone}");
        }
        // `..` of a file, and of a node the guest never had.
        let err = b.lookup(&ctx, f, &name("..")).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::ENOTDIR));
        assert!(b.lookup(&ctx, 999, &name("..")).is_err());
        // `.` and `..` name no entry that could be made, moved or linked.
        let einval =
            |r: io::Result<()>| assert_eq!(r.unwrap_err().raw_os_error(), Some(libc::EINVAL));
        einval(b.rename(&ctx, ROOT, &name("y"), sub, &name(".."), 0));
        einval(b.rename(&ctx, sub, &name(".."), ROOT, &name("z"), 0));
        einval(b.link(&ctx, f, sub, &name("..")).map(|_| ()));
        einval(b.mkdir(&ctx, deep, &name(".."), 0o755, 0).map(|_| ()));
        einval(b.symlink(&ctx, &name("/"), deep, &name(".")).map(|_| ()));
        einval(b.unlink(&ctx, deep, &name("..")));
        einval(b.rmdir(&ctx, deep, &name("..")));
        // A hard link made from the stale node lands in the inner share
        // by the name asked for, and nowhere else.
        b.link(&ctx, f, ROOT, &name("h")).unwrap();
        assert_eq!(std::fs::read(inner.join("h")).unwrap(), b"f");
        assert!(!base.join("h").exists());
        std::fs::remove_dir_all(&base).unwrap();
    }

    #[test]
    fn a_read_only_share_refuses_every_change() {
        let share = tree("ro");
        let fs = Confined::new(&share, true).unwrap();
        fs.init(FsOptions::empty()).unwrap();
        let ctx = Context::default();
        let erofs =
            |r: io::Result<()>| assert_eq!(r.unwrap_err().raw_os_error(), Some(libc::EROFS));
        let file = fs.lookup(&ctx, ROOT, &name("file")).unwrap();
        // Reading works.
        let (handle, _, _) = fs.open(&ctx, file.inode, libc::O_RDONLY as u32, 0).unwrap();
        assert!(handle.is_some());
        // Every way of changing it does not.
        for flags in [libc::O_WRONLY, libc::O_RDWR, libc::O_RDONLY | libc::O_TRUNC] {
            erofs(fs.open(&ctx, file.inode, flags as u32, 0).map(|_| ()));
        }
        erofs(fs.mkdir(&ctx, ROOT, &name("new"), 0o755, 0).map(|_| ()));
        erofs(fs.unlink(&ctx, ROOT, &name("file")));
        erofs(fs.rmdir(&ctx, ROOT, &name("dir")));
        erofs(fs.rename(&ctx, ROOT, &name("file"), ROOT, &name("f2"), 0));
        erofs(fs.symlink(&ctx, &name("/"), ROOT, &name("l")).map(|_| ()));
        erofs(fs.link(&ctx, file.inode, ROOT, &name("h")).map(|_| ()));
        erofs(
            fs.mknod(&ctx, ROOT, &name("n"), libc::S_IFIFO | 0o644, 0, 0)
                .map(|_| ()),
        );
        erofs(fs.access(&ctx, file.inode, libc::W_OK as u32));
        erofs(fs.setxattr(&ctx, file.inode, &name("user.x"), b"1", 0));
        erofs(fs.removexattr(&ctx, file.inode, &name("user.x")));
        let st = fs.statfs(&ctx, ROOT).unwrap();
        assert_ne!(st.f_flag & libc::ST_RDONLY, 0);
        assert_eq!(std::fs::read(share.join("file")).unwrap(), b"inside");
        assert!(!share.join("new").exists());
        std::fs::remove_dir_all(share.parent().unwrap()).unwrap();
    }

    /// What a guest reads through a handle, at an offset.
    fn read_at(fs: &Confined, node: u64, handle: u64, offset: u64) -> Vec<u8> {
        read_with(fs, node, handle, offset, 0).unwrap()
    }

    /// `read_at`, with the request's open flags.
    fn read_with(
        fs: &Confined,
        node: u64,
        handle: u64,
        offset: u64,
        flags: u32,
    ) -> io::Result<Vec<u8>> {
        struct Sink(Vec<u8>);
        impl ZeroCopyWriter for Sink {
            fn write_from(
                &mut self,
                f: &mut dyn fuse_backend_rs::file_traits::FileReadWriteVolatile,
                count: usize,
                off: u64,
            ) -> io::Result<usize> {
                let mut buf = vec![0u8; count];
                let n = f.read_at_volatile(
                    // SAFETY: buf outlives the slice made of it.
                    unsafe {
                        fuse_backend_rs::file_buf::FileVolatileSlice::from_mut_slice(&mut buf)
                    },
                    off,
                )?;
                self.0.extend_from_slice(&buf[..n]);
                Ok(n)
            }
            fn available_bytes(&self) -> usize {
                usize::MAX
            }
        }
        impl io::Write for Sink {
            fn write(&mut self, b: &[u8]) -> io::Result<usize> {
                self.0.extend_from_slice(b);
                Ok(b.len())
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        let mut sink = Sink(Vec::new());
        fs.read(
            &Context::default(),
            node,
            handle,
            &mut sink,
            4096,
            offset,
            None,
            flags,
        )?;
        Ok(sink.0)
    }

    /// The fuzzer's find (fuzz/corpus/virtio_fs): a read whose request
    /// carried open flags the handle's descriptor refuses made
    /// fuse-backend-rs close that descriptor while the handle kept it, so
    /// the handle's release closed it again (whatever had reused the
    /// number). A read or write now passes its handle's own flags, and
    /// open flags no guest kernel sends are refused at the open.
    #[test]
    fn request_flags_cannot_close_a_handles_descriptor() {
        // tmpfs, which refuses O_DIRECT.
        let base = Path::new("/dev/shm").join(format!("husk-fs-flags-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&base);
        std::fs::create_dir_all(base.join("dir")).unwrap();
        std::fs::write(base.join("file"), b"inside").unwrap();
        let fs = Confined::new(&base, false).unwrap();
        fs.init(FsOptions::empty()).unwrap();
        let ctx = Context::default();
        let file = fs.lookup(&ctx, ROOT, &name("file")).unwrap().inode;
        let dir = fs.lookup(&ctx, ROOT, &name("dir")).unwrap().inode;
        // An append-only file, opened for appending: the host refuses to
        // take O_APPEND off its descriptor, even for root.
        let append_only = |on: bool| {
            const FS_IOC_SETFLAGS: libc::c_ulong = 0x4008_6602;
            const FS_APPEND_FL: libc::c_long = 0x20;
            let f = std::fs::File::open(base.join("file")).unwrap();
            let attr: libc::c_long = if on { FS_APPEND_FL } else { 0 };
            let fd = std::os::fd::AsRawFd::as_raw_fd(&f);
            // SAFETY: the ioctl reads one long from a live local.
            let rc = unsafe { libc::ioctl(fd, FS_IOC_SETFLAGS, &attr) };
            assert_eq!(rc, 0, "{}", io::Error::last_os_error());
        };
        append_only(true);
        let appending = (libc::O_RDWR | libc::O_APPEND) as u32;
        let (handle, _, _) = fs.open(&ctx, file, appending, 0).unwrap();
        let handle = handle.unwrap();
        let mut reads: Vec<_> = [libc::O_RDWR, libc::O_RDWR | libc::O_DIRECT, libc::O_PATH]
            .into_iter()
            .map(|flags| (flags, read_with(&fs, file, handle, 0, flags as u32)))
            .collect();
        // The descriptor is still the handle's.
        reads.push((-1, read_with(&fs, file, handle, 2, 0)));
        let released = fs.release(&ctx, file, 0, handle, false, false, None);
        // Off before any assertion, so that a failure leaves nothing
        // undeletable behind.
        append_only(false);
        for (flags, read) in reads {
            let want: &[u8] = if flags == -1 { b"side" } else { b"inside" };
            assert_eq!(read.unwrap(), want, "{flags:o}");
        }
        released.unwrap();
        // O_PATH and O_TMPFILE are refused; O_DIRECT is dropped.
        let tmpfile = (libc::O_TMPFILE | libc::O_RDWR) as u32;
        for (node, flags) in [(file, libc::O_PATH as u32), (dir, tmpfile)] {
            let err = fs.open(&ctx, node, flags, 0).unwrap_err();
            assert_eq!(err.raw_os_error(), Some(libc::EINVAL), "{flags:o}");
        }
        let err = fs.opendir(&ctx, dir, tmpfile).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EINVAL));
        let direct = (libc::O_RDONLY | libc::O_DIRECT) as u32;
        let (handle, _, _) = fs.open(&ctx, file, direct, 0).unwrap();
        assert_eq!(read_at(&fs, file, handle.unwrap(), 0), b"inside");
        let args = CreateIn {
            flags: (libc::O_RDWR | libc::O_DIRECT) as u32,
            mode: libc::S_IFREG | 0o644,
            umask: 0,
            fuse_flags: 0,
        };
        let (made, handle, _, _) = fs.create(&ctx, ROOT, &name("new"), args).unwrap();
        assert_eq!(read_at(&fs, made.inode, handle.unwrap(), 0), b"");
        // Nothing but the file made by name is in the share.
        let mut names: Vec<_> = std::fs::read_dir(&base)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        names.sort();
        assert_eq!(names, ["dir", "file", "new"]);
        assert_eq!(std::fs::read_dir(base.join("dir")).unwrap().count(), 0);
        std::fs::remove_dir_all(&base).unwrap();
    }

    /// Opening a FIFO, socket or device node in a share is refused at
    /// once (the passthrough opens only files and directories): no vCPU
    /// thread waits for a writer that may never come.
    #[test]
    fn only_files_and_directories_open() {
        let share = tree("fifo");
        let fs = Confined::new(&share, false).unwrap();
        fs.init(FsOptions::empty()).unwrap();
        let ctx = Context::default();
        fs.mknod(&ctx, ROOT, &name("fifo"), libc::S_IFIFO | 0o666, 0, 0)
            .unwrap();
        let fifo = fs.lookup(&ctx, ROOT, &name("fifo")).unwrap().inode;
        for flags in [libc::O_RDONLY, libc::O_WRONLY, libc::O_RDWR] {
            let err = fs.open(&ctx, fifo, flags as u32, 0).unwrap_err();
            assert_eq!(err.raw_os_error(), Some(libc::EBADF), "{flags:o}");
        }
        // Nor through a create of its name.
        let args = CreateIn {
            flags: libc::O_RDONLY as u32,
            mode: libc::S_IFREG | 0o644,
            umask: 0,
            fuse_flags: 0,
        };
        let err = fs.create(&ctx, ROOT, &name("fifo"), args).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EBADF));
        std::fs::remove_dir_all(share.parent().unwrap()).unwrap();
    }

    #[test]
    fn a_session_saved_on_one_share_is_taken_up_on_a_copy_of_it() {
        let share = tree("session");
        let ctx = Context::default();
        let fs = Confined::new(&share, false).unwrap();
        assert_eq!(fs.save().unwrap(), None, "nothing to save before a mount");
        fs.init(FsOptions::empty()).unwrap();
        let dir = fs.lookup(&ctx, ROOT, &name("dir")).unwrap().inode;
        std::fs::write(share.join("dir/notes"), b"before").unwrap();
        let notes = fs.lookup(&ctx, dir, &name("notes")).unwrap().inode;
        let (h, _, _) = fs.open(&ctx, notes, libc::O_RDWR as u32, 0).unwrap();
        let h = h.unwrap();
        fs.rename(&ctx, ROOT, &name("file"), dir, &name("moved"), 0)
            .unwrap();
        let moved = fs.lookup(&ctx, dir, &name("moved")).unwrap().inode;
        let saved = fs.save().unwrap().unwrap();

        // Another directory with the same files: the guest's IDs reach
        // them there.
        let copy = share.parent().unwrap().join("copy");
        let status = std::process::Command::new("cp")
            .arg("-a")
            .arg(&share)
            .arg(&copy)
            .status()
            .unwrap();
        assert!(status.success());
        std::fs::write(copy.join("dir/notes"), b"in the copy").unwrap();
        let taken = Confined::new(&copy, false).unwrap();
        // SAFETY: umask only reads and sets the mask.
        let before = unsafe { libc::umask(0o077) };
        taken.restore(&saved).unwrap();
        // SAFETY: as above.
        let after = unsafe { libc::umask(before) };
        assert_eq!(after, 0o077, "a restore leaves the umask as it was");
        assert_eq!(read_at(&taken, notes, h, 0), b"in the copy");
        assert_eq!(read_at(&taken, notes, h, 3), b"the copy");
        let (attr, _) = taken.getattr(&ctx, moved, None).unwrap();
        assert_eq!(attr.st_size, 6, "the renamed file, by its new name");
        // New lookups go on from there; the old IDs still name their
        // files.
        assert_eq!(
            taken.lookup(&ctx, dir, &name("notes")).unwrap().inode,
            notes
        );
        // A handle the guest never had is refused, not mistaken for one.
        assert!(taken.flush(&ctx, notes, h + 100, 0).is_err());

        // An open file that was deleted cannot be saved.
        taken.unlink(&ctx, dir, &name("notes")).unwrap();
        let err = taken.save().unwrap_err();
        assert!(err.contains("/dir/notes, which was deleted"), "{err}");
        taken
            .release(&ctx, notes, 0, h, false, false, None)
            .unwrap();
        assert!(taken.save().unwrap().is_some());
        std::fs::remove_dir_all(share.parent().unwrap()).unwrap();
    }

    #[test]
    fn the_config_space_holds_the_tag_and_one_request_queue() {
        let dir = std::env::temp_dir();
        let device = Fs::new(&Share {
            tag: "rootfs".into(),
            dir: dir.clone(),
            read_only: true,
        })
        .unwrap();
        assert_eq!(device.save_state().unwrap(), None, "not mounted yet");
        let mut config = [0xffu8; TAG_LEN + 4];
        device.read_config(0, &mut config);
        assert_eq!(&config[..6], b"rootfs");
        assert!(config[6..TAG_LEN].iter().all(|&b| b == 0));
        assert_eq!(&config[TAG_LEN..], &1u32.to_le_bytes());
        let mut tail = [0u8; 4];
        device.read_config(TAG_LEN as u64, &mut tail);
        assert_eq!(u32::from_le_bytes(tail), 1);
    }

    #[test]
    fn a_missing_or_non_directory_share_is_refused() {
        let err = Confined::new(Path::new("/nonexistent/husk"), false)
            .err()
            .unwrap();
        assert_eq!(err.to_string(), "cannot share /nonexistent/husk");
        let file = std::env::temp_dir().join(format!("husk-fs-test-{}", std::process::id()));
        std::fs::write(&file, b"x").unwrap();
        let err = Confined::new(&file, false).err().unwrap();
        std::fs::remove_file(&file).unwrap();
        assert!(
            std::error::Error::source(&err)
                .unwrap()
                .to_string()
                .contains("Not a directory")
        );
    }
}
