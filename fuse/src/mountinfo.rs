//! Reading `/proc/self/mountinfo`, to recognise our own mount at unmount time without a
//! round trip through the filesystem (which a wedged daemon could not answer).

use std::path::Path;

/// One line of mountinfo, the fields we use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct MountEntry {
    pub(crate) id: u64,
    /// `major:minor` of the mounted filesystem.
    pub(crate) dev: String,
    pub(crate) mount_point: Vec<u8>,
    pub(crate) fs_type: String,
}

/// The mounts of this process's namespace, in mount order.
pub(crate) fn read() -> std::io::Result<Vec<MountEntry>> {
    Ok(parse(&std::fs::read_to_string("/proc/self/mountinfo")?))
}

/// The newest mount on `path` (the one a lookup of `path` sees).
pub(crate) fn find(entries: &[MountEntry], path: &Path) -> Option<MountEntry> {
    use std::os::unix::ffi::OsStrExt;
    let want = path.as_os_str().as_bytes();
    entries
        .iter()
        .rev()
        .find(|e| e.mount_point == want)
        .cloned()
}

fn parse(text: &str) -> Vec<MountEntry> {
    text.lines()
        .filter_map(|line| {
            let mut fields = line.split(' ');
            let id = fields.next()?.parse().ok()?;
            let _parent = fields.next()?;
            let dev = fields.next()?.to_string();
            let _root = fields.next()?;
            let mount_point = unescape(fields.next()?);
            // Optional fields end at "-", then the filesystem type.
            let fs_type = fields.skip_while(|f| *f != "-").nth(1)?.to_string();
            Some(MountEntry {
                id,
                dev,
                mount_point,
                fs_type,
            })
        })
        .collect()
}

/// Undoes mountinfo's octal escapes (`\040` for space and so on).
fn unescape(field: &str) -> Vec<u8> {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && let Some(code) = bytes
                .get(i + 1..i + 4)
                .and_then(|o| std::str::from_utf8(o).ok())
                .and_then(|o| u8::from_str_radix(o, 8).ok())
        {
            out.push(code);
            i += 4;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_lines_with_optional_fields_and_escapes() {
        let text = "36 35 98:0 / /mnt/my\\040dir rw,noatime master:1 - fuse.lazysnap lazysnap ro\n\
                    37 35 0:5 / /proc rw - proc proc rw\n";
        let e = parse(text);
        assert_eq!(e.len(), 2);
        assert_eq!(e[0].id, 36);
        assert_eq!(e[0].dev, "98:0");
        assert_eq!(e[0].mount_point, b"/mnt/my dir");
        assert_eq!(e[0].fs_type, "fuse.lazysnap");
        assert_eq!(
            find(&e, Path::new("/proc")).map(|m| m.fs_type),
            Some("proc".into())
        );
        assert_eq!(find(&e, Path::new("/nope")), None);
    }
}
