use meshlet_api::config::Endpoint;

use super::*;

const OBJECTS: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: shop, annotations: {meshlet.io/default-inbound-policy: mesh-only}}
---
apiVersion: v1
kind: Namespace
metadata: {name: typo, annotations: {meshlet.io/default-inbound-policy: closed}}
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: cart, namespace: shop}
spec: {template: {metadata: {labels: {app: cart, tier: back}}}}
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: cart-canary, namespace: shop}
spec: {template: {metadata: {labels: {app: cart, tier: canary}}}}
---
apiVersion: v1
kind: Pod
metadata: {name: web-0, namespace: shop, labels: {app: web}}
status: {podIP: 198.18.0.9, podIPs: [{ip: 198.18.0.9}, {ip: "fd00:6d65:7368::9"}]}
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec: {selector: {app: web}}
---
apiVersion: policy.meshlet.io/v1alpha1
kind: AuthorizationPolicy
metadata: {name: cart-from-web, namespace: shop}
spec:
  targetRefs: [{group: "", kind: Service, name: cart}]
  action: ALLOW
  rules:
    - sources:
        - {type: ServiceAccount, serviceAccount: {name: web}}
        - {type: SPIFFE, spiffe: "spiffe://other.org/ns/x/sa/y"}
      networkAttributes: {ports: [8080]}
---
apiVersion: policy.meshlet.io/v1alpha1
kind: AuthorizationPolicy
metadata: {name: canary-ops, namespace: shop}
spec:
  targetRefs: [{kind: Pod, selector: {matchExpressions: [{key: tier, operator: In, values: [canary]}]}}]
  action: ALLOW
  rules: [{sources: [{type: ServiceAccount, serviceAccount: {namespace: ops, name: "*"}}]}]
---
apiVersion: policy.meshlet.io/v1alpha1
kind: AuthorizationPolicy
metadata: {name: whole-ns, namespace: shop}
spec:
  targetRefs: [{kind: Namespace}]
  action: ALLOW
  rules: [{}]
---
apiVersion: policy.meshlet.io/v1alpha1
kind: AuthorizationPolicy
metadata: {name: web-by-service, namespace: shop}
spec:
  targetRefs: [{kind: Service, name: web}]
  action: ALLOW
"#;

fn objects(extra: &str) -> Vec<Value> {
    let mut out = Vec::new();
    for doc in serde_yaml::Deserializer::from_str(&format!("{OBJECTS}{extra}")) {
        let v = Value::deserialize(doc).unwrap();
        if !v.is_null() {
            out.push(v);
        }
    }
    out
}

fn ep(ip: &str, pod: &str) -> Endpoint {
    Endpoint {
        ip: ip.parse().unwrap(),
        ports: BTreeMap::new(),
        ready: true,
        pod_name: Some(pod.into()),
        identity: None,
    }
}

fn services() -> Vec<Service> {
    let svc = |name: &str, endpoints| Service {
        name: name.into(),
        namespace: "shop".into(),
        cluster_ips: vec![],
        ports: vec![],
        meshed: false,
        identities: vec![],
        endpoints,
        routes: vec![],
        retry_constraint: None,
        outlier_detection: None,
    };
    vec![
        svc(
            "cart",
            vec![
                ep("198.18.0.2", "cart-7d9-a"),
                ep("198.18.0.3", "cart-canary-5f-b"),
            ],
        ),
        svc("web", vec![]),
    ]
}

fn compiled(extra: &str) -> (Authorization, Vec<PolicyProblem>) {
    let (a, p) = compile(&objects(extra), &services(), DefaultPolicy::AllAllowed);
    let a = a.expect("policies configured");
    a.validate().unwrap();
    (a, p)
}

fn policies_of(a: &Authorization, ip: &str) -> Vec<String> {
    let ip: IpAddr = ip.parse().unwrap();
    a.workloads
        .iter()
        .find(|w| w.ips.contains(&ip))
        .unwrap_or_else(|| panic!("no workload {ip}"))
        .policies
        .clone()
}

#[test]
fn resolves_each_target_kind_to_pod_addresses() {
    let (a, problems) = compiled("");
    assert_eq!(a.namespaces.get("shop"), Some(&DefaultPolicy::MeshOnly));
    assert_eq!(
        policies_of(&a, "198.18.0.2"),
        vec!["shop/cart-from-web", "shop/whole-ns"],
        "Service endpoint of the cart template"
    );
    assert_eq!(
        policies_of(&a, "198.18.0.3"),
        vec!["shop/canary-ops", "shop/cart-from-web", "shop/whole-ns"],
        "the canary's pod name picks the longer template name"
    );
    assert_eq!(
        policies_of(&a, "198.18.0.9"),
        vec!["shop/web-by-service", "shop/whole-ns"],
        "a Pod object, by the Service's selector"
    );
    let web = a
        .workloads
        .iter()
        .find(|w| w.pod_name.as_deref() == Some("web-0"))
        .unwrap();
    assert_eq!(web.ips.len(), 2, "both families of one pod");

    let cart = a
        .policies
        .iter()
        .find(|p| p.name == "cart-from-web")
        .unwrap();
    assert_eq!(cart.rules[0].ports, vec![8080]);
    assert_eq!(
        cart.rules[0].sources.as_deref().unwrap(),
        &[
            Source::ServiceAccount {
                namespace: "shop".into(),
                name: "web".into()
            },
            Source::Spiffe("spiffe://other.org/ns/x/sa/y".into())
        ],
        "serviceAccount.namespace defaults to the policy's"
    );
    let web_policy = a
        .policies
        .iter()
        .find(|p| p.name == "web-by-service")
        .unwrap();
    assert!(web_policy.rules.is_empty(), "no rules: allows nothing");
    let ns = a.policies.iter().find(|p| p.name == "whole-ns").unwrap();
    assert_eq!(
        ns.rules,
        vec![Rule::default()],
        "an empty rule: every caller"
    );

    assert_eq!(problems.len(), 1, "{problems:?}");
    assert_eq!(problems[0].object, "Namespace typo");
    assert!(problems[0]
        .message
        .contains("use all-allowed, mesh-only or deny"));
}

#[test]
fn nothing_configured_leaves_the_section_out() {
    let plain = r#"{"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "x"}}"#;
    let objs = vec![serde_json::from_str(plain).unwrap()];
    let (a, p) = compile(&objs, &services(), DefaultPolicy::AllAllowed);
    assert!(a.is_none() && p.is_empty());
    let (a, _) = compile(&objs, &services(), DefaultPolicy::Deny);
    assert_eq!(a.unwrap().default_policy, DefaultPolicy::Deny);
}

#[test]
fn invalid_policies_are_left_out_with_the_field_and_reason() {
    let cases = [
        ("targetRefs: [{kind: Service, name: gone}]", "TargetNotFound", "spec.targetRefs[0]: Service shop/gone does not exist"),
        ("targetRefs: [{kind: Pod, selector: {matchLabels: {app: nope}}}]", "TargetNotFound", "picks no pod"),
        ("targetRefs: [{kind: Service, name: web, selector: {}}]", "Invalid", "may only be set when targeting Pods"),
        ("targetRefs: [{kind: Pod, selector: {}}, {kind: Service, name: web}]", "Invalid", "must be the only target"),
        ("targetRefs: [{kind: Pod, name: x, selector: {}}]", "Invalid", "leave name empty"),
        ("targetRefs: [{kind: Namespace, name: other}]", "Invalid", "only target its own namespace"),
        ("targetRefs: [{kind: Gateway, name: g}]", "Invalid", "use Service, Namespace or Pod"),
        ("targetRefs: []", "Invalid", "at least one target"),
        ("targetRefs: [{kind: Namespace}]\n  rules: [{networkAttributes: {ports: [70000]}}]", "Invalid", "ports[0]: 70000 is no port"),
        ("targetRefs: [{kind: Namespace}]\n  rules: [{sources: [{type: SPIFFE, spiffe: \"spiffe://nopath\"}]}]", "Invalid", "must start with spiffe://"),
        ("targetRefs: [{kind: Namespace}]\n  rules: [{sources: [{type: SPIFFE, serviceAccount: {name: a}}]}]", "Invalid", "type SPIFFE needs its own field"),
        ("targetRefs: [{kind: Namespace}]\n  rules: [{sources: [{type: IP}]}]", "Invalid", "use ServiceAccount or SPIFFE"),
    ];
    for (spec, reason, want) in cases {
        let bad = format!(
            "---\napiVersion: policy.meshlet.io/v1alpha1\nkind: AuthorizationPolicy\n\
             metadata: {{name: bad, namespace: shop}}\nspec:\n  action: ALLOW\n  {spec}\n"
        );
        let (a, problems) = compiled(&bad);
        let p = problems
            .iter()
            .find(|p| p.object == "AuthorizationPolicy shop/bad")
            .unwrap_or_else(|| panic!("{spec}: no problem in {problems:?}"));
        assert_eq!(p.reason, reason, "{spec}: {p}");
        assert!(p.message.contains(want), "{spec}: {p}");
        assert!(a.policies.iter().all(|p| p.name != "bad"), "{spec}");
        assert_eq!(a.policies.len(), 4, "the valid ones still apply");
    }
    let deny = "---\napiVersion: policy.meshlet.io/v1alpha1\nkind: AuthorizationPolicy\n\
                metadata: {name: bad, namespace: shop}\nspec: {action: DENY, targetRefs: [{kind: Namespace}]}\n";
    let (_, problems) = compiled(deny);
    assert!(problems
        .iter()
        .any(|p| p.message.contains("the only action is ALLOW")));
}

#[test]
fn accepted_condition_names_the_rejected_field() {
    let bad = "---\napiVersion: policy.meshlet.io/v1alpha1\nkind: AuthorizationPolicy\n\
               metadata: {name: bad, namespace: shop}\n\
               spec: {action: ALLOW, targetRefs: [{kind: Service, name: gone}]}\n";
    let (_, problems) = compiled(bad);
    let c = accepted_condition(&problems, "shop/bad", Some(3), "2026-11-25T00:00:00Z");
    assert_eq!(c["status"], "False");
    assert_eq!(c["reason"], "TargetNotFound");
    assert_eq!(c["observedGeneration"], 3);
    assert!(c["message"]
        .as_str()
        .unwrap()
        .starts_with("spec.targetRefs[0]: Service shop/gone does not exist"));
    let ok = accepted_condition(&problems, "shop/whole-ns", None, "2026-11-25T00:00:00Z");
    assert_eq!(
        (ok["status"].as_str(), ok["reason"].as_str()),
        (Some("True"), Some("Accepted"))
    );
    assert!(ok.get("observedGeneration").is_none());
}
