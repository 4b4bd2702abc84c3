//! An image's root filesystem from lazily mounted layers, without containerd: each
//! layer a FUSE mount in a private directory, stacked by overlayfs (read-only, or over
//! a writable upper directory); a lone read-only layer is mounted in place. Dropping
//! the value unmounts everything it mounted, overlay first.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use lazysnap_fuse::MountOptions;

use super::RemoteLayer;
use super::mount::{LayerContent, mount_content};
use crate::error::{Error, Result};

/// Where a writable root filesystem keeps its changes (overlayfs `upperdir` and
/// `workdir`, on the same filesystem).
#[derive(Debug, Clone)]
pub struct Upper {
    pub upper: PathBuf,
    pub work: PathBuf,
}

/// A mounted root filesystem.
pub struct Rootfs {
    dir: PathBuf,
    overlay: bool,
    layers: Vec<Arc<RemoteLayer>>,
    fuse: Vec<lazysnap_fuse::Mount>,
    /// Layer mount points this value created (and removes).
    dirs: Vec<PathBuf>,
}

impl Rootfs {
    /// Mounts the layers `contents` serve (base first) at `dir`. Layer mount points
    /// are made under `private` (created, and removed at the end). With `upper` the
    /// root filesystem is writable; the layers never change.
    pub fn mount(
        contents: Vec<Arc<LayerContent>>,
        dir: &Path,
        private: &Path,
        upper: Option<&Upper>,
        opts: &MountOptions,
    ) -> Result<Rootfs> {
        let in_place = contents.len() == 1 && upper.is_none();
        let mut fs = Rootfs {
            dir: dir.to_path_buf(),
            overlay: false,
            layers: contents.iter().map(|c| c.layer().clone()).collect(),
            fuse: Vec::new(),
            dirs: Vec::new(),
        };
        if !in_place {
            mkdir(private)?;
            fs.dirs.push(private.to_path_buf());
        }
        let mut lower = Vec::new();
        for (i, content) in contents.into_iter().enumerate() {
            let mp = if in_place {
                dir.to_path_buf()
            } else {
                let d = private.join(i.to_string());
                mkdir(&d)?;
                fs.dirs.push(d.clone());
                d
            };
            let layer_opts = MountOptions {
                fs_name: format!(
                    "lazysnap:{}",
                    content.layer().toc_digest().hex().get(..12).unwrap_or("")
                ),
                ..opts.clone()
            };
            fs.fuse.push(mount_content(content, &mp, &layer_opts)?);
            lower.push(mp.display().to_string());
        }
        if in_place {
            return Ok(fs);
        }
        lower.reverse();
        // xino: inode numbers stay unique across layers (each FUSE layer numbers from 1)
        let mut data = format!("lowerdir={},xino=on", lower.join(":"));
        let mut flags = nix::mount::MsFlags::empty();
        match upper {
            Some(u) => {
                mkdir(&u.upper)?;
                mkdir(&u.work)?;
                data.push_str(&format!(
                    ",upperdir={},workdir={}",
                    u.upper.display(),
                    u.work.display()
                ));
            }
            None => flags |= nix::mount::MsFlags::MS_RDONLY,
        }
        nix::mount::mount(
            Some("overlay"),
            dir,
            Some("overlay"),
            flags,
            Some(data.as_str()),
        )
        .map_err(|e| Error::io(format!("{}: overlay mount", dir.display()), e.into()))?;
        fs.overlay = true;
        Ok(fs)
    }

    /// The mounted layers, base first.
    pub fn layers(&self) -> &[Arc<RemoteLayer>] {
        &self.layers
    }

    /// Where the root filesystem is.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Unmounts everything, reporting the first failure.
    pub fn unmount(mut self) -> Result<()> {
        self.teardown()
    }

    fn teardown(&mut self) -> Result<()> {
        let mut first = None;
        if std::mem::take(&mut self.overlay)
            && let Err(e) = nix::mount::umount2(&self.dir, nix::mount::MntFlags::MNT_DETACH)
        {
            first.get_or_insert(Error::io(
                format!("{}: unmounting the overlay", self.dir.display()),
                e.into(),
            ));
        }
        while let Some(m) = self.fuse.pop() {
            let at = m.mountpoint().display().to_string();
            if let Err(e) = m.unmount() {
                first.get_or_insert(Error::io(
                    format!("{at}: unmounting a layer"),
                    std::io::Error::other(e.to_string()),
                ));
            }
        }
        while let Some(d) = self.dirs.pop() {
            let _ = std::fs::remove_dir(d);
        }
        first.map_or(Ok(()), Err)
    }
}

impl Drop for Rootfs {
    fn drop(&mut self) {
        if let Err(e) = self.teardown() {
            tracing::warn!(error = %e, "root filesystem not fully unmounted");
        }
    }
}

fn mkdir(d: &Path) -> Result<()> {
    std::fs::create_dir_all(d).map_err(|e| Error::io(format!("{}: create", d.display()), e))
}
