//! Writing blobs into containerd's content store through its streaming Write API,
//! as containerd's own remote writer does: a STAT that names the ref and declares
//! the expected size and digest, WRITEs at increasing offsets, a COMMIT that
//! containerd verifies against both. Content that already exists is an answer, not
//! an error.

use anyhow::anyhow;
use containerd_client::services::v1::{
    AbortRequest, WriteAction, WriteContentRequest, WriteContentResponse,
};
use containerd_client::tonic::codec::Streaming;
use containerd_client::tonic::{Code, Status};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use super::containerd::{Containerd, status_error};

/// Bytes per WRITE message (containerd accepts up to 16 MiB per message).
const MESSAGE: usize = 1 << 20;

/// An open write of one blob.
pub struct ContentWriter {
    cd: Containerd,
    tx: mpsc::Sender<WriteContentRequest>,
    rx: Streaming<WriteContentResponse>,
    reference: String,
    digest: String,
    size: i64,
    offset: i64,
}

/// The ingest ref containerd's pull uses (`remotes.MakeRefKey`).
pub fn ref_key(kind: &str, digest: &str) -> String {
    format!("{kind}-{digest}")
}

impl ContentWriter {
    /// Opens a write of `digest` (`size` bytes) under `reference`; None when the
    /// content store already has it.
    pub async fn open(
        cd: &Containerd,
        reference: &str,
        digest: &str,
        size: u64,
    ) -> anyhow::Result<Option<ContentWriter>> {
        let what = || format!("content {digest}");
        let size = i64::try_from(size).map_err(|_| anyhow!("{}: size {size} too large", what()))?;
        let (tx, rx) = mpsc::channel(2);
        let stat = WriteContentRequest {
            action: WriteAction::Stat as i32,
            r#ref: reference.to_string(),
            total: size,
            expected: digest.to_string(),
            ..Default::default()
        };
        // the first message must be queued before the call: containerd answers
        // (headers included) only once it has read it
        tx.send(stat)
            .await
            .map_err(|_| anyhow!("{}: write stream closed", what()))?;
        let mut rx = match cd.content().write(cd.req(ReceiverStream::new(rx))).await {
            Ok(r) => r.into_inner(),
            Err(s) if s.code() == Code::AlreadyExists => return Ok(None),
            Err(s) => return Err(status_error(what(), s)),
        };
        match rx.message().await {
            Ok(Some(_)) => {}
            Ok(None) => return Err(anyhow!("{}: containerd closed the write", what())),
            Err(s) if s.code() == Code::AlreadyExists => return Ok(None),
            Err(s) => return Err(status_error(what(), s)),
        }
        Ok(Some(ContentWriter {
            cd: cd.clone(),
            tx,
            rx,
            reference: reference.to_string(),
            digest: digest.to_string(),
            size,
            offset: 0,
        }))
    }

    /// Sends one request and reads its answer; Err(None) when containerd closed
    /// the stream without a status.
    async fn exchange(
        &mut self,
        req: WriteContentRequest,
    ) -> Result<WriteContentResponse, Option<Status>> {
        // a failed send means the stream ended: the reason is in the answers
        let sent = self.tx.send(req).await.is_ok();
        match self.rx.message().await {
            Ok(Some(r)) if sent => Ok(r),
            Ok(_) => Err(None),
            Err(s) => Err(Some(s)),
        }
    }

    async fn send(&mut self, req: WriteContentRequest) -> anyhow::Result<WriteContentResponse> {
        self.exchange(req).await.map_err(|e| match e {
            Some(s) => status_error(format!("content {}", self.digest), s),
            None => anyhow!("content {}: containerd closed the write", self.digest),
        })
    }

    /// Appends `data`.
    pub async fn write(&mut self, data: &[u8]) -> anyhow::Result<()> {
        for piece in data.chunks(MESSAGE) {
            let resp = self
                .send(WriteContentRequest {
                    action: WriteAction::Write as i32,
                    offset: self.offset,
                    data: piece.to_vec(),
                    ..Default::default()
                })
                .await?;
            let want = self.offset + piece.len() as i64;
            if resp.offset != want {
                return Err(anyhow!(
                    "content {}: containerd is at offset {}, expected {want}",
                    self.digest,
                    resp.offset
                ));
            }
            self.offset = want;
        }
        Ok(())
    }

    /// Commits the write; containerd checks the size and digest. Content that
    /// appeared meanwhile counts as committed.
    pub async fn commit(mut self) -> anyhow::Result<()> {
        let req = WriteContentRequest {
            action: WriteAction::Commit as i32,
            offset: self.offset,
            total: self.size,
            expected: self.digest.clone(),
            ..Default::default()
        };
        let what = format!("content {}", self.digest);
        let resp = match self.exchange(req).await {
            Ok(r) => r,
            Err(Some(s)) if s.code() == Code::AlreadyExists => return Ok(()),
            Err(Some(s)) => return Err(status_error(format!("committing {what}"), s)),
            Err(None) => return Err(anyhow!("committing {what}: containerd closed the write")),
        };
        if resp.digest != self.digest || resp.offset != self.size {
            return Err(anyhow!(
                "committing {what}: containerd stored {} ({} bytes), expected {} bytes",
                resp.digest,
                resp.offset,
                self.size
            ));
        }
        Ok(())
    }

    /// Gives the write up and drops what containerd received of it.
    pub async fn abort(self) {
        let ContentWriter {
            cd, tx, reference, ..
        } = self;
        drop(tx);
        let req = cd.req(AbortRequest {
            r#ref: reference.clone(),
        });
        if let Err(s) = cd.content().abort(req).await
            && s.code() != Code::NotFound
        {
            tracing::warn!(reference, error = %s.message(), "aborting a content write");
        }
    }
}

/// Stores a small blob (index, manifest, config) whole.
pub async fn put(
    cd: &Containerd,
    reference: &str,
    digest: &str,
    data: &[u8],
) -> anyhow::Result<()> {
    let Some(mut w) = ContentWriter::open(cd, reference, digest, data.len() as u64).await? else {
        return Ok(());
    };
    if let Err(e) = w.write(data).await {
        w.abort().await;
        return Err(e);
    }
    w.commit().await
}
