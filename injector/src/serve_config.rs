//! `meshlet-injector serve-config`: serves proxies their mesh config
//! ([`crate::delivery`], `GET /v1/config`) compiled from manifest files or read from a
//! compiled document, re-published whenever the files change. It is the control
//! plane's config delivery without an API server: the demo, the e2e mini-mesh, and
//! users who keep their manifests in git.

use std::{net::SocketAddr, path::PathBuf, sync::Arc, time::Duration};

use axum::{http::header, response::IntoResponse, routing::get, Router};
use tokio::net::TcpListener;

use crate::{
    delivery::{
        self,
        publish::{self, PublishError, Source},
        server::{self, TlsSetupError},
    },
    serve::metrics_handle,
    tls::{self, ReloadingCert},
};

/// Flags of `serve-config`.
#[derive(Clone, Debug, clap::Args)]
pub struct ServeConfigArgs {
    /// Directory of Kubernetes manifests to compile (as `compile --from-files`).
    #[arg(long, conflicts_with = "file", required_unless_present = "file")]
    pub from_files: Option<PathBuf>,
    /// A compiled mesh config document (JSON) to serve instead.
    #[arg(long)]
    pub file: Option<PathBuf>,
    /// Address to listen on.
    #[arg(
        long,
        env = "MESHLET_CONFIG_SERVER_ADDR",
        default_value = "0.0.0.0:15012"
    )]
    pub addr: SocketAddr,
    /// PEM certificate chain the server presents; it must carry the name proxies
    /// verify (MESHLET_CONTROL_PLANE_NAME). Reloaded when it changes.
    #[arg(long, default_value = "/etc/meshlet/control-plane/tls.crt")]
    pub tls_cert: PathBuf,
    /// PEM private key of --tls-cert.
    #[arg(long, default_value = "/etc/meshlet/control-plane/tls.key")]
    pub tls_key: PathBuf,
    /// Mesh trust anchors (PEM): proxies presenting a mesh certificate signed by them
    /// get the view of their identity's namespace. Unset: no client certificates.
    #[arg(long)]
    pub client_ca: Option<PathBuf>,
    /// Refuse proxies without a mesh certificate (needs --client-ca).
    #[arg(long, requires = "client_ca")]
    pub require_identity: bool,
    /// Serve plaintext HTTP instead of TLS: for tests only, and only on a loopback
    /// address.
    #[arg(long)]
    pub plaintext_loopback: bool,
    /// How often the files are re-read.
    #[arg(long, default_value = "1s")]
    pub poll_interval: meshlet_api::Duration,
    /// Silence after which the stream carries a heartbeat line.
    #[arg(long, default_value = "15s")]
    pub heartbeat: meshlet_api::Duration,
}

/// Why `serve-config` cannot start.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Nothing to serve.
    #[error(transparent)]
    Publish(#[from] PublishError),
    /// The serving certificate is unusable.
    #[error(transparent)]
    Cert(#[from] tls::Error),
    /// The TLS config cannot be built.
    #[error(transparent)]
    TlsSetup(#[from] TlsSetupError),
    /// The client CA file cannot be read.
    #[error("cannot read --client-ca {path}: {source}")]
    ClientCa {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// Plaintext asked for on an address other hosts can reach.
    #[error("--plaintext-loopback needs a loopback --addr (127.0.0.1 or ::1), not {0}; plaintext would hand every host the mesh config unverified")]
    PlaintextNotLoopback(SocketAddr),
    /// A heartbeat the proxies would take for a dead connection.
    #[error("--heartbeat {0} is out of range: proxies reconnect after 45s of silence, so use more than 0 and at most 15s")]
    Heartbeat(meshlet_api::Duration),
    /// The address cannot be bound.
    #[error("cannot listen on {addr}: {source}; is another process using the port?")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
}

/// The delivery router plus `/healthz` and `/metrics`.
pub fn app(
    rx: tokio::sync::watch::Receiver<Arc<meshlet_api::MeshConfig>>,
    options: delivery::Options,
) -> Router {
    delivery::router(rx, options)
        .route("/healthz", get(|| async { "ok\n" }))
        .route(
            "/metrics",
            get(|| async {
                (
                    [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
                    metrics_handle().render(),
                )
                    .into_response()
            }),
        )
}

/// Runs until `shutdown` resolves.
pub async fn run(
    args: &ServeConfigArgs,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), Error> {
    if args.plaintext_loopback && !args.addr.ip().is_loopback() {
        return Err(Error::PlaintextNotLoopback(args.addr));
    }
    let heartbeat = args.heartbeat.as_std();
    if heartbeat.is_zero() || heartbeat > delivery::HEARTBEAT {
        return Err(Error::Heartbeat(args.heartbeat));
    }
    let tls = if args.plaintext_loopback {
        None
    } else {
        let cert = ReloadingCert::load(&args.tls_cert, &args.tls_key)?;
        tokio::spawn(cert.clone().watch(Duration::from_secs(10)));
        let ca = match &args.client_ca {
            None => None,
            Some(path) => Some(std::fs::read(path).map_err(|source| Error::ClientCa {
                path: path.clone(),
                source,
            })?),
        };
        Some(Arc::new(server::tls_config(cert, ca.as_deref())?))
    };
    let source = match (&args.from_files, &args.file) {
        (Some(dir), _) => Source::Manifests(dir.clone()),
        (None, Some(file)) => Source::Document(file.clone()),
        // clap requires one of them.
        (None, None) => Source::Manifests(PathBuf::from(".")),
    };
    let _ = metrics_handle();
    let (rx, publisher) = publish::publish(source, args.poll_interval.as_std())?;
    let options = delivery::Options {
        heartbeat,
        require_identity: args.require_identity,
        metrics: delivery::DeliveryMetrics::global(),
    };
    let listener = TcpListener::bind(args.addr)
        .await
        .map_err(|source| Error::Bind {
            addr: args.addr,
            source,
        })?;
    let addr = listener.local_addr().unwrap_or(args.addr);
    tracing::info!(
        %addr,
        tls = tls.is_some(),
        client_certificates = args.client_ca.is_some(),
        "meshlet config server listening"
    );
    server::serve(listener, tls, app(rx, options), shutdown).await;
    publisher.abort();
    Ok(())
}
