//! The deterministic byte pattern `/bytes/N` streams, and checksums, so both ends of a
//! transfer can agree on what must arrive without storing it.

use bytes::Bytes;
use ring::digest;

/// Period of the pattern: a prime, so it never lines up with buffer sizes and a
/// dropped or duplicated chunk changes the checksum.
const PERIOD: usize = 251;
/// Size of the chunks [`Pattern`] yields.
pub const CHUNK: usize = 64 * 1024;

/// Byte `i` of the pattern.
pub fn byte_at(i: u64) -> u8 {
    (i % PERIOD as u64) as u8
}

/// Yields the pattern in chunks of up to [`CHUNK`] bytes, sharing one buffer.
#[derive(Clone, Debug)]
pub struct Pattern {
    buf: Bytes,
    offset: u64,
    len: u64,
}

impl Pattern {
    /// The first `len` bytes of the pattern.
    pub fn new(len: u64) -> Self {
        let buf: Vec<u8> = (0..(CHUNK + PERIOD) as u64).map(byte_at).collect();
        Self {
            buf: Bytes::from(buf),
            offset: 0,
            len,
        }
    }

    /// Bytes not yet yielded.
    pub fn remaining(&self) -> u64 {
        self.len - self.offset
    }

    /// The next chunk, or `None` at the end.
    pub fn next_chunk(&mut self) -> Option<Bytes> {
        if self.offset >= self.len {
            return None;
        }
        let n = (self.len - self.offset).min(CHUNK as u64) as usize;
        let start = (self.offset % PERIOD as u64) as usize;
        self.offset += n as u64;
        Some(self.buf.slice(start..start + n))
    }
}

/// SHA-256 of the first `len` bytes of the pattern, as lowercase hex.
pub fn sha256_of_pattern(len: u64) -> String {
    let mut p = Pattern::new(len);
    let mut ctx = digest::Context::new(&digest::SHA256);
    while let Some(c) = p.next_chunk() {
        ctx.update(&c);
    }
    hex(ctx.finish().as_ref())
}

/// Lowercase hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A running SHA-256 and length.
pub struct Digest {
    ctx: digest::Context,
    len: u64,
}

impl Default for Digest {
    fn default() -> Self {
        Self {
            ctx: digest::Context::new(&digest::SHA256),
            len: 0,
        }
    }
}

impl Digest {
    /// Feeds bytes.
    pub fn update(&mut self, data: &[u8]) {
        self.ctx.update(data);
        self.len += data.len() as u64;
    }

    /// Length and hex SHA-256 of everything fed.
    pub fn finish(self) -> (u64, String) {
        (self.len, hex(self.ctx.finish().as_ref()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_are_the_pattern() {
        let mut p = Pattern::new(3 * CHUNK as u64 + 7);
        let mut all = Vec::new();
        while let Some(c) = p.next_chunk() {
            all.extend_from_slice(&c);
        }
        assert_eq!(all.len(), 3 * CHUNK + 7);
        for (i, b) in all.iter().enumerate() {
            assert_eq!(*b, byte_at(i as u64), "byte {i}");
        }
        let mut d = Digest::default();
        d.update(&all);
        assert_eq!(d.finish().1, sha256_of_pattern(all.len() as u64));
    }

    #[test]
    fn digest_matches_known_value() {
        let mut d = Digest::default();
        d.update(b"abc");
        assert_eq!(
            d.finish(),
            (
                3,
                "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad".into()
            )
        );
    }
}
