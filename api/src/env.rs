//! Environment variables that carry configuration from the injected pod spec into
//! `meshlet-init` and `meshlet-proxy`. The injector writes them; the binaries read them
//! (each also accepts the matching command-line flag).

// === meshlet-init ===

/// UID whose traffic is never redirected.
pub const INIT_PROXY_UID: &str = "MESHLET_PROXY_UID";
/// GID whose traffic is never redirected.
pub const INIT_PROXY_GID: &str = "MESHLET_PROXY_GID";
/// Port outbound TCP is redirected to.
pub const INIT_OUTBOUND_PORT: &str = "MESHLET_OUTBOUND_PORT";
/// Port inbound TCP is redirected to.
pub const INIT_INBOUND_PORT: &str = "MESHLET_INBOUND_PORT";
/// Inbound ports to capture: `*` or a comma-separated list of ports.
pub const INIT_INBOUND_PORTS: &str = "MESHLET_INBOUND_PORTS";
/// Inbound ports that bypass the proxy (comma-separated ports or ranges `a-b`).
pub const INIT_EXCLUDE_INBOUND_PORTS: &str = "MESHLET_EXCLUDE_INBOUND_PORTS";
/// Outbound ports that bypass the proxy (comma-separated ports or ranges `a-b`).
pub const INIT_EXCLUDE_OUTBOUND_PORTS: &str = "MESHLET_EXCLUDE_OUTBOUND_PORTS";
/// Outbound CIDRs to capture: `*` or comma-separated CIDRs.
pub const INIT_INCLUDE_OUTBOUND_CIDRS: &str = "MESHLET_INCLUDE_OUTBOUND_CIDRS";
/// Outbound CIDRs that bypass the proxy.
pub const INIT_EXCLUDE_OUTBOUND_CIDRS: &str = "MESHLET_EXCLUDE_OUTBOUND_CIDRS";
/// IPv6 rules: `on`, `off` or `auto` (when the pod has a global IPv6 address).
pub const INIT_IPV6: &str = "MESHLET_IPV6";
/// iptables backend: `nft`, `legacy` or `auto`.
pub const INIT_BACKEND: &str = "MESHLET_IPTABLES_BACKEND";

// === meshlet-proxy ===

/// Outbound listener address (default `0.0.0.0:15001`).
pub const PROXY_OUTBOUND_ADDR: &str = "MESHLET_OUTBOUND_ADDR";
/// Inbound listener address (default `0.0.0.0:15006`).
pub const PROXY_INBOUND_ADDR: &str = "MESHLET_INBOUND_ADDR";
/// Admin listener address (default `0.0.0.0:15020`).
pub const PROXY_ADMIN_ADDR: &str = "MESHLET_ADMIN_ADDR";
/// Path of the mesh config document (JSON), reloaded when it changes.
pub const PROXY_CONFIG_PATH: &str = "MESHLET_CONFIG_PATH";
/// Ports that skip protocol detection, comma-separated; replaces the default list.
pub const PROXY_OPAQUE_PORTS: &str = "MESHLET_OPAQUE_PORTS";
/// How long in-flight work may take after SIGTERM (Gateway API duration, e.g. `30s`).
pub const PROXY_DRAIN_TIMEOUT: &str = "MESHLET_DRAIN_TIMEOUT";
/// Log filter (`info`, `meshlet_proxy=debug`, ...).
pub const PROXY_LOG: &str = "MESHLET_LOG";
/// Worker threads; default follows the cgroup CPU limit.
pub const PROXY_WORKER_THREADS: &str = "MESHLET_WORKER_THREADS";
/// Inbound TLS mode: `permissive` or `strict`.
pub const PROXY_TLS_MODE: &str = "MESHLET_TLS_MODE";
/// Directory with the workload identity: `cert.pem`, `key.pem`, `ca.pem`; reloaded
/// when the files change. Unset: no mesh mTLS (plaintext only).
pub const PROXY_IDENTITY_DIR: &str = "MESHLET_IDENTITY_DIR";
/// Original app probes as JSON (from the injector), served under `/app-health/`.
pub const PROXY_APP_PROBES: &str = "MESHLET_APP_PROBES";

/// Pod name (downward API).
pub const POD_NAME: &str = "MESHLET_POD_NAME";
/// Pod namespace (downward API).
pub const POD_NAMESPACE: &str = "MESHLET_POD_NAMESPACE";
/// Pod IP (downward API); inbound traffic is forwarded to it.
pub const POD_IP: &str = "MESHLET_POD_IP";
/// Service account (downward API).
pub const SERVICE_ACCOUNT: &str = "MESHLET_SERVICE_ACCOUNT";

/// `host:port` of the control plane's mesh endpoint (identity issuer and config
/// delivery, [`crate::ports::CONTROL_PLANE`]); unset means offline (identity and config
/// from files).
pub const CONTROL_PLANE_ADDR: &str = "MESHLET_CONTROL_PLANE_ADDR";
/// The DNS name the control plane's certificate must carry (also sent as SNI).
pub const CONTROL_PLANE_NAME: &str = "MESHLET_CONTROL_PLANE_NAME";
/// PEM of the mesh trust anchors (root CA certificates), written by the injector.
pub const TRUST_ANCHORS: &str = "MESHLET_TRUST_ANCHORS";
/// Path of the projected service-account token the proxy presents to the issuer.
pub const IDENTITY_TOKEN_PATH: &str = "MESHLET_IDENTITY_TOKEN";
