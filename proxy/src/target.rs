//! What the connection stack knows about an accepted connection, and the types
//! every stage shares.
//!
//! The stack is a chain of tower services over `(Target, IO)`; each stage adds to
//! the target or wraps the IO and calls the next one:
//!
//! ```text
//! (Direction, TcpStream)
//!   -> orig_dst::OrigDstLayer      original destination, mesh snapshot
//!   -> tls::MeshTlsLayer           inbound: sniff, terminate mesh mTLS or refuse;
//!                                  outbound: mTLS settings for meshed destinations
//!   -> metrics::ConnMetricsLayer   opened/closed/bytes (counts on the accepted IO)
//!   -> loop_guard::LoopGuardLayer  refuses the proxy's own ports
//!   -> detect::DetectLayer         opaque-port bypass or protocol detection
//!        -> http::server::ServeHttp    HTTP/1 or HTTP/2 (tower HTTP stack inside)
//!        -> tcp::ForwardTcp            opaque splice
//! ```

use std::{error::Error as StdError, future::Future, net::SocketAddr, pin::Pin, sync::Arc};

use crate::{
    mesh::Snapshot,
    metrics::{ConnMetrics, Direction},
    tls::ClientTls,
};

/// The error of every connection stage.
pub type BoxError = Box<dyn StdError + Send + Sync>;

/// The future of every connection stage.
pub type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

/// An accepted connection as the stack sees it.
#[derive(Clone, Debug)]
pub struct Target {
    /// Which listener accepted it.
    pub direction: Direction,
    /// Where the client meant to connect.
    pub dst: SocketAddr,
    /// The accepting socket's address.
    pub local: Option<SocketAddr>,
    /// The mesh config at accept time; the connection keeps it to the end.
    pub mesh: Arc<Snapshot>,
    /// The connection's metrics, once the metrics stage has run.
    pub metrics: Option<ConnMetrics>,
    /// What mesh TLS does on this connection (set by the mesh TLS stage).
    pub tls: TlsStatus,
    /// The client already stayed silent for `timeouts.detect` (the mesh TLS stage
    /// waited for its first bytes): detection would only wait again.
    pub silent: bool,
}

/// Mesh TLS on a connection.
#[derive(Clone, Debug, Default)]
pub enum TlsStatus {
    /// Plaintext.
    #[default]
    Plain,
    /// Inbound mesh mTLS was terminated; the client's verified SPIFFE id.
    Inbound {
        /// The client's identity.
        client: Arc<str>,
    },
    /// Outbound to a meshed destination: the proxy originates mTLS.
    Outbound(Arc<ClientTls>),
}

impl TlsStatus {
    /// Whether the connection is (or its upstream will be) mesh mTLS.
    pub fn is_tls(&self) -> bool {
        !matches!(self, Self::Plain)
    }

    /// The outbound settings, if mTLS is to be originated.
    pub fn client(&self) -> Option<&ClientTls> {
        match self {
            Self::Outbound(c) => Some(c),
            _ => None,
        }
    }

    /// The verified client identity of an inbound mTLS connection.
    pub fn peer(&self) -> Option<&Arc<str>> {
        match self {
            Self::Inbound { client } => Some(client),
            _ => None,
        }
    }
}

impl Target {
    /// Counts a timeout of `kind` on this connection (no-op before the metrics stage).
    pub fn timeout(&self, kind: &'static str) {
        if let Some(m) = &self.metrics {
            m.timeout(kind);
        }
    }
}

/// Whether `error` or anything in its source chain is an `E`.
pub fn is_caused_by<E: StdError + 'static>(error: &(dyn StdError + 'static)) -> bool {
    let mut cur = Some(error);
    while let Some(e) = cur {
        if e.is::<E>() {
            return true;
        }
        cur = e.source();
    }
    false
}
