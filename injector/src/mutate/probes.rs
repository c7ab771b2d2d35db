//! Rewrites the app's httpGet probes to the proxy's `/app-health` endpoints, so kubelet
//! probes keep working when the app port only accepts mesh mTLS: kubelet probes the proxy's
//! admin port (excluded from capture) and the proxy probes the app from inside the pod.

use k8s_openapi::{
    api::core::v1::{Container, HTTPGetAction, PodSpec, Probe},
    apimachinery::pkg::util::intstr::IntOrString,
};
use meshlet_api::{
    ports,
    probes::{app_health_path, AppHeader, AppHttpGet, AppProbe, AppProbes, KINDS},
};
use serde_json::{Map, Value};

/// One probe field of one app container to replace.
pub(super) struct Replacement {
    pub container_index: usize,
    pub field: &'static str,
    pub value: Value,
}

/// All rewritten probes of a pod.
pub(super) struct Rewritten {
    pub replacements: Vec<Replacement>,
    /// For `MESHLET_APP_PROBES`.
    pub app_probes: AppProbes,
    /// For `meshlet.io/original-probes`: container -> field -> original probe.
    pub originals: Map<String, Value>,
}

pub(super) fn rewrite(spec: &PodSpec) -> Rewritten {
    let mut out = Rewritten {
        replacements: Vec::new(),
        app_probes: AppProbes::new(),
        originals: Map::new(),
    };
    for (i, c) in spec.containers.iter().enumerate() {
        for (field, kind) in KINDS {
            let probe = match field {
                "livenessProbe" => c.liveness_probe.as_ref(),
                "readinessProbe" => c.readiness_probe.as_ref(),
                _ => c.startup_probe.as_ref(),
            };
            let Some(probe) = probe else { continue };
            let Some(get) = probe.http_get.as_ref() else {
                // tcpSocket, grpc and exec probes work unchanged: kubelet's TCP connect
                // and gRPC health checks are plaintext-tolerant or run inside the container.
                continue;
            };
            // A named port that matches no container port cannot be resolved; leaving
            // the probe as is keeps the pod's behaviour unchanged.
            let Some(port) = resolve_port(c, &get.port) else {
                continue;
            };
            let path = app_health_path(&c.name, kind);
            out.app_probes
                .insert(path.clone(), app_probe(get, port, probe));
            let original = serde_json::to_value(probe).unwrap_or(Value::Null);
            out.originals
                .entry(c.name.clone())
                .or_insert_with(|| Value::Object(Map::new()))
                .as_object_mut()
                .map(|m| m.insert(field.to_string(), original.clone()));
            let mut value = original;
            if let Some(obj) = value.as_object_mut() {
                obj.insert(
                    "httpGet".to_string(),
                    serde_json::json!({ "path": path, "port": ports::ADMIN, "scheme": "HTTP" }),
                );
            }
            out.replacements.push(Replacement {
                container_index: i,
                field,
                value,
            });
        }
    }
    out
}

fn resolve_port(c: &Container, port: &IntOrString) -> Option<u16> {
    match port {
        IntOrString::Int(n) => u16::try_from(*n).ok().filter(|p| *p != 0),
        IntOrString::String(s) => {
            if let Ok(n) = s.parse::<u16>() {
                return Some(n).filter(|p| *p != 0);
            }
            c.ports
                .iter()
                .flatten()
                .find(|p| p.name.as_deref() == Some(s.as_str()))
                .and_then(|p| u16::try_from(p.container_port).ok())
        }
    }
}

fn app_probe(get: &HTTPGetAction, port: u16, probe: &Probe) -> AppProbe {
    AppProbe {
        http_get: AppHttpGet {
            path: get
                .path
                .clone()
                .filter(|p| !p.is_empty())
                .unwrap_or_else(|| "/".to_string()),
            port,
            scheme: get.scheme.clone().unwrap_or_else(|| "HTTP".to_string()),
            host: get.host.clone().filter(|h| !h.is_empty()),
            http_headers: get
                .http_headers
                .iter()
                .flatten()
                .map(|h| AppHeader {
                    name: h.name.clone(),
                    value: h.value.clone(),
                })
                .collect(),
        },
        timeout_seconds: probe.timeout_seconds.unwrap_or(1),
    }
}
