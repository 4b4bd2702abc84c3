//! Reading the image to convert: its documents, and its layer blobs as local files
//! (downloaded by parallel range requests from a registry, or found in an OCI
//! layout), each checked against its digest before it is used.

use std::collections::VecDeque;
use std::io::Write;
use std::path::{Path, PathBuf};

use bytes::Bytes;
use lazysnap_registry::{Descriptor, Reference, RegistryClient};
use sha2::Digest as _;
use tokio::runtime::Handle;

use super::remote::Remote;

use super::layout::{Layout, Root, sha256_file};
use super::location::Location;
use crate::error::{Error, IoContext, Result};

/// Bytes per range request of a layer download.
const RANGE: u64 = 8 << 20;
/// Range requests of one download in flight at once.
const IN_FLIGHT: usize = 4;
/// Largest manifest or index accepted.
const DOCUMENT_LIMIT: u64 = 4 << 20;
/// Largest image config accepted.
const CONFIG_LIMIT: u64 = 16 << 20;

/// Where the image comes from.
pub(crate) enum Source {
    Registry(Remote),
    Layout {
        layout: Layout,
        tag: Option<String>,
        name: String,
    },
}

/// A layer blob on local disk.
#[derive(Debug, Clone)]
pub(crate) struct LocalBlob {
    pub path: PathBuf,
    /// A download of ours (deleted when done), not a file of the source layout.
    pub temporary: bool,
}

impl Source {
    pub fn open(loc: &Location, client: &RegistryClient, rt: Handle) -> Result<Source> {
        Ok(match loc {
            Location::Registry(r) => Source::Registry(Remote {
                client: client.clone(),
                reference: r.clone(),
                rt,
            }),
            Location::Layout { dir, tag } => Source::Layout {
                layout: Layout::open(dir)?,
                tag: tag.clone(),
                name: loc.to_string(),
            },
        })
    }

    /// The reference, when the image is in a registry (blobs can be mounted from it).
    pub fn reference(&self) -> Option<&Reference> {
        match self {
            Source::Registry(r) => Some(&r.reference),
            Source::Layout { .. } => None,
        }
    }

    /// The document the source names (a manifest or an index).
    pub fn root(&self) -> Result<Root> {
        match self {
            Source::Registry(r) => {
                let doc = r.block_on(r.client.fetch_manifest(&r.reference))?;
                Ok(Root {
                    bytes: doc.bytes,
                    media_type: doc.media_type,
                    digest: doc.digest,
                })
            }
            Source::Layout { layout, tag, .. } => layout.root(tag.as_deref()),
        }
    }

    /// A manifest an index names.
    pub fn document(&self, d: &Descriptor) -> Result<Bytes> {
        match self {
            Source::Registry(r) => {
                if d.size > DOCUMENT_LIMIT {
                    return Err(Error::InvalidArgument(format!(
                        "{}: manifest {} has {} bytes, more than {DOCUMENT_LIMIT}",
                        r.reference, d.digest, d.size
                    )));
                }
                let pinned = r.reference.with_digest(d.digest.clone());
                Ok(r.block_on(r.client.fetch_manifest(&pinned))?.bytes)
            }
            Source::Layout { layout, .. } => layout.read_blob(d, DOCUMENT_LIMIT),
        }
    }

    /// An image config.
    pub fn config(&self, d: &Descriptor) -> Result<Bytes> {
        match self {
            Source::Registry(r) => {
                Ok(r.block_on(r.client.fetch_blob(&r.reference, d, CONFIG_LIMIT))?)
            }
            Source::Layout { layout, .. } => layout.read_blob(d, CONFIG_LIMIT),
        }
    }

    /// Layer blob `d` as a local file, verified against its digest; downloads go to
    /// `dir`. `progress` hears of every piece that arrives.
    pub fn fetch_layer(
        &self,
        d: &Descriptor,
        dir: &Path,
        progress: &(dyn Fn(u64) + Sync),
    ) -> Result<LocalBlob> {
        if d.digest.algorithm() != "sha256" {
            return Err(Error::InvalidArgument(format!(
                "layer {}: only sha256 layer digests are supported",
                d.digest
            )));
        }
        let mismatch = |name: &str, got: &str| Error::Fetch {
            blob: format!("{name} layer {}", d.digest),
            reason: format!("content does not match its digest (it hashes to {got})"),
        };
        match self {
            Source::Layout { layout, name, .. } => {
                let path = layout.blob_path(&d.digest);
                let size = std::fs::metadata(&path)
                    .ctx(|| format!("{name}: layer {}", d.digest))?
                    .len();
                if size != d.size {
                    return Err(Error::Fetch {
                        blob: format!("{name} layer {}", d.digest),
                        reason: format!("{size} bytes, the manifest says {}", d.size),
                    });
                }
                let got = sha256_file(&path)?;
                if got != d.digest {
                    return Err(mismatch(name, got.as_str()));
                }
                progress(size);
                Ok(LocalBlob {
                    path,
                    temporary: false,
                })
            }
            Source::Registry(r) => {
                let reference = &r.reference;
                let blob = r.client.blob(reference, d)?;
                let path = dir.join(format!("{}.download", d.digest.hex()));
                let mut file = std::io::BufWriter::new(
                    std::fs::File::create(&path).ctx(|| format!("{}: create", path.display()))?,
                );
                let mut hash = sha2::Sha256::new();
                let size = d.size;
                r.block_on(async {
                    let mut pending = VecDeque::new();
                    let mut next = 0u64;
                    loop {
                        while pending.len() < IN_FLIGHT && next < size {
                            let len = RANGE.min(size - next);
                            let b = blob.clone();
                            let at = next;
                            pending.push_back(tokio::spawn(async move {
                                b.read_at(at, len as usize).await
                            }));
                            next += len;
                        }
                        let Some(task) = pending.pop_front() else {
                            return Ok::<_, Error>(());
                        };
                        let bytes = task.await.map_err(|e| Error::Fetch {
                            blob: format!("{reference} layer {}", d.digest),
                            reason: e.to_string(),
                        })??;
                        file.write_all(&bytes)
                            .ctx(|| format!("{}: write", path.display()))?;
                        hash.update(&bytes);
                        progress(bytes.len() as u64);
                    }
                })?;
                file.flush().ctx(|| format!("{}: write", path.display()))?;
                let got = format!("sha256:{}", hex::encode(hash.finalize()));
                if got != d.digest.as_str() {
                    let _ = std::fs::remove_file(&path);
                    return Err(mismatch(&reference.to_string(), &got));
                }
                Ok(LocalBlob {
                    path,
                    temporary: true,
                })
            }
        }
    }

    /// The source's name for messages.
    pub fn name(&self) -> String {
        match self {
            Source::Registry(r) => r.reference.to_string(),
            Source::Layout { name, .. } => name.clone(),
        }
    }
}
