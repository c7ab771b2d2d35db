//! Refuses connections addressed to the proxy's own listeners: forwarding one would
//! feed it back into the proxy forever.

use std::{
    collections::HashSet,
    net::{IpAddr, SocketAddr},
    sync::Arc,
    task::{Context, Poll},
};

use crate::target::{BoxError, BoxFuture, Target};

/// A connection to one of the proxy's own ports on a local address.
#[derive(Debug, thiserror::Error)]
#[error("refusing {dst}: it is the proxy's own listener (a redirect loop; check the exclusions of meshlet-init)")]
pub struct LoopDetected {
    /// The destination.
    pub dst: SocketAddr,
}

/// Adds [`LoopGuard`] to a stack.
#[derive(Clone, Debug)]
pub struct LoopGuardLayer {
    own: Arc<Own>,
}

#[derive(Debug)]
struct Own {
    ports: Vec<u16>,
    ips: HashSet<IpAddr>,
}

/// Refuses loops, passes everything else on.
#[derive(Clone, Debug)]
pub struct LoopGuard<S> {
    inner: S,
    own: Arc<Own>,
}

impl LoopGuardLayer {
    /// The proxy listens on `ports` (as bound) and the host has addresses `ips`.
    pub fn new(ports: Vec<u16>, ips: HashSet<IpAddr>) -> Self {
        Self {
            own: Arc::new(Own { ports, ips }),
        }
    }
}

impl<S> tower::Layer<S> for LoopGuardLayer {
    type Service = LoopGuard<S>;

    fn layer(&self, inner: S) -> LoopGuard<S> {
        LoopGuard {
            inner,
            own: self.own.clone(),
        }
    }
}

impl Own {
    fn is_loop(&self, dst: SocketAddr, local: Option<SocketAddr>) -> bool {
        if !self.ports.contains(&dst.port()) {
            return false;
        }
        let ip = dst.ip();
        ip.is_loopback()
            || ip.is_unspecified()
            || local.is_some_and(|l| l.ip() == ip)
            || self.ips.contains(&ip)
    }
}

impl<S, I> tower::Service<(Target, I)> for LoopGuard<S>
where
    S: tower::Service<(Target, I), Response = (), Error = BoxError>,
    S::Future: Send + 'static,
{
    type Response = ();
    type Error = BoxError;
    type Future = BoxFuture<Result<(), BoxError>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, (target, io): (Target, I)) -> Self::Future {
        if self.own.is_loop(target.dst, target.local) {
            let dst = target.dst;
            return Box::pin(async move { Err(LoopDetected { dst }.into()) });
        }
        Box::pin(self.inner.call((target, io)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{mesh::Snapshot, metrics::Direction};
    use tower::{Layer, ServiceExt};

    fn target(dst: &str, local: &str) -> Target {
        Target {
            direction: Direction::Outbound,
            dst: dst.parse().unwrap(),
            local: Some(local.parse().unwrap()),
            mesh: Arc::new(Snapshot::new(Default::default(), None)),
            metrics: None,
            tls: Default::default(),
            silent: false,
        }
    }

    #[tokio::test]
    async fn refuses_own_ports_on_local_addresses() {
        let layer = LoopGuardLayer::new(
            vec![15001, 15006, 15020],
            ["198.18.0.5".parse().unwrap()].into(),
        );
        let calls = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let c = calls.clone();
        let svc = layer.layer(tower::service_fn(move |_: (Target, ())| {
            c.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            async { Ok::<(), BoxError>(()) }
        }));
        let cases = [
            ("127.0.0.1:15001", "127.0.0.1:15001", true),
            ("198.18.0.5:15020", "127.0.0.1:15001", true),
            ("198.18.0.6:15006", "198.18.0.6:15006", true),
            ("[::1]:15006", "198.18.0.5:15006", true),
            ("0.0.0.0:15001", "127.0.0.1:15001", true),
            ("198.19.0.10:15001", "127.0.0.1:15001", false),
            ("127.0.0.1:8080", "127.0.0.1:15001", false),
        ];
        for (dst, local, refused) in cases {
            let res = svc.clone().oneshot((target(dst, local), ())).await;
            match res {
                Err(e) => {
                    assert!(refused, "{dst} refused: {e}");
                    assert!(e.is::<LoopDetected>());
                }
                Ok(()) => assert!(!refused, "{dst} passed"),
            }
        }
        assert_eq!(calls.load(std::sync::atomic::Ordering::SeqCst), 2);
    }
}
