//! The app probes the injector hands to the proxy in `MESHLET_APP_PROBES`. The injector
//! rewrites each httpGet liveness/readiness/startup probe of an app container to
//! `GET /app-health/<container>/<livez|readyz|startupz>` on the admin port, and puts the
//! original here, so the proxy can run it against the app from inside the pod (where
//! strict mTLS does not apply) and answer kubelet with its result.
//!
//! Wire form (JSON object, keys are the admin paths):
//! `{"/app-health/web/livez":{"httpGet":{"path":"/healthz","port":8080,"scheme":"HTTP"},"timeoutSeconds":1}}`

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Admin path -> the original probe.
pub type AppProbes = BTreeMap<String, AppProbe>;

/// One original app probe, with a named port already resolved to its number.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AppProbe {
    /// The app's httpGet action.
    pub http_get: AppHttpGet,
    /// Seconds before the probe counts as failed (kubelet's default is 1).
    pub timeout_seconds: i32,
}

/// The app's original httpGet action.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AppHttpGet {
    /// Request path (`/` when the probe set none).
    pub path: String,
    /// App port inside the pod (named ports are resolved by the injector).
    pub port: u16,
    /// `HTTP` or `HTTPS`; like kubelet, the proxy does not verify the app's certificate.
    pub scheme: String,
    /// Host to connect to instead of the pod IP, when the app set one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    /// Extra request headers.
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

/// The probe kinds and the path segment each is served under.
pub const KINDS: [(&str, &str); 3] = [
    ("livenessProbe", "livez"),
    ("readinessProbe", "readyz"),
    ("startupProbe", "startupz"),
];

/// The admin path kubelet calls for `kind` (`livez`, `readyz`, `startupz`) of `container`.
pub fn app_health_path(container: &str, kind: &str) -> String {
    format!("/app-health/{container}/{kind}")
}

/// Parses the value of `MESHLET_APP_PROBES`.
pub fn parse(json: &str) -> Result<AppProbes, serde_json::Error> {
    serde_json::from_str(json)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_form_round_trips() {
        let json = r#"{"/app-health/web/livez":{"httpGet":{"path":"/healthz","port":8080,"scheme":"HTTP"},"timeoutSeconds":1},"/app-health/web/readyz":{"httpGet":{"path":"/r","port":8443,"scheme":"HTTPS","host":"127.0.0.1","httpHeaders":[{"name":"X","value":"y"}]},"timeoutSeconds":3}}"#;
        let probes = parse(json).unwrap();
        assert_eq!(probes["/app-health/web/livez"].http_get.port, 8080);
        let ready = &probes[&app_health_path("web", "readyz")];
        assert_eq!(ready.http_get.http_headers[0].name, "X");
        assert_eq!(ready.timeout_seconds, 3);
        assert_eq!(serde_json::to_string(&probes).unwrap(), json);
    }
}
