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
                if w.kind == "Pod" {
                    meta.name = Some(w.name.clone());
                } else {
                    // As the ReplicaSet/StatefulSet controllers name their pods.
                    meta.generate_name = Some(format!("{}-", w.name));
                    meta.name = Some(format!("{}-{i}", w.name));
                }
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

/// Sets pod-template annotations: each `(workload, key, value)` applies to the
/// Deployment, StatefulSet or Pod named `workload`. Returns the edited YAML.
pub fn annotate(yaml: &str, edits: &[(String, String, String)]) -> Result<String, Error> {
    let mut out = String::new();
    let mut applied = vec![false; edits.len()];
    for doc in serde_yaml::Deserializer::from_str(yaml) {
        let mut v = serde_yaml::Value::deserialize(doc)
            .map_err(|e| Error::Manifest(format!("not valid YAML: {e}")))?;
        if v.is_null() {
            continue;
        }
        edit(&mut v, edits, &mut applied);
        out.push_str("---\n");
        out.push_str(
            &serde_yaml::to_string(&v).map_err(|e| Error::Manifest(format!("YAML: {e}")))?,
        );
    }
    if let Some(i) = applied.iter().position(|a| !a) {
        return Err(Error::Manifest(format!(
            "no Deployment, StatefulSet or Pod named {} to annotate",
            edits[i].0
        )));
    }
    Ok(out)
}

fn edit(v: &mut serde_yaml::Value, edits: &[(String, String, String)], applied: &mut [bool]) {
    let kind = v
        .get("kind")
        .and_then(|k| k.as_str())
        .unwrap_or("")
        .to_string();
    if kind == "List" {
        if let Some(items) = v.get_mut("items").and_then(|i| i.as_sequence_mut()) {
            for item in items {
                edit(item, edits, applied);
            }
        }
        return;
    }
    let name = v
        .get("metadata")
        .and_then(|m| m.get("name"))
        .and_then(|n| n.as_str())
        .unwrap_or("")
        .to_string();
    for (i, (w, key, value)) in edits.iter().enumerate() {
        if *w != name || !["Deployment", "StatefulSet", "Pod"].contains(&kind.as_str()) {
            continue;
        }
        let meta = if kind == "Pod" {
            &mut v["metadata"]
        } else {
            &mut v["spec"]["template"]["metadata"]
        };
        if meta.get("annotations").is_none_or(|a| a.is_null()) {
            meta["annotations"] = serde_yaml::Value::Mapping(Default::default());
        }
        meta["annotations"][key.as_str()] = value.as_str().into();
        applied[i] = true;
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
    fn annotates_pod_templates() {
        let edits = vec![(
            "web".to_string(),
            "meshlet.io/opaque-ports".to_string(),
            "4444".to_string(),
        )];
        let out = annotate(DOC, &edits).unwrap();
        let pods = parse(&out).unwrap().pods(&BTreeMap::new());
        let a = pods[0].metadata.annotations.clone().unwrap();
        assert_eq!(a["meshlet.io/opaque-ports"], "4444");
        let missing = vec![("nope".to_string(), "k".to_string(), "v".to_string())];
        assert!(annotate(DOC, &missing).is_err());
    }

    #[test]
    fn selector_needs_every_label() {
        let l: BTreeMap<_, _> = [("app".into(), "web".into()), ("v".into(), "1".into())].into();
        assert!(selects(&[("app".into(), "web".into())].into(), &l));
        assert!(!selects(&[("app".into(), "db".into())].into(), &l));
        assert!(!selects(&BTreeMap::new(), &l));
    }
}
