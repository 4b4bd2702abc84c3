//! Test support: a real `docker-registry` process, a token service, a fault-injecting
//! HTTP server, and helpers to push content with the registry API.
#![allow(dead_code)]

pub mod fault;
pub mod http;
pub mod registry;
pub mod token;

use std::net::TcpListener;

use lazysnap_registry::RegistryConfig;

/// A free TCP port on 127.0.0.1 (bound and released; the registry binds it next).
pub fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    l.local_addr().expect("local addr").port()
}

/// Deterministic pseudo-random bytes (xorshift), so failures reproduce.
pub fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut v = Vec::with_capacity(len + 8);
    while v.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.truncate(len);
    v
}

/// A config with short timeouts and back-offs so fault tests run quickly, and a certs
/// dir and docker config that are empty unless a test fills them.
pub fn test_config(dir: &std::path::Path) -> RegistryConfig {
    RegistryConfig {
        certs_dir: dir.join("certs.d"),
        request_timeout_ms: 2_000,
        connect_timeout_ms: 2_000,
        max_retries: 3,
        min_backoff_ms: 5,
        max_backoff_ms: 50,
        max_concurrent_requests_per_host: 8,
        docker_config: Some(dir.join("docker-config.json")),
        multi_range: true,
    }
}

/// Installs ring as rustls' process default, for the tests' own reqwest clients.
pub fn install_crypto() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_test_writer()
        .try_init();
}
