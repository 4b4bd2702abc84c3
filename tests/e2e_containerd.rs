//! End-to-end with a real containerd 1.6 + runc: lazysnap as a proxy snapshotter next
//! to containerd's own overlayfs snapshotter in the same containerd.
//!
//! 1. `ctr snapshot` commands behave (output modulo ids and paths) like overlayfs;
//! 2. bad input gets the same error codes as overlayfs;
//! 3. a gzip image pulled from a local docker-registry runs (`echo hi`);
//! 4. after `kill -9` of the daemon and a restart, the image runs again.

mod common;
mod support;

use std::collections::HashMap;
use std::path::Path;

use common::registry::Registry;
use support::{Containerd, Daemon};

const TOOLS: &[&str] = &[
    "/usr/bin/containerd",
    "/usr/bin/ctr",
    "/usr/sbin/runc",
    "/usr/bin/docker-registry",
    "/usr/bin/skopeo",
    "/bin/busybox",
];

/// Replaces snapshot directories of either snapshotter by `S/N<k>/`, numbering ids in
/// order of first appearance.
struct Normalizer {
    roots: Vec<String>,
    ids: HashMap<String, usize>,
}

impl Normalizer {
    fn new(roots: &[&Path]) -> Self {
        Normalizer {
            roots: roots.iter().map(|r| format!("{}/", r.display())).collect(),
            ids: HashMap::new(),
        }
    }

    fn apply(&mut self, s: &str) -> String {
        let mut s = s.to_string();
        for r in &self.roots {
            s = s.replace(r.as_str(), "S/");
        }
        let mut out = String::new();
        let mut rest = s.as_str();
        while let Some(i) = rest.find("S/") {
            out.push_str(&rest[..i + 2]);
            rest = &rest[i + 2..];
            let digits: String = rest.chars().take_while(|c| c.is_ascii_digit()).collect();
            if !digits.is_empty() {
                let n = self.ids.len();
                let k = *self.ids.entry(digits.clone()).or_insert(n);
                out.push_str(&format!("N{k}"));
                rest = &rest[digits.len()..];
            }
        }
        out.push_str(rest);
        out
    }
}

fn classify(stderr: &str) -> &'static str {
    let e = stderr.to_lowercase();
    for (needle, class) in [
        ("not found", "NotFound"),
        ("does not exist", "NotFound"),
        ("already exists", "AlreadyExists"),
        ("failed precondition", "FailedPrecondition"),
        ("invalid argument", "InvalidArgument"),
        ("unavailable", "Unavailable"),
    ] {
        if e.contains(needle) {
            return class;
        }
    }
    "Other"
}

/// The upper (or bind source) directory from `ctr snapshot mounts` output.
fn upper_dir(mount_cmd: &str) -> String {
    if let Some(i) = mount_cmd.find("upperdir=") {
        return mount_cmd[i + 9..]
            .split([',', ' ', '\n'])
            .next()
            .unwrap_or("")
            .to_string();
    }
    // mount -t bind SRC TARGET -o rw,rbind
    mount_cmd
        .split_whitespace()
        .nth(3)
        .unwrap_or("")
        .to_string()
}

/// Runs the same `ctr snapshot` session against `sn` and returns normalized output.
fn session(c: &Containerd, sn: &str, roots: &[&Path]) -> Vec<String> {
    let mut n = Normalizer::new(roots);
    let mut out = Vec::new();
    let mut run = |args: &[&str], out: &mut Vec<String>| -> String {
        let mut full = vec!["snapshot", "--snapshotter", sn];
        full.extend_from_slice(args);
        let o = c.ctr(&full);
        let stdout = String::from_utf8_lossy(&o.stdout).into_owned();
        let stderr = String::from_utf8_lossy(&o.stderr).into_owned();
        let mut line = format!(
            "$ {} -> {}\n",
            args.join(" "),
            o.status.code().unwrap_or(-1)
        );
        if o.status.success() && args[0] == "label" {
            // Go prints the label map in random order; containerd adds gc.root with a time.
            let mut items: Vec<&str> = stdout
                .trim()
                .split(',')
                .filter(|i| !i.starts_with("containerd.io/gc.root="))
                .collect();
            items.sort();
            line.push_str(&items.join(","));
        } else if o.status.success() {
            // Times and containerd's gc.root label differ run to run.
            let kept: Vec<&str> = stdout
                .lines()
                .filter(|l| {
                    !l.contains("\"Created\"")
                        && !l.contains("\"Updated\"")
                        && !l.contains("gc.root")
                })
                .collect();
            line.push_str(&n.apply(&kept.join("\n")));
        } else {
            line.push_str(classify(&stderr));
        }
        out.push(line);
        stdout
    };
    run(&["prepare", "a1"], &mut out);
    let m = run(&["mounts", "/mnt/x", "a1"], &mut out);
    let up = upper_dir(&m);
    std::fs::write(format!("{up}/one"), vec![1u8; 5000]).expect("write into upper dir");
    std::fs::create_dir(format!("{up}/dir")).expect("mkdir");
    run(&["usage", "a1"], &mut out);
    run(&["commit", "c1", "a1"], &mut out);
    run(&["prepare", "a2", "c1"], &mut out);
    let m = run(&["mounts", "/mnt/x", "a2"], &mut out);
    let up = upper_dir(&m);
    std::fs::write(format!("{up}/two"), vec![2u8; 10000]).expect("write into upper dir");
    run(&["commit", "c2", "a2"], &mut out);
    run(&["view", "v1", "c2"], &mut out);
    run(&["label", "v1", "containerd.io/gc.root=keep"], &mut out);
    run(&["mounts", "/mnt/x", "v1"], &mut out);
    run(&["view", "v0", "c1"], &mut out);
    run(&["label", "v0", "containerd.io/gc.root=keep"], &mut out);
    run(&["mounts", "/mnt/x", "v0"], &mut out);
    run(&["view", "v2"], &mut out);
    run(&["label", "v2", "containerd.io/gc.root=keep"], &mut out);
    run(&["mounts", "/mnt/x", "v2"], &mut out);
    run(&["prepare", "a3", "c2"], &mut out);
    run(&["mounts", "/mnt/x", "a3"], &mut out);
    run(
        &["label", "c2", "foo=bar", "containerd.io/snapshot/x=1"],
        &mut out,
    );
    run(&["label", "c2", "foo="], &mut out);
    run(&["info", "c2"], &mut out);
    run(&["usage"], &mut out);
    run(&["tree"], &mut out);
    run(&["ls"], &mut out);
    // Errors.
    run(&["mounts", "/mnt/x", "nope"], &mut out);
    run(&["mounts", "/mnt/x", "c2"], &mut out);
    run(&["usage", "nope"], &mut out);
    run(&["view", "v9", "a3"], &mut out);
    run(&["prepare", "b1", "nope"], &mut out);
    run(&["prepare", "a3", "c2"], &mut out);
    run(&["view", "v2", "c2"], &mut out);
    run(&["prepare", "--mounts", "a4", "c2"], &mut out);
    run(&["rm", "c1"], &mut out);
    run(&["commit", "c3", "v1"], &mut out);
    run(&["commit", "c1", "a3"], &mut out);
    run(&["rm", "nope"], &mut out);
    let big = format!("k={}", "v".repeat(5000));
    run(&["label", "c2", &big], &mut out);
    run(&["info", "nope"], &mut out);
    // Teardown.
    for k in ["a4", "a3", "v2", "v0", "v1", "c2", "c1"] {
        run(&["rm", k], &mut out);
    }
    run(&["ls"], &mut out);
    out
}

/// gRPC codes containerd's snapshots service answers for bad input, per snapshotter
/// (through containerd, so the metadata layer and the backend both take part).
fn grpc_codes(address: &Path, sn: &str) -> Vec<(String, i32)> {
    use containerd_client::services::v1::snapshots::snapshots_client::SnapshotsClient;
    use containerd_client::services::v1::snapshots::{
        CommitSnapshotRequest, ListSnapshotsRequest, PrepareSnapshotRequest, RemoveSnapshotRequest,
        StatSnapshotRequest, ViewSnapshotRequest,
    };
    use containerd_client::tonic::Request;

    fn req<T>(m: T) -> Request<T> {
        let mut r = Request::new(m);
        r.metadata_mut()
            .insert("containerd-namespace", "codes".parse().expect("ns"));
        r
    }
    fn code<T>(r: Result<T, containerd_client::tonic::Status>) -> i32 {
        r.map_or_else(|s| s.code() as i32, |_| 0)
    }
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async {
        let ch = containerd_client::connect(address).await.expect("connect");
        let mut c = SnapshotsClient::new(ch);
        let sn = sn.to_string();
        let gc = || HashMap::from([("containerd.io/gc.root".to_string(), "t".to_string())]);
        let prep = |key: &str, parent: &str, labels: HashMap<String, String>| {
            req(PrepareSnapshotRequest {
                snapshotter: sn.clone(),
                key: key.into(),
                parent: parent.into(),
                labels,
            })
        };
        let mut out = Vec::new();
        out.push((
            "prepare base".into(),
            code(c.prepare(prep("base", "", gc())).await),
        ));
        let commit = req(CommitSnapshotRequest {
            snapshotter: sn.clone(),
            name: "base-c".into(),
            key: "base".into(),
            labels: gc(),
        });
        out.push(("commit base".into(), code(c.commit(commit).await)));
        out.push((
            "prepare child".into(),
            code(c.prepare(prep("child", "base-c", gc())).await),
        ));
        let stat = req(StatSnapshotRequest {
            snapshotter: sn.clone(),
            key: "unknown".into(),
        });
        out.push(("stat unknown".into(), code(c.stat(stat).await)));
        out.push((
            "prepare missing parent".into(),
            code(c.prepare(prep("x", "missing", gc())).await),
        ));
        out.push((
            "prepare duplicate".into(),
            code(c.prepare(prep("child", "base-c", gc())).await),
        ));
        let mut big = gc();
        big.insert("k".into(), "v".repeat(4096));
        out.push((
            "prepare 4 KiB label".into(),
            code(c.prepare(prep("y", "", big)).await),
        ));
        let rm = req(RemoveSnapshotRequest {
            snapshotter: sn.clone(),
            key: "base-c".into(),
        });
        out.push(("remove parent".into(), code(c.remove(rm).await)));
        let view = req(ViewSnapshotRequest {
            snapshotter: sn.clone(),
            key: "v".into(),
            parent: "base-c".into(),
            labels: gc(),
        });
        out.push(("view".into(), code(c.view(view).await)));
        let commit = req(CommitSnapshotRequest {
            snapshotter: sn.clone(),
            name: "from-view".into(),
            key: "v".into(),
            labels: gc(),
        });
        out.push(("commit view".into(), code(c.commit(commit).await)));
        let list = req(ListSnapshotsRequest {
            snapshotter: sn.clone(),
            filters: vec!["name==".into()],
        });
        let listed = match c.list(list).await {
            Ok(mut s) => {
                let mut r = Ok(());
                while let Some(m) = s.get_mut().message().await.transpose() {
                    if let Err(e) = m {
                        r = Err(e);
                        break;
                    }
                }
                r
            }
            Err(e) => Err(e),
        };
        out.push(("list malformed filter".into(), code(listed)));
        for k in ["v", "child", "base-c"] {
            let rm = req(RemoveSnapshotRequest {
                snapshotter: sn.clone(),
                key: k.into(),
            });
            out.push((format!("remove {k}"), code(c.remove(rm).await)));
        }
        out
    })
}

#[test]
fn containerd_end_to_end() {
    if !support::require(TOOLS, "e2e_containerd") {
        return;
    }
    let tmp = tempfile::Builder::new()
        .prefix("lze2e")
        .tempdir_in("/tmp")
        .expect("tempdir");
    let registry = Registry::start();
    let mut daemon = Daemon::start(&tmp.path().join("d"), "");
    let ctd = Containerd::start(&tmp.path().join("c"), &daemon.socket);
    ctd.wait_snapshotter("lazysnap");

    // 1 + 2: ctr snapshot sessions, side by side.
    let overlay_root = ctd
        .root
        .join("io.containerd.snapshotter.v1.overlayfs/snapshots");
    let ours_root = daemon.root.join("snapshots");
    let roots = [overlay_root.as_path(), ours_root.as_path()];
    let theirs = session(&ctd, "overlayfs", &roots);
    let ours = session(&ctd, "lazysnap", &roots);
    if theirs != ours {
        eprintln!(
            "overlayfs:\n{}\n\nlazysnap:\n{}\n\nlog:\n{}",
            theirs.join("\n"),
            ours.join("\n"),
            daemon.log()
        );
    }
    for (a, b) in theirs.iter().zip(&ours) {
        assert_eq!(a, b, "lazysnap differs from overlayfs");
    }
    assert_eq!(theirs.len(), ours.len());
    eprintln!(
        "ctr snapshot session, {} steps identical:\n{}",
        ours.len(),
        ours.join("\n")
    );

    // 2b: error codes through containerd's gRPC API, compared code by code.
    let theirs = grpc_codes(&ctd.address, "overlayfs");
    let ours = grpc_codes(&ctd.address, "lazysnap");
    eprintln!("gRPC codes (overlayfs): {theirs:?}");
    assert_eq!(theirs, ours, "gRPC codes differ from overlayfs");
    assert!(ours.iter().filter(|(_, c)| *c != 0).count() >= 6);

    // 3: pull and run a gzip image.
    let layout = tmp.path().join("layout");
    support::image::busybox_layout(&layout, "1");
    let image = format!("{}/busybox:1", registry.host());
    support::image::push(&layout, "1", &image);
    ctd.ctr_ok(&[
        "image",
        "pull",
        "--plain-http",
        "--snapshotter",
        "lazysnap",
        &image,
    ]);
    let run = |id: &str| {
        ctd.ctr_ok(&[
            "run",
            "--rm",
            "--net-host",
            "--snapshotter",
            "lazysnap",
            &image,
            id,
            "/bin/busybox",
            "echo",
            "hi",
        ])
    };
    assert_eq!(run("e2e-1").trim(), "hi");
    let tree = ctd.ctr_ok(&["snapshot", "--snapshotter", "lazysnap", "ls"]);
    assert!(
        tree.contains("sha256:"),
        "the image's layer snapshot is listed: {tree}"
    );

    // 4: crash and restart under a running containerd.
    daemon.kill9();
    daemon.start_again();
    ctd.wait_snapshotter("lazysnap");
    assert_eq!(run("e2e-2").trim(), "hi");
    let tree2 = ctd.ctr_ok(&["snapshot", "--snapshotter", "lazysnap", "ls"]);
    assert_eq!(tree, tree2);

    // Clean shutdown: SIGTERM exits 0.
    ctd.ctr_ok(&["image", "rm", &image]);
    let status = daemon.stop().expect("daemon was running");
    assert!(
        status.success(),
        "SIGTERM exit: {status:?}\n{}",
        daemon.log()
    );
}
