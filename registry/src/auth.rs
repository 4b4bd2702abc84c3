//! Credentials and authentication challenges.
//!
//! Credentials come from Docker's config file (`$DOCKER_CONFIG/config.json` or
//! `~/.docker/config.json`): `credHelpers` first, then `auths` (`auth` =
//! base64 `user:password`, or `identitytoken`, or `registrytoken`), then `credsStore`.
//! Helpers are the `docker-credential-<name>` programs on `PATH`. The file is read
//! each time credentials are needed (only on a 401), so rotated credentials are
//! picked up without a restart.
//!
//! Secrets never reach logs or error messages: [`Credential`]'s `Debug` redacts them.

use std::{
    collections::HashMap,
    fmt,
    path::{Path, PathBuf},
    process::Stdio,
    time::Duration,
};

use base64::Engine as _;
use serde::Deserialize;
use tokio::io::AsyncWriteExt;

use crate::{
    error::{Error, Result},
    reference::DOCKER_HUB,
};

/// The key Docker uses for Docker Hub in `auths` and with credential helpers.
pub const DOCKER_HUB_AUTH_KEY: &str = "https://index.docker.io/v1/";

/// A credential for one registry host.
#[derive(Clone, PartialEq, Eq)]
pub enum Credential {
    /// User name and password, sent as HTTP Basic or exchanged for a token.
    Basic {
        /// User name.
        username: String,
        /// Password or personal access token.
        password: String,
    },
    /// An OAuth2 refresh token (`identitytoken`), exchanged for an access token with
    /// `grant_type=refresh_token`.
    IdentityToken(String),
    /// A registry bearer token used as is (`registrytoken`).
    RegistryToken(String),
}

impl fmt::Debug for Credential {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Credential::Basic { username, .. } => f
                .debug_struct("Basic")
                .field("username", username)
                .field("password", &"<redacted>")
                .finish(),
            Credential::IdentityToken(_) => f.write_str("IdentityToken(<redacted>)"),
            Credential::RegistryToken(_) => f.write_str("RegistryToken(<redacted>)"),
        }
    }
}

/// The Docker config file to read: the override, else `$DOCKER_CONFIG/config.json`,
/// else `$HOME/.docker/config.json`.
pub fn docker_config_path(override_path: Option<&Path>) -> Option<PathBuf> {
    if let Some(p) = override_path {
        return Some(p.to_path_buf());
    }
    if let Some(dir) = std::env::var_os("DOCKER_CONFIG").filter(|d| !d.is_empty()) {
        return Some(PathBuf::from(dir).join("config.json"));
    }
    std::env::var_os("HOME")
        .filter(|h| !h.is_empty())
        .map(|h| PathBuf::from(h).join(".docker").join("config.json"))
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct DockerConfigFile {
    auths: HashMap<String, AuthEntry>,
    #[serde(rename = "credHelpers")]
    cred_helpers: HashMap<String, String>,
    #[serde(rename = "credsStore")]
    creds_store: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct AuthEntry {
    auth: Option<String>,
    username: Option<String>,
    password: Option<String>,
    identitytoken: Option<String>,
    registrytoken: Option<String>,
}

/// `host[:port]` of an `auths` key, which may be a bare host or a URL with a path.
fn normalize_key(key: &str) -> String {
    let k = key
        .strip_prefix("https://")
        .or_else(|| key.strip_prefix("http://"))
        .unwrap_or(key);
    let k = k.split('/').next().unwrap_or(k);
    match k {
        "index.docker.io" | "registry-1.docker.io" => DOCKER_HUB.to_string(),
        other => other.to_string(),
    }
}

/// The server URL a credential helper is asked about.
fn helper_server_url(host: &str) -> String {
    if host == DOCKER_HUB {
        DOCKER_HUB_AUTH_KEY.to_string()
    } else {
        host.to_string()
    }
}

/// Looks up credentials for `host` (`docker.io`, `127.0.0.1:5000`, a mirror's host) in
/// the Docker config at `path`. A missing file means anonymous access.
pub async fn credentials_for(path: Option<&Path>, host: &str) -> Result<Option<Credential>> {
    let Some(path) = path else { return Ok(None) };
    let text = match std::fs::read(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => {
            return Err(Error::Config {
                path: path.to_path_buf(),
                message: e.to_string(),
            });
        }
    };
    let file: DockerConfigFile = serde_json::from_slice(&text).map_err(|e| Error::Config {
        path: path.to_path_buf(),
        message: format!("not a Docker config file: {e}"),
    })?;
    let host = normalize_key(host);
    if let Some(helper) = file
        .cred_helpers
        .iter()
        .find(|(k, _)| normalize_key(k) == host)
        .map(|(_, v)| v.clone())
    {
        return run_helper(&format!("docker-credential-{helper}"), &host).await;
    }
    // Prefer an exact key over a normalised match (`https://host` vs `host`).
    let entry = file.auths.get(&host).or_else(|| {
        file.auths
            .iter()
            .find(|(k, _)| normalize_key(k) == host)
            .map(|(_, v)| v)
    });
    if let Some(entry) = entry
        && let Some(c) = entry_credential(entry, &host)?
    {
        return Ok(Some(c));
    }
    if let Some(store) = file.creds_store.filter(|s| !s.is_empty()) {
        return run_helper(&format!("docker-credential-{store}"), &host).await;
    }
    Ok(None)
}

fn entry_credential(e: &AuthEntry, host: &str) -> Result<Option<Credential>> {
    if let Some(t) = e.identitytoken.as_ref().filter(|t| !t.is_empty()) {
        return Ok(Some(Credential::IdentityToken(t.clone())));
    }
    if let Some(t) = e.registrytoken.as_ref().filter(|t| !t.is_empty()) {
        return Ok(Some(Credential::RegistryToken(t.clone())));
    }
    if let Some(a) = e.auth.as_ref().filter(|a| !a.is_empty()) {
        let bad = |m: &str| Error::Credentials {
            registry: host.to_string(),
            message: format!("the \"auth\" field in the Docker config {m}"),
        };
        let raw = base64::engine::general_purpose::STANDARD
            .decode(a.trim())
            .map_err(|_| bad("is not base64"))?;
        let text = String::from_utf8(raw).map_err(|_| bad("is not UTF-8"))?;
        let (u, p) = text
            .split_once(':')
            .ok_or_else(|| bad("is not user:password"))?;
        return Ok(Some(Credential::Basic {
            username: u.to_string(),
            password: p.to_string(),
        }));
    }
    if let (Some(u), Some(p)) = (&e.username, &e.password) {
        return Ok(Some(Credential::Basic {
            username: u.clone(),
            password: p.clone(),
        }));
    }
    Ok(None)
}

#[derive(Deserialize)]
struct HelperOutput {
    #[serde(rename = "Username")]
    username: String,
    #[serde(rename = "Secret")]
    secret: String,
}

/// Runs `program get` (a Docker credential helper) for `host`.
pub(crate) async fn run_helper(program: &str, host: &str) -> Result<Option<Credential>> {
    let err = |message: String| Error::Credentials {
        registry: host.to_string(),
        message,
    };
    let name = Path::new(program)
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or(program);
    if !name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    {
        return Err(err(format!("invalid credential helper name {name:?}")));
    }
    let mut child = tokio::process::Command::new(program)
        .arg("get")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| err(format!("cannot run {name}: {e}")))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(helper_server_url(host).as_bytes())
            .await
            .map_err(|e| err(format!("{name}: writing request: {e}")))?;
    }
    let out = tokio::time::timeout(Duration::from_secs(30), child.wait_with_output())
        .await
        .map_err(|_| err(format!("{name} did not answer within 30s")))?
        .map_err(|e| err(format!("{name}: {e}")))?;
    if !out.status.success() {
        let text = String::from_utf8_lossy(&out.stdout);
        if text.contains("credentials not found") {
            return Ok(None);
        }
        // The helper's output could echo secrets; report only the status.
        return Err(err(format!("{name} failed ({})", out.status)));
    }
    let parsed: HelperOutput = serde_json::from_slice(&out.stdout).map_err(|_| {
        err(format!(
            "{name} printed something that is not credentials JSON"
        ))
    })?;
    if parsed.username == "<token>" {
        Ok(Some(Credential::IdentityToken(parsed.secret)))
    } else {
        Ok(Some(Credential::Basic {
            username: parsed.username,
            password: parsed.secret,
        }))
    }
}

/// One challenge of a `WWW-Authenticate` header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Challenge {
    /// Lower-cased scheme: `bearer`, `basic`.
    pub(crate) scheme: String,
    /// Parameters with lower-cased names (`realm`, `service`, `scope`).
    pub(crate) params: HashMap<String, String>,
}

/// Parses `WWW-Authenticate` values such as
/// `Bearer realm="https://auth.example/token",service="reg",scope="repository:a:pull"`.
pub(crate) fn parse_challenges(header: &str) -> Vec<Challenge> {
    let mut out: Vec<Challenge> = Vec::new();
    let b = header.as_bytes();
    let mut i = 0;
    let skip_ws = |i: &mut usize| {
        while *i < b.len() && (b[*i] == b' ' || b[*i] == b'\t' || b[*i] == b',') {
            *i += 1;
        }
    };
    let token = |i: &mut usize| {
        let s = *i;
        while *i < b.len() && !matches!(b[*i], b' ' | b'\t' | b',' | b'=') {
            *i += 1;
        }
        header[s..*i].to_string()
    };
    loop {
        skip_ws(&mut i);
        if i >= b.len() {
            break;
        }
        let word = token(&mut i);
        // After a token: '=' means a parameter of the current challenge, else the
        // token was a new scheme.
        let mut j = i;
        while j < b.len() && b[j] == b' ' {
            j += 1;
        }
        if j < b.len() && b[j] == b'=' && !out.is_empty() {
            i = j + 1;
            while i < b.len() && b[i] == b' ' {
                i += 1;
            }
            let value = if i < b.len() && b[i] == b'"' {
                i += 1;
                let mut v = String::new();
                while i < b.len() && b[i] != b'"' {
                    if b[i] == b'\\' && i + 1 < b.len() {
                        i += 1;
                    }
                    // Copy one UTF-8 character.
                    let ch_len = header[i..]
                        .chars()
                        .next()
                        .map(|c| c.len_utf8())
                        .unwrap_or(1);
                    v.push_str(&header[i..i + ch_len]);
                    i += ch_len;
                }
                i += 1;
                v
            } else {
                token(&mut i)
            };
            if let Some(last) = out.last_mut() {
                last.params.insert(word.to_ascii_lowercase(), value);
            }
        } else {
            out.push(Challenge {
                scheme: word.to_ascii_lowercase(),
                params: HashMap::new(),
            });
        }
    }
    out
}

/// The `Authorization` value for HTTP Basic.
pub(crate) fn basic_header(username: &str, password: &str) -> String {
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{username}:{password}"))
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn challenge_parsing() {
        let c = parse_challenges(
            r#"Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/ubuntu:pull""#,
        );
        assert_eq!(c.len(), 1);
        assert_eq!(c[0].scheme, "bearer");
        assert_eq!(c[0].params["realm"], "https://auth.docker.io/token");
        assert_eq!(c[0].params["service"], "registry.docker.io");
        assert_eq!(c[0].params["scope"], "repository:library/ubuntu:pull");
        let c = parse_challenges(r#"Basic realm="x \"q\"", Bearer realm=http://a/t"#);
        assert_eq!(c.len(), 2);
        assert_eq!(c[0].scheme, "basic");
        assert_eq!(c[0].params["realm"], "x \"q\"");
        assert_eq!(c[1].params["realm"], "http://a/t");
    }

    #[test]
    fn debug_redacts() {
        let c = Credential::Basic {
            username: "u".into(),
            password: "hunter2".into(),
        };
        assert!(!format!("{c:?}").contains("hunter2"));
        assert!(!format!("{:?}", Credential::IdentityToken("tok123".into())).contains("tok123"));
    }

    #[tokio::test]
    async fn docker_config_lookup() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("config.json");
        let auth = base64::engine::general_purpose::STANDARD.encode("alice:s3cret");
        std::fs::write(
            &p,
            format!(
                r#"{{"auths": {{
                    "https://index.docker.io/v1/": {{"auth": "{auth}"}},
                    "https://reg.example:5000": {{"identitytoken": "refresh-me"}},
                    "broken.example": {{"auth": "!!!"}}
                }}}}"#
            ),
        )
        .unwrap();
        let c = credentials_for(Some(&p), "docker.io").await.unwrap();
        assert_eq!(
            c,
            Some(Credential::Basic {
                username: "alice".into(),
                password: "s3cret".into()
            })
        );
        let c = credentials_for(Some(&p), "reg.example:5000").await.unwrap();
        assert_eq!(c, Some(Credential::IdentityToken("refresh-me".into())));
        assert_eq!(
            credentials_for(Some(&p), "other.example").await.unwrap(),
            None
        );
        let e = credentials_for(Some(&p), "broken.example")
            .await
            .unwrap_err();
        assert!(e.to_string().contains("broken.example"));
        assert!(!e.to_string().contains("!!!"));
        let missing = dir.path().join("nope.json");
        assert_eq!(
            credentials_for(Some(&missing), "docker.io").await.unwrap(),
            None
        );
    }

    #[tokio::test]
    async fn credential_helpers() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let helper = dir.path().join("docker-credential-fake");
        std::fs::write(
            &helper,
            "#!/bin/sh\nread url\nif [ \"$url\" = \"reg.example\" ]; then\n  echo '{\"ServerURL\":\"reg.example\",\"Username\":\"bob\",\"Secret\":\"pw\"}'\nelif [ \"$url\" = \"https://index.docker.io/v1/\" ]; then\n  echo '{\"ServerURL\":\"x\",\"Username\":\"<token>\",\"Secret\":\"idtok\"}'\nelse\n  echo 'credentials not found in native keychain'; exit 1\nfi\n",
        )
        .unwrap();
        std::fs::set_permissions(&helper, std::fs::Permissions::from_mode(0o755)).unwrap();
        let prog = helper.to_str().unwrap();
        assert_eq!(
            run_helper(prog, "reg.example").await.unwrap(),
            Some(Credential::Basic {
                username: "bob".into(),
                password: "pw".into()
            })
        );
        assert_eq!(
            run_helper(prog, "docker.io").await.unwrap(),
            Some(Credential::IdentityToken("idtok".into()))
        );
        assert_eq!(run_helper(prog, "unknown.example").await.unwrap(), None);
        let e = run_helper("docker-credential-does-not-exist-xyz", "r")
            .await
            .unwrap_err();
        assert!(
            e.to_string()
                .contains("docker-credential-does-not-exist-xyz")
        );
    }
}
