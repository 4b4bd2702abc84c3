//! The deployment files under `docker/`, checked against the daemon itself since no
//! Docker engine or systemd runs here: the sample configuration is exactly the
//! defaults and names every key; the compose file, the systemd unit and the
//! Dockerfile agree with the default socket, root, config path and binary path; the
//! containerd snippets parse, load in containerd (`config dump`) and point at the
//! default socket.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

use lazysnap::service::Config;
use lazysnap::service::config::DEFAULT_CONFIG;

/// Where the Dockerfile installs the binary; the unit file must start the same one.
const BINARY: &str = "/usr/local/bin/lazysnap";

fn docker(file: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("docker")
        .join(file)
}

fn read(file: &str) -> String {
    std::fs::read_to_string(docker(file)).unwrap_or_else(|e| panic!("docker/{file}: {e}"))
}

/// Dotted key paths of a JSON object (`layer.prefetch`); nulls (keys without a
/// default value) count.
fn key_paths(v: &serde_json::Value, prefix: &str, out: &mut BTreeSet<String>) {
    if let serde_json::Value::Object(m) = v {
        for (k, v) in m {
            let path = if prefix.is_empty() {
                k.clone()
            } else {
                format!("{prefix}.{k}")
            };
            if v.is_object() {
                key_paths(v, &path, out);
            } else {
                out.insert(path);
            }
        }
    }
}

/// The keys a TOML text sets or shows commented out (`# key = value`), with the
/// line before each: (dotted key, preceding line).
fn documented_keys(text: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut section = String::new();
    let mut prev = "";
    for line in text.lines() {
        let t = line.trim();
        if let Some(name) = t.strip_prefix('[').and_then(|s| s.strip_suffix(']')) {
            section = name.to_string();
        } else if let Some((key, _)) = t.trim_start_matches("# ").split_once(" = ")
            && !key.is_empty()
            && key.chars().all(|c| c.is_ascii_lowercase() || c == '_')
        {
            let path = if section.is_empty() {
                key.to_string()
            } else {
                format!("{section}.{key}")
            };
            out.insert(path, prev.to_string());
        }
        prev = t;
    }
    out
}

#[test]
fn sample_config_is_every_key_with_its_default() {
    let text = read("config.toml");
    let parsed = Config::parse(&text, "docker/config.toml").expect("docker/config.toml parses");
    let default = serde_json::to_value(Config::default()).unwrap();
    assert_eq!(
        serde_json::to_value(&parsed).unwrap(),
        default,
        "docker/config.toml must hold exactly the defaults"
    );
    let mut want = BTreeSet::new();
    key_paths(&default, "", &mut want);
    let documented = documented_keys(&text);
    let have: BTreeSet<String> = documented.keys().cloned().collect();
    assert_eq!(
        have, want,
        "docker/config.toml must name every key of the daemon's configuration"
    );
    for (key, before) in &documented {
        assert!(
            before.starts_with('#') && !before.contains(" = "),
            "{key}: needs a comment line above it, found {before:?}"
        );
    }
    // the keys without a default show the value the daemon derives
    let c = Config::default();
    assert!(text.contains(&format!(
        "# status_socket = \"{}\"",
        c.status_socket().display()
    )));
    assert!(text.contains(&format!(
        "# dir = \"{}\"",
        c.cache_config().dir.unwrap().display()
    )));
}

fn yaml(file: &str) -> serde_yaml::Value {
    serde_yaml::from_str(&read(file)).unwrap_or_else(|e| panic!("docker/{file}: {e}"))
}

/// A service's bind mounts: target → (source, propagation).
fn binds(service: &serde_yaml::Value) -> BTreeMap<String, (String, String)> {
    let mut out = BTreeMap::new();
    for v in service["volumes"].as_sequence().expect("volumes") {
        if let Some(short) = v.as_str() {
            let parts: Vec<&str> = short.split(':').collect();
            if parts.len() >= 2 && parts[0].starts_with(['.', '/']) {
                out.insert(parts[1].to_string(), (parts[0].to_string(), String::new()));
            }
        } else if v["type"].as_str() == Some("bind") {
            out.insert(
                v["target"].as_str().expect("target").to_string(),
                (
                    v["source"].as_str().expect("source").to_string(),
                    v["bind"]["propagation"]
                        .as_str()
                        .unwrap_or_default()
                        .to_string(),
                ),
            );
        }
    }
    out
}

/// The strings of a YAML sequence (empty when it is none).
fn strings(v: &serde_yaml::Value) -> Vec<&str> {
    v.as_sequence()
        .into_iter()
        .flatten()
        .filter_map(|d| d.as_str())
        .collect()
}

/// The build stages (`FROM image AS name`) of the Dockerfile: name → image.
fn stages(dockerfile: &str) -> BTreeMap<String, String> {
    dockerfile
        .lines()
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            (w.next()? == "FROM").then_some(())?;
            let image = w.next()?.to_string();
            (w.next()?.eq_ignore_ascii_case("as")).then_some(())?;
            Some((w.next()?.to_string(), image))
        })
        .collect()
}

#[test]
fn compose_and_dockerfile_match_the_daemon_defaults() {
    let c = Config::default();
    let root = c.root.display().to_string();
    let run_dir = c.socket.parent().unwrap().display().to_string();
    let compose = yaml("compose.yaml");
    let services = &compose["services"];
    for s in ["registry", "lazysnap", "containerd"] {
        assert!(services[s].is_mapping(), "service {s} missing");
    }

    let dockerfile = read("Dockerfile");
    let st = stages(&dockerfile);
    assert!(
        st.get("build")
            .is_some_and(|i| i.starts_with("rust:") && i.contains("bookworm")),
        "{st:?}"
    );
    assert_eq!(
        st.get("lazysnap").map(String::as_str),
        Some("debian:bookworm-slim")
    );
    assert_eq!(
        st.get("containerd").map(String::as_str),
        Some("debian:bookworm-slim")
    );
    assert!(dockerfile.contains("protobuf-compiler"));
    assert!(dockerfile.contains("fuse3") && dockerfile.contains("ca-certificates"));
    assert!(dockerfile.contains(&format!(
        "install -s -m 0755 target/release/lazysnap {BINARY}"
    )));
    assert!(dockerfile.contains(&format!("COPY --from=build {BINARY} {BINARY}")));
    assert!(dockerfile.contains(&format!("COPY docker/config.toml {DEFAULT_CONFIG}")));
    // the final stage is the daemon image (the default target)
    let last = dockerfile
        .lines()
        .rfind(|l| l.starts_with("FROM "))
        .unwrap();
    assert!(last.ends_with(" AS lazysnap"), "{last}");

    for (name, s) in [
        ("lazysnap", &services["lazysnap"]),
        ("containerd", &services["containerd"]),
    ] {
        let b = &s["build"];
        assert_eq!(b["context"].as_str(), Some(".."), "{name}");
        assert_eq!(
            b["dockerfile"].as_str(),
            Some("docker/Dockerfile"),
            "{name}"
        );
        assert!(
            st.contains_key(b["target"].as_str().unwrap_or("")),
            "{name}: unknown target"
        );
        assert_eq!(s["privileged"].as_bool(), Some(true), "{name}");
        let m = binds(s);
        for dir in [&root, &run_dir] {
            assert_eq!(
                m.get(dir.as_str()),
                Some(&(dir.clone(), "rshared".to_string())),
                "{name}: {dir} must be a shared bind of the host's {dir}"
            );
        }
        // configuration files the service mounts exist next to the compose file
        for (target, (source, _)) in &m {
            if source.starts_with("./") {
                assert!(docker(source).is_file(), "{name}: {source} for {target}");
            }
        }
        assert_eq!(
            m.get(DEFAULT_CONFIG).map(|s| s.0.as_str()),
            Some("./config.toml"),
            "{name}: the sample config at {DEFAULT_CONFIG}"
        );
    }

    let l = &services["lazysnap"];
    let devices = strings(&l["devices"]);
    assert!(
        devices.iter().any(|d| d.starts_with("/dev/fuse")),
        "{devices:?}"
    );
    assert_eq!(
        strings(&l["command"]),
        ["serve", "--config", DEFAULT_CONFIG]
    );
    let health = strings(&l["healthcheck"]["test"]);
    assert!(health.contains(&c.socket.to_str().unwrap()), "{health:?}");

    // containerd loads the proxy-mode snippet, which dials the default socket
    let cd = binds(&services["containerd"]);
    assert_eq!(
        cd.get("/etc/containerd/config.toml").map(|s| s.0.as_str()),
        Some("./containerd/config.toml")
    );
    assert!(
        services["containerd"]["depends_on"]["lazysnap"]["condition"].as_str()
            == Some("service_healthy"),
        "containerd must start after lazysnap is up"
    );

    // the registry listens on loopback (plain HTTP for the registry client) at the
    // address the compose file's usage lines pull from
    let addr = services["registry"]["environment"]["REGISTRY_HTTP_ADDR"]
        .as_str()
        .expect("REGISTRY_HTTP_ADDR");
    let sock: std::net::SocketAddr = addr.parse().expect("registry address");
    assert!(sock.ip().is_loopback(), "{addr}");
    assert!(
        read("compose.yaml").contains(&format!("lazysnap pull localhost:{}/", sock.port())),
        "usage must pull from the registry's port {}",
        sock.port()
    );
}

#[test]
fn systemd_unit_matches_the_daemon_defaults() {
    let c = Config::default();
    let mut unit: BTreeMap<(String, String), Vec<String>> = BTreeMap::new();
    let mut section = String::new();
    for line in read("lazysnap.service").lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        if let Some(s) = line.strip_prefix('[').and_then(|s| s.strip_suffix(']')) {
            section = s.to_string();
            continue;
        }
        let (k, v) = line
            .split_once('=')
            .unwrap_or_else(|| panic!("bad line {line:?}"));
        unit.entry((section.clone(), k.to_string()))
            .or_default()
            .push(v.to_string());
    }
    let get = |s: &str, k: &str| -> Vec<String> {
        unit.get(&(s.to_string(), k.to_string()))
            .cloned()
            .unwrap_or_default()
    };
    assert!(
        get("Unit", "Before")
            .iter()
            .any(|v| v.split_whitespace().any(|u| u == "containerd.service")),
        "lazysnap must start before containerd"
    );
    assert_eq!(get("Service", "Restart"), ["on-failure"]);
    let exec = get("Service", "ExecStart");
    assert_eq!(exec.len(), 1);
    let argv: Vec<&str> = exec[0].split_whitespace().collect();
    assert_eq!(argv, [BINARY, "serve", "--config", DEFAULT_CONFIG]);
    assert_eq!(
        get("Service", "RuntimeDirectory")
            .iter()
            .map(|d| Path::new("/run").join(d))
            .collect::<Vec<_>>(),
        [c.socket.parent().unwrap()],
        "RuntimeDirectory must hold the default socket"
    );
    assert_eq!(
        get("Service", "StateDirectory")
            .iter()
            .map(|d| Path::new("/var/lib").join(d))
            .collect::<Vec<_>>(),
        [c.root.as_path()],
        "StateDirectory must be the default root"
    );
    assert_eq!(get("Install", "WantedBy"), ["multi-user.target"]);
}

#[test]
fn containerd_snippets_parse_and_dial_the_default_socket() {
    let socket = Config::default().socket.display().to_string();
    for file in ["containerd/config.toml", "containerd/cri.toml"] {
        let t: toml::Table = toml::from_str(&read(file)).unwrap_or_else(|e| panic!("{file}: {e}"));
        assert_eq!(t["version"].as_integer(), Some(2), "{file}");
        let p = &t["proxy_plugins"]["lazysnap"];
        assert_eq!(p["type"].as_str(), Some("snapshot"), "{file}");
        assert_eq!(p["address"].as_str(), Some(socket.as_str()), "{file}");
    }
    let cri: toml::Table = toml::from_str(&read("containerd/cri.toml")).unwrap();
    let c = &cri["plugins"]["io.containerd.grpc.v1.cri"]["containerd"];
    assert_eq!(c["snapshotter"].as_str(), Some("lazysnap"));
    assert_eq!(c["disable_snapshot_annotations"].as_bool(), Some(false));

    // containerd itself reads them: `config dump` shows the merged settings
    if !support::require(&["/usr/bin/containerd"], "containerd config dump") {
        return;
    }
    for file in ["containerd/config.toml", "containerd/cri.toml"] {
        let out = Command::new("/usr/bin/containerd")
            .arg("--config")
            .arg(docker(file))
            .args(["config", "dump"])
            .output()
            .expect("containerd config dump");
        let dump = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{file}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(dump.contains("[proxy_plugins.lazysnap]"), "{file}: {dump}");
        assert!(
            dump.contains(&format!("address = \"{socket}\"")),
            "{file}: {dump}"
        );
        if file.ends_with("cri.toml") {
            // containerd 1.6 defaults to true: false here proves the snippet applied
            assert!(
                dump.contains("disable_snapshot_annotations = false"),
                "{dump}"
            );
            assert!(dump.contains("snapshotter = \"lazysnap\""), "{dump}");
        }
    }
}
