//! `lazysnap unlazy SNAPSHOT|REF`: asks the running daemon to turn remote layers
//! into plain directories, through the snapshots API (the unlazy label set with
//! Update, which BuildKit-style clients can send too).

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, bail};
use clap::Args;
use containerd_client::services::v1::snapshots::snapshots_client::SnapshotsClient;
use containerd_client::services::v1::snapshots::{
    Info, ListSnapshotsRequest, UpdateSnapshotRequest,
};
use containerd_client::tonic::transport::Channel;

use lazysnap::service::Config;
use lazysnap::snapshot::SnapshotKey;
use lazysnap::snapshot::labels::{CRI_IMAGE_REF, REMOTE, STARGZ_REFERENCE, TARGET_REF, UNLAZY};
use lazysnap_registry::Reference;

/// Arguments of `lazysnap unlazy`.
#[derive(Debug, Args)]
pub struct UnlazyArgs {
    /// A snapshot key (as containerd stores it, or without its `<namespace>/<n>/`
    /// prefix), or an image reference: every remote layer of that image.
    pub target: String,
    /// Configuration file of the daemon (to find its socket).
    #[arg(long, env = "LAZYSNAP_CONFIG")]
    pub config: Option<PathBuf>,
    /// The daemon's gRPC socket (overrides the configuration).
    #[arg(long)]
    pub socket: Option<PathBuf>,
    /// Print one JSON object per unlazied snapshot.
    #[arg(long)]
    pub json: bool,
}

/// Whether `info` is the snapshot `target` names: its key, its key without the
/// namespace prefix, or (for remote layers) its chain id.
fn names_snapshot(info: &Info, target: &str) -> bool {
    info.name == target
        || SnapshotKey(&info.name).local() == target
        || info.labels.get(TARGET_REF).is_some_and(|r| r == target)
}

/// Whether the layer `info` was pulled lazily for the image `target` (its image
/// labels stay after unlazy).
fn of_image(info: &Info, target: &str, wanted: Option<&Reference>) -> bool {
    [CRI_IMAGE_REF, STARGZ_REFERENCE]
        .iter()
        .filter_map(|k| info.labels.get(*k))
        .any(|r| {
            r == target
                || wanted.is_some_and(|w| {
                    Reference::parse(r).is_ok_and(|r| r.to_string() == w.to_string())
                })
        })
}

async fn list(client: &mut SnapshotsClient<Channel>) -> anyhow::Result<Vec<Info>> {
    let mut stream = client
        .list(ListSnapshotsRequest {
            snapshotter: "lazysnap".into(),
            filters: Vec::new(),
        })
        .await
        .context("listing snapshots")?
        .into_inner();
    let mut out = Vec::new();
    while let Some(batch) = stream.message().await.context("listing snapshots")? {
        out.extend(batch.info);
    }
    Ok(out)
}

/// Runs `lazysnap unlazy`.
pub fn run(args: UnlazyArgs) -> anyhow::Result<()> {
    let config = Config::load(args.config.as_deref())?;
    let socket = args.socket.clone().unwrap_or(config.socket);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    rt.block_on(async move {
        let channel = containerd_client::connect(&socket).await.with_context(|| {
            format!(
                "connecting to {} (is `lazysnap serve` running?)",
                socket.display()
            )
        })?;
        let mut client = SnapshotsClient::new(channel);
        let infos = list(&mut client).await?;
        let mut targets: Vec<&Info> = infos
            .iter()
            .filter(|i| names_snapshot(i, &args.target))
            .collect();
        if targets.is_empty() {
            let wanted = Reference::parse(&args.target).ok();
            targets = infos
                .iter()
                .filter(|i| of_image(i, &args.target, wanted.as_ref()))
                .collect();
        }
        if targets.is_empty() {
            bail!(
                "{}: no snapshot by that name, and no lazily pulled layer of an image by that name",
                args.target
            );
        }
        for info in targets {
            let started = Instant::now();
            let remote = info.labels.contains_key(REMOTE);
            let req = UpdateSnapshotRequest {
                snapshotter: "lazysnap".into(),
                info: Some(Info {
                    name: info.name.clone(),
                    labels: [(UNLAZY.to_string(), "true".to_string())].into(),
                    ..Default::default()
                }),
                update_mask: Some(prost_types::FieldMask {
                    paths: vec![format!("labels.{UNLAZY}")],
                }),
            };
            client
                .update(req)
                .await
                .map_err(|s| anyhow::anyhow!("{}: {}", info.name, s.message()))?;
            let secs = started.elapsed().as_secs_f64();
            let state = if remote { "unlazied" } else { "already local" };
            if args.json {
                println!(
                    "{}",
                    serde_json::json!({"snapshot": info.name, "state": state, "seconds": secs})
                );
            } else {
                println!("{}: {state} ({secs:.2} s)", info.name);
            }
        }
        Ok(())
    })
}
