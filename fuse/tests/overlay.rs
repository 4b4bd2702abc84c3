//! The mount as an overlayfs lower dir: its whiteouts and opaque directories must hide
//! the content of the layer below, read-only and with an upper dir.

mod common;

use std::{fs, path::Path, sync::Arc};

use common::*;
use lazysnap_fuse::{MountOptions, TreeBuilder, mount};

/// The upper layer, as lazysnap would mount it: deletes `a/gone`, makes `o` opaque.
fn fuse_layer() -> (TreeBuilder, MemContent) {
    let mut c = MemContent::default();
    let mut b = TreeBuilder::new(dir(0o755));
    b.add("a", dir(0o755)).unwrap();
    b.add("a/.wh.gone", file(0)).unwrap();
    let new = b.add("a/new", file(9)).unwrap();
    b.set_file(new, 1);
    c.add(1, b"from fuse".to_vec());
    b.add("o", dir(0o755)).unwrap();
    b.add("o/.wh..wh..opq", file(0)).unwrap();
    let fresh = b.add("o/fresh", file(5)).unwrap();
    b.set_file(fresh, 2);
    c.add(2, b"fresh".to_vec());
    (b, c)
}

/// The layer below, a plain directory.
fn plain_layer(root: &Path) {
    fs::create_dir_all(root.join("a")).unwrap();
    fs::create_dir_all(root.join("o")).unwrap();
    fs::write(root.join("a/gone"), b"should be hidden").unwrap();
    fs::write(root.join("a/stays"), b"stays").unwrap();
    fs::write(root.join("o/old"), b"hidden by opaque").unwrap();
}

fn check_merged(merged: &Path) {
    assert!(
        !merged.join("a/gone").exists(),
        "the FUSE whiteout hides the lower a/gone"
    );
    assert_eq!(fs::read(merged.join("a/stays")).unwrap(), b"stays");
    assert_eq!(fs::read(merged.join("a/new")).unwrap(), b"from fuse");
    let mut a: Vec<String> = fs::read_dir(merged.join("a"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    a.sort();
    assert_eq!(a, vec!["new", "stays"]);
    assert!(
        !merged.join("o/old").exists(),
        "the opaque dir hides the lower o/old"
    );
    let o: Vec<String> = fs::read_dir(merged.join("o"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(o, vec!["fresh"]);
    assert_eq!(fs::read(merged.join("o/fresh")).unwrap(), b"fresh");
}

#[test]
fn read_only_overlay_applies_fuse_whiteouts_and_opaque_dirs() {
    let tmp = tempfile::tempdir().unwrap();
    let (lower_fuse, lower_plain, merged) = (
        tmp.path().join("fuse"),
        tmp.path().join("plain"),
        tmp.path().join("merged"),
    );
    for d in [&lower_fuse, &lower_plain, &merged] {
        fs::create_dir(d).unwrap();
    }
    plain_layer(&lower_plain);
    let (b, c) = fuse_layer();
    let (_c, content) = shared(c);
    let mnt = mount(
        Arc::new(b.build()),
        content,
        &lower_fuse,
        &MountOptions::default(),
    )
    .unwrap();
    let opts = format!(
        "lowerdir={}:{}",
        mnt.mountpoint().display(),
        lower_plain.display()
    );
    let ovl = Overlay::mount(&merged, &opts, true).unwrap_or_else(|e| {
        panic!(
            "overlay over the FUSE mount failed ({e}); passthrough active: {}",
            mnt.passthrough_active()
        )
    });
    check_merged(&merged);
    drop(ovl);
    mnt.unmount().unwrap();
    assert!(!is_mounted(&lower_fuse));
}

#[test]
fn writable_overlay_copies_up_from_the_fuse_layer() {
    let tmp = tempfile::tempdir().unwrap();
    let [lower_fuse, lower_plain, upper, work, merged] =
        ["fuse", "plain", "upper", "work", "merged"].map(|n| tmp.path().join(n));
    for d in [&lower_fuse, &lower_plain, &upper, &work, &merged] {
        fs::create_dir(d).unwrap();
    }
    plain_layer(&lower_plain);
    let (b, c) = fuse_layer();
    let (_c, content) = shared(c);
    let mnt = mount(
        Arc::new(b.build()),
        content,
        &lower_fuse,
        &MountOptions::default(),
    )
    .unwrap();
    let opts = format!(
        "lowerdir={}:{},upperdir={},workdir={}",
        mnt.mountpoint().display(),
        lower_plain.display(),
        upper.display(),
        work.display()
    );
    let ovl = Overlay::mount(&merged, &opts, false).unwrap();
    check_merged(&merged);

    // Copy-up of a file that lives in the FUSE layer; the layer itself is untouched.
    fs::write(merged.join("a/new"), b"changed").unwrap();
    assert_eq!(fs::read(merged.join("a/new")).unwrap(), b"changed");
    assert_eq!(fs::read(upper.join("a/new")).unwrap(), b"changed");
    assert_eq!(fs::read(lower_fuse.join("a/new")).unwrap(), b"from fuse");
    // Deleting a FUSE-layer file makes an upper whiteout; the FUSE layer is untouched.
    fs::remove_file(merged.join("o/fresh")).unwrap();
    assert!(!merged.join("o/fresh").exists());
    assert!(lower_fuse.join("o/fresh").exists());
    fs::write(merged.join("a/gone"), b"recreated").unwrap();
    assert_eq!(fs::read(merged.join("a/gone")).unwrap(), b"recreated");

    drop(ovl);
    drop(mnt);
    assert!(!is_mounted(&lower_fuse));
    assert!(!is_mounted(&merged));
}
