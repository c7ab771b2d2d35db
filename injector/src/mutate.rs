//! The pure core of injection: from a pod (and the defaults) to the JSON Patch that
//! meshes it, or the reason it is skipped or refused. No I/O happens here, so the webhook
//! and the offline `inject` command share this one code path, and tests need no server.

use std::collections::BTreeMap;

use json_patch::{jsonptr::PointerBuf, AddOperation, PatchOperation, ReplaceOperation};
use k8s_openapi::api::core::v1::{Container, Pod, PodSpec};
use meshlet_api::{annotations as ann, ports, PROXY_CONTAINER_NAME, PROXY_GID, PROXY_UID};
use serde_json::Value;

use crate::{
    config::Defaults,
    validate::{self, BadAnnotation},
};

mod probes;
mod template;

pub use meshlet_api::probes::{AppProbe, AppProbes};
pub use template::{TOKEN_MOUNT_PATH, TOKEN_VOLUME};

/// Annotations added so Prometheus scrapes the proxy's admin port.
pub const PROMETHEUS_SCRAPE: &str = "prometheus.io/scrape";
/// Scrape port annotation.
pub const PROMETHEUS_PORT: &str = "prometheus.io/port";
/// Scrape path annotation.
pub const PROMETHEUS_PATH: &str = "prometheus.io/path";

/// The container `kubectl logs/exec/attach` use when none is named.
pub const DEFAULT_CONTAINER: &str = "kubectl.kubernetes.io/default-container";

/// Where the pod is being admitted; the namespace comes from the admission request
/// because a pod being created often has none in its own metadata.
#[derive(Clone, Debug, Default)]
pub struct Context {
    /// Namespace of the request (or of the manifest, offline).
    pub namespace: Option<String>,
}

/// What the injector decided for one pod.
#[derive(Clone, Debug, PartialEq)]
pub enum Outcome {
    /// Mesh the pod with these operations (applied in order).
    Inject(Vec<PatchOperation>),
    /// Leave the pod alone.
    Skip(SkipReason),
}

/// Why a pod is left alone.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SkipReason {
    /// `hostNetwork: true`: redirecting the node's traffic would break the node.
    HostNetwork,
    /// The pod carries `meshlet.io/inject=disabled`.
    OptedOut,
    /// The pod already has `meshlet.io/status` or a `meshlet-proxy` container.
    AlreadyInjected,
    /// The pod is in `kube-system` or `meshlet-system`.
    SystemNamespace,
}

impl std::fmt::Display for SkipReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::HostNetwork => "hostNetwork pod",
            Self::OptedOut => "pod label meshlet.io/inject=disabled",
            Self::AlreadyInjected => "already injected",
            Self::SystemNamespace => "system namespace",
        })
    }
}

/// Why a pod is refused; the message goes back to the user who created it.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Denied {
    /// A `meshlet.io/*` annotation with a bad value.
    #[error(transparent)]
    BadAnnotation(#[from] BadAnnotation),
    /// An app container declares a port the sidecar binds.
    #[error(
        "container {container:?} uses port {port}, which the meshlet sidecar reserves \
         (15001, 15006, 15020); move the container to another port or set the pod label meshlet.io/inject=disabled"
    )]
    ReservedPort {
        /// Container name.
        container: String,
        /// The reserved port.
        port: i32,
    },
    /// An app container runs as the proxy's UID or GID, so its traffic would bypass the mesh.
    #[error(
        "container {container:?} runs as {what} 1337, which is reserved for the meshlet proxy \
         (its traffic is never redirected); run it as another {what} or set the pod label meshlet.io/inject=disabled"
    )]
    ProxyIdentity {
        /// Container name.
        container: String,
        /// `UID` or `GID`.
        what: &'static str,
    },
    /// A request above its limit, both set by annotations.
    #[error(
        "annotation {request} ({request_value}) is greater than {limit} ({limit_value}); \
         a request may not exceed its limit"
    )]
    RequestAboveLimit {
        /// Request annotation name.
        request: &'static str,
        /// Its value.
        request_value: String,
        /// Limit annotation name.
        limit: &'static str,
        /// Its value.
        limit_value: String,
    },
    /// The object has no `spec`.
    #[error("the pod has no spec; send a complete Pod object")]
    NoSpec,
}

/// Decides whether and how to mesh `pod`.
pub fn mutate(pod: &Pod, ctx: &Context, defaults: &Defaults) -> Result<Outcome, Denied> {
    // The webhook's namespaceSelector already leaves these out; this guard keeps a
    // mislabelled namespace from making the injector inject itself (whose pods could
    // then never start while the webhook is down) or break cluster components.
    let namespace = ctx
        .namespace
        .as_deref()
        .or(pod.metadata.namespace.as_deref());
    if matches!(
        namespace,
        Some("kube-system" | meshlet_api::CONTROL_PLANE_NAMESPACE)
    ) {
        return Ok(Outcome::Skip(SkipReason::SystemNamespace));
    }
    let Some(spec) = pod.spec.as_ref() else {
        return Err(Denied::NoSpec);
    };
    if spec.host_network == Some(true) {
        return Ok(Outcome::Skip(SkipReason::HostNetwork));
    }
    let labels = pod.metadata.labels.as_ref();
    if labels
        .and_then(|l| l.get(meshlet_api::INJECT_LABEL))
        .map(String::as_str)
        == Some("disabled")
    {
        return Ok(Outcome::Skip(SkipReason::OptedOut));
    }
    let empty = BTreeMap::new();
    let annotations = pod.metadata.annotations.as_ref().unwrap_or(&empty);
    if annotations.contains_key(ann::STATUS)
        || all_containers(spec).any(|c| c.name == PROXY_CONTAINER_NAME)
    {
        return Ok(Outcome::Skip(SkipReason::AlreadyInjected));
    }

    let overrides = validate::overrides(annotations)?;
    check_app_containers(spec)?;
    let mut settings = template::Settings::new(&overrides, defaults)?;
    // The proxy must finish draining before kubelet's SIGKILL at the end of the grace
    // period (30 s when unset, which is the proxy's own default too).
    settings.drain_timeout = spec
        .termination_grace_period_seconds
        .and_then(|s| u64::try_from(s).ok())
        .map(|s| meshlet_api::Duration::from_secs(s).to_string());

    let mut ops = Vec::new();

    // Probes first: they address app containers by index, which the classic-sidecar
    // insertion at /spec/containers/0 would shift.
    let rewritten = probes::rewrite(spec);
    for r in &rewritten.replacements {
        ops.push(replace(
            &[
                "spec",
                "containers",
                &r.container_index.to_string(),
                r.field,
            ],
            r.value.clone(),
        ));
    }

    let mut new_annotations = BTreeMap::new();
    let init = template::init_container(&settings);
    let proxy = template::proxy_container(&settings, &rewritten.app_probes);
    let (init_names, container_names) = if settings.native_sidecar {
        (vec![init.name.clone(), proxy.name.clone()], vec![])
    } else {
        (vec![init.name.clone()], vec![proxy.name.clone()])
    };
    let status = serde_json::json!({
        "version": meshlet_api::VERSION,
        "initContainers": init_names,
        "containers": container_names,
        "volumes": [TOKEN_VOLUME],
        "nativeSidecar": settings.native_sidecar,
    });
    new_annotations.insert(ann::STATUS.to_string(), status.to_string());
    if !rewritten.originals.is_empty() {
        new_annotations.insert(
            ann::ORIGINAL_PROBES.to_string(),
            Value::Object(rewritten.originals.clone()).to_string(),
        );
    }
    // The app's own scrape settings win: overwriting them would silently stop the
    // scraping of its metrics. The proxy's metrics stay reachable on :15020/metrics.
    if !annotations.keys().any(|k| k.starts_with("prometheus.io/")) {
        new_annotations.insert(PROMETHEUS_SCRAPE.to_string(), "true".to_string());
        new_annotations.insert(PROMETHEUS_PORT.to_string(), ports::ADMIN.to_string());
        new_annotations.insert(PROMETHEUS_PATH.to_string(), "/metrics".to_string());
    }
    // A classic proxy becomes containers[0], which `kubectl logs/exec` would pick by
    // default; point them back at the app.
    if !settings.native_sidecar && !annotations.contains_key(DEFAULT_CONTAINER) {
        if let Some(app) = spec.containers.first() {
            new_annotations.insert(DEFAULT_CONTAINER.to_string(), app.name.clone());
        }
    }
    if pod.metadata.annotations.is_none() {
        ops.push(add(
            &["metadata", "annotations"],
            to_value(&new_annotations),
        ));
    } else {
        for (k, v) in new_annotations {
            ops.push(add(&["metadata", "annotations", &k], Value::String(v)));
        }
    }

    let volume = to_value(&template::token_volume());
    if spec.volumes.is_none() {
        ops.push(add(&["spec", "volumes"], Value::Array(vec![volume])));
    } else {
        ops.push(add(&["spec", "volumes", "-"], volume));
    }

    let mut inits = vec![to_value(&init)];
    if settings.native_sidecar {
        inits.push(to_value(&proxy));
    }
    if spec.init_containers.is_none() {
        ops.push(add(&["spec", "initContainers"], Value::Array(inits)));
    } else {
        // meshlet-init must run before the app's own init containers, so their traffic
        // is already captured, and the native proxy right after, so it serves them.
        for (i, c) in inits.into_iter().enumerate() {
            ops.push(add(&["spec", "initContainers", &i.to_string()], c));
        }
    }
    if !settings.native_sidecar {
        ops.push(add(&["spec", "containers", "0"], to_value(&proxy)));
    }
    Ok(Outcome::Inject(ops))
}

/// Things about an injected pod the user should know, returned as admission warnings
/// (and printed by `inject`): the injection succeeds, but something will not work.
pub fn warnings(pod: &Pod, defaults: &Defaults) -> Vec<String> {
    let mut out = Vec::new();
    let Some(spec) = pod.spec.as_ref() else {
        return out;
    };
    let native = pod
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(ann::NATIVE_SIDECAR))
        .map(|v| v.trim() == "true")
        .unwrap_or(defaults.native_sidecar);
    let app_inits: Vec<&str> = spec
        .init_containers
        .iter()
        .flatten()
        .map(|c| c.name.as_str())
        .collect();
    if !native && !app_inits.is_empty() {
        // Their traffic is already redirected by meshlet-init but no proxy runs yet.
        out.push(format!(
            "meshlet: init containers {app_inits:?} run before the classic (non-native) proxy \
             starts, so their TCP connections will fail; use meshlet.io/native-sidecar: \"true\" \
             or exclude their ports with meshlet.io/exclude-outbound-ports"
        ));
    }
    out
}

/// Refuses app containers the sidecar cannot coexist with.
fn check_app_containers(spec: &PodSpec) -> Result<(), Denied> {
    let pod_uid = spec.security_context.as_ref().and_then(|s| s.run_as_user);
    let pod_gid = spec.security_context.as_ref().and_then(|s| s.run_as_group);
    for c in all_containers(spec) {
        for p in c.ports.iter().flatten() {
            if u16::try_from(p.container_port).is_ok_and(ports::is_reserved) {
                return Err(Denied::ReservedPort {
                    container: c.name.clone(),
                    port: p.container_port,
                });
            }
        }
        let sc = c.security_context.as_ref();
        let uid = sc.and_then(|s| s.run_as_user).or(pod_uid);
        let gid = sc.and_then(|s| s.run_as_group).or(pod_gid);
        if uid == Some(i64::from(PROXY_UID)) {
            return Err(Denied::ProxyIdentity {
                container: c.name.clone(),
                what: "UID",
            });
        }
        if gid == Some(i64::from(PROXY_GID)) {
            return Err(Denied::ProxyIdentity {
                container: c.name.clone(),
                what: "GID",
            });
        }
    }
    Ok(())
}

fn all_containers(spec: &PodSpec) -> impl Iterator<Item = &Container> {
    spec.init_containers
        .iter()
        .flatten()
        .chain(spec.containers.iter())
}

fn pointer(tokens: &[&str]) -> PointerBuf {
    PointerBuf::from_tokens(tokens.iter().copied())
}

fn add(tokens: &[&str], value: Value) -> PatchOperation {
    PatchOperation::Add(AddOperation {
        path: pointer(tokens),
        value,
    })
}

fn replace(tokens: &[&str], value: Value) -> PatchOperation {
    PatchOperation::Replace(ReplaceOperation {
        path: pointer(tokens),
        value,
    })
}

fn to_value<T: serde::Serialize>(v: &T) -> Value {
    // Serialising k8s-openapi types and string maps into a Value cannot fail: they hold
    // only strings, numbers, maps and lists.
    serde_json::to_value(v).unwrap_or(Value::Null)
}

#[cfg(test)]
mod tests;
