//! Serves one accepted connection as HTTP/1 or HTTP/2, and shuts it down gracefully
//! when the drain starts (HTTP/1: close after the response in flight; HTTP/2: GOAWAY).

use std::convert::Infallible;

use http::{Request, Response};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tower::ServiceExt;

use std::{
    sync::Arc,
    task::{Context, Poll},
};

use super::{
    replay::ReplayBody,
    retry::RetryLayer,
    route::RouteLayer,
    timeout::{AttemptTimeoutLayer, RequestTimeoutLayer},
    Forward, ObserveLayer, Pool,
};
use crate::{
    detect::Protocol,
    drain,
    mesh::Mesh,
    metrics::Direction,
    target::{BoxError, BoxFuture, Target, TlsStatus},
    tls::Identity,
};

/// The HTTP service of the connection stack: builds the per-connection HTTP stack
/// (metrics and error responses over forwarding) and serves it.
#[derive(Clone)]
pub struct ServeHttp {
    pool: Pool,
    drain: drain::Watch,
    balance: Option<Arc<Mesh>>,
    routing: Option<Routing>,
    authz: Option<crate::authz::Authz>,
}

/// What the outbound route stack needs beyond forwarding.
#[derive(Clone)]
struct Routing {
    /// Connections to backends whose request bodies may be replayed.
    pool: Pool<ReplayBody<Incoming>>,
    identity: Option<Arc<Identity>>,
    namespace: Option<Arc<str>>,
}

impl ServeHttp {
    /// Forwards over `pool`; connections shut down gracefully when `drain` fires.
    pub fn new(pool: Pool, drain: drain::Watch) -> Self {
        Self {
            pool,
            drain,
            balance: None,
            routing: None,
            authz: None,
        }
    }

    /// Checks every inbound request against the authorization in force.
    pub fn with_authz(mut self, authz: crate::authz::Authz) -> Self {
        self.authz = Some(authz);
        self
    }

    /// Applies HTTPRoutes to outbound requests to a Service (with
    /// [`ServeHttp::with_balancer`]'s mesh): `namespace` is the client pod's
    /// (`MESHLET_POD_NAMESPACE`, selects its consumer routes), `identity` originates
    /// mTLS to meshed backends.
    pub fn with_routing(
        mut self,
        identity: Option<Arc<Identity>>,
        namespace: Option<&str>,
    ) -> Self {
        self.routing = Some(Routing {
            pool: Pool::new(),
            identity,
            namespace: namespace.map(Arc::from),
        });
        self
    }

    /// Balances outbound requests to a Service over the endpoints in `mesh`.
    pub fn with_balancer(mut self, mesh: Arc<Mesh>) -> Self {
        self.balance = Some(mesh);
        self
    }
}

impl<I> tower::Service<(Target, Protocol, I)> for ServeHttp
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Response = ();
    type Error = BoxError;
    type Future = BoxFuture<Result<(), BoxError>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, (target, protocol, io): (Target, Protocol, I)) -> Self::Future {
        let drain = self.drain.clone();
        let client_id = target
            .tls
            .peer()
            .and_then(|id| http::HeaderValue::from_str(id).ok());
        let tls = match &target.tls {
            TlsStatus::Outbound(t) => Some(t.clone()),
            _ => None,
        };
        let metrics = target.metrics.as_ref().map(|m| Arc::new(m.requests()));
        // Requests to a Service may be routed (routes are looked up per request, so a
        // route added later applies to connections already open).
        if let (Some(mesh), Some(routing)) = (&self.balance, &self.routing) {
            if target.direction == Direction::Outbound && target.mesh.is_service(target.dst) {
                let fwd = Forward::new(
                    target.dst,
                    protocol,
                    routing.pool.clone(),
                    target.mesh.connect_timeout(),
                    target.mesh.idle_timeout(),
                    drain.clone(),
                )
                .with_mesh(tls, client_id)
                .with_balancer(mesh.clone());
                let svc = tower::ServiceBuilder::new()
                    .layer(RouteLayer::new(
                        mesh.clone(),
                        target.dst,
                        routing.identity.clone(),
                        routing.namespace.clone(),
                        metrics.clone(),
                    ))
                    .layer(ObserveLayer::new(metrics))
                    .layer(RequestTimeoutLayer)
                    .layer(RetryLayer::default())
                    .layer(AttemptTimeoutLayer)
                    .service(fwd);
                return Box::pin(async move {
                    serve(io, protocol, svc, &drain).await?;
                    Ok(())
                });
            }
        }
        let fwd = Forward::new(
            target.dst,
            protocol,
            self.pool.clone(),
            target.mesh.connect_timeout(),
            target.mesh.idle_timeout(),
            drain.clone(),
        )
        .with_mesh(tls, client_id);
        // Only Services known when the connection came in are balanced, so other
        // destinations pay no lookup per request; endpoints themselves are looked up
        // per request.
        let fwd = match &self.balance {
            Some(mesh)
                if target.direction == Direction::Outbound
                    && target.mesh.is_service(target.dst) =>
            {
                fwd.with_balancer(mesh.clone())
            }
            _ => fwd,
        };
        let inbound_authz = self
            .authz
            .clone()
            .filter(|_| target.direction == Direction::Inbound);
        let fwd = crate::authz::AuthzHttp::new(
            fwd,
            inbound_authz,
            target.dst,
            target.tls.peer().cloned(),
        );
        let svc = tower::ServiceBuilder::new()
            .layer(ObserveLayer::new(metrics))
            .service(fwd);
        Box::pin(async move {
            serve(io, protocol, svc, &drain).await?;
            Ok(())
        })
    }
}

/// Largest request head (request line plus headers) accepted; bigger ones get 431.
pub const MAX_HEADER_BYTES: usize = 64 * 1024;

/// Cap of hyper's HTTP/1 read buffer (default ~400 KiB): large bodies stream through
/// a bounded buffer instead of growing it per connection. Must hold a whole head.
pub const MAX_BUF_BYTES: usize = MAX_HEADER_BYTES + 32 * 1024;

/// Serves HTTP on `io` until the client closes or the drain finishes the connection.
pub async fn serve<I, S, RB>(
    io: I,
    protocol: Protocol,
    svc: S,
    drain: &drain::Watch,
) -> Result<(), hyper::Error>
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    S: tower::Service<Request<Incoming>, Response = Response<RB>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    RB: http_body::Body<Data = bytes::Bytes> + Send + 'static,
    RB::Error: Into<BoxError>,
{
    let svc = hyper::service::service_fn(move |req| svc.clone().oneshot(req));
    let io = TokioIo::new(io);
    if protocol == Protocol::H2 {
        let conn = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .max_header_list_size(MAX_HEADER_BYTES as u32)
            .auto_date_header(false)
            .serve_connection(io, svc);
        tokio::pin!(conn);
        tokio::select! {
            res = conn.as_mut() => res,
            _ = drain.signaled() => {
                conn.as_mut().graceful_shutdown();
                conn.await
            }
        }
    } else {
        let conn = hyper::server::conn::http1::Builder::new()
            .timer(TokioTimer::new())
            // Keep-alive connections from the app may idle for long; hyper's header
            // timer would also run while idle and cut them.
            .header_read_timeout(None)
            // A client may send its request and shut down its write side; it still
            // waits for the answer.
            .half_close(true)
            // Transparency: the upstream's headers pass as they are.
            .auto_date_header(false)
            .max_header_size(MAX_HEADER_BYTES)
            .max_buf_size(MAX_BUF_BYTES)
            .serve_connection(io, svc)
            .with_upgrades();
        tokio::pin!(conn);
        tokio::select! {
            res = conn.as_mut() => res,
            _ = drain.signaled() => {
                conn.as_mut().graceful_shutdown();
                conn.await
            }
        }
    }
}
