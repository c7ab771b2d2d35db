//! The route stage of the outbound HTTP stack: applies the destination Service's
//! HTTPRoutes ([`crate::route`]) to each request.
//!
//! Routes are looked up per request in the snapshot in force (like endpoints), so a
//! keep-alive connection follows route changes. A request no rule selects goes on
//! unchanged to its original destination. A selected rule either answers here (a
//! redirect, or 500 when it has no usable backend) or sends the request on changed
//! (header modifiers, `URLRewrite`) with two extensions the stages below read:
//! [`BackendDst`] (where `Forward` sends it) and [`Routed`] (the route label for
//! metrics, the rule's timeouts and retry settings, the backend's retry budget).

use std::{
    cell::Cell,
    collections::hash_map::RandomState,
    convert::Infallible,
    future::Future,
    hash::BuildHasher,
    net::SocketAddr,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};

use bytes::Bytes;
use futures_util::future;
use http::{header, HeaderMap, HeaderName, HeaderValue, Request, Response, StatusCode, Uri};
use http_body_util::{Either, Full};
use meshlet_api::route::HeaderModifier;
use metrics::SharedString;
use tokio::time::Instant;

use crate::{
    errors::ERROR_HEADER,
    mesh::Mesh,
    metrics::RequestMetrics,
    route::{
        table::{Backend, RulePolicy},
        Action, RequestInfo,
    },
    tls::{ClientTls, Identity},
};

/// Where `Forward` sends a routed request: the backend Service's ClusterIP:port (its
/// endpoints are balanced like the original destination's) and the mTLS settings for
/// its identities.
#[derive(Clone, Debug)]
pub struct BackendDst {
    /// The backend Service's ClusterIP and port.
    pub addr: SocketAddr,
    /// mTLS to originate, when the backend is meshed and this proxy has an identity.
    pub tls: Option<Arc<ClientTls>>,
}

/// What the route stage decided for a request that goes on to a backend.
#[derive(Clone)]
pub struct Routed {
    /// `namespace/name` of the route: the `route` label.
    pub label: SharedString,
    /// The rule's timeouts and retry settings.
    pub policy: Arc<RulePolicy>,
    /// The chosen backend (its retry budget).
    pub backend: Arc<Backend>,
    /// The connection's request metrics, for timeouts and retries.
    pub metrics: Option<Arc<RequestMetrics>>,
}

/// What every request on one connection shares.
struct Shared {
    mesh: Arc<Mesh>,
    dst: SocketAddr,
    identity: Option<Arc<Identity>>,
    namespace: Option<Arc<str>>,
    metrics: Option<Arc<RequestMetrics>>,
}

/// Adds [`Route`] to a stack.
#[derive(Clone)]
pub struct RouteLayer {
    shared: Arc<Shared>,
}

/// Routes each request of a connection to the Service `dst`.
#[derive(Clone)]
pub struct Route<S> {
    inner: S,
    shared: Arc<Shared>,
}

// === impl RouteLayer ===

impl RouteLayer {
    /// Routes requests to ClusterIP:port `dst` by the routes `mesh` has for it.
    /// `identity` originates mTLS to meshed backends; `namespace` is the client's
    /// (`MESHLET_POD_NAMESPACE`), which selects its consumer routes; `metrics` records
    /// requests the stage answers itself.
    pub fn new(
        mesh: Arc<Mesh>,
        dst: SocketAddr,
        identity: Option<Arc<Identity>>,
        namespace: Option<Arc<str>>,
        metrics: Option<Arc<RequestMetrics>>,
    ) -> Self {
        Self {
            shared: Arc::new(Shared {
                mesh,
                dst,
                identity,
                namespace,
                metrics,
            }),
        }
    }
}

impl<S> tower::Layer<S> for RouteLayer {
    type Service = Route<S>;

    fn layer(&self, inner: S) -> Route<S> {
        Route {
            inner,
            shared: self.shared.clone(),
        }
    }
}

// === impl Route ===

/// The outcome of routing one request.
enum Outcome {
    /// No rule: forward unchanged.
    Pass,
    /// Forward with these changes.
    Forward {
        routed: Routed,
        dst: BackendDst,
        request_headers: Vec<HeaderModifier>,
        response_headers: Vec<HeaderModifier>,
        host: Option<String>,
        path_and_query: Option<String>,
    },
    /// Answer here.
    Answer(SharedString, Response<Full<Bytes>>),
}

impl<S> Route<S> {
    fn decide<B>(&self, req: &Request<B>) -> Outcome {
        let sh = &self.shared;
        let Some(table) = sh.mesh.routes(sh.dst) else {
            return Outcome::Pass;
        };
        let info = RequestInfo {
            method: req.method(),
            uri: req.uri(),
            headers: req.headers(),
            port: sh.dst.port(),
            client_namespace: sh.namespace.as_deref(),
        };
        let Some(d) = table.routes().decide(&info, random()) else {
            if !table.routes().governs(&info) {
                return Outcome::Pass;
            }
            let rsp = synthetic(
                StatusCode::NOT_FOUND,
                "no-route",
                "no rule of the routes attached to this service matches the request",
            );
            return Outcome::Answer(SharedString::from("no-route"), rsp);
        };
        let label = table.label(&d).clone();
        tracing::trace!(route = %label, rule = d.rule_index, "routed");
        let f = match &d.action {
            Action::Redirect { status, location } => {
                let status = StatusCode::from_u16(*status).unwrap_or(StatusCode::FOUND);
                let mut rsp = Response::new(Full::new(Bytes::new()));
                *rsp.status_mut() = status;
                match HeaderValue::try_from(location.as_str()) {
                    Ok(l) => {
                        rsp.headers_mut().insert(header::LOCATION, l);
                    }
                    Err(_) => {
                        return Outcome::Answer(
                            label,
                            synthetic(
                                StatusCode::INTERNAL_SERVER_ERROR,
                                "bad-redirect",
                                "the route's redirect makes an invalid Location",
                            ),
                        )
                    }
                }
                return Outcome::Answer(label, rsp);
            }
            Action::Respond(code) => {
                let status =
                    StatusCode::from_u16(*code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
                let rsp = synthetic(status, "no-backend", "the route's rule has no backend");
                return Outcome::Answer(label, rsp);
            }
            Action::Forward(f) => f,
        };
        // The Gateway API: a backendRef that names no Service (port) answers 500.
        let Some(backend) = table.backend(&d, f.backend).cloned() else {
            let msg = format!(
                "backend {}/{} port {} is not a Service port in the mesh config",
                f.backend.namespace, f.backend.name, f.backend.port
            );
            return Outcome::Answer(
                label,
                synthetic(StatusCode::INTERNAL_SERVER_ERROR, "backend-not-found", &msg),
            );
        };
        let tls = match (&backend.identities, &sh.identity) {
            (Some(ids), Some(identity)) => match identity.client_tls(ids) {
                Ok(t) => Some(Arc::new(t)),
                Err(error) => {
                    let msg = format!("no mTLS settings for backend {}: {error}", backend.service);
                    return Outcome::Answer(
                        label,
                        synthetic(StatusCode::BAD_GATEWAY, "tls-failed", &msg),
                    );
                }
            },
            _ => None,
        };
        Outcome::Forward {
            dst: BackendDst {
                addr: backend.addr,
                tls,
            },
            routed: Routed {
                label,
                policy: table.policy(&d).clone(),
                backend,
                metrics: sh.metrics.clone(),
            },
            request_headers: f.request_headers.iter().map(|m| (*m).clone()).collect(),
            response_headers: f.response_headers.iter().map(|m| (*m).clone()).collect(),
            host: f.host.map(str::to_string),
            path_and_query: f.path_and_query.clone(),
        }
    }
}

impl<S, B, L> tower::Service<Request<B>> for Route<S>
where
    S: tower::Service<Request<B>, Response = Response<Either<L, Full<Bytes>>>, Error = Infallible>,
    S::Future: Send + 'static,
    L: Send + 'static,
{
    type Response = Response<Either<L, Full<Bytes>>>;
    type Error = Infallible;
    // Requests no rule selects pay no allocation here.
    type Future = future::Either<
        S::Future,
        Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>,
    >;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<B>) -> Self::Future {
        let start = Instant::now();
        match self.decide(&req) {
            Outcome::Pass => future::Either::Left(self.inner.call(req)),
            Outcome::Answer(label, rsp) => {
                if let Some(m) = &self.shared.metrics {
                    m.record_route(rsp.status(), start.elapsed(), Some(&label));
                }
                future::Either::Right(Box::pin(async move { Ok(rsp.map(Either::Right)) }))
            }
            Outcome::Forward {
                routed,
                dst,
                request_headers,
                response_headers,
                host,
                path_and_query,
            } => {
                for m in &request_headers {
                    modify_headers(req.headers_mut(), m);
                }
                if let Err(msg) = rewrite(&mut req, host.as_deref(), path_and_query.as_deref()) {
                    let rsp = synthetic(StatusCode::INTERNAL_SERVER_ERROR, "bad-rewrite", &msg);
                    if let Some(m) = &self.shared.metrics {
                        m.record_route(rsp.status(), start.elapsed(), Some(&routed.label));
                    }
                    return future::Either::Right(Box::pin(
                        async move { Ok(rsp.map(Either::Right)) },
                    ));
                }
                req.extensions_mut().insert(dst);
                req.extensions_mut().insert(routed);
                let fut = self.inner.call(req);
                future::Either::Right(Box::pin(async move {
                    let mut rsp = fut.await?;
                    for m in &response_headers {
                        modify_headers(rsp.headers_mut(), m);
                    }
                    Ok(rsp)
                }))
            }
        }
    }
}

/// Applies a `RequestHeaderModifier` or `ResponseHeaderModifier`: `set` replaces,
/// `add` appends, `remove` deletes. Names were validated with the config; a value
/// that is not a valid header value is skipped.
pub fn modify_headers(headers: &mut HeaderMap, m: &HeaderModifier) {
    let parse = |name: &str, value: &str| {
        Some((
            HeaderName::from_bytes(name.as_bytes()).ok()?,
            HeaderValue::from_str(value).ok()?,
        ))
    };
    for h in &m.set {
        if let Some((n, v)) = parse(&h.name, &h.value) {
            headers.insert(n, v);
        }
    }
    for h in &m.add {
        if let Some((n, v)) = parse(&h.name, &h.value) {
            headers.append(n, v);
        }
    }
    for n in &m.remove {
        headers.remove(n.as_str());
    }
}

/// `URLRewrite`: a new host goes into `Host` and, when the target carries one (HTTP/2,
/// absolute form), its authority; a new path replaces the target's path and query.
fn rewrite<B>(req: &mut Request<B>, host: Option<&str>, pq: Option<&str>) -> Result<(), String> {
    if host.is_none() && pq.is_none() {
        return Ok(());
    }
    let mut parts = req.uri().clone().into_parts();
    if let Some(pq) = pq {
        parts.path_and_query = Some(
            pq.parse()
                .map_err(|e| format!("rewritten path {pq:?} is invalid: {e}"))?,
        );
    }
    if let Some(h) = host {
        let value = HeaderValue::from_str(h)
            .map_err(|e| format!("rewritten host {h:?} is invalid: {e}"))?;
        if parts.authority.is_some() {
            parts.authority = Some(
                h.parse()
                    .map_err(|e| format!("rewritten host {h:?} is invalid: {e}"))?,
            );
        }
        if parts.authority.is_none() || req.headers().contains_key(header::HOST) {
            req.headers_mut().insert(header::HOST, value);
        }
    }
    *req.uri_mut() =
        Uri::from_parts(parts).map_err(|e| format!("rewritten target is invalid: {e}"))?;
    Ok(())
}

/// A response the proxy makes up: plain text saying what happened, and the
/// `meshlet-proxy-error` header naming it (like [`crate::errors::respond`]).
pub fn synthetic(status: StatusCode, kind: &'static str, msg: &str) -> Response<Full<Bytes>> {
    let mut rsp = Response::new(Full::new(Bytes::from(format!("meshlet-proxy: {msg}\n"))));
    *rsp.status_mut() = status;
    let h = rsp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    h.insert(ERROR_HEADER, HeaderValue::from_static(kind));
    rsp
}

/// A cheap per-thread random number for the weighted backend choice (xorshift32,
/// seeded per thread from the std hasher's random keys).
fn random() -> u32 {
    thread_local! {
        static STATE: Cell<u32> = Cell::new((RandomState::new().hash_one(1u64) as u32) | 1);
    }
    STATE.with(|s| {
        let mut x = s.get();
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        s.set(x);
        x
    })
}

#[cfg(test)]
pub(crate) mod tests;
