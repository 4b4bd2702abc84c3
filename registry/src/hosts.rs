//! containerd's `hosts.toml` (`<certs.d>/<registry>/hosts.toml`): which hosts serve a
//! registry, in which order, over which scheme, with which CAs and headers.
//!
//! Mirrors (`[host."…"]`, in file order) are tried first, then the origin (`server`).
//! Without a file the origin alone is used: `https://<registry>`, Docker Hub's
//! `https://registry-1.docker.io`, or plain `http://` for loopback registries so that a
//! local test registry works without configuration.

use std::{
    fmt,
    net::IpAddr,
    path::{Path, PathBuf},
};

use reqwest::Url;
use serde::{Deserialize, Deserializer, de::MapAccess};

use crate::{
    error::{Error, Result},
    reference::DOCKER_HUB,
};

/// What a host may be used for (containerd's `capabilities`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capabilities {
    /// Fetch blobs and manifests by digest.
    pub pull: bool,
    /// Resolve tags to digests.
    pub resolve: bool,
    /// Push (unused by this crate, parsed for completeness).
    pub push: bool,
}

impl Capabilities {
    const ALL: Capabilities = Capabilities {
        pull: true,
        resolve: true,
        push: true,
    };
}

/// One host that serves a registry: a mirror or the origin.
#[derive(Clone, PartialEq, Eq)]
pub struct Host {
    /// API root, ending in `/v2` unless `override_path` said otherwise.
    pub base: Url,
    /// What this host may be used for.
    pub capabilities: Capabilities,
    /// Accept any server certificate (containerd's `skip_verify`).
    pub skip_verify: bool,
    /// Extra CA certificates (PEM files) trusted for this host, on top of system roots.
    pub ca: Vec<PathBuf>,
    /// Headers sent with every request to this host.
    pub headers: Vec<(String, String)>,
    /// Whether this is a mirror (not the registry itself); mirrors get `?ns=<registry>`
    /// and their own credentials.
    pub mirror: bool,
}

impl Host {
    /// `host[:port]` of this host, used for credentials, logs and concurrency limits.
    pub fn authority(&self) -> String {
        let host = self.base.host_str().unwrap_or("");
        match self.base.port() {
            Some(p) => format!("{host}:{p}"),
            None => host.to_string(),
        }
    }
}

impl fmt::Debug for Host {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Header values may be secrets (e.g. an Authorization header for a mirror).
        let headers: Vec<&str> = self.headers.iter().map(|(k, _)| k.as_str()).collect();
        f.debug_struct("Host")
            .field("base", &self.base.as_str())
            .field("capabilities", &self.capabilities)
            .field("skip_verify", &self.skip_verify)
            .field("ca", &self.ca)
            .field("header_names", &headers)
            .field("mirror", &self.mirror)
            .finish()
    }
}

/// Whether `registry` (`host[:port]`) names this machine.
pub fn is_loopback(registry: &str) -> bool {
    let host = host_part(registry);
    if host == "localhost" {
        return true;
    }
    host.trim_start_matches('[')
        .trim_end_matches(']')
        .parse::<IpAddr>()
        .map(|ip| ip.is_loopback())
        .unwrap_or(false)
}

fn host_part(registry: &str) -> &str {
    if registry.starts_with('[') {
        match registry.find(']') {
            Some(i) => &registry[..=i],
            None => registry,
        }
    } else {
        registry.split(':').next().unwrap_or(registry)
    }
}

fn default_server(registry: &str) -> String {
    if registry == DOCKER_HUB {
        "https://registry-1.docker.io".to_string()
    } else if is_loopback(registry) {
        format!("http://{registry}")
    } else {
        format!("https://{registry}")
    }
}

#[derive(Deserialize, Default)]
struct HostFields {
    capabilities: Option<Vec<String>>,
    skip_verify: Option<bool>,
    ca: Option<OneOrMany>,
    #[serde(default, deserialize_with = "ordered_map")]
    header: Vec<(String, OneOrMany)>,
    override_path: Option<bool>,
}

#[derive(Deserialize, Default)]
struct HostsFile {
    server: Option<String>,
    #[serde(flatten)]
    fields: HostFields,
    #[serde(default, deserialize_with = "ordered_map")]
    host: Vec<(String, HostFields)>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

impl OneOrMany {
    fn into_vec(self) -> Vec<String> {
        match self {
            OneOrMany::One(s) => vec![s],
            OneOrMany::Many(v) => v,
        }
    }
}

/// Keeps `[host."…"]` tables in file order: that order is the mirror order.
fn ordered_map<'de, D, V>(d: D) -> std::result::Result<Vec<(String, V)>, D::Error>
where
    D: Deserializer<'de>,
    V: Deserialize<'de>,
{
    struct Visitor<V>(std::marker::PhantomData<V>);
    impl<'de, V: Deserialize<'de>> serde::de::Visitor<'de> for Visitor<V> {
        type Value = Vec<(String, V)>;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a table")
        }
        fn visit_map<A: MapAccess<'de>>(
            self,
            mut map: A,
        ) -> std::result::Result<Self::Value, A::Error> {
            let mut out = Vec::new();
            while let Some((k, v)) = map.next_entry::<String, V>()? {
                out.push((k, v));
            }
            Ok(out)
        }
    }
    d.deserialize_map(Visitor(std::marker::PhantomData))
}

/// Where the configuration for `registry` lives: `<certs_dir>/<registry>`, else
/// `<certs_dir>/_default`.
fn host_dir(certs_dir: &Path, registry: &str) -> Option<PathBuf> {
    [registry, "_default"]
        .iter()
        .map(|n| certs_dir.join(n))
        .find(|d| d.is_dir())
}

/// The hosts to try for `registry`, mirrors first, origin last.
pub fn hosts_for(certs_dir: &Path, registry: &str) -> Result<Vec<Host>> {
    let dir = host_dir(certs_dir, registry);
    let file = dir.as_ref().map(|d| d.join("hosts.toml"));
    let parsed = match &file {
        Some(f) if f.is_file() => {
            let text = std::fs::read_to_string(f).map_err(|e| Error::Config {
                path: f.clone(),
                message: e.to_string(),
            })?;
            Some(
                toml::from_str::<HostsFile>(&text).map_err(|e| Error::Config {
                    path: f.clone(),
                    message: e.to_string(),
                })?,
            )
        }
        _ => None,
    };
    let dir = dir.unwrap_or_else(|| certs_dir.join(registry));
    let file = file.unwrap_or_else(|| dir.join("hosts.toml"));
    let Some(parsed) = parsed else {
        // No hosts.toml: the origin, trusting any *.crt in the directory (containerd's
        // older certs.d layout).
        let mut host = make_host(
            &file,
            &dir,
            &default_server(registry),
            HostFields::default(),
            false,
        )?;
        host.ca = crt_files(&dir);
        return Ok(vec![host]);
    };
    let mut hosts = Vec::new();
    for (url, fields) in parsed.host {
        hosts.push(make_host(&file, &dir, &url, fields, true)?);
    }
    let server = parsed.server.unwrap_or_else(|| default_server(registry));
    let mut origin = make_host(&file, &dir, &server, parsed.fields, false)?;
    if origin.ca.is_empty() {
        origin.ca = crt_files(&dir);
    }
    hosts.push(origin);
    Ok(hosts)
}

fn crt_files(dir: &Path) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "crt"))
        .collect();
    out.sort();
    out
}

fn make_host(file: &Path, dir: &Path, url: &str, f: HostFields, mirror: bool) -> Result<Host> {
    let cfg_err = |message: String| Error::Config {
        path: file.to_path_buf(),
        message,
    };
    let with_scheme = if url.contains("://") {
        url.to_string()
    } else {
        let scheme = if is_loopback(url.split('/').next().unwrap_or(url)) {
            "http"
        } else {
            "https"
        };
        format!("{scheme}://{url}")
    };
    let mut base = Url::parse(&with_scheme).map_err(|e| cfg_err(format!("host {url:?}: {e}")))?;
    if !matches!(base.scheme(), "http" | "https") || base.host_str().is_none() {
        return Err(cfg_err(format!(
            "host {url:?}: need an http:// or https:// URL"
        )));
    }
    let path = base.path().trim_end_matches('/').to_string();
    let path = if f.override_path.unwrap_or(false) || path.ends_with("/v2") {
        path
    } else {
        format!("{path}/v2")
    };
    base.set_path(&path);
    base.set_query(None);
    let capabilities = match f.capabilities {
        None => Capabilities::ALL,
        Some(list) => {
            let mut c = Capabilities {
                pull: false,
                resolve: false,
                push: false,
            };
            for cap in list {
                match cap.as_str() {
                    "pull" => c.pull = true,
                    "resolve" => c.resolve = true,
                    "push" => c.push = true,
                    other => {
                        return Err(cfg_err(format!(
                            "host {url:?}: unknown capability {other:?}"
                        )));
                    }
                }
            }
            c
        }
    };
    let ca =
        f.ca.map(OneOrMany::into_vec)
            .unwrap_or_default()
            .into_iter()
            .map(|p| {
                let p = PathBuf::from(p);
                if p.is_absolute() { p } else { dir.join(p) }
            })
            .collect();
    let mut headers = Vec::new();
    for (name, values) in f.header {
        for v in values.into_vec() {
            headers.push((name.clone(), v));
        }
    }
    Ok(Host {
        base,
        capabilities,
        skip_verify: f.skip_verify.unwrap_or(false),
        ca,
        headers,
        mirror,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_without_config() {
        let dir = tempfile::tempdir().unwrap();
        let h = hosts_for(dir.path(), "docker.io").unwrap();
        assert_eq!(h.len(), 1);
        assert_eq!(h[0].base.as_str(), "https://registry-1.docker.io/v2");
        let h = hosts_for(dir.path(), "127.0.0.1:5000").unwrap();
        assert_eq!(h[0].base.as_str(), "http://127.0.0.1:5000/v2");
        assert_eq!(h[0].authority(), "127.0.0.1:5000");
        let h = hosts_for(dir.path(), "localhost:5000").unwrap();
        assert_eq!(h[0].base.scheme(), "http");
        let h = hosts_for(dir.path(), "quay.io").unwrap();
        assert_eq!(h[0].base.as_str(), "https://quay.io/v2");
        assert!(!h[0].mirror);
    }

    #[test]
    fn mirrors_in_file_order_then_origin() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().join("example.com");
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(
            d.join("hosts.toml"),
            r#"
server = "https://example.com"
skip_verify = false

[host."https://zzz-mirror.example.net"]
  capabilities = ["pull"]
  ca = "mirror-ca.pem"
  skip_verify = true
  [host."https://zzz-mirror.example.net".header]
    x-custom = "secret-value"
    x-multi = ["a", "b"]

[host."http://aaa-mirror:8080/custom/api"]
  capabilities = ["pull", "resolve"]
  override_path = true
  ca = ["/abs/ca1.pem", "ca2.pem"]
"#,
        )
        .unwrap();
        let h = hosts_for(dir.path(), "example.com").unwrap();
        assert_eq!(h.len(), 3);
        assert_eq!(h[0].base.as_str(), "https://zzz-mirror.example.net/v2");
        assert!(h[0].mirror && h[0].skip_verify);
        assert_eq!(
            h[0].capabilities,
            Capabilities {
                pull: true,
                resolve: false,
                push: false
            }
        );
        assert_eq!(h[0].ca, vec![d.join("mirror-ca.pem")]);
        assert_eq!(
            h[0].headers,
            vec![
                ("x-custom".to_string(), "secret-value".to_string()),
                ("x-multi".to_string(), "a".to_string()),
                ("x-multi".to_string(), "b".to_string())
            ]
        );
        assert!(!format!("{:?}", h[0]).contains("secret-value"));
        assert_eq!(h[1].base.as_str(), "http://aaa-mirror:8080/custom/api");
        assert_eq!(
            h[1].ca,
            vec![PathBuf::from("/abs/ca1.pem"), d.join("ca2.pem")]
        );
        assert_eq!(h[2].base.as_str(), "https://example.com/v2");
        assert!(!h[2].mirror);
        assert_eq!(h[2].capabilities, Capabilities::ALL);
    }

    #[test]
    fn default_dir_and_errors() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().join("_default");
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join("hosts.toml"), "[host.\"mirror.local\"]\n").unwrap();
        let h = hosts_for(dir.path(), "anything.io").unwrap();
        assert_eq!(h[0].base.as_str(), "https://mirror.local/v2");
        assert_eq!(h[1].base.as_str(), "https://anything.io/v2");
        std::fs::write(
            d.join("hosts.toml"),
            "[host.\"m\"]\ncapabilities = [\"fly\"]\n",
        )
        .unwrap();
        let e = hosts_for(dir.path(), "anything.io").unwrap_err();
        assert!(e.to_string().contains("hosts.toml"), "{e}");
        assert!(e.to_string().contains("fly"), "{e}");
    }
}
