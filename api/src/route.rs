//! Compiled HTTP routes: Gateway API HTTPRoutes attached to a Service (GAMMA), in the
//! shape the proxy applies them.
//!
//! The controller (or `meshlet-injector compile`) turns each HTTPRoute whose parentRef is
//! a Service into one [`HttpRoute`] under that Service in the mesh config. Defaults the
//! API server would fill in (a match with no path is `PathPrefix /`, a backend weight of
//! 1, redirect status 302) are written out, so the proxy never guesses.
//!
//! ```json
//! {"name": "reviews", "namespace": "bookinfo", "creationTimestamp": "2026-01-02T03:04:05Z",
//!  "port": 9080,
//!  "rules": [{"name": "canary",
//!             "matches": [{"path": {"type": "PathPrefix", "value": "/"},
//!                          "headers": [{"type": "Exact", "name": "version", "value": "v2"}],
//!                          "queryParams": [], "method": "GET"}],
//!             "filters": [{"type": "RequestHeaderModifier", "set": [{"name": "x-canary", "value": "1"}]}],
//!             "backendRefs": [{"name": "reviews-v2", "namespace": "bookinfo", "port": 9080, "weight": 1}],
//!             "timeouts": {"request": "10s", "backendRequest": "2s"},
//!             "retry": {"codes": [503], "attempts": 2, "backoff": "100ms"}}]}
//! ```

use serde::{Deserialize, Serialize};

use crate::Duration;

pub use regex::Regex;

/// Largest compiled size of one regex; a route must not be able to exhaust the proxy's
/// memory.
const REGEX_SIZE_LIMIT: usize = 1 << 20;

/// One HTTPRoute attached to a Service.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpRoute {
    /// The kind the route was written as; a GRPCRoute is compiled into this same shape
    /// (its method matches become path matches) and ranked by its own precedence rules.
    #[serde(default, skip_serializing_if = "RouteKind::is_http")]
    pub kind: RouteKind,
    /// The HTTPRoute's name.
    pub name: String,
    /// The HTTPRoute's namespace. The Service's own namespace makes it a producer route
    /// (for every client); another namespace makes it a consumer route, applied only to
    /// clients in that namespace and before the producer routes.
    pub namespace: String,
    /// `metadata.creationTimestamp` (RFC 3339, UTC): older routes win ties.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub creation_timestamp: Option<String>,
    /// The parentRef's port: the route applies to this Service port only. `None` means
    /// every port of the Service.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    /// Rules, in the HTTPRoute's order.
    #[serde(default)]
    pub rules: Vec<RouteRule>,
}

/// One rule of a route.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RouteRule {
    /// The rule's `name` (for metrics and logs), if it has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Any one of these selects the rule; empty means `PathPrefix /`.
    #[serde(default)]
    pub matches: Vec<RouteMatch>,
    /// Filters applied to every request of the rule.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub filters: Vec<Filter>,
    /// Where requests go, by weight. Empty (without a redirect) answers 500.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub backend_refs: Vec<BackendRef>,
    /// Request timeouts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeouts: Option<RouteTimeouts>,
    /// Retries.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry: Option<Retry>,
}

/// What a request must have to select a rule (all conditions hold).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RouteMatch {
    /// Path condition; `None` reads as `PathPrefix /`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<PathMatch>,
    /// Header conditions (names are case-insensitive).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub headers: Vec<ValueMatch>,
    /// Query parameter conditions (names are case-sensitive).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub query_params: Vec<ValueMatch>,
    /// HTTP method, upper case.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
    /// The GRPCRoute method match this match was compiled from (only in a GRPCRoute).
    /// `path` does the matching (it must be [`GrpcMethodMatch::path_match`]); this is the
    /// rank hint: GEP-1016 ranks gRPC matches by the service, then the method they name,
    /// which the path's own ranking (exact, prefix, regex) gets wrong, e.g. a method-only
    /// match (a regex path) must beat a match-all (`PathPrefix /`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grpc_method: Option<GrpcMethodMatch>,
}

/// The kind of a Gateway API route.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub enum RouteKind {
    /// `HTTPRoute`.
    #[default]
    #[serde(rename = "HTTPRoute")]
    Http,
    /// `GRPCRoute`.
    #[serde(rename = "GRPCRoute")]
    Grpc,
}

/// A GRPCRoute `GRPCMethodMatch`: which gRPC service and method (`/service/method`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GrpcMethodMatch {
    /// How `service` and `method` are compared (both the same way).
    #[serde(rename = "type", default)]
    pub kind: ValueMatchType,
    /// The fully qualified service, e.g. `pkg.Svc`; `None` is any service.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
    /// The method, e.g. `Get`; `None` is any method.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
}

/// A path condition.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PathMatch {
    /// How `value` is compared.
    #[serde(rename = "type")]
    pub kind: PathMatchType,
    /// The path, prefix or regex (a regex must match the whole path).
    pub value: String,
}

/// How a path is compared.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum PathMatchType {
    /// The whole path, byte for byte.
    Exact,
    /// Whole path elements: `/a` matches `/a` and `/a/b`, not `/ab`.
    PathPrefix,
    /// A regex over the whole path.
    RegularExpression,
}

/// A header or query parameter condition.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ValueMatch {
    /// How `value` is compared.
    #[serde(rename = "type", default)]
    pub kind: ValueMatchType,
    /// Header or parameter name.
    pub name: String,
    /// The value or a regex over the whole value.
    pub value: String,
}

/// How a header or parameter value is compared.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum ValueMatchType {
    /// Byte for byte.
    #[default]
    Exact,
    /// A regex over the whole value.
    RegularExpression,
}

/// A filter of a rule or a backend.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type")]
pub enum Filter {
    /// Changes request headers.
    RequestHeaderModifier(HeaderModifier),
    /// Changes response headers.
    ResponseHeaderModifier(HeaderModifier),
    /// Rewrites the request before it is forwarded.
    #[serde(rename = "URLRewrite")]
    UrlRewrite(UrlRewrite),
    /// Answers with a redirect instead of forwarding.
    RequestRedirect(RequestRedirect),
}

/// Header changes: `set` overwrites, `add` appends, `remove` deletes.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HeaderModifier {
    /// Headers to overwrite (or add when absent).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub set: Vec<Header>,
    /// Headers to append to existing values.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub add: Vec<Header>,
    /// Header names to delete.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub remove: Vec<String>,
}

/// One header name and value.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Header {
    /// Header name.
    pub name: String,
    /// Header value.
    pub value: String,
}

/// `URLRewrite`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UrlRewrite {
    /// New Host / `:authority`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    /// New path.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<PathModifier>,
}

/// How a rewrite or redirect changes the path.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", content = "value")]
pub enum PathModifier {
    /// Replace the whole path.
    ReplaceFullPath(String),
    /// Replace the part the rule's `PathPrefix` matched.
    ReplacePrefixMatch(String),
}

/// `RequestRedirect`: unset parts keep the request's.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RequestRedirect {
    /// `http` or `https`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scheme: Option<String>,
    /// New host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    /// New path.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<PathModifier>,
    /// New port.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    /// 301, 302, 303, 307 or 308.
    #[serde(default = "RequestRedirect::default_status")]
    pub status_code: u16,
}

/// A weighted backend: a Service port.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct BackendRef {
    /// Service name.
    pub name: String,
    /// Service namespace.
    pub namespace: String,
    /// Service port.
    pub port: u16,
    /// Share of the rule's requests relative to the other backends; 0 gets none.
    #[serde(default = "BackendRef::default_weight")]
    pub weight: u32,
    /// Filters applied only to requests sent to this backend.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub filters: Vec<Filter>,
}

/// `timeouts` of a rule; zero means no timeout.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RouteTimeouts {
    /// From the request's start to the end of the response, retries included.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request: Option<Duration>,
    /// One attempt to a backend.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backend_request: Option<Duration>,
}

/// `retry` of a rule.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Retry {
    /// Response codes that are retried (500..=599 are allowed).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub codes: Vec<u16>,
    /// Retries after the first attempt.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attempts: Option<u32>,
    /// Wait before a retry.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backoff: Option<Duration>,
}

/// A route that breaks a rule of the Gateway API; names the route and the field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("route {route}: {field}: {reason}")]
pub struct RouteError {
    /// `namespace/name`.
    pub route: String,
    /// Where, e.g. `rules[0].matches[1].path.value`.
    pub field: String,
    /// What is wrong and what to write instead.
    pub reason: String,
}

/// HTTP methods the Gateway API allows in a match.
pub const METHODS: &[&str] = &[
    "GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH",
];

/// Redirect status codes the Gateway API allows.
pub const REDIRECT_CODES: &[u16] = &[301, 302, 303, 307, 308];

/// Compiles a route regex so that it must match the whole value (as Envoy and the
/// conformance tests read `RegularExpression`), with a bounded size.
pub fn compile_regex(pattern: &str) -> Result<Regex, regex::Error> {
    regex::RegexBuilder::new(&format!("^(?:{pattern})$"))
        .size_limit(REGEX_SIZE_LIMIT)
        .build()
}

// === impl RouteKind ===

impl RouteKind {
    /// The kind as Kubernetes spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Http => "HTTPRoute",
            Self::Grpc => "GRPCRoute",
        }
    }

    fn is_http(&self) -> bool {
        *self == Self::Http
    }
}

impl std::fmt::Display for RouteKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Where a gRPC method match ranks ([`GrpcMethodMatch::precedence`]); lower first.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct GrpcPrecedence {
    service: (u8, std::cmp::Reverse<usize>),
    method: (u8, std::cmp::Reverse<usize>),
}

// === impl GrpcMethodMatch ===

/// One path element: what "any service" and "any method" match.
const ANY_ELEMENT: &str = "[^/]+";

impl GrpcMethodMatch {
    /// The path condition that selects exactly the requests of this match (gRPC sends
    /// `POST /<service>/<method>`):
    ///
    /// | type | service | method | path |
    /// |---|---|---|---|
    /// | Exact | `S` | `M` | Exact `/S/M` |
    /// | Exact | `S` | - | PathPrefix `/S` (whole elements: not `/S.v2/M`) |
    /// | Exact | - | `M` | RegularExpression `/[^/]+/M` |
    /// | RegularExpression | `S` | `M` | RegularExpression `/(?:S)/(?:M)` |
    ///
    /// and with a regex of one side missing, `[^/]+` in its place. Exact values are
    /// checked by [`Self::validate`] to hold no regex or path syntax; they are escaped
    /// anyway.
    pub fn path_match(&self) -> PathMatch {
        let (service, method) = (self.service.as_deref(), self.method.as_deref());
        let (kind, value) = match (self.kind, service, method) {
            (ValueMatchType::Exact, Some(s), Some(m)) => {
                (PathMatchType::Exact, format!("/{s}/{m}"))
            }
            (ValueMatchType::Exact, Some(s), None) => (PathMatchType::PathPrefix, format!("/{s}")),
            (ValueMatchType::Exact, None, m) => (
                PathMatchType::RegularExpression,
                format!(
                    "/{ANY_ELEMENT}/{}",
                    m.map(regex::escape).unwrap_or(ANY_ELEMENT.into())
                ),
            ),
            (ValueMatchType::RegularExpression, s, m) => {
                let part =
                    |v: Option<&str>| v.map_or(ANY_ELEMENT.to_string(), |v| format!("(?:{v})"));
                (
                    PathMatchType::RegularExpression,
                    format!("/{}/{}", part(s), part(m)),
                )
            }
        };
        PathMatch { kind, value }
    }

    /// GEP-1016 precedence, lower first: the match naming the service ranks first (an
    /// exact service before a regex, longer before shorter), then likewise the method.
    /// "Characters in a matching service" is read as: an exact name counts all its
    /// characters; a regex (implementation-specific) ranks after every exact name, by
    /// pattern length; no service ranks last.
    pub fn precedence(m: Option<&Self>) -> GrpcPrecedence {
        let part = |m: Option<&Self>, f: fn(&Self) -> Option<&String>| match m
            .and_then(|m| Some((m.kind, f(m)?)))
        {
            Some((ValueMatchType::Exact, v)) => (0u8, std::cmp::Reverse(v.len())),
            Some((ValueMatchType::RegularExpression, v)) => (1, std::cmp::Reverse(v.len())),
            None => (2, std::cmp::Reverse(0)),
        };
        GrpcPrecedence {
            service: part(m, |m| m.service.as_ref()),
            method: part(m, |m| m.method.as_ref()),
        }
    }

    fn validate(&self, at: &str) -> Result<(), FieldError> {
        if self.service.as_deref().unwrap_or("").is_empty()
            && self.method.as_deref().unwrap_or("").is_empty()
        {
            return Err((at.into(), "needs a service, a method or both".into()));
        }
        for (field, v) in [("service", &self.service), ("method", &self.method)] {
            let Some(v) = v else { continue };
            let f = format!("{at}.{field}");
            if v.is_empty() {
                return Err((f, "is empty; leave it out to match any".into()));
            }
            match self.kind {
                ValueMatchType::RegularExpression => {
                    check_regex(v, f.clone())?;
                    // Alone too: `a)|(b` compiles inside the anchoring group but would
                    // break out of its place in the path regex.
                    regex::RegexBuilder::new(v)
                        .size_limit(REGEX_SIZE_LIMIT)
                        .build()
                        .map_err(|_| (f, format!("{v:?} is not a regular expression on its own; balance its groups")))?;
                }
                ValueMatchType::Exact => {
                    // The CRD's CEL rules: `^(?i)\.?[a-z_][a-z_0-9]*(\.[a-z_][a-z_0-9]*)*$`
                    // for a service, `^[A-Za-z_][A-Za-z_0-9]*$` for a method.
                    let ident = |p: &str| {
                        p.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_')
                            && p.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
                    };
                    let ok = if field == "service" {
                        v.strip_prefix('.').unwrap_or(v).split('.').all(ident)
                    } else {
                        ident(v)
                    };
                    if !ok {
                        let want = if field == "service" {
                            "dot-separated identifiers such as pkg.v1.Svc"
                        } else {
                            "one identifier such as GetUser"
                        };
                        return Err((f, format!("{v:?} is not a gRPC {field} name; write {want}")));
                    }
                }
            }
        }
        Ok(())
    }
}

// === impl HttpRoute ===

impl HttpRoute {
    /// `namespace/name`.
    pub fn id(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    /// Checks what the Gateway API's CRD validation and CEL rules check, and that every
    /// regex compiles.
    pub fn validate(&self) -> Result<(), RouteError> {
        let err = |field: String, reason: String| RouteError {
            route: self.id(),
            field,
            reason,
        };
        if self.name.is_empty() || self.namespace.is_empty() {
            return Err(err(
                "metadata".into(),
                "needs a name and a namespace".into(),
            ));
        }
        if self.port == Some(0) {
            return Err(err(
                "parentRef.port".into(),
                "port 0; write 1 to 65535".into(),
            ));
        }
        for (ri, rule) in self.rules.iter().enumerate() {
            let at = format!("rules[{ri}]");
            rule.validate(&at).map_err(|(f, r)| err(f, r))?;
            for (mi, m) in rule.matches.iter().enumerate() {
                self.validate_grpc(m, &format!("{at}.matches[{mi}]"))
                    .map_err(|(f, r)| err(f, r))?;
            }
        }
        Ok(())
    }
}

impl HttpRoute {
    fn validate_grpc(&self, m: &RouteMatch, at: &str) -> Result<(), FieldError> {
        let Some(g) = &m.grpc_method else {
            return Ok(());
        };
        let f = format!("{at}.grpcMethod");
        if self.kind != RouteKind::Grpc {
            return Err((f, "only a GRPCRoute has method matches".into()));
        }
        g.validate(&f)?;
        if m.path.as_ref() != Some(&g.path_match()) {
            return Err((
                format!("{at}.path"),
                format!("must be {:?}, what the grpcMethod selects", g.path_match()),
            ));
        }
        Ok(())
    }
}

// === impl RouteRule ===

type FieldError = (String, String);

impl RouteRule {
    fn validate(&self, at: &str) -> Result<(), FieldError> {
        for (mi, m) in self.matches.iter().enumerate() {
            m.validate(&format!("{at}.matches[{mi}]"))?;
        }
        validate_filters(&self.filters, &format!("{at}.filters"))?;
        let redirect = self
            .filters
            .iter()
            .any(|f| matches!(f, Filter::RequestRedirect(_)));
        if redirect && !self.backend_refs.is_empty() {
            return Err((
                format!("{at}.filters"),
                "RequestRedirect must not be used together with backendRefs; remove one".into(),
            ));
        }
        let prefix_only = self.matches.iter().all(|m| {
            m.path
                .as_ref()
                .is_none_or(|p| p.kind == PathMatchType::PathPrefix)
        });
        let replaces_prefix = self
            .filters
            .iter()
            .chain(self.backend_refs.iter().flat_map(|b| &b.filters))
            .any(|f| match f {
                Filter::UrlRewrite(UrlRewrite { path, .. })
                | Filter::RequestRedirect(RequestRedirect { path, .. }) => {
                    matches!(path, Some(PathModifier::ReplacePrefixMatch(_)))
                }
                _ => false,
            });
        if replaces_prefix && !prefix_only {
            return Err((
                format!("{at}.filters"),
                "ReplacePrefixMatch needs every match of the rule to be a PathPrefix match".into(),
            ));
        }
        for (bi, b) in self.backend_refs.iter().enumerate() {
            let bat = format!("{at}.backendRefs[{bi}]");
            if b.name.is_empty() || b.namespace.is_empty() || b.port == 0 {
                return Err((bat, "needs a name, a namespace and a port".into()));
            }
            validate_filters(&b.filters, &format!("{bat}.filters"))?;
            if b.filters
                .iter()
                .any(|f| matches!(f, Filter::RequestRedirect(_)))
            {
                return Err((
                    format!("{bat}.filters"),
                    "RequestRedirect is not supported on a backendRef; put it on the rule".into(),
                ));
            }
        }
        if let Some(t) = &self.timeouts {
            if let (Some(req), Some(be)) = (t.request, t.backend_request) {
                if !req.is_zero() && (be.is_zero() || be > req) {
                    return Err((
                        format!("{at}.timeouts.backendRequest"),
                        format!("{be} exceeds timeouts.request {req}; make it at most {req}"),
                    ));
                }
            }
        }
        if let Some(r) = &self.retry {
            if let Some(c) = r.codes.iter().find(|c| !(400..=599).contains(*c)) {
                return Err((
                    format!("{at}.retry.codes"),
                    format!("{c} is not a 4xx or 5xx status code"),
                ));
            }
        }
        Ok(())
    }
}

fn validate_filters(filters: &[Filter], at: &str) -> Result<(), FieldError> {
    let mut seen = [false; 4];
    for (fi, f) in filters.iter().enumerate() {
        let fat = format!("{at}[{fi}]");
        let (slot, name) = match f {
            Filter::RequestHeaderModifier(h) => {
                h.validate(&fat)?;
                (0, "RequestHeaderModifier")
            }
            Filter::ResponseHeaderModifier(h) => {
                h.validate(&fat)?;
                (1, "ResponseHeaderModifier")
            }
            Filter::UrlRewrite(u) => {
                if let Some(p) = &u.path {
                    p.validate(&format!("{fat}.path"))?;
                }
                (2, "URLRewrite")
            }
            Filter::RequestRedirect(r) => {
                r.validate(&fat)?;
                (3, "RequestRedirect")
            }
        };
        if std::mem::replace(&mut seen[slot], true) {
            return Err((fat, format!("{name} appears twice; merge them into one")));
        }
    }
    if seen[2] && seen[3] {
        return Err((
            at.into(),
            "URLRewrite and RequestRedirect cannot both be set; keep one".into(),
        ));
    }
    Ok(())
}

// === impl RouteMatch ===

impl RouteMatch {
    fn validate(&self, at: &str) -> Result<(), FieldError> {
        if let Some(p) = &self.path {
            let f = format!("{at}.path.value");
            match p.kind {
                PathMatchType::Exact | PathMatchType::PathPrefix => {
                    if !p.value.starts_with('/') {
                        return Err((f, format!("{:?} must start with /", p.value)));
                    }
                    if p.value.contains("//") || p.value.contains('?') || p.value.contains('#') {
                        return Err((f, format!("{:?} must not contain //, ? or #", p.value)));
                    }
                }
                PathMatchType::RegularExpression => check_regex(&p.value, f)?,
            }
        }
        for (kind, list) in [
            ("headers", &self.headers),
            ("queryParams", &self.query_params),
        ] {
            for (i, v) in list.iter().enumerate() {
                if v.name.is_empty() {
                    return Err((format!("{at}.{kind}[{i}].name"), "is empty".into()));
                }
                if v.kind == ValueMatchType::RegularExpression {
                    check_regex(&v.value, format!("{at}.{kind}[{i}].value"))?;
                }
            }
            let mut names: Vec<String> = list
                .iter()
                .map(|v| {
                    if kind == "headers" {
                        v.name.to_ascii_lowercase()
                    } else {
                        v.name.clone()
                    }
                })
                .collect();
            names.sort();
            if let Some(w) = names.windows(2).find(|w| w[0] == w[1]) {
                return Err((
                    format!("{at}.{kind}"),
                    format!("{:?} is listed twice; a name may appear once", w[0]),
                ));
            }
        }
        if let Some(m) = &self.method {
            if !METHODS.contains(&m.as_str()) {
                return Err((
                    format!("{at}.method"),
                    format!("{m:?} is not one of {}", METHODS.join(", ")),
                ));
            }
        }
        Ok(())
    }
}

fn check_regex(pattern: &str, field: String) -> Result<(), FieldError> {
    compile_regex(pattern).map(drop).map_err(|e| {
        // regex's message spans lines (pattern, caret, reason); keep the reason so the
        // error fits one log line.
        let msg = e.to_string();
        let reason = msg.lines().last().unwrap_or_default().trim();
        let reason = reason.trim_start_matches("error: ");
        (
            field,
            format!("invalid regular expression {pattern:?}: {reason}"),
        )
    })
}

// === impl HeaderModifier ===

impl HeaderModifier {
    fn validate(&self, at: &str) -> Result<(), FieldError> {
        let names = self
            .set
            .iter()
            .chain(&self.add)
            .map(|h| &h.name)
            .chain(&self.remove);
        for n in names {
            if n.is_empty() || !n.bytes().all(is_token_byte) {
                return Err((at.into(), format!("{n:?} is not a valid header name")));
            }
        }
        Ok(())
    }
}

/// RFC 9110 `tchar`.
fn is_token_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

// === impl PathModifier ===

impl PathModifier {
    fn validate(&self, at: &str) -> Result<(), FieldError> {
        let (Self::ReplaceFullPath(v) | Self::ReplacePrefixMatch(v)) = self;
        if !v.is_empty() && !v.starts_with('/') {
            return Err((at.into(), format!("{v:?} must start with /")));
        }
        Ok(())
    }
}

// === impl RequestRedirect ===

impl RequestRedirect {
    fn default_status() -> u16 {
        302
    }

    fn validate(&self, at: &str) -> Result<(), FieldError> {
        if let Some(s) = &self.scheme {
            if s != "http" && s != "https" {
                return Err((
                    format!("{at}.scheme"),
                    format!("{s:?} is not http or https"),
                ));
            }
        }
        if self.port == Some(0) {
            return Err((format!("{at}.port"), "port 0; write 1 to 65535".into()));
        }
        if !REDIRECT_CODES.contains(&self.status_code) {
            return Err((
                format!("{at}.statusCode"),
                format!("{} is not one of 301, 302, 303, 307, 308", self.status_code),
            ));
        }
        if let Some(p) = &self.path {
            p.validate(&format!("{at}.path"))?;
        }
        Ok(())
    }
}

// === impl BackendRef ===

impl BackendRef {
    fn default_weight() -> u32 {
        1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ROUTE: &str = r#"{"name": "reviews", "namespace": "bookinfo",
        "creationTimestamp": "2026-01-02T03:04:05Z", "port": 9080,
        "rules": [
          {"name": "canary",
           "matches": [{"path": {"type": "PathPrefix", "value": "/api"},
                        "headers": [{"name": "version", "value": "v2"}],
                        "queryParams": [{"type": "RegularExpression", "name": "u", "value": "[0-9]+"}],
                        "method": "GET"}],
           "filters": [{"type": "RequestHeaderModifier", "set": [{"name": "x-a", "value": "1"}],
                        "remove": ["x-b"]},
                       {"type": "URLRewrite", "path": {"type": "ReplacePrefixMatch", "value": "/v2"}}],
           "backendRefs": [{"name": "reviews-v2", "namespace": "bookinfo", "port": 9080},
                           {"name": "reviews-v1", "namespace": "bookinfo", "port": 9080, "weight": 0,
                            "filters": [{"type": "ResponseHeaderModifier", "add": [{"name": "x-v", "value": "1"}]}]}],
           "timeouts": {"request": "10s", "backendRequest": "2s"},
           "retry": {"codes": [503], "attempts": 2, "backoff": "100ms"}},
          {"filters": [{"type": "RequestRedirect", "scheme": "https", "statusCode": 301}]}
        ]}"#;

    fn route() -> HttpRoute {
        serde_json::from_str(ROUTE).unwrap()
    }

    #[test]
    fn parses_with_defaults_and_round_trips() {
        let r = route();
        r.validate().unwrap();
        let rule = &r.rules[0];
        assert_eq!(rule.matches[0].headers[0].kind, ValueMatchType::Exact);
        assert_eq!(rule.backend_refs[0].weight, 1, "weight defaults to 1");
        assert_eq!(rule.backend_refs[1].weight, 0, "weight 0 is kept");
        assert_eq!(
            rule.filters[1],
            Filter::UrlRewrite(UrlRewrite {
                hostname: None,
                path: Some(PathModifier::ReplacePrefixMatch("/v2".into()))
            })
        );
        assert_eq!(
            rule.timeouts.as_ref().unwrap().backend_request,
            Some(Duration::from_secs(2))
        );
        assert_eq!(rule.retry.as_ref().unwrap().attempts, Some(2));
        match &r.rules[1].filters[0] {
            Filter::RequestRedirect(rr) => {
                assert_eq!(rr.status_code, 301);
                assert_eq!(rr.scheme.as_deref(), Some("https"));
            }
            f => panic!("{f:?}"),
        }
        let json = serde_json::to_string(&r).unwrap();
        assert!(
            json.contains(
                r#"{"type":"URLRewrite","path":{"type":"ReplacePrefixMatch","value":"/v2"}}"#
            ),
            "{json}"
        );
        assert_eq!(serde_json::from_str::<HttpRoute>(&json).unwrap(), r);
    }

    #[test]
    fn refuses_unknown_fields_in_filters() {
        let typo = ROUTE.replace(r#""remove": ["x-b"]"#, r#""remov": ["x-b"]"#);
        let e = serde_json::from_str::<HttpRoute>(&typo).unwrap_err();
        assert!(e.to_string().contains("remov"), "{e}");
        let unknown = ROUTE.replace("\"URLRewrite\"", "\"ExtensionRef\"");
        assert!(serde_json::from_str::<HttpRoute>(&unknown).is_err());
    }

    fn invalid(from: &str, to: &str) -> RouteError {
        let json = ROUTE.replace(from, to);
        assert_ne!(json, ROUTE, "{from} not found");
        serde_json::from_str::<HttpRoute>(&json)
            .unwrap()
            .validate()
            .unwrap_err()
    }

    #[test]
    fn names_route_and_field_of_each_error() {
        let cases = [
            (
                r#""[0-9]+""#,
                r#""[0-9""#,
                "rules[0].matches[0].queryParams[0].value",
                "invalid regular expression",
            ),
            (
                r#""value": "/api""#,
                r#""value": "api""#,
                "rules[0].matches[0].path.value",
                "must start with /",
            ),
            (
                r#""type": "PathPrefix", "value": "/api""#,
                r#""type": "RegularExpression", "value": "(/api""#,
                "rules[0].matches[0].path.value",
                "invalid regular expression",
            ),
            (
                r#""type": "PathPrefix", "value": "/api""#,
                r#""type": "Exact", "value": "/api""#,
                "rules[0].filters",
                "ReplacePrefixMatch needs",
            ),
            (
                r#""method": "GET""#,
                r#""method": "FETCH""#,
                "rules[0].matches[0].method",
                "is not one of",
            ),
            (
                r#""statusCode": 301"#,
                r#""statusCode": 304"#,
                "rules[1].filters[0].statusCode",
                "not one of 301",
            ),
            (
                r#""scheme": "https""#,
                r#""scheme": "ftp""#,
                "rules[1].filters[0].scheme",
                "not http or https",
            ),
            (
                r#""backendRequest": "2s""#,
                r#""backendRequest": "20s""#,
                "rules[0].timeouts.backendRequest",
                "exceeds",
            ),
            (
                r#""codes": [503]"#,
                r#""codes": [200]"#,
                "rules[0].retry.codes",
                "not a 4xx or 5xx",
            ),
            (
                r#""name": "x-a""#,
                r#""name": "x a""#,
                "rules[0].filters[0]",
                "not a valid header name",
            ),
            (
                r#"{"type": "URLRewrite","#,
                r#"{"type": "RequestRedirect","#,
                "rules[0].filters",
                "must not be used together with backendRefs",
            ),
            (
                r#""name": "version", "value": "v2"}"#,
                r#""name": "version", "value": "v2"}, {"name": "Version", "value": "v3"}"#,
                "rules[0].matches[0].headers",
                "listed twice",
            ),
            (
                r#"{"type": "ResponseHeaderModifier", "add": [{"name": "x-v", "value": "1"}]}"#,
                r#"{"type": "RequestRedirect"}"#,
                "rules[0].backendRefs[1].filters",
                "not supported on a backendRef",
            ),
        ];
        for (from, to, field, reason) in cases {
            let e = invalid(from, to);
            assert_eq!(e.route, "bookinfo/reviews");
            assert_eq!(e.field, field, "{e}");
            assert!(e.reason.contains(reason), "{e}");
        }
    }

    #[test]
    fn regexes_match_whole_values() {
        let re = compile_regex("/v[0-9]+").unwrap();
        assert!(re.is_match("/v12"));
        assert!(!re.is_match("/v12/x"), "anchored at the end");
        assert!(!re.is_match("/x/v12"), "anchored at the start");
        let alt = compile_regex("a|b").unwrap();
        assert!(!alt.is_match("ab"), "alternation stays inside the anchors");
        assert!(compile_regex("a{1000}{1000}").is_err(), "size is bounded");
    }

    fn gm(kind: ValueMatchType, service: Option<&str>, method: Option<&str>) -> GrpcMethodMatch {
        GrpcMethodMatch {
            kind,
            service: service.map(str::to_string),
            method: method.map(str::to_string),
        }
    }

    #[test]
    fn grpc_method_matches_become_path_matches_that_select_the_same_calls() {
        use ValueMatchType::{Exact, RegularExpression as Re};
        // (match, paths it selects, paths it does not)
        let cases = [
            (
                gm(Exact, Some("pkg.Svc"), Some("Get")),
                PathMatchType::Exact,
                vec!["/pkg.Svc/Get"],
                vec!["/pkg.Svc/GetAll", "/pkg.Svc/get", "/x.pkg.Svc/Get"],
            ),
            (
                gm(Exact, Some("pkg.Svc"), None),
                PathMatchType::PathPrefix,
                vec!["/pkg.Svc/Get", "/pkg.Svc/Put"],
                vec!["/pkg.Svc2/Get", "/pkg.SvcX/Get"],
            ),
            (
                gm(Exact, None, Some("Get")),
                PathMatchType::RegularExpression,
                vec!["/pkg.Svc/Get", "/a/Get"],
                vec!["/pkg.Svc/GetAll", "/Get", "/a/b/Get"],
            ),
            (
                gm(Re, Some(r"pkg\.v[0-9]+\.Svc"), Some("Get|Put")),
                PathMatchType::RegularExpression,
                vec!["/pkg.v2.Svc/Get", "/pkg.v10.Svc/Put"],
                vec!["/pkg.v2.Svc/Del", "/pkg.vx.Svc/Get"],
            ),
            (
                gm(Re, Some("a|b"), None),
                PathMatchType::RegularExpression,
                vec!["/a/Get", "/b/X"],
                vec!["/ab/Get", "/c/a"],
            ),
            (
                gm(Re, None, "G.t".into()),
                PathMatchType::RegularExpression,
                vec!["/s/Get", "/s/Gut"],
                vec!["/s/Gets"],
            ),
        ];
        for (m, kind, yes, no) in cases {
            let p = m.path_match();
            assert_eq!(p.kind, kind, "{m:?}");
            let hit = |path: &str| match p.kind {
                PathMatchType::Exact => path == p.value,
                PathMatchType::PathPrefix => path
                    .strip_prefix(p.value.as_str())
                    .is_some_and(|r| r.is_empty() || r.starts_with('/')),
                PathMatchType::RegularExpression => compile_regex(&p.value).unwrap().is_match(path),
            };
            for y in yes {
                assert!(hit(y), "{m:?} ({p:?}) should select {y}");
            }
            for n in no {
                assert!(!hit(n), "{m:?} ({p:?}) must not select {n}");
            }
        }
    }

    #[test]
    fn grpc_precedence_ranks_service_then_method_exact_before_regex() {
        use ValueMatchType::{Exact, RegularExpression as Re};
        let best_first = [
            Some(gm(Exact, Some("pkg.Service"), Some("Get"))),
            Some(gm(Exact, Some("pkg.Service"), None)),
            Some(gm(Exact, Some("pkg.S"), Some("Get"))),
            Some(gm(Re, Some("pkg\\..*"), Some("Get"))),
            Some(gm(Re, Some("p.*"), None)),
            Some(gm(Exact, None, Some("GetAll"))),
            Some(gm(Exact, None, Some("Get"))),
            Some(gm(Re, None, Some("G.*"))),
            None,
        ];
        let ranks: Vec<_> = best_first
            .iter()
            .map(|m| GrpcMethodMatch::precedence(m.as_ref()))
            .collect();
        for (i, w) in ranks.windows(2).enumerate() {
            assert!(
                w[0] < w[1],
                "{:?} must rank before {:?}",
                best_first[i],
                best_first[i + 1]
            );
        }
    }

    #[test]
    fn grpc_method_matches_are_validated_against_their_path_and_kind() {
        let grpc = |m: &str| -> HttpRoute {
            serde_json::from_str(&format!(
                r#"{{"kind": "GRPCRoute", "name": "g", "namespace": "shop",
                    "rules": [{{"matches": [{m}]}}]}}"#
            ))
            .unwrap()
        };
        let ok = grpc(
            r#"{"path": {"type": "Exact", "value": "/pkg.Svc/Get"},
                          "grpcMethod": {"service": "pkg.Svc", "method": "Get"}}"#,
        );
        ok.validate().unwrap();
        let json = serde_json::to_string(&ok).unwrap();
        assert!(json.starts_with(r#"{"kind":"GRPCRoute","#), "{json}");
        let http: HttpRoute =
            serde_json::from_str(&json.replace(r#""kind":"GRPCRoute","#, "")).unwrap();
        assert_eq!(http.kind, RouteKind::Http);
        assert!(
            !serde_json::to_string(&http).unwrap().contains("kind"),
            "HTTPRoute is the default and left out"
        );
        let e = http.validate().unwrap_err();
        assert!(
            e.field.ends_with("grpcMethod") && e.reason.contains("only a GRPCRoute"),
            "{e}"
        );

        let cases = [
            (
                r#"{"path": {"type": "Exact", "value": "/pkg.Svc/Put"}, "grpcMethod": {"service": "pkg.Svc", "method": "Get"}}"#,
                "rules[0].matches[0].path",
                "what the grpcMethod selects",
            ),
            (
                r#"{"path": {"type": "PathPrefix", "value": "/"}, "grpcMethod": {}}"#,
                "rules[0].matches[0].grpcMethod",
                "needs a service",
            ),
            (
                r#"{"path": {"type": "Exact", "value": "/pkg/Svc/Get"}, "grpcMethod": {"service": "pkg/Svc", "method": "Get"}}"#,
                "rules[0].matches[0].grpcMethod.service",
                "not a gRPC service name",
            ),
            (
                r#"{"path": {"type": "Exact", "value": "/a/G-t"}, "grpcMethod": {"service": "a", "method": "G-t"}}"#,
                "rules[0].matches[0].grpcMethod.method",
                "not a gRPC method name",
            ),
            (
                r#"{"path": {"type": "RegularExpression", "value": "/(?:a)|(?:.*)/[^/]+"}, "grpcMethod": {"type": "RegularExpression", "service": "a)|(?:.*"}}"#,
                "rules[0].matches[0].grpcMethod.service",
                "on its own",
            ),
        ];
        for (m, field, reason) in cases {
            let e = grpc(m).validate().unwrap_err();
            assert_eq!(e.field, field, "{e}");
            assert!(e.reason.contains(reason), "{e}");
        }
    }
}
