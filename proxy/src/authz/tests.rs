use std::sync::atomic::{AtomicUsize, Ordering};

use http_body_util::BodyExt;
use meshlet_api::MeshConfig;
use tokio::io::AsyncReadExt;
use tower::Service;

use super::*;
use crate::target::TlsStatus;

const FRONTEND: &str = "spiffe://cluster.local/ns/shop/sa/frontend";
const OTHER: &str = "spiffe://cluster.local/ns/shop/sa/other";

fn config(extra_policy: &str) -> MeshConfig {
    let doc = format!(
        r#"{{"authorization": {{"namespaces": {{"locked": "deny", "meshed": "mesh-only"}},
        "policies": [{{"namespace": "shop", "name": "cart",
            "rules": [{{"sources": [{{"serviceAccount": {{"namespace": "shop", "name": "frontend"}}}}],
                        "ports": [8080]}}]}}{extra_policy}],
        "workloads": [
            {{"ips": ["198.18.0.2"], "namespace": "shop", "policies": ["shop/cart"]}},
            {{"ips": ["198.18.0.3"], "namespace": "shop"}},
            {{"ips": ["198.18.0.4"], "namespace": "locked"}},
            {{"ips": ["198.18.0.5"], "namespace": "meshed"}}]}}}}"#
    );
    MeshConfig::from_json(doc.as_bytes()).unwrap()
}

fn dst(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

fn table() -> Table {
    Table::new(config("").authorization.as_ref())
}

#[test]
fn no_section_enforces_nothing() {
    let t = Table::new(None);
    assert!(!t.is_enforced());
    assert_eq!(t.decide(dst("198.18.0.2:8080"), None, None), None);
}

#[test]
fn targeted_workload_allows_only_matching_rules() {
    let t = table();
    let d = t
        .decide(dst("198.18.0.2:8080"), Some(FRONTEND), None)
        .unwrap();
    assert!(d.allowed);
    assert_eq!(&*d.policy_label(), "shop/cart");
    for (peer, port) in [(Some(OTHER), 8080), (Some(FRONTEND), 8081), (None, 8080)] {
        let d = t
            .decide(dst(&format!("198.18.0.2:{port}")), peer, None)
            .unwrap();
        assert!(!d.allowed, "{peer:?} to {port}");
        assert_eq!(d.by, DecidedBy::NoMatchingRule);
        assert_eq!(&*d.policy_label(), NO_POLICY);
    }
}

#[test]
fn untargeted_workloads_follow_their_namespace_default() {
    let t = table();
    let allow = |ip: &str, peer: Option<&str>, ns: Option<&str>| {
        t.decide(dst(&format!("{ip}:80")), peer, ns)
            .unwrap()
            .allowed
    };
    assert!(allow("198.18.0.3", None, None), "all-allowed by default");
    assert!(!allow("198.18.0.4", Some(FRONTEND), None), "deny namespace");
    assert!(
        allow("198.18.0.5", Some(FRONTEND), None),
        "mesh-only, meshed"
    );
    assert!(!allow("198.18.0.5", None, None), "mesh-only, plaintext");
    // An address the config does not list yet: the proxy's own namespace decides.
    assert!(!allow("198.18.0.9", Some(FRONTEND), Some("locked")));
    assert!(allow("198.18.0.9", None, Some("shop")));
    let d = t.decide(dst("198.18.0.4:80"), None, None).unwrap();
    assert_eq!(&*d.policy_label(), "default:deny");
    assert!(d.reason().contains("default inbound policy deny"));
}

#[test]
fn client_label_is_bounded() {
    let t = table();
    let fe: Arc<str> = FRONTEND.into();
    let other: Arc<str> = OTHER.into();
    assert_eq!(&*t.client_label(Some(&fe)), FRONTEND);
    assert_eq!(&*t.client_label(Some(&other)), "other");
    assert_eq!(&*t.client_label(None), "none");
}

fn authz(cfg: MeshConfig) -> (Authz, Arc<Mesh>, Arc<Metrics>) {
    let mesh = Arc::new(Mesh::new(cfg, None));
    let metrics = Metrics::new();
    (
        Authz::new(mesh.clone(), metrics.clone(), None),
        mesh,
        metrics,
    )
}

/// An inner HTTP service that answers 200 and counts its calls.
fn ok_service(
    calls: Arc<AtomicUsize>,
) -> impl tower::Service<
    Request<()>,
    Response = Response<Body>,
    Error = ProxyError,
    Future = future::Ready<Result<Response<Body>, ProxyError>>,
> + Clone {
    tower::service_fn(move |_req: Request<()>| {
        calls.fetch_add(1, Ordering::SeqCst);
        future::ready(Ok(Response::new(Either::Right(Full::new(
            Bytes::from_static(b"app"),
        )))))
    })
}

async fn send<S>(svc: &mut S, grpc: bool) -> (StatusCode, http::HeaderMap, String)
where
    S: tower::Service<Request<()>, Response = Response<Body>, Error = ProxyError>,
{
    let mut req = Request::new(());
    if grpc {
        req.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/grpc+proto"),
        );
    }
    let rsp = svc.ready().await.unwrap().call(req).await.unwrap();
    let (parts, body) = rsp.into_parts();
    let bytes = match body {
        Either::Right(b) => b.collect().await.unwrap().to_bytes(),
        Either::Left(_) => panic!("no upstream body in this test"),
    };
    (
        parts.status,
        parts.headers,
        String::from_utf8_lossy(&bytes).into_owned(),
    )
}

#[tokio::test]
async fn http_denies_with_403_and_grpc_with_permission_denied() {
    let (authz, _mesh, metrics) = authz(config(""));
    let calls = Arc::new(AtomicUsize::new(0));
    let peer: Arc<str> = OTHER.into();
    let mut svc = AuthzHttp::new(
        ok_service(calls.clone()),
        Some(authz.clone()),
        dst("198.18.0.2:8080"),
        Some(peer),
    );
    let (status, headers, body) = send(&mut svc, false).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert_eq!(headers[DECISION_HEADER], "denied");
    assert!(
        body.contains("authorization denied: no AuthorizationPolicy"),
        "{body}"
    );
    assert!(
        !body.contains("frontend"),
        "the body must not leak policy contents"
    );

    let (status, headers, _) = send(&mut svc, true).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(headers["grpc-status"], "7");
    assert_eq!(
        calls.load(Ordering::SeqCst),
        0,
        "denied requests never reach the app"
    );

    let fe: Arc<str> = FRONTEND.into();
    let mut ok = AuthzHttp::new(
        ok_service(calls.clone()),
        Some(authz),
        dst("198.18.0.2:8080"),
        Some(fe),
    );
    let (status, _, body) = send(&mut ok, false).await;
    assert_eq!((status, body.as_str()), (StatusCode::OK, "app"));
    assert_eq!(calls.load(Ordering::SeqCst), 1);

    let text = metrics.render();
    for want in [
        format!(r#"{DECISIONS}{{policy="none",result="deny",client="other"}} 2"#),
        format!(r#"{DECISIONS}{{policy="shop/cart",result="allow",client="{FRONTEND}"}} 1"#),
    ] {
        assert!(text.contains(&want), "missing {want} in\n{text}");
    }
}

#[tokio::test]
async fn reload_flips_the_next_request_of_a_connection() {
    let (authz, mesh, metrics) = authz(config(""));
    let calls = Arc::new(AtomicUsize::new(0));
    let peer: Arc<str> = OTHER.into();
    let mut svc = AuthzHttp::new(
        ok_service(calls.clone()),
        Some(authz),
        dst("198.18.0.2:8080"),
        Some(peer),
    );
    assert_eq!(send(&mut svc, false).await.0, StatusCode::FORBIDDEN);
    let mut cfg = config(
        r#", {"namespace": "shop", "name": "other", "rules": [{"sources": [{"spiffe": "spiffe://cluster.local/ns/shop/sa/other"}]}]}"#,
    );
    cfg.authorization.as_mut().unwrap().workloads[0]
        .policies
        .push("shop/other".into());
    mesh.store(cfg);
    assert_eq!(send(&mut svc, false).await.0, StatusCode::OK);
    mesh.store(config(""));
    assert_eq!(send(&mut svc, false).await.0, StatusCode::FORBIDDEN);
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    // The connection's cached counter follows the labels: each decision counted once
    // under its own policy, and the identity a policy named meanwhile by its name.
    let text = metrics.render();
    for want in [
        format!(r#"{DECISIONS}{{policy="none",result="deny",client="other"}} 2"#),
        format!(r#"{DECISIONS}{{policy="shop/other",result="allow",client="{OTHER}"}} 1"#),
    ] {
        assert!(text.contains(&want), "missing {want} in\n{text}");
    }
}

#[tokio::test]
async fn without_authz_requests_pass() {
    let calls = Arc::new(AtomicUsize::new(0));
    let mut svc = AuthzHttp::new(
        ok_service(calls.clone()),
        None,
        dst("198.18.0.2:8080"),
        None,
    );
    assert_eq!(send(&mut svc, false).await.0, StatusCode::OK);
    assert_eq!(calls.load(Ordering::SeqCst), 1);
}

fn target(mesh: &Mesh, direction: Direction, peer: Option<&str>, to: &str) -> Target {
    Target {
        direction,
        dst: dst(to),
        local: None,
        mesh: mesh.load(),
        metrics: None,
        tls: match peer {
            Some(p) => TlsStatus::Inbound { client: p.into() },
            None => TlsStatus::Plain,
        },
        silent: false,
    }
}

#[tokio::test]
async fn tcp_denied_connection_is_closed_before_the_app() {
    let (authz, mesh, _) = authz(config(""));
    let calls = Arc::new(AtomicUsize::new(0));
    let c = calls.clone();
    let inner = tower::service_fn(move |(_t, _io): (Target, tokio::io::DuplexStream)| {
        c.fetch_add(1, Ordering::SeqCst);
        async { Ok::<(), BoxError>(()) }
    });
    let mut svc = AuthzTcp::new(inner, authz);

    let (mut client, server) = tokio::io::duplex(64);
    let t = target(&mesh, Direction::Inbound, Some(OTHER), "198.18.0.2:8080");
    svc.ready().await.unwrap().call((t, server)).await.unwrap();
    let mut buf = [0u8; 8];
    assert_eq!(client.read(&mut buf).await.unwrap(), 0, "closed: EOF");
    assert_eq!(calls.load(Ordering::SeqCst), 0);

    for (dir, peer, to) in [
        (Direction::Inbound, Some(FRONTEND), "198.18.0.2:8080"),
        // Outbound connections are not the inbound policy's business.
        (Direction::Outbound, None, "198.18.0.2:8080"),
    ] {
        let (_client, server) = tokio::io::duplex(64);
        let t = target(&mesh, dir, peer, to);
        svc.ready().await.unwrap().call((t, server)).await.unwrap();
    }
    assert_eq!(calls.load(Ordering::SeqCst), 2);
}

/// The bench's worst case: 100 policies target the workload and only the last one
/// allows the (plaintext) caller, so every request scans them all. The cost per
/// request (snapshot load, decision, cached counter) must stay far below the 5% of the
/// pair's added p99 (~150 µs) that the issue allows; the bound holds even unoptimised.
#[test]
fn a_hundred_policies_cost_microseconds_per_request() {
    let mut policies = Vec::new();
    for i in 0..99 {
        policies.push(format!(
            r#"{{"namespace": "bench", "name": "p{i:03}", "rules": [{{"sources": [{{"serviceAccount": {{"namespace": "bench", "name": "caller-{i}"}}}}], "ports": [8080]}}]}}"#
        ));
    }
    policies
        .push(r#"{"namespace": "bench", "name": "zz-any", "rules": [{"ports": [8080]}]}"#.into());
    let ids: Vec<String> = (0..99)
        .map(|i| format!("\"bench/p{i:03}\""))
        .chain(["\"bench/zz-any\"".to_string()])
        .collect();
    let doc = format!(
        r#"{{"authorization": {{"policies": [{}], "workloads": [{{"ips": ["198.18.200.2"], "namespace": "bench", "policies": [{}]}}]}}}}"#,
        policies.join(","),
        ids.join(",")
    );
    let (authz, _mesh, metrics) = authz(MeshConfig::from_json(doc.as_bytes()).unwrap());
    let cache = Mutex::new(None);
    let to = dst("198.18.200.2:8080");
    const N: u32 = 20_000;
    let start = std::time::Instant::now();
    for _ in 0..N {
        let d = authz.check_cached(to, None, Some(&cache)).unwrap();
        assert!(d.allowed);
    }
    let per = start.elapsed() / N;
    println!("{per:?} per request with 100 policies");
    assert!(
        per < std::time::Duration::from_micros(20),
        "{per:?} per request"
    );
    let want = format!(r#"{DECISIONS}{{policy="bench/zz-any",result="allow",client="none"}} {N}"#);
    assert!(metrics.render().contains(&want), "{want}");
}

/// The index decides as a scan of the policies in name order would: same outcome,
/// and the first matching policy names the decision.
#[test]
fn index_agrees_with_scanning_the_rules() {
    let doc = r#"{"authorization": {"policies": [
        {"namespace": "shop", "name": "a-ns", "rules": [{"sources": [{"serviceAccount": {"namespace": "ops", "name": "*"}}], "ports": [9090]}]},
        {"namespace": "shop", "name": "b-exact", "rules": [
            {"sources": [{"serviceAccount": {"namespace": "ops", "name": "bot"}},
                         {"spiffe": "spiffe://other.org/ns/x/sa/y"}]},
            {"sources": []}]},
        {"namespace": "shop", "name": "c-any", "rules": [{"ports": [7070]}]}],
        "workloads": [{"ips": ["198.18.0.2"], "namespace": "shop",
                       "policies": ["shop/c-any", "shop/a-ns", "shop/b-exact"]}]}}"#;
    let cfg = MeshConfig::from_json(doc.as_bytes()).unwrap();
    let a = cfg.authorization.clone().unwrap();
    let t = Table::new(Some(&a));
    let peers = [
        None,
        Some("spiffe://cluster.local/ns/ops/sa/bot"),
        Some("spiffe://cluster.local/ns/ops/sa/other"),
        Some("spiffe://other.org/ns/x/sa/y"),
        Some("spiffe://other.org/ns/x/sa/z"),
        Some("spiffe://cluster.local/ns/opsx/sa/bot"),
        Some("spiffe://cluster.local/ns/ops/sa/bot/extra"),
    ];
    for peer in peers {
        for port in [7070, 8080, 9090] {
            let scan = a
                .policies
                .iter()
                .find(|p| p.rules.iter().any(|r| r.matches(peer, port)))
                .map(|p| p.id());
            let d = t
                .decide(dst(&format!("198.18.0.2:{port}")), peer, None)
                .unwrap();
            let got = match &d.by {
                DecidedBy::Policy(l) => Some(l.to_string()),
                _ => None,
            };
            assert_eq!(got, scan, "{peer:?} to {port}");
            assert_eq!(d.allowed, scan.is_some());
        }
    }
    let d = t
        .decide(
            dst("198.18.0.2:9090"),
            Some("spiffe://cluster.local/ns/ops/sa/bot"),
            None,
        )
        .unwrap();
    assert_eq!(
        &*d.policy_label(),
        "shop/a-ns",
        "the first policy by name decides"
    );
}
