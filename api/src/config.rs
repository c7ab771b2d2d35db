//! The mesh config document: what one proxy needs to know about the mesh.
//!
//! The controller (or `meshlet-injector --from-files`) compiles it from Kubernetes
//! objects; the proxy reads it from a file or a watch and swaps it atomically. It is
//! validated whole: a document with one bad entry is refused and the previous one keeps
//! serving.
//!
//! ```json
//! {"generation": 7,
//!  "services": [{"name": "web", "namespace": "shop", "clusterIPs": ["198.19.0.10"],
//!                "ports": [{"port": 80, "name": "http"}], "meshed": true,
//!                "identities": ["spiffe://cluster.local/ns/shop/sa/web"],
//!                "endpoints": [{"ip": "198.18.0.2", "ports": {"80": 8080}, "ready": true,
//!                               "podName": "web-0",
//!                               "identity": "spiffe://cluster.local/ns/shop/sa/web"}],
//!                "outlierDetection": {"consecutiveFailures": 5, "baseEjection": "1s",
//!                                     "maxEjection": "30s"}}],
//!  "opaquePorts": [3306],
//!  "timeouts": {"detect": "1s", "connect": "5s", "idle": "1h"}}
//! ```

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::{IpAddr, SocketAddr},
};

use serde::{Deserialize, Serialize};

use crate::{ports, route, Duration, SpiffeId};

/// The whole document, as JSON.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MeshConfig {
    /// Increases with every change the producer makes; for logs and `/config`.
    #[serde(default)]
    pub generation: u64,
    /// Services of the cluster, meshed or not.
    #[serde(default)]
    pub services: Vec<Service>,
    /// Ports that skip protocol detection; `None` keeps the built-in list.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub opaque_ports: Option<Vec<u16>>,
    /// Timeouts of the proxy's own listeners.
    #[serde(default)]
    pub timeouts: ListenerTimeouts,
    /// Who may call which workload; absent: every workload takes every caller.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub authorization: Option<crate::authz::Authorization>,
}

/// A Kubernetes Service as the proxy sees it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Service {
    /// Service name.
    pub name: String,
    /// Service namespace.
    pub namespace: String,
    /// ClusterIPs (one per IP family).
    #[serde(default, rename = "clusterIPs")]
    pub cluster_ips: Vec<IpAddr>,
    /// Service ports.
    #[serde(default)]
    pub ports: Vec<ServicePort>,
    /// Whether the pods behind it run a meshlet sidecar.
    #[serde(default)]
    pub meshed: bool,
    /// Identities the pods behind it present (empty when not meshed).
    #[serde(default)]
    pub identities: Vec<SpiffeId>,
    /// The pods behind it (its EndpointSlices), one entry per pod address; proxies
    /// balance HTTP requests over the ready ones. Empty (or absent, as in documents
    /// older than this field) leaves balancing to kube-proxy.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub endpoints: Vec<Endpoint>,
    /// HTTPRoutes attached to it (GAMMA), compiled; absent in older documents.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub routes: Vec<route::HttpRoute>,
    /// How many retries its clients may add on top of their requests
    /// (`XBackendTrafficPolicy.spec.retryConstraint`); absent means the defaults.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_constraint: Option<RetryConstraint>,
    /// When its endpoints are ejected for failing; absent means the defaults
    /// ([`OutlierDetection::default`]), which eject.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outlier_detection: Option<OutlierDetection>,
}

/// Outlier detection of one Service: a proxy stops sending requests to an endpoint
/// whose requests failed (connect errors and timeouts, TLS handshake failures, 502,
/// 503, 504) `consecutiveFailures` times in a row, for `baseEjection`, doubled for
/// each further ejection in a row up to `maxEjection`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct OutlierDetection {
    /// Failures in a row that eject an endpoint; 0 turns ejection off.
    #[serde(default = "OutlierDetection::default_consecutive_failures")]
    pub consecutive_failures: u32,
    /// How long the first ejection lasts (more than zero).
    #[serde(default = "OutlierDetection::default_base_ejection")]
    pub base_ejection: Duration,
    /// The longest an ejection lasts (at least `baseEjection`).
    #[serde(default = "OutlierDetection::default_max_ejection")]
    pub max_ejection: Duration,
}

/// A retry budget (Gateway API `XBackendTrafficPolicy` `retryConstraint`, GEP-3388):
/// retries to a Service are allowed while they stay within `budget.percent` of its
/// requests over `budget.interval`, and always up to `minRetryRate`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RetryConstraint {
    /// The share of requests that may be retries.
    #[serde(default)]
    pub budget: RetryBudget,
    /// Retries allowed whatever the budget says.
    #[serde(default)]
    pub min_retry_rate: RetryRate,
}

/// `retryConstraint.budget`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RetryBudget {
    /// Retries as a percentage of requests, 0 to 100 (default 20).
    #[serde(default = "RetryBudget::default_percent")]
    pub percent: u32,
    /// The window requests and retries are counted over, 1s to 1h (default 10s).
    #[serde(default = "RetryBudget::default_interval")]
    pub interval: Duration,
}

/// `retryConstraint.minRetryRate`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RetryRate {
    /// Retries always allowed per `interval` (default 10).
    #[serde(default = "RetryRate::default_count")]
    pub count: u32,
    /// Its window, 1s to 1h (default 1s).
    #[serde(default = "RetryRate::default_interval")]
    pub interval: Duration,
}

/// One address behind a Service: a pod IP (one entry per IP family) and where each
/// Service port leads on it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Endpoint {
    /// The pod's IP.
    pub ip: IpAddr,
    /// Service port -> target port on this endpoint (JSON keys are strings:
    /// `{"80": 8080}`). A named `targetPort` may resolve differently per pod, hence a
    /// map per endpoint. Empty means every Service port leads to the same port number;
    /// otherwise a Service port missing here is not served by this endpoint.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub ports: BTreeMap<u16, u16>,
    /// Whether it may take new requests (EndpointSlice `conditions.ready`); not-ready
    /// endpoints are listed so the inbound side still knows its Service.
    #[serde(default = "Endpoint::default_ready")]
    pub ready: bool,
    /// The pod's name, for logs and `/config`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_name: Option<String>,
    /// The identity the pod presents, when it is meshed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity: Option<SpiffeId>,
}

/// One port of a Service.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ServicePort {
    /// The Service port.
    pub port: u16,
    /// The port's name, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// `appProtocol` (e.g. `http`, `kubernetes.io/h2c`, `tcp`), if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub app_protocol: Option<String>,
}

/// Timeouts of the proxy's listeners.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ListenerTimeouts {
    /// How long protocol detection waits for the client's first bytes before it
    /// treats the connection as opaque TCP.
    #[serde(default = "ListenerTimeouts::default_detect")]
    pub detect: Duration,
    /// How long a connect to the destination may take.
    #[serde(default = "ListenerTimeouts::default_connect")]
    pub connect: Duration,
    /// How long a connection may stay idle (no bytes either way) before it is closed;
    /// zero means never.
    #[serde(default = "ListenerTimeouts::default_idle")]
    pub idle: Duration,
}

/// Why a mesh config document was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// Not valid JSON or not the expected shape.
    #[error("mesh config is not valid JSON of the expected shape: {0}")]
    Parse(#[from] serde_json::Error),
    /// Valid JSON, but it breaks a rule of the document.
    #[error("mesh config is invalid: {0}")]
    Invalid(String),
}

/// Where a destination address leads, looked up by ClusterIP and port.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceRef {
    /// Index into [`MeshConfig::services`].
    pub index: usize,
    /// The Service port that matched.
    pub port: ServicePort,
}

// === impl MeshConfig ===

impl MeshConfig {
    /// Parses and validates a document.
    pub fn from_json(json: &[u8]) -> Result<Self, ConfigError> {
        let cfg: Self = serde_json::from_slice(json)?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Checks the rules serde cannot: names present, ports non-zero, no ClusterIP and
    /// port claimed by two services.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let mut seen = HashMap::new();
        for (i, svc) in self.services.iter().enumerate() {
            if svc.name.is_empty() || svc.namespace.is_empty() {
                return Err(ConfigError::Invalid(format!(
                    "services[{i}] needs a name and a namespace"
                )));
            }
            let mut ports = BTreeSet::new();
            for p in &svc.ports {
                if p.port == 0 {
                    return Err(ConfigError::Invalid(format!(
                        "service {}/{} has port 0",
                        svc.namespace, svc.name
                    )));
                }
                if !ports.insert(p.port) {
                    return Err(ConfigError::Invalid(format!(
                        "service {}/{} lists port {} twice",
                        svc.namespace, svc.name, p.port
                    )));
                }
                for ip in &svc.cluster_ips {
                    let addr = SocketAddr::new(*ip, p.port);
                    if let Some(other) = seen.insert(addr, i) {
                        let o = &self.services[other];
                        return Err(ConfigError::Invalid(format!(
                            "{addr} is claimed by both {}/{} and {}/{}",
                            o.namespace, o.name, svc.namespace, svc.name
                        )));
                    }
                }
            }
            svc.validate_endpoints(&ports)?;
            for r in &svc.routes {
                r.validate().map_err(|e| {
                    ConfigError::Invalid(format!("service {}/{}: {e}", svc.namespace, svc.name))
                })?;
                if let Some(p) = r.port.filter(|p| !ports.contains(p)) {
                    return Err(ConfigError::Invalid(format!(
                        "service {}/{}: route {} attaches to port {p}, which is not a port of \
                         the service; use one of the service's ports or none",
                        svc.namespace,
                        svc.name,
                        r.id()
                    )));
                }
            }
            if let Some(rc) = &svc.retry_constraint {
                rc.validate(&format!("{}/{}", svc.namespace, svc.name))?;
            }
            if let Some(o) = &svc.outlier_detection {
                o.validate().map_err(|e| {
                    ConfigError::Invalid(format!(
                        "service {}/{}: outlierDetection: {e}",
                        svc.namespace, svc.name
                    ))
                })?;
            }
            if svc.meshed && svc.identities.is_empty() {
                return Err(ConfigError::Invalid(format!(
                    "service {}/{} is meshed but lists no identities",
                    svc.namespace, svc.name
                )));
            }
        }
        if let Some(op) = &self.opaque_ports {
            if op.contains(&0) {
                return Err(ConfigError::Invalid("opaquePorts contains port 0".into()));
            }
        }
        if let Some(a) = &self.authorization {
            a.validate()
                .map_err(|e| ConfigError::Invalid(e.to_string()))?;
        }
        if self.timeouts.connect.is_zero() {
            return Err(ConfigError::Invalid(
                "timeouts.connect must be greater than zero".into(),
            ));
        }
        Ok(())
    }

    /// The opaque ports in force: the document's list or the built-in default.
    pub fn opaque_ports(&self) -> Vec<u16> {
        self.opaque_ports
            .clone()
            .unwrap_or_else(|| ports::DEFAULT_OPAQUE.to_vec())
    }

    /// An index from ClusterIP and port to the service behind it.
    pub fn index(&self) -> HashMap<SocketAddr, ServiceRef> {
        let mut idx = HashMap::new();
        for (index, svc) in self.services.iter().enumerate() {
            for ip in &svc.cluster_ips {
                for p in &svc.ports {
                    idx.insert(
                        SocketAddr::new(*ip, p.port),
                        ServiceRef {
                            index,
                            port: p.clone(),
                        },
                    );
                }
            }
        }
        idx
    }
}

// === impl Service ===

impl Service {
    /// Where `port` (a Service port) leads on each endpoint: `(endpoint, target port)`,
    /// ready or not, in document order.
    pub fn targets(&self, port: u16) -> impl Iterator<Item = (&Endpoint, u16)> + '_ {
        self.endpoints
            .iter()
            .filter_map(move |e| Some((e, e.target_port(port)?)))
    }

    fn validate_endpoints(&self, ports: &BTreeSet<u16>) -> Result<(), ConfigError> {
        let (ns, name) = (&self.namespace, &self.name);
        let mut ips = BTreeSet::new();
        for e in &self.endpoints {
            if !ips.insert(e.ip) {
                return Err(ConfigError::Invalid(format!(
                    "service {ns}/{name} lists endpoint {} twice; list each pod address once",
                    e.ip
                )));
            }
            for (sp, tp) in &e.ports {
                if !ports.contains(sp) {
                    return Err(ConfigError::Invalid(format!(
                        "service {ns}/{name}: endpoint {} maps port {sp}, which is not a port of \
                         the service; map only the service's ports",
                        e.ip
                    )));
                }
                if *tp == 0 {
                    return Err(ConfigError::Invalid(format!(
                        "service {ns}/{name}: endpoint {} maps port {sp} to port 0; write a \
                         target port from 1 to 65535",
                        e.ip
                    )));
                }
            }
        }
        Ok(())
    }
}

// === impl Endpoint ===

impl Endpoint {
    /// The port Service port `port` leads to here, if this endpoint serves it.
    pub fn target_port(&self, port: u16) -> Option<u16> {
        if self.ports.is_empty() {
            Some(port)
        } else {
            self.ports.get(&port).copied()
        }
    }

    fn default_ready() -> bool {
        true
    }
}

// === impl RetryConstraint ===

impl RetryConstraint {
    /// Checks the ranges the Gateway API's CRD allows; `svc` names the Service in the
    /// message.
    pub fn validate(&self, svc: &str) -> Result<(), ConfigError> {
        if self.budget.percent > 100 {
            return Err(ConfigError::Invalid(format!(
                "service {svc}: retryConstraint.budget.percent is {}; write 0 to 100",
                self.budget.percent
            )));
        }
        let window = |name: &str, d: Duration| {
            let ok = (Duration::from_secs(1)..=Duration::from_secs(3600)).contains(&d);
            if ok {
                Ok(())
            } else {
                Err(ConfigError::Invalid(format!(
                    "service {svc}: retryConstraint.{name} is {d}; write 1s to 1h"
                )))
            }
        };
        window("budget.interval", self.budget.interval)?;
        window("minRetryRate.interval", self.min_retry_rate.interval)
    }
}

impl RetryBudget {
    fn default_percent() -> u32 {
        20
    }
    fn default_interval() -> Duration {
        Duration::from_secs(10)
    }
}

impl Default for RetryBudget {
    fn default() -> Self {
        Self {
            percent: Self::default_percent(),
            interval: Self::default_interval(),
        }
    }
}

impl RetryRate {
    fn default_count() -> u32 {
        10
    }
    fn default_interval() -> Duration {
        Duration::from_secs(1)
    }
}

impl Default for RetryRate {
    fn default() -> Self {
        Self {
            count: Self::default_count(),
            interval: Self::default_interval(),
        }
    }
}

// === impl OutlierDetection ===

impl OutlierDetection {
    /// Checks the rules serde cannot; the error says what to write instead.
    pub fn validate(&self) -> Result<(), String> {
        if self.base_ejection.is_zero() {
            return Err(
                "baseEjection must be more than zero; write a duration such as 1s, or set \
                 consecutiveFailures to 0 to turn ejection off"
                    .into(),
            );
        }
        if self.max_ejection < self.base_ejection {
            return Err(format!(
                "maxEjection {} is shorter than baseEjection {}; make it at least as long",
                self.max_ejection, self.base_ejection
            ));
        }
        Ok(())
    }

    fn default_consecutive_failures() -> u32 {
        5
    }
    fn default_base_ejection() -> Duration {
        Duration::from_secs(1)
    }
    fn default_max_ejection() -> Duration {
        Duration::from_secs(30)
    }
}

impl Default for OutlierDetection {
    fn default() -> Self {
        Self {
            consecutive_failures: Self::default_consecutive_failures(),
            base_ejection: Self::default_base_ejection(),
            max_ejection: Self::default_max_ejection(),
        }
    }
}

// === impl ListenerTimeouts ===

impl ListenerTimeouts {
    fn default_detect() -> Duration {
        Duration::from_secs(1)
    }
    fn default_connect() -> Duration {
        Duration::from_secs(5)
    }
    fn default_idle() -> Duration {
        Duration::from_secs(3600)
    }
}

impl Default for ListenerTimeouts {
    fn default() -> Self {
        Self {
            detect: Self::default_detect(),
            connect: Self::default_connect(),
            idle: Self::default_idle(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DOC: &str = r#"{
        "generation": 3,
        "services": [
            {"name": "reviews", "namespace": "default", "clusterIPs": ["10.96.0.10"],
             "ports": [{"port": 9080, "name": "http"}], "meshed": true,
             "identities": ["spiffe://cluster.local/ns/default/sa/reviews"]},
            {"name": "db", "namespace": "data", "clusterIPs": ["10.96.0.11", "fd00::11"],
             "ports": [{"port": 5432}]}
        ],
        "timeouts": {"detect": "500ms"}
    }"#;

    #[test]
    fn parses_and_indexes() {
        let cfg = MeshConfig::from_json(DOC.as_bytes()).unwrap();
        assert_eq!(cfg.generation, 3);
        assert_eq!(cfg.timeouts.detect, Duration::from_millis(500));
        assert_eq!(cfg.timeouts.connect, Duration::from_secs(5));
        assert_eq!(cfg.opaque_ports(), ports::DEFAULT_OPAQUE.to_vec());
        let idx = cfg.index();
        assert_eq!(idx.len(), 3);
        let r = &idx[&"10.96.0.10:9080".parse().unwrap()];
        assert_eq!(cfg.services[r.index].name, "reviews");
        assert!(idx.contains_key(&"[fd00::11]:5432".parse().unwrap()));
    }

    #[test]
    fn refuses_unknown_fields() {
        let typo = DOC.replace("clusterIPs", "clusterIps");
        let e = MeshConfig::from_json(typo.as_bytes()).unwrap_err();
        assert!(e.to_string().contains("unknown field `clusterIps`"), "{e}");
    }

    #[test]
    fn empty_document_is_valid() {
        let cfg = MeshConfig::from_json(b"{}").unwrap();
        assert!(cfg.services.is_empty());
    }

    #[test]
    fn refuses_whole_document_with_one_bad_entry() {
        let dup = DOC
            .replace("10.96.0.11", "10.96.0.10")
            .replace("5432", "9080");
        let e = MeshConfig::from_json(dup.as_bytes()).unwrap_err();
        assert!(e.to_string().contains("claimed by both"), "{e}");

        let bad_id = DOC.replace("spiffe://cluster.local/ns/default/sa/reviews", "reviews");
        let e = MeshConfig::from_json(bad_id.as_bytes()).unwrap_err();
        assert!(e.to_string().contains("invalid SPIFFE id"), "{e}");

        let no_ids = DOC.replace("\"spiffe://cluster.local/ns/default/sa/reviews\"", "");
        let e = MeshConfig::from_json(no_ids.as_bytes()).unwrap_err();
        assert!(e.to_string().contains("lists no identities"), "{e}");

        let bad_dur = DOC.replace("500ms", "half a second");
        assert!(MeshConfig::from_json(bad_dur.as_bytes()).is_err());
    }

    const EP_DOC: &str = r#"{"services": [{"name": "web", "namespace": "shop",
        "clusterIPs": ["198.19.0.10", "fd00:6d65:7368::10"], "ports": [{"port": 80}, {"port": 81}],
        "endpoints": [
            {"ip": "198.18.0.2", "ports": {"80": 8080, "81": 8081}, "podName": "web-0",
             "identity": "spiffe://cluster.local/ns/shop/sa/web"},
            {"ip": "198.18.0.3", "ports": {"80": 9090}, "ready": false},
            {"ip": "fd00:6d65:7368::2"}
        ]}]}"#;

    #[test]
    fn endpoints_map_service_ports_to_target_ports() {
        let cfg = MeshConfig::from_json(EP_DOC.as_bytes()).unwrap();
        let svc = &cfg.services[0];
        assert_eq!(svc.endpoints.len(), 3);
        assert!(svc.endpoints[0].ready, "ready defaults to true");
        assert!(!svc.endpoints[1].ready);
        assert_eq!(svc.endpoints[0].pod_name.as_deref(), Some("web-0"));
        let t80: Vec<(IpAddr, u16)> = svc.targets(80).map(|(e, p)| (e.ip, p)).collect();
        assert_eq!(
            t80,
            vec![
                ("198.18.0.2".parse().unwrap(), 8080),
                ("198.18.0.3".parse().unwrap(), 9090),
                ("fd00:6d65:7368::2".parse().unwrap(), 80),
            ],
            "an empty map keeps the port number"
        );
        let t81: Vec<u16> = svc.targets(81).map(|(_, p)| p).collect();
        assert_eq!(t81, vec![8081, 81], "198.18.0.3 does not serve 81");

        // Round trip: the JSON keys stay strings, absent fields stay absent.
        let json = serde_json::to_string(&cfg).unwrap();
        assert!(json.contains(r#""ports":{"80":8080,"81":8081}"#), "{json}");
        assert_eq!(MeshConfig::from_json(json.as_bytes()).unwrap(), cfg);
        let old = serde_json::to_string(&MeshConfig::from_json(DOC.as_bytes()).unwrap()).unwrap();
        assert!(!old.contains("endpoints"), "{old}");
    }

    #[test]
    fn refuses_bad_endpoints() {
        let dup = EP_DOC.replace("198.18.0.3", "198.18.0.2");
        let e = MeshConfig::from_json(dup.as_bytes()).unwrap_err();
        assert!(e.to_string().contains("endpoint 198.18.0.2 twice"), "{e}");

        let stray = EP_DOC.replace(r#""80": 9090"#, r#""82": 9090"#);
        let e = MeshConfig::from_json(stray.as_bytes()).unwrap_err();
        assert!(e.to_string().contains("maps port 82"), "{e}");

        let zero = EP_DOC.replace("9090", "0");
        let e = MeshConfig::from_json(zero.as_bytes()).unwrap_err();
        assert!(e.to_string().contains("to port 0"), "{e}");

        for bad in ["70000", "-1", "\"http\""] {
            let doc = EP_DOC.replace("9090", bad);
            assert!(MeshConfig::from_json(doc.as_bytes()).is_err(), "{bad}");
        }
        let key = EP_DOC.replace(r#""80": 9090"#, r#""eighty": 9090"#);
        assert!(MeshConfig::from_json(key.as_bytes()).is_err());

        let bad_id = EP_DOC.replace("spiffe://cluster.local/ns/shop/sa/web", "web");
        assert!(MeshConfig::from_json(bad_id.as_bytes()).is_err());
    }

    #[test]
    fn routes_are_optional_and_validated_with_the_document() {
        let old = MeshConfig::from_json(DOC.as_bytes()).unwrap();
        assert!(old.services[0].routes.is_empty());
        let json = serde_json::to_string(&old).unwrap();
        assert!(!json.contains("routes"), "{json}");

        let with = |route: &str| {
            DOC.replace(
                r#""meshed": true,"#,
                &format!(r#""meshed": true, "routes": [{route}],"#),
            )
        };
        let ok = with(
            r#"{"name": "r", "namespace": "default", "port": 9080,
                "rules": [{"matches": [{"path": {"type": "RegularExpression", "value": "/v[0-9]"}}]}]}"#,
        );
        let cfg = MeshConfig::from_json(ok.as_bytes()).unwrap();
        assert_eq!(cfg.services[0].routes[0].port, Some(9080));

        let e = MeshConfig::from_json(ok.replace("[0-9]", "[0-9").as_bytes()).unwrap_err();
        assert!(
            e.to_string().contains("service default/reviews: route default/r: rules[0].matches[0].path.value: invalid regular expression"),
            "{e}"
        );
        let e = MeshConfig::from_json(
            ok.replace("\"port\": 9080,\n", "\"port\": 80,\n")
                .as_bytes(),
        );
        assert!(e.unwrap_err().to_string().contains("attaches to port 80"));
    }

    #[test]
    fn retry_constraint_defaults_and_limits() {
        let with = |rc: &str| {
            DOC.replace(
                r#""meshed": true,"#,
                &format!(r#""meshed": true, "retryConstraint": {rc},"#),
            )
        };
        let cfg = MeshConfig::from_json(with("{}").as_bytes()).unwrap();
        let rc = cfg.services[0].retry_constraint.clone().unwrap();
        assert_eq!(rc.budget.percent, 20);
        assert_eq!(rc.budget.interval, Duration::from_secs(10));
        assert_eq!(rc.min_retry_rate.count, 10);
        assert_eq!(rc.min_retry_rate.interval, Duration::from_secs(1));
        assert!(cfg.services[1].retry_constraint.is_none());

        let set =
            with(r#"{"budget": {"percent": 50, "interval": "30s"}, "minRetryRate": {"count": 3}}"#);
        let cfg = MeshConfig::from_json(set.as_bytes()).unwrap();
        let rc = cfg.services[0].retry_constraint.as_ref().unwrap();
        assert_eq!((rc.budget.percent, rc.min_retry_rate.count), (50, 3));
        assert_eq!(rc.budget.interval, Duration::from_secs(30));
        let json = serde_json::to_string(&cfg).unwrap();
        assert!(
            json.contains(r#""retryConstraint":{"budget":{"percent":50,"interval":"30s"}"#),
            "{json}"
        );

        let e = MeshConfig::from_json(with(r#"{"budget": {"percent": 120}}"#).as_bytes());
        assert!(e.unwrap_err().to_string().contains("percent is 120"));
        let e =
            MeshConfig::from_json(with(r#"{"minRetryRate": {"interval": "100ms"}}"#).as_bytes());
        assert!(e
            .unwrap_err()
            .to_string()
            .contains("minRetryRate.interval is 100ms"));
        assert!(MeshConfig::from_json(with(r#"{"budgett": {}}"#).as_bytes()).is_err());
    }

    #[test]
    fn outlier_detection_is_optional_defaulted_and_validated() {
        let old = MeshConfig::from_json(DOC.as_bytes()).unwrap();
        assert_eq!(old.services[0].outlier_detection, None);
        let json = serde_json::to_string(&old).unwrap();
        assert!(!json.contains("outlierDetection"), "{json}");

        let with = |od: &str| {
            DOC.replace(
                r#""meshed": true,"#,
                &format!(r#""meshed": true, "outlierDetection": {od},"#),
            )
        };
        let cfg = MeshConfig::from_json(with(r#"{"consecutiveFailures": 3}"#).as_bytes()).unwrap();
        assert_eq!(
            cfg.services[0].outlier_detection,
            Some(OutlierDetection {
                consecutive_failures: 3,
                ..OutlierDetection::default()
            })
        );
        assert_eq!(
            OutlierDetection::default().base_ejection,
            Duration::from_secs(1)
        );
        assert_eq!(
            OutlierDetection::default().max_ejection,
            Duration::from_secs(30)
        );
        let full =
            with(r#"{"consecutiveFailures": 0, "baseEjection": "500ms", "maxEjection": "1m"}"#);
        let cfg = MeshConfig::from_json(full.as_bytes()).unwrap();
        let round = serde_json::to_string(&cfg).unwrap();
        assert!(round.contains(r#""outlierDetection":{"consecutiveFailures":0,"baseEjection":"500ms","maxEjection":"1m"}"#), "{round}");
        assert_eq!(MeshConfig::from_json(round.as_bytes()).unwrap(), cfg);

        let e = MeshConfig::from_json(with(r#"{"baseEjection": "0s"}"#).as_bytes()).unwrap_err();
        assert!(
            e.to_string().contains(
                "service default/reviews: outlierDetection: baseEjection must be more than zero"
            ),
            "{e}"
        );
        let e = MeshConfig::from_json(
            with(r#"{"baseEjection": "10s", "maxEjection": "5s"}"#).as_bytes(),
        )
        .unwrap_err();
        assert!(
            e.to_string()
                .contains("maxEjection 5s is shorter than baseEjection 10s"),
            "{e}"
        );
        for bad in [
            r#"{"consecutiveFailures": -1}"#,
            r#"{"baseEjection": "soon"}"#,
            r#"{"interval": "1s"}"#,
        ] {
            assert!(
                MeshConfig::from_json(with(bad).as_bytes()).is_err(),
                "{bad}"
            );
        }
    }
}
