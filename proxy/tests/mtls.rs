//! Mesh mTLS between two sidecars: a client proxy (outbound) originates mTLS to a
//! server proxy (inbound), which terminates it and forwards plaintext to the app.
//! Certificates come from the mesh CA code the control plane uses
//! (`meshlet_injector::ca`).

use std::{
    convert::Infallible,
    net::SocketAddr,
    path::Path,
    sync::{
        atomic::{AtomicBool, AtomicUsize, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{Empty, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use meshlet_api::{env, SpiffeId};
use meshlet_injector::ca::{self, Ca};
use meshlet_proxy::{
    metrics::{Direction, Metrics},
    test_util::{self, metric_value, TestProxy},
    tls::{self, Identity},
};
use tempfile::TempDir;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};

const CLIENT_ID: &str = "spiffe://cluster.local/ns/shop/sa/client";
const WEB_ID: &str = "spiffe://cluster.local/ns/shop/sa/web";

fn id(s: &str) -> SpiffeId {
    s.parse().unwrap()
}

/// An identity directory for `spiffe_id`, issued by `ca` with `lifetime`.
fn identity(ca: &Ca, spiffe_id: &str, lifetime: Duration) -> TempDir {
    let dir = tempfile::tempdir().unwrap();
    write_identity(ca, dir.path(), spiffe_id, lifetime);
    dir
}

fn write_identity(ca: &Ca, dir: &Path, spiffe_id: &str, lifetime: Duration) {
    let issued = ca.issue(&id(spiffe_id), lifetime).unwrap();
    ca::write_identity_dir(dir, &issued).unwrap();
}

/// A mesh config where `svc` (the server proxy's inbound) is the meshed service
/// shop/web whose pods present `identities`.
fn mesh_config(dir: &Path, svc: SocketAddr, identities: &[&str]) -> String {
    let doc = serde_json::json!({
        "services": [{
            "name": "web", "namespace": "shop",
            "clusterIPs": [svc.ip()], "ports": [{"port": svc.port()}],
            "meshed": true, "identities": identities,
        }]
    });
    let path = dir.join("mesh.json");
    std::fs::write(&path, doc.to_string()).unwrap();
    path.to_str().unwrap().to_string()
}

/// Two sidecars with identities and the files behind them.
struct Pair {
    client: TestProxy,
    server: TestProxy,
    ca: Ca,
    client_dir: TempDir,
    server_dir: TempDir,
    _cfg: TempDir,
}

/// The server proxy (identity `server_id`, extra env `server_env`) forwards inbound
/// to `app`; the client proxy (identity `client_id`) expects `expected` for it.
fn pair_with(
    app: SocketAddr,
    server_id: &str,
    client_id: &str,
    expected: &[&str],
    server_env: &[(&str, &str)],
    client_env: &[(&str, &str)],
) -> Pair {
    let ca = Ca::generate("cluster.local", ca::DEFAULT_CA_LIFETIME).unwrap();
    let server_dir = identity(&ca, server_id, Duration::from_secs(3600));
    let client_dir = identity(&ca, client_id, Duration::from_secs(3600));
    let mut env = vec![(env::PROXY_IDENTITY_DIR, server_dir.path().to_str().unwrap())];
    env.extend_from_slice(server_env);
    let server = TestProxy::start(&env);
    server.orig_dst.set(Direction::Inbound, app);
    let cfg = tempfile::tempdir().unwrap();
    let path = mesh_config(cfg.path(), server.inbound, expected);
    let mut env = vec![
        (env::PROXY_IDENTITY_DIR, client_dir.path().to_str().unwrap()),
        (env::PROXY_CONFIG_PATH, path.as_str()),
    ];
    env.extend_from_slice(client_env);
    let client = TestProxy::start(&env);
    client.orig_dst.set(Direction::Outbound, server.inbound);
    Pair {
        client,
        server,
        ca,
        client_dir,
        server_dir,
        _cfg: cfg,
    }
}

fn pair(app: SocketAddr) -> Pair {
    pair_with(app, WEB_ID, CLIENT_ID, &[WEB_ID], &[], &[])
}

/// An app that reports every `meshlet-client-id` it received (joined by `|`) in
/// `x-seen-client-id`, and counts its connections.
async fn id_app(h2: bool) -> (SocketAddr, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let conns = Arc::new(AtomicUsize::new(0));
    let c = conns.clone();
    tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            c.fetch_add(1, Ordering::SeqCst);
            let svc = hyper::service::service_fn(|req: Request<Incoming>| async move {
                let seen: Vec<&str> = req
                    .headers()
                    .get_all("meshlet-client-id")
                    .iter()
                    .map(|v| v.to_str().unwrap_or("?"))
                    .collect();
                let mut rsp = Response::new(Full::new(Bytes::from_static(b"hello")));
                rsp.headers_mut()
                    .insert("x-seen-client-id", seen.join("|").parse().unwrap());
                // A response must not be able to plant the header either.
                rsp.headers_mut()
                    .insert("meshlet-client-id", "spiffe://x/ns/y/sa/z".parse().unwrap());
                Ok::<_, Infallible>(rsp)
            });
            tokio::spawn(async move {
                let io = TokioIo::new(s);
                if h2 {
                    let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                        .serve_connection(io, svc)
                        .await;
                } else {
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(io, svc)
                        .await;
                }
            });
        }
    });
    (addr, conns)
}

fn get(spoof: Option<&str>) -> Request<Empty<Bytes>> {
    let mut b = Request::get("/hello").header("host", "web.shop");
    if let Some(s) = spoof {
        b = b.header("meshlet-client-id", s);
    }
    b.body(Empty::new()).unwrap()
}

/// Polls `f` every 50 ms for up to 10 s.
async fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn has(text: &str, line_prefix: &str, value: f64) {
    assert_eq!(
        metric_value(text, line_prefix),
        Some(value),
        "{line_prefix} in\n{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http1_over_mtls_tells_the_app_who_called() {
    let (app, conns) = id_app(false).await;
    let p = pair(app);
    let mut tx = test_util::h1_client::<Empty<Bytes>>(p.client.outbound).await;
    for spoof in [None, Some("spiffe://cluster.local/ns/shop/sa/admin")] {
        tx.ready().await.unwrap();
        let rsp = tx.send_request(get(spoof)).await.unwrap();
        assert_eq!(rsp.status(), 200);
        assert_eq!(
            rsp.headers()["x-seen-client-id"],
            CLIENT_ID,
            "the app sees exactly the verified client id (spoofed: {spoof:?})"
        );
        assert!(
            !rsp.headers().contains_key("meshlet-client-id"),
            "never passed back to the client app"
        );
        assert_eq!(test_util::body_bytes(rsp.into_body()).await, "hello");
    }
    assert_eq!(conns.load(Ordering::SeqCst), 1);

    let sm = p.server.metrics();
    let peer = format!(r#"tls="true",peer_identity="{CLIENT_ID}""#);
    has(
        &sm,
        &format!(
            r#"meshlet_requests_total{{direction="inbound",service="unknown",status_code="200",{peer}}}"#
        ),
        2.0,
    );
    has(
        &sm,
        &format!(
            r#"meshlet_tcp_connections_opened_total{{direction="inbound",service="unknown",{peer}}}"#
        ),
        1.0,
    );
    let cm = p.client.metrics();
    has(
        &cm,
        r#"meshlet_requests_total{direction="outbound",service="shop/web",status_code="200",tls="true"}"#,
        2.0,
    );
    assert!(
        metric_value(&cm, "meshlet_identity_cert_expiry_timestamp_seconds").unwrap()
            > (std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_secs()) as f64,
        "{cm}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2c_over_mtls() {
    let (app, _) = id_app(true).await;
    let p = pair(app);
    let mut tx = test_util::h2_client::<Empty<Bytes>>(p.client.outbound).await;
    let mut all = Vec::new();
    for _ in 0..3 {
        let req = Request::get("http://web.shop/hello")
            .header("meshlet-client-id", "spiffe://evil/ns/a/sa/b")
            .body(Empty::new())
            .unwrap();
        all.push(tx.send_request(req));
    }
    for rsp in all {
        let rsp = rsp.await.unwrap();
        assert_eq!(rsp.status(), 200);
        assert_eq!(rsp.version(), http::Version::HTTP_2);
        assert_eq!(rsp.headers()["x-seen-client-id"], CLIENT_ID);
    }
    let sm = p.server.metrics();
    has(
        &sm,
        &format!(
            r#"meshlet_requests_total{{direction="inbound",service="unknown",status_code="200",tls="true",peer_identity="{CLIENT_ID}"}}"#
        ),
        3.0,
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn opaque_tcp_over_mtls_with_half_close() {
    let app = test_util::read_to_eof_server().await;
    let p = pair(app);
    let mut s = TcpStream::connect(p.client.outbound).await.unwrap();
    s.write_all(b"\x00\x01binary payload\n").await.unwrap();
    s.shutdown().await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(out, b"reply:\x00\x01binary payload\n");
    let sm = p.server.metrics();
    eventually("closed count", || {
        let m = p.server.metrics();
        metric_value(
            &m,
            &format!(r#"meshlet_tcp_connections_closed_total{{direction="inbound",service="unknown",tls="true",peer_identity="{CLIENT_ID}",reason="ok"}}"#),
        ) == Some(1.0)
    })
    .await;
    has(
        &sm,
        &format!(
            r#"meshlet_tcp_received_bytes_total{{direction="inbound",service="unknown",tls="true",peer_identity="{CLIENT_ID}"}}"#
        ),
        17.0,
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_first_protocol_over_mtls_on_opaque_ports() {
    let app = test_util::banner_server(b"220 ready\r\n").await;
    let app_port = app.port().to_string();
    // The server's inbound port is only known once it runs: the client gets its
    // opaque list through the mesh config's service port instead.
    let p = pair_with(
        app,
        WEB_ID,
        CLIENT_ID,
        &[WEB_ID],
        &[(env::PROXY_OPAQUE_PORTS, app_port.as_str())],
        &[],
    );
    let client = {
        let opaque = p.server.inbound.port().to_string();
        let cfg = tempfile::tempdir().unwrap();
        let path = mesh_config(cfg.path(), p.server.inbound, &[WEB_ID]);
        let c = TestProxy::start(&[
            (
                env::PROXY_IDENTITY_DIR,
                p.client_dir.path().to_str().unwrap(),
            ),
            (env::PROXY_CONFIG_PATH, path.as_str()),
            (env::PROXY_OPAQUE_PORTS, opaque.as_str()),
        ]);
        c.orig_dst.set(Direction::Outbound, p.server.inbound);
        (c, cfg)
    };
    let mut s = TcpStream::connect(client.0.outbound).await.unwrap();
    let start = Instant::now();
    let mut banner = [0u8; 11];
    tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut banner))
        .await
        .expect("banner without the client speaking first")
        .unwrap();
    assert_eq!(&banner, b"220 ready\r\n");
    assert!(
        start.elapsed() < Duration::from_millis(900),
        "no detect wait"
    );
    s.write_all(b"QUIT\r\n").await.unwrap();
    let mut echo = [0u8; 6];
    s.read_exact(&mut echo).await.unwrap();
    assert_eq!(&echo, b"QUIT\r\n");
    let sm = p.server.metrics();
    has(
        &sm,
        &format!(
            r#"meshlet_tcp_connections_opened_total{{direction="inbound",service="unknown",tls="true",peer_identity="{CLIENT_ID}"}}"#
        ),
        1.0,
    );
}

/// A plaintext HTTP/1.0 request straight to a server proxy's inbound: the response
/// text, empty when the connection was closed.
async fn plaintext_request(addr: SocketAddr) -> String {
    raw_exchange(addr, b"GET /hello HTTP/1.0\r\nHost: web\r\n\r\n").await
}

async fn raw_exchange(addr: SocketAddr, bytes: &[u8]) -> String {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let _ = s.write_all(bytes).await;
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out))
        .await
        .expect("the proxy answers or closes in time");
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn permissive_accepts_plaintext_strict_refuses_it() {
    let (app, _) = id_app(false).await;
    let permissive = pair(app);
    let out = plaintext_request(permissive.server.inbound).await;
    assert!(out.starts_with("HTTP/1.0 200"), "{out}");
    assert!(out.contains("x-seen-client-id: \r\n"), "no identity: {out}");
    has(
        &permissive.server.metrics(),
        r#"meshlet_requests_total{direction="inbound",service="unknown",status_code="200",tls="false"}"#,
        1.0,
    );
    // TLS-looking garbage is closed in permissive mode too.
    let garbage = raw_exchange(permissive.server.inbound, b"\x16\x03\x01\x00\x05hello").await;
    assert_eq!(garbage, "");
    has(
        &permissive.server.metrics(),
        r#"meshlet_tls_handshake_errors_total{direction="inbound",reason="malformed"}"#,
        1.0,
    );

    let strict = pair_with(
        app,
        WEB_ID,
        CLIENT_ID,
        &[WEB_ID],
        &[(env::PROXY_TLS_MODE, "strict")],
        &[],
    );
    let out = plaintext_request(strict.server.inbound).await;
    assert_eq!(out, "", "closed without an answer");
    // Meshed traffic still flows.
    let mut tx = test_util::h1_client::<Empty<Bytes>>(strict.client.outbound).await;
    let rsp = tx.send_request(get(None)).await.unwrap();
    assert_eq!(rsp.status(), 200);
    let m = strict.server.metrics();
    has(
        &m,
        r#"meshlet_tls_handshake_errors_total{direction="inbound",reason="plaintext"}"#,
        1.0,
    );
    assert!(
        !m.contains(r#"direction="inbound",service="unknown",status_code="200",tls="false""#),
        "{m}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strict_closes_and_counts_garbage_plaintext_and_foreign_tls() {
    let (app, _) = id_app(false).await;
    let p = pair_with(
        app,
        WEB_ID,
        CLIENT_ID,
        &[WEB_ID],
        &[(env::PROXY_TLS_MODE, "strict")],
        &[],
    );
    let garbage = raw_exchange(p.server.inbound, b"\x16\x03\x01\x00\x05hello").await;
    let plaintext = plaintext_request(p.server.inbound).await;
    let foreign = raw_exchange(p.server.inbound, &foreign_client_hello()).await;
    assert_eq!((garbage.as_str(), plaintext.as_str()), ("", ""));
    assert_eq!(foreign, "", "no ServerHello for a non-mesh ClientHello");

    // Other connections are unaffected.
    let mut tx = test_util::h1_client::<Empty<Bytes>>(p.client.outbound).await;
    assert_eq!(tx.send_request(get(None)).await.unwrap().status(), 200);

    let m = p.server.metrics();
    for reason in ["malformed", "plaintext", "non_mesh_tls"] {
        has(
            &m,
            &format!(
                r#"meshlet_tls_handshake_errors_total{{direction="inbound",reason="{reason}"}}"#
            ),
            1.0,
        );
    }
}

/// A real rustls ClientHello offering only `h2`.
fn foreign_client_hello() -> Vec<u8> {
    let mut cfg = rustls::ClientConfig::builder_with_provider(tls::provider())
        .with_protocol_versions(tls::VERSIONS)
        .unwrap()
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    let mut conn =
        rustls::ClientConnection::new(Arc::new(cfg), "web.shop".try_into().unwrap()).unwrap();
    let mut out = Vec::new();
    conn.write_tls(&mut out).unwrap();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_of_another_trust_domain_is_refused() {
    let (app, conns) = id_app(false).await;
    let p = pair_with(
        app,
        WEB_ID,
        "spiffe://other.local/ns/shop/sa/client",
        &[WEB_ID],
        &[],
        &[],
    );
    let mut tx = test_util::h1_client::<Empty<Bytes>>(p.client.outbound).await;
    let rsp = tx.send_request(get(None)).await.unwrap();
    assert_eq!(rsp.status(), 502);
    assert_eq!(conns.load(Ordering::SeqCst), 0, "nothing reached the app");
    eventually("the refusal to be counted", || {
        metric_value(
            &p.server.metrics(),
            r#"meshlet_tls_handshake_errors_total{direction="inbound",reason="certificate"}"#,
        ) >= Some(1.0)
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unexpected_server_identity_is_a_clear_502() {
    let (app, conns) = id_app(false).await;
    let p = pair_with(
        app,
        "spiffe://cluster.local/ns/shop/sa/db",
        CLIENT_ID,
        &[WEB_ID],
        &[],
        &[],
    );
    let mut tx = test_util::h1_client::<Empty<Bytes>>(p.client.outbound).await;
    let rsp = tx.send_request(get(None)).await.unwrap();
    assert_eq!(rsp.status(), 502);
    assert_eq!(rsp.headers()["meshlet-proxy-error"], "tls-failed");
    let body = test_util::body_bytes(rsp.into_body()).await;
    let body = String::from_utf8_lossy(&body);
    assert!(
        body.contains("mTLS handshake")
            && body.contains("spiffe://cluster.local/ns/shop/sa/db")
            && body.contains(WEB_ID),
        "{body}"
    );
    assert_eq!(conns.load(Ordering::SeqCst), 0);
    has(
        &p.client.metrics(),
        r#"meshlet_tls_handshake_errors_total{direction="outbound",reason="certificate"}"#,
        1.0,
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unmeshed_destinations_stay_plaintext() {
    let (app, _) = id_app(false).await;
    // A plain proxy in front of the app stands for an unmeshed pod.
    let plain = TestProxy::start(&[]);
    plain.orig_dst.set(Direction::Inbound, app);
    let ca = Ca::generate("cluster.local", ca::DEFAULT_CA_LIFETIME).unwrap();
    let dir = identity(&ca, CLIENT_ID, Duration::from_secs(3600));
    let client = TestProxy::start(&[(env::PROXY_IDENTITY_DIR, dir.path().to_str().unwrap())]);
    client.orig_dst.set(Direction::Outbound, plain.inbound);
    let mut tx = test_util::h1_client::<Empty<Bytes>>(client.outbound).await;
    let rsp = tx.send_request(get(Some(CLIENT_ID))).await.unwrap();
    assert_eq!(rsp.status(), 200);
    assert_eq!(
        rsp.headers()["x-seen-client-id"],
        "",
        "spoof stripped outbound too"
    );
    has(
        &client.metrics(),
        r#"meshlet_requests_total{direction="outbound",service="unknown",status_code="200",tls="false"}"#,
        1.0,
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ready_waits_for_the_identity() {
    let dir = tempfile::tempdir().unwrap();
    let proxy = TestProxy::start(&[(env::PROXY_IDENTITY_DIR, dir.path().to_str().unwrap())]);
    let (status, body) = proxy.admin_get("/ready");
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("MESHLET_IDENTITY_DIR"), "{body}");
    let ca = Ca::generate("cluster.local", ca::DEFAULT_CA_LIFETIME).unwrap();
    write_identity(&ca, dir.path(), WEB_ID, Duration::from_secs(3600));
    eventually("ready", || proxy.admin_get("/ready").0 == 200).await;
    assert!(proxy
        .metrics()
        .contains("meshlet_identity_cert_expiry_timestamp_seconds "));
}

/// A client handshake to `addr` with the credentials in `dir`, expecting `expected`:
/// the server certificate's NotAfter and whether the session was resumed.
async fn probe(
    identity: &Identity,
    addr: SocketAddr,
    expected: &[&str],
) -> (u64, rustls::HandshakeKind) {
    let expected: Arc<[SpiffeId]> = expected.iter().map(|s| id(s)).collect();
    let t = identity.client_tls(&expected).unwrap();
    let tcp = TcpStream::connect(addr).await.unwrap();
    let mut s = t
        .handshake(addr, tcp, Duration::from_secs(5))
        .await
        .unwrap();
    // TLS 1.3 tickets arrive after the handshake; read until the server has sent one.
    let _ = tokio::time::timeout(Duration::from_millis(100), s.read(&mut [0u8; 1])).await;
    let conn = s.get_ref().1;
    let leaf = &conn.peer_certificates().unwrap()[0];
    let not_after = tls::der::parse(leaf).unwrap().not_after;
    (not_after, conn.handshake_kind().unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_sessions_are_resumed() {
    let (app, _) = id_app(false).await;
    let p = pair(app);
    let identity = Identity::new(p.client_dir.path().into(), Metrics::new()).unwrap();
    let (_, first) = probe(&identity, p.server.inbound, &[WEB_ID]).await;
    let (_, second) = probe(&identity, p.server.inbound, &[WEB_ID]).await;
    assert_eq!(first, rustls::HandshakeKind::Full);
    assert_eq!(second, rustls::HandshakeKind::Resumed);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotation_mid_traffic_loses_no_request() {
    let (app, _) = id_app(false).await;
    let p = pair(app);
    let before = probe(
        &Identity::new(p.client_dir.path().into(), Metrics::new()).unwrap(),
        p.server.inbound,
        &[WEB_ID],
    )
    .await
    .0;

    // One long-lived connection and a stream of new ones, across the rotation.
    let mut kept = test_util::h1_client::<Empty<Bytes>>(p.client.outbound).await;
    assert_eq!(kept.send_request(get(None)).await.unwrap().status(), 200);
    let stop = Arc::new(AtomicBool::new(false));
    let outbound = p.client.outbound;
    let (s2, done) = (stop.clone(), Arc::new(AtomicUsize::new(0)));
    let d2 = done.clone();
    let load = tokio::spawn(async move {
        let mut failures = Vec::new();
        while !s2.load(Ordering::Relaxed) {
            let mut tx = test_util::h1_client::<Empty<Bytes>>(outbound).await;
            for _ in 0..3 {
                match tx.send_request(get(None)).await {
                    Ok(r) if r.status() == 200 => {
                        d2.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(r) => failures.push(format!("status {}", r.status())),
                    Err(e) => failures.push(e.to_string()),
                }
            }
        }
        failures
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    write_identity(
        &p.ca,
        p.server_dir.path(),
        WEB_ID,
        Duration::from_secs(7200),
    );
    write_identity(
        &p.ca,
        p.client_dir.path(),
        CLIENT_ID,
        Duration::from_secs(7200),
    );
    let gauge = "meshlet_identity_cert_expiry_timestamp_seconds ";
    let (s0, c0) = (
        metric_value(&p.server.metrics(), gauge),
        metric_value(&p.client.metrics(), gauge),
    );
    eventually("both sides to reload", || {
        metric_value(&p.server.metrics(), gauge) != s0
            && metric_value(&p.client.metrics(), gauge) != c0
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::Relaxed);
    let failures = load.await.unwrap();
    assert!(failures.is_empty(), "lost requests: {failures:?}");
    assert!(done.load(Ordering::Relaxed) > 10, "traffic flowed");
    assert_eq!(
        kept.send_request(get(None)).await.unwrap().status(),
        200,
        "the connection opened before the rotation still works"
    );
    let after = probe(
        &Identity::new(p.client_dir.path().into(), Metrics::new()).unwrap(),
        p.server.inbound,
        &[WEB_ID],
    )
    .await
    .0;
    assert!(
        after >= before + 3000,
        "new handshakes get the new certificate ({before} -> {after})"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn permissive_passes_foreign_tls_to_the_app() {
    // An app that terminates TLS itself keeps working for unmeshed TLS clients.
    let app = test_util::read_to_eof_server().await;
    let p = pair(app);
    let hello = foreign_client_hello();
    let mut s = TcpStream::connect(p.server.inbound).await.unwrap();
    s.write_all(&hello).await.unwrap();
    s.shutdown().await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&out[..6], b"reply:");
    assert_eq!(&out[6..], &hello[..], "bytes reach the app unchanged");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_plaintext_client_waits_one_detect_timeout() {
    // Sniffing for a ClientHello and protocol detection share one wait: a
    // server-first protocol on a port not listed as opaque gets its banner after
    // timeouts.detect (1 s), not twice that.
    let app = test_util::banner_server(b"220 ready\r\n").await;
    let p = pair(app);
    let mut s = TcpStream::connect(p.server.inbound).await.unwrap();
    let start = Instant::now();
    let mut banner = [0u8; 11];
    tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut banner))
        .await
        .unwrap()
        .unwrap();
    let waited = start.elapsed();
    assert_eq!(&banner, b"220 ready\r\n");
    assert!(
        waited >= Duration::from_millis(900) && waited < Duration::from_millis(1900),
        "{waited:?}"
    );
    has(
        &p.server.metrics(),
        r#"meshlet_timeouts_total{direction="inbound",kind="detect"}"#,
        1.0,
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upgrade_over_mtls() {
    let app = test_util::http_server(false).await;
    let p = pair(app.addr);
    let mut s = TcpStream::connect(p.client.outbound).await.unwrap();
    s.write_all(
        b"GET /upgrade HTTP/1.1\r\nHost: ws.shop\r\nConnection: Upgrade\r\nUpgrade: echo\r\n\r\n",
    )
    .await
    .unwrap();
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut b = [0u8; 1];
        tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut b))
            .await
            .unwrap()
            .unwrap();
        head.push(b[0]);
    }
    assert!(
        head.starts_with(b"HTTP/1.1 101"),
        "{:?}",
        String::from_utf8_lossy(&head)
    );
    for msg in [&b"ping"[..], b"\x81\x05hello"] {
        s.write_all(msg).await.unwrap();
        let mut got = vec![0u8; msg.len()];
        tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut got))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(got, msg);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn balanced_endpoints_each_get_mtls() {
    // The Service's ClusterIP:port is only a name; requests are balanced over its
    // endpoints (two server sidecars), each reached with mTLS and the Service's
    // identities.
    let ca = Ca::generate("cluster.local", ca::DEFAULT_CA_LIFETIME).unwrap();
    let server_dir = identity(&ca, WEB_ID, Duration::from_secs(3600));
    let client_dir = identity(&ca, CLIENT_ID, Duration::from_secs(3600));
    let mut servers = Vec::new();
    let mut apps = Vec::new();
    for ip in ["127.0.0.2:0", "127.0.0.3:0"] {
        let (app, conns) = id_app(false).await;
        let s = TestProxy::start(&[
            (env::PROXY_IDENTITY_DIR, server_dir.path().to_str().unwrap()),
            (env::PROXY_INBOUND_ADDR, ip),
        ]);
        s.orig_dst.set(Direction::Inbound, app);
        servers.push(s);
        apps.push(conns);
    }
    let cluster: SocketAddr = "127.0.0.10:80".parse().unwrap();
    let eps: Vec<serde_json::Value> = servers
        .iter()
        .map(|s| serde_json::json!({"ip": s.inbound.ip(), "ports": {"80": s.inbound.port()}, "ready": true}))
        .collect();
    let cfg = tempfile::tempdir().unwrap();
    let path = cfg.path().join("mesh.json");
    let doc = serde_json::json!({"services": [{
        "name": "web", "namespace": "shop", "clusterIPs": [cluster.ip()],
        "ports": [{"port": 80}], "meshed": true, "identities": [WEB_ID], "endpoints": eps,
    }]});
    std::fs::write(&path, doc.to_string()).unwrap();
    let client = TestProxy::start(&[
        (env::PROXY_IDENTITY_DIR, client_dir.path().to_str().unwrap()),
        (env::PROXY_CONFIG_PATH, path.to_str().unwrap()),
    ]);
    client.orig_dst.set(Direction::Outbound, cluster);
    let mut tx = test_util::h1_client::<Empty<Bytes>>(client.outbound).await;
    for _ in 0..40 {
        tx.ready().await.unwrap();
        let rsp = tx.send_request(get(None)).await.unwrap();
        assert_eq!(rsp.status(), 200);
        assert_eq!(rsp.headers()["x-seen-client-id"], CLIENT_ID);
    }
    for (s, conns) in servers.iter().zip(&apps) {
        assert_eq!(conns.load(Ordering::SeqCst), 1, "each endpoint got traffic");
        let m = s.metrics();
        assert!(
            m.contains(&format!(r#"tls="true",peer_identity="{CLIENT_ID}""#)),
            "{m}"
        );
    }
}

/// An app (HTTP/1.1 and h2c) that answers how the request reached it:
/// `<version> <request target> host=<Host> orig=<meshlet-orig-proto>`, and counts its
/// connections.
async fn how_app() -> (SocketAddr, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let conns = Arc::new(AtomicUsize::new(0));
    let c = conns.clone();
    tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            c.fetch_add(1, Ordering::SeqCst);
            let svc = hyper::service::service_fn(|req: Request<Incoming>| async move {
                let h = |n: &str| {
                    req.headers()
                        .get(n)
                        .map_or("-".to_string(), |v| v.to_str().unwrap_or("?").to_string())
                };
                let body = format!(
                    "{:?} {} host={} orig={}",
                    req.version(),
                    req.uri(),
                    h("host"),
                    h("meshlet-orig-proto")
                );
                Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(body))))
            });
            tokio::spawn(async move {
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    (addr, conns)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http1_connections_multiplex_over_one_mesh_h2_connection() {
    let (app, _) = how_app().await;
    let p = pair(app);
    // A burst of new client connections, each with a request in flight at once.
    let mut tasks = Vec::new();
    for i in 0..20 {
        let outbound = p.client.outbound;
        tasks.push(tokio::spawn(async move {
            let mut tx = test_util::h1_client::<Empty<Bytes>>(outbound).await;
            tx.ready().await.unwrap();
            let req = Request::get(format!("/burst/{i}?q=1"))
                .header("host", "web.shop:8080")
                .header("meshlet-orig-proto", "spoofed by the app")
                .body(Empty::new())
                .unwrap();
            let rsp = tx.send_request(req).await.unwrap();
            assert_eq!(rsp.status(), 200);
            assert_eq!(rsp.version(), http::Version::HTTP_11);
            assert!(!rsp.headers().contains_key("meshlet-orig-proto"));
            (i, test_util::body_bytes(rsp.into_body()).await)
        }));
    }
    for t in tasks {
        let (i, body) = t.await.unwrap();
        assert_eq!(
            body,
            format!("HTTP/1.1 /burst/{i}?q=1 host=web.shop:8080 orig=-"),
            "the app gets the HTTP/1.1 request the client sent, unmarked"
        );
    }
    let sm = p.server.metrics();
    has(
        &sm,
        &format!(
            r#"meshlet_tcp_connections_opened_total{{direction="inbound",service="unknown",tls="true",peer_identity="{CLIENT_ID}"}}"#
        ),
        1.0,
    );
    has(
        &sm,
        &format!(
            r#"meshlet_requests_total{{direction="inbound",service="unknown",status_code="200",tls="true",peer_identity="{CLIENT_ID}"}}"#
        ),
        20.0,
    );
    let cm = p.client.metrics();
    has(
        &cm,
        r#"meshlet_tcp_connections_opened_total{direction="outbound",service="shop/web",tls="true"}"#,
        20.0,
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn orig_proto_mark_is_not_trusted_from_outside_the_mesh() {
    let (app, _) = how_app().await;
    let p = pair(app);
    // Plaintext h2c straight to the server sidecar (permissive): no verified peer.
    let mut tx = test_util::h2_client::<Empty<Bytes>>(p.server.inbound).await;
    let req = Request::get("http://web.shop/x")
        .header("meshlet-orig-proto", "HTTP/1.1")
        .body(Empty::new())
        .unwrap();
    let rsp = tx.send_request(req).await.unwrap();
    assert_eq!(rsp.status(), 200);
    assert_eq!(
        test_util::body_bytes(rsp.into_body()).await,
        "HTTP/2.0 http://web.shop/x host=- orig=-",
        "the request stays HTTP/2 and loses the mark"
    );
}
