//! The holder process's loop: one thread, `poll` over the listening socket and the
//! daemons connected; every few seconds a non-blocking look at the held connections,
//! which report an error once the kernel ended them. (Waiting on them would wake the
//! holder at every FUSE request.) It exits when it holds nothing and nobody is
//! connected.

use std::collections::HashMap;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::socket::{Backlog, UnixAddr, accept4, bind, listen};
use tracing::{debug, info, warn};

use super::{PROTOCOL, Record, Reply, Request, receive, send, seqpacket};
use crate::error::{Error, IoContext, Result};

/// How long the holder stays with nothing to hold and nobody connected (a daemon that
/// just started it connects within this time).
const IDLE_EXIT: Duration = Duration::from_secs(5);
/// How often ended connections are looked for.
const REAP_EVERY: Duration = Duration::from_secs(5);

/// Records are kept per mount: a layer detached while in use and a newer mount at the
/// same mountpoint are two connections.
type Key = (PathBuf, u64);

struct Kept {
    record: Record,
    device: OwnedFd,
    opens: OwnedFd,
}

/// Runs the holder on `socket` until it is idle. Returns at once if another holder
/// already answers there.
pub fn run(socket: &Path) -> Result<()> {
    run_timed(socket, IDLE_EXIT, REAP_EVERY)
}

/// [`run`] with its idle time and reaping period (tests shorten them).
pub(crate) fn run_timed(socket: &Path, idle_exit: Duration, reap_every: Duration) -> Result<()> {
    if super::Holder::connect(socket).is_ok() {
        info!(socket = %socket.display(), "another fd holder is running");
        return Ok(());
    }
    let listener = bind_socket(socket)?;
    let pid_file = pid_file(socket);
    std::fs::write(&pid_file, format!("{}\n", std::process::id()))
        .ctx(|| format!("writing {}", pid_file.display()))?;
    info!(socket = %socket.display(), pid = std::process::id(), "fd holder listening");
    let mut clients: Vec<OwnedFd> = Vec::new();
    let mut kept: HashMap<Key, Kept> = HashMap::new();
    let mut idle_since = Instant::now();
    let mut reaped = Instant::now();
    loop {
        let (accepted, readable) = wait(&listener, &clients)?;
        if accepted {
            match accept4(
                listener.as_raw_fd(),
                nix::sys::socket::SockFlag::SOCK_CLOEXEC,
            ) {
                // SAFETY: accept4 returned a new descriptor nothing else owns.
                Ok(fd) => clients.push(unsafe { OwnedFd::from_raw_fd(fd) }),
                Err(e) => warn!("accept: {e}"),
            }
        }
        // Highest index first, so removals keep the others' indexes.
        for i in readable.into_iter().rev() {
            if !serve_one(&clients[i], &mut kept) {
                clients.swap_remove(i);
            }
        }
        if reaped.elapsed() >= reap_every {
            reaped = Instant::now();
            for key in ended(&kept) {
                info!(mountpoint = %key.0.display(), "connection ended; record dropped");
                kept.remove(&key);
            }
        }
        if !clients.is_empty() || !kept.is_empty() {
            idle_since = Instant::now();
        } else if idle_since.elapsed() >= idle_exit {
            info!("nothing held and nobody connected; fd holder exits");
            let _ = std::fs::remove_file(socket);
            let _ = std::fs::remove_file(&pid_file);
            return Ok(());
        }
    }
}

/// Where the holder writes its process id: next to its socket.
pub fn pid_file(socket: &Path) -> PathBuf {
    socket.with_extension("pid")
}

fn bind_socket(path: &Path) -> Result<OwnedFd> {
    let fail = |e: nix::Error| Error::io(format!("binding {}", path.display()), e.into());
    if std::fs::symlink_metadata(path).is_ok() {
        std::fs::remove_file(path).ctx(|| format!("removing stale {}", path.display()))?;
    }
    let s = seqpacket().map_err(fail)?;
    bind(s.as_raw_fd(), &UnixAddr::new(path).map_err(fail)?).map_err(fail)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .ctx(|| format!("chmod {}", path.display()))?;
    listen(&s, Backlog::new(16).map_err(fail)?).map_err(fail)?;
    Ok(s)
}

/// Waits up to 200 ms; returns whether a daemon is connecting and which clients
/// have a message (or hung up).
fn wait(listener: &OwnedFd, clients: &[OwnedFd]) -> Result<(bool, Vec<usize>)> {
    let mut fds: Vec<PollFd<'_>> = Vec::with_capacity(1 + clients.len());
    fds.push(PollFd::new(listener.as_fd(), PollFlags::POLLIN));
    fds.extend(
        clients
            .iter()
            .map(|c| PollFd::new(c.as_fd(), PollFlags::POLLIN)),
    );
    match poll(&mut fds, PollTimeout::from(200u16)) {
        Ok(_) | Err(nix::errno::Errno::EINTR) => {}
        Err(e) => return Err(Error::io("fd holder poll", e.into())),
    }
    let ready = |f: &PollFd<'_>| f.revents().is_some_and(|r| !r.is_empty());
    let accepted = ready(&fds[0]);
    let readable = (0..clients.len()).filter(|i| ready(&fds[1 + i])).collect();
    Ok((accepted, readable))
}

/// The held connections the kernel has ended (a FUSE device reports POLLERR then).
fn ended(kept: &HashMap<Key, Kept>) -> Vec<Key> {
    let held: Vec<(&Key, &Kept)> = kept.iter().collect();
    let mut fds: Vec<PollFd<'_>> = held
        .iter()
        .map(|(_, k)| PollFd::new(k.device.as_fd(), PollFlags::empty()))
        .collect();
    if let Err(e) = poll(&mut fds, PollTimeout::ZERO) {
        warn!("fd holder poll: {e}");
        return Vec::new();
    }
    held.iter()
        .zip(&fds)
        .filter(|(_, f)| f.revents().is_some_and(|r| !r.is_empty()))
        .map(|((mp, _), _)| (*mp).clone())
        .collect()
}

/// Answers one message; false when the client is gone.
fn serve_one(client: &OwnedFd, kept: &mut HashMap<Key, Kept>) -> bool {
    let (req, fds) = match receive::<Request>(client) {
        Ok(r) => r,
        Err(e) => {
            if e.kind() != std::io::ErrorKind::UnexpectedEof {
                debug!("client dropped: {e}");
            }
            return false;
        }
    };
    let reply = match req {
        Request::Hello => Reply::Hello {
            pid: std::process::id(),
            protocol: PROTOCOL,
        },
        Request::Put { record } => {
            let mut fds = fds.into_iter();
            match (fds.next(), fds.next()) {
                (Some(device), Some(opens)) => {
                    info!(mountpoint = %record.info.mountpoint.display(), "holding connection");
                    kept.insert(
                        (record.info.mountpoint.clone(), record.info.mount_id),
                        Kept {
                            record: *record,
                            device,
                            opens,
                        },
                    );
                    Reply::Ok
                }
                _ => Reply::Error {
                    message: format!(
                        "{}: a put needs two descriptors",
                        record.info.mountpoint.display()
                    ),
                },
            }
        }
        Request::Drop {
            mountpoint,
            mount_id,
        } => {
            let before = kept.len();
            kept.retain(|(mp, id), _| *mp != mountpoint || mount_id.is_some_and(|m| m != *id));
            if kept.len() < before {
                info!(mountpoint = %mountpoint.display(), "connection released");
            }
            Reply::Ok
        }
        Request::List => {
            for k in kept.values() {
                let item = Reply::Item {
                    record: Box::new(k.record.clone()),
                };
                let fds = [k.device.as_raw_fd(), k.opens.as_raw_fd()];
                if let Err(e) = send(client, &item, &fds) {
                    debug!("client dropped during list: {e}");
                    return false;
                }
            }
            Reply::End
        }
    };
    send(client, &reply, &[]).is_ok()
}
