//! The daemon's configuration file (`/etc/lazysnap/config.toml`). Every key is
//! optional; unknown keys are rejected so that a typo never silently does nothing.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::cache::CacheConfig;
use crate::error::{Error, Result};
use crate::layer::LayerConfig;

/// Where the daemon looks for its configuration when none is named.
pub const DEFAULT_CONFIG: &str = "/etc/lazysnap/config.toml";

/// The daemon configuration.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// The gRPC socket containerd's `[proxy_plugins.lazysnap]` dials.
    pub socket: PathBuf,
    /// The status socket `lazysnap status` queries; defaults to `<socket>` with the
    /// extension `status.sock` (e.g. `/run/lazysnap/lazysnap.status.sock`).
    pub status_socket: Option<PathBuf>,
    /// Root directory: `metadata.db`, `snapshots/`, `cache/`.
    pub root: PathBuf,
    /// Loopback address for the Prometheus endpoint (`/metrics`, `/status`); none by default.
    pub metrics_address: Option<SocketAddr>,
    /// How remote layers fetch (the lazy layer's settings).
    pub layer: LayerConfig,
    /// The chunk cache; its directory defaults to `<root>/cache`.
    pub cache: CacheConfig,
    /// Registry client: certs.d hosts, timeouts, retries.
    pub registry: lazysnap_registry::RegistryConfig,
    /// FUSE mounts of remote layers.
    pub fuse: FuseConfig,
    /// Mount eStargz / zstd:chunked layers lazily; `false` makes every Prepare an
    /// ordinary one (containerd then pulls and unpacks as with overlayfs).
    pub lazy: bool,
    /// When remote layers become plain directories on their own (`[unlazy]`).
    pub unlazy: crate::snapshot::UnlazyPolicy,
}

/// FUSE settings (`[fuse]`).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct FuseConfig {
    /// Kernel-facing threads per mounted layer.
    pub threads: usize,
    /// How long the kernel caches names, in milliseconds.
    pub entry_timeout_ms: u64,
    /// How long the kernel caches attributes, in milliseconds.
    pub attr_timeout_ms: u64,
    /// Let the kernel read fully cached files directly (Linux 6.9+ FUSE passthrough).
    pub passthrough: bool,
    /// Keep remote layers mounted, and their FUSE connections open in the fd holder
    /// (`<root>/fdstore.sock`), when the daemon stops, crashes or is replaced; the next
    /// daemon serves them again, so running containers keep reading. `false`: stop
    /// unmounts them, and a crash leaves them broken.
    pub keep_mounts_on_exit: bool,
}

impl Default for FuseConfig {
    fn default() -> Self {
        FuseConfig {
            threads: 4,
            entry_timeout_ms: 1000,
            attr_timeout_ms: 1000,
            passthrough: true,
            keep_mounts_on_exit: true,
        }
    }
}

impl FuseConfig {
    /// The mount options these settings give.
    pub fn mount_options(&self) -> lazysnap_fuse::MountOptions {
        lazysnap_fuse::MountOptions {
            threads: self.threads,
            entry_timeout: std::time::Duration::from_millis(self.entry_timeout_ms),
            attr_timeout: std::time::Duration::from_millis(self.attr_timeout_ms),
            passthrough: self.passthrough,
            ..lazysnap_fuse::MountOptions::default()
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            socket: PathBuf::from("/run/lazysnap/lazysnap.sock"),
            status_socket: None,
            root: PathBuf::from("/var/lib/lazysnap"),
            metrics_address: None,
            layer: LayerConfig::default(),
            cache: CacheConfig::default(),
            registry: lazysnap_registry::RegistryConfig::default(),
            fuse: FuseConfig::default(),
            lazy: true,
            unlazy: crate::snapshot::UnlazyPolicy::default(),
        }
    }
}

impl Config {
    /// Parses and validates TOML text; `origin` names it in errors.
    pub fn parse(text: &str, origin: &str) -> Result<Config> {
        let cfg: Config =
            toml::from_str(text).map_err(|e| Error::InvalidArgument(format!("{origin}: {e}")))?;
        cfg.validate()
            .map_err(|e| Error::InvalidArgument(format!("{origin}: {e}")))?;
        Ok(cfg)
    }

    /// Loads `path`; with no path, the default file if it exists, else the defaults.
    pub fn load(path: Option<&Path>) -> Result<Config> {
        let path = match path {
            Some(p) => p.to_path_buf(),
            None if Path::new(DEFAULT_CONFIG).exists() => PathBuf::from(DEFAULT_CONFIG),
            None => return Ok(Config::default()),
        };
        let text = std::fs::read_to_string(&path)
            .map_err(|e| Error::io(format!("reading config {}", path.display()), e))?;
        Config::parse(&text, &path.display().to_string())
    }

    /// The chunk cache settings with the directory defaulted under the root.
    pub fn cache_config(&self) -> CacheConfig {
        let mut c = self.cache.clone();
        if c.dir.is_none() {
            c.dir = Some(self.root.join("cache"));
        }
        c
    }

    /// The status socket path.
    pub fn status_socket(&self) -> PathBuf {
        self.status_socket
            .clone()
            .unwrap_or_else(|| self.socket.with_extension("status.sock"))
    }

    /// Checks values that parse but cannot work.
    pub fn validate(&self) -> std::result::Result<(), String> {
        for (name, p) in [("socket", &self.socket), ("root", &self.root)] {
            if !p.is_absolute() {
                return Err(format!(
                    "{name} = {:?}: must be an absolute path",
                    p.display()
                ));
            }
        }
        if let Some(p) = &self.status_socket
            && !p.is_absolute()
        {
            return Err(format!(
                "status_socket = {:?}: must be an absolute path",
                p.display()
            ));
        }
        self.unlazy.validate().map_err(|e| e.to_string())?;
        if self.status_socket() == self.socket {
            return Err("status_socket must differ from socket".into());
        }
        // sun_path holds 108 bytes including the NUL.
        for p in [&self.socket, &self.status_socket()] {
            if p.as_os_str().len() > 107 {
                return Err(format!(
                    "{:?}: unix socket paths are limited to 107 bytes",
                    p.display()
                ));
            }
        }
        if let Some(a) = &self.metrics_address
            && !a.ip().is_loopback()
        {
            return Err(format!(
                "metrics_address = \"{a}\": must be a loopback address (127.0.0.1 or ::1)"
            ));
        }
        if let Some(dir) = &self.cache.dir
            && !dir.is_absolute()
        {
            return Err(format!(
                "cache.dir = {:?}: must be an absolute path",
                dir.display()
            ));
        }
        if self.fuse.threads == 0 || self.fuse.threads > 64 {
            return Err(format!(
                "fuse.threads = {}: must be 1..=64",
                self.fuse.threads
            ));
        }
        if self.layer.max_fetch_span == 0 || self.layer.background_span == 0 {
            return Err("layer.max_fetch_span and layer.background_span must be > 0".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_validation() {
        let c = Config::parse("", "t").unwrap();
        assert_eq!(c.socket, Path::new("/run/lazysnap/lazysnap.sock"));
        assert_eq!(c.root, Path::new("/var/lib/lazysnap"));
        assert_eq!(
            c.status_socket(),
            Path::new("/run/lazysnap/lazysnap.status.sock")
        );
        assert!(c.metrics_address.is_none());
        let c = Config::parse(
            "socket = \"/tmp/x.sock\"\nmetrics_address = \"127.0.0.1:9100\"\n[layer]\nprefetch = false\n[cache]\nmemory_limit = 1024\n",
            "t",
        )
        .unwrap();
        assert_eq!(c.metrics_address.unwrap().port(), 9100);
        assert!(!c.layer.prefetch);
        assert!(Config::default().fuse.keep_mounts_on_exit);
        let c = Config::parse("[fuse]\nkeep_mounts_on_exit = false\n", "t").unwrap();
        assert!(!c.fuse.keep_mounts_on_exit);
        for (bad, needle) in [
            ("sockett = \"/x\"", "unknown field"),
            ("socket = \"rel\"", "absolute"),
            ("metrics_address = \"0.0.0.0:9100\"", "loopback"),
            ("metrics_address = \"nonsense\"", "metrics_address"),
            ("[layer]\nbogus = 1", "unknown field"),
            ("[cache]\ndir = \"rel\"", "cache.dir"),
        ] {
            let e = Config::parse(bad, "cfg.toml").unwrap_err().to_string();
            assert!(e.contains(needle) && e.contains("cfg.toml"), "{bad}: {e}");
        }
    }
}
