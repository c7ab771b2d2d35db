//! The connection to the control plane's mesh endpoint
//! (`MESHLET_CONTROL_PLANE_ADDR`, port 15012): TCP, then TLS 1.3 verifying
//! `MESHLET_CONTROL_PLANE_NAME` against `MESHLET_TRUST_ANCHORS`, presenting the
//! proxy's mesh identity as client certificate when it has one, then one HTTP/1.1
//! connection. Config delivery ([`crate::mesh::remote`]) watches through it; the
//! identity issuer's client can send its CSR through it too.

use std::{error::Error as StdError, fmt, io, sync::Arc, time::Duration};

use http_body::Body;
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use rustls::{
    client::ResolvesClientCert,
    pki_types::{pem::PemObject, CertificateDer, ServerName},
    sign::CertifiedKey,
    ClientConfig, RootCertStore, SignatureScheme,
};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use crate::{config, tls::Identity};

/// Why the control plane cannot be reached.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// The trust anchors or name cannot make a TLS config.
    #[error("cannot set up TLS to the control plane: {0}")]
    Setup(String),
    /// The address does not resolve.
    #[error("cannot resolve the control plane address {addr}: {reason} (check MESHLET_CONTROL_PLANE_ADDR and DNS)")]
    Resolve {
        /// `host:port`.
        addr: String,
        /// Why.
        reason: String,
    },
    /// No address accepted the connection in time.
    #[error("cannot connect to the control plane at {addr}: {reason}; is meshlet-injector running and its port reachable?")]
    Connect {
        /// `host:port`.
        addr: String,
        /// Why.
        reason: String,
    },
    /// The TLS handshake failed.
    #[error("TLS handshake with the control plane at {addr} failed: {reason} (its certificate must be for {name} and chain to MESHLET_TRUST_ANCHORS)")]
    Tls {
        /// `host:port`.
        addr: String,
        /// The expected name.
        name: String,
        /// rustls's reason.
        reason: String,
    },
    /// The HTTP/1.1 handshake failed.
    #[error("HTTP with the control plane at {addr} failed: {source}")]
    Http {
        /// `host:port`.
        addr: String,
        /// hyper's error.
        source: hyper::Error,
    },
}

/// How to reach the control plane.
#[derive(Clone)]
pub struct ControlPlane {
    addr: String,
    name: ServerName<'static>,
    host: String,
    tls: TlsConnector,
    timeout: Duration,
}

/// Presents the proxy's current mesh certificate, or none before it has one.
struct IdentityResolver(Option<Arc<Identity>>);

// === impl ControlPlane ===

impl fmt::Debug for ControlPlane {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ControlPlane")
            .field("addr", &self.addr)
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl ControlPlane {
    /// Connects within `timeout` (TCP and TLS each), presenting `identity` when set.
    pub fn new(
        cfg: &config::ControlPlane,
        identity: Option<Arc<Identity>>,
        timeout: Duration,
    ) -> Result<Self, ControlError> {
        let mut roots = RootCertStore::empty();
        for c in CertificateDer::pem_slice_iter(cfg.trust_anchors.as_bytes()) {
            let c = c.map_err(|e| ControlError::Setup(format!("MESHLET_TRUST_ANCHORS: {e}")))?;
            roots.add(c).map_err(|e| {
                ControlError::Setup(format!("MESHLET_TRUST_ANCHORS holds an unusable CA: {e}"))
            })?;
        }
        if roots.is_empty() {
            return Err(ControlError::Setup(
                "MESHLET_TRUST_ANCHORS holds no CA certificate; set it to the PEM of the mesh trust anchors".into(),
            ));
        }
        let name = ServerName::try_from(cfg.name.clone()).map_err(|e| {
            ControlError::Setup(format!("MESHLET_CONTROL_PLANE_NAME={:?}: {e}", cfg.name))
        })?;
        let mut tls = ClientConfig::builder_with_provider(crate::tls::provider())
            .with_protocol_versions(crate::tls::VERSIONS)
            .map_err(|e| ControlError::Setup(e.to_string()))?
            .with_root_certificates(roots)
            .with_client_cert_resolver(Arc::new(IdentityResolver(identity)));
        tls.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Self {
            addr: cfg.addr.clone(),
            name,
            host: cfg.name.clone(),
            tls: TlsConnector::from(Arc::new(tls)),
            timeout,
        })
    }

    /// `host:port`, for logs and the `Host` header.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// The name its certificate must carry, for the `Host` header.
    pub fn name(&self) -> &str {
        &self.host
    }

    /// A new HTTP/1.1 connection; its driver runs on a spawned task that ends with the
    /// connection.
    pub async fn connect<B>(&self) -> Result<http1::SendRequest<B>, ControlError>
    where
        B: Body + Send + 'static,
        B::Data: Send,
        B::Error: Into<Box<dyn StdError + Send + Sync>>,
    {
        let tcp = self.tcp().await?;
        let tls = tokio::time::timeout(self.timeout, self.tls.connect(self.name.clone(), tcp))
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "no answer in time"))
            .and_then(|r| r)
            .map_err(|e| ControlError::Tls {
                addr: self.addr.clone(),
                name: format!("{:?}", self.name),
                reason: crate::tls::describe(&e),
            })?;
        let (send, conn) = http1::handshake(TokioIo::new(tls))
            .await
            .map_err(|source| ControlError::Http {
                addr: self.addr.clone(),
                source,
            })?;
        tokio::spawn(async move {
            if let Err(error) = conn.await {
                tracing::debug!(%error, "control plane connection ended");
            }
        });
        Ok(send)
    }

    async fn tcp(&self) -> Result<TcpStream, ControlError> {
        let addrs: Vec<_> = tokio::net::lookup_host(&self.addr)
            .await
            .map_err(|e| ControlError::Resolve {
                addr: self.addr.clone(),
                reason: e.to_string(),
            })?
            .collect();
        let mut last = String::from("no address");
        for a in addrs {
            match crate::connect::connect(a, self.timeout).await {
                Ok(s) => return Ok(s),
                Err(e) => last = e.to_string(),
            }
        }
        Err(ControlError::Connect {
            addr: self.addr.clone(),
            reason: last,
        })
    }
}

// === impl IdentityResolver ===

impl fmt::Debug for IdentityResolver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("IdentityResolver")
    }
}

impl ResolvesClientCert for IdentityResolver {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        self.0.as_ref()?.current().map(|c| c.key.clone())
    }

    fn has_certs(&self) -> bool {
        self.0.is_some()
    }
}
