//! A fake remote filesystem: mounts a small tmpfs holding a marker file (so overlays
//! over it are real), counts mounts and unmounts, and can be told to fail or to be
//! unhealthy.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use lazysnap::snapshot::{ApplyStats, RemoteFs};
use lazysnap::{Error, Result};

/// The fake.
#[derive(Default)]
pub struct FakeRemote {
    pub mounts: AtomicUsize,
    pub unmounts: AtomicUsize,
    pub fail: AtomicBool,
    pub unhealthy: AtomicBool,
    mounted: Mutex<HashMap<PathBuf, String>>,
}

/// Whether `path` is a mount point now.
pub fn is_mounted(path: &Path) -> usize {
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter(|l| l.split(' ').nth(4).map(Path::new) == Some(path))
        .count()
}

fn layer(labels: &HashMap<String, String>) -> String {
    labels
        .get("containerd.io/snapshot/cri.layer-digest")
        .or_else(|| labels.get("containerd.io/snapshot/remote/stargz.digest"))
        .cloned()
        .unwrap_or_default()
}

impl RemoteFs for FakeRemote {
    fn mount(&self, mp: &Path, labels: &HashMap<String, String>) -> Result<()> {
        let digest = layer(labels);
        if self.fail.load(Ordering::SeqCst) {
            return Err(Error::Fetch {
                blob: digest,
                reason: "registry unreachable (fake)".into(),
            });
        }
        // Slow enough that concurrent Prepares overlap.
        std::thread::sleep(std::time::Duration::from_millis(50));
        nix::mount::mount(
            Some("fake-remote"),
            mp,
            Some("tmpfs"),
            nix::mount::MsFlags::empty(),
            Some("size=1m,mode=0755"),
        )
        .map_err(|e| Error::io(format!("mount tmpfs at {}", mp.display()), e.into()))?;
        let marker = digest.replace(':', "-");
        std::fs::write(mp.join(format!("layer-{marker}")), &digest)
            .map_err(|e| Error::io("marker", e))?;
        self.mounts.fetch_add(1, Ordering::SeqCst);
        self.mounted
            .lock()
            .unwrap()
            .insert(mp.to_path_buf(), digest);
        Ok(())
    }

    fn check(&self, mp: &Path, _labels: &HashMap<String, String>) -> Result<()> {
        if self.unhealthy.load(Ordering::SeqCst) || is_mounted(mp) == 0 {
            return Err(Error::Fetch {
                blob: mp.display().to_string(),
                reason: "layer unhealthy (fake)".into(),
            });
        }
        Ok(())
    }

    fn unmount(&self, mp: &Path) -> Result<()> {
        if is_mounted(mp) > 0 {
            nix::mount::umount2(mp, nix::mount::MntFlags::MNT_DETACH)
                .map_err(|e| Error::io(format!("unmount {}", mp.display()), e.into()))?;
            self.unmounts.fetch_add(1, Ordering::SeqCst);
        }
        self.mounted.lock().unwrap().remove(mp);
        Ok(())
    }

    /// Copies the mounted tmpfs's files (the marker) into `dest`.
    fn materialize(
        &self,
        mp: &Path,
        _labels: &HashMap<String, String>,
        dest: &Path,
    ) -> Result<ApplyStats> {
        let mut stats = ApplyStats::default();
        let entries = std::fs::read_dir(mp).map_err(|e| Error::io("read fake layer", e))?;
        for e in entries {
            let e = e.map_err(|e| Error::io("read fake layer", e))?;
            let n = std::fs::copy(e.path(), dest.join(e.file_name()))
                .map_err(|e| Error::io("copy fake layer", e))?;
            stats.entries += 1;
            stats.files += 1;
            stats.bytes += n;
        }
        Ok(stats)
    }

    fn status(&self) -> Vec<serde_json::Value> {
        self.mounted
            .lock()
            .unwrap()
            .iter()
            .map(|(mp, d)| {
                serde_json::json!({"digest": d, "mountpoint": mp, "blob_size": 1000, "fetched_bytes": 250, "fraction_complete": 0.5})
            })
            .collect()
    }
}
