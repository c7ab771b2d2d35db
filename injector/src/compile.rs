//! The mesh config compiler from manifest files (`meshlet-injector compile --from-files`):
//! Services, the workloads behind them (for identities) and Gateway API HTTPRoutes and
//! GRPCRoutes ([`grpc`]) whose parentRef is a Service (GAMMA), into one [`MeshConfig`]
//! document.
//!
//! Where a GRPCRoute and an HTTPRoute attach to the same Service port, the GRPCRoute
//! wins and the HTTPRoute's parentRef is left out with `Conflicted` (GEP-1294, "Route
//! types": one route type per Service and port, GRPCRoute before HTTPRoute); a
//! parentRef without a port covers every port of the Service.
//!
//! An HTTPRoute that cannot be applied is left out with a problem that carries the
//! reason the Gateway API would put in its status (`BackendNotFound`, `UnsupportedValue`,
//! `InvalidKind`, `NoMatchingParent`, `RefNotPermitted`); every other route still applies, as a controller
//! would keep serving the valid routes.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    path::{Path, PathBuf},
};

use meshlet_api::{
    annotations as ann,
    config::{OutlierDetection, RetryConstraint, Service, ServicePort},
    route::{
        BackendRef, Filter, GrpcMethodMatch, HeaderModifier, HttpRoute, PathMatch, PathMatchType,
        PathModifier, RequestRedirect, Retry, RouteKind, RouteMatch, RouteRule, RouteTimeouts,
        UrlRewrite, ValueMatch,
    },
    MeshConfig, SpiffeId, DEFAULT_TRUST_DOMAIN, INJECT_LABEL,
};
use serde::Deserialize;
use serde_json::Value;

pub mod authz;
mod grpc;

/// Why the manifests could not be compiled at all.
#[derive(Debug, thiserror::Error)]
pub enum CompileError {
    /// A file or directory could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The path.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A file is not YAML.
    #[error("{path} is not valid YAML: {source}; fix the file or move it out of the directory")]
    Yaml {
        /// The file.
        path: PathBuf,
        /// Why.
        source: serde_yaml::Error,
    },
    /// The result breaks a rule of the mesh config (e.g. two Services on one ClusterIP).
    #[error("the compiled mesh config is invalid: {0}")]
    Invalid(#[from] meshlet_api::config::ConfigError),
}

/// A route (or policy) left out, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    /// The object's kind: `HTTPRoute`, `GRPCRoute` or `XBackendTrafficPolicy`.
    pub kind: &'static str,
    /// `namespace/name` of the object.
    pub route: String,
    /// The Gateway API status reason.
    pub reason: &'static str,
    /// What is wrong and what to do.
    pub message: String,
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} {} left out: {}: {}",
            self.kind, self.route, self.reason, self.message
        )
    }
}

/// A Service annotation with a value meshlet cannot use. It is refused for that
/// Service alone (its outlier detection keeps the defaults): one bad annotation must
/// not stop the cluster's whole mesh config from being compiled.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error(
    "Service {service}: annotation {name} has the invalid value {value:?}: {reason}; fix or \
     remove the annotation (the defaults apply until then)"
)]
pub struct BadServiceAnnotation {
    /// `namespace/name` of the Service.
    pub service: String,
    /// The annotation.
    pub name: &'static str,
    /// The value as written.
    pub value: String,
    /// What is wrong and what a valid value looks like.
    pub reason: String,
}

/// An HTTPRoute left out of one Service parent because a GRPCRoute attaches to the same
/// Service port (reason `Conflicted`); its other parents still apply.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Conflict {
    /// `namespace/name` of the HTTPRoute.
    pub route: String,
    /// `namespace/name` of the parent Service.
    pub service: String,
    /// The parentRef's port (`None`: every port).
    pub port: Option<u16>,
    /// `namespace/name` of the GRPCRoute that holds the port.
    pub by: String,
}

impl std::fmt::Display for Conflict {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "HTTPRoute {} left out of Service {}{}: Conflicted: {}",
            self.route,
            self.service,
            self.port.map(|p| format!(" port {p}")).unwrap_or_default(),
            self.message()
        )
    }
}

impl Conflict {
    /// What happened and what to do, for the route's status.
    pub fn message(&self) -> String {
        format!(
            "GRPCRoute {} attaches to the same Service port, and a GRPCRoute takes a port \
             before an HTTPRoute (GEP-1294); move one of them to another port with \
             parentRef.port, or route gRPC and HTTP with one kind",
            self.by
        )
    }
}

/// The compiled document and the routes left out.
#[derive(Debug)]
pub struct Compiled {
    /// The mesh config, validated.
    pub config: MeshConfig,
    /// Routes that were left out.
    pub problems: Vec<Problem>,
    /// Service annotations that were refused.
    pub bad_annotations: Vec<BadServiceAnnotation>,
    /// HTTPRoute parents left out for a GRPCRoute on the same Service port.
    pub conflicts: Vec<Conflict>,
    /// AuthorizationPolicies (and namespace defaults) that were left out.
    pub authz_problems: Vec<authz::PolicyProblem>,
}

/// Settings of a compile that the manifests do not carry.
#[derive(Clone, Debug, Default)]
pub struct Options {
    /// Mesh-wide default inbound policy (chart value `defaultInboundPolicy`).
    pub default_inbound_policy: meshlet_api::authz::DefaultPolicy,
}

/// Reads every `.yaml`, `.yml` and `.json` file of `dir` (sorted by name) and compiles it.
pub fn compile_dir(dir: &Path) -> Result<Compiled, CompileError> {
    compile_dir_with(dir, &Options::default())
}

/// [`compile_dir`] with [`Options`].
pub fn compile_dir_with(dir: &Path, opts: &Options) -> Result<Compiled, CompileError> {
    let read_err = |path: &Path| {
        let path = path.to_path_buf();
        move |source| CompileError::Read { path, source }
    };
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(read_err(dir))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            matches!(
                p.extension().and_then(|e| e.to_str()),
                Some("yaml" | "yml" | "json")
            )
        })
        .collect();
    files.sort();
    let mut objects = Vec::new();
    for f in &files {
        let text = std::fs::read_to_string(f).map_err(read_err(f))?;
        for doc in serde_yaml::Deserializer::from_str(&text) {
            let v = Value::deserialize(doc).map_err(|source| CompileError::Yaml {
                path: f.clone(),
                source,
            })?;
            flatten(v, &mut objects);
        }
    }
    compile_with(&objects, opts)
}

fn flatten(v: Value, out: &mut Vec<Value>) {
    match v {
        Value::Null => {}
        Value::Object(ref m) if m.get("kind").and_then(Value::as_str) == Some("List") => {
            if let Some(Value::Array(items)) = m.get("items") {
                for i in items.clone() {
                    flatten(i, out);
                }
            }
        }
        v => out.push(v),
    }
}

fn s<'a>(v: &'a Value, path: &[&str]) -> Option<&'a str> {
    path.iter().try_fold(v, |v, k| v.get(k))?.as_str()
}

fn labels(v: &Value, path: &[&str]) -> BTreeMap<String, String> {
    path.iter()
        .try_fold(v, |v, k| v.get(k))
        .and_then(|l| serde_json::from_value(l.clone()).ok())
        .unwrap_or_default()
}

fn namespace_of(v: &Value) -> String {
    s(v, &["metadata", "namespace"])
        .unwrap_or("default")
        .to_string()
}

/// A pod (or a workload's pod template): where it runs and who it is.
struct PodInfo {
    namespace: String,
    labels: BTreeMap<String, String>,
    service_account: String,
    inject: Option<bool>,
}

/// Compiles parsed Kubernetes objects.
pub fn compile(objects: &[Value]) -> Result<Compiled, CompileError> {
    compile_with(objects, &Options::default())
}

/// [`compile`] with [`Options`].
pub fn compile_with(objects: &[Value], opts: &Options) -> Result<Compiled, CompileError> {
    let mut injected_namespaces = BTreeSet::new();
    let mut pods = Vec::new();
    let mut services = Vec::new();
    let mut routes = Vec::new();
    let mut grants = Vec::new();
    let mut policies = Vec::new();
    for o in objects {
        let kind = s(o, &["kind"]).unwrap_or_default();
        let api = s(o, &["apiVersion"]).unwrap_or_default();
        let template: &[&str] = match kind {
            "Namespace" => {
                if labels(o, &["metadata", "labels"])
                    .get(INJECT_LABEL)
                    .map(String::as_str)
                    == Some("enabled")
                {
                    injected_namespaces.insert(s(o, &["metadata", "name"]).unwrap_or_default());
                }
                continue;
            }
            "Service" if api == "v1" => {
                services.push(o);
                continue;
            }
            "ReferenceGrant" if api.starts_with("gateway.networking.k8s.io/") => {
                grants.extend(grant(o));
                continue;
            }
            "HTTPRoute" | "GRPCRoute" if api.starts_with("gateway.networking.k8s.io/") => {
                routes.push(o);
                continue;
            }
            "XBackendTrafficPolicy" if api.starts_with("gateway.networking.x-k8s.io/") => {
                policies.push(o);
                continue;
            }
            "Pod" => &[],
            "Deployment" | "StatefulSet" | "DaemonSet" | "ReplicaSet" | "Job" => {
                &["spec", "template"]
            }
            "CronJob" => &["spec", "jobTemplate", "spec", "template"],
            _ => continue,
        };
        let Some(pod) = template.iter().try_fold(o, |v, k| v.get(k)) else {
            continue;
        };
        let pod_labels = labels(pod, &["metadata", "labels"]);
        pods.push(PodInfo {
            namespace: namespace_of(o),
            inject: pod_labels.get(INJECT_LABEL).map(|v| v == "enabled"),
            labels: pod_labels,
            service_account: s(pod, &["spec", "serviceAccountName"])
                .or(s(pod, &["spec", "serviceAccount"]))
                .unwrap_or("default")
                .to_string(),
        });
    }

    let mut bad_annotations = Vec::new();
    let mut out: Vec<Service> = services
        .iter()
        .map(|o| service(o, &pods, &injected_namespaces, &mut bad_annotations))
        .collect();
    out.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));

    let mut problems = Vec::new();
    for o in policies {
        if let Err(p) = traffic_policy(o, &mut out) {
            problems.push(p);
        }
    }
    let mut parsed: Vec<(HttpRoute, Parents)> = Vec::new();
    for o in routes {
        match route(o, &out, &grants) {
            Ok(r) => parsed.push(r),
            Err(p) => problems.push(p),
        }
    }
    let conflicts = conflicts(&parsed);
    for (r, parents) in parsed {
        for (ns, name, port) in parents {
            let id = r.id();
            let service = format!("{ns}/{name}");
            if conflicts
                .iter()
                .any(|c| c.route == id && c.service == service && c.port == port)
                && r.kind == RouteKind::Http
            {
                continue;
            }
            if let Some(svc) = out.iter_mut().find(|s| s.namespace == ns && s.name == name) {
                svc.routes.push(HttpRoute { port, ..r.clone() });
            }
        }
    }
    for svc in &mut out {
        svc.routes.sort_by(|a, b| {
            (&a.namespace, &a.name, a.kind, a.port).cmp(&(&b.namespace, &b.name, b.kind, b.port))
        });
    }
    let (authorization, authz_problems) =
        authz::compile(objects, &out, opts.default_inbound_policy);
    let config = MeshConfig {
        generation: 1,
        services: out,
        authorization,
        ..MeshConfig::default()
    };
    config.validate()?;
    Ok(Compiled {
        config,
        problems,
        bad_annotations,
        conflicts,
        authz_problems,
    })
}

/// The HTTPRoute parents that share a Service port with a GRPCRoute.
fn conflicts(parsed: &[(HttpRoute, Parents)]) -> Vec<Conflict> {
    let overlap = |a: Option<u16>, b: Option<u16>| a.is_none() || b.is_none() || a == b;
    let mut out = Vec::new();
    for (r, parents) in parsed.iter().filter(|(r, _)| r.kind == RouteKind::Http) {
        for (ns, name, port) in parents {
            let by = parsed.iter().find(|(g, gp)| {
                g.kind == RouteKind::Grpc
                    && gp.iter().any(|(gns, gname, gport)| {
                        gns == ns && gname == name && overlap(*port, *gport)
                    })
            });
            if let Some((g, _)) = by {
                out.push(Conflict {
                    route: r.id(),
                    service: format!("{ns}/{name}"),
                    port: *port,
                    by: g.id(),
                });
            }
        }
    }
    out
}

fn service(
    o: &Value,
    pods: &[PodInfo],
    injected: &BTreeSet<&str>,
    bad: &mut Vec<BadServiceAnnotation>,
) -> Service {
    let namespace = namespace_of(o);
    let name = s(o, &["metadata", "name"]).unwrap_or_default().to_string();
    let outlier_detection = outlier_detection(
        &labels(o, &["metadata", "annotations"]),
        &format!("{namespace}/{name}"),
    )
    .unwrap_or_else(|e| {
        bad.push(e);
        None
    });
    let spec = o.get("spec").cloned().unwrap_or_default();
    let mut cluster_ips: Vec<IpAddr> = spec
        .get("clusterIPs")
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(|ip| ip.as_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default();
    if cluster_ips.is_empty() {
        // "None" (headless) and unset do not parse, which is what we want.
        cluster_ips.extend(s(&spec, &["clusterIP"]).and_then(|ip| ip.parse::<IpAddr>().ok()));
    }
    let ports = spec
        .get("ports")
        .and_then(Value::as_array)
        .map(|ps| {
            ps.iter()
                .filter_map(|p| {
                    Some(ServicePort {
                        port: u16::try_from(p.get("port")?.as_u64()?).ok()?,
                        name: s(p, &["name"]).map(str::to_string),
                        app_protocol: s(p, &["appProtocol"]).map(str::to_string),
                    })
                })
                .collect()
        })
        .unwrap_or_default();
    let selector = labels(&spec, &["selector"]);
    let mut identities = BTreeSet::new();
    if !selector.is_empty() {
        for p in pods.iter().filter(|p| {
            p.namespace == namespace && selector.iter().all(|(k, v)| p.labels.get(k) == Some(v))
        }) {
            let meshed = p
                .inject
                .unwrap_or_else(|| injected.contains(p.namespace.as_str()));
            if meshed {
                let id = format!(
                    "spiffe://{DEFAULT_TRUST_DOMAIN}/ns/{}/sa/{}",
                    p.namespace, p.service_account
                );
                identities.extend(id.parse::<SpiffeId>().ok());
            }
        }
    }
    Service {
        name,
        namespace,
        cluster_ips,
        ports,
        meshed: !identities.is_empty(),
        identities: identities.into_iter().collect(),
        endpoints: Vec::new(),
        routes: Vec::new(),
        retry_constraint: None,
        outlier_detection,
    }
}

/// The Service's `meshlet.io/outlier-*` annotations; `None` when it has none (the
/// proxy's defaults apply). Unset ones keep their default.
fn outlier_detection(
    annotations: &BTreeMap<String, String>,
    service: &str,
) -> Result<Option<OutlierDetection>, BadServiceAnnotation> {
    if !ann::SERVICE_ANNOTATIONS
        .iter()
        .any(|a| annotations.contains_key(*a))
    {
        return Ok(None);
    }
    let bad = |name: &'static str, reason: String| BadServiceAnnotation {
        service: service.to_string(),
        name,
        value: annotations.get(name).cloned().unwrap_or_default(),
        reason,
    };
    let mut od = OutlierDetection::default();
    if let Some(v) = annotations.get(ann::OUTLIER_CONSECUTIVE_FAILURES) {
        let v = v.trim();
        od.consecutive_failures = v
            .bytes()
            .all(|b| b.is_ascii_digit())
            .then(|| v.parse().ok())
            .flatten()
            .ok_or_else(|| {
                bad(
                    ann::OUTLIER_CONSECUTIVE_FAILURES,
                    "write a whole number of failures such as 5 (0 turns ejection off)".into(),
                )
            })?;
    }
    for (name, field) in [
        (ann::OUTLIER_BASE_EJECTION, &mut od.base_ejection),
        (ann::OUTLIER_MAX_EJECTION, &mut od.max_ejection),
    ] {
        if let Some(v) = annotations.get(name) {
            *field = v.trim().parse().map_err(|e| bad(name, format!("{e}")))?;
        }
    }
    if od.base_ejection.is_zero() {
        return Err(bad(
            ann::OUTLIER_BASE_EJECTION,
            "an ejection must last more than zero; write a duration such as 1s".into(),
        ));
    }
    if od.max_ejection < od.base_ejection {
        // Name the annotation that was written; with both, the maximum.
        let name = if annotations.contains_key(ann::OUTLIER_MAX_EJECTION) {
            ann::OUTLIER_MAX_EJECTION
        } else {
            ann::OUTLIER_BASE_EJECTION
        };
        return Err(bad(
            name,
            format!(
                "the longest ejection ({}) is shorter than the first ({}); make \
                 {} at least {}",
                od.max_ejection,
                od.base_ejection,
                ann::OUTLIER_MAX_EJECTION,
                od.base_ejection
            ),
        ));
    }
    Ok(Some(od))
}

// The HTTPRoute subset meshlet reads; unknown fields are ignored as the API server's
// pruning would, unknown enum values are refused below.

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct K8sRoute {
    #[serde(default)]
    parent_refs: Vec<K8sParentRef>,
    #[serde(default)]
    rules: Vec<K8sRule>,
}

#[derive(Deserialize)]
struct K8sParentRef {
    group: Option<String>,
    kind: Option<String>,
    name: String,
    namespace: Option<String>,
    port: Option<u16>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct K8sRule {
    name: Option<String>,
    #[serde(default)]
    matches: Vec<K8sMatch>,
    #[serde(default)]
    filters: Vec<K8sFilter>,
    #[serde(default)]
    backend_refs: Vec<K8sBackendRef>,
    timeouts: Option<RouteTimeouts>,
    retry: Option<Retry>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct K8sMatch {
    path: Option<K8sPath>,
    #[serde(default)]
    headers: Vec<ValueMatch>,
    #[serde(default)]
    query_params: Vec<ValueMatch>,
    method: Option<String>,
    /// Only in the HTTPRoute shape of a GRPCRoute ([`grpc::http_spec`]).
    grpc_method: Option<GrpcMethodMatch>,
}

#[derive(Deserialize)]
struct K8sPath {
    #[serde(rename = "type")]
    kind: Option<PathMatchType>,
    value: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct K8sFilter {
    #[serde(rename = "type")]
    kind: String,
    request_header_modifier: Option<HeaderModifier>,
    response_header_modifier: Option<HeaderModifier>,
    #[serde(rename = "urlRewrite")]
    url_rewrite: Option<K8sUrlRewrite>,
    request_redirect: Option<K8sRedirect>,
}

#[derive(Deserialize)]
struct K8sUrlRewrite {
    hostname: Option<String>,
    path: Option<K8sPathModifier>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct K8sRedirect {
    scheme: Option<String>,
    hostname: Option<String>,
    path: Option<K8sPathModifier>,
    port: Option<u16>,
    status_code: Option<u16>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct K8sPathModifier {
    #[serde(rename = "type")]
    kind: String,
    replace_full_path: Option<String>,
    replace_prefix_match: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct K8sBackendRef {
    group: Option<String>,
    kind: Option<String>,
    name: String,
    namespace: Option<String>,
    port: Option<u16>,
    weight: Option<u32>,
    #[serde(default)]
    filters: Vec<K8sFilter>,
}

/// A ReferenceGrant entry that lets routes of one namespace use Services of another.
struct Grant {
    /// `HTTPRoute` or `GRPCRoute`.
    from_kind: String,
    from_namespace: String,
    to_namespace: String,
    /// `None`: every Service of `to_namespace`.
    to_name: Option<String>,
}

/// Applies an `XBackendTrafficPolicy`'s `retryConstraint` (GEP-3388) to the Services its
/// `targetRefs` name in its namespace. The first policy that targets a Service wins, as
/// the oldest would in a cluster (files are read in name order); a later one is left out
/// for that Service with `Conflicted`.
fn traffic_policy(o: &Value, services: &mut [Service]) -> Result<(), Problem> {
    let namespace = namespace_of(o);
    let id = format!(
        "{namespace}/{}",
        s(o, &["metadata", "name"]).unwrap_or_default()
    );
    let problem = |reason, message: String| Problem {
        kind: "XBackendTrafficPolicy",
        route: id.clone(),
        reason,
        message,
    };
    let Some(rc) = o.get("spec").and_then(|s| s.get("retryConstraint")) else {
        // Other settings (session persistence) are not the proxy's business yet.
        return Ok(());
    };
    let rc: RetryConstraint = serde_json::from_value(rc.clone())
        .map_err(|e| problem("Invalid", format!("spec.retryConstraint: {e}")))?;
    rc.validate(&id)
        .map_err(|e| problem("Invalid", e.to_string()))?;
    let targets = o
        .get("spec")
        .and_then(|s| s.get("targetRefs"))
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    if targets.is_empty() {
        return Err(problem(
            "Invalid",
            "spec.targetRefs is empty; name a Service".into(),
        ));
    }
    for t in &targets {
        let group = t.get("group").and_then(Value::as_str).unwrap_or_default();
        let kind = t.get("kind").and_then(Value::as_str).unwrap_or_default();
        let name = t.get("name").and_then(Value::as_str).unwrap_or_default();
        if !group.is_empty() || kind != "Service" {
            return Err(problem(
                "InvalidKind",
                format!("targetRef {group}/{kind} {name} is not a core Service"),
            ));
        }
        let Some(svc) = services
            .iter_mut()
            .find(|s| s.namespace == namespace && s.name == name)
        else {
            return Err(problem(
                "TargetNotFound",
                format!("targetRef Service {namespace}/{name} does not exist"),
            ));
        };
        if svc.retry_constraint.is_some() {
            return Err(problem(
                "Conflicted",
                format!(
                    "Service {namespace}/{name} already has a retryConstraint from another policy"
                ),
            ));
        }
        svc.retry_constraint = Some(rc.clone());
    }
    Ok(())
}

/// The (from, to) pairs of a ReferenceGrant that concern routes and Services.
fn grant(o: &Value) -> Vec<Grant> {
    let to_namespace = namespace_of(o);
    let list = |k: &str| {
        o.get("spec")
            .and_then(|s| s.get(k))
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default()
    };
    let mut out = Vec::new();
    for from in list("from") {
        let route_kind = s(&from, &["kind"]).filter(|k| matches!(*k, "HTTPRoute" | "GRPCRoute"));
        let (Some(from_kind), Some(from_ns)) = (
            route_kind.filter(|_| s(&from, &["group"]) == Some("gateway.networking.k8s.io")),
            s(&from, &["namespace"]),
        ) else {
            continue;
        };
        for to in list("to") {
            if matches!(s(&to, &["group"]), Some("" | "core"))
                && s(&to, &["kind"]) == Some("Service")
            {
                out.push(Grant {
                    from_kind: from_kind.to_string(),
                    from_namespace: from_ns.to_string(),
                    to_namespace: to_namespace.clone(),
                    to_name: s(&to, &["name"]).map(str::to_string),
                });
            }
        }
    }
    out
}

/// The Services (namespace, name, parentRef port) a route attaches to.
type Parents = Vec<(String, String, Option<u16>)>;

fn is_core_service(group: &Option<String>, kind: &Option<String>) -> bool {
    matches!(group.as_deref(), None | Some("" | "core"))
        && matches!(kind.as_deref(), None | Some("Service"))
}

/// One HTTPRoute or GRPCRoute, compiled, with the Services it attaches to.
fn route(
    o: &Value,
    services: &[Service],
    grants: &[Grant],
) -> Result<(HttpRoute, Parents), Problem> {
    let namespace = namespace_of(o);
    let name = s(o, &["metadata", "name"]).unwrap_or_default().to_string();
    let id = format!("{namespace}/{name}");
    let kind = match s(o, &["kind"]) {
        Some("GRPCRoute") => RouteKind::Grpc,
        _ => RouteKind::Http,
    };
    let problem = |reason, message: String| Problem {
        kind: kind.as_str(),
        route: id.clone(),
        reason,
        message,
    };
    let mut spec = o.get("spec").cloned().unwrap_or_default();
    if kind == RouteKind::Grpc {
        spec = grpc::http_spec(&spec).map_err(|m| problem("UnsupportedValue", m))?;
    }
    let spec: K8sRoute = serde_json::from_value(spec)
        .map_err(|e| problem("UnsupportedValue", format!("spec: {e}")))?;
    let find = |ns: &str, n: &str| services.iter().find(|s| s.namespace == ns && s.name == n);

    let mut parents = Vec::new();
    for p in &spec.parent_refs {
        // Gateway parents are not the mesh's business; skip them quietly.
        if !matches!(p.kind.as_deref(), Some("Service")) || !is_core_service(&p.group, &p.kind) {
            continue;
        }
        let ns = p.namespace.clone().unwrap_or_else(|| namespace.clone());
        let Some(svc) = find(&ns, &p.name) else {
            return Err(problem(
                "NoMatchingParent",
                format!("parentRef Service {ns}/{} does not exist", p.name),
            ));
        };
        if let Some(port) = p
            .port
            .filter(|port| !svc.ports.iter().any(|sp| sp.port == *port))
        {
            return Err(problem(
                "NoMatchingParent",
                format!("parentRef Service {ns}/{} has no port {port}", p.name),
            ));
        }
        parents.push((ns, p.name.clone(), p.port));
    }
    // Without a Service parent (a Gateway's route) it attaches to nothing here.

    let mut rules = Vec::new();
    for (ri, r) in spec.rules.iter().enumerate() {
        let at = format!("rules[{ri}]");
        let rule_filters = filters(&r.filters, &format!("{at}.filters"))
            .map_err(|m| problem("UnsupportedValue", m))?;
        let mut backend_refs = Vec::new();
        for (bi, b) in r.backend_refs.iter().enumerate() {
            let bat = format!("{at}.backendRefs[{bi}]");
            if !is_core_service(&b.group, &b.kind) {
                return Err(problem(
                    "InvalidKind",
                    format!("{bat}: only Service backends are supported"),
                ));
            }
            let ns = b.namespace.clone().unwrap_or_else(|| namespace.clone());
            let granted = |g: &Grant| {
                g.from_kind == kind.as_str()
                    && g.to_namespace == ns
                    && g.from_namespace == namespace
                    && g.to_name.as_ref().is_none_or(|n| *n == b.name)
            };
            // A consumer route may send to the very Service it attaches to: it only
            // changes how its own namespace reaches that Service, which it could reach
            // anyway (the mesh conformance suite's MeshConsumerRoute has no grant).
            let own_parent = parents
                .iter()
                .any(|(pn, pname, _)| *pn == ns && *pname == b.name);
            if ns != namespace && !own_parent && !grants.iter().any(granted) {
                return Err(problem(
                    "RefNotPermitted",
                    format!(
                        "{bat}: Service {ns}/{} is in another namespace and no ReferenceGrant \
                         in {ns} allows {kind}s from {namespace}; add one",
                        b.name
                    ),
                ));
            }
            let Some(svc) = find(&ns, &b.name) else {
                return Err(problem(
                    "BackendNotFound",
                    format!("{bat}: Service {ns}/{} does not exist", b.name),
                ));
            };
            let Some(port) = b.port else {
                return Err(problem(
                    "UnsupportedValue",
                    format!("{bat}: port is required for a Service backend"),
                ));
            };
            if !svc.ports.iter().any(|p| p.port == port) {
                return Err(problem(
                    "BackendNotFound",
                    format!("{bat}: Service {ns}/{} has no port {port}", b.name),
                ));
            }
            backend_refs.push(BackendRef {
                name: b.name.clone(),
                namespace: ns,
                port,
                weight: b.weight.unwrap_or(1),
                filters: filters(&b.filters, &format!("{bat}.filters"))
                    .map_err(|m| problem("UnsupportedValue", m))?,
            });
        }
        let matches = if r.matches.is_empty() {
            vec![RouteMatch {
                path: Some(prefix_slash()),
                ..RouteMatch::default()
            }]
        } else {
            r.matches
                .iter()
                .map(|m| RouteMatch {
                    path: Some(match &m.path {
                        None => prefix_slash(),
                        Some(p) => PathMatch {
                            kind: p.kind.unwrap_or(PathMatchType::PathPrefix),
                            value: p.value.clone().unwrap_or_else(|| "/".into()),
                        },
                    }),
                    headers: m.headers.clone(),
                    query_params: m.query_params.clone(),
                    method: m.method.clone(),
                    grpc_method: m.grpc_method.clone(),
                })
                .collect()
        };
        rules.push(RouteRule {
            name: r.name.clone(),
            matches,
            filters: rule_filters,
            backend_refs,
            timeouts: r.timeouts.clone(),
            retry: r.retry.clone(),
        });
    }
    let compiled = HttpRoute {
        kind,
        name,
        namespace: namespace.clone(),
        creation_timestamp: s(o, &["metadata", "creationTimestamp"]).map(str::to_string),
        port: None,
        rules,
    };
    compiled
        .validate()
        .map_err(|e| problem("UnsupportedValue", format!("{}: {}", e.field, e.reason)))?;
    Ok((compiled, parents))
}

fn prefix_slash() -> PathMatch {
    PathMatch {
        kind: PathMatchType::PathPrefix,
        value: "/".into(),
    }
}

fn filters(fs: &[K8sFilter], at: &str) -> Result<Vec<Filter>, String> {
    let missing =
        |i: usize, field: &str| format!("{at}[{i}]: type {field} needs its {field} field");
    fs.iter()
        .enumerate()
        .map(|(i, f)| {
            Ok(match f.kind.as_str() {
                "RequestHeaderModifier" => Filter::RequestHeaderModifier(
                    f.request_header_modifier
                        .clone()
                        .ok_or_else(|| missing(i, "requestHeaderModifier"))?,
                ),
                "ResponseHeaderModifier" => Filter::ResponseHeaderModifier(
                    f.response_header_modifier
                        .clone()
                        .ok_or_else(|| missing(i, "responseHeaderModifier"))?,
                ),
                "URLRewrite" => {
                    let u = f.url_rewrite.as_ref().ok_or_else(|| missing(i, "urlRewrite"))?;
                    Filter::UrlRewrite(UrlRewrite {
                        hostname: u.hostname.clone(),
                        path: u
                            .path
                            .as_ref()
                            .map(|p| path_modifier(p, &format!("{at}[{i}].urlRewrite.path")))
                            .transpose()?,
                    })
                }
                "RequestRedirect" => {
                    let r = f
                        .request_redirect
                        .as_ref()
                        .ok_or_else(|| missing(i, "requestRedirect"))?;
                    Filter::RequestRedirect(RequestRedirect {
                        scheme: r.scheme.clone(),
                        hostname: r.hostname.clone(),
                        path: r
                            .path
                            .as_ref()
                            .map(|p| path_modifier(p, &format!("{at}[{i}].requestRedirect.path")))
                            .transpose()?,
                        port: r.port,
                        status_code: r.status_code.unwrap_or(302),
                    })
                }
                other => {
                    return Err(format!(
                        "{at}[{i}]: filter type {other} is not supported by meshlet; use \
                         RequestHeaderModifier, ResponseHeaderModifier, URLRewrite or RequestRedirect"
                    ))
                }
            })
        })
        .collect()
}

fn path_modifier(p: &K8sPathModifier, at: &str) -> Result<PathModifier, String> {
    match (
        p.kind.as_str(),
        &p.replace_full_path,
        &p.replace_prefix_match,
    ) {
        ("ReplaceFullPath", Some(v), _) => Ok(PathModifier::ReplaceFullPath(v.clone())),
        ("ReplacePrefixMatch", _, Some(v)) => Ok(PathModifier::ReplacePrefixMatch(v.clone())),
        (k, _, _) => Err(format!(
            "{at}: type {k:?} needs replaceFullPath or replacePrefixMatch to match it"
        )),
    }
}
