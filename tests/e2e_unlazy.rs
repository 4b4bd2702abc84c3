//! Unlazy end to end with real containerd, runc, docker-registry and FUSE: the layers
//! of a lazily pulled image become plain directories equal to their FUSE view while
//! a container keeps reading from the image; new containers start from the local
//! layers; and `kill -9` of the daemon in the middle of an unlazy leaves every layer
//! either remote (mounted again) or fully local.

mod common;
mod support;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use common::lazy::{Seen, is_mounted, snapshot};
use common::registry::{Layer, Registry};
use lazysnap::format::Format;
use lazysnap::format::writer::WriteOptions;
use support::{Containerd, Daemon, require};

const MOTD: &str = "read through unlazy";
const BIN: &str = env!("CARGO_BIN_EXE_lazysnap");
/// Reads files of both layers in a loop, one line per failed read.
const READER: &str = "i=0\nwhile [ $i -lt 150 ]; do\n  cat /etc/motd /srv/sym >/dev/null || echo FAIL\n  cat /srv/many/07/f7.txt >/dev/null || echo FAIL\n  i=$((i+1))\n  sleep 0.02\ndone\necho DONE\n";

fn estargz(tar: &[u8]) -> Layer {
    Layer::convert(
        tar,
        &WriteOptions {
            format: Format::Estargz,
            ..WriteOptions::default()
        },
    )
}

/// A layer over busybox that deletes a file, hides a directory's lower content,
/// and adds links and many small files (so that unlazy takes a while).
fn upper_tar(files: usize) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    let h = |path: &str, kind: tar::EntryType, mode: u32, size: usize| {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_size(size as u64);
        h.set_mtime(1_700_000_000);
        h.set_uid(1000);
        h.set_gid(100);
        (h, path.to_string())
    };
    for (path, data) in [
        ("data/.wh.unread.bin", Vec::new()),
        ("etc/.wh..wh..opq", Vec::new()),
        ("etc/motd", format!("{MOTD}\n").into_bytes()),
        ("srv/", Vec::new()),
        ("srv/big.bin", common::prng_bytes(11, 8 << 20)),
        // (a script file: ctr would take a `-c` argument for one of its own flags)
        ("srv/reader.sh", READER.as_bytes().to_vec()),
    ] {
        let kind = if path.ends_with('/') {
            tar::EntryType::Directory
        } else {
            tar::EntryType::Regular
        };
        let (mut hd, p) = h(path, kind, 0o644, data.len());
        b.append_data(&mut hd, p, data.as_slice()).unwrap();
    }
    let (mut hd, p) = h("srv/link", tar::EntryType::Link, 0o644, 0);
    b.append_link(&mut hd, p, "srv/big.bin").unwrap();
    let (mut hd, p) = h("srv/sym", tar::EntryType::Symlink, 0o777, 0);
    b.append_link(&mut hd, p, "../etc/motd").unwrap();
    for i in 0..files {
        let data = common::text_bytes(i as u64, 200 + i % 3000);
        let (mut hd, p) = h(
            &format!("srv/many/{:02}/f{i}.txt", i % 50),
            tar::EntryType::Regular,
            0o600,
            data.len(),
        );
        b.append_data(&mut hd, p, data.as_slice()).unwrap();
    }
    b.into_inner().unwrap()
}

fn lazysnap(daemon: &Daemon, args: &[&str]) -> std::process::Output {
    let mut cmd = Command::new(BIN);
    cmd.args(args).arg("--config").arg(&daemon.config);
    support::run_bounded(cmd, Duration::from_secs(120))
}

/// The layer directories of the daemon: id → fs path.
fn layer_dirs(daemon: &Daemon) -> Vec<(u64, PathBuf)> {
    let mut v: Vec<(u64, PathBuf)> = std::fs::read_dir(daemon.root.join("snapshots"))
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .filter_map(|e| {
                    let id = e.file_name().to_str()?.parse::<u64>().ok()?;
                    Some((id, e.path().join("fs")))
                })
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

type View = (BTreeMap<String, Seen>, Vec<Vec<String>>);

/// The FUSE view of every mounted layer, by snapshot id.
fn fuse_views(daemon: &Daemon) -> BTreeMap<u64, View> {
    layer_dirs(daemon)
        .into_iter()
        .filter(|(_, fs)| is_mounted(fs))
        .map(|(id, fs)| (id, snapshot(&fs)))
        .collect()
}

fn cat_motd(c: &Containerd, image: &str, id: &str) -> String {
    c.run_lazy_ok(image, id, &["/bin/cat", "/etc/motd"])
}

/// Each layer is either still remote (mounted) or local and equal to its FUSE view;
/// no staging directory is left. Returns (remote, local).
fn check_layers(daemon: &Daemon, views: &BTreeMap<u64, View>) -> (usize, usize) {
    let (mut remote, mut local) = (0, 0);
    for (id, view) in views {
        let dir = daemon.root.join(format!("snapshots/{id}"));
        let fs = dir.join("fs");
        assert!(!dir.join("fs.unlazy").exists(), "layer {id}: staging left");
        assert!(
            !dir.join("fs.remote").exists(),
            "layer {id}: old mount point left"
        );
        if is_mounted(&fs) {
            remote += 1;
        } else {
            let got = snapshot(&fs);
            assert_eq!(
                &got, view,
                "layer {id}: unlazied tree differs from its FUSE view"
            );
            local += 1;
        }
    }
    (remote, local)
}

#[test]
fn unlazy_under_a_running_container_and_after_kill_9() {
    if !require(
        &[
            "/usr/bin/containerd",
            "/usr/sbin/runc",
            "/usr/bin/docker-registry",
            "/usr/bin/ctr-remote",
        ],
        "unlazy end to end",
    ) {
        return;
    }
    let work = tempfile::tempdir().unwrap();
    let reg = Registry::start();
    let base = estargz(&common::busybox_tar("lower motd", 9));
    let upper = estargz(&upper_tar(3000));
    let image = reg.push_image("unlazy/app", "1", &[base, upper]);
    let image2 = reg.push_image(
        "unlazy/again",
        "1",
        &[
            estargz(&common::busybox_tar("lower motd", 10)),
            estargz(&upper_tar(6000)),
        ],
    );

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
    let views = fuse_views(&daemon);
    assert_eq!(
        views.len(),
        2,
        "two remote layers: {:?}",
        layer_dirs(&daemon)
    );

    // A container reads from the image the whole time the layers are unlazied.
    let reader = {
        let addr = c.address.clone();
        let image = image.clone();
        std::thread::spawn(move || {
            let mut cmd = Command::new("ctr");
            cmd.arg("--address").arg(&addr).args([
                "run",
                "--rm",
                "--snapshotter",
                "lazysnap",
                "--net-host",
                &image,
                "reader",
                "/bin/sh",
                "/srv/reader.sh",
            ]);
            support::run_bounded(cmd, Duration::from_secs(120))
        })
    };
    std::thread::sleep(Duration::from_millis(500));
    let out = lazysnap(&daemon, &["unlazy", &image]);
    assert!(
        out.status.success(),
        "unlazy: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        daemon.log()
    );
    let said = String::from_utf8_lossy(&out.stdout);
    assert_eq!(said.matches("unlazied").count(), 2, "{said}");
    let read = reader.join().unwrap();
    let read_out = String::from_utf8_lossy(&read.stdout);
    assert!(
        read.status.success(),
        "reader: {read_out}\n{}",
        daemon.log()
    );
    assert!(
        read_out.contains("DONE") && !read_out.contains("FAIL"),
        "{read_out}"
    );
    assert_eq!(check_layers(&daemon, &views), (0, 2));
    // Asking again is harmless; new containers start from the local layers.
    let again = lazysnap(&daemon, &["unlazy", &image]);
    assert!(again.status.success());
    let said = String::from_utf8_lossy(&again.stdout);
    assert_eq!(said.matches("already local").count(), 2, "{said}");
    let none = lazysnap(&daemon, &["unlazy", "127.0.0.1:1/no/such:image"]);
    assert!(!none.status.success());
    assert!(String::from_utf8_lossy(&none.stderr).contains("no/such"));
    assert_eq!(cat_motd(&c, &image, "after").trim(), MOTD);
    daemon.restart();
    c.wait_snapshotter("lazysnap");
    assert_eq!(check_layers(&daemon, &views), (0, 2));
    assert_eq!(cat_motd(&c, &image, "after-restart").trim(), MOTD);

    // kill -9 in the middle of unlazy: remote or local, never in between.
    c.rpull(&image2, &daemon);
    let views2: BTreeMap<u64, View> = fuse_views(&daemon);
    assert_eq!(views2.len(), 2);
    let mut seen = Vec::new();
    for delay_ms in [30u64, 150, 400] {
        let mut cmd = Command::new(BIN);
        cmd.args(["unlazy", &image2, "--config"])
            .arg(&daemon.config);
        cmd.stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
        let mut child = cmd.spawn().unwrap();
        std::thread::sleep(Duration::from_millis(delay_ms));
        daemon.kill9();
        let _ = child.wait();
        // as after a reboot: the mounts are gone, and the restarted daemon mounts each
        // remote layer again at its first use
        support::detach_mounts_under(&daemon.root);
        daemon.start_again();
        c.wait_snapshotter("lazysnap");
        assert_eq!(
            cat_motd(&c, &image2, &format!("crash-{delay_ms}")).trim(),
            MOTD,
            "{}",
            daemon.log()
        );
        let state = check_layers(&daemon, &views2);
        eprintln!("kill -9 after {delay_ms} ms: (remote, local) = {state:?}");
        seen.push(state);
        if state.0 == 0 {
            break;
        }
    }
    // Whatever the crashes left remote can still be unlazied.
    let _ = lazysnap(&daemon, &["unlazy", &image2]);
    assert_eq!(check_layers(&daemon, &views2), (0, 2), "{seen:?}");
    c.ctr_ok(&["image", "rm", &image, &image2]);
}
