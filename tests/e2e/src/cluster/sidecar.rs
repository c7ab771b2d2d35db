//! Where the injected pod specs come from.
//!
//! The preferred source is the real injector: `meshlet-injector inject -f FILE`, whose
//! output the mini-cluster runs as is. While that command is not available, a
//! hand-written stand-in adds the same two containers from the names in `meshlet-api`,
//! and the cluster reports which of the two paths it used.

use std::{collections::BTreeMap, path::Path, process::Command, time::Duration};

use k8s_openapi::{
    api::core::v1::{
        Capabilities, Container, ContainerPort, EnvVar, EnvVarSource, HTTPGetAction,
        ObjectFieldSelector, Pod, Probe, SecurityContext,
    },
    apimachinery::pkg::util::intstr::IntOrString,
};
use meshlet_api::{annotations as ann, env, ports};

use super::{netns, Error};

/// Image name the stand-in gives the injected containers; the kubelet maps it to the
/// built binaries.
pub const PROXY_IMAGE: &str = "ghcr.io/meshlet/meshlet-proxy:dev";

/// Which path produced the injected specs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum InjectPath {
    /// `meshlet-injector inject -f`.
    Injector,
    /// The stand-in in this module, with the reason the injector was not used.
    HandWritten(String),
}

impl std::fmt::Display for InjectPath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            InjectPath::Injector => write!(f, "meshlet-injector inject -f (the real injector)"),
            InjectPath::HandWritten(why) => {
                write!(f, "the e2e harness's hand-written sidecar spec ({why})")
            }
        }
    }
}

/// Runs `meshlet-injector inject -f FILE` and returns the injected YAML.
pub fn run_injector(bin: &Path, file: &Path) -> Result<String, Error> {
    let mut c = Command::new(bin);
    c.arg("inject").arg("-f").arg(file);
    let out = netns::run_with_timeout(&mut c, Duration::from_secs(30))?;
    netns::check(&c, out)
}

/// Whether a pod is to be injected: pod label first, then namespace label.
pub fn wants_injection(pod: &Pod, ns_labels: &BTreeMap<String, String>) -> bool {
    let label = |m: Option<&BTreeMap<String, String>>| {
        m.and_then(|l| l.get(meshlet_api::INJECT_LABEL)).cloned()
    };
    match label(pod.metadata.labels.as_ref()).as_deref() {
        Some("enabled") => true,
        Some("disabled") => false,
        _ => label(Some(ns_labels)).as_deref() == Some("enabled"),
    }
}

/// Whether a pod spec carries the meshlet sidecar.
pub fn is_injected(pod: &Pod) -> bool {
    pod.spec.as_ref().is_some_and(|s| {
        s.containers
            .iter()
            .chain(s.init_containers.iter().flatten())
            .any(|c| c.name == meshlet_api::PROXY_CONTAINER_NAME)
    })
}

fn var(name: &str, value: impl Into<String>) -> EnvVar {
    EnvVar {
        name: name.into(),
        value: Some(value.into()),
        value_from: None,
    }
}

fn field(name: &str, path: &str) -> EnvVar {
    EnvVar {
        name: name.into(),
        value: None,
        value_from: Some(EnvVarSource {
            field_ref: Some(ObjectFieldSelector {
                api_version: None,
                field_path: path.into(),
            }),
            ..Default::default()
        }),
    }
}

/// Adds `meshlet-init` and a native-sidecar `meshlet-proxy` to `pod`, as the injector
/// is specified to (DESIGN.md): annotations become init and proxy env.
pub fn hand_inject(pod: &mut Pod) {
    let annotations = pod.metadata.annotations.clone().unwrap_or_default();
    let a = |k: &str| annotations.get(k).cloned();
    let mut exclude_in: Vec<String> = a(ann::EXCLUDE_INBOUND_PORTS)
        .into_iter()
        .filter(|s| !s.is_empty())
        .collect();
    // The admin port serves kubelet probes; it must not loop through the proxy.
    exclude_in.push(ports::ADMIN.to_string());
    let mut init_env = vec![
        var(env::INIT_PROXY_UID, meshlet_api::PROXY_UID.to_string()),
        var(env::INIT_PROXY_GID, meshlet_api::PROXY_GID.to_string()),
        var(env::INIT_OUTBOUND_PORT, ports::OUTBOUND.to_string()),
        var(env::INIT_INBOUND_PORT, ports::INBOUND.to_string()),
        var(
            env::INIT_INBOUND_PORTS,
            a(ann::INBOUND_PORTS).unwrap_or_else(|| "*".into()),
        ),
        var(env::INIT_EXCLUDE_INBOUND_PORTS, exclude_in.join(",")),
        var(
            env::INIT_INCLUDE_OUTBOUND_CIDRS,
            a(ann::INCLUDE_OUTBOUND_CIDRS).unwrap_or_else(|| "*".into()),
        ),
        var(env::INIT_IPV6, "auto"),
    ];
    if let Some(v) = a(ann::EXCLUDE_OUTBOUND_PORTS) {
        init_env.push(var(env::INIT_EXCLUDE_OUTBOUND_PORTS, v));
    }
    if let Some(v) = a(ann::EXCLUDE_OUTBOUND_CIDRS) {
        init_env.push(var(env::INIT_EXCLUDE_OUTBOUND_CIDRS, v));
    }
    let init = Container {
        name: meshlet_api::INIT_CONTAINER_NAME.into(),
        image: Some(PROXY_IMAGE.into()),
        command: Some(vec!["meshlet-init".into()]),
        env: Some(init_env),
        security_context: Some(SecurityContext {
            run_as_user: Some(0),
            run_as_non_root: Some(false),
            capabilities: Some(Capabilities {
                add: Some(vec!["NET_ADMIN".into(), "NET_RAW".into()]),
                drop: Some(vec!["ALL".into()]),
            }),
            ..Default::default()
        }),
        ..Default::default()
    };
    let mut proxy_env = vec![
        field(env::POD_NAME, "metadata.name"),
        field(env::POD_NAMESPACE, "metadata.namespace"),
        field(env::POD_IP, "status.podIP"),
        field(env::SERVICE_ACCOUNT, "spec.serviceAccountName"),
        var(env::PROXY_CONFIG_PATH, "/var/run/meshlet/config/mesh.json"),
        var(
            env::PROXY_LOG,
            a(ann::LOG_LEVEL).unwrap_or_else(|| "info".into()),
        ),
    ];
    if let Some(v) = a(ann::OPAQUE_PORTS) {
        proxy_env.push(var(env::PROXY_OPAQUE_PORTS, v));
    }
    if let Some(v) = a(ann::TLS_MODE) {
        proxy_env.push(var(env::PROXY_TLS_MODE, v));
    }
    let proxy = Container {
        name: meshlet_api::PROXY_CONTAINER_NAME.into(),
        image: Some(PROXY_IMAGE.into()),
        restart_policy: Some("Always".into()),
        env: Some(proxy_env),
        ports: Some(vec![ContainerPort {
            name: Some("meshlet-admin".into()),
            container_port: ports::ADMIN.into(),
            ..Default::default()
        }]),
        readiness_probe: Some(Probe {
            http_get: Some(HTTPGetAction {
                path: Some("/ready".into()),
                port: IntOrString::Int(ports::ADMIN.into()),
                ..Default::default()
            }),
            ..Default::default()
        }),
        security_context: Some(SecurityContext {
            run_as_user: Some(meshlet_api::PROXY_UID.into()),
            run_as_group: Some(meshlet_api::PROXY_GID.into()),
            run_as_non_root: Some(true),
            allow_privilege_escalation: Some(false),
            read_only_root_filesystem: Some(true),
            capabilities: Some(Capabilities {
                add: None,
                drop: Some(vec!["ALL".into()]),
            }),
            ..Default::default()
        }),
        ..Default::default()
    };
    let spec = pod.spec.get_or_insert_with(Default::default);
    let mut inits = vec![init, proxy];
    inits.extend(spec.init_containers.take().unwrap_or_default());
    spec.init_containers = Some(inits);
    pod.metadata
        .annotations
        .get_or_insert_with(Default::default)
        .insert(
            ann::STATUS.into(),
            format!(
                r#"{{"injectedBy":"meshlet-e2e hand-written stand-in","version":"{}"}}"#,
                meshlet_api::VERSION
            ),
        );
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

    fn pod(labels: &[(&str, &str)], annotations: &[(&str, &str)]) -> Pod {
        Pod {
            metadata: ObjectMeta {
                labels: Some(
                    labels
                        .iter()
                        .map(|(k, v)| (k.to_string(), v.to_string()))
                        .collect(),
                ),
                annotations: Some(
                    annotations
                        .iter()
                        .map(|(k, v)| (k.to_string(), v.to_string()))
                        .collect(),
                ),
                ..Default::default()
            },
            spec: Some(Default::default()),
            status: None,
        }
    }

    #[test]
    fn labels_decide_injection() {
        let on: BTreeMap<_, _> =
            [(meshlet_api::INJECT_LABEL.to_string(), "enabled".to_string())].into();
        assert!(wants_injection(&pod(&[], &[]), &on));
        assert!(!wants_injection(
            &pod(&[(meshlet_api::INJECT_LABEL, "disabled")], &[]),
            &on
        ));
        assert!(wants_injection(
            &pod(&[(meshlet_api::INJECT_LABEL, "enabled")], &[]),
            &BTreeMap::new()
        ));
        assert!(!wants_injection(&pod(&[], &[]), &BTreeMap::new()));
    }

    #[test]
    fn stand_in_carries_annotations_into_env() {
        let mut p = pod(&[], &[(ann::EXCLUDE_INBOUND_PORTS, "9090")]);
        assert!(!is_injected(&p));
        hand_inject(&mut p);
        assert!(is_injected(&p));
        let inits = p.spec.as_ref().unwrap().init_containers.clone().unwrap();
        assert_eq!(inits[0].name, "meshlet-init");
        let ex = inits[0]
            .env
            .iter()
            .flatten()
            .find(|e| e.name == env::INIT_EXCLUDE_INBOUND_PORTS)
            .unwrap();
        assert_eq!(ex.value.as_deref(), Some("9090,15020"));
        assert_eq!(inits[1].restart_policy.as_deref(), Some("Always"));
        assert_eq!(
            inits[1].security_context.as_ref().unwrap().run_as_user,
            Some(1337)
        );
    }
}
