//! Image references and content digests, as users type them.
//!
//! Parsing follows Docker's normalisation (`distribution/reference`): a first path
//! component is a registry host only if it contains `.` or `:` or is `localhost`;
//! otherwise the image lives on Docker Hub, and single-component Hub names get the
//! `library/` prefix. A reference without tag or digest means `:latest`.

use std::{fmt, str::FromStr};

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use sha2::{Digest as _, Sha256, Sha512};

use crate::error::{Error, Result};

/// The registry name Docker Hub images normalise to.
pub const DOCKER_HUB: &str = "docker.io";

/// A content digest such as `sha256:e3b0…`. Only `sha256` and `sha512` are accepted,
/// because those are the only algorithms the bytes can be verified with.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest(String);

impl Digest {
    /// Parses and validates `algorithm:hex`.
    pub fn parse(s: &str) -> Result<Self> {
        let bad = |reason: &str| Error::InvalidDigest {
            input: s.to_string(),
            reason: reason.to_string(),
        };
        let (alg, hex) = s
            .split_once(':')
            .ok_or_else(|| bad("expected algorithm:hex"))?;
        let want = match alg {
            "sha256" => 64,
            "sha512" => 128,
            _ => return Err(bad("unsupported algorithm (only sha256 and sha512)")),
        };
        if hex.len() != want {
            return Err(bad("wrong length for algorithm"));
        }
        if !hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
            return Err(bad("hex part must be lowercase hexadecimal"));
        }
        Ok(Digest(s.to_string()))
    }

    /// The sha256 digest of `data`.
    pub fn sha256_of(data: &[u8]) -> Self {
        Digest(format!("sha256:{}", hex::encode(Sha256::digest(data))))
    }

    /// The algorithm part (`sha256`).
    pub fn algorithm(&self) -> &str {
        self.0.split_once(':').map(|(a, _)| a).unwrap_or("")
    }

    /// The hex part.
    pub fn hex(&self) -> &str {
        self.0.split_once(':').map(|(_, h)| h).unwrap_or("")
    }

    /// The full `algorithm:hex` text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Whether `data` hashes to this digest.
    pub fn matches(&self, data: &[u8]) -> bool {
        let got = match self.algorithm() {
            "sha256" => hex::encode(Sha256::digest(data)),
            "sha512" => hex::encode(Sha512::digest(data)),
            _ => return false,
        };
        got == self.hex()
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Digest({})", self.0)
    }
}

impl FromStr for Digest {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        Digest::parse(s)
    }
}

impl Serialize for Digest {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for Digest {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Digest::parse(&s).map_err(serde::de::Error::custom)
    }
}

/// A parsed image reference: registry, repository, and a tag and/or digest.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Reference {
    registry: String,
    repository: String,
    tag: Option<String>,
    digest: Option<Digest>,
}

impl Reference {
    /// Parses any form users type: `ubuntu`, `ubuntu:22.04`, `user/app`,
    /// `docker.io/library/ubuntu:22.04`, `host:5000/a/b:tag`, `name@sha256:…`,
    /// `name:tag@sha256:…`, `[::1]:5000/a`.
    pub fn parse(input: &str) -> Result<Self> {
        let bad = |reason: &str| Error::InvalidReference {
            input: input.to_string(),
            reason: reason.to_string(),
        };
        if input.is_empty() {
            return Err(bad("empty"));
        }
        if input.len() > 4096 {
            return Err(bad("too long"));
        }
        let (rest, digest) = match input.split_once('@') {
            Some((r, d)) => (r, Some(Digest::parse(d)?)),
            None => (input, None),
        };
        // The tag is after the last ':' that follows the last '/' (a ':' before it
        // belongs to a registry port).
        let last_slash = rest.rfind('/').map(|i| i + 1).unwrap_or(0);
        let (name, tag) = match rest[last_slash..].rfind(':') {
            Some(i) => {
                let i = last_slash + i;
                (&rest[..i], Some(&rest[i + 1..]))
            }
            None => (rest, None),
        };
        if let Some(t) = tag {
            validate_tag(t).map_err(bad)?;
        }
        let (registry, path) = match name.split_once('/') {
            Some((first, remainder))
                if first.contains('.')
                    || first.contains(':')
                    || first == "localhost"
                    || first.starts_with('[')
                    || first.chars().any(|c| c.is_ascii_uppercase()) =>
            {
                (first.to_string(), remainder.to_string())
            }
            _ => (DOCKER_HUB.to_string(), name.to_string()),
        };
        validate_registry(&registry).map_err(bad)?;
        let registry = if registry == "index.docker.io" || registry == "registry-1.docker.io" {
            DOCKER_HUB.to_string()
        } else {
            registry
        };
        let repository = if registry == DOCKER_HUB && !path.contains('/') {
            format!("library/{path}")
        } else {
            path
        };
        validate_repository(&repository).map_err(bad)?;
        let tag = match (tag, &digest) {
            (Some(t), _) => Some(t.to_string()),
            (None, None) => Some("latest".to_string()),
            (None, Some(_)) => None,
        };
        Ok(Reference {
            registry,
            repository,
            tag,
            digest,
        })
    }

    /// Registry host (and port) as named: `docker.io`, `127.0.0.1:5000`.
    pub fn registry(&self) -> &str {
        &self.registry
    }

    /// Repository path: `library/ubuntu`, `a/b`.
    pub fn repository(&self) -> &str {
        &self.repository
    }

    /// The tag, if any (`latest` when neither tag nor digest was given).
    pub fn tag(&self) -> Option<&str> {
        self.tag.as_deref()
    }

    /// The digest, if the reference pins one.
    pub fn digest(&self) -> Option<&Digest> {
        self.digest.as_ref()
    }

    /// The same repository pinned to `digest` (the tag is kept for display).
    pub fn with_digest(&self, digest: Digest) -> Reference {
        Reference {
            digest: Some(digest),
            ..self.clone()
        }
    }

    /// The same repository at another tag.
    pub fn with_tag(&self, tag: &str) -> Result<Reference> {
        validate_tag(tag).map_err(|reason| Error::InvalidReference {
            input: tag.to_string(),
            reason: reason.to_string(),
        })?;
        Ok(Reference {
            tag: Some(tag.to_string()),
            digest: None,
            ..self.clone()
        })
    }

    /// What to put after `/manifests/`: the digest when pinned, else the tag.
    pub fn manifest_ref(&self) -> &str {
        match (&self.digest, &self.tag) {
            (Some(d), _) => d.as_str(),
            (None, Some(t)) => t,
            (None, None) => "latest",
        }
    }
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.registry, self.repository)?;
        if let Some(t) = &self.tag {
            write!(f, ":{t}")?;
        }
        if let Some(d) = &self.digest {
            write!(f, "@{d}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Reference({self})")
    }
}

impl FromStr for Reference {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        Reference::parse(s)
    }
}

fn validate_tag(tag: &str) -> std::result::Result<(), &'static str> {
    let mut chars = tag.chars();
    match chars.next() {
        Some(c) if c.is_ascii_alphanumeric() || c == '_' => {}
        _ => return Err("tag must start with a letter, digit or '_'"),
    }
    if tag.len() > 128 {
        return Err("tag longer than 128 characters");
    }
    if !chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-')) {
        return Err("tag may contain only letters, digits, '_', '.' and '-'");
    }
    Ok(())
}

fn validate_registry(host: &str) -> std::result::Result<(), &'static str> {
    if host.is_empty() {
        return Err("empty registry host");
    }
    let (h, port) = if let Some(rest) = host.strip_prefix('[') {
        let (inner, after) = rest.split_once(']').ok_or("unterminated '[' in registry")?;
        if inner.parse::<std::net::Ipv6Addr>().is_err() {
            return Err("invalid IPv6 address in registry");
        }
        (None, after.strip_prefix(':'))
    } else {
        match host.split_once(':') {
            Some((h, p)) => (Some(h), Some(p)),
            None => (Some(host), None),
        }
    };
    if let Some(h) = h
        && (h.is_empty()
            || !h
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '.' || c == '-'))
    {
        return Err("invalid registry host name");
    }
    if let Some(p) = port
        && p.parse::<u16>().is_err()
    {
        return Err("invalid registry port");
    }
    Ok(())
}

fn validate_repository(repo: &str) -> std::result::Result<(), &'static str> {
    if repo.is_empty() {
        return Err("empty repository name");
    }
    if repo.len() > 255 {
        return Err("repository name longer than 255 characters");
    }
    for comp in repo.split('/') {
        if comp.is_empty() {
            return Err("empty path component in repository");
        }
        let b = comp.as_bytes();
        let alnum = |c: u8| c.is_ascii_lowercase() || c.is_ascii_digit();
        if !alnum(b[0]) || !alnum(b[b.len() - 1]) {
            return Err(
                "repository components must start and end with a lowercase letter or digit",
            );
        }
        // Separators: '.', '_', '__', or runs of '-'.
        let mut i = 0;
        while i < b.len() {
            let c = b[i];
            if alnum(c) {
                i += 1;
                continue;
            }
            let start = i;
            while i < b.len() && !alnum(b[i]) {
                i += 1;
            }
            let sep = &comp[start..i];
            let ok = sep == "." || sep == "_" || sep == "__" || sep.bytes().all(|c| c == b'-');
            if !ok {
                return Err("repository may contain only lowercase letters, digits and separators");
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: &str = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    fn p(s: &str) -> Reference {
        match Reference::parse(s) {
            Ok(r) => r,
            Err(e) => panic!("{s}: {e}"),
        }
    }

    #[test]
    fn docker_hub_defaults() {
        let r = p("ubuntu");
        assert_eq!(r.registry(), "docker.io");
        assert_eq!(r.repository(), "library/ubuntu");
        assert_eq!(r.tag(), Some("latest"));
        assert_eq!(r.to_string(), "docker.io/library/ubuntu:latest");
        let r = p("user/app:1.0");
        assert_eq!(r.repository(), "user/app");
        assert_eq!(r.tag(), Some("1.0"));
        let r = p("docker.io/library/ubuntu:22.04");
        assert_eq!(
            (r.registry(), r.repository(), r.tag()),
            ("docker.io", "library/ubuntu", Some("22.04"))
        );
        let r = p("index.docker.io/ubuntu");
        assert_eq!(
            (r.registry(), r.repository()),
            ("docker.io", "library/ubuntu")
        );
    }

    #[test]
    fn hosts_ports_and_digests() {
        let r = p("host:5000/a/b:tag");
        assert_eq!(
            (r.registry(), r.repository(), r.tag()),
            ("host:5000", "a/b", Some("tag"))
        );
        let r = p("host:5000/a/b");
        assert_eq!(r.tag(), Some("latest"));
        let r = p(&format!("localhost/x@{D}"));
        assert_eq!(r.registry(), "localhost");
        assert_eq!(r.tag(), None);
        assert_eq!(r.digest().map(|d| d.as_str()), Some(D));
        assert_eq!(r.manifest_ref(), D);
        let r = p(&format!("127.0.0.1:5000/a/b:v1@{D}"));
        assert_eq!(r.tag(), Some("v1"));
        assert_eq!(r.manifest_ref(), D);
        assert_eq!(r.to_string(), format!("127.0.0.1:5000/a/b:v1@{D}"));
        let r = p("[::1]:5000/a:t");
        assert_eq!(r.registry(), "[::1]:5000");
        let r = p("ghcr.io/o/r/deep/path:t");
        assert_eq!(r.repository(), "o/r/deep/path");
    }

    #[test]
    fn rejects_bad_input() {
        for s in [
            "",
            "UPPER",
            "a//b",
            "a:",
            "a:-tag",
            "host:port/a",
            "a@sha256:xyz",
            "a@md5:0123",
            "-a",
            "a..b",
            "host:5000/a/B",
        ] {
            assert!(Reference::parse(s).is_err(), "{s} should be rejected");
        }
    }

    #[test]
    fn digest_checks() {
        let d = Digest::sha256_of(b"hello");
        assert!(d.matches(b"hello"));
        assert!(!d.matches(b"hellO"));
        assert_eq!(d.algorithm(), "sha256");
        assert!(Digest::parse(&D.to_uppercase()).is_err());
        assert!(Digest::parse("sha256:abc").is_err());
    }
}
