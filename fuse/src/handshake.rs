//! Starting a fuser session on a `/dev/fuse` connection, fresh or taken over.
//!
//! The kernel sends FUSE_INIT once per connection, and fuser's `Session::from_fd` will
//! not serve before it has seen one. So fuser always does its handshake on one end of
//! a socket pair: for a fresh mount we pass it the kernel's INIT and forward its reply
//! to the kernel (keeping both, which is what a successor needs); for a connection
//! another process served before, we replay the recorded INIT, narrowed to what was
//! negotiated, and drop the reply. Then the session's descriptor is switched to the
//! real connection (`dup3` over it), before any thread reads from it, so that backing
//! files (passthrough) and every read and reply use `/dev/fuse` directly.

use std::{
    io,
    os::fd::{AsFd, AsRawFd, OwnedFd},
};

use fuser::{BackgroundSession, Config, Filesystem, Session, SessionACL};
use nix::sys::socket::{AddressFamily, SockFlag, SockType, socketpair};
use tracing::{info, warn};

/// `FUSE_INIT` opcode.
const FUSE_INIT: u32 = 26;
/// `FUSE_NOTIFY_RESEND` (kernel 6.9, protocol 7.40): the kernel puts every request a
/// server read but never answered back on the pending queue.
const FUSE_NOTIFY_RESEND: i32 = 7;
/// `FUSE_INIT_EXT`: `flags2` carries the high 32 capability bits.
const FUSE_INIT_EXT: u32 = 1 << 30;
/// `fuse_in_header` and `fuse_out_header` sizes.
const IN_HEADER: usize = 40;
const OUT_HEADER: usize = 16;
/// Offsets in the INIT request (`fuse_init_in` after the header) and reply
/// (`fuse_init_out` after the header).
const IN_MAX_READAHEAD: usize = IN_HEADER + 8;
const IN_FLAGS: usize = IN_HEADER + 12;
const IN_FLAGS2: usize = IN_HEADER + 16;
const OUT_MAJOR: usize = OUT_HEADER;
const OUT_MAX_READAHEAD: usize = OUT_HEADER + 8;
const OUT_FLAGS: usize = OUT_HEADER + 12;
const OUT_FLAGS2: usize = OUT_HEADER + 32;
/// Large enough for any request the kernel may queue (fuser reads with the same size).
const READ_BUFFER: usize = 16 * 1024 * 1024 + 4096;

/// The INIT exchange of a connection: what the kernel asked and what was answered.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct InitExchange {
    pub(crate) request: Vec<u8>,
    pub(crate) reply: Vec<u8>,
}

/// Where the INIT comes from.
pub(crate) enum Handshake<'a> {
    /// A fresh mount: the kernel's INIT is waiting on the connection.
    Kernel,
    /// A connection served before: replay this exchange.
    Replay(&'a InitExchange),
}

/// Starts serving `device` with `fs`. Returns the running session and the INIT
/// exchange (the kernel's, or the replayed one).
pub(crate) fn start<FS: Filesystem>(
    fs: FS,
    device: &OwnedFd,
    acl: SessionACL,
    config: Config,
    handshake: Handshake<'_>,
) -> io::Result<(BackgroundSession, InitExchange)> {
    let (ours, theirs) = socketpair(
        AddressFamily::Unix,
        SockType::SeqPacket,
        None,
        SockFlag::SOCK_CLOEXEC,
    )?;
    let request = match handshake {
        Handshake::Kernel => read_init(device)?,
        Handshake::Replay(exchange) => replay_request(exchange)?,
    };
    nix::unistd::write(&ours, &request)?;
    let session = Session::from_fd(fs, theirs, acl, config)?;
    let mut reply = vec![0u8; 4096];
    let n = nix::unistd::read(&ours, &mut reply)?;
    reply.truncate(n);
    check_reply(&request, &reply)?;
    let exchange = match handshake {
        Handshake::Kernel => {
            nix::unistd::write(device, &reply)?;
            InitExchange { request, reply }
        }
        Handshake::Replay(exchange) => exchange.clone(),
    };
    adopt(&session, device)?;
    if matches!(handshake, Handshake::Replay(_)) {
        resend(device);
    }
    Ok((session.spawn()?, exchange))
}

/// Switches the session's descriptor (still the socket end) to the connection. No
/// thread reads it yet: the session runs only after `spawn`.
fn adopt<FS: Filesystem>(session: &Session<FS>, device: &OwnedFd) -> io::Result<()> {
    let target = session.as_fd().as_raw_fd();
    // SAFETY: `target` is a descriptor the session owns and keeps open; dup3 replaces
    // the open file behind that number in one step, so it stays a valid descriptor
    // owned by the session, now naming the FUSE connection. `device` is open.
    let rc = unsafe { libc::dup3(device.as_raw_fd(), target, libc::O_CLOEXEC) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Asks the kernel to queue again what a previous server read but never answered.
/// Before Linux 6.9 the kernel refuses; those requests then wait forever.
fn resend(device: &OwnedFd) {
    let mut msg = [0u8; OUT_HEADER];
    msg[0..4].copy_from_slice(&(OUT_HEADER as u32).to_ne_bytes());
    msg[4..8].copy_from_slice(&FUSE_NOTIFY_RESEND.to_ne_bytes());
    match nix::unistd::write(device, &msg) {
        Ok(_) => info!("asked the kernel to resend unanswered requests"),
        Err(e) => warn!(
            "kernel refused FUSE_NOTIFY_RESEND ({e}); requests the previous server read \
             but never answered stay unanswered"
        ),
    }
}

/// Reads the kernel's INIT request from a fresh connection.
fn read_init(device: &OwnedFd) -> io::Result<Vec<u8>> {
    let mut buf = vec![0u8; READ_BUFFER];
    let n = loop {
        match nix::unistd::read(device, &mut buf) {
            Ok(n) => break n,
            Err(nix::errno::Errno::EINTR | nix::errno::Errno::ENOENT) => continue,
            Err(e) => return Err(e.into()),
        }
    };
    buf.truncate(n);
    buf.shrink_to_fit();
    let opcode = u32_at(&buf, 4).unwrap_or(0);
    let major = u32_at(&buf, IN_HEADER).unwrap_or(0);
    if opcode != FUSE_INIT || u32_at(&buf, IN_FLAGS).is_none() {
        return Err(invalid(format!(
            "the kernel's first request is opcode {opcode}, {n} bytes, not FUSE_INIT"
        )));
    }
    if major != 7 {
        return Err(invalid(format!("unsupported FUSE protocol {major}")));
    }
    Ok(buf)
}

/// The INIT to replay: the recorded one, offering only the capabilities that were
/// negotiated, so that the new filesystem sees the connection as it is.
fn replay_request(exchange: &InitExchange) -> io::Result<Vec<u8>> {
    let (req, rep) = (&exchange.request, &exchange.reply);
    let bad = || invalid("recorded FUSE INIT exchange is truncated".into());
    let mut out = req.clone();
    let flags = u32_at(req, IN_FLAGS).ok_or_else(bad)?;
    let agreed = u32_at(rep, OUT_FLAGS).ok_or_else(bad)?;
    put_u32(&mut out, IN_FLAGS, flags & agreed);
    let readahead = u32_at(rep, OUT_MAX_READAHEAD).ok_or_else(bad)?;
    put_u32(&mut out, IN_MAX_READAHEAD, readahead);
    if flags & agreed & FUSE_INIT_EXT != 0 {
        let flags2 = u32_at(req, IN_FLAGS2).ok_or_else(bad)?;
        let agreed2 = u32_at(rep, OUT_FLAGS2).ok_or_else(bad)?;
        put_u32(&mut out, IN_FLAGS2, flags2 & agreed2);
    }
    Ok(out)
}

/// The reply must answer this request, without error, with protocol 7.
fn check_reply(request: &[u8], reply: &[u8]) -> io::Result<()> {
    let unique_in = request.get(8..16);
    let unique_out = reply.get(8..16);
    let error = u32_at(reply, 4).unwrap_or(u32::MAX);
    if unique_in != unique_out || error != 0 || u32_at(reply, OUT_MAJOR) != Some(7) {
        return Err(invalid(format!(
            "unexpected FUSE INIT reply ({} bytes, error {})",
            reply.len(),
            error as i32
        )));
    }
    Ok(())
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    let bytes: [u8; 4] = b.get(at..at + 4)?.try_into().ok()?;
    Some(u32::from_ne_bytes(bytes))
}

fn put_u32(b: &mut [u8], at: usize, v: u32) {
    if let Some(dst) = b.get_mut(at..at + 4) {
        dst.copy_from_slice(&v.to_ne_bytes());
    }
}

fn invalid(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exchange(flags: u32, flags2: u32, agreed: u32, agreed2: u32) -> InitExchange {
        let mut request = vec![0u8; IN_HEADER + 64];
        put_u32(&mut request, 4, FUSE_INIT);
        put_u32(&mut request, IN_HEADER, 7);
        put_u32(&mut request, IN_HEADER + 4, 41);
        put_u32(&mut request, IN_MAX_READAHEAD, 131072);
        put_u32(&mut request, IN_FLAGS, flags);
        put_u32(&mut request, IN_FLAGS2, flags2);
        let mut reply = vec![0u8; OUT_HEADER + 64];
        put_u32(&mut reply, OUT_MAJOR, 7);
        put_u32(&mut reply, OUT_MAX_READAHEAD, 65536);
        put_u32(&mut reply, OUT_FLAGS, agreed);
        put_u32(&mut reply, OUT_FLAGS2, agreed2);
        InitExchange { request, reply }
    }

    #[test]
    fn replay_offers_only_what_was_negotiated() {
        let ex = exchange(
            0b1111 | FUSE_INIT_EXT,
            0b1010_0000,
            0b0101 | FUSE_INIT_EXT,
            0b0010_0001,
        );
        let out = replay_request(&ex).unwrap();
        assert_eq!(u32_at(&out, IN_FLAGS), Some(0b0101 | FUSE_INIT_EXT));
        assert_eq!(u32_at(&out, IN_FLAGS2), Some(0b0010_0000));
        assert_eq!(u32_at(&out, IN_MAX_READAHEAD), Some(65536));
        assert_eq!(
            u32_at(&out, IN_HEADER + 4),
            Some(41),
            "the protocol minor is kept"
        );
        // without FUSE_INIT_EXT agreed, flags2 is left as the kernel sent it (unused)
        let ex = exchange(0b11, 0xff, 0b01, 0);
        assert_eq!(u32_at(&replay_request(&ex).unwrap(), IN_FLAGS2), Some(0xff));
    }

    #[test]
    fn truncated_records_and_foreign_replies_are_refused() {
        let mut ex = exchange(1, 0, 1, 0);
        ex.reply.truncate(20);
        assert!(replay_request(&ex).is_err());
        let ex = exchange(1, 0, 1, 0);
        assert!(check_reply(&ex.request, &ex.reply).is_ok());
        let mut other = ex.reply.clone();
        other[8] = 9; // another request's unique
        assert!(check_reply(&ex.request, &other).is_err());
        let mut failed = ex.reply.clone();
        put_u32(&mut failed, 4, (-libc::EIO) as u32);
        assert!(check_reply(&ex.request, &failed).is_err());
    }
}
