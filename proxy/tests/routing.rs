//! HTTPRoutes in the outbound path, end to end through a proxy in this process: header
//! matches pick the backend Service (HTTP/1 and HTTP/2), its endpoints take the
//! request, `timeouts.request` answers 504, retries hide a flaky backend, and the
//! metrics carry the route.

use std::{
    convert::Infallible,
    net::SocketAddr,
    path::Path,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use meshlet_proxy::{
    metrics::Direction,
    test_util::{self, TestProxy},
};

/// `shop/web`: nothing listens there, so only routed requests succeed.
const WEB: &str = "127.0.0.20:80";

/// An upstream answering `<name>`; `/slow` waits 1 s; every `fail_every`-th request
/// (if set) answers 503. Counts requests.
async fn upstream(name: &'static str, fail_every: usize) -> (SocketAddr, Arc<AtomicUsize>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let requests = Arc::new(AtomicUsize::new(0));
    let count = requests.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let count = count.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                    let n = count.fetch_add(1, Ordering::SeqCst) + 1;
                    async move {
                        if req.uri().path() == "/slow" {
                            tokio::time::sleep(Duration::from_secs(1)).await;
                        }
                        let mut rsp = Response::new(Full::new(Bytes::from(name)));
                        if fail_every > 0 && n.is_multiple_of(fail_every) {
                            *rsp.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
                        }
                        Ok::<_, Infallible>(rsp)
                    }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    (addr, requests)
}

/// An HTTP/2 upstream that refuses every odd stream (`REFUSED_STREAM`, before reading
/// anything of it) and answers the others `refusing`; counts the refusals.
async fn refusing_h2() -> (SocketAddr, Arc<AtomicUsize>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let refused = Arc::new(AtomicUsize::new(0));
    let count = refused.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let count = count.clone();
            tokio::spawn(async move {
                let Ok(mut conn) = h2::server::handshake(stream).await else {
                    return;
                };
                let mut n = 0;
                while let Some(Ok((_req, mut respond))) = conn.accept().await {
                    n += 1;
                    if n % 2 == 1 {
                        count.fetch_add(1, Ordering::SeqCst);
                        respond.send_reset(h2::Reason::REFUSED_STREAM);
                        continue;
                    }
                    let rsp = Response::new(());
                    if let Ok(mut body) = respond.send_response(rsp, false) {
                        let _ = body.send_data(Bytes::from_static(b"refusing"), true);
                    }
                }
            });
        }
    });
    (addr, refused)
}

fn service(name: &str, ip: &str, endpoint: Option<SocketAddr>) -> serde_json::Value {
    let eps: Vec<serde_json::Value> = endpoint
        .iter()
        .map(|a| serde_json::json!({"ip": a.ip(), "ports": {"80": a.port()}}))
        .collect();
    serde_json::json!({"name": name, "namespace": "shop", "clusterIPs": [ip],
                       "ports": [{"port": 80}], "endpoints": eps})
}

fn write_config(
    path: &Path,
    v1: SocketAddr,
    v2: SocketAddr,
    flaky: SocketAddr,
    refusing: SocketAddr,
) {
    let mut web = service("web", "127.0.0.20", None);
    web["routes"] = serde_json::json!([{"name": "web", "namespace": "shop", "rules": [
        {"matches": [{"headers": [{"name": "version", "value": "v2"}]}],
         "backendRefs": [{"name": "web-v2", "namespace": "shop", "port": 80}]},
        {"matches": [{"path": {"type": "PathPrefix", "value": "/slow"}}],
         "backendRefs": [{"name": "web-v1", "namespace": "shop", "port": 80}],
         "timeouts": {"request": "200ms"}},
        {"matches": [{"path": {"type": "PathPrefix", "value": "/flaky"}}],
         "backendRefs": [{"name": "web-flaky", "namespace": "shop", "port": 80}],
         "retry": {"codes": [503], "attempts": 2, "backoff": "10ms"}},
        {"matches": [{"path": {"type": "PathPrefix", "value": "/refused"}}],
         "backendRefs": [{"name": "web-refusing", "namespace": "shop", "port": 80}],
         "retry": {"attempts": 1, "backoff": "1ms"}},
        {"backendRefs": [{"name": "web-v1", "namespace": "shop", "port": 80}]}
    ]}]);
    let mut flaky_svc = service("web-flaky", "127.0.0.23", Some(flaky));
    // A third of its requests fail: half of the requests need a retry, more than the
    // default budget (20%) allows.
    flaky_svc["retryConstraint"] = serde_json::json!({"budget": {"percent": 100}});
    let doc = serde_json::json!({"services": [
        web,
        service("web-v1", "127.0.0.21", Some(v1)),
        service("web-v2", "127.0.0.22", Some(v2)),
        flaky_svc,
        service("web-refusing", "127.0.0.24", Some(refusing)),
    ]});
    std::fs::write(path, doc.to_string()).unwrap();
}

async fn send(
    h2: bool,
    proxy: SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
) -> (StatusCode, String) {
    let mut req = Request::get(format!("http://web.shop{path}"));
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let req = req.body(Empty::<Bytes>::new()).unwrap();
    let rsp = if h2 {
        let mut tx = test_util::h2_client(proxy).await;
        tx.send_request(req).await.unwrap()
    } else {
        let mut tx = test_util::h1_client(proxy).await;
        let (mut parts, body) = req.into_parts();
        parts.uri = path.parse().unwrap();
        parts.headers.insert("host", "web.shop".parse().unwrap());
        tx.send_request(Request::from_parts(parts, body))
            .await
            .unwrap()
    };
    let status = rsp.status();
    let body = rsp.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

struct Setup {
    proxy: TestProxy,
    flaky_requests: Arc<AtomicUsize>,
    refused_streams: Arc<AtomicUsize>,
    _dir: tempfile::TempDir,
}

async fn setup() -> Setup {
    let (v1, _) = upstream("v1", 0).await;
    let (v2, _) = upstream("v2", 0).await;
    let (flaky, flaky_requests) = upstream("flaky", 3).await;
    let (refusing, refused_streams) = refusing_h2().await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("mesh.json");
    write_config(&path, v1, v2, flaky, refusing);
    let proxy = TestProxy::start(&[("MESHLET_CONFIG_PATH", path.to_str().unwrap())]);
    proxy
        .orig_dst
        .set(Direction::Outbound, WEB.parse().unwrap());
    Setup {
        proxy,
        flaky_requests,
        refused_streams,
        _dir: dir,
    }
}

#[tokio::test]
async fn header_match_routes_http1_and_http2() {
    let s = setup().await;
    for h2 in [false, true] {
        let got = send(h2, s.proxy.outbound, "/", &[("version", "v2")]).await;
        assert_eq!(got, (StatusCode::OK, "v2".into()), "h2={h2}");
        let got = send(h2, s.proxy.outbound, "/", &[("version", "v1")]).await;
        assert_eq!(got, (StatusCode::OK, "v1".into()), "h2={h2}");
    }
    let text = s.proxy.metrics();
    let line = r#"meshlet_requests_total{direction="outbound",service="shop/web",route="shop/web",status_code="200",tls="false"}"#;
    assert_eq!(
        test_util::metric_value(&text, line),
        Some(4.0),
        "two requests over HTTP/1, two over HTTP/2:\n{text}"
    );
}

#[tokio::test]
async fn request_timeout_answers_504() {
    let s = setup().await;
    let start = Instant::now();
    let (status, body) = send(false, s.proxy.outbound, "/slow", &[]).await;
    let took = start.elapsed();
    assert_eq!(status, StatusCode::GATEWAY_TIMEOUT, "{body}");
    assert!(
        took >= Duration::from_millis(200) && took < Duration::from_millis(600),
        "{took:?}"
    );
    let text = s.proxy.metrics();
    let line = r#"meshlet_timeouts_total{direction="outbound",service="shop/web",route="shop/web",kind="request"}"#;
    assert_eq!(test_util::metric_value(&text, line), Some(1.0), "{text}");
}

#[tokio::test]
async fn refused_streams_are_retried_even_without_codes() {
    let s = setup().await;
    // One HTTP/2 connection from the client, so the proxy keeps one upstream too: its
    // odd streams are refused.
    let mut tx = test_util::h2_client(s.proxy.outbound).await;
    for i in 0..4 {
        let req = Request::post("http://web.shop/refused")
            .body(Full::new(Bytes::from_static(b"not idempotent")))
            .unwrap();
        let rsp = tx.send_request(req).await.unwrap();
        let status = rsp.status();
        let body = rsp.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(status, StatusCode::OK, "request {i}: {body:?}");
        assert_eq!(&body[..], b"refusing");
    }
    assert_eq!(s.refused_streams.load(Ordering::SeqCst), 4);
    let text = s.proxy.metrics();
    let line = r#"meshlet_retries_total{direction="outbound",service="shop/web",route="shop/web",reason="refused"}"#;
    assert_eq!(test_util::metric_value(&text, line), Some(4.0), "{text}");
}

#[tokio::test]
async fn retries_hide_a_flaky_backend() {
    let s = setup().await;
    for _ in 0..20 {
        let (status, body) = send(false, s.proxy.outbound, "/flaky", &[]).await;
        assert_eq!(status, StatusCode::OK, "{body}");
    }
    let backend = s.flaky_requests.load(Ordering::SeqCst);
    assert_eq!(
        backend, 29,
        "20 successes, every third attempt failed and was retried"
    );
    let text = s.proxy.metrics();
    let line = r#"meshlet_retries_total{direction="outbound",service="shop/web",route="shop/web",reason="503"}"#;
    let retries = test_util::metric_value(&text, line).unwrap_or(0.0);
    assert_eq!(retries as usize, backend - 20, "{text}");
}
