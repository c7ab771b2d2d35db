//! Rewrites the app's httpGet probes to the proxy's `/app-health` endpoints, so kubelet
//! probes keep working when the app port only accepts mesh mTLS: kubelet probes the proxy's
//! admin port (excluded from capture) and the proxy probes the app from inside the pod.

use std::collections::BTreeMap;

use k8s_openapi::{
    api::core::v1::{Container, HTTPGetAction, PodSpec, Probe},
    apimachinery::pkg::util::intstr::IntOrString,
};
use meshlet_api::ports;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// What `MESHLET_APP_PROBES` carries: `/app-health/<container>/<livez|readyz|startupz>`
/// to the probe the proxy runs against the app.
pub type AppProbes = BTreeMap<String, AppProbe>;

/// One original app probe, with a named port already resolved to its number.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AppProbe {
    /// The app's httpGet action (port always a number).
    pub http_get: AppHttpGet,
    /// Seconds before the probe counts as failed (kubelet's default is 1).
    pub timeout_seconds: i32,
}

/// The app's original httpGet action.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AppHttpGet {
    /// Request path (default `/`).
    pub path: String,
    /// App port inside the pod.
    pub port: u16,
    /// `HTTP` or `HTTPS` (the proxy does not verify the app's certificate, as kubelet does not).
    pub scheme: String,
    /// Host to connect to instead of the pod IP, when the app set one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    /// Extra request headers as `[{name, value}]`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub http_headers: Vec<AppHeader>,
}

/// One extra probe header.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppHeader {
    /// Header name.
    pub name: String,
    /// Header value.
    pub value: String,
}

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

const KINDS: [(&str, &str); 3] = [
    ("livenessProbe", "livez"),
    ("readinessProbe", "readyz"),
    ("startupProbe", "startupz"),
];

/// The kubelet-facing path of one rewritten probe.
pub fn app_health_path(container: &str, kind: &str) -> String {
    format!("/app-health/{container}/{kind}")
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
