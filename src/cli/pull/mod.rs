//! `lazysnap pull REF`: what `ctr-remote image rpull` and nerdctl do, against
//! containerd's API. Under a lease, the index, manifest and config go into the
//! content store with containerd's GC labels; each layer is prepared through the
//! snapshot service with the remote-snapshot labels: a lazy layer answers
//! AlreadyExists, any other is fetched, stored, extracted into the snapshot by
//! lazysnap's applier, checked against its diff id and committed. The image record
//! is created last, so a failed pull leaves no image; deleting the lease releases
//! whatever it had made.

mod containerd;
mod content;
mod labels;
mod progress;
mod unpack;

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, anyhow, bail};
use clap::Args;
use indicatif::ProgressBar;
use lazysnap::service::Config;
use lazysnap::snapshot::labels::{REMOTE, UNLAZY};
use lazysnap_registry::{Digest, Image, Platform, Reference, RegistryClient, media_types};

use containerd::{Containerd, Prepared};
use labels::Labels;
use progress::{Bars, LayerReport, State, Summary};

/// How long the lease keeps what an interrupted pull made (containerd's default).
const LEASE_TTL: Duration = Duration::from_secs(24 * 3600);

/// Arguments of `lazysnap pull`.
#[derive(Debug, Args)]
pub struct PullArgs {
    /// The image reference (`host/repo:tag`, `repo@sha256:…`, `busybox`).
    pub reference: String,
    /// containerd's gRPC socket.
    #[arg(
        long,
        env = "CONTAINERD_ADDRESS",
        default_value = "/run/containerd/containerd.sock"
    )]
    pub address: PathBuf,
    /// containerd namespace.
    #[arg(
        long,
        short = 'n',
        env = "CONTAINERD_NAMESPACE",
        default_value = "default"
    )]
    pub namespace: String,
    /// The snapshotter to prepare layers in.
    #[arg(long, env = "CONTAINERD_SNAPSHOTTER", default_value = "lazysnap")]
    pub snapshotter: String,
    /// Platform to pull from an index (`os/arch[/variant]`); default: this host's.
    #[arg(long)]
    pub platform: Option<String>,
    /// Make every layer local now: lazy layers are unlazied by the daemon.
    #[arg(long)]
    pub unlazy: bool,
    /// Configuration file of the daemon (for its registry settings: hosts.toml
    /// directory, credentials file, timeouts).
    #[arg(long, env = "LAZYSNAP_CONFIG")]
    pub config: Option<PathBuf>,
    /// Print the summary as one JSON object.
    #[arg(long)]
    pub json: bool,
}

/// Parses `os/arch[/variant]`.
fn parse_platform(s: &str) -> anyhow::Result<Platform> {
    let parts: Vec<&str> = s.split('/').collect();
    let bad = || anyhow!("platform {s:?}: expected os/arch or os/arch/variant");
    if parts.len() < 2 || parts.len() > 3 || parts.iter().any(|p| p.is_empty()) {
        return Err(bad());
    }
    Ok(Platform {
        os: parts[0].to_string(),
        architecture: parts[1].to_string(),
        variant: parts.get(2).map(|v| v.to_string()),
        os_version: None,
    })
}

/// Runs `lazysnap pull`.
pub fn run(args: PullArgs) -> anyhow::Result<()> {
    let reference = Reference::parse(&args.reference)?;
    let platform = match &args.platform {
        Some(p) => parse_platform(p)?,
        None => Platform::host(),
    };
    let config = Config::load(args.config.as_deref())?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the runtime")?;
    let result = rt.block_on(pull(&args, &reference, &platform, &config));
    rt.shutdown_timeout(Duration::from_secs(5));
    let summary = result?;
    if args.json {
        println!("{}", serde_json::to_string(&summary)?);
    } else {
        println!("{}", summary.text());
    }
    Ok(())
}

async fn pull(
    args: &PullArgs,
    reference: &Reference,
    platform: &Platform,
    config: &Config,
) -> anyhow::Result<Summary> {
    let started = Instant::now();
    let interrupted = || anyhow!("{reference}: interrupted");
    let client = RegistryClient::new(config.registry.clone());
    let prepared = async {
        let cd = Containerd::connect(&args.address, &args.namespace, &args.snapshotter).await?;
        let image = client
            .resolve_for(reference, platform)
            .await
            .with_context(|| format!("resolving {reference}"))?;
        anyhow::Ok((cd, image))
    };
    // nothing exists in containerd yet: an interrupt just stops
    let (mut cd, image) = tokio::select! {
        r = prepared => r?,
        _ = tokio::signal::ctrl_c() => return Err(interrupted()),
    };
    let diff_ids = diff_ids(&image)?;
    cd.create_lease(LEASE_TTL).await?;
    let bars = Bars::new();
    let puller = Puller {
        cd: &cd,
        client: &client,
        image: &image,
        name: reference.to_string(),
        diff_ids,
        unlazy: args.unlazy,
        bars: &bars,
    };
    // an interrupt ends the pull as a failure would: the lease goes, and with it
    // whatever the pull had made
    let result = tokio::select! {
        r = puller.run() => r,
        _ = tokio::signal::ctrl_c() => Err(interrupted()),
    };
    // on failure containerd collects what the lease held before we exit
    if let Err(e) = cd.delete_lease(result.is_err()).await {
        tracing::warn!(error = %e, "the pull's lease stays until it expires");
    }
    let mut summary = result?;
    summary.downloaded_bytes = client.stats().bytes;
    summary.seconds = started.elapsed().as_secs_f64();
    summary.count();
    Ok(summary)
}

/// The image config's `rootfs.diff_ids`, one per layer.
fn diff_ids(image: &Image) -> anyhow::Result<Vec<Digest>> {
    let what = || format!("image config {}", image.config_descriptor.digest);
    let v: serde_json::Value =
        serde_json::from_slice(&image.config).with_context(|| format!("{}: not JSON", what()))?;
    let ids = v["rootfs"]["diff_ids"]
        .as_array()
        .ok_or_else(|| anyhow!("{}: no rootfs.diff_ids", what()))?
        .iter()
        .map(|d| {
            d.as_str()
                .and_then(|s| Digest::parse(s).ok())
                .ok_or_else(|| anyhow!("{}: bad diff id {d}", what()))
        })
        .collect::<anyhow::Result<Vec<Digest>>>()?;
    if ids.len() != image.layers.len() {
        bail!(
            "{}: {} diff ids for {} layers",
            what(),
            ids.len(),
            image.layers.len()
        );
    }
    Ok(ids)
}

/// `extract-<unique> <chainid>`, the key form containerd's unpacker uses.
fn extract_key(chain: &str) -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or_default();
    let n = N.fetch_add(1, Ordering::Relaxed);
    format!("extract-{nanos}-{}.{n} {chain}", std::process::id())
}

/// One pull, under its lease.
struct Puller<'a> {
    cd: &'a Containerd,
    client: &'a RegistryClient,
    image: &'a Image,
    name: String,
    diff_ids: Vec<Digest>,
    unlazy: bool,
    bars: &'a Bars,
}

impl Puller<'_> {
    async fn run(&self) -> anyhow::Result<Summary> {
        let image = self.image;
        let target = self.store_documents().await?;
        let chains = labels::chain_ids(&self.diff_ids);
        let bars: Vec<ProgressBar> = image
            .layers
            .iter()
            .map(|l| self.bars.layer(l.digest.as_str(), l.size))
            .collect();
        let mut layers = Vec::new();
        for (i, bar) in bars.iter().enumerate() {
            let (state, downloaded) = self.layer(i, &chains, bar).await?;
            Bars::done(bar, state);
            layers.push(LayerReport {
                digest: image.layers[i].digest.to_string(),
                chain_id: chains[i].clone(),
                state,
                downloaded_bytes: downloaded,
            });
        }
        if let Some(top) = chains.last() {
            let key = labels::gc_snapshot_key(&self.cd.snapshotter);
            self.cd
                .set_content_labels(
                    image.config_descriptor.digest.as_str(),
                    &[(key, top.clone())].into(),
                )
                .await?;
        }
        self.cd.put_image(&self.name, target).await?;
        Ok(Summary {
            image: self.name.clone(),
            manifest: image.manifest_digest.to_string(),
            snapshotter: self.cd.snapshotter.clone(),
            layers,
            lazy: 0,
            unpacked: 0,
            unlazied: 0,
            present: 0,
            downloaded_bytes: 0,
            seconds: 0.0,
        })
    }

    /// Stores index, manifest and config with their GC and source labels; returns
    /// the image's target descriptor (the index when the reference named one).
    async fn store_documents(&self) -> anyhow::Result<containerd_client::types::Descriptor> {
        let image = self.image;
        let manifest = image.manifest_digest.to_string();
        let mut target = containerd_client::types::Descriptor {
            media_type: image.media_type.clone(),
            digest: manifest.clone(),
            size: image.manifest.len() as i64,
            annotations: Default::default(),
        };
        if let (Some(digest), Some((media_type, bytes))) = (&image.index_digest, &image.index) {
            let what = || format!("index {digest}");
            let v: serde_json::Value =
                serde_json::from_slice(bytes).with_context(|| format!("{}: not JSON", what()))?;
            let mut children = Vec::new();
            for m in v["manifests"].as_array().into_iter().flatten() {
                let d = m["digest"]
                    .as_str()
                    .and_then(|s| Digest::parse(s).ok())
                    .ok_or_else(|| anyhow!("{}: entry without a valid digest", what()))?;
                let mt = m["mediaType"].as_str().unwrap_or_default().to_string();
                children.push((mt, d));
            }
            let children: Vec<(&str, &Digest)> =
                children.iter().map(|(m, d)| (m.as_str(), d)).collect();
            self.store("index", digest, bytes, labels::gc_children(&children))
                .await?;
            let media_type = if media_type.is_empty() {
                v["mediaType"]
                    .as_str()
                    .unwrap_or(media_types::OCI_INDEX)
                    .to_string()
            } else {
                media_type.clone()
            };
            target = containerd_client::types::Descriptor {
                media_type,
                digest: digest.to_string(),
                size: bytes.len() as i64,
                annotations: Default::default(),
            };
        }
        let config = &image.config_descriptor;
        let mut children: Vec<(&str, &Digest)> = vec![(config.media_type.as_str(), &config.digest)];
        children.extend(
            image
                .layers
                .iter()
                .map(|l| (l.media_type.as_str(), &l.digest)),
        );
        self.store(
            "manifest",
            &image.manifest_digest,
            &image.manifest,
            labels::gc_children(&children),
        )
        .await?;
        self.store("config", &config.digest, &image.config, Labels::new())
            .await?;
        Ok(target)
    }

    /// Writes one document and sets its labels plus the distribution source.
    async fn store(
        &self,
        kind: &str,
        digest: &Digest,
        bytes: &[u8],
        mut labels: Labels,
    ) -> anyhow::Result<()> {
        let d = digest.as_str();
        content::put(self.cd, &content::ref_key(kind, d), d, bytes).await?;
        self.add_source(d, &mut labels).await?;
        self.cd.set_content_labels(d, &labels).await
    }

    /// Adds this repository to the content's distribution-source label; false when
    /// the store lacks the content.
    async fn add_source(&self, digest: &str, labels: &mut Labels) -> anyhow::Result<bool> {
        let (key, repo) = labels::distribution_source(&self.image.reference);
        let Some(existing) = self.cd.content_labels(digest).await? else {
            return Ok(false);
        };
        let value = labels::append_source(existing.get(&key).map(String::as_str), &repo);
        if labels::fits(&key, &value) {
            labels.insert(key, value);
        }
        Ok(true)
    }

    /// Brings layer `i` in; returns its state and the bytes downloaded for it.
    async fn layer(
        &self,
        i: usize,
        chains: &[String],
        bar: &ProgressBar,
    ) -> anyhow::Result<(State, u64)> {
        let desc = &self.image.layers[i];
        let chain = &chains[i];
        let parent = if i == 0 { "" } else { chains[i - 1].as_str() };
        bar.set_message("checking");
        if let Some(info) = self.cd.stat(chain).await? {
            // as containerd's pull: a blob already in the store learns this source too
            let d = desc.digest.as_str();
            let mut source = Labels::new();
            if self.add_source(d, &mut source).await? {
                self.cd.set_content_labels(d, &source).await?;
            }
            return Ok((self.existing(chain, &info.labels, false, bar).await?, 0));
        }
        let labels = labels::layer_labels(
            &self.image.reference,
            &self.image.manifest_digest,
            &self.image.layers,
            i,
            chain,
        );
        // a concurrent pull can remove the target between AlreadyExists and Stat
        for _ in 0..3 {
            let key = extract_key(chain);
            bar.set_message("preparing");
            match self.cd.prepare(&key, parent, &labels).await? {
                Prepared::Exists => {
                    if let Some(info) = self.cd.stat(chain).await? {
                        let state = self.existing(chain, &info.labels, true, bar).await?;
                        return Ok((state, 0));
                    }
                }
                Prepared::Mounts(mounts) => {
                    return self.unpack(i, &key, chain, &labels, &mounts, bar).await;
                }
            }
        }
        bail!(
            "layer {}: snapshot {chain} was reported to exist but cannot be found",
            desc.digest
        )
    }

    /// A layer snapshot that exists: a remote one is lazy when this pull's Prepare
    /// (`fresh`) mounted it, and is unlazied on request; a local one was present.
    async fn existing(
        &self,
        chain: &str,
        labels: &std::collections::HashMap<String, String>,
        fresh: bool,
        bar: &ProgressBar,
    ) -> anyhow::Result<State> {
        if !labels.contains_key(REMOTE) {
            return Ok(State::Present);
        }
        if self.unlazy {
            bar.set_message("unlazying");
            self.cd.set_snapshot_label(chain, UNLAZY, "true").await?;
            return Ok(State::Unlazied);
        }
        Ok(if fresh { State::Lazy } else { State::Present })
    }

    /// Extracts layer `i` into the active snapshot `key`, then commits it as
    /// `chain`; the snapshot is removed on any failure.
    async fn unpack(
        &self,
        i: usize,
        key: &str,
        chain: &str,
        labels: &Labels,
        mounts: &[containerd_client::types::Mount],
        bar: &ProgressBar,
    ) -> anyhow::Result<(State, u64)> {
        let desc = &self.image.layers[i];
        bar.set_message("unpacking");
        let attempt = async {
            let upper = unpack::upper_dir(mounts)
                .with_context(|| format!("layer {}: snapshot {key:?}", desc.digest))?;
            let blob = self.client.blob(&self.image.reference, desc)?;
            let stats =
                unpack::unpack(self.cd, blob.clone(), desc, &self.diff_ids[i], upper, bar).await?;
            tracing::debug!(layer = %desc.digest, files = stats.files, bytes = stats.bytes, "extracted");
            let committed = self.cd.commit(chain, key, labels).await?;
            anyhow::Ok((committed, blob.stats().bytes))
        };
        let (committed, downloaded) = match attempt.await {
            Ok(r) => r,
            Err(e) => {
                if let Err(r) = self.cd.remove(key).await {
                    tracing::warn!(key, error = %r, "removing the extraction snapshot");
                }
                return Err(e);
            }
        };
        if !committed {
            // someone else committed the layer meanwhile
            if let Err(r) = self.cd.remove(key).await {
                tracing::warn!(key, error = %r, "removing the extraction snapshot");
            }
            return Ok((State::Present, downloaded));
        }
        let d = desc.digest.as_str();
        let mut content_labels: Labels = [(
            labels::UNCOMPRESSED.to_string(),
            self.diff_ids[i].to_string(),
        )]
        .into();
        self.add_source(d, &mut content_labels).await?;
        self.cd.set_content_labels(d, &content_labels).await?;
        Ok((State::Unpacked, downloaded))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn platforms_parse() {
        let p = parse_platform("linux/arm64/v8").unwrap();
        assert_eq!((p.os.as_str(), p.architecture.as_str()), ("linux", "arm64"));
        assert_eq!(p.variant.as_deref(), Some("v8"));
        assert!(parse_platform("linux").is_err());
        assert!(parse_platform("linux//v7").is_err());
        assert!(parse_platform("a/b/c/d").is_err());
    }

    #[test]
    fn extract_keys_are_unique_and_end_with_the_chain() {
        let (a, b) = (extract_key("sha256:x"), extract_key("sha256:x"));
        assert_ne!(a, b);
        assert!(a.starts_with("extract-") && a.ends_with(" sha256:x"));
    }
}
