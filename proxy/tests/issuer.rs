//! Two sidecars that get their identities from the control plane's issuer (the real
//! `meshlet_injector` mesh endpoint and issuer in-process; only the API server's
//! TokenReview is faked) and then talk mTLS: `/ready` waits for the first
//! certificate, the server proxy sees the client's issued SPIFFE id, and metrics
//! say `tls="true"` with that peer identity.

use std::{
    convert::Infallible,
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{Empty, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use meshlet_api::{env, SpiffeId};
use meshlet_injector::{
    ca::{self, Ca},
    control_plane::{Endpoint, ServerIdentity},
    issuer::{self, Issuer, Review, ReviewFuture, TokenReviewer},
};
use meshlet_proxy::{
    metrics::Direction,
    test_util::{self, metric_value, TestProxy},
};
use tokio::net::TcpListener;

const CLIENT_ID: &str = "spiffe://cluster.local/ns/shop/sa/client";
const WEB_ID: &str = "spiffe://cluster.local/ns/shop/sa/web";

/// The API server's part: a token `ns:sa` authenticates that service account.
struct ByToken;

impl TokenReviewer for ByToken {
    fn review<'a>(&'a self, token: &'a str) -> ReviewFuture<'a> {
        let r = match token.split_once(':') {
            Some((ns, sa)) => Review {
                authenticated: true,
                username: format!("system:serviceaccount:{ns}:{sa}"),
                audiences: vec!["meshlet".into()],
                error: None,
            },
            None => Review::default(),
        };
        Box::pin(async move { Ok(r) })
    }
}

async fn control_plane() -> (SocketAddr, String, tokio::sync::oneshot::Sender<()>) {
    let ca = Arc::new(Ca::generate("cluster.local", ca::DEFAULT_CA_LIFETIME).unwrap());
    let iss = Issuer::new(
        ca.clone(),
        Arc::new(ByToken),
        "cluster.local",
        ca::DEFAULT_LIFETIME,
    )
    .unwrap();
    let who = ServerIdentity {
        dns_names: vec![meshlet_api::identity::CONTROL_PLANE_NAME.to_string()],
        id: SpiffeId::new("cluster.local", "meshlet-system", "meshlet-injector").unwrap(),
        lifetime: Duration::from_secs(3600),
    };
    let ep = Endpoint::bind("127.0.0.1:0".parse().unwrap(), ca.clone(), who)
        .await
        .unwrap();
    let addr = ep.local_addr().unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(ep.run(issuer::router(Arc::new(iss)), async move {
        let _ = rx.await;
    }));
    (addr, ca.cert_pem().to_string(), tx)
}

async fn app() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            let svc = hyper::service::service_fn(|req: Request<Incoming>| async move {
                let who = req
                    .headers()
                    .get("meshlet-client-id")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("")
                    .to_string();
                Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(who))))
            });
            tokio::spawn(async move {
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    addr
}

async fn ready(p: &TestProxy) -> (u16, String) {
    let admin = p.admin;
    tokio::task::spawn_blocking(move || test_util::admin_request(admin, "GET", "/ready"))
        .await
        .unwrap()
}

async fn eventually_ready(p: &TestProxy) {
    let start = Instant::now();
    loop {
        let (st, body) = ready(p).await;
        if st == 200 {
            return;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "not ready after 10 s: {st} {body}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sidecars_get_identities_from_the_issuer_and_speak_mtls() {
    let (cp, anchors, _stop) = control_plane().await;
    let cp = cp.to_string();
    let tokens = tempfile::tempdir().unwrap();
    let token = |name: &str, value: &str| {
        let p = tokens.path().join(name);
        std::fs::write(&p, value).unwrap();
        p.to_str().unwrap().to_string()
    };
    let (web_token, client_token) = (token("web", "shop:web"), token("client", "shop:client"));
    let issuer_env = |tok: &str| {
        vec![
            (env::CONTROL_PLANE_ADDR, cp.clone()),
            (env::TRUST_ANCHORS, anchors.clone()),
            (env::IDENTITY_TOKEN_PATH, tok.to_string()),
            (env::PROXY_TLS_MODE, "strict".to_string()),
        ]
    };

    let app = app().await;
    let server_env = issuer_env(&web_token);
    let server_env: Vec<(&str, &str)> = server_env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let server = TestProxy::start(&server_env);
    server.orig_dst.set(Direction::Inbound, app);

    let cfg = tempfile::tempdir().unwrap();
    let mesh = cfg.path().join("mesh.json");
    let doc = serde_json::json!({
        "services": [{
            "name": "web", "namespace": "shop",
            "clusterIPs": [server.inbound.ip()], "ports": [{"port": server.inbound.port()}],
            "meshed": true, "identities": [WEB_ID],
        }]
    });
    std::fs::write(&mesh, doc.to_string()).unwrap();
    let mut client_env = issuer_env(&client_token);
    client_env.push((env::PROXY_CONFIG_PATH, mesh.to_str().unwrap().to_string()));
    let client_env: Vec<(&str, &str)> = client_env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let client = TestProxy::start(&client_env);
    client.orig_dst.set(Direction::Outbound, server.inbound);

    eventually_ready(&server).await;
    eventually_ready(&client).await;

    let mut tx = test_util::h1_client::<Empty<Bytes>>(client.outbound).await;
    let rsp = tx
        .send_request(
            Request::get("/")
                .header("host", "web.shop")
                .body(Empty::new())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(rsp.status(), 200);
    assert_eq!(
        test_util::body_bytes(rsp.into_body()).await,
        CLIENT_ID,
        "the app sees the client's issued identity"
    );

    let sm = server.metrics();
    assert_eq!(
        metric_value(
            &sm,
            &format!(
                r#"meshlet_requests_total{{direction="inbound",service="unknown",status_code="200",tls="true",peer_identity="{CLIENT_ID}"}}"#
            )
        ),
        Some(1.0),
        "{sm}"
    );
    let cm = client.metrics();
    assert_eq!(
        metric_value(
            &cm,
            r#"meshlet_requests_total{direction="outbound",service="shop/web",status_code="200",tls="true"}"#
        ),
        Some(1.0),
        "{cm}"
    );
    let expiry = metric_value(&cm, "meshlet_identity_cert_expiry_timestamp_seconds").unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as f64;
    assert!(
        (expiry - (now + 24.0 * 3600.0)).abs() < 60.0,
        "a 24 h certificate: expiry {expiry}, now {now}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn not_ready_until_the_first_certificate() {
    // The issuer refuses this token (the control plane has no config delivery, so the
    // config part is settled at once): the proxy stays unready, saying why.
    let (cp, anchors, _stop) = control_plane().await;
    let cp = cp.to_string();
    let tokens = tempfile::tempdir().unwrap();
    let tok = tokens.path().join("token");
    std::fs::write(&tok, "not-a-service-account").unwrap();
    let p = TestProxy::start(&[
        (env::CONTROL_PLANE_ADDR, cp.as_str()),
        (env::TRUST_ANCHORS, anchors.as_str()),
        (env::IDENTITY_TOKEN_PATH, tok.to_str().unwrap()),
    ]);
    let start = Instant::now();
    let body = loop {
        let (st, body) = ready(&p).await;
        assert_eq!(st, 503, "ready without a certificate: {body}");
        if body.contains("identity") {
            break body;
        }
        assert!(start.elapsed() < Duration::from_secs(10), "{body}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(body.contains("control plane's issuer"), "{body}");
    // Once the token is one the API server accepts, the next retry gets a certificate.
    std::fs::write(&tok, "shop:web").unwrap();
    eventually_ready(&p).await;
}
