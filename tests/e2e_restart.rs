//! Mounts that survive the daemon, end to end with real containerd, runc and
//! docker-registry: a container reading files of a lazily pulled image in a loop
//! keeps reading, without one failed read, while `lazysnap serve` is stopped with
//! SIGTERM and started again, killed with SIGKILL and started again, replaced by
//! `lazysnap serve --takeover`, and killed again after its layer's mount was detached
//! under the container (as unlazy does). Then a simulated reboot (mounts detached, fd holder
//! killed) with the registry down: the daemon's socket answers at once, and once the
//! registry is back containers start from the restored snapshots.
//!
//! The figures (reads in each window, failed reads, longest stall between two reads)
//! are printed as `restart-figure {json}` lines for BENCHMARKS.md.

mod common;
mod support;

use std::io::BufRead;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::registry::{Layer, Registry};
use lazysnap::format::Format;
use lazysnap::format::writer::WriteOptions;
use support::{Containerd, Daemon, require, wait_until};

const MOTD: &str = "kept mounted by lazysnap";

/// Each iteration execs `cat` (busybox, from the lazy layer) on a small file and
/// reads 4 KiB of a 24 MiB file at a new offset (an on-demand range request).
const LOOP: &str = r#"i=0
while :; do
  i=$((i+1))
  if cat /etc/motd >/dev/null && busybox dd if=/data/unread.bin of=/dev/null bs=4096 count=1 skip=$(( (i * 97) % 6000 )) 2>/dev/null; then
    echo "OK $i"
  else
    echo "FAIL $i"
  fi
done"#;

/// Lines of the reading container, stamped when they arrive.
struct Reader {
    child: Child,
    lines: Arc<Mutex<Vec<(Instant, bool)>>>,
    /// The first lines as printed, and ctr's stderr, for failure messages.
    head: Arc<Mutex<Vec<String>>>,
    stderr: std::path::PathBuf,
}

impl Reader {
    fn start(c: &Containerd, image: &str) -> Reader {
        let stderr = c.dir.join("reader.stderr");
        let child = Command::new("/usr/bin/ctr")
            .arg("--address")
            .arg(&c.address)
            .args([
                "run",
                "--rm",
                "--snapshotter",
                "lazysnap",
                "--net-host",
                image,
                "reader",
                "/bin/sh",
                "-c",
                LOOP,
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(std::fs::File::create(&stderr).expect("stderr")))
            .spawn()
            .expect("ctr run");
        let mut child = child;
        let out = child.stdout.take().expect("stdout");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let head = Arc::new(Mutex::new(Vec::new()));
        let (l, h) = (lines.clone(), head.clone());
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                let ok = line.starts_with("OK ");
                l.lock().unwrap().push((Instant::now(), ok));
                let mut h = h.lock().unwrap();
                if h.len() < 20 || !ok {
                    h.push(line);
                }
            }
        });
        Reader {
            child,
            lines,
            head,
            stderr,
        }
    }

    /// What the container and ctr said, for failure messages.
    fn said(&self) -> String {
        format!(
            "container output: {:?}\nctr stderr: {}",
            self.head.lock().unwrap(),
            std::fs::read_to_string(&self.stderr).unwrap_or_default()
        )
    }

    fn count(&self) -> usize {
        self.lines.lock().unwrap().len()
    }

    /// Waits until `n` more lines than `from` arrived.
    fn wait_lines(&self, from: usize, n: usize, limit: Duration) -> bool {
        wait_until(limit, || self.count() >= from + n)
    }

    /// Reads, failed reads and the longest gap between two lines, from `start` on.
    fn figures(&self, start: Instant) -> Figures {
        let lines = self.lines.lock().unwrap();
        let window: Vec<_> = lines.iter().filter(|(t, _)| *t >= start).collect();
        let mut stall = Duration::ZERO;
        let mut prev = start;
        for (t, _) in &window {
            stall = stall.max(t.duration_since(prev));
            prev = *t;
        }
        Figures {
            reads: window.len(),
            failed: window.iter().filter(|(_, ok)| !ok).count(),
            stall,
            span: prev.duration_since(start),
        }
    }
}

struct Figures {
    reads: usize,
    failed: usize,
    stall: Duration,
    span: Duration,
}

impl Figures {
    fn print(&self, case: &str, extra: serde_json::Value) {
        let mut v = serde_json::json!({
            "case": case,
            "window_s": self.span.as_secs_f64(),
            "reads": self.reads,
            "failed": self.failed,
            "longest_stall_ms": self.stall.as_secs_f64() * 1000.0,
        });
        if let (Some(o), Some(e)) = (v.as_object_mut(), extra.as_object()) {
            o.extend(e.clone());
        }
        println!("restart-figure {v}");
    }
}

fn estargz_image(reg: &Registry) -> String {
    let tar = common::busybox_tar(MOTD, 11);
    let layer = Layer::convert(
        &tar,
        &WriteOptions {
            format: Format::Estargz,
            prioritized: vec!["/bin/busybox".into(), "/etc/motd".into()],
            ..WriteOptions::default()
        },
    );
    reg.push_image("restart/busybox", "esgz", &[layer])
}

#[test]
fn containers_keep_reading_across_restarts_and_reboot_restores_lazily() {
    if !require(
        &[
            "/usr/bin/containerd",
            "/usr/sbin/runc",
            "/usr/bin/docker-registry",
            "/usr/bin/ctr-remote",
        ],
        "restart e2e",
    ) {
        return;
    }
    let work = tempfile::tempdir().unwrap();
    let mut reg = Registry::start();
    let image = estargz_image(&reg);
    let mut daemon = Daemon::start(
        &work.path().join("lazysnap"),
        &format!(
            "[cache]\ndir = \"{}\"\n[layer]\nbackground_fetch = false\n",
            work.path().join("cache").display()
        ),
    );
    let c = Containerd::start(&work.path().join("containerd"), &daemon.socket);
    c.wait_snapshotter("lazysnap");
    c.rpull(&image, &daemon);
    assert!(daemon.holder_pid().is_some(), "serve starts the fd holder");

    let reader = Reader::start(&c, &image);
    assert!(
        reader.wait_lines(0, 100, Duration::from_secs(60)),
        "the reading container did not start: {}\n{}\n{}",
        reader.said(),
        daemon.log(),
        c.log()
    );

    // The loop's own rhythm, for comparison: a window of the same kind without a
    // restart.
    let start = Instant::now();
    let after = reader.count();
    std::thread::sleep(Duration::from_millis(500));
    assert!(reader.wait_lines(after, 50, Duration::from_secs(60)));
    reader
        .figures(start)
        .print("no restart (baseline)", serde_json::json!({}));

    // (case, restart, layers mounted afterwards: a detached layer is served on for
    // its users but no longer mounted)
    type Restart = fn(&mut Daemon);
    let restarts: [(&str, Restart, usize); 4] = [
        ("SIGTERM, start again", |d| d.restart(), 1),
        (
            "SIGKILL, start again",
            |d| {
                d.kill9();
                d.start_again();
            },
            1,
        ),
        ("serve --takeover", |d| d.takeover(), 1),
        (
            "layer detached in use, SIGKILL, start again",
            |d| {
                support::detach_mounts_under(&d.root.join("snapshots"));
                d.kill9();
                d.start_again();
            },
            0,
        ),
    ];
    for (i, (name, restart, mounted)) in restarts.into_iter().enumerate() {
        let start = Instant::now();
        restart(&mut daemon);
        let up = start.elapsed();
        let after = reader.count();
        let kept_reading = reader.wait_lines(after, 50, Duration::from_secs(60));
        let f = reader.figures(start);
        f.print(
            name,
            serde_json::json!({ "daemon_up_ms": up.as_secs_f64() * 1000.0 }),
        );
        assert!(
            kept_reading,
            "{name}: the container stopped reading: {}\n{}",
            reader.said(),
            daemon.log()
        );
        assert_eq!(
            f.failed,
            0,
            "{name}: reads failed: {}\n{}",
            reader.said(),
            daemon.log()
        );
        let log = daemon.log();
        let taken = log.matches("taking over a live mount").count()
            + log
                .matches("taking over a detached layer still in use")
                .count();
        assert_eq!(
            taken,
            i + 1,
            "{name}: the layer was not taken over:\n{}",
            daemon.log()
        );
        let layers = daemon.status()["layers"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        assert_eq!(layers.len(), mounted, "{name}: {layers:?}");
    }
    let _ = c.ctr(&["task", "kill", "-s", "KILL", "reader"]);
    let mut reader = reader;
    let _ = reader.child.wait();
    let total = reader.figures(Instant::now() - Duration::from_secs(3600));
    assert_eq!(total.failed, 0, "no read failed at any time");

    // A reboot: no daemon, no holder, no mounts; the registry is down when the
    // daemon starts, so it cannot have waited for any registry request.
    daemon.stop();
    daemon.kill_holder();
    support::detach_mounts_under(&daemon.root);
    reg.stop();
    let start = Instant::now();
    daemon.start_again();
    let up = start.elapsed();
    let s = daemon.status();
    let answered = start.elapsed();
    println!(
        "restart-figure {}",
        serde_json::json!({
            "case": "reboot, registry down",
            "daemon_up_ms": up.as_secs_f64() * 1000.0,
            "status_answered_ms": answered.as_secs_f64() * 1000.0,
        })
    );
    assert!(s["snapshots"]["remote"].as_u64().unwrap_or(0) >= 1, "{s}");
    assert_eq!(
        s["layers"].as_array().map_or(0, Vec::len),
        0,
        "nothing is mounted before first use: {s}"
    );
    assert!(
        daemon.log().contains("mounted at first use"),
        "{}",
        daemon.log()
    );
    c.wait_snapshotter("lazysnap");

    reg.start_again();
    let out = c.ctr_ok(&[
        "run",
        "--rm",
        "--snapshotter",
        "lazysnap",
        "--net-host",
        &image,
        "after-reboot",
        "/bin/cat",
        "/etc/motd",
    ]);
    assert_eq!(out.trim(), MOTD, "{}", daemon.log());
    let layers = daemon.status()["layers"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert_eq!(layers.len(), 1, "mounted at first use: {layers:?}");
    c.ctr_ok(&["image", "rm", &image]);
}
