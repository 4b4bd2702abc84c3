//! What a layer entry's name means once extracted: a path below the root (never
//! above it) and, for `.wh.` names, an overlay whiteout or opaque marker.

use crate::error::Result;
use crate::format::index::clean_path;

/// Prefix of a whiteout name (OCI image spec, "Whiteouts").
const WHITEOUT: &str = ".wh.";
/// Marks its directory opaque.
const OPAQUE_MARKER: &str = ".wh..wh..opq";
/// Prefix of AUFS metadata names (`.wh..wh.plnk`): never extracted.
const META: &str = ".wh..wh.";

/// The xattr overlayfs reads to find an opaque directory.
pub const OPAQUE_XATTR: &str = "trusted.overlay.opaque";

/// What an entry's name asks for.
#[derive(Debug, PartialEq, Eq)]
pub enum Name<'a> {
    /// The layer root itself (`./`, `/`).
    Root,
    /// An ordinary entry `base` in the directory `parents`.
    Entry {
        parents: Vec<&'a str>,
        base: &'a str,
    },
    /// `.wh.<target>`: a 0:0 character device `target` in `parents`.
    Whiteout {
        parents: Vec<&'a str>,
        target: &'a str,
    },
    /// `.wh..wh..opq`: the directory `parents` is opaque.
    Opaque { parents: Vec<&'a str> },
    /// Not extracted: AUFS metadata or a whiteout of nothing.
    Hidden,
}

/// Classifies a tar or TOC name. A leading `/` or `./` is dropped, as GNU tar and
/// containerd do; a `..` component is refused with [`crate::Error::UnsafePath`].
///
/// A name below a `.wh.` directory is never shown by overlayfs; it stands for that
/// directory, which the layer did not list itself: the second value is then `true`,
/// and the entry takes an implicit directory's attributes (as in the FUSE view).
pub fn classify(name: &str) -> Result<(Name<'_>, bool)> {
    let mut comps = clean_path(name)?;
    let implicit = match comps.iter().position(|c| c.starts_with(WHITEOUT)) {
        Some(i) if i + 1 < comps.len() => {
            comps.truncate(i + 1);
            true
        }
        _ => false,
    };
    Ok((base_name(comps), implicit))
}

fn base_name(mut comps: Vec<&str>) -> Name<'_> {
    let Some(base) = comps.pop() else {
        return Name::Root;
    };
    let Some(target) = base.strip_prefix(WHITEOUT) else {
        return Name::Entry {
            parents: comps,
            base,
        };
    };
    if base == OPAQUE_MARKER {
        Name::Opaque { parents: comps }
    } else if base.starts_with(META) || matches!(target, "" | "." | "..") {
        Name::Hidden
    } else {
        Name::Whiteout {
            parents: comps,
            target,
        }
    }
}

/// A hard link's target as a path below the root; `..` is refused.
pub fn link_target<'a>(entry: &str, target: &'a str) -> Result<Vec<&'a str>> {
    clean_path(target).map_err(|_| crate::Error::UnsafePath {
        path: format!("{entry} (hard link to {target})"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Error;

    fn entry<'a>(parents: &[&'a str], base: &'a str) -> Name<'a> {
        Name::Entry {
            parents: parents.to_vec(),
            base,
        }
    }

    fn name(n: &str) -> Name<'_> {
        let (name, implicit) = classify(n).unwrap();
        assert!(!implicit, "{n}");
        name
    }

    #[test]
    fn leading_slash_and_dot_are_stripped() {
        assert_eq!(name("/etc/passwd"), entry(&["etc"], "passwd"));
        assert_eq!(name("./etc/passwd"), entry(&["etc"], "passwd"));
        assert_eq!(name("etc//./x/"), entry(&["etc"], "x"));
        assert_eq!(name("./"), Name::Root);
        assert_eq!(name("/"), Name::Root);
        assert_eq!(name(""), Name::Root);
    }

    #[test]
    fn dot_dot_is_refused_anywhere() {
        for bad in [
            "..",
            "../x",
            "a/../../x",
            "a/..",
            "/../etc/passwd",
            "a/b/../c",
        ] {
            match classify(bad) {
                Err(Error::UnsafePath { path }) => assert_eq!(path, bad),
                other => panic!("{bad}: {other:?}"),
            }
        }
        assert!(matches!(
            link_target("x", "../etc/passwd"),
            Err(Error::UnsafePath { path }) if path.contains("x (hard link to ../etc/passwd)")
        ));
        assert_eq!(
            link_target("x", "/etc/passwd").unwrap(),
            vec!["etc", "passwd"]
        );
    }

    #[test]
    fn whiteouts_and_markers() {
        assert_eq!(
            name("a/.wh.b"),
            Name::Whiteout {
                parents: vec!["a"],
                target: "b"
            }
        );
        assert_eq!(
            name("a/b/.wh..wh..opq"),
            Name::Opaque {
                parents: vec!["a", "b"]
            }
        );
        assert_eq!(name(".wh..wh..opq"), Name::Opaque { parents: vec![] });
        for hidden in [".wh..wh.plnk", "a/.wh..wh.aufs", "a/.wh.", ".wh.."] {
            assert_eq!(name(hidden), Name::Hidden, "{hidden}");
        }
        assert_eq!(name("a/x.wh.y"), entry(&["a"], "x.wh.y"));
    }

    #[test]
    fn names_below_a_whiteout_stand_for_it() {
        assert_eq!(
            classify("a/.wh.x/child/more").unwrap(),
            (
                Name::Whiteout {
                    parents: vec!["a"],
                    target: "x"
                },
                true
            )
        );
        assert_eq!(
            classify(".wh..wh..opq/x").unwrap(),
            (Name::Opaque { parents: vec![] }, true)
        );
        assert_eq!(classify(".wh..wh.plnk/x").unwrap(), (Name::Hidden, true));
    }
}
