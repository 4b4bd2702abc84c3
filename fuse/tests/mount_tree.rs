//! A tree with every kind of entry, mounted for real and inspected with std::fs and libc.

mod common;

use std::{
    collections::BTreeSet,
    fs,
    io::{ErrorKind, Read, Seek, SeekFrom},
    os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt},
    path::Path,
    sync::Arc,
};

use common::*;
use lazysnap_fuse::{Attr, Kind, MountOptions, NodeRef, Tree, TreeBuilder, mount};

const HOSTS: &[u8] = b"127.0.0.1 localhost\n";
/// A v2 `security.capability` (cap_net_bind_service permitted+effective): binary, with
/// NUL bytes, and in the only shape the kernel passes through.
const CAPS: [u8; 20] = [
    0x01, 0x00, 0x00, 0x02, 0x00, 0x04, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
    0x00, 0x00, 0x00, 0x00,
];
const BIG: usize = 3 * 1024 * 1024 + 12_345;
const MANY: usize = 2000;

fn long_name() -> String {
    "L".repeat(200) + &"é".repeat(27) + "x" // 200 + 54 + 1 = 255 bytes
}

fn build() -> (Tree, MemContent) {
    let mut content = MemContent::default();
    let mut b = TreeBuilder::new(dir(0o755));
    b.add("etc", dir(0o755)).unwrap();
    let hosts = b
        .add(
            "etc/hosts",
            Attr {
                uid: 1000,
                gid: 1001,
                perm: 0o640,
                mtime: time(1_600_000_000, 500_000_000),
                ..file(HOSTS.len())
            },
        )
        .unwrap();
    b.set_file(hosts, 1);
    content.add(1, HOSTS.to_vec());
    let empty = b.add("etc/empty", file(0)).unwrap();
    b.set_file(empty, 2);
    content.add(2, Vec::new());
    b.add("etc/unbacked-empty", file(0)).unwrap();
    let link = b
        .add(
            "etc/link",
            Attr {
                kind: Kind::Symlink,
                perm: 0o777,
                ..Attr::default()
            },
        )
        .unwrap();
    b.set_symlink_target(link, b"hosts");
    b.link("etc/hard", hosts).unwrap();
    // A whiteout of a name that exists in this layer loses to the real entry.
    b.add("etc/.wh.hosts", file(0)).unwrap();
    b.add(
        "etc/.wh.removed",
        Attr {
            perm: 0,
            uid: 7,
            gid: 7,
            ..file(0)
        },
    )
    .unwrap();
    b.add("etc/.wh..wh.plnk", dir(0o700)).unwrap();

    b.add("dev", dir(0o755)).unwrap();
    b.add(
        "dev/null",
        Attr {
            kind: Kind::CharDev,
            perm: 0o666,
            rdev: libc::makedev(1, 3) as u32,
            ..Attr::default()
        },
    )
    .unwrap();
    b.add(
        "dev/sda",
        Attr {
            kind: Kind::BlockDev,
            perm: 0o660,
            gid: 6,
            rdev: libc::makedev(8, 0) as u32,
            ..Attr::default()
        },
    )
    .unwrap();
    b.add(
        "dev/fifo",
        Attr {
            kind: Kind::Fifo,
            perm: 0o600,
            ..Attr::default()
        },
    )
    .unwrap();
    b.add(
        "dev/sock",
        Attr {
            kind: Kind::Socket,
            perm: 0o755,
            ..Attr::default()
        },
    )
    .unwrap();

    b.add("bin", dir(0o755)).unwrap();
    let ping = b
        .add(
            "bin/ping",
            Attr {
                perm: 0o4755,
                ..file(4)
            },
        )
        .unwrap();
    b.set_file(ping, 3);
    content.add(3, b"ELF!".to_vec());
    b.set_xattr(ping, b"security.capability", &CAPS);
    b.set_xattr(ping, b"user.note", b"hello");

    b.add("données", dir(0o755)).unwrap();
    let jp = b.add("données/日本語.txt", file(6)).unwrap();
    b.set_file(jp, 4);
    content.add(4, "日本".as_bytes().to_vec());
    let long = b.add(&long_name(), file(1)).unwrap();
    b.set_file(long, 5);
    content.add(5, b"L".to_vec());

    b.add("opq", dir(0o755)).unwrap();
    b.add("opq/.wh..wh..opq", file(0)).unwrap();
    let new = b.add("opq/new", file(3)).unwrap();
    b.set_file(new, 6);
    content.add(6, b"new".to_vec());

    let big = b.add("big", file(BIG)).unwrap();
    b.set_file(big, 7);
    content.add(7, pattern(BIG, 7));

    b.add("many", dir(0o755)).unwrap();
    for i in 0..MANY {
        b.add(&format!("many/entry-with-a-longish-name-{i:05}"), file(0))
            .unwrap();
    }
    // Content for a file whose size says there are bytes, but none are set: EIO.
    b.add("etc/unbacked", file(10)).unwrap();
    (b.build(), content)
}

#[test]
fn every_kind_of_entry_reads_back() {
    let (tree, content) = build();
    let tree = Arc::new(tree);
    // Tree accessors used by status and the lazy layer.
    assert_eq!(
        tree.attr(tree.lookup_path("etc/hosts").unwrap()).nlink,
        2,
        "hosts and hard share one node"
    );
    assert_eq!(tree.lookup_path("etc/hard"), tree.lookup_path("etc/hosts"));
    assert!(tree.lookup_path("etc/.wh.removed").is_none());
    assert!(tree.node_count() > MANY + 20);

    let (_content, dyn_content) = shared(content);
    let dir = tempfile::tempdir().unwrap();
    let mnt = mount(
        Arc::clone(&tree),
        dyn_content,
        dir.path(),
        &MountOptions::default(),
    )
    .unwrap();
    let m = mnt.mountpoint().to_path_buf();
    assert_eq!(m, dir.path().canonicalize().unwrap());

    let info = mountinfo_line(&m).expect("mounted");
    assert!(info.contains(" - fuse.lazysnap lazysnap "), "{info}");
    assert!(info.contains(" ro,") || info.contains(" ro "), "{info}");
    assert!(info.contains("default_permissions"), "{info}");
    assert!(info.contains("allow_other"), "{info}");

    check_content(&m);
    check_metadata(&m, &tree);
    check_links_and_devices(&m);
    check_xattrs(&m);
    check_listings(&m);
    check_whiteouts(&m);
    check_read_only(&m);
    check_statfs(&m, &tree);

    mnt.unmount().unwrap();
    assert!(!is_mounted(dir.path()), "unmount leaves no mount");
}

fn check_content(m: &Path) {
    assert_eq!(fs::read(m.join("etc/hosts")).unwrap(), HOSTS);
    assert_eq!(fs::read(m.join("etc/hard")).unwrap(), HOSTS);
    assert_eq!(fs::read(m.join("etc/link")).unwrap(), HOSTS);
    assert_eq!(fs::read(m.join("etc/empty")).unwrap(), b"");
    assert_eq!(fs::read(m.join("etc/unbacked-empty")).unwrap(), b"");
    let err = fs::read(m.join("etc/unbacked")).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
    assert_eq!(
        fs::read(m.join("données/日本語.txt")).unwrap(),
        "日本".as_bytes()
    );
    assert_eq!(fs::read(m.join(long_name())).unwrap(), b"L");
    let big = fs::read(m.join("big")).unwrap();
    assert_eq!(big.len(), BIG);
    assert!(big == pattern(BIG, 7), "big file bytes differ");
    // A read that starts inside and runs past the end is clipped.
    let mut f = fs::File::open(m.join("big")).unwrap();
    f.seek(SeekFrom::Start(BIG as u64 - 5)).unwrap();
    let mut tail = Vec::new();
    f.read_to_end(&mut tail).unwrap();
    assert_eq!(tail, pattern(BIG, 7)[BIG - 5..]);
}

fn check_metadata(m: &Path, tree: &Tree) {
    let hosts = fs::symlink_metadata(m.join("etc/hosts")).unwrap();
    assert!(hosts.file_type().is_file());
    assert_eq!(hosts.permissions().mode() & 0o7777, 0o640);
    assert_eq!((hosts.uid(), hosts.gid()), (1000, 1001));
    assert_eq!(hosts.len(), HOSTS.len() as u64);
    assert_eq!(
        (hosts.mtime(), hosts.mtime_nsec()),
        (1_600_000_000, 500_000_000)
    );
    assert_eq!(hosts.nlink(), 2);
    let hosts_node = tree.lookup_path("etc/hosts").unwrap();
    assert_eq!(hosts.ino(), hosts_node.ino());

    let ping = fs::metadata(m.join("bin/ping")).unwrap();
    assert_eq!(ping.permissions().mode() & 0o7777, 0o4755);

    let root = fs::metadata(m).unwrap();
    assert_eq!(root.ino(), NodeRef::ROOT.ino());
    assert_eq!(root.ino(), 1);
    // etc, dev, bin, données, opq, many: 2 + 6 (the hidden .wh..wh.plnk is not counted).
    assert_eq!(root.nlink(), 8);
    assert_eq!(fs::metadata(m.join("etc")).unwrap().nlink(), 2);
    assert_eq!(
        fs::metadata(m.join("many")).unwrap().len(),
        0,
        "directories report size 0"
    );
}

fn check_links_and_devices(m: &Path) {
    assert_eq!(
        fs::read_link(m.join("etc/link")).unwrap(),
        Path::new("hosts")
    );
    let link = fs::symlink_metadata(m.join("etc/link")).unwrap();
    assert!(link.file_type().is_symlink());
    assert_eq!(link.len(), 5);
    let a = fs::metadata(m.join("etc/hosts")).unwrap();
    let b = fs::metadata(m.join("etc/hard")).unwrap();
    assert_eq!(a.ino(), b.ino(), "hard links share an inode");
    let err = fs::read_link(m.join("etc/hosts")).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EINVAL));

    let null = fs::symlink_metadata(m.join("dev/null")).unwrap();
    assert!(null.file_type().is_char_device());
    assert_eq!(null.rdev(), libc::makedev(1, 3));
    assert_eq!(null.permissions().mode() & 0o7777, 0o666);
    let sda = fs::symlink_metadata(m.join("dev/sda")).unwrap();
    assert!(sda.file_type().is_block_device());
    assert_eq!(sda.rdev(), libc::makedev(8, 0));
    assert_eq!(sda.gid(), 6);
    assert!(
        fs::symlink_metadata(m.join("dev/fifo"))
            .unwrap()
            .file_type()
            .is_fifo()
    );
    assert!(
        fs::symlink_metadata(m.join("dev/sock"))
            .unwrap()
            .file_type()
            .is_socket()
    );
}

fn check_xattrs(m: &Path) {
    let ping = m.join("bin/ping");
    assert_eq!(getxattr(&ping, "security.capability").unwrap(), CAPS);
    assert_eq!(getxattr(&ping, "user.note").unwrap(), b"hello");
    // Size probe, then a buffer one byte short.
    assert_eq!(getxattr_cap(&ping, "user.note", 0).unwrap().len(), 5);
    assert_eq!(getxattr_cap(&ping, "user.note", 4), Err(libc::ERANGE));
    // Missing: ENODATA (61), for the probe too.
    assert_eq!(getxattr(&ping, "user.missing"), Err(61));
    assert_eq!(getxattr_cap(&ping, "user.missing", 0), Err(libc::ENODATA));
    assert_eq!(
        getxattr(&m.join("etc"), "trusted.overlay.opaque"),
        Err(libc::ENODATA)
    );
    let mut names = listxattr(&ping).unwrap();
    names.sort();
    assert_eq!(names, vec!["security.capability", "user.note"]);
    assert_eq!(
        listxattr(&m.join("etc/hosts")).unwrap(),
        Vec::<String>::new()
    );
    // Symlinks carry their own (absent) xattrs.
    assert_eq!(
        getxattr(&m.join("etc/link"), "user.note"),
        Err(libc::ENODATA)
    );
}

fn check_listings(m: &Path) {
    let etc: BTreeSet<String> = fs::read_dir(m.join("etc"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    let want: BTreeSet<String> = [
        "empty",
        "hard",
        "hosts",
        "link",
        "removed",
        "unbacked",
        "unbacked-empty",
    ]
    .into_iter()
    .map(String::from)
    .collect();
    assert_eq!(etc, want);

    let raw = raw_readdir(&m.join("etc"));
    assert!(raw.contains(&b".".to_vec()) && raw.contains(&b"..".to_vec()));
    assert_eq!(raw.len(), want.len() + 2);

    // Types come with the listing (d_type), without a stat.
    let kinds: Vec<(String, bool)> = fs::read_dir(m.join("dev"))
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            let ft = e.file_type().unwrap();
            (
                e.file_name().to_string_lossy().into_owned(),
                ft.is_char_device(),
            )
        })
        .collect();
    assert!(kinds.contains(&("null".to_string(), true)));
    assert!(kinds.contains(&("fifo".to_string(), false)));

    // Big enough for several readdir calls: offsets must resume without loss or repeats.
    for _ in 0..2 {
        let mut names: Vec<String> = fs::read_dir(m.join("many"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names.len(), MANY);
        names.sort();
        names.dedup();
        assert_eq!(names.len(), MANY);
    }
    let raw = raw_readdir(&m.join("many"));
    assert_eq!(raw.len(), MANY + 2);

    assert_eq!(
        fs::read_dir(m.join("données"))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect::<Vec<_>>(),
        vec!["日本語.txt"]
    );
    let root: BTreeSet<String> = fs::read_dir(m)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(root.contains(&long_name()));
    assert_eq!(long_name().len(), 255);
}

fn check_whiteouts(m: &Path) {
    let removed = fs::symlink_metadata(m.join("etc/removed")).unwrap();
    assert!(removed.file_type().is_char_device());
    assert_eq!(removed.rdev(), 0);
    assert_eq!((removed.uid(), removed.gid()), (0, 0));
    assert_eq!(removed.permissions().mode() & 0o7777, 0);
    for hidden in [
        "etc/.wh.removed",
        "etc/.wh.hosts",
        "etc/.wh..wh.plnk",
        "opq/.wh..wh..opq",
    ] {
        let err = fs::symlink_metadata(m.join(hidden)).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::NotFound, "{hidden}");
    }
    // The real hosts won over its whiteout.
    assert!(fs::metadata(m.join("etc/hosts")).unwrap().is_file());
    assert_eq!(
        getxattr(&m.join("opq"), "trusted.overlay.opaque").unwrap(),
        b"y"
    );
    assert!(
        listxattr(&m.join("opq"))
            .unwrap()
            .contains(&"trusted.overlay.opaque".to_string())
    );
    let opq: Vec<String> = fs::read_dir(m.join("opq"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(opq, vec!["new"]);
}

fn check_read_only(m: &Path) {
    fn erofs<T: std::fmt::Debug>(what: &str, r: std::io::Result<T>) {
        let err = r.expect_err(what);
        assert_eq!(err.raw_os_error(), Some(libc::EROFS), "{what}: {err}");
    }
    erofs("create", fs::File::create(m.join("etc/newfile")));
    erofs("write", fs::write(m.join("etc/hosts"), b"x"));
    erofs(
        "open rw",
        fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(m.join("etc/hosts")),
    );
    erofs("mkdir", fs::create_dir(m.join("newdir")));
    erofs("unlink", fs::remove_file(m.join("etc/hosts")));
    erofs("rmdir", fs::remove_dir(m.join("opq")));
    erofs("rename", fs::rename(m.join("etc/hosts"), m.join("etc/h2")));
    erofs("link", fs::hard_link(m.join("etc/hosts"), m.join("etc/h3")));
    erofs(
        "symlink",
        std::os::unix::fs::symlink("x", m.join("etc/sym")),
    );
    erofs(
        "chmod",
        fs::set_permissions(m.join("etc/hosts"), fs::Permissions::from_mode(0o777)),
    );
    assert_eq!(
        setxattr(&m.join("etc/hosts"), "user.x", b"1"),
        Err(libc::EROFS)
    );
    // Nothing changed.
    assert_eq!(fs::read(m.join("etc/hosts")).unwrap(), HOSTS);
}

fn check_statfs(m: &Path, tree: &Tree) {
    let st = nix::sys::statvfs::statvfs(m).unwrap();
    assert_eq!(st.name_max(), 255);
    assert!(st.flags().contains(nix::sys::statvfs::FsFlags::ST_RDONLY));
    assert_eq!(st.blocks(), tree.total_size().div_ceil(4096));
    assert_eq!(st.files(), tree.node_count() as u64);
    assert!(tree.total_size() >= BIG as u64);
}

#[test]
fn dropping_the_mount_unmounts() {
    let mut b = TreeBuilder::new(dir(0o755));
    b.add("x", file(0)).unwrap();
    let (_c, content) = shared(MemContent::default());
    let dir = tempfile::tempdir().unwrap();
    {
        let mnt = mount(
            Arc::new(b.build()),
            content,
            dir.path(),
            &MountOptions {
                threads: 1,
                passthrough: false,
                ..MountOptions::default()
            },
        )
        .unwrap();
        assert!(is_mounted(dir.path()));
        assert!(!mnt.passthrough_active(), "passthrough was not asked for");
        assert!(dir.path().join("x").exists());
    }
    assert!(!is_mounted(dir.path()), "drop leaves no mount");
    assert!(!dir.path().join("x").exists());
}

#[test]
fn a_mount_failure_names_the_mountpoint() {
    let (_c, content) = shared(MemContent::default());
    let missing = Path::new("/nonexistent/lazysnap-test-mountpoint");
    let err = mount(
        Arc::new(TreeBuilder::new(dir(0o755)).build()),
        content,
        missing,
        &MountOptions::default(),
    )
    .unwrap_err();
    assert!(
        err.to_string()
            .contains("/nonexistent/lazysnap-test-mountpoint"),
        "{err}"
    );
}

#[test]
fn unmount_while_a_file_is_open_detaches_and_keeps_serving() {
    let mut b = TreeBuilder::new(dir(0o755));
    let f = b.add("f", file(3)).unwrap();
    b.set_file(f, 1);
    let mut c = MemContent::default();
    c.add(1, b"abc".to_vec());
    let (_c, content) = shared(c);
    let dir = tempfile::tempdir().unwrap();
    let mnt = mount(
        Arc::new(b.build()),
        content,
        dir.path(),
        &MountOptions::default(),
    )
    .unwrap();
    let mut open = fs::File::open(dir.path().join("f")).unwrap();
    let unmounter = std::thread::spawn(move || mnt.unmount());
    // The detach is immediate: the path is free at once.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(3);
    while is_mounted(dir.path()) && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    assert!(!is_mounted(dir.path()));
    // The open file still reads through the detached mount.
    let mut s = String::new();
    open.read_to_string(&mut s).unwrap();
    assert_eq!(s, "abc");
    drop(open);
    unmounter.join().unwrap().unwrap();
}
