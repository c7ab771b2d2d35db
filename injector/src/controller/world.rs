//! The glue between what the API server sends and what [`compile`] reads: each watched
//! object is cut down to the fields the mesh config needs (so the caches stay small),
//! and the document is built from the whole world at once.
//!
//! Pods reach `compile` with their `meshlet.io/inject` label rewritten from the truth a
//! live cluster has: a pod is meshed when the injector stamped its status annotation,
//! whatever its labels predicted. Endpoints come from EndpointSlices, which `compile`
//! (made for manifests, which have none) does not read.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
};

use k8s_openapi::api::{
    core::v1::{Namespace, Pod, Service},
    discovery::v1::EndpointSlice,
};
use kube::{
    api::{DynamicObject, TypeMeta},
    core::ApiResource,
};
use meshlet_api::{
    annotations,
    authz::DefaultPolicy,
    config::{Endpoint, Service as MeshService},
    MeshConfig, SpiffeId, DEFAULT_TRUST_DOMAIN, INJECT_LABEL,
};
use serde_json::{json, Value};

use crate::compile::{self, CompileError, Compiled};

/// Label that ties an EndpointSlice to its Service.
const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// Everything the document is built from, as cut-down JSON objects.
#[derive(Clone, Debug, Default)]
pub struct World {
    /// What `compile` reads: Services, Pods, HTTPRoutes, ReferenceGrants,
    /// XBackendTrafficPolicies.
    pub objects: Vec<Value>,
    /// EndpointSlices.
    pub slices: Vec<Value>,
    /// Mesh-wide default inbound policy (`serve --default-inbound-policy`).
    pub default_inbound_policy: DefaultPolicy,
}

/// A Service without what the document never reads (status, annotations, managed fields).
pub fn slim_service(mut svc: Service) -> Option<Value> {
    svc.metadata.managed_fields = None;
    svc.metadata.annotations = None;
    svc.status = None;
    serde_json::to_value(svc).ok()
}

/// An EndpointSlice without managed fields and annotations.
pub fn slim_slice(mut slice: EndpointSlice) -> Option<Value> {
    slice.metadata.managed_fields = None;
    slice.metadata.annotations = None;
    serde_json::to_value(slice).ok()
}

/// What of a pod the document needs: its labels (for Service selectors), service
/// account (its identity), whether it is meshed, written as the inject label
/// `compile` reads, and its addresses (AuthorizationPolicy targets are resolved to
/// them). Finished pods serve nothing and are left out (`None`).
pub fn slim_pod(pod: Pod) -> Option<Value> {
    let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
    if matches!(phase, Some("Succeeded" | "Failed")) {
        return None;
    }
    let meshed = pod
        .metadata
        .annotations
        .as_ref()
        .is_some_and(|a| a.contains_key(annotations::STATUS));
    let mut labels = pod.metadata.labels.unwrap_or_default();
    labels.insert(
        INJECT_LABEL.to_string(),
        if meshed { "enabled" } else { "disabled" }.to_string(),
    );
    let spec = pod.spec.unwrap_or_default();
    let status = pod.status.unwrap_or_default();
    Some(json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": pod.metadata.name,
            "namespace": pod.metadata.namespace,
            "labels": labels,
        },
        "spec": {
            "serviceAccountName": spec.service_account_name
                .or(spec.service_account)
                .unwrap_or_else(|| "default".into()),
        },
        "status": {
            "podIP": status.pod_ip,
            "podIPs": status.pod_ips,
        },
    }))
}

/// A Namespace as far as authorization reads it: its name and the
/// `meshlet.io/default-inbound-policy` annotation (the others are dropped, so an
/// unrelated annotation change does not rebuild the document).
pub fn slim_namespace(ns: Namespace) -> Option<Value> {
    let policy = ns
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(annotations::DEFAULT_INBOUND_POLICY).cloned());
    let mut kept = serde_json::Map::new();
    if let Some(p) = policy {
        kept.insert(annotations::DEFAULT_INBOUND_POLICY.to_string(), p.into());
    }
    Some(json!({
        "apiVersion": "v1",
        "kind": "Namespace",
        "metadata": {"name": ns.metadata.name, "annotations": kept},
    }))
}

/// A Gateway API object without managed fields, with its apiVersion and kind set
/// (list responses leave them out of the items).
pub fn slim_dynamic(mut obj: DynamicObject, ar: &ApiResource) -> Option<Value> {
    obj.metadata.managed_fields = None;
    obj.types = Some(TypeMeta {
        api_version: ar.api_version.clone(),
        kind: ar.kind.clone(),
    });
    serde_json::to_value(obj).ok()
}

/// Compiles the world: `compile` for Services, identities and routes, then the
/// endpoints of each Service from its EndpointSlices, then authorization (its Service
/// targets resolve to endpoint addresses, known only after the endpoints).
pub fn build(world: &World) -> Result<Compiled, CompileError> {
    let opts = compile::Options {
        default_inbound_policy: world.default_inbound_policy,
    };
    let mut compiled = compile::compile_with(&world.objects, &opts)?;
    add_endpoints(&mut compiled.config, &world.slices, &world.objects);
    let (authorization, problems) = compile::authz::compile(
        &world.objects,
        &compiled.config.services,
        world.default_inbound_policy,
    );
    compiled.config.authorization = authorization;
    compiled.authz_problems = problems;
    compiled.config.validate()?;
    Ok(compiled)
}

/// (namespace, name) of a pod -> its identity when meshed (`None` when not).
fn pod_identities(objects: &[Value]) -> BTreeMap<(&str, &str), Option<SpiffeId>> {
    objects
        .iter()
        .filter(|o| o["kind"] == "Pod")
        .filter_map(|p| {
            let ns = p["metadata"]["namespace"].as_str()?;
            let name = p["metadata"]["name"].as_str()?;
            let meshed = p["metadata"]["labels"][INJECT_LABEL] == "enabled";
            let sa = p["spec"]["serviceAccountName"]
                .as_str()
                .unwrap_or("default");
            let id = meshed
                .then(|| SpiffeId::new(DEFAULT_TRUST_DOMAIN, ns, sa).ok())
                .flatten();
            Some(((ns, name), id))
        })
        .collect()
}

/// Fills `endpoints` of every Service from the EndpointSlices labelled with its name,
/// and adds the identities of meshed endpoint pods to the Service's identities (a
/// Service without selector has no other way to learn them).
pub fn add_endpoints(config: &mut MeshConfig, slices: &[Value], objects: &[Value]) {
    let pods = pod_identities(objects);
    let mut by_service: BTreeMap<(&str, &str), Vec<&Value>> = BTreeMap::new();
    for s in slices {
        let ns = s["metadata"]["namespace"].as_str().unwrap_or("default");
        if let Some(svc) = s["metadata"]["labels"][SERVICE_NAME_LABEL].as_str() {
            by_service.entry((ns, svc)).or_default().push(s);
        }
    }
    for svc in &mut config.services {
        let Some(slices) = by_service.get(&(svc.namespace.as_str(), svc.name.as_str())) else {
            continue;
        };
        svc.endpoints = endpoints(svc, slices, &pods);
        let mut ids: BTreeSet<SpiffeId> = svc.identities.drain(..).collect();
        ids.extend(svc.endpoints.iter().filter_map(|e| e.identity.clone()));
        svc.meshed = !ids.is_empty();
        svc.identities = ids.into_iter().collect();
    }
}

fn endpoints(
    svc: &MeshService,
    slices: &[&Value],
    pods: &BTreeMap<(&str, &str), Option<SpiffeId>>,
) -> Vec<Endpoint> {
    let mut out: BTreeMap<IpAddr, Endpoint> = BTreeMap::new();
    for slice in slices {
        let slice_ns = slice["metadata"]["namespace"].as_str().unwrap_or("default");
        // Service port -> the slice's target port, matched by port name ("" = unnamed).
        let slice_ports: Vec<(&str, u16)> = slice["ports"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|p| {
                let port = u16::try_from(p["port"].as_u64()?).ok()?;
                Some((p["name"].as_str().unwrap_or(""), port))
            })
            .collect();
        let ports: BTreeMap<u16, u16> = svc
            .ports
            .iter()
            .filter_map(|sp| {
                let name = sp.name.as_deref().unwrap_or("");
                let (_, tp) = slice_ports.iter().find(|(n, _)| *n == name)?;
                Some((sp.port, *tp))
            })
            .filter(|(_, tp)| *tp != 0)
            .collect();
        // A slice that lists ports but none of this Service's serves none of them; an
        // empty map would instead mean "every port as is".
        if ports.is_empty() && !slice_ports.is_empty() {
            continue;
        }
        for e in slice["endpoints"].as_array().into_iter().flatten() {
            // An unset condition means ready, as kube-proxy reads it.
            let ready = e["conditions"]["ready"].as_bool().unwrap_or(true);
            let target = &e["targetRef"];
            let pod = (target["kind"] == "Pod")
                .then(|| target["name"].as_str())
                .flatten();
            let identity = pod.and_then(|name| {
                let ns = target["namespace"].as_str().unwrap_or(slice_ns);
                pods.get(&(ns, name)).cloned().flatten()
            });
            for ip in e["addresses"].as_array().into_iter().flatten() {
                let Some(ip) = ip.as_str().and_then(|s| s.parse::<IpAddr>().ok()) else {
                    continue;
                };
                // One address in two slices (a slice being replaced): merge.
                let entry = out.entry(ip).or_insert_with(|| Endpoint {
                    ip,
                    ports: BTreeMap::new(),
                    ready: false,
                    pod_name: pod.map(str::to_string),
                    identity: None,
                });
                entry.ready |= ready;
                entry.ports.extend(ports.iter().map(|(k, v)| (*k, *v)));
                if entry.identity.is_none() {
                    entry.identity = identity.clone();
                }
            }
        }
    }
    out.into_values().collect()
}
