//! `meshlet-injector inject`: the webhook's mutation applied to manifests on disk, like
//! `istioctl kube-inject`. Each workload's pod template is turned into a Pod, run through
//! [`mutate`](crate::mutate::mutate), and the resulting JSON Patch is applied with
//! `json_patch`, so the offline output is exactly what the webhook would admit.

use k8s_openapi::api::core::v1::Pod;
use serde::Deserialize;
use serde_json::{Map, Value};

use crate::{
    config::Defaults,
    mutate::{mutate, Context, Denied, Outcome},
};

/// Why a manifest could not be injected.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The input is not YAML.
    #[error("document {doc}: not valid YAML: {source}")]
    Yaml {
        /// 1-based document number.
        doc: usize,
        /// Parser error (carries line and column).
        source: serde_yaml::Error,
    },
    /// A document is YAML but not a Kubernetes object meshlet can represent.
    #[error("document {doc}: cannot be read as a Kubernetes object: {reason}")]
    NotAnObject {
        /// 1-based document number.
        doc: usize,
        /// What is wrong.
        reason: String,
    },
    /// A pod template that does not parse as a Pod.
    #[error("{kind} {name:?}: the pod template is not a valid pod: {reason}")]
    BadTemplate {
        /// Workload kind.
        kind: String,
        /// Workload name.
        name: String,
        /// Parser message.
        reason: String,
    },
    /// The injector refused the pod, as the webhook would.
    #[error("{kind} {name:?}: refused: {source}")]
    Denied {
        /// Workload kind.
        kind: String,
        /// Workload name.
        name: String,
        /// Why.
        source: Box<Denied>,
    },
    /// Applying the patch failed (a bug: the patch is built from the same pod).
    #[error("{kind} {name:?}: internal error applying the patch: {reason}")]
    Patch {
        /// Workload kind.
        kind: String,
        /// Workload name.
        name: String,
        /// json-patch's message.
        reason: String,
    },
}

/// Injects every workload in a (multi-document) YAML stream and returns the YAML output.
/// Empty documents are dropped; other kinds pass through unchanged.
pub fn inject_yaml(input: &str, defaults: &Defaults) -> Result<String, Error> {
    let mut out = String::new();
    for (i, doc) in serde_yaml::Deserializer::from_str(input).enumerate() {
        let doc_no = i + 1;
        let yaml = serde_yaml::Value::deserialize(doc).map_err(|source| Error::Yaml {
            doc: doc_no,
            source,
        })?;
        if yaml.is_null() {
            continue;
        }
        let mut obj = serde_json::to_value(&yaml).map_err(|e| Error::NotAnObject {
            doc: doc_no,
            reason: e.to_string(),
        })?;
        if !obj.is_object() {
            return Err(Error::NotAnObject {
                doc: doc_no,
                reason: "expected a mapping with apiVersion and kind".to_string(),
            });
        }
        inject_object(&mut obj, defaults)?;
        let text = crate::yaml::to_string(&obj);
        if !out.is_empty() {
            out.push_str("---\n");
        }
        out.push_str(&text);
    }
    Ok(out)
}

/// Injects one object in place: a Pod, a workload with a pod template, or a List of them.
pub fn inject_object(obj: &mut Value, defaults: &Defaults) -> Result<(), Error> {
    let kind = obj
        .get("kind")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string();
    let name = obj
        .pointer("/metadata/name")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string();
    let namespace = obj
        .pointer("/metadata/namespace")
        .and_then(Value::as_str)
        .map(str::to_string);
    let template_path = match kind.as_str() {
        "List" | "PodList" | "DeploymentList" => {
            if let Some(items) = obj.get_mut("items").and_then(Value::as_array_mut) {
                for item in items {
                    inject_object(item, defaults)?;
                }
            }
            return Ok(());
        }
        "Pod" => None,
        "Deployment"
        | "StatefulSet"
        | "DaemonSet"
        | "ReplicaSet"
        | "ReplicationController"
        | "Job" => Some("/spec/template"),
        "CronJob" => Some("/spec/jobTemplate/spec/template"),
        _ => return Ok(()),
    };
    let ctx = Context { namespace };
    match template_path {
        None => inject_pod_json(obj, &ctx, defaults, &kind, &name),
        Some(path) => {
            let Some(template) = obj.pointer_mut(path) else {
                return Ok(());
            };
            let mut pod = Map::new();
            pod.insert("apiVersion".into(), "v1".into());
            pod.insert("kind".into(), "Pod".into());
            pod.insert(
                "metadata".into(),
                template
                    .get("metadata")
                    .cloned()
                    .unwrap_or_else(|| Value::Object(Map::new())),
            );
            pod.insert(
                "spec".into(),
                template.get("spec").cloned().unwrap_or(Value::Null),
            );
            let mut pod = Value::Object(pod);
            let before = pod.clone();
            inject_pod_json(&mut pod, &ctx, defaults, &kind, &name)?;
            if pod == before {
                // Unchanged: leave the template byte-for-byte alone (no added `metadata: {}`).
                return Ok(());
            }
            if let (Some(t), Value::Object(mut p)) = (template.as_object_mut(), pod) {
                for key in ["metadata", "spec"] {
                    if let Some(v) = p.remove(key) {
                        t.insert(key.to_string(), v);
                    }
                }
            }
            Ok(())
        }
    }
}

/// Mutates a Pod given as JSON in place; the webhook tests use it to check that the
/// patch a review returns gives the same pod as the offline path.
pub fn inject_pod_json(
    pod: &mut Value,
    ctx: &Context,
    defaults: &Defaults,
    kind: &str,
    name: &str,
) -> Result<(), Error> {
    if pod.get("metadata").is_none_or(Value::is_null) {
        if let Some(o) = pod.as_object_mut() {
            o.insert("metadata".into(), Value::Object(Map::new()));
        }
    }
    let typed: Pod = serde_json::from_value(pod.clone()).map_err(|e| Error::BadTemplate {
        kind: kind.to_string(),
        name: name.to_string(),
        reason: e.to_string(),
    })?;
    let outcome = mutate(&typed, ctx, defaults).map_err(|source| Error::Denied {
        kind: kind.to_string(),
        name: name.to_string(),
        source: Box::new(source),
    })?;
    if let Outcome::Inject(ops) = outcome {
        for w in crate::mutate::warnings(&typed, defaults) {
            tracing::warn!(kind, name, "{w}");
        }
        json_patch::patch(pod, &ops).map_err(|e| Error::Patch {
            kind: kind.to_string(),
            name: name.to_string(),
            reason: e.to_string(),
        })?;
    }
    Ok(())
}
