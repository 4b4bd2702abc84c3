//! A real `docker-registry` on 127.0.0.1 with its access log, and pushing OCI images
//! to it with the registry HTTP API (through curl), as a user's tooling would.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// Whether a tool exists; under `CI=true` a missing tool fails the test.
pub fn require(tool: &str, test: &str) -> bool {
    if Path::new(tool).exists() {
        return true;
    }
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("{test}: {tool} is missing and CI=true");
    }
    eprintln!("skipped: {test}: {tool} missing");
    false
}

/// A docker-registry process, killed on drop.
pub struct Registry {
    child: Child,
    pub port: u16,
    pub dir: tempfile::TempDir,
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

impl Registry {
    pub fn start() -> Registry {
        Self::start_with("", None)
    }

    /// A registry that wants HTTP Basic credentials (`user`, `password`).
    pub fn start_htpasswd(user: &str, password: &str) -> Registry {
        let hash = bcrypt::hash_with_result(password, 4)
            .expect("bcrypt")
            .format_for_version(bcrypt::Version::TwoA);
        Self::start_with("", Some(format!("{user}:{hash}\n")))
    }

    /// A registry in read-only maintenance mode: every push answers 405.
    pub fn start_read_only() -> Registry {
        Self::start_with("  maintenance:\n    readonly:\n      enabled: true\n", None)
    }

    /// A registry with extra `storage:` settings, and basic auth from this htpasswd
    /// file content if given.
    fn start_with(storage_extra: &str, htpasswd: Option<String>) -> Registry {
        let dir = tempfile::tempdir().expect("tempdir");
        let port = free_port();
        let mut cfg = format!(
            "version: 0.1\nlog:\n  level: info\n  accesslog:\n    disabled: false\nstorage:\n  filesystem:\n    rootdirectory: {}\n{storage_extra}http:\n  addr: 127.0.0.1:{port}\n",
            dir.path().join("storage").display()
        );
        if let Some(h) = htpasswd {
            let path = dir.path().join("htpasswd");
            std::fs::write(&path, h).expect("write htpasswd");
            cfg.push_str(&format!(
                "auth:\n  htpasswd:\n    realm: lazysnap-test\n    path: {}\n",
                path.display()
            ));
        }
        std::fs::write(dir.path().join("config.yml"), cfg).expect("config");
        let child = Self::spawn(dir.path(), port);
        Registry { child, port, dir }
    }

    /// Stops the registry, keeping its storage and port (an outage).
    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Starts the stopped registry again, on the same port and storage.
    pub fn start_again(&mut self) {
        self.child = Self::spawn(self.dir.path(), self.port);
    }

    fn spawn(dir: &Path, port: u16) -> Child {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("registry.log"))
            .expect("log");
        let mut child = Command::new("/usr/bin/docker-registry")
            .arg("serve")
            .arg(dir.join("config.yml"))
            .stdout(Stdio::from(log.try_clone().expect("log")))
            .stderr(Stdio::from(log))
            .spawn()
            .expect("spawn docker-registry");
        for _ in 0..200 {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return child;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = child.kill();
        let _ = child.wait();
        panic!(
            "docker-registry did not start: {}",
            std::fs::read_to_string(dir.join("registry.log")).unwrap_or_default()
        );
    }

    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("registry.log")).unwrap_or_default()
    }

    /// Where the registry stores a blob (to corrupt it behind its back).
    pub fn blob_path(&self, digest: &str) -> PathBuf {
        let hex = digest.trim_start_matches("sha256:");
        self.dir
            .path()
            .join("storage/docker/registry/v2/blobs/sha256")
            .join(&hex[..2])
            .join(hex)
            .join("data")
    }

    fn curl(&self, args: &[&str]) -> String {
        let out = Command::new("curl")
            .args(["-sS", "-f", "-D", "-", "-o", "/dev/null"])
            .args(args)
            .output()
            .expect("curl");
        assert!(
            out.status.success(),
            "curl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Uploads a blob (monolithic POST + PUT).
    pub fn push_blob(&self, repo: &str, data: &[u8]) -> String {
        let digest = format!("sha256:{}", sha256_hex(data));
        let headers = self.curl(&[
            "-X",
            "POST",
            &format!("http://{}/v2/{repo}/blobs/uploads/", self.host()),
        ]);
        let loc = headers
            .lines()
            .find_map(|l| {
                l.split_once(':')
                    .filter(|(k, _)| k.eq_ignore_ascii_case("location"))
                    .map(|(_, v)| v.trim().to_string())
            })
            .expect("upload location");
        let url = if loc.starts_with("http") {
            loc
        } else {
            format!("http://{}{loc}", self.host())
        };
        let sep = if url.contains('?') { '&' } else { '?' };
        let tmp = tempfile::NamedTempFile::new().expect("tmp");
        std::fs::write(tmp.path(), data).expect("write");
        self.curl(&[
            "-X",
            "PUT",
            "-H",
            "Content-Type: application/octet-stream",
            "--data-binary",
            &format!("@{}", tmp.path().display()),
            &format!("{url}{sep}digest={digest}"),
        ]);
        digest
    }

    /// Puts a manifest or index under `reference` (tag or digest); returns its digest.
    pub fn push_manifest(
        &self,
        repo: &str,
        reference: &str,
        media_type: &str,
        body: &[u8],
    ) -> String {
        let tmp = tempfile::NamedTempFile::new().expect("tmp");
        std::fs::write(tmp.path(), body).expect("write");
        self.curl(&[
            "-X",
            "PUT",
            "-H",
            &format!("Content-Type: {media_type}"),
            "--data-binary",
            &format!("@{}", tmp.path().display()),
            &format!("http://{}/v2/{repo}/manifests/{reference}", self.host()),
        ]);
        format!("sha256:{}", sha256_hex(body))
    }

    /// Pushes an OCI image with these layers (blob, media type, annotations, diff id)
    /// and returns the reference `host/repo:tag`.
    pub fn push_image(&self, repo: &str, tag: &str, layers: &[Layer]) -> String {
        let (config, manifest) = image_json(layers);
        self.push_blob(repo, config.as_bytes());
        for l in layers {
            self.push_blob(repo, &l.blob);
        }
        self.push_manifest(
            repo,
            tag,
            "application/vnd.oci.image.manifest.v1+json",
            manifest.as_bytes(),
        );
        format!("{}/{repo}:{tag}", self.host())
    }

    /// Pushes the config and layer blobs of an image and returns its OCI manifest
    /// (not pushed).
    pub fn image_manifest(&self, repo: &str, layers: &[Layer]) -> Vec<u8> {
        let (config, manifest) = image_json(layers);
        self.push_blob(repo, config.as_bytes());
        for l in layers {
            self.push_blob(repo, &l.blob);
        }
        manifest.into_bytes()
    }

    /// Status code and response bytes of the registry's GETs of blob `digest`, from
    /// its access log (a lazy read is a 206; a whole-blob download a 200).
    pub fn blob_gets(&self, digest: &str) -> Vec<(u16, u64)> {
        blob_gets_in(&self.log(), digest)
    }
}

/// The config and manifest JSON of an OCI image of these layers (push the config,
/// the layer blobs and then the manifest).
pub fn image_json(layers: &[Layer]) -> (String, String) {
    let diff_ids: Vec<String> = layers.iter().map(|l| l.diff_id.clone()).collect();
    let config = serde_json::json!({
        "architecture": go_arch(),
        "os": "linux",
        "config": {"Cmd": ["/bin/sh"]},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    })
    .to_string();
    let descs: Vec<serde_json::Value> = layers
        .iter()
        .map(|l| {
            serde_json::json!({
                "mediaType": l.media_type,
                "digest": format!("sha256:{}", sha256_hex(&l.blob)),
                "size": l.blob.len(),
                "annotations": l.annotations,
            })
        })
        .collect();
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": format!("sha256:{}", sha256_hex(config.as_bytes())),
            "size": config.len(),
        },
        "layers": descs,
    })
    .to_string();
    (config, manifest)
}

/// Status code and response bytes of GETs of `digest` in an access-log excerpt
/// (combined format: `... "GET /v2/... HTTP/1.1" 206 12345 ...`).
pub fn blob_gets_in(log: &str, digest: &str) -> Vec<(u16, u64)> {
    log.lines()
        .filter(|l| l.contains(&format!("/blobs/{digest}")) && l.contains("\"GET "))
        .filter_map(|l| {
            let mut f = l.split("HTTP/1.1\" ").nth(1)?.split(' ');
            Some((f.next()?.parse().ok()?, f.next()?.parse().unwrap_or(0)))
        })
        .collect()
}

/// One layer of a pushed image.
pub struct Layer {
    pub blob: Vec<u8>,
    pub media_type: String,
    pub annotations: BTreeMap<String, String>,
    pub diff_id: String,
}

impl Layer {
    /// A plain `tar+gzip` layer of `tar`.
    pub fn gzip(tar: &[u8]) -> Layer {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        std::io::Write::write_all(&mut e, tar).expect("gzip");
        Layer {
            blob: e.finish().expect("gzip"),
            media_type: "application/vnd.oci.image.layer.v1.tar+gzip".into(),
            annotations: BTreeMap::new(),
            diff_id: format!("sha256:{}", sha256_hex(tar)),
        }
    }

    /// A layer converted by lazysnap's writer, ready to push.
    pub fn convert(tar: &[u8], opts: &lazysnap::format::writer::WriteOptions) -> Layer {
        let (blob, r) = super::convert(tar, opts);
        Layer {
            blob,
            media_type: r.media_type.to_string(),
            annotations: r.annotations,
            diff_id: r.diff_id,
        }
    }
}

pub fn sha256_hex(data: &[u8]) -> String {
    use sha2::Digest as _;
    hex::encode(sha2::Sha256::digest(data))
}

pub fn go_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        a => a,
    }
}
