//! The webhook over real HTTPS: `serve` runs in-process on 127.0.0.1 with a certificate
//! from a throw-away rcgen CA, and the tests post AdmissionReviews shaped like the ones
//! kube-apiserver sends (`testdata/review/pod-create.json`).

use std::{net::SocketAddr, path::Path, sync::Arc, time::Duration};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{client::conn::http1::SendRequest, Request, StatusCode};
use hyper_util::rt::TokioIo;
use meshlet_injector::{
    mutate::Context,
    offline::inject_pod_json,
    serve::{ServeConfig, Server},
    Defaults,
};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
use rustls::pki_types::{CertificateDer, ServerName};
use serde_json::{json, Value};
use tokio_rustls::TlsConnector;

const FIXTURE: &str = include_str!("testdata/review/pod-create.json");

// === test PKI ===

struct Pki {
    ca_der: CertificateDer<'static>,
    cert_pem: String,
    key_pem: String,
    cert_der: CertificateDer<'static>,
}

fn pki(name: &str) -> Pki {
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, format!("{name} test CA"));
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca_params, ca_key);
    let key = KeyPair::generate().unwrap();
    let params = CertificateParams::new(vec![
        "localhost".to_string(),
        "meshlet-injector.meshlet-system.svc".to_string(),
        "127.0.0.1".to_string(),
    ])
    .unwrap();
    let cert = params.signed_by(&key, &issuer).unwrap();
    Pki {
        ca_der: ca_cert.der().clone(),
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
        cert_der: cert.der().clone(),
    }
}

/// Replaces a file the way a Secret volume update does: write aside, then rename.
fn write_atomically(path: &Path, contents: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, contents).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

// === server and client ===

struct TestServer {
    addr: SocketAddr,
    dir: tempfile::TempDir,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    done: tokio::task::JoinHandle<()>,
}

impl TestServer {
    fn cert_path(&self) -> std::path::PathBuf {
        self.dir.path().join("tls.crt")
    }
    fn key_path(&self) -> std::path::PathBuf {
        self.dir.path().join("tls.key")
    }
}

async fn start(p: &Pki) -> TestServer {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("tls.crt"), &p.cert_pem).unwrap();
    std::fs::write(dir.path().join("tls.key"), &p.key_pem).unwrap();
    let server = Server::bind(ServeConfig {
        addr: "127.0.0.1:0".parse().unwrap(),
        tls_cert: dir.path().join("tls.crt"),
        tls_key: dir.path().join("tls.key"),
        tls_reload_interval: Duration::from_millis(100),
        defaults: Defaults::default(),
    })
    .await
    .expect("server binds");
    let addr = server.local_addr().unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let done = tokio::spawn(server.run(async {
        let _ = rx.await;
    }));
    TestServer {
        addr,
        dir,
        stop: Some(tx),
        done,
    }
}

struct Conn {
    sender: SendRequest<Full<Bytes>>,
    peer_cert: CertificateDer<'static>,
}

async fn connect(addr: SocketAddr, ca: &CertificateDer<'static>) -> std::io::Result<Conn> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.clone()).unwrap();
    let mut cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let tls = TlsConnector::from(Arc::new(cfg))
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await?;
    let peer_cert = tls.get_ref().1.peer_certificates().unwrap()[0]
        .clone()
        .into_owned();
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .map_err(std::io::Error::other)?;
    tokio::spawn(conn);
    Ok(Conn { sender, peer_cert })
}

async fn send(conn: &mut Conn, method: &str, path: &str, body: Vec<u8>) -> (StatusCode, Bytes) {
    let req = Request::builder()
        .method(method)
        .uri(path)
        .header("host", "localhost")
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body)))
        .unwrap();
    let res = conn.sender.send_request(req).await.expect("response");
    let status = res.status();
    let body = res.into_body().collect().await.unwrap().to_bytes();
    (status, body)
}

async fn post_review(conn: &mut Conn, review: &Value) -> (StatusCode, Value) {
    let (status, body) = send(conn, "POST", "/mutate", serde_json::to_vec(review).unwrap()).await;
    let v = serde_json::from_slice(&body).unwrap_or_else(|e| {
        panic!(
            "response is not JSON ({e}): {}",
            String::from_utf8_lossy(&body)
        )
    });
    (status, v)
}

fn fixture() -> Value {
    serde_json::from_str(FIXTURE).unwrap()
}

/// Decodes the base64 JSON Patch of a response, as kube-apiserver does.
fn patch_of(response: &Value) -> Option<json_patch::Patch> {
    use base64::Engine as _;
    let b64 = response["response"]["patch"].as_str()?;
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(b64)
        .expect("patch is base64");
    Some(serde_json::from_slice(&bytes).expect("patch is a JSON Patch"))
}

// === tests ===

#[tokio::test]
async fn injects_pod_as_the_api_server_sends_it() {
    let p = pki("inject");
    let srv = start(&p).await;
    let mut conn = connect(srv.addr, &p.ca_der).await.unwrap();
    let review = fixture();
    let (status, res) = post_review(&mut conn, &review).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(res["apiVersion"], "admission.k8s.io/v1");
    assert_eq!(res["kind"], "AdmissionReview");
    assert_eq!(res["response"]["uid"], review["request"]["uid"]);
    assert_eq!(res["response"]["allowed"], true);
    assert_eq!(res["response"]["patchType"], "JSONPatch");
    let patch = patch_of(&res).expect("a patch");

    let mut pod = review["request"]["object"].clone();
    json_patch::patch(&mut pod, &patch).expect("the patch applies to the pod it was made for");

    // Online and offline share one code path.
    let mut offline = review["request"]["object"].clone();
    let ctx = Context {
        namespace: Some("shop".into()),
    };
    inject_pod_json(&mut offline, &ctx, &Defaults::default(), "Pod", "").unwrap();
    assert_eq!(pod, offline, "webhook and offline inject disagree");

    let golden_path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/testdata/review/pod-create.injected.json");
    let rendered = serde_json::to_string_pretty(&pod).unwrap() + "\n";
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::write(&golden_path, &rendered).unwrap();
    }
    let golden = std::fs::read_to_string(&golden_path)
        .expect("golden missing: UPDATE_GOLDEN=1 cargo test -p meshlet-injector --test webhook");
    assert_eq!(
        rendered,
        golden,
        "injected pod differs from {}",
        golden_path.display()
    );

    // The kube-api-access volume the ServiceAccount plugin added stays first.
    assert_eq!(pod["spec"]["volumes"][0]["name"], "kube-api-access-x7k2p");
    assert_eq!(pod["spec"]["volumes"][1]["name"], "meshlet-token");

    // A second review of the injected pod (reinvocation) returns no patch.
    let mut again = review.clone();
    again["request"]["object"] = pod;
    again["request"]["uid"] = json!("a-second-uid");
    let (status, res) = post_review(&mut conn, &again).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(res["response"]["uid"], "a-second-uid");
    assert_eq!(res["response"]["allowed"], true);
    assert!(
        res["response"].get("patch").is_none(),
        "second pass patched: {res}"
    );
    assert!(res["response"].get("patchType").is_none());

    // dryRun gets the same answer: the webhook has no side effects.
    let mut dry = review.clone();
    dry["request"]["dryRun"] = json!(true);
    let (_, res) = post_review(&mut conn, &dry).await;
    assert_eq!(patch_of(&res), Some(patch));

    let (status, body) = send(&mut conn, "GET", "/metrics", vec![]).await;
    assert_eq!(status, StatusCode::OK);
    let text = String::from_utf8_lossy(&body);
    assert!(
        text.contains("meshlet_injector_reviews_total{result=\"injected\"}"),
        "{text}"
    );
    assert!(
        text.contains("meshlet_injector_reviews_total{result=\"skipped\"}"),
        "{text}"
    );
    assert!(
        text.contains("meshlet_injector_review_duration_seconds_bucket"),
        "{text}"
    );
    for path in ["/healthz", "/readyz"] {
        assert_eq!(
            send(&mut conn, "GET", path, vec![]).await.0,
            StatusCode::OK,
            "{path}"
        );
    }
}

#[tokio::test]
async fn refuses_bad_pods_with_a_message() {
    let p = pki("deny");
    let srv = start(&p).await;
    let mut conn = connect(srv.addr, &p.ca_der).await.unwrap();
    let cases: [(&str, Value, &[&str]); 3] = [
        (
            "/request/object/metadata/annotations",
            json!({"meshlet.io/tls-mode": "mtls"}),
            &["meshlet.io/tls-mode", "\"mtls\""],
        ),
        (
            "/request/object/spec/containers/0/ports/0/containerPort",
            json!(15020),
            &["15020", "\"web\""],
        ),
        (
            "/request/object/spec/securityContext",
            json!({"runAsUser": 1337}),
            &["UID 1337"],
        ),
    ];
    for (pointer, value, needles) in cases {
        let mut review = fixture();
        *review.pointer_mut(pointer).unwrap() = value;
        let (status, res) = post_review(&mut conn, &review).await;
        assert_eq!(status, StatusCode::OK);
        let r = &res["response"];
        assert_eq!(r["uid"], review["request"]["uid"]);
        assert_eq!(r["allowed"], false, "{pointer}: {res}");
        assert_eq!(r["status"]["code"], 400);
        assert!(r.get("patch").is_none());
        let msg = r["status"]["message"].as_str().unwrap();
        for n in needles {
            assert!(msg.contains(n), "{pointer}: message {msg:?} lacks {n}");
        }
        assert!(
            msg.contains("shop/web-7d4b9c8f5-*"),
            "message names the pod: {msg}"
        );
    }
}

#[tokio::test]
async fn odd_requests_get_clean_answers() {
    let p = pki("odd");
    let srv = start(&p).await;
    let mut conn = connect(srv.addr, &p.ca_der).await.unwrap();

    // Not a Pod: allowed, untouched.
    let mut svc = fixture();
    svc["request"]["kind"] = json!({"group": "", "version": "v1", "kind": "Service"});
    svc["request"]["resource"] = json!({"group": "", "version": "v1", "resource": "services"});
    svc["request"]["object"] =
        json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "x"}, "spec": {}});
    let (status, res) = post_review(&mut conn, &svc).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(res["response"]["allowed"], true);
    assert!(res["response"].get("patch").is_none());

    // Classic sidecar with an app init container: injected, with a warning for the user.
    let mut classic = fixture();
    classic["request"]["object"]["metadata"]["annotations"]["meshlet.io/native-sidecar"] =
        json!("false");
    classic["request"]["object"]["spec"]["initContainers"] =
        json!([{"name": "wait-for-db", "image": "busybox"}]);
    let (_, res) = post_review(&mut conn, &classic).await;
    assert_eq!(res["response"]["allowed"], true);
    assert!(patch_of(&res).is_some());
    let warning = res["response"]["warnings"][0].as_str().unwrap_or_default();
    assert!(warning.contains("wait-for-db"), "{res}");

    // A Pod CREATE without an object.
    let mut empty = fixture();
    empty["request"]["object"] = Value::Null;
    let (status, res) = post_review(&mut conn, &empty).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(res["response"]["allowed"], false);
    assert_eq!(res["response"]["uid"], empty["request"]["uid"]);

    // An object that is not a Pod at all.
    let mut wrong = fixture();
    wrong["request"]["object"]["spec"]["containers"] = json!("not a list");
    let (_, res) = post_review(&mut conn, &wrong).await;
    assert_eq!(res["response"]["allowed"], false);
    assert!(res["response"]["status"]["message"]
        .as_str()
        .unwrap()
        .contains("not a valid Pod"));

    // Garbage and a review without a request: HTTP 400 with a readable reason.
    for body in [
        b"not json {".to_vec(),
        br#"{"kind":"AdmissionReview","apiVersion":"admission.k8s.io/v1"}"#.to_vec(),
    ] {
        let (status, body) = send(&mut conn, "POST", "/mutate", body).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        let v: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["response"]["allowed"], false);
        assert_eq!(v["response"]["status"]["code"], 400);
    }

    // Over 3 MiB: refused before parsing.
    let big = vec![b' '; 3 * 1024 * 1024 + 1];
    let (status, _) = send(&mut conn, "POST", "/mutate", big).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);

    // The server survived all of it.
    assert_eq!(
        send(&mut conn, "GET", "/healthz", vec![]).await.0,
        StatusCode::OK
    );
}

#[tokio::test]
async fn serving_certificate_rotates_without_dropping_connections() {
    let old = pki("old");
    let new = pki("new");
    let srv = start(&old).await;
    let mut kept = connect(srv.addr, &old.ca_der).await.unwrap();
    assert_eq!(kept.peer_cert, old.cert_der);
    assert_eq!(
        send(&mut kept, "GET", "/healthz", vec![]).await.0,
        StatusCode::OK
    );

    // Cert first, key second: for a moment the pair does not match, and the server
    // must keep serving the old one rather than fail.
    write_atomically(&srv.cert_path(), &new.cert_pem);
    tokio::time::sleep(Duration::from_millis(250)).await;
    write_atomically(&srv.key_path(), &new.key_pem);

    let mut fresh = None;
    for _ in 0..50 {
        if let Ok(c) = connect(srv.addr, &new.ca_der).await {
            fresh = Some(c);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut fresh = fresh.expect("a new connection gets the new certificate within 5 s");
    assert_eq!(fresh.peer_cert, new.cert_der);
    assert_eq!(
        send(&mut fresh, "GET", "/healthz", vec![]).await.0,
        StatusCode::OK
    );

    // The connection opened before the rotation still works.
    let (status, res) = post_review(&mut kept, &fixture()).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(res["response"]["allowed"], true);

    // New handshakes no longer present the old certificate.
    assert!(connect(srv.addr, &old.ca_der).await.is_err());
}

#[tokio::test]
async fn http2_clients_are_served() {
    // kube-apiserver's webhook client negotiates h2 when the server offers it.
    let p = pki("h2");
    let srv = start(&p).await;
    let mut roots = rustls::RootCertStore::empty();
    roots.add(p.ca_der.clone()).unwrap();
    let mut cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    let tcp = tokio::net::TcpStream::connect(srv.addr).await.unwrap();
    let tls = TlsConnector::from(Arc::new(cfg))
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .unwrap();
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let (mut sender, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        TokioIo::new(tls),
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    let req = Request::builder()
        .method("POST")
        .uri("https://localhost/mutate")
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(FIXTURE)))
        .unwrap();
    let res = sender.send_request(req).await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    let body = res.into_body().collect().await.unwrap().to_bytes();
    let v: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["response"]["allowed"], true);
    assert!(patch_of(&v).is_some());
}

#[tokio::test]
async fn shutdown_stops_accepting_and_closes_idle_connections() {
    let p = pki("stop");
    let mut srv = start(&p).await;
    let mut conn = connect(srv.addr, &p.ca_der).await.unwrap();
    assert_eq!(
        send(&mut conn, "GET", "/healthz", vec![]).await.0,
        StatusCode::OK
    );
    let _ = srv.stop.take().unwrap().send(());
    // An idle keep-alive connection is closed at once, so run() returns well before
    // the drain deadline.
    tokio::time::timeout(Duration::from_secs(5), &mut srv.done)
        .await
        .expect("server drained idle connections promptly")
        .unwrap();
    assert!(
        tokio::net::TcpStream::connect(srv.addr).await.is_err(),
        "listener still open"
    );
    let closed = tokio::time::timeout(Duration::from_secs(2), async {
        while !conn.sender.is_closed() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert!(closed.is_ok(), "idle connection was not closed");
}

#[tokio::test]
async fn serves_config_delivery_next_to_the_webhook() {
    use meshlet_api::MeshConfig;
    let p = pki("delivery");
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("tls.crt"), &p.cert_pem).unwrap();
    std::fs::write(dir.path().join("tls.key"), &p.key_pem).unwrap();
    let doc = |generation| {
        Arc::new(MeshConfig {
            generation,
            ..Default::default()
        })
    };
    let (tx, rx) = tokio::sync::watch::channel(doc(7));
    let server = Server::bind(ServeConfig {
        addr: "127.0.0.1:0".parse().unwrap(),
        tls_cert: dir.path().join("tls.crt"),
        tls_key: dir.path().join("tls.key"),
        tls_reload_interval: Duration::from_secs(10),
        defaults: Defaults::default(),
    })
    .await
    .unwrap()
    .with_mesh_config(rx);
    let addr = server.local_addr().unwrap();
    let (_stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(server.run(async {
        let _ = stopped.await;
    }));

    let mut conn = connect(addr, &p.ca_der).await.unwrap();
    let req = Request::get("/v1/config?namespace=shop")
        .header("host", "localhost")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let res = conn.sender.send_request(req).await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    let mut body = res.into_body();
    let mut next_doc = async || loop {
        let frame = tokio::time::timeout(Duration::from_secs(5), body.frame())
            .await
            .expect("a document within 5s")
            .expect("stream open")
            .unwrap();
        if let Ok(data) = frame.into_data() {
            if data.iter().any(|b| !b.is_ascii_whitespace()) {
                return MeshConfig::from_json(&data).unwrap();
            }
        }
    };
    assert_eq!(next_doc().await.generation, 7);
    tx.send(doc(8)).unwrap();
    assert_eq!(next_doc().await.generation, 8);

    // The webhook still answers on the same server.
    let mut conn = connect(addr, &p.ca_der).await.unwrap();
    let (status, _) = send(&mut conn, "GET", "/healthz", Vec::new()).await;
    assert_eq!(status, StatusCode::OK);
}
