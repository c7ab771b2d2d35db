//! `AuthorizationPolicy` (`policy.meshlet.io/v1alpha1`, GEP-3779 shape) and the
//! `meshlet.io/default-inbound-policy` namespace annotation, compiled into the mesh
//! config's `authorization` section.
//!
//! Each policy target is resolved to the pods it covers, by address, since the inbound
//! proxy knows its workload by the address a client connected to:
//! - `kind: Service` (core group, `name` required): the Service's endpoint addresses,
//!   and the Pods (with `status.podIP`) its selector picks;
//! - `kind: Namespace` (`name` empty or the policy's namespace): every pod of it;
//! - `kind: Pod` with a label `selector` (`{}` is every pod of the namespace): the Pods
//!   it picks, and endpoints whose pod belongs to a workload (Deployment, StatefulSet,
//!   ...) whose pod template it picks.
//!
//! A policy the API server's validation would refuse, or whose target does not exist,
//! is left out with a problem carrying the reason its `Accepted` condition would show
//! (`Invalid`, `TargetNotFound`); the other policies still apply.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
};

use meshlet_api::{
    annotations::DEFAULT_INBOUND_POLICY,
    authz::{Authorization, DefaultPolicy, Policy, Rule, Source, Workload},
    config::Service,
};
use serde::Deserialize;
use serde_json::Value;

use super::{labels, namespace_of, s};

/// The API group of meshlet's policy CRDs.
pub const GROUP: &str = "policy.meshlet.io";

/// An object left out of the authorization section, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PolicyProblem {
    /// `AuthorizationPolicy namespace/name` or `Namespace name`.
    pub object: String,
    /// The reason of the `Accepted` condition (`Invalid`, `TargetNotFound`).
    pub reason: &'static str,
    /// The field at fault, what is wrong and what to do.
    pub message: String,
}

impl std::fmt::Display for PolicyProblem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} left out: {}: {}",
            self.object, self.reason, self.message
        )
    }
}

impl PolicyProblem {
    /// `namespace/name` when the object is an AuthorizationPolicy.
    pub fn policy_id(&self) -> Option<&str> {
        self.object.strip_prefix("AuthorizationPolicy ")
    }
}

/// The `Accepted` condition for `status.conditions` of the policy `namespace/name`,
/// as a controller writes it after a compile: `False` with the reason and message of
/// its problem (the field at fault), else `True`. `now` is RFC 3339.
pub fn accepted_condition(
    problems: &[PolicyProblem],
    id: &str,
    observed_generation: Option<i64>,
    now: &str,
) -> Value {
    let p = problems.iter().find(|p| p.policy_id() == Some(id));
    let mut c = serde_json::json!({
        "type": "Accepted",
        "status": if p.is_some() { "False" } else { "True" },
        "reason": p.map_or("Accepted", |p| p.reason),
        "message": p.map_or_else(
            || "compiled into the mesh config of the workloads it targets".to_string(),
            |p| p.message.clone(),
        ),
        "lastTransitionTime": now,
    });
    if let Some(g) = observed_generation {
        c["observedGeneration"] = g.into();
    }
    c
}

/// A pod as far as the manifests tell: its addresses, and its labels when known.
#[derive(Debug)]
struct PodRef {
    namespace: String,
    name: Option<String>,
    ips: BTreeSet<IpAddr>,
    /// `None`: only seen as an endpoint of a Service, of no known workload.
    labels: Option<BTreeMap<String, String>>,
}

/// A workload's pod template: name prefix of its pods and their labels.
struct Template<'a> {
    namespace: String,
    name: &'a str,
    labels: BTreeMap<String, String>,
}

// The GEP-3779 fields; unknown fields are ignored as the API server's pruning would.

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Spec {
    #[serde(default)]
    target_refs: Vec<TargetRef>,
    action: Option<String>,
    #[serde(default)]
    rules: Vec<K8sRule>,
}

#[derive(Deserialize)]
struct TargetRef {
    group: Option<String>,
    kind: Option<String>,
    name: Option<String>,
    selector: Option<LabelSelector>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct LabelSelector {
    #[serde(default)]
    match_labels: BTreeMap<String, String>,
    #[serde(default)]
    match_expressions: Vec<Expression>,
}

#[derive(Deserialize)]
struct Expression {
    key: String,
    operator: String,
    #[serde(default)]
    values: Vec<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct K8sRule {
    sources: Option<Vec<K8sSource>>,
    network_attributes: Option<NetworkAttributes>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct K8sSource {
    #[serde(rename = "type")]
    kind: Option<String>,
    spiffe: Option<String>,
    service_account: Option<K8sServiceAccount>,
}

#[derive(Deserialize)]
struct K8sServiceAccount {
    namespace: Option<String>,
    name: Option<String>,
}

#[derive(Deserialize)]
struct NetworkAttributes {
    #[serde(default)]
    ports: Vec<u32>,
}

/// What a policy's targets resolve to.
enum Target {
    Service(String),
    Namespace,
    Pods(LabelSelector),
}

/// Compiles every `AuthorizationPolicy` and namespace default among `objects`, with
/// `services` already compiled (for Service targets and endpoint addresses).
/// `None` when nothing is configured (no policy, no annotation, mesh-wide
/// `all-allowed`), so documents without authorization stay as they were.
pub fn compile(
    objects: &[Value],
    services: &[Service],
    mesh_default: DefaultPolicy,
) -> (Option<Authorization>, Vec<PolicyProblem>) {
    let mut problems = Vec::new();
    let mut namespaces = BTreeMap::new();
    let mut policies = Vec::new();
    let mut pods: Vec<PodRef> = Vec::new();
    let mut templates = Vec::new();
    let mut selectors: BTreeMap<(String, String), BTreeMap<String, String>> = BTreeMap::new();
    for o in objects {
        let kind = s(o, &["kind"]).unwrap_or_default();
        let api = s(o, &["apiVersion"]).unwrap_or_default();
        match kind {
            "Namespace" => {
                let name = s(o, &["metadata", "name"]).unwrap_or_default();
                let ann = labels(o, &["metadata", "annotations"]);
                if let Some(v) = ann.get(DEFAULT_INBOUND_POLICY) {
                    match v.parse::<DefaultPolicy>() {
                        Ok(d) => {
                            namespaces.insert(name.to_string(), d);
                        }
                        Err(e) => problems.push(PolicyProblem {
                            object: format!("Namespace {name}"),
                            reason: "Invalid",
                            message: format!("annotation {DEFAULT_INBOUND_POLICY}: {e}"),
                        }),
                    }
                }
            }
            "AuthorizationPolicy" if api.starts_with(&format!("{GROUP}/")) => policies.push(o),
            "Service" if api == "v1" => {
                let sel = labels(o, &["spec", "selector"]);
                if !sel.is_empty() {
                    let name = s(o, &["metadata", "name"]).unwrap_or_default().to_string();
                    selectors.insert((namespace_of(o), name), sel);
                }
            }
            "Pod" => {
                let ips: BTreeSet<IpAddr> = pod_ips(o);
                if !ips.is_empty() {
                    pods.push(PodRef {
                        namespace: namespace_of(o),
                        name: s(o, &["metadata", "name"]).map(str::to_string),
                        ips,
                        labels: Some(labels(o, &["metadata", "labels"])),
                    });
                }
            }
            "Deployment" | "StatefulSet" | "DaemonSet" | "ReplicaSet" | "Job" => {
                templates.push(Template {
                    namespace: namespace_of(o),
                    name: s(o, &["metadata", "name"]).unwrap_or_default(),
                    labels: labels(o, &["spec", "template", "metadata", "labels"]),
                });
            }
            _ => {}
        }
    }
    add_endpoint_pods(&mut pods, services, &templates);

    let mut compiled = Vec::new();
    let mut targeted: BTreeMap<usize, BTreeSet<String>> = BTreeMap::new();
    for o in policies {
        let namespace = namespace_of(o);
        let name = s(o, &["metadata", "name"]).unwrap_or_default().to_string();
        let object = format!("AuthorizationPolicy {namespace}/{name}");
        let problem = |reason, message: String| PolicyProblem {
            object: object.clone(),
            reason,
            message,
        };
        let result = policy(o, &namespace, &name).and_then(|(p, targets)| {
            let mut hit = BTreeSet::new();
            for (i, t) in targets.iter().enumerate() {
                let covered = resolve(t, &namespace, &pods, services, &selectors, &templates)
                    .map_err(|m| problem("TargetNotFound", format!("spec.targetRefs[{i}]: {m}")))?;
                hit.extend(covered);
            }
            Ok((p, hit))
        });
        match result {
            Ok((p, hit)) => {
                for i in hit {
                    targeted.entry(i).or_default().insert(p.id());
                }
                compiled.push(p);
            }
            Err(mut p) => {
                p.object = object.clone();
                problems.push(p);
            }
        }
    }
    if compiled.is_empty() && namespaces.is_empty() && mesh_default == DefaultPolicy::AllAllowed {
        return (None, problems);
    }
    compiled.sort_by_key(Policy::id);
    let mut workloads: Vec<Workload> = pods
        .iter()
        .enumerate()
        .map(|(i, p)| Workload {
            ips: p.ips.iter().copied().collect(),
            namespace: p.namespace.clone(),
            pod_name: p.name.clone(),
            policies: targeted
                .get(&i)
                .map(|s| s.iter().cloned().collect())
                .unwrap_or_default(),
        })
        .collect();
    workloads.sort_by(|a, b| a.ips.cmp(&b.ips));
    (
        Some(Authorization {
            default_policy: mesh_default,
            namespaces,
            policies: compiled,
            workloads,
        }),
        problems,
    )
}

fn pod_ips(o: &Value) -> BTreeSet<IpAddr> {
    let mut ips: BTreeSet<IpAddr> = o
        .get("status")
        .and_then(|st| st.get("podIPs"))
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(|ip| s(ip, &["ip"])?.parse().ok())
                .collect()
        })
        .unwrap_or_default();
    ips.extend(s(o, &["status", "podIP"]).and_then(|ip| ip.parse::<IpAddr>().ok()));
    ips
}

/// Endpoint addresses of Services that no Pod object covers become pods too, grouped
/// by pod name (both families of one pod), with the labels of the workload template
/// whose name prefixes the pod's name.
fn add_endpoint_pods(pods: &mut Vec<PodRef>, services: &[Service], templates: &[Template<'_>]) {
    let known: BTreeSet<IpAddr> = pods.iter().flat_map(|p| p.ips.iter().copied()).collect();
    let mut by_name: BTreeMap<(String, String), BTreeSet<IpAddr>> = BTreeMap::new();
    let mut nameless = Vec::new();
    for svc in services {
        for e in svc.endpoints.iter().filter(|e| !known.contains(&e.ip)) {
            match &e.pod_name {
                Some(n) => {
                    by_name
                        .entry((svc.namespace.clone(), n.clone()))
                        .or_default()
                        .insert(e.ip);
                }
                None => nameless.push((svc.namespace.clone(), e.ip)),
            }
        }
    }
    for ((namespace, name), ips) in by_name {
        // The longest matching workload name wins (`web-canary-0` is not `web`'s).
        let labels = templates
            .iter()
            .filter(|t| {
                t.namespace == namespace
                    && name
                        .strip_prefix(t.name)
                        .is_some_and(|rest| rest.starts_with('-'))
            })
            .max_by_key(|t| t.name.len())
            .map(|t| t.labels.clone());
        pods.push(PodRef {
            namespace,
            name: Some(name),
            ips,
            labels,
        });
    }
    let mut seen = BTreeSet::new();
    for (namespace, ip) in nameless {
        if seen.insert(ip) && !pods.iter().any(|p| p.ips.contains(&ip)) {
            pods.push(PodRef {
                namespace,
                name: None,
                ips: BTreeSet::from([ip]),
                labels: None,
            });
        }
    }
}

/// Checks a policy as the CRD's schema and CEL rules do, and compiles it.
fn policy(o: &Value, namespace: &str, name: &str) -> Result<(Policy, Vec<Target>), PolicyProblem> {
    let invalid = |message: String| PolicyProblem {
        object: String::new(),
        reason: "Invalid",
        message,
    };
    let spec: Spec = serde_json::from_value(o.get("spec").cloned().unwrap_or_default())
        .map_err(|e| invalid(format!("spec: {e}")))?;
    match spec.action.as_deref() {
        Some("ALLOW") => {}
        other => {
            return Err(invalid(format!(
                "spec.action: {other:?} is not supported; the only action is ALLOW"
            )))
        }
    }
    if spec.target_refs.is_empty() {
        return Err(invalid(
            "spec.targetRefs: at least one target is required (a Service, the Namespace, or Pods by selector)".into(),
        ));
    }
    let has_pod = spec
        .target_refs
        .iter()
        .any(|t| t.kind.as_deref() == Some("Pod"));
    if has_pod && spec.target_refs.len() > 1 {
        return Err(invalid(
            "spec.targetRefs: a Pod target must be the only target; write one policy per target"
                .into(),
        ));
    }
    let mut targets = Vec::new();
    for (i, t) in spec.target_refs.into_iter().enumerate() {
        let at = format!("spec.targetRefs[{i}]");
        if !matches!(t.group.as_deref(), None | Some("" | "core")) {
            return Err(invalid(format!(
                "{at}.group: {:?} is not supported; targets are core objects (group \"\")",
                t.group.unwrap_or_default()
            )));
        }
        if t.selector.is_some() && t.kind.as_deref() != Some("Pod") {
            return Err(invalid(format!(
                "{at}.selector: a selector may only be set when targeting Pods"
            )));
        }
        let named = t.name.filter(|n| !n.is_empty());
        targets.push(match t.kind.as_deref() {
            Some("Service") => Target::Service(
                named.ok_or_else(|| invalid(format!("{at}.name: a Service target needs a name")))?,
            ),
            Some("Namespace") => {
                if let Some(n) = named.filter(|n| n != namespace) {
                    return Err(invalid(format!(
                        "{at}.name: a policy may only target its own namespace; leave name empty (not {n:?})"
                    )));
                }
                Target::Namespace
            }
            Some("Pod") => {
                if named.is_some() {
                    return Err(invalid(format!(
                        "{at}.name: a Pod target selects by selector; leave name empty"
                    )));
                }
                let sel = t.selector.ok_or_else(|| {
                    invalid(format!(
                        "{at}.selector: a Pod target needs a selector ({{}} for every pod of the namespace)"
                    ))
                })?;
                for (k, e) in sel.match_expressions.iter().enumerate() {
                    let ok = match e.operator.as_str() {
                        "In" | "NotIn" => !e.values.is_empty(),
                        "Exists" | "DoesNotExist" => e.values.is_empty(),
                        _ => false,
                    };
                    if !ok {
                        return Err(invalid(format!(
                            "{at}.selector.matchExpressions[{k}]: operator {:?} with {} values; \
                             use In/NotIn with values or Exists/DoesNotExist without",
                            e.operator,
                            e.values.len()
                        )));
                    }
                }
                Target::Pods(sel)
            }
            other => {
                return Err(invalid(format!(
                    "{at}.kind: {other:?} is not supported; use Service, Namespace or Pod"
                )))
            }
        });
    }
    let mut rules = Vec::new();
    for (ri, r) in spec.rules.iter().enumerate() {
        let at = format!("spec.rules[{ri}]");
        let sources = match &r.sources {
            None => None,
            Some(list) => Some(
                list.iter()
                    .enumerate()
                    .map(|(si, src)| source(src, namespace, &format!("{at}.sources[{si}]")))
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(invalid)?,
            ),
        };
        let mut ports = Vec::new();
        for (pi, p) in r
            .network_attributes
            .iter()
            .flat_map(|n| &n.ports)
            .enumerate()
        {
            match u16::try_from(*p) {
                Ok(p) if p > 0 => ports.push(p),
                _ => {
                    return Err(invalid(format!(
                        "{at}.networkAttributes.ports[{pi}]: {p} is no port; use 1 to 65535"
                    )))
                }
            }
        }
        rules.push(Rule { sources, ports });
    }
    Ok((
        Policy {
            namespace: namespace.to_string(),
            name: name.to_string(),
            rules,
        },
        targets,
    ))
}

fn source(src: &K8sSource, namespace: &str, at: &str) -> Result<Source, String> {
    match (src.kind.as_deref(), &src.spiffe, &src.service_account) {
        (Some("SPIFFE"), Some(id), None) => {
            let rest = id.strip_prefix("spiffe://").unwrap_or_default();
            if rest.split('/').count() < 2 || rest.starts_with('/') {
                return Err(format!(
                    "{at}.spiffe: {id:?} must start with spiffe:// and include a / separating \
                     the trust domain from the workload identity"
                ));
            }
            Ok(Source::Spiffe(id.clone()))
        }
        (Some("ServiceAccount"), None, Some(sa)) => {
            let name = sa.name.clone().filter(|n| !n.is_empty()).ok_or_else(|| {
                format!("{at}.serviceAccount.name: required (a name, or * for every service account of the namespace)")
            })?;
            Ok(Source::ServiceAccount {
                namespace: sa
                    .namespace
                    .clone()
                    .filter(|n| !n.is_empty())
                    .unwrap_or_else(|| namespace.to_string()),
                name,
            })
        }
        (Some(t @ ("SPIFFE" | "ServiceAccount")), _, _) => Err(format!(
            "{at}: type {t} needs its own field ({}) and no other",
            if t == "SPIFFE" {
                "spiffe"
            } else {
                "serviceAccount"
            }
        )),
        (t, _, _) => Err(format!(
            "{at}.type: {t:?} is not supported; use ServiceAccount or SPIFFE"
        )),
    }
}

fn selects(sel: &LabelSelector, l: &BTreeMap<String, String>) -> bool {
    sel.match_labels.iter().all(|(k, v)| l.get(k) == Some(v))
        && sel
            .match_expressions
            .iter()
            .all(|e| match e.operator.as_str() {
                "In" => l.get(&e.key).is_some_and(|v| e.values.contains(v)),
                "NotIn" => l.get(&e.key).is_none_or(|v| !e.values.contains(v)),
                "Exists" => l.contains_key(&e.key),
                "DoesNotExist" => !l.contains_key(&e.key),
                _ => false,
            })
}

/// The pods (indexes into `pods`) a target covers; an error when it names nothing.
fn resolve(
    t: &Target,
    namespace: &str,
    pods: &[PodRef],
    services: &[Service],
    selectors: &BTreeMap<(String, String), BTreeMap<String, String>>,
    templates: &[Template<'_>],
) -> Result<BTreeSet<usize>, String> {
    let in_ns = |p: &&PodRef| p.namespace == namespace;
    Ok(match t {
        Target::Service(name) => {
            let svc = services
                .iter()
                .find(|s| s.namespace == namespace && s.name == *name)
                .ok_or_else(|| {
                    format!("Service {namespace}/{name} does not exist; target an existing Service of the policy's namespace")
                })?;
            let eps: BTreeSet<IpAddr> = svc.endpoints.iter().map(|e| e.ip).collect();
            // Its endpoints, and the Pods its selector picks (manifests without
            // EndpointSlices).
            let sel = selectors.get(&(namespace.to_string(), name.clone()));
            let picks = |p: &PodRef| {
                let (Some(sel), Some(l)) = (sel, &p.labels) else {
                    return false;
                };
                sel.iter().all(|(k, v)| l.get(k) == Some(v))
            };
            pods.iter()
                .enumerate()
                .filter(|(_, p)| in_ns(p) && (p.ips.iter().any(|ip| eps.contains(ip)) || picks(p)))
                .map(|(i, _)| i)
                .collect()
        }
        Target::Namespace => pods
            .iter()
            .enumerate()
            .filter(|(_, p)| in_ns(p))
            .map(|(i, _)| i)
            .collect(),
        Target::Pods(sel) => {
            let hit: BTreeSet<usize> = pods
                .iter()
                .enumerate()
                .filter(|(_, p)| in_ns(p) && p.labels.as_ref().is_some_and(|l| selects(sel, l)))
                .map(|(i, _)| i)
                .collect();
            let template = templates
                .iter()
                .any(|t| t.namespace == namespace && selects(sel, &t.labels));
            if hit.is_empty() && !template {
                return Err(format!(
                    "the selector picks no pod and no workload's pod template in {namespace}"
                ));
            }
            hit
        }
    })
}

#[cfg(test)]
mod tests;
