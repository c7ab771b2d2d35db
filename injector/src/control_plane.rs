//! The control plane's mesh endpoint, port 15012: the one TLS listener proxies talk
//! to (the identity issuer, and config delivery merged in as another Router).
//!
//! Its serving certificate is issued from the mesh CA itself, for the DNS names
//! proxies dial (`MESHLET_CONTROL_PLANE_NAME`, the Service's names) and the SPIFFE id
//! of the injector's own service account, and re-issued at two thirds of its life.
//! Client certificates are optional at the TLS layer: a proxy asking for its first
//! certificate has none, and the issuer route authenticates by token instead. When a
//! client does present a mesh certificate that verifies under the CA, its
//! [`SpiffeId`] is put into every request's extensions, for routes that serve per
//! identity (`Extension<SpiffeId>`, or `req.extensions().get::<SpiffeId>()`).

use std::{
    future::Future,
    net::SocketAddr,
    sync::{Arc, RwLock},
    time::Duration,
};

use axum::Router;
use meshlet_api::SpiffeId;
use rustls::{
    crypto::CryptoProvider,
    pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer},
    server::{ClientHello, ResolvesServerCert},
    sign::CertifiedKey,
    ServerConfig,
};
use tokio::net::TcpListener;

use crate::{
    ca::{self, Ca},
    delivery::server,
    serve::DRAIN_TIMEOUT,
};

/// Why the endpoint could not start.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The serving certificate could not be issued.
    #[error("cannot issue the control plane's serving certificate: {0}")]
    Ca(#[from] ca::CaError),
    /// rustls refused the certificate or the config.
    #[error("TLS setup of the mesh endpoint failed: {0}")]
    Tls(String),
    /// The address cannot be bound.
    #[error("cannot listen on {addr}: {source}; is another process using the port?")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The I/O error.
        source: std::io::Error,
    },
}

/// Who the endpoint says it is.
#[derive(Clone, Debug)]
pub struct ServerIdentity {
    /// DNS SANs (the first is what proxies are told to verify by default).
    pub dns_names: Vec<String>,
    /// The injector's own SPIFFE id (URI SAN).
    pub id: SpiffeId,
    /// Lifetime of each serving certificate.
    pub lifetime: Duration,
}

impl ServerIdentity {
    /// The names of Service `service` in `namespace`, plus `extra` (deduplicated, in
    /// order).
    pub fn service_names(service: &str, namespace: &str, extra: &[String]) -> Vec<String> {
        let mut names: Vec<String> = extra.to_vec();
        for n in [
            format!("{service}.{namespace}.svc"),
            format!("{service}.{namespace}.svc.cluster.local"),
            format!("{service}.{namespace}"),
            service.to_string(),
        ] {
            if !names.contains(&n) {
                names.push(n);
            }
        }
        names
    }
}

/// The serving certificate, swapped whole on rotation.
struct RotatingCert {
    current: RwLock<Arc<CertifiedKey>>,
}

impl std::fmt::Debug for RotatingCert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RotatingCert")
    }
}

impl ResolvesServerCert for RotatingCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(
            self.current
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .clone(),
        )
    }
}

fn issue(
    ca: &Ca,
    who: &ServerIdentity,
    provider: &CryptoProvider,
) -> Result<Arc<CertifiedKey>, Error> {
    let issued = ca.issue_server(&who.dns_names, &who.id, who.lifetime)?;
    let chain = CertificateDer::pem_slice_iter(issued.cert_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| Error::Tls(e.to_string()))?;
    let key = PrivateKeyDer::from_pem_slice(issued.key_pem.as_bytes())
        .map_err(|e| Error::Tls(e.to_string()))?;
    let ck = CertifiedKey::from_der(chain, key, provider).map_err(|e| Error::Tls(e.to_string()))?;
    Ok(Arc::new(ck))
}

/// A bound mesh endpoint, ready to run.
pub struct Endpoint {
    listener: TcpListener,
    tls: Arc<ServerConfig>,
    cert: Arc<RotatingCert>,
    ca: Arc<Ca>,
    who: ServerIdentity,
    provider: Arc<CryptoProvider>,
}

impl std::fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Endpoint")
            .field("who", &self.who)
            .finish_non_exhaustive()
    }
}

// === impl Endpoint ===

impl Endpoint {
    /// Issues the first serving certificate and binds `addr`.
    pub async fn bind(addr: SocketAddr, ca: Arc<Ca>, who: ServerIdentity) -> Result<Self, Error> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let cert = Arc::new(RotatingCert {
            current: RwLock::new(issue(&ca, &who, &provider)?),
        });
        // The issuer's callers have no certificate yet; they prove who they are with a
        // token, so client certificates stay optional.
        let tls = server::tls_config(cert.clone(), Some(ca.cert_pem().as_bytes()))
            .map_err(|e| Error::Tls(e.to_string()))?;
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| Error::Bind { addr, source })?;
        Ok(Self {
            listener,
            tls: Arc::new(tls),
            cert,
            ca,
            who,
            provider,
        })
    }

    /// The bound address (useful with port 0).
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Serves `app` (e.g. `issuer::router(..).merge(delivery::router(..))`) until
    /// `shutdown` resolves, then drains.
    pub async fn run(self, app: Router, shutdown: impl Future<Output = ()>) {
        let rotator = tokio::spawn(rotate(
            self.cert.clone(),
            self.ca.clone(),
            self.who.clone(),
            self.provider.clone(),
        ));
        server::serve_draining(self.listener, Some(self.tls), app, shutdown, DRAIN_TIMEOUT).await;
        rotator.abort();
    }
}

/// Re-issues the serving certificate at two thirds of its life; a failure is retried
/// every minute while the current certificate still serves.
async fn rotate(
    cert: Arc<RotatingCert>,
    ca: Arc<Ca>,
    who: ServerIdentity,
    provider: Arc<CryptoProvider>,
) {
    let mut wait = who.lifetime * 2 / 3;
    loop {
        tokio::time::sleep(wait).await;
        match issue(&ca, &who, &provider) {
            Ok(ck) => {
                *cert.current.write().unwrap_or_else(|e| e.into_inner()) = ck;
                tracing::info!("mesh endpoint serving certificate rotated");
                wait = who.lifetime * 2 / 3;
            }
            Err(error) => {
                tracing::warn!(%error, "cannot rotate the mesh endpoint certificate; retrying in 1 min");
                wait = Duration::from_secs(60);
            }
        }
    }
}

#[cfg(test)]
mod tests;
