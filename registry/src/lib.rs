//! `lazysnap-registry`: what lazysnap needs from OCI registries.
//!
//! - [`Reference`] and [`Digest`]: image names as users type them, Docker Hub defaults.
//! - [`RegistryClient`]: resolves a reference to the manifest for a platform (OCI and
//!   Docker media types, indexes and manifest lists) and fetches the config.
//! - [`Blob`]: a cheap-to-clone handle to one blob with `read_at` and batched
//!   `read_ranges`, the unit a lazily mounted layer reads through.
//!
//! - Pushing ([`RegistryClient::push_blob`], [`RegistryClient::push_manifest`]): blobs
//!   the registry has are skipped or mounted from another repository, the rest uploaded
//!   in one request or in chunks; manifests go last.
//!
//! Underneath: containerd `hosts.toml` mirrors ([`hosts`]), Docker credentials and the
//! token flow ([`auth`]), and one HTTP transport with retries, back-off, per-host
//! concurrency limits and request/byte counters. The crate knows nothing of eStargz.

#![warn(missing_docs, missing_debug_implementations, rust_2018_idioms)]

pub mod auth;
mod blob;
mod client;
mod config;
mod error;
pub mod hosts;
mod manifest;
mod multipart;
mod push;
mod reference;
mod stats;
mod transport;

pub use blob::Blob;
pub use client::{Document, Image, RegistryClient};
pub use config::RegistryConfig;
pub use error::{Error, ErrorKind, Result};
pub use manifest::{Descriptor, Platform, media_types};
pub use push::{BlobSource, PushOutcome};
pub use reference::{DOCKER_HUB, Digest, Reference};
pub use stats::Stats;
