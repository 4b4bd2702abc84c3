//! Public attribute types: what the caller says about an entry.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// The type of a filesystem entry.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Kind {
    /// A directory.
    Dir,
    /// A regular file.
    #[default]
    File,
    /// A symbolic link.
    Symlink,
    /// A character device.
    CharDev,
    /// A block device.
    BlockDev,
    /// A named pipe.
    Fifo,
    /// A unix socket.
    Socket,
}

impl Kind {
    /// The `S_IFMT` bits of this kind.
    pub(crate) fn mode_bits(self) -> u32 {
        match self {
            Kind::Dir => libc::S_IFDIR,
            Kind::File => libc::S_IFREG,
            Kind::Symlink => libc::S_IFLNK,
            Kind::CharDev => libc::S_IFCHR,
            Kind::BlockDev => libc::S_IFBLK,
            Kind::Fifo => libc::S_IFIFO,
            Kind::Socket => libc::S_IFSOCK,
        }
    }

    /// The kind encoded in the `S_IFMT` bits of `mode`; unknown types read as files.
    pub(crate) fn from_mode(mode: u32) -> Kind {
        match mode & libc::S_IFMT {
            libc::S_IFDIR => Kind::Dir,
            libc::S_IFLNK => Kind::Symlink,
            libc::S_IFCHR => Kind::CharDev,
            libc::S_IFBLK => Kind::BlockDev,
            libc::S_IFIFO => Kind::Fifo,
            libc::S_IFSOCK => Kind::Socket,
            _ => Kind::File,
        }
    }

    pub(crate) fn file_type(self) -> fuser::FileType {
        match self {
            Kind::Dir => fuser::FileType::Directory,
            Kind::File => fuser::FileType::RegularFile,
            Kind::Symlink => fuser::FileType::Symlink,
            Kind::CharDev => fuser::FileType::CharDevice,
            Kind::BlockDev => fuser::FileType::BlockDevice,
            Kind::Fifo => fuser::FileType::NamedPipe,
            Kind::Socket => fuser::FileType::Socket,
        }
    }
}

/// The attributes of one entry.
///
/// `nlink` is ignored on input: the tree counts links itself (2 + subdirectories for a
/// directory, the number of names for anything else).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Attr {
    /// The entry type.
    pub kind: Kind,
    /// Permission bits including setuid, setgid and sticky (`0o7777`).
    pub perm: u16,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Size in bytes (regular files; symlinks report their target length).
    pub size: u64,
    /// Modification time; also reported as atime and ctime.
    pub mtime: SystemTime,
    /// Device number for devices, `makedev(major, minor)` as the kernel encodes it.
    pub rdev: u32,
    /// Link count.
    pub nlink: u32,
}

impl Default for Attr {
    fn default() -> Self {
        Attr {
            kind: Kind::File,
            perm: 0o644,
            uid: 0,
            gid: 0,
            size: 0,
            mtime: UNIX_EPOCH,
            rdev: 0,
            nlink: 1,
        }
    }
}

/// Splits a time into signed seconds and nanoseconds since the epoch, so that times
/// before 1970 survive the compact encoding.
pub(crate) fn split_time(t: SystemTime) -> (i64, u32) {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => (
            i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
            d.subsec_nanos(),
        ),
        Err(e) => {
            let d = e.duration();
            let secs = i64::try_from(d.as_secs()).unwrap_or(i64::MAX);
            if d.subsec_nanos() == 0 {
                (-secs, 0)
            } else {
                (-secs - 1, 1_000_000_000 - d.subsec_nanos())
            }
        }
    }
}

/// The inverse of [`split_time`].
pub(crate) fn join_time(secs: i64, nanos: u32) -> SystemTime {
    let nanos = Duration::from_nanos(u64::from(nanos));
    if secs >= 0 {
        UNIX_EPOCH + Duration::from_secs(secs.unsigned_abs()) + nanos
    } else {
        UNIX_EPOCH - Duration::from_secs(secs.unsigned_abs()) + nanos
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_round_trip_before_and_after_epoch() {
        for t in [
            UNIX_EPOCH,
            UNIX_EPOCH + Duration::new(1_700_000_000, 123_456_789),
            UNIX_EPOCH - Duration::new(86_400, 5),
            UNIX_EPOCH - Duration::from_secs(3),
        ] {
            let (s, n) = split_time(t);
            assert_eq!(join_time(s, n), t);
        }
    }

    #[test]
    fn mode_bits_round_trip() {
        for k in [
            Kind::Dir,
            Kind::File,
            Kind::Symlink,
            Kind::CharDev,
            Kind::BlockDev,
            Kind::Fifo,
            Kind::Socket,
        ] {
            assert_eq!(Kind::from_mode(k.mode_bits() | 0o755), k);
        }
    }
}
