//! The rules for one tar entry: its path (relative, no `..`, no empty or
//! NUL names), its kind, its link target, its device number, its owner,
//! mode, times and extended attributes, each refused by name.

use super::*;

/// Why one entry failed; [`EntryError::naming`] adds the entry's path.
#[derive(Debug)]
pub(super) enum EntryError {
    /// The entry is refused, for this reason.
    Refused(String),
    /// A host operation failed: what was being done, and why.
    Io(String, io::Error),
    /// The tar stream failed while the entry was read.
    Stream(io::Error),
}

impl EntryError {
    /// The [`UnpackError`] for the entry at `path` (as in the tar stream).
    pub(super) fn naming(self, path: &[u8]) -> UnpackError {
        let entry = String::from_utf8_lossy(path).into_owned();
        match self {
            Self::Refused(why) => UnpackError::Refused { entry, why },
            Self::Io(what, error) => UnpackError::Entry { entry, what, error },
            Self::Stream(error) => tar_error(error),
        }
    }
}

/// Maps an I/O error to an [`EntryError`] saying what was being done.
pub(super) fn failed(what: impl Into<String>) -> impl FnOnce(io::Error) -> EntryError {
    move |error| EntryError::Io(what.into(), error)
}

/// A path in the layer, as its components (none: the layer's root).
pub(super) type LayerPath = Vec<CString>;

/// Why a path cannot be in a layer.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum BadPath {
    Empty,
    Absolute,
    DotDot,
    Nul,
}

impl BadPath {
    pub(super) fn why(&self) -> &'static str {
        match self {
            Self::Empty => "empty path",
            Self::Absolute => "absolute path",
            Self::DotDot => r#"path leaves the layer ("..")"#,
            Self::Nul => "path contains a NUL byte",
        }
    }
}

/// Splits a path from the tar stream into components. Leading `./` and
/// repeated or trailing `/` are dropped; absolute paths and `..` are refused.
pub(super) fn parse_path(raw: &[u8]) -> Result<LayerPath, BadPath> {
    match raw.first() {
        None => return Err(BadPath::Empty),
        Some(b'/') => return Err(BadPath::Absolute),
        Some(_) => {}
    }
    let mut path = Vec::new();
    for component in raw.split(|&b| b == b'/') {
        match component {
            b"" | b"." => {}
            b".." => return Err(BadPath::DotDot),
            _ => path.push(CString::new(component).map_err(|_| BadPath::Nul)?),
        }
    }
    Ok(path)
}

/// A path for messages: its components joined by `/`.
pub(super) fn show(path: &[CString]) -> String {
    let bytes: Vec<&[u8]> = path.iter().map(|c| c.as_bytes()).collect();
    String::from_utf8_lossy(&bytes.join(&b'/')).into_owned()
}

/// Why a directory could not be opened by [`Unpacker::open_dir`]; each
/// variant names the directory (or the component that failed).
#[derive(Debug)]
pub(super) enum WalkError {
    /// It is a symbolic link.
    Symlink(String),
    /// It is not a directory.
    NotDirectory(String),
    /// It does not exist (and was not to be made).
    Missing(String),
    /// A host operation failed: what was being done, and why.
    Io(String, io::Error),
}

impl WalkError {
    /// The error for an entry whose parent directory could not be opened.
    pub(super) fn for_parent(self) -> EntryError {
        match self {
            Self::Symlink(p) => EntryError::Refused(format!("parent {p:?} is a symbolic link")),
            Self::NotDirectory(p) => {
                EntryError::Refused(format!("parent {p:?} is not a directory"))
            }
            Self::Missing(p) => EntryError::Refused(format!("parent {p:?} does not exist")),
            Self::Io(what, error) => EntryError::Io(what, error),
        }
    }

    /// The error for a hard link to `target` whose directory could not be opened.
    pub(super) fn for_link_target(self, target: &[u8]) -> EntryError {
        let target = String::from_utf8_lossy(target);
        match self {
            Self::Symlink(p) => EntryError::Refused(format!(
                "hard link to {target:?} goes through symbolic link {p:?}"
            )),
            Self::NotDirectory(_) | Self::Missing(_) => EntryError::Refused(format!(
                "hard link to {target:?}: target does not exist in the layer"
            )),
            Self::Io(what, error) => EntryError::Io(what, error),
        }
    }
}

/// What an entry makes on the host.
pub(super) enum Kind {
    File,
    Directory,
    /// A symbolic link to this target (stored as is).
    Symlink(CString),
    /// A hard link to this path in the layer (as in the tar stream).
    HardLink(Vec<u8>),
    /// A device or FIFO: its file type and device number.
    Node(FileType, Dev),
}

impl Kind {
    /// What `entry` makes; `None` for entries that make nothing.
    pub(super) fn of<R: Read>(entry: &tar::Entry<'_, R>) -> Result<Option<Self>, EntryError> {
        let header = entry.header();
        let kind = match header.entry_type() {
            EntryType::Regular | EntryType::Continuous => Self::File,
            EntryType::Directory => Self::Directory,
            EntryType::Symlink => {
                let target = link_name(entry)?;
                Self::Symlink(CString::new(target).map_err(|_| {
                    EntryError::Refused("link target contains a NUL byte".to_string())
                })?)
            }
            EntryType::Link => Self::HardLink(link_name(entry)?),
            EntryType::Char => Self::Node(FileType::CharacterDevice, device_number(header)?),
            EntryType::Block => Self::Node(FileType::BlockDevice, device_number(header)?),
            EntryType::Fifo => Self::Node(FileType::Fifo, 0),
            // Metadata for the whole archive, not a file.
            EntryType::XGlobalHeader => return Ok(None),
            other => {
                return Err(EntryError::Refused(format!(
                    "unsupported entry type {}",
                    type_name(other)
                )));
            }
        };
        Ok(Some(kind))
    }
}

/// A link entry's target.
pub(super) fn link_name<R: Read>(entry: &tar::Entry<'_, R>) -> Result<Vec<u8>, EntryError> {
    match entry.link_name_bytes() {
        Some(target) if !target.is_empty() => Ok(target.into_owned()),
        _ => Err(EntryError::Refused("link without a target".to_string())),
    }
}

/// A device entry's device number.
pub(super) fn device_number(header: &tar::Header) -> Result<Dev, EntryError> {
    let number = |field: io::Result<Option<u32>>| {
        field
            .map(Option::unwrap_or_default)
            .map_err(|e| EntryError::Refused(format!("malformed header: {e}")))
    };
    let major = number(header.device_major())?;
    let minor = number(header.device_minor())?;
    Ok(rustix::fs::makedev(major, minor))
}

/// An entry type, for messages: its byte, and what it is when known.
pub(super) fn type_name(kind: EntryType) -> String {
    let known = match kind {
        EntryType::GNUSparse => " (GNU sparse file)",
        EntryType::GNULongName => " (GNU long name)",
        EntryType::GNULongLink => " (GNU long link name)",
        EntryType::XHeader => " (PAX header)",
        _ => "",
    };
    format!("'{}'{known}", kind.as_byte().escape_ascii())
}

/// An entry's metadata, as it is set on the host.
pub(super) struct Metadata {
    pub(super) uid: u32,
    pub(super) gid: u32,
    /// Permission bits, with setuid, setgid and sticky.
    pub(super) mode: u32,
    pub(super) mtime: Timespec,
    /// Extended attributes, from `SCHILY.xattr.*` PAX records.
    pub(super) xattrs: Vec<(CString, Vec<u8>)>,
}

impl Metadata {
    pub(super) fn read<R: Read>(entry: &mut tar::Entry<'_, R>) -> Result<Self, EntryError> {
        let header = entry.header();
        // A blank numeric field reads as 0, as Go's archive/tar (which
        // writes most layers) and GNU tar read it.
        let blank = |raw: &[u8]| raw.iter().all(|&b| b == 0 || b == b' ');
        let old = header.as_old();
        let field = |parsed: io::Result<u64>, raw: &[u8]| match parsed {
            Err(_) if blank(raw) => Ok(0),
            other => other.map_err(|e| EntryError::Refused(format!("malformed header: {e}"))),
        };
        let uid = id(field(header.uid(), &old.uid)?)?;
        let gid = id(field(header.gid(), &old.gid)?)?;
        let mode = field(header.mode().map(u64::from), &old.mode)? as u32 & 0o7777;
        let mtime = field(header.mtime(), &old.mtime)?;
        let mut mtime = Timespec {
            tv_sec: i64::try_from(mtime)
                .map_err(|_| EntryError::Refused("modification time out of range".to_string()))?,
            tv_nsec: 0,
        };

        let mut xattrs = Vec::new();
        if let Some(records) = entry.pax_extensions().map_err(EntryError::Stream)? {
            for record in records {
                let record = record
                    .map_err(|e| EntryError::Refused(format!("malformed PAX record: {e}")))?;
                let key = record.key_bytes();
                if let Some(name) = key.strip_prefix(PAX_XATTR_PREFIX) {
                    let name = CString::new(name).map_err(|_| {
                        EntryError::Refused("extended attribute name contains a NUL byte".into())
                    })?;
                    xattrs.push((name, record.value_bytes().to_vec()));
                } else if key == b"mtime" {
                    // More precise than the header's, when there.
                    if let Some(precise) = parse_pax_time(record.value_bytes()) {
                        mtime = precise;
                    }
                }
            }
        }
        Ok(Self {
            uid,
            gid,
            mode,
            mtime,
            xattrs,
        })
    }
}

/// A user or group ID from a header. `u32::MAX` is refused: to `chown` it
/// means "leave unchanged".
pub(super) fn id(value: u64) -> Result<u32, EntryError> {
    u32::try_from(value)
        .ok()
        .filter(|&id| id != u32::MAX)
        .ok_or_else(|| EntryError::Refused(format!("owner ID {value} out of range")))
}

/// Parses a PAX time (`[-]seconds[.fraction]`).
pub(super) fn parse_pax_time(value: &[u8]) -> Option<Timespec> {
    let value = std::str::from_utf8(value).ok()?;
    let (negative, value) = match value.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, value),
    };
    let (secs, fraction) = value.split_once('.').unwrap_or((value, ""));
    if secs.is_empty()
        || !secs
            .bytes()
            .chain(fraction.bytes())
            .all(|b| b.is_ascii_digit())
    {
        return None;
    }
    let secs: i64 = secs.parse().ok()?;
    // Nanoseconds: the first nine digits of the fraction, padded with zeros.
    let nanos = fraction
        .bytes()
        .chain(std::iter::repeat(b'0'))
        .take(9)
        .fold(0, |n, digit| n * 10 + i64::from(digit - b'0'));
    Some(match (negative, nanos) {
        (false, _) => Timespec {
            tv_sec: secs,
            tv_nsec: nanos,
        },
        (true, 0) => Timespec {
            tv_sec: -secs,
            tv_nsec: 0,
        },
        (true, _) => Timespec {
            tv_sec: -secs - 1,
            tv_nsec: 1_000_000_000 - nanos,
        },
    })
}
