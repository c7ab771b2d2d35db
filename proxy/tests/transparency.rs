//! What goes in comes out: HTTP/1, HTTP/2, upgrades and opaque TCP through a client
//! sidecar (outbound) chained to a server sidecar (inbound).

use std::{
    sync::atomic::Ordering,
    time::{Duration, Instant},
};

use bytes::Bytes;
use http::{HeaderMap, Request};
use http_body::Frame;
use http_body_util::{BodyExt, Empty, Full};
use meshlet_proxy::{
    metrics::Direction,
    test_util::{self, ChannelBody, TestProxy},
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

/// A client sidecar whose outbound leads to a server sidecar whose inbound leads to
/// `app`.
fn chain(
    app: std::net::SocketAddr,
    server_env: &[(&str, &str)],
    client_env: &[(&str, &str)],
) -> (TestProxy, TestProxy) {
    let server = TestProxy::start(server_env);
    server.orig_dst.set(Direction::Inbound, app);
    let client = TestProxy::start(client_env);
    client.orig_dst.set(Direction::Outbound, server.inbound);
    (client, server)
}

async fn read_head(s: &mut TcpStream) -> String {
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut b))
            .await
            .expect("response head in time")
            .unwrap();
        assert!(
            n > 0,
            "connection closed before the head ended: {:?}",
            String::from_utf8_lossy(&head)
        );
        head.push(b[0]);
    }
    String::from_utf8(head).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http1_keep_alive_chained() {
    let app = test_util::http_server(false).await;
    let (client, _server) = chain(app.addr, &[], &[]);
    let mut tx = test_util::h1_client::<Full<Bytes>>(client.outbound).await;
    for i in 0..3 {
        tx.ready().await.unwrap();
        let req = Request::post(format!("/hello?i={i}"))
            .header("host", "Web.Shop:8080")
            .header("connection", "keep-alive")
            .header("keep-alive", "timeout=5")
            .header("x-app", "kept")
            .body(Full::new(Bytes::from(format!("body {i}"))))
            .unwrap();
        let rsp = tx.send_request(req).await.unwrap();
        assert_eq!(rsp.status(), 200);
        assert_eq!(
            rsp.headers()["x-seen-host"],
            "Web.Shop:8080",
            "Host passes exactly"
        );
        assert_eq!(
            rsp.headers()["x-seen-uri"],
            format!("/hello?i={i}").as_str()
        );
        assert!(
            !rsp.headers().contains_key("x-seen-connection"),
            "hop-by-hop headers are consumed"
        );
        let body = test_util::body_bytes(rsp.into_body()).await;
        assert_eq!(body, format!("body {i}").as_bytes());
    }
    assert_eq!(
        app.connections.load(Ordering::SeqCst),
        1,
        "the server sidecar reuses one app connection"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunked_upload_is_echoed_byte_identical() {
    let app = test_util::http_server(false).await;
    let (client, _server) = chain(app.addr, &[], &[]);
    let mut tx = test_util::h1_client::<ChannelBody>(client.outbound).await;
    let (body_tx, body) = ChannelBody::new();
    let req = Request::put("/upload")
        .header("host", "web")
        .body(body)
        .unwrap();
    let mut expected = Vec::new();
    let sender = tokio::spawn(async move {
        let mut sent = Vec::new();
        for i in 0..50u32 {
            let chunk: Vec<u8> = (0..(i * 97 % 5000 + 1)).map(|j| (i + j) as u8).collect();
            sent.extend_from_slice(&chunk);
            body_tx.send(Frame::data(Bytes::from(chunk))).await.unwrap();
        }
        sent
    });
    let rsp = tx.send_request(req).await.unwrap();
    assert_eq!(rsp.status(), 200);
    let got = test_util::body_bytes(rsp.into_body()).await;
    expected.extend(sender.await.unwrap());
    assert_eq!(got.len(), expected.len());
    assert!(got == expected, "body differs");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expect_100_continue() {
    let app = test_util::http_server(false).await;
    let (client, _server) = chain(app.addr, &[], &[]);
    let mut s = TcpStream::connect(client.outbound).await.unwrap();
    s.write_all(
        b"POST /echo HTTP/1.1\r\nHost: web\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n",
    )
    .await
    .unwrap();
    let interim = read_head(&mut s).await;
    assert!(interim.starts_with("HTTP/1.1 100 Continue"), "{interim}");
    s.write_all(b"hello").await.unwrap();
    let head = read_head(&mut s).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let mut body = [0u8; 5];
    s.read_exact(&mut body).await.unwrap();
    assert_eq!(&body, b"hello");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2_trailers_pass_both_ways() {
    let app = test_util::http_server(true).await;
    let (client, _server) = chain(app.addr, &[], &[]);
    let mut tx = test_util::h2_client::<ChannelBody>(client.outbound).await;
    let (body_tx, body) = ChannelBody::new();
    let req = Request::post("http://grpc.shop:50051/pkg.Svc/Call")
        .header("te", "trailers")
        .body(body)
        .unwrap();
    tokio::spawn(async move {
        body_tx
            .send(Frame::data(Bytes::from_static(b"payload")))
            .await
            .unwrap();
        let mut t = HeaderMap::new();
        t.insert("grpc-status", "0".parse().unwrap());
        t.insert("x-checksum", "abc123".parse().unwrap());
        body_tx.send(Frame::trailers(t)).await.unwrap();
    });
    let rsp = tx.send_request(req).await.unwrap();
    assert_eq!(rsp.status(), 200);
    assert_eq!(
        rsp.headers()["x-seen-host"],
        "grpc.shop:50051",
        ":authority passes exactly"
    );
    assert_eq!(rsp.headers()["x-seen-te"], "trailers");
    let collected = rsp.into_body().collect().await.unwrap();
    let trailers = collected.trailers().cloned().expect("trailers arrive");
    assert_eq!(trailers["x-checksum"], "abc123");
    assert_eq!(collected.to_bytes(), "payload");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2c_multiplexes_on_one_connection() {
    let app = test_util::http_server(true).await;
    let (client, _server) = chain(app.addr, &[], &[]);
    let tx = test_util::h2_client::<Empty<Bytes>>(client.outbound).await;
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..10 {
        let mut tx = tx.clone();
        tasks.push(tokio::spawn(async move {
            let req = Request::get("http://web.shop/slow?ms=300")
                .body(Empty::new())
                .unwrap();
            let rsp = tx.send_request(req).await.unwrap();
            (rsp.status(), test_util::body_bytes(rsp.into_body()).await)
        }));
    }
    for t in tasks {
        let (status, body) = t.await.unwrap();
        assert_eq!(status, 200);
        assert_eq!(body, "slow");
    }
    let took = start.elapsed();
    assert!(
        took < Duration::from_millis(2000),
        "10 x 300ms requests must run concurrently, took {took:?}"
    );
    assert_eq!(
        app.connections.load(Ordering::SeqCst),
        1,
        "one shared upstream h2 connection"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upgrade_forwards_101_then_splices() {
    let app = test_util::http_server(false).await;
    let (client, _server) = chain(app.addr, &[], &[]);
    let mut s = TcpStream::connect(client.outbound).await.unwrap();
    s.write_all(
        b"GET /upgrade HTTP/1.1\r\nHost: ws.shop\r\nConnection: Upgrade\r\nUpgrade: echo\r\n\r\n",
    )
    .await
    .unwrap();
    let head = read_head(&mut s).await.to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 101"), "{head}");
    assert!(head.contains("upgrade: echo"), "{head}");
    for msg in [&b"ping"[..], b"\x81\x05hello", b"bytes after the upgrade"] {
        s.write_all(msg).await.unwrap();
        let mut got = vec![0u8; msg.len()];
        tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut got))
            .await
            .expect("echo in time")
            .unwrap();
        assert_eq!(got, msg);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_first_banner_on_opaque_port_has_no_detection_delay() {
    let banner = test_util::banner_server(b"220 smtp.shop ESMTP ready\r\n").await;
    // A long detect timeout makes the difference unmistakable on a busy machine.
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("mesh.json");
    std::fs::write(&cfg, r#"{"timeouts": {"detect": "5s"}}"#).unwrap();
    let cfg = cfg.to_str().unwrap();
    let server = TestProxy::start(&[
        ("MESHLET_CONFIG_PATH", cfg),
        ("MESHLET_OPAQUE_PORTS", &banner.port().to_string()),
    ]);
    server.orig_dst.set(Direction::Inbound, banner);
    let client = TestProxy::start(&[
        ("MESHLET_CONFIG_PATH", cfg),
        ("MESHLET_OPAQUE_PORTS", &server.inbound.port().to_string()),
    ]);
    client.orig_dst.set(Direction::Outbound, server.inbound);

    let start = Instant::now();
    let mut s = TcpStream::connect(client.outbound).await.unwrap();
    let mut got = vec![0u8; 27];
    tokio::time::timeout(Duration::from_secs(10), s.read_exact(&mut got))
        .await
        .expect("banner in time")
        .unwrap();
    let took = start.elapsed();
    assert_eq!(got, b"220 smtp.shop ESMTP ready\r\n");
    // Detection would wait for the 5s detect timeout before connecting.
    assert!(took < Duration::from_secs(2), "banner took {took:?}");
    s.write_all(b"EHLO me\r\n").await.unwrap();
    let mut echo = vec![0u8; 9];
    s.read_exact(&mut echo).await.unwrap();
    assert_eq!(echo, b"EHLO me\r\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_close_still_gets_the_response() {
    let app = test_util::read_to_eof_server().await;
    let (client, _server) = chain(app, &[], &[]);
    for request in [&b"ping\r\n"[..], b"hello"] {
        let mut s = TcpStream::connect(client.outbound).await.unwrap();
        s.write_all(request).await.unwrap();
        s.shutdown().await.unwrap();
        let mut got = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut got))
            .await
            .expect("response in time")
            .unwrap();
        assert_eq!(got, [&b"reply:"[..], request].concat());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_tunnel_splices_after_200() {
    let app = test_util::http_server(false).await;
    let (client, _server) = chain(app.addr, &[], &[]);
    let mut s = TcpStream::connect(client.outbound).await.unwrap();
    s.write_all(b"CONNECT db.shop:5432 HTTP/1.1\r\nHost: db.shop:5432\r\n\r\n")
        .await
        .unwrap();
    let head = read_head(&mut s).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    s.write_all(b"tunnelled bytes").await.unwrap();
    let mut got = vec![0u8; 15];
    tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut got))
        .await
        .expect("echo in time")
        .unwrap();
    assert_eq!(got, b"tunnelled bytes");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http1_request_then_half_close_gets_the_response() {
    let app = test_util::http_server(false).await;
    let (client, _server) = chain(app.addr, &[], &[]);
    let mut s = TcpStream::connect(client.outbound).await.unwrap();
    s.write_all(b"GET /slow?ms=100 HTTP/1.1\r\nHost: web\r\n\r\n")
        .await
        .unwrap();
    s.shutdown().await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out))
        .await
        .expect("response in time")
        .unwrap();
    let out = String::from_utf8_lossy(&out);
    assert!(
        out.starts_with("HTTP/1.1 200") && out.ends_with("slow"),
        "{out}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn responses_gain_no_headers() {
    // A minimal app answer, without even a Date header.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let app = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let _ = s.read(&mut buf).await;
                let _ = s
                    .write_all(b"HTTP/1.1 200 OK\r\nX-Only: 1\r\nContent-Length: 2\r\n\r\nok")
                    .await;
            });
        }
    });
    let (client, _server) = chain(app, &[], &[]);
    let mut tx = test_util::h1_client::<Empty<Bytes>>(client.outbound).await;
    let req = Request::get("/")
        .header("host", "web")
        .body(Empty::new())
        .unwrap();
    let rsp = tx.send_request(req).await.unwrap();
    assert_eq!(rsp.status(), 200);
    let mut names: Vec<_> = rsp.headers().keys().map(|k| k.to_string()).collect();
    names.sort();
    assert_eq!(names, ["content-length", "x-only"]);
    assert_eq!(test_util::body_bytes(rsp.into_body()).await, "ok");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodiless_responses_keep_the_upstream_connection() {
    let app = test_util::http_server(false).await;
    let (client, _server) = chain(app.addr, &[], &[]);
    let mut tx = test_util::h1_client::<Empty<Bytes>>(client.outbound).await;
    for (method, path) in [
        ("HEAD", "/"),
        ("GET", "/status/204"),
        ("GET", "/status/304"),
        ("GET", "/"),
    ] {
        tx.ready().await.unwrap();
        let req = Request::builder()
            .method(method)
            .uri(path)
            .header("host", "web")
            .body(Empty::new())
            .unwrap();
        let rsp = tx.send_request(req).await.unwrap();
        assert!(
            rsp.status().is_success() || rsp.status() == 304,
            "{method} {path}: {}",
            rsp.status()
        );
        test_util::body_bytes(rsp.into_body()).await;
    }
    assert_eq!(app.connections.load(Ordering::SeqCst), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http10_client() {
    let app = test_util::http_server(false).await;
    let (client, _server) = chain(app.addr, &[], &[]);
    let mut s = TcpStream::connect(client.outbound).await.unwrap();
    s.write_all(b"POST /echo HTTP/1.0\r\nContent-Length: 3\r\n\r\nabc")
        .await
        .unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out))
        .await
        .expect("HTTP/1.0 closes after the response")
        .unwrap();
    let out = String::from_utf8_lossy(&out);
    assert!(
        out.starts_with("HTTP/1.0 200") && out.ends_with("abc"),
        "{out}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_client_on_other_port_becomes_opaque_after_detect_timeout() {
    let banner = test_util::banner_server(b"+OK pop3 ready\r\n").await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("mesh.json");
    std::fs::write(
        &cfg,
        r#"{"timeouts": {"detect": "300ms"}, "opaquePorts": [1]}"#,
    )
    .unwrap();
    let proxy = TestProxy::start(&[("MESHLET_CONFIG_PATH", cfg.to_str().unwrap())]);
    proxy.orig_dst.set(Direction::Outbound, banner);
    let start = Instant::now();
    let mut s = TcpStream::connect(proxy.outbound).await.unwrap();
    let mut got = vec![0u8; 16];
    tokio::time::timeout(Duration::from_secs(10), s.read_exact(&mut got))
        .await
        .expect("banner after the detect timeout")
        .unwrap();
    assert_eq!(got, b"+OK pop3 ready\r\n");
    assert!(
        start.elapsed() >= Duration::from_millis(300),
        "detection waited first"
    );
    let m = proxy.metrics();
    assert_eq!(
        test_util::metric_value(
            &m,
            r#"meshlet_timeouts_total{direction="outbound",kind="detect"}"#
        ),
        Some(1.0),
        "{m}"
    );
}
