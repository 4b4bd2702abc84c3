//! Taking over a live mount from a server that was killed: a child process (this test
//! binary again) mounts a tree, hands its connection over a unix socket and is killed
//! with SIGKILL while one of our reads is in its hands; we resume the connection and
//! everything works on: the read that was lost is resent and answered, files held open
//! across the kill still read, and new opens get the I/O mode the kernel still holds
//! for each inode (a cached-mode inode that could now be passthrough, a passthrough
//! inode whose backing file we no longer offer) instead of EIO.

mod common;

use std::{
    fs,
    io::{IoSlice, IoSliceMut, Read},
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    path::PathBuf,
    process::{Command, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use common::*;
use lazysnap_fuse::{
    Connection, ConnectionInfo, Content, FileId, MountOptions, ReadReply, Tree, TreeBuilder,
    is_live, kernel_supports_passthrough, mount, resume,
};
use nix::sys::socket::{
    AddressFamily, Backlog, ControlMessage, ControlMessageOwned, MsgFlags, SockFlag, SockType,
    UnixAddr, accept, bind, connect, listen, recvmsg, sendmsg, socket,
};

const CHILD_ENV: &str = "LAZYSNAP_FUSE_HANDOVER_CHILD";
const SIZE: usize = 200_000;
const CACHED: FileId = 1;
const PASSTHROUGH: FileId = 2;
/// Files `slow-0`..: their reads are what the killed server leaves unanswered, one
/// per FUSE thread so that each thread holds one when it dies.
const SLOW: [FileId; 4] = [3, 4, 5, 6];

fn tree() -> Tree {
    let mut b = TreeBuilder::new(dir(0o755));
    for (name, id) in [("cached", CACHED), ("passthrough", PASSTHROUGH)] {
        let n = b.add(name, file(SIZE)).unwrap();
        b.set_file(n, id);
    }
    for (i, id) in SLOW.into_iter().enumerate() {
        let n = b.add(&format!("slow-{i}"), file(SIZE)).unwrap();
        b.set_file(n, id);
    }
    b.build()
}

fn contents() -> MemContent {
    let mut files = MemContent::default();
    for id in [CACHED, PASSTHROUGH].into_iter().chain(SLOW) {
        files.add(id, pattern(SIZE, id as u8));
    }
    files
}

/// Answers every read except those of the `SLOW` files, which it keeps unanswered
/// (marking each arrival) when `hold_slow` is set.
struct Server {
    files: MemContent,
    hold_slow: Option<PathBuf>,
    held: Mutex<Vec<ReadReply>>,
}

impl Content for Server {
    fn read(&self, file: FileId, offset: u64, size: u32, reply: ReadReply) {
        if SLOW.contains(&file)
            && let Some(marker) = &self.hold_slow
        {
            self.held.lock().unwrap().push(reply);
            fs::write(marker.join(file.to_string()), b"read").unwrap();
            return;
        }
        self.files.read(file, offset, size, reply)
    }

    fn backing_file(&self, file: FileId) -> Option<fs::File> {
        self.files.backing_file(file)
    }
}

/// The first server: mounts, hands its connection to the parent, waits to be killed.
#[test]
fn handover_child() {
    let Ok(dir) = std::env::var(CHILD_ENV) else {
        return; // only runs as the child of `killed_server_is_taken_over`
    };
    let dir = PathBuf::from(dir);
    let mut files = contents();
    // passthrough for one file; the other is read through us (cached mode)
    files.backing.insert(PASSTHROUGH, dir.join("backing-2"));
    let server = Server {
        files,
        hold_slow: Some(dir.join("slow-reads")),
        held: Mutex::new(Vec::new()),
    };
    let m = mount(
        Arc::new(tree()),
        Arc::new(server),
        &dir.join("mnt"),
        &MountOptions::default(),
    )
    .unwrap();
    let conn = m.connection().unwrap();
    let sock = socket(
        AddressFamily::Unix,
        SockType::SeqPacket,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .unwrap();
    connect(sock.as_raw_fd(), &UnixAddr::new(&dir.join("sock")).unwrap()).unwrap();
    let bytes = encode(&conn.info);
    let fds = [conn.device.as_raw_fd(), conn.opens.as_raw_fd()];
    sendmsg::<()>(
        sock.as_raw_fd(),
        &[IoSlice::new(&bytes)],
        &[ControlMessage::ScmRights(&fds)],
        MsgFlags::empty(),
        None,
    )
    .unwrap();
    std::mem::forget(m); // the parent kills us; nothing may unmount
    loop {
        std::thread::sleep(Duration::from_secs(1));
    }
}

#[test]
fn killed_server_is_taken_over() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    fs::create_dir(dir.join("mnt")).unwrap();
    fs::create_dir(dir.join("slow-reads")).unwrap();
    fs::write(dir.join("backing-2"), pattern(SIZE, PASSTHROUGH as u8)).unwrap();
    fs::write(dir.join("backing-1"), pattern(SIZE, CACHED as u8)).unwrap();
    let listener = socket(
        AddressFamily::Unix,
        SockType::SeqPacket,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .unwrap();
    bind(
        listener.as_raw_fd(),
        &UnixAddr::new(&dir.join("sock")).unwrap(),
    )
    .unwrap();
    listen(&listener, Backlog::new(1).unwrap()).unwrap();

    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "handover_child",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_ENV, dir)
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let guard = KillOnDrop(child.id());
    let stream = unsafe_free_accept(&listener);
    let conn = receive(&stream);
    let mnt = conn.info.mountpoint.clone();
    assert!(is_live(&conn.info), "the child's mount is live");

    // Opens held across the kill: one in cached mode, one in passthrough mode.
    let mut held_cached = fs::File::open(mnt.join("cached")).unwrap();
    let mut held_pt = fs::File::open(mnt.join("passthrough")).unwrap();
    let mut head = vec![0; 4096];
    held_cached.read_exact(&mut head).unwrap();
    assert_eq!(head, pattern(SIZE, CACHED as u8)[..4096]);

    // Reads the child takes and never answers: direct I/O, so that each is one
    // request the reader waits for (a lost readahead would be retried by the kernel
    // and hide a lost request).
    let slow: Vec<_> = (0..SLOW.len())
        .map(|i| {
            let path = mnt.join(format!("slow-{i}"));
            std::thread::spawn(move || read_direct(&path))
        })
        .collect();
    let taken = wait_until(Duration::from_secs(20), || {
        fs::read_dir(dir.join("slow-reads")).map_or(0, |d| d.count()) == SLOW.len()
    });
    assert!(taken, "the child never saw all slow reads");

    child.kill().unwrap();
    child.wait().unwrap();
    drop(guard);
    assert!(is_live(&conn.info), "the mount outlives its server");
    assert!(conn.is_open(), "and so does its connection");
    let probe = Connection {
        device: conn.device.try_clone().unwrap(),
        opens: conn.opens.try_clone().unwrap(),
        info: conn.info.clone(),
    };

    // A successor whose tree is built differently is refused: its inode numbers
    // would name other files.
    let copy = Connection {
        device: conn.device.try_clone().unwrap(),
        opens: conn.opens.try_clone().unwrap(),
        info: conn.info.clone(),
    };
    let mut b = TreeBuilder::new(common::dir(0o755));
    b.add("other", file(1)).unwrap();
    let refused = resume(
        Arc::new(b.build()),
        Arc::new(MemContent::default()),
        copy,
        &MountOptions::default(),
    );
    let err = refused
        .expect_err("a different tree is refused")
        .to_string();
    assert!(err.contains("tree differs"), "{err}");
    let mut moved = conn.info.clone();
    moved.mount_id += 1;
    assert!(!is_live(&moved), "another mount id is another mount");

    // The successor: it would now offer passthrough for `cached` and no longer for
    // `passthrough`; the inherited open table must override both.
    let mut files = contents();
    files.backing.insert(CACHED, dir.join("backing-1"));
    let server = Server {
        files,
        hold_slow: None,
        held: Mutex::new(Vec::new()),
    };
    let m = resume(
        Arc::new(tree()),
        Arc::new(server),
        conn,
        &MountOptions::default(),
    )
    .unwrap();

    if kernel_supports_passthrough() {
        let answered = wait_until(Duration::from_secs(20), || {
            slow.iter().all(|t| t.is_finished())
        });
        assert!(answered, "the lost reads were never resent");
        for (t, id) in slow.into_iter().zip(SLOW) {
            let got = t
                .join()
                .unwrap()
                .expect("a lost read is resent and answered");
            assert!(
                got == pattern(SIZE, id as u8),
                "resent read got the right bytes"
            );
        }
    } else {
        println!("kernel before 6.9: no FUSE_NOTIFY_RESEND, the lost reads stay lost");
    }
    assert!(fs::read(mnt.join("cached")).unwrap() == pattern(SIZE, CACHED as u8));
    assert!(fs::read(mnt.join("passthrough")).unwrap() == pattern(SIZE, PASSTHROUGH as u8));
    let mut rest = Vec::new();
    held_cached.read_to_end(&mut rest).unwrap();
    assert!(
        rest == pattern(SIZE, CACHED as u8)[4096..],
        "an open file reads on"
    );
    let mut all = Vec::new();
    held_pt.read_to_end(&mut all).unwrap();
    assert!(all == pattern(SIZE, PASSTHROUGH as u8));
    drop((held_cached, held_pt));

    m.unmount().unwrap();
    assert!(!is_mounted(&mnt));
    assert!(
        !probe.is_open(),
        "an unmounted, unused mount ends its connection"
    );
}

/// The whole file, read with `O_DIRECT`.
fn read_direct(path: &std::path::Path) -> std::io::Result<Vec<u8>> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)?;
    let mut out = Vec::new();
    f.read_to_end(&mut out)?;
    Ok(out)
}

struct KillOnDrop(u32);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.0 as i32),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
}

fn wait_until(limit: Duration, mut f: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    while start.elapsed() < limit {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

fn unsafe_free_accept(listener: &OwnedFd) -> OwnedFd {
    let fd = accept(listener.as_raw_fd()).unwrap();
    // SAFETY: accept returned a new descriptor that nothing else owns.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

fn receive(stream: &OwnedFd) -> Connection {
    let mut buf = vec![0u8; 65536];
    let mut space = nix::cmsg_space!([std::os::fd::RawFd; 2]);
    let mut iov = [IoSliceMut::new(&mut buf)];
    let msg = recvmsg::<()>(
        stream.as_raw_fd(),
        &mut iov,
        Some(&mut space),
        MsgFlags::MSG_CMSG_CLOEXEC,
    )
    .unwrap();
    let mut fds = Vec::new();
    for c in msg.cmsgs().unwrap() {
        if let ControlMessageOwned::ScmRights(r) = c {
            // SAFETY: descriptors received with SCM_RIGHTS are ours to own.
            fds.extend(r.into_iter().map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }));
        }
    }
    let n = msg.bytes;
    let info = decode(&buf[..n]);
    let mut fds = fds.into_iter();
    Connection {
        device: fds.next().unwrap(),
        opens: fds.next().unwrap(),
        info,
    }
}

fn encode(info: &ConnectionInfo) -> Vec<u8> {
    let mut out = Vec::new();
    for field in [
        info.mountpoint.as_os_str().as_encoded_bytes(),
        info.dev.as_bytes(),
        &info.init_request,
        &info.init_reply,
    ] {
        out.extend_from_slice(&(field.len() as u32).to_le_bytes());
        out.extend_from_slice(field);
    }
    out.extend_from_slice(&info.mount_id.to_le_bytes());
    out.extend_from_slice(&info.tree_fingerprint.to_le_bytes());
    out
}

fn decode(mut b: &[u8]) -> ConnectionInfo {
    let mut field = || {
        let len = u32::from_le_bytes(b[..4].try_into().unwrap()) as usize;
        let v = b[4..4 + len].to_vec();
        b = &b[4 + len..];
        v
    };
    let mountpoint = PathBuf::from(String::from_utf8(field()).unwrap());
    let dev = String::from_utf8(field()).unwrap();
    let init_request = field();
    let init_reply = field();
    let mount_id = u64::from_le_bytes(b[..8].try_into().unwrap());
    let tree_fingerprint = u64::from_le_bytes(b[8..16].try_into().unwrap());
    ConnectionInfo {
        mountpoint,
        mount_id,
        dev,
        init_request,
        init_reply,
        tree_fingerprint,
    }
}
