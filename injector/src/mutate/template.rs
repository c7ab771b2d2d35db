//! The two injected containers and the token volume, built as typed k8s-openapi objects
//! so every field name is checked at compile time.

use std::collections::BTreeMap;

use k8s_openapi::{
    api::core::v1::{
        Capabilities, Container, ContainerPort, EnvVar, EnvVarSource, ExecAction, HTTPGetAction,
        Lifecycle, LifecycleHandler, ObjectFieldSelector, Probe, ProjectedVolumeSource,
        ResourceRequirements, SeccompProfile, SecurityContext, ServiceAccountTokenProjection,
        Volume, VolumeMount, VolumeProjection,
    },
    apimachinery::pkg::{api::resource::Quantity, util::intstr::IntOrString},
};
use meshlet_api::{
    annotations as ann, env, ports, INIT_CONTAINER_NAME, PROXY_CONTAINER_NAME, PROXY_GID, PROXY_UID,
};

use super::Denied;
use crate::{config::Defaults, validate::Overrides};
use meshlet_api::probes::AppProbes;

/// Name of the projected service-account token volume.
pub const TOKEN_VOLUME: &str = "meshlet-token";
/// Where the proxy finds its token (file `token` inside).
pub const TOKEN_MOUNT_PATH: &str = "/var/run/secrets/meshlet/tokens";
/// The token's file name in [`TOKEN_MOUNT_PATH`].
pub const TOKEN_FILE: &str = "token";
/// Audience of the projected token; the issuer accepts only this audience.
const TOKEN_AUDIENCE: &str = meshlet_api::identity::TOKEN_AUDIENCE;
/// Kubelet refreshes the token at 80% of its life; one hour keeps a stolen one short-lived.
const TOKEN_EXPIRATION_SECONDS: i64 = 3600;
/// Resources of meshlet-init: it runs one iptables-restore and exits.
const INIT_CPU: &str = "10m";
const INIT_MEMORY: &str = "10Mi";
const INIT_CPU_LIMIT: &str = "100m";
const INIT_MEMORY_LIMIT: &str = "50Mi";

/// Defaults merged with the pod's annotations.
pub(super) struct Settings {
    pub proxy_image: String,
    pub init_image: String,
    pub image_pull_policy: Option<String>,
    pub requests: BTreeMap<String, Quantity>,
    pub limits: BTreeMap<String, Quantity>,
    pub log_level: String,
    pub native_sidecar: bool,
    pub tls_mode: String,
    pub mesh_config_path: Option<String>,
    pub identity: Option<crate::config::IdentityEnv>,
    /// The pod's termination grace period, as the proxy's drain deadline.
    pub drain_timeout: Option<String>,
    pub o: Overrides,
}

impl Settings {
    pub(super) fn new(o: &Overrides, d: &Defaults) -> Result<Self, Denied> {
        let mut requests = BTreeMap::new();
        let mut limits = BTreeMap::new();
        for (res, req_ann, lim_ann, req_ovr, lim_ovr, req_def, lim_def) in [
            (
                "cpu",
                ann::PROXY_CPU,
                ann::PROXY_CPU_LIMIT,
                &o.proxy_cpu,
                &o.proxy_cpu_limit,
                &d.proxy_cpu,
                &d.proxy_cpu_limit,
            ),
            (
                "memory",
                ann::PROXY_MEMORY,
                ann::PROXY_MEMORY_LIMIT,
                &o.proxy_memory,
                &o.proxy_memory_limit,
                &d.proxy_memory,
                &d.proxy_memory_limit,
            ),
        ] {
            let (req, lim) = resolve_pair(req_ann, lim_ann, req_ovr, lim_ovr, req_def, lim_def)?;
            if let Some(r) = req {
                requests.insert(res.to_string(), Quantity(r));
            }
            if let Some(l) = lim {
                limits.insert(res.to_string(), Quantity(l));
            }
        }
        Ok(Self {
            proxy_image: d.proxy_image.clone(),
            init_image: d.init_image.clone(),
            image_pull_policy: d.image_pull_policy.clone(),
            requests,
            limits,
            log_level: o.log_level.clone().unwrap_or_else(|| d.log_level.clone()),
            native_sidecar: o.native_sidecar.unwrap_or(d.native_sidecar),
            tls_mode: o.tls_mode.clone().unwrap_or_else(|| d.tls_mode.clone()),
            mesh_config_path: d.mesh_config_path.clone(),
            identity: d.identity.clone(),
            drain_timeout: None,
            o: o.clone(),
        })
    }
}

/// An annotation beats a default; when that makes a request exceed a limit, the side that
/// came from a default gives way (the API server would refuse the pod otherwise). Two
/// conflicting annotations are the user's mistake and are refused.
fn resolve_pair(
    req_ann: &'static str,
    lim_ann: &'static str,
    req_ovr: &Option<String>,
    lim_ovr: &Option<String>,
    req_def: &Option<String>,
    lim_def: &Option<String>,
) -> Result<(Option<String>, Option<String>), Denied> {
    let value = |s: &str| crate::validate::quantity(s).unwrap_or(0.0);
    let req = req_ovr.clone().or_else(|| req_def.clone());
    let lim = lim_ovr.clone().or_else(|| lim_def.clone());
    let (Some(r), Some(l)) = (&req, &lim) else {
        return Ok((req, lim));
    };
    if value(r) <= value(l) {
        return Ok((req, lim));
    }
    match (req_ovr.is_some(), lim_ovr.is_some()) {
        (true, true) => Err(Denied::RequestAboveLimit {
            request: req_ann,
            request_value: r.clone(),
            limit: lim_ann,
            limit_value: l.clone(),
        }),
        // The request was asked for: raise the default limit to it.
        (true, false) => Ok((req.clone(), req)),
        // The limit was asked for: lower the default request to it.
        _ => Ok((lim.clone(), lim)),
    }
}

fn field_env(name: &str, path: &str) -> EnvVar {
    EnvVar {
        name: name.to_string(),
        value_from: Some(EnvVarSource {
            field_ref: Some(ObjectFieldSelector {
                field_path: path.to_string(),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn value_env(name: &str, value: impl Into<String>) -> EnvVar {
    EnvVar {
        name: name.to_string(),
        value: Some(value.into()),
        ..Default::default()
    }
}

fn quantities(pairs: [(&str, &str); 2]) -> BTreeMap<String, Quantity> {
    pairs
        .into_iter()
        .map(|(k, v)| (k.to_string(), Quantity(v.to_string())))
        .collect()
}

/// The iptables init container: root with NET_ADMIN and NET_RAW only, nothing else.
pub(super) fn init_container(s: &Settings) -> Container {
    let o = &s.o;
    let mut env_vars = vec![
        value_env(env::INIT_PROXY_UID, PROXY_UID.to_string()),
        value_env(env::INIT_PROXY_GID, PROXY_GID.to_string()),
        value_env(env::INIT_OUTBOUND_PORT, ports::OUTBOUND.to_string()),
        value_env(env::INIT_INBOUND_PORT, ports::INBOUND.to_string()),
        value_env(
            env::INIT_INBOUND_PORTS,
            o.inbound_ports.clone().unwrap_or_else(|| "*".into()),
        ),
    ];
    // meshlet-init always leaves the proxy's own ports (admin 15020 included) out of
    // capture, so only the user's exclusions are passed.
    let optional = [
        (env::INIT_EXCLUDE_INBOUND_PORTS, &o.exclude_inbound_ports),
        (env::INIT_EXCLUDE_OUTBOUND_PORTS, &o.exclude_outbound_ports),
        (env::INIT_INCLUDE_OUTBOUND_CIDRS, &o.include_outbound_cidrs),
        (env::INIT_EXCLUDE_OUTBOUND_CIDRS, &o.exclude_outbound_cidrs),
    ];
    for (name, v) in optional {
        if let Some(v) = v {
            env_vars.push(value_env(name, v.clone()));
        }
    }
    Container {
        name: INIT_CONTAINER_NAME.to_string(),
        image: Some(s.init_image.clone()),
        image_pull_policy: s.image_pull_policy.clone(),
        command: Some(vec![INIT_CONTAINER_NAME.to_string()]),
        env: Some(env_vars),
        resources: Some(ResourceRequirements {
            requests: Some(quantities([("cpu", INIT_CPU), ("memory", INIT_MEMORY)])),
            limits: Some(quantities([
                ("cpu", INIT_CPU_LIMIT),
                ("memory", INIT_MEMORY_LIMIT),
            ])),
            ..Default::default()
        }),
        security_context: Some(SecurityContext {
            run_as_user: Some(0),
            run_as_group: Some(0),
            run_as_non_root: Some(false),
            privileged: Some(false),
            allow_privilege_escalation: Some(false),
            // iptables takes its lock under /run; keep the root filesystem writable.
            read_only_root_filesystem: Some(false),
            capabilities: Some(Capabilities {
                add: Some(vec!["NET_ADMIN".to_string(), "NET_RAW".to_string()]),
                drop: Some(vec!["ALL".to_string()]),
            }),
            ..Default::default()
        }),
        termination_message_policy: Some("FallbackToLogsOnError".to_string()),
        ..Default::default()
    }
}

fn admin_get(path: &str) -> Option<HTTPGetAction> {
    Some(HTTPGetAction {
        path: Some(path.to_string()),
        port: IntOrString::Int(i32::from(ports::ADMIN)),
        scheme: Some("HTTP".to_string()),
        ..Default::default()
    })
}

/// The sidecar, as a native sidecar or as a classic first container.
pub(super) fn proxy_container(s: &Settings, app_probes: &AppProbes) -> Container {
    let mut env_vars = vec![
        field_env(env::POD_NAME, "metadata.name"),
        field_env(env::POD_NAMESPACE, "metadata.namespace"),
        field_env(env::POD_IP, "status.podIP"),
        field_env(env::SERVICE_ACCOUNT, "spec.serviceAccountName"),
        value_env(env::PROXY_LOG, s.log_level.clone()),
        value_env(env::PROXY_TLS_MODE, s.tls_mode.clone()),
    ];
    if let Some(p) = &s.mesh_config_path {
        env_vars.push(value_env(env::PROXY_CONFIG_PATH, p.clone()));
    }
    if let Some(id) = &s.identity {
        env_vars.push(value_env(env::CONTROL_PLANE_ADDR, id.address.clone()));
        env_vars.push(value_env(env::CONTROL_PLANE_NAME, id.name.clone()));
        env_vars.push(value_env(env::TRUST_ANCHORS, id.trust_anchors.clone()));
        env_vars.push(value_env(
            env::IDENTITY_TOKEN_PATH,
            format!("{TOKEN_MOUNT_PATH}/{TOKEN_FILE}"),
        ));
    }
    if let Some(d) = &s.drain_timeout {
        env_vars.push(value_env(env::PROXY_DRAIN_TIMEOUT, d.clone()));
    }
    if let Some(p) = &s.o.opaque_ports {
        env_vars.push(value_env(env::PROXY_OPAQUE_PORTS, p.clone()));
    }
    if !app_probes.is_empty() {
        // Serialising a map of plain structs cannot fail.
        let json = serde_json::to_string(app_probes).unwrap_or_default();
        env_vars.push(value_env(env::PROXY_APP_PROBES, json));
    }
    let readiness = Probe {
        http_get: admin_get("/ready"),
        period_seconds: Some(10),
        timeout_seconds: Some(3),
        failure_threshold: Some(3),
        ..Default::default()
    };
    let mut c = Container {
        name: PROXY_CONTAINER_NAME.to_string(),
        image: Some(s.proxy_image.clone()),
        image_pull_policy: s.image_pull_policy.clone(),
        command: Some(vec![PROXY_CONTAINER_NAME.to_string()]),
        env: Some(env_vars),
        ports: Some(vec![ContainerPort {
            name: Some("meshlet-admin".to_string()),
            container_port: i32::from(ports::ADMIN),
            protocol: Some("TCP".to_string()),
            ..Default::default()
        }]),
        readiness_probe: Some(readiness),
        // A wedged proxy takes the pod's traffic down with it: let kubelet restart it.
        liveness_probe: Some(Probe {
            http_get: admin_get("/live"),
            period_seconds: Some(10),
            timeout_seconds: Some(3),
            failure_threshold: Some(3),
            ..Default::default()
        }),
        resources: Some(ResourceRequirements {
            requests: Some(s.requests.clone()).filter(|m| !m.is_empty()),
            limits: Some(s.limits.clone()).filter(|m| !m.is_empty()),
            ..Default::default()
        }),
        security_context: Some(SecurityContext {
            run_as_user: Some(i64::from(PROXY_UID)),
            run_as_group: Some(i64::from(PROXY_GID)),
            run_as_non_root: Some(true),
            read_only_root_filesystem: Some(true),
            allow_privilege_escalation: Some(false),
            privileged: Some(false),
            capabilities: Some(Capabilities {
                drop: Some(vec!["ALL".to_string()]),
                ..Default::default()
            }),
            seccomp_profile: Some(SeccompProfile {
                type_: "RuntimeDefault".to_string(),
                ..Default::default()
            }),
            ..Default::default()
        }),
        volume_mounts: Some(vec![VolumeMount {
            name: TOKEN_VOLUME.to_string(),
            mount_path: TOKEN_MOUNT_PATH.to_string(),
            read_only: Some(true),
            ..Default::default()
        }]),
        termination_message_policy: Some("FallbackToLogsOnError".to_string()),
        ..Default::default()
    };
    if s.native_sidecar {
        c.restart_policy = Some("Always".to_string());
        // Kubelet starts the next init container (and then the app) only once the
        // startup probe passes, so the app never sends traffic to a proxy not yet ready.
        c.startup_probe = Some(Probe {
            http_get: admin_get("/ready"),
            period_seconds: Some(1),
            timeout_seconds: Some(3),
            failure_threshold: Some(600),
            ..Default::default()
        });
    } else {
        // Kubelet runs postStart to completion before starting the next container, so
        // blocking here holds the app until the proxy is ready.
        c.lifecycle = Some(Lifecycle {
            post_start: Some(LifecycleHandler {
                exec: Some(ExecAction {
                    command: Some(vec![
                        PROXY_CONTAINER_NAME.to_string(),
                        "wait-ready".to_string(),
                    ]),
                }),
                ..Default::default()
            }),
            ..Default::default()
        });
    }
    c
}

/// The projected service-account token the proxy presents with its CSR.
pub(super) fn token_volume() -> Volume {
    Volume {
        name: TOKEN_VOLUME.to_string(),
        projected: Some(ProjectedVolumeSource {
            sources: Some(vec![VolumeProjection {
                service_account_token: Some(ServiceAccountTokenProjection {
                    audience: Some(TOKEN_AUDIENCE.to_string()),
                    expiration_seconds: Some(TOKEN_EXPIRATION_SECONDS),
                    path: TOKEN_FILE.to_string(),
                }),
                ..Default::default()
            }]),
            ..Default::default()
        }),
        ..Default::default()
    }
}
