use k8s_openapi::api::core::v1::Pod;
use meshlet_api::{MeshConfig, CONTROLLER_NAME};
use serde_json::{json, Value};

use super::{
    next_document, route_names,
    status::{self, Outcome},
    world::{self, World},
};

fn service(ns: &str, name: &str, ip: &str, selector: Value) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name, "namespace": ns},
        "spec": {"clusterIP": ip, "clusterIPs": [ip], "selector": selector,
                 "ports": [{"name": "http", "port": 80, "targetPort": "http"},
                           {"name": "metrics", "port": 9090}]},
    })
}

fn pod(ns: &str, name: &str, sa: &str, labels: Value, meshed: bool, phase: &str) -> Value {
    let annotations = if meshed {
        json!({"meshlet.io/status": "{\"version\":\"0.1.0\"}"})
    } else {
        json!({})
    };
    let p: Pod = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": ns, "labels": labels, "annotations": annotations,
                     "managedFields": [{"manager": "kubectl"}]},
        "spec": {"serviceAccountName": sa, "containers": [{"name": "app", "image": "app:1"}]},
        "status": {"phase": phase, "podIP": "198.18.1.1"},
    }))
    .expect("pod");
    world::slim_pod(p).unwrap_or(Value::Null)
}

fn slice(ns: &str, name: &str, svc: &str, ports: Value, endpoints: Value) -> Value {
    json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": name, "namespace": ns,
                     "labels": {"kubernetes.io/service-name": svc}},
        "addressType": "IPv4", "ports": ports, "endpoints": endpoints,
    })
}

fn route(ns: &str, name: &str, generation: i64, spec: Value) -> Value {
    json!({
        "apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
        "metadata": {"name": name, "namespace": ns, "generation": generation,
                     "resourceVersion": "7"},
        "spec": spec,
    })
}

fn web_route(backend: &str) -> Value {
    json!({
        "parentRefs": [{"group": "", "kind": "Service", "name": "web", "port": 80}],
        "rules": [{"backendRefs": [{"name": backend, "port": 80}]}],
    })
}

fn base_world() -> World {
    World {
        objects: vec![
            service("shop", "web", "198.19.0.10", json!({"app": "web"})),
            pod(
                "shop",
                "web-0",
                "web-sa",
                json!({"app": "web"}),
                true,
                "Running",
            ),
            pod(
                "shop",
                "web-1",
                "web-sa",
                json!({"app": "web"}),
                true,
                "Pending",
            ),
            pod(
                "shop",
                "old",
                "old-sa",
                json!({"app": "web"}),
                true,
                "Succeeded",
            ),
        ],
        slices: vec![slice(
            "shop",
            "web-abc",
            "web",
            json!([{"name": "http", "port": 8080}, {"name": "metrics", "port": 9091}]),
            json!([
                {"addresses": ["198.18.0.2"], "conditions": {"ready": true},
                 "targetRef": {"kind": "Pod", "name": "web-0", "namespace": "shop"}},
                {"addresses": ["198.18.0.3"], "conditions": {"ready": false},
                 "targetRef": {"kind": "Pod", "name": "web-1"}},
            ]),
        )],
        ..World::default()
    }
}

#[test]
fn slim_pod_marks_meshed_pods_by_the_status_annotation_and_drops_finished_ones() {
    let p = pod(
        "a",
        "p",
        "sa1",
        json!({"meshlet.io/inject": "enabled"}),
        false,
        "Running",
    );
    assert_eq!(p["metadata"]["labels"]["meshlet.io/inject"], "disabled");
    assert_eq!(p["spec"]["serviceAccountName"], "sa1");
    assert!(p["metadata"].get("managedFields").is_none());
    let p = pod("a", "p", "sa1", json!({}), true, "Pending");
    assert_eq!(p["metadata"]["labels"]["meshlet.io/inject"], "enabled");
    assert_eq!(pod("a", "p", "sa1", json!({}), true, "Failed"), Value::Null);
}

#[test]
fn endpoints_come_from_slices_with_ports_by_name_readiness_and_pod_identities() {
    let mut w = base_world();
    w.objects.retain(|o| !o.is_null());
    let c = world::build(&w).expect("builds");
    let web = &c.config.services[0];
    assert_eq!(web.endpoints.len(), 2);
    let e0 = &web.endpoints[0];
    assert_eq!(e0.ip.to_string(), "198.18.0.2");
    assert!(e0.ready);
    assert_eq!(e0.pod_name.as_deref(), Some("web-0"));
    assert_eq!(
        e0.identity.as_ref().map(ToString::to_string).as_deref(),
        Some("spiffe://cluster.local/ns/shop/sa/web-sa")
    );
    assert_eq!(e0.ports.get(&80), Some(&8080));
    assert_eq!(e0.ports.get(&9090), Some(&9091));
    assert!(!web.endpoints[1].ready);
    assert!(web.meshed);
    // The finished pod's account is not an identity of the Service.
    let ids: Vec<String> = web.identities.iter().map(ToString::to_string).collect();
    assert_eq!(ids, ["spiffe://cluster.local/ns/shop/sa/web-sa"]);
}

#[test]
fn a_selectorless_service_learns_identities_from_its_endpoint_pods() {
    let w = World {
        objects: vec![
            service("shop", "ext", "198.19.0.11", json!({})),
            pod("shop", "db-0", "db", json!({"app": "db"}), true, "Running"),
            pod("shop", "plain", "plain", json!({}), false, "Running"),
        ],
        slices: vec![
            slice(
                "shop",
                "ext-1",
                "ext",
                json!([{"name": "http", "port": 5432}]),
                json!([{"addresses": ["198.18.0.7"],
                        "targetRef": {"kind": "Pod", "name": "db-0"}},
                       {"addresses": ["198.18.0.8"],
                        "targetRef": {"kind": "Pod", "name": "plain"}}]),
            ),
            // The same address in a second slice (a replacement in progress): listed once.
            slice(
                "shop",
                "ext-2",
                "ext",
                json!([{"name": "http", "port": 5432}]),
                json!([{"addresses": ["198.18.0.7"], "conditions": {"ready": false}}]),
            ),
            // A slice of a Service of the same name in another namespace is not ours.
            slice(
                "other",
                "ext-x",
                "ext",
                json!([{"name": "http", "port": 1}]),
                json!([{"addresses": ["198.18.9.9"]}]),
            ),
        ],
        ..World::default()
    };
    let c = world::build(&w).expect("builds");
    let ext = &c.config.services[0];
    let ips: Vec<String> = ext.endpoints.iter().map(|e| e.ip.to_string()).collect();
    assert_eq!(ips, ["198.18.0.7", "198.18.0.8"]);
    assert!(ext.endpoints[0].ready, "ready in one slice is ready");
    assert_eq!(
        ext.endpoints[1].identity, None,
        "an unmeshed pod has no identity"
    );
    assert!(ext.meshed);
    assert_eq!(ext.identities.len(), 1);
    // Only port 80 (named http) is served; 9090 has no slice port.
    assert_eq!(ext.endpoints[0].target_port(80), Some(5432));
    assert_eq!(ext.endpoints[0].target_port(9090), None);
}

#[test]
fn a_slice_without_a_port_of_the_service_adds_no_endpoint() {
    let w = World {
        objects: vec![service("shop", "web", "198.19.0.10", json!({}))],
        slices: vec![slice(
            "shop",
            "web-1",
            "web",
            json!([{"name": "grpc", "port": 9000}]),
            json!([{"addresses": ["198.18.0.2"]}]),
        )],
        ..World::default()
    };
    let c = world::build(&w).expect("builds");
    assert!(c.config.services[0].endpoints.is_empty());
    assert!(!c.config.services[0].meshed);
}

#[test]
fn dynamic_objects_get_their_type_and_routes_reach_the_document() {
    let obj: kube::api::DynamicObject =
        serde_json::from_value(route("shop", "r1", 1, web_route("web"))).expect("route");
    let mut untyped = obj.clone();
    untyped.types = None;
    let v = world::slim_dynamic(untyped, &super::http_route_resource()).expect("slim");
    assert_eq!(v["kind"], "HTTPRoute");
    assert_eq!(v["apiVersion"], "gateway.networking.k8s.io/v1");
    let mut w = base_world();
    w.objects.retain(|o| !o.is_null());
    w.objects.push(v);
    w.objects
        .push(route("shop", "broken", 1, web_route("nowhere")));
    let c = world::build(&w).expect("builds");
    assert_eq!(
        route_names(&c.config).into_iter().collect::<Vec<_>>(),
        ["shop/r1"]
    );
    assert_eq!(c.problems.len(), 1);
    assert_eq!(c.problems[0].reason, "BackendNotFound");
}

#[test]
fn generation_moves_only_when_the_document_changes() {
    let empty = MeshConfig::default();
    let first = next_document(&empty, MeshConfig::default()).expect("first is published");
    assert_eq!(first.generation, 1);
    assert_eq!(next_document(&first, MeshConfig::default()), None);
    let mut w = base_world();
    w.objects.retain(|o| !o.is_null());
    let doc = world::build(&w).expect("builds").config;
    let second = next_document(&first, doc.clone()).expect("changed");
    assert_eq!(second.generation, 2);
    assert_eq!(next_document(&second, doc), None);
}

fn cond<'a>(parents: &'a [Value], i: usize, kind: &str) -> &'a Value {
    parents[i]["conditions"]
        .as_array()
        .and_then(|cs| cs.iter().find(|c| c["type"] == kind))
        .unwrap_or(&Value::Null)
}

/// Every route of the world (both kinds, in world order) with its outcome.
fn statuses(w: &World) -> (Vec<meshlet_api::config::Service>, Vec<(Value, Outcome)>) {
    let c = world::build(w).expect("builds");
    let outcomes = status::outcomes(&w.objects, &c.problems, &c.conflicts);
    let routes = w
        .objects
        .iter()
        .filter(|o| matches!(o["kind"].as_str(), Some("HTTPRoute" | "GRPCRoute")))
        .map(|r| {
            let o = outcomes
                .get(&status::route_key(r))
                .cloned()
                .unwrap_or_default();
            (r.clone(), o)
        })
        .collect();
    (c.config.services, routes)
}

#[test]
fn an_applied_route_is_accepted_and_resolved_and_not_rewritten_when_unchanged() {
    let mut w = base_world();
    w.objects.retain(|o| !o.is_null());
    w.objects.push(route("shop", "r1", 3, web_route("web")));
    let (services, routes) = statuses(&w);
    let (r, o) = &routes[0];
    let parents = status::desired_parents(r, o, &services, "2026-01-01T00:00:00Z")
        .expect("a route without status gets one");
    assert_eq!(parents.len(), 1);
    assert_eq!(parents[0]["controllerName"], CONTROLLER_NAME);
    assert_eq!(parents[0]["parentRef"]["name"], "web");
    let accepted = cond(&parents, 0, "Accepted");
    assert_eq!(accepted["status"], "True");
    assert_eq!(accepted["reason"], "Accepted");
    assert_eq!(accepted["observedGeneration"], 3);
    assert_eq!(cond(&parents, 0, "ResolvedRefs")["status"], "True");

    // With that status in place, nothing is to be written, even at another time.
    let mut written = r.clone();
    written["status"] = json!({"parents": parents});
    assert_eq!(
        status::desired_parents(&written, o, &services, "2026-01-01T00:05:00Z"),
        None
    );
    // A new generation updates observedGeneration and keeps the transition time.
    written["metadata"]["generation"] = 4.into();
    let next = status::desired_parents(&written, o, &services, "2026-01-01T00:05:00Z")
        .expect("new generation");
    assert_eq!(cond(&next, 0, "Accepted")["observedGeneration"], 4);
    assert_eq!(
        cond(&next, 0, "Accepted")["lastTransitionTime"],
        "2026-01-01T00:00:00Z"
    );
}

#[test]
fn other_controllers_parent_statuses_stay_untouched() {
    let mut w = base_world();
    w.objects.retain(|o| !o.is_null());
    let mut r = route("shop", "r1", 1, web_route("web"));
    let foreign = json!({
        "parentRef": {"group": "gateway.networking.k8s.io", "kind": "Gateway", "name": "gw"},
        "controllerName": "example.com/gateway",
        "conditions": [{"type": "Accepted", "status": "False", "reason": "NotAllowedByListeners",
                        "message": "", "observedGeneration": 1,
                        "lastTransitionTime": "2025-01-01T00:00:00Z"}],
    });
    r["status"] = json!({"parents": [foreign.clone(), {
        "parentRef": {"group": "", "kind": "Service", "name": "gone"},
        "controllerName": CONTROLLER_NAME, "conditions": []}]});
    w.objects.push(r);
    let (services, routes) = statuses(&w);
    let (r, o) = &routes[0];
    let parents = status::desired_parents(r, o, &services, "2026-01-01T00:00:00Z").expect("write");
    assert_eq!(parents.len(), 2, "{parents:?}");
    assert_eq!(parents[0], foreign);
    // Our entry for a parentRef no longer in the spec is gone.
    assert_eq!(parents[1]["parentRef"]["name"], "web");
}

#[test]
fn unresolved_backends_and_unsupported_values_get_the_spec_reasons() {
    let mut w = base_world();
    w.objects.retain(|o| !o.is_null());
    w.objects
        .push(route("shop", "missing", 1, web_route("nowhere")));
    let mut cross = web_route("web");
    cross["rules"][0]["backendRefs"][0]["namespace"] = "other".into();
    w.objects.push(route("shop", "cross", 1, cross));
    let mut kind = web_route("web");
    kind["rules"][0]["backendRefs"][0]["kind"] = "Bucket".into();
    kind["rules"][0]["backendRefs"][0]["group"] = "storage.example.com".into();
    w.objects.push(route("shop", "kind", 1, kind));
    // An unsupported filter AND an unknown backend: both are told.
    let mut both = web_route("nowhere");
    both["rules"][0]["filters"] = json!([{"type": "RequestMirror", "requestMirror": {}}]);
    w.objects.push(route("shop", "both", 1, both));
    let mut orphan = web_route("web");
    orphan["parentRefs"][0]["name"] = "nope".into();
    w.objects.push(route("shop", "orphan", 1, orphan));

    let (services, routes) = statuses(&w);
    let got: Vec<(String, [String; 4])> = routes
        .iter()
        .map(|(r, o)| {
            let p = status::desired_parents(r, o, &services, "t").expect("status");
            let a = cond(&p, 0, "Accepted");
            let rr = cond(&p, 0, "ResolvedRefs");
            (
                r["metadata"]["name"].as_str().unwrap_or("").to_string(),
                [&a["status"], &a["reason"], &rr["status"], &rr["reason"]]
                    .map(|v| v.as_str().unwrap_or("").to_string()),
            )
        })
        .collect();
    let want = |name: &str, c: [&str; 4]| (name.to_string(), c.map(str::to_string));
    assert_eq!(
        got,
        [
            want("missing", ["True", "Accepted", "False", "BackendNotFound"]),
            want("cross", ["True", "Accepted", "False", "RefNotPermitted"]),
            want("kind", ["True", "Accepted", "False", "InvalidKind"]),
            want(
                "both",
                ["False", "UnsupportedValue", "False", "BackendNotFound"]
            ),
            want(
                "orphan",
                ["False", "NoMatchingParent", "True", "ResolvedRefs"]
            ),
        ]
    );
}

#[test]
fn a_large_world_builds_whole_with_every_endpoint() {
    // 1000 Services with 3 meshed pods each and one route each: what one rebuild costs.
    let mut w = World::default();
    for i in 0..1000u32 {
        let (ns, name) = (format!("ns{}", i % 20), format!("svc{i}"));
        let ip = format!("198.19.{}.{}", i / 250, i % 250 + 1);
        w.objects
            .push(service(&ns, &name, &ip, json!({"app": name.clone()})));
        let mut eps = Vec::new();
        for j in 0..3u32 {
            let pod_name = format!("{name}-{j}");
            w.objects.push(pod(
                &ns,
                &pod_name,
                &name,
                json!({"app": name.clone()}),
                true,
                "Running",
            ));
            eps.push(
                json!({"addresses": [format!("198.18.{}.{}", i / 80, (i % 80) * 3 + j)],
                            "targetRef": {"kind": "Pod", "name": pod_name}}),
            );
        }
        w.slices.push(slice(
            &ns,
            &format!("{name}-x"),
            &name,
            json!([{"name": "http", "port": 8080}]),
            Value::Array(eps),
        ));
        let mut r = web_route(&name);
        r["parentRefs"][0]["name"] = name.clone().into();
        w.objects.push(route(&ns, &format!("r{i}"), 1, r));
    }
    let t = std::time::Instant::now();
    let c = world::build(&w).expect("builds");
    println!(
        "build of 1000 services, 3000 pods, 1000 routes: {:?}",
        t.elapsed()
    );
    assert!(c.problems.is_empty(), "{:?}", c.problems.first());
    assert_eq!(c.config.services.len(), 1000);
    assert_eq!(route_names(&c.config).len(), 1000);
    assert!(c
        .config
        .services
        .iter()
        .all(|s| s.endpoints.len() == 3 && s.endpoints.iter().all(|e| e.identity.is_some())));
}

#[test]
fn the_lease_is_created_renewed_taken_over_only_when_stale() {
    use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};

    use super::lease::{step, Step};
    let held_by = |h: &str| Lease {
        spec: Some(LeaseSpec {
            holder_identity: Some(h.into()),
            lease_duration_seconds: Some(15),
            ..LeaseSpec::default()
        }),
        ..Lease::default()
    };
    let d = std::time::Duration::from_secs;
    assert_eq!(step(None, "a", d(0), d(15)), Step::Create);
    assert_eq!(step(Some(&held_by("a")), "a", d(100), d(15)), Step::Renew);
    assert_eq!(step(Some(&held_by("b")), "a", d(14), d(15)), Step::Follow);
    assert_eq!(step(Some(&held_by("b")), "a", d(16), d(15)), Step::TakeOver);
    assert_eq!(step(Some(&held_by("")), "a", d(0), d(15)), Step::TakeOver);
    // The holder's own duration counts, not ours.
    let mut long = held_by("b");
    if let Some(s) = long.spec.as_mut() {
        s.lease_duration_seconds = Some(60);
    }
    assert_eq!(step(Some(&long), "a", d(30), d(15)), Step::Follow);
}

fn grpc_route(ns: &str, name: &str, generation: i64, spec: Value) -> Value {
    let mut r = route(ns, name, generation, spec);
    r["kind"] = "GRPCRoute".into();
    r
}

fn grpc_web_route(backend: &str) -> Value {
    json!({
        "parentRefs": [{"group": "", "kind": "Service", "name": "web", "port": 80}],
        "rules": [{"matches": [{"method": {"service": "shop.Cart", "method": "Add"}}],
                   "backendRefs": [{"name": backend, "port": 80}]}],
    })
}

/// (name, kind, [Accepted status, reason, ResolvedRefs status, reason]) of each route.
fn conditions(w: &World) -> Vec<(String, String, [String; 4])> {
    let (services, routes) = statuses(w);
    routes
        .iter()
        .map(|(r, o)| {
            let p = status::desired_parents(r, o, &services, "t").expect("status");
            let a = cond(&p, 0, "Accepted");
            let rr = cond(&p, 0, "ResolvedRefs");
            (
                r["metadata"]["name"].as_str().unwrap_or("").to_string(),
                r["kind"].as_str().unwrap_or("").to_string(),
                [&a["status"], &a["reason"], &rr["status"], &rr["reason"]]
                    .map(|v| v.as_str().unwrap_or("").to_string()),
            )
        })
        .collect()
}

#[test]
fn grpc_routes_get_the_same_status_as_http_routes_told_apart_by_kind() {
    let mut w = base_world();
    w.objects.retain(|o| !o.is_null());
    // Same name as an HTTPRoute on another port: two routes, two statuses.
    let mut http = web_route("web");
    http["parentRefs"][0]["port"] = 9090.into();
    w.objects.push(route("shop", "cart", 1, http));
    w.objects
        .push(grpc_route("shop", "cart", 2, grpc_web_route("web")));
    let mut mirror = grpc_web_route("web");
    mirror["rules"][0]["filters"] = json!([{"type": "RequestMirror",
        "requestMirror": {"backendRef": {"name": "web", "port": 80}}}]);
    w.objects.push(grpc_route("shop", "mirror", 1, mirror));
    w.objects
        .push(grpc_route("shop", "lost", 1, grpc_web_route("nowhere")));
    let want = |name: &str, kind: &str, c: [&str; 4]| {
        (name.to_string(), kind.to_string(), c.map(str::to_string))
    };
    assert_eq!(
        conditions(&w),
        [
            want(
                "cart",
                "HTTPRoute",
                ["True", "Accepted", "True", "ResolvedRefs"]
            ),
            want(
                "cart",
                "GRPCRoute",
                ["True", "Accepted", "True", "ResolvedRefs"]
            ),
            want(
                "mirror",
                "GRPCRoute",
                ["False", "UnsupportedValue", "True", "ResolvedRefs"]
            ),
            want(
                "lost",
                "GRPCRoute",
                ["True", "Accepted", "False", "BackendNotFound"]
            ),
        ]
    );
    let (services, routes) = statuses(&w);
    let p = status::desired_parents(&routes[1].0, &routes[1].1, &services, "t").expect("status");
    assert_eq!(cond(&p, 0, "Accepted")["observedGeneration"], 2);
    let doc = world::build(&w).expect("builds").config;
    let web = doc.services.iter().find(|s| s.name == "web").expect("web");
    let kinds: Vec<(&str, meshlet_api::route::RouteKind)> = web
        .routes
        .iter()
        .map(|r| (r.name.as_str(), r.kind))
        .collect();
    assert_eq!(
        kinds,
        [
            ("cart", meshlet_api::route::RouteKind::Http),
            ("cart", meshlet_api::route::RouteKind::Grpc),
        ]
    );
}

#[test]
fn an_http_route_on_a_grpc_routes_port_is_conflicted_on_that_parent_only() {
    let mut w = base_world();
    w.objects.retain(|o| !o.is_null());
    w.objects
        .push(service("shop", "api", "198.19.0.11", json!({"app": "web"})));
    w.objects
        .push(grpc_route("shop", "rpc", 1, grpc_web_route("web")));
    // Parents: web (every port, so 80 too: conflicted) and api (no GRPCRoute: applied).
    let mut both = web_route("web");
    both["parentRefs"] = json!([{"kind": "Service", "name": "web"},
                                {"kind": "Service", "name": "api", "port": 80}]);
    w.objects.push(route("shop", "both", 1, both));
    let (services, routes) = statuses(&w);
    let (r, o) = &routes[1];
    let p = status::desired_parents(r, o, &services, "t").expect("status");
    assert_eq!(p.len(), 2);
    let web = cond(&p, 0, "Accepted");
    assert_eq!(
        (&web["status"], &web["reason"]),
        (&json!("False"), &json!("Conflicted"))
    );
    assert!(
        web["message"]
            .as_str()
            .unwrap_or("")
            .contains("GRPCRoute shop/rpc"),
        "{web}"
    );
    assert_eq!(cond(&p, 0, "ResolvedRefs")["status"], "True");
    assert_eq!(cond(&p, 1, "Accepted")["reason"], "Accepted");

    let doc = world::build(&w).expect("builds").config;
    let on = |svc: &str| -> Vec<String> {
        doc.services
            .iter()
            .find(|s| s.name == svc)
            .map(|s| s.routes.iter().map(|r| r.name.clone()).collect())
            .unwrap_or_default()
    };
    assert_eq!(on("web"), ["rpc"], "the HTTPRoute is left out of web");
    assert_eq!(on("api"), ["both"], "and still applies to api");
}

fn policy(name: &str, target: &str, generation: i64) -> Value {
    json!({
        "apiVersion": "policy.meshlet.io/v1alpha1", "kind": "AuthorizationPolicy",
        "metadata": {"name": name, "namespace": "shop", "generation": generation,
                     "resourceVersion": "9"},
        "spec": {"targetRefs": [{"group": "", "kind": "Service", "name": target}],
                 "action": "ALLOW",
                 "rules": [{"sources": [{"type": "ServiceAccount",
                                         "serviceAccount": {"name": "client"}}]}]},
    })
}

#[test]
fn slim_pod_keeps_the_pod_addresses() {
    let p = pod("a", "p", "sa1", json!({}), true, "Running");
    assert_eq!(p["status"]["podIP"], "198.18.1.1");
}

#[test]
fn slim_namespace_keeps_only_the_default_inbound_policy_annotation() {
    let ns: k8s_openapi::api::core::v1::Namespace = serde_json::from_value(json!({
        "metadata": {"name": "shop", "labels": {"x": "y"},
                     "annotations": {"meshlet.io/default-inbound-policy": "deny",
                                     "other": "z"}},
    }))
    .expect("namespace");
    let v = world::slim_namespace(ns).expect("kept");
    assert_eq!(v["kind"], "Namespace");
    assert_eq!(
        v["metadata"]["annotations"],
        json!({"meshlet.io/default-inbound-policy": "deny"})
    );
    assert!(v["metadata"].get("labels").is_none());
}

#[test]
fn build_resolves_a_service_target_to_its_endpoint_addresses() {
    let mut w = base_world();
    w.objects.retain(|o| !o.is_null());
    // Pods without addresses: the endpoints are what the target resolves to.
    for o in &mut w.objects {
        if o["kind"] == "Pod" {
            o["status"] = json!({});
        }
    }
    w.objects.push(policy("web-from-client", "web", 1));
    w.objects.push(policy("ghost", "nope", 1));
    w.default_inbound_policy = meshlet_api::authz::DefaultPolicy::MeshOnly;
    let c = world::build(&w).expect("builds");
    let a = c.config.authorization.expect("authorization section");
    assert_eq!(
        a.default_policy,
        meshlet_api::authz::DefaultPolicy::MeshOnly
    );
    let names: Vec<_> = a.policies.iter().map(|p| p.name.as_str()).collect();
    assert_eq!(names, ["web-from-client"]);
    let targeted: Vec<String> = a
        .workloads
        .iter()
        .filter(|w| w.policies.contains(&"shop/web-from-client".to_string()))
        .flat_map(|w| w.ips.iter().map(ToString::to_string))
        .collect();
    assert!(
        targeted.contains(&"198.18.0.2".to_string()),
        "endpoint 198.18.0.2 targeted: {targeted:?}"
    );
    assert_eq!(c.authz_problems.len(), 1, "{:?}", c.authz_problems);
    assert_eq!(c.authz_problems[0].policy_id(), Some("shop/ghost"));
    assert_eq!(c.authz_problems[0].reason, "TargetNotFound");
}

#[test]
fn policy_status_is_written_only_when_accepted_changes() {
    let mut w = base_world();
    w.objects.retain(|o| !o.is_null());
    w.objects.push(policy("ghost", "nope", 2));
    let c = world::build(&w).expect("builds");
    let now = "2026-11-25T16:00:00Z";
    let mut ghost = policy("ghost", "nope", 2);
    let conds =
        status::desired_policy_conditions(&ghost, &c.authz_problems, now).expect("first write");
    let accepted = conds
        .iter()
        .find(|c| c["type"] == "Accepted")
        .expect("Accepted");
    assert_eq!(accepted["status"], "False");
    assert_eq!(accepted["reason"], "TargetNotFound");
    assert_eq!(accepted["observedGeneration"], 2);
    assert!(
        accepted["message"]
            .as_str()
            .unwrap_or("")
            .contains("targetRefs[0]"),
        "{accepted}"
    );
    // Another controller's condition is kept.
    let mut stored = conds.clone();
    stored.push(json!({"type": "Other", "status": "True"}));
    ghost["status"] = json!({"conditions": stored});
    assert_eq!(
        status::desired_policy_conditions(&ghost, &c.authz_problems, "2026-11-25T17:00:00Z"),
        None,
        "unchanged: no write, even at a later time"
    );
    // The Service appears: Accepted flips, with a new transition time; Other stays.
    let flipped = status::desired_policy_conditions(&ghost, &[], "2026-11-25T17:00:00Z")
        .expect("flip is written");
    let accepted = flipped
        .iter()
        .find(|c| c["type"] == "Accepted")
        .expect("Accepted");
    assert_eq!(accepted["status"], "True");
    assert_eq!(accepted["lastTransitionTime"], "2026-11-25T17:00:00Z");
    assert!(flipped.iter().any(|c| c["type"] == "Other"));
    // A new generation with the same outcome is written, keeping the transition time.
    ghost["metadata"]["generation"] = 3.into();
    let bumped =
        status::desired_policy_conditions(&ghost, &c.authz_problems, "2026-11-25T18:00:00Z")
            .expect("new generation is written");
    let accepted = bumped
        .iter()
        .find(|c| c["type"] == "Accepted")
        .expect("Accepted");
    assert_eq!(accepted["observedGeneration"], 3);
    assert_eq!(accepted["lastTransitionTime"], now);
}
