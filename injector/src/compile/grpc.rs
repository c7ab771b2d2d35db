//! GRPCRoutes (GEP-1016) whose parentRef is a Service, in the shape of an HTTPRoute, so
//! that one compiler (parents, backendRefs, ReferenceGrants, validation) and one proxy
//! engine serve both kinds.
//!
//! A method match becomes a path match ([`GrpcMethodMatch::path_match`]: gRPC calls are
//! `POST /<service>/<method>`) and is kept beside it as the rank hint the proxy orders
//! gRPC matches by. Header matches map one to one; of two headers with the same name
//! (case-insensitively) only the first counts, as the spec says. Only
//! `RequestHeaderModifier` and `ResponseHeaderModifier` filters are supported (rule and
//! backend); any other filter refuses the route with `UnsupportedValue`. No HTTP
//! method or `content-type` condition is added: a GRPCRoute's matches say nothing about
//! them, and a non-gRPC request to a gRPC service port is the client's error to see.

use meshlet_api::route::{GrpcMethodMatch, ValueMatch, ValueMatchType};
use serde::Deserialize;
use serde_json::{json, Value};

// The GRPCRoute subset meshlet reads; unknown fields are ignored as the API server's
// pruning would, unknown enum values are refused.

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Spec {
    #[serde(default)]
    parent_refs: Vec<Value>,
    #[serde(default)]
    rules: Vec<Rule>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Rule {
    name: Option<String>,
    #[serde(default)]
    matches: Vec<Match>,
    #[serde(default)]
    filters: Vec<Value>,
    #[serde(default)]
    backend_refs: Vec<Value>,
}

#[derive(Deserialize)]
struct Match {
    method: Option<Method>,
    #[serde(default)]
    headers: Vec<ValueMatch>,
}

#[derive(Deserialize)]
struct Method {
    #[serde(rename = "type", default)]
    kind: ValueMatchType,
    service: Option<String>,
    method: Option<String>,
}

const SUPPORTED: [&str; 2] = ["RequestHeaderModifier", "ResponseHeaderModifier"];

/// The GRPCRoute's `spec` as an HTTPRoute `spec` (with `grpcMethod` beside each path
/// match), or what is wrong with it (an `UnsupportedValue` message).
pub(super) fn http_spec(spec: &Value) -> Result<Value, String> {
    let spec: Spec = serde_json::from_value(spec.clone()).map_err(|e| format!("spec: {e}"))?;
    let mut rules = Vec::new();
    for (ri, r) in spec.rules.iter().enumerate() {
        let at = format!("rules[{ri}]");
        check_filters(&r.filters, &format!("{at}.filters"))?;
        for (bi, b) in r.backend_refs.iter().enumerate() {
            let filters = b.get("filters").and_then(Value::as_array);
            check_filters(
                filters.map_or(&[][..], Vec::as_slice),
                &format!("{at}.backendRefs[{bi}].filters"),
            )?;
        }
        let matches: Vec<Value> = r.matches.iter().map(http_match).collect();
        let mut rule = json!({
            "matches": matches,
            "filters": r.filters,
            "backendRefs": r.backend_refs,
        });
        if let Some(n) = &r.name {
            rule["name"] = n.clone().into();
        }
        rules.push(rule);
    }
    Ok(json!({"parentRefs": spec.parent_refs, "rules": rules}))
}

fn http_match(m: &Match) -> Value {
    let mut headers: Vec<&ValueMatch> = Vec::new();
    for h in &m.headers {
        if !headers.iter().any(|k| k.name.eq_ignore_ascii_case(&h.name)) {
            headers.push(h);
        }
    }
    // An empty service or method reads as absent ("match any"); without either the
    // method match matches every call, as no method match does.
    let non_empty = |v: &Option<String>| v.clone().filter(|v| !v.is_empty());
    let grpc = m
        .method
        .as_ref()
        .map(|mm| GrpcMethodMatch {
            kind: mm.kind,
            service: non_empty(&mm.service),
            method: non_empty(&mm.method),
        })
        .filter(|g| g.service.is_some() || g.method.is_some());
    match grpc {
        Some(g) => json!({"path": g.path_match(), "headers": headers, "grpcMethod": g}),
        None => json!({"headers": headers}),
    }
}

fn check_filters(filters: &[Value], at: &str) -> Result<(), String> {
    for (i, f) in filters.iter().enumerate() {
        let kind = f.get("type").and_then(Value::as_str).unwrap_or("");
        if !SUPPORTED.contains(&kind) {
            return Err(format!(
                "{at}[{i}]: filter type {kind} is not supported by meshlet in a GRPCRoute; \
                 use {}",
                SUPPORTED.join(" or ")
            ));
        }
    }
    Ok(())
}
