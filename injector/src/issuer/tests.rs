use std::time::{SystemTime, UNIX_EPOCH};

use axum::body::Body;
use base64::Engine as _;
use http_body_util::BodyExt as _;
use rcgen::{CertificateParams, KeyPair};
use tower::ServiceExt as _;

use super::*;

/// A fake API server: every token gets the same review.
struct Fixed(Result<Review, String>);

impl TokenReviewer for Fixed {
    fn review<'a>(&'a self, _token: &'a str) -> ReviewFuture<'a> {
        let r = self.0.clone().map_err(ReviewError);
        Box::pin(async move { r })
    }
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// A JWT-shaped token (unsigned: only the API server's review decides).
fn token(aud: &[&str], exp: u64) -> String {
    let b = |v: serde_json::Value| {
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string())
    };
    format!(
        "{}.{}.c2ln",
        b(serde_json::json!({"alg": "RS256"})),
        b(serde_json::json!({"aud": aud, "exp": exp, "sub": "system:serviceaccount:shop:web"}))
    )
}

fn ok_review(user: &str) -> Review {
    Review {
        authenticated: true,
        username: user.to_string(),
        audiences: vec!["meshlet".to_string()],
        error: None,
    }
}

fn failed_review(error: &str) -> Review {
    Review {
        authenticated: false,
        error: Some(error.to_string()),
        ..Default::default()
    }
}

fn issuer(review: Result<Review, String>) -> Issuer {
    let ca = Ca::generate("cluster.local", ca::DEFAULT_CA_LIFETIME).unwrap();
    Issuer::new(
        Arc::new(ca),
        Arc::new(Fixed(review)),
        "cluster.local",
        Duration::from_secs(24 * 3600),
    )
    .unwrap()
}

fn csr(sans: &[&str]) -> String {
    let key = KeyPair::generate().unwrap();
    let mut p = CertificateParams::default();
    p.subject_alt_names = sans
        .iter()
        .map(|s| {
            if s.starts_with("spiffe://") {
                SanType::URI((*s).try_into().unwrap())
            } else {
                SanType::DnsName((*s).try_into().unwrap())
            }
        })
        .collect();
    p.serialize_request(&key).unwrap().pem().unwrap()
}

fn uris(pem: &str) -> Vec<String> {
    let der = rustls::pki_types::CertificateDer::from_pem_slice(pem.as_bytes()).unwrap();
    let (_, x) = x509_parser::parse_x509_certificate(&der).unwrap();
    x.subject_alternative_name()
        .unwrap()
        .unwrap()
        .value
        .general_names
        .iter()
        .map(|g| g.to_string())
        .collect()
}

#[tokio::test]
async fn issues_exactly_the_reviewed_service_account() {
    let i = issuer(Ok(ok_review("system:serviceaccount:shop:web")));
    let t = token(&["meshlet"], now() + 600);
    for sans in [&[][..], &["spiffe://cluster.local/ns/shop/sa/web"][..]] {
        let r = i.issue(Some(&t), &csr(sans)).await.unwrap();
        assert_eq!(
            uris(&r.certificate_chain),
            ["URI(spiffe://cluster.local/ns/shop/sa/web)"]
        );
        assert_eq!(r.trust_anchors, i.trust_anchors());
        let der = rustls::pki_types::CertificateDer::from_pem_slice(r.certificate_chain.as_bytes())
            .unwrap();
        let (_, x) = x509_parser::parse_x509_certificate(&der).unwrap();
        let nb = x.validity().not_before.timestamp() as u64;
        let na = x.validity().not_after.timestamp() as u64;
        // Backdated by 5 min, valid 24 h from now.
        assert!(nb <= now() - 290 && nb >= now() - 310, "not_before {nb}");
        assert!(na.abs_diff(now() + 24 * 3600) < 10, "not_after {na}");
    }
}

#[tokio::test]
async fn refusals_have_reasons() {
    let good = token(&["meshlet"], now() + 600);
    type Case = (Result<Review, String>, Option<String>, String, Reason);
    let cases: Vec<Case> = vec![
        (
            Ok(ok_review("system:serviceaccount:a:b")),
            None,
            csr(&[]),
            Reason::MissingToken,
        ),
        (
            Ok(ok_review("system:serviceaccount:a:b")),
            Some(String::new()),
            csr(&[]),
            Reason::MissingToken,
        ),
        (
            Ok(failed_review("token audiences [\"other\"] is invalid")),
            Some(token(&["other"], now() + 600)),
            csr(&[]),
            Reason::WrongAudience,
        ),
        (
            Ok(failed_review("token has expired")),
            Some(token(&["meshlet"], now() - 60)),
            csr(&[]),
            Reason::Expired,
        ),
        (
            Ok(failed_review("service account deleted")),
            Some(good.clone()),
            csr(&[]),
            Reason::Unauthenticated,
        ),
        (
            Ok(failed_review("garbage")),
            Some("not-a-jwt".into()),
            csr(&[]),
            Reason::Unauthenticated,
        ),
        (
            Ok(Review {
                audiences: vec!["https://kubernetes.default.svc".into()],
                ..ok_review("system:serviceaccount:a:b")
            }),
            Some(good.clone()),
            csr(&[]),
            Reason::WrongAudience,
        ),
        (
            Ok(ok_review("alice")),
            Some(good.clone()),
            csr(&[]),
            Reason::NotServiceAccount,
        ),
        (
            Ok(ok_review("system:serviceaccount:a:b")),
            Some(good.clone()),
            csr(&["spiffe://cluster.local/ns/a/sa/admin"]),
            Reason::IdentityMismatch,
        ),
        (
            Ok(ok_review("system:serviceaccount:a:b")),
            Some(good.clone()),
            csr(&["spiffe://cluster.local/ns/a/sa/b", "evil.example"]),
            Reason::IdentityMismatch,
        ),
        (
            Ok(ok_review("system:serviceaccount:a:b")),
            Some(good.clone()),
            "junk".into(),
            Reason::BadCsr,
        ),
        (
            Err("connection refused".into()),
            Some(good.clone()),
            csr(&[]),
            Reason::ReviewUnavailable,
        ),
    ];
    for (review, tok, csr_pem, want) in cases {
        let i = issuer(review);
        let err = i.issue(tok.as_deref(), &csr_pem).await.unwrap_err();
        assert_eq!(err.reason, want, "{err}");
        assert!(!err.message.is_empty());
    }
}

#[test]
fn a_tampered_csr_is_refused() {
    let pem = csr(&[]);
    let der = CertificateSigningRequestDer::from_pem_slice(pem.as_bytes()).unwrap();
    let mut bytes = der.as_ref().to_vec();
    // Flip a bit in the signature (the last bytes): the key no longer signed this.
    let n = bytes.len();
    bytes[n - 5] ^= 0x01;
    let bad = ca::pem("CERTIFICATE REQUEST", &bytes);
    let err = parse_csr(&bad).unwrap_err();
    assert_eq!(err.reason, Reason::BadCsr);
    assert!(err.message.contains("signature"), "{err}");
    assert!(parse_csr(&pem).is_ok());
}

async fn call(i: Issuer, auth: Option<&str>, body: &str) -> (StatusCode, serde_json::Value) {
    let mut req = http::Request::post(PATH);
    if let Some(a) = auth {
        req = req.header(header::AUTHORIZATION, a);
    }
    let resp = router(Arc::new(i))
        .oneshot(req.body(Body::from(body.to_string())).unwrap())
        .await
        .unwrap();
    let status = resp.status();
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    (status, serde_json::from_slice(&bytes).unwrap())
}

#[tokio::test]
async fn the_route_answers_with_status_codes_and_json() {
    let good = format!("Bearer {}", token(&["meshlet"], now() + 600));
    let body = serde_json::to_string(&CertificateRequest { csr: csr(&[]) }).unwrap();
    let (st, v) = call(
        issuer(Ok(ok_review("system:serviceaccount:a:b"))),
        Some(&good),
        &body,
    )
    .await;
    assert_eq!(st, StatusCode::OK, "{v}");
    assert!(v["certificateChain"]
        .as_str()
        .unwrap()
        .contains("BEGIN CERTIFICATE"));
    assert!(v["trustAnchors"]
        .as_str()
        .unwrap()
        .contains("BEGIN CERTIFICATE"));

    let (st, v) = call(
        issuer(Ok(ok_review("system:serviceaccount:a:b"))),
        None,
        &body,
    )
    .await;
    assert_eq!(st, StatusCode::UNAUTHORIZED);
    assert_eq!(v["reason"], "missing_token");

    let (st, v) = call(
        issuer(Ok(failed_review("x"))),
        Some(&format!("Bearer {}", token(&["other"], now() + 600))),
        &body,
    )
    .await;
    assert_eq!(st, StatusCode::FORBIDDEN);
    assert_eq!(v["reason"], "wrong_audience");

    let (st, v) = call(
        issuer(Ok(ok_review("system:serviceaccount:a:b"))),
        Some(&good),
        "{}",
    )
    .await;
    assert_eq!(st, StatusCode::BAD_REQUEST);
    assert_eq!(v["reason"], "bad_csr");
    assert!(v["error"].as_str().unwrap().contains("csr"), "{v}");
}

#[test]
fn a_ca_secret_round_trips_and_bad_ones_name_the_key() {
    use k8s_openapi::{api::core::v1::Secret, ByteString};
    use std::collections::BTreeMap;
    let ca = Ca::generate("cluster.local", ca::DEFAULT_CA_LIFETIME).unwrap();
    let secret = |crt: &str, key: &str| Secret {
        data: Some(BTreeMap::from([
            ("tls.crt".to_string(), ByteString(crt.as_bytes().to_vec())),
            ("tls.key".to_string(), ByteString(key.as_bytes().to_vec())),
        ])),
        ..Default::default()
    };
    let back = ca_secret::parse(&secret(ca.cert_pem(), &ca.key_pem()), "ns", "s").unwrap();
    assert_eq!(back.cert_pem(), ca.cert_pem());
    for (crt, key, want) in [
        ("junk".to_string(), ca.key_pem(), "tls.crt"),
        (ca.cert_pem().to_string(), "junk".to_string(), "tls.key"),
    ] {
        let e = ca_secret::parse(&secret(&crt, &key), "ns", "s")
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains(want) && e.contains("ns/s"), "{e}");
    }
    let e = ca_secret::parse(&Secret::default(), "ns", "s")
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("tls.crt"), "{e}");
}
