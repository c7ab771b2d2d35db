//! Failures the proxy answers itself: loops, dead upstreams, oversized headers.

use std::time::Duration;

use meshlet_proxy::{
    metrics::Direction,
    test_util::{self, TestProxy},
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

async fn exchange(addr: std::net::SocketAddr, request: &[u8]) -> String {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(request).await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out))
        .await
        .expect("answer in time")
        .ok();
    String::from_utf8_lossy(&out).into_owned()
}

/// A port on 127.0.0.1 with nothing listening.
fn dead_port() -> std::net::SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn loop_to_own_port_is_refused() {
    let proxy = TestProxy::start(&[]);
    for own in [proxy.outbound, proxy.inbound, proxy.admin] {
        proxy.orig_dst.set(Direction::Outbound, own);
        let out = exchange(proxy.outbound, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await;
        assert_eq!(out, "", "a loop is closed without an answer");
    }
    let m = proxy.metrics();
    let refused = test_util::metric_value(
        &m,
        r#"meshlet_tcp_connections_closed_total{direction="outbound",service="unknown",tls="false",reason="loop"}"#,
    );
    assert_eq!(refused, Some(3.0), "{m}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_upstream_is_502() {
    let dead = dead_port();
    let server = TestProxy::start(&[]);
    server.orig_dst.set(Direction::Inbound, dead);
    let client = TestProxy::start(&[]);
    client.orig_dst.set(Direction::Outbound, server.inbound);
    let out = exchange(
        client.outbound,
        b"GET /x HTTP/1.1\r\nHost: web\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(out.starts_with("HTTP/1.1 502"), "{out}");
    assert!(
        out.to_ascii_lowercase()
            .contains("meshlet-proxy-error: connect-failed"),
        "{out}"
    );
    assert!(
        out.contains(&format!("meshlet-proxy: connect to {dead} failed")),
        "{out}"
    );

    let m = server.metrics();
    let v = test_util::metric_value(
        &m,
        r#"meshlet_requests_total{direction="inbound",service="unknown",status_code="502",tls="false"}"#,
    );
    assert_eq!(v, Some(1.0), "{m}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_headers_get_431() {
    let app = test_util::http_server(false).await;
    let proxy = TestProxy::start(&[]);
    proxy.orig_dst.set(Direction::Outbound, app.addr);
    let big = "a".repeat(70 * 1024);
    let req = format!("GET / HTTP/1.1\r\nHost: web\r\nX-Big: {big}\r\n\r\n");
    let out = exchange(proxy.outbound, req.as_bytes()).await;
    assert!(
        out.starts_with("HTTP/1.1 431"),
        "{}",
        &out[..out.len().min(200)]
    );
    assert_eq!(
        app.connections.load(std::sync::atomic::Ordering::SeqCst),
        0,
        "never forwarded"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn opaque_to_dead_upstream_resets() {
    let proxy = TestProxy::start(&[]);
    proxy.orig_dst.set(Direction::Outbound, dead_port());
    let mut s = TcpStream::connect(proxy.outbound).await.unwrap();
    s.write_all(b"\x00\x01binary\r\n").await.unwrap();
    let mut out = Vec::new();
    let res = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out))
        .await
        .expect("closed in time");
    let err = res.expect_err("the client sees a reset, as with no sidecar it would see a refusal");
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionReset);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_timeout_is_504() {
    // A listener whose accept queue is full drops new SYNs, so connects hang.
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    sock.bind(
        &"127.0.0.1:0"
            .parse::<std::net::SocketAddr>()
            .unwrap()
            .into(),
    )
    .unwrap();
    sock.listen(0).unwrap();
    let full: std::net::SocketAddr = sock.local_addr().unwrap().as_socket().unwrap();
    let mut fillers = Vec::new();
    for _ in 0..4 {
        if let Ok(Ok(s)) =
            tokio::time::timeout(Duration::from_millis(200), TcpStream::connect(full)).await
        {
            fillers.push(s);
        }
    }

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("mesh.json");
    std::fs::write(&path, r#"{"timeouts": {"connect": "200ms"}}"#).unwrap();
    let proxy = TestProxy::start(&[("MESHLET_CONFIG_PATH", path.to_str().unwrap())]);
    proxy.orig_dst.set(Direction::Outbound, full);
    let start = std::time::Instant::now();
    let out = exchange(
        proxy.outbound,
        b"GET / HTTP/1.1\r\nHost: web\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(out.starts_with("HTTP/1.1 504"), "{out}");
    assert!(
        out.to_ascii_lowercase()
            .contains("meshlet-proxy-error: connect-timeout"),
        "{out}"
    );
    assert!(start.elapsed() < Duration::from_secs(3));
    let m = proxy.metrics();
    assert_eq!(
        test_util::metric_value(
            &m,
            r#"meshlet_timeouts_total{direction="outbound",kind="connect"}"#
        ),
        Some(1.0),
        "{m}"
    );
}
