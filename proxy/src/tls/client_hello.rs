//! Recognises a TLS ClientHello in the first bytes of a connection and reads the ALPN
//! protocols it offers, without consuming anything: the bytes are replayed to rustls.
//!
//! Only what detection needs is parsed (RFC 8446 §4.1.2, RFC 7301 §3.1). A ClientHello
//! split over several records is legal but no meshlet client sends one (rustls keeps it
//! in one record below 16 KiB), so it counts as malformed.

/// TLS record content type `handshake`.
const HANDSHAKE: u8 = 0x16;
/// Handshake message type `client_hello`.
const CLIENT_HELLO: u8 = 0x01;
/// Extension `application_layer_protocol_negotiation`.
const EXT_ALPN: u16 = 16;
/// Largest TLS plaintext record (RFC 8446 §5.1).
const MAX_RECORD: usize = 16 * 1024;

/// What the first bytes of a connection are.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sniff {
    /// Not TLS: plaintext (HTTP or anything else).
    NotTls,
    /// A TLS record has started; more bytes are needed.
    NeedMore,
    /// A complete ClientHello; `mesh` when it offers ALPN `meshlet/1`.
    ClientHello {
        /// Whether the mesh ALPN is among the offered protocols.
        mesh: bool,
    },
    /// It starts like a TLS handshake record but is not a ClientHello we can read.
    Malformed,
}

/// Looks at the bytes read so far.
pub fn sniff(buf: &[u8]) -> Sniff {
    match buf {
        [] => Sniff::NeedMore,
        [first, ..] if *first != HANDSHAKE => Sniff::NotTls,
        [_] => Sniff::NeedMore,
        // Record version: 3.x (TLS 1.0 to 1.3 all put 0x03 here).
        [_, major, ..] if *major != 0x03 => Sniff::NotTls,
        _ if buf.len() < 5 => Sniff::NeedMore,
        _ => {
            let len = usize::from(u16::from_be_bytes([buf[3], buf[4]]));
            if len == 0 || len > MAX_RECORD {
                return Sniff::Malformed;
            }
            let Some(record) = buf.get(5..5 + len) else {
                return Sniff::NeedMore;
            };
            match parse_hello(record) {
                Some(mesh) => Sniff::ClientHello { mesh },
                None => Sniff::Malformed,
            }
        }
    }
}

/// A cursor over a byte slice.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Some(head)
    }

    fn u8(&mut self) -> Option<usize> {
        self.take(1).map(|b| usize::from(b[0]))
    }

    fn u16(&mut self) -> Option<usize> {
        self.take(2)
            .map(|b| usize::from(u16::from_be_bytes([b[0], b[1]])))
    }

    /// A vector with a `width`-byte length prefix.
    fn vec(&mut self, width: usize) -> Option<&'a [u8]> {
        let n = match width {
            1 => self.u8()?,
            _ => self.u16()?,
        };
        self.take(n)
    }
}

/// Whether the ClientHello in `record` offers the mesh ALPN; `None` if it is not a
/// well-formed ClientHello contained in this record.
fn parse_hello(record: &[u8]) -> Option<bool> {
    let mut r = Reader(record);
    if r.u8()? != usize::from(CLIENT_HELLO) {
        return None;
    }
    let len = r.take(3)?;
    let len = usize::from(len[0]) << 16 | usize::from(len[1]) << 8 | usize::from(len[2]);
    let mut r = Reader(r.take(len)?);
    r.take(2)?; // legacy_version
    r.take(32)?; // random
    r.vec(1)?; // legacy_session_id
    r.vec(2)?; // cipher_suites
    r.vec(1)?; // legacy_compression_methods
    if r.0.is_empty() {
        return Some(false);
    }
    let mut exts = Reader(r.vec(2)?);
    while !exts.0.is_empty() {
        let ty = exts.u16()?;
        let data = exts.vec(2)?;
        if ty == usize::from(EXT_ALPN) {
            let mut list = Reader(Reader(data).vec(2)?);
            while !list.0.is_empty() {
                if list.vec(1)? == meshlet_api::MESH_ALPN {
                    return Some(true);
                }
            }
            return Some(false);
        }
    }
    Some(false)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    /// The first flight of a real rustls client offering `alpn`.
    fn client_hello(alpn: &[&[u8]]) -> Vec<u8> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_root_certificates(rustls::RootCertStore::empty())
            .with_no_client_auth();
        cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        let mut conn =
            rustls::ClientConnection::new(Arc::new(cfg), "web.shop.svc".try_into().unwrap())
                .unwrap();
        let mut out = Vec::new();
        conn.write_tls(&mut out).unwrap();
        out
    }

    #[test]
    fn recognises_mesh_alpn() {
        let hello = client_hello(&[b"h2", meshlet_api::MESH_ALPN]);
        assert_eq!(sniff(&hello), Sniff::ClientHello { mesh: true });
        // Every strict prefix asks for more.
        for n in 0..hello.len() {
            assert_eq!(sniff(&hello[..n]), Sniff::NeedMore, "prefix of {n} bytes");
        }
    }

    #[test]
    fn other_alpn_or_none_is_not_mesh() {
        assert_eq!(
            sniff(&client_hello(&[b"h2", b"http/1.1"])),
            Sniff::ClientHello { mesh: false }
        );
        assert_eq!(
            sniff(&client_hello(&[])),
            Sniff::ClientHello { mesh: false }
        );
        assert_eq!(
            sniff(&client_hello(&[b"meshlet/2"])),
            Sniff::ClientHello { mesh: false }
        );
    }

    #[test]
    fn plaintext_is_not_tls() {
        assert_eq!(sniff(b"GET / HTTP/1.1\r\n"), Sniff::NotTls);
        assert_eq!(sniff(b"PRI * HTTP/2.0"), Sniff::NotTls);
        assert_eq!(sniff(b"\x16hello"), Sniff::NotTls);
        assert_eq!(sniff(b"\x16"), Sniff::NeedMore);
    }

    #[test]
    fn garbage_after_a_record_header_is_malformed() {
        assert_eq!(sniff(b"\x16\x03\x01\x00\x00"), Sniff::Malformed);
        assert_eq!(sniff(b"\x16\x03\x01\xff\xff"), Sniff::Malformed);
        assert_eq!(
            sniff(b"\x16\x03\x01\x00\x04\x02\x00\x00\x00"),
            Sniff::Malformed
        );
        // A ClientHello whose length runs past its record.
        let mut hello = client_hello(&[meshlet_api::MESH_ALPN]);
        hello[7] = 0xff;
        assert_eq!(sniff(&hello), Sniff::Malformed);
        // Truncated extension list.
        let mut hello = client_hello(&[meshlet_api::MESH_ALPN]);
        let rec = u16::from_be_bytes([hello[3], hello[4]]) - 3;
        hello[3..5].copy_from_slice(&rec.to_be_bytes());
        hello.truncate(hello.len() - 3);
        assert_eq!(sniff(&hello), Sniff::Malformed);
        // Random bytes never panic.
        let mut x: u32 = 0x9e3779b9;
        for _ in 0..2000 {
            let mut buf = vec![0x16, 0x03, 0x01];
            let n = (x % 300) as usize;
            buf.extend_from_slice(&(n as u16).to_be_bytes());
            for _ in 0..n {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                buf.push(x as u8);
            }
            let _ = sniff(&buf);
        }
    }
}
