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
/// CRI's list of this layer and the image's following ones (comma-separated, cut
/// to the label size limit).
pub const CRI_IMAGE_LAYERS: &str = "containerd.io/snapshot/cri.image-layers";
/// stargz-aware pullers' list of this and the following layers.
pub const STARGZ_LAYERS: &str = "containerd.io/snapshot/remote/stargz.layers";
/// stargz-aware pullers' image reference.
pub const STARGZ_REFERENCE: &str = "containerd.io/snapshot/remote/stargz.reference";
/// stargz-aware pullers' layer digest.
pub const STARGZ_DIGEST: &str = "containerd.io/snapshot/remote/stargz.digest";

/// Set with Update (any value but `false`) to ask for the snapshot to be unlazied.
/// It carries containerd's `containerd.io/snapshot/` prefix, which containerd's
/// metadata layer forwards to the snapshotter; it is never stored.
pub const UNLAZY: &str = "containerd.io/snapshot/lazysnap.unlazy";

/// Whether the labels ask for unlazy.
pub fn asks_unlazy(labels: &Labels) -> bool {
    labels
        .get(UNLAZY)
        .is_some_and(|v| !v.is_empty() && v != "false")
}

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
