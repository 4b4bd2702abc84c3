//! Writing the converted image: blobs first, then manifests by digest, and the tag
//! last (a registry manifest PUT by tag, or the rename of a layout's `index.json`),
//! so that a failure anywhere leaves no tag pointing at a partial image.

use std::path::PathBuf;

use bytes::Bytes;
use lazysnap_registry::{BlobSource, Descriptor, Digest, PushOutcome, Reference, RegistryClient};
use tokio::runtime::Handle;

use super::layout::{Layout, entry_media_type};
use super::location::Location;
use super::remote::Remote;
use crate::error::{Error, Result};

/// Where the converted image goes.
pub(crate) enum Dest {
    Registry(Remote),
    Layout { layout: Layout, tag: String },
}

impl Dest {
    pub fn open(loc: &Location, client: &RegistryClient, rt: Handle) -> Result<Dest> {
        Ok(match loc {
            Location::Registry(r) => {
                if r.digest().is_some() {
                    return Err(Error::InvalidArgument(format!(
                        "{r}: the destination must be a tag, not a digest"
                    )));
                }
                Dest::Registry(Remote {
                    client: client.clone(),
                    reference: r.clone(),
                    rt,
                })
            }
            Location::Layout { dir, tag } => Dest::Layout {
                layout: Layout::create(dir)?,
                tag: tag.clone().unwrap_or_else(|| "latest".into()),
            },
        })
    }

    /// A directory where converted blobs are best written: inside the layout (so
    /// they are renamed into place), else none (the caller's temporary directory).
    pub fn scratch_dir(&self) -> Option<PathBuf> {
        match self {
            Dest::Layout { layout, .. } => Some(layout.scratch_dir()),
            Dest::Registry(_) => None,
        }
    }

    /// Makes blob `digest` present without sending it: `Some` when the destination
    /// has it, or mounted it from `mount_from` (same registry), else `None`.
    pub fn try_mount(
        &self,
        digest: &Digest,
        size: u64,
        mount_from: Option<&Reference>,
    ) -> Result<Option<PushOutcome>> {
        match self {
            Dest::Registry(r) => {
                let to = &r.reference;
                if r.block_on(r.client.blob_exists(to, digest))?.is_some() {
                    return Ok(Some(PushOutcome::Exists));
                }
                let Some(from) = mount_from
                    .filter(|f| f.registry() == to.registry() && f.repository() != to.repository())
                else {
                    return Ok(None);
                };
                let mounted = r.block_on(r.client.mount_blob(to, digest, from.repository()));
                Ok(matches!(mounted, Ok(true)).then_some(PushOutcome::Mounted))
            }
            Dest::Layout { layout, .. } => {
                Ok(layout.has_blob(digest, size).then_some(PushOutcome::Exists))
            }
        }
    }

    /// Stores blob `digest` of `size` bytes. A layout takes a file over (renames it)
    /// when `movable`, else copies it.
    pub fn put_blob(
        &self,
        digest: &Digest,
        size: u64,
        data: &BlobSource,
        movable: bool,
    ) -> Result<PushOutcome> {
        match self {
            Dest::Registry(r) => {
                Ok(r.block_on(r.client.push_blob(&r.reference, digest, size, data, None))?)
            }
            Dest::Layout { layout, .. } => {
                let added = match data {
                    BlobSource::File(path) => layout.put_blob_file(digest, path, movable)?,
                    BlobSource::Bytes(b) => layout.put_blob_bytes(digest, b)?,
                };
                Ok(if added {
                    PushOutcome::Uploaded
                } else {
                    PushOutcome::Exists
                })
            }
        }
    }

    /// Stores a manifest by digest (untagged).
    pub fn put_manifest(&self, media_type: &str, bytes: &Bytes) -> Result<Digest> {
        let digest = Digest::sha256_of(bytes);
        match self {
            Dest::Registry(r) => {
                let pinned = r.reference.with_digest(digest.clone());
                r.block_on(r.client.push_manifest(&pinned, media_type, bytes.clone()))?;
            }
            Dest::Layout { layout, .. } => {
                layout.put_blob_bytes(&digest, bytes)?;
            }
        }
        Ok(digest)
    }

    /// Stores the top document and points the tag at it: the last step.
    pub fn tag(&self, is_index: bool, bytes: &Bytes) -> Result<Digest> {
        let media_type = entry_media_type(is_index);
        match self {
            Dest::Registry(r) => Ok(r.block_on(r.client.push_manifest(
                &r.reference,
                media_type,
                bytes.clone(),
            ))?),
            Dest::Layout { layout, tag } => {
                let digest = self.put_manifest(media_type, bytes)?;
                layout.tag(
                    tag,
                    &Descriptor {
                        media_type: media_type.to_string(),
                        digest: digest.clone(),
                        size: bytes.len() as u64,
                        annotations: Default::default(),
                        urls: Vec::new(),
                        platform: None,
                    },
                )?;
                Ok(digest)
            }
        }
    }

    /// The destination's name for messages.
    pub fn name(&self) -> String {
        match self {
            Dest::Registry(r) => r.reference.to_string(),
            Dest::Layout { layout, tag } => format!("{}:{tag}", layout.name()),
        }
    }
}
