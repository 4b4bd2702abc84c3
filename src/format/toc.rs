//! The table-of-contents JSON shared by eStargz (`stargz.index.json`) and
//! zstd:chunked, and reading it out of a blob.

use std::collections::BTreeMap;
use std::io::Read;

use serde::{Deserialize, Serialize};

use super::digest::Digest;
use super::footer::TocLocation;
use super::tarhdr;
use crate::error::{Error, Result};

/// Name of the tar entry that holds an eStargz TOC.
pub const TOC_TAR_NAME: &str = "stargz.index.json";
/// Prefetch landmark: files before it are read at mount.
pub const PREFETCH_LANDMARK: &str = ".prefetch.landmark";
/// No-prefetch landmark: its presence at the root disables prefetch.
pub const NO_PREFETCH_LANDMARK: &str = ".no.prefetch.landmark";

/// The whole TOC document.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Toc {
    pub version: i32,
    pub entries: Vec<TocEntry>,
    #[serde(
        rename = "tarSplitDigest",
        default,
        skip_serializing_if = "String::is_empty"
    )]
    pub tar_split_digest: String,
}

fn is_zero(v: &i64) -> bool {
    *v == 0
}

/// One TOC entry; the union of the eStargz and zstd:chunked fields. Absent fields
/// read as zero/empty, exactly as Go's `omitempty` writers leave them out.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct TocEntry {
    pub name: String,
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(skip_serializing_if = "is_zero")]
    pub size: i64,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub modtime: String,
    #[serde(rename = "accesstime", skip_serializing_if = "String::is_empty")]
    pub access_time: String,
    #[serde(rename = "changetime", skip_serializing_if = "String::is_empty")]
    pub change_time: String,
    #[serde(rename = "linkName", skip_serializing_if = "String::is_empty")]
    pub link_name: String,
    #[serde(skip_serializing_if = "is_zero")]
    pub mode: i64,
    #[serde(skip_serializing_if = "is_zero")]
    pub uid: i64,
    #[serde(skip_serializing_if = "is_zero")]
    pub gid: i64,
    #[serde(rename = "userName", skip_serializing_if = "String::is_empty")]
    pub user_name: String,
    #[serde(rename = "groupName", skip_serializing_if = "String::is_empty")]
    pub group_name: String,
    #[serde(skip_serializing_if = "is_zero")]
    pub offset: i64,
    #[serde(rename = "endOffset", skip_serializing_if = "is_zero")]
    pub end_offset: i64,
    #[serde(rename = "innerOffset", skip_serializing_if = "is_zero")]
    pub inner_offset: i64,
    #[serde(rename = "devMajor", skip_serializing_if = "is_zero")]
    pub dev_major: i64,
    #[serde(rename = "devMinor", skip_serializing_if = "is_zero")]
    pub dev_minor: i64,
    /// Attribute name → base64 of the value bytes (both families store base64).
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub xattrs: BTreeMap<String, String>,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub digest: String,
    #[serde(rename = "chunkOffset", skip_serializing_if = "is_zero")]
    pub chunk_offset: i64,
    #[serde(rename = "chunkSize", skip_serializing_if = "is_zero")]
    pub chunk_size: i64,
    #[serde(rename = "chunkDigest", skip_serializing_if = "String::is_empty")]
    pub chunk_digest: String,
    #[serde(rename = "chunkType", skip_serializing_if = "String::is_empty")]
    pub chunk_type: String,
}

/// A TOC read out of a blob, with the digests that can vouch for it.
#[derive(Debug, Clone)]
pub struct TocBytes {
    /// The uncompressed JSON exactly as stored.
    pub json: Vec<u8>,
    /// sha256 of `json`: the eStargz `toc.digest` annotation.
    pub digest: Digest,
    /// For zstd TOCs, sha256 of the compressed frame payload: the zstd:chunked
    /// `manifest-checksum` annotation.
    pub compressed_digest: Option<Digest>,
}

impl TocBytes {
    /// Checks `expected` against the digests a TOC may be named by.
    pub fn verify(&self, expected: &Digest) -> Result<()> {
        if *expected == self.digest || self.compressed_digest.as_ref() == Some(expected) {
            return Ok(());
        }
        Err(Error::TocDigest {
            expected: expected.to_string(),
            actual: match &self.compressed_digest {
                Some(c) => format!("{} (manifest checksum {c})", self.digest),
                None => self.digest.to_string(),
            },
        })
    }
}

/// Extracts the TOC JSON from the compressed bytes of `loc.range()`.
pub fn read_toc(loc: &TocLocation, compressed: &[u8]) -> Result<TocBytes> {
    let limit = crate::format::MAX_TOC_SIZE;
    match *loc {
        TocLocation::Gzip { .. } => {
            let mut tar = Vec::new();
            flate2::read::GzDecoder::new(compressed)
                .take(limit + 2048)
                .read_to_end(&mut tar)
                .map_err(|e| Error::Toc(format!("gzip member does not decompress: {e}")))?;
            let hdr = tarhdr::Header::parse(&tar)
                .map_err(|e| Error::Toc(format!("TOC tar header: {e}")))?
                .ok_or_else(|| Error::Toc("TOC member holds no tar entry".into()))?;
            if hdr.name_bytes() != TOC_TAR_NAME.as_bytes() {
                return Err(Error::Toc(format!(
                    "TOC member holds {:?}, not {TOC_TAR_NAME}",
                    String::from_utf8_lossy(&hdr.name_bytes())
                )));
            }
            let size = hdr.size;
            if size > limit {
                return Err(Error::Toc(format!("TOC of {size} bytes exceeds the limit")));
            }
            let json = tar
                .get(512..512 + size as usize)
                .ok_or_else(|| Error::Toc(format!("TOC entry of {size} bytes is truncated")))?
                .to_vec();
            let digest = Digest::of(&json);
            Ok(TocBytes {
                json,
                digest,
                compressed_digest: None,
            })
        }
        TocLocation::Zstd { uncompressed, .. } => {
            let mut json = Vec::with_capacity(uncompressed.min(limit) as usize);
            zstd::stream::read::Decoder::new(compressed)
                .map_err(|e| Error::Toc(format!("zstd: {e}")))?
                .take(uncompressed + 1)
                .read_to_end(&mut json)
                .map_err(|e| Error::Toc(format!("zstd TOC does not decompress: {e}")))?;
            if json.len() as u64 != uncompressed {
                return Err(Error::Toc(format!(
                    "TOC decompresses to {} bytes, the footer says {uncompressed}",
                    json.len()
                )));
            }
            let digest = Digest::of(&json);
            Ok(TocBytes {
                json,
                digest,
                compressed_digest: Some(Digest::of(compressed)),
            })
        }
    }
}

/// Parses TOC JSON.
pub fn parse_json(json: &[u8]) -> Result<Toc> {
    let toc: Toc =
        serde_json::from_slice(json).map_err(|e| Error::Toc(format!("invalid JSON: {e}")))?;
    if toc.version != 1 {
        return Err(Error::Toc(format!(
            "version {} is not supported (only 1)",
            toc.version
        )));
    }
    Ok(toc)
}
