//! placeholder
use super::ApplyStats;
use crate::error::Result;
use crate::layer::RemoteLayer;
use std::path::Path;
pub fn apply(_layer: &RemoteLayer, _dest: &Path) -> Result<ApplyStats> {
    Err(crate::Error::Unavailable("later".into()))
}
