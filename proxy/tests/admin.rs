//! The admin server, metrics of real traffic, config reloads and the drain.

use std::time::{Duration, Instant};

use bytes::Bytes;
use http::Request;
use http_body_util::Empty;
use meshlet_proxy::{
    metrics::Direction,
    test_util::{self, admin_request, metric_value, TestProxy},
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

/// Polls `f` until it returns true, for at most 5 s.
async fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endpoints() {
    let proxy = TestProxy::start(&[("MESHLET_POD_NAMESPACE", "shop")]);
    assert_eq!(proxy.admin_get("/ready").0, 200);
    assert_eq!(proxy.admin_get("/live").0, 200);
    assert_eq!(proxy.admin_get("/nope").0, 404);
    assert_eq!(admin_request(proxy.admin, "GET", "/shutdown").0, 405);
    let (status, body) = proxy.admin_get("/config");
    assert_eq!(status, 200);
    let doc: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(doc["process"]["podNamespace"], "shop");
    assert_eq!(doc["mesh"]["generation"], 0);
    assert_eq!(doc["opaquePorts"][0], 25);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_requests_and_bytes() {
    let app = test_util::http_server(false).await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("mesh.json");
    let doc = format!(
        r#"{{"generation": 1, "services": [{{"name": "web", "namespace": "shop",
            "clusterIPs": ["127.0.0.1"], "ports": [{{"port": {}}}]}}]}}"#,
        app.addr.port()
    );
    std::fs::write(&path, doc).unwrap();
    let proxy = TestProxy::start(&[("MESHLET_CONFIG_PATH", path.to_str().unwrap())]);
    proxy.orig_dst.set(Direction::Outbound, app.addr);

    let mut s = TcpStream::connect(proxy.outbound).await.unwrap();
    let mut sent = 0usize;
    let mut received = Vec::new();
    for i in 0..3 {
        let last = i == 2;
        let req = format!(
            "POST /echo HTTP/1.1\r\nHost: web\r\nContent-Length: 4\r\n{}\r\nbody",
            if last { "Connection: close\r\n" } else { "" }
        );
        s.write_all(req.as_bytes()).await.unwrap();
        sent += req.len();
        if !last {
            // Read this response before sending the next request.
            let mut buf = vec![0u8; 4096];
            loop {
                let n = s.read(&mut buf).await.unwrap();
                received.extend_from_slice(&buf[..n]);
                if received.ends_with(b"body") {
                    break;
                }
            }
        }
    }
    s.read_to_end(&mut received).await.unwrap();

    let labels = r#"{direction="outbound",service="shop/web",tls="false"}"#;
    let mut m = String::new();
    eventually("connection closed in metrics", || {
        m = proxy.metrics();
        metric_value(
            &m,
            &format!(
                "meshlet_tcp_connections_closed_total{}",
                labels.replace('}', ",reason=\"ok\"}")
            ),
        ) == Some(1.0)
    })
    .await;
    let v = |name: &str, l: &str| metric_value(&m, &format!("{name}{l}"));
    assert_eq!(
        v("meshlet_tcp_received_bytes_total", labels),
        Some(sent as f64),
        "{m}"
    );
    assert_eq!(
        v("meshlet_tcp_sent_bytes_total", labels),
        Some(received.len() as f64),
        "{m}"
    );
    assert_eq!(
        v("meshlet_tcp_connections_opened_total", labels),
        Some(1.0),
        "{m}"
    );
    assert_eq!(
        v(
            "meshlet_requests_total",
            r#"{direction="outbound",service="shop/web",status_code="200",tls="false"}"#
        ),
        Some(3.0),
        "{m}"
    );
    assert_eq!(
        v("meshlet_request_duration_seconds_count", labels),
        Some(3.0),
        "{m}"
    );
    assert!(m.contains("process_resident_memory_bytes "), "{m}");
    assert!(
        !m.contains(&app.addr.port().to_string()),
        "no raw ports in labels:\n{m}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_keeps_last_good_config() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("mesh.json");
    std::fs::write(&path, r#"{"generation": 1}"#).unwrap();
    let proxy = TestProxy::start(&[("MESHLET_CONFIG_PATH", path.to_str().unwrap())]);
    let generation = |p: &TestProxy| {
        let doc: serde_json::Value = serde_json::from_str(&p.admin_get("/config").1).unwrap();
        doc["mesh"]["generation"].as_u64()
    };
    assert_eq!(generation(&proxy), Some(1));

    std::fs::write(&path, r#"{"generation": 2, "bogus": true}"#).unwrap();
    eventually("a refused reload", || {
        metric_value(
            &proxy.metrics(),
            r#"meshlet_config_reloads_total{result="error"}"#,
        ) == Some(1.0)
    })
    .await;
    assert_eq!(
        generation(&proxy),
        Some(1),
        "the last good config keeps serving"
    );

    std::fs::write(&path, r#"{"generation": 3}"#).unwrap();
    eventually("the new config", || generation(&proxy) == Some(3)).await;
    assert_eq!(
        metric_value(
            &proxy.metrics(),
            r#"meshlet_config_reloads_total{result="ok"}"#
        ),
        Some(1.0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_finishes_in_flight_and_refuses_new() {
    let app = test_util::http_server(false).await;
    let proxy = TestProxy::start(&[("MESHLET_DRAIN_TIMEOUT", "10s")]);
    proxy.orig_dst.set(Direction::Outbound, app.addr);
    let outbound = proxy.outbound;

    let mut tx = test_util::h1_client::<Empty<Bytes>>(outbound).await;
    let slow = tokio::spawn(async move {
        let req = Request::get("/slow?ms=800")
            .header("host", "web")
            .body(Empty::new())
            .unwrap();
        let rsp = tx.send_request(req).await.unwrap();
        let close = rsp.headers().get("connection").cloned();
        (
            rsp.status(),
            close,
            test_util::body_bytes(rsp.into_body()).await,
        )
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (status, _) = admin_request(proxy.admin, "POST", "/shutdown");
    assert_eq!(status, 200);

    let mut refused = false;
    for _ in 0..100 {
        if TcpStream::connect(outbound).await.is_err() {
            refused = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(refused, "new connections are refused once the drain starts");
    assert_eq!(proxy.admin_get("/ready").0, 503, "not ready while draining");

    let (status, close, body) = slow.await.unwrap();
    assert_eq!(status, 200);
    assert_eq!(body, "slow");
    assert_eq!(
        close.as_ref().map(|v| v.as_bytes()),
        Some(&b"close"[..]),
        "keep-alive ends with the drain"
    );
    let clean = tokio::task::spawn_blocking(move || proxy.join())
        .await
        .unwrap();
    assert!(clean, "drained before the deadline");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_sends_h2_goaway_after_in_flight_streams() {
    let app = test_util::http_server(true).await;
    let proxy = TestProxy::start(&[("MESHLET_DRAIN_TIMEOUT", "10s")]);
    proxy.orig_dst.set(Direction::Outbound, app.addr);
    let tx = test_util::h2_client::<Empty<Bytes>>(proxy.outbound).await;
    let mut slow_tx = tx.clone();
    let slow = tokio::spawn(async move {
        let req = Request::get("http://web/slow?ms=800")
            .body(Empty::new())
            .unwrap();
        let rsp = slow_tx.send_request(req).await.unwrap();
        (rsp.status(), test_util::body_bytes(rsp.into_body()).await)
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    proxy.shutdown();
    let (status, body) = slow.await.unwrap();
    assert_eq!(status, 200);
    assert_eq!(body, "slow");
    // After GOAWAY the connection takes no new streams.
    let mut tx = tx;
    let late = tokio::time::timeout(Duration::from_secs(5), async {
        match tx.ready().await {
            Err(_) => true,
            Ok(()) => tx
                .send_request(Request::get("http://web/").body(Empty::new()).unwrap())
                .await
                .is_err(),
        }
    })
    .await
    .expect("answer in time");
    assert!(late, "a new stream after the drain must be refused");
    let clean = tokio::task::spawn_blocking(move || proxy.join())
        .await
        .unwrap();
    assert!(clean);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn app_health_runs_the_original_probes() {
    let app = test_util::http_server(false).await;
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let probes = format!(
        r#"{{"/app-health/web/readyz":{{"httpGet":{{"path":"/echo","port":{p},"scheme":"HTTP","httpHeaders":[{{"name":"X-Probe","value":"1"}}]}},"timeoutSeconds":2}},
            "/app-health/web/livez":{{"httpGet":{{"path":"/status/500","port":{p},"scheme":"HTTP"}},"timeoutSeconds":2}},
            "/app-health/web/startupz":{{"httpGet":{{"path":"/","port":{d},"scheme":"HTTP"}},"timeoutSeconds":1}}}}"#,
        p = app.addr.port(),
        d = dead.port()
    );
    let proxy = TestProxy::start(&[
        ("MESHLET_POD_IP", "127.0.0.1"),
        ("MESHLET_APP_PROBES", &probes),
    ]);
    let admin = proxy.admin;
    let get =
        |path: &'static str| tokio::task::spawn_blocking(move || admin_request(admin, "GET", path));
    let (status, body) = get("/app-health/web/readyz").await.unwrap();
    assert_eq!((status, body.as_str()), (200, "app answered 200\n"));
    let (status, body) = get("/app-health/web/livez").await.unwrap();
    assert_eq!((status, body.as_str()), (503, "app answered 500\n"));
    let (status, body) = get("/app-health/web/startupz").await.unwrap();
    assert_eq!(status, 503);
    assert!(
        body.starts_with("app probe failed: connect to 127.0.0.1:"),
        "{body}"
    );
    let (status, _) = get("/app-health/other/readyz").await.unwrap();
    assert_eq!(status, 404);
    assert_eq!(app.connections.load(std::sync::atomic::Ordering::SeqCst), 2);
}
