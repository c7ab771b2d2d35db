//! The webhook load generator against the real meshlet-injector webhook, served
//! in-process on 127.0.0.1 with a certificate from a throw-away rcgen CA, fed the
//! benchmark's own fixture (`fixtures/productpage-review.json`).

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use meshlet_bench::webhook::{self, Config, ReviewTemplate};
use meshlet_injector::{
    serve::{ServeConfig, Server},
    Defaults,
};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};

const FIXTURE: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/fixtures/productpage-review.json"
);

/// A CA (its PEM in `ca.crt`) and a serving certificate for 127.0.0.1 it signed.
fn pki(dir: &std::path::Path, name: &str) -> PathBuf {
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, format!("{name} CA"));
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca_params, ca_key);
    let key = KeyPair::generate().unwrap();
    let params = CertificateParams::new(vec!["127.0.0.1".to_string()]).unwrap();
    let cert = params.signed_by(&key, &issuer).unwrap();
    std::fs::write(dir.join(format!("{name}.crt")), cert.pem()).unwrap();
    std::fs::write(dir.join(format!("{name}.key")), key.serialize_pem()).unwrap();
    let ca = dir.join(format!("{name}-ca.crt"));
    std::fs::write(&ca, ca_cert.pem()).unwrap();
    ca
}

/// Serves the webhook with `dir/server.{crt,key}` on its own thread; returns its address.
fn start_injector(dir: &std::path::Path) -> SocketAddr {
    let (tx, rx) = std::sync::mpsc::channel();
    let (crt, key) = (dir.join("server.crt"), dir.join("server.key"));
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let server = Server::bind(ServeConfig {
                addr: "127.0.0.1:0".parse().unwrap(),
                tls_cert: crt,
                tls_key: key,
                tls_reload_interval: Duration::from_secs(10),
                defaults: Defaults::default(),
            })
            .await
            .unwrap();
            tx.send(server.local_addr().unwrap()).unwrap();
            server.run(std::future::pending()).await;
        });
    });
    rx.recv_timeout(Duration::from_secs(5)).unwrap()
}

fn config(addr: SocketAddr, ca: PathBuf, review: ReviewTemplate) -> Config {
    Config {
        url: format!("https://{addr}/mutate").parse().unwrap(),
        ca_file: ca,
        server_name: None,
        review,
        headers: vec![],
        rate: 200.0,
        duration: Duration::from_millis(500),
        warmup: Duration::from_millis(100),
        connections: 2,
        new_connection_per_request: false,
        timeout: Duration::from_secs(2),
        watch: vec![],
    }
}

fn fixture() -> ReviewTemplate {
    ReviewTemplate::from_file(FIXTURE.as_ref()).unwrap()
}

#[test]
fn fixture_is_injected_over_keep_alive_tls() {
    let dir = tempfile::tempdir().unwrap();
    let ca = pki(dir.path(), "server");
    let addr = start_injector(dir.path());
    let mut cfg = config(addr, ca, fixture());
    cfg.watch = vec![("me".into(), std::process::id())];
    let r = webhook::run(&cfg).unwrap();
    assert_eq!((r.errors, r.not_injected), (0, 0), "{:?}", r.first_error);
    // 200/s over 0.5 s is 100 slots; float rounding may move one across an edge.
    assert!((99..=101).contains(&r.count), "count {}", r.count);
    assert_eq!(r.injected_total, r.requests_sent);
    assert!(
        (119..=121).contains(&r.requests_sent),
        "sent {}",
        r.requests_sent
    );
    // Two containers with probes: init + sidecar + env + probe rewrites, many operations.
    assert!(r.patch_ops >= 3, "patch ops {}", r.patch_ops);
    assert!(
        r.tls.as_deref().unwrap_or("").contains("TLS"),
        "{:?}",
        r.tls
    );
    // Keep-alive: one connection each, made before the timetable.
    assert_eq!(r.connect_us.count, 2);
    assert!(r.latency_us.p50 >= r.service_time_us.p50);
    assert!(r.latency_us.p99 <= r.latency_us.max);
    assert!(r.review_bytes > 4000, "the fixture is a full pod");
    assert!(r.processes[0].rss_kib_max > 0);
}

#[test]
fn new_connection_per_review_handshakes_every_time() {
    let dir = tempfile::tempdir().unwrap();
    let ca = pki(dir.path(), "server");
    let addr = start_injector(dir.path());
    let mut cfg = config(addr, ca, fixture());
    cfg.rate = 100.0;
    cfg.new_connection_per_request = true;
    let r = webhook::run(&cfg).unwrap();
    assert_eq!((r.errors, r.not_injected), (0, 0), "{:?}", r.first_error);
    assert_eq!(r.injected_total, r.requests_sent);
    assert_eq!(r.connect_us.count, r.requests_sent);
    // The handshake is part of every review's service time.
    assert!(r.service_time_us.min >= r.connect_us.min);
}

#[test]
fn a_pod_that_opts_out_is_not_counted_as_injected() {
    let dir = tempfile::tempdir().unwrap();
    let ca = pki(dir.path(), "server");
    let addr = start_injector(dir.path());
    let mut review: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(FIXTURE).unwrap()).unwrap();
    review["request"]["object"]["metadata"]["labels"]["meshlet.io/inject"] = "disabled".into();
    let review = ReviewTemplate::parse(&serde_json::to_vec(&review).unwrap()).unwrap();
    let r = webhook::run(&config(addr, ca, review)).unwrap();
    assert_eq!(r.count, 0);
    assert_eq!(r.injected_total, 0);
    assert!(r.not_injected >= 99, "not injected {}", r.not_injected);
    let e = r.first_error.unwrap();
    assert!(e.contains("without a JSONPatch"), "{e}");
}

#[test]
fn a_certificate_from_another_ca_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    pki(dir.path(), "server");
    let other_ca = pki(dir.path(), "other");
    let addr = start_injector(dir.path());
    let r = webhook::run(&config(addr, other_ca, fixture())).unwrap();
    assert_eq!((r.count, r.injected_total), (0, 0));
    assert!(r.errors >= 99, "errors {}", r.errors);
    let e = r.first_error.unwrap();
    assert!(
        e.contains("TLS handshake") && e.contains("certificate"),
        "{e}"
    );
}

#[test]
fn plain_http_and_a_missing_ca_are_refused_with_what_to_do() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(
        "127.0.0.1:1".parse().unwrap(),
        dir.path().join("none.crt"),
        fixture(),
    );
    let e = webhook::run(&cfg).unwrap_err().to_string();
    assert!(e.contains("--cacert") && e.contains("cannot read"), "{e}");
    cfg.url = "http://127.0.0.1:1/mutate".parse().unwrap();
    let e = webhook::run(&cfg).unwrap_err().to_string();
    assert!(e.contains("https://"), "{e}");
}
