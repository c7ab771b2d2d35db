//! Outbound mesh mTLS: connects to a meshed destination and runs the client handshake,
//! offering ALPN `meshlet/1` and checking the server's identity.

use std::{
    hash::{DefaultHasher, Hash, Hasher},
    io,
    net::{IpAddr, SocketAddr},
    pin::Pin,
    sync::{Arc, OnceLock},
    task::{Context, Poll},
    time::Duration,
};

use meshlet_api::MESH_ALPN;
use metrics::Label;
use rustls::{pki_types::ServerName, ClientConfig};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::TcpStream,
};
use tokio_rustls::{client::TlsStream, TlsConnector};

use super::Reason;
use crate::{errors::ProxyError, metrics::Metrics};

/// What an outbound connection needs to originate mesh mTLS.
pub struct ClientTls {
    config: Arc<ClientConfig>,
    key: u64,
    metrics: Arc<Metrics>,
}

/// An upstream connection: plaintext, or mesh mTLS to a meshed destination.
pub enum Upstream {
    /// Plain TCP.
    Plain(TcpStream),
    /// Mesh mTLS (boxed: a TLS session is large, most connections are plain).
    Tls(Box<TlsStream<TcpStream>>),
}

// === impl ClientTls ===

impl std::fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientTls")
            .field("key", &self.key)
            .finish_non_exhaustive()
    }
}

impl ClientTls {
    /// Handshakes with `config`; `key` identifies the expected identities
    /// (connections are pooled, and sessions resumed, per destination and key).
    pub fn new(config: Arc<ClientConfig>, key: u64, metrics: Arc<Metrics>) -> Self {
        Self {
            config,
            key,
            metrics,
        }
    }

    /// Identifies the expected server identities, for pool keys.
    pub fn key(&self) -> u64 {
        self.key
    }

    /// Runs the client handshake on `tcp`, bounded by `timeout`.
    pub async fn handshake(
        &self,
        dst: SocketAddr,
        tcp: TcpStream,
        timeout: Duration,
    ) -> Result<TlsStream<TcpStream>, ProxyError> {
        let connector = TlsConnector::from(self.config.clone());
        let fail = |reason: Reason, message: String| {
            self.metrics
                .tls_handshake_error(crate::metrics::Direction::Outbound, reason);
            ProxyError::Tls {
                dst,
                reason: message,
            }
        };
        // The name is only a session-cache key (SNI is off): one per endpoint and set
        // of expected identities, so a session verified for one set of identities is
        // never resumed for another.
        let mut h = DefaultHasher::new();
        (self.key, dst).hash(&mut h);
        let name = ServerName::try_from(format!("{:016x}.meshlet.invalid", h.finish()))
            .map_err(|e| fail(Reason::Handshake, e.to_string()))?;
        match tokio::time::timeout(timeout, connector.connect(name, tcp)).await {
            Err(_) => Err(fail(
                Reason::Timeout,
                format!("no answer within {timeout:?}; is the destination's sidecar running?"),
            )),
            Ok(Err(e)) => Err(fail(Reason::of(&e), super::describe(&e))),
            Ok(Ok(s)) if s.get_ref().1.alpn_protocol() != Some(MESH_ALPN) => Err(fail(
                Reason::Handshake,
                "the server did not agree to ALPN meshlet/1; it is not a meshlet sidecar".into(),
            )),
            Ok(Ok(s)) => Ok(s),
        }
    }
}

/// This pod's own address, set once at startup (`MESHLET_POD_IP`).
static POD_IP: OnceLock<IpAddr> = OnceLock::new();

/// Records this pod's address: endpoints on it are reached in plaintext.
pub fn set_pod_ip(ip: IpAddr) {
    // A second call (tests start several proxies in one process) keeps the first.
    let _ = POD_IP.set(ip);
}

/// Connects to `dst`, with mesh mTLS when `tls` is set; `timeout` bounds the TCP
/// connect and the handshake each.
pub async fn connect(
    dst: SocketAddr,
    timeout: Duration,
    tls: Option<&ClientTls>,
) -> Result<Upstream, ProxyError> {
    let tcp = crate::connect::connect(dst, timeout).await?;
    // A connection from the proxy (uid 1337) to its own pod's address never leaves the
    // pod and bypasses the inbound redirect (iptables lets the proxy's traffic out
    // untouched), so the app itself answers: mTLS would meet plaintext.
    let to_self = POD_IP.get().is_some_and(|ip| *ip == dst.ip());
    match tls {
        None => Ok(Upstream::Plain(tcp)),
        Some(_) if to_self => Ok(Upstream::Plain(tcp)),
        Some(t) => Ok(Upstream::Tls(Box::new(
            t.handshake(dst, tcp, timeout).await?,
        ))),
    }
}

// === impl Metrics (TLS) ===

impl Metrics {
    /// Counts a failed handshake or refused connection.
    pub fn tls_handshake_error(&self, direction: crate::metrics::Direction, reason: Reason) {
        self.counter(
            crate::metrics::TLS_HANDSHAKE_ERRORS,
            vec![
                Label::from_static_parts("direction", direction.as_str()),
                Label::from_static_parts("reason", reason.as_str()),
            ],
        )
        .increment(1);
    }
}

// === impl Upstream ===

impl AsyncRead for Upstream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Self::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Upstream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Self::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Self::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Self::Plain(s) => s.is_write_vectored(),
            Self::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_flush(cx),
            Self::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Self::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    fn client_tls() -> ClientTls {
        let cfg = ClientConfig::builder_with_provider(crate::tls::provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_root_certificates(rustls::RootCertStore::empty())
            .with_no_client_auth();
        ClientTls::new(Arc::new(cfg), 1, Metrics::new())
    }

    /// A plaintext server on `ip` that answers the first bytes it reads.
    async fn plain_server(ip: &str) -> SocketAddr {
        let l = tokio::net::TcpListener::bind((ip, 0)).await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut s, _) = l.accept().await.unwrap();
            let mut buf = [0u8; 4];
            s.read_exact(&mut buf).await.unwrap();
            s.write_all(&buf).await.unwrap();
        });
        addr
    }

    #[tokio::test]
    async fn own_pod_address_is_reached_in_plaintext_others_with_mtls() {
        // 127.0.0.77 stands for the pod's address (no other test uses it).
        set_pod_ip("127.0.0.77".parse().unwrap());
        let tls = client_tls();
        let own = plain_server("127.0.0.77").await;
        let Upstream::Plain(mut s) = connect(own, Duration::from_secs(2), Some(&tls))
            .await
            .unwrap()
        else {
            panic!("mTLS to the pod's own address");
        };
        s.write_all(b"ping").await.unwrap();
        let mut buf = [0u8; 4];
        s.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"ping");

        // Any other plaintext destination still gets the handshake, which fails.
        let other = plain_server("127.0.0.78").await;
        let err = connect(other, Duration::from_secs(2), Some(&tls))
            .await
            .err()
            .expect("a handshake with a plaintext server fails");
        assert!(matches!(err, ProxyError::Tls { .. }), "{err}");
    }
}
