//! Protocol detection by reading the client's first bytes.
//!
//! The bytes read here are handed on as a prefix ([`crate::io::PrefixedIo`]) and
//! replayed to whatever serves the connection, so nothing is peeked twice and no
//! `MSG_PEEK` loop spins on a slow client. Detection is bounded in time (the mesh
//! config's `timeouts.detect`) and in bytes ([`MAX_PEEK`]).
//!
//! TLS seam: mesh mTLS will be recognised here as a ClientHello (first byte 0x16)
//! carrying ALPN `meshlet/1`, terminated, and detection run again on the inner stream.

use std::{
    task::{Context, Poll},
    time::Duration,
};

use bytes::{BufMut, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite};
use tower::ServiceExt;

use crate::{
    io::PrefixedIo,
    target::{BoxError, BoxFuture, Target},
};

/// The most bytes detection reads before deciding.
pub const MAX_PEEK: usize = 8 * 1024;

/// The HTTP/2 client connection preface (RFC 9113 §3.4).
pub const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// What the client speaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub enum Protocol {
    /// HTTP/1.0 or HTTP/1.1.
    Http1,
    /// HTTP/2 with prior knowledge (h2c).
    H2,
    /// Anything else: spliced as bytes.
    Opaque,
}

/// The outcome of detection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Detection {
    /// The protocol.
    pub protocol: Protocol,
    /// Whether the client sent too little before the timeout (so: opaque).
    pub timed_out: bool,
}

/// Reads from `io` into `buf` until the protocol is known, the buffer is full, the
/// client closes, or `timeout` passes. `buf` keeps every byte read.
pub async fn detect<I: AsyncRead + Unpin>(
    io: &mut I,
    buf: &mut BytesMut,
    timeout: Duration,
) -> std::io::Result<Detection> {
    let deadline = tokio::time::Instant::now() + timeout;
    let done = |protocol| {
        Ok(Detection {
            protocol,
            timed_out: false,
        })
    };
    loop {
        if let Some(p) = classify(buf) {
            return done(p);
        }
        if buf.len() >= MAX_PEEK {
            return done(classify_full(buf));
        }
        buf.reserve(MAX_PEEK.min(1024.max(buf.len())));
        let room = MAX_PEEK - buf.len();
        let mut limited = (&mut *buf).limit(room);
        match tokio::time::timeout_at(deadline, io.read_buf(&mut limited)).await {
            Err(_) => {
                return Ok(Detection {
                    protocol: Protocol::Opaque,
                    timed_out: true,
                })
            }
            // The client closed before a decision: whatever it sent is opaque.
            Ok(Ok(0)) => return done(Protocol::Opaque),
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Err(e),
        }
    }
}

/// Decides from the bytes so far, or `None` when more are needed.
pub fn classify(buf: &[u8]) -> Option<Protocol> {
    if buf.is_empty() {
        return None;
    }
    if buf.len() >= H2_PREFACE.len() {
        if buf.starts_with(H2_PREFACE) {
            return Some(Protocol::H2);
        }
    } else if H2_PREFACE.starts_with(buf) {
        return None;
    }
    if let Some(eol) = buf.iter().position(|&b| b == b'\n') {
        let line = buf[..eol].strip_suffix(b"\r").unwrap_or(&buf[..eol]);
        return Some(if is_request_line(line) {
            Protocol::Http1
        } else {
            Protocol::Opaque
        });
    }
    // No full line yet: keep reading only while it can still be `METHOD SP ...`.
    match method_prefix(buf) {
        MethodPrefix::Invalid => Some(Protocol::Opaque),
        MethodPrefix::Partial | MethodPrefix::Complete => None,
    }
}

/// Decides when [`MAX_PEEK`] bytes held no line end: a valid `METHOD SP` start is a
/// request with a very long target (let the HTTP server answer it), anything else is
/// opaque.
pub fn classify_full(buf: &[u8]) -> Protocol {
    match method_prefix(buf) {
        MethodPrefix::Complete => Protocol::Http1,
        _ => Protocol::Opaque,
    }
}

enum MethodPrefix {
    Invalid,
    Partial,
    Complete,
}

/// Longest method token accepted (`PROPPATCH`, `MKCALENDAR`, `UPDATEREDIRECTREF`...).
const MAX_METHOD: usize = 20;

fn method_prefix(buf: &[u8]) -> MethodPrefix {
    for (i, &b) in buf.iter().enumerate() {
        if b == b' ' {
            return if i == 0 {
                MethodPrefix::Invalid
            } else {
                MethodPrefix::Complete
            };
        }
        if i >= MAX_METHOD || !is_tchar(b) {
            return MethodPrefix::Invalid;
        }
    }
    MethodPrefix::Partial
}

/// `method SP request-target SP HTTP/1.x` (RFC 9112 §3).
fn is_request_line(line: &[u8]) -> bool {
    let Some(sp1) = line.iter().position(|&b| b == b' ') else {
        return false;
    };
    let Some(sp2) = line.iter().rposition(|&b| b == b' ') else {
        return false;
    };
    if sp1 == 0 || sp1 > MAX_METHOD || sp2 <= sp1 + 1 {
        return false;
    }
    line[..sp1].iter().all(|&b| is_tchar(b))
        && matches!(&line[sp2 + 1..], b"HTTP/1.1" | b"HTTP/1.0")
}

fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

// === DetectLayer ===

/// The detection stage: sends opaque ports straight to the TCP service, and every
/// other connection, after detection, to the HTTP service or the TCP service. Both
/// get the bytes read so far replayed.
#[derive(Clone)]
pub struct DetectLayer<T> {
    tcp: T,
}

/// See [`DetectLayer`].
#[derive(Clone)]
pub struct Detect<H, T> {
    http: H,
    tcp: T,
}

impl<T: Clone> DetectLayer<T> {
    /// Opaque connections go to `tcp`.
    pub fn new(tcp: T) -> Self {
        Self { tcp }
    }
}

impl<H, T: Clone> tower::Layer<H> for DetectLayer<T> {
    type Service = Detect<H, T>;

    fn layer(&self, http: H) -> Detect<H, T> {
        Detect {
            http,
            tcp: self.tcp.clone(),
        }
    }
}

impl<H, T, I> tower::Service<(Target, I)> for Detect<H, T>
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    H: tower::Service<(Target, Protocol, PrefixedIo<I>), Response = (), Error = BoxError>
        + Clone
        + Send
        + 'static,
    H::Future: Send + 'static,
    T: tower::Service<(Target, PrefixedIo<I>), Response = (), Error = BoxError>
        + Clone
        + Send
        + 'static,
    T::Future: Send + 'static,
{
    type Response = ();
    type Error = BoxError;
    type Future = BoxFuture<Result<(), BoxError>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        // Each connection drives a clone of the inner services to readiness itself.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, (target, mut io): (Target, I)) -> Self::Future {
        let http = self.http.clone();
        let tcp = self.tcp.clone();
        Box::pin(async move {
            // Server-first protocols: the client waits for a banner, so detection
            // would only add its timeout to every connect.
            if target.mesh.is_opaque(target.dst.port()) {
                return tcp
                    .oneshot((target, PrefixedIo::new(Bytes::new(), io)))
                    .await;
            }
            if target.silent {
                target.timeout("detect");
                return tcp
                    .oneshot((target, PrefixedIo::new(Bytes::new(), io)))
                    .await;
            }
            let mut buf = BytesMut::new();
            let detected = detect(&mut io, &mut buf, target.mesh.detect_timeout()).await?;
            if detected.timed_out {
                target.timeout("detect");
            }
            let io = PrefixedIo::new(buf.freeze(), io);
            match detected.protocol {
                Protocol::Opaque => tcp.oneshot((target, io)).await,
                protocol => http.oneshot((target, protocol, io)).await,
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    #[test]
    fn classifies() {
        assert_eq!(
            classify(b"GET / HTTP/1.1\r\nHost: x\r\n"),
            Some(Protocol::Http1)
        );
        assert_eq!(classify(b"POST /a?b=c HTTP/1.0\r\n"), Some(Protocol::Http1));
        assert_eq!(classify(b"GET http://x/ HTTP/1.1\n"), Some(Protocol::Http1));
        assert_eq!(classify(H2_PREFACE), Some(Protocol::H2));
        assert_eq!(
            classify(b"PRI * HTTP/2.0\r\n"),
            None,
            "preface prefix needs more"
        );
        assert_eq!(classify(b"GET / HTT"), None);
        assert_eq!(classify(b"GE"), None);
        assert_eq!(classify(b""), None);
        assert_eq!(
            classify(b"\x16\x03\x01\x02\x00"),
            Some(Protocol::Opaque),
            "TLS is opaque for now"
        );
        assert_eq!(
            classify(b"*1\r\n$4\r\nPING\r\n"),
            Some(Protocol::Opaque),
            "redis"
        );
        assert_eq!(classify(b"GET / HTTP/2.0\r\n"), Some(Protocol::Opaque));
        assert_eq!(classify(b"hello world\r\n"), Some(Protocol::Opaque));
        assert_eq!(classify(b" GET"), Some(Protocol::Opaque));
        assert_eq!(
            classify(b"ABCDEFGHIJKLMNOPQRSTUVWXYZ"),
            Some(Protocol::Opaque)
        );
    }

    #[test]
    fn full_buffer() {
        let mut long = b"GET /".to_vec();
        long.resize(MAX_PEEK, b'a');
        assert_eq!(classify(&long), None);
        assert_eq!(classify_full(&long), Protocol::Http1);
        assert_eq!(classify_full(&[b'x'; 30]), Protocol::Opaque);
    }

    #[tokio::test]
    async fn detects_split_request_line() {
        let (mut client, mut server) = tokio::io::duplex(1024);
        let task = tokio::spawn(async move {
            let mut buf = BytesMut::new();
            let d = detect(&mut server, &mut buf, Duration::from_secs(5))
                .await
                .unwrap();
            (d, buf)
        });
        client.write_all(b"GET /pa").await.unwrap();
        tokio::task::yield_now().await;
        client
            .write_all(b"th HTTP/1.1\r\nHost: a\r\n\r\n")
            .await
            .unwrap();
        let (d, buf) = task.await.unwrap();
        assert_eq!(
            d,
            Detection {
                protocol: Protocol::Http1,
                timed_out: false
            }
        );
        assert!(
            buf.starts_with(b"GET /path HTTP/1.1\r\n"),
            "bytes are kept for replay"
        );
    }

    #[tokio::test]
    async fn detects_h2_preface() {
        let (mut client, mut server) = tokio::io::duplex(1024);
        client.write_all(H2_PREFACE).await.unwrap();
        let mut buf = BytesMut::new();
        let d = detect(&mut server, &mut buf, Duration::from_secs(5))
            .await
            .unwrap();
        assert_eq!(d.protocol, Protocol::H2);
        assert_eq!(&buf[..], H2_PREFACE);
    }

    #[tokio::test]
    async fn silent_client_times_out_as_opaque() {
        let (_client, mut server) = tokio::io::duplex(1024);
        let mut buf = BytesMut::new();
        let start = std::time::Instant::now();
        let d = detect(&mut server, &mut buf, Duration::from_millis(50))
            .await
            .unwrap();
        assert_eq!(
            d,
            Detection {
                protocol: Protocol::Opaque,
                timed_out: true
            }
        );
        assert!(start.elapsed() < Duration::from_secs(2));
    }

    #[tokio::test]
    async fn eof_is_opaque() {
        let (mut client, mut server) = tokio::io::duplex(1024);
        client.write_all(b"GE").await.unwrap();
        drop(client);
        let mut buf = BytesMut::new();
        let d = detect(&mut server, &mut buf, Duration::from_secs(5))
            .await
            .unwrap();
        assert_eq!(d.protocol, Protocol::Opaque);
        assert_eq!(&buf[..], b"GE");
    }

    #[tokio::test]
    async fn reads_at_most_max_peek() {
        let (mut client, mut server) = tokio::io::duplex(64 * 1024);
        let mut data = b"GET /".to_vec();
        data.resize(3 * MAX_PEEK, b'a');
        client.write_all(&data).await.unwrap();
        let mut buf = BytesMut::new();
        let d = detect(&mut server, &mut buf, Duration::from_secs(5))
            .await
            .unwrap();
        assert_eq!(d.protocol, Protocol::Http1);
        assert_eq!(buf.len(), MAX_PEEK);
    }

    mod layer {
        use std::sync::Arc;

        use meshlet_api::MeshConfig;
        use tokio::{
            io::{AsyncReadExt, AsyncWriteExt, DuplexStream},
            sync::mpsc,
        };
        use tower::{Layer, ServiceExt};

        use super::super::*;
        use crate::{
            mesh::Snapshot,
            metrics::{Direction, Metrics},
        };

        type Seen = (&'static str, Option<Protocol>, Vec<u8>);

        /// A detect stage whose HTTP and TCP services report what they got.
        fn stack(
            tx: mpsc::UnboundedSender<Seen>,
        ) -> impl tower::Service<
            (Target, DuplexStream),
            Response = (),
            Error = BoxError,
            Future = BoxFuture<Result<(), BoxError>>,
        > + Send
               + 'static {
            let t = tx.clone();
            let tcp = tower::service_fn(move |(_, mut io): (Target, PrefixedIo<DuplexStream>)| {
                let t = t.clone();
                async move {
                    let mut got = vec![0u8; 64];
                    let n = io.read(&mut got).await?;
                    got.truncate(n);
                    let _ = t.send(("tcp", None, got));
                    Ok::<(), BoxError>(())
                }
            });
            let http = tower::service_fn(
                move |(_, p, mut io): (Target, Protocol, PrefixedIo<DuplexStream>)| {
                    let tx = tx.clone();
                    async move {
                        let mut got = vec![0u8; 64];
                        let n = io.read(&mut got).await?;
                        got.truncate(n);
                        let _ = tx.send(("http", Some(p), got));
                        Ok::<(), BoxError>(())
                    }
                },
            );
            DetectLayer::new(tcp).layer(http)
        }

        fn target(cfg: MeshConfig, opaque: Option<&[u16]>, metrics: &Arc<Metrics>) -> Target {
            let dst = "198.19.0.1:6379".parse().unwrap();
            Target {
                direction: Direction::Outbound,
                dst,
                local: None,
                mesh: Arc::new(Snapshot::new(cfg, opaque)),
                metrics: Some(metrics.connection(Direction::Outbound, "unknown".into())),
                tls: Default::default(),
                silent: false,
            }
        }

        #[tokio::test]
        async fn opaque_port_skips_detection() {
            let (tx, mut rx) = mpsc::unbounded_channel();
            let m = Metrics::new();
            let (mut client, server) = tokio::io::duplex(1024);
            let start = std::time::Instant::now();
            let conn =
                tokio::spawn(stack(tx).oneshot((target(MeshConfig::default(), None, &m), server)));
            // A server-first client says nothing until it has the banner; the TCP
            // service must be reached at once. It then reads what the client sends.
            tokio::time::sleep(Duration::from_millis(50)).await;
            client.write_all(b"PING\r\n").await.unwrap();
            let (which, p, got) = rx.recv().await.unwrap();
            assert_eq!((which, p), ("tcp", None));
            assert_eq!(got, b"PING\r\n");
            assert!(
                start.elapsed() < Duration::from_millis(900),
                "no detect timeout"
            );
            conn.await.unwrap().unwrap();
        }

        #[tokio::test]
        async fn http1_goes_to_http_with_bytes_replayed() {
            let (tx, mut rx) = mpsc::unbounded_channel();
            let m = Metrics::new();
            let (mut client, server) = tokio::io::duplex(1024);
            client
                .write_all(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
                .await
                .unwrap();
            stack(tx)
                .oneshot((target(MeshConfig::default(), Some(&[]), &m), server))
                .await
                .unwrap();
            let (which, p, got) = rx.recv().await.unwrap();
            assert_eq!((which, p), ("http", Some(Protocol::Http1)));
            assert_eq!(got, b"GET / HTTP/1.1\r\nHost: a\r\n\r\n");
        }

        #[tokio::test]
        async fn h2c_goes_to_http() {
            let (tx, mut rx) = mpsc::unbounded_channel();
            let m = Metrics::new();
            let (mut client, server) = tokio::io::duplex(1024);
            client.write_all(H2_PREFACE).await.unwrap();
            stack(tx)
                .oneshot((target(MeshConfig::default(), Some(&[]), &m), server))
                .await
                .unwrap();
            let (which, p, _) = rx.recv().await.unwrap();
            assert_eq!((which, p), ("http", Some(Protocol::H2)));
        }

        #[tokio::test]
        async fn timeout_goes_to_tcp_and_is_counted() {
            let (tx, mut rx) = mpsc::unbounded_channel();
            let m = Metrics::new();
            let cfg = MeshConfig::from_json(br#"{"timeouts": {"detect": "50ms"}}"#).unwrap();
            let (mut client, server) = tokio::io::duplex(1024);
            let conn = tokio::spawn(stack(tx).oneshot((target(cfg, Some(&[]), &m), server)));
            tokio::time::sleep(Duration::from_millis(150)).await;
            client.write_all(b"late").await.unwrap();
            let (which, _, got) = rx.recv().await.unwrap();
            assert_eq!(which, "tcp");
            assert_eq!(got, b"late");
            conn.await.unwrap().unwrap();
            let text = m.render();
            assert!(
                text.contains(r#"meshlet_timeouts_total{direction="outbound",kind="detect"} 1"#),
                "{text}"
            );
        }
    }
}
