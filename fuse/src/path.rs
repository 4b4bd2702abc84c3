//! Splitting caller paths into names. TOC paths come from untrusted layers, so anything
//! that could step outside the tree is refused here, in one place.

/// The longest name Linux accepts (`NAME_MAX`).
pub(crate) const NAME_MAX: usize = 255;

/// Splits a slash-separated path relative to the root into its names. Leading `/`, `./`,
/// empty and `.` components are dropped, so `"./usr//bin/"` is `["usr", "bin"]` and `""`
/// is the root itself.
pub(crate) fn components(path: &str) -> Result<Vec<&[u8]>, &'static str> {
    let mut names = Vec::new();
    for name in path.split('/') {
        match name {
            "" | "." => {}
            ".." => return Err("\"..\" is not allowed"),
            _ if name.len() > NAME_MAX => return Err("a name is longer than 255 bytes"),
            _ if name.as_bytes().contains(&0) => return Err("a name contains a NUL byte"),
            _ => names.push(name.as_bytes()),
        }
    }
    Ok(names)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalises_and_refuses_escapes() {
        assert_eq!(
            components("./usr//bin/").unwrap(),
            vec![&b"usr"[..], &b"bin"[..]]
        );
        assert!(components("").unwrap().is_empty());
        assert!(components("/").unwrap().is_empty());
        assert!(components("a/../b").is_err());
        assert!(components("..").is_err());
        assert!(components(&"x".repeat(256)).is_err());
        assert_eq!(components(&"x".repeat(255)).unwrap().len(), 1);
        assert!(components("a\0b").is_err());
    }
}
