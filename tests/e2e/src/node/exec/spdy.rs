//! SPDY/3.1 framing, as much of it as the API server's exec client (Go's
//! `moby/spdystream`) uses: control frames (SYN_STREAM, SYN_REPLY, RST_STREAM,
//! SETTINGS, PING, GOAWAY, HEADERS, WINDOW_UPDATE) and data frames. Header blocks
//! travel zlib-compressed, one stream per direction for the whole connection,
//! seeded with the SPDY/3 dictionary and sync-flushed after every block.
//!
//! spdystream does no flow control (it neither sends nor honours WINDOW_UPDATE),
//! so neither do we: back-pressure is TCP's.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use miniz_oxide::{
    deflate::core::CompressorOxide, inflate::stream::InflateState, DataFormat, MZFlush, MZStatus,
};

use super::dictionary::DICTIONARY;

/// The only protocol version spoken.
pub const VERSION: u16 = 3;
/// Last frame of the sender's half of a stream.
pub const FLAG_FIN: u8 = 0x01;
/// A stream the opener will never receive on.
pub const FLAG_UNIDIRECTIONAL: u8 = 0x02;
/// RST_STREAM status: protocol error.
pub const PROTOCOL_ERROR: u32 = 1;
/// RST_STREAM status: the sender no longer wants the stream.
pub const CANCEL: u32 = 5;
/// Largest frame accepted (SPDY allows 16 MiB; spdystream writes what one
/// `Write` got, 32 KiB from `io.Copy`), so one frame bounds what is buffered.
pub const MAX_FRAME: usize = 1 << 20;
/// Largest decompressed header block accepted.
pub const MAX_HEADER_BLOCK: usize = 64 << 10;
/// Most name/value pairs in one header block.
const MAX_HEADERS: usize = 256;

const SYN_STREAM: u16 = 1;
const SYN_REPLY: u16 = 2;
const RST_STREAM: u16 = 3;
const SETTINGS: u16 = 4;
const PING: u16 = 6;
const GOAWAY: u16 = 7;
const HEADERS: u16 = 8;
const WINDOW_UPDATE: u16 = 9;

/// Header name/value pairs, names lowercase as SPDY requires.
pub type Headers = Vec<(String, String)>;

/// One SPDY/3.1 frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Frame {
    /// Opens a stream.
    SynStream {
        /// Stream id (odd: opened by the client).
        stream_id: u32,
        /// Stream it belongs to (server push), 0 if none.
        associated: u32,
        /// 0 (highest) to 7.
        priority: u8,
        /// `FLAG_FIN`, `FLAG_UNIDIRECTIONAL`.
        flags: u8,
        /// Its headers.
        headers: Headers,
    },
    /// Accepts a stream.
    SynReply {
        /// Stream id.
        stream_id: u32,
        /// `FLAG_FIN`.
        flags: u8,
        /// Its headers.
        headers: Headers,
    },
    /// Ends a stream abnormally.
    RstStream {
        /// Stream id.
        stream_id: u32,
        /// Why (`PROTOCOL_ERROR`, `CANCEL`, ...).
        status: u32,
    },
    /// Connection settings: (flags, id, value).
    Settings(Vec<(u8, u32, u32)>),
    /// Liveness check; the receiver echoes the peer's.
    Ping(u32),
    /// No new streams after `last_good`.
    GoAway {
        /// Last stream id the sender handled.
        last_good: u32,
        /// 0 OK, 1 protocol error, 2 internal error.
        status: u32,
    },
    /// More headers for a stream.
    Headers {
        /// Stream id.
        stream_id: u32,
        /// `FLAG_FIN`.
        flags: u8,
        /// The headers.
        headers: Headers,
    },
    /// Flow-control credit.
    WindowUpdate {
        /// Stream id (0: the session).
        stream_id: u32,
        /// Bytes added to the window.
        delta: u32,
    },
    /// Payload of a stream.
    Data {
        /// Stream id.
        stream_id: u32,
        /// `FLAG_FIN`.
        flags: u8,
        /// The bytes.
        data: Bytes,
    },
    /// A control frame type this version does not know; SPDY says ignore it.
    Unknown(u16),
}

impl Frame {
    /// Whether the frame carries `FLAG_FIN`.
    pub fn fin(&self) -> bool {
        match self {
            Frame::SynStream { flags, .. }
            | Frame::SynReply { flags, .. }
            | Frame::Headers { flags, .. }
            | Frame::Data { flags, .. } => flags & FLAG_FIN != 0,
            _ => false,
        }
    }
}

/// Why a peer's bytes are not SPDY/3.1 we can take.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ProtoError {
    /// The frame says another version.
    #[error("SPDY version {0} is not supported (only 3)")]
    Version(u16),
    /// A frame longer than [`MAX_FRAME`].
    #[error("a frame of {0} bytes is over the {MAX_FRAME} byte limit")]
    TooLong(usize),
    /// A control frame shorter than its fixed fields.
    #[error("a control frame of type {kind} is {len} bytes, too short")]
    Short {
        /// Frame type.
        kind: u16,
        /// Its length.
        len: usize,
    },
    /// The header block did not decompress.
    #[error("header block: {0}")]
    Header(String),
}

/// Reads frames from bytes, inflating header blocks with the connection's
/// single zlib stream.
pub struct Decoder {
    inflater: Box<InflateState>,
    /// Bytes of the zlib header (CMF, FLG, DICTID) still to come.
    zlib_head: Vec<u8>,
    zlib_head_done: bool,
}

impl Default for Decoder {
    fn default() -> Self {
        Self::new()
    }
}

/// Adler-32 (RFC 1950), to recognise the dictionary a zlib stream names.
pub fn adler32(data: &[u8]) -> u32 {
    let (mut a, mut b) = (1u32, 0u32);
    for chunk in data.chunks(5552) {
        for &x in chunk {
            a += u32::from(x);
            b += a;
        }
        a %= 65521;
        b %= 65521;
    }
    (b << 16) | a
}

impl Decoder {
    /// A decoder whose inflater already holds the SPDY/3 dictionary.
    ///
    /// miniz_oxide cannot be given a preset dictionary, so the raw inflater is fed
    /// a non-final stored block holding the dictionary first: its output (the
    /// dictionary) is dropped, and the window then holds exactly what a zlib
    /// `inflateSetDictionary` would have put there. A stored block ends on a byte
    /// boundary, so the peer's deflate data can follow as it is.
    pub fn new() -> Self {
        let mut inflater = InflateState::new_boxed(DataFormat::Raw);
        let len = DICTIONARY.len() as u16;
        let mut seed = Vec::with_capacity(DICTIONARY.len() + 5);
        seed.push(0x00); // BFINAL 0, BTYPE 00 (stored), padding
        seed.extend_from_slice(&len.to_le_bytes());
        seed.extend_from_slice(&(!len).to_le_bytes());
        seed.extend_from_slice(&DICTIONARY);
        let mut sink = vec![0u8; DICTIONARY.len()];
        let r =
            miniz_oxide::inflate::stream::inflate(&mut inflater, &seed, &mut sink, MZFlush::None);
        debug_assert_eq!(r.bytes_written, DICTIONARY.len());
        Self {
            inflater,
            zlib_head: Vec::new(),
            zlib_head_done: false,
        }
    }

    /// Takes one whole frame off the front of `buf`; `None` until one is there.
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<Frame>, ProtoError> {
        if buf.len() < 8 {
            return Ok(None);
        }
        let len = u32::from_be_bytes([0, buf[5], buf[6], buf[7]]) as usize;
        if len > MAX_FRAME {
            return Err(ProtoError::TooLong(len));
        }
        if buf.len() < 8 + len {
            return Ok(None);
        }
        let first = buf.get_u32();
        let flags = buf.get_u8();
        buf.advance(3);
        let mut body = buf.split_to(len).freeze();
        if first & 0x8000_0000 == 0 {
            return Ok(Some(Frame::Data {
                stream_id: first & 0x7fff_ffff,
                flags,
                data: body,
            }));
        }
        let version = ((first >> 16) & 0x7fff) as u16;
        if version != VERSION {
            return Err(ProtoError::Version(version));
        }
        let kind = (first & 0xffff) as u16;
        let need = match kind {
            SYN_STREAM => 10,
            SYN_REPLY | HEADERS | PING => 4,
            RST_STREAM | GOAWAY | WINDOW_UPDATE => 8,
            SETTINGS => 4,
            _ => 0,
        };
        if len < need {
            return Err(ProtoError::Short { kind, len });
        }
        let frame = match kind {
            SYN_STREAM => {
                let stream_id = body.get_u32() & 0x7fff_ffff;
                let associated = body.get_u32() & 0x7fff_ffff;
                let priority = body.get_u8() >> 5;
                body.advance(1); // slot
                let headers = self.headers(&body)?;
                Frame::SynStream {
                    stream_id,
                    associated,
                    priority,
                    flags,
                    headers,
                }
            }
            SYN_REPLY | HEADERS => {
                let stream_id = body.get_u32() & 0x7fff_ffff;
                let headers = self.headers(&body)?;
                if kind == SYN_REPLY {
                    Frame::SynReply {
                        stream_id,
                        flags,
                        headers,
                    }
                } else {
                    Frame::Headers {
                        stream_id,
                        flags,
                        headers,
                    }
                }
            }
            RST_STREAM => Frame::RstStream {
                stream_id: body.get_u32() & 0x7fff_ffff,
                status: body.get_u32(),
            },
            SETTINGS => {
                let n = body.get_u32() as usize;
                if body.len() < n.saturating_mul(8) {
                    return Err(ProtoError::Short { kind, len });
                }
                let entries = (0..n)
                    .map(|_| {
                        let id = body.get_u32();
                        ((id >> 24) as u8, id & 0xff_ffff, body.get_u32())
                    })
                    .collect();
                Frame::Settings(entries)
            }
            PING => Frame::Ping(body.get_u32()),
            GOAWAY => Frame::GoAway {
                last_good: body.get_u32() & 0x7fff_ffff,
                status: body.get_u32(),
            },
            WINDOW_UPDATE => Frame::WindowUpdate {
                stream_id: body.get_u32() & 0x7fff_ffff,
                delta: body.get_u32() & 0x7fff_ffff,
            },
            other => Frame::Unknown(other),
        };
        Ok(Some(frame))
    }

    fn headers(&mut self, compressed: &[u8]) -> Result<Headers, ProtoError> {
        let mut input = compressed;
        if !self.zlib_head_done {
            // The zlib header may in principle straddle frames; it is 2 bytes, 6
            // with FDICT.
            while !input.is_empty() && !self.zlib_head_done {
                self.zlib_head.push(input[0]);
                input = &input[1..];
                let h = &self.zlib_head;
                if h.len() == 2 {
                    if h[0] & 0x0f != 8 || (u16::from(h[0]) << 8 | u16::from(h[1])) % 31 != 0 {
                        return Err(ProtoError::Header(format!(
                            "not a zlib stream (header {:02x}{:02x})",
                            h[0], h[1]
                        )));
                    }
                    self.zlib_head_done = h[1] & 0x20 == 0;
                } else if h.len() == 6 {
                    let id = u32::from_be_bytes([h[2], h[3], h[4], h[5]]);
                    if id != adler32(&DICTIONARY) {
                        return Err(ProtoError::Header(format!(
                            "the peer compresses with dictionary {id:08x}, not SPDY/3's"
                        )));
                    }
                    self.zlib_head_done = true;
                }
            }
        }
        let mut out = Vec::new();
        let mut chunk = [0u8; 4096];
        loop {
            let r = miniz_oxide::inflate::stream::inflate(
                &mut self.inflater,
                input,
                &mut chunk,
                MZFlush::Sync,
            );
            input = &input[r.bytes_consumed..];
            out.extend_from_slice(&chunk[..r.bytes_written]);
            if out.len() > MAX_HEADER_BLOCK {
                return Err(ProtoError::Header(format!(
                    "over {MAX_HEADER_BLOCK} bytes decompressed"
                )));
            }
            match r.status {
                Ok(MZStatus::Ok) => {}
                Ok(_) => break,
                // No progress possible: all input used and all output given.
                Err(miniz_oxide::MZError::Buf) => break,
                Err(e) => return Err(ProtoError::Header(format!("inflate: {e:?}"))),
            }
            if input.is_empty() && r.bytes_written < chunk.len() {
                break;
            }
        }
        parse_block(&out)
    }
}

/// Parses an uncompressed header block: a count, then length-prefixed names and
/// values; a value holding NULs is several values of one name.
pub fn parse_block(mut b: &[u8]) -> Result<Headers, ProtoError> {
    let short = || ProtoError::Header("the block ends early".into());
    if b.len() < 4 {
        return Err(short());
    }
    let n = b.get_u32() as usize;
    if n > MAX_HEADERS {
        return Err(ProtoError::Header(format!(
            "{n} headers, over {MAX_HEADERS}"
        )));
    }
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let mut field = || -> Result<String, ProtoError> {
            if b.len() < 4 {
                return Err(short());
            }
            let len = b.get_u32() as usize;
            if b.len() < len {
                return Err(short());
            }
            let s = String::from_utf8_lossy(&b[..len]).into_owned();
            b.advance(len);
            Ok(s)
        };
        let name = field()?.to_ascii_lowercase();
        let value = field()?;
        for v in value.split('\0') {
            out.push((name.clone(), v.to_string()));
        }
    }
    Ok(out)
}

/// The uncompressed form of `headers`, names lowercased, repeated names joined
/// with NUL as SPDY wants.
pub fn block(headers: &[(String, String)]) -> Vec<u8> {
    let mut merged: Vec<(String, String)> = Vec::new();
    for (k, v) in headers {
        let k = k.to_ascii_lowercase();
        match merged.iter_mut().find(|(mk, _)| *mk == k) {
            Some((_, mv)) => {
                mv.push('\0');
                mv.push_str(v);
            }
            None => merged.push((k, v.clone())),
        }
    }
    let mut out = Vec::new();
    out.put_u32(merged.len() as u32);
    for (k, v) in &merged {
        out.put_u32(k.len() as u32);
        out.put_slice(k.as_bytes());
        out.put_u32(v.len() as u32);
        out.put_slice(v.as_bytes());
    }
    out
}

/// Writes frames, deflating header blocks with the connection's single zlib
/// stream. It compresses without the dictionary: a zlib reader given a
/// dictionary (Go's `zlib.NewReaderDict`) only uses it when the stream's FDICT
/// flag asks, so a plain zlib stream is read fine, and miniz_oxide has no
/// preset-dictionary compression.
pub struct Encoder {
    deflater: Box<CompressorOxide>,
}

impl Default for Encoder {
    fn default() -> Self {
        Self::new()
    }
}

impl Encoder {
    /// A fresh compression stream (the first block carries the zlib header).
    pub fn new() -> Self {
        let mut d = Box::<CompressorOxide>::default();
        // zlib framing (the header Go's reader expects), level 6.
        d.set_format_and_level(DataFormat::Zlib, 6);
        Self { deflater: d }
    }

    fn compress(&mut self, input: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(input.len() + 64);
        let mut chunk = [0u8; 4096];
        let mut input = input;
        loop {
            let r = miniz_oxide::deflate::stream::deflate(
                &mut self.deflater,
                input,
                &mut chunk,
                MZFlush::Sync,
            );
            input = &input[r.bytes_consumed..];
            out.extend_from_slice(&chunk[..r.bytes_written]);
            // Done once all input is in and the flush fit in the space we gave.
            if input.is_empty() && r.bytes_written < chunk.len() || r.status.is_err() {
                break;
            }
        }
        out
    }

    /// Appends `frame` to `out`.
    pub fn encode(&mut self, frame: &Frame, out: &mut BytesMut) {
        let control = |out: &mut BytesMut, kind: u16, flags: u8, body: &[u8]| {
            out.put_u32(0x8000_0000 | u32::from(VERSION) << 16 | u32::from(kind));
            out.put_u32(u32::from(flags) << 24 | body.len() as u32);
            out.put_slice(body);
        };
        let mut body = Vec::new();
        match frame {
            Frame::SynStream {
                stream_id,
                associated,
                priority,
                flags,
                headers,
            } => {
                body.put_u32(*stream_id);
                body.put_u32(*associated);
                body.put_u8(priority << 5);
                body.put_u8(0);
                body.extend(self.compress(&block(headers)));
                control(out, SYN_STREAM, *flags, &body);
            }
            Frame::SynReply {
                stream_id,
                flags,
                headers,
            }
            | Frame::Headers {
                stream_id,
                flags,
                headers,
            } => {
                body.put_u32(*stream_id);
                body.extend(self.compress(&block(headers)));
                let kind = if matches!(frame, Frame::SynReply { .. }) {
                    SYN_REPLY
                } else {
                    HEADERS
                };
                control(out, kind, *flags, &body);
            }
            Frame::RstStream { stream_id, status } => {
                body.put_u32(*stream_id);
                body.put_u32(*status);
                control(out, RST_STREAM, 0, &body);
            }
            Frame::Settings(entries) => {
                body.put_u32(entries.len() as u32);
                for (f, id, v) in entries {
                    body.put_u32(u32::from(*f) << 24 | (id & 0xff_ffff));
                    body.put_u32(*v);
                }
                control(out, SETTINGS, 0, &body);
            }
            Frame::Ping(id) => control(out, PING, 0, &id.to_be_bytes()),
            Frame::GoAway { last_good, status } => {
                body.put_u32(*last_good);
                body.put_u32(*status);
                control(out, GOAWAY, 0, &body);
            }
            Frame::WindowUpdate { stream_id, delta } => {
                body.put_u32(*stream_id);
                body.put_u32(*delta);
                control(out, WINDOW_UPDATE, 0, &body);
            }
            Frame::Data {
                stream_id,
                flags,
                data,
            } => {
                out.put_u32(stream_id & 0x7fff_ffff);
                out.put_u32(u32::from(*flags) << 24 | data.len() as u32);
                out.put_slice(data);
            }
            Frame::Unknown(_) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    // Two SYN_STREAM frames as Go's spdystream framer (github.com/moby/spdystream
    // v0.5.1, `spdy.NewFramer` + `WriteFrame`) writes them on one connection:
    // streamType error on stream 1, then stdout on stream 3. The first block opens
    // the zlib stream with FDICT and the dictionary's Adler-32; both refer back
    // into the dictionary, the second also into the first block.
    const GO_SYN_ERROR: &str = "80030001000000290000000100000000000078f9e3c6a7c26260606004a7b392a2d4c45c6851c29a0a0a6800000000ffff";
    const GO_SYN_STDOUT: &str =
        "800300010000001900000003000000000000c22ac5565c92925f5a02000000ffff";

    #[test]
    fn the_dictionary_is_spdy3s() {
        assert_eq!(DICTIONARY.len(), 1423);
        // The DICTID Go's zlib writer put in the fixture's header.
        assert_eq!(adler32(&DICTIONARY), 0xe3c6_a7c2);
        assert_eq!(adler32(b"Wikipedia"), 0x11e6_0398);
    }

    #[test]
    fn decodes_go_header_blocks_compressed_with_the_dictionary() {
        let mut dec = Decoder::new();
        let mut buf = BytesMut::new();
        buf.extend_from_slice(&hex(GO_SYN_ERROR));
        buf.extend_from_slice(&hex(GO_SYN_STDOUT));
        let a = dec.decode(&mut buf).unwrap().unwrap();
        assert_eq!(
            a,
            Frame::SynStream {
                stream_id: 1,
                associated: 0,
                priority: 0,
                flags: 0,
                headers: vec![("streamtype".into(), "error".into())],
            }
        );
        let b = dec.decode(&mut buf).unwrap().unwrap();
        assert_eq!(
            b,
            Frame::SynStream {
                stream_id: 3,
                associated: 0,
                priority: 0,
                flags: 0,
                headers: vec![("streamtype".into(), "stdout".into())],
            }
        );
        assert!(buf.is_empty());
        assert_eq!(dec.decode(&mut buf).unwrap(), None);
    }

    #[test]
    fn a_second_frame_needs_the_first_blocks_history() {
        // The stdout frame alone, on a fresh zlib stream, is not decodable: it is
        // a continuation, which is why one inflater serves the whole connection.
        let mut dec = Decoder::new();
        let mut buf = BytesMut::from(&hex(GO_SYN_STDOUT)[..]);
        assert!(dec.decode(&mut buf).is_err());
    }

    #[test]
    fn a_foreign_dictionary_is_refused() {
        let mut raw = hex(GO_SYN_ERROR);
        raw[20] ^= 0xff; // first byte of the DICTID
        let mut buf = BytesMut::from(&raw[..]);
        let e = Decoder::new().decode(&mut buf).unwrap_err();
        assert!(e.to_string().contains("not SPDY/3's"), "{e}");
    }

    #[test]
    fn frames_round_trip_through_one_header_stream() {
        let frames = vec![
            Frame::SynStream {
                stream_id: 1,
                associated: 0,
                priority: 2,
                flags: FLAG_FIN,
                headers: vec![
                    ("streamtype".into(), "error".into()),
                    ("x-multi".into(), "a".into()),
                    ("x-multi".into(), "b".into()),
                ],
            },
            Frame::SynReply {
                stream_id: 1,
                flags: 0,
                headers: vec![],
            },
            Frame::Headers {
                stream_id: 3,
                flags: FLAG_FIN,
                headers: vec![("streamtype".into(), "stdout".into())],
            },
            Frame::Data {
                stream_id: 3,
                flags: 0,
                data: Bytes::from(vec![7u8; 100_000]),
            },
            Frame::Data {
                stream_id: 3,
                flags: FLAG_FIN,
                data: Bytes::new(),
            },
            Frame::RstStream {
                stream_id: 5,
                status: CANCEL,
            },
            Frame::Settings(vec![(0, 7, 65536), (1, 4, 100)]),
            Frame::Ping(2),
            Frame::GoAway {
                last_good: 5,
                status: 0,
            },
            Frame::WindowUpdate {
                stream_id: 0,
                delta: 1 << 20,
            },
        ];
        let mut enc = Encoder::new();
        let mut wire = BytesMut::new();
        for f in &frames {
            enc.encode(f, &mut wire);
        }
        let total = wire.len();
        // Fed a few bytes at a time: a frame comes out only once it is whole.
        let mut dec = Decoder::new();
        let mut buf = BytesMut::new();
        let mut got = Vec::new();
        for chunk in wire.chunks(7) {
            buf.extend_from_slice(chunk);
            while let Some(f) = dec.decode(&mut buf).unwrap() {
                got.push(f);
            }
        }
        assert!(total > 100_000);
        // Repeated names travel NUL-joined and come back as separate pairs.
        assert_eq!(got, frames);
    }

    #[test]
    fn header_blocks_are_compressed_and_start_a_zlib_stream() {
        let mut enc = Encoder::new();
        let headers: Headers = (0..20)
            .map(|i| (format!("x-header-{i}"), "the same long value".into()))
            .collect();
        let mut out = BytesMut::new();
        enc.encode(
            &Frame::SynReply {
                stream_id: 1,
                flags: 0,
                headers: headers.clone(),
            },
            &mut out,
        );
        // zlib header (CMF 0x78, no FDICT), after the 12 bytes of frame and id.
        assert_eq!(out[12], 0x78);
        assert_eq!(out[13] & 0x20, 0);
        // Ends in a sync flush: an empty stored block.
        assert_eq!(&out[out.len() - 4..], &[0, 0, 0xff, 0xff]);
        assert!(out.len() < block(&headers).len() / 2, "{} bytes", out.len());
    }

    #[test]
    fn bad_frames_are_errors() {
        let mut buf = BytesMut::from(&[0x80, 0x02, 0x00, 0x06, 0, 0, 0, 4, 0, 0, 0, 1][..]);
        assert_eq!(Decoder::new().decode(&mut buf), Err(ProtoError::Version(2)));
        let mut buf = BytesMut::from(&[0, 0, 0, 1, 0, 0x10, 0, 1][..]);
        assert!(matches!(
            Decoder::new().decode(&mut buf),
            Err(ProtoError::TooLong(_))
        ));
        let mut buf = BytesMut::from(&[0x80, 0x03, 0x00, 0x03, 0, 0, 0, 4, 0, 0, 0, 1][..]);
        assert!(matches!(
            Decoder::new().decode(&mut buf),
            Err(ProtoError::Short { kind: 3, len: 4 })
        ));
        assert!(parse_block(&[0, 0, 0, 1, 0, 0, 0, 9, b'a']).is_err());
        assert!(parse_block(&[0xff, 0xff, 0xff, 0xff]).is_err());
    }
}
