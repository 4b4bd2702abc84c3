//! Client configuration, embeddable in the daemon's TOML config.

use std::{path::PathBuf, time::Duration};

use serde::{Deserialize, Serialize};

/// Knobs of the registry client. Every field has a default, unknown keys are errors
/// (a typo must not silently fall back to a default).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RegistryConfig {
    /// containerd-style `certs.d` directory: `<dir>/<host>/hosts.toml` configures
    /// mirrors, plain-HTTP hosts, CAs and headers per registry.
    pub certs_dir: PathBuf,
    /// Per-request timeout (connect, headers and the whole body), in milliseconds.
    /// A stalled response is cut after this and retried.
    pub request_timeout_ms: u64,
    /// TCP + TLS connect timeout, in milliseconds.
    pub connect_timeout_ms: u64,
    /// Retries after the first attempt, per host, before a read fails.
    pub max_retries: u32,
    /// First back-off delay, in milliseconds (doubled each retry, with jitter).
    pub min_backoff_ms: u64,
    /// Upper bound of a back-off delay, in milliseconds; also caps `Retry-After`.
    pub max_backoff_ms: u64,
    /// Requests in flight per registry host; more wait their turn.
    pub max_concurrent_requests_per_host: usize,
    /// Docker config file to read credentials from. Default: `$DOCKER_CONFIG/config.json`,
    /// else `~/.docker/config.json`.
    pub docker_config: Option<PathBuf>,
    /// Send multi-range requests (`Range: bytes=a-b,c-d`) for batched reads; some CDNs
    /// reject them, which is detected and remembered, so this is only a kill switch.
    pub multi_range: bool,
}

impl Default for RegistryConfig {
    fn default() -> Self {
        RegistryConfig {
            certs_dir: PathBuf::from("/etc/lazysnap/certs.d"),
            request_timeout_ms: 30_000,
            connect_timeout_ms: 10_000,
            max_retries: 5,
            min_backoff_ms: 50,
            max_backoff_ms: 5_000,
            max_concurrent_requests_per_host: 16,
            docker_config: None,
            multi_range: true,
        }
    }
}

impl RegistryConfig {
    pub(crate) fn request_timeout(&self) -> Duration {
        Duration::from_millis(self.request_timeout_ms.max(1))
    }

    pub(crate) fn connect_timeout(&self) -> Duration {
        Duration::from_millis(self.connect_timeout_ms.max(1))
    }

    /// Back-off before retry number `retry` (0-based): exponential, full jitter in
    /// the upper half so that concurrent readers do not retry in lock step.
    pub(crate) fn backoff(&self, retry: u32) -> Duration {
        let min = self.min_backoff_ms.max(1);
        let max = self.max_backoff_ms.max(min);
        let exp = min.saturating_mul(1u64 << retry.min(20)).min(max);
        let jittered = exp / 2 + fastrand::u64(0..=exp / 2);
        Duration::from_millis(jittered)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_partial_and_rejects_unknown() {
        let c: RegistryConfig = toml::from_str("max_retries = 2\ncerts_dir = \"/x\"").unwrap();
        assert_eq!(c.max_retries, 2);
        assert_eq!(c.certs_dir, PathBuf::from("/x"));
        assert_eq!(c.request_timeout_ms, 30_000);
        assert!(toml::from_str::<RegistryConfig>("max_retry = 2").is_err());
    }

    #[test]
    fn backoff_is_bounded() {
        let c = RegistryConfig {
            min_backoff_ms: 10,
            max_backoff_ms: 100,
            ..Default::default()
        };
        for r in 0..40 {
            let d = c.backoff(r).as_millis();
            assert!(d <= 100, "retry {r}: {d}");
        }
        assert!(c.backoff(0).as_millis() >= 5);
    }
}
