//! A tiny busybox image as an OCI layout (one gzip layer), pushed with skopeo.

use std::io::Write;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use sha2::{Digest, Sha256};

fn sha(b: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(b)))
}

fn blob(layout: &Path, data: &[u8]) -> String {
    let d = sha(data);
    let p = layout
        .join("blobs/sha256")
        .join(d.trim_start_matches("sha256:"));
    std::fs::write(p, data).expect("blob");
    d
}

/// Builds a busybox image (`/bin/busybox` + `/bin/sh`, `/bin/echo`, `/bin/cat` links)
/// as an OCI layout in `layout` with tag `tag`.
pub fn busybox_layout(layout: &Path, tag: &str) {
    std::fs::create_dir_all(layout.join("blobs/sha256")).expect("layout");
    let mut tar = tar::Builder::new(Vec::new());
    let bb = std::fs::read("/bin/busybox").expect("read /bin/busybox");
    let mut dir = |path: &str| {
        let mut h = tar::Header::new_ustar();
        h.set_entry_type(tar::EntryType::Directory);
        h.set_mode(0o755);
        h.set_size(0);
        h.set_mtime(1_600_000_000);
        tar.append_data(&mut h, path, std::io::empty())
            .expect("dir");
    };
    for d in ["bin/", "tmp/", "etc/", "proc/", "sys/", "dev/"] {
        dir(d);
    }
    let mut h = tar::Header::new_ustar();
    h.set_entry_type(tar::EntryType::Regular);
    h.set_mode(0o755);
    h.set_size(bb.len() as u64);
    h.set_mtime(1_600_000_000);
    tar.append_data(&mut h, "bin/busybox", bb.as_slice())
        .expect("busybox");
    for l in ["sh", "echo", "cat", "ls"] {
        let mut h = tar::Header::new_ustar();
        h.set_entry_type(tar::EntryType::Symlink);
        h.set_mode(0o777);
        h.set_size(0);
        h.set_mtime(1_600_000_000);
        tar.append_link(&mut h, format!("bin/{l}"), "busybox")
            .expect("link");
    }
    let tar = tar.into_inner().expect("tar");
    let diff_id = sha(&tar);
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(&tar).expect("gzip");
    let gz = gz.finish().expect("gzip");
    let layer = blob(layout, &gz);
    let config = serde_json::json!({
        "architecture": "amd64", "os": "linux",
        "config": {"Cmd": ["/bin/sh"], "Env": ["PATH=/bin"]},
        "rootfs": {"type": "layers", "diff_ids": [diff_id]},
    })
    .to_string();
    let config_digest = blob(layout, config.as_bytes());
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest, "size": config.len()},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": layer, "size": gz.len()}],
    })
    .to_string();
    let manifest_digest = blob(layout, manifest.as_bytes());
    let index = serde_json::json!({
        "schemaVersion": 2,
        "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": manifest_digest,
            "size": manifest.len(), "annotations": {"org.opencontainers.image.ref.name": tag}}],
    })
    .to_string();
    std::fs::write(layout.join("index.json"), index).expect("index");
    std::fs::write(
        layout.join("oci-layout"),
        r#"{"imageLayoutVersion":"1.0.0"}"#,
    )
    .expect("oci-layout");
}

/// Pushes the layout's `tag` to `dest` (`127.0.0.1:PORT/repo:tag`) over plain HTTP.
pub fn push(layout: &Path, tag: &str, dest: &str) {
    let mut cmd = Command::new("/usr/bin/skopeo");
    cmd.args(["copy", "--dest-tls-verify=false", "--insecure-policy"])
        .arg(format!("oci:{}:{tag}", layout.display()))
        .arg(format!("docker://{dest}"));
    let out = super::run_bounded(cmd, Duration::from_secs(120));
    assert!(
        out.status.success(),
        "skopeo copy failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}
