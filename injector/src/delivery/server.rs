//! The injector's one HTTPS listener (the webhook, the 15012 mesh endpoint and
//! `serve-config`): TLS 1.3 with optional client certificates, the verified SPIFFE id
//! of the client put into each request's extensions, or plaintext on loopback for
//! tests; HTTP/1.1 and HTTP/2, drained on shutdown.

use std::{future::Future, net::SocketAddr, sync::Arc, time::Duration};

use axum::{body::Body, Router};
use hyper_util::{
    rt::{TokioExecutor, TokioIo, TokioTimer},
    server::conn::auto,
};
use meshlet_api::SpiffeId;
use rustls::{
    pki_types::{pem::PemObject, CertificateDer},
    server::{ResolvesServerCert, WebPkiClientVerifier},
    RootCertStore, ServerConfig,
};
use tokio::{net::TcpListener, sync::watch};
use tokio_rustls::TlsAcceptor;
use tower::ServiceExt as _;

/// A client may not hold a connection slot forever before it finishes TLS and headers.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long sent data may stay unacknowledged before the kernel drops the connection:
/// with a heartbeat every 15 s, a proxy that vanished without a FIN (node lost) is
/// noticed within about 45 s instead of the kernel's retransmission limit (~15 min).
const USER_TIMEOUT: Duration = Duration::from_secs(30);

/// Why the listener's TLS config cannot be built.
#[derive(Debug, thiserror::Error)]
pub enum TlsSetupError {
    /// The client CA file holds no usable certificate.
    #[error(
        "the client CA PEM holds no usable CA certificate; pass the mesh trust anchors (ca.pem)"
    )]
    ClientCa,
    /// rustls refused the configuration.
    #[error("TLS setup failed: {0}")]
    Rustls(String),
}

/// A TLS 1.3 server config presenting `cert`; when `client_ca` (PEM) is set, clients
/// may present a mesh certificate signed by it, and clients without one are still
/// served (they name their namespace themselves).
pub fn tls_config(
    cert: Arc<dyn ResolvesServerCert>,
    client_ca: Option<&[u8]>,
) -> Result<ServerConfig, TlsSetupError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| TlsSetupError::Rustls(e.to_string()))?;
    let builder = match client_ca {
        None => builder.with_no_client_auth(),
        Some(pem) => {
            let mut roots = RootCertStore::empty();
            for c in CertificateDer::pem_slice_iter(pem) {
                let c = c.map_err(|_| TlsSetupError::ClientCa)?;
                roots.add(c).map_err(|_| TlsSetupError::ClientCa)?;
            }
            if roots.is_empty() {
                return Err(TlsSetupError::ClientCa);
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .allow_unauthenticated()
                .build()
                .map_err(|e| TlsSetupError::Rustls(e.to_string()))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut cfg = builder.with_cert_resolver(cert);
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(cfg)
}

/// The SPIFFE id in a certificate's URI SAN, if it has exactly one usable one.
pub fn spiffe_id(der: &[u8]) -> Option<SpiffeId> {
    use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};
    let (_, cert) = X509Certificate::from_der(der).ok()?;
    let san = cert.subject_alternative_name().ok()??;
    let mut ids = san.value.general_names.iter().filter_map(|n| match n {
        GeneralName::URI(u) if u.starts_with("spiffe://") => u.parse::<SpiffeId>().ok(),
        _ => None,
    });
    let id = ids.next()?;
    ids.next().is_none().then_some(id)
}

/// Serves `app` on `listener` until `shutdown` resolves, then drops every connection
/// (watch streams never finish on their own; clients reconnect). `tls: None` serves
/// plaintext, for tests on loopback.
pub async fn serve(
    listener: TcpListener,
    tls: Option<Arc<ServerConfig>>,
    app: Router,
    shutdown: impl Future<Output = ()>,
) {
    serve_draining(listener, tls, app, shutdown, Duration::ZERO).await;
}

/// [`serve`], but after `shutdown` every connection gets up to `drain` to finish its
/// request in flight before it is dropped.
pub async fn serve_draining(
    listener: TcpListener,
    tls: Option<Arc<ServerConfig>>,
    app: Router,
    shutdown: impl Future<Output = ()>,
    drain: Duration,
) {
    let acceptor = tls.map(TlsAcceptor::from);
    // Flipped on shutdown: every connection finishes its request in flight and closes.
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut conns = tokio::task::JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        // Reap finished connection tasks so the set stays as large as the live ones.
        while conns.try_join_next().is_some() {}
        let (tcp, peer) = tokio::select! {
            _ = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(error) => {
                    // Usually EMFILE: back off instead of spinning on the error.
                    tracing::warn!(%error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        conns.spawn(connection(
            tcp,
            peer,
            acceptor.clone(),
            app.clone(),
            stop_rx.clone(),
        ));
    }
    drop(listener);
    if drain.is_zero() {
        return;
    }
    let _ = stop_tx.send(true);
    let drained =
        tokio::time::timeout(drain, async { while conns.join_next().await.is_some() {} }).await;
    if drained.is_err() {
        tracing::warn!(
            open = conns.len(),
            "drain deadline passed; closing the remaining connections"
        );
    }
}

async fn connection(
    tcp: tokio::net::TcpStream,
    peer: SocketAddr,
    acceptor: Option<TlsAcceptor>,
    app: Router,
    stop: watch::Receiver<bool>,
) {
    let _ = tcp.set_nodelay(true);
    let _ = socket2::SockRef::from(&tcp).set_tcp_user_timeout(Some(USER_TIMEOUT));
    let Some(acceptor) = acceptor else {
        return http(TokioIo::new(tcp), peer, None, app, stop).await;
    };
    let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(error)) => {
            tracing::debug!(%peer, %error, "TLS handshake failed");
            return;
        }
        Err(_) => {
            tracing::debug!(%peer, "TLS handshake timed out");
            return;
        }
    };
    let id = match tls.get_ref().1.peer_certificates().and_then(|c| c.first()) {
        None => None,
        Some(leaf) => match spiffe_id(leaf) {
            Some(id) => Some(id),
            None => {
                // Verified by the mesh CA but not a workload certificate: refuse
                // rather than serve it as an anonymous client.
                tracing::info!(%peer, "client certificate carries no SPIFFE id; closing");
                return;
            }
        },
    };
    http(TokioIo::new(tls), peer, id, app, stop).await;
}

async fn http<I>(
    io: TokioIo<I>,
    peer: SocketAddr,
    id: Option<SpiffeId>,
    app: Router,
    mut stop: watch::Receiver<bool>,
) where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let svc = hyper::service::service_fn(move |mut req: hyper::Request<hyper::body::Incoming>| {
        if let Some(id) = &id {
            req.extensions_mut().insert(id.clone());
        }
        app.clone().oneshot(req.map(Body::new))
    });
    let mut builder = auto::Builder::new(TokioExecutor::new());
    // A client that opens a connection and never finishes its headers is cut off.
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(HANDSHAKE_TIMEOUT);
    let conn = builder.serve_connection(io, svc);
    tokio::pin!(conn);
    let result = tokio::select! {
        r = conn.as_mut() => r,
        _ = stop.changed() => {
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    };
    if let Err(error) = result {
        tracing::debug!(%peer, %error, "connection ended with an error");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_spiffe_id_of_a_workload_certificate_only() {
        let ca = crate::ca::Ca::generate("cluster.local", Duration::from_secs(3600)).unwrap();
        let id: SpiffeId = "spiffe://cluster.local/ns/front/sa/app".parse().unwrap();
        let issued = ca.issue(&id, Duration::from_secs(3600)).unwrap();
        let der = CertificateDer::from_pem_slice(issued.cert_pem.as_bytes()).unwrap();
        assert_eq!(spiffe_id(&der), Some(id));

        let key = rcgen::KeyPair::generate().unwrap();
        let dns = rcgen::CertificateParams::new(vec!["web.shop.svc".to_string()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        assert_eq!(spiffe_id(dns.der()), None, "no URI SAN");
        assert_eq!(spiffe_id(b"not a certificate"), None);
    }

    #[test]
    fn client_ca_must_hold_a_certificate() {
        let cert = crate::tls::ReloadingCert::load(
            std::path::Path::new("/nonexistent/tls.crt"),
            std::path::Path::new("/nonexistent/tls.key"),
        );
        assert!(cert.is_err());
        let ca = crate::ca::Ca::generate("cluster.local", Duration::from_secs(3600)).unwrap();
        let resolver: Arc<dyn ResolvesServerCert> =
            Arc::new(rustls::server::ResolvesServerCertUsingSni::new());
        assert!(tls_config(resolver.clone(), Some(ca.cert_pem().as_bytes())).is_ok());
        assert!(matches!(
            tls_config(resolver, Some(b"no pem here")),
            Err(TlsSetupError::ClientCa)
        ));
    }
}
