//! Disk usage of a directory tree, as containerd's `fs.DiskUsage`: blocks × 512 of
//! every distinct inode (hard links once), the root included.

use std::collections::HashSet;
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use super::Usage;
use crate::error::{IoContext, Result};

/// Walks `root` without following symlinks or crossing into other entries' targets.
pub fn disk_usage(root: &Path) -> Result<Usage> {
    let mut seen = HashSet::new();
    let mut usage = Usage::default();
    let mut stack = vec![root.to_path_buf()];
    while let Some(path) = stack.pop() {
        let md = fs::symlink_metadata(&path).ctx(|| format!("usage of {}", path.display()))?;
        if seen.insert((md.dev(), md.ino())) {
            usage.size += (md.blocks() * 512) as i64;
        }
        if md.is_dir() {
            for entry in fs::read_dir(&path).ctx(|| format!("usage of {}", path.display()))? {
                let entry = entry.ctx(|| format!("usage of {}", path.display()))?;
                stack.push(entry.path());
            }
        }
    }
    usage.inodes = seen.len() as i64;
    Ok(usage)
}
