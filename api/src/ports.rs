//! Ports the sidecar owns inside every meshed pod.

/// Outbound capture: all TCP leaving the pod is redirected here.
pub const OUTBOUND: u16 = 15001;
/// Inbound capture: all TCP entering the pod is redirected here.
pub const INBOUND: u16 = 15006;
/// Admin server: ready, live, metrics, config, shutdown, app-health.
pub const ADMIN: u16 = 15020;

/// The control plane's mesh endpoint (meshlet-injector in meshlet-system): identity
/// issuer and config delivery over TLS.
pub const CONTROL_PLANE: u16 = 15012;

/// Ports an application container may not use, because the sidecar binds them.
pub const RESERVED: [u16; 3] = [OUTBOUND, INBOUND, ADMIN];

/// Server-first protocols that must skip protocol detection (the client waits for the
/// server to speak, so peeking would only add the detection timeout to every connect).
pub const DEFAULT_OPAQUE: [u16; 8] = [25, 587, 3306, 4444, 5432, 6379, 9300, 11211];

/// Whether `port` is owned by the sidecar.
pub fn is_reserved(port: u16) -> bool {
    RESERVED.contains(&port)
}
