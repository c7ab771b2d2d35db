//! The verifiers against certificates made with rcgen for each way a peer can be wrong.

use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose as Eku, IsCa, Issuer, KeyPair,
    KeyUsagePurpose as Ku, SanType,
};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};

use super::*;
use crate::tls::{provider, Credentials};

/// A CA (root or intermediate) that signs test certificates.
struct TestCa {
    params: CertificateParams,
    key: KeyPair,
    cert: CertificateDer<'static>,
}

fn root() -> TestCa {
    static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::default();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, format!("test root {n}"));
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![Ku::KeyCertSign, Ku::DigitalSignature];
    let cert = params.self_signed(&key).unwrap().der().clone();
    TestCa { params, key, cert }
}

impl TestCa {
    fn intermediate(&self) -> TestCa {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::default();
        params.distinguished_name.push(
            rcgen::DnType::CommonName,
            format!("intermediate under {:?}", self.params.distinguished_name),
        );
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![Ku::KeyCertSign, Ku::DigitalSignature];
        let issuer = Issuer::from_params(&self.params, &self.key);
        let cert = params.signed_by(&key, &issuer).unwrap().der().clone();
        TestCa { params, key, cert }
    }

    /// A workload certificate for `uri`, changed by `edit`, and its key.
    fn leaf(
        &self,
        uri: &str,
        edit: impl FnOnce(&mut CertificateParams),
    ) -> (CertificateDer<'static>, KeyPair) {
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::default();
        p.subject_alt_names = vec![SanType::URI(uri.try_into().unwrap())];
        p.key_usages = vec![Ku::DigitalSignature];
        p.extended_key_usages = vec![Eku::ServerAuth, Eku::ClientAuth];
        let now = SystemTime::now();
        p.not_before = (now - Duration::from_secs(300)).into();
        p.not_after = (now + Duration::from_secs(3600)).into();
        edit(&mut p);
        let issuer = Issuer::from_params(&self.params, &self.key);
        (p.signed_by(&key, &issuer).unwrap().der().clone(), key)
    }

    fn pem(&self) -> String {
        pem("CERTIFICATE", &self.cert)
    }
}

fn pem(label: &str, der: &[u8]) -> String {
    meshlet_injector::ca::pem(label, der)
}

const WEB: &str = "spiffe://cluster.local/ns/shop/sa/web";
const SELF: &str = "spiffe://cluster.local/ns/shop/sa/self";

/// This proxy's own credentials under `ca`.
fn creds(ca: &TestCa) -> Arc<ArcSwapOption<Credentials>> {
    let (cert, key) = ca.leaf(SELF, |_| {});
    let c = Credentials::from_pem(
        std::path::Path::new("/test"),
        pem("CERTIFICATE", &cert).as_bytes(),
        key.serialize_pem().as_bytes(),
        ca.pem().as_bytes(),
        &provider(),
    )
    .unwrap();
    Arc::new(ArcSwapOption::from_pointee(c))
}

fn algs() -> WebPkiSupportedAlgorithms {
    provider().signature_verification_algorithms
}

fn server(ca: &TestCa, expected: &[&str]) -> ServerVerifier {
    let expected: Vec<SpiffeId> = expected.iter().map(|s| s.parse().unwrap()).collect();
    ServerVerifier::new(creds(ca), expected.into(), algs())
}

fn check_server(
    v: &ServerVerifier,
    leaf: &CertificateDer<'_>,
    chain: &[CertificateDer<'_>],
) -> Result<(), rustls::Error> {
    let name = ServerName::try_from("0123.meshlet.invalid").unwrap();
    v.verify_server_cert(leaf, chain, &name, &[], UnixTime::now())
        .map(|_| ())
}

fn check_client(
    v: &ClientVerifier,
    leaf: &CertificateDer<'_>,
    chain: &[CertificateDer<'_>],
) -> Result<(), rustls::Error> {
    v.verify_client_cert(leaf, chain, UnixTime::now())
        .map(|_| ())
}

fn typed(r: Result<(), rustls::Error>) -> VerifyError {
    let e = r.expect_err("refused");
    verify_error(&e)
        .unwrap_or_else(|| panic!("not a SPIFFE refusal: {e:?}"))
        .clone()
}

fn cert_error(r: Result<(), rustls::Error>) -> CertificateError {
    match r.expect_err("refused") {
        rustls::Error::InvalidCertificate(c) => c,
        e => panic!("not a certificate error: {e:?}"),
    }
}

#[test]
fn accepts_the_expected_server_and_a_client_of_the_trust_domain() {
    let ca = root();
    let (leaf, _) = ca.leaf(WEB, |_| {});
    check_server(
        &server(&ca, &["spiffe://cluster.local/ns/a/sa/b", WEB]),
        &leaf,
        &[],
    )
    .unwrap();
    check_client(&ClientVerifier::new(creds(&ca), algs()), &leaf, &[]).unwrap();
}

#[test]
fn wrong_identity() {
    let ca = root();
    let (leaf, _) = ca.leaf("spiffe://cluster.local/ns/shop/sa/evil", |_| {});
    match typed(check_server(&server(&ca, &[WEB]), &leaf, &[])) {
        VerifyError::UnexpectedIdentity { got, expected } => {
            assert_eq!(got.to_string(), "spiffe://cluster.local/ns/shop/sa/evil");
            assert_eq!(expected.len(), 1);
        }
        e => panic!("{e}"),
    }
    let msg = typed(check_server(&server(&ca, &[WEB]), &leaf, &[])).to_string();
    assert!(
        msg.contains("sa/evil") && msg.contains(WEB),
        "the message names both: {msg}"
    );
}

#[test]
fn wrong_trust_domain() {
    let ca = root();
    let (leaf, _) = ca.leaf("spiffe://other.local/ns/shop/sa/web", |_| {});
    let client = ClientVerifier::new(creds(&ca), algs());
    assert!(matches!(
        typed(check_client(&client, &leaf, &[])),
        VerifyError::WrongTrustDomain { .. }
    ));
    // As a server it is simply not an expected identity.
    assert!(matches!(
        typed(check_server(&server(&ca, &[WEB]), &leaf, &[])),
        VerifyError::UnexpectedIdentity { .. }
    ));
}

#[test]
fn other_ca_is_unknown_issuer() {
    let ours = root();
    let theirs = root();
    let (leaf, _) = theirs.leaf(WEB, |_| {});
    assert_eq!(
        cert_error(check_server(&server(&ours, &[WEB]), &leaf, &[])),
        CertificateError::UnknownIssuer
    );
    let client = ClientVerifier::new(creds(&ours), algs());
    assert_eq!(
        cert_error(check_client(&client, &leaf, &[])),
        CertificateError::UnknownIssuer
    );
}

#[test]
fn expired_and_not_yet_valid() {
    let ca = root();
    let now = SystemTime::now();
    let (expired, _) = ca.leaf(WEB, |p| {
        p.not_before = (now - Duration::from_secs(7200)).into();
        p.not_after = (now - Duration::from_secs(3600)).into();
    });
    let (future, _) = ca.leaf(WEB, |p| {
        p.not_before = (now + Duration::from_secs(3600)).into();
        p.not_after = (now + Duration::from_secs(7200)).into();
    });
    let client = ClientVerifier::new(creds(&ca), algs());
    for r in [
        check_server(&server(&ca, &[WEB]), &expired, &[]),
        check_client(&client, &expired, &[]),
    ] {
        let e = cert_error(r);
        assert!(
            matches!(
                e,
                CertificateError::Expired | CertificateError::ExpiredContext { .. }
            ),
            "{e:?}"
        );
    }
    for r in [
        check_server(&server(&ca, &[WEB]), &future, &[]),
        check_client(&client, &future, &[]),
    ] {
        let e = cert_error(r);
        assert!(
            matches!(
                e,
                CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. }
            ),
            "{e:?}"
        );
    }
}

#[test]
fn wrong_extended_key_usage() {
    let ca = root();
    let (server_only, _) = ca.leaf(WEB, |p| p.extended_key_usages = vec![Eku::ServerAuth]);
    let (client_only, _) = ca.leaf(WEB, |p| p.extended_key_usages = vec![Eku::ClientAuth]);
    let client = ClientVerifier::new(creds(&ca), algs());
    let purpose = |e: CertificateError| {
        assert!(
            matches!(
                e,
                CertificateError::InvalidPurpose | CertificateError::InvalidPurposeContext { .. }
            ),
            "{e:?}"
        )
    };
    purpose(cert_error(check_client(&client, &server_only, &[])));
    purpose(cert_error(check_server(
        &server(&ca, &[WEB]),
        &client_only,
        &[],
    )));
    // Each still works in its own role.
    check_server(&server(&ca, &[WEB]), &server_only, &[]).unwrap();
    check_client(&client, &client_only, &[]).unwrap();
}

#[test]
fn wrong_key_usage() {
    let ca = root();
    let (leaf, _) = ca.leaf(WEB, |p| p.key_usages = vec![Ku::KeyEncipherment]);
    assert_eq!(
        typed(check_server(&server(&ca, &[WEB]), &leaf, &[])),
        VerifyError::KeyUsage
    );
    let client = ClientVerifier::new(creds(&ca), algs());
    assert_eq!(
        typed(check_client(&client, &leaf, &[])),
        VerifyError::KeyUsage
    );
}

#[test]
fn chain_length() {
    let ca = root();
    let int1 = ca.intermediate();
    let int2 = int1.intermediate();
    let (via_one, _) = int1.leaf(WEB, |_| {});
    check_server(
        &server(&ca, &[WEB]),
        &via_one,
        std::slice::from_ref(&int1.cert),
    )
    .unwrap();

    let (via_two, _) = int2.leaf(WEB, |_| {});
    let chain = [int2.cert.clone(), int1.cert.clone()];
    assert_eq!(
        typed(check_server(&server(&ca, &[WEB]), &via_two, &chain)),
        VerifyError::ChainTooLong(2)
    );
    let client = ClientVerifier::new(creds(&ca), algs());
    assert_eq!(
        typed(check_client(&client, &via_two, &chain)),
        VerifyError::ChainTooLong(2)
    );
}

#[test]
fn no_or_bad_uri_san() {
    let ca = root();
    let (dns_only, _) = ca.leaf(WEB, |p| {
        p.subject_alt_names = vec![SanType::DnsName("web.shop.svc".try_into().unwrap())]
    });
    assert_eq!(
        typed(check_server(&server(&ca, &[WEB]), &dns_only, &[])),
        VerifyError::NoSpiffeId
    );
    let client = ClientVerifier::new(creds(&ca), algs());
    assert_eq!(
        typed(check_client(&client, &dns_only, &[])),
        VerifyError::NoSpiffeId
    );

    let (two, _) = ca.leaf(WEB, |p| {
        p.subject_alt_names.push(SanType::URI(
            "spiffe://cluster.local/ns/shop/sa/b".try_into().unwrap(),
        ))
    });
    assert!(matches!(
        typed(check_client(&client, &two, &[])),
        VerifyError::BadSpiffeId(_)
    ));
    let (not_spiffe, _) = ca.leaf("https://web.shop/", |_| {});
    assert!(matches!(
        typed(check_client(&client, &not_spiffe, &[])),
        VerifyError::BadSpiffeId(_)
    ));
}

#[test]
fn without_identity_nothing_passes() {
    let ca = root();
    let (leaf, _) = ca.leaf(WEB, |_| {});
    let empty = Arc::new(ArcSwapOption::empty());
    let v = ServerVerifier::new(empty.clone(), vec![WEB.parse().unwrap()].into(), algs());
    assert_eq!(typed(check_server(&v, &leaf, &[])), VerifyError::NoIdentity);
    let c = ClientVerifier::new(empty, algs());
    assert_eq!(typed(check_client(&c, &leaf, &[])), VerifyError::NoIdentity);
}

#[test]
fn credentials_refuse_a_foreign_or_mismatched_set() {
    let ca = root();
    let other = root();
    let (cert, key) = ca.leaf(SELF, |_| {});
    let (_, other_key) = ca.leaf(SELF, |_| {});
    let cert_pem = pem("CERTIFICATE", &cert);
    let load = |cert: &str, key: &KeyPair, ca: &TestCa| {
        Credentials::from_pem(
            std::path::Path::new("/id"),
            cert.as_bytes(),
            key.serialize_pem().as_bytes(),
            ca.pem().as_bytes(),
            &provider(),
        )
    };
    let c = load(&cert_pem, &key, &ca).unwrap();
    assert_eq!(c.id.to_string(), SELF);
    assert!(c.not_after > 0);
    let e = load(&cert_pem, &other_key, &ca).unwrap_err().to_string();
    assert!(e.contains("does not belong"), "{e}");
    let e = load(&cert_pem, &key, &other).unwrap_err().to_string();
    assert!(e.contains("not valid under ca.pem"), "{e}");
    let e = load("junk", &key, &ca).unwrap_err().to_string();
    assert!(e.contains("/id/cert.pem"), "{e}");
}
