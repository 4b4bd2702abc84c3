//! Which layers of an image can be read lazily, and with which TOC digest.

use std::collections::BTreeMap;

use crate::error::{Error, Result};
use crate::format::{
    ANNOTATION_TOC_DIGEST, ANNOTATION_ZSTD_CHECKSUM, ANNOTATION_ZSTD_CHECKSUM_OLD,
    ANNOTATION_ZSTD_POSITION, ANNOTATION_ZSTD_POSITION_OLD, Digest, Format, OpenOptions, footer,
};

/// How to open a layer lazily, from its descriptor annotations; `None` when the layer
/// carries no TOC digest (plain tar.gz, or a layer that cannot be verified).
pub fn open_options(annotations: &BTreeMap<String, String>) -> Result<Option<OpenOptions>> {
    let estargz = annotations.get(ANNOTATION_TOC_DIGEST);
    let zstd = annotations
        .get(ANNOTATION_ZSTD_CHECKSUM)
        .or_else(|| annotations.get(ANNOTATION_ZSTD_CHECKSUM_OLD));
    let digest = match (estargz, zstd) {
        (Some(d), _) | (None, Some(d)) => d,
        (None, None) => return Ok(None),
    };
    let toc_digest: Digest = digest
        .parse()
        .map_err(|_| Error::Toc(format!("TOC digest annotation {digest:?} is not a digest")))?;
    // the manifest position lets the TOC be fetched without reading the footer
    let position = annotations
        .get(ANNOTATION_ZSTD_POSITION)
        .map(|p| (p, Format::ZstdChunked))
        .or_else(|| {
            annotations
                .get(ANNOTATION_ZSTD_POSITION_OLD)
                .map(|p| (p, Format::EstargzZstd))
        });
    let toc_location = match (estargz, position) {
        (None, Some((p, f))) => footer::parse_manifest_position(p, f).ok(),
        _ => None,
    };
    Ok(Some(OpenOptions {
        toc_digest: Some(toc_digest),
        toc_location,
        allow_unverified: false,
    }))
}
