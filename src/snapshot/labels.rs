//! The labels of the remote-snapshot protocol and containerd's label size limit.

use super::Labels;
use crate::error::{Error, Result};

/// The name the committed layer snapshot gets (its chain id); its presence asks for a
/// remote snapshot.
pub const TARGET_REF: &str = "containerd.io/snapshot.ref";
/// Set on snapshots whose directory is a remote mount.
pub const REMOTE: &str = "containerd.io/snapshot/remote";
/// The value of [`REMOTE`] (stargz-snapshotter's).
pub const REMOTE_VALUE: &str = "remote snapshot";
/// CRI's image reference.
pub const CRI_IMAGE_REF: &str = "containerd.io/snapshot/cri.image-ref";
/// CRI's layer digest.
pub const CRI_LAYER_DIGEST: &str = "containerd.io/snapshot/cri.layer-digest";
/// stargz-aware pullers' image reference.
pub const STARGZ_REFERENCE: &str = "containerd.io/snapshot/remote/stargz.reference";
/// stargz-aware pullers' layer digest.
pub const STARGZ_DIGEST: &str = "containerd.io/snapshot/remote/stargz.digest";

/// containerd's cap on `len(key) + len(value)` (labels/validate.go).
pub const MAX_LABEL_SIZE: usize = 4096;

/// Rejects labels containerd itself would reject.
pub fn validate(labels: &Labels) -> Result<()> {
    for (k, v) in labels {
        if k.is_empty() {
            return Err(Error::InvalidArgument("label key must not be empty".into()));
        }
        if k.len() + v.len() > MAX_LABEL_SIZE {
            return Err(Error::InvalidArgument(format!(
                "label key and value length ({} bytes) greater than maximum size ({MAX_LABEL_SIZE} bytes), key: {k}",
                k.len() + v.len()
            )));
        }
    }
    Ok(())
}

/// Whether the labels identify a layer in either label family (CRI or stargz).
pub fn identifies_layer(labels: &Labels) -> bool {
    let has = |k: &str| labels.get(k).is_some_and(|v| !v.is_empty());
    (has(CRI_LAYER_DIGEST) && has(CRI_IMAGE_REF)) || (has(STARGZ_DIGEST) && has(STARGZ_REFERENCE))
}

/// Whether the snapshot's directory is a remote mount.
pub fn is_remote(labels: &Labels) -> bool {
    labels.contains_key(REMOTE)
}
