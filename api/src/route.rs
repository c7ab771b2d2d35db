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
            rule.validate(&format!("rules[{ri}]"))
                .map_err(|(f, r)| err(f, r))?;
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
}
