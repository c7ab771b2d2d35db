//! Binds the listeners and accepts connections until the drain starts.

use std::{
    collections::HashSet,
    io,
    net::{IpAddr, Ipv6Addr, SocketAddr},
    time::Duration,
};

use socket2::{Domain, Protocol as SockProtocol, Socket, Type};
use tokio::net::TcpListener;

use tower::ServiceExt;

use crate::{
    drain,
    metrics::Direction,
    target::{BoxError, BoxFuture},
};

const BACKLOG: i32 = 1024;

/// Binds `addr`; when it is `0.0.0.0`, also `[::]` on the same port if the host has
/// IPv6 (a host without it is not an error).
pub fn bind(addr: SocketAddr) -> io::Result<Vec<TcpListener>> {
    let first = bind_one(addr, false)?;
    let port = first.local_addr()?.port();
    let mut listeners = vec![first];
    if addr.ip() == IpAddr::from([0, 0, 0, 0]) {
        let v6 = SocketAddr::new(Ipv6Addr::UNSPECIFIED.into(), port);
        match bind_one(v6, true) {
            Ok(l) => listeners.push(l),
            Err(error) => tracing::debug!(%error, %v6, "no IPv6 listener"),
        }
    }
    Ok(listeners)
}

fn bind_one(addr: SocketAddr, v6_only: bool) -> io::Result<TcpListener> {
    let sock = Socket::new(
        Domain::for_address(addr),
        Type::STREAM,
        Some(SockProtocol::TCP),
    )?;
    if v6_only {
        sock.set_only_v6(true)?;
    }
    // A restarted sidecar must rebind at once while old connections sit in TIME_WAIT.
    sock.set_reuse_address(true)?;
    sock.set_nonblocking(true)?;
    sock.bind(&addr.into())?;
    sock.listen(BACKLOG)?;
    TcpListener::from_std(sock.into())
}

/// Accepts on `listener` until the drain starts, then closes it so new connects are
/// refused while accepted ones finish. Each connection runs through a clone of
/// `stack` on its own task, holding a drain watch until it ends.
pub async fn accept_loop<S>(
    listener: TcpListener,
    direction: Direction,
    stack: S,
    drain: drain::Watch,
) where
    S: tower::Service<
            (Direction, tokio::net::TcpStream),
            Response = (),
            Error = BoxError,
            Future = BoxFuture<Result<(), BoxError>>,
        > + Clone
        + Send
        + 'static,
{
    loop {
        tokio::select! {
            biased;
            _ = drain.signaled() => break,
            res = listener.accept() => match res {
                Ok((stream, _)) => {
                    // The app side of a sidecar hop is latency-bound, never
                    // throughput-bound: no Nagle.
                    let _ = stream.set_nodelay(true);
                    let conn = stack.clone().oneshot((direction, stream));
                    let guard = drain.clone();
                    tokio::spawn(async move {
                        let _guard = guard;
                        if let Err(error) = conn.await {
                            tracing::debug!(%error, %direction, "connection ended with an error");
                        }
                    });
                }
                Err(error) => {
                    // Typically EMFILE: back off instead of spinning on the error.
                    tracing::warn!(%error, %direction, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
        }
    }
    tracing::debug!(%direction, "listener closed for drain");
}

/// Addresses of this host's interfaces (for the loop guard).
pub fn local_ips() -> HashSet<IpAddr> {
    let mut ips = HashSet::new();
    match nix::ifaddrs::getifaddrs() {
        Ok(addrs) => {
            for a in addrs {
                let Some(sa) = a.address else { continue };
                if let Some(v4) = sa.as_sockaddr_in() {
                    ips.insert(IpAddr::V4(v4.ip()));
                } else if let Some(v6) = sa.as_sockaddr_in6() {
                    ips.insert(IpAddr::V6(v6.ip()));
                }
            }
        }
        Err(error) => tracing::debug!(%error, "cannot list interface addresses"),
    }
    ips
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn binds_loopback_only_once() {
        let ls = bind("127.0.0.1:0".parse().unwrap()).unwrap();
        assert_eq!(ls.len(), 1);
    }

    #[tokio::test]
    async fn unspecified_adds_ipv6_when_available() {
        let ls = bind("0.0.0.0:0".parse().unwrap()).unwrap();
        let port = ls[0].local_addr().unwrap().port();
        assert!(!ls.is_empty() && ls.len() <= 2);
        for l in &ls {
            assert_eq!(
                l.local_addr().unwrap().port(),
                port,
                "same port on both families"
            );
        }
    }

    #[test]
    fn finds_loopback() {
        assert!(local_ips().contains(&IpAddr::from([127, 0, 0, 1])));
    }
}
