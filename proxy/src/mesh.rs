//! The mesh config in force, and the watchers that reload it from its file or from
//! the control plane ([`remote`]).
//!
//! Connections take a snapshot ([`Mesh::load`]) when they are accepted and keep it,
//! so a reload never changes the rules under a connection in flight. Reloads swap the
//! whole snapshot atomically; a bad document is refused whole and the last good one
//! keeps serving. Endpoints are the exception: the outbound HTTP path looks them up
//! per request in the snapshot in force ([`Mesh::pick`]), so keep-alive
//! connections follow endpoint changes.

use std::{
    collections::{HashMap, HashSet},
    hash::{DefaultHasher, Hash, Hasher},
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex, OnceLock,
    },
    time::{Duration, SystemTime},
};

use arc_swap::ArcSwap;
use meshlet_api::{config::ConfigError as DocError, MeshConfig, SpiffeId};
use metrics::{Label, SharedString};
use tokio::time::Instant;

use crate::{
    balance::{Balancer, Endpoint, Outlier, Pick},
    metrics::{Metrics, OUTLIER_EJECTED, UNKNOWN_SERVICE},
    route::table::{Budgets, RouteTable},
};

pub mod remote;

/// How often the watcher looks at the file: a stat of one file, cheap enough that
/// a policy change takes effect well within a second.
pub const POLL_INTERVAL: Duration = Duration::from_millis(250);

/// A mesh config file that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum MeshError {
    /// The file could not be read.
    #[error("cannot read mesh config {path}: {source} (check MESHLET_CONFIG_PATH and the mounted ConfigMap)")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not a valid mesh config.
    #[error("refusing mesh config {path}: {source}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        source: DocError,
    },
}

/// One immutable mesh config plus the lookups derived from it.
#[derive(Debug)]
pub struct Snapshot {
    /// The document (shared with the route tables built from it).
    pub config: Arc<MeshConfig>,
    services: HashMap<SocketAddr, SharedString>,
    meshed: HashMap<SocketAddr, Arc<[SpiffeId]>>,
    /// Endpoint address (pod IP, target port) -> the Service it serves: the inbound
    /// side's `service` label.
    endpoint_services: HashMap<SocketAddr, SharedString>,
    /// ClusterIP:port -> its ready endpoints of the same IP family.
    balancers: HashMap<SocketAddr, Balancer>,
    /// ClusterIP:port -> the Service's HTTPRoutes, resolved on first use (Services with
    /// routes only): a sidecar pays only for the Services it calls, and the inbound
    /// side for none.
    routes: HashMap<SocketAddr, LazyRoutes>,
    /// Retry budgets of the Services routes send to, filled as tables are built.
    budgets: Mutex<Budgets>,
    /// Budgets of earlier snapshots, reused when a Service's settings did not change.
    prev_budgets: Budgets,
    opaque: Vec<u16>,
    /// Inbound authorization compiled from the document's `authorization` section.
    pub authz: crate::authz::Table,
}

/// The route table of one ClusterIP:port, built on the first request to it.
#[derive(Debug)]
struct LazyRoutes {
    /// The Service's index in the document.
    index: usize,
    /// `None` once building failed (a document that bypassed validation).
    table: OnceLock<Option<Arc<RouteTable>>>,
}

/// The snapshot in force.
pub struct Mesh {
    current: ArcSwap<Snapshot>,
    opaque_override: Option<Vec<u16>>,
    /// Where balancers count ejections.
    metrics: Option<Arc<Metrics>>,
    /// Services whose ejected-endpoints gauge was ever non-zero: they keep being
    /// reported (at zero) so the series falls back instead of freezing.
    reported: Mutex<HashSet<SharedString>>,
    /// Whether a document was loaded; false only while a remote watch waits for its
    /// first document.
    loaded: AtomicBool,
}

// === impl Snapshot ===

impl Snapshot {
    /// Derives the lookups; `opaque_override` (from `MESHLET_OPAQUE_PORTS`) replaces
    /// the document's opaque list.
    pub fn new(config: MeshConfig, opaque_override: Option<&[u16]>) -> Self {
        Self::reload(config, opaque_override, None)
    }

    /// Like [`Snapshot::new`], keeping the load state of every endpoint `prev` had.
    pub fn reload(
        config: MeshConfig,
        opaque_override: Option<&[u16]>,
        prev: Option<&Snapshot>,
    ) -> Self {
        Self::build(Arc::new(config), opaque_override, prev, None)
    }

    /// [`Snapshot::reload`] whose balancers count ejections in `metrics`.
    fn build(
        config: Arc<MeshConfig>,
        opaque_override: Option<&[u16]>,
        prev: Option<&Snapshot>,
        metrics: Option<&Arc<Metrics>>,
    ) -> Self {
        // One state per endpoint address, shared by every Service that selects it:
        // the lookup by address is then unambiguous (a HashMap's iteration order
        // would otherwise pick either Service's copy at random).
        let mut known: HashMap<SocketAddr, Arc<Endpoint>> = prev
            .into_iter()
            .flat_map(|p| p.balancers.values())
            .flat_map(|b| b.endpoints())
            .map(|e| (e.addr(), e.clone()))
            .collect();
        let labels: Vec<SharedString> = config
            .services
            .iter()
            .map(|svc| {
                let label: Arc<str> = format!("{}/{}", svc.namespace, svc.name).into();
                SharedString::from(label)
            })
            .collect();
        let outliers: Vec<Arc<Outlier>> = config
            .services
            .iter()
            .zip(&labels)
            .map(|(svc, label)| {
                let od = svc.outlier_detection.clone().unwrap_or_default();
                Arc::new(Outlier::new(
                    label.clone(),
                    od.consecutive_failures,
                    od.base_ejection.as_std(),
                    od.max_ejection.as_std(),
                    metrics.cloned(),
                ))
            })
            .collect();
        let mut services = HashMap::new();
        let mut balancers = HashMap::new();
        let mut meshed = HashMap::new();
        let mut routes = HashMap::new();
        let mut ids: HashMap<usize, Arc<[SpiffeId]>> = HashMap::new();
        for (addr, r) in config.index() {
            services.insert(addr, labels[r.index].clone());
            let svc = &config.services[r.index];
            if svc.meshed {
                let ids = ids
                    .entry(r.index)
                    .or_insert_with(|| svc.identities.as_slice().into());
                meshed.insert(addr, ids.clone());
            }
            let ready = config.services[r.index]
                .targets(addr.port())
                .filter(|(e, _)| e.ready && e.ip.is_ipv4() == addr.is_ipv4())
                .map(|(e, port)| {
                    let ep = SocketAddr::new(e.ip, port);
                    known.entry(ep).or_insert_with(|| Endpoint::new(ep)).clone()
                })
                .collect();
            if let Some(b) = Balancer::with_outlier(ready, outliers[r.index].clone()) {
                balancers.insert(addr, b);
            }
            if !svc.routes.is_empty() {
                routes.insert(
                    addr,
                    LazyRoutes {
                        index: r.index,
                        table: OnceLock::new(),
                    },
                );
            }
        }
        // Document order decides when two Services select the same pod and port, so
        // the label is stable across reloads.
        let mut endpoint_services = HashMap::new();
        for (svc, label) in config.services.iter().zip(&labels) {
            for p in &svc.ports {
                for (e, port) in svc.targets(p.port) {
                    endpoint_services
                        .entry(SocketAddr::new(e.ip, port))
                        .or_insert_with(|| label.clone());
                }
            }
        }
        let mut opaque = match opaque_override {
            Some(o) => o.to_vec(),
            None => config.opaque_ports(),
        };
        opaque.sort_unstable();
        opaque.dedup();
        let authz = crate::authz::Table::new(config.authorization.as_ref());
        // Budgets of Services still in the document, the latest first.
        let live: HashSet<&str> = labels.iter().map(|l| &**l).collect();
        let mut prev_budgets = Budgets::new();
        if let Some(p) = prev {
            let built = p.budgets.lock().unwrap_or_else(|e| e.into_inner());
            for (k, v) in p.prev_budgets.iter().chain(built.iter()) {
                if live.contains(&**k) {
                    prev_budgets.insert(k.clone(), v.clone());
                }
            }
        }
        Self {
            authz,
            config,
            services,
            meshed,
            endpoint_services,
            balancers,
            routes,
            budgets: Mutex::default(),
            prev_budgets,
            opaque,
        }
    }

    /// The resolved routes of ClusterIP:port `dst`, when its Service has any.
    pub fn routes(&self, dst: SocketAddr) -> Option<&Arc<RouteTable>> {
        let lazy = self.routes.get(&dst)?;
        lazy.table
            .get_or_init(|| {
                let mut budgets = self.budgets.lock().unwrap_or_else(|e| e.into_inner());
                match RouteTable::new(
                    &self.config,
                    lazy.index,
                    dst,
                    &mut budgets,
                    Some(&self.prev_budgets),
                ) {
                    Ok(t) => Some(Arc::new(t)),
                    // Validation at load refuses such documents; one that bypassed it
                    // keeps its Service unrouted rather than failing the snapshot.
                    Err(error) => {
                        tracing::warn!(%error, %dst, "ignoring the routes of a service");
                        None
                    }
                }
            })
            .as_ref()
    }

    /// The `service` label for a destination: `namespace/name` of the Service whose
    /// ClusterIP:port it is, else of the Service it is an endpoint of (which is how
    /// the inbound side, whose destination is its own pod IP, knows), else `unknown`.
    pub fn service_label(&self, dst: SocketAddr) -> SharedString {
        self.services
            .get(&dst)
            .or_else(|| self.endpoint_services.get(&dst))
            .cloned()
            .unwrap_or_else(|| SharedString::const_str(UNKNOWN_SERVICE))
    }

    /// The identities a meshed destination's pods present; `None` when the
    /// destination is not a meshed service (plaintext).
    pub fn mesh_identities(&self, dst: SocketAddr) -> Option<&Arc<[SpiffeId]>> {
        self.meshed.get(&dst)
    }

    /// Whether `dst` is a Service's ClusterIP and port.
    pub fn is_service(&self, dst: SocketAddr) -> bool {
        self.services.contains_key(&dst)
    }

    /// The balancer of a ClusterIP:port with ready endpoints.
    pub fn balancer(&self, dst: SocketAddr) -> Option<&Balancer> {
        self.balancers.get(&dst)
    }

    /// Whether connections to `port` skip protocol detection.
    pub fn is_opaque(&self, port: u16) -> bool {
        self.opaque.binary_search(&port).is_ok()
    }

    /// The opaque ports in force.
    pub fn opaque_ports(&self) -> &[u16] {
        &self.opaque
    }

    /// How long detection waits for the client's first bytes.
    pub fn detect_timeout(&self) -> Duration {
        self.config.timeouts.detect.as_std()
    }

    /// How long a connect to the destination may take.
    pub fn connect_timeout(&self) -> Duration {
        self.config.timeouts.connect.as_std()
    }

    /// How long an opaque connection may idle; `None` is forever.
    pub fn idle_timeout(&self) -> Option<Duration> {
        let d = self.config.timeouts.idle;
        (!d.is_zero()).then(|| d.as_std())
    }
}

// === impl Mesh ===

impl Mesh {
    /// Starts with `config`.
    pub fn new(config: MeshConfig, opaque_override: Option<Vec<u16>>) -> Self {
        let snap = Snapshot::new(config, opaque_override.as_deref());
        Self {
            current: ArcSwap::from_pointee(snap),
            opaque_override,
            metrics: None,
            reported: Mutex::default(),
            loaded: AtomicBool::new(true),
        }
    }

    /// Counts outlier ejections in `metrics` from now on (the snapshot in force is
    /// rebuilt with it, keeping its endpoints' state).
    pub fn with_metrics(mut self, metrics: Arc<Metrics>) -> Self {
        let prev = self.current.load_full();
        let snap = Snapshot::build(
            prev.config.clone(),
            self.opaque_override.as_deref(),
            Some(&prev),
            Some(&metrics),
        );
        self.current.store(Arc::new(snap));
        self.metrics = Some(metrics);
        self
    }

    /// Starts empty, waiting for a first document ([`Mesh::is_loaded`] is false until
    /// [`Mesh::store`]).
    pub fn pending(opaque_override: Option<Vec<u16>>) -> Self {
        let m = Self::new(MeshConfig::default(), opaque_override);
        m.loaded.store(false, Ordering::Release);
        m
    }

    /// Whether a document is in force (always, except before a remote watch's first).
    pub fn is_loaded(&self) -> bool {
        self.loaded.load(Ordering::Acquire)
    }

    /// The snapshot in force.
    pub fn load(&self) -> Arc<Snapshot> {
        self.current.load_full()
    }

    /// Replaces the snapshot; endpoints that stay keep their load state.
    pub fn store(&self, config: MeshConfig) {
        let prev = self.current.load();
        let snap = Snapshot::build(
            Arc::new(config),
            self.opaque_override.as_deref(),
            Some(&prev),
            self.metrics.as_ref(),
        );
        self.current.store(Arc::new(snap));
        self.loaded.store(true, Ordering::Release);
    }

    /// The routes of ClusterIP:port `dst` in the snapshot in force (looked up per
    /// request, so keep-alive connections follow route changes).
    pub fn routes(&self, dst: SocketAddr) -> Option<Arc<RouteTable>> {
        self.current.load().routes(dst).cloned()
    }

    /// Sets the gauge of endpoints ejected right now, per Service. Ejections end by
    /// the clock, not by an event, so the gauge is computed when it is read.
    pub fn record_ejected(&self, metrics: &Metrics) {
        let snap = self.load();
        let now = Instant::now();
        // An endpoint counts once per Service, whatever its ports and families.
        let mut ejected: HashMap<SharedString, HashSet<SocketAddr>> = HashMap::new();
        for (dst, b) in &snap.balancers {
            for e in b.endpoints().iter().filter(|e| e.is_ejected_at(now)) {
                ejected
                    .entry(snap.service_label(*dst))
                    .or_default()
                    .insert(e.addr());
            }
        }
        let mut reported = self.reported.lock().unwrap_or_else(|p| p.into_inner());
        reported.extend(ejected.keys().cloned());
        for service in reported.iter() {
            let n = ejected.get(service).map_or(0, HashSet::len);
            metrics
                .gauge(
                    OUTLIER_EJECTED,
                    vec![Label::new("service", service.clone())],
                )
                .set(n as f64);
        }
    }

    /// Picks an endpoint of ClusterIP:port `dst` for one request in the snapshot in
    /// force, avoiding `exclude`; `None` when `dst` has no ready endpoint (left).
    pub fn pick(&self, dst: SocketAddr, exclude: Option<SocketAddr>) -> Option<Pick> {
        self.current.load().balancer(dst)?.pick(exclude)
    }
}

/// Reads and validates a mesh config file.
pub fn read_file(path: &Path) -> Result<MeshConfig, MeshError> {
    let bytes = std::fs::read(path).map_err(|source| MeshError::Read {
        path: path.to_owned(),
        source,
    })?;
    MeshConfig::from_json(&bytes).map_err(|source| MeshError::Invalid {
        path: path.to_owned(),
        source,
    })
}

/// Notices changes of one file.
///
/// Kubernetes updates a mounted ConfigMap by writing a new directory and swapping a
/// `..data` symlink, so the watched path keeps its name while its target changes.
/// Stat follows symlinks, so a swap shows up as a new mtime or length; the content
/// hash then filters out swaps that changed nothing. Every tenth poll re-reads anyway,
/// because a same-size rewrite within the filesystem's mtime granularity is invisible
/// to stat.
pub struct FileWatch {
    path: PathBuf,
    stamp: Option<(SystemTime, u64)>,
    hash: Option<u64>,
    polls: u32,
}

impl FileWatch {
    /// Watches `path`, whose current content was already loaded (if `content` is set).
    pub fn new(path: PathBuf, content: Option<&[u8]>) -> Self {
        let stamp = stamp(&path);
        Self {
            path,
            stamp,
            hash: content.map(hash),
            polls: 0,
        }
    }

    /// Looks once: `None` when nothing changed, else the new document or why it
    /// cannot be used.
    pub fn poll(&mut self) -> Option<Result<MeshConfig, MeshError>> {
        self.polls = self.polls.wrapping_add(1);
        let now = stamp(&self.path);
        if now == self.stamp && !self.polls.is_multiple_of(10) {
            return None;
        }
        self.stamp = now;
        let bytes = match std::fs::read(&self.path) {
            Ok(b) => b,
            Err(source) => {
                // A missing file mid-swap is transient; report it once per change.
                let h = Some(0);
                if self.hash == h {
                    return None;
                }
                self.hash = h;
                return Some(Err(MeshError::Read {
                    path: self.path.clone(),
                    source,
                }));
            }
        };
        let h = Some(hash(&bytes));
        if h == self.hash {
            return None;
        }
        self.hash = h;
        Some(
            MeshConfig::from_json(&bytes).map_err(|source| MeshError::Invalid {
                path: self.path.clone(),
                source,
            }),
        )
    }
}

fn stamp(path: &Path) -> Option<(SystemTime, u64)> {
    let md = std::fs::metadata(path).ok()?;
    Some((md.modified().ok()?, md.len()))
}

fn hash(bytes: &[u8]) -> u64 {
    let mut h = DefaultHasher::new();
    bytes.hash(&mut h);
    // Never 0, which marks "unreadable" above.
    h.finish() | 1
}

/// Polls the file until the task is dropped, swapping in each valid new document.
pub async fn watch(mesh: Arc<Mesh>, mut file: FileWatch, metrics: Arc<Metrics>, every: Duration) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tick.tick().await;
        match file.poll() {
            None => {}
            Some(Ok(config)) => {
                tracing::info!(
                    generation = config.generation,
                    services = config.services.len(),
                    "mesh config reloaded"
                );
                mesh.store(config);
                metrics.config_reload(true);
            }
            Some(Err(error)) => {
                tracing::warn!(%error, "keeping the last good mesh config");
                metrics.config_reload(false);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DOC: &str = r#"{"generation": 1, "services": [{"name": "web", "namespace": "shop",
        "clusterIPs": ["198.19.0.10"], "ports": [{"port": 80}]}], "opaquePorts": [9000]}"#;

    #[test]
    fn snapshot_lookups() {
        let s = Snapshot::new(MeshConfig::from_json(DOC.as_bytes()).unwrap(), None);
        assert_eq!(
            &*s.service_label("198.19.0.10:80".parse().unwrap()),
            "shop/web"
        );
        assert_eq!(
            &*s.service_label("198.19.0.10:81".parse().unwrap()),
            "unknown"
        );
        assert!(s.is_opaque(9000));
        assert!(!s.is_opaque(3306));

        let s = Snapshot::new(MeshConfig::default(), None);
        assert!(
            s.is_opaque(3306),
            "the default list applies without a document list"
        );
        let s = Snapshot::new(MeshConfig::default(), Some(&[7000]));
        assert!(
            s.is_opaque(7000) && !s.is_opaque(3306),
            "the env list replaces the default"
        );
    }

    const EP_DOC: &str = r#"{"services": [
        {"name": "web", "namespace": "shop", "clusterIPs": ["198.19.0.10", "fd00:6d65:7368::10"],
         "ports": [{"port": 80}, {"port": 81}],
         "endpoints": [{"ip": "198.18.0.2", "ports": {"80": 8080}},
                       {"ip": "198.18.0.3", "ports": {"80": 8080}, "ready": false},
                       {"ip": "fd00:6d65:7368::2", "ports": {"80": 8080}}]},
        {"name": "web-canary", "namespace": "shop", "clusterIPs": ["198.19.0.11"],
         "ports": [{"port": 80}], "endpoints": [{"ip": "198.18.0.2", "ports": {"80": 8080}}]}]}"#;

    const ROUTED: &str = r#"{"services": [
        {"name": "web", "namespace": "shop", "clusterIPs": ["198.19.0.10"], "ports": [{"port": 80}],
         "routes": [{"name": "to-v2", "namespace": "shop",
           "rules": [{"backendRefs": [{"name": "web-v2", "namespace": "shop", "port": 80}]}]}]},
        {"name": "web-v2", "namespace": "shop", "clusterIPs": ["198.19.0.12"], "ports": [{"port": 80}],
         "retryConstraint": {"budget": {"percent": 30}}}]}"#;

    #[test]
    fn route_tables_are_built_on_first_use_and_keep_budgets() {
        let dst: SocketAddr = "198.19.0.10:80".parse().unwrap();
        let cfg = || MeshConfig::from_json(ROUTED.as_bytes()).unwrap();
        let first = Snapshot::new(cfg(), None);
        assert!(
            first.routes[&dst].table.get().is_none(),
            "not built at load"
        );
        assert!(first.routes("198.19.0.12:80".parse().unwrap()).is_none());
        let t = first.routes(dst).expect("web has routes").clone();
        assert!(Arc::ptr_eq(&t, first.routes(dst).unwrap()), "built once");
        let budget = |s: &Snapshot| {
            let t = s.routes(dst).unwrap();
            let uri = http::Uri::from_static("/");
            let headers = http::HeaderMap::new();
            let req = crate::route::RequestInfo {
                method: &http::Method::GET,
                uri: &uri,
                headers: &headers,
                port: 80,
                client_namespace: None,
            };
            let d = t.routes().decide(&req, 0).unwrap();
            let crate::route::Action::Forward(f) = &d.action else {
                panic!("{:?}", d.action)
            };
            t.backend(&d, f.backend).unwrap().budget.clone()
        };
        let b1 = budget(&first);
        // A reload whose table is never used still carries the budget to the next one.
        let second = Snapshot::reload(cfg(), None, Some(&first));
        let third = Snapshot::reload(cfg(), None, Some(&second));
        assert!(
            Arc::ptr_eq(&b1, &budget(&third)),
            "the budget survives reloads"
        );
    }

    #[test]
    fn endpoints_give_balancers_and_inbound_labels() {
        let cfg = MeshConfig::from_json(EP_DOC.as_bytes()).unwrap();
        let s = Snapshot::new(cfg.clone(), None);
        let addrs = |dst: &str| -> Vec<SocketAddr> {
            s.balancer(dst.parse().unwrap())
                .map(|b| b.endpoints().iter().map(|e| e.addr()).collect())
                .unwrap_or_default()
        };
        assert_eq!(
            addrs("198.19.0.10:80"),
            vec!["198.18.0.2:8080".parse().unwrap()],
            "ready endpoints of the ClusterIP's family, at the target port"
        );
        assert_eq!(
            addrs("[fd00:6d65:7368::10]:80"),
            vec!["[fd00:6d65:7368::2]:8080".parse().unwrap()]
        );
        assert!(addrs("198.19.0.10:81").is_empty(), "no endpoint serves 81");
        assert!(s.is_service("198.19.0.10:81".parse().unwrap()));

        // Inbound: the pod's own address and target port name the Service; the first
        // Service in the document wins a shared pod, not-ready endpoints count.
        let label = |dst: &str| s.service_label(dst.parse().unwrap()).to_string();
        assert_eq!(label("198.18.0.2:8080"), "shop/web");
        assert_eq!(label("198.18.0.3:8080"), "shop/web");
        assert_eq!(label("198.18.0.2:9999"), "unknown");

        // A reload keeps the load state of endpoints that stay.
        let mesh = Mesh::new(cfg.clone(), None);
        let before = mesh.load();
        let kept = before
            .balancer("198.19.0.10:80".parse().unwrap())
            .unwrap()
            .endpoints()[0]
            .clone();
        let _in_flight = mesh.pick("198.19.0.10:80".parse().unwrap(), None).unwrap();
        mesh.store(cfg);
        let after = mesh.load();
        let ep = &after
            .balancer("198.19.0.10:80".parse().unwrap())
            .unwrap()
            .endpoints()[0];
        assert!(
            Arc::ptr_eq(ep, &kept),
            "endpoint state replaced by a reload"
        );
        assert_eq!(ep.pending(), 1, "the request in flight still counts");
    }

    #[test]
    fn reload_keeps_last_good() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("mesh.json");
        std::fs::write(&path, DOC).unwrap();
        let mesh = Mesh::new(read_file(&path).unwrap(), None);
        let mut w = FileWatch::new(path.clone(), Some(DOC.as_bytes()));
        assert!(w.poll().is_none(), "unchanged file");

        std::fs::write(&path, "{\"services\": [").unwrap();
        match w.poll() {
            Some(Err(MeshError::Invalid { .. })) => {}
            other => panic!("expected an invalid document, got {other:?}"),
        }
        assert_eq!(
            mesh.load().config.generation,
            1,
            "last good config still serves"
        );
        assert!(w.poll().is_none(), "the same bad content is reported once");

        let v2 = DOC.replace("\"generation\": 1", "\"generation\": 2");
        std::fs::write(&path, &v2).unwrap();
        let cfg = w.poll().expect("changed").expect("valid");
        mesh.store(cfg);
        assert_eq!(mesh.load().config.generation, 2);
    }

    #[test]
    fn follows_symlink_swap() {
        // The ConfigMap layout: path -> ..data/mesh.json, ..data -> ..v1, swapped by rename.
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        std::fs::create_dir(d.join("..v1")).unwrap();
        std::fs::write(d.join("..v1/mesh.json"), DOC).unwrap();
        std::os::unix::fs::symlink("..v1", d.join("..data")).unwrap();
        std::os::unix::fs::symlink("..data/mesh.json", d.join("mesh.json")).unwrap();
        let path = d.join("mesh.json");
        let mut w = FileWatch::new(path.clone(), Some(DOC.as_bytes()));

        std::fs::create_dir(d.join("..v2")).unwrap();
        let v2 = DOC.replace("\"generation\": 1", "\"generation\": 22");
        std::fs::write(d.join("..v2/mesh.json"), &v2).unwrap();
        std::os::unix::fs::symlink("..v2", d.join("..data_tmp")).unwrap();
        std::fs::rename(d.join("..data_tmp"), d.join("..data")).unwrap();
        std::fs::remove_dir_all(d.join("..v1")).unwrap();

        let cfg = w.poll().expect("changed").expect("valid");
        assert_eq!(cfg.generation, 22);
    }

    #[test]
    fn missing_file_is_an_error_with_the_path() {
        let e = read_file(Path::new("/nonexistent/mesh.json")).unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.contains("/nonexistent/mesh.json") && msg.contains("MESHLET_CONFIG_PATH"),
            "{msg}"
        );
    }
}
