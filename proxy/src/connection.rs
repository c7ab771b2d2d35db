//! What happens to one accepted connection, stage by stage:
//! original destination -> loop guard -> metrics -> opaque-port bypass or protocol
//! detection -> HTTP stack or TCP splice.

use std::{
    collections::HashSet,
    error::Error as StdError,
    net::{IpAddr, SocketAddr},
    sync::Arc,
};

use bytes::{Bytes, BytesMut};
use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::TcpStream,
};

use crate::{
    connect::connect,
    detect::{self, Protocol},
    drain,
    errors::ProxyError,
    http,
    io::{CountingIo, PrefixedIo},
    mesh::{Mesh, Snapshot},
    metrics::{ConnMetrics, Direction, Metrics, UNKNOWN_SERVICE},
    orig_dst::OrigDst,
    tcp,
};

type BoxError = Box<dyn StdError + Send + Sync>;

/// What every connection needs, shared by the listeners.
pub struct Ctx {
    /// The mesh config in force.
    pub mesh: Arc<Mesh>,
    /// Metrics registry.
    pub metrics: Arc<Metrics>,
    /// Original-destination lookup.
    pub orig_dst: Arc<dyn OrigDst>,
    /// Upstream HTTP connections.
    pub pool: http::Pool,
    /// The proxy's own ports (as bound).
    pub own_ports: Vec<u16>,
    /// Addresses of this host (pod), for the loop guard.
    pub local_ips: HashSet<IpAddr>,
}

// === impl Ctx ===

impl Ctx {
    /// Whether `dst` is one of the proxy's own listeners: forwarding there would
    /// feed the connection back into the proxy forever.
    pub fn is_loop(&self, dst: SocketAddr, local: Option<SocketAddr>) -> bool {
        if !self.own_ports.contains(&dst.port()) {
            return false;
        }
        let ip = dst.ip();
        ip.is_loopback()
            || ip.is_unspecified()
            || local.is_some_and(|l| l.ip() == ip)
            || self.local_ips.contains(&ip)
    }
}

/// Serves one accepted connection to the end.
pub async fn handle(ctx: Arc<Ctx>, direction: Direction, stream: TcpStream, drain: drain::Watch) {
    // The app side of a sidecar hop is latency-bound, never throughput-bound.
    let _ = stream.set_nodelay(true);
    let dst = match ctx.orig_dst.orig_dst(direction, &stream) {
        Ok(dst) => dst,
        Err(error) => {
            tracing::debug!(%error, %direction, "no original destination; closing");
            ctx.metrics
                .connection(direction, UNKNOWN_SERVICE.into())
                .closed("error");
            return;
        }
    };
    if ctx.is_loop(dst, stream.local_addr().ok()) {
        tracing::debug!(%dst, %direction, "refusing a connection addressed to the proxy itself");
        ctx.metrics
            .connection(direction, UNKNOWN_SERVICE.into())
            .closed("loop");
        return;
    }
    let snap = ctx.mesh.load();
    let m = ctx.metrics.connection(direction, snap.service_label(dst));
    let io = CountingIo::new(stream, m.sent.clone(), m.received.clone());
    let reason = match serve(&ctx, &snap, dst, io, &m, drain).await {
        Ok(()) => "ok",
        Err(error) => {
            tracing::debug!(%error, %dst, %direction, "connection failed");
            "error"
        }
    };
    m.closed(reason);
}

async fn serve<I>(
    ctx: &Ctx,
    snap: &Snapshot,
    dst: SocketAddr,
    mut io: I,
    m: &ConnMetrics,
    drain: drain::Watch,
) -> Result<(), BoxError>
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    // Server-first protocols: the client waits for a banner, so detection would only
    // add its timeout to every connect.
    if snap.is_opaque(dst.port()) {
        return opaque(snap, dst, PrefixedIo::new(Bytes::new(), io), m).await;
    }
    let mut buf = BytesMut::new();
    let detected = detect::detect(&mut io, &mut buf, snap.detect_timeout()).await?;
    if detected.timed_out {
        m.timeout("detect");
    }
    let io = PrefixedIo::new(buf.freeze(), io);
    match detected.protocol {
        Protocol::Opaque => opaque(snap, dst, io, m).await,
        protocol => {
            let fwd = http::Forward::new(
                dst,
                protocol,
                ctx.pool.clone(),
                snap.connect_timeout(),
                snap.idle_timeout(),
                drain.clone(),
            );
            let svc = tower::ServiceBuilder::new()
                .layer(http::ObserveLayer::new(Arc::new(m.requests())))
                .service(fwd);
            http::server::serve(io, protocol, svc, &drain).await?;
            Ok(())
        }
    }
}

async fn opaque<I>(
    snap: &Snapshot,
    dst: SocketAddr,
    mut io: PrefixedIo<I>,
    m: &ConnMetrics,
) -> Result<(), BoxError>
where
    I: AsyncRead + AsyncWrite + Unpin,
{
    let mut upstream = match connect(dst, snap.connect_timeout()).await {
        Ok(s) => s,
        Err(e) => {
            if matches!(e, ProxyError::ConnectTimeout { .. }) {
                m.timeout("connect");
            }
            return Err(e.into());
        }
    };
    if let tcp::SpliceEnd::Idle = tcp::splice(&mut io, &mut upstream, snap.idle_timeout()).await? {
        m.timeout("idle");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx(own: &[u16], ips: &[&str]) -> Ctx {
        Ctx {
            mesh: Arc::new(Mesh::new(Default::default(), None)),
            metrics: Metrics::new(),
            orig_dst: Arc::new(crate::orig_dst::SoOriginalDst),
            pool: http::Pool::new(),
            own_ports: own.to_vec(),
            local_ips: ips.iter().map(|i| i.parse().unwrap()).collect(),
        }
    }

    #[test]
    fn loop_guard() {
        let c = ctx(&[15001, 15006, 15020], &["198.18.0.5"]);
        let local = Some("198.18.0.5:15006".parse().unwrap());
        assert!(c.is_loop("127.0.0.1:15001".parse().unwrap(), None));
        assert!(c.is_loop("198.18.0.5:15020".parse().unwrap(), None));
        assert!(c.is_loop(
            "198.18.0.6:15006".parse().unwrap(),
            Some("198.18.0.6:15006".parse().unwrap())
        ));
        assert!(c.is_loop("[::1]:15006".parse().unwrap(), local));
        assert!(
            !c.is_loop("198.19.0.10:15001".parse().unwrap(), local),
            "another pod's 15001 is fine"
        );
        assert!(!c.is_loop("127.0.0.1:8080".parse().unwrap(), local));
    }
}
