//! Kubernetes manifests in, pods out: what the API server and the workload
//! controllers would do, reduced to what the mini-cluster needs.

use std::collections::BTreeMap;

use k8s_openapi::{
    api::{
        apps::v1::{Deployment, StatefulSet},
        core::v1::{Namespace, Pod, PodTemplateSpec, Service},
    },
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};
use serde::Deserialize;

use super::Error;

/// The objects of a manifest file the mini-cluster acts on.
#[derive(Clone, Debug, Default)]
pub struct Manifests {
    /// Namespaces (their labels turn injection on).
    pub namespaces: Vec<Namespace>,
    /// Services.
    pub services: Vec<Service>,
    /// Pod-producing workloads.
    pub workloads: Vec<Workload>,
    /// Kinds present but not acted on (ServiceAccount, ConfigMap, ...).
    pub ignored: Vec<String>,
}

/// A Deployment, StatefulSet or bare Pod.
#[derive(Clone, Debug)]
pub struct Workload {
    /// Kind of the object.
    pub kind: String,
    /// Its name.
    pub name: String,
    /// Its namespace.
    pub namespace: String,
    /// Number of pods.
    pub replicas: i32,
    /// The pod template.
    pub template: PodTemplateSpec,
}

/// Parses a multi-document YAML file (documents of kind `List` are flattened).
pub fn parse(yaml: &str) -> Result<Manifests, Error> {
    let mut m = Manifests::default();
    for doc in serde_yaml::Deserializer::from_str(yaml) {
        let v = serde_yaml::Value::deserialize(doc)
            .map_err(|e| Error::Manifest(format!("not valid YAML: {e}")))?;
        add(&mut m, v)?;
    }
    Ok(m)
}

fn add(m: &mut Manifests, v: serde_yaml::Value) -> Result<(), Error> {
    if v.is_null() {
        return Ok(());
    }
    let kind = v
        .get("kind")
        .and_then(|k| k.as_str())
        .ok_or_else(|| Error::Manifest("a document has no kind".into()))?
        .to_string();
    let bad = |e: serde_yaml::Error| Error::Manifest(format!("{kind}: {e}"));
    match kind.as_str() {
        "List" => {
            if let Some(items) = v.get("items").and_then(|i| i.as_sequence()) {
                for i in items.clone() {
                    add(m, i)?;
                }
            }
        }
        "Namespace" => m.namespaces.push(serde_yaml::from_value(v).map_err(bad)?),
        "Service" => m.services.push(serde_yaml::from_value(v).map_err(bad)?),
        "Deployment" => {
            let d: Deployment = serde_yaml::from_value(v).map_err(bad)?;
            let spec = d.spec.unwrap_or_default();
            m.workloads.push(Workload {
                kind,
                name: name_of(&d.metadata)?,
                namespace: ns_of(&d.metadata),
                replicas: spec.replicas.unwrap_or(1),
                template: spec.template,
            });
        }
        "StatefulSet" => {
            let s: StatefulSet = serde_yaml::from_value(v).map_err(bad)?;
            let spec = s.spec.unwrap_or_default();
            m.workloads.push(Workload {
                kind,
                name: name_of(&s.metadata)?,
                namespace: ns_of(&s.metadata),
                replicas: spec.replicas.unwrap_or(1),
                template: spec.template,
            });
        }
        "Pod" => {
            let p: Pod = serde_yaml::from_value(v).map_err(bad)?;
            m.workloads.push(Workload {
                kind,
                name: name_of(&p.metadata)?,
                namespace: ns_of(&p.metadata),
                replicas: 1,
                template: PodTemplateSpec {
                    metadata: Some(p.metadata),
                    spec: p.spec,
                },
            });
        }
        _ => m.ignored.push(kind),
    }
    Ok(())
}

fn name_of(meta: &ObjectMeta) -> Result<String, Error> {
    meta.name
        .clone()
        .ok_or_else(|| Error::Manifest("an object has no metadata.name".into()))
}

fn ns_of(meta: &ObjectMeta) -> String {
    meta.namespace.clone().unwrap_or_else(|| "default".into())
}

impl Manifests {
    /// Labels of namespace `ns`, if the manifests declare it.
    pub fn namespace_labels(&self, ns: &str) -> BTreeMap<String, String> {
        self.namespaces
            .iter()
            .find(|n| n.metadata.name.as_deref() == Some(ns))
            .and_then(|n| n.metadata.labels.clone())
            .unwrap_or_default()
    }

    /// The pods the workload controllers would create, `replicas` overridden per
    /// workload name by `scale`.
    pub fn pods(&self, scale: &BTreeMap<String, i32>) -> Vec<Pod> {
        let mut pods = Vec::new();
        for w in &self.workloads {
            let replicas = scale.get(&w.name).copied().unwrap_or(w.replicas).max(0);
            for i in 0..replicas {
                let mut meta = w.template.metadata.clone().unwrap_or_default();
                meta.name = Some(if w.kind == "Pod" {
                    w.name.clone()
                } else {
                    format!("{}-{i}", w.name)
                });
                meta.namespace = Some(w.namespace.clone());
                pods.push(Pod {
                    metadata: meta,
                    spec: w.template.spec.clone(),
                    status: None,
                });
            }
        }
        pods
    }
}

/// Whether a Service selector matches a pod's labels.
pub fn selects(selector: &BTreeMap<String, String>, labels: &BTreeMap<String, String>) -> bool {
    !selector.is_empty() && selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

#[cfg(test)]
mod tests {
    use super::*;

    const DOC: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: hello, labels: {meshlet.io/inject: enabled}}
---
apiVersion: v1
kind: List
items:
- apiVersion: apps/v1
  kind: Deployment
  metadata: {name: web, namespace: hello}
  spec:
    replicas: 2
    selector: {matchLabels: {app: web}}
    template:
      metadata: {labels: {app: web}}
      spec: {containers: [{name: app, image: "meshlet-testapp:latest"}]}
---
apiVersion: v1
kind: ServiceAccount
metadata: {name: web, namespace: hello}
"#;

    #[test]
    fn expands_workloads_into_pods() {
        let m = parse(DOC).unwrap();
        assert_eq!(m.namespace_labels("hello")["meshlet.io/inject"], "enabled");
        assert_eq!(m.ignored, vec!["ServiceAccount".to_string()]);
        let pods = m.pods(&BTreeMap::new());
        let names: Vec<_> = pods
            .iter()
            .map(|p| p.metadata.name.clone().unwrap())
            .collect();
        assert_eq!(names, ["web-0", "web-1"]);
        assert_eq!(pods[0].metadata.namespace.as_deref(), Some("hello"));
        let scaled = m.pods(&[("web".to_string(), 0)].into_iter().collect());
        assert!(scaled.is_empty());
    }

    #[test]
    fn selector_needs_every_label() {
        let l: BTreeMap<_, _> = [("app".into(), "web".into()), ("v".into(), "1".into())].into();
        assert!(selects(&[("app".into(), "web".into())].into(), &l));
        assert!(!selects(&[("app".into(), "db".into())].into(), &l));
        assert!(!selects(&BTreeMap::new(), &l));
    }
}
