//! Snapshot semantics, compared with what containerd's overlay snapshotter (and its
//! bolt metastore) answers.

use std::collections::{HashMap, HashSet};
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::labels::{CRI_IMAGE_REF, CRI_LAYER_DIGEST, REMOTE, TARGET_REF};
use super::*;
use crate::error::{Error, Result};

fn open(dir: &Path) -> Snapshotter {
    Snapshotter::open(dir, None).unwrap()
}

fn labels(pairs: &[(&str, &str)]) -> Labels {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn entries(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

macro_rules! assert_err {
    ($e:expr, $pat:pat) => {
        match $e {
            Err($pat) => {}
            other => panic!("expected {}, got {:?}", stringify!($pat), other),
        }
    };
}

#[test]
fn keys_carry_namespace() {
    let k = SnapshotKey("default/7/extract-1 sha256:abc");
    assert_eq!(k.namespace(), Some("default"));
    assert_eq!(k.local(), "extract-1 sha256:abc");
    assert_eq!(SnapshotKey("sha256:abc").namespace(), None);
    assert_eq!(SnapshotKey("a/b/c").namespace(), None);
    assert_eq!(SnapshotKey("tmp-1 sha256:abc").local(), "tmp-1 sha256:abc");
}

#[test]
fn prepare_commit_view_lifecycle() {
    let t = tempfile::tempdir().unwrap();
    let s = open(t.path());
    let m = s.prepare("ns/1/a", "", Labels::new()).unwrap();
    assert_eq!(m[0].kind, "bind");
    assert_eq!(m[0].options, ["rw", "rbind"]);
    let fs1 = t.path().join("snapshots/1/fs");
    assert_eq!(m[0].source, fs1.to_str().unwrap());
    assert!(t.path().join("snapshots/1/work").is_dir());
    fs::write(fs1.join("hello"), b"hi").unwrap();
    let active_usage = s.usage("ns/1/a").unwrap();
    assert_eq!(active_usage.inodes, 2);

    s.commit("base", "ns/1/a", labels(&[("l", "1")])).unwrap();
    assert_err!(s.stat("ns/1/a"), Error::SnapshotNotFound(_));
    let info = s.stat("base").unwrap();
    assert_eq!(info.kind, Kind::Committed);
    assert_eq!(info.labels, labels(&[("l", "1")]));
    // The id (and so the directory) is kept.
    assert!(fs1.join("hello").is_file());
    assert_eq!(s.usage("base").unwrap(), active_usage);

    let m = s.prepare("ns/1/b", "base", Labels::new()).unwrap();
    assert_eq!(m[0].kind, "overlay");
    let opts = &m[0].options;
    let root = t.path().to_str().unwrap();
    assert!(opts.contains(&format!("upperdir={root}/snapshots/2/fs")));
    assert!(opts.contains(&format!("workdir={root}/snapshots/2/work")));
    assert_eq!(
        opts.last().unwrap(),
        &format!("lowerdir={root}/snapshots/1/fs")
    );
    assert_eq!(s.mounts("ns/1/b").unwrap(), m);
    assert_eq!(s.stat("ns/1/b").unwrap().parent, "base");

    let v = s.view("ns/1/v", "base", Labels::new()).unwrap();
    assert_eq!(v[0].kind, "bind");
    assert_eq!(v[0].source, fs1.to_str().unwrap());
    assert_eq!(v[0].options, ["ro", "rbind"]);
    assert!(!t.path().join("snapshots/3/work").exists());

    s.remove("ns/1/v").unwrap();
    s.remove("ns/1/b").unwrap();
    assert_eq!(entries(&t.path().join("snapshots")), ["1"]);
    s.remove("base").unwrap();
    assert!(entries(&t.path().join("snapshots")).is_empty());
}

#[test]
fn errors_match_containerd() {
    let t = tempfile::tempdir().unwrap();
    let s = open(t.path());
    s.prepare("a", "", Labels::new()).unwrap();
    assert_err!(s.prepare("a", "", Labels::new()), Error::AlreadyExists(_));
    assert_err!(
        s.prepare("b", "missing", Labels::new()),
        Error::SnapshotNotFound(_)
    );
    assert_err!(
        s.prepare("b", "a", Labels::new()),
        Error::InvalidArgument(_)
    );
    s.commit("c", "a", Labels::new()).unwrap();
    s.prepare("d", "c", Labels::new()).unwrap();
    assert_err!(s.remove("c"), Error::FailedPrecondition(_));
    assert_err!(s.remove("nope"), Error::SnapshotNotFound(_));
    assert_err!(s.stat("nope"), Error::SnapshotNotFound(_));
    assert_err!(s.mounts("nope"), Error::SnapshotNotFound(_));
    assert_err!(s.mounts("c"), Error::FailedPrecondition(_));
    assert_err!(s.usage("nope"), Error::SnapshotNotFound(_));
    assert_err!(
        s.commit("x", "nope", Labels::new()),
        Error::SnapshotNotFound(_)
    );
    assert_err!(s.commit("c", "d", Labels::new()), Error::AlreadyExists(_));
    s.view("v", "c", Labels::new()).unwrap();
    assert_err!(
        s.commit("x", "v", Labels::new()),
        Error::FailedPrecondition(_)
    );
    assert_err!(
        s.commit("x", "c", Labels::new()),
        Error::FailedPrecondition(_)
    );
    assert_err!(s.list(&["kind==".to_string()]), Error::InvalidArgument(_));
    let info = Info {
        name: "nope".into(),
        ..s.stat("c").unwrap()
    };
    assert_err!(s.update(&info, &[]), Error::SnapshotNotFound(_));
    let info = s.stat("c").unwrap();
    assert_err!(
        s.update(&info, &["parent".into()]),
        Error::InvalidArgument(_)
    );
    // Failed calls leave nothing behind.
    assert_eq!(entries(&t.path().join("snapshots")), ["1", "2", "3"]);
}

#[test]
fn label_size_limit() {
    let t = tempfile::tempdir().unwrap();
    let s = open(t.path());
    let k = "k".repeat(96);
    let ok = labels(&[(&k, &"v".repeat(4000))]);
    s.prepare("a", "", ok).unwrap();
    let big = labels(&[(&k, &"v".repeat(4001))]);
    assert_err!(s.prepare("b", "", big.clone()), Error::InvalidArgument(_));
    assert_err!(s.view("b", "", big.clone()), Error::InvalidArgument(_));
    assert_err!(s.commit("c", "a", big.clone()), Error::InvalidArgument(_));
    let info = Info {
        labels: big,
        ..s.stat("a").unwrap()
    };
    assert_err!(s.update(&info, &[]), Error::InvalidArgument(_));
    assert_eq!(entries(&t.path().join("snapshots")), ["1"]);
}

#[test]
fn update_field_paths() {
    let t = tempfile::tempdir().unwrap();
    let s = open(t.path());
    s.prepare("a", "", labels(&[("keep", "1"), ("x", "1")]))
        .unwrap();
    let session = "containerd.io/snapshot/remote/stargz.session.0.abcdef";
    let mut info = s.stat("a").unwrap();
    info.labels = labels(&[(session, "tmp")]);
    let got = s.update(&info, &[format!("labels.{session}")]).unwrap();
    assert_eq!(
        got.labels,
        labels(&[("keep", "1"), (session, "tmp"), ("x", "1")])
    );
    // A missing or empty value deletes the label.
    info.labels = Labels::new();
    let got = s.update(&info, &[format!("labels.{session}")]).unwrap();
    assert_eq!(got.labels, labels(&[("keep", "1"), ("x", "1")]));
    info.labels = labels(&[("x", "")]);
    let got = s.update(&info, &["labels.x".into()]).unwrap();
    assert_eq!(got.labels, labels(&[("keep", "1")]));
    // `labels` and no paths replace all labels.
    info.labels = labels(&[("new", "2")]);
    assert_eq!(
        s.update(&info, &["labels".into()]).unwrap().labels,
        info.labels
    );
    info.labels = labels(&[("other", "3")]);
    assert_eq!(s.update(&info, &[]).unwrap().labels, info.labels);
    assert_eq!(s.stat("a").unwrap().labels, info.labels);
    assert!(s.stat("a").unwrap().updated >= s.stat("a").unwrap().created);
}

#[test]
fn list_filters() {
    let t = tempfile::tempdir().unwrap();
    let s = open(t.path());
    s.prepare("a", "", Labels::new()).unwrap();
    s.commit("base", "a", labels(&[(TARGET_REF, "base")]))
        .unwrap();
    s.prepare("b", "base", labels(&[("x", "1")])).unwrap();
    s.view("v", "base", Labels::new()).unwrap();
    let names = |f: &[&str]| {
        let f: Vec<String> = f.iter().map(|s| s.to_string()).collect();
        let mut n: Vec<String> = s.list(&f).unwrap().into_iter().map(|i| i.name).collect();
        n.sort();
        n
    };
    assert_eq!(names(&[]), ["b", "base", "v"]);
    assert_eq!(names(&["kind==active"]), ["b"]);
    assert_eq!(names(&["parent==base"]), ["b", "v"]);
    assert_eq!(names(&["parent==base,kind==view"]), ["v"]);
    assert_eq!(names(&["kind==view|labels.x==1"]), ["b", "v"]);
    assert_eq!(names(&["kind==view", "labels.x"]), ["b", "v"]);
    assert_eq!(
        names(&[r#"labels."containerd.io/snapshot.ref"==base,parent=="""#]),
        ["base"]
    );
}

#[test]
fn failed_commit_leaves_no_directory() {
    let t = tempfile::tempdir().unwrap();
    let s = open(t.path());
    s.store().fail_next_commit();
    assert_err!(s.prepare("a", "", Labels::new()), Error::Store(_));
    assert!(entries(&t.path().join("snapshots")).is_empty());
    assert_err!(s.stat("a"), Error::SnapshotNotFound(_));
    // The id was not consumed either: the next snapshot gets it.
    s.prepare("a", "", Labels::new()).unwrap();
    assert_eq!(entries(&t.path().join("snapshots")), ["1"]);
    s.store().fail_next_commit();
    assert_err!(s.commit("c", "a", Labels::new()), Error::Store(_));
    assert_eq!(s.stat("a").unwrap().kind, Kind::Active);
    s.store().fail_next_commit();
    assert_err!(s.remove("a"), Error::Store(_));
    assert!(t.path().join("snapshots/1/fs").is_dir());
}

#[test]
fn cleanup_removes_unowned_directories() {
    let t = tempfile::tempdir().unwrap();
    let s = open(t.path());
    s.prepare("a", "", Labels::new()).unwrap();
    let snapshots = t.path().join("snapshots");
    fs::create_dir_all(snapshots.join("42/fs")).unwrap();
    fs::create_dir_all(snapshots.join("new-crash/fs")).unwrap();
    s.cleanup().unwrap();
    assert_eq!(entries(&snapshots), ["1"]);
    // The next id does not collide with a directory a crash left behind.
    fs::create_dir_all(snapshots.join("2/fs/junk")).unwrap();
    s.prepare("b", "", Labels::new()).unwrap();
    assert!(!snapshots.join("2/fs/junk").exists());
}

/// A remote filesystem that writes a marker file instead of mounting.
#[derive(Default)]
struct Fake {
    mounts: AtomicUsize,
    unmounts: AtomicUsize,
    fail: AtomicBool,
    unhealthy: AtomicBool,
    mounted: Mutex<HashSet<PathBuf>>,
}

impl RemoteFs for Fake {
    fn mount(&self, mp: &Path, labels: &HashMap<String, String>) -> Result<()> {
        if self.fail.load(Ordering::SeqCst) {
            return Err(Error::Fetch {
                blob: labels.get(CRI_LAYER_DIGEST).cloned().unwrap_or_default(),
                reason: "not a lazy layer".into(),
            });
        }
        std::thread::sleep(Duration::from_millis(20));
        fs::write(mp.join("marker"), b"remote").unwrap();
        self.mounts.fetch_add(1, Ordering::SeqCst);
        self.mounted.lock().unwrap().insert(mp.to_path_buf());
        Ok(())
    }

    fn check(&self, mp: &Path, _: &HashMap<String, String>) -> Result<()> {
        if self.unhealthy.load(Ordering::SeqCst) || !self.mounted.lock().unwrap().contains(mp) {
            return Err(Error::Fetch {
                blob: mp.display().to_string(),
                reason: "registry down".into(),
            });
        }
        Ok(())
    }

    fn materialize(
        &self,
        mp: &Path,
        _: &HashMap<String, String>,
        dest: &Path,
    ) -> Result<crate::snapshot::ApplyStats> {
        if self.fail.load(Ordering::SeqCst) {
            return Err(Error::Fetch {
                blob: mp.display().to_string(),
                reason: "registry down".into(),
            });
        }
        let n =
            fs::copy(mp.join("marker"), dest.join("marker")).map_err(|e| Error::io("copy", e))?;
        Ok(crate::snapshot::ApplyStats {
            entries: 1,
            files: 1,
            bytes: n,
            whiteouts: 0,
        })
    }

    fn unmount(&self, mp: &Path) -> Result<()> {
        let _ = fs::remove_file(mp.join("marker"));
        if self.mounted.lock().unwrap().remove(mp) {
            self.unmounts.fetch_add(1, Ordering::SeqCst);
        }
        Ok(())
    }
}

fn layer_labels(chain: &str) -> Labels {
    labels(&[
        (TARGET_REF, chain),
        (CRI_IMAGE_REF, "127.0.0.1:5000/img:1"),
        (CRI_LAYER_DIGEST, "sha256:layer"),
    ])
}

#[test]
fn remote_prepare_commits_target() {
    let t = tempfile::tempdir().unwrap();
    let fake = Arc::new(Fake::default());
    let s = Snapshotter::open(t.path(), Some(fake.clone())).unwrap();
    assert_err!(
        s.prepare(
            "default/1/extract-1 sha256:l1",
            "",
            layer_labels("sha256:l1")
        ),
        Error::AlreadyExists(_)
    );
    assert_eq!(fake.mounts.load(Ordering::SeqCst), 1);
    let info = s.stat("sha256:l1").unwrap();
    assert_eq!(info.kind, Kind::Committed);
    assert_eq!(
        info.labels.get(REMOTE).map(String::as_str),
        Some("remote snapshot")
    );
    assert_eq!(
        info.labels.get(TARGET_REF).map(String::as_str),
        Some("sha256:l1")
    );
    assert_err!(
        s.stat("default/1/extract-1 sha256:l1"),
        Error::SnapshotNotFound(_)
    );
    assert_eq!(s.usage("sha256:l1").unwrap(), Usage::default());
    // containerd's follow-up listing finds it.
    let f = [r#"labels."containerd.io/snapshot.ref"==sha256:l1,parent=="""#.to_string()];
    assert_eq!(s.list(&f).unwrap().len(), 1);
    // A second layer on top, then a second Prepare of the same target.
    assert_err!(
        s.prepare(
            "default/2/extract-2 sha256:l2",
            "sha256:l1",
            layer_labels("sha256:l2")
        ),
        Error::AlreadyExists(_)
    );
    assert_eq!(s.stat("sha256:l2").unwrap().parent, "sha256:l1");
    assert_err!(
        s.prepare(
            "default/3/extract-3 sha256:l2",
            "sha256:l1",
            layer_labels("sha256:l2")
        ),
        Error::AlreadyExists(_)
    );
    assert_eq!(fake.mounts.load(Ordering::SeqCst), 2);

    let m = s.view("ctr-view", "sha256:l2", Labels::new()).unwrap();
    assert_eq!(m[0].kind, "overlay");
    let m = s.prepare("rootfs", "sha256:l2", Labels::new()).unwrap();
    assert!(m[0].options.iter().any(|o| o.starts_with("upperdir=")));
    fake.unhealthy.store(true, Ordering::SeqCst);
    assert_err!(s.mounts("rootfs"), Error::Unavailable(_));
    assert_err!(s.mounts("ctr-view"), Error::Unavailable(_));
    fake.unhealthy.store(false, Ordering::SeqCst);
    s.mounts("rootfs").unwrap();

    s.remove("rootfs").unwrap();
    s.remove("ctr-view").unwrap();
    s.remove("sha256:l2").unwrap();
    assert_eq!(fake.unmounts.load(Ordering::SeqCst), 1);
    assert_eq!(s.counts().unwrap().remote, 1);
}

#[test]
fn remote_mount_failure_falls_back() {
    let t = tempfile::tempdir().unwrap();
    let fake = Arc::new(Fake::default());
    fake.fail.store(true, Ordering::SeqCst);
    let s = Snapshotter::open(t.path(), Some(fake.clone())).unwrap();
    let m = s.prepare("k", "", layer_labels("sha256:l1")).unwrap();
    assert_eq!(m[0].kind, "bind");
    assert_eq!(s.stat("k").unwrap().kind, Kind::Active);
    // Without layer labels no mount is tried at all.
    fake.fail.store(false, Ordering::SeqCst);
    s.prepare("k2", "", labels(&[(TARGET_REF, "sha256:x")]))
        .unwrap();
    assert_eq!(fake.mounts.load(Ordering::SeqCst), 0);
    // Without a remote filesystem, an ordinary Prepare.
    let t2 = tempfile::tempdir().unwrap();
    let plain = open(t2.path());
    plain.prepare("k", "", layer_labels("sha256:l1")).unwrap();
}

#[test]
fn concurrent_prepares_share_one_mount() {
    let t = tempfile::tempdir().unwrap();
    let fake = Arc::new(Fake::default());
    let s = Arc::new(Snapshotter::open(t.path(), Some(fake.clone())).unwrap());
    let handles: Vec<_> = (0..8)
        .map(|i| {
            let s = s.clone();
            std::thread::spawn(move || {
                s.prepare(
                    &format!("default/{i}/extract sha256:l"),
                    "",
                    layer_labels("sha256:l"),
                )
            })
        })
        .collect();
    for h in handles {
        assert_err!(h.join().unwrap(), Error::AlreadyExists(_));
    }
    assert_eq!(fake.mounts.load(Ordering::SeqCst), 1);
    assert_eq!(s.list(&[]).unwrap().len(), 1);
    assert_eq!(entries(&t.path().join("snapshots")), ["1"]);
}

#[test]
fn restore_remounts_and_close_unmounts() {
    let t = tempfile::tempdir().unwrap();
    let fake = Arc::new(Fake::default());
    {
        let s = Snapshotter::open(t.path(), Some(fake.clone())).unwrap();
        assert_err!(
            s.prepare("k", "", layer_labels("sha256:l1")),
            Error::AlreadyExists(_)
        );
        s.prepare("local", "", Labels::new()).unwrap();
        s.close();
        assert_eq!(fake.unmounts.load(Ordering::SeqCst), 1);
    }
    // A registry that is down: the snapshot is kept and served as unavailable.
    let down = Arc::new(Fake::default());
    down.fail.store(true, Ordering::SeqCst);
    let s = Snapshotter::open(t.path(), Some(down.clone())).unwrap();
    s.restore().unwrap();
    s.view("v", "sha256:l1", Labels::new()).unwrap_err();
    assert_eq!(s.mounts("local").unwrap()[0].kind, "bind");
    drop(s);
    let s = Snapshotter::open(t.path(), Some(fake.clone())).unwrap();
    s.restore().unwrap();
    assert_eq!(fake.mounts.load(Ordering::SeqCst), 2);
    assert!(t.path().join("snapshots/1/fs/marker").is_file());
    s.view("v", "sha256:l1", Labels::new()).unwrap();
}

mod unlazy;

/// A remote filesystem whose layers outlive the process (tmpfs mounts standing in for
/// FUSE ones): it leaves every layer mounted at close and, at start, takes over those
/// listed in `live`.
#[derive(Default)]
struct Keeper {
    live: Mutex<Vec<PathBuf>>,
    restored: Mutex<Vec<PathBuf>>,
}

impl RemoteFs for Keeper {
    fn mount(&self, mp: &Path, _: &HashMap<String, String>) -> Result<()> {
        nix::mount::mount(
            Some("keeper"),
            mp,
            Some("tmpfs"),
            nix::mount::MsFlags::empty(),
            Some("size=64k"),
        )
        .map_err(|e| Error::io(format!("mount {}", mp.display()), e.into()))?;
        self.live.lock().unwrap().push(mp.to_path_buf());
        Ok(())
    }

    fn take_over(&self, snapshots: &[(PathBuf, HashMap<String, String>)]) -> Vec<PathBuf> {
        let live = self.live.lock().unwrap();
        snapshots
            .iter()
            .filter(|(mp, _)| live.contains(mp))
            .map(|(mp, _)| restore::real_mountpoint(mp))
            .collect()
    }

    fn restore(&self, mp: &Path, _: &HashMap<String, String>) -> Result<()> {
        self.restored.lock().unwrap().push(mp.to_path_buf());
        Ok(())
    }

    fn leave_mounted(&self) -> Vec<PathBuf> {
        self.live.lock().unwrap().clone()
    }

    fn check(&self, _: &Path, _: &HashMap<String, String>) -> Result<()> {
        Ok(())
    }

    fn unmount(&self, mp: &Path) -> Result<()> {
        restore::detach(mp)
    }

    fn materialize(
        &self,
        mp: &Path,
        _: &HashMap<String, String>,
        _: &Path,
    ) -> Result<crate::snapshot::ApplyStats> {
        Err(Error::Fetch {
            blob: mp.display().to_string(),
            reason: "the keeper's layers have no content".into(),
        })
    }
}

/// Detaches whatever a test left mounted under a directory.
struct DetachUnder(PathBuf);

impl Drop for DetachUnder {
    fn drop(&mut self) {
        for mp in restore::mounts_under(&self.0).unwrap_or_default() {
            let _ = restore::detach(&mp);
        }
    }
}

#[test]
fn layers_left_mounted_at_close_are_taken_over_and_stale_ones_detached() {
    let t = tempfile::tempdir().unwrap();
    let _cleanup = DetachUnder(t.path().canonicalize().unwrap());
    let first = Arc::new(Keeper::default());
    {
        let s = Snapshotter::open(t.path(), Some(first.clone())).unwrap();
        for (key, chain) in [("k1", "sha256:l1"), ("k2", "sha256:l2")] {
            assert_err!(
                s.prepare(key, "", layer_labels(chain)),
                Error::AlreadyExists(_)
            );
        }
        s.close();
    }
    let mounted = |id: u64| {
        let mp = restore::real_mountpoint(&t.path().join(format!("snapshots/{id}/fs")));
        restore::mounts_under(t.path()).unwrap().contains(&mp)
    };
    assert!(mounted(1) && mounted(2), "close leaves both layers mounted");

    // The next daemon can take over layer 1 only: layer 2's mount is stale.
    let next = Arc::new(Keeper::default());
    next.live
        .lock()
        .unwrap()
        .push(t.path().join("snapshots/1/fs"));
    let s = Snapshotter::open(t.path(), Some(next.clone())).unwrap();
    s.restore().unwrap();
    assert!(mounted(1), "a taken-over layer stays mounted");
    assert!(!mounted(2), "a stale mount is detached");
    assert_eq!(next.restored.lock().unwrap().len(), 2, "both are restored");
}
