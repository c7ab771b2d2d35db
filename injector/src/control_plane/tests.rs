use http_body_util::{BodyExt as _, Empty};
use hyper_util::rt::TokioIo;
use rustls::{pki_types::ServerName, RootCertStore};

use super::*;

const NAME: &str = "meshlet-injector.meshlet-system.svc";

async fn endpoint(ca: Arc<Ca>) -> (SocketAddr, tokio::sync::oneshot::Sender<()>) {
    let who = ServerIdentity {
        dns_names: ServerIdentity::service_names("meshlet-injector", "meshlet-system", &[]),
        id: SpiffeId::new("cluster.local", "meshlet-system", "meshlet-injector").unwrap(),
        lifetime: Duration::from_secs(3600),
    };
    let ep = Endpoint::bind("127.0.0.1:0".parse().unwrap(), ca, who)
        .await
        .unwrap();
    let addr = ep.local_addr().unwrap();
    // What config delivery does: read the verified client id from the extensions.
    let app = Router::new().route(
        "/whoami",
        axum::routing::get(|req: axum::extract::Request| async move {
            req.extensions()
                .get::<SpiffeId>()
                .map(|id| id.to_string())
                .unwrap_or_else(|| "anonymous".into())
        }),
    );
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(ep.run(app, async move {
        let _ = rx.await;
    }));
    (addr, tx)
}

async fn whoami(
    addr: SocketAddr,
    anchor: &Ca,
    client: Option<&ca::Issued>,
) -> Result<String, String> {
    let mut roots = RootCertStore::empty();
    roots.add(anchor.cert_der().clone()).unwrap();
    let b = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots);
    let cfg = match client {
        None => b.with_no_client_auth(),
        Some(i) => b
            .with_client_auth_cert(
                CertificateDer::pem_slice_iter(i.cert_pem.as_bytes())
                    .collect::<Result<_, _>>()
                    .unwrap(),
                PrivateKeyDer::from_pem_slice(i.key_pem.as_bytes()).unwrap(),
            )
            .unwrap(),
    };
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let tls = tokio_rustls::TlsConnector::from(Arc::new(cfg))
        .connect(ServerName::try_from(NAME).unwrap(), tcp)
        .await
        .map_err(|e| e.to_string())?;
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    let rsp = send
        .send_request(
            http::Request::get("/whoami")
                .header("host", NAME)
                .body(Empty::<bytes::Bytes>::new())
                .unwrap(),
        )
        .await
        .map_err(|e| e.to_string())?;
    let body = rsp.into_body().collect().await.unwrap().to_bytes();
    Ok(String::from_utf8_lossy(&body).into_owned())
}

#[tokio::test]
async fn client_certificates_are_optional_and_name_the_caller() {
    let ca = Arc::new(Ca::generate("cluster.local", ca::DEFAULT_CA_LIFETIME).unwrap());
    let (addr, _stop) = endpoint(ca.clone()).await;
    assert_eq!(whoami(addr, &ca, None).await.unwrap(), "anonymous");

    let web = SpiffeId::new("cluster.local", "shop", "web").unwrap();
    let issued = ca.issue(&web, Duration::from_secs(600)).unwrap();
    assert_eq!(
        whoami(addr, &ca, Some(&issued)).await.unwrap(),
        web.to_string()
    );

    // A certificate from another CA is refused at the handshake, not ignored.
    let other = Ca::generate("cluster.local", ca::DEFAULT_CA_LIFETIME).unwrap();
    let forged = other.issue(&web, Duration::from_secs(600)).unwrap();
    assert!(whoami(addr, &ca, Some(&forged)).await.is_err());

    // And the endpoint itself is only trusted under the mesh CA.
    assert!(whoami(addr, &other, None).await.is_err());
}

#[test]
fn service_names_cover_what_proxies_dial() {
    let n = ServerIdentity::service_names(
        "meshlet-injector",
        "mesh",
        &[
            "cp.example.org".to_string(),
            "meshlet-injector.mesh.svc".to_string(),
        ],
    );
    assert_eq!(
        n,
        [
            "cp.example.org",
            "meshlet-injector.mesh.svc",
            "meshlet-injector.mesh.svc.cluster.local",
            "meshlet-injector.mesh",
            "meshlet-injector"
        ]
    );
}

/// The leaf certificate the endpoint serves now.
async fn served_leaf(addr: SocketAddr, anchor: &Ca) -> Vec<u8> {
    let mut roots = RootCertStore::empty();
    roots.add(anchor.cert_der().clone()).unwrap();
    let cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let tls = tokio_rustls::TlsConnector::from(Arc::new(cfg))
        .connect(ServerName::try_from(NAME).unwrap(), tcp)
        .await
        .unwrap();
    tls.get_ref().1.peer_certificates().unwrap()[0].to_vec()
}

#[tokio::test]
async fn the_serving_certificate_rotates_before_it_expires() {
    let ca = Arc::new(Ca::generate("cluster.local", ca::DEFAULT_CA_LIFETIME).unwrap());
    let who = ServerIdentity {
        dns_names: vec![NAME.to_string()],
        id: SpiffeId::new("cluster.local", "meshlet-system", "meshlet-injector").unwrap(),
        // Rotation at two thirds: after 2 s.
        lifetime: Duration::from_secs(3),
    };
    let ep = Endpoint::bind("127.0.0.1:0".parse().unwrap(), ca.clone(), who)
        .await
        .unwrap();
    let addr = ep.local_addr().unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(ep.run(Router::new(), async move {
        let _ = rx.await;
    }));
    let first = served_leaf(addr, &ca).await;
    assert_eq!(served_leaf(addr, &ca).await, first);
    tokio::time::sleep(Duration::from_millis(2600)).await;
    let second = served_leaf(addr, &ca).await;
    assert_ne!(second, first, "not rotated at two thirds of its life");
    let _ = tx.send(());
}
