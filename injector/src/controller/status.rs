//! Route status: what meshlet tells the owner of each HTTPRoute and GRPCRoute about the
//! Services it attaches to, in the conditions the Gateway API names (Accepted,
//! ResolvedRefs). Both kinds share the route status shape (`status.parents`), so one
//! set of functions serves both; routes are told apart by (kind, `namespace/name`).
//!
//! Pure functions of the route and the compile outcome, so the status is computed the
//! same way every time and written only when it differs from what the route carries.
//! Parent statuses of other controllers (a Gateway's) are kept as they are.

use std::collections::BTreeMap;

use meshlet_api::{config::Service, CONTROLLER_NAME};
use serde_json::{json, Value};

use crate::compile::{
    self,
    authz::{self, PolicyProblem},
    Conflict, Problem,
};

/// Reasons that mean a backendRef did not resolve (ResolvedRefs=False); the route is
/// still accepted.
const REF_REASONS: [&str; 3] = ["BackendNotFound", "InvalidKind", "RefNotPermitted"];

/// What compile made of one route.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Outcome {
    /// Why the route was left out, if it was.
    pub problem: Option<Problem>,
    /// A backendRef that does not resolve, when `problem` is about something else
    /// (compile stops at the first problem, so the refs are checked again on their own).
    pub refs: Option<Problem>,
    /// Service parents the route was left out of for a route of another kind on the
    /// same port (only HTTPRoutes, for a GRPCRoute).
    pub conflicts: Vec<Conflict>,
}

/// Which route an outcome is of: (kind, `namespace/name`).
pub type RouteKey = (String, String);

/// The key of a route object.
pub fn route_key(route: &Value) -> RouteKey {
    (
        route["kind"].as_str().unwrap_or_default().to_string(),
        format!(
            "{}/{}",
            route["metadata"]["namespace"].as_str().unwrap_or("default"),
            route["metadata"]["name"].as_str().unwrap_or("")
        ),
    )
}

/// The outcome of every route of the world that has something to tell: compile's
/// problems, for a route refused for an unsupported value its refs checked again
/// without the parts compile refused, and the parents an HTTPRoute lost to a GRPCRoute.
/// Routes without an entry applied as written.
pub fn outcomes(
    objects: &[Value],
    problems: &[Problem],
    conflicts: &[Conflict],
) -> BTreeMap<RouteKey, Outcome> {
    let mut out: BTreeMap<RouteKey, Outcome> = BTreeMap::new();
    for p in problems {
        let key = (p.kind.to_string(), p.route.clone());
        let refs = if REF_REASONS.contains(&p.reason) {
            None
        } else {
            recheck_refs(objects, &key)
        };
        let o = out.entry(key).or_default();
        o.problem = Some(p.clone());
        o.refs = refs;
    }
    for c in conflicts {
        out.entry(("HTTPRoute".into(), c.route.clone()))
            .or_default()
            .conflicts
            .push(c.clone());
    }
    out
}

/// Compiles the route alone with its filters, parents, timeouts and retries taken
/// out; what is left to fail is a backendRef.
fn recheck_refs(objects: &[Value], key: &RouteKey) -> Option<Problem> {
    let is_route = |o: &Value| route_key(o) == *key;
    let mut route = objects.iter().find(|o| is_route(o))?.clone();
    if let Some(spec) = route.get_mut("spec").and_then(Value::as_object_mut) {
        spec.remove("parentRefs");
        for rule in spec
            .get_mut("rules")
            .and_then(Value::as_array_mut)
            .into_iter()
            .flatten()
        {
            if let Some(rule) = rule.as_object_mut() {
                rule.remove("filters");
                rule.remove("timeouts");
                rule.remove("retry");
                rule.remove("matches");
                for b in rule
                    .get_mut("backendRefs")
                    .and_then(Value::as_array_mut)
                    .into_iter()
                    .flatten()
                {
                    if let Some(b) = b.as_object_mut() {
                        b.remove("filters");
                    }
                }
            }
        }
    }
    let mut world: Vec<Value> = objects
        .iter()
        .filter(|o| matches!(o["kind"].as_str(), Some("Service" | "ReferenceGrant")))
        .cloned()
        .collect();
    world.push(route);
    let compiled = compile::compile(&world).ok()?;
    compiled
        .problems
        .into_iter()
        .find(|p| REF_REASONS.contains(&p.reason))
}

/// Whether a parentRef names a Service (a GAMMA parent, meshlet's to serve).
fn is_service_parent(p: &Value) -> bool {
    p["kind"] == "Service" && matches!(p["group"].as_str(), None | Some("" | "core"))
}

/// The parent Service a parentRef names, when it exists with the port it asks for.
fn parent_exists(route_ns: &str, p: &Value, services: &[Service]) -> bool {
    let ns = p["namespace"].as_str().unwrap_or(route_ns);
    let name = p["name"].as_str().unwrap_or("");
    services.iter().any(|s| {
        s.namespace == ns
            && s.name == name
            && p["port"]
                .as_u64()
                .is_none_or(|port| s.ports.iter().any(|sp| u64::from(sp.port) == port))
    })
}

fn condition(kind: &str, ok: bool, reason: &str, message: String) -> Value {
    json!({
        "type": kind,
        "status": if ok { "True" } else { "False" },
        "reason": reason,
        "message": message,
    })
}

/// Accepted and ResolvedRefs of one Service parent (without generation and time).
fn parent_conditions(route_ns: &str, p: &Value, services: &[Service], o: &Outcome) -> [Value; 2] {
    let ns = p["namespace"].as_str().unwrap_or(route_ns);
    let svc = format!("{ns}/{}", p["name"].as_str().unwrap_or(""));
    let accepted = if !parent_exists(route_ns, p, services) {
        let port = p["port"]
            .as_u64()
            .map(|n| format!(" with port {n}"))
            .unwrap_or_default();
        condition(
            "Accepted",
            false,
            "NoMatchingParent",
            format!("Service {svc}{port} does not exist; create it or fix the parentRef"),
        )
    } else if let Some(c) = o
        .conflicts
        .iter()
        .find(|c| c.service == svc && c.port.map(u64::from) == p["port"].as_u64())
    {
        condition(
            "Accepted",
            false,
            "Conflicted",
            format!(
                "meshlet does not apply this route to Service {svc}: {}",
                c.message()
            ),
        )
    } else {
        match &o.problem {
            Some(pr) if !REF_REASONS.contains(&pr.reason) => condition(
                "Accepted",
                false,
                pr.reason,
                format!("meshlet does not apply this route: {}", pr.message),
            ),
            _ => condition(
                "Accepted",
                true,
                "Accepted",
                format!("meshlet serves this route for Service {svc}"),
            ),
        }
    };
    let unresolved = match &o.problem {
        Some(pr) if REF_REASONS.contains(&pr.reason) => Some(pr),
        _ => o.refs.as_ref(),
    };
    let refs = match unresolved {
        Some(pr) => condition(
            "ResolvedRefs",
            false,
            pr.reason,
            format!(
                "{}; meshlet leaves the route out until every backendRef resolves",
                pr.message
            ),
        ),
        None => condition(
            "ResolvedRefs",
            true,
            "ResolvedRefs",
            "every backendRef resolves".into(),
        ),
    };
    [accepted, refs]
}

/// The `status.conditions` an AuthorizationPolicy should carry after a compile with
/// `problems`, or `None` when it already does. Conditions of other types are kept;
/// `lastTransitionTime` moves to `now` only when Accepted's status changes.
pub fn desired_policy_conditions(
    policy: &Value,
    problems: &[PolicyProblem],
    now: &str,
) -> Option<Vec<Value>> {
    let id = format!(
        "{}/{}",
        policy["metadata"]["namespace"]
            .as_str()
            .unwrap_or("default"),
        policy["metadata"]["name"].as_str().unwrap_or("")
    );
    let generation = policy["metadata"]["generation"].as_i64();
    let current: Vec<Value> = policy["status"]["conditions"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let before = current.iter().find(|c| c["type"] == "Accepted");
    let mut want = authz::accepted_condition(problems, &id, generation, now);
    if let Some(b) = before.filter(|b| b["status"] == want["status"]) {
        want["lastTransitionTime"] = b["lastTransitionTime"].clone();
    }
    if before == Some(&want) {
        return None;
    }
    let mut out: Vec<Value> = current
        .into_iter()
        .filter(|c| c["type"] != "Accepted")
        .collect();
    out.push(want);
    Some(out)
}

/// The `status.parents` the route should carry, or `None` when it already does.
///
/// Other controllers' entries stay first and untouched; meshlet's follow, one per
/// Service parentRef of the spec. `lastTransitionTime` moves to `now` only for a
/// condition whose status changed.
pub fn desired_parents(
    route: &Value,
    outcome: &Outcome,
    services: &[Service],
    now: &str,
) -> Option<Vec<Value>> {
    let route_ns = route["metadata"]["namespace"].as_str().unwrap_or("default");
    let generation = route["metadata"]["generation"].as_i64().unwrap_or(0);
    let current: Vec<Value> = route["status"]["parents"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let (ours, mut desired): (Vec<Value>, Vec<Value>) = current
        .iter()
        .cloned()
        .partition(|p| p["controllerName"] == CONTROLLER_NAME);
    let mut seen = Vec::new();
    for p in route["spec"]["parentRefs"].as_array().into_iter().flatten() {
        if !is_service_parent(p) || seen.contains(&p) {
            continue;
        }
        seen.push(p);
        let previous = ours.iter().find(|o| o["parentRef"] == *p);
        let conditions: Vec<Value> = parent_conditions(route_ns, p, services, outcome)
            .into_iter()
            .map(|mut c| {
                let before = previous.and_then(|o| {
                    o["conditions"]
                        .as_array()?
                        .iter()
                        .find(|pc| pc["type"] == c["type"])
                });
                let since = match before {
                    Some(b) if b["status"] == c["status"] => b["lastTransitionTime"].clone(),
                    _ => Value::from(now),
                };
                c["observedGeneration"] = generation.into();
                c["lastTransitionTime"] = since;
                c
            })
            .collect();
        desired.push(json!({
            "parentRef": p,
            "controllerName": CONTROLLER_NAME,
            "conditions": conditions,
        }));
    }
    (desired != current).then_some(desired)
}

/// Now, as Kubernetes writes times (RFC 3339, whole seconds, UTC).
pub fn now() -> String {
    k8s_openapi::jiff::Timestamp::now()
        .round(k8s_openapi::jiff::Unit::Second)
        .map(|t| t.to_string())
        .unwrap_or_else(|_| k8s_openapi::jiff::Timestamp::now().to_string())
}
