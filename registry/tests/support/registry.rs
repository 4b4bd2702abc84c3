//! A real `docker-registry` process (Debian's distribution 2.8) on 127.0.0.1, with
//! filesystem storage in a temp dir, killed on drop.

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::Duration,
};

use sha2::{Digest as _, Sha256};

pub const BINARY: &str = "/usr/bin/docker-registry";

/// `Some(())` if docker-registry is installed. Without it: panics when `CI=true`
/// (a CI run must not pass by skipping), else prints a skip notice.
pub fn available(test: &str) -> bool {
    if Path::new(BINARY).exists() {
        return true;
    }
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("{BINARY} is missing and CI=true: install the docker-registry package");
    }
    eprintln!("SKIP {test}: {BINARY} not installed");
    false
}

pub enum Auth {
    None,
    /// htpasswd file (bcrypt) with this user and password.
    Htpasswd {
        user: String,
        password: String,
    },
    /// distribution's token auth.
    Token {
        realm: String,
        service: String,
        issuer: String,
        root_cert_pem: String,
    },
}

pub struct Tls {
    pub cert_pem: String,
    pub key_pem: String,
}

pub struct Registry {
    child: Child,
    pub port: u16,
    pub dir: tempfile::TempDir,
    pub scheme: &'static str,
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Registry {
    pub fn start(auth: Auth, tls: Option<Tls>) -> Registry {
        Self::start_with(auth, tls, false)
    }

    /// A registry in read-only maintenance mode: every write answers 405.
    pub fn start_read_only() -> Registry {
        Self::start_with(Auth::None, None, true)
    }

    fn start_with(auth: Auth, tls: Option<Tls>, read_only: bool) -> Registry {
        let dir = tempfile::tempdir().expect("tempdir");
        let port = super::free_port();
        let storage = dir.path().join("storage");
        std::fs::create_dir_all(&storage).expect("storage dir");
        let mut cfg = format!(
            "version: 0.1\nlog:\n  level: warn\n  accesslog:\n    disabled: true\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: 127.0.0.1:{port}\n  secret: lazysnap-test-secret\n",
            storage.display()
        );
        if read_only {
            cfg = cfg.replace(
                "  delete:\n",
                "  maintenance:\n    readonly:\n      enabled: true\n  delete:\n",
            );
        }
        let scheme = if let Some(t) = &tls {
            let cert = dir.path().join("server.pem");
            let key = dir.path().join("server.key");
            std::fs::write(&cert, &t.cert_pem).expect("write cert");
            std::fs::write(&key, &t.key_pem).expect("write key");
            cfg.push_str(&format!(
                "  tls:\n    certificate: {}\n    key: {}\n",
                cert.display(),
                key.display()
            ));
            "https"
        } else {
            "http"
        };
        match &auth {
            Auth::None => {}
            Auth::Htpasswd { user, password } => {
                let hash = bcrypt::hash_with_result(password, 4)
                    .expect("bcrypt")
                    .format_for_version(bcrypt::Version::TwoA);
                let path = dir.path().join("htpasswd");
                std::fs::write(&path, format!("{user}:{hash}\n")).expect("write htpasswd");
                cfg.push_str(&format!(
                    "auth:\n  htpasswd:\n    realm: lazysnap-test\n    path: {}\n",
                    path.display()
                ));
            }
            Auth::Token {
                realm,
                service,
                issuer,
                root_cert_pem,
            } => {
                let path = dir.path().join("token-root.pem");
                std::fs::write(&path, root_cert_pem).expect("write token root");
                cfg.push_str(&format!(
                    "auth:\n  token:\n    realm: {realm}\n    service: {service}\n    issuer: {issuer}\n    rootcertbundle: {}\n",
                    path.display()
                ));
            }
        }
        let cfg_path = dir.path().join("config.yml");
        std::fs::write(&cfg_path, cfg).expect("write config");
        let log = std::fs::File::create(dir.path().join("registry.log")).expect("log file");
        let log2 = log.try_clone().expect("log clone");
        let child = Command::new(BINARY)
            .arg("serve")
            .arg(&cfg_path)
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(log2))
            .spawn()
            .expect("spawn docker-registry");
        let mut reg = Registry {
            child,
            port,
            dir,
            scheme,
        };
        reg.wait_ready();
        reg
    }

    fn wait_ready(&mut self) {
        for _ in 0..200 {
            if std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                return;
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("docker-registry exited ({status}): {}", self.log());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!(
            "docker-registry did not listen on {}: {}",
            self.port,
            self.log()
        );
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("registry.log")).unwrap_or_default()
    }

    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn base(&self) -> String {
        format!("{}://127.0.0.1:{}", self.scheme, self.port)
    }
}

pub fn sha256(data: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(data)))
}

/// Pushes content with the registry API, as a client would (monolithic upload).
pub struct Pusher {
    pub client: reqwest::Client,
    pub base: String,
    pub auth: Option<String>,
}

impl Pusher {
    pub fn new(base: String, ca_pem: Option<&str>, auth: Option<String>) -> Pusher {
        super::install_crypto();
        let mut b = reqwest::Client::builder();
        if let Some(ca) = ca_pem {
            b = b.tls_certs_only([reqwest::Certificate::from_pem(ca.as_bytes()).expect("CA pem")]);
        }
        Pusher {
            client: b.build().expect("client"),
            base,
            auth,
        }
    }

    fn req(&self, m: reqwest::Method, url: &str) -> reqwest::RequestBuilder {
        let r = self.client.request(m, url);
        match &self.auth {
            Some(a) => r.header("authorization", a),
            None => r,
        }
    }

    /// POST + PUT monolithic upload; returns the digest.
    pub async fn blob(&self, repo: &str, data: &[u8]) -> String {
        let digest = sha256(data);
        let r = self
            .req(
                reqwest::Method::POST,
                &format!("{}/v2/{repo}/blobs/uploads/", self.base),
            )
            .header("content-length", "0")
            .send()
            .await
            .expect("POST upload");
        assert_eq!(
            r.status().as_u16(),
            202,
            "start upload: {:?}",
            r.text().await
        );
        let loc = r.headers()["location"]
            .to_str()
            .expect("location")
            .to_string();
        let url = reqwest::Url::parse(&self.base)
            .expect("base")
            .join(&loc)
            .expect("join location");
        let sep = if url.query().is_some() { '&' } else { '?' };
        let put = format!("{url}{sep}digest={digest}");
        let r = self
            .req(reqwest::Method::PUT, &put)
            .header("content-type", "application/octet-stream")
            .body(data.to_vec())
            .send()
            .await
            .expect("PUT blob");
        assert_eq!(
            r.status().as_u16(),
            201,
            "finish upload: {:?}",
            r.text().await
        );
        digest
    }

    pub async fn manifest(
        &self,
        repo: &str,
        reference: &str,
        media_type: &str,
        body: &[u8],
    ) -> String {
        let r = self
            .req(
                reqwest::Method::PUT,
                &format!("{}/v2/{repo}/manifests/{reference}", self.base),
            )
            .header("content-type", media_type)
            .body(body.to_vec())
            .send()
            .await
            .expect("PUT manifest");
        assert_eq!(
            r.status().as_u16(),
            201,
            "push manifest: {:?}",
            r.text().await
        );
        sha256(body)
    }
}

/// What [`push_image`] pushed.
pub struct Pushed {
    pub config: Vec<u8>,
    pub layers: Vec<Vec<u8>>,
    pub layer_digests: Vec<String>,
    pub manifest: Vec<u8>,
    pub manifest_digest: String,
    pub index_digest: String,
}

pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";

pub fn host_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    }
}

/// Pushes a small OCI image (config + layers with eStargz-like annotations), tags it
/// `tag`, and tags an index (this platform + a foreign one) as `tag-index`.
pub async fn push_image(p: &Pusher, repo: &str, tag: &str, layers: Vec<Vec<u8>>) -> Pushed {
    let config = format!(
        r#"{{"architecture":"{}","os":"linux","rootfs":{{"type":"layers","diff_ids":[]}},"config":{{}}}}"#,
        host_arch()
    )
    .into_bytes();
    let config_digest = p.blob(repo, &config).await;
    let mut descs = Vec::new();
    let mut layer_digests = Vec::new();
    for (i, l) in layers.iter().enumerate() {
        let d = p.blob(repo, l).await;
        descs.push(format!(
            r#"{{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":"{d}","size":{},"annotations":{{"containerd.io/snapshot/stargz/toc.digest":"sha256:{:064x}","io.containers.estargz.uncompressed-size":"{}"}}}}"#,
            l.len(),
            i + 1,
            l.len() * 2
        ));
        layer_digests.push(d);
    }
    let manifest = format!(
        r#"{{"schemaVersion":2,"mediaType":"{OCI_MANIFEST}","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{config_digest}","size":{}}},"layers":[{}],"annotations":{{"org.example":"yes"}}}}"#,
        config.len(),
        descs.join(",")
    )
    .into_bytes();
    let manifest_digest = p.manifest(repo, tag, OCI_MANIFEST, &manifest).await;
    // A foreign-platform manifest first, so that picking the first entry would be wrong.
    let other_config =
        br#"{"architecture":"s390x","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}"#
            .to_vec();
    let other_config_digest = p.blob(repo, &other_config).await;
    let other = format!(
        r#"{{"schemaVersion":2,"mediaType":"{OCI_MANIFEST}","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{other_config_digest}","size":{}}},"layers":[]}}"#,
        other_config.len()
    )
    .into_bytes();
    let other_digest = p
        .manifest(repo, &format!("{tag}-s390x"), OCI_MANIFEST, &other)
        .await;
    let index = format!(
        r#"{{"schemaVersion":2,"mediaType":"{OCI_INDEX}","manifests":[{{"mediaType":"{OCI_MANIFEST}","digest":"{other_digest}","size":{},"platform":{{"architecture":"s390x","os":"linux"}}}},{{"mediaType":"{OCI_MANIFEST}","digest":"{manifest_digest}","size":{},"platform":{{"architecture":"{}","os":"linux"}}}}]}}"#,
        other.len(),
        manifest.len(),
        host_arch()
    )
    .into_bytes();
    let index_digest = p
        .manifest(repo, &format!("{tag}-index"), OCI_INDEX, &index)
        .await;
    Pushed {
        config,
        layers,
        layer_digests,
        manifest,
        manifest_digest,
        index_digest,
    }
}

pub fn ca_and_server_cert() -> (String, Tls) {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair, SanType};
    let ca_key = KeyPair::generate().expect("ca key");
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("ca params");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "lazysnap test CA");
    let ca = rcgen::CertifiedIssuer::self_signed(ca_params, ca_key).expect("ca cert");
    let key = KeyPair::generate().expect("server key");
    let mut params = CertificateParams::new(vec!["localhost".to_string()]).expect("params");
    params
        .subject_alt_names
        .push(SanType::IpAddress(std::net::IpAddr::from([127, 0, 0, 1])));
    let cert = params.signed_by(&key, &ca).expect("server cert");
    (
        ca.pem(),
        Tls {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        },
    )
}

pub fn write_hosts_toml(certs_dir: &Path, host: &str, content: &str) -> PathBuf {
    let d = certs_dir.join(host);
    std::fs::create_dir_all(&d).expect("certs dir");
    let p = d.join("hosts.toml");
    std::fs::write(&p, content).expect("hosts.toml");
    p
}

pub fn write_docker_config(path: &Path, host: &str, user: &str, password: &str) {
    use base64::Engine as _;
    let auth = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
    std::fs::write(
        path,
        format!(r#"{{"auths":{{"{host}":{{"auth":"{auth}"}}}}}}"#),
    )
    .expect("docker config");
}
