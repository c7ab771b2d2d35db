use std::time::Duration;

use meshlet_api::SpiffeId;
use meshlet_injector::{
    ca::{self, Ca},
    control_plane::{Endpoint, ServerIdentity},
    issuer::{self, Issuer, Review, ReviewFuture, TokenReviewer},
};
use rustls::pki_types::{pem::PemObject, PrivateKeyDer};

use super::*;
use crate::metrics::Metrics;

#[test]
fn the_csr_verifies_and_asks_for_no_name() {
    let rng = SystemRandom::new();
    let (key, csr_der) = make_csr(&rng).unwrap();
    let parsed = issuer::parse_csr(&pem("CERTIFICATE REQUEST", &csr_der)).unwrap();
    assert!(parsed.params.subject_alt_names.is_empty());
    // The key is a PKCS#8 P-256 key rustls can sign with.
    let der = PrivateKeyDer::from_pem_slice(pem("PRIVATE KEY", &key).as_bytes()).unwrap();
    assert!(super::super::provider()
        .key_provider
        .load_private_key(der)
        .is_ok());
    // Two calls, two keys.
    assert_ne!(make_csr(&rng).unwrap().0, key);
}

#[test]
fn pem_round_trips_every_padding() {
    for n in 0..70u8 {
        let der: Vec<u8> = (0..n).map(|i| i.wrapping_mul(37)).collect();
        let p = pem("CERTIFICATE REQUEST", &der);
        let back = rustls::pki_types::CertificateSigningRequestDer::from_pem_slice(p.as_bytes());
        if n == 0 {
            continue;
        }
        assert_eq!(back.unwrap().as_ref(), &der[..], "length {n}");
    }
}

#[test]
fn renewal_is_near_half_life_and_jittered() {
    let day = Duration::from_secs(24 * 3600);
    assert_eq!(renew_after(day, 0.0), day.mul_f64(0.4));
    assert_eq!(renew_after(day, 1.0), day.mul_f64(0.6));
    assert_eq!(renew_after(day, 7.0), day.mul_f64(0.6));
    assert_eq!(renew_after(Duration::ZERO, 0.5), MIN_RENEW);
    let j: Vec<f64> = (0..20).map(|_| jitter()).collect();
    assert!(j.iter().all(|x| (0.0..1.0).contains(x)), "{j:?}");
    assert!(j.windows(2).any(|w| w[0] != w[1]), "no jitter: {j:?}");
}

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
            None => Review {
                error: Some("invalid bearer token".into()),
                ..Default::default()
            },
        };
        Box::pin(async move { Ok(r) })
    }
}

struct Plane {
    addr: std::net::SocketAddr,
    anchors: String,
    _stop: tokio::sync::oneshot::Sender<()>,
}

async fn plane() -> Plane {
    let ca = Arc::new(Ca::generate("cluster.local", ca::DEFAULT_CA_LIFETIME).unwrap());
    let iss = Issuer::new(
        ca.clone(),
        Arc::new(ByToken),
        "cluster.local",
        Duration::from_secs(3600),
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
    Plane {
        addr,
        anchors: ca.cert_pem().to_string(),
        _stop: tx,
    }
}

fn config(p: &Plane, token: &std::path::Path) -> IssuerConfig {
    IssuerConfig {
        control_plane: crate::config::ControlPlane {
            addr: p.addr.to_string(),
            name: meshlet_api::identity::CONTROL_PLANE_NAME.to_string(),
            trust_anchors: p.anchors.clone(),
        },
        token_path: token.to_path_buf(),
    }
}

#[tokio::test]
async fn gets_its_identity_from_the_control_plane_and_rereads_the_token() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let p = plane().await;
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("token");
    std::fs::write(&token, "shop:web\n").unwrap();
    let identity = Identity::issued(Metrics::new()).unwrap();
    let client = IssuerClient::new(&config(&p, &token)).unwrap();
    let creds = client.fetch(&identity).await.unwrap();
    assert_eq!(
        creds.id.to_string(),
        "spiffe://cluster.local/ns/shop/sa/web"
    );
    let left = creds.not_after.saturating_sub(unix_now());
    assert!((3500..=3600).contains(&left), "{left}");

    // Kubelet rotates the token file: the next request reads the new one.
    std::fs::write(&token, "shop:api").unwrap();
    assert_eq!(
        client.fetch(&identity).await.unwrap().id.to_string(),
        "spiffe://cluster.local/ns/shop/sa/api"
    );

    // The loop fills the store, so /ready can pass.
    assert!(!identity.is_loaded());
    let task = tokio::spawn(run(identity.clone(), client));
    for _ in 0..100 {
        if identity.is_loaded() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    task.abort();
    assert_eq!(
        identity.current().unwrap().id.to_string(),
        "spiffe://cluster.local/ns/shop/sa/api"
    );
}

#[tokio::test]
async fn refusals_and_wrong_anchors_are_reported() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let p = plane().await;
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("token");
    let identity = Identity::issued(Metrics::new()).unwrap();

    // No token file yet.
    let client = IssuerClient::new(&config(&p, &token)).unwrap();
    let e = client.fetch(&identity).await.unwrap_err();
    assert!(matches!(e, IssuerError::Token { .. }), "{e}");

    std::fs::write(&token, "garbage").unwrap();
    match client.fetch(&identity).await.unwrap_err() {
        IssuerError::Refused {
            status,
            reason,
            message,
        } => {
            assert_eq!((status, reason.as_str()), (401, "unauthenticated"));
            assert!(message.contains("invalid bearer token"), "{message}");
        }
        e => panic!("{e}"),
    }

    // A control plane signed by another CA is not trusted.
    let other = Ca::generate("cluster.local", ca::DEFAULT_CA_LIFETIME).unwrap();
    let mut cfg = config(&p, &token);
    cfg.control_plane.trust_anchors = other.cert_pem().to_string();
    let e = IssuerClient::new(&cfg)
        .unwrap()
        .fetch(&identity)
        .await
        .unwrap_err();
    assert!(
        matches!(e, IssuerError::Connect { .. }) && e.to_string().contains("TLS"),
        "{e}"
    );

    // Nor one whose certificate does not carry the configured name.
    let mut cfg = config(&p, &token);
    cfg.control_plane.name = "evil.example".into();
    let e = IssuerClient::new(&cfg)
        .unwrap()
        .fetch(&identity)
        .await
        .unwrap_err();
    assert!(matches!(e, IssuerError::Connect { .. }), "{e}");

    cfg.control_plane.trust_anchors = "not pem".into();
    assert!(matches!(
        IssuerClient::new(&cfg),
        Err(IssuerError::Setup(ControlError::Setup(_)))
    ));
    assert!(!identity.is_loaded());
}
