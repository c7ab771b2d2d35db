use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use http::{Request, Response, StatusCode};
use http_body_util::{Either, Full};
use meshlet_api::MeshConfig;
use tower::{Layer, ServiceExt};

use super::*;
use crate::{
    http::ObserveLayer,
    metrics::{Direction, Metrics},
    retry_budget::RetryBudget,
    route::table::RetryPolicy,
};

/// The body of the mock upstreams' answers.
pub(crate) type OkBody = Full<Bytes>;

/// A [`Routed`] extension with these settings and no metrics.
pub(crate) fn routed(
    request: Option<Duration>,
    backend: Option<Duration>,
    retry: Option<RetryPolicy>,
) -> Routed {
    routed_with(request, backend, retry, Arc::new(RetryBudget::new(None)))
}

/// [`routed`] with a given budget.
pub(crate) fn routed_with(
    request: Option<Duration>,
    backend: Option<Duration>,
    retry: Option<RetryPolicy>,
    budget: Arc<RetryBudget>,
) -> Routed {
    Routed {
        label: SharedString::const_str("shop/r"),
        policy: Arc::new(RulePolicy {
            request_timeout: request,
            backend_timeout: backend,
            retry,
        }),
        backend: Arc::new(Backend {
            addr: "198.19.0.12:80".parse().expect("static"),
            service: SharedString::const_str("shop/web-v2"),
            identities: None,
            budget,
        }),
        metrics: None,
    }
}

const DOC: &str = r#"{"services": [
    {"name": "web", "namespace": "shop", "clusterIPs": ["198.19.0.10"], "ports": [{"port": 80}],
     "routes": [
       {"name": "canary", "namespace": "shop", "creationTimestamp": "2026-01-01T00:00:00Z", "rules": [
         {"matches": [{"headers": [{"name": "version", "value": "v2"}]}],
          "backendRefs": [{"name": "web-v2", "namespace": "shop", "port": 80}]},
         {"matches": [{"path": {"type": "PathPrefix", "value": "/split"}}],
          "backendRefs": [{"name": "web-v1", "namespace": "shop", "port": 80, "weight": 80},
                          {"name": "web-v2", "namespace": "shop", "port": 80, "weight": 20}]},
         {"matches": [{"path": {"type": "PathPrefix", "value": "/old"}}],
          "filters": [{"type": "RequestRedirect", "path": {"type": "ReplacePrefixMatch", "value": "/new"},
                       "statusCode": 301}]},
         {"matches": [{"path": {"type": "PathPrefix", "value": "/api"}}],
          "filters": [{"type": "URLRewrite", "hostname": "api.internal",
                       "path": {"type": "ReplacePrefixMatch", "value": "/v1"}},
                      {"type": "RequestHeaderModifier", "set": [{"name": "x-set", "value": "s"}],
                       "add": [{"name": "x-add", "value": "a2"}], "remove": ["x-drop"]},
                      {"type": "ResponseHeaderModifier", "set": [{"name": "x-route", "value": "canary"}],
                       "remove": ["server"]}],
          "backendRefs": [{"name": "web-v1", "namespace": "shop", "port": 80}]},
         {"matches": [{"path": {"type": "PathPrefix", "value": "/gone"}}],
          "backendRefs": [{"name": "missing", "namespace": "shop", "port": 80}]},
         {"matches": [{"path": {"type": "PathPrefix", "value": "/none"}}]}
       ]},
       {"name": "mine", "namespace": "client", "rules": [
         {"matches": [{"path": {"type": "PathPrefix", "value": "/split"}}],
          "backendRefs": [{"name": "web-v2", "namespace": "shop", "port": 80}]}]}
     ]},
    {"name": "web-v1", "namespace": "shop", "clusterIPs": ["198.19.0.11"], "ports": [{"port": 80}]},
    {"name": "web-v2", "namespace": "shop", "clusterIPs": ["198.19.0.12"], "ports": [{"port": 80}]}
]}"#;

const WEB: &str = "198.19.0.10:80";
const V1: &str = "198.19.0.11:80";
const V2: &str = "198.19.0.12:80";

/// What the mock upstream saw of one request.
#[derive(Clone, Debug)]
struct Seen {
    dst: Option<SocketAddr>,
    uri: String,
    headers: HeaderMap,
    label: Option<String>,
}

type Log = Arc<Mutex<Vec<Seen>>>;

fn upstream(
    log: Log,
) -> impl tower::Service<
    Request<()>,
    Response = Response<Either<OkBody, Full<Bytes>>>,
    Error = Infallible,
    Future = impl Send,
> + Clone {
    tower::service_fn(move |req: Request<()>| {
        let log = log.clone();
        async move {
            log.lock().unwrap().push(Seen {
                dst: req.extensions().get::<BackendDst>().map(|b| b.addr),
                uri: req.uri().to_string(),
                headers: req.headers().clone(),
                label: req
                    .extensions()
                    .get::<Routed>()
                    .map(|r| r.label.to_string()),
            });
            let mut rsp = Response::new(Either::Left(Full::new(Bytes::from_static(b"ok"))));
            rsp.headers_mut()
                .insert("server", HeaderValue::from_static("app"));
            Ok::<_, Infallible>(rsp)
        }
    })
}

fn layer(namespace: Option<&str>) -> RouteLayer {
    let mesh = Arc::new(Mesh::new(
        MeshConfig::from_json(DOC.as_bytes()).unwrap(),
        None,
    ));
    RouteLayer::new(
        mesh,
        WEB.parse().unwrap(),
        None,
        namespace.map(Arc::from),
        None,
    )
}

fn get(uri: &str, headers: &[(&str, &str)]) -> Request<()> {
    let mut r = Request::get(uri).body(()).unwrap();
    for (k, v) in headers {
        r.headers_mut().append(
            HeaderName::from_bytes(k.as_bytes()).unwrap(),
            HeaderValue::from_str(v).unwrap(),
        );
    }
    r
}

async fn one(
    namespace: Option<&str>,
    req: Request<()>,
) -> (Response<Either<OkBody, Full<Bytes>>>, Option<Seen>) {
    let log = Log::default();
    let svc = layer(namespace).layer(upstream(log.clone()));
    let rsp = svc.oneshot(req).await.unwrap();
    let seen = log.lock().unwrap().pop();
    (rsp, seen)
}

#[tokio::test]
async fn header_match_picks_the_backend_and_no_match_is_404() {
    let (_, seen) = one(None, get("/x", &[("version", "v2")])).await;
    let seen = seen.unwrap();
    assert_eq!(seen.dst, Some(V2.parse().unwrap()));
    assert_eq!(seen.label.as_deref(), Some("shop/canary"));

    // The Gateway API: a service with routes answers 404 when no rule matches.
    let (rsp, seen) = one(None, get("/x", &[("version", "v3")])).await;
    assert_eq!(rsp.status(), StatusCode::NOT_FOUND);
    assert_eq!(rsp.headers()[ERROR_HEADER], "no-route");
    assert!(seen.is_none(), "nothing forwarded");
}

#[tokio::test]
async fn weights_split_requests() {
    let log = Log::default();
    let svc = layer(None).layer(upstream(log.clone()));
    let n = 10_000;
    for _ in 0..n {
        svc.clone().oneshot(get("/split", &[])).await.unwrap();
    }
    let v2 = log
        .lock()
        .unwrap()
        .iter()
        .filter(|s| s.dst == Some(V2.parse().unwrap()))
        .count();
    let share = v2 as f64 / n as f64;
    assert!((0.18..=0.22).contains(&share), "v2 got {share}");
}

#[tokio::test]
async fn consumer_routes_apply_to_their_namespace_only() {
    for _ in 0..20 {
        let (_, seen) = one(Some("client"), get("/split", &[])).await;
        assert_eq!(seen.unwrap().dst, Some(V2.parse().unwrap()));
    }
    let (_, seen) = one(Some("other"), get("/split/a", &[])).await;
    assert_eq!(seen.unwrap().label.as_deref(), Some("shop/canary"));
}

#[tokio::test]
async fn redirect_answers_without_forwarding() {
    let (rsp, seen) = one(None, get("/old/page?q=1", &[("host", "web.shop")])).await;
    assert!(seen.is_none(), "the upstream saw nothing");
    assert_eq!(rsp.status(), StatusCode::MOVED_PERMANENTLY);
    assert_eq!(
        rsp.headers()[header::LOCATION],
        "http://web.shop/new/page?q=1"
    );
}

#[tokio::test]
async fn rewrite_and_header_modifiers() {
    let req = get(
        "/api/items?x=1",
        &[
            ("host", "web.shop"),
            ("x-add", "a1"),
            ("x-drop", "1"),
            ("x-set", "old"),
        ],
    );
    let (rsp, seen) = one(None, req).await;
    let seen = seen.unwrap();
    assert_eq!(seen.dst, Some(V1.parse().unwrap()));
    assert_eq!(seen.uri, "/v1/items?x=1");
    assert_eq!(seen.headers[header::HOST], "api.internal");
    assert_eq!(seen.headers["x-set"], "s");
    let added: Vec<_> = seen.headers.get_all("x-add").iter().collect();
    assert_eq!(added, ["a1", "a2"]);
    assert!(!seen.headers.contains_key("x-drop"));
    assert_eq!(rsp.headers()["x-route"], "canary");
    assert!(
        !rsp.headers().contains_key("server"),
        "response header removed"
    );

    // HTTP/2: the authority carries the host.
    let mut req = get("http://web.shop/api", &[]);
    *req.version_mut() = http::Version::HTTP_2;
    let (_, seen) = one(None, req).await;
    assert_eq!(seen.unwrap().uri, "http://api.internal/v1");
}

#[tokio::test]
async fn unresolvable_or_missing_backends_answer_500() {
    let (rsp, seen) = one(None, get("/gone", &[])).await;
    assert!(seen.is_none());
    assert_eq!(rsp.status(), StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(rsp.headers()[ERROR_HEADER], "backend-not-found");
    let (rsp, _) = one(None, get("/none", &[])).await;
    assert_eq!(rsp.status(), StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(rsp.headers()[ERROR_HEADER], "no-backend");
}

#[tokio::test]
async fn route_changes_apply_to_the_next_request() {
    let cfg = MeshConfig::from_json(DOC.as_bytes()).unwrap();
    let mesh = Arc::new(Mesh::new(cfg.clone(), None));
    let log = Log::default();
    let svc = RouteLayer::new(mesh.clone(), WEB.parse().unwrap(), None, None, None)
        .layer(upstream(log.clone()));
    svc.clone()
        .oneshot(get("/x", &[("version", "v2")]))
        .await
        .unwrap();
    assert_eq!(
        log.lock().unwrap().pop().unwrap().dst,
        Some(V2.parse().unwrap())
    );
    let mut next = cfg;
    next.services[0].routes.clear();
    mesh.store(next);
    svc.oneshot(get("/x", &[("version", "v2")])).await.unwrap();
    assert_eq!(
        log.lock().unwrap()[0].dst,
        None,
        "the new config has no routes"
    );
}

#[tokio::test]
async fn metrics_carry_the_route_label() {
    let metrics = Metrics::new();
    let conn = metrics.connection(Direction::Outbound, SharedString::const_str("shop/web"));
    let req_metrics = Some(Arc::new(conn.requests()));
    let mesh = Arc::new(Mesh::new(
        MeshConfig::from_json(DOC.as_bytes()).unwrap(),
        None,
    ));
    let upstream = tower::service_fn(|_req: Request<()>| async {
        Ok::<_, crate::errors::ProxyError>(Response::new(Either::<OkBody, Full<Bytes>>::Left(
            Full::new(Bytes::new()),
        )))
    });
    let svc = tower::ServiceBuilder::new()
        .layer(RouteLayer::new(
            mesh,
            WEB.parse().unwrap(),
            None,
            None,
            req_metrics.clone(),
        ))
        .layer(ObserveLayer::new(req_metrics))
        .service(upstream);
    svc.clone()
        .oneshot(get("/x", &[("version", "v2")]))
        .await
        .unwrap();
    svc.clone().oneshot(get("/old", &[])).await.unwrap();
    svc.oneshot(get("/x", &[])).await.unwrap();
    let text = metrics.render();
    for line in [
        r#"meshlet_requests_total{direction="outbound",service="shop/web",route="shop/canary",status_code="200",tls="false"} 1"#,
        r#"meshlet_requests_total{direction="outbound",service="shop/web",route="shop/canary",status_code="301",tls="false"} 1"#,
        r#"meshlet_requests_total{direction="outbound",service="shop/web",route="no-route",status_code="404",tls="false"} 1"#,
    ] {
        assert!(text.lines().any(|l| l == line), "missing {line} in\n{text}");
    }
    assert!(
        text.contains(r#"meshlet_request_duration_seconds_count{direction="outbound",service="shop/web",route="shop/canary",tls="false"} 2"#),
        "{text}"
    );
}

#[test]
fn header_modifier_order_is_set_add_remove() {
    let m: HeaderModifier = serde_json::from_str(
        r#"{"set": [{"name": "A", "value": "1"}], "add": [{"name": "b", "value": "2"}],
            "remove": ["C"]}"#,
    )
    .unwrap();
    let mut h = HeaderMap::new();
    h.insert("a", HeaderValue::from_static("0"));
    h.append("a", HeaderValue::from_static("0b"));
    h.insert("b", HeaderValue::from_static("1"));
    h.insert("c", HeaderValue::from_static("x"));
    modify_headers(&mut h, &m);
    assert_eq!(h.get_all("a").iter().collect::<Vec<_>>(), ["1"]);
    assert_eq!(h.get_all("b").iter().collect::<Vec<_>>(), ["1", "2"]);
    assert!(!h.contains_key("c"), "names are case-insensitive");
}
