//! The mesh TLS stage of the connection stack (between the original destination and
//! the metrics stage, so metrics know the connection's TLS status and peer).
//!
//! Inbound, with an identity configured: the first bytes are read (bounded in time and
//! size) and sniffed. A ClientHello offering `meshlet/1` is terminated here and the
//! decrypted stream goes on; anything else goes on as plaintext in permissive mode
//! (TLS without the mesh ALPN too: the app may terminate TLS itself) and is closed and
//! counted in strict mode. Bytes that start like a TLS handshake but are no readable
//! ClientHello are closed and counted in both modes. Outbound: connections to destinations the
//! mesh config marks meshed get the settings to originate mTLS.

use std::{
    io,
    net::SocketAddr,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use bytes::{BufMut, Bytes, BytesMut};
use tokio::{io::AsyncReadExt, net::TcpStream};
use tokio_rustls::{server::TlsStream, TlsAcceptor};
use tower::ServiceExt;

use super::{
    client_hello::{sniff, Sniff},
    verify, Identity, Reason, TlsMode,
};
use crate::{
    detect::MAX_PEEK,
    io::{MaybeTls, PrefixedIo, Reset},
    metrics::{Direction, Metrics},
    target::{BoxError, BoxFuture, Target, TlsStatus},
};

/// On an opaque port in permissive mode, how long the inbound side waits for a
/// ClientHello before it takes the connection for a plaintext server-first protocol
/// (whose client says nothing until it has the server's banner). A meshlet client
/// sends its ClientHello right after connecting.
pub const OPAQUE_HELLO_WAIT: Duration = Duration::from_millis(100);

/// An accepted connection after the mesh TLS stage: plaintext, with the bytes read
/// while sniffing replayed first, or terminated mesh mTLS.
pub type ServerIo = MaybeTls<PrefixedIo<TcpStream>, TlsStream<PrefixedIo<TcpStream>>>;

/// An inbound connection refused by the mesh TLS stage.
#[derive(Debug, thiserror::Error)]
#[error("refused inbound connection to {dst} ({}): {detail}", .reason.as_str())]
pub struct Refused {
    /// The destination.
    pub dst: SocketAddr,
    /// The counted reason.
    pub reason: Reason,
    /// What happened.
    pub detail: String,
}

/// Adds [`MeshTls`] to a stack.
#[derive(Clone)]
pub struct MeshTlsLayer {
    identity: Option<Arc<Identity>>,
    mode: TlsMode,
    metrics: Arc<Metrics>,
}

/// See [`MeshTlsLayer`].
#[derive(Clone)]
pub struct MeshTls<S> {
    inner: S,
    identity: Option<Arc<Identity>>,
    mode: TlsMode,
    metrics: Arc<Metrics>,
}

impl MeshTlsLayer {
    /// Without `identity` the stage passes everything on as plaintext.
    pub fn new(identity: Option<Arc<Identity>>, mode: TlsMode, metrics: Arc<Metrics>) -> Self {
        Self {
            identity,
            mode,
            metrics,
        }
    }
}

impl<S> tower::Layer<S> for MeshTlsLayer {
    type Service = MeshTls<S>;

    fn layer(&self, inner: S) -> MeshTls<S> {
        MeshTls {
            inner,
            identity: self.identity.clone(),
            mode: self.mode,
            metrics: self.metrics.clone(),
        }
    }
}

impl<S> tower::Service<(Target, TcpStream)> for MeshTls<S>
where
    S: tower::Service<(Target, ServerIo), Response = (), Error = BoxError> + Clone + Send + 'static,
    S::Future: Send + 'static,
{
    type Response = ();
    type Error = BoxError;
    type Future = BoxFuture<Result<(), BoxError>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        // Each connection drives a clone of the inner service to readiness itself.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, (mut target, stream): (Target, TcpStream)) -> Self::Future {
        let inner = self.inner.clone();
        let Some(identity) = self.identity.clone() else {
            return Box::pin(inner.oneshot((target, ServerIo::plain(stream))));
        };
        match target.direction {
            Direction::Outbound => {
                if let Some(expected) = target.mesh.mesh_identities(target.dst) {
                    match identity.client_tls(expected) {
                        Ok(t) => target.tls = TlsStatus::Outbound(Arc::new(t)),
                        Err(e) => return Box::pin(async move { Err(e.into()) }),
                    }
                }
                Box::pin(inner.oneshot((target, ServerIo::plain(stream))))
            }
            Direction::Inbound => Box::pin(inbound(
                inner,
                target,
                stream,
                identity,
                self.mode,
                self.metrics.clone(),
            )),
        }
    }
}

/// What sniffing found.
enum Hello {
    Sniffed(Sniff),
    Timeout,
    /// The client closed without sending anything.
    Closed,
}

async fn read_hello(io: &mut TcpStream, buf: &mut BytesMut, wait: Duration) -> io::Result<Hello> {
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        match sniff(buf) {
            Sniff::NeedMore if buf.len() >= MAX_PEEK => {
                return Ok(Hello::Sniffed(Sniff::Malformed))
            }
            Sniff::NeedMore => {}
            s => return Ok(Hello::Sniffed(s)),
        }
        buf.reserve(1024);
        let room = MAX_PEEK - buf.len();
        let mut limited = (&mut *buf).limit(room);
        match tokio::time::timeout_at(deadline, io.read_buf(&mut limited)).await {
            Err(_) => return Ok(Hello::Timeout),
            Ok(Ok(0)) if buf.is_empty() => return Ok(Hello::Closed),
            Ok(Ok(0)) => return Ok(Hello::Sniffed(Sniff::Malformed)),
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Err(e),
        }
    }
}

async fn inbound<S>(
    inner: S,
    mut target: Target,
    mut stream: TcpStream,
    identity: Arc<Identity>,
    mode: TlsMode,
    metrics: Arc<Metrics>,
) -> Result<(), BoxError>
where
    S: tower::Service<(Target, ServerIo), Response = (), Error = BoxError> + Send + 'static,
    S::Future: Send + 'static,
{
    let detect = target.mesh.detect_timeout();
    let wait = if mode == TlsMode::Permissive && target.mesh.is_opaque(target.dst.port()) {
        detect.min(OPAQUE_HELLO_WAIT)
    } else {
        detect
    };
    let mut buf = BytesMut::new();
    let hello = read_hello(&mut stream, &mut buf, wait).await?;
    let dst = target.dst;
    let refuse = |reason: Reason, detail: String| -> Result<(), BoxError> {
        metrics.tls_handshake_error(Direction::Inbound, reason);
        Err(Refused {
            dst,
            reason,
            detail,
        }
        .into())
    };
    match (hello, mode) {
        (Hello::Sniffed(Sniff::ClientHello { mesh: true }), _) => {}
        // Starts like a TLS handshake but is none: no app could use it either.
        (Hello::Sniffed(Sniff::Malformed), _) => {
            return refuse(Reason::Malformed, "not a readable ClientHello".into())
        }
        (hello, TlsMode::Permissive) => {
            target.silent = matches!(hello, Hello::Timeout) && wait >= detect;
            let io = ServerIo::Plain(PrefixedIo::new(buf.freeze(), stream));
            return inner.oneshot((target, io)).await;
        }
        (Hello::Closed, TlsMode::Strict) => return Ok(()),
        (Hello::Timeout, TlsMode::Strict) => {
            return refuse(Reason::Timeout, format!("no ClientHello within {wait:?}"))
        }
        (Hello::Sniffed(s), TlsMode::Strict) => {
            let (reason, detail) = match s {
                Sniff::NotTls => (Reason::Plaintext, "plaintext in strict mode"),
                Sniff::ClientHello { .. } => (
                    Reason::NonMeshTls,
                    "TLS without ALPN meshlet/1 in strict mode",
                ),
                Sniff::NeedMore | Sniff::Malformed => {
                    (Reason::Malformed, "not a readable ClientHello")
                }
            };
            return refuse(reason, detail.into());
        }
    }
    if !identity.is_loaded() {
        return refuse(
            Reason::NoIdentity,
            "mesh TLS arrived before this proxy's certificate was loaded".into(),
        );
    }
    let acceptor = TlsAcceptor::from(identity.server_config());
    let io = PrefixedIo::new(buf.freeze(), stream);
    let timeout = target.mesh.connect_timeout();
    let tls = match tokio::time::timeout(timeout, acceptor.accept(io)).await {
        Err(_) => {
            return refuse(
                Reason::Timeout,
                format!("handshake not done in {timeout:?}"),
            )
        }
        Ok(Err(e)) => return refuse(Reason::of(&e), super::describe(&e)),
        Ok(Ok(tls)) => tls,
    };
    let peer = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .map(verify::peer_id);
    let client = match peer {
        Some(Ok(id)) => id,
        Some(Err(e)) => return refuse(Reason::Certificate, e.to_string()),
        None => return refuse(Reason::Certificate, "no client certificate".into()),
    };
    target.tls = TlsStatus::Inbound {
        client: client.to_string().into(),
    };
    inner.oneshot((target, ServerIo::Tls(Box::new(tls)))).await
}

// === impl ServerIo ===

impl ServerIo {
    /// A plaintext connection with nothing read yet.
    pub fn plain(stream: TcpStream) -> Self {
        Self::Plain(PrefixedIo::new(Bytes::new(), stream))
    }
}

impl Reset for ServerIo {
    fn reset(&self) {
        match self {
            Self::Plain(p) => p.reset(),
            Self::Tls(t) => t.get_ref().0.reset(),
        }
    }
}
