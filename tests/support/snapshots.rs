//! A client of the snapshots gRPC API on lazysnap's socket (containerd-client's
//! tonic stubs): one small async function per call, as containerd makes them.

use std::collections::HashMap;
use std::path::Path;

use containerd_client::services::v1::snapshots::snapshots_client::SnapshotsClient;
use containerd_client::services::v1::snapshots::{
    CleanupRequest, CommitSnapshotRequest, Info, ListSnapshotsRequest, MountsRequest,
    PrepareSnapshotRequest, RemoveSnapshotRequest, StatSnapshotRequest, UpdateSnapshotRequest,
    ViewSnapshotRequest,
};
use containerd_client::tonic::transport::Channel;
use containerd_client::tonic::{Code, Status};
use containerd_client::types::Mount;

pub type Client = SnapshotsClient<Channel>;

/// The label that asks for a remote snapshot (its value names the committed layer).
pub const REF: &str = "containerd.io/snapshot.ref";
/// The label lazysnap sets on remote snapshots.
pub const REMOTE: &str = "containerd.io/snapshot/remote";

/// Connects to the snapshotter socket.
pub async fn connect(socket: &Path) -> Client {
    let ch = containerd_client::connect(socket)
        .await
        .unwrap_or_else(|e| panic!("connect {}: {e}", socket.display()));
    SnapshotsClient::new(ch)
}

pub async fn prepare(
    c: &mut Client,
    key: &str,
    parent: &str,
    l: HashMap<String, String>,
) -> Result<Vec<Mount>, Status> {
    c.prepare(PrepareSnapshotRequest {
        snapshotter: "lazysnap".into(),
        key: key.into(),
        parent: parent.into(),
        labels: l,
    })
    .await
    .map(|r| r.into_inner().mounts)
}

pub async fn view(c: &mut Client, key: &str, parent: &str) -> Result<Vec<Mount>, Status> {
    c.view(ViewSnapshotRequest {
        snapshotter: "lazysnap".into(),
        key: key.into(),
        parent: parent.into(),
        labels: HashMap::new(),
    })
    .await
    .map(|r| r.into_inner().mounts)
}

pub async fn mounts(c: &mut Client, key: &str) -> Result<Vec<Mount>, Status> {
    c.mounts(MountsRequest {
        snapshotter: "lazysnap".into(),
        key: key.into(),
    })
    .await
    .map(|r| r.into_inner().mounts)
}

pub async fn stat(c: &mut Client, key: &str) -> Result<Info, Status> {
    c.stat(StatSnapshotRequest {
        snapshotter: "lazysnap".into(),
        key: key.into(),
    })
    .await
    .map(|r| r.into_inner().info.expect("info"))
}

pub async fn remove(c: &mut Client, key: &str) -> Result<(), Status> {
    c.remove(RemoveSnapshotRequest {
        snapshotter: "lazysnap".into(),
        key: key.into(),
    })
    .await
    .map(|_| ())
}

pub async fn commit(c: &mut Client, name: &str, key: &str) -> Result<(), Status> {
    c.commit(CommitSnapshotRequest {
        snapshotter: "lazysnap".into(),
        name: name.into(),
        key: key.into(),
        labels: HashMap::new(),
    })
    .await
    .map(|_| ())
}

pub async fn cleanup(c: &mut Client) -> Result<(), Status> {
    c.cleanup(CleanupRequest {
        snapshotter: "lazysnap".into(),
    })
    .await
    .map(|_| ())
}

pub async fn list(c: &mut Client, filters: &[&str]) -> Result<Vec<Info>, Status> {
    let mut stream = c
        .list(ListSnapshotsRequest {
            snapshotter: "lazysnap".into(),
            filters: filters.iter().map(|f| f.to_string()).collect(),
        })
        .await?
        .into_inner();
    let mut out = Vec::new();
    while let Some(batch) = stream.message().await? {
        out.extend(batch.info);
    }
    Ok(out)
}

pub async fn update(
    c: &mut Client,
    name: &str,
    l: HashMap<String, String>,
    paths: &[String],
) -> Result<Info, Status> {
    c.update(UpdateSnapshotRequest {
        snapshotter: "lazysnap".into(),
        info: Some(Info {
            name: name.into(),
            labels: l,
            ..Default::default()
        }),
        update_mask: Some(prost_types::FieldMask {
            paths: paths.to_vec(),
        }),
    })
    .await
    .map(|r| r.into_inner().info.expect("info"))
}

/// The error code of a call that must fail.
pub fn code<T: std::fmt::Debug>(r: Result<T, Status>) -> Code {
    match r {
        Ok(v) => panic!("expected an error, got {v:?}"),
        Err(s) => s.code(),
    }
}
