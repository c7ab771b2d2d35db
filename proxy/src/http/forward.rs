//! The innermost HTTP service: sends a request to the connection's original
//! destination over a pooled connection of the same protocol. When the destination
//! is a Service with ready endpoints (outbound only), each request goes to an
//! endpoint the balancer picks ([`crate::balance`]) over that endpoint's own pooled
//! connections, and a request whose endpoint cannot be reached moves on to another.
//!
//! Host / `:authority` and the request target pass through untouched (HTTP/1 keeps
//! the origin-form target and Host header, HTTP/2 the full URI hyper rebuilt from the
//! pseudo-headers), so the app sees what its client sent.
//!
//! One exception to "the same protocol": between two sidecars (mesh mTLS), an
//! HTTP/1.1 request travels over the endpoint's shared HTTP/2 connection, marked
//! [`headers::ORIG_PROTO`], and the receiving sidecar restores it for its app, so a
//! burst of client connections costs one mesh connection instead of one each (and
//! one TLS handshake). Upgrades, CONNECT, HTTP/1.0 and requests in absolute form stay
//! HTTP/1 end to end.

use std::{
    future::Future,
    net::SocketAddr,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{Either, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;

use super::route::BackendDst;
use super::{
    headers,
    pool::{Checkin, Pool, PooledBody},
};
use crate::{
    balance::Pick, detect::Protocol, drain, errors::ProxyError, mesh::Mesh, target::BoxError, tcp,
    tls::ClientTls,
};

/// Sends of a request that never left on a pooled connection before a fresh one.
const MAX_ATTEMPTS: usize = 3;

/// Other endpoints a request tries after its endpoint refused the connect.
const MAX_FAILOVERS: usize = 2;

/// The response body of the stack: the upstream's, or a synthetic one.
pub type Body<B = Incoming> = Either<PooledBody<B>, Full<Bytes>>;

/// Forwards requests to one destination (or, for a routed request, to the backend its
/// [`BackendDst`] names), with request bodies of type `B`.
pub struct Forward<B = Incoming> {
    dst: SocketAddr,
    protocol: Protocol,
    pool: Pool<B>,
    connect_timeout: Duration,
    idle_timeout: Option<Duration>,
    // Upgraded connections outlive the HTTP connection that started them; holding a
    // drain watch keeps shutdown waiting for them too.
    drain: drain::Watch,
    /// Set when `dst` is a Service: where its endpoints are looked up per request.
    balance: Option<Arc<Mesh>>,
    tls: Option<Arc<ClientTls>>,
    client_id: Option<HeaderValue>,
}

/// A send that failed, with the request when it never left (so it may go elsewhere).
struct Failed<B> {
    error: ProxyError,
    unsent: Option<Request<B>>,
}

impl<B> From<ProxyError> for Failed<B> {
    fn from(error: ProxyError) -> Self {
        Self {
            error,
            unsent: None,
        }
    }
}

// === impl Forward ===

impl<B> Clone for Forward<B> {
    fn clone(&self) -> Self {
        Self {
            dst: self.dst,
            protocol: self.protocol,
            pool: self.pool.clone(),
            connect_timeout: self.connect_timeout,
            idle_timeout: self.idle_timeout,
            drain: self.drain.clone(),
            balance: self.balance.clone(),
            tls: self.tls.clone(),
            client_id: self.client_id.clone(),
        }
    }
}

impl<B> Forward<B>
where
    B: http_body::Body + Send + Unpin + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    /// A service for `dst`, speaking `protocol` upstream.
    pub fn new(
        dst: SocketAddr,
        protocol: Protocol,
        pool: Pool<B>,
        connect_timeout: Duration,
        idle_timeout: Option<Duration>,
        drain: drain::Watch,
    ) -> Self {
        Self {
            dst,
            protocol,
            pool,
            connect_timeout,
            idle_timeout,
            drain,
            balance: None,
            tls: None,
            client_id: None,
        }
    }

    /// Balances each request over the endpoints `mesh` lists for the destination (a
    /// Service's ClusterIP and port); without ready endpoints it goes to the
    /// destination as it is.
    pub fn with_balancer(mut self, mesh: Arc<Mesh>) -> Self {
        self.balance = Some(mesh);
        self
    }

    /// Sends `req` to an endpoint of the destination, or to the destination itself;
    /// returns the response, its HTTP/1 connection and where it went.
    async fn dispatch(
        &self,
        mut req: Request<B>,
        h2: bool,
    ) -> Result<
        (
            Response<Incoming>,
            Option<hyper::client::conn::http1::SendRequest<B>>,
            SocketAddr,
        ),
        ProxyError,
    > {
        let mut exclude = None;
        let mut failovers = 0;
        loop {
            let mut pick = self
                .balance
                .as_ref()
                .and_then(|mesh| mesh.pick(self.dst, exclude));
            let dst = pick.as_ref().map_or(self.dst, |p| p.addr());
            let sent = if h2 {
                self.send_h2(dst, req, &mut pick)
                    .await
                    .map(|rsp| (rsp, None))
            } else {
                self.send_h1(dst, req, &mut pick)
                    .await
                    .map(|(rsp, tx)| (rsp, Some(tx)))
            };
            match (sent, pick) {
                (Ok((rsp, tx)), pick) => {
                    // The status feeds outlier detection (a run of 503s ejects).
                    if let Some(p) = pick {
                        p.responded(rsp.status());
                    }
                    return Ok((rsp, tx, dst));
                }
                // The endpoint cannot be reached (gone, or not yet out of the config):
                // the request never left, so another endpoint may take it.
                (
                    Err(Failed {
                        error: ProxyError::Connect { .. } | ProxyError::Handshake { .. },
                        unsent: Some(unsent),
                    }),
                    Some(p),
                ) if failovers < MAX_FAILOVERS => {
                    tracing::debug!(endpoint = %dst, "endpoint unreachable; trying another");
                    p.failed();
                    failovers += 1;
                    exclude = Some(dst);
                    req = unsent;
                }
                (Err(f), pick) => {
                    // A blackholed endpoint (connect timeout) must lose the next
                    // comparisons too, and every failure to reach it counts towards
                    // ejecting it; a failure after the request left says nothing
                    // certain about the endpoint (the client's body may have broken).
                    if let Some(p) = pick {
                        if matches!(
                            f.error,
                            ProxyError::Connect { .. }
                                | ProxyError::ConnectTimeout { .. }
                                | ProxyError::Handshake { .. }
                                | ProxyError::Tls { .. }
                        ) {
                            p.failed();
                        }
                    }
                    return Err(f.error);
                }
            }
        }
    }

    /// Mesh settings of the connection: `tls` originates mTLS upstream (outbound to a
    /// meshed destination); `client_id` is the verified identity of an inbound mTLS
    /// client, passed to the app as `meshlet-client-id`.
    pub fn with_mesh(
        mut self,
        tls: Option<Arc<ClientTls>>,
        client_id: Option<HeaderValue>,
    ) -> Self {
        self.tls = tls;
        self.client_id = client_id;
        self
    }

    async fn forward(self, mut req: Request<B>) -> Result<Response<Body<B>>, ProxyError> {
        let http1 = self.protocol == Protocol::Http1;
        let upgrade = http1 && headers::is_upgrade(&req);
        // An HTTP/1 CONNECT (an app tunnelling through an explicit proxy) turns the
        // connection into a tunnel on any 2xx, like an upgrade.
        let connect = http1 && req.method() == Method::CONNECT;
        let downstream = (upgrade || connect).then(|| hyper::upgrade::on(&mut req));
        headers::strip_hop_by_hop(req.headers_mut(), upgrade);
        // An HTTP/1.1 request another sidecar carried over HTTP/2 goes to the app as
        // HTTP/1.1 again; the mark is believed only from a verified mesh peer.
        let restored = self.protocol == Protocol::H2
            && headers::from_mesh_h2(&mut req, self.client_id.is_some());
        req.headers_mut().remove(headers::ORIG_PROTO);
        // Only this proxy may say who the client is: whatever arrived is dropped.
        headers::set_client_id(req.headers_mut(), self.client_id.clone());
        // Between two sidecars (mesh mTLS) HTTP/1.1 rides one multiplexed HTTP/2
        // connection per endpoint instead of a connection per request in flight.
        let multiplexed =
            http1 && !upgrade && !connect && self.tls.is_some() && headers::to_mesh_h2(&mut req);
        let h2 = multiplexed || (self.protocol == Protocol::H2 && !restored);

        let (mut rsp, checkin, dst) = self.dispatch(req, h2).await?;
        if multiplexed {
            *rsp.version_mut() = http::Version::HTTP_11;
        } else if restored {
            *rsp.version_mut() = http::Version::HTTP_2;
        }

        let switched = (upgrade && rsp.status() == StatusCode::SWITCHING_PROTOCOLS)
            || (connect && rsp.status().is_success());
        if switched {
            headers::strip_hop_by_hop(rsp.headers_mut(), upgrade);
            if let Some(downstream) = downstream {
                let upstream = hyper::upgrade::on(&mut rsp);
                let idle = self.idle_timeout;
                let drain = self.drain.clone();
                tokio::spawn(async move {
                    let _drain = drain;
                    match tokio::try_join!(downstream, upstream) {
                        Ok((down, up)) => {
                            let (mut down, mut up) = (TokioIo::new(down), TokioIo::new(up));
                            if let Err(error) = tcp::splice(&mut down, &mut up, idle).await {
                                tracing::debug!(%error, "upgraded connection failed");
                            }
                        }
                        Err(error) => tracing::debug!(%error, "upgrade failed"),
                    }
                });
            }
            // The connection now belongs to the upgrade; it never returns to the pool.
            return Ok(rsp.map(|b| Either::Left(PooledBody::new(b, None))));
        }

        headers::strip_hop_by_hop(rsp.headers_mut(), false);
        headers::set_client_id(rsp.headers_mut(), None);
        let checkin =
            checkin.map(|tx| Checkin::with_tls(self.pool.clone(), dst, self.tls.as_deref(), tx));
        Ok(rsp.map(|b| Either::Left(PooledBody::new(b, checkin))))
    }

    async fn send_h1(
        &self,
        dst: SocketAddr,
        req: Request<B>,
        pick: &mut Option<Pick>,
    ) -> Result<
        (
            Response<Incoming>,
            hyper::client::conn::http1::SendRequest<B>,
        ),
        Failed<B>,
    > {
        let mut req = req;
        // Up to MAX_ATTEMPTS pooled connections; when the last reused one was stale
        // too, a fresh one decides.
        let mut attempt = 0;
        loop {
            attempt += 1;
            let fresh = attempt > MAX_ATTEMPTS;
            let (tls, timeout) = (self.tls.as_deref(), self.connect_timeout);
            let checkout = if fresh {
                self.pool.checkout_fresh_h1(dst, tls, timeout).await
            } else {
                self.pool.checkout_h1(dst, tls, timeout).await
            };
            let mut conn = match checkout {
                Ok(conn) => conn,
                Err(error) => {
                    return Err(Failed {
                        error,
                        unsent: Some(req),
                    })
                }
            };
            dispatched(pick);
            match conn.tx.try_send_request(req).await {
                Ok(rsp) => return Ok((rsp, conn.tx)),
                Err(mut e) => match e.take_message() {
                    // A pooled connection the server closed while it sat idle: the
                    // request never left, so another connection may carry it.
                    Some(unsent) if conn.reused && !fresh => req = unsent,
                    _ => {
                        return Err(ProxyError::Upstream {
                            dst,
                            source: e.into_error(),
                        }
                        .into())
                    }
                },
            }
        }
    }

    async fn send_h2(
        &self,
        dst: SocketAddr,
        req: Request<B>,
        pick: &mut Option<Pick>,
    ) -> Result<Response<Incoming>, Failed<B>> {
        let mut req = req;
        let mut attempt = 0;
        loop {
            attempt += 1;
            let (mut tx, reused) = match self
                .pool
                .checkout_h2(dst, self.tls.as_deref(), self.connect_timeout)
                .await
            {
                Ok(c) => c,
                Err(error) => {
                    return Err(Failed {
                        error,
                        unsent: Some(req),
                    })
                }
            };
            dispatched(pick);
            match tx.try_send_request(req).await {
                Ok(rsp) => return Ok(rsp),
                Err(mut e) => match e.take_message() {
                    // The shared connection was going away (GOAWAY) before the
                    // request left: the next checkout opens a new one.
                    Some(unsent) if reused && attempt < MAX_ATTEMPTS => req = unsent,
                    _ => {
                        return Err(ProxyError::Upstream {
                            dst,
                            source: e.into_error(),
                        }
                        .into())
                    }
                },
            }
        }
    }
}

/// The request leaves now: the endpoint's latency is measured from here, as tower's
/// balancer measures only once an endpoint is ready, so connecting is not counted
/// against it.
fn dispatched(pick: &mut Option<Pick>) {
    if let Some(p) = pick {
        p.dispatched();
    }
}

impl<B> tower::Service<Request<B>> for Forward<B>
where
    B: http_body::Body + Send + Unpin + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    type Response = Response<Body<B>>;
    type Error = ProxyError;
    type Future = Pin<Box<dyn Future<Output = Result<Response<Body<B>>, ProxyError>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), ProxyError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let mut this = self.clone();
        // A routed request goes to the backend Service its route chose.
        if let Some(b) = req.extensions().get::<BackendDst>() {
            this.dst = b.addr;
            this.tls = b.tls.clone();
        }
        Box::pin(this.forward(req))
    }
}
