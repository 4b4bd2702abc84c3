//! containerd's `containerd.services.snapshots.v1.Snapshots` service, served with
//! tonic's server plumbing over containerd-client's message types. Every snapshotter
//! call runs on the blocking pool (store transactions and directory work block).

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Instant, SystemTime};

use containerd_client::services::v1::snapshots as api;
use containerd_client::types::Mount as ApiMount;
use tonic::body::Body;
use tonic::codegen::{Body as HttpBody, BoxFuture, Service, StdError, http};
use tonic::server::{Grpc, NamedService};
use tonic::{Code, Request, Response, Status};
use tonic_prost::ProstCodec;
use tracing::debug;

use super::metrics::Metrics;
use crate::error::Error;
use crate::snapshot::{Info, Kind, Labels, Mount, Snapshotter};

/// The gRPC service name containerd dials.
pub const SERVICE_NAME: &str = "containerd.services.snapshots.v1.Snapshots";

/// The one place where snapshotter errors become gRPC codes (containerd's errdefs
/// turns these codes back into its own errors and drives its logic with them).
pub fn to_status(e: &Error) -> Status {
    let code = match e {
        Error::SnapshotNotFound(_) | Error::NotFound(_) => Code::NotFound,
        Error::AlreadyExists(_) => Code::AlreadyExists,
        Error::FailedPrecondition(_) => Code::FailedPrecondition,
        Error::InvalidArgument(_) => Code::InvalidArgument,
        Error::Unavailable(_) => Code::Unavailable,
        _ => Code::Unknown,
    };
    Status::new(code, e.to_string())
}

/// The Snapshots service over one snapshotter.
#[derive(Clone, Debug)]
pub struct SnapshotsService {
    snapshotter: Arc<Snapshotter>,
    metrics: Arc<Metrics>,
}

impl SnapshotsService {
    /// Serves `snapshotter`, timing every call into `metrics`.
    pub fn new(snapshotter: Arc<Snapshotter>, metrics: Arc<Metrics>) -> Self {
        SnapshotsService {
            snapshotter,
            metrics,
        }
    }

    /// Runs one snapshotter call on the blocking pool, timed and logged.
    async fn call<T: Send + 'static>(
        &self,
        op: &'static str,
        f: impl FnOnce(&Snapshotter) -> crate::Result<T> + Send + 'static,
    ) -> Result<T, Status> {
        let s = self.snapshotter.clone();
        let start = Instant::now();
        let r = tokio::task::spawn_blocking(move || f(&s))
            .await
            .map_err(|e| Status::internal(format!("{op}: {e}")))?;
        let code = match &r {
            Ok(_) => Code::Ok,
            Err(e) => to_status(e).code(),
        };
        self.metrics.observe(op, code, start.elapsed());
        r.map_err(|e| {
            debug!(op, error = %e, "snapshot call failed");
            to_status(&e)
        })
    }
}

fn labels(m: HashMap<String, String>) -> Labels {
    m.into_iter().collect()
}

fn api_mounts(m: Vec<Mount>) -> Vec<ApiMount> {
    m.into_iter()
        .map(|m| ApiMount {
            r#type: m.kind,
            source: m.source,
            target: String::new(),
            options: m.options,
        })
        .collect()
}

fn timestamp(t: SystemTime) -> prost_types::Timestamp {
    let d = t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    prost_types::Timestamp {
        seconds: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        nanos: d.subsec_nanos() as i32,
    }
}

fn from_timestamp(t: Option<prost_types::Timestamp>) -> SystemTime {
    t.and_then(|t| {
        let secs = u64::try_from(t.seconds).ok()?;
        let nanos = u32::try_from(t.nanos).ok()?;
        SystemTime::UNIX_EPOCH.checked_add(std::time::Duration::new(secs, nanos))
    })
    .unwrap_or(SystemTime::UNIX_EPOCH)
}

fn api_info(i: Info) -> api::Info {
    let kind = match i.kind {
        Kind::View => api::Kind::View,
        Kind::Active => api::Kind::Active,
        Kind::Committed => api::Kind::Committed,
    };
    api::Info {
        name: i.name,
        parent: i.parent,
        kind: kind as i32,
        created_at: Some(timestamp(i.created)),
        updated_at: Some(timestamp(i.updated)),
        labels: i.labels.into_iter().collect(),
    }
}

fn from_api_info(i: api::Info) -> Result<Info, Status> {
    let kind = match api::Kind::try_from(i.kind) {
        Ok(api::Kind::View) => Kind::View,
        Ok(api::Kind::Active) => Kind::Active,
        Ok(api::Kind::Committed) => Kind::Committed,
        // Update ignores the kind; containerd sends what Stat returned.
        _ => Kind::Active,
    };
    Ok(Info {
        name: i.name,
        parent: i.parent,
        kind,
        labels: labels(i.labels),
        created: from_timestamp(i.created_at),
        updated: from_timestamp(i.updated_at),
    })
}

type ListStream =
    Pin<Box<dyn tokio_stream::Stream<Item = Result<api::ListSnapshotsResponse, Status>> + Send>>;

impl SnapshotsService {
    async fn prepare(
        &self,
        r: api::PrepareSnapshotRequest,
    ) -> Result<api::PrepareSnapshotResponse, Status> {
        let mounts = self
            .call("prepare", move |s| {
                s.prepare(&r.key, &r.parent, labels(r.labels))
            })
            .await?;
        Ok(api::PrepareSnapshotResponse {
            mounts: api_mounts(mounts),
        })
    }

    async fn view(&self, r: api::ViewSnapshotRequest) -> Result<api::ViewSnapshotResponse, Status> {
        let mounts = self
            .call("view", move |s| s.view(&r.key, &r.parent, labels(r.labels)))
            .await?;
        Ok(api::ViewSnapshotResponse {
            mounts: api_mounts(mounts),
        })
    }

    async fn mounts(&self, r: api::MountsRequest) -> Result<api::MountsResponse, Status> {
        let mounts = self.call("mounts", move |s| s.mounts(&r.key)).await?;
        Ok(api::MountsResponse {
            mounts: api_mounts(mounts),
        })
    }

    async fn commit(&self, r: api::CommitSnapshotRequest) -> Result<(), Status> {
        self.call("commit", move |s| {
            s.commit(&r.name, &r.key, labels(r.labels))
        })
        .await
    }

    async fn remove(&self, r: api::RemoveSnapshotRequest) -> Result<(), Status> {
        self.call("remove", move |s| s.remove(&r.key)).await
    }

    async fn stat(&self, r: api::StatSnapshotRequest) -> Result<api::StatSnapshotResponse, Status> {
        let info = self.call("stat", move |s| s.stat(&r.key)).await?;
        Ok(api::StatSnapshotResponse {
            info: Some(api_info(info)),
        })
    }

    async fn update(
        &self,
        r: api::UpdateSnapshotRequest,
    ) -> Result<api::UpdateSnapshotResponse, Status> {
        let info = from_api_info(
            r.info
                .ok_or_else(|| Status::invalid_argument("update: info is required"))?,
        )?;
        let paths = r.update_mask.map(|m| m.paths).unwrap_or_default();
        let info = self
            .call("update", move |s| s.update(&info, &paths))
            .await?;
        Ok(api::UpdateSnapshotResponse {
            info: Some(api_info(info)),
        })
    }

    async fn usage(&self, r: api::UsageRequest) -> Result<api::UsageResponse, Status> {
        let u = self.call("usage", move |s| s.usage(&r.key)).await?;
        Ok(api::UsageResponse {
            size: u.size,
            inodes: u.inodes,
        })
    }

    async fn list(&self, r: api::ListSnapshotsRequest) -> Result<ListStream, Status> {
        let infos = self.call("list", move |s| s.list(&r.filters)).await?;
        // containerd's own server sends batches of 100.
        let batches: Vec<Result<api::ListSnapshotsResponse, Status>> = infos
            .chunks(100)
            .map(|c| {
                Ok(api::ListSnapshotsResponse {
                    info: c.iter().cloned().map(api_info).collect(),
                })
            })
            .collect();
        Ok(Box::pin(tokio_stream::iter(batches)))
    }

    async fn cleanup(&self, _r: api::CleanupRequest) -> Result<(), Status> {
        self.call("cleanup", |s| s.cleanup()).await
    }
}

/// A unary handler as a tonic `UnaryService` (tonic implements it for any
/// `Service<Request<M>>` answering `Response<R>` or `Status`).
struct Handler<F>(F);

impl<F, Fut, M, R> Service<Request<M>> for Handler<F>
where
    F: FnMut(M) -> Fut,
    Fut: Future<Output = Result<R, Status>> + Send + 'static,
{
    type Response = Response<R>;
    type Error = Status;
    type Future = BoxFuture<Response<R>, Status>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Status>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<M>) -> Self::Future {
        let fut = (self.0)(req.into_inner());
        Box::pin(async move { fut.await.map(Response::new) })
    }
}

async fn unary<B, M, R, F, Fut>(req: http::Request<B>, f: F) -> http::Response<Body>
where
    B: HttpBody + Send + 'static,
    B::Error: Into<StdError> + Send,
    M: prost::Message + Default + Send + 'static,
    R: prost::Message + Send + 'static,
    F: FnMut(M) -> Fut + Send + 'static,
    Fut: Future<Output = Result<R, Status>> + Send + 'static,
{
    Grpc::new(ProstCodec::<R, M>::default())
        .unary(Handler(f), req)
        .await
}

fn unimplemented(path: &str) -> http::Response<Body> {
    Status::unimplemented(format!("{path}: not implemented")).into_http()
}

impl<B> Service<http::Request<B>> for SnapshotsService
where
    B: HttpBody + Send + 'static,
    B::Error: Into<StdError> + Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = std::convert::Infallible;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let svc = self.clone();
        let path = req.uri().path().to_string();
        let method = path
            .strip_prefix(&format!("/{SERVICE_NAME}/"))
            .unwrap_or("")
            .to_string();
        macro_rules! route {
            ($m:ident) => {{
                Box::pin(async move {
                    Ok(unary(req, move |r| {
                        let svc = svc.clone();
                        async move { svc.$m(r).await }
                    })
                    .await)
                })
            }};
        }
        match method.as_str() {
            "Prepare" => route!(prepare),
            "View" => route!(view),
            "Mounts" => route!(mounts),
            "Commit" => route!(commit),
            "Remove" => route!(remove),
            "Stat" => route!(stat),
            "Update" => route!(update),
            "Usage" => route!(usage),
            "Cleanup" => route!(cleanup),
            "List" => Box::pin(async move {
                let handler = Handler(move |r| {
                    let svc = svc.clone();
                    async move { svc.list(r).await }
                });
                Ok(Grpc::new(ProstCodec::<
                    api::ListSnapshotsResponse,
                    api::ListSnapshotsRequest,
                >::default())
                .server_streaming(handler, req)
                .await)
            }),
            _ => Box::pin(async move { Ok(unimplemented(&path)) }),
        }
    }
}

impl NamedService for SnapshotsService {
    const NAME: &'static str = SERVICE_NAME;
}
