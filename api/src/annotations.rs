//! Pod, namespace and Service annotations meshlet reads. Each one is validated by the
//! injector; a bad value is refused with a message naming the annotation and the value.

/// What was injected, by which version (JSON written by the injector).
pub const STATUS: &str = "meshlet.io/status";
/// Inbound ports to capture: `*` (default) or a comma-separated list.
pub const INBOUND_PORTS: &str = "meshlet.io/inbound-ports";
/// Inbound ports that bypass the proxy.
pub const EXCLUDE_INBOUND_PORTS: &str = "meshlet.io/exclude-inbound-ports";
/// Outbound ports that bypass the proxy.
pub const EXCLUDE_OUTBOUND_PORTS: &str = "meshlet.io/exclude-outbound-ports";
/// Outbound CIDRs that bypass the proxy.
pub const EXCLUDE_OUTBOUND_CIDRS: &str = "meshlet.io/exclude-outbound-cidrs";
/// Outbound CIDRs to capture: `*` (default) or a comma-separated list.
pub const INCLUDE_OUTBOUND_CIDRS: &str = "meshlet.io/include-outbound-cidrs";
/// Ports that skip protocol detection (server-first protocols).
pub const OPAQUE_PORTS: &str = "meshlet.io/opaque-ports";
/// CPU request of the proxy container.
pub const PROXY_CPU: &str = "meshlet.io/proxy-cpu";
/// Memory request of the proxy container.
pub const PROXY_MEMORY: &str = "meshlet.io/proxy-memory";
/// CPU limit of the proxy container.
pub const PROXY_CPU_LIMIT: &str = "meshlet.io/proxy-cpu-limit";
/// Memory limit of the proxy container.
pub const PROXY_MEMORY_LIMIT: &str = "meshlet.io/proxy-memory-limit";
/// Log level of the proxy (`error`, `warn`, `info`, `debug`, `trace`).
pub const LOG_LEVEL: &str = "meshlet.io/log-level";
/// `true` to run the proxy as a native sidecar, `false` for a classic first container.
pub const NATIVE_SIDECAR: &str = "meshlet.io/native-sidecar";
/// Inbound TLS mode: `permissive` (default) or `strict`.
pub const TLS_MODE: &str = "meshlet.io/tls-mode";
/// Namespace default for workloads no policy targets.
pub const DEFAULT_INBOUND_POLICY: &str = "meshlet.io/default-inbound-policy";
/// Original httpGet probes of the app, kept when they are rewritten to `/app-health`.
pub const ORIGINAL_PROBES: &str = "meshlet.io/original-probes";

/// Every pod annotation the injector validates, for error messages and docs.
pub const POD_ANNOTATIONS: [&str; 13] = [
    INBOUND_PORTS,
    EXCLUDE_INBOUND_PORTS,
    EXCLUDE_OUTBOUND_PORTS,
    EXCLUDE_OUTBOUND_CIDRS,
    INCLUDE_OUTBOUND_CIDRS,
    OPAQUE_PORTS,
    PROXY_CPU,
    PROXY_MEMORY,
    PROXY_CPU_LIMIT,
    PROXY_MEMORY_LIMIT,
    LOG_LEVEL,
    NATIVE_SIDECAR,
    TLS_MODE,
];

/// Service annotation: failures in a row that eject an endpoint (a whole number; `0`
/// turns ejection off). Compiled into the Service's `outlierDetection`.
pub const OUTLIER_CONSECUTIVE_FAILURES: &str = "meshlet.io/outlier-consecutive-failures";
/// Service annotation: how long an endpoint's first ejection lasts (`1s`, `500ms`).
pub const OUTLIER_BASE_EJECTION: &str = "meshlet.io/outlier-base-ejection";
/// Service annotation: the longest an ejection lasts (`30s`, `1m`).
pub const OUTLIER_MAX_EJECTION: &str = "meshlet.io/outlier-max-ejection";

/// Every Service annotation the mesh config compiler validates.
pub const SERVICE_ANNOTATIONS: [&str; 3] = [
    OUTLIER_CONSECUTIVE_FAILURES,
    OUTLIER_BASE_EJECTION,
    OUTLIER_MAX_EJECTION,
];
