//! Layer tars arrive plain, gzip- or zstd-compressed; the magic bytes tell which.

use std::io::Read;

/// Compression of an input layer stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InputCompression {
    None,
    Gzip,
    Zstd,
}

impl InputCompression {
    /// Recognises gzip (`1f 8b`) and zstd frames (including skippable ones).
    pub fn sniff(head: &[u8]) -> Self {
        match head {
            [0x1f, 0x8b, ..] => InputCompression::Gzip,
            [0x28, 0xb5, 0x2f, 0xfd, ..] => InputCompression::Zstd,
            [m, 0x2a, 0x4d, 0x18, ..] if m & 0xf0 == 0x50 => InputCompression::Zstd,
            _ => InputCompression::None,
        }
    }

    /// A reader of the uncompressed stream. Multi-member gzip (as every eStargz
    /// blob is) is read whole.
    pub fn decoder<'a>(self, r: Box<dyn Read + 'a>) -> std::io::Result<Box<dyn Read + 'a>> {
        Ok(match self {
            InputCompression::None => r,
            InputCompression::Gzip => Box::new(flate2::read::MultiGzDecoder::new(r)),
            InputCompression::Zstd => Box::new(zstd::stream::read::Decoder::new(r)?),
        })
    }
}
