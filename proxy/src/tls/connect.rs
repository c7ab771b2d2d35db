//! Outbound mesh mTLS: connects to a meshed destination and runs the client handshake,
//! offering ALPN `meshlet/1` and checking the server's identity.

use std::{
    hash::{DefaultHasher, Hash, Hasher},
    net::{IpAddr, SocketAddr},
    sync::{Arc, OnceLock},
    time::Duration,
};

use meshlet_api::MESH_ALPN;
use metrics::Label;
use rustls::{pki_types::ServerName, ClientConfig};
use tokio::net::TcpStream;
use tokio_rustls::{client::TlsStream, TlsConnector};

use super::Reason;
use crate::{errors::ProxyError, io::MaybeTls, metrics::Metrics};

/// What an outbound connection needs to originate mesh mTLS.
pub struct ClientTls {
    config: Arc<ClientConfig>,
    key: u64,
    metrics: Arc<Metrics>,
}

/// An upstream connection: plain TCP, or mesh mTLS to a meshed destination.
pub type Upstream = MaybeTls<TcpStream, TlsStream<TcpStream>>;

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
