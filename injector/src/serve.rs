//! `meshlet-injector serve`: the HTTPS listener in front of [`webhook::router`]. It
//! terminates TLS itself ([`delivery::server`]) so the certificate resolver can swap
//! certificates per handshake, then hands each connection to hyper's HTTP/1.1 + HTTP/2
//! server.

use std::{future::Future, net::SocketAddr, path::PathBuf, sync::Arc, time::Duration};

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use rustls::ServerConfig;
use tokio::net::TcpListener;

use meshlet_api::MeshConfig;
use tokio::sync::watch;

use crate::{
    config::{Defaults, DefaultsArgs},
    delivery,
    tls::{self, ReloadingCert},
    webhook::{self, AppState},
};

/// How long in-flight reviews may take after SIGTERM before connections are dropped.
pub(crate) const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);
/// Where Kubernetes mounts a pod's ServiceAccount token.
const IN_CLUSTER_TOKEN: &str = "/var/run/secrets/kubernetes.io/serviceaccount/token";
/// Histogram buckets (seconds): reviews take microseconds to a few milliseconds.
const BUCKETS: [f64; 10] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.1, 1.0,
];

/// Flags of `serve`.
#[derive(Clone, Debug, clap::Args)]
pub struct ServeArgs {
    /// Address the HTTPS server listens on.
    #[arg(long, env = "MESHLET_INJECTOR_ADDR", default_value = "0.0.0.0:8443")]
    pub addr: SocketAddr,
    /// PEM certificate chain of the webhook (reloaded when it changes).
    #[arg(
        long,
        env = "MESHLET_INJECTOR_TLS_CERT",
        default_value = "/etc/meshlet/tls/tls.crt"
    )]
    pub tls_cert: PathBuf,
    /// PEM private key of the webhook (reloaded when it changes).
    #[arg(
        long,
        env = "MESHLET_INJECTOR_TLS_KEY",
        default_value = "/etc/meshlet/tls/tls.key"
    )]
    pub tls_key: PathBuf,
    /// How often the certificate files are checked for changes, e.g. 10s or 500ms.
    #[arg(
        long,
        env = "MESHLET_INJECTOR_TLS_RELOAD_INTERVAL",
        default_value = "10s"
    )]
    pub tls_reload_interval: meshlet_api::Duration,
    /// Sidecar defaults.
    #[command(flatten)]
    pub defaults: DefaultsArgs,
    /// The identity issuer on the mesh endpoint.
    #[command(flatten)]
    pub identity: IdentityArgs,
    /// Run the config controller (watch the cluster, compile the mesh config, write
    /// HTTPRoute status). Default: on when in-cluster credentials exist.
    #[arg(long, overrides_with = "no_controller")]
    pub controller: bool,
    /// Do not run the config controller.
    #[arg(long, overrides_with = "controller")]
    pub no_controller: bool,
    /// Config controller: mesh-wide default inbound policy for workloads no
    /// AuthorizationPolicy targets: all-allowed, mesh-only or deny (a namespace's
    /// meshlet.io/default-inbound-policy annotation overrides it).
    #[arg(
        long,
        env = "MESHLET_DEFAULT_INBOUND_POLICY",
        default_value = "all-allowed"
    )]
    pub default_inbound_policy: meshlet_api::authz::DefaultPolicy,
}

/// Flags of the identity issuer and the mesh endpoint (port 15012).
#[derive(Clone, Debug, clap::Args)]
pub struct IdentityArgs {
    /// Issue workload certificates: serve the mesh endpoint, keep the CA in a Secret,
    /// and inject the control plane's address and trust anchors into proxies.
    #[arg(long = "identity", env = "MESHLET_INJECTOR_IDENTITY", default_value_t = false, action = clap::ArgAction::Set)]
    pub enabled: bool,
    /// Address of the mesh endpoint (issuer, config delivery).
    #[arg(
        long,
        env = "MESHLET_INJECTOR_MESH_ADDR",
        default_value = "0.0.0.0:15012"
    )]
    pub mesh_addr: SocketAddr,
    /// The injector's namespace (downward API): where the CA Secret lives.
    #[arg(long, env = "MESHLET_INJECTOR_NAMESPACE", default_value = meshlet_api::CONTROL_PLANE_NAMESPACE)]
    pub namespace: String,
    /// The injector's Service name, for the serving certificate's DNS names.
    #[arg(
        long,
        env = "MESHLET_INJECTOR_SERVICE",
        default_value = "meshlet-injector"
    )]
    pub service: String,
    /// The injector's service account (downward API), for its own SPIFFE id.
    #[arg(
        long,
        env = "MESHLET_INJECTOR_SERVICE_ACCOUNT",
        default_value = "meshlet-injector"
    )]
    pub service_account: String,
    /// SPIFFE trust domain of issued identities.
    #[arg(long, env = "MESHLET_INJECTOR_TRUST_DOMAIN", default_value = meshlet_api::DEFAULT_TRUST_DOMAIN)]
    pub trust_domain: String,
    /// Lifetime of issued workload certificates (NotBefore is backdated 5 minutes).
    #[arg(long, env = "MESHLET_INJECTOR_CERT_LIFETIME", default_value = "24h")]
    pub cert_lifetime: meshlet_api::Duration,
    /// Name of the Secret (tls.crt, tls.key) holding the mesh root CA.
    #[arg(long, env = "MESHLET_INJECTOR_CA_SECRET", default_value = crate::issuer::ca_secret::DEFAULT_SECRET)]
    pub ca_secret: String,
    /// Create the CA Secret with a new CA when it is missing; false for a user-provided CA.
    #[arg(long, env = "MESHLET_INJECTOR_CA_SECRET_CREATE", default_value_t = true, action = clap::ArgAction::Set)]
    pub ca_secret_create: bool,
    /// host:port proxies dial for the mesh endpoint (an IP works where there is no DNS).
    #[arg(
        long,
        env = "MESHLET_INJECTOR_CONTROL_PLANE_ADDRESS",
        default_value = "meshlet-injector.meshlet-system.svc:15012"
    )]
    pub control_plane_address: String,
    /// Name proxies verify in the mesh endpoint's certificate (also its first DNS SAN).
    #[arg(long, env = "MESHLET_INJECTOR_CONTROL_PLANE_NAME", default_value = meshlet_api::identity::CONTROL_PLANE_NAME)]
    pub control_plane_name: String,
}

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Certificate or key unusable.
    #[error(transparent)]
    Tls(#[from] tls::Error),
    /// A default flag is invalid.
    #[error(transparent)]
    Defaults(#[from] crate::config::InvalidDefault),
    /// The config controller has no way to the API server.
    #[error(
        "cannot connect to the Kubernetes API for the config controller: {0}; run in a pod \
         with a ServiceAccount, set KUBECONFIG, or pass --no-controller"
    )]
    Kube(#[source] kube::Error),
    /// No Kubernetes client could be built for the identity issuer.
    #[error("cannot reach the Kubernetes API for the identity issuer: {0}; in a pod it uses the service account, elsewhere KUBECONFIG (or run with --identity=false)")]
    IssuerKube(#[source] Box<kube::Error>),
    /// The CA Secret could not be read or created.
    #[error(transparent)]
    CaSecret(#[from] crate::issuer::ca_secret::CaSecretError),
    /// The issuer's settings are invalid.
    #[error("identity issuer: {0}")]
    Ca(#[from] crate::ca::CaError),
    /// The injector's own SPIFFE id is invalid.
    #[error("--namespace, --service-account and --trust-domain must form a SPIFFE id: {0}")]
    Id(#[from] meshlet_api::identity::ParseSpiffeIdError),
    /// The mesh endpoint cannot start.
    #[error(transparent)]
    Mesh(#[from] crate::control_plane::Error),
    /// The address cannot be bound.
    #[error("cannot listen on {addr}: {source}; is another process using the port?")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The I/O error.
        source: std::io::Error,
    },
}

/// A resolved serve configuration (what the flags become).
#[derive(Clone, Debug)]
pub struct ServeConfig {
    /// Listen address; port 0 picks a free port.
    pub addr: SocketAddr,
    /// Certificate path.
    pub tls_cert: PathBuf,
    /// Key path.
    pub tls_key: PathBuf,
    /// Poll interval of the certificate files.
    pub tls_reload_interval: Duration,
    /// Sidecar defaults.
    pub defaults: Defaults,
}

impl ServeArgs {
    /// Whether to run the config controller: as the flags say, else when the process
    /// runs in a pod with a ServiceAccount token (where the API server is at hand).
    pub fn controller_enabled(&self) -> bool {
        if self.no_controller {
            return false;
        }
        self.controller
            || (std::env::var_os("KUBERNETES_SERVICE_HOST").is_some()
                && std::path::Path::new(IN_CLUSTER_TOKEN).exists())
    }

    /// Validates the flags.
    pub fn to_config(&self) -> Result<ServeConfig, Error> {
        Ok(ServeConfig {
            addr: self.addr,
            tls_cert: self.tls_cert.clone(),
            tls_key: self.tls_key.clone(),
            tls_reload_interval: self.tls_reload_interval.into(),
            defaults: self.defaults.to_defaults()?,
        })
    }
}

/// The process-wide Prometheus recorder, installed on first use (the `metrics` facade
/// has one global recorder; tests start several servers in one process).
pub fn metrics_handle() -> PrometheusHandle {
    static HANDLE: std::sync::OnceLock<PrometheusHandle> = std::sync::OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let builder = PrometheusBuilder::new();
            let builder = builder
                .set_buckets(&BUCKETS)
                .unwrap_or_else(|_| PrometheusBuilder::new());
            let recorder = builder.build_recorder();
            let handle = recorder.handle();
            // Another recorder may already be installed (an embedding program); then our
            // metrics go there and /metrics shows only what this handle saw.
            let _ = metrics::set_global_recorder(recorder);
            handle
        })
        .clone()
}

/// A bound server, ready to run.
pub struct Server {
    listener: TcpListener,
    cert: Arc<ReloadingCert>,
    tls: Arc<ServerConfig>,
    config: ServeConfig,
    mesh_config: Option<watch::Receiver<Arc<MeshConfig>>>,
}

impl Server {
    /// Loads the certificate and binds the address.
    pub async fn bind(config: ServeConfig) -> Result<Self, Error> {
        let cert = ReloadingCert::load(&config.tls_cert, &config.tls_key)?;
        let tls = Arc::new(cert.server_config()?);
        let listener = TcpListener::bind(config.addr)
            .await
            .map_err(|source| Error::Bind {
                addr: config.addr,
                source,
            })?;
        Ok(Self {
            listener,
            cert,
            tls,
            config,
            mesh_config: None,
        })
    }

    /// Also serves config delivery (`GET /v1/config`, [`delivery`]) from `rx`: the
    /// seam the config controller publishes through.
    pub fn with_mesh_config(mut self, rx: watch::Receiver<Arc<MeshConfig>>) -> Self {
        self.mesh_config = Some(rx);
        self
    }

    /// The bound address (useful with port 0).
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Serves until `shutdown` resolves; then stops accepting (connections in flight
    /// finish on their own tasks).
    pub async fn run(self, shutdown: impl Future<Output = ()>) {
        let state = Arc::new(AppState {
            defaults: self.config.defaults.clone(),
            metrics: metrics_handle(),
        });
        let mut app = webhook::router(state);
        if let Some(rx) = self.mesh_config.clone() {
            app = app.merge(delivery::router(rx, delivery::Options::default()));
        }
        let watcher = tokio::spawn(self.cert.clone().watch(self.config.tls_reload_interval));
        delivery::server::serve_draining(
            self.listener,
            Some(self.tls),
            app,
            shutdown,
            DRAIN_TIMEOUT,
        )
        .await;
        watcher.abort();
    }
}

/// Runs `serve` until SIGTERM or Ctrl-C.
pub async fn run(args: &ServeArgs) -> Result<(), Error> {
    run_with(args, axum::Router::new()).await
}

/// Runs `serve` with `mesh_routes` merged into the mesh endpoint's Router next to the
/// issuer and, when the config controller runs, config delivery (`GET /v1/config`);
/// the mesh endpoint (port 15012) is served only with `--identity`.
pub async fn run_with(args: &ServeArgs, mesh_routes: axum::Router) -> Result<(), Error> {
    let mut config = args.to_config()?;
    // Before the controller starts, so its first build is counted.
    let _ = metrics_handle();
    // The controller stops when the last receiver is dropped: held until the end.
    let mesh_config = if args.controller_enabled() {
        match kube::Client::try_default().await {
            Ok(client) => {
                tracing::info!("config controller started");
                let options = crate::controller::Options {
                    lease: crate::controller::lease::LeaseOptions::from_env(),
                    default_inbound_policy: args.default_inbound_policy,
                    ..crate::controller::Options::default()
                };
                Some(crate::controller::spawn(client, options))
            }
            // Asked for: refuse to start without it.
            Err(e) if args.controller => return Err(Error::Kube(e)),
            // Guessed from the pod's environment: the webhook matters more.
            Err(error) => {
                tracing::warn!(%error, "config controller off: no usable in-cluster credentials; pass --controller to require it");
                None
            }
        }
    } else {
        tracing::info!("config controller off (no in-cluster credentials, or --no-controller)");
        None
    };
    let mesh = if args.identity.enabled {
        let (endpoint, issuer, anchors) = identity(&args.identity).await?;
        config.defaults.identity = Some(crate::config::IdentityEnv {
            address: args.identity.control_plane_address.clone(),
            name: args.identity.control_plane_name.clone(),
            trust_anchors: anchors,
        });
        if let Ok(addr) = endpoint.local_addr() {
            tracing::info!(%addr, delivery = mesh_config.is_some(), "mesh endpoint (identity issuer) listening");
        }
        let mut app = crate::issuer::router(issuer).merge(mesh_routes);
        if let Some(rx) = mesh_config.clone() {
            app = app.merge(delivery::router(rx, delivery::Options::default()));
        }
        Some((endpoint, app))
    } else {
        None
    };
    let server = Server::bind(config).await?;
    if let Ok(addr) = server.local_addr() {
        tracing::info!(%addr, "meshlet-injector webhook listening");
    }
    // One signal stops both listeners.
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        shutdown_signal().await;
        let _ = stop_tx.send(true);
    });
    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let mesh_task =
        mesh.map(|(endpoint, app)| tokio::spawn(endpoint.run(app, stopped(stop_rx.clone()))));
    server.run(stopped(stop_rx)).await;
    if let Some(t) = mesh_task {
        let _ = t.await;
    }
    drop(mesh_config);
    tracing::info!("shut down");
    Ok(())
}

/// Bootstraps the CA from its Secret and binds the mesh endpoint: the endpoint, the
/// issuer and the trust anchors (PEM) for injected proxies.
pub async fn identity(
    args: &IdentityArgs,
) -> Result<
    (
        crate::control_plane::Endpoint,
        Arc<crate::issuer::Issuer>,
        String,
    ),
    Error,
> {
    use crate::{control_plane, issuer};
    let client = kube::Client::try_default()
        .await
        .map_err(|e| Error::IssuerKube(Box::new(e)))?;
    let (ca, origin) = issuer::ca_secret::load_or_create(
        client.clone(),
        &args.namespace,
        &args.ca_secret,
        &args.trust_domain,
        args.ca_secret_create,
    )
    .await?;
    tracing::info!(secret = %args.ca_secret, namespace = %args.namespace, ?origin, "mesh CA loaded");
    let ca = Arc::new(ca);
    let lifetime = args.cert_lifetime.as_std();
    let issuer = Arc::new(issuer::Issuer::new(
        ca.clone(),
        Arc::new(issuer::kube::KubeReviewer::new(client)),
        &args.trust_domain,
        lifetime,
    )?);
    let who = control_plane::ServerIdentity {
        dns_names: control_plane::ServerIdentity::service_names(
            &args.service,
            &args.namespace,
            std::slice::from_ref(&args.control_plane_name),
        ),
        id: meshlet_api::SpiffeId::new(&args.trust_domain, &args.namespace, &args.service_account)?,
        lifetime,
    };
    let anchors = ca.cert_pem().to_string();
    let endpoint = control_plane::Endpoint::bind(args.mesh_addr, ca, who).await?;
    Ok((endpoint, issuer, anchors))
}

/// Resolves on SIGTERM or Ctrl-C.
pub async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::ServeArgs;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        serve: ServeArgs,
    }

    fn parse(args: &[&str]) -> ServeArgs {
        Cli::try_parse_from(std::iter::once("serve").chain(args.iter().copied()))
            .expect("flags parse")
            .serve
    }

    #[test]
    fn controller_flags_override_each_other_and_the_guess() {
        assert!(parse(&["--controller"]).controller_enabled());
        assert!(!parse(&["--no-controller"]).controller_enabled());
        // The last one wins, so a chart's default can be overridden by extra args.
        assert!(parse(&["--no-controller", "--controller"]).controller_enabled());
        assert!(!parse(&["--controller", "--no-controller"]).controller_enabled());
    }
}
