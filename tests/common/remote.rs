//! Lazily mountable images for daemon tests: one-layer eStargz images of random files
//! pushed to a real registry, the remote-snapshot labels a puller would send for them,
//! and the expected content of every file to check reads against.

use std::collections::HashMap;
use std::path::Path;

use lazysnap::format::Format;
use lazysnap::format::writer::WriteOptions;

use super::registry::{Layer, Registry, sha256_hex};

/// One pushed one-layer image and the files of its layer.
pub struct RemoteImage {
    /// `host/repo:tag` on the registry it was pushed to.
    pub reference: String,
    /// The layer blob's digest.
    pub digest: String,
    /// The layer's chain id (its diff id: it is the only layer).
    pub chain_id: String,
    /// The layer descriptor's annotations (TOC digest).
    pub annotations: HashMap<String, String>,
    /// Compressed size of the layer blob.
    pub blob_size: usize,
    /// Regular files: path relative to the layer root, content.
    pub files: Vec<(String, Vec<u8>)>,
}

impl RemoteImage {
    /// The labels `ctr-remote rpull` sends for this layer, with the image reference
    /// rewritten to `host` (a proxy in front of the registry, say).
    pub fn labels_via(&self, host: &str) -> HashMap<String, String> {
        let (_, repo_tag) = self.reference.split_once('/').expect("host/repo:tag");
        let mut l = self.annotations.clone();
        l.insert("containerd.io/snapshot.ref".into(), self.chain_id.clone());
        l.insert(
            "containerd.io/snapshot/remote/stargz.reference".into(),
            format!("{host}/{repo_tag}"),
        );
        l.insert(
            "containerd.io/snapshot/remote/stargz.digest".into(),
            self.digest.clone(),
        );
        l
    }

    /// The labels with the reference as pushed.
    pub fn labels(&self) -> HashMap<String, String> {
        let host = self.reference.split('/').next().expect("host");
        self.labels_via(host)
    }

    /// Checks every file under `root` (this layer's mount) against its content;
    /// returns the bytes compared.
    pub fn verify_tree(&self, root: &Path) -> u64 {
        let mut n = 0;
        for (path, want) in &self.files {
            let got = std::fs::read(root.join(path))
                .unwrap_or_else(|e| panic!("{}: {path}: {e}", self.digest));
            assert!(
                got == *want,
                "{}: {path}: wrong bytes served through {}",
                self.digest,
                root.display()
            );
            n += got.len() as u64;
        }
        n
    }
}

/// A tar of `count` incompressible files of about `size` bytes in two directories,
/// named `{a,b}/f<i>-<seed>.bin`; `seed` makes every layer's content (and so every
/// chunk digest, and every path) distinct.
pub fn random_files_tar(seed: u64, count: usize, size: usize) -> (Vec<u8>, Vec<(String, Vec<u8>)>) {
    let mut b = tar::Builder::new(Vec::new());
    let mut files = Vec::new();
    for d in ["a/", "b/"] {
        let mut h = tar::Header::new_ustar();
        h.set_entry_type(tar::EntryType::Directory);
        h.set_mode(0o755);
        h.set_size(0);
        h.set_mtime(1_600_000_000);
        b.append_data(&mut h, d, std::io::empty()).expect("dir");
    }
    for i in 0..count {
        let path = format!("{}/f{i}-{seed}.bin", if i % 2 == 0 { "a" } else { "b" });
        // sizes vary a little so that files end at different chunk offsets
        let data = super::prng_bytes(seed * 1000 + i as u64, size - (i * 997) % (size / 4));
        let mut h = tar::Header::new_ustar();
        h.set_entry_type(tar::EntryType::Regular);
        h.set_mode(0o644);
        h.set_size(data.len() as u64);
        h.set_mtime(1_600_000_000);
        b.append_data(&mut h, &path, data.as_slice()).expect("file");
        files.push((path, data));
    }
    (b.into_inner().expect("tar"), files)
}

/// Pushes `count` one-layer eStargz images (`repo/<i>:t`) of random files, chunked
/// at `chunk_size`, to `reg`.
pub fn push_random_images(
    reg: &Registry,
    repo: &str,
    count: usize,
    files: usize,
    file_size: usize,
    chunk_size: u64,
) -> Vec<RemoteImage> {
    (0..count)
        .map(|i| {
            let (tar, content) = random_files_tar(i as u64 + 1, files, file_size);
            let layer = Layer::convert(
                &tar,
                &WriteOptions {
                    format: Format::Estargz,
                    chunk_size,
                    level: Some(1),
                    ..WriteOptions::default()
                },
            );
            let digest = format!("sha256:{}", sha256_hex(&layer.blob));
            let blob_size = layer.blob.len();
            let chain_id = layer.diff_id.clone();
            let annotations = layer.annotations.clone().into_iter().collect();
            let reference = reg.push_image(&format!("{repo}/{i}"), "t", &[layer]);
            RemoteImage {
                reference,
                digest,
                chain_id,
                annotations,
                blob_size,
                files: content,
            }
        })
        .collect()
}
