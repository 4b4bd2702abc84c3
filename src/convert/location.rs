//! Where an image is: a registry reference, or an OCI image layout directory written
//! `oci:DIR[:TAG]` (skopeo's spelling: the directory ends at the first `:`).

use std::fmt;
use std::path::PathBuf;

use lazysnap_registry::Reference;

use crate::error::{Error, Result};

/// The prefix that marks an OCI image layout.
pub const LAYOUT_PREFIX: &str = "oci:";

/// An image's location, as a source or a destination.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Location {
    /// An image in a registry.
    Registry(Reference),
    /// An image in an OCI image layout directory, under a tag (the
    /// `org.opencontainers.image.ref.name` annotation of its `index.json` entry).
    Layout { dir: PathBuf, tag: Option<String> },
}

impl Location {
    /// Parses `oci:DIR[:TAG]` or a registry reference.
    pub fn parse(s: &str) -> Result<Location> {
        let Some(rest) = s.strip_prefix(LAYOUT_PREFIX) else {
            return Ok(Location::Registry(Reference::parse(s)?));
        };
        let (dir, tag) = match rest.split_once(':') {
            Some((d, t)) => (d, Some(t)),
            None => (rest, None),
        };
        if dir.is_empty() {
            return Err(Error::InvalidArgument(format!(
                "{s}: an OCI layout is written oci:DIR[:TAG]"
            )));
        }
        if let Some(t) = tag {
            let ok = !t.is_empty()
                && t.len() <= 128
                && t.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
            if !ok {
                return Err(Error::InvalidArgument(format!(
                    "{s}: tag {t:?} must be 1-128 letters, digits, '.', '_' or '-'"
                )));
            }
        }
        Ok(Location::Layout {
            dir: PathBuf::from(dir),
            tag: tag.map(str::to_string),
        })
    }
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Location::Registry(r) => write!(f, "{r}"),
            Location::Layout { dir, tag } => {
                write!(f, "{LAYOUT_PREFIX}{}", dir.display())?;
                if let Some(t) = tag {
                    write!(f, ":{t}")?;
                }
                Ok(())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_layouts_and_references() {
        assert_eq!(
            Location::parse("oci:/tmp/x:v1").unwrap(),
            Location::Layout {
                dir: "/tmp/x".into(),
                tag: Some("v1".into())
            }
        );
        assert_eq!(
            Location::parse("oci:rel/dir").unwrap(),
            Location::Layout {
                dir: "rel/dir".into(),
                tag: None
            }
        );
        assert_eq!(
            Location::parse("oci:/tmp/x:v1").unwrap().to_string(),
            "oci:/tmp/x:v1"
        );
        match Location::parse("127.0.0.1:5000/a/b:c").unwrap() {
            Location::Registry(r) => assert_eq!(r.repository(), "a/b"),
            other => panic!("{other:?}"),
        }
        assert!(Location::parse("oci:").is_err());
        assert!(Location::parse("oci:/x:bad/tag").is_err());
        assert!(Location::parse("UPPER CASE").is_err());
    }
}
