//! Mounting and unmounting.
//!
//! We call mount(2) ourselves rather than let fuser do it, for three reasons: the type
//! shows as `fuse.lazysnap` (so leftover mounts are easy to find after a crash), unmount
//! is a lazy detach (a mount that overlayfs still uses keeps working until released, as
//! unlazy needs), and we recognise our own mount by its mount id before detaching, so a
//! later mount on the same path is never touched. This needs CAP_SYS_ADMIN.

use std::{
    fmt,
    fs::OpenOptions,
    io,
    os::{
        fd::{AsRawFd, OwnedFd},
        unix::fs::OpenOptionsExt,
    },
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use fuser::BackgroundSession;
use nix::mount::{MntFlags, MsFlags};
use tracing::{info, warn};

use crate::{Content, Error, Tree, fs, mountinfo, passthrough::OpenTable};

pub(crate) mod handover;

/// The filesystem subtype: mounts show as `fuse.lazysnap`.
pub(crate) const FS_TYPE: &str = "fuse.lazysnap";
/// How long unmount waits for the session to end before leaving it to serve the
/// remaining users of a detached mount.
const JOIN_TIMEOUT: Duration = Duration::from_secs(5);

/// How to mount a tree.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MountOptions {
    /// The mount source shown in mountinfo.
    pub fs_name: String,
    /// FUSE threads, each with its own `/dev/fuse` fd.
    pub threads: usize,
    /// How long the kernel caches names (and absent names).
    pub entry_timeout: Duration,
    /// How long the kernel caches attributes.
    pub attr_timeout: Duration,
    /// Let users other than the mounter in (containers run as any uid).
    pub allow_other: bool,
    /// Open fully local files in FUSE passthrough mode when the kernel supports it.
    pub passthrough: bool,
}

impl Default for MountOptions {
    fn default() -> Self {
        MountOptions {
            fs_name: "lazysnap".into(),
            threads: 4,
            entry_timeout: Duration::from_secs(1),
            attr_timeout: Duration::from_secs(1),
            allow_other: true,
            passthrough: true,
        }
    }
}

/// A live mount. Dropping it unmounts (a lazy detach) and joins the session.
pub struct Mount {
    mountpoint: PathBuf,
    /// mountinfo id and device of our mount, to recognise it at unmount.
    mount_id: u64,
    dev: String,
    session: Option<BackgroundSession>,
    passthrough: Arc<AtomicBool>,
    /// What a successor needs to take the mount over (see `handover`).
    kept: handover::Kept,
}

/// Mounts `tree` read-only at `mountpoint`, reading file bytes from `content`.
pub fn mount(
    tree: Arc<Tree>,
    content: Arc<dyn Content>,
    mountpoint: &Path,
    opts: &MountOptions,
) -> Result<Mount, Error> {
    let fail = |source: io::Error| Error::Mount {
        mountpoint: mountpoint.to_path_buf(),
        source,
    };
    let mountpoint = mountpoint.canonicalize().map_err(fail)?;
    let dev_fuse = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_CLOEXEC)
        .open("/dev/fuse")
        .map_err(fail)?;
    let root_perm = u32::from(tree.attr(tree.root()).perm);
    let mut data = format!(
        "fd={},rootmode={:o},user_id={},group_id={},default_permissions",
        dev_fuse.as_raw_fd(),
        libc::S_IFDIR | root_perm,
        nix::unistd::getuid(),
        nix::unistd::getgid(),
    );
    if opts.allow_other {
        data.push_str(",allow_other");
    }
    let source = if opts.fs_name.is_empty() {
        "lazysnap"
    } else {
        opts.fs_name.as_str()
    };
    // nosuid and nodev as go-fuse mounts do: overlayfs checks those on its own mount.
    let flags = MsFlags::MS_RDONLY | MsFlags::MS_NOSUID | MsFlags::MS_NODEV;
    nix::mount::mount(
        Some(source),
        &mountpoint,
        Some(FS_TYPE),
        flags,
        Some(data.as_str()),
    )
    .map_err(|e| fail(e.into()))?;

    // From here on a failure must not leave the mount behind.
    let detach_on_error = |source: io::Error| {
        if let Err(e) = nix::mount::umount2(&mountpoint, MntFlags::MNT_DETACH) {
            warn!(mountpoint = %mountpoint.display(), "cleanup unmount failed: {e}");
        }
        fail(source)
    };
    let ours = mountinfo::read()
        .ok()
        .and_then(|m| mountinfo::find(&m, &mountpoint))
        .filter(|m| m.fs_type == FS_TYPE)
        .ok_or_else(|| io::Error::other("the new mount is missing from mountinfo"))
        .map_err(detach_on_error)?;

    let passthrough = Arc::new(AtomicBool::new(false));
    let opens = OpenTable::create(tree.node_count()).map_err(detach_on_error)?;
    let (session, kept) = handover::serve(
        tree,
        content,
        opts,
        OwnedFd::from(dev_fuse),
        opens,
        passthrough.clone(),
        None,
    )
    .map_err(detach_on_error)?;
    info!(
        mountpoint = %mountpoint.display(),
        passthrough = passthrough.load(Ordering::Relaxed),
        "mounted"
    );
    Ok(Mount {
        mountpoint,
        mount_id: ours.id,
        dev: ours.dev,
        session: Some(session),
        passthrough,
        kept,
    })
}

impl Mount {
    /// Where the tree is mounted (canonical path).
    pub fn mountpoint(&self) -> &Path {
        &self.mountpoint
    }

    /// Whether the kernel accepted FUSE passthrough for this mount, so that opens of
    /// files with a backing file bypass the daemon.
    pub fn passthrough_active(&self) -> bool {
        self.passthrough.load(Ordering::Relaxed)
    }

    /// Detaches the mount and waits for the session to end. If something (an overlay
    /// mount, an open file) still uses the filesystem, it stays served until released.
    pub fn unmount(mut self) -> Result<(), Error> {
        self.shutdown(true)
    }

    /// Detaches the mount without waiting: users of the filesystem (overlays over it,
    /// open files) keep being served until they let go, and then the session ends by
    /// itself. Unlazy uses this once the layer has become a plain directory.
    pub fn detach(mut self) -> Result<(), Error> {
        self.shutdown(false)
    }

    fn shutdown(&mut self, wait: bool) -> Result<(), Error> {
        let Some(session) = self.session.take() else {
            return Ok(());
        };
        let still_ours = mountinfo::read()
            .map_err(|source| self.unmount_error(source))?
            .iter()
            .any(|m| m.id == self.mount_id && m.dev == self.dev);
        if still_ours {
            nix::mount::umount2(&self.mountpoint, MntFlags::MNT_DETACH)
                .map_err(|e| self.unmount_error(e.into()))?;
        }
        if !wait {
            info!(mountpoint = %self.mountpoint.display(), "detached");
            return Ok(());
        }
        let deadline = Instant::now() + JOIN_TIMEOUT;
        while !session.guard.is_finished() && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(5));
        }
        if !session.guard.is_finished() {
            warn!(
                mountpoint = %self.mountpoint.display(),
                "detached but still in use; serving until the last user lets go"
            );
            return Ok(());
        }
        if let Err(e) = session.join() {
            warn!(mountpoint = %self.mountpoint.display(), "FUSE session ended with: {e}");
        }
        info!(mountpoint = %self.mountpoint.display(), "unmounted");
        Ok(())
    }

    fn unmount_error(&self, source: io::Error) -> Error {
        Error::Unmount {
            mountpoint: self.mountpoint.clone(),
            source,
        }
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        if let Err(e) = self.shutdown(true) {
            warn!("{e}");
        }
    }
}

impl fmt::Debug for Mount {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Mount")
            .field("mountpoint", &self.mountpoint)
            .field("mount_id", &self.mount_id)
            .field("passthrough", &self.passthrough_active())
            .finish_non_exhaustive()
    }
}

/// Whether this kernel can do FUSE passthrough: what the last mount that asked for it
/// was told in the kernel's init message, or before any such mount, whether the kernel
/// is Linux 6.9 or later. [`Mount::passthrough_active`] says it for one mount.
pub fn kernel_supports_passthrough() -> bool {
    if let Some(seen) = fs::passthrough_offered() {
        return seen;
    }
    let uname = nix::sys::utsname::uname();
    match uname {
        Ok(u) => release_at_least(&u.release().to_string_lossy(), (6, 9)),
        Err(_) => false,
    }
}

/// Whether a kernel release string like `6.18.44-foo` is at least `want`.
fn release_at_least(release: &str, want: (u32, u32)) -> bool {
    let mut parts = release.split(|c: char| !c.is_ascii_digit());
    let major = parts.next().and_then(|p| p.parse::<u32>().ok());
    let minor = parts.next().and_then(|p| p.parse::<u32>().ok());
    match (major, minor) {
        (Some(major), Some(minor)) => (major, minor) >= want,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn release_strings_compare_numerically() {
        assert!(release_at_least("6.18.44-fc-v669", (6, 9)));
        assert!(release_at_least("6.9.0", (6, 9)));
        assert!(release_at_least("7.0", (6, 9)));
        assert!(!release_at_least("6.8.12-amd64", (6, 9)));
        assert!(!release_at_least("5.15.0", (6, 9)));
        assert!(!release_at_least("garbage", (6, 9)));
    }
}
