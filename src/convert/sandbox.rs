//! Running a workload inside an image's root filesystem for `--optimize`: new mount,
//! PID, network, IPC and UTS namespaces (so no network, and nothing it starts
//! outlives it), its own `/proc`, `chroot`, and a time limit.

use std::ffi::{CStr, CString};
use std::fmt;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::error::{Error, IoContext, Result};

/// Device nodes a workload expects in `/dev`: name, major, minor.
const DEVICES: [(&str, u32, u32); 6] = [
    ("null", 1, 3),
    ("zero", 1, 5),
    ("full", 1, 7),
    ("random", 1, 8),
    ("urandom", 1, 9),
    ("tty", 5, 0),
];

/// Set by SIGINT or SIGTERM while a workload runs: it is stopped, and the caller
/// unmounts the root filesystem on its way out instead of dying with it mounted.
static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn interrupted(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// SIGINT and SIGTERM handlers for the time a workload runs; the old ones come back
/// on drop.
struct Interruptible {
    old: Vec<(libc::c_int, libc::sigaction)>,
}

impl Interruptible {
    fn install() -> Interruptible {
        INTERRUPTED.store(false, Ordering::SeqCst);
        let mut old = Vec::new();
        for sig in [libc::SIGINT, libc::SIGTERM] {
            // SAFETY: a zeroed sigaction with a handler that only stores an atomic.
            unsafe {
                let mut sa: libc::sigaction = std::mem::zeroed();
                sa.sa_sigaction = interrupted as *const () as libc::sighandler_t;
                libc::sigemptyset(&mut sa.sa_mask);
                let mut prev: libc::sigaction = std::mem::zeroed();
                if libc::sigaction(sig, &sa, &mut prev) == 0 {
                    old.push((sig, prev));
                }
            }
        }
        Interruptible { old }
    }
}

impl Drop for Interruptible {
    fn drop(&mut self) {
        for (sig, prev) in &self.old {
            // SAFETY: restores what sigaction returned.
            unsafe {
                libc::sigaction(*sig, prev, std::ptr::null_mut());
            }
        }
    }
}

/// How a workload ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Outcome {
    Exited(i32),
    Signaled(i32),
    TimedOut(Duration),
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Outcome::Exited(c) => write!(f, "exit {c}"),
            Outcome::Signaled(s) => write!(f, "signal {s}"),
            Outcome::TimedOut(d) => write!(f, "timed out after {} s, stopped", d.as_secs()),
        }
    }
}

/// Gives a writable root filesystem the basic device nodes and a `/tmp`.
pub(crate) fn prepare(root: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let dev = root.join("dev");
    std::fs::create_dir_all(&dev).ctx(|| format!("{}: create", dev.display()))?;
    for (name, major, minor) in DEVICES {
        let p = dev.join(name);
        if p.symlink_metadata().is_ok() {
            continue;
        }
        nix::sys::stat::mknod(
            &p,
            nix::sys::stat::SFlag::S_IFCHR,
            nix::sys::stat::Mode::from_bits_truncate(0o666),
            nix::sys::stat::makedev(major.into(), minor.into()),
        )
        .map_err(|e| Error::io(format!("{}: mknod", p.display()), e.into()))?;
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o666))
            .ctx(|| format!("{}: chmod", p.display()))?;
    }
    let tmp = root.join("tmp");
    if tmp.symlink_metadata().is_err() {
        std::fs::create_dir(&tmp).ctx(|| format!("{}: create", tmp.display()))?;
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o1777))
            .ctx(|| format!("{}: chmod", tmp.display()))?;
    }
    Ok(())
}

fn cstring(what: &str, bytes: &[u8]) -> Result<CString> {
    CString::new(bytes).map_err(|_| Error::InvalidArgument(format!("{what} contains a NUL byte")))
}

/// Runs `argv` (looked up in the image's `PATH`) in `root` with exactly `env`, from
/// `cwd`; kills it after `timeout`. Output goes to `output`, else to our stderr.
pub(crate) fn run(
    root: &Path,
    argv: &[String],
    env: &[String],
    cwd: &str,
    timeout: Duration,
    output: Option<&Path>,
) -> Result<Outcome> {
    let Some((program, args)) = argv.split_first() else {
        return Err(Error::InvalidArgument("empty command".into()));
    };
    let root_c = cstring("root directory", root.as_os_str().as_bytes())?;
    let proc_dir = root.join("proc");
    let proc_c = match proc_dir.is_dir() {
        true => Some(cstring("root directory", proc_dir.as_os_str().as_bytes())?),
        false => None,
    };
    let cwd_c = cstring("working directory", cwd.as_bytes())?;
    let mut cmd = Command::new(program);
    cmd.args(args).env_clear().stdin(Stdio::null());
    for kv in env {
        if let Some((k, v)) = kv.split_once('=') {
            cmd.env(k, v);
        }
    }
    match output {
        Some(p) => {
            let f = std::fs::File::create(p).ctx(|| format!("{}: create", p.display()))?;
            let f2 = f.try_clone().ctx(|| format!("{}: dup", p.display()))?;
            cmd.stdout(f).stderr(f2);
        }
        None => {
            cmd.stdout(io::stderr()).stderr(Stdio::inherit());
        }
    }
    // SAFETY: `enter` makes only async-signal-safe system calls and allocates nothing;
    // the strings it uses were made before the fork.
    unsafe {
        cmd.pre_exec(move || enter(&root_c, proc_c.as_deref(), &cwd_c));
    }
    let signals = Interruptible::install();
    let mut child = cmd
        .spawn()
        .map_err(|e| Error::io(format!("running {program} in the image"), e))?;
    let start = Instant::now();
    loop {
        if INTERRUPTED.load(Ordering::SeqCst) {
            let _ = child.kill();
            let _ = child.wait();
            drop(signals);
            return Err(Error::io(
                format!("running {program} in the image"),
                io::Error::new(io::ErrorKind::Interrupted, "interrupted by a signal"),
            ));
        }
        if let Some(st) = child.try_wait().ctx(|| format!("waiting for {program}"))? {
            // the waiting process leaves with the command's code, 128+N for signal N
            return Ok(match (st.code(), st.signal()) {
                (Some(c), _) if c > 128 => Outcome::Signaled(c - 128),
                (Some(c), _) => Outcome::Exited(c),
                (None, Some(s)) => Outcome::Signaled(s),
                (None, None) => Outcome::Exited(-1),
            });
        }
        if start.elapsed() >= timeout {
            // the command dies with its waiting parent (PR_SET_PDEATHSIG), and the
            // rest of its PID namespace with it
            let _ = child.kill();
            let _ = child.wait();
            return Ok(Outcome::TimedOut(timeout));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// In the forked child, before exec. The command becomes the init of a new PID
/// namespace: this process forks it, closes every descriptor beyond stdio (so the
/// parent learns of the exec from its pipe), waits, and exits with its status.
fn enter(root: &CStr, proc_dir: Option<&CStr>, cwd: &CStr) -> io::Result<()> {
    // SAFETY: plain system calls on valid C strings.
    unsafe {
        let flags = libc::CLONE_NEWNS
            | libc::CLONE_NEWPID
            | libc::CLONE_NEWNET
            | libc::CLONE_NEWIPC
            | libc::CLONE_NEWUTS;
        if libc::unshare(flags) != 0 {
            return Err(io::Error::last_os_error());
        }
        // our mounts (its /proc) must not reach the parent's namespace
        if libc::mount(
            c"none".as_ptr(),
            c"/".as_ptr(),
            std::ptr::null(),
            libc::MS_REC | libc::MS_PRIVATE,
            std::ptr::null(),
        ) != 0
        {
            return Err(io::Error::last_os_error());
        }
        let pid = libc::fork();
        if pid < 0 {
            return Err(io::Error::last_os_error());
        }
        if pid > 0 {
            libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32);
            let mut status = 0;
            loop {
                let r = libc::waitpid(pid, &mut status, 0);
                if r == pid {
                    break;
                }
                if r < 0 && io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
                    libc::_exit(127);
                }
            }
            if libc::WIFEXITED(status) {
                libc::_exit(libc::WEXITSTATUS(status));
            }
            libc::_exit(128 + libc::WTERMSIG(status));
        }
        libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong);
        if let Some(p) = proc_dir {
            // best effort: a workload without /proc mostly still runs
            libc::mount(
                c"proc".as_ptr(),
                p.as_ptr(),
                c"proc".as_ptr(),
                libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
                std::ptr::null(),
            );
        }
        if libc::chroot(root.as_ptr()) != 0 {
            return Err(io::Error::last_os_error());
        }
        if libc::chdir(cwd.as_ptr()) != 0 && libc::chdir(c"/".as_ptr()) != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}
