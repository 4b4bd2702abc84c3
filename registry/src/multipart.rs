//! `Content-Range` and `multipart/byteranges` parsing for range responses.
//!
//! Every part is checked against the blob size; a part whose declared range does not
//! match its data is an error, never data.

use bytes::Bytes;

/// A parsed `Content-Range: bytes first-last/total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ContentRange {
    pub(crate) first: u64,
    pub(crate) last: u64,
    pub(crate) total: Option<u64>,
}

pub(crate) fn parse_content_range(v: &str) -> Option<ContentRange> {
    let rest = v.trim().strip_prefix("bytes")?.trim_start();
    let (range, total) = rest.split_once('/')?;
    let (a, b) = range.trim().split_once('-')?;
    let first: u64 = a.trim().parse().ok()?;
    let last: u64 = b.trim().parse().ok()?;
    if last < first {
        return None;
    }
    let total = match total.trim() {
        "*" => None,
        t => Some(t.parse().ok()?),
    };
    Some(ContentRange { first, last, total })
}

/// The boundary of a `multipart/byteranges; boundary=…` content type.
pub(crate) fn boundary(content_type: &str) -> Option<String> {
    let mut parts = content_type.split(';');
    let mime = parts.next()?.trim();
    if !mime.eq_ignore_ascii_case("multipart/byteranges") {
        return None;
    }
    for p in parts {
        let (k, v) = p.trim().split_once('=')?;
        if k.trim().eq_ignore_ascii_case("boundary") {
            let v = v.trim().trim_matches('"');
            if !v.is_empty() {
                return Some(v.to_string());
            }
        }
    }
    None
}

fn find(hay: &[u8], needle: &[u8], from: usize) -> Option<usize> {
    if needle.is_empty() || from > hay.len() {
        return None;
    }
    hay[from..]
        .windows(needle.len())
        .position(|w| w == needle)
        .map(|p| p + from)
}

/// Splits a multipart/byteranges body into `(offset, data)` parts, checking each
/// part's `Content-Range` against `blob_size`.
pub(crate) fn parse(
    body: &Bytes,
    boundary: &str,
    blob_size: u64,
) -> Result<Vec<(u64, Bytes)>, String> {
    let delim = format!("--{boundary}");
    let delim = delim.as_bytes();
    let mut pos = find(body, delim, 0).ok_or("multipart body without boundary")?;
    let mut parts = Vec::new();
    loop {
        pos += delim.len();
        if body[pos..].starts_with(b"--") {
            break;
        }
        if !body[pos..].starts_with(b"\r\n") {
            return Err("malformed multipart delimiter line".into());
        }
        pos += 2;
        let hdr_end = find(body, b"\r\n\r\n", pos).ok_or("multipart part without header end")?;
        let headers =
            std::str::from_utf8(&body[pos..hdr_end]).map_err(|_| "non-UTF-8 multipart headers")?;
        let mut range = None;
        for line in headers.split("\r\n") {
            if let Some((k, v)) = line.split_once(':')
                && k.trim().eq_ignore_ascii_case("content-range")
            {
                range = Some(
                    parse_content_range(v)
                        .ok_or_else(|| format!("bad part Content-Range {:?}", v.trim()))?,
                );
            }
        }
        let range = range.ok_or("multipart part without Content-Range")?;
        if range.total.is_some_and(|t| t != blob_size) {
            return Err(format!(
                "part Content-Range total {} differs from blob size {blob_size}",
                range.total.unwrap_or(0)
            ));
        }
        if range.last >= blob_size {
            return Err(format!(
                "part range {}-{} past blob end {blob_size}",
                range.first, range.last
            ));
        }
        let len = usize::try_from(range.last - range.first + 1).map_err(|_| "part too large")?;
        let start = hdr_end + 4;
        let end = start.checked_add(len).ok_or("part too large")?;
        if end > body.len() {
            return Err(format!("part {}-{} truncated", range.first, range.last));
        }
        parts.push((range.first, body.slice(start..end)));
        // The data must be followed by CRLF and the next delimiter.
        let next = find(body, delim, end).ok_or("multipart body ends without closing boundary")?;
        let gap = &body[end..next];
        if gap != b"\r\n" && !gap.is_empty() {
            return Err(format!(
                "part {}-{}: data longer than its Content-Range",
                range.first, range.last
            ));
        }
        pos = next;
    }
    Ok(parts)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_range() {
        assert_eq!(
            parse_content_range("bytes 0-99/1000"),
            Some(ContentRange {
                first: 0,
                last: 99,
                total: Some(1000)
            })
        );
        assert_eq!(
            parse_content_range("bytes 5-5/*").map(|r| r.total),
            Some(None)
        );
        assert_eq!(parse_content_range("bytes 9-5/10"), None);
        assert_eq!(parse_content_range("items 0-1/2"), None);
    }

    #[test]
    fn multipart_roundtrip_and_errors() {
        let ct = "multipart/byteranges; boundary=XyZ";
        let b = boundary(ct).unwrap();
        let body = Bytes::from_static(
            b"\r\n--XyZ\r\nContent-Type: application/octet-stream\r\nContent-Range: bytes 0-3/20\r\n\r\nabcd\r\n--XyZ\r\nContent-Range: bytes 10-11/20\r\n\r\nkl\r\n--XyZ--\r\n",
        );
        let parts = parse(&body, &b, 20).unwrap();
        assert_eq!(
            parts,
            vec![
                (0, Bytes::from_static(b"abcd")),
                (10, Bytes::from_static(b"kl"))
            ]
        );
        assert!(parse(&body, &b, 21).is_err(), "total mismatch");
        let long =
            Bytes::from_static(b"--XyZ\r\nContent-Range: bytes 0-1/20\r\n\r\nabcd\r\n--XyZ--\r\n");
        assert!(parse(&long, &b, 20).is_err(), "data longer than range");
        let short = Bytes::from_static(b"--XyZ\r\nContent-Range: bytes 0-9/20\r\n\r\nabcd");
        assert!(parse(&short, &b, 20).is_err(), "truncated");
        assert!(boundary("application/octet-stream").is_none());
    }
}
