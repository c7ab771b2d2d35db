//! meshlet's sidecar data plane.
//!
//! Connections redirected by `meshlet-init` arrive on the outbound (15001) and
//! inbound (15006) listeners. Each one goes through the same stack of tower
//! services ([`target`] shows it): original destination, mesh TLS ([`tls`]), loop
//! guard, protocol detection, then the HTTP stack ([`http`]) or a TCP splice ([`tcp`])
//! to that destination. The admin server (15020) serves readiness, metrics, the
//! effective config and shutdown.
#![deny(rust_2018_idioms, clippy::disallowed_methods, missing_docs)]
#![forbid(unsafe_code)]

pub mod admin;
pub mod authz;
pub mod balance;
pub mod cgroup;
pub mod config;
pub mod connect;
pub mod control;
pub mod detect;
pub mod drain;
pub mod errors;
pub mod http;
pub mod io;
pub mod listen;
pub mod loop_guard;
pub mod mesh;
pub mod metrics;
pub mod orig_dst;
pub mod retry_budget;
pub mod route;
pub mod target;
pub mod tcp;
#[cfg(feature = "test-util")]
pub mod test_util;
pub mod tls;
pub mod wait_ready;

use std::{
    io as stdio,
    net::SocketAddr,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::Duration,
};

use meshlet_api::MeshConfig;

pub use config::Config;
pub use orig_dst::{OrigDst, SoOriginalDst};

use crate::{
    mesh::{FileWatch, Mesh, MeshError},
    metrics::{Direction, Metrics},
};

/// How often histogram samples are folded into buckets.
const METRICS_UPKEEP: Duration = Duration::from_secs(5);

/// How long connecting to the control plane (TCP, then TLS) may take.
const CONTROL_PLANE_TIMEOUT: Duration = Duration::from_secs(10);

/// How long the admin server outlives the drain.
const ADMIN_GRACE: Duration = Duration::from_millis(50);

/// Why the proxy could not start.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The mesh config file is missing or invalid.
    #[error(transparent)]
    Mesh(#[from] MeshError),
    /// The control plane's TLS settings are unusable.
    #[error(transparent)]
    Control(#[from] control::ControlError),
    /// A listener could not bind.
    #[error("cannot listen on {addr} (set by {name}): {source}; another process may hold the port, or set {name} to a free address")]
    Bind {
        /// The variable that set the address.
        name: &'static str,
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: stdio::Error,
    },
    /// The TLS setup failed.
    #[error(transparent)]
    Identity(#[from] tls::IdentityError),
    /// The issuer client cannot be set up (trust anchors, server name).
    #[error(transparent)]
    Issuer(#[from] tls::issuer::IssuerError),
    /// Signal handlers could not be installed.
    #[error("cannot install the SIGTERM handler: {0}")]
    Signal(stdio::Error),
}

/// A configured proxy, not yet listening.
pub struct Proxy {
    config: Config,
    mesh_config: MeshConfig,
    watch: Option<FileWatch>,
    orig_dst: Arc<dyn OrigDst>,
}

/// Where a running proxy listens.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Addrs {
    /// Outbound listener (IPv4 or the configured address).
    pub outbound: SocketAddr,
    /// Inbound listener.
    pub inbound: SocketAddr,
    /// Admin server.
    pub admin: SocketAddr,
}

/// A listening proxy.
pub struct Running {
    /// Where it listens.
    pub addrs: Addrs,
    signal: drain::Signal,
    ready: Arc<AtomicBool>,
    drain_timeout: Duration,
}

// === impl Proxy ===

impl Proxy {
    /// Loads the mesh config file (if any); a bad file is an error.
    pub fn new(config: Config, orig_dst: Arc<dyn OrigDst>) -> Result<Self, Error> {
        let (mesh_config, watch) = match &config.config_path {
            None => (MeshConfig::default(), None),
            Some(path) => {
                let bytes = std::fs::read(path).map_err(|source| MeshError::Read {
                    path: path.clone(),
                    source,
                })?;
                let cfg = MeshConfig::from_json(&bytes).map_err(|source| MeshError::Invalid {
                    path: path.clone(),
                    source,
                })?;
                (cfg, Some(FileWatch::new(path.clone(), Some(&bytes))))
            }
        };
        Ok(Self {
            config,
            mesh_config,
            watch,
            orig_dst,
        })
    }

    /// Binds every listener and starts serving (needs a tokio runtime).
    pub async fn start(self) -> Result<Running, Error> {
        let cfg = &self.config;
        let bind = |name, addr| -> Result<(Vec<tokio::net::TcpListener>, SocketAddr), Error> {
            let err = |source| Error::Bind { name, addr, source };
            let ls = listen::bind(addr).map_err(err)?;
            let local = ls
                .first()
                .ok_or_else(|| stdio::ErrorKind::AddrNotAvailable.into())
                .and_then(|l| l.local_addr())
                .map_err(err)?;
            Ok((ls, local))
        };
        let (outbound, outbound_addr) =
            bind(meshlet_api::env::PROXY_OUTBOUND_ADDR, cfg.outbound_addr)?;
        let (inbound, inbound_addr) = bind(meshlet_api::env::PROXY_INBOUND_ADDR, cfg.inbound_addr)?;
        let (admin_ls, admin_addr) = bind(meshlet_api::env::PROXY_ADMIN_ADDR, cfg.admin_addr)?;
        let addrs = Addrs {
            outbound: outbound_addr,
            inbound: inbound_addr,
            admin: admin_addr,
        };

        let metrics = Metrics::new();
        let identity = match (&cfg.identity_dir, &cfg.issuer) {
            (Some(dir), _) => Some(tls::Identity::new(dir.clone(), metrics.clone())?),
            (None, Some(_)) => Some(tls::Identity::issued(metrics.clone())?),
            (None, None) => None,
        };
        // Built before anything is spawned, so bad anchors fail the start.
        let issuer = cfg
            .issuer
            .as_ref()
            .map(tls::issuer::IssuerClient::new)
            .transpose()?;
        // A config file wins over the control plane; with neither, the empty document.
        let remote = match (&cfg.control_plane, &cfg.config_path) {
            (Some(cp), None) => Some(control::ControlPlane::new(
                cp,
                identity.clone(),
                CONTROL_PLANE_TIMEOUT,
            )?),
            _ => None,
        };
        let mesh = if remote.is_some() {
            Mesh::pending(cfg.opaque_ports.clone())
        } else {
            Mesh::new(self.mesh_config, cfg.opaque_ports.clone())
        };
        let mesh = Arc::new(mesh.with_metrics(metrics.clone()));
        let mut local_ips = listen::local_ips();
        local_ips.extend(cfg.pod_ip);
        if let Some(ip) = cfg.pod_ip {
            tls::connect::set_pod_ip(ip);
        }
        let own_ports = vec![
            addrs.outbound.port(),
            addrs.inbound.port(),
            addrs.admin.port(),
        ];

        let authz = authz::Authz::new(mesh.clone(), metrics.clone(), cfg.pod_namespace.clone());
        let (signal, watch) = drain::channel();
        // Both listeners share one stack; the target carries the direction.
        let stack = tower::ServiceBuilder::new()
            .layer(orig_dst::OrigDstLayer::new(self.orig_dst, mesh.clone()))
            .layer(tls::MeshTlsLayer::new(
                identity.clone(),
                cfg.tls_mode,
                metrics.clone(),
            ))
            .layer(metrics::ConnMetricsLayer::new(metrics.clone()))
            .layer(loop_guard::LoopGuardLayer::new(own_ports, local_ips))
            .layer(detect::DetectLayer::new(authz::AuthzTcp::new(
                tcp::ForwardTcp,
                authz.clone(),
            )))
            .service(
                http::server::ServeHttp::new(http::Pool::new(), watch.clone())
                    .with_balancer(mesh.clone())
                    .with_routing(identity.clone(), cfg.pod_namespace.as_deref())
                    .with_authz(authz),
            );
        for (listeners, direction) in [
            (outbound, Direction::Outbound),
            (inbound, Direction::Inbound),
        ] {
            for l in listeners {
                tokio::spawn(listen::accept_loop(
                    l,
                    direction,
                    stack.clone(),
                    watch.clone(),
                ));
            }
        }
        drop((stack, watch));

        if let Some(file) = self.watch {
            tokio::spawn(mesh::watch(
                mesh.clone(),
                file,
                metrics.clone(),
                mesh::POLL_INTERVAL,
            ));
        }
        if let (Some(identity), Some(client)) = (&identity, issuer) {
            tokio::spawn(tls::issuer::run(identity.clone(), client));
        }
        if let Some(control) = remote {
            tokio::spawn(mesh::remote::watch(
                mesh.clone(),
                control,
                cfg.pod_namespace.clone(),
                metrics.clone(),
                mesh::remote::Options::default(),
            ));
        }
        if let Some(identity) = &identity {
            tokio::spawn(tls::identity::watch(
                identity.clone(),
                tls::identity::POLL_INTERVAL,
            ));
        }
        tokio::spawn(metrics.clone().upkeep_every(METRICS_UPKEEP));
        let ready = Arc::new(AtomicBool::new(false));
        let admin = Arc::new(admin::Admin {
            ready: ready.clone(),
            metrics,
            mesh,
            identity: identity.clone(),
            config: self.config.clone(),
            shutdown: signal.trigger(),
        });
        for l in admin_ls {
            tokio::spawn(admin::serve(l, admin.clone()));
        }
        ready.store(true, Ordering::Release);
        let snap = admin.mesh.load();
        tracing::info!(
            outbound = %addrs.outbound,
            inbound = %addrs.inbound,
            admin = %addrs.admin,
            mesh_generation = snap.config.generation,
            services = snap.config.services.len(),
            tls_mode = ?self.config.tls_mode,
            identity = ?identity.as_ref().and_then(|i| i.current()).map(|c| c.id.to_string()),
            opaque_ports = ?snap.opaque_ports(),
            "listening"
        );
        Ok(Running {
            addrs,
            signal,
            ready,
            drain_timeout: self.config.drain_timeout.as_std(),
        })
    }
}

// === impl Running ===

impl Running {
    /// A handle that starts the drain (same as SIGTERM).
    pub fn shutdown_handle(&self) -> drain::Trigger {
        self.signal.trigger()
    }

    /// Waits for the drain to start, then for in-flight work up to the drain timeout.
    /// Returns whether everything finished in time.
    pub async fn wait(self) -> bool {
        self.signal.trigger().started().await;
        self.ready.store(false, Ordering::Release);
        tracing::info!(timeout = ?self.drain_timeout, "draining");
        let clean = self.signal.drain(self.drain_timeout).await;
        // The admin server is not part of the drain (scrapes must keep working); give
        // its answer to `POST /shutdown` a moment to reach the caller before exit.
        tokio::time::sleep(ADMIN_GRACE).await;
        if clean {
            tracing::info!("drained");
        } else {
            tracing::warn!("drain deadline passed; closing the remaining connections");
        }
        clean
    }
}

/// Runs the proxy of the process: real `SO_ORIGINAL_DST`, SIGTERM/SIGINT drain.
pub async fn run(config: Config) -> Result<(), Error> {
    use tokio::signal::unix::{signal, SignalKind};
    // Before binding: a SIGTERM that arrives while starting must drain, not kill.
    let mut term = signal(SignalKind::terminate()).map_err(Error::Signal)?;
    let mut int = signal(SignalKind::interrupt()).map_err(Error::Signal)?;
    let running = Proxy::new(config, Arc::new(SoOriginalDst))?.start().await?;
    let trigger = running.shutdown_handle();
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM received"),
            _ = int.recv() => tracing::info!("SIGINT received"),
        }
        trigger.start();
    });
    running.wait().await;
    Ok(())
}
