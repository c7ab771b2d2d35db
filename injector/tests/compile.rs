//! `meshlet-injector compile --from-files`: manifests in, mesh config JSON out, against
//! golden files (`UPDATE_GOLDEN=1` rewrites them).

use std::path::Path;

use meshlet_api::{route::Filter, MeshConfig};
use meshlet_injector::compile::compile_dir;

fn golden(name: &str, actual: &str) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/testdata/compile-golden")
        .join(name);
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::write(&path, actual).unwrap();
        return;
    }
    let expected = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "cannot read {}: {e}; run with UPDATE_GOLDEN=1",
            path.display()
        )
    });
    assert_eq!(
        actual,
        expected,
        "{} differs; review and rerun with UPDATE_GOLDEN=1",
        path.display()
    );
}

fn compiled() -> meshlet_injector::compile::Compiled {
    compile_dir(&Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/testdata/compile")).unwrap()
}

#[test]
fn compiles_manifests_to_the_golden_mesh_config() {
    let c = compiled();
    let json = serde_json::to_string_pretty(&c.config).unwrap() + "\n";
    golden("mesh.json", &json);
    let problems: String = c.problems.iter().map(|p| format!("{p}\n")).collect();
    golden("problems.txt", &problems);
    // The output is a valid document the proxy accepts.
    assert_eq!(MeshConfig::from_json(json.as_bytes()).unwrap(), c.config);
}

#[test]
fn invalid_routes_are_reported_with_gateway_api_reasons_and_left_out() {
    let c = compiled();
    let reasons: Vec<(&str, &str)> = c
        .problems
        .iter()
        .map(|p| (p.route.as_str(), p.reason))
        .collect();
    assert_eq!(
        reasons,
        [
            ("bookinfo/bad-regex", "UnsupportedValue"),
            ("bookinfo/missing-backend", "BackendNotFound"),
            ("bookinfo/mirror", "UnsupportedValue"),
            ("shop/reviews-from-shop", "RefNotPermitted"),
        ]
    );
    assert!(
        c.problems[0]
            .message
            .contains("rules[0].matches[0].path.value"),
        "{}",
        c.problems[0]
    );
    let reviews = c
        .config
        .services
        .iter()
        .find(|s| s.name == "reviews")
        .unwrap();
    let names: Vec<&str> = reviews.routes.iter().map(|r| r.name.as_str()).collect();
    assert_eq!(
        names,
        ["reviews", "reviews-redirect", "reviews-from-frontend"],
        "valid routes still apply, the granted consumer route too"
    );
}

#[test]
fn services_get_identities_routes_and_defaults() {
    let c = compiled();
    let svc = |n: &str| c.config.services.iter().find(|s| s.name == n).unwrap();
    let reviews = svc("reviews");
    assert!(reviews.meshed);
    let ids: Vec<String> = reviews.identities.iter().map(|i| i.to_string()).collect();
    assert_eq!(
        ids,
        [
            "spiffe://cluster.local/ns/bookinfo/sa/bookinfo-reviews",
            "spiffe://cluster.local/ns/bookinfo/sa/bookinfo-reviews-v2"
        ]
    );
    assert_eq!(reviews.cluster_ips.len(), 2);
    let db = svc("db");
    assert!(!db.meshed && db.identities.is_empty() && db.cluster_ips.is_empty());

    let canary = &reviews.routes[0];
    assert_eq!(canary.port, Some(9080));
    assert_eq!(
        canary.rules[0].matches[0].path.as_ref().unwrap().value,
        "/",
        "defaulted path"
    );
    let split = &canary.rules[1];
    let weights: Vec<(&str, u32)> = split
        .backend_refs
        .iter()
        .map(|b| (b.name.as_str(), b.weight))
        .collect();
    assert_eq!(weights, [("reviews-v1", 80), ("reviews-v2", 20)]);
    assert_eq!(
        split.backend_refs[0].namespace, "bookinfo",
        "namespace defaults to the route's"
    );

    let rewrite = &svc("reviews-v1").routes[0];
    assert!(matches!(rewrite.rules[0].filters[0], Filter::UrlRewrite(_)));
    assert!(matches!(
        rewrite.rules[0].backend_refs[0].filters[0],
        Filter::ResponseHeaderModifier(_)
    ));
}

#[test]
fn traffic_policies_set_retry_budgets() {
    let c = compiled();
    let svc = |n: &str| c.config.services.iter().find(|s| s.name == n).unwrap();
    let rc = svc("reviews-v2").retry_constraint.as_ref().unwrap();
    assert_eq!(rc.budget.percent, 30);
    assert_eq!(rc.budget.interval, meshlet_api::Duration::from_secs(20));
    assert_eq!(rc.min_retry_rate.count, 5);
    assert_eq!(
        rc.min_retry_rate.interval,
        meshlet_api::Duration::from_secs(1),
        "defaulted"
    );
    assert!(svc("reviews").retry_constraint.is_none());

    let policy = |name: &str, target: &str, spec: &str| {
        format!(
            "apiVersion: gateway.networking.x-k8s.io/v1alpha1\nkind: XBackendTrafficPolicy\n\
             metadata: {{name: {name}, namespace: shop}}\n\
             spec: {{targetRefs: [{{group: '', kind: Service, name: {target}}}], {spec}}}\n"
        )
    };
    let docs = [
        "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: shop}\n\
         spec: {clusterIP: 198.19.0.20, ports: [{port: 80}]}\n"
            .to_string(),
        policy("a", "web", "retryConstraint: {budget: {percent: 50}}"),
        policy("b", "web", "retryConstraint: {budget: {percent: 10}}"),
        policy("c", "nope", "retryConstraint: {}"),
        policy("d", "web", "retryConstraint: {budget: {percent: 150}}"),
        policy("e", "web", "retryConstraint: {budgett: {}}"),
        policy("f", "web", "sessionPersistence: {}"),
    ];
    let objects: Vec<serde_json::Value> = docs
        .iter()
        .map(|d| serde_yaml::from_str(d).unwrap())
        .collect();
    let c = meshlet_injector::compile::compile(&objects).unwrap();
    let rc = c.config.services[0].retry_constraint.as_ref().unwrap();
    assert_eq!(rc.budget.percent, 50, "the first policy wins");
    let reasons: Vec<(&str, &str, &str)> = c
        .problems
        .iter()
        .map(|p| (p.kind, p.route.as_str(), p.reason))
        .collect();
    assert_eq!(
        reasons,
        [
            ("XBackendTrafficPolicy", "shop/b", "Conflicted"),
            ("XBackendTrafficPolicy", "shop/c", "TargetNotFound"),
            ("XBackendTrafficPolicy", "shop/d", "Invalid"),
            ("XBackendTrafficPolicy", "shop/e", "Invalid"),
        ]
    );
    assert!(
        c.problems[2].message.contains("percent is 150"),
        "{}",
        c.problems[2]
    );
    assert!(
        c.problems[0]
            .to_string()
            .starts_with("XBackendTrafficPolicy shop/b left out: Conflicted"),
        "{}",
        c.problems[0]
    );
}

#[test]
fn cli_writes_the_file_and_reports_problems_on_stderr() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("mesh.json");
    let res = std::process::Command::new(env!("CARGO_BIN_EXE_meshlet-injector"))
        .args(["compile", "--from-files"])
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/testdata/compile"))
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    assert!(res.status.success(), "{res:?}");
    let stderr = String::from_utf8_lossy(&res.stderr);
    assert!(
        stderr.contains("HTTPRoute bookinfo/missing-backend left out: BackendNotFound"),
        "{stderr}"
    );
    let cfg = MeshConfig::from_json(&std::fs::read(&out).unwrap()).unwrap();
    assert_eq!(cfg, compiled().config);
}
