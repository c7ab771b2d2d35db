//! `meshlet-node`: the kubelet and kube-proxy of the test control plane
//! (`tools/kube/cluster.sh`), built on the mini-cluster's network namespaces.
//!
//! It registers a Node and renews its Lease, binds every pod that has no node (no
//! scheduler runs), runs each bound pod in a network namespace of its own (init
//! containers in order, native sidecars, then the app containers, as processes from
//! the image table), probes them and reports the pod's status; on delete it sends
//! SIGTERM, waits the grace period, kills, and removes the pod object. It programs
//! ClusterIP DNAT in the node namespace from Services and EndpointSlices, serves
//! `metrics.k8s.io` (per-container CPU and memory from /proc) through the
//! aggregation layer, `kubectl logs` and `kubectl exec` (SPDY/3.1), and answers
//! the API server's "cluster" egress (webhooks, aggregated APIs, kubelet calls) by
//! dialing inside the node namespace, so the host's root namespace is never changed.

pub mod api;
pub mod apiserver;
pub mod egress;
pub mod exec;
pub mod metrics;
pub mod net;
pub mod pod;
pub mod prep;
pub mod proxy;
pub mod status;

use std::{
    collections::{HashMap, HashSet},
    future::Future,
    path::PathBuf,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use futures_util::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::Pod;
use kube::{
    api::{Api, DeleteParams, PostParams, Preconditions},
    runtime::{watcher, WatchStreamExt},
    Client,
};
use tokio::sync::mpsc;

use self::{net::NodeNet, pod::PodShared};
use crate::cluster::{self, Binaries};

/// Why the node agent could not do something.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The mini-cluster layer failed (namespaces, commands).
    #[error(transparent)]
    Cluster(#[from] cluster::Error),
    /// The API server refused or could not be reached.
    #[error("kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    /// The kubeconfig could not be read.
    #[error("kubeconfig: {0}")]
    Config(String),
    /// Anything else, with what to do about it.
    #[error("{0}")]
    Other(String),
}

/// What the agent needs to join a cluster.
#[derive(Clone, Debug)]
pub struct NodeConfig {
    /// Node name.
    pub name: String,
    /// Kubeconfig with rights to nodes, pods, leases, services, endpointslices,
    /// serviceaccounts/token, configmaps, secrets and apiservices (the admin one).
    pub kubeconfig: PathBuf,
    /// The API server's "cluster" egress socket to listen on (`EGRESS_SOCKET` of
    /// `cluster.env`); `None` leaves webhooks and aggregated APIs unreachable.
    pub egress_socket: Option<PathBuf>,
    /// Third octet of the node's /24: pods `198.18.<subnet>.2-250`, node `.1`.
    pub subnet: u8,
    /// Where pod directories (volumes, logs) go.
    pub state_dir: PathBuf,
    /// The image table.
    pub bins: Binaries,
    /// Port of the metrics.k8s.io endpoint on the node address.
    pub metrics_port: u16,
    /// Port of the kubelet endpoint (`kubectl logs`) on the node address.
    pub kubelet_port: u16,
    /// How often projected tokens are renewed; `None`: at 80% of their lifetime, as
    /// the kubelet does (tests shorten it to see a rotation).
    pub token_refresh: Option<std::time::Duration>,
}

/// Pods this node runs, by uid.
pub type PodMap = Arc<Mutex<HashMap<String, Arc<PodShared>>>>;

/// Shared handles of the running agent.
#[derive(Clone)]
pub struct Agent {
    /// Its configuration.
    pub cfg: Arc<NodeConfig>,
    /// API client.
    pub client: Client,
    /// The node's network.
    pub net: Arc<NodeNet>,
    /// Pods it runs.
    pub pods: PodMap,
    /// Pods whose status changed.
    pub status_tx: mpsc::UnboundedSender<Arc<PodShared>>,
    /// When the agent first saw each pod (for the created -> ready latency).
    pub first_seen: Arc<Mutex<HashMap<String, Instant>>>,
}

/// Locks a mutex, also when a holder panicked (the data stays usable here).
pub fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Runs the agent until `shutdown` completes; then stops every pod and removes every
/// namespace it made.
pub async fn run(cfg: NodeConfig, shutdown: impl Future<Output = ()>) -> Result<(), Error> {
    cluster::check_prereqs()?;
    std::fs::create_dir_all(&cfg.state_dir).map_err(|e| {
        Error::Other(format!(
            "creating the state dir {}: {e}",
            cfg.state_dir.display()
        ))
    })?;
    let client = api::client(&cfg.kubeconfig).await?;
    let net = Arc::new(NodeNet::create(cfg.subnet)?);
    let (status_tx, status_rx) = mpsc::unbounded_channel();
    let agent = Agent {
        cfg: Arc::new(cfg),
        client,
        net,
        pods: Arc::new(Mutex::new(HashMap::new())),
        status_tx,
        first_seen: Arc::new(Mutex::new(HashMap::new())),
    };
    api::register_node(&agent).await?;
    tracing::info!(
        node = %agent.cfg.name,
        ip = %agent.net.node_ip(),
        pod_cidr = %agent.net.pod_cidr(),
        "node registered"
    );
    let mut tasks = tokio::task::JoinSet::new();
    tasks.spawn(api::heartbeat(agent.clone()));
    tasks.spawn(status::writer(agent.clone(), status_rx));
    tasks.spawn(proxy::run(agent.clone()));
    tasks.spawn(apiserver::run(agent.clone()));
    tasks.spawn(metrics::run(agent.clone()));
    if let Some(sock) = agent.cfg.egress_socket.clone() {
        tasks.spawn(egress::run(agent.clone(), sock));
    }
    tasks.spawn(watch_pods(agent.clone()));
    tokio::select! {
        _ = shutdown => tracing::info!("shutting down"),
        Some(done) = tasks.join_next() => {
            tracing::error!(?done, "a node agent task ended");
        }
    }
    tasks.abort_all();
    stop_all(&agent).await;
    metrics::unregister(&agent).await;
    Ok(())
}

/// Stops every pod at once (SIGTERM, 2 s, SIGKILL) and waits for their workers.
async fn stop_all(agent: &Agent) {
    let pods: Vec<Arc<PodShared>> = lock(&agent.pods).values().cloned().collect();
    for p in &pods {
        p.terminate(Duration::from_secs(2));
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while pods.iter().any(|p| !p.gone()) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn watch_pods(agent: Agent) -> Result<(), Error> {
    let api: Api<Pod> = Api::all(agent.client.clone());
    let mut binding: HashSet<String> = HashSet::new();
    let mut stream = watcher(api, watcher::Config::default())
        .default_backoff()
        .boxed();
    loop {
        let ev = match stream.try_next().await {
            Ok(Some(ev)) => ev,
            Ok(None) => return Err(Error::Other("the pod watch ended".into())),
            Err(e) => {
                tracing::warn!(error = %e, "pod watch");
                continue;
            }
        };
        match ev {
            watcher::Event::Apply(p) | watcher::Event::InitApply(p) => {
                on_pod(&agent, &mut binding, p);
            }
            watcher::Event::Delete(p) => {
                let uid = p.metadata.uid.clone().unwrap_or_default();
                binding.remove(&uid);
                if !lock(&agent.pods).contains_key(&uid) {
                    lock(&agent.first_seen).remove(&uid);
                }
                let shared = lock(&agent.pods).get(&uid).cloned();
                if let Some(s) = shared {
                    // Deleted without waiting for us (force delete): stop at once.
                    s.set_deleted();
                    s.terminate(Duration::ZERO);
                }
            }
            watcher::Event::Init | watcher::Event::InitDone => {}
        }
    }
}

fn on_pod(agent: &Agent, binding: &mut HashSet<String>, p: Pod) {
    let uid = p.metadata.uid.clone().unwrap_or_default();
    let spec = p.spec.clone().unwrap_or_default();
    let deleting = p.metadata.deletion_timestamp.is_some();
    let phase = p
        .status
        .as_ref()
        .and_then(|s| s.phase.clone())
        .unwrap_or_default();
    lock(&agent.first_seen)
        .entry(uid.clone())
        .or_insert_with(Instant::now);
    match spec.node_name.as_deref() {
        None | Some("") => {
            let gated = spec
                .scheduling_gates
                .as_ref()
                .is_some_and(|g| !g.is_empty());
            if !deleting && !gated && binding.insert(uid) {
                tokio::spawn(bind(agent.clone(), p));
            }
        }
        Some(n) if n == agent.cfg.name => {
            let known = lock(&agent.pods).get(&uid).cloned();
            match known {
                Some(s) if deleting => {
                    let grace = p
                        .metadata
                        .deletion_grace_period_seconds
                        .or(spec.termination_grace_period_seconds)
                        .unwrap_or(30);
                    s.terminate(Duration::from_secs(grace.max(0) as u64));
                }
                Some(_) => {}
                None if deleting => {
                    // Nothing runs (an agent restart): the kubelet's final delete.
                    tokio::spawn(final_delete(agent.client.clone(), p));
                }
                None if phase == "Succeeded" || phase == "Failed" => {}
                None => {
                    let shared = Arc::new(PodShared::new(&p));
                    lock(&agent.pods).insert(uid, shared.clone());
                    tokio::spawn(pod::start(agent.clone(), p, shared));
                }
            }
        }
        Some(_) => {}
    }
}

/// The scheduler's work, reduced to one node: POST pods/binding.
async fn bind(agent: Agent, p: Pod) {
    let ns = p.metadata.namespace.clone().unwrap_or_default();
    let name = p.metadata.name.clone().unwrap_or_default();
    let api: Api<Pod> = Api::namespaced(agent.client.clone(), &ns);
    let body = serde_json::json!({
        "apiVersion": "v1",
        "kind": "Binding",
        "metadata": {"name": name, "namespace": ns, "uid": p.metadata.uid},
        "target": {"apiVersion": "v1", "kind": "Node", "name": agent.cfg.name},
    });
    match api
        .create_subresource::<_, serde_json::Value>("binding", &name, &PostParams::default(), &body)
        .await
    {
        Ok(_) => tracing::info!(pod = %format!("{ns}/{name}"), "bound"),
        Err(e) => tracing::warn!(pod = %format!("{ns}/{name}"), error = %e, "binding failed"),
    }
}

/// Removes the pod object once its containers are gone (grace 0, this uid only).
pub async fn final_delete(client: Client, p: Pod) {
    let ns = p.metadata.namespace.clone().unwrap_or_default();
    let name = p.metadata.name.clone().unwrap_or_default();
    let api: Api<Pod> = Api::namespaced(client, &ns);
    let dp = DeleteParams {
        grace_period_seconds: Some(0),
        preconditions: Some(Preconditions {
            uid: p.metadata.uid.clone(),
            resource_version: None,
        }),
        ..Default::default()
    };
    match api.delete(&name, &dp).await {
        Ok(_) => tracing::info!(pod = %format!("{ns}/{name}"), "removed"),
        Err(kube::Error::Api(e)) if e.code == 404 || e.code == 409 => {}
        Err(e) => tracing::warn!(pod = %format!("{ns}/{name}"), error = %e, "final delete failed"),
    }
}
