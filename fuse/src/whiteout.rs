//! The overlay form. A layer mount is an overlayfs lower dir, and overlayfs does not read
//! OCI whiteout files: it wants a 0:0 character device where a lower file is deleted and
//! `trusted.overlay.opaque=y` on a directory that hides all lower content. This module
//! rewrites one directory's names into that form.

/// Marks its directory opaque (OCI image spec, "Opaque Whiteout").
const OPAQUE_MARKER: &[u8] = b".wh..wh..opq";
/// Prefix of a whiteout file.
const PREFIX: &[u8] = b".wh.";
/// Prefix of AUFS metadata (`.wh..wh.plnk`, ...): hidden, never a whiteout.
const META_PREFIX: &[u8] = b".wh..wh.";

/// The xattr overlayfs reads to find an opaque directory.
pub(crate) const OPAQUE_XATTR: &[u8] = b"trusted.overlay.opaque";

/// Rewrites the `(name, node)` children of one directory into overlay form and says
/// whether the directory is opaque.
///
/// `.wh.<name>` becomes `<name>` backed by the node `make_whiteout(old)` returns (a 0:0
/// character device), unless a real `<name>` exists here, which wins. Every other
/// `.wh.`-prefixed name is dropped.
pub(crate) fn apply(
    children: &mut Vec<(Box<[u8]>, u32)>,
    mut make_whiteout: impl FnMut(u32) -> u32,
) -> bool {
    if !children.iter().any(|(name, _)| name.starts_with(PREFIX)) {
        return false;
    }
    let real: std::collections::HashSet<Box<[u8]>> = children
        .iter()
        .filter(|(name, _)| !name.starts_with(PREFIX))
        .map(|(name, _)| name.clone())
        .collect();
    let mut opaque = false;
    let mut out = Vec::with_capacity(children.len());
    for (name, node) in children.drain(..) {
        if !name.starts_with(PREFIX) {
            out.push((name, node));
            continue;
        }
        if &*name == OPAQUE_MARKER {
            opaque = true;
            continue;
        }
        if name.starts_with(META_PREFIX) {
            continue;
        }
        let target = &name[PREFIX.len()..];
        if matches!(target, b"" | b"." | b"..") || real.contains(target) {
            continue;
        }
        out.push((target.into(), make_whiteout(node)));
    }
    *children = out;
    opaque
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(v: &[(Box<[u8]>, u32)]) -> Vec<(String, u32)> {
        let mut n: Vec<_> = v
            .iter()
            .map(|(k, n)| (String::from_utf8_lossy(k).into_owned(), *n))
            .collect();
        n.sort();
        n
    }

    fn entry(name: &str, node: u32) -> (Box<[u8]>, u32) {
        (name.as_bytes().into(), node)
    }

    #[test]
    fn whiteouts_become_devices_and_markers_vanish() {
        let mut v = vec![
            entry("keep", 1),
            entry(".wh.gone", 2),
            entry(".wh..wh..opq", 3),
            entry(".wh..wh.plnk", 4),
            entry(".wh.", 5),
            entry(".wh..", 6),
        ];
        let opaque = apply(&mut v, |old| old + 100);
        assert!(opaque);
        assert_eq!(
            names(&v),
            vec![("gone".to_string(), 102), ("keep".to_string(), 1)]
        );
    }

    #[test]
    fn a_real_entry_wins_over_its_whiteout() {
        let mut v = vec![entry("x", 1), entry(".wh.x", 2)];
        assert!(!apply(&mut v, |old| old + 100));
        assert_eq!(names(&v), vec![("x".to_string(), 1)]);
    }

    #[test]
    fn plain_directories_are_untouched() {
        let mut v = vec![entry("a", 1), entry("b", 2)];
        assert!(!apply(&mut v, |_| unreachable!()));
        assert_eq!(v.len(), 2);
    }
}
