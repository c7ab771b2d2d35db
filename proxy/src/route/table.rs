//! A Service's routes resolved against one mesh config: each backendRef becomes the
//! backend Service's ClusterIP:port (of the destination's IP family), its identities and
//! its retry budget, and each rule's timeouts and retry settings become a
//! [`RulePolicy`]. Built on the first request to a ClusterIP:port of a config load, so
//! a request pays only for the decision and a few index lookups, and a proxy only for the
//! Services it calls.

use std::{collections::HashMap, net::SocketAddr, sync::Arc, time::Duration};

use meshlet_api::{config::Service, route::RouteError, MeshConfig, SpiffeId};
use metrics::SharedString;

use super::{Decision, Routes};
use crate::retry_budget::RetryBudget;

/// Retries after the first attempt when a rule's `retry.attempts` is unset (Envoy's
/// default; the Gateway API leaves it to the implementation).
pub const DEFAULT_RETRIES: u32 = 1;
/// Wait before a retry when `retry.backoff` is unset (Envoy's base interval).
pub const DEFAULT_BACKOFF: Duration = Duration::from_millis(25);

/// The routes of one ClusterIP:port, resolved.
#[derive(Debug)]
pub struct RouteTable {
    routes: Routes,
    /// Per route: `namespace/name`, the `route` label.
    labels: Vec<SharedString>,
    /// Per route, per rule.
    policies: Vec<Vec<Arc<RulePolicy>>>,
    /// Per route, per rule, per backendRef; `None` when the ref names no Service port
    /// of the config (an invalid backend: 500).
    backends: Vec<Vec<Vec<Option<Arc<Backend>>>>>,
}

/// What a rule asks of the requests it selects, beyond where they go.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct RulePolicy {
    /// `timeouts.request`: the whole exchange including retries.
    pub request_timeout: Option<Duration>,
    /// `timeouts.backendRequest`: each attempt.
    pub backend_timeout: Option<Duration>,
    /// `retry`, when the rule has one.
    pub retry: Option<RetryPolicy>,
}

/// A rule's `retry`, with defaults filled in.
#[derive(Debug, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Response codes that are retried.
    pub codes: Vec<u16>,
    /// Retries after the first attempt.
    pub retries: u32,
    /// Wait before each retry.
    pub backoff: Duration,
}

/// A resolved backendRef.
#[derive(Debug)]
pub struct Backend {
    /// The backend Service's ClusterIP and port.
    pub addr: SocketAddr,
    /// `namespace/name` of the backend Service.
    pub service: SharedString,
    /// The identities its pods present, when it is meshed.
    pub identities: Option<Arc<[SpiffeId]>>,
    /// Its retry budget.
    pub budget: Arc<RetryBudget>,
}

/// Retry budgets by Service (`namespace/name`), carried from one snapshot to the next.
pub type Budgets = HashMap<SharedString, Arc<RetryBudget>>;

// === impl RouteTable ===

impl RouteTable {
    /// Resolves the routes of `config.services[index]` for its address `dst`. Budgets
    /// come from `budgets` (shared by every table of the snapshot), created on first use
    /// or reused from `prev` when the Service's settings did not change.
    pub fn new(
        config: &Arc<MeshConfig>,
        index: usize,
        dst: SocketAddr,
        budgets: &mut Budgets,
        prev: Option<&Budgets>,
    ) -> Result<Self, RouteError> {
        let svc = &config.services[index];
        let routes = Routes::of_service(config.clone(), index)?;
        let mut labels = Vec::with_capacity(svc.routes.len());
        let mut policies = Vec::with_capacity(svc.routes.len());
        let mut backends = Vec::with_capacity(svc.routes.len());
        for r in &svc.routes {
            labels.push(SharedString::from(Arc::<str>::from(r.id())));
            policies.push(
                r.rules
                    .iter()
                    .map(|rule| Arc::new(RulePolicy::of(rule)))
                    .collect(),
            );
            backends.push(
                r.rules
                    .iter()
                    .map(|rule| {
                        rule.backend_refs
                            .iter()
                            .map(|b| {
                                resolve(config, &b.namespace, &b.name, b.port, dst, budgets, prev)
                            })
                            .collect()
                    })
                    .collect(),
            );
        }
        Ok(Self {
            routes,
            labels,
            policies,
            backends,
        })
    }

    /// The compiled routes.
    pub fn routes(&self) -> &Routes {
        &self.routes
    }

    /// The `route` label of a decision.
    pub fn label(&self, d: &Decision<'_>) -> &SharedString {
        &self.labels[d.route_index]
    }

    /// The policy of a decision's rule.
    pub fn policy(&self, d: &Decision<'_>) -> &Arc<RulePolicy> {
        &self.policies[d.route_index][d.rule_index]
    }

    /// The resolved backend a forwarding decision chose; `None` for an invalid ref.
    pub fn backend(
        &self,
        d: &Decision<'_>,
        chosen: &meshlet_api::route::BackendRef,
    ) -> Option<&Arc<Backend>> {
        let i = d
            .rule
            .backend_refs
            .iter()
            .position(|b| std::ptr::eq(b, chosen))?;
        self.backends[d.route_index][d.rule_index][i].as_ref()
    }
}

/// The Service `namespace/name` port `port` at a ClusterIP of `dst`'s family.
fn resolve(
    config: &MeshConfig,
    namespace: &str,
    name: &str,
    port: u16,
    dst: SocketAddr,
    budgets: &mut Budgets,
    prev: Option<&Budgets>,
) -> Option<Arc<Backend>> {
    let svc: &Service = config
        .services
        .iter()
        .find(|s| s.name == name && s.namespace == namespace)?;
    if !svc.ports.iter().any(|p| p.port == port) {
        return None;
    }
    let ip = svc
        .cluster_ips
        .iter()
        .find(|ip| ip.is_ipv4() == dst.is_ipv4())?;
    let label = SharedString::from(Arc::<str>::from(format!("{namespace}/{name}")));
    let budget = budgets
        .entry(label.clone())
        .or_insert_with(|| {
            let wanted = svc.retry_constraint.clone().unwrap_or_default();
            prev.and_then(|p| p.get(&label))
                .filter(|b| *b.constraint() == wanted)
                .cloned()
                .unwrap_or_else(|| Arc::new(RetryBudget::new(Some(&wanted))))
        })
        .clone();
    Some(Arc::new(Backend {
        addr: SocketAddr::new(*ip, port),
        service: label,
        identities: svc.meshed.then(|| svc.identities.as_slice().into()),
        budget,
    }))
}

// === impl RulePolicy ===

impl RulePolicy {
    fn of(rule: &meshlet_api::route::RouteRule) -> Self {
        // Zero means "no timeout" in the Gateway API.
        let nonzero =
            |d: Option<meshlet_api::Duration>| d.filter(|d| !d.is_zero()).map(|d| d.as_std());
        let t = rule.timeouts.as_ref();
        Self {
            request_timeout: nonzero(t.and_then(|t| t.request)),
            backend_timeout: nonzero(t.and_then(|t| t.backend_request)),
            retry: rule.retry.as_ref().map(|r| RetryPolicy {
                codes: r.codes.clone(),
                retries: r.attempts.unwrap_or(DEFAULT_RETRIES),
                backoff: r.backoff.map_or(DEFAULT_BACKOFF, |d| d.as_std()),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::route::{Action, RequestInfo};
    use http::{HeaderMap, Method, Uri};

    const DOC: &str = r#"{"services": [
        {"name": "web", "namespace": "shop", "clusterIPs": ["198.19.0.10", "fd00:6d65:7368::10"],
         "ports": [{"port": 80}],
         "routes": [{"name": "split", "namespace": "shop", "rules": [
            {"matches": [{"path": {"type": "PathPrefix", "value": "/bad"}}],
             "backendRefs": [{"name": "nope", "namespace": "shop", "port": 80}]},
            {"backendRefs": [{"name": "web-v2", "namespace": "shop", "port": 8080}],
             "timeouts": {"request": "0s", "backendRequest": "2s"},
             "retry": {"codes": [503]}}]}]},
        {"name": "web-v2", "namespace": "shop", "clusterIPs": ["198.19.0.12", "fd00:6d65:7368::12"],
         "ports": [{"port": 8080}], "meshed": true,
         "identities": ["spiffe://cluster.local/ns/shop/sa/web"],
         "retryConstraint": {"budget": {"percent": 30}}}]}"#;

    fn decide<'a>(t: &'a RouteTable, path: &'static str) -> Decision<'a> {
        let uri = Uri::from_static(path);
        let headers = HeaderMap::new();
        let req = RequestInfo {
            method: &Method::GET,
            uri: &uri,
            headers: &headers,
            port: 80,
            client_namespace: None,
        };
        t.routes().decide(&req, 0).expect("a rule matches")
    }

    #[test]
    fn resolves_backends_per_family_and_policies() {
        let cfg = Arc::new(MeshConfig::from_json(DOC.as_bytes()).unwrap());
        let mut budgets = Budgets::new();
        let v4 = RouteTable::new(
            &cfg,
            0,
            "198.19.0.10:80".parse().unwrap(),
            &mut budgets,
            None,
        )
        .unwrap();
        let v6 = RouteTable::new(
            &cfg,
            0,
            "[fd00:6d65:7368::10]:80".parse().unwrap(),
            &mut budgets,
            None,
        )
        .unwrap();
        let d = decide(&v4, "/x");
        assert_eq!(&**v4.label(&d), "shop/split");
        let Action::Forward(f) = &d.action else {
            panic!("{:?}", d.action)
        };
        let b = v4.backend(&d, f.backend).expect("resolved");
        assert_eq!(b.addr, "198.19.0.12:8080".parse().unwrap());
        assert_eq!(&*b.service, "shop/web-v2");
        assert_eq!(b.identities.as_deref().map(<[_]>::len), Some(1));
        assert_eq!(b.budget.constraint().budget.percent, 30);
        let p = v4.policy(&d);
        assert_eq!(p.request_timeout, None, "0s is no timeout");
        assert_eq!(p.backend_timeout, Some(Duration::from_secs(2)));
        assert_eq!(
            p.retry,
            Some(RetryPolicy {
                codes: vec![503],
                retries: DEFAULT_RETRIES,
                backoff: DEFAULT_BACKOFF
            })
        );

        let d6 = decide(&v6, "/x");
        let Action::Forward(f6) = &d6.action else {
            panic!()
        };
        let b6 = v6.backend(&d6, f6.backend).unwrap();
        assert_eq!(b6.addr, "[fd00:6d65:7368::12]:8080".parse().unwrap());
        assert!(Arc::ptr_eq(&b.budget, &b6.budget), "one budget per Service");

        let bad = decide(&v4, "/bad/1");
        let Action::Forward(fb) = &bad.action else {
            panic!()
        };
        assert!(v4.backend(&bad, fb.backend).is_none(), "unknown Service");
    }

    #[test]
    fn budgets_survive_reloads_unless_changed() {
        let cfg = Arc::new(MeshConfig::from_json(DOC.as_bytes()).unwrap());
        let dst = "198.19.0.10:80".parse().unwrap();
        let mut first = Budgets::new();
        RouteTable::new(&cfg, 0, dst, &mut first, None).unwrap();
        let mut second = Budgets::new();
        RouteTable::new(&cfg, 0, dst, &mut second, Some(&first)).unwrap();
        let key = SharedString::const_str("shop/web-v2");
        assert!(Arc::ptr_eq(&first[&key], &second[&key]));

        let changed = Arc::new(MeshConfig::from_json(DOC.replace("30", "40").as_bytes()).unwrap());
        let mut third = Budgets::new();
        RouteTable::new(&changed, 0, dst, &mut third, Some(&second)).unwrap();
        assert!(!Arc::ptr_eq(&second[&key], &third[&key]));
        assert_eq!(third[&key].constraint().budget.percent, 40);
    }
}
