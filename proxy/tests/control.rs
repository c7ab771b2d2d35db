//! The mesh config from the control plane: a proxy with `MESHLET_CONTROL_PLANE_ADDR`
//! watches `GET /v1/config` of an in-process config server (the real delivery router
//! and listener of `meshlet_injector::delivery`) over TLS 1.3, presenting its mesh
//! identity as client certificate.

use std::{
    net::SocketAddr,
    path::Path,
    sync::Arc,
    time::{Duration, Instant},
};

use meshlet_api::{env, MeshConfig};
use meshlet_injector::{
    ca::{self, Ca},
    delivery::{self, server},
    tls::ReloadingCert,
};
use meshlet_proxy::test_util::{metric_value, TestProxy};
use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
use tempfile::TempDir;
use tokio::sync::{oneshot, watch};

const CP_NAME: &str = meshlet_api::identity::CONTROL_PLANE_NAME;

/// `shop/web` with a producer route and consumer routes of `front` and `batch`.
fn doc(generation: u64) -> MeshConfig {
    let mut d = MeshConfig::from_json(
        br#"{"services": [{"name": "web", "namespace": "shop", "clusterIPs": ["198.19.0.10"],
            "ports": [{"port": 80}],
            "routes": [{"name": "producer", "namespace": "shop", "rules": []},
                       {"name": "from-front", "namespace": "front", "rules": []},
                       {"name": "from-batch", "namespace": "batch", "rules": []}]}]}"#,
    )
    .unwrap();
    d.generation = generation;
    d
}

/// The control plane's side: a serving certificate for [`CP_NAME`] from its own CA,
/// and the mesh CA that issues the proxies' identities.
struct Pki {
    dir: TempDir,
    server_ca_pem: String,
    mesh: Ca,
}

impl Pki {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let ca_key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca_cert = params.self_signed(&ca_key).unwrap();
        let issuer = Issuer::new(params, ca_key);
        let key = KeyPair::generate().unwrap();
        let leaf = CertificateParams::new(vec![CP_NAME.to_string()])
            .unwrap()
            .signed_by(&key, &issuer)
            .unwrap();
        std::fs::write(dir.path().join("tls.crt"), leaf.pem()).unwrap();
        std::fs::write(dir.path().join("tls.key"), key.serialize_pem()).unwrap();
        Self {
            dir,
            server_ca_pem: ca_cert.pem(),
            mesh: Ca::generate("cluster.local", Duration::from_secs(3600)).unwrap(),
        }
    }

    fn identity(&self, spiffe_id: &str) -> TempDir {
        let dir = tempfile::tempdir().unwrap();
        let issued = self
            .mesh
            .issue(&spiffe_id.parse().unwrap(), Duration::from_secs(3600))
            .unwrap();
        ca::write_identity_dir(dir.path(), &issued).unwrap();
        dir
    }
}

/// A running config server; dropping `stop` kills it (connections cut).
struct ConfigServer {
    stop: Option<oneshot::Sender<()>>,
    done: tokio::task::JoinHandle<()>,
}

impl ConfigServer {
    async fn start(pki: &Pki, addr: SocketAddr, rx: watch::Receiver<Arc<MeshConfig>>) -> Self {
        let cert = ReloadingCert::load(
            &pki.dir.path().join("tls.crt"),
            &pki.dir.path().join("tls.key"),
        )
        .unwrap();
        let tls = server::tls_config(cert, Some(pki.mesh.cert_pem().as_bytes())).unwrap();
        let options = delivery::Options {
            heartbeat: Duration::from_millis(200),
            ..Default::default()
        };
        let app = delivery::router(rx, options);
        let listener = bind(addr).await;
        let (stop, stopped) = oneshot::channel::<()>();
        let done = tokio::spawn(server::serve(
            listener,
            Some(Arc::new(tls)),
            app,
            async move {
                let _ = stopped.await;
            },
        ));
        Self {
            stop: Some(stop),
            done,
        }
    }

    async fn kill(mut self) {
        drop(self.stop.take());
        (&mut self.done).await.unwrap();
    }
}

/// Binds `addr`, retrying briefly: the port of a server just killed may linger.
async fn bind(addr: SocketAddr) -> tokio::net::TcpListener {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match tokio::net::TcpListener::bind(addr).await {
            Ok(l) => return l,
            Err(_) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => panic!("cannot bind {addr}: {e}"),
        }
    }
}

fn free_port() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

fn proxy(pki: &Pki, cp: SocketAddr, namespace: &str, identity: &Path) -> TestProxy {
    let cp = cp.to_string();
    TestProxy::start(&[
        (env::CONTROL_PLANE_ADDR, &cp),
        (env::TRUST_ANCHORS, &pki.server_ca_pem),
        (env::POD_NAMESPACE, namespace),
        (env::PROXY_IDENTITY_DIR, identity.to_str().unwrap()),
    ])
}

/// The mesh document the proxy's `/config` shows.
fn served(p: &TestProxy) -> serde_json::Value {
    let (status, body) = p.admin_get("/config");
    assert_eq!(status, 200);
    serde_json::from_str::<serde_json::Value>(&body).unwrap()["mesh"].clone()
}

fn generation(p: &TestProxy) -> u64 {
    served(p)["generation"].as_u64().unwrap()
}

async fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn follows_the_control_plane_and_keeps_the_last_good_config() {
    let pki = Pki::new();
    let id = pki.identity("spiffe://cluster.local/ns/front/sa/app");
    let addr = free_port();
    let (tx, rx) = watch::channel(Arc::new(doc(1)));

    // No server yet: the proxy runs but is not ready.
    let p = proxy(&pki, addr, "front", id.path());
    let (status, body) = p.admin_get("/ready");
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("waiting for the first mesh config"), "{body}");

    // First document: applied, ready, and it is the view of the identity's namespace.
    let srv = ConfigServer::start(&pki, addr, rx.clone()).await;
    eventually("ready", || p.admin_get("/ready").0 == 200).await;
    let mesh = served(&p);
    assert_eq!(mesh["generation"], 1);
    let routes: Vec<&str> = mesh["services"][0]["routes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["name"].as_str().unwrap())
        .collect();
    assert_eq!(routes, ["producer", "from-front"]);

    // A change is applied.
    let t = Instant::now();
    tx.send(Arc::new(doc(2))).unwrap();
    eventually("generation 2", || generation(&p) == 2).await;
    assert!(
        t.elapsed() < Duration::from_secs(1),
        "took {:?}",
        t.elapsed()
    );
    let ok = |p: &TestProxy| {
        metric_value(&p.metrics(), r#"meshlet_config_reloads_total{result="ok"}"#).unwrap()
    };
    let errors = |p: &TestProxy| {
        metric_value(
            &p.metrics(),
            r#"meshlet_config_reloads_total{result="error"}"#,
        )
        .unwrap()
    };
    assert_eq!(ok(&p), 2.0);
    assert_eq!(errors(&p), 0.0);

    // An invalid document (a service without a name) is refused and counted.
    let mut bad = doc(3);
    bad.services[0].name.clear();
    tx.send(Arc::new(bad)).unwrap();
    eventually("the invalid document counted", || errors(&p) == 1.0).await;
    assert_eq!(generation(&p), 2, "the last good config keeps serving");

    // The server dies: the proxy keeps serving generation 2, never an empty config.
    srv.kill().await;
    tx.send(Arc::new(doc(4))).unwrap();
    let until = Instant::now() + Duration::from_millis(700);
    while Instant::now() < until {
        let mesh = served(&p);
        assert_eq!(mesh["generation"], 2);
        assert_eq!(mesh["services"].as_array().unwrap().len(), 1);
        assert_eq!(
            p.admin_get("/ready").0,
            200,
            "still ready on the last good config"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Back on the same address: the proxy reconnects and applies what is new.
    let _srv = ConfigServer::start(&pki, addr, rx).await;
    eventually("generation 4 after the restart", || generation(&p) == 4).await;
    assert_eq!(ok(&p), 3.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_namespace_other_than_the_identity_is_refused() {
    let pki = Pki::new();
    let id = pki.identity("spiffe://cluster.local/ns/front/sa/app");
    let addr = free_port();
    let (_tx, rx) = watch::channel(Arc::new(doc(1)));
    let _srv = ConfigServer::start(&pki, addr, rx).await;

    // It claims `batch` while its certificate says `front`: no config, not ready.
    let p = proxy(&pki, addr, "batch", id.path());
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert_eq!(p.admin_get("/ready").0, 503);
    assert_eq!(generation(&p), 0);

    // The same identity in its own namespace is served.
    let p = proxy(&pki, addr, "front", id.path());
    eventually("ready", || p.admin_get("/ready").0 == 200).await;
    assert_eq!(generation(&p), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_control_plane_without_config_delivery_leaves_the_proxy_ready_and_empty() {
    let pki = Pki::new();
    let id = pki.identity("spiffe://cluster.local/ns/front/sa/app");
    let addr = free_port();
    let cert = ReloadingCert::load(
        &pki.dir.path().join("tls.crt"),
        &pki.dir.path().join("tls.key"),
    )
    .unwrap();
    let tls = server::tls_config(cert, Some(pki.mesh.cert_pem().as_bytes())).unwrap();
    // Only the issuer's kind of routes: /v1/config answers 404.
    let app = axum::Router::new().route("/healthz", axum::routing::get(|| async { "ok" }));
    tokio::spawn(server::serve(
        bind(addr).await,
        Some(Arc::new(tls)),
        app,
        std::future::pending(),
    ));
    let p = proxy(&pki, addr, "front", id.path());
    eventually("ready on an empty config", || {
        p.admin_get("/ready").0 == 200
    })
    .await;
    assert_eq!(generation(&p), 0);
    assert!(served(&p)["services"].as_array().unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_with_a_certificate_for_another_name_is_not_trusted() {
    let pki = Pki::new();
    let id = pki.identity("spiffe://cluster.local/ns/front/sa/app");
    let addr = free_port();
    let (_tx, rx) = watch::channel(Arc::new(doc(1)));
    let _srv = ConfigServer::start(&pki, addr, rx).await;
    let cp = addr.to_string();
    let p = TestProxy::start(&[
        (env::CONTROL_PLANE_ADDR, &cp),
        (env::CONTROL_PLANE_NAME, "impostor.meshlet-system.svc"),
        (env::TRUST_ANCHORS, &pki.server_ca_pem),
        (env::POD_NAMESPACE, "front"),
        (env::PROXY_IDENTITY_DIR, id.path().to_str().unwrap()),
    ]);
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert_eq!(p.admin_get("/ready").0, 503);
    assert_eq!(generation(&p), 0);
}
