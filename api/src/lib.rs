//! Names, ports and types that cross meshlet's process boundaries.
//!
//! Everything here is fixed by `DESIGN.md`: the injector writes these names into pod
//! specs, `meshlet-init` and `meshlet-proxy` read them back, so a rename here is a
//! breaking change for running clusters.
#![forbid(unsafe_code)]
#![deny(rust_2018_idioms)]

pub mod annotations;
pub mod authz;
pub mod config;
pub mod duration;
pub mod env;
pub mod identity;
pub mod parse;
pub mod ports;
pub mod probes;
pub mod route;

pub use config::MeshConfig;
pub use duration::Duration;
pub use identity::SpiffeId;

/// UID the proxy runs as; its traffic is never redirected.
pub const PROXY_UID: u32 = 1337;
/// GID the proxy runs as; its traffic is never redirected.
pub const PROXY_GID: u32 = 1337;
/// Namespace of the control plane.
pub const CONTROL_PLANE_NAMESPACE: &str = "meshlet-system";
/// Default SPIFFE trust domain.
pub const DEFAULT_TRUST_DOMAIN: &str = "cluster.local";
/// ALPN protocol that marks a mesh mTLS connection between two sidecars.
pub const MESH_ALPN: &[u8] = b"meshlet/1";
/// Name of the injected init container.
pub const INIT_CONTAINER_NAME: &str = "meshlet-init";
/// Name of the injected sidecar container.
pub const PROXY_CONTAINER_NAME: &str = "meshlet-proxy";
/// Label (namespace or pod) that turns injection on (`enabled`) or off (`disabled`).
pub const INJECT_LABEL: &str = "meshlet.io/inject";
/// Version stamped into the injection status annotation.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
/// `controllerName` meshlet writes into the status of the Gateway API routes it serves.
pub const CONTROLLER_NAME: &str = "meshlet.io/controller";
