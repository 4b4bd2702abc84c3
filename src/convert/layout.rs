//! OCI image layouts on disk: `oci-layout`, `index.json` and `blobs/<alg>/<hex>`.
//! Blobs are written under temporary names and renamed into place; `index.json` is
//! replaced the same way and last, so a reader never sees a tag whose content is
//! missing.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use bytes::Bytes;
use lazysnap_registry::{Descriptor, Digest};
use sha2::Digest as _;

use super::oci::media_types::{OCI_INDEX, OCI_MANIFEST};
use super::oci::{self, SourceIndex};
use crate::error::{Error, IoContext, Result};

/// The annotation that names an image in `index.json`.
pub const REF_NAME: &str = "org.opencontainers.image.ref.name";
const LAYOUT_FILE: &str = "oci-layout";
const LAYOUT_CONTENT: &[u8] = br#"{"imageLayoutVersion":"1.0.0"}"#;

/// An OCI image layout directory.
#[derive(Debug, Clone)]
pub struct Layout {
    dir: PathBuf,
}

/// The document a tag names: its bytes, media type and digest.
#[derive(Debug, Clone)]
pub(crate) struct Root {
    pub bytes: Bytes,
    pub media_type: String,
    pub digest: Digest,
}

/// sha256 of a file's content, read in 1 MiB pieces.
pub(crate) fn sha256_file(path: &Path) -> Result<Digest> {
    let mut f = std::fs::File::open(path).ctx(|| format!("{}: open", path.display()))?;
    let mut h = sha2::Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f
            .read(&mut buf)
            .ctx(|| format!("{}: read", path.display()))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Digest::parse(&format!("sha256:{}", hex::encode(h.finalize()))).map_err(Error::from)
}

impl Layout {
    /// An existing layout to read from.
    pub fn open(dir: &Path) -> Result<Layout> {
        if !dir.join("index.json").is_file() {
            return Err(Error::NotAnImage {
                image: format!("oci:{}", dir.display()),
                reason: "no index.json: not an OCI image layout".into(),
            });
        }
        Ok(Layout {
            dir: dir.to_path_buf(),
        })
    }

    /// A layout to write to, created if needed.
    pub fn create(dir: &Path) -> Result<Layout> {
        let blobs = dir.join("blobs/sha256");
        std::fs::create_dir_all(&blobs).ctx(|| format!("{}: create", blobs.display()))?;
        let marker = dir.join(LAYOUT_FILE);
        if !marker.exists() {
            write_atomic(&marker, LAYOUT_CONTENT)?;
        }
        Ok(Layout {
            dir: dir.to_path_buf(),
        })
    }

    /// `oci:DIR`, for messages.
    pub fn name(&self) -> String {
        format!("oci:{}", self.dir.display())
    }

    /// Where blob `digest` is (or goes).
    pub fn blob_path(&self, digest: &Digest) -> PathBuf {
        self.dir
            .join("blobs")
            .join(digest.algorithm())
            .join(digest.hex())
    }

    /// Where temporary files are made so that they can be renamed into place.
    pub fn scratch_dir(&self) -> PathBuf {
        self.dir.join("blobs/sha256")
    }

    fn read_index(&self) -> Result<(Vec<u8>, serde_json::Value)> {
        let path = self.dir.join("index.json");
        let bytes = std::fs::read(&path).ctx(|| format!("{}: read", path.display()))?;
        let value = serde_json::from_slice(&bytes).map_err(|e| Error::NotAnImage {
            image: self.name(),
            reason: format!("index.json is not JSON: {e}"),
        })?;
        Ok((bytes, value))
    }

    /// The document `tag` names. Without a tag: the only entry, or, when every entry
    /// is a platform manifest and none is named, `index.json` itself as the index.
    pub(crate) fn root(&self, tag: Option<&str>) -> Result<Root> {
        let (bytes, value) = self.read_index()?;
        let index: SourceIndex = serde_json::from_value(value).map_err(|e| Error::NotAnImage {
            image: self.name(),
            reason: format!("index.json is not an image index: {e}"),
        })?;
        let tags: Vec<&str> = index
            .manifests
            .iter()
            .filter_map(|d| d.annotations.get(REF_NAME).map(String::as_str))
            .collect();
        let entry = match tag {
            Some(t) => index
                .manifests
                .iter()
                .rev()
                .find(|d| d.annotations.get(REF_NAME).map(String::as_str) == Some(t))
                .ok_or_else(|| Error::NotAnImage {
                    image: format!("{}:{t}", self.name()),
                    reason: format!("no such tag (tags: {})", tags.join(", ")),
                })?,
            None if index.manifests.len() == 1 => &index.manifests[0],
            None if tags.is_empty()
                && !index.manifests.is_empty()
                && index.manifests.iter().all(|d| d.platform.is_some()) =>
            {
                return Ok(Root {
                    digest: Digest::sha256_of(&bytes),
                    bytes: Bytes::from(bytes),
                    media_type: OCI_INDEX.to_string(),
                });
            }
            None => {
                return Err(Error::NotAnImage {
                    image: self.name(),
                    reason: format!(
                        "{} images in index.json (tags: {}); name one as oci:DIR:TAG",
                        index.manifests.len(),
                        tags.join(", ")
                    ),
                });
            }
        };
        let bytes = self.read_blob(entry, 4 << 20)?;
        Ok(Root {
            bytes,
            media_type: entry.media_type.clone(),
            digest: entry.digest.clone(),
        })
    }

    /// A small blob (manifest, config), checked against its descriptor.
    pub(crate) fn read_blob(&self, d: &Descriptor, limit: u64) -> Result<Bytes> {
        if d.size > limit {
            return Err(Error::InvalidArgument(format!(
                "{}: blob {} has {} bytes, more than {limit} for a document",
                self.name(),
                d.digest,
                d.size
            )));
        }
        let path = self.blob_path(&d.digest);
        let bytes = std::fs::read(&path).ctx(|| format!("{}: blob {}", self.name(), d.digest))?;
        if bytes.len() as u64 != d.size || !d.digest.matches(&bytes) {
            return Err(Error::InvalidArgument(format!(
                "{}: blob {} does not match its digest and size",
                self.name(),
                d.digest
            )));
        }
        Ok(Bytes::from(bytes))
    }

    /// Whether the layout has blob `digest` with `size` bytes.
    pub fn has_blob(&self, digest: &Digest, size: u64) -> bool {
        std::fs::metadata(self.blob_path(digest)).is_ok_and(|m| m.len() == size)
    }

    /// Puts the file `src` in as blob `digest`: renamed when `movable` (it must be on
    /// the same filesystem), else copied. `false` when the blob was there already.
    pub fn put_blob_file(&self, digest: &Digest, src: &Path, movable: bool) -> Result<bool> {
        let size = std::fs::metadata(src)
            .ctx(|| format!("{}: stat", src.display()))?
            .len();
        if self.has_blob(digest, size) {
            return Ok(false);
        }
        let dst = self.blob_path(digest);
        if movable {
            readable(
                &std::fs::File::open(src).ctx(|| format!("{}: open", src.display()))?,
                &dst,
            )?;
            std::fs::rename(src, &dst).ctx(|| format!("{}: rename", dst.display()))?;
            return Ok(true);
        }
        let mut tmp = tempfile::NamedTempFile::new_in(self.scratch_dir())
            .ctx(|| format!("{}: temporary file", self.scratch_dir().display()))?;
        let mut from = std::fs::File::open(src).ctx(|| format!("{}: open", src.display()))?;
        std::io::copy(&mut from, tmp.as_file_mut())
            .ctx(|| format!("{}: copy to {}", src.display(), dst.display()))?;
        readable(tmp.as_file(), &dst)?;
        tmp.persist(&dst)
            .map_err(|e| Error::io(format!("{}: rename", dst.display()), e.error))?;
        Ok(true)
    }

    /// Puts `bytes` in as blob `digest`; `false` when it was there already.
    pub fn put_blob_bytes(&self, digest: &Digest, bytes: &[u8]) -> Result<bool> {
        if self.has_blob(digest, bytes.len() as u64) {
            return Ok(false);
        }
        write_atomic(&self.blob_path(digest), bytes)?;
        Ok(true)
    }

    /// Points `tag` at `descriptor` in `index.json` (replacing the entry the tag had),
    /// with a rename, so readers see the old index or the new one.
    pub fn tag(&self, tag: &str, descriptor: &Descriptor) -> Result<()> {
        let path = self.dir.join("index.json");
        let mut manifests: Vec<Descriptor> = Vec::new();
        let mut annotations = BTreeMap::new();
        if path.exists() {
            let (_, value) = self.read_index()?;
            let old: SourceIndex =
                serde_json::from_value(value).map_err(|e| Error::NotAnImage {
                    image: self.name(),
                    reason: format!("index.json is not an image index: {e}"),
                })?;
            annotations = old.annotations;
            manifests = old
                .manifests
                .into_iter()
                .filter(|d| d.annotations.get(REF_NAME).map(String::as_str) != Some(tag))
                .collect();
        }
        let mut entry = descriptor.clone();
        entry.annotations.insert(REF_NAME.into(), tag.into());
        manifests.push(entry);
        let index = oci::Index {
            schema_version: 2,
            media_type: OCI_INDEX,
            manifests: &manifests,
            annotations: &annotations,
        };
        write_atomic(&path, &oci::to_json(&index)?)
    }
}

/// Writes a file under a temporary name in its directory, then renames it.
fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut tmp = tempfile::NamedTempFile::new_in(dir)
        .ctx(|| format!("{}: temporary file", dir.display()))?;
    tmp.write_all(bytes)
        .ctx(|| format!("{}: write", path.display()))?;
    tmp.as_file()
        .sync_all()
        .ctx(|| format!("{}: sync", path.display()))?;
    readable(tmp.as_file(), path)?;
    tmp.persist(path)
        .map_err(|e| Error::io(format!("{}: rename", path.display()), e.error))?;
    Ok(())
}

/// Layout files are world-readable, as other tools write them (temporary files
/// start out private).
pub(crate) fn readable(f: &std::fs::File, path: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    f.set_permissions(std::fs::Permissions::from_mode(0o644))
        .ctx(|| format!("{}: chmod", path.display()))
}

/// The media type a tagged entry of `index.json` gets for a manifest document.
pub(crate) fn entry_media_type(is_index: bool) -> &'static str {
    if is_index { OCI_INDEX } else { OCI_MANIFEST }
}
