//! Process config, read once from the environment.
//!
//! Everything the injector sets on the sidecar container arrives here as `MESHLET_*`
//! variables (names in [`meshlet_api::env`]). Parsing goes through [`Strings`] so tests
//! hand in a map instead of mutating the process environment.

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    path::PathBuf,
};

use meshlet_api::{env, Duration};
use rustls::pki_types::pem::PemObject as _;
use serde::Serialize;

use crate::tls::TlsMode;

#[cfg(test)]
mod tests;

/// Default outbound listener.
pub const DEFAULT_OUTBOUND_ADDR: &str = "0.0.0.0:15001";
/// Default inbound listener.
pub const DEFAULT_INBOUND_ADDR: &str = "0.0.0.0:15006";
/// Default admin listener.
pub const DEFAULT_ADMIN_ADDR: &str = "0.0.0.0:15020";
/// Default drain deadline after SIGTERM or `POST /shutdown`.
pub const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(30);
/// Default log filter.
pub const DEFAULT_LOG: &str = "info";

/// A source of named strings: the process environment or, in tests, a map.
pub trait Strings {
    /// The value of `name`, if set.
    fn get(&self, name: &str) -> Option<String>;
}

/// The process environment.
#[derive(Clone, Copy, Debug, Default)]
pub struct Env;

/// The proxy's process config.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Config {
    /// Where outbound (app to world) connections are redirected.
    pub outbound_addr: SocketAddr,
    /// Where inbound (world to app) connections are redirected.
    pub inbound_addr: SocketAddr,
    /// Admin server (ready, live, metrics, config, shutdown).
    pub admin_addr: SocketAddr,
    /// Mesh config document; `None` serves an empty one.
    pub config_path: Option<PathBuf>,
    /// Opaque ports that replace the mesh config's list, if set.
    pub opaque_ports: Option<Vec<u16>>,
    /// How long in-flight work may run after shutdown starts.
    pub drain_timeout: Duration,
    /// tracing `EnvFilter` directives.
    pub log: String,
    /// Worker threads; `None` follows the cgroup CPU limit.
    pub worker_threads: Option<usize>,
    /// The pod's IP (downward API).
    pub pod_ip: Option<IpAddr>,
    /// The pod's name (downward API).
    pub pod_name: Option<String>,
    /// The pod's namespace (downward API).
    pub pod_namespace: Option<String>,
    /// The pod's service account (downward API).
    pub service_account: Option<String>,
    /// Workload identity directory (`cert.pem`, `key.pem`, `ca.pem`); `None`: no mTLS.
    pub identity_dir: Option<PathBuf>,
    /// Where to get the identity online when there is no identity directory.
    pub issuer: Option<IssuerConfig>,
    /// Whether inbound plaintext is accepted.
    pub tls_mode: TlsMode,
    /// The app's original httpGet probes, served under `/app-health/...`.
    pub app_probes: meshlet_api::probes::AppProbes,
    /// The control plane the mesh config is watched from, when no config file is set.
    pub control_plane: Option<ControlPlane>,
}

/// Where and how to reach the control plane's mesh endpoint.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ControlPlane {
    /// `host:port` (`MESHLET_CONTROL_PLANE_ADDR`).
    pub addr: String,
    /// The name its certificate must carry, also sent as SNI
    /// (`MESHLET_CONTROL_PLANE_NAME`).
    pub name: String,
    /// PEM of the trust anchors its certificate must chain to
    /// (`MESHLET_TRUST_ANCHORS`); left out of the logged config, it is long.
    #[serde(skip)]
    pub trust_anchors: String,
}

/// The control plane's issuer: the control plane it is reached at, and the token shown.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct IssuerConfig {
    /// The mesh endpoint that issues (the same as [`Config::control_plane`]).
    #[serde(flatten)]
    pub control_plane: ControlPlane,
    /// The projected service-account token file, re-read at each request.
    pub token_path: PathBuf,
}

/// An environment variable with a value the proxy cannot use.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{name}={value:?} is invalid: {reason}")]
pub struct ConfigError {
    /// The variable.
    pub name: &'static str,
    /// Its value.
    pub value: String,
    /// What is wrong and what to write instead.
    pub reason: String,
}

// === impl Strings ===

impl Strings for Env {
    fn get(&self, name: &str) -> Option<String> {
        std::env::var(name).ok()
    }
}

impl Strings for HashMap<String, String> {
    fn get(&self, name: &str) -> Option<String> {
        HashMap::get(self, name).cloned()
    }
}

impl Strings for [(&str, &str)] {
    fn get(&self, name: &str) -> Option<String> {
        self.iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| (*v).to_string())
    }
}

// === impl Config ===

impl Config {
    /// Reads and validates the whole config; the first bad variable is the error.
    pub fn parse(env: &(impl Strings + ?Sized)) -> Result<Self, ConfigError> {
        let addr = |name, default: &str| -> Result<SocketAddr, ConfigError> {
            let v = value(env, name).unwrap_or_else(|| default.to_string());
            v.parse().map_err(|_| {
                invalid(
                    name,
                    &v,
                    "expected an IP address and port, like 0.0.0.0:15001 or [::]:15001",
                )
            })
        };
        let outbound_addr = addr(env::PROXY_OUTBOUND_ADDR, DEFAULT_OUTBOUND_ADDR)?;
        let inbound_addr = addr(env::PROXY_INBOUND_ADDR, DEFAULT_INBOUND_ADDR)?;
        let admin_addr = addr(env::PROXY_ADMIN_ADDR, DEFAULT_ADMIN_ADDR)?;
        let ports = [
            (env::PROXY_OUTBOUND_ADDR, outbound_addr),
            (env::PROXY_INBOUND_ADDR, inbound_addr),
            (env::PROXY_ADMIN_ADDR, admin_addr),
        ];
        for (i, (name, a)) in ports.iter().enumerate() {
            for (other, b) in &ports[..i] {
                if a.port() != 0 && a.port() == b.port() {
                    return Err(invalid(
                        name,
                        &a.to_string(),
                        &format!("uses the same port as {other}; give each listener its own port"),
                    ));
                }
            }
        }

        let config_path = value(env, env::PROXY_CONFIG_PATH).map(PathBuf::from);

        let opaque_ports = match value(env, env::PROXY_OPAQUE_PORTS) {
            None => None,
            Some(v) => Some(
                parse_ports(&v).map_err(|reason| invalid(env::PROXY_OPAQUE_PORTS, &v, &reason))?,
            ),
        };

        let drain_timeout = match value(env, env::PROXY_DRAIN_TIMEOUT) {
            None => DEFAULT_DRAIN_TIMEOUT,
            Some(v) => v
                .parse()
                .map_err(|e: meshlet_api::duration::ParseDurationError| {
                    invalid(env::PROXY_DRAIN_TIMEOUT, &v, &e.to_string())
                })?,
        };

        let log = value(env, env::PROXY_LOG).unwrap_or_else(|| DEFAULT_LOG.to_string());
        if let Err(e) = tracing_subscriber::EnvFilter::try_new(&log) {
            return Err(invalid(
                env::PROXY_LOG,
                &log,
                &format!("{e}; write a filter like info or meshlet_proxy=debug,info"),
            ));
        }

        let worker_threads = match value(env, env::PROXY_WORKER_THREADS) {
            None => None,
            Some(v) => match v.parse::<usize>() {
                Ok(n) if (1..=1024).contains(&n) => Some(n),
                _ => return Err(invalid(
                    env::PROXY_WORKER_THREADS,
                    &v,
                    "expected a whole number from 1 to 1024 (or unset it to follow the CPU limit)",
                )),
            },
        };

        let pod_ip = match value(env, env::POD_IP) {
            None => None,
            Some(v) => Some(
                v.parse()
                    .map_err(|_| invalid(env::POD_IP, &v, "expected an IPv4 or IPv6 address"))?,
            ),
        };

        let identity_dir = value(env, env::PROXY_IDENTITY_DIR).map(PathBuf::from);
        let tls_mode = match value(env, env::PROXY_TLS_MODE) {
            None => TlsMode::default(),
            Some(v) => v.parse().map_err(|()| {
                invalid(
                    env::PROXY_TLS_MODE,
                    &v,
                    "expected permissive or strict (the meshlet.io/tls-mode annotation)",
                )
            })?,
        };
        let control_plane = match value(env, env::CONTROL_PLANE_ADDR) {
            None => None,
            Some(addr) => Some(control_plane(env, addr)?),
        };
        // The issuer needs the control plane and a token to show it; a mounted
        // identity directory wins over it: files are what an operator set on purpose.
        let issuer = match (
            &identity_dir,
            &control_plane,
            value(env, env::IDENTITY_TOKEN_PATH),
        ) {
            (None, Some(cp), Some(token)) => Some(IssuerConfig {
                control_plane: cp.clone(),
                token_path: token.into(),
            }),
            _ => None,
        };
        if tls_mode == TlsMode::Strict && identity_dir.is_none() && issuer.is_none() {
            return Err(invalid(
                env::PROXY_TLS_MODE,
                "strict",
                &format!(
                    "strict mode refuses everything but mesh mTLS, which needs {} or {} with {}; set them or use permissive",
                    env::PROXY_IDENTITY_DIR,
                    env::CONTROL_PLANE_ADDR,
                    env::IDENTITY_TOKEN_PATH
                ),
            ));
        }

        let app_probes = match value(env, env::PROXY_APP_PROBES) {
            None => Default::default(),
            Some(v) => meshlet_api::probes::parse(&v).map_err(|e| {
                invalid(
                    env::PROXY_APP_PROBES,
                    &v,
                    &format!("{e}; it must be the JSON object the injector writes"),
                )
            })?,
        };

        Ok(Self {
            outbound_addr,
            inbound_addr,
            admin_addr,
            config_path,
            opaque_ports,
            drain_timeout,
            log,
            worker_threads,
            pod_ip,
            pod_name: value(env, env::POD_NAME),
            pod_namespace: value(env, env::POD_NAMESPACE),
            service_account: value(env, env::SERVICE_ACCOUNT),
            identity_dir,
            issuer,
            tls_mode,
            app_probes,
            control_plane,
        })
    }
}

fn control_plane(env: &(impl Strings + ?Sized), addr: String) -> Result<ControlPlane, ConfigError> {
    let port_ok = addr
        .rsplit_once(':')
        .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p != 0));
    if !port_ok {
        return Err(invalid(
            env::CONTROL_PLANE_ADDR,
            &addr,
            &format!(
                "expected host:port, like meshlet-injector.meshlet-system.svc:{}",
                meshlet_api::ports::CONTROL_PLANE
            ),
        ));
    }
    let name = value(env, env::CONTROL_PLANE_NAME)
        .unwrap_or_else(|| meshlet_api::identity::CONTROL_PLANE_NAME.to_string());
    if rustls::pki_types::ServerName::try_from(name.as_str()).is_err() {
        return Err(invalid(
            env::CONTROL_PLANE_NAME,
            &name,
            "expected a DNS name (or IP address) the control plane's certificate carries",
        ));
    }
    let Some(trust_anchors) = value(env, env::TRUST_ANCHORS) else {
        return Err(invalid(
            env::TRUST_ANCHORS,
            "",
            &format!(
                "{} is set, so the control plane's certificate must be verified: set {} to \
                 the PEM of the mesh trust anchors",
                env::CONTROL_PLANE_ADDR,
                env::TRUST_ANCHORS
            ),
        ));
    };
    let certs = rustls::pki_types::CertificateDer::pem_slice_iter(trust_anchors.as_bytes())
        .collect::<Result<Vec<_>, _>>();
    if !certs.is_ok_and(|c| !c.is_empty()) {
        return Err(invalid(
            env::TRUST_ANCHORS,
            &trust_anchors,
            "expected PEM certificates (-----BEGIN CERTIFICATE-----)",
        ));
    }
    Ok(ControlPlane {
        addr,
        name,
        trust_anchors,
    })
}

/// A set, non-blank value; blank counts as unset, as Kubernetes writes empty strings
/// for absent downward-API fields.
fn value(env: &(impl Strings + ?Sized), name: &str) -> Option<String> {
    env.get(name)
        .map(|v| v.trim().to_string())
        .filter(|v| !v.is_empty())
}

fn invalid(name: &'static str, value: &str, reason: &str) -> ConfigError {
    ConfigError {
        name,
        value: value.to_string(),
        reason: reason.to_string(),
    }
}

/// Parses `25,587, 3306`; every entry must be a port from 1 to 65535.
pub fn parse_ports(s: &str) -> Result<Vec<u16>, String> {
    let mut ports = Vec::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        match part.parse::<u16>() {
            Ok(p) if p != 0 => ports.push(p),
            _ => {
                return Err(format!(
                "{part:?} is not a port; write comma-separated ports from 1 to 65535, like 25,3306"
            ))
            }
        }
    }
    ports.sort_unstable();
    ports.dedup();
    Ok(ports)
}
