//! Registry faults during real use. A fault-injecting proxy sits between lazysnap
//! (`lazysnap serve`, with a private containerd) and a real `docker-registry`. An
//! eStargz image is pulled lazily through it with `ctr-remote rpull`; then, on a
//! seeded schedule, the proxy resets connections, stalls, answers 5xx and 429,
//! truncates bodies and flips bytes in them, and goes fully down for a while, while
//! reader threads read random ranges of the image's files through the daemon's FUSE
//! mounts and runc containers `sha256sum` them. Every read must be correct or fail
//! with EIO: never a wrong byte, never another error, never a hang, and the daemon
//! must not crash. Once the registry is back every file reads correctly again.
//!
//! `FAULT_SECONDS` (default 10) and `DOWN_SECONDS` (default 4) set the phases;
//! `LAZYSNAP_SEED` the schedule.

mod common;
mod support;

use std::collections::HashMap;
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::registry::{Layer, Registry, sha256_hex};
use common::remote::random_files_tar;
use lazysnap::format::Format;
use lazysnap::format::writer::WriteOptions;
use support::fault_proxy::{Fault, FaultProxy, FaultStats};
use support::readers::{self, ReadStats, Target};
use support::{Containerd, Daemon, Rng, require};

/// Probability that a request gets a fault in the faulty phases.
const FAULT_RATE: f64 = 0.25;
/// Longer than the daemon's request timeout, so that stalls are cut and retried.
const STALL: Duration = Duration::from_secs(3);

const CONFIG: &str = "[layer]\nprefetch = true\nbackground_fetch = false\nreadahead_bytes = 0\n\
[cache]\ndisk_limit = 8388608\nmemory_limit = 2097152\n\
[registry]\nrequest_timeout_ms = 1500\nconnect_timeout_ms = 1000\nmax_retries = 3\n\
min_backoff_ms = 20\nmax_backoff_ms = 300\n";

fn env_secs(name: &str, default: u64) -> Duration {
    Duration::from_secs(
        std::env::var(name)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(default),
    )
}

/// One file of the image: where the daemon serves it and its content.
struct File {
    /// Path inside the container.
    path: String,
    /// Path through the daemon's FUSE mount of its layer.
    fuse: PathBuf,
    content: Arc<Vec<u8>>,
    sha256: String,
}

/// Drops a file's pages from the kernel's cache (the FUSE inode, which the
/// container's overlay shares), so that the next read reaches the daemon.
fn drop_cache(p: &std::path::Path) {
    if let Ok(f) = std::fs::File::open(p) {
        // SAFETY: a plain advice call on an open descriptor.
        unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    }
}

/// Outcomes of the files containers checksummed.
#[derive(Debug, Default)]
struct ContainerStats {
    runs: u64,
    /// Runs that did not get as far as reading (e.g. /bin/busybox itself hit EIO).
    failed_runs: u64,
    failed_messages: Vec<String>,
    files_correct: u64,
    files_eio: u64,
    files_wrong: u64,
    files_other: Vec<String>,
}

/// Runs one container that `sha256sum`s `files` and classifies each file.
fn container_check(
    c: &Containerd,
    image: &str,
    id: &str,
    files: &[&File],
    st: &mut ContainerStats,
) {
    for f in files {
        drop_cache(&f.fuse);
    }
    let mut cmd = vec!["/bin/busybox", "sha256sum"];
    cmd.extend(files.iter().map(|f| f.path.as_str()));
    let out = c.run_lazy(image, id, &cmd);
    st.runs += 1;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let sums: HashMap<&str, &str> = stdout
        .lines()
        .filter_map(|l| l.split_once("  ").map(|(h, p)| (p.trim(), h.trim())))
        .collect();
    if sums.is_empty() && !stderr.contains("sha256sum:") {
        st.failed_runs += 1;
        st.failed_messages.push(format!(
            "{}: {}{}",
            out.status,
            stderr.trim(),
            stdout.trim()
        ));
        st.failed_messages.truncate(5);
        return;
    }
    for f in files {
        match sums.get(f.path.as_str()) {
            Some(h) if *h == f.sha256 => st.files_correct += 1,
            Some(_) => st.files_wrong += 1,
            None if stderr
                .lines()
                .any(|l| l.contains(&f.path) && l.contains("Input/output error")) =>
            {
                st.files_eio += 1
            }
            None => st
                .files_other
                .push(format!("{}: {}", f.path, stderr.trim())),
        }
    }
}

#[test]
fn registry_faults_never_serve_wrong_bytes_and_recover() {
    if !require(
        &[
            "/usr/bin/containerd",
            "/usr/sbin/runc",
            "/usr/bin/docker-registry",
            "/usr/bin/ctr-remote",
        ],
        "registry faults",
    ) {
        return;
    }
    let seed = support::seed("registry faults", 11);
    let fault_time = env_secs("FAULT_SECONDS", 10);
    let down_time = env_secs("DOWN_SECONDS", 4);
    let work = tempfile::Builder::new()
        .prefix("lzfault")
        .tempdir_in("/tmp")
        .unwrap();
    let reg = Registry::start();
    let proxy = FaultProxy::start(reg.port, seed, STALL);

    // busybox in a plain gzip layer (containerd unpacks it: containers start without
    // the registry) and two lazy eStargz layers of data
    let esgz = |tar: &[u8]| {
        Layer::convert(
            tar,
            &WriteOptions {
                format: Format::Estargz,
                chunk_size: 64 << 10,
                level: Some(1),
                ..WriteOptions::default()
            },
        )
    };
    let busybox = common::busybox_tar("faults", 9);
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    std::io::Write::write_all(&mut gz, &busybox).unwrap();
    let mut layers = vec![Layer {
        blob: gz.finish().unwrap(),
        media_type: "application/vnd.oci.image.layer.v1.tar+gzip".into(),
        annotations: Default::default(),
        diff_id: format!("sha256:{}", sha256_hex(&busybox)),
    }];
    let mut contents = Vec::new();
    for s in [21u64, 22] {
        let (tar, files) = random_files_tar(s, 8, 2 << 20);
        layers.push(esgz(&tar));
        contents.push(files);
    }
    let digests: Vec<String> = layers
        .iter()
        .map(|l| format!("sha256:{}", sha256_hex(&l.blob)))
        .collect();
    let pushed = reg.push_image("faults/app", "t", &layers);
    let image = pushed.replacen(&reg.host(), &proxy.host(), 1);

    let mut daemon = Daemon::start(&work.path().join("d"), CONFIG);
    let c = Containerd::start(&work.path().join("c"), &daemon.socket);
    c.wait_snapshotter("lazysnap");
    c.rpull(&image, &daemon);
    let mounts: HashMap<String, PathBuf> = daemon.remote_mounts().into_iter().collect();
    assert_eq!(mounts.len(), 2, "two lazy layers: {mounts:?}");
    let mut files = Vec::new();
    for (i, fs) in contents.iter().enumerate() {
        let mp = &mounts[&digests[i + 1]];
        for (path, content) in fs {
            files.push(File {
                path: format!("/{path}"),
                fuse: mp.join(path),
                sha256: sha256_hex(content),
                content: Arc::new(content.clone()),
            });
        }
    }
    let files = Arc::new(files);
    let targets: Arc<Vec<Target>> = Arc::new(
        files
            .iter()
            .map(|f| Target {
                path: f.fuse.clone(),
                content: f.content.clone(),
            })
            .collect(),
    );
    // the image runs before any fault
    let mut cstats = ContainerStats::default();
    container_check(&c, &image, "clean", &[&files[0]], &mut cstats);
    assert_eq!(cstats.files_correct, 1, "{cstats:?}\n{}", daemon.log());

    // faults, then the registry down, with readers and containers all along
    proxy.set_faulty(FAULT_RATE);
    let stop = Arc::new(AtomicBool::new(false));
    let stop_faulty = Arc::new(AtomicBool::new(false));
    let mut faulty_stats = FaultStats::default();
    type Phases = (ReadStats, ReadStats, [ContainerStats; 2]);
    let (faulty, down, [cont, cont_down]): Phases = std::thread::scope(|s| {
        let read = |seed: u64, stop: &Arc<AtomicBool>| {
            let (t, stop) = (targets.clone(), stop.clone());
            s.spawn(move || readers::run(t, 16, seed, 256 << 10, stop))
        };
        let faulty = read(seed, &stop_faulty);
        let containers = s.spawn(|| {
            let mut rng = Rng::new(seed ^ 0xc0);
            let mut st = [ContainerStats::default(), ContainerStats::default()];
            let mut n = 0;
            while !stop.load(Ordering::Relaxed) {
                let pick: Vec<&File> = (0..3)
                    .map(|_| &files[rng.below(files.len() as u64) as usize])
                    .collect();
                n += 1;
                let phase = usize::from(stop_faulty.load(Ordering::Relaxed));
                container_check(&c, &image, &format!("run-{n}"), &pick, &mut st[phase]);
            }
            st
        });
        std::thread::sleep(fault_time);
        faulty_stats = proxy.stats();
        stop_faulty.store(true, Ordering::Relaxed);
        proxy.go_down();
        let down = read(seed + 1000, &stop);
        std::thread::sleep(down_time);
        stop.store(true, Ordering::Relaxed);
        // a read that never returns is a hang: kill the daemon (ending every FUSE
        // request in flight) and fail
        let limit = STALL + Duration::from_secs(90);
        let start = Instant::now();
        while !(faulty.is_finished() && down.is_finished() && containers.is_finished()) {
            if start.elapsed() > limit {
                daemon.kill9();
                panic!("readers still running {limit:?} after the faults ended: a hang");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        (
            faulty.join().expect("readers"),
            down.join().expect("readers"),
            containers.join().expect("containers"),
        )
    });
    assert!(daemon.alive(), "the daemon crashed:\n{}", daemon.log());

    // the registry is back: every file reads correctly, through FUSE and in a container
    proxy.come_up();
    proxy.set_pass();
    let mut recovered = 0;
    for f in files.iter() {
        drop_cache(&f.fuse);
        let got = std::fs::read(&f.fuse)
            .unwrap_or_else(|e| panic!("{}: not recovered: {e}\n{}", f.path, daemon.log()));
        assert!(got == *f.content, "{}: wrong bytes after recovery", f.path);
        recovered += 1;
    }
    let mut after = ContainerStats::default();
    let all: Vec<&File> = files.iter().collect();
    container_check(&c, &image, "recovered", &all, &mut after);
    assert_eq!(
        after.files_correct,
        files.len() as u64,
        "{after:?}\n{}",
        daemon.log()
    );

    let injected = proxy.stats();
    let log = daemon.log();
    let figures = serde_json::json!({
        "seed": seed,
        "fault_seconds": fault_time.as_secs(),
        "down_seconds": down_time.as_secs(),
        "requests": injected.requests,
        "faults_injected": faulty_stats.total_injected(),
        "faults_by_kind": faulty_stats.injected,
        "reads_attempted": faulty.attempted + down.attempted,
        "reads_correct": faulty.correct + down.correct,
        "reads_eio": faulty.eio + down.eio,
        "reads_wrong": faulty.wrong + down.wrong,
        "reads_other_errors": faulty.other + down.other,
        "faulty_phase": [faulty.attempted, faulty.correct, faulty.eio],
        "down_phase": [down.attempted, down.correct, down.eio],
        "container_runs": cont.runs + cont_down.runs,
        "container_files_faulty_phase": [cont.files_correct, cont.files_eio],
        "container_files_down_phase": [cont_down.files_correct, cont_down.files_eio],
        "recovered_files": recovered,
        "corrupt_bodies_refetched": log.matches("chunk rejected; fetching it again").count(),
    });
    eprintln!("FAULT-FIGURES {figures}");
    assert!(!log.contains("panicked"), "the daemon panicked:\n{log}");
    for (phase, st, cont) in [("faulty", &faulty, &cont), ("down", &down, &cont_down)] {
        assert_eq!(st.wrong, 0, "{phase}: {:?}", st.wrong_messages);
        assert_eq!(
            cont.files_wrong, 0,
            "{phase}: a container read wrong bytes: {cont:?}"
        );
        assert!(cont.files_other.is_empty(), "{phase}: {cont:?}");
        assert_eq!(
            cont.failed_runs, 0,
            "{phase}: containers must start: {cont:?}"
        );
        assert_eq!(
            st.other, 0,
            "{phase}: reads must succeed or fail with EIO: {:?}",
            st.other_messages
        );
    }
    for f in Fault::ALL {
        assert!(
            faulty_stats.injected.get(&f.name()).copied().unwrap_or(0) > 0,
            "fault {} was never injected: {faulty_stats:?}",
            f.name()
        );
    }
    assert!(
        faulty.correct > 0 && down.eio > 0,
        "the schedule must let reads through and the outage fail some: {faulty:?} {down:?}"
    );
}
