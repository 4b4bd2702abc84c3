//! FUSE passthrough: files whose content is local are read by the kernel from the backing
//! file, never through `Content::read`.

mod common;

use std::{
    fs,
    io::{Read, Seek, SeekFrom},
    sync::Arc,
};

use common::*;
use lazysnap_fuse::{MountOptions, TreeBuilder, kernel_supports_passthrough, mount};

const SIZE: usize = 300_000;

#[test]
fn local_files_are_read_by_the_kernel_directly() {
    let tmp = tempfile::tempdir().unwrap();
    let backing = tmp.path().join("backing");
    let wrong_size = tmp.path().join("wrong-size");
    fs::write(&backing, pattern(SIZE, 1)).unwrap();
    fs::write(&wrong_size, b"short").unwrap();
    let mnt_dir = tmp.path().join("mnt");
    fs::create_dir(&mnt_dir).unwrap();

    let mut b = TreeBuilder::new(dir(0o755));
    let cached = b.add("cached", file(SIZE)).unwrap();
    b.set_file(cached, 1);
    b.link("cached-link", cached).unwrap();
    let remote = b.add("remote", file(SIZE)).unwrap();
    b.set_file(remote, 2);
    let bad = b.add("bad-backing", file(SIZE)).unwrap();
    b.set_file(bad, 3);

    let mut c = MemContent::default();
    // Content::read would answer different bytes than the backing file holds, so a read
    // that went through the daemon would show.
    c.add(1, pattern(SIZE, 0xAA));
    c.add(2, pattern(SIZE, 2));
    c.add(3, pattern(SIZE, 3));
    c.backing.insert(1, backing.clone());
    c.backing.insert(3, wrong_size);
    let (c, content) = shared(c);

    let mnt = mount(
        Arc::new(b.build()),
        content,
        &mnt_dir,
        &MountOptions::default(),
    )
    .unwrap();
    let root = mnt.mountpoint().to_path_buf();
    let supported = kernel_supports_passthrough();
    println!(
        "kernel supports passthrough: {supported}, mount has it: {}",
        mnt.passthrough_active()
    );

    // Files without a (usable) backing file read through Content either way.
    assert_eq!(fs::read(root.join("remote")).unwrap(), pattern(SIZE, 2));
    assert!(c.reads_of(2) > 0);
    assert_eq!(
        fs::read(root.join("bad-backing")).unwrap(),
        pattern(SIZE, 3)
    );
    assert!(c.reads_of(3) > 0, "a wrong-sized backing file is not used");

    if !mnt.passthrough_active() {
        println!(
            "passthrough not active (kernel {}), checking the fallback",
            nix::sys::utsname::uname()
                .map(|u| u.release().to_string_lossy().into_owned())
                .unwrap_or_default()
        );
        assert_eq!(fs::read(root.join("cached")).unwrap(), pattern(SIZE, 0xAA));
        assert!(
            !supported,
            "kernel is new enough but passthrough was refused"
        );
        return;
    }

    // Two opens at once, through two names of one inode: one shared backing id.
    let mut f1 = fs::File::open(root.join("cached")).unwrap();
    let mut f2 = fs::File::open(root.join("cached-link")).unwrap();
    let mut all = Vec::new();
    f1.read_to_end(&mut all).unwrap();
    assert!(all == pattern(SIZE, 1), "passthrough read the backing file");
    f2.seek(SeekFrom::Start(1000)).unwrap();
    let mut some = vec![0; 100];
    f2.read_exact(&mut some).unwrap();
    assert_eq!(some, pattern(SIZE, 1)[1000..1100]);
    drop((f1, f2));
    // Reopened after the last release: passthrough again.
    assert!(fs::read(root.join("cached")).unwrap() == pattern(SIZE, 1));
    assert_eq!(c.reads_of(1), 0, "passthrough reads never reach the daemon");

    mnt.unmount().unwrap();
    assert!(!is_mounted(&mnt_dir));
}

#[test]
fn passthrough_layers_stack_under_overlayfs() {
    let tmp = tempfile::tempdir().unwrap();
    let [backing, lower, upper, work, merged] =
        ["backing", "lower", "upper", "work", "merged"].map(|n| tmp.path().join(n));
    fs::write(&backing, b"kernel reads me").unwrap();
    for d in [&lower, &upper, &work, &merged] {
        fs::create_dir(d).unwrap();
    }
    let mut b = TreeBuilder::new(dir(0o755));
    let f = b.add("f", file(15)).unwrap();
    b.set_file(f, 1);
    let mut c = MemContent::default();
    c.add(1, b"daemon reads me".to_vec());
    c.backing.insert(1, backing);
    let (c, content) = shared(c);
    let mnt = mount(
        Arc::new(b.build()),
        content,
        &lower,
        &MountOptions::default(),
    )
    .unwrap();
    let opts = format!(
        "lowerdir={},upperdir={},workdir={}",
        mnt.mountpoint().display(),
        upper.display(),
        work.display()
    );
    let ovl = Overlay::mount(&merged, &opts, false).unwrap_or_else(|e| {
        panic!(
            "overlay over FUSE failed: {e} (passthrough active: {})",
            mnt.passthrough_active()
        )
    });
    let got = fs::read(merged.join("f")).unwrap();
    if mnt.passthrough_active() {
        assert_eq!(got, b"kernel reads me");
        assert_eq!(c.reads_of(1), 0);
    } else {
        assert_eq!(got, b"daemon reads me");
    }
    // Copy-up reads the whole file through the same path.
    fs::write(merged.join("f2"), b"x").unwrap();
    fs::OpenOptions::new()
        .append(true)
        .open(merged.join("f"))
        .unwrap();
    assert_eq!(fs::read(upper.join("f")).unwrap(), got);
    drop(ovl);
    drop(mnt);
    assert!(!is_mounted(&lower));
}

/// Content whose file becomes fully cached while it is open.
struct BecomesLocal {
    bytes: Vec<u8>,
    path: std::path::PathBuf,
    local: std::sync::atomic::AtomicBool,
}

impl lazysnap_fuse::Content for BecomesLocal {
    fn read(&self, _file: u64, offset: u64, size: u32, reply: lazysnap_fuse::ReadReply) {
        let start = offset as usize;
        reply.data(&self.bytes[start..(start + size as usize).min(self.bytes.len())]);
    }

    fn backing_file(&self, _file: u64) -> Option<fs::File> {
        if self.local.load(std::sync::atomic::Ordering::SeqCst) {
            fs::File::open(&self.path).ok()
        } else {
            None
        }
    }
}

#[test]
fn a_file_open_uncached_keeps_its_mode_until_closed() {
    // The kernel refuses (ETXTBSY) a passthrough open of an inode that is open through
    // the page cache; the mount must not offer one while the first open lives.
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("backing");
    fs::write(&path, pattern(4096, 9)).unwrap();
    let mnt_dir = tmp.path().join("mnt");
    fs::create_dir(&mnt_dir).unwrap();
    let mut b = TreeBuilder::new(dir(0o755));
    let f = b.add("f", file(4096)).unwrap();
    b.set_file(f, 1);
    let content = Arc::new(BecomesLocal {
        bytes: pattern(4096, 9),
        path,
        local: false.into(),
    });
    let mnt = mount(
        Arc::new(b.build()),
        content.clone(),
        &mnt_dir,
        &MountOptions::default(),
    )
    .unwrap();
    let f_path = mnt.mountpoint().join("f");
    let first = fs::File::open(&f_path).unwrap();
    content
        .local
        .store(true, std::sync::atomic::Ordering::SeqCst);
    let second = fs::File::open(&f_path);
    assert!(second.is_ok(), "second open failed: {:?}", second.err());
    assert_eq!(fs::read(&f_path).unwrap(), pattern(4096, 9));
    drop((first, second));
    // After the last close the next open may use passthrough.
    assert_eq!(fs::read(&f_path).unwrap(), pattern(4096, 9));
    mnt.unmount().unwrap();
}
