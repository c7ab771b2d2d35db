//! Inbound authorization by mesh identity (GEP-3779 `AuthorizationPolicy`, compiled
//! into the mesh config's `authorization` section; see `meshlet_api::authz`).
//!
//! Decided locally from the config in force, never by a call out: once per
//! connection for opaque TCP ([`AuthzTcp`], a denied connection is closed right
//! after the mesh TLS handshake), once per request for HTTP ([`AuthzHttp`], 403, or
//! gRPC `PERMISSION_DENIED`). HTTP requests read the snapshot in force at the
//! request, so a reload changes the answer for the next request of a keep-alive
//! connection; TCP connections already allowed keep running.
//!
//! A workload is found by the address the client connected to (its pod IP). With no
//! policy targeting it, the default inbound policy of its namespace applies; once an
//! ALLOW policy targets it, only callers some rule matches get in. The admin port
//! (probes) has its own listener and never passes here.

use std::{
    collections::{HashMap, HashSet},
    net::{IpAddr, SocketAddr},
    sync::{Arc, Mutex},
    task::{Context, Poll},
};

use bytes::Bytes;
use futures_util::future::{self, Either as FutEither};
use http::{header, HeaderValue, Request, Response, StatusCode};
use http_body_util::{Either, Full};
use meshlet_api::authz::{Authorization, DefaultPolicy, Rule, Source};
use metrics::{Label, SharedString};
use tower::ServiceExt;

use crate::{
    errors::ProxyError,
    http::Body,
    mesh::Mesh,
    metrics::{Direction, Metrics},
    target::{BoxError, BoxFuture, Target},
};

/// Decisions, by `policy` (the allowing policy `namespace/name`, `none` when policies
/// target the workload and none allowed, `default:<mode>` when the default decided),
/// `result` (`allow`, `deny`) and `client` (the caller's SPIFFE id when some policy
/// names it, `other` for other identities, `none` for plaintext).
pub const DECISIONS: &str = "meshlet_authz_decisions_total";

/// Header on a synthetic denial, naming the decision for scripts.
pub const DECISION_HEADER: &str = "meshlet-authz";

/// The `policy` label when policies target the workload and none allows.
pub const NO_POLICY: &str = "none";

/// The compiled authorization of one mesh config snapshot.
#[derive(Debug, Default)]
pub struct Table {
    /// `None`: the document has no `authorization` section; nothing is enforced.
    inner: Option<Inner>,
}

#[derive(Debug)]
struct Inner {
    by_ip: HashMap<IpAddr, Arc<Entry>>,
    default: DefaultPolicy,
    namespaces: HashMap<String, DefaultPolicy>,
    named: HashSet<Arc<str>>,
}

#[derive(Debug)]
struct Entry {
    default: DefaultPolicy,
    /// `None`: no policy targets the workload.
    grants: Option<Arc<Grants>>,
}

/// The rules of every policy targeting a workload, indexed by the caller identity
/// they name, so a decision costs a few hash look-ups however many policies there are.
#[derive(Debug, Default)]
struct Grants {
    /// Rules without sources: every caller.
    any: Vec<Grant>,
    /// SPIFFE sources, by the whole id.
    spiffe: HashMap<String, Vec<Grant>>,
    /// Service-account sources, by the id's path `ns/<ns>/sa/<sa>`.
    service_account: HashMap<String, Vec<Grant>>,
    /// `*` service-account sources, by namespace.
    namespace: HashMap<String, Vec<Grant>>,
}

/// One rule of one policy, for one way of naming the caller.
#[derive(Debug, Clone)]
struct Grant {
    /// The policy's place in the workload's (sorted) list: the first match decides
    /// the label, as a scan in that order would.
    order: usize,
    label: SharedString,
    /// Empty: every port.
    ports: Vec<u16>,
}

/// The outcome for one caller.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decision {
    /// Whether the caller gets in.
    pub allowed: bool,
    /// What decided.
    pub by: DecidedBy,
}

/// What decided a [`Decision`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DecidedBy {
    /// This policy (`namespace/name`) has a matching rule.
    Policy(SharedString),
    /// Policies target the workload and no rule of any of them matches.
    NoMatchingRule,
    /// No policy targets the workload: its default inbound policy.
    Default(DefaultPolicy),
}

/// Authorization for the inbound stack: the mesh config in force, where decisions
/// are counted, and the pod's own namespace (whose default applies to addresses the
/// config does not list yet).
#[derive(Clone)]
pub struct Authz {
    mesh: Arc<Mesh>,
    metrics: Arc<Metrics>,
    own_namespace: Option<Arc<str>>,
}

// === impl Table ===

impl Table {
    /// Compiles the `authorization` section, if any.
    pub fn new(a: Option<&Authorization>) -> Self {
        let Some(a) = a else {
            return Self::default();
        };
        let policies: HashMap<String, (SharedString, &[Rule])> = a
            .policies
            .iter()
            .map(|p| {
                let id = p.id();
                let label = SharedString::from(Arc::<str>::from(id.as_str()));
                (id, (label, p.rules.as_slice()))
            })
            .collect();
        // Workloads targeted by the same policies share one index.
        let mut shared: HashMap<&[String], Arc<Grants>> = HashMap::new();
        let mut by_ip = HashMap::new();
        for w in &a.workloads {
            let grants = (!w.policies.is_empty()).then(|| {
                shared
                    .entry(w.policies.as_slice())
                    .or_insert_with(|| Arc::new(Grants::new(&w.policies, &policies)))
                    .clone()
            });
            let entry = Arc::new(Entry {
                default: a.default_for(Some(&w.namespace)),
                grants,
            });
            for ip in &w.ips {
                by_ip.insert(*ip, entry.clone());
            }
        }
        Self {
            inner: Some(Inner {
                by_ip,
                default: a.default_policy,
                namespaces: a.namespaces.iter().map(|(k, v)| (k.clone(), *v)).collect(),
                named: a.named_identities().into_iter().map(Arc::from).collect(),
            }),
        }
    }

    /// Whether anything is enforced at all.
    pub fn is_enforced(&self) -> bool {
        self.inner.is_some()
    }

    /// Decides for a caller (`peer`: verified identity, `None` for plaintext) to
    /// `dst`; `own_namespace` picks the default for an address the config does not
    /// list. `None` when nothing is enforced.
    pub fn decide(
        &self,
        dst: SocketAddr,
        peer: Option<&str>,
        own_namespace: Option<&str>,
    ) -> Option<Decision> {
        let t = self.inner.as_ref()?;
        let default = |d: DefaultPolicy| Decision {
            allowed: d.allows(peer.is_some()),
            by: DecidedBy::Default(d),
        };
        Some(match t.by_ip.get(&dst.ip()).map(|e| &**e) {
            Some(Entry {
                grants: Some(g), ..
            }) => match g.find(peer, dst.port()) {
                Some(label) => Decision {
                    allowed: true,
                    by: DecidedBy::Policy(label.clone()),
                },
                None => Decision {
                    allowed: false,
                    by: DecidedBy::NoMatchingRule,
                },
            },
            Some(e) => default(e.default),
            None => default(
                own_namespace
                    .and_then(|ns| t.namespaces.get(ns))
                    .copied()
                    .unwrap_or(t.default),
            ),
        })
    }

    /// The bounded `client` label for `peer`.
    pub fn client_label(&self, peer: Option<&Arc<str>>) -> SharedString {
        match (peer, &self.inner) {
            (None, _) => SharedString::const_str("none"),
            (Some(p), Some(t)) if t.named.contains(p) => SharedString::from(p.clone()),
            (Some(_), _) => SharedString::const_str("other"),
        }
    }
}

// === impl Grants ===

impl Grants {
    fn new(ids: &[String], policies: &HashMap<String, (SharedString, &[Rule])>) -> Self {
        let mut g = Self::default();
        let mut ids: Vec<&String> = ids.iter().collect();
        ids.sort();
        for (order, id) in ids.into_iter().enumerate() {
            let Some((label, rules)) = policies.get(id) else {
                continue;
            };
            for r in rules.iter() {
                let grant = Grant {
                    order,
                    label: label.clone(),
                    ports: r.ports.clone(),
                };
                // An empty list of sources matches nobody: nothing to index.
                let Some(sources) = &r.sources else {
                    g.any.push(grant);
                    continue;
                };
                for src in sources {
                    let (map, key) = match src {
                        Source::Spiffe(id) => (&mut g.spiffe, id.clone()),
                        Source::ServiceAccount { namespace, name } if name == "*" => {
                            (&mut g.namespace, namespace.clone())
                        }
                        Source::ServiceAccount { namespace, name } => {
                            (&mut g.service_account, format!("ns/{namespace}/sa/{name}"))
                        }
                    };
                    map.entry(key).or_default().push(grant.clone());
                }
            }
        }
        g
    }

    /// The label of the first policy with a rule matching `peer` on `port`.
    fn find(&self, peer: Option<&str>, port: u16) -> Option<&SharedString> {
        fn best(gs: Option<&Vec<Grant>>, port: u16) -> Option<&Grant> {
            gs.into_iter()
                .flatten()
                .filter(|g| g.ports.is_empty() || g.ports.contains(&port))
                .min_by_key(|g| g.order)
        }
        let mut found = best(Some(&self.any), port);
        if let Some(peer) = peer {
            // spiffe://<td>/ns/<ns>/sa/<sa>: the trust domain was checked by the TLS
            // verifier against the mesh's trust anchor.
            let path = peer
                .strip_prefix("spiffe://")
                .and_then(|r| r.split_once('/'))
                .map(|(_, p)| p);
            let ns = path
                .and_then(|p| p.strip_prefix("ns/"))
                .and_then(|p| p.split_once("/sa/"))
                .filter(|(_, sa)| !sa.is_empty() && !sa.contains('/'))
                .map(|(ns, _)| ns);
            for gs in [
                self.spiffe.get(peer),
                path.filter(|_| ns.is_some())
                    .and_then(|p| self.service_account.get(p)),
                ns.and_then(|ns| self.namespace.get(ns)),
            ] {
                if let Some(g) = best(gs, port) {
                    if found.is_none_or(|f| g.order < f.order) {
                        found = Some(g);
                    }
                }
            }
        }
        found.map(|g| &g.label)
    }
}

// === impl Decision ===

impl Decision {
    /// The `policy` label.
    pub fn policy_label(&self) -> SharedString {
        match &self.by {
            DecidedBy::Policy(p) => p.clone(),
            DecidedBy::NoMatchingRule => SharedString::const_str(NO_POLICY),
            DecidedBy::Default(d) => SharedString::const_str(match d {
                DefaultPolicy::AllAllowed => "default:all-allowed",
                DefaultPolicy::MeshOnly => "default:mesh-only",
                DefaultPolicy::Deny => "default:deny",
            }),
        }
    }

    /// Why a caller was refused, in words that name the decision but not the rules.
    pub fn reason(&self) -> &'static str {
        match &self.by {
            DecidedBy::Policy(_) => "allowed by an AuthorizationPolicy",
            DecidedBy::NoMatchingRule => {
                "no AuthorizationPolicy targeting this workload allows this caller on this port"
            }
            DecidedBy::Default(DefaultPolicy::MeshOnly) => {
                "the default inbound policy mesh-only refuses callers without a mesh identity"
            }
            DecidedBy::Default(DefaultPolicy::Deny) => {
                "the default inbound policy deny refuses callers no policy allows"
            }
            DecidedBy::Default(DefaultPolicy::AllAllowed) => {
                "allowed by the default inbound policy"
            }
        }
    }
}

// === impl Authz ===

impl Authz {
    /// Decides against the config in force in `mesh`, counting into `metrics`.
    pub fn new(mesh: Arc<Mesh>, metrics: Arc<Metrics>, own_namespace: Option<String>) -> Self {
        Self {
            mesh,
            metrics,
            own_namespace: own_namespace.map(Arc::from),
        }
    }

    /// Decides for one caller now, counts the decision and logs a denial; `None`
    /// when the config enforces nothing.
    pub fn check(&self, dst: SocketAddr, peer: Option<&Arc<str>>) -> Option<Decision> {
        self.check_cached(dst, peer, None)
    }

    /// [`Authz::check`], reusing the counter of the previous decision in `cache`
    /// when the labels are the same (a connection's requests mostly are), so a
    /// request costs no registry look-up.
    fn check_cached(
        &self,
        dst: SocketAddr,
        peer: Option<&Arc<str>>,
        cache: Option<&Mutex<Option<Counted>>>,
    ) -> Option<Decision> {
        let snap = self.mesh.load();
        let d = snap
            .authz
            .decide(dst, peer.map(|p| &**p), self.own_namespace.as_deref())?;
        let client = snap.authz.client_label(peer);
        let policy = d.policy_label();
        if !d.allowed {
            tracing::debug!(
                %dst,
                client = peer.map_or("none", |p| &**p),
                policy = &*policy,
                reason = d.reason(),
                "authorization denied"
            );
        }
        let same = |c: &Counted| c.allowed == d.allowed && c.policy == policy && c.client == client;
        let mut slot = cache.and_then(|m| m.lock().ok());
        match slot.as_deref_mut() {
            Some(Some(c)) if same(c) => c.counter.increment(1),
            other => {
                let counter = self.metrics.counter(
                    DECISIONS,
                    vec![
                        Label::new("policy", policy.clone()),
                        Label::from_static_parts(
                            "result",
                            if d.allowed { "allow" } else { "deny" },
                        ),
                        Label::new("client", client.clone()),
                    ],
                );
                counter.increment(1);
                if let Some(o) = other {
                    *o = Some(Counted {
                        policy,
                        allowed: d.allowed,
                        client,
                        counter,
                    });
                }
            }
        }
        Some(d)
    }
}

/// The counter of one set of decision labels.
struct Counted {
    policy: SharedString,
    allowed: bool,
    client: SharedString,
    counter: metrics::Counter,
}

/// The synthetic answer to a denied request: gRPC `PERMISSION_DENIED` (7) for a gRPC
/// request, else 403 with a plain-text body.
pub fn denied_response<B>(req: &Request<B>, d: &Decision) -> Response<Full<Bytes>> {
    let grpc = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| ct.starts_with("application/grpc"));
    let decision = HeaderValue::from_static("denied");
    if grpc {
        let mut rsp = Response::new(Full::new(Bytes::new()));
        let h = rsp.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/grpc"),
        );
        h.insert("grpc-status", HeaderValue::from_static("7"));
        h.insert("grpc-message", HeaderValue::from_static(d.reason()));
        h.insert(DECISION_HEADER, decision);
        return rsp;
    }
    let body = format!("meshlet: authorization denied: {}\n", d.reason());
    let mut rsp = Response::new(Full::new(Bytes::from(body)));
    *rsp.status_mut() = StatusCode::FORBIDDEN;
    let h = rsp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    h.insert(DECISION_HEADER, decision);
    rsp
}

// === AuthzHttp ===

/// Per-request authorization in front of an inbound connection's HTTP service.
#[derive(Clone)]
pub struct AuthzHttp<S> {
    inner: S,
    conn: Option<Arc<Conn>>,
}

/// What every request of one connection shares.
struct Conn {
    authz: Authz,
    dst: SocketAddr,
    peer: Option<Arc<str>>,
    last: Mutex<Option<Counted>>,
}

impl<S> AuthzHttp<S> {
    /// Checks each request of an inbound connection to `dst` from `peer`; without
    /// `authz` (outbound, or no authorization configured) it only passes requests on.
    pub fn new(inner: S, authz: Option<Authz>, dst: SocketAddr, peer: Option<Arc<str>>) -> Self {
        Self {
            inner,
            conn: authz.map(|authz| {
                Arc::new(Conn {
                    authz,
                    dst,
                    peer,
                    last: Mutex::new(None),
                })
            }),
        }
    }
}

impl<S, B> tower::Service<Request<B>> for AuthzHttp<S>
where
    S: tower::Service<Request<B>, Response = Response<Body>, Error = ProxyError>,
{
    type Response = Response<Body>;
    type Error = ProxyError;
    type Future = FutEither<S::Future, future::Ready<Result<Response<Body>, ProxyError>>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), ProxyError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        if let Some(c) = &self.conn {
            if let Some(d) = c.authz.check_cached(c.dst, c.peer.as_ref(), Some(&c.last)) {
                if !d.allowed {
                    let rsp = denied_response(&req, &d).map(Either::Right);
                    return FutEither::Right(future::ready(Ok(rsp)));
                }
            }
        }
        FutEither::Left(self.inner.call(req))
    }
}

// === AuthzTcp ===

/// Per-connection authorization in front of the opaque TCP service: an inbound
/// connection that is denied is closed without reaching the app.
#[derive(Clone)]
pub struct AuthzTcp<T> {
    inner: T,
    authz: Authz,
}

impl<T> AuthzTcp<T> {
    /// Checks inbound connections before `inner` forwards them.
    pub fn new(inner: T, authz: Authz) -> Self {
        Self { inner, authz }
    }
}

impl<T, I> tower::Service<(Target, I)> for AuthzTcp<T>
where
    T: tower::Service<(Target, I), Response = (), Error = BoxError> + Clone + Send + 'static,
    T::Future: Send + 'static,
    I: Send + 'static,
{
    type Response = ();
    type Error = BoxError;
    type Future = BoxFuture<Result<(), BoxError>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        // Each connection drives a clone of the inner service to readiness itself.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, (target, io): (Target, I)) -> Self::Future {
        if target.direction == Direction::Inbound {
            let d = self.authz.check(target.dst, target.tls.peer());
            if d.is_some_and(|d| !d.allowed) {
                // Dropping the stream closes it: the client sees the handshake
                // succeed, then EOF.
                drop(io);
                return Box::pin(async { Ok(()) });
            }
        }
        Box::pin(self.inner.clone().oneshot((target, io)))
    }
}

#[cfg(test)]
mod tests;
