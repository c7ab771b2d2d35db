//! Mesh mTLS: the workload identity, the SPIFFE verifiers, inbound termination and
//! outbound origination.
//!
//! TLS 1.3 only, rustls with the ring provider. The proxy's certificate, key and trust
//! anchor come from `MESHLET_IDENTITY_DIR` ([`identity`]) or from the control plane's
//! issuer ([`issuer`]) and are swapped atomically when they change; rustls reads them through [`identity::Identity`]'s resolvers
//! at every handshake, so rotation never touches an established connection.
//!
//! Inbound ([`accept`]): the first bytes are sniffed for a ClientHello offering ALPN
//! `meshlet/1` ([`client_hello`]); such a connection is terminated, the client verified
//! ([`verify`]) and the decrypted stream goes on to protocol detection. Plaintext is
//! accepted in permissive mode and refused in strict mode. Outbound ([`connect`]):
//! destinations the mesh config marks meshed get mTLS with the server's identity
//! checked against the config.

pub mod accept;
pub mod client_hello;
pub mod connect;
pub mod der;
pub mod identity;
pub mod issuer;
pub mod verify;

use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use serde::Serialize;

pub use accept::{MeshTlsLayer, ServerIo};
pub use connect::{ClientTls, Upstream};
pub use identity::{Credentials, Identity, IdentityError};

/// Whether the inbound listener accepts plaintext.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum TlsMode {
    /// Mesh mTLS and plaintext (counted with `tls="false"`).
    #[default]
    Permissive,
    /// Mesh mTLS only; anything else is closed and counted.
    Strict,
}

impl std::str::FromStr for TlsMode {
    type Err = ();

    fn from_str(s: &str) -> Result<Self, ()> {
        match s {
            "permissive" => Ok(Self::Permissive),
            "strict" => Ok(Self::Strict),
            _ => Err(()),
        }
    }
}

/// Why a TLS handshake failed or a connection was refused: the `reason` label of
/// `meshlet_tls_handshake_errors_total`, a fixed set.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reason {
    /// Strict mode: the client spoke plaintext.
    Plaintext,
    /// TLS without the mesh ALPN.
    NonMeshTls,
    /// Bytes that start like TLS but are not a readable ClientHello.
    Malformed,
    /// The peer did not finish in time.
    Timeout,
    /// The peer's certificate was refused (chain, validity, identity, usage).
    Certificate,
    /// Any other handshake failure (alerts, protocol errors, resets).
    Handshake,
    /// This proxy has no certificate yet.
    NoIdentity,
}

impl Reason {
    /// Every reason, for zero-initialised metrics.
    pub const ALL: [Reason; 7] = [
        Self::Plaintext,
        Self::NonMeshTls,
        Self::Malformed,
        Self::Timeout,
        Self::Certificate,
        Self::Handshake,
        Self::NoIdentity,
    ];

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Plaintext => "plaintext",
            Self::NonMeshTls => "non_mesh_tls",
            Self::Malformed => "malformed",
            Self::Timeout => "timeout",
            Self::Certificate => "certificate",
            Self::Handshake => "handshake",
            Self::NoIdentity => "no_identity",
        }
    }

    /// Classifies a failed handshake.
    pub fn of(e: &std::io::Error) -> Self {
        let Some(tls) = e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) else {
            return Self::Handshake;
        };
        match tls {
            rustls::Error::InvalidCertificate(_)
            | rustls::Error::NoCertificatesPresented
            | rustls::Error::AlertReceived(
                rustls::AlertDescription::BadCertificate
                | rustls::AlertDescription::UnknownCA
                | rustls::AlertDescription::CertificateExpired
                | rustls::AlertDescription::CertificateUnknown
                | rustls::AlertDescription::CertificateRequired
                | rustls::AlertDescription::AccessDenied,
            ) => match verify::verify_error(tls) {
                Some(verify::VerifyError::NoIdentity) => Self::NoIdentity,
                _ => Self::Certificate,
            },
            _ => Self::Handshake,
        }
    }
}

/// The crypto provider of every mesh TLS config: ring.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Only TLS 1.3: every meshlet sidecar speaks it, and it has no renegotiation, no
/// static RSA and encrypted certificates.
pub static VERSIONS: &[&rustls::SupportedProtocolVersion] = &[&rustls::version::TLS13];

/// A readable message for a failed handshake: our verifier's reason when it refused
/// the peer, else rustls's.
pub fn describe(e: &std::io::Error) -> String {
    match e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) {
        Some(tls) => match verify::verify_error(tls) {
            Some(v) => v.to_string(),
            None => tls.to_string(),
        },
        None => e.to_string(),
    }
}
