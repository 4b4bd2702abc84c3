//! Progress of a conversion, for a user interface to show (the CLI draws bars on a
//! terminal); the conversion itself prints nothing.

use std::io;

use crate::format::ReadAt;

/// What is happening to a layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Downloading (or checking) the source blob; bytes of the blob.
    Fetch,
    /// Decompressing it to a tar; bytes of the blob.
    Unpack,
    /// Writing the new blob; bytes of the tar.
    Convert,
    /// Storing the new blob at the destination; no byte counts.
    Push,
}

impl Step {
    /// A short word for displays.
    pub fn name(self) -> &'static str {
        match self {
            Step::Fetch => "fetch",
            Step::Unpack => "unpack",
            Step::Convert => "convert",
            Step::Push => "push",
        }
    }
}

/// Receives progress events; every method defaults to doing nothing. Layers are
/// named by their source digest.
pub trait Progress: Send + Sync {
    /// `layers` layers will be worked on.
    fn start(&self, layers: usize) {
        let _ = layers;
    }
    /// `layer` begins `step`, which covers `total` bytes (0: unknown).
    fn step(&self, layer: &str, step: Step, total: u64) {
        let _ = (layer, step, total);
    }
    /// `bytes` more bytes of `layer`'s current step.
    fn advance(&self, layer: &str, bytes: u64) {
        let _ = (layer, bytes);
    }
    /// `layer` is done.
    fn finish(&self, layer: &str) {
        let _ = layer;
    }
    /// Something worth telling the user.
    fn note(&self, message: &str) {
        let _ = message;
    }
}

/// Progress that nobody watches.
#[derive(Debug, Clone, Copy, Default)]
pub struct Silent;

impl Progress for Silent {}

/// A byte source that reports what is read from it.
pub(crate) struct Counted<'a, R> {
    pub inner: R,
    pub report: &'a (dyn Fn(u64) + Sync),
}

impl<R: ReadAt> ReadAt for Counted<'_, R> {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn read_exact_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.inner.read_exact_at(offset, buf)?;
        (self.report)(buf.len() as u64);
        Ok(())
    }
}

/// A reader that reports what is read from it.
pub(crate) struct CountedRead<'a, R> {
    pub inner: R,
    pub report: &'a (dyn Fn(u64) + Sync),
}

impl<R: io::Read> io::Read for CountedRead<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        (self.report)(n as u64);
        Ok(n)
    }
}
