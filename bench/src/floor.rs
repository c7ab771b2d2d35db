//! The floor pair: the cheapest hop a sidecar pair can make, to measure meshlet's mTLS
//! pair against.
//!
//! An L4 forwarder with nothing else: accept, connect, TLS 1.3 with client certificates
//! between the two halves (rustls, ring), copy both ways. No protocol detection, no
//! routing, no metrics, no pooling. The client half forwards every accepted connection
//! to one fixed `upstream` (a sidecar would read `SO_ORIGINAL_DST`; the benchmark has
//! one destination, so the floor skips that syscall); the server half terminates mTLS
//! and connects to the app. Certificates are the same `ca.pem`/`cert.pem`/`key.pem`
//! set meshlet's proxy reads (`meshlet-injector ca issue`).

use std::{
    fs,
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use rustls::{
    client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    crypto::CryptoProvider,
    pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime},
    server::WebPkiClientVerifier,
    CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig,
    SignatureScheme,
};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::{TlsAcceptor, TlsConnector};

/// Why the floor could not start.
#[derive(Debug, thiserror::Error)]
pub enum FloorError {
    /// An identity file is missing or unreadable.
    #[error("cannot use {path}: {why}; make the set with `meshlet-injector ca issue --out DIR`")]
    Identity {
        /// The file.
        path: PathBuf,
        /// What was wrong.
        why: String,
    },
    /// rustls refused the configuration.
    #[error("TLS setup failed: {0}")]
    Tls(#[from] rustls::Error),
}

/// Which half of the pair this process is.
#[derive(Clone)]
pub enum Mode {
    /// Accepts plaintext and forwards it over mTLS to `upstream` (the server half).
    Client(TlsConnector),
    /// Accepts mTLS and forwards the plaintext to `upstream` (the app).
    Server(TlsAcceptor),
}

/// The identity files of one half: `ca.pem`, `cert.pem`, `key.pem` in `dir`.
struct IdentityFiles {
    roots: RootCertStore,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
}

fn read_identity(dir: &Path) -> Result<IdentityFiles, FloorError> {
    let read = |name: &str| {
        let path = dir.join(name);
        fs::read(&path).map_err(|e| FloorError::Identity {
            path,
            why: e.to_string(),
        })
    };
    let bad = |name: &str, why: String| FloorError::Identity {
        path: dir.join(name),
        why,
    };
    let certs = |name: &str| -> Result<Vec<CertificateDer<'static>>, FloorError> {
        let pem = read(name)?;
        let certs = rustls_pemfile::certs(&mut &pem[..])
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| bad(name, format!("bad PEM: {e}")))?;
        if certs.is_empty() {
            return Err(bad(name, "no PEM certificate in the file".into()));
        }
        Ok(certs)
    };
    let mut roots = RootCertStore::empty();
    for c in certs("ca.pem")? {
        roots
            .add(c)
            .map_err(|e| bad("ca.pem", format!("unusable certificate: {e}")))?;
    }
    let chain = certs("cert.pem")?;
    let key_pem = read("key.pem")?;
    let key = rustls_pemfile::private_key(&mut &key_pem[..])
        .map_err(|e| bad("key.pem", format!("bad PEM: {e}")))?
        .ok_or_else(|| bad("key.pem", "no private key in the file".into()))?;
    Ok(IdentityFiles { roots, chain, key })
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Checks the server's chain against the mesh CA but not a DNS name: mesh certificates
/// carry only a SPIFFE URI, and the floor, unlike meshlet, does not check which
/// identity the peer has (it only proves the peer holds a key the CA certified).
#[derive(Debug)]
struct ChainOnly(Arc<rustls::client::WebPkiServerVerifier>);

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        // webpki checks the chain before the name, so a name error means the chain
        // itself was good.
        match self
            .0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp, now)
        {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

/// The client half's TLS: TLS 1.3 only, presents `cert.pem`, trusts only `ca.pem`.
pub fn client_mode(identity_dir: &Path) -> Result<Mode, FloorError> {
    let id = read_identity(identity_dir)?;
    let inner =
        rustls::client::WebPkiServerVerifier::builder_with_provider(Arc::new(id.roots), provider())
            .build()
            .map_err(|e| rustls::Error::General(e.to_string()))?;
    let cfg = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(ChainOnly(inner)))
        .with_client_auth_cert(id.chain, id.key)?;
    Ok(Mode::Client(TlsConnector::from(Arc::new(cfg))))
}

/// The server half's TLS: TLS 1.3 only, presents `cert.pem`, requires a client
/// certificate that chains to `ca.pem`.
pub fn server_mode(identity_dir: &Path) -> Result<Mode, FloorError> {
    let id = read_identity(identity_dir)?;
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(id.roots), provider())
        .build()
        .map_err(|e| rustls::Error::General(e.to_string()))?;
    let cfg = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(id.chain, id.key)?;
    Ok(Mode::Server(TlsAcceptor::from(Arc::new(cfg))))
}

/// Accepts connections forever and forwards each to `upstream` on its own task.
pub async fn serve(listener: TcpListener, mode: Mode, upstream: SocketAddr) {
    // The server name is only a formality for the chain-only verifier.
    let name = ServerName::IpAddress(upstream.ip().into());
    loop {
        let (inbound, _) = match listener.accept().await {
            Ok(c) => c,
            // Out of descriptors or a reset before accept: back off and go on.
            Err(_) => {
                tokio::time::sleep(Duration::from_millis(5)).await;
                continue;
            }
        };
        let mode = mode.clone();
        let name = name.clone();
        tokio::spawn(async move {
            if let Err(e) = forward(inbound, mode, upstream, name).await {
                eprintln!("meshlet-floor: connection to {upstream} ended: {e}");
            }
        });
    }
}

async fn forward(
    mut inbound: TcpStream,
    mode: Mode,
    upstream: SocketAddr,
    name: ServerName<'static>,
) -> std::io::Result<()> {
    inbound.set_nodelay(true)?;
    match mode {
        Mode::Client(tls) => {
            let out = TcpStream::connect(upstream).await?;
            out.set_nodelay(true)?;
            let mut out = tls.connect(name, out).await?;
            tokio::io::copy_bidirectional(&mut inbound, &mut out).await?;
        }
        Mode::Server(tls) => {
            let mut inbound = tls.accept(inbound).await?;
            let mut out = TcpStream::connect(upstream).await?;
            out.set_nodelay(true)?;
            tokio::io::copy_bidirectional(&mut inbound, &mut out).await?;
        }
    }
    Ok(())
}
