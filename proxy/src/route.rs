//! Request routing by a Service's HTTPRoutes (GAMMA): which rule a request selects, which
//! backend it goes to, and how it is rewritten or redirected. Pure: no I/O, no clock,
//! the caller supplies the random number for the weighted choice.
//!
//! Precedence follows the Gateway API's `HTTPRouteRule` rules: among the matches that
//! hold, an `Exact` path beats a `PathPrefix`, a longer prefix beats a shorter one, a
//! prefix beats a `RegularExpression`; then a match with a method wins, then the one with
//! more header matches, then more query parameter matches; then the oldest route
//! (`creationTimestamp`), then `namespace/name` alphabetically, then rule and match order.
//! A GRPCRoute (compiled into the same shape, `kind: GRPCRoute`) ranks its matches by
//! GEP-1016 instead: the service its method match names, then the method (exact names
//! before regexes, longer first; see `GrpcMethodMatch::precedence`), then more header
//! matches; the path match it was compiled into only does the matching. GRPCRoute
//! matches go before HTTPRoute ones, as a GRPCRoute takes a Service port first
//! (GEP-1294); the compiler never puts both kinds on one port.
//! Consumer routes (in the client's namespace, not the Service's) are tried before the
//! producer routes. [`table`] resolves backends and per-rule policies against the mesh
//! config; `http::route` applies decisions to requests.

use http::{header, HeaderMap, HeaderName, HeaderValue, Method, Uri};
use std::sync::Arc;

use meshlet_api::{
    route::{
        compile_regex, BackendRef, Filter, GrpcMethodMatch, GrpcPrecedence, HeaderModifier,
        HttpRoute, PathMatchType, PathModifier, Regex, RequestRedirect, RouteError, RouteKind,
        RouteRule, UrlRewrite, ValueMatchType,
    },
    MeshConfig,
};

pub mod table;

/// The routes of one destination Service, compiled and ordered by precedence.
#[derive(Debug)]
pub struct Routes {
    routes: Source,
    /// Every match of every rule, consumer routes' first, then best first.
    entries: Vec<Entry>,
}

/// Where the routes live: shared with the mesh config when built from a snapshot, so a
/// table does not hold a second copy of every route.
#[derive(Debug)]
enum Source {
    Owned {
        service_namespace: String,
        routes: Vec<HttpRoute>,
    },
    Shared {
        config: Arc<MeshConfig>,
        service: usize,
    },
}

impl Source {
    fn list(&self) -> &[HttpRoute] {
        match self {
            Self::Owned { routes, .. } => routes,
            Self::Shared { config, service } => &config.services[*service].routes,
        }
    }

    /// The namespace of the Service the routes attach to: its routes are the producer
    /// routes, any other namespace's are consumer routes.
    fn service_namespace(&self) -> &str {
        match self {
            Self::Owned {
                service_namespace, ..
            } => service_namespace,
            Self::Shared { config, service } => &config.services[*service].namespace,
        }
    }
}

/// What one request is.
#[derive(Clone, Copy, Debug)]
pub struct RequestInfo<'a> {
    /// Request method.
    pub method: &'a Method,
    /// Request target (origin or absolute form).
    pub uri: &'a Uri,
    /// Request headers.
    pub headers: &'a HeaderMap,
    /// The Service port the request was sent to.
    pub port: u16,
    /// The client's namespace, when known; selects its consumer routes.
    pub client_namespace: Option<&'a str>,
}

/// The rule a request selected and what to do with it.
#[derive(Debug)]
pub struct Decision<'a> {
    /// The route (`id()` is `namespace/name`).
    pub route: &'a HttpRoute,
    /// The route's index in the list `Routes::new` was given.
    pub route_index: usize,
    /// The rule.
    pub rule: &'a RouteRule,
    /// The rule's index in the route, for metrics when it has no name.
    pub rule_index: usize,
    /// What to do.
    pub action: Action<'a>,
}

/// What to do with a routed request.
#[derive(Debug, PartialEq, Eq)]
pub enum Action<'a> {
    /// Send it to a backend, changed as described.
    Forward(Forward<'a>),
    /// Answer with this redirect; do not forward.
    Redirect {
        /// 301, 302, 303, 307 or 308.
        status: u16,
        /// The `Location` header.
        location: String,
    },
    /// Answer with this status (500: the rule has no backend with a weight).
    Respond(u16),
}

/// How to forward a routed request.
#[derive(Debug, PartialEq, Eq)]
pub struct Forward<'a> {
    /// The chosen backend.
    pub backend: &'a BackendRef,
    /// The new path and query (`URLRewrite`), if it changes.
    pub path_and_query: Option<String>,
    /// The new host (`URLRewrite` hostname), if it changes.
    pub host: Option<&'a str>,
    /// Request header changes, the rule's before the backend's.
    pub request_headers: Vec<&'a HeaderModifier>,
    /// Response header changes to apply to the answer, the rule's before the backend's.
    pub response_headers: Vec<&'a HeaderModifier>,
}

#[derive(Debug)]
struct Entry {
    /// Whether the route is in another namespace than the Service (a consumer route).
    consumer: bool,
    route: usize,
    rule: usize,
    /// GEP-1016 rank of a GRPCRoute match; `None` in an HTTPRoute.
    grpc: Option<GrpcPrecedence>,
    path: PathCond,
    method: Option<Method>,
    headers: Vec<(HeaderName, ValueCond)>,
    query: Vec<(String, ValueCond)>,
}

#[derive(Debug)]
enum PathCond {
    Exact(String),
    /// Without a trailing `/`, so `/a/` and `/a` both match `/a` and `/a/b`.
    Prefix(String),
    Regex(Regex),
}

#[derive(Debug)]
enum ValueCond {
    Exact(String),
    Regex(Regex),
}

// === impl Routes ===

impl Routes {
    /// Compiles the routes of a Service in `service_namespace`. The mesh config was
    /// validated already, so an error here means the document bypassed validation.
    pub fn new(service_namespace: &str, routes: &[HttpRoute]) -> Result<Self, RouteError> {
        Ok(Self {
            entries: Self::compile(service_namespace, routes)?,
            routes: Source::Owned {
                service_namespace: service_namespace.to_string(),
                routes: routes.to_vec(),
            },
        })
    }

    /// Compiles the routes of `config.services[service]`, sharing them with `config`.
    pub fn of_service(config: Arc<MeshConfig>, service: usize) -> Result<Self, RouteError> {
        let svc = &config.services[service];
        let entries = Self::compile(&svc.namespace, &svc.routes)?;
        Ok(Self {
            entries,
            routes: Source::Shared { config, service },
        })
    }

    fn compile(service_namespace: &str, routes: &[HttpRoute]) -> Result<Vec<Entry>, RouteError> {
        let mut entries = Vec::new();
        for (ri, route) in routes.iter().enumerate() {
            route.validate()?;
            let bad = |field: String, reason: String| RouteError {
                route: route.id(),
                field,
                reason,
            };
            for (ui, rule) in route.rules.iter().enumerate() {
                let implicit = [Default::default()];
                let matches = if rule.matches.is_empty() {
                    &implicit[..]
                } else {
                    &rule.matches[..]
                };
                for (mi, m) in matches.iter().enumerate() {
                    let at = format!("rules[{ui}].matches[{mi}]");
                    let path = match &m.path {
                        None => PathCond::Prefix(String::new()),
                        Some(p) => match p.kind {
                            PathMatchType::Exact => PathCond::Exact(p.value.clone()),
                            PathMatchType::PathPrefix => {
                                PathCond::Prefix(p.value.trim_end_matches('/').to_string())
                            }
                            PathMatchType::RegularExpression => PathCond::Regex(
                                compile_regex(&p.value)
                                    .map_err(|e| bad(format!("{at}.path.value"), e.to_string()))?,
                            ),
                        },
                    };
                    let method = m
                        .method
                        .as_deref()
                        .map(|s| {
                            Method::from_bytes(s.as_bytes())
                                .map_err(|e| bad(format!("{at}.method"), e.to_string()))
                        })
                        .transpose()?;
                    let cond = |kind: ValueMatchType, v: &str, f: String| match kind {
                        ValueMatchType::Exact => Ok(ValueCond::Exact(v.to_string())),
                        ValueMatchType::RegularExpression => compile_regex(v)
                            .map(ValueCond::Regex)
                            .map_err(|e| bad(f, e.to_string())),
                    };
                    let mut headers = Vec::new();
                    for (i, h) in m.headers.iter().enumerate() {
                        let f = format!("{at}.headers[{i}]");
                        let name = HeaderName::from_bytes(h.name.as_bytes())
                            .map_err(|e| bad(format!("{f}.name"), e.to_string()))?;
                        headers.push((name, cond(h.kind, &h.value, format!("{f}.value"))?));
                    }
                    let mut query = Vec::new();
                    for (i, q) in m.query_params.iter().enumerate() {
                        let f = format!("{at}.queryParams[{i}].value");
                        query.push((q.name.clone(), cond(q.kind, &q.value, f)?));
                    }
                    let grpc = (route.kind == RouteKind::Grpc)
                        .then(|| GrpcMethodMatch::precedence(m.grpc_method.as_ref()));
                    entries.push(Entry {
                        consumer: route.namespace != service_namespace,
                        route: ri,
                        rule: ui,
                        grpc,
                        path,
                        method,
                        headers,
                        query,
                    });
                }
            }
        }
        // A stable sort keeps rule and match order as the last tie-breaker.
        entries.sort_by(|a, b| {
            let (ra, rb) = (&routes[a.route], &routes[b.route]);
            // gRPC matches first, by their own rank; among equals, and for HTTP
            // matches, the path decides.
            let grpc = |e: &Entry| {
                (
                    e.grpc.is_none(),
                    e.grpc.map(|g| (g, std::cmp::Reverse(e.headers.len()))),
                )
            };
            // Consumer routes are tried before producer routes, so one pass finds
            // the answer.
            b.consumer
                .cmp(&a.consumer)
                .then(grpc(a).cmp(&grpc(b)))
                .then(a.path.rank().cmp(&b.path.rank()))
                .then(b.method.is_some().cmp(&a.method.is_some()))
                .then(b.headers.len().cmp(&a.headers.len()))
                .then(b.query.len().cmp(&a.query.len()))
                .then_with(|| oldest_first(ra, rb))
                .then_with(|| (&ra.namespace, &ra.name).cmp(&(&rb.namespace, &rb.name)))
        });
        entries.shrink_to_fit();
        Ok(entries)
    }

    /// Whether there are no routes at all.
    pub fn is_empty(&self) -> bool {
        self.routes.list().is_empty()
    }

    /// Whether a route applies to `req` by its port and the client's namespace: then a
    /// request no rule matches is answered 404 (the Gateway API's mesh semantics),
    /// instead of going to its original destination.
    pub fn governs(&self, req: &RequestInfo<'_>) -> bool {
        let service_namespace = self.routes.service_namespace();
        self.routes.list().iter().any(|r| {
            r.port.is_none_or(|p| p == req.port)
                && (r.namespace == service_namespace
                    || req.client_namespace == Some(r.namespace.as_str()))
        })
    }

    /// The rule `req` selects and what to do, or `None` when no rule matches (see
    /// [`Self::governs`] for what then happens). `random` picks the weighted
    /// backend; any uniformly distributed value will do.
    pub fn decide(&self, req: &RequestInfo<'_>, random: u32) -> Option<Decision<'_>> {
        let path = req.uri.path();
        let query = parse_query(req.uri.query().unwrap_or(""));
        let routes = self.routes.list();
        let entry = self.entries.iter().find(|e| {
            let r = &routes[e.route];
            if r.port.is_some_and(|p| p != req.port) {
                return false;
            }
            (!e.consumer || req.client_namespace == Some(r.namespace.as_str()))
                && e.matches(req, path, &query)
        })?;
        let route = &routes[entry.route];
        let rule = &route.rules[entry.rule];
        let prefix = match &entry.path {
            PathCond::Prefix(p) => Some(p.as_str()),
            _ => None,
        };
        Some(Decision {
            route,
            route_index: entry.route,
            rule,
            rule_index: entry.rule,
            action: action(rule, req, prefix, random),
        })
    }
}

fn oldest_first(a: &HttpRoute, b: &HttpRoute) -> std::cmp::Ordering {
    // RFC 3339 UTC timestamps of one format order as strings; a route without one
    // counts as newest.
    match (&a.creation_timestamp, &b.creation_timestamp) {
        (Some(x), Some(y)) => x.cmp(y),
        (Some(_), None) => std::cmp::Ordering::Less,
        (None, Some(_)) => std::cmp::Ordering::Greater,
        (None, None) => std::cmp::Ordering::Equal,
    }
}

fn action<'a>(
    rule: &'a RouteRule,
    req: &RequestInfo<'_>,
    prefix: Option<&str>,
    random: u32,
) -> Action<'a> {
    let mut request_headers = Vec::new();
    let mut response_headers = Vec::new();
    let mut rewrite = None;
    for f in &rule.filters {
        match f {
            Filter::RequestRedirect(r) => return redirect(r, req, prefix),
            Filter::RequestHeaderModifier(h) => request_headers.push(h),
            Filter::ResponseHeaderModifier(h) => response_headers.push(h),
            Filter::UrlRewrite(u) => rewrite = Some(u),
        }
    }
    let Some(backend) = pick(&rule.backend_refs, random) else {
        return Action::Respond(500);
    };
    for f in &backend.filters {
        match f {
            Filter::RequestHeaderModifier(h) => request_headers.push(h),
            Filter::ResponseHeaderModifier(h) => response_headers.push(h),
            // The backend's rewrite refines the rule's.
            Filter::UrlRewrite(u) => rewrite = Some(u),
            Filter::RequestRedirect(_) => {}
        }
    }
    let (host, path_and_query) = match rewrite {
        None => (None, None),
        Some(UrlRewrite { hostname, path }) => (
            hostname.as_deref(),
            path.as_ref()
                .map(|p| with_query(&modify_path(p, req.uri.path(), prefix), req.uri.query())),
        ),
    };
    Action::Forward(Forward {
        backend,
        path_and_query,
        host,
        request_headers,
        response_headers,
    })
}

/// Weighted choice; weight 0 never gets a request, no weight at all gives `None`.
fn pick(backends: &[BackendRef], random: u32) -> Option<&BackendRef> {
    let total: u64 = backends.iter().map(|b| u64::from(b.weight)).sum();
    if total == 0 {
        return None;
    }
    let mut at = u64::from(random) % total;
    for b in backends {
        let w = u64::from(b.weight);
        if at < w {
            return Some(b);
        }
        at -= w;
    }
    None
}

fn redirect<'a>(r: &RequestRedirect, req: &RequestInfo<'_>, prefix: Option<&str>) -> Action<'a> {
    let scheme = r
        .scheme
        .as_deref()
        .or(req.uri.scheme_str())
        .unwrap_or("http");
    let host = r
        .hostname
        .clone()
        .unwrap_or_else(|| request_host(req).unwrap_or_default());
    // The Gateway API: an explicit port wins; with a scheme the scheme's well-known port;
    // otherwise the listener's, which for a mesh is the Service port.
    let port = r.port.unwrap_or(match r.scheme.as_deref() {
        Some("https") => 443,
        Some(_) => 80,
        None => req.port,
    });
    let default_port = matches!((scheme, port), ("http", 80) | ("https", 443));
    let path = match &r.path {
        Some(p) => modify_path(p, req.uri.path(), prefix),
        None => req.uri.path().to_string(),
    };
    let mut location = format!("{scheme}://{host}");
    if !default_port {
        location.push_str(&format!(":{port}"));
    }
    location.push_str(&with_query(&path, req.uri.query()));
    Action::Redirect {
        status: r.status_code,
        location,
    }
}

/// The request's host without its port: `Host`, else the URI's authority.
fn request_host(req: &RequestInfo<'_>) -> Option<String> {
    let from_header = req
        .headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .and_then(|h| h.parse::<http::uri::Authority>().ok());
    from_header
        .as_ref()
        .or(req.uri.authority())
        .map(|a| a.host().to_string())
}

/// `ReplaceFullPath`, or `ReplacePrefixMatch` per the Gateway API's table: the matched
/// prefix (trailing `/` ignored) is replaced, the rest keeps its leading `/`.
fn modify_path(m: &PathModifier, path: &str, prefix: Option<&str>) -> String {
    match m {
        PathModifier::ReplaceFullPath(p) => p.clone(),
        PathModifier::ReplacePrefixMatch(with) => {
            // Validation allows ReplacePrefixMatch only on PathPrefix rules.
            let rest = prefix.and_then(|p| path.get(p.len()..)).unwrap_or(path);
            let out = format!("{}{rest}", with.trim_end_matches('/'));
            if out.is_empty() {
                "/".to_string()
            } else {
                out
            }
        }
    }
}

fn with_query(path: &str, query: Option<&str>) -> String {
    match query {
        Some(q) => format!("{path}?{q}"),
        None => path.to_string(),
    }
}

/// `name=value` pairs in order; a name without `=` has an empty value.
fn parse_query(q: &str) -> Vec<(&str, &str)> {
    q.split('&')
        .filter(|p| !p.is_empty())
        .map(|p| p.split_once('=').unwrap_or((p, "")))
        .collect()
}

// === impl Entry ===

impl Entry {
    fn matches(&self, req: &RequestInfo<'_>, path: &str, query: &[(&str, &str)]) -> bool {
        let path_ok = match &self.path {
            PathCond::Exact(p) => path == p,
            PathCond::Prefix(p) => {
                path.starts_with(p.as_str())
                    && (path.len() == p.len() || path.as_bytes()[p.len()] == b'/')
            }
            PathCond::Regex(re) => re.is_match(path),
        };
        path_ok
            && self.method.as_ref().is_none_or(|m| m == req.method)
            && self.headers.iter().all(|(name, cond)| {
                // A repeated header is read by its first value.
                req.headers
                    .get(name)
                    .and_then(|v| v.to_str().ok())
                    .is_some_and(|v| cond.matches(v))
            })
            && self.query.iter().all(|(name, cond)| {
                query
                    .iter()
                    .find(|(n, _)| n == name)
                    .is_some_and(|(_, v)| cond.matches(v))
            })
    }
}

// === impl PathCond ===

impl PathCond {
    /// Lower is better: exact, then prefixes longest first, then regexes.
    fn rank(&self) -> (u8, std::cmp::Reverse<usize>) {
        match self {
            Self::Exact(_) => (0, std::cmp::Reverse(0)),
            Self::Prefix(p) => (1, std::cmp::Reverse(p.len())),
            Self::Regex(_) => (2, std::cmp::Reverse(0)),
        }
    }
}

// === impl ValueCond ===

impl ValueCond {
    fn matches(&self, v: &str) -> bool {
        match self {
            Self::Exact(x) => x == v,
            Self::Regex(re) => re.is_match(v),
        }
    }
}

// === impl Forward ===

impl Forward<'_> {
    /// Applies the rewrite and the request header changes to a request about to be
    /// forwarded.
    pub fn apply_request(&self, parts: &mut http::request::Parts) {
        if self.path_and_query.is_some() || self.host.is_some() {
            let mut up = std::mem::take(&mut parts.uri).into_parts();
            if let Some(pq) = self.path_and_query.as_deref().and_then(|p| p.parse().ok()) {
                up.path_and_query = Some(pq);
            }
            if let Some(host) = self.host {
                if let Ok(v) = HeaderValue::from_str(host) {
                    parts.headers.insert(header::HOST, v);
                }
                if up.authority.is_some() {
                    up.authority = host.parse().ok().or(up.authority);
                }
            }
            parts.uri = Uri::from_parts(up).unwrap_or_default();
        }
        for m in &self.request_headers {
            apply_headers(m, &mut parts.headers);
        }
    }
}

/// Applies one header modifier: `set` replaces, `add` appends, `remove` deletes.
pub fn apply_headers(m: &HeaderModifier, headers: &mut HeaderMap) {
    let pair = |name: &str, value: &str| {
        Some((
            HeaderName::from_bytes(name.as_bytes()).ok()?,
            HeaderValue::from_str(value).ok()?,
        ))
    };
    for (n, v) in m.set.iter().filter_map(|h| pair(&h.name, &h.value)) {
        headers.insert(n, v);
    }
    for (n, v) in m.add.iter().filter_map(|h| pair(&h.name, &h.value)) {
        headers.append(n, v);
    }
    for n in &m.remove {
        if let Ok(n) = HeaderName::from_bytes(n.as_bytes()) {
            headers.remove(n);
        }
    }
}

#[cfg(test)]
mod tests;
