//! Injects every real manifest in the shared corpus (`../shared/corpus/manifests`
//! relative to the repo root, written by others) and checks the invariants that must hold
//! for any workload, not just the ones we wrote.

use std::path::PathBuf;

use meshlet_injector::{offline::inject_yaml, Defaults};
use serde::Deserialize;
use serde_json::Value;

const WORKLOADS: [&str; 7] = [
    "Deployment",
    "StatefulSet",
    "DaemonSet",
    "ReplicaSet",
    "Job",
    "CronJob",
    "Pod",
];

fn corpus_dir() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/corpus/manifests");
    assert!(
        dir.is_dir(),
        "the shared corpus is missing at {}: these tests read real manifests from \
         /work/shared/corpus/manifests (../shared/corpus relative to the repo root); \
         check out the corpus next to the repo",
        dir.display()
    );
    dir
}

fn docs(yaml: &str) -> Vec<Value> {
    serde_yaml::Deserializer::from_str(yaml)
        .map(|d| serde_yaml::Value::deserialize(d).expect("valid YAML"))
        .filter(|v| !v.is_null())
        .map(|v| serde_json::to_value(v).expect("JSON-compatible YAML"))
        .collect()
}

fn template(obj: &Value) -> Option<&Value> {
    match obj["kind"].as_str()? {
        "Pod" => Some(obj),
        "CronJob" => obj.pointer("/spec/jobTemplate/spec/template"),
        k if WORKLOADS.contains(&k) => obj.pointer("/spec/template"),
        _ => None,
    }
}

fn names(list: &Value) -> Vec<&str> {
    list.as_array()
        .map(|a| a.iter().filter_map(|c| c["name"].as_str()).collect())
        .unwrap_or_default()
}

fn env<'a>(container: &'a Value, name: &str) -> Option<&'a str> {
    container["env"]
        .as_array()?
        .iter()
        .find(|e| e["name"] == name)?["value"]
        .as_str()
}

/// Checks one injected pod template against its original.
fn check_pod(id: &str, before: &Value, after: &Value) -> usize {
    let inits = &after["spec"]["initContainers"];
    let init_names = names(inits);
    assert_eq!(
        init_names.first(),
        Some(&"meshlet-init"),
        "{id}: meshlet-init must be the first init container"
    );
    assert_eq!(
        init_names.get(1),
        Some(&"meshlet-proxy"),
        "{id}: native proxy right after meshlet-init"
    );
    assert_eq!(inits[1]["restartPolicy"], "Always", "{id}");
    // The app's own init containers follow, in their order.
    let orig_inits = names(&before["spec"]["initContainers"]);
    assert_eq!(
        &init_names[2..],
        &orig_inits[..],
        "{id}: app init containers kept in order"
    );
    assert_eq!(
        names(&after["spec"]["containers"]),
        names(&before["spec"]["containers"]),
        "{id}: app containers unchanged in number and order"
    );
    let caps = &inits[0]["securityContext"]["capabilities"];
    assert_eq!(
        caps["add"],
        serde_json::json!(["NET_ADMIN", "NET_RAW"]),
        "{id}"
    );
    assert_eq!(caps["drop"], serde_json::json!(["ALL"]), "{id}");
    let psc = &inits[1]["securityContext"];
    assert_eq!(psc["runAsUser"], 1337, "{id}");
    assert_eq!(psc["readOnlyRootFilesystem"], true, "{id}");

    // Existing annotations are kept with their values.
    let after_anns = &after["metadata"]["annotations"];
    if let Some(orig) = before["metadata"]["annotations"].as_object() {
        for (k, v) in orig {
            assert_eq!(&after_anns[k], v, "{id}: annotation {k} changed");
        }
    }
    assert!(
        after_anns["meshlet.io/status"].is_string(),
        "{id}: status annotation"
    );

    // httpGet probes point at the proxy and the proxy knows every original; other
    // probe kinds are untouched.
    let app_probes: Value = env(&inits[1], "MESHLET_APP_PROBES")
        .map(|s| serde_json::from_str(s).expect("MESHLET_APP_PROBES is JSON"))
        .unwrap_or(Value::Object(Default::default()));
    let mut http_probes = 0;
    let orig_containers = before["spec"]["containers"].as_array().unwrap();
    for (c, orig) in after["spec"]["containers"]
        .as_array()
        .unwrap()
        .iter()
        .zip(orig_containers)
    {
        for (field, kind) in [
            ("livenessProbe", "livez"),
            ("readinessProbe", "readyz"),
            ("startupProbe", "startupz"),
        ] {
            let (p, o) = (&c[field], &orig[field]);
            if o.get("httpGet").is_some() {
                http_probes += 1;
                let path = format!("/app-health/{}/{kind}", c["name"].as_str().unwrap());
                assert_eq!(p["httpGet"]["path"], path.as_str(), "{id}");
                assert_eq!(p["httpGet"]["port"], 15020, "{id}");
                assert!(
                    app_probes.get(&path).is_some(),
                    "{id}: {path} missing from MESHLET_APP_PROBES"
                );
            } else {
                assert_eq!(p, o, "{id}: non-httpGet {field} must be left alone");
            }
        }
    }
    assert_eq!(
        app_probes.as_object().map(|m| m.len()).unwrap_or(0),
        http_probes,
        "{id}"
    );
    http_probes
}

#[test]
fn every_corpus_manifest_injects_cleanly() {
    let mut files: Vec<PathBuf> = std::fs::read_dir(corpus_dir())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml" || e == "yml"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "the corpus folder holds no manifests");
    let mut injected_total = 0;
    let mut http_probes = 0;
    for file in files {
        let name = file.file_name().unwrap().to_string_lossy().to_string();
        let input = std::fs::read_to_string(&file).unwrap();
        let output = inject_yaml(&input, &Defaults::default())
            .unwrap_or_else(|e| panic!("{name}: injection failed: {e}"));
        let (before, after) = (docs(&input), docs(&output));
        assert_eq!(before.len(), after.len(), "{name}: documents lost or added");
        for (i, (b, a)) in before.iter().zip(&after).enumerate() {
            let id = format!(
                "{name} doc {} {} {}",
                i + 1,
                b["kind"],
                b["metadata"]["name"]
            );
            match (template(b), template(a)) {
                (Some(tb), Some(ta)) => {
                    http_probes += check_pod(&id, tb, ta);
                    injected_total += 1;
                    // Nothing outside the pod template changes.
                    let (mut b2, mut a2) = (b.clone(), a.clone());
                    for v in [&mut b2, &mut a2] {
                        if let Some(t) = v.pointer_mut("/spec/template") {
                            *t = Value::Null;
                        }
                    }
                    if b["kind"] != "Pod" {
                        assert_eq!(b2, a2, "{id}: fields outside the pod template changed");
                    }
                }
                _ => assert_eq!(b, a, "{id}: non-workload changed"),
            }
        }
        let again = inject_yaml(&output, &Defaults::default()).unwrap();
        assert_eq!(
            again, output,
            "{name}: injecting the output again changed it"
        );
    }
    // bookinfo 6 + emojivoto 4 + boutique 12 + curl, helloworld 2, httpbin, tcp-echo
    assert!(
        injected_total >= 20,
        "only {injected_total} workloads injected"
    );
    // Online Boutique's frontend has httpGet probes with headers: the rewrite must run.
    assert!(
        http_probes >= 2,
        "only {http_probes} httpGet probes rewritten in the corpus"
    );
}

#[test]
fn bookinfo_productpage_keeps_its_scrape_annotations() {
    let input = std::fs::read_to_string(
        corpus_dir().join("istio__samples_bookinfo_platform_kube_bookinfo.yaml"),
    )
    .unwrap();
    let out = docs(&inject_yaml(&input, &Defaults::default()).unwrap());
    let pp = out
        .iter()
        .find(|d| d["kind"] == "Deployment" && d["metadata"]["name"] == "productpage-v1")
        .expect("productpage-v1 Deployment");
    let anns = &pp["spec"]["template"]["metadata"]["annotations"];
    assert_eq!(anns["prometheus.io/port"], "9080");
    assert_eq!(anns["prometheus.io/scrape"], "true");
}
