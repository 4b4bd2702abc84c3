//! The calls `lazysnap pull` makes to containerd: leases, content labels, images
//! and the snapshot service, each in the pull's namespace and under its lease (the
//! `containerd-namespace` and `containerd-lease` gRPC headers), so that nothing it
//! creates can be garbage-collected before the image record holds it.

use std::path::Path;
use std::time::{Duration, SystemTime};

use anyhow::{anyhow, bail};
use containerd_client::services::v1::content_client::ContentClient;
use containerd_client::services::v1::images_client::ImagesClient;
use containerd_client::services::v1::leases_client::LeasesClient;
use containerd_client::services::v1::snapshots::snapshots_client::SnapshotsClient;
use containerd_client::services::v1::snapshots::{
    CommitSnapshotRequest, Info as SnapshotInfo, PrepareSnapshotRequest, RemoveSnapshotRequest,
    StatSnapshotRequest, UpdateSnapshotRequest,
};
use containerd_client::services::v1::{
    CreateImageRequest, CreateRequest, DeleteRequest, Image, InfoRequest, UpdateImageRequest,
    UpdateRequest,
};
use containerd_client::tonic::metadata::MetadataValue;
use containerd_client::tonic::transport::Channel;
use containerd_client::tonic::{Code, Request, Status};
use containerd_client::types::{Descriptor, Mount};

use super::labels::Labels;

/// containerd's lease expiry label (`leases.WithExpiration`).
const LEASE_EXPIRE: &str = "containerd.io/gc.expire";

/// A connection to containerd for one pull.
#[derive(Clone)]
pub struct Containerd {
    channel: Channel,
    namespace: MetadataValue<containerd_client::tonic::metadata::Ascii>,
    lease: Option<MetadataValue<containerd_client::tonic::metadata::Ascii>>,
    lease_id: String,
    /// The snapshotter layers are prepared in.
    pub snapshotter: String,
}

/// What a Prepare answered.
pub enum Prepared {
    /// An active snapshot to write the layer into.
    Mounts(Vec<Mount>),
    /// The target exists (a remote snapshotter mounted it lazily, or someone else
    /// committed it meanwhile).
    Exists,
}

/// `what: message`, naming the object, from a gRPC status.
pub fn status_error(what: impl std::fmt::Display, s: Status) -> anyhow::Error {
    let msg = if s.message().is_empty() {
        format!("{:?}", s.code())
    } else {
        s.message().to_string()
    };
    anyhow!("{what}: {msg}")
}

impl Containerd {
    /// Connects to the socket at `address`; nothing is created yet.
    pub async fn connect(
        address: &Path,
        namespace: &str,
        snapshotter: &str,
    ) -> anyhow::Result<Self> {
        let namespace = namespace
            .parse()
            .map_err(|_| anyhow!("namespace {namespace:?}: not a valid namespace name"))?;
        let channel = containerd_client::connect(address).await.map_err(|e| {
            // the transport error repeats its cause in its own text: name the cause once
            let mut cause: &dyn std::error::Error = &e;
            while let Some(next) = cause.source() {
                cause = next;
            }
            anyhow!(
                "containerd at {} is not reachable (is it running?): {cause}",
                address.display()
            )
        })?;
        Ok(Containerd {
            channel,
            namespace,
            lease: None,
            lease_id: String::new(),
            snapshotter: snapshotter.to_string(),
        })
    }

    /// A request with this pull's namespace and lease headers.
    pub fn req<T>(&self, msg: T) -> Request<T> {
        let mut r = Request::new(msg);
        let md = r.metadata_mut();
        md.insert("containerd-namespace", self.namespace.clone());
        if let Some(l) = &self.lease {
            md.insert("containerd-lease", l.clone());
        }
        r
    }

    /// Creates the pull's lease, expiring after `ttl` should the pull die; every
    /// later call runs under it.
    pub async fn create_lease(&mut self, ttl: Duration) -> anyhow::Result<()> {
        let nanos = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default();
        let id = format!("lazysnap-pull-{nanos}-{}", std::process::id());
        let expire_secs = (SystemTime::now() + ttl)
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or_default();
        let expire = lazysnap::format::time::format(expire_secs, 0);
        let req = self.req(CreateRequest {
            id: id.clone(),
            labels: [(LEASE_EXPIRE.to_string(), expire)].into(),
        });
        LeasesClient::new(self.channel.clone())
            .create(req)
            .await
            .map_err(|s| status_error("containerd: creating a lease", s))?;
        self.lease = Some(
            id.parse()
                .map_err(|_| anyhow!("lease id {id:?} is not ASCII"))?,
        );
        self.lease_id = id;
        Ok(())
    }

    /// Deletes the lease; with `sync`, containerd collects what only it held
    /// before answering.
    pub async fn delete_lease(&mut self, sync: bool) -> anyhow::Result<()> {
        if self.lease.take().is_none() {
            return Ok(());
        }
        let req = self.req(DeleteRequest {
            id: self.lease_id.clone(),
            sync,
        });
        LeasesClient::new(self.channel.clone())
            .delete(req)
            .await
            .map_err(|s| {
                status_error(format!("containerd: deleting lease {}", self.lease_id), s)
            })?;
        Ok(())
    }

    /// A content client (for the streaming writer).
    pub fn content(&self) -> ContentClient<Channel> {
        ContentClient::new(self.channel.clone())
    }

    /// The labels of content `digest`, or None when the store lacks it.
    pub async fn content_labels(&self, digest: &str) -> anyhow::Result<Option<Labels>> {
        let req = self.req(InfoRequest {
            digest: digest.to_string(),
        });
        match self.content().info(req).await {
            Ok(r) => Ok(Some(
                r.into_inner()
                    .info
                    .map(|i| i.labels.into_iter().collect())
                    .unwrap_or_default(),
            )),
            Err(s) if s.code() == Code::NotFound => Ok(None),
            Err(s) => Err(status_error(format!("content {digest}"), s)),
        }
    }

    /// Sets `labels` on content `digest`, leaving its other labels alone.
    pub async fn set_content_labels(&self, digest: &str, labels: &Labels) -> anyhow::Result<()> {
        if labels.is_empty() {
            return Ok(());
        }
        let req = self.req(UpdateRequest {
            info: Some(containerd_client::services::v1::Info {
                digest: digest.to_string(),
                labels: labels.clone().into_iter().collect(),
                ..Default::default()
            }),
            update_mask: Some(prost_types::FieldMask {
                paths: labels.keys().map(|k| format!("labels.{k}")).collect(),
            }),
        });
        self.content()
            .update(req)
            .await
            .map_err(|s| status_error(format!("content {digest}: setting labels"), s))?;
        Ok(())
    }

    fn snapshots(&self) -> SnapshotsClient<Channel> {
        SnapshotsClient::new(self.channel.clone())
    }

    /// The snapshot `key`, or None.
    pub async fn stat(&self, key: &str) -> anyhow::Result<Option<SnapshotInfo>> {
        let req = self.req(StatSnapshotRequest {
            snapshotter: self.snapshotter.clone(),
            key: key.to_string(),
        });
        match self.snapshots().stat(req).await {
            Ok(r) => Ok(r.into_inner().info),
            Err(s) if s.code() == Code::NotFound => Ok(None),
            Err(s) => Err(self.snapshot_error(format!("snapshot {key}"), s)),
        }
    }

    /// Prepares the active snapshot `key` over `parent` with `labels`.
    pub async fn prepare(
        &self,
        key: &str,
        parent: &str,
        labels: &Labels,
    ) -> anyhow::Result<Prepared> {
        let req = self.req(PrepareSnapshotRequest {
            snapshotter: self.snapshotter.clone(),
            key: key.to_string(),
            parent: parent.to_string(),
            labels: labels.clone().into_iter().collect(),
        });
        match self.snapshots().prepare(req).await {
            Ok(r) => Ok(Prepared::Mounts(r.into_inner().mounts)),
            Err(s) if s.code() == Code::AlreadyExists => Ok(Prepared::Exists),
            Err(s) => Err(self.snapshot_error(format!("preparing snapshot {key:?}"), s)),
        }
    }

    /// Commits `key` as `name`; false when `name` already exists.
    pub async fn commit(&self, name: &str, key: &str, labels: &Labels) -> anyhow::Result<bool> {
        let req = self.req(CommitSnapshotRequest {
            snapshotter: self.snapshotter.clone(),
            name: name.to_string(),
            key: key.to_string(),
            labels: labels.clone().into_iter().collect(),
        });
        match self.snapshots().commit(req).await {
            Ok(_) => Ok(true),
            Err(s) if s.code() == Code::AlreadyExists => Ok(false),
            Err(s) => Err(self.snapshot_error(format!("committing snapshot {name}"), s)),
        }
    }

    /// Removes the snapshot `key`.
    pub async fn remove(&self, key: &str) -> anyhow::Result<()> {
        let req = self.req(RemoveSnapshotRequest {
            snapshotter: self.snapshotter.clone(),
            key: key.to_string(),
        });
        self.snapshots()
            .remove(req)
            .await
            .map_err(|s| self.snapshot_error(format!("removing snapshot {key:?}"), s))?;
        Ok(())
    }

    /// Sets one label on snapshot `name` (containerd forwards labels under
    /// `containerd.io/snapshot/` to the snapshotter, which may act on them).
    pub async fn set_snapshot_label(
        &self,
        name: &str,
        key: &str,
        value: &str,
    ) -> anyhow::Result<()> {
        let req = self.req(UpdateSnapshotRequest {
            snapshotter: self.snapshotter.clone(),
            info: Some(SnapshotInfo {
                name: name.to_string(),
                labels: [(key.to_string(), value.to_string())].into(),
                ..Default::default()
            }),
            update_mask: Some(prost_types::FieldMask {
                paths: vec![format!("labels.{key}")],
            }),
        });
        self.snapshots()
            .update(req)
            .await
            .map_err(|s| self.snapshot_error(format!("snapshot {name}"), s))?;
        Ok(())
    }

    fn snapshot_error(&self, what: String, s: Status) -> anyhow::Error {
        if s.code() == Code::Unavailable || s.message().contains("connection refused") {
            return status_error(
                format!(
                    "{what}: snapshotter {:?} is unavailable (is its daemon running?)",
                    self.snapshotter
                ),
                s,
            );
        }
        status_error(what, s)
    }

    /// Creates the image record `name` → `target`, or points an existing one at it
    /// (containerd's `createNewImage`).
    pub async fn put_image(&self, name: &str, target: Descriptor) -> anyhow::Result<()> {
        let image = Image {
            name: name.to_string(),
            target: Some(target),
            ..Default::default()
        };
        let mut images = ImagesClient::new(self.channel.clone());
        for _ in 0..3 {
            let req = self.req(CreateImageRequest {
                image: Some(image.clone()),
                ..Default::default()
            });
            match images.create(req).await {
                Ok(_) => return Ok(()),
                Err(s) if s.code() == Code::AlreadyExists => {}
                Err(s) => return Err(status_error(format!("creating image {name}"), s)),
            }
            let req = self.req(UpdateImageRequest {
                image: Some(image.clone()),
                ..Default::default()
            });
            match images.update(req).await {
                Ok(_) => return Ok(()),
                // removed in between: create again
                Err(s) if s.code() == Code::NotFound => {}
                Err(s) => return Err(status_error(format!("updating image {name}"), s)),
            }
        }
        bail!("image {name}: created and removed concurrently, giving up")
    }
}
