//! Unlazy: the switch from remote to local, its failure modes, and restore after a
//! crash at each step.

use super::*;
use crate::snapshot::labels::UNLAZY;
use crate::snapshot::store::Query;

fn remote_layer(s: &Snapshotter, chain: &str) -> SnapshotId {
    assert_err!(
        s.prepare(
            &format!("default/1/extract {chain}"),
            "",
            layer_labels(chain)
        ),
        Error::AlreadyExists(_)
    );
    snapshot_id(s, chain)
}

fn snapshot_id(s: &Snapshotter, key: &str) -> SnapshotId {
    s.store().read(|tx| tx.get(key)).unwrap().id
}

fn setup() -> (tempfile::TempDir, Arc<Fake>, Snapshotter) {
    let t = tempfile::tempdir().unwrap();
    let fake = Arc::new(Fake::default());
    let s = Snapshotter::open(t.path(), Some(fake.clone())).unwrap();
    (t, fake, s)
}

#[test]
fn unlazy_switches_a_remote_snapshot_to_local() {
    let (_t, fake, s) = setup();
    let id = remote_layer(&s, "sha256:l1");
    let stats = s.unlazy("sha256:l1").unwrap().expect("it was remote");
    assert_eq!(stats.files, 1);
    let info = s.stat("sha256:l1").unwrap();
    assert!(!info.labels.contains_key(REMOTE));
    assert_eq!(info.kind, Kind::Committed);
    let fs_dir = s.layout().fs(id);
    assert_eq!(fs::read(fs_dir.join("marker")).unwrap(), b"remote");
    assert_eq!(entries(&s.layout().dir(id)), ["fs", "work"]);
    assert_eq!(fake.unmounts.load(Ordering::SeqCst), 1);
    assert!(s.usage("sha256:l1").unwrap().inodes >= 2);
    // Already local: nothing to do, and the layer keeps serving as a parent.
    assert!(s.unlazy("sha256:l1").unwrap().is_none());
    fake.unhealthy.store(true, Ordering::SeqCst);
    let m = s.prepare("rootfs", "sha256:l1", Labels::new()).unwrap();
    assert_eq!(m[0].kind, "overlay");
    assert_eq!(s.counts().unwrap().remote, 0);
}

#[test]
fn unlazy_refuses_what_is_not_a_committed_layer() {
    let (_t, _fake, s) = setup();
    s.prepare("active", "", Labels::new()).unwrap();
    assert_err!(s.unlazy("active"), Error::FailedPrecondition(_));
    assert_err!(s.unlazy("missing"), Error::SnapshotNotFound(_));
    // A local committed snapshot is already unlazy.
    s.commit("done", "active", Labels::new()).unwrap();
    assert!(s.unlazy("done").unwrap().is_none());
}

#[test]
fn failed_unlazy_leaves_the_remote_snapshot() {
    let (_t, fake, s) = setup();
    let id = remote_layer(&s, "sha256:l1");
    fake.fail.store(true, Ordering::SeqCst);
    assert_err!(s.unlazy("sha256:l1"), Error::Fetch { .. });
    assert!(s.stat("sha256:l1").unwrap().labels.contains_key(REMOTE));
    assert_eq!(entries(&s.layout().dir(id)), ["fs", "work"]);
    assert_eq!(fake.unmounts.load(Ordering::SeqCst), 0);
    // A failed metadata switch leaves it too.
    fake.fail.store(false, Ordering::SeqCst);
    s.store().fail_next_commit();
    assert!(s.unlazy("sha256:l1").is_err());
    assert!(s.stat("sha256:l1").unwrap().labels.contains_key(REMOTE));
    assert_eq!(entries(&s.layout().dir(id)), ["fs", "work"]);
    assert!(s.unlazy("sha256:l1").unwrap().is_some());
}

#[test]
fn update_with_the_unlazy_label_unlazies_without_storing_it() {
    let (_t, _fake, s) = setup();
    remote_layer(&s, "sha256:l1");
    let mut info = s.stat("sha256:l1").unwrap();
    info.labels = labels(&[(UNLAZY, "true"), ("containerd.io/snapshot/x", "y")]);
    let paths = [
        format!("labels.{UNLAZY}"),
        "labels.containerd.io/snapshot/x".to_string(),
    ];
    let out = s.update(&info, &paths).unwrap();
    assert!(!out.labels.contains_key(REMOTE));
    assert!(!out.labels.contains_key(UNLAZY));
    assert_eq!(out.labels.get("containerd.io/snapshot/x").unwrap(), "y");
    // "false" asks for nothing and is not stored either.
    remote_layer(&s, "sha256:l2");
    let mut info = s.stat("sha256:l2").unwrap();
    info.labels = labels(&[(UNLAZY, "false")]);
    let out = s.update(&info, &[format!("labels.{UNLAZY}")]).unwrap();
    assert!(out.labels.contains_key(REMOTE));
    assert!(!out.labels.contains_key(UNLAZY));
}

#[test]
fn on_prepare_policy_unlazies_the_lowers_of_a_writable_snapshot() {
    let t = tempfile::tempdir().unwrap();
    let fake = Arc::new(Fake::default());
    let s = Snapshotter::open(t.path(), Some(fake.clone()))
        .unwrap()
        .with_policy(UnlazyPolicy {
            on_prepare: true,
            ..Default::default()
        });
    remote_layer(&s, "sha256:l1");
    assert_err!(
        s.prepare(
            "default/2/extract l2",
            "sha256:l1",
            layer_labels("sha256:l2")
        ),
        Error::AlreadyExists(_)
    );
    // Unpacking a layer over a remote one is not a writable snapshot for a workload.
    assert!(s.stat("sha256:l1").unwrap().labels.contains_key(REMOTE));
    s.prepare("rootfs", "sha256:l2", Labels::new()).unwrap();
    assert_eq!(s.counts().unwrap().remote, 0);
}

/// The crash points of unlazy, as restore finds them.
#[test]
fn restore_finishes_or_drops_an_interrupted_unlazy() {
    let (t, fake, s) = setup();
    let a = remote_layer(&s, "sha256:a");
    let b = remote_layer(&s, "sha256:b");
    let c = remote_layer(&s, "sha256:c");
    let d = remote_layer(&s, "sha256:d");
    let stage = |id: SnapshotId| {
        let tmp = s.layout().dir(id).join("fs.unlazy");
        fs::create_dir(&tmp).unwrap();
        fs::write(tmp.join("file"), b"local").unwrap();
        tmp
    };
    // a: crashed while extracting (still remote).
    stage(a);
    // b: crashed after the switch, before the swap.
    stage(b);
    s.store()
        .write(|tx| tx.make_local("sha256:b", b, Usage::default()))
        .unwrap();
    // c: crashed between the two renames.
    stage(c);
    s.store()
        .write(|tx| tx.make_local("sha256:c", c, Usage::default()))
        .unwrap();
    // (the crash took the FUSE mount with it: the mount point is empty)
    fs::remove_file(s.layout().fs(c).join("marker")).unwrap();
    fs::rename(s.layout().fs(c), s.layout().dir(c).join("fs.remote")).unwrap();
    // d: crashed before removing the old mount point.
    let tmp = stage(d);
    s.store()
        .write(|tx| tx.make_local("sha256:d", d, Usage::default()))
        .unwrap();
    fs::remove_file(s.layout().fs(d).join("marker")).unwrap();
    fs::rename(s.layout().fs(d), s.layout().dir(d).join("fs.remote")).unwrap();
    fs::rename(&tmp, s.layout().fs(d)).unwrap();
    drop(s);

    let s = Snapshotter::open(t.path(), Some(fake.clone())).unwrap();
    s.restore().unwrap();
    assert!(s.stat("sha256:a").unwrap().labels.contains_key(REMOTE));
    assert_eq!(entries(&s.layout().dir(a)), ["fs", "work"]);
    assert!(s.layout().fs(a).join("marker").exists(), "mounted again");
    for id in [b, c, d] {
        assert_eq!(entries(&s.layout().dir(id)), ["fs", "work"], "{id}");
        assert_eq!(fs::read(s.layout().fs(id).join("file")).unwrap(), b"local");
    }
    assert_eq!(s.counts().unwrap().remote, 1);
}
