//! `meshlet-injector compile --from-files`: manifests in, mesh config JSON out, against
//! golden files (`UPDATE_GOLDEN=1` rewrites them).

use std::path::Path;

use meshlet_api::{
    route::{Filter, PathMatchType, RouteKind},
    MeshConfig,
};
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
    let problems: String = c
        .problems
        .iter()
        .map(|p| format!("{p}\n"))
        .chain(c.conflicts.iter().map(|p| format!("{p}\n")))
        .collect();
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
            ("rpc/greeter-mirror", "UnsupportedValue"),
            ("shop/greeter-from-shop", "RefNotPermitted"),
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
        [
            "reviews",
            "reviews-redirect",
            "reviews-from-frontend",
            "reviews-self-from-shop"
        ],
        "valid routes still apply, the granted consumer route and the one back to its parent too"
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

/// A Service with `annotations`, compiled next to one without.
fn compile_service(annotations: serde_json::Value) -> meshlet_injector::compile::Compiled {
    let svc = serde_json::json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "web", "namespace": "shop", "annotations": annotations},
        "spec": {"clusterIP": "198.19.0.10", "ports": [{"port": 80}]}
    });
    let other = serde_json::json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "db", "namespace": "shop"},
        "spec": {"clusterIP": "198.19.0.11", "ports": [{"port": 5432}]}
    });
    meshlet_injector::compile::compile(&[svc, other]).unwrap()
}

#[test]
fn outlier_annotations_compile_into_the_service() {
    use meshlet_api::{config::OutlierDetection, Duration};
    let od = |a| {
        let c = compile_service(a);
        assert!(c.bad_annotations.is_empty(), "{:?}", c.bad_annotations);
        let web = c.config.services.iter().find(|s| s.name == "web").unwrap();
        web.outlier_detection.clone()
    };
    assert_eq!(
        od(serde_json::json!({})),
        None,
        "no annotation: proxy defaults"
    );
    assert_eq!(
        od(serde_json::json!({"meshlet.io/outlier-consecutive-failures": " 3 "})),
        Some(OutlierDetection {
            consecutive_failures: 3,
            ..OutlierDetection::default()
        })
    );
    assert_eq!(
        od(serde_json::json!({
            "meshlet.io/outlier-consecutive-failures": "0",
            "meshlet.io/outlier-base-ejection": "500ms",
            "meshlet.io/outlier-max-ejection": "1m",
        })),
        Some(OutlierDetection {
            consecutive_failures: 0,
            base_ejection: Duration::from_millis(500),
            max_ejection: Duration::from_secs(60),
        })
    );
}

#[test]
fn bad_outlier_annotations_are_refused_naming_annotation_and_value() {
    let cases = [
        (
            serde_json::json!({"meshlet.io/outlier-consecutive-failures": "five"}),
            "annotation meshlet.io/outlier-consecutive-failures has the invalid value \"five\": write a whole number",
        ),
        (
            serde_json::json!({"meshlet.io/outlier-consecutive-failures": "-1"}),
            "meshlet.io/outlier-consecutive-failures has the invalid value \"-1\"",
        ),
        (
            serde_json::json!({"meshlet.io/outlier-base-ejection": "1 second"}),
            "meshlet.io/outlier-base-ejection has the invalid value \"1 second\": invalid duration",
        ),
        (
            serde_json::json!({"meshlet.io/outlier-base-ejection": "0s"}),
            "meshlet.io/outlier-base-ejection has the invalid value \"0s\": an ejection must last more than zero",
        ),
        (
            serde_json::json!({"meshlet.io/outlier-max-ejection": "500ms"}),
            "meshlet.io/outlier-max-ejection has the invalid value \"500ms\": the longest ejection (500ms) is shorter than the first (1s)",
        ),
    ];
    for (annotations, want) in cases {
        // Refused for this Service alone: the document still compiles, with the
        // defaults for it, and the other Service is untouched.
        let c = compile_service(annotations);
        assert_eq!(c.bad_annotations.len(), 1, "{want}");
        let e = c.bad_annotations[0].to_string();
        assert!(
            e.starts_with("Service shop/web: ")
                && e.contains(want)
                && e.contains("fix or remove the annotation"),
            "{e}"
        );
        assert_eq!(c.config.services.len(), 2);
        assert!(c
            .config
            .services
            .iter()
            .all(|s| s.outlier_detection.is_none()));
    }
}

#[test]
fn grpc_routes_compile_to_path_matches_and_take_their_port_from_http_routes() {
    let c = compiled();
    let greeter = c
        .config
        .services
        .iter()
        .find(|s| s.namespace == "rpc" && s.name == "greeter")
        .unwrap();
    let kinds: Vec<(&str, RouteKind, Option<u16>)> = greeter
        .routes
        .iter()
        .map(|r| (r.name.as_str(), r.kind, r.port))
        .collect();
    assert_eq!(
        kinds,
        [
            ("greeter", RouteKind::Grpc, Some(50051)),
            ("greeter-web", RouteKind::Http, Some(8080)),
        ],
        "greeter-http conflicts on 50051 and is left out; greeter-web on 8080 stays"
    );
    let grpc = &greeter.routes[0];
    let paths: Vec<(Option<&str>, PathMatchType, &str)> = grpc
        .rules
        .iter()
        .map(|r| {
            let p = r.matches[0].path.as_ref().unwrap();
            (r.name.as_deref(), p.kind, p.value.as_str())
        })
        .collect();
    assert_eq!(
        paths,
        [
            (Some("default"), PathMatchType::PathPrefix, "/"),
            (Some("service"), PathMatchType::PathPrefix, "/pkg.Greeter"),
            (Some("exact"), PathMatchType::Exact, "/pkg.Greeter/SayHello"),
            (
                Some("method-only"),
                PathMatchType::RegularExpression,
                "/[^/]+/Check"
            ),
            (
                Some("regex"),
                PathMatchType::RegularExpression,
                r"/(?:pkg\.v[0-9]+\.Greeter)/(?:Say.*)"
            ),
            (Some("header-only"), PathMatchType::PathPrefix, "/"),
        ]
    );
    let exact = &grpc.rules[2];
    assert_eq!(
        exact.matches[0].headers.len(),
        1,
        "X-Canary repeats x-canary: only the first counts"
    );
    assert!(matches!(exact.filters[0], Filter::RequestHeaderModifier(_)));
    assert!(matches!(
        exact.backend_refs[0].filters[0],
        Filter::ResponseHeaderModifier(_)
    ));
    assert_eq!(c.conflicts.len(), 1, "{:?}", c.conflicts);
    let conflict = &c.conflicts[0];
    assert_eq!(
        (
            conflict.route.as_str(),
            conflict.service.as_str(),
            conflict.port,
            conflict.by.as_str()
        ),
        (
            "rpc/greeter-http",
            "rpc/greeter",
            Some(50051),
            "rpc/greeter"
        )
    );
    let refused = c
        .problems
        .iter()
        .find(|p| p.route == "rpc/greeter-mirror")
        .unwrap();
    assert_eq!(refused.kind, "GRPCRoute");
    assert!(
        refused.message.contains("RequestMirror is not supported"),
        "{refused}"
    );
}
