//! What containerd's own pull records, computed without containerd: chain ids, the
//! garbage-collection labels that link index → manifests → config and layers, the
//! distribution-source label, and the labels each layer's Prepare carries so that a
//! remote snapshotter can mount it lazily (stargz and CRI families both).

use std::collections::BTreeMap;

use lazysnap::snapshot::labels::{
    CRI_IMAGE_LAYERS, CRI_IMAGE_REF, CRI_LAYER_DIGEST, MAX_LABEL_SIZE, STARGZ_DIGEST,
    STARGZ_LAYERS, STARGZ_REFERENCE, TARGET_REF,
};
use lazysnap_registry::{Descriptor, Digest, Reference};
use sha2::{Digest as _, Sha256};

/// Labels as containerd's API takes them.
pub type Labels = BTreeMap<String, String>;

/// CRI's manifest digest label (CRI's `AppendInfoHandlerWrapper`).
pub const CRI_MANIFEST_DIGEST: &str = "containerd.io/snapshot/cri.manifest-digest";
/// On a layer blob: the digest of its uncompressed tar, once it was unpacked.
pub const UNCOMPRESSED: &str = "containerd.io/uncompressed";
/// Layer descriptor annotations with this prefix become snapshot labels
/// (containerd's `snapshots.FilterInheritedLabels`).
const INHERITED_PREFIX: &str = "containerd.io/snapshot/";

/// The chain ids of a stack of layers: the first is its diff id, each next one
/// `sha256(parent_chain + " " + diff_id)` (OCI image-spec identity).
pub fn chain_ids(diff_ids: &[Digest]) -> Vec<String> {
    let mut out: Vec<String> = Vec::with_capacity(diff_ids.len());
    for d in diff_ids {
        let next = match out.last() {
            None => d.to_string(),
            Some(parent) => format!(
                "sha256:{}",
                hex::encode(Sha256::digest(format!("{parent} {d}").as_bytes()))
            ),
        };
        out.push(next);
    }
    out
}

/// The GC labels a parent document gets for its children, numbered per kind as
/// containerd's `SetChildrenMappedLabels` with `ChildGCLabels` does: configs
/// `…content.config`, manifests `…content.m.<n>`, layers `…content.l.<n>`.
pub fn gc_children(children: &[(&str, &Digest)]) -> Labels {
    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
    let mut out = Labels::new();
    for (media_type, digest) in children {
        let key = gc_key(media_type);
        let n = counts.entry(key).or_default();
        let name = if *n > 0 || key.ends_with('.') {
            format!("{key}{n}")
        } else {
            key.to_string()
        };
        *n += 1;
        out.insert(name, digest.to_string());
    }
    out
}

fn gc_key(media_type: &str) -> &'static str {
    use lazysnap_registry::media_types::{DOCKER_MANIFEST, OCI_MANIFEST};
    match media_type {
        "application/vnd.oci.image.config.v1+json"
        | "application/vnd.docker.container.image.v1+json" => "containerd.io/gc.ref.content.config",
        OCI_MANIFEST | DOCKER_MANIFEST => "containerd.io/gc.ref.content.m.",
        m if is_layer(m) => "containerd.io/gc.ref.content.l.",
        _ => "containerd.io/gc.ref.content.",
    }
}

/// containerd's `images.IsLayerType`.
fn is_layer(media_type: &str) -> bool {
    media_type.starts_with("application/vnd.oci.image.layer.")
        || media_type.starts_with("application/vnd.docker.image.rootfs.")
}

/// The content-store key of the garbage-collection reference from an image's config
/// to its top layer snapshot in `snapshotter`.
pub fn gc_snapshot_key(snapshotter: &str) -> String {
    format!("containerd.io/gc.ref.snapshot.{snapshotter}")
}

/// `containerd.io/distribution.source.<host>` (the host without its port, as Go's
/// `url.Hostname`) and the repository to add to its value.
pub fn distribution_source(reference: &Reference) -> (String, String) {
    let registry = reference.registry();
    let host = if let Some(rest) = registry.strip_prefix('[') {
        rest.split(']').next().unwrap_or(rest)
    } else {
        registry.split(':').next().unwrap_or(registry)
    };
    (
        format!("containerd.io/distribution.source.{host}"),
        reference.repository().to_string(),
    )
}

/// Adds `repo` to a distribution-source value: a sorted, de-duplicated comma list.
pub fn append_source(existing: Option<&str>, repo: &str) -> String {
    let mut repos: Vec<&str> = existing
        .unwrap_or("")
        .split(',')
        .filter(|r| !r.is_empty())
        .collect();
    repos.push(repo);
    repos.sort_unstable();
    repos.dedup();
    repos.join(",")
}

/// Whether containerd accepts the label (`labels.Validate`).
pub fn fits(key: &str, value: &str) -> bool {
    key.len() + value.len() <= MAX_LABEL_SIZE
}

/// `layers[i..]` digests, comma-separated, cut before the label would pass
/// containerd's size limit (dropping neighbours only costs prefetching).
fn following_layers(key: &str, layers: &[Descriptor], i: usize) -> String {
    let mut out = String::new();
    for l in layers.iter().skip(i) {
        let sep = if out.is_empty() { "" } else { "," };
        let next = format!("{out}{sep}{}", l.digest);
        if !fits(key, &next) {
            break;
        }
        out = next;
    }
    out
}

/// The labels of the Prepare for layer `i` whose chain id is `chain_id`: the
/// descriptor's inherited annotations (the eStargz TOC digest among them), the
/// target name, and both remote-layer label families.
pub fn layer_labels(
    reference: &Reference,
    manifest: &Digest,
    layers: &[Descriptor],
    i: usize,
    chain_id: &str,
) -> Labels {
    let mut out = Labels::new();
    let Some(layer) = layers.get(i) else {
        return out;
    };
    for (k, v) in &layer.annotations {
        if k.starts_with(INHERITED_PREFIX) && fits(k, v) {
            out.insert(k.clone(), v.clone());
        }
    }
    let image = reference.to_string();
    let digest = layer.digest.to_string();
    out.insert(TARGET_REF.into(), chain_id.into());
    out.insert(STARGZ_REFERENCE.into(), image.clone());
    out.insert(STARGZ_DIGEST.into(), digest.clone());
    out.insert(
        STARGZ_LAYERS.into(),
        following_layers(STARGZ_LAYERS, layers, i),
    );
    out.insert(CRI_IMAGE_REF.into(), image);
    out.insert(CRI_LAYER_DIGEST.into(), digest);
    out.insert(CRI_MANIFEST_DIGEST.into(), manifest.to_string());
    out.insert(
        CRI_IMAGE_LAYERS.into(),
        following_layers(CRI_IMAGE_LAYERS, layers, i),
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(c: char) -> Digest {
        Digest::parse(&format!("sha256:{}", c.to_string().repeat(64))).unwrap()
    }

    fn layer(c: char) -> Descriptor {
        Descriptor {
            media_type: "application/vnd.oci.image.layer.v1.tar+gzip".into(),
            digest: d(c),
            size: 1,
            annotations: [
                (
                    "containerd.io/snapshot/stargz/toc.digest".to_string(),
                    d('f').to_string(),
                ),
                ("org.example.other".to_string(), "x".to_string()),
            ]
            .into(),
            urls: Vec::new(),
            platform: None,
        }
    }

    #[test]
    fn chain_ids_follow_the_image_spec() {
        // the alpine 3.x two-layer example is not at hand; check the definition
        let (a, b) = (d('a'), d('b'));
        let ids = chain_ids(&[a.clone(), b.clone()]);
        assert_eq!(ids[0], a.to_string());
        let want = format!(
            "sha256:{}",
            hex::encode(Sha256::digest(format!("{a} {b}").as_bytes()))
        );
        assert_eq!(ids[1], want);
        assert!(chain_ids(&[]).is_empty());
    }

    #[test]
    fn gc_labels_number_children_per_kind() {
        let (c, l0, l1) = (d('c'), d('1'), d('2'));
        let m = gc_children(&[
            ("application/vnd.oci.image.config.v1+json", &c),
            ("application/vnd.oci.image.layer.v1.tar+gzip", &l0),
            ("application/vnd.docker.image.rootfs.diff.tar.gzip", &l1),
        ]);
        assert_eq!(m["containerd.io/gc.ref.content.config"], c.to_string());
        assert_eq!(m["containerd.io/gc.ref.content.l.0"], l0.to_string());
        assert_eq!(m["containerd.io/gc.ref.content.l.1"], l1.to_string());
        assert_eq!(m.len(), 3);
        let i = gc_children(&[
            ("application/vnd.oci.image.manifest.v1+json", &l0),
            ("application/vnd.oci.image.manifest.v1+json", &l1),
        ]);
        assert_eq!(i["containerd.io/gc.ref.content.m.1"], l1.to_string());
    }

    #[test]
    fn distribution_source_drops_the_port() {
        let r = Reference::parse("127.0.0.1:5000/a/b:c").unwrap();
        assert_eq!(
            distribution_source(&r),
            (
                "containerd.io/distribution.source.127.0.0.1".into(),
                "a/b".into()
            )
        );
        let r = Reference::parse("[::1]:5000/a:c").unwrap();
        assert_eq!(
            distribution_source(&r).0,
            "containerd.io/distribution.source.::1"
        );
        let r = Reference::parse("busybox").unwrap();
        assert_eq!(
            distribution_source(&r),
            (
                "containerd.io/distribution.source.docker.io".into(),
                "library/busybox".into()
            )
        );
        assert_eq!(append_source(Some("z/y,a/b"), "m/n"), "a/b,m/n,z/y");
        assert_eq!(append_source(Some("a/b"), "a/b"), "a/b");
        assert_eq!(append_source(None, "a/b"), "a/b");
    }

    #[test]
    fn layer_labels_carry_both_families_and_inherited_annotations() {
        let r = Reference::parse("127.0.0.1:5000/a/b:c").unwrap();
        let layers = vec![layer('1'), layer('2'), layer('3')];
        let l = layer_labels(&r, &d('9'), &layers, 1, "sha256:chain");
        assert_eq!(l[TARGET_REF], "sha256:chain");
        assert_eq!(l[STARGZ_REFERENCE], "127.0.0.1:5000/a/b:c");
        assert_eq!(l[CRI_LAYER_DIGEST], d('2').to_string());
        assert_eq!(l[STARGZ_LAYERS], format!("{},{}", d('2'), d('3')));
        assert_eq!(l[CRI_IMAGE_LAYERS], l[STARGZ_LAYERS]);
        assert_eq!(
            l["containerd.io/snapshot/stargz/toc.digest"],
            d('f').to_string()
        );
        assert!(!l.contains_key("org.example.other"));
    }

    #[test]
    fn layer_lists_stay_under_the_label_limit() {
        let many: Vec<Descriptor> = (0..100).map(|_| layer('a')).collect();
        let s = following_layers(STARGZ_LAYERS, &many, 0);
        assert!(fits(STARGZ_LAYERS, &s));
        assert!(s.split(',').count() > 10 && s.split(',').count() < 100);
        assert!(!s.ends_with(','));
    }
}
