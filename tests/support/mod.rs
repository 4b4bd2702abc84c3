//! Process guards for end-to-end tests: a `lazysnap serve` daemon, a private
//! containerd (with lazysnap as a proxy snapshotter), and a docker-registry, each in
//! its own temporary directory, each killed (and its mounts detached) on drop.
//!
//! Use from a test crate with `mod support;`.
#![allow(dead_code)]

pub mod fake_remote;
pub mod fault_proxy;
pub mod image;
pub mod readers;
pub mod snapshots;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// Whether all tools exist; under `CI=true` a missing tool fails the test, otherwise
/// the test prints a skip line and should return.
pub fn require(tools: &[&str], test: &str) -> bool {
    for tool in tools {
        if !Path::new(tool).exists() {
            if std::env::var("CI").as_deref() == Ok("true") {
                panic!("{test}: {tool} is missing and CI=true");
            }
            eprintln!("skipped: {test}: {tool} missing");
            return false;
        }
    }
    if !nix::unistd::Uid::effective().is_root() {
        if std::env::var("CI").as_deref() == Ok("true") {
            panic!("{test}: needs root and CI=true");
        }
        eprintln!("skipped: {test}: needs root");
        return false;
    }
    true
}

/// A small seeded generator (xorshift64*), so that schedules and reads reproduce.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform in `0..n` (`n` > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }

    /// True with probability `p`.
    pub fn chance(&mut self, p: f64) -> bool {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64 <= p
    }
}

/// The seed of a randomized test: `LAZYSNAP_SEED` if set, else `default`; printed so
/// that a failure can be replayed.
pub fn seed(test: &str, default: u64) -> u64 {
    let s = std::env::var("LAZYSNAP_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default);
    eprintln!("{test}: seed {s} (set LAZYSNAP_SEED to replay another)");
    s
}

/// A `/proc/<pid>/status` field in kB (`VmRSS`, `VmHWM`).
pub fn proc_kb(pid: u32, field: &str) -> Option<u64> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()
}

/// Polls `f` until it returns true or `limit` passes.
pub fn wait_until(limit: Duration, mut f: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    while start.elapsed() < limit {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

/// Detaches every mount under `dir`, deepest first (best effort).
pub fn detach_mounts_under(dir: &Path) {
    let Ok(text) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return;
    };
    let mut mps: Vec<PathBuf> = text
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(PathBuf::from)
        .filter(|p| p.starts_with(dir))
        .collect();
    mps.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    for mp in mps {
        let _ = nix::mount::umount2(&mp, nix::mount::MntFlags::MNT_DETACH);
    }
}

fn kill_and_wait(child: &mut Child, grace: Duration) {
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
    if !wait_until(grace, || matches!(child.try_wait(), Ok(Some(_)))) {
        let _ = child.kill();
    }
    let _ = child.wait();
}

/// Kills processes whose command line contains `needle` (shims of our containerd).
fn kill_matching(needle: &str) {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return;
    };
    for e in dir.flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        if let Ok(cmd) = std::fs::read(e.path().join("cmdline"))
            && String::from_utf8_lossy(&cmd).contains(needle)
            && pid != std::process::id() as i32
        {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

/// A `lazysnap serve` child process.
pub struct Daemon {
    child: Option<Child>,
    pub dir: PathBuf,
    pub socket: PathBuf,
    pub root: PathBuf,
    pub config: PathBuf,
    rust_log: String,
}

impl Daemon {
    /// Writes a config under `dir` and starts the daemon (with lazysnap's debug
    /// logs); waits until it accepts.
    pub fn start(dir: &Path, extra_config: &str) -> Daemon {
        Self::start_logging(dir, extra_config, "lazysnap=debug")
    }

    /// As [`Daemon::start`], with `RUST_LOG=rust_log`.
    pub fn start_logging(dir: &Path, extra_config: &str, rust_log: &str) -> Daemon {
        std::fs::create_dir_all(dir).expect("daemon dir");
        let socket = dir.join("lazysnap.sock");
        let root = dir.join("root");
        let config = dir.join("lazysnap.toml");
        std::fs::write(
            &config,
            format!(
                "socket = \"{}\"\nroot = \"{}\"\n{extra_config}",
                socket.display(),
                root.display()
            ),
        )
        .expect("config");
        let mut d = Daemon {
            child: None,
            dir: dir.to_path_buf(),
            socket,
            root,
            config,
            rust_log: rust_log.to_string(),
        };
        d.spawn();
        d
    }

    fn spawn(&mut self) {
        self.child = Some(self.launch(&[]));
        self.wait_socket();
    }

    /// Starts `lazysnap serve EXTRA`, logging to the daemon's log.
    fn launch(&self, extra: &[&str]) -> Child {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("lazysnap.log"))
            .expect("log");
        Command::new(env!("CARGO_BIN_EXE_lazysnap"))
            .args(["serve", "--config"])
            .arg(&self.config)
            .args(extra)
            .env("RUST_LOG", &self.rust_log)
            .stdout(Stdio::from(log.try_clone().expect("log")))
            .stderr(Stdio::from(log))
            .spawn()
            .expect("spawn lazysnap serve")
    }

    fn wait_socket(&self) {
        let sock = self.socket.clone();
        let up = wait_until(Duration::from_secs(30), || {
            std::os::unix::net::UnixStream::connect(&sock).is_ok()
        });
        assert!(up, "lazysnap serve did not start:\n{}", self.log());
    }

    /// The daemon's process id while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Whether the daemon process is still running (it has not crashed).
    pub fn alive(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// `lazysnap status --json` of this daemon.
    pub fn status(&self) -> serde_json::Value {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_lazysnap"));
        cmd.args(["status", "--json", "--config"]).arg(&self.config);
        let out = run_bounded(cmd, Duration::from_secs(30));
        assert!(
            out.status.success(),
            "lazysnap status: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).expect("status JSON")
    }

    /// The remote layers the daemon has mounted: (layer digest, mount point).
    pub fn remote_mounts(&self) -> Vec<(String, PathBuf)> {
        self.status()["layers"]
            .as_array()
            .map(|ls| {
                ls.iter()
                    .filter_map(|l| {
                        Some((
                            l["digest"].as_str()?.to_string(),
                            PathBuf::from(l["mountpoint"].as_str()?),
                        ))
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The daemon's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("lazysnap.log")).unwrap_or_default()
    }

    /// SIGKILL, as a crash.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM and wait; returns the exit status.
    pub fn stop(&mut self) -> Option<std::process::ExitStatus> {
        let mut c = self.child.take()?;
        kill_and_wait(&mut c, Duration::from_secs(20));
        c.wait().ok()
    }

    /// Starts the daemon again with the same config.
    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
    }

    /// Starts again after a crash (the child is already gone).
    pub fn start_again(&mut self) {
        assert!(self.child.is_none());
        self.spawn();
    }

    /// Starts a successor with `serve --takeover`; returns once the old daemon has
    /// exited and the new one accepts.
    pub fn takeover(&mut self) {
        let mut old = self.child.take().expect("a running daemon");
        self.child = Some(self.launch(&["--takeover"]));
        let exited = wait_until(Duration::from_secs(60), || {
            matches!(old.try_wait(), Ok(Some(_)))
        });
        assert!(exited, "the old daemon did not hand over:\n{}", self.log());
        self.wait_socket();
    }

    /// The fd holder's process id, if one runs for this root.
    pub fn holder_pid(&self) -> Option<i32> {
        let pid = std::fs::read_to_string(self.root.join("fdstore.pid")).ok()?;
        let pid: i32 = pid.trim().parse().ok()?;
        Path::new(&format!("/proc/{pid}")).exists().then_some(pid)
    }

    /// Kills the fd holder: with the daemon gone too, every FUSE connection ends.
    pub fn kill_holder(&self) {
        if let Some(pid) = self.holder_pid() {
            let pid = nix::unistd::Pid::from_raw(pid);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
            wait_until(Duration::from_secs(10), || {
                nix::sys::signal::kill(pid, None).is_err()
            });
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            kill_and_wait(&mut c, Duration::from_secs(10));
        }
        detach_mounts_under(&self.root);
        self.kill_holder();
    }
}

/// A private containerd with lazysnap as `[proxy_plugins.lazysnap]`; CRI disabled
/// unless started with [`Containerd::start_with_cri`].
pub struct Containerd {
    child: Option<Child>,
    pub dir: PathBuf,
    pub address: PathBuf,
    pub root: PathBuf,
}

impl Containerd {
    /// Starts containerd in `dir`, with the proxy plugin pointing at `snapshotter_socket`.
    pub fn start(dir: &Path, snapshotter_socket: &Path) -> Containerd {
        Self::start_config(dir, "lazysnap", snapshotter_socket, false)
    }

    /// Like [`Containerd::start`], with the proxy snapshotter named `plugin` (another
    /// snapshotter, such as stargz-snapshotter, listening on `snapshotter_socket`).
    pub fn start_with_plugin(dir: &Path, plugin: &str, snapshotter_socket: &Path) -> Containerd {
        Self::start_config(dir, plugin, snapshotter_socket, false)
    }

    /// Like [`Containerd::start`], with the CRI plugin enabled: `lazysnap` is CRI's
    /// snapshotter, `disable_snapshot_annotations = false` (Prepare gets the
    /// `containerd.io/snapshot/cri.*` labels), `restrict_oom_score_adj = true` (root
    /// here lacks CAP_SYS_RESOURCE), CNI directories and registry hosts
    /// (`config_path`, see [`Containerd::plain_http`]) under `dir`, the streaming
    /// server on 127.0.0.1. No CNI config: run no pods with networking. Waits until
    /// the CRI plugin is loaded.
    pub fn start_with_cri(dir: &Path, snapshotter_socket: &Path) -> Containerd {
        Self::start_config(dir, "lazysnap", snapshotter_socket, true)
    }

    fn start_config(dir: &Path, plugin: &str, snapshotter_socket: &Path, cri: bool) -> Containerd {
        std::fs::create_dir_all(dir).expect("containerd dir");
        let address = dir.join("c.sock");
        let root = dir.join("root");
        let plugins = if cri {
            format!(
                r#"
[plugins."io.containerd.grpc.v1.cri"]
  restrict_oom_score_adj = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "lazysnap"
    disable_snapshot_annotations = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{cni}/bin"
    conf_dir = "{cni}/net.d"
  [plugins."io.containerd.grpc.v1.cri".registry]
    config_path = "{certs}"
"#,
                cni = dir.join("cni").display(),
                certs = dir.join("certs.d").display(),
            )
        } else {
            "disabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n".to_string()
        };
        let cfg = format!(
            r#"version = 2
root = "{root}"
state = "{state}"
{disabled}
[grpc]
  address = "{addr}"

[ttrpc]
  address = "{addr}.ttrpc"

[proxy_plugins.{plugin}]
  type = "snapshot"
  address = "{snap}"
{cri_plugin}"#,
            root = root.display(),
            state = dir.join("state").display(),
            addr = address.display(),
            snap = snapshotter_socket.display(),
            disabled = if cri { "" } else { plugins.as_str() },
            cri_plugin = if cri { plugins.as_str() } else { "" },
        );
        let cfg_path = dir.join("config.toml");
        std::fs::write(&cfg_path, cfg).expect("containerd config");
        let log = std::fs::File::create(dir.join("containerd.log")).expect("log");
        let child = Command::new("/usr/bin/containerd")
            .arg("--config")
            .arg(&cfg_path)
            .stdout(Stdio::from(log.try_clone().expect("log")))
            .stderr(Stdio::from(log))
            .spawn()
            .expect("spawn containerd");
        let c = Containerd {
            child: Some(child),
            dir: dir.to_path_buf(),
            address,
            root,
        };
        let up = wait_until(Duration::from_secs(30), || {
            c.ctr(&["version"]).status.success()
        });
        assert!(up, "containerd did not start:\n{}", c.log());
        if cri {
            let loaded = wait_until(Duration::from_secs(30), || {
                let o = c.ctr(&["plugins", "ls", "id==cri"]);
                String::from_utf8_lossy(&o.stdout)
                    .lines()
                    .any(|l| l.contains("io.containerd.grpc.v1") && l.trim_end().ends_with("ok"))
            });
            assert!(loaded, "the CRI plugin did not load:\n{}", c.log());
        }
        c
    }

    /// Lets CRI pull from `host` (`127.0.0.1:PORT`) over plain HTTP: writes
    /// `<dir>/certs.d/<host>/hosts.toml` (read at every pull).
    pub fn plain_http(&self, host: &str) {
        let d = self.dir.join("certs.d").join(host);
        std::fs::create_dir_all(&d).expect("certs.d");
        std::fs::write(
            d.join("hosts.toml"),
            format!(
                "server = \"http://{host}\"\n\n[host.\"http://{host}\"]\n  capabilities = [\"pull\", \"resolve\"]\n"
            ),
        )
        .expect("hosts.toml");
    }

    /// containerd's log.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("containerd.log")).unwrap_or_default()
    }

    /// Runs `ctr --address <ours> ARGS` (bounded to 120 s).
    pub fn ctr(&self, args: &[&str]) -> Output {
        let mut cmd = Command::new("/usr/bin/ctr");
        cmd.arg("--address").arg(&self.address).args(args);
        run_bounded(cmd, Duration::from_secs(120))
    }

    /// `ctr-remote image rpull --plain-http --snapshotter lazysnap IMAGE` (what a
    /// stargz-aware puller does: Prepares with the remote-snapshot labels), bounded;
    /// it must succeed (`daemon`'s log explains a failure).
    pub fn rpull(&self, image: &str, daemon: &Daemon) {
        let mut cmd = Command::new("/usr/bin/ctr-remote");
        cmd.arg("--address").arg(&self.address).args([
            "image",
            "rpull",
            "--plain-http",
            "--snapshotter",
            "lazysnap",
            image,
        ]);
        let out = run_bounded(cmd, Duration::from_secs(120));
        assert!(
            out.status.success(),
            "rpull {image}: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            daemon.log()
        );
    }

    /// `ctr run --rm --snapshotter lazysnap --net-host IMAGE ID CMD...` (bounded).
    pub fn run_lazy(&self, image: &str, id: &str, cmd: &[&str]) -> Output {
        self.ctr(&run_lazy_args(image, id, cmd))
    }

    /// [`Containerd::run_lazy`] that must succeed; returns stdout.
    pub fn run_lazy_ok(&self, image: &str, id: &str, cmd: &[&str]) -> String {
        self.ctr_ok(&run_lazy_args(image, id, cmd))
    }

    /// `ctr` that must succeed; returns stdout.
    pub fn ctr_ok(&self, args: &[&str]) -> String {
        let o = self.ctr(args);
        assert!(
            o.status.success(),
            "ctr {args:?} failed: {}\n{}",
            String::from_utf8_lossy(&o.stderr),
            String::from_utf8_lossy(&o.stdout)
        );
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    /// Waits until a prepare/rm round trip through the snapshotter succeeds
    /// (containerd backs off after refused dials).
    pub fn wait_snapshotter(&self, snapshotter: &str) {
        let mut n = 0;
        let ok = wait_until(Duration::from_secs(90), || {
            n += 1;
            let key = format!("probe-{n}");
            let p = self.ctr(&["snapshot", "--snapshotter", snapshotter, "prepare", &key]);
            if p.status.success() {
                self.ctr(&["snapshot", "--snapshotter", snapshotter, "rm", &key]);
                return true;
            }
            std::thread::sleep(Duration::from_millis(500));
            false
        });
        assert!(
            ok,
            "snapshotter {snapshotter} never became usable:\n{}",
            self.log()
        );
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            kill_and_wait(&mut c, Duration::from_secs(10));
        }
        kill_matching(&self.address.to_string_lossy());
        detach_mounts_under(&self.dir);
    }
}

/// Runs a command, killing it after `limit`.
pub fn run_bounded(mut cmd: Command, limit: Duration) -> Output {
    let child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
    let pid = child.id();
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let d = done.clone();
    let watchdog = std::thread::spawn(move || {
        let start = Instant::now();
        while start.elapsed() < limit {
            if d.load(std::sync::atomic::Ordering::SeqCst) {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGKILL,
        );
    });
    let out = child.wait_with_output().expect("wait");
    done.store(true, std::sync::atomic::Ordering::SeqCst);
    let _ = watchdog.join();
    out
}

/// The arguments of `ctr run` for a container on the lazysnap snapshotter.
fn run_lazy_args<'a>(image: &'a str, id: &'a str, cmd: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec![
        "run",
        "--rm",
        "--snapshotter",
        "lazysnap",
        "--net-host",
        image,
        id,
    ];
    args.extend_from_slice(cmd);
    args
}
