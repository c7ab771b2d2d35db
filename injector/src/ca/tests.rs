use std::time::UNIX_EPOCH;

use rustls::{client::verify_server_cert_signed_by_trust_anchor, server::ParsedCertificate};
use x509_parser::extensions::GeneralName;

use super::*;

/// What the tests check of a certificate, read with an independent parser.
#[derive(Debug)]
struct Parsed {
    uris: Vec<String>,
    other_names: usize,
    digital_signature: bool,
    key_cert_sign: bool,
    server_auth: bool,
    client_auth: bool,
    ca: Option<(bool, Option<u32>)>,
    not_before: u64,
    not_after: u64,
}

fn id(sa: &str) -> SpiffeId {
    SpiffeId::new("cluster.local", "shop", sa).unwrap()
}

fn parse(der: &[u8]) -> Parsed {
    let (_, x) = x509_parser::parse_x509_certificate(der).unwrap();
    let names = x
        .subject_alternative_name()
        .unwrap()
        .map(|s| s.value.general_names.clone())
        .unwrap_or_default();
    let ku = x.key_usage().unwrap().map(|k| *k.value);
    let eku = x.extended_key_usage().unwrap().map(|e| e.value.clone());
    Parsed {
        uris: names
            .iter()
            .filter_map(|g| match g {
                GeneralName::URI(u) => Some(u.to_string()),
                _ => None,
            })
            .collect(),
        other_names: names
            .iter()
            .filter(|g| !matches!(g, GeneralName::URI(_)))
            .count(),
        digital_signature: ku.is_some_and(|k| k.digital_signature()),
        key_cert_sign: ku.is_some_and(|k| k.key_cert_sign()),
        server_auth: eku.as_ref().is_some_and(|e| e.server_auth),
        client_auth: eku.as_ref().is_some_and(|e| e.client_auth),
        ca: x
            .basic_constraints()
            .unwrap()
            .map(|b| (b.value.ca, b.value.path_len_constraint)),
        not_before: x.validity().not_before.timestamp() as u64,
        not_after: x.validity().not_after.timestamp() as u64,
    }
}

fn secs(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).unwrap().as_secs()
}

/// Chain validation as the proxy does it (server usage; the client side uses the
/// same chain rules with the clientAuth EKU).
fn verify(ca: &Ca, leaf: &CertificateDer<'_>) -> Result<(), rustls::Error> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.cert_der().clone()).unwrap();
    let algs = rustls::crypto::ring::default_provider().signature_verification_algorithms;
    verify_server_cert_signed_by_trust_anchor(
        &ParsedCertificate::try_from(leaf)?,
        &roots,
        &[],
        rustls::pki_types::UnixTime::now(),
        algs.all,
    )
}

#[test]
fn issues_a_spiffe_workload_certificate() {
    let ca = Ca::generate("cluster.local", DEFAULT_CA_LIFETIME).unwrap();
    let issued = ca.issue(&id("web"), Duration::from_secs(3600)).unwrap();
    let der = CertificateDer::from_pem_slice(issued.cert_pem.as_bytes()).unwrap();
    verify(&ca, &der).expect("chains to the root");

    let p = parse(&der);
    assert_eq!(p.uris, vec!["spiffe://cluster.local/ns/shop/sa/web"]);
    assert_eq!(p.other_names, 0);
    assert!(p.digital_signature && !p.key_cert_sign, "{p:?}");
    assert!(p.server_auth && p.client_auth, "{p:?}");
    assert_eq!(p.ca, Some((false, None)));

    let now = secs(SystemTime::now());
    let (nb, na) = (p.not_before, p.not_after);
    assert!(
        (now - BACKDATE.as_secs() - 5..=now - BACKDATE.as_secs() + 1).contains(&nb),
        "NotBefore backdated by 5 minutes: now {now}, nb {nb}"
    );
    assert!(
        (now + 3595..=now + 3601).contains(&na),
        "now {now}, na {na}"
    );

    // The key in key.pem belongs to the certificate.
    let key = rustls::pki_types::PrivateKeyDer::from_pem_slice(issued.key_pem.as_bytes()).unwrap();
    rustls::sign::CertifiedKey::from_der(vec![der], key, &rustls::crypto::ring::default_provider())
        .expect("key matches certificate");
}

#[test]
fn root_is_a_constrained_p256_ca() {
    let ca = Ca::generate("cluster.local", DEFAULT_CA_LIFETIME).unwrap();
    let p = parse(ca.cert_der());
    assert_eq!(p.ca, Some((true, Some(u32::from(MAX_INTERMEDIATES)))));
    assert!(p.key_cert_sign, "{p:?}");
    assert!(ca.issuer.key().algorithm() == &rcgen::PKCS_ECDSA_P256_SHA256);
}

#[test]
fn csr_decides_only_the_key() {
    let ca = Ca::generate("cluster.local", DEFAULT_CA_LIFETIME).unwrap();
    let key = KeyPair::generate().unwrap();
    // The workload asks for more than it may have: a DNS name and a CA bit.
    let mut asked = CertificateParams::new(vec!["evil.example".to_string()]).unwrap();
    asked.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let csr = asked.serialize_request(&key).unwrap();
    let der = sign_csr(&ca, csr.der(), &id("reviews"), DEFAULT_LIFETIME).unwrap();
    verify(&ca, &der).unwrap();
    let p = parse(&der);
    assert_eq!(p.uris, vec!["spiffe://cluster.local/ns/shop/sa/reviews"]);
    assert_eq!(p.other_names, 0, "the requested DNS name is not signed");
    assert_eq!(
        p.ca,
        Some((false, None)),
        "the requested CA bit is not signed"
    );
    // Signed over the requester's key.
    let cert = rustls::server::ParsedCertificate::try_from(&der).unwrap();
    assert_eq!(
        cert.subject_public_key_info().as_ref(),
        key.subject_public_key_info().as_slice()
    );
}

#[test]
fn refuses_bad_csr_and_lifetimes() {
    let ca = Ca::generate("cluster.local", DEFAULT_CA_LIFETIME).unwrap();
    let key = KeyPair::generate().unwrap();
    let csr = CertificateParams::default()
        .serialize_request(&key)
        .unwrap();
    let mut bytes = csr.der().to_vec();
    let n = bytes.len();
    bytes[n - 3] ^= 0xff; // inside the signature
    let e = sign_csr(&ca, &bytes, &id("a"), DEFAULT_LIFETIME).unwrap_err();
    assert!(e.to_string().contains("signing request"), "{e}");
    assert!(sign_csr(&ca, b"garbage", &id("a"), DEFAULT_LIFETIME).is_err());

    for bad in [Duration::ZERO, MAX_LIFETIME + Duration::from_secs(1)] {
        let e = ca.issue(&id("a"), bad).unwrap_err();
        assert!(matches!(e, CaError::Lifetime(_)), "{e}");
    }
}

#[test]
fn save_load_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::generate("cluster.local", DEFAULT_CA_LIFETIME).unwrap();
    ca.save(dir.path()).unwrap();
    let mode = |f: &str| {
        use std::os::unix::fs::PermissionsExt;
        fs::metadata(dir.path().join(f))
            .unwrap()
            .permissions()
            .mode()
            & 0o777
    };
    assert_eq!(mode(CA_KEY_FILE), 0o600);
    let e = ca.save(dir.path()).unwrap_err();
    assert!(matches!(e, CaError::Exists(_)), "{e}");

    let loaded = Ca::load(dir.path()).unwrap();
    assert_eq!(loaded.cert_der(), ca.cert_der());
    // A certificate from the loaded CA chains to the original root.
    let issued = loaded.issue(&id("web"), DEFAULT_LIFETIME).unwrap();
    let out = dir.path().join("web");
    write_identity_dir(&out, &issued).unwrap();
    let cert = fs::read(out.join(CERT_FILE)).unwrap();
    verify(&ca, &CertificateDer::from_pem_slice(&cert).unwrap()).unwrap();
    assert_eq!(
        fs::read_to_string(out.join(CA_CERT_FILE)).unwrap(),
        ca.cert_pem()
    );
    assert_eq!(mode(&format!("web/{KEY_FILE}")), 0o600);

    let e = Ca::load(&dir.path().join("missing")).unwrap_err();
    assert!(e.to_string().contains("cannot read"), "{e}");
}
