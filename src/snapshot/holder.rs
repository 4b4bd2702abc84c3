//! The fd holder: a small long-lived process (`lazysnap fd-holder`) that keeps a
//! duplicate of every mounted layer's `/dev/fuse` connection, so that the connection
//! survives the daemon (SIGKILL, crash, upgrade). Requests that arrive while no daemon
//! serves wait in the kernel; the next daemon asks the holder for the connections and
//! serves them again (`lazysnap_fuse::resume`).
//!
//! The protocol: JSON messages on a `SOCK_SEQPACKET` unix socket (`<root>/fdstore.sock`,
//! 0600), descriptors attached with `SCM_RIGHTS`. A [`Record`] carries what the next
//! daemon needs besides the descriptors: where the layer is mounted, how the
//! connection was set up, and the snapshot labels that name the layer. The holder
//! drops a record when the daemon says the layer was unmounted, or when the kernel
//! ends the connection (the mount is gone and unused).

pub mod server;

use std::collections::HashMap;
use std::io::{IoSlice, IoSliceMut};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use lazysnap_fuse::{Connection, ConnectionInfo};
use nix::sys::socket::{
    AddressFamily, ControlMessage, ControlMessageOwned, MsgFlags, SockFlag, SockType, UnixAddr,
    connect, recvmsg, sendmsg, socket,
};
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use crate::error::{Error, Result};

/// Version of the message format; a holder refuses nothing, it only reports it.
const PROTOCOL: u32 = 1;
/// Largest message (records carry labels, which can list every layer of an image).
const MAX_MESSAGE: usize = 1 << 20;
/// How long a daemon waits for a holder it started to listen.
const SPAWN_WAIT: Duration = Duration::from_secs(10);

/// What the holder keeps with a connection's descriptors.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    /// Where the layer is mounted and how its connection was set up.
    #[serde(flatten)]
    pub info: ConnectionInfo,
    /// The snapshot labels that name the layer.
    pub labels: HashMap<String, String>,
}

/// A connection handed back by the holder, with its record.
#[derive(Debug)]
pub struct Held {
    /// What was recorded.
    pub record: Record,
    /// The descriptors, ready to resume.
    pub connection: Connection,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
enum Request {
    Hello,
    /// Keep this connection (two descriptors: `/dev/fuse`, open table), replacing any
    /// record for the same mount (mountpoint and mount id).
    Put {
        record: Box<Record>,
    },
    /// Forget the connections at this mountpoint (only the one of this mount id,
    /// when given).
    Drop {
        mountpoint: PathBuf,
        #[serde(default)]
        mount_id: Option<u64>,
    },
    /// Hand every connection back (one `Item` each, then `End`).
    List,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "reply", rename_all = "snake_case")]
enum Reply {
    Ok,
    Hello { pid: u32, protocol: u32 },
    Item { record: Box<Record> },
    End,
    Error { message: String },
}

/// The daemon's connection to the holder.
#[derive(Debug)]
pub struct Holder {
    path: PathBuf,
    socket: Mutex<OwnedFd>,
    pid: u32,
}

impl Holder {
    /// Connects to the holder listening at `path`.
    pub fn connect(path: &Path) -> Result<Holder> {
        let socket = dial(path)?;
        let pid = match call(&socket, &Request::Hello, &[])?.0 {
            Reply::Hello { pid, protocol } => {
                if protocol != PROTOCOL {
                    info!(pid, protocol, "fd holder speaks another protocol version");
                }
                pid
            }
            other => return Err(unexpected(path, &other)),
        };
        Ok(Holder {
            path: path.to_path_buf(),
            socket: Mutex::new(socket),
            pid,
        })
    }

    /// Connects to the holder at `path`, starting one with `spawn` if none listens.
    pub fn connect_or_spawn(
        path: &Path,
        spawn: impl FnOnce() -> std::io::Result<()>,
    ) -> Result<Holder> {
        if let Ok(h) = Holder::connect(path) {
            return Ok(h);
        }
        spawn()
            .map_err(|e| Error::io(format!("starting the fd holder for {}", path.display()), e))?;
        let start = Instant::now();
        loop {
            match Holder::connect(path) {
                Ok(h) => {
                    info!(pid = h.pid, socket = %path.display(), "fd holder started");
                    return Ok(h);
                }
                Err(e) if start.elapsed() > SPAWN_WAIT => return Err(e),
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        }
    }

    /// The holder's process id.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Hands the holder a connection to keep.
    pub fn put(&self, record: &Record, conn: &Connection) -> Result<()> {
        let fds = [conn.device.as_raw_fd(), conn.opens.as_raw_fd()];
        let put = Request::Put {
            record: Box::new(record.clone()),
        };
        match self.call(&put, &fds)?.0 {
            Reply::Ok => Ok(()),
            other => Err(unexpected(&self.path, &other)),
        }
    }

    /// Tells the holder to close the connections at `mountpoint` (unmounted).
    pub fn forget(&self, mountpoint: &Path) -> Result<()> {
        self.drop_records(mountpoint, None)
    }

    /// Tells the holder to close this one connection.
    pub fn forget_mount(&self, info: &ConnectionInfo) -> Result<()> {
        self.drop_records(&info.mountpoint, Some(info.mount_id))
    }

    fn drop_records(&self, mountpoint: &Path, mount_id: Option<u64>) -> Result<()> {
        let drop = Request::Drop {
            mountpoint: mountpoint.to_path_buf(),
            mount_id,
        };
        match self.call(&drop, &[])?.0 {
            Reply::Ok => Ok(()),
            other => Err(unexpected(&self.path, &other)),
        }
    }

    /// Every connection the holder keeps (it keeps them too).
    pub fn list(&self) -> Result<Vec<Held>> {
        let socket = self.lock();
        send(&socket, &Request::List, &[]).map_err(|e| self.fail(e))?;
        let mut out = Vec::new();
        loop {
            let (reply, fds) = receive::<Reply>(&socket).map_err(|e| self.fail(e))?;
            match reply {
                Reply::Item { record } => {
                    let mut fds = fds.into_iter();
                    let (Some(device), Some(opens)) = (fds.next(), fds.next()) else {
                        warn!(mountpoint = %record.info.mountpoint.display(), "fd holder sent a record without its descriptors");
                        continue;
                    };
                    let connection = Connection {
                        device,
                        opens,
                        info: record.info.clone(),
                    };
                    out.push(Held {
                        record: *record,
                        connection,
                    });
                }
                Reply::End => return Ok(out),
                other => return Err(unexpected(&self.path, &other)),
            }
        }
    }

    /// Tells the holder to close every connection it keeps (a daemon that will not
    /// take them over): their users then see an error instead of waiting forever.
    pub fn release_all(&self) -> Result<usize> {
        let held = self.list()?;
        for h in &held {
            self.forget_mount(&h.record.info)?;
        }
        Ok(held.len())
    }

    fn call(&self, req: &Request, fds: &[RawFd]) -> Result<(Reply, Vec<OwnedFd>)> {
        let mut socket = self.lock();
        match call(&socket, req, fds) {
            Ok(r) => Ok(r),
            // The holder restarted (or our connection broke): one new try.
            Err(_) => {
                *socket = dial(&self.path)?;
                call(&socket, req, fds)
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, OwnedFd> {
        self.socket.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn fail(&self, e: std::io::Error) -> Error {
        Error::io(format!("fd holder {}", self.path.display()), e)
    }
}

fn unexpected(path: &Path, reply: &Reply) -> Error {
    let what = match reply {
        Reply::Error { message } => message.clone(),
        other => format!("unexpected reply {other:?}"),
    };
    Error::io(
        format!("fd holder {}", path.display()),
        std::io::Error::other(what),
    )
}

fn dial(path: &Path) -> Result<OwnedFd> {
    let fail = |e: nix::Error| {
        Error::io(
            format!("connecting to fd holder {}", path.display()),
            e.into(),
        )
    };
    let s = seqpacket().map_err(fail)?;
    let addr = UnixAddr::new(path).map_err(fail)?;
    connect(s.as_raw_fd(), &addr).map_err(fail)?;
    Ok(s)
}

fn call(socket: &OwnedFd, req: &Request, fds: &[RawFd]) -> Result<(Reply, Vec<OwnedFd>)> {
    let io = |e| Error::io("talking to the fd holder", e);
    send(socket, req, fds).map_err(io)?;
    receive(socket).map_err(io)
}

/// A new `SOCK_SEQPACKET` unix socket.
pub(crate) fn seqpacket() -> nix::Result<OwnedFd> {
    socket(
        AddressFamily::Unix,
        SockType::SeqPacket,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
}

/// Sends one message with `fds` attached.
pub(crate) fn send<T: Serialize>(socket: &OwnedFd, msg: &T, fds: &[RawFd]) -> std::io::Result<()> {
    let bytes = serde_json::to_vec(msg).map_err(std::io::Error::other)?;
    let rights = [ControlMessage::ScmRights(fds)];
    let cmsgs: &[ControlMessage] = if fds.is_empty() { &[] } else { &rights };
    sendmsg::<()>(
        socket.as_raw_fd(),
        &[IoSlice::new(&bytes)],
        cmsgs,
        MsgFlags::MSG_NOSIGNAL,
        None,
    )?;
    Ok(())
}

/// Receives one message and the descriptors attached to it. End of stream is
/// `UnexpectedEof`.
pub(crate) fn receive<T: for<'de> Deserialize<'de>>(
    socket: &OwnedFd,
) -> std::io::Result<(T, Vec<OwnedFd>)> {
    let mut buf = vec![0u8; MAX_MESSAGE];
    let mut space = nix::cmsg_space!([RawFd; 4]);
    let mut iov = [IoSliceMut::new(&mut buf)];
    let msg = recvmsg::<()>(
        socket.as_raw_fd(),
        &mut iov,
        Some(&mut space),
        MsgFlags::MSG_CMSG_CLOEXEC,
    )?;
    let mut fds = Vec::new();
    for c in msg.cmsgs()? {
        if let ControlMessageOwned::ScmRights(r) = c {
            // SAFETY: descriptors received with SCM_RIGHTS are new and ours alone.
            fds.extend(r.into_iter().map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }));
        }
    }
    let (n, truncated) = (msg.bytes, msg.flags.contains(MsgFlags::MSG_TRUNC));
    if n == 0 {
        return Err(std::io::ErrorKind::UnexpectedEof.into());
    }
    if truncated {
        return Err(std::io::Error::other("message larger than 1 MiB"));
    }
    let value = serde_json::from_slice(&buf[..n]).map_err(std::io::Error::other)?;
    Ok((value, fds))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(mp: &str) -> Record {
        Record {
            info: ConnectionInfo {
                mountpoint: PathBuf::from(mp),
                mount_id: 7,
                dev: "0:99".into(),
                init_request: vec![1, 2, 3],
                init_reply: vec![4, 5],
                tree_fingerprint: 0xfeed,
            },
            labels: HashMap::from([("k".to_string(), "v".to_string())]),
        }
    }

    /// A pipe's read end stands in for `/dev/fuse`: it reports POLLHUP once the write
    /// end is closed, as the device reports POLLERR once its connection ended.
    fn connection(mp: &str) -> (Connection, OwnedFd) {
        let (r, w) = nix::unistd::pipe().unwrap();
        let (table, _) = nix::unistd::pipe().unwrap();
        let conn = Connection {
            device: r,
            opens: table,
            info: record(mp).info,
        };
        (conn, w)
    }

    #[test]
    fn holder_keeps_hands_back_forgets_and_reaps_connections() {
        let t = tempfile::tempdir().unwrap();
        let sock = t.path().join("fdstore.sock");
        let path = sock.clone();
        let ms = Duration::from_millis;
        let server = std::thread::spawn(move || server::run_timed(&path, ms(500), ms(200)));
        let h = Holder::connect_or_spawn(&sock, || Ok(())).unwrap();
        assert_eq!(h.pid(), std::process::id());
        // a second holder on the same socket leaves at once
        server::run(&sock).unwrap();

        let (a, a_writer) = connection("/mnt/a");
        let (b, b_writer) = connection("/mnt/b");
        h.put(&record("/mnt/a"), &a).unwrap();
        h.put(&record("/mnt/b"), &b).unwrap();
        drop((a, b)); // the holder's copies keep them open
        let mut held = h.list().unwrap();
        held.sort_by(|x, y| x.record.info.mountpoint.cmp(&y.record.info.mountpoint));
        assert_eq!(held.len(), 2);
        assert_eq!(held[0].record, record("/mnt/a"));
        assert_eq!(held[0].connection.info, record("/mnt/a").info);
        // the descriptor handed back is the same open file
        nix::unistd::write(&a_writer, b"x").unwrap();
        let mut buf = [0u8; 1];
        nix::unistd::read(&held[0].connection.device, &mut buf).unwrap();
        assert_eq!(&buf, b"x");
        drop(held);

        h.forget(Path::new("/mnt/a")).unwrap();
        drop(a_writer);
        let left: Vec<_> = h
            .list()
            .unwrap()
            .into_iter()
            .map(|x| x.record.info.mountpoint)
            .collect();
        assert_eq!(left, [PathBuf::from("/mnt/b")]);

        // an ended connection is dropped by the holder itself
        drop(b_writer);
        let start = Instant::now();
        while !h.list().unwrap().is_empty() {
            assert!(start.elapsed() < Duration::from_secs(20), "never reaped");
            std::thread::sleep(Duration::from_millis(100));
        }

        // nothing held, nobody connected: the holder exits and removes its socket
        drop(h);
        let start = Instant::now();
        while !server.is_finished() {
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "holder never exited"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        server.join().unwrap().unwrap();
        assert!(!sock.exists());
    }
}
