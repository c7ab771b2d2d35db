//! SPIFFE certificate verifiers for mesh mTLS.
//!
//! Both wrap webpki chain validation against the mesh trust anchor and then check the
//! peer's one SPIFFE URI SAN: a server must present one of the identities the mesh
//! config lists for the destination; a client must belong to our trust domain. The
//! trust anchor is read from the identity store at each handshake, so a rotated
//! `ca.pem` applies to the next handshake.
//!
//! Derived from rustls's `WebPkiServerVerifier` and `WebPkiClientVerifier`
//! (rustls 0.23, `src/webpki/{server,client}_verifier.rs`, Apache-2.0/MIT/ISC): the
//! chain check and the handshake-signature checks delegate to the same functions those
//! use; the name check is replaced by the SPIFFE one. ztunnel (`src/tls/workload.rs`)
//! and linkerd (`linkerd/meshtls/src/creds/verify.rs`) follow the same shape.

use std::{fmt, sync::Arc};

use arc_swap::ArcSwapOption;
use meshlet_api::SpiffeId;
use rustls::{
    client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    crypto::WebPkiSupportedAlgorithms,
    pki_types::{CertificateDer, ServerName, UnixTime},
    server::{
        danger::{ClientCertVerified, ClientCertVerifier},
        ParsedCertificate,
    },
    CertificateError, DigitallySignedStruct, DistinguishedName, OtherError, SignatureScheme,
};

use super::{der, Credentials};

/// Most certificates a peer may send above its own (the mesh root signs workloads
/// directly or through one intermediate).
pub const MAX_INTERMEDIATES: usize = 1;

/// Why a peer's certificate was refused, beyond what webpki checks.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    /// This proxy has no certificate and trust anchor yet.
    #[error("this proxy has no mesh identity yet (waiting for cert.pem, key.pem and ca.pem in MESHLET_IDENTITY_DIR)")]
    NoIdentity,
    /// The certificate has no SPIFFE URI SAN.
    #[error("the peer certificate has no SPIFFE URI SAN; it was not issued by the mesh CA")]
    NoSpiffeId,
    /// More than one URI SAN, or one that is not a meshlet SPIFFE id.
    #[error("the peer certificate must carry exactly one SPIFFE id, it has {0}")]
    BadSpiffeId(String),
    /// The client belongs to another trust domain.
    #[error("the peer is {got}, outside this mesh's trust domain {want}")]
    WrongTrustDomain {
        /// The peer's id.
        got: SpiffeId,
        /// Our trust domain.
        want: String,
    },
    /// The server is not who the mesh config says serves this destination.
    #[error("the server presented {got}, but the mesh config lists only {} for this destination", list(.expected))]
    UnexpectedIdentity {
        /// The server's id.
        got: SpiffeId,
        /// What the config allows.
        expected: Arc<[SpiffeId]>,
    },
    /// Too many intermediates.
    #[error("the peer sent {0} intermediate certificates; at most {MAX_INTERMEDIATES} is allowed")]
    ChainTooLong(usize),
    /// The key usage extension does not allow signatures.
    #[error("the peer certificate's key usage does not include digitalSignature")]
    KeyUsage,
}

fn list(ids: &[SpiffeId]) -> String {
    ids.iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

impl From<VerifyError> for rustls::Error {
    fn from(e: VerifyError) -> Self {
        rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(e))))
    }
}

/// The typed verifier error inside a rustls error, if that is what it is.
pub fn verify_error(e: &rustls::Error) -> Option<&VerifyError> {
    match e {
        rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(inner))) => {
            inner.downcast_ref::<VerifyError>()
        }
        _ => None,
    }
}

/// The SPIFFE id of a certificate that passed chain validation; also checks its key
/// usage (webpki does not, for end-entity certificates).
pub fn peer_id(end_entity: &CertificateDer<'_>) -> Result<SpiffeId, VerifyError> {
    let info = der::parse(end_entity).ok_or(VerifyError::NoSpiffeId)?;
    if info.key_usage.is_some_and(|ku| ku & 0x80 == 0) {
        return Err(VerifyError::KeyUsage);
    }
    match info.uris.as_slice() {
        [] => Err(VerifyError::NoSpiffeId),
        [one] => one
            .parse()
            .map_err(|_| VerifyError::BadSpiffeId(format!("{one:?}"))),
        many => Err(VerifyError::BadSpiffeId(format!("{} URI SANs", many.len()))),
    }
}

fn check_chain_len(intermediates: &[CertificateDer<'_>]) -> Result<(), VerifyError> {
    if intermediates.len() > MAX_INTERMEDIATES {
        return Err(VerifyError::ChainTooLong(intermediates.len()));
    }
    Ok(())
}

// === ServerVerifier ===

/// Verifies the server of an outbound mesh connection.
pub struct ServerVerifier {
    creds: Arc<ArcSwapOption<Credentials>>,
    expected: Arc<[SpiffeId]>,
    algs: WebPkiSupportedAlgorithms,
}

impl fmt::Debug for ServerVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServerVerifier")
            .field("expected", &self.expected)
            .finish_non_exhaustive()
    }
}

impl ServerVerifier {
    /// Accepts servers that chain to the trust anchor in `creds` and present one of
    /// `expected`.
    pub fn new(
        creds: Arc<ArcSwapOption<Credentials>>,
        expected: Arc<[SpiffeId]>,
        algs: WebPkiSupportedAlgorithms,
    ) -> Self {
        Self {
            creds,
            expected,
            algs,
        }
    }
}

impl ServerCertVerifier for ServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let creds = self.creds.load();
        let creds = creds.as_ref().ok_or(VerifyError::NoIdentity)?;
        check_chain_len(intermediates)?;
        let cert = ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &cert,
            &creds.roots,
            intermediates,
            now,
            self.algs.all,
        )?;
        let id = peer_id(end_entity)?;
        if !self.expected.contains(&id) {
            return Err(VerifyError::UnexpectedIdentity {
                got: id,
                expected: self.expected.clone(),
            }
            .into());
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algs)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algs.supported_schemes()
    }
}

// === ClientVerifier ===

/// Verifies the client of an inbound mesh connection.
pub struct ClientVerifier {
    creds: Arc<ArcSwapOption<Credentials>>,
    algs: WebPkiSupportedAlgorithms,
}

impl fmt::Debug for ClientVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientVerifier").finish_non_exhaustive()
    }
}

impl ClientVerifier {
    /// Accepts clients that chain to the trust anchor in `creds` and belong to its
    /// trust domain.
    pub fn new(creds: Arc<ArcSwapOption<Credentials>>, algs: WebPkiSupportedAlgorithms) -> Self {
        Self { creds, algs }
    }
}

impl ClientCertVerifier for ClientVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        // There is one mesh CA; naming it in every CertificateRequest only costs bytes.
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let creds = self.creds.load();
        let creds = creds.as_ref().ok_or(VerifyError::NoIdentity)?;
        check_chain_len(intermediates)?;
        creds
            .client_verifier
            .verify_client_cert(end_entity, intermediates, now)?;
        let id = peer_id(end_entity)?;
        if id.trust_domain() != creds.id.trust_domain() {
            return Err(VerifyError::WrongTrustDomain {
                got: id,
                want: creds.id.trust_domain().to_string(),
            }
            .into());
        }
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algs)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algs.supported_schemes()
    }
}

#[cfg(test)]
mod tests;
