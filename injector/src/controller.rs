//! The config controller: watches the cluster and keeps the mesh config document
//! current, the way linkerd's policy controller and istiod do, in one small loop.
//!
//! One watcher per kind (Services, EndpointSlices, Pods, Namespaces, HTTPRoutes,
//! GRPCRoutes, ReferenceGrants, XBackendTrafficPolicies, AuthorizationPolicies) fills a cache of cut-down JSON objects ([`world`]); any
//! change wakes the reconciler, which waits out the burst ([`Options::debounce`]),
//! compiles the whole document ([`crate::compile`] is fast) and publishes it on a
//! `watch` channel only when it changed, with `generation` bumped. Then it writes the
//! status of the routes and AuthorizationPolicies whose status differs ([`status`]);
//! among replicas, only the
//! holder of the `meshlet-controller` Lease writes ([`lease`]).
//!
//! Gateway API kinds are read as `DynamicObject`s: `compile` takes JSON anyway, and the
//! `gateway-api` crate is built for another k8s-openapi than ours. A kind whose CRD is
//! not installed counts as empty: the controller says once how to install it and keeps
//! retrying (with the watcher's backoff, at most 30 s apart), so installing the CRDs
//! later needs no restart.

pub mod lease;
pub mod status;
pub mod world;

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::Debug,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use futures_util::StreamExt;
use k8s_openapi::api::{
    core::v1::{Namespace, Pod, Service},
    discovery::v1::EndpointSlice,
};
use kube::{
    api::{Api, DynamicObject, Patch, PatchParams},
    core::{ApiResource, GroupVersionKind},
    runtime::{watcher, WatchStreamExt},
    Client, Resource, ResourceExt,
};
use meshlet_api::{authz::DefaultPolicy, MeshConfig};
use serde::de::DeserializeOwned;
use serde_json::{json, Value};
use tokio::{
    sync::{watch, Notify},
    task::JoinSet,
};

use self::world::World;
use crate::compile::{
    authz::{self, PolicyProblem},
    Conflict, Problem,
};

/// Histogram: seconds one rebuild of the whole document takes.
pub const BUILD_SECONDS: &str = "meshlet_controller_build_seconds";
/// Gauge: generation of the published document.
pub const GENERATION: &str = "meshlet_controller_generation";
/// Gauge: routes left out of the document.
pub const ROUTE_PROBLEMS: &str = "meshlet_controller_route_problems";
/// Counter: route status writes by `result` (`ok`, `conflict`, `error`).
pub const STATUS_WRITES: &str = "meshlet_controller_status_writes_total";

/// How the controller runs.
#[derive(Clone, Debug)]
pub struct Options {
    /// Write Accepted/ResolvedRefs into the status of HTTPRoutes and GRPCRoutes (off for a read-only
    /// `controller --print`).
    pub write_status: bool,
    /// How long a burst of changes may go on before the document is rebuilt.
    pub debounce: Duration,
    /// Write status only while holding this Lease (one writer among replicas);
    /// `None` writes whenever status differs.
    pub lease: Option<lease::LeaseOptions>,
    /// Mesh-wide default inbound policy for workloads no AuthorizationPolicy targets.
    pub default_inbound_policy: DefaultPolicy,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            write_status: true,
            debounce: Duration::from_millis(75),
            lease: None,
            default_inbound_policy: DefaultPolicy::default(),
        }
    }
}

/// The kinds the controller watches.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Kind {
    Service,
    EndpointSlice,
    Pod,
    HttpRoute,
    GrpcRoute,
    ReferenceGrant,
    BackendTrafficPolicy,
    Namespace,
    AuthorizationPolicy,
}

impl Kind {
    /// Kinds whose CRD may be missing; they then count as empty.
    fn optional(self) -> bool {
        matches!(
            self,
            Kind::HttpRoute
                | Kind::GrpcRoute
                | Kind::ReferenceGrant
                | Kind::BackendTrafficPolicy
                | Kind::AuthorizationPolicy
        )
    }

    /// The kind as Kubernetes spells it.
    fn name(self) -> &'static str {
        match self {
            Kind::Service => "Service",
            Kind::EndpointSlice => "EndpointSlice",
            Kind::Pod => "Pod",
            Kind::HttpRoute => "HTTPRoute",
            Kind::GrpcRoute => "GRPCRoute",
            Kind::ReferenceGrant => "ReferenceGrant",
            Kind::BackendTrafficPolicy => "XBackendTrafficPolicy",
            Kind::Namespace => "Namespace",
            Kind::AuthorizationPolicy => "AuthorizationPolicy",
        }
    }

    /// Logs, once, that the API server does not serve the kind and what to do. Only
    /// HTTPRoute warns: the rest of the standard CRDs come in the same bundle, and
    /// XBackendTrafficPolicy is experimental and optional.
    fn log_missing(self) {
        match self {
            Kind::HttpRoute => tracing::warn!(
                "the Gateway API CRDs are not installed (no HTTPRoute): install them with \
                 `tools/kube/cluster.sh gateway-api` or `kubectl apply --server-side -f \
                 standard-install.yaml` of a Gateway API release; until then no route is \
                 applied; retrying"
            ),
            Kind::GrpcRoute => tracing::info!(
                "GRPCRoute (v1) is not served: gRPC routes are not applied until the Gateway \
                 API CRDs of v1.1 or later are installed (`tools/kube/cluster.sh gateway-api`); \
                 retrying"
            ),
            Kind::ReferenceGrant => tracing::info!(
                "ReferenceGrant (v1beta1) is not served: cross-namespace backendRefs are \
                 refused until the Gateway API CRDs are installed; retrying"
            ),
            Kind::AuthorizationPolicy => tracing::warn!(
                "the AuthorizationPolicy CRD (policy.meshlet.io) is not installed: install \
                 it with the chart or `kubectl apply -f charts/meshlet/crds/`; until then no \
                 authorization policy is applied; retrying"
            ),
            _ => tracing::info!(
                "{} is not served (Gateway API experimental channel: `tools/kube/cluster.sh \
                 gateway-api experimental`); retry and session persistence policies are not \
                 applied until it is; retrying",
                self.name()
            ),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    /// The first list has not finished.
    Starting,
    /// Listed; the cache follows the watch.
    Synced,
    /// The API server does not serve the kind (CRD missing, or not allowed to list).
    Missing,
}

type Key = (String, String);

struct Cache {
    phase: Phase,
    objects: BTreeMap<Key, Value>,
    /// Objects of a re-list in progress; they replace `objects` when it is done.
    relist: Option<BTreeMap<Key, Value>>,
    /// The last error logged, so a retry loop logs each new error once.
    last_error: Option<String>,
}

#[derive(Default)]
struct Shared {
    caches: Mutex<BTreeMap<Kind, Cache>>,
    changed: Notify,
}

impl Shared {
    fn with<T>(&self, kind: Kind, f: impl FnOnce(&mut Cache) -> T) -> T {
        let mut caches = self.caches.lock().unwrap_or_else(|p| p.into_inner());
        let cache = caches.entry(kind).or_insert_with(|| Cache {
            phase: Phase::Starting,
            objects: BTreeMap::new(),
            relist: None,
            last_error: None,
        });
        f(cache)
    }

    /// The world, once every kind has been listed (or found missing).
    fn snapshot(&self) -> Option<World> {
        let caches = self.caches.lock().unwrap_or_else(|p| p.into_inner());
        let mut world = World::default();
        for kind in KINDS {
            let cache = caches.get(&kind)?;
            match cache.phase {
                Phase::Starting => return None,
                Phase::Missing => {}
                Phase::Synced => {
                    let into = if kind == Kind::EndpointSlice {
                        &mut world.slices
                    } else {
                        &mut world.objects
                    };
                    into.extend(cache.objects.values().cloned());
                }
            }
        }
        Some(world)
    }
}

const KINDS: [Kind; 9] = [
    Kind::Service,
    Kind::EndpointSlice,
    Kind::Pod,
    Kind::HttpRoute,
    Kind::GrpcRoute,
    Kind::ReferenceGrant,
    Kind::BackendTrafficPolicy,
    Kind::Namespace,
    Kind::AuthorizationPolicy,
];

fn api_resource(group: &str, version: &str, kind: &str, plural: &str) -> ApiResource {
    ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk(group, version, kind), plural)
}

/// The HTTPRoute resource meshlet reads and writes status on.
pub fn http_route_resource() -> ApiResource {
    api_resource("gateway.networking.k8s.io", "v1", "HTTPRoute", "httproutes")
}

/// The GRPCRoute resource meshlet reads and writes status on (v1: Gateway API v1.1+).
pub fn grpc_route_resource() -> ApiResource {
    api_resource("gateway.networking.k8s.io", "v1", "GRPCRoute", "grpcroutes")
}

/// The route resource of a kind as Kubernetes spells it (`HTTPRoute`, `GRPCRoute`).
pub fn route_resource(kind: &str) -> Option<ApiResource> {
    match kind {
        "HTTPRoute" => Some(http_route_resource()),
        "GRPCRoute" => Some(grpc_route_resource()),
        _ => None,
    }
}

/// ReferenceGrant at v1beta1: served by every Gateway API release that has it.
fn reference_grant_resource() -> ApiResource {
    api_resource(
        "gateway.networking.k8s.io",
        "v1beta1",
        "ReferenceGrant",
        "referencegrants",
    )
}

/// The AuthorizationPolicy resource meshlet reads and writes status on.
pub fn authorization_policy_resource() -> ApiResource {
    api_resource(
        authz::GROUP,
        "v1alpha1",
        "AuthorizationPolicy",
        "authorizationpolicies",
    )
}

fn backend_traffic_policy_resource() -> ApiResource {
    api_resource(
        "gateway.networking.x-k8s.io",
        "v1alpha1",
        "XBackendTrafficPolicy",
        "xbackendtrafficpolicies",
    )
}

/// Starts the controller on the current tokio runtime and returns the document.
///
/// The receiver starts with an empty document of `generation` 0, which means "not yet
/// synced": wait for `generation > 0` (e.g. `rx.wait_for(|c| c.generation > 0)`)
/// before serving it. Each later value has a higher generation and differs from the
/// one before. The controller stops when every receiver is dropped.
pub fn spawn(client: Client, options: Options) -> watch::Receiver<Arc<MeshConfig>> {
    let (tx, rx) = watch::channel(Arc::new(MeshConfig::default()));
    tokio::spawn(run(client, options, tx));
    rx
}

async fn run(client: Client, options: Options, tx: watch::Sender<Arc<MeshConfig>>) {
    let shared = Arc::new(Shared::default());
    let mut tasks = JoinSet::new();
    tasks.spawn(watch_kind(
        Api::<Service>::all(client.clone()),
        Kind::Service,
        shared.clone(),
        world::slim_service,
    ));
    tasks.spawn(watch_kind(
        Api::<EndpointSlice>::all(client.clone()),
        Kind::EndpointSlice,
        shared.clone(),
        world::slim_slice,
    ));
    tasks.spawn(watch_kind(
        Api::<Pod>::all(client.clone()),
        Kind::Pod,
        shared.clone(),
        world::slim_pod,
    ));
    tasks.spawn(watch_kind(
        Api::<Namespace>::all(client.clone()),
        Kind::Namespace,
        shared.clone(),
        world::slim_namespace,
    ));
    for (kind, ar) in [
        (Kind::HttpRoute, http_route_resource()),
        (Kind::GrpcRoute, grpc_route_resource()),
        (Kind::ReferenceGrant, reference_grant_resource()),
        (
            Kind::BackendTrafficPolicy,
            backend_traffic_policy_resource(),
        ),
        (Kind::AuthorizationPolicy, authorization_policy_resource()),
    ] {
        let api = Api::<DynamicObject>::all_with(client.clone(), &ar);
        tasks.spawn(watch_kind(api, kind, shared.clone(), move |o| {
            world::slim_dynamic(o, &ar)
        }));
    }

    let leader = match options.lease.clone().filter(|_| options.write_status) {
        Some(lease) => {
            let leader = Arc::new(AtomicBool::new(false));
            let wake = shared.clone();
            tasks.spawn(lease::run(
                client.clone(),
                lease,
                leader.clone(),
                move || wake.changed.notify_one(),
            ));
            Some(leader)
        }
        None => None,
    };
    let mut reconciler = Reconciler {
        client,
        options,
        tx,
        problems: Vec::new(),
        conflicts: Vec::new(),
        authz_problems: Vec::new(),
        leader,
    };
    loop {
        tokio::select! {
            _ = shared.changed.notified() => {}
            _ = reconciler.tx.closed() => break,
        }
        // A burst (a rollout, a re-list) arrives as many events: build once after it.
        tokio::time::sleep(reconciler.options.debounce).await;
        let Some(mut world) = shared.snapshot() else {
            continue;
        };
        world.default_inbound_policy = reconciler.options.default_inbound_policy;
        reconciler.reconcile(&world).await;
    }
    tasks.abort_all();
}

/// Follows one kind into the cache; never returns (the watcher retries with backoff).
async fn watch_kind<K>(
    api: Api<K>,
    kind: Kind,
    shared: Arc<Shared>,
    slim: impl Fn(K) -> Option<Value> + Send + 'static,
) where
    K: Resource + Clone + DeserializeOwned + Debug + Send + 'static,
{
    // `any_semantic`: lists come from the API server's watch cache, not from etcd.
    let stream = watcher(api, watcher::Config::default().any_semantic()).default_backoff();
    futures_util::pin_mut!(stream);
    while let Some(event) = stream.next().await {
        let key = |o: &K| (o.namespace().unwrap_or_default(), o.name_any());
        match event {
            Ok(watcher::Event::Init) => shared.with(kind, |c| c.relist = Some(BTreeMap::new())),
            Ok(watcher::Event::InitApply(o)) => {
                let k = key(&o);
                if let Some(v) = slim(o) {
                    shared.with(kind, |c| {
                        c.relist.get_or_insert_with(BTreeMap::new).insert(k, v)
                    });
                }
            }
            Ok(watcher::Event::InitDone) => {
                shared.with(kind, |c| {
                    c.objects = c.relist.take().unwrap_or_default();
                    if c.phase != Phase::Synced {
                        tracing::info!(kind = kind.name(), objects = c.objects.len(), "listed");
                    }
                    c.phase = Phase::Synced;
                    c.last_error = None;
                });
                shared.changed.notify_one();
            }
            Ok(watcher::Event::Apply(o)) => {
                let k = key(&o);
                let v = slim(o);
                // Most pod updates (conditions, container statuses) leave the cut-down
                // object as it was: no rebuild for those.
                let changed = shared.with(kind, |c| match v {
                    Some(v) => c.objects.insert(k, v.clone()).as_ref() != Some(&v),
                    None => c.objects.remove(&k).is_some(),
                });
                if changed {
                    shared.changed.notify_one();
                }
            }
            Ok(watcher::Event::Delete(o)) => {
                let k = key(&o);
                if shared.with(kind, |c| c.objects.remove(&k).is_some()) {
                    shared.changed.notify_one();
                }
            }
            Err(e) => {
                if on_error(kind, &e, &shared) {
                    shared.changed.notify_one();
                }
            }
        }
    }
}

/// The HTTP status the API server answered with, if the error is one.
fn api_code(e: &watcher::Error) -> Option<u16> {
    match e {
        watcher::Error::InitialListFailed(kube::Error::Api(s))
        | watcher::Error::WatchStartFailed(kube::Error::Api(s))
        | watcher::Error::WatchFailed(kube::Error::Api(s)) => Some(s.code),
        watcher::Error::WatchError(s) => Some(s.code),
        _ => None,
    }
}

/// Logs a watch error once and marks an optional kind missing; true when the world
/// changed because of it.
fn on_error(kind: Kind, e: &watcher::Error, shared: &Shared) -> bool {
    let code = api_code(e);
    let text = e.to_string();
    shared.with(kind, |c| {
        let first = c.last_error.as_deref() != Some(text.as_str());
        c.last_error = Some(text.clone());
        match code {
            Some(404) if kind.optional() => {
                if first {
                    kind.log_missing();
                }
            }
            Some(403) => {
                if first {
                    tracing::warn!(
                        "not allowed to list/watch {}: {text}; grant get/list/watch on it \
                         to the controller's ServiceAccount (the chart's ClusterRole does); retrying",
                        kind.name()
                    );
                }
                if !kind.optional() {
                    return false;
                }
            }
            // Expired resourceVersion (etcd compaction): the watcher re-lists by itself.
            Some(410) => {
                tracing::debug!(kind = kind.name(), "watch expired; re-listing");
                return false;
            }
            _ => {
                if first {
                    tracing::warn!(kind = kind.name(), error = %text, "watch failed; retrying");
                } else {
                    tracing::debug!(kind = kind.name(), error = %text, "watch failed again; retrying");
                }
                return false;
            }
        }
        // Missing: an optional kind counts as empty until it comes back.
        let changed = c.phase != Phase::Missing;
        c.phase = Phase::Missing;
        c.objects.clear();
        c.relist = None;
        changed
    })
}

struct Reconciler {
    client: Client,
    options: Options,
    tx: watch::Sender<Arc<MeshConfig>>,
    problems: Vec<Problem>,
    conflicts: Vec<Conflict>,
    authz_problems: Vec<PolicyProblem>,
    /// Whether this replica holds the Lease; `None` without election.
    leader: Option<Arc<AtomicBool>>,
}

impl Reconciler {
    async fn reconcile(&mut self, world: &World) {
        let start = std::time::Instant::now();
        let built = world::build(world);
        metrics::histogram!(BUILD_SECONDS).record(start.elapsed().as_secs_f64());
        let compiled = match built {
            Ok(c) => c,
            Err(error) => {
                // The previous document keeps serving; a fix in the cluster wakes us.
                tracing::error!(%error, "cannot compile the mesh config; keeping the previous one");
                return;
            }
        };
        for b in &compiled.bad_annotations {
            tracing::warn!(problem = %b, "Service annotation refused");
        }
        self.publish(compiled.config);
        log_new(&mut self.problems, compiled.problems);
        log_new(&mut self.conflicts, compiled.conflicts);
        log_new(&mut self.authz_problems, compiled.authz_problems);
        metrics::gauge!(ROUTE_PROBLEMS).set((self.problems.len() + self.conflicts.len()) as f64);
        let holds = self
            .leader
            .as_ref()
            .is_none_or(|l| l.load(Ordering::SeqCst));
        if self.options.write_status && holds {
            self.write_statuses(world).await;
            self.write_policy_statuses(world).await;
        }
    }

    /// Sends `config` when it differs from the current document.
    fn publish(&self, config: MeshConfig) {
        let current = self.tx.borrow().clone();
        let Some(config) = next_document(&current, config) else {
            return;
        };
        let routes: usize = config.services.iter().map(|s| s.routes.len()).sum();
        tracing::info!(
            generation = config.generation,
            services = config.services.len(),
            routes,
            "mesh config changed"
        );
        metrics::gauge!(GENERATION).set(config.generation as f64);
        self.tx.send_replace(Arc::new(config));
    }

    async fn write_statuses(&self, world: &World) {
        let outcomes = status::outcomes(&world.objects, &self.problems, &self.conflicts);
        let services = self.tx.borrow().services.clone();
        let now = status::now();
        let ok = status::Outcome::default();
        for route in &world.objects {
            let kind = route["kind"].as_str().unwrap_or_default();
            let Some(ar) = route_resource(kind) else {
                continue;
            };
            let ns = route["metadata"]["namespace"].as_str().unwrap_or("default");
            let name = route["metadata"]["name"].as_str().unwrap_or_default();
            let outcome = outcomes
                .get(&(kind.to_string(), format!("{ns}/{name}")))
                .unwrap_or(&ok);
            let Some(parents) = status::desired_parents(route, outcome, &services, &now) else {
                continue;
            };
            // The resourceVersion makes the write conditional: if the route changed
            // since we read it, the API server refuses (409) and the watch brings the
            // new version, which is reconciled next.
            let patch = json!({
                "metadata": {"resourceVersion": route["metadata"]["resourceVersion"]},
                "status": {"parents": parents},
            });
            let api = Api::<DynamicObject>::namespaced_with(self.client.clone(), ns, &ar);
            match api
                .patch_status(name, &PatchParams::default(), &Patch::Merge(&patch))
                .await
            {
                Ok(_) => {
                    metrics::counter!(STATUS_WRITES, "result" => "ok").increment(1);
                    tracing::debug!(kind, route = %format!("{ns}/{name}"), "status written");
                }
                Err(kube::Error::Api(s)) if s.code == 409 || s.code == 404 => {
                    metrics::counter!(STATUS_WRITES, "result" => "conflict").increment(1);
                    tracing::debug!(kind, route = %format!("{ns}/{name}"), "route changed meanwhile; status follows on the next event")
                }
                Err(error) => {
                    metrics::counter!(STATUS_WRITES, "result" => "error").increment(1);
                    tracing::warn!(kind, route = %format!("{ns}/{name}"), %error, "cannot write route status; the controller needs patch on {}/status", ar.plural)
                }
            }
        }
    }
}

impl Reconciler {
    /// Writes the Accepted condition of each AuthorizationPolicy whose condition differs.
    async fn write_policy_statuses(&self, world: &World) {
        let ar = authorization_policy_resource();
        let now = status::now();
        for policy in world.objects.iter().filter(|o| {
            o["kind"] == "AuthorizationPolicy"
                && o["apiVersion"]
                    .as_str()
                    .is_some_and(|a| a.starts_with(authz::GROUP))
        }) {
            let Some(conditions) =
                status::desired_policy_conditions(policy, &self.authz_problems, &now)
            else {
                continue;
            };
            let ns = policy["metadata"]["namespace"]
                .as_str()
                .unwrap_or("default");
            let name = policy["metadata"]["name"].as_str().unwrap_or_default();
            let id = format!("{ns}/{name}");
            // Conditional on the resourceVersion read, as for routes.
            let patch = json!({
                "metadata": {"resourceVersion": policy["metadata"]["resourceVersion"]},
                "status": {"conditions": conditions},
            });
            let api = Api::<DynamicObject>::namespaced_with(self.client.clone(), ns, &ar);
            match api
                .patch_status(name, &PatchParams::default(), &Patch::Merge(&patch))
                .await
            {
                Ok(_) => {
                    metrics::counter!(STATUS_WRITES, "result" => "ok").increment(1);
                    tracing::debug!(policy = %id, "status written");
                }
                Err(kube::Error::Api(s)) if s.code == 409 || s.code == 404 => {
                    metrics::counter!(STATUS_WRITES, "result" => "conflict").increment(1);
                    tracing::debug!(policy = %id, "policy changed meanwhile; status follows on the next event")
                }
                Err(error) => {
                    metrics::counter!(STATUS_WRITES, "result" => "error").increment(1);
                    tracing::warn!(policy = %id, %error, "cannot write AuthorizationPolicy status; the controller needs patch on authorizationpolicies/status")
                }
            }
        }
    }
}

/// Why `meshlet-injector controller` could not do its job.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No client could be made (no kubeconfig, no in-cluster credentials).
    #[error(
        "cannot connect to the Kubernetes API: {0}; set KUBECONFIG (e.g. `eval \
         \"$(tools/kube/cluster.sh env)\"`) or run in a pod with a ServiceAccount"
    )]
    Client(#[source] kube::Error),
    /// The first document did not come in time.
    #[error(
        "no mesh config within {0:?}: the Services, EndpointSlices and Pods could not be \
         listed; is the API server reachable and may this user list them? (see the log above)"
    )]
    Timeout(Duration),
}

/// Flags of `meshlet-injector controller`.
#[derive(Clone, Debug, clap::Args)]
pub struct ControllerArgs {
    /// Print the first compiled document (JSON) to stdout and exit; writes no status.
    #[arg(long)]
    pub print: bool,
    /// With --print: how long to wait for the cluster to be listed, e.g. 30s.
    #[arg(long, default_value = "30s")]
    pub timeout: meshlet_api::Duration,
    /// Do not write HTTPRoute, GRPCRoute and AuthorizationPolicy status (read-only).
    #[arg(long)]
    pub no_status: bool,
    /// Mesh-wide default inbound policy for workloads no AuthorizationPolicy targets:
    /// all-allowed, mesh-only or deny (a namespace's meshlet.io/default-inbound-policy
    /// annotation overrides it).
    #[arg(long, default_value = "all-allowed")]
    pub default_inbound_policy: DefaultPolicy,
}

/// `meshlet-injector controller`: with `--print`, returns the first document; else runs
/// until SIGTERM or Ctrl-C and returns `None`.
pub async fn command(args: &ControllerArgs) -> Result<Option<Arc<MeshConfig>>, Error> {
    let client = Client::try_default().await.map_err(Error::Client)?;
    let options = Options {
        write_status: !(args.print || args.no_status),
        default_inbound_policy: args.default_inbound_policy,
        ..Options::default()
    };
    let mut rx = spawn(client, options);
    if args.print {
        let limit: Duration = args.timeout.into();
        let first = tokio::time::timeout(limit, rx.wait_for(|c| c.generation > 0))
            .await
            .map_err(|_| Error::Timeout(limit))?
            .map_err(|_| Error::Timeout(limit))?
            .clone();
        return Ok(Some(first));
    }
    crate::serve::shutdown_signal().await;
    Ok(None)
}

/// The document to publish after `current`: `new` one generation up, or `None` when
/// nothing changed. The first document (after generation 0, "not synced") is always
/// published, even when empty.
pub fn next_document(current: &MeshConfig, mut new: MeshConfig) -> Option<MeshConfig> {
    new.generation = current.generation;
    if current.generation > 0 && new == *current {
        return None;
    }
    new.generation = current.generation + 1;
    Some(new)
}

/// The routes of a document as `namespace/name` (for logs and tests).
pub fn route_names(config: &MeshConfig) -> BTreeSet<String> {
    config
        .services
        .iter()
        .flat_map(|s| s.routes.iter())
        .map(|r| format!("{}/{}", r.namespace, r.name))
        .collect()
}

/// Logs the entries of `next` that `prev` lacks (each problem once, not at every
/// rebuild), then keeps `next`.
fn log_new<T: PartialEq + std::fmt::Display>(prev: &mut Vec<T>, next: Vec<T>) {
    if next != *prev {
        for p in next.iter().filter(|p| !prev.contains(p)) {
            tracing::info!("{p}");
        }
        *prev = next;
    }
}

#[cfg(test)]
mod tests;
