use std::net::SocketAddr;

use bytes::BytesMut;
use http_body_util::{BodyExt, Empty};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

use super::*;

/// Two services: `shop/web` with a producer route and consumer routes from `front`
/// and `batch`; `data/db` without routes.
const DOC: &str = r#"{"generation": 1, "services": [
    {"name": "web", "namespace": "shop", "clusterIPs": ["198.19.0.10"], "ports": [{"port": 80}],
     "routes": [
        {"name": "producer", "namespace": "shop", "rules": []},
        {"name": "from-front", "namespace": "front", "rules": []},
        {"name": "from-batch", "namespace": "batch", "rules": []}]},
    {"name": "db", "namespace": "data", "clusterIPs": ["198.19.0.11"], "ports": [{"port": 5432}]}]}"#;

fn doc(generation: u64) -> Arc<MeshConfig> {
    let mut d = MeshConfig::from_json(DOC.as_bytes()).unwrap();
    d.generation = generation;
    Arc::new(d)
}

fn route_names(cfg: &MeshConfig) -> Vec<String> {
    cfg.services[0]
        .routes
        .iter()
        .map(|r| r.name.clone())
        .collect()
}

#[test]
fn view_keeps_producer_routes_and_own_consumer_routes() {
    let d = doc(1);
    assert_eq!(route_names(&view(&d, "front")), ["producer", "from-front"]);
    assert_eq!(route_names(&view(&d, "batch")), ["producer", "from-batch"]);
    assert_eq!(
        route_names(&view(&d, "shop")),
        ["producer"],
        "a client in the producer's namespace sees the producer routes only"
    );
    assert_eq!(route_names(&view(&d, "other")), ["producer"]);
    let v = view(&d, "front");
    assert_eq!(v.services.len(), 2, "services are never filtered");
    assert_eq!(v.generation, 1);
    v.validate().unwrap();
}

#[test]
fn namespace_comes_from_the_identity_first() {
    let id: SpiffeId = "spiffe://cluster.local/ns/front/sa/app".parse().unwrap();
    assert_eq!(client_namespace(Some(&id), None, false).unwrap(), "front");
    assert_eq!(
        client_namespace(Some(&id), Some("namespace=front"), true).unwrap(),
        "front"
    );
    let (status, msg) = client_namespace(Some(&id), Some("namespace=batch"), false).unwrap_err();
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert!(
        msg.contains("does not match") && msg.contains(&id.to_string()),
        "{msg}"
    );

    assert_eq!(
        client_namespace(None, Some("x=1&namespace=batch"), false).unwrap(),
        "batch"
    );
    let (status, _) = client_namespace(None, Some("namespace=batch"), true).unwrap_err();
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let (status, msg) = client_namespace(None, None, false).unwrap_err();
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(msg.contains("?namespace=<namespace>"), "{msg}");
    for bad in [
        "namespace=Shop",
        "namespace=",
        "namespace=a%2Fb",
        "namespace=a&namespace=a",
    ] {
        let (status, _) = client_namespace(None, Some(bad), false).unwrap_err();
        assert_eq!(status, StatusCode::BAD_REQUEST, "{bad}");
    }
}

/// An in-process server over plaintext; `id` plays the TLS server's verified identity.
async fn server(
    rx: watch::Receiver<Arc<MeshConfig>>,
    heartbeat: Duration,
    id: Option<SpiffeId>,
) -> (SocketAddr, PrometheusHandle) {
    let recorder = PrometheusBuilder::new().build_recorder();
    let handle = recorder.handle();
    let options = Options {
        heartbeat,
        require_identity: false,
        metrics: DeliveryMetrics::with_recorder(&recorder),
    };
    let mut app = router(rx, options);
    if let Some(id) = id {
        app = app.layer(axum::Extension(id));
    }
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    // The recorder must outlive the server: the handles point into it.
    tokio::spawn(async move {
        let _keep = recorder;
        axum::serve(listener, app).await.unwrap();
    });
    (addr, handle)
}

async fn get(addr: SocketAddr, path: &str) -> hyper::Response<Incoming> {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .unwrap();
    tokio::spawn(conn);
    let req = hyper::Request::get(path)
        .header("host", "meshlet-injector")
        .body(Empty::<Bytes>::new())
        .unwrap();
    send.send_request(req).await.unwrap()
}

/// Reads the body line by line.
struct Lines {
    body: Incoming,
    buf: BytesMut,
}

impl Lines {
    /// The next line (without `\n`), or `None` at the end of the body; fails the test
    /// after 5 s.
    async fn next(&mut self) -> Option<String> {
        tokio::time::timeout(Duration::from_secs(5), async {
            loop {
                if let Some(i) = self.buf.iter().position(|b| *b == b'\n') {
                    let line = self.buf.split_to(i + 1);
                    return Some(String::from_utf8(line[..i].to_vec()).unwrap());
                }
                match self.body.frame().await {
                    None => return None,
                    Some(f) => {
                        if let Ok(data) = f.unwrap().into_data() {
                            self.buf.extend_from_slice(&data);
                        }
                    }
                }
            }
        })
        .await
        .expect("no line within 5s")
    }

    async fn doc(&mut self) -> MeshConfig {
        loop {
            let line = self.next().await.expect("stream ended");
            if !line.is_empty() {
                return MeshConfig::from_json(line.as_bytes()).unwrap();
            }
        }
    }
}

fn metric(handle: &PrometheusHandle, name: &str) -> f64 {
    let text = handle.render();
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("no {name} in\n{text}"))
}

#[tokio::test]
async fn streams_the_current_view_then_each_change() {
    let (tx, rx) = watch::channel(doc(1));
    let (addr, metrics) = server(rx, Duration::from_secs(60), None).await;

    let rsp = get(addr, "/v1/config?namespace=front").await;
    assert_eq!(rsp.status(), StatusCode::OK);
    assert_eq!(rsp.headers()[header::CONTENT_TYPE], CONTENT_TYPE);
    let mut front = Lines {
        body: rsp.into_body(),
        buf: BytesMut::new(),
    };
    let first = front.doc().await;
    assert_eq!(first.generation, 1);
    assert_eq!(route_names(&first), ["producer", "from-front"]);

    let mut batch = Lines {
        body: get(addr, "/v1/config?namespace=batch").await.into_body(),
        buf: BytesMut::new(),
    };
    assert_eq!(route_names(&batch.doc().await), ["producer", "from-batch"]);
    assert_eq!(metric(&metrics, WATCHERS), 2.0);
    assert_eq!(metric(&metrics, DOCUMENTS_SENT), 2.0);

    // A change reaches both, each in its own view.
    let mut d2 = (*doc(2)).clone();
    d2.services[0].routes.retain(|r| r.name != "from-front");
    tx.send(Arc::new(d2)).unwrap();
    let second = front.doc().await;
    assert_eq!(second.generation, 2);
    assert_eq!(route_names(&second), ["producer"]);
    assert_eq!(route_names(&batch.doc().await), ["producer", "from-batch"]);

    // Publishing the same document again sends nothing; the next real change does.
    tx.send_modify(|_| {});
    tx.send(doc(3)).unwrap();
    assert_eq!(front.doc().await.generation, 3);
    assert_eq!(metric(&metrics, DOCUMENTS_SENT), 6.0);

    // A closed client is no longer counted.
    drop(batch);
    tokio::time::timeout(Duration::from_secs(5), async {
        while metric(&metrics, WATCHERS) != 1.0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("the watcher gauge did not drop to 1");

    // The publisher going away ends the stream, so clients reconnect.
    drop(tx);
    assert_eq!(front.next().await, None);
}

#[tokio::test]
async fn nothing_is_sent_before_the_publisher_has_synced() {
    let (tx, rx) = watch::channel(Arc::new(MeshConfig::default()));
    let (addr, metrics) = server(rx, Duration::from_millis(50), None).await;
    let mut lines = Lines {
        body: get(addr, "/v1/config?namespace=front").await.into_body(),
        buf: BytesMut::new(),
    };
    assert_eq!(
        lines.next().await.unwrap(),
        "",
        "a heartbeat, not the empty document"
    );
    assert_eq!(metric(&metrics, DOCUMENTS_SENT), 0.0);
    tx.send(doc(1)).unwrap();
    assert_eq!(lines.doc().await.generation, 1);
}

#[tokio::test]
async fn heartbeats_keep_a_quiet_stream_alive() {
    let (_tx, rx) = watch::channel(doc(1));
    let (addr, _) = server(rx, Duration::from_millis(50), None).await;
    let mut lines = Lines {
        body: get(addr, "/v1/config?namespace=front").await.into_body(),
        buf: BytesMut::new(),
    };
    assert!(!lines.next().await.unwrap().is_empty(), "document first");
    for _ in 0..3 {
        assert_eq!(
            lines.next().await.unwrap(),
            "",
            "then blank heartbeat lines"
        );
    }
}

#[tokio::test]
async fn identity_decides_the_view_and_a_foreign_namespace_is_refused() {
    let (_tx, rx) = watch::channel(doc(1));
    let id: SpiffeId = "spiffe://cluster.local/ns/batch/sa/job".parse().unwrap();
    let (addr, _) = server(rx, Duration::from_secs(60), Some(id)).await;

    let mut own = Lines {
        body: get(addr, "/v1/config").await.into_body(),
        buf: BytesMut::new(),
    };
    assert_eq!(route_names(&own.doc().await), ["producer", "from-batch"]);

    let rsp = get(addr, "/v1/config?namespace=front").await;
    assert_eq!(rsp.status(), StatusCode::FORBIDDEN);
    let body = rsp.into_body().collect().await.unwrap().to_bytes();
    let body = String::from_utf8_lossy(&body);
    assert!(
        body.contains("namespace=front does not match")
            && body.contains("spiffe://cluster.local/ns/batch/sa/job"),
        "{body}"
    );
}

/// Many proxies of a few namespaces: every one gets the change, each namespace's view
/// is serialised once per document.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_reaches_every_watcher() {
    const WATCHERS: usize = 200;
    let (tx, rx) = watch::channel(doc(1));
    let (addr, metrics) = server(rx, Duration::from_secs(60), None).await;
    let mut streams = Vec::new();
    for i in 0..WATCHERS {
        let ns = ["front", "batch", "shop", "other"][i % 4];
        let mut l = Lines {
            body: get(addr, &format!("/v1/config?namespace={ns}"))
                .await
                .into_body(),
            buf: BytesMut::new(),
        };
        assert_eq!(l.doc().await.generation, 1);
        streams.push(l);
    }
    let t = std::time::Instant::now();
    tx.send(doc(2)).unwrap();
    let all = futures_util::future::join_all(streams.iter_mut().map(|l| l.doc())).await;
    let took = t.elapsed();
    assert!(all.iter().all(|d| d.generation == 2));
    println!("{WATCHERS} watchers got the change in {took:?}");
    assert_eq!(metric(&metrics, super::WATCHERS), WATCHERS as f64);
    assert_eq!(metric(&metrics, DOCUMENTS_SENT), 2.0 * WATCHERS as f64);
}
