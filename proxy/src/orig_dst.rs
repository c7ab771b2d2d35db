//! Where a redirected connection was going before iptables REDIRECT sent it to us.
//!
//! Behind a trait so in-process tests can fake it without iptables (like linkerd's
//! `MockOrigDst`).

use std::{
    io,
    net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6},
    sync::Arc,
    task::{Context, Poll},
};

use nix::sys::socket::{getsockopt, sockopt};
use tokio::net::TcpStream;

use crate::{
    mesh::Mesh,
    metrics::Direction,
    target::{BoxError, BoxFuture, Target},
};

/// Finds the original destination of an accepted connection.
pub trait OrigDst: Send + Sync + 'static {
    /// The destination `stream` was addressed to, on the listener of `direction`.
    fn orig_dst(&self, direction: Direction, stream: &TcpStream) -> io::Result<SocketAddr>;
}

/// The kernel's answer: `SO_ORIGINAL_DST` (IPv4) / `IP6T_SO_ORIGINAL_DST` (IPv6) from
/// conntrack. Without a NAT rule it returns the address the client connected to.
#[derive(Clone, Copy, Debug, Default)]
pub struct SoOriginalDst;

impl OrigDst for SoOriginalDst {
    fn orig_dst(&self, _: Direction, stream: &TcpStream) -> io::Result<SocketAddr> {
        let errno = |e: nix::errno::Errno| io::Error::from_raw_os_error(e as i32);
        match stream.local_addr()? {
            SocketAddr::V4(_) => {
                let sa = getsockopt(stream, sockopt::OriginalDst).map_err(errno)?;
                let ip = Ipv4Addr::from(u32::from_be(sa.sin_addr.s_addr));
                Ok(SocketAddrV4::new(ip, u16::from_be(sa.sin_port)).into())
            }
            SocketAddr::V6(_) => {
                let sa = getsockopt(stream, sockopt::Ip6tOriginalDst).map_err(errno)?;
                let ip = Ipv6Addr::from(sa.sin6_addr.s6_addr);
                Ok(SocketAddrV6::new(
                    ip,
                    u16::from_be(sa.sin6_port),
                    sa.sin6_flowinfo,
                    sa.sin6_scope_id,
                )
                .into())
            }
        }
    }
}

/// The original destination could not be read.
#[derive(Debug, thiserror::Error)]
#[error("cannot read the original destination: {0} (is meshlet-init's redirect in place?)")]
pub struct NoOrigDst(#[source] pub io::Error);

/// The first stage: turns an accepted `(Direction, TcpStream)` into a [`Target`]
/// with its original destination and the mesh snapshot in force.
#[derive(Clone)]
pub struct OrigDstLayer {
    orig_dst: Arc<dyn OrigDst>,
    mesh: Arc<Mesh>,
}

/// See [`OrigDstLayer`].
#[derive(Clone)]
pub struct AddOrigDst<S> {
    inner: S,
    orig_dst: Arc<dyn OrigDst>,
    mesh: Arc<Mesh>,
}

impl OrigDstLayer {
    /// Looks destinations up with `orig_dst`, snapshots `mesh`.
    pub fn new(orig_dst: Arc<dyn OrigDst>, mesh: Arc<Mesh>) -> Self {
        Self { orig_dst, mesh }
    }
}

impl<S> tower::Layer<S> for OrigDstLayer {
    type Service = AddOrigDst<S>;

    fn layer(&self, inner: S) -> AddOrigDst<S> {
        AddOrigDst {
            inner,
            orig_dst: self.orig_dst.clone(),
            mesh: self.mesh.clone(),
        }
    }
}

impl<S> tower::Service<(Direction, TcpStream)> for AddOrigDst<S>
where
    S: tower::Service<(Target, TcpStream), Response = (), Error = BoxError>,
    S::Future: Send + 'static,
{
    type Response = ();
    type Error = BoxError;
    type Future = BoxFuture<Result<(), BoxError>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, (direction, stream): (Direction, TcpStream)) -> Self::Future {
        let dst = match self.orig_dst.orig_dst(direction, &stream) {
            Ok(dst) => dst,
            Err(e) => return Box::pin(async move { Err(NoOrigDst(e).into()) }),
        };
        let target = Target {
            direction,
            dst,
            local: stream.local_addr().ok(),
            mesh: self.mesh.load(),
            metrics: None,
            tls: Default::default(),
            silent: false,
        };
        Box::pin(self.inner.call((target, stream)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn without_nat_reports_the_local_address() {
        // No REDIRECT rule: conntrack may not track the flow at all (no nf_conntrack
        // loaded), in which case the kernel says ENOENT. Either answer is fine; a wrong
        // address is not.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let _client = TcpStream::connect(addr).await.unwrap();
        let (server, _) = listener.accept().await.unwrap();
        match SoOriginalDst.orig_dst(Direction::Outbound, &server) {
            Ok(dst) => assert_eq!(dst, addr),
            Err(e) => assert_eq!(e.raw_os_error(), Some(nix::libc::ENOENT), "{e}"),
        }
    }
}
