//! Reads answered later from a worker, errors from Content, and a panicking Content.

mod common;

use std::{
    fs,
    sync::{Arc, Mutex, mpsc},
    thread,
    time::{Duration, Instant},
};

use common::*;
use lazysnap_fuse::{Content, FileId, MountOptions, ReadReply, TreeBuilder, mount};

const DELAY: Duration = Duration::from_millis(400);
const FILES: usize = 6;
const SIZE: usize = 8 * 1024;

/// Content that hands every read to a pool of worker threads, which answer after DELAY,
/// as a lazy layer waiting on the registry would.
struct SlowContent {
    files: Vec<Vec<u8>>,
    jobs: Mutex<mpsc::Sender<(FileId, u64, u32, ReadReply)>>,
}

impl SlowContent {
    fn new(files: Vec<Vec<u8>>) -> Arc<SlowContent> {
        let (tx, rx) = mpsc::channel::<(FileId, u64, u32, ReadReply)>();
        let rx = Arc::new(Mutex::new(rx));
        let content = Arc::new(SlowContent {
            files,
            jobs: Mutex::new(tx),
        });
        for _ in 0..FILES * 2 {
            let rx = Arc::clone(&rx);
            let weak = Arc::downgrade(&content);
            thread::spawn(move || {
                loop {
                    let job = rx.lock().unwrap().recv();
                    let Ok((file, offset, size, reply)) = job else {
                        return;
                    };
                    thread::sleep(DELAY);
                    let Some(c) = weak.upgrade() else { return };
                    let bytes = &c.files[file as usize];
                    let start = offset as usize;
                    let end = (start + size as usize).min(bytes.len());
                    reply.data(&bytes[start..end]);
                }
            });
        }
        content
    }
}

impl Content for SlowContent {
    fn read(&self, file: FileId, offset: u64, size: u32, reply: ReadReply) {
        // Never blocks: queue and return.
        self.jobs
            .lock()
            .unwrap()
            .send((file, offset, size, reply))
            .unwrap();
    }
}

#[test]
fn slow_reads_do_not_block_fuse_threads() {
    let mut b = TreeBuilder::new(dir(0o755));
    let mut files = Vec::new();
    for i in 0..FILES {
        let n = b.add(&format!("f{i}"), file(SIZE)).unwrap();
        b.set_file(n, i as FileId);
        files.push(pattern(SIZE, i as u8));
    }
    b.add("quick", file(0)).unwrap();
    let content = SlowContent::new(files.clone());
    let d = tempfile::tempdir().unwrap();
    // One FUSE thread: if a pending read held it, everything else would queue behind.
    let mnt = mount(
        Arc::new(b.build()),
        content,
        d.path(),
        &MountOptions {
            threads: 1,
            ..MountOptions::default()
        },
    )
    .unwrap();
    let root = mnt.mountpoint().to_path_buf();
    // Look the files up first so that only the reads are timed.
    for i in 0..FILES {
        fs::metadata(root.join(format!("f{i}"))).unwrap();
    }

    let start = Instant::now();
    let readers: Vec<_> = (0..FILES)
        .map(|i| {
            let path = root.join(format!("f{i}"));
            thread::spawn(move || fs::read(path).unwrap())
        })
        .collect();
    // While every read waits on a worker, the FUSE thread still answers metadata.
    thread::sleep(Duration::from_millis(50));
    let t = Instant::now();
    assert!(fs::metadata(root.join("quick")).unwrap().is_file());
    assert!(fs::read_dir(&root).unwrap().count() > FILES);
    let meta_time = t.elapsed();
    assert!(
        meta_time < DELAY,
        "metadata waited behind pending reads: {meta_time:?}"
    );
    for (i, r) in readers.into_iter().enumerate() {
        assert!(r.join().unwrap() == files[i], "bytes of f{i}");
    }
    let elapsed = start.elapsed();
    // Served one after another this would take FILES * DELAY (2.4 s).
    assert!(
        elapsed < DELAY * 3,
        "reads were serialised: {elapsed:?} for {FILES} reads of {DELAY:?}"
    );
    assert!(
        elapsed >= DELAY,
        "reads were not delayed at all: {elapsed:?}"
    );
    mnt.unmount().unwrap();
}

/// Content that fails one file with EIO and panics on another.
struct FaultyContent;

impl Content for FaultyContent {
    fn read(&self, file: FileId, offset: u64, size: u32, reply: ReadReply) {
        match file {
            1 => reply.error(libc::EIO),
            2 => panic!("deliberate test panic in Content::read"),
            _ => {
                let bytes = pattern(1000, 3);
                let start = offset as usize;
                reply.data(&bytes[start..start + size as usize]);
            }
        }
    }
}

#[test]
fn errors_from_content_reach_the_reader_and_others_still_read() {
    let mut b = TreeBuilder::new(dir(0o755));
    for (name, id, size) in [("bad", 1, 100), ("panics", 2, 100), ("good", 3, 1000)] {
        let n = b.add(name, file(size)).unwrap();
        b.set_file(n, id);
    }
    let d = tempfile::tempdir().unwrap();
    let mnt = mount(
        Arc::new(b.build()),
        Arc::new(FaultyContent),
        d.path(),
        // One thread: had the panic killed it, nothing below would be answered.
        &MountOptions {
            threads: 1,
            ..MountOptions::default()
        },
    )
    .unwrap();
    let root = mnt.mountpoint();
    let err = fs::read(root.join("bad")).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
    let err = fs::read(root.join("panics")).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
    // The FUSE thread survived the panic: more requests still get answers.
    for _ in 0..20 {
        assert_eq!(fs::read(root.join("good")).unwrap(), pattern(1000, 3));
        assert!(fs::metadata(root.join("bad")).is_ok());
    }
    let err = fs::read(root.join("bad")).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EIO));
    drop(mnt);
    assert!(!is_mounted(d.path()));
}
