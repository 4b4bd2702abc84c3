//! The mounts of a snapshot, with exactly the option strings of containerd 1.6's
//! overlay snapshotter: BuildKit's overlay differ parses `upperdir=`/`lowerdir=`.

use std::path::{Path, PathBuf};

use serde::Serialize;

use super::{Kind, SnapshotId};

/// One mount, as containerd's `types.Mount`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Mount {
    /// Filesystem type: `overlay` or `bind`.
    pub kind: String,
    /// Source: `overlay` or a directory.
    pub source: String,
    /// Mount options.
    pub options: Vec<String>,
}

/// Where snapshot directories live.
#[derive(Debug, Clone)]
pub struct Layout {
    root: PathBuf,
}

impl Layout {
    /// The layout under `root` (the daemon's root directory).
    pub fn new(root: &Path) -> Self {
        Layout {
            root: root.to_path_buf(),
        }
    }

    /// `<root>/snapshots`.
    pub fn snapshots(&self) -> PathBuf {
        self.root.join("snapshots")
    }

    /// `<root>/snapshots/<id>`.
    pub fn dir(&self, id: SnapshotId) -> PathBuf {
        self.snapshots().join(id.0.to_string())
    }

    /// `<root>/snapshots/<id>/fs`: upper dir, extracted layer, or remote mount point.
    pub fn fs(&self, id: SnapshotId) -> PathBuf {
        self.dir(id).join("fs")
    }

    /// `<root>/snapshots/<id>/work`: overlay work dir.
    pub fn work(&self, id: SnapshotId) -> PathBuf {
        self.dir(id).join("work")
    }
}

/// Whether the kernel's overlay has an `index` parameter; containerd 1.x then adds
/// `index=off` so that lower layers can be shared by several overlays.
pub fn overlay_index_param() -> bool {
    Path::new("/sys/module/overlay/parameters/index").exists()
}

/// The mounts for snapshot `id` of `kind` whose parents are `parents` (nearest first).
pub fn mounts(
    layout: &Layout,
    id: SnapshotId,
    kind: Kind,
    parents: &[SnapshotId],
    index_off: bool,
) -> Vec<Mount> {
    let path = |p: PathBuf| p.to_string_lossy().into_owned();
    if parents.is_empty() {
        let ro = if kind == Kind::View { "ro" } else { "rw" };
        return vec![Mount {
            kind: "bind".into(),
            source: path(layout.fs(id)),
            options: vec![ro.into(), "rbind".into()],
        }];
    }
    if kind != Kind::Active && parents.len() == 1 {
        // An overlay with a single lower and no upper is not allowed.
        return vec![Mount {
            kind: "bind".into(),
            source: path(layout.fs(parents[0])),
            options: vec!["ro".into(), "rbind".into()],
        }];
    }
    let mut options = Vec::new();
    if index_off {
        options.push("index=off".to_string());
    }
    if kind == Kind::Active {
        options.push(format!("workdir={}", path(layout.work(id))));
        options.push(format!("upperdir={}", path(layout.fs(id))));
    }
    let lowers: Vec<String> = parents.iter().map(|p| path(layout.fs(*p))).collect();
    options.push(format!("lowerdir={}", lowers.join(":")));
    vec![Mount {
        kind: "overlay".into(),
        source: "overlay".into(),
        options,
    }]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(m: &[Mount]) -> Vec<&str> {
        m[0].options.iter().map(String::as_str).collect()
    }

    #[test]
    fn option_strings_match_containerd() {
        let l = Layout::new(Path::new("/r"));
        let id = SnapshotId(7);
        let m = mounts(&l, id, Kind::Active, &[], true);
        assert_eq!(
            (m[0].kind.as_str(), m[0].source.as_str()),
            ("bind", "/r/snapshots/7/fs")
        );
        assert_eq!(opts(&m), ["rw", "rbind"]);
        let m = mounts(&l, id, Kind::View, &[], true);
        assert_eq!(opts(&m), ["ro", "rbind"]);
        let m = mounts(&l, id, Kind::View, &[SnapshotId(3)], true);
        assert_eq!(
            (m[0].kind.as_str(), m[0].source.as_str()),
            ("bind", "/r/snapshots/3/fs")
        );
        assert_eq!(opts(&m), ["ro", "rbind"]);
        let m = mounts(&l, id, Kind::Active, &[SnapshotId(3), SnapshotId(1)], true);
        assert_eq!(
            (m[0].kind.as_str(), m[0].source.as_str()),
            ("overlay", "overlay")
        );
        assert_eq!(
            opts(&m),
            [
                "index=off",
                "workdir=/r/snapshots/7/work",
                "upperdir=/r/snapshots/7/fs",
                "lowerdir=/r/snapshots/3/fs:/r/snapshots/1/fs"
            ]
        );
        let m = mounts(&l, id, Kind::Active, &[SnapshotId(3)], false);
        assert_eq!(
            opts(&m),
            [
                "workdir=/r/snapshots/7/work",
                "upperdir=/r/snapshots/7/fs",
                "lowerdir=/r/snapshots/3/fs"
            ]
        );
        let m = mounts(&l, id, Kind::View, &[SnapshotId(3), SnapshotId(1)], true);
        assert_eq!(
            opts(&m),
            ["index=off", "lowerdir=/r/snapshots/3/fs:/r/snapshots/1/fs"]
        );
    }
}
