//! `metrics.k8s.io/v1beta1` served by the node, so `kubectl top pod --containers`
//! works: every second each container process is sampled from /proc (utime+stime,
//! VmRSS); CPU is the rate over the last 10 s. An HTTPS server on the node address
//! (inside the node namespace) answers the aggregation layer, which reaches it
//! through the egress socket; an APIService `v1beta1.metrics.k8s.io`, a Service
//! without selector and an EndpointSlice naming the node address register it. The
//! same server on the kubelet port answers `/containerLogs` (`kubectl logs`) and
//! `/exec` (`kubectl exec`, see [`super::exec`]).
//!
//! Requests are not authenticated here: only the API server can reach the node
//! namespace (through the egress socket), and it has authorized the user already.
//! The APIService skips TLS verification of this test-only, self-signed endpoint.

use std::{
    collections::{BTreeMap, HashMap, VecDeque},
    convert::Infallible,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{body::Incoming, Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use k8s_openapi::{
    api::{core::v1::Service, discovery::v1::EndpointSlice},
    kube_aggregator::pkg::apis::apiregistration::v1::APIService,
};
use kube::api::{Api, DeleteParams, Patch, PatchParams};
use serde_json::{json, Value};

use super::{api::now, lock, prep::Kind, Agent, Error};
use crate::cluster::top::{self, Sample};

/// Namespace and name of the Service behind the APIService.
pub const SERVICE: (&str, &str) = ("kube-system", "meshlet-node-metrics");
/// Name of the APIService.
pub const API_SERVICE: &str = "v1beta1.metrics.k8s.io";
const WINDOW: Duration = Duration::from_secs(10);

/// One container's samples.
type History = VecDeque<(Instant, Sample)>;

#[derive(Default)]
struct Samples {
    /// (pod uid, container) -> samples within the window.
    by_container: HashMap<(String, String), History>,
    /// Machine-wide (busy ticks, total ticks) from /proc/stat.
    node: VecDeque<(Instant, u64, u64)>,
}

fn node_cpu() -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let f: Vec<u64> = stat
        .lines()
        .next()?
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    let total: u64 = f.iter().take(8).sum();
    let idle = f.get(3)? + f.get(4).unwrap_or(&0);
    Some((total - idle, total))
}

fn sample_all(agent: &Agent, samples: &Mutex<Samples>) {
    let pods: Vec<_> = lock(&agent.pods).values().cloned().collect();
    let t = Instant::now();
    let mut live = Vec::new();
    let mut taken = Vec::new();
    for p in pods {
        let st = lock(&p.state);
        for c in st.containers.iter().filter(|c| c.kind != Kind::Init) {
            if let Some(s) = c.pid.and_then(top::sample) {
                let key = (p.uid.clone(), c.name.clone());
                live.push(key.clone());
                taken.push((key, s));
            }
        }
    }
    let mut g = lock(samples);
    for (key, s) in taken {
        let h = g.by_container.entry(key).or_default();
        // A restarted container starts a new history (its CPU counter restarted).
        if h.back()
            .is_some_and(|(_, last)| s.cpu_ticks < last.cpu_ticks)
        {
            h.clear();
        }
        h.push_back((t, s));
        while h.len() > 2 && h.front().is_some_and(|(at, _)| t - *at > WINDOW) {
            h.pop_front();
        }
    }
    g.by_container.retain(|k, _| live.contains(k));
    if let Some((busy, total)) = node_cpu() {
        g.node.push_back((t, busy, total));
        while g.node.len() > 2 && g.node.front().is_some_and(|(at, ..)| t - *at > WINDOW) {
            g.node.pop_front();
        }
    }
}

/// CPU in nanocores and memory in bytes over a history, with its window.
fn usage(h: &History) -> Option<(u64, u64, Duration)> {
    let (t0, first) = h.front()?;
    let (t1, last) = h.back()?;
    if h.len() < 2 {
        return None;
    }
    let secs = (*t1 - *t0).as_secs_f64();
    let ticks = last.cpu_ticks.saturating_sub(first.cpu_ticks) as f64;
    let nanocores = (ticks / top::clock_ticks() as f64 / secs * 1e9).round() as u64;
    Some((nanocores, last.rss_bytes, *t1 - *t0))
}

struct Server {
    agent: Agent,
    samples: Arc<Mutex<Samples>>,
}

fn json_response(status: StatusCode, v: &Value) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(v.to_string())));
    *r.status_mut() = status;
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    r
}

fn not_found(what: &str) -> Response<Full<Bytes>> {
    json_response(
        StatusCode::NOT_FOUND,
        &json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
                "reason": "NotFound", "code": 404, "message": format!("{what} not found")}),
    )
}

/// Whether `labels` match a selector of `k=v`, `k==v`, `k!=v` terms.
pub fn selects(selector: &str, labels: &BTreeMap<String, String>) -> bool {
    selector.split(',').filter(|t| !t.is_empty()).all(|term| {
        if let Some((k, v)) = term.split_once("!=") {
            labels.get(k.trim()).map(String::as_str) != Some(v.trim())
        } else if let Some((k, v)) = term.split_once('=') {
            let v = v.trim_start_matches('=');
            labels.get(k.trim()).map(String::as_str) == Some(v.trim())
        } else {
            labels.contains_key(term.trim())
        }
    })
}

fn query_param(q: Option<&str>, key: &str) -> Option<String> {
    q?.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=')?;
        (k == key).then(|| {
            // Selectors only need %2C, %3D and %21 decoded.
            v.replace("%2C", ",")
                .replace("%2c", ",")
                .replace("%3D", "=")
                .replace("%3d", "=")
                .replace("%21", "!")
        })
    })
}

impl Server {
    fn pod_metrics(
        &self,
        ns: Option<&str>,
        name: Option<&str>,
        selector: Option<&str>,
    ) -> Vec<Value> {
        let pods: Vec<_> = lock(&self.agent.pods).values().cloned().collect();
        let samples = lock(&self.samples);
        let mut items = Vec::new();
        for p in pods {
            if ns.is_some_and(|n| n != p.namespace) || name.is_some_and(|n| n != p.name) {
                continue;
            }
            let st = lock(&p.state);
            let labels = st.pod.metadata.labels.clone().unwrap_or_default();
            if selector.is_some_and(|s| !selects(s, &labels)) {
                continue;
            }
            let mut containers = Vec::new();
            let mut window = Duration::ZERO;
            let mut complete = true;
            for c in st.containers.iter().filter(|c| c.kind != Kind::Init) {
                match samples
                    .by_container
                    .get(&(p.uid.clone(), c.name.clone()))
                    .and_then(usage)
                {
                    Some((cpu, mem, w)) => {
                        window = window.max(w);
                        containers.push(json!({"name": c.name, "usage": {
                            "cpu": format!("{cpu}n"), "memory": format!("{}Ki", mem / 1024)}}));
                    }
                    None if c.pid.is_some() => complete = false,
                    None => {}
                }
            }
            // Like metrics-server: a pod shows up once every running container has
            // a measured window, never half of it.
            if containers.is_empty() || !complete {
                continue;
            }
            items.push(json!({
                "metadata": {"name": p.name, "namespace": p.namespace, "labels": labels,
                             "creationTimestamp": now()},
                "timestamp": now(),
                "window": format!("{}s", window.as_secs().max(1)),
                "containers": containers,
            }));
        }
        items.sort_by_key(|v| {
            (
                v["metadata"]["namespace"].to_string(),
                v["metadata"]["name"].to_string(),
            )
        });
        items
    }

    fn node_metrics(&self) -> Value {
        let s = lock(&self.samples);
        let cpu = match (s.node.front(), s.node.back()) {
            (Some((t0, b0, _)), Some((t1, b1, _))) if t1 > t0 => {
                let secs = (*t1 - *t0).as_secs_f64();
                ((b1 - b0) as f64 / top::clock_ticks() as f64 / secs * 1e9) as u64
            }
            _ => 0,
        };
        let mem_used_ki = std::fs::read_to_string("/proc/meminfo")
            .ok()
            .map(|m| {
                let get = |k: &str| -> u64 {
                    m.lines()
                        .find(|l| l.starts_with(k))
                        .and_then(|l| l.split_whitespace().nth(1))
                        .and_then(|v| v.parse().ok())
                        .unwrap_or(0)
                };
                get("MemTotal:").saturating_sub(get("MemAvailable:"))
            })
            .unwrap_or(0);
        json!({
            "metadata": {"name": self.agent.cfg.name, "creationTimestamp": now()},
            "timestamp": now(), "window": "10s",
            "usage": {"cpu": format!("{cpu}n"), "memory": format!("{mem_used_ki}Ki")},
        })
    }

    fn logs(&self, ns: &str, pod: &str, container: &str) -> Response<Full<Bytes>> {
        let uid = lock(&self.agent.pods)
            .values()
            .find(|p| p.namespace == ns && p.name == pod)
            .map(|p| p.uid.clone());
        let Some(uid) = uid else {
            return not_found(&format!("pod {ns}/{pod}"));
        };
        let path = self
            .agent
            .cfg
            .state_dir
            .join("pods")
            .join(format!("{ns}_{pod}_{uid}"))
            .join("logs")
            .join(format!("{container}.log"));
        match std::fs::read(&path) {
            Ok(mut b) => {
                // The last MiB is plenty for tests and bounds the response.
                if b.len() > 1 << 20 {
                    b.drain(..b.len() - (1 << 20));
                }
                Response::new(Full::new(Bytes::from(b)))
            }
            Err(_) => not_found(&format!("container {container} of pod {ns}/{pod}")),
        }
    }

    fn handle(&self, req: &Request<Incoming>) -> Response<Full<Bytes>> {
        let path = req.uri().path().trim_end_matches('/');
        let selector = query_param(req.uri().query(), "labelSelector");
        let sel = selector.as_deref();
        let parts: Vec<&str> = path.split('/').filter(|p| !p.is_empty()).collect();
        const GV: &str = "metrics.k8s.io/v1beta1";
        let list = |kind: &str, items: Vec<Value>| {
            json_response(
                StatusCode::OK,
                &json!({"kind": kind, "apiVersion": GV, "metadata": {}, "items": items}),
            )
        };
        match parts.as_slice() {
            ["healthz"] | ["livez"] | ["readyz"] => Response::new(Full::new(Bytes::from("ok"))),
            ["apis", "metrics.k8s.io", "v1beta1"] => json_response(
                StatusCode::OK,
                &json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": GV,
                "resources": [
                    {"name": "nodes", "singularName": "", "namespaced": false,
                     "kind": "NodeMetrics", "verbs": ["get", "list"]},
                    {"name": "pods", "singularName": "", "namespaced": true,
                     "kind": "PodMetrics", "verbs": ["get", "list"]},
                ]}),
            ),
            ["apis", "metrics.k8s.io", "v1beta1", "pods"] => {
                list("PodMetricsList", self.pod_metrics(None, None, sel))
            }
            ["apis", "metrics.k8s.io", "v1beta1", "namespaces", ns, "pods"] => {
                list("PodMetricsList", self.pod_metrics(Some(ns), None, sel))
            }
            ["apis", "metrics.k8s.io", "v1beta1", "namespaces", ns, "pods", name] => {
                match self.pod_metrics(Some(ns), Some(name), None).pop() {
                    Some(mut v) => {
                        v["kind"] = json!("PodMetrics");
                        v["apiVersion"] = json!(GV);
                        json_response(StatusCode::OK, &v)
                    }
                    None => not_found(&format!("podmetrics {ns}/{name}")),
                }
            }
            ["apis", "metrics.k8s.io", "v1beta1", "nodes"] => {
                list("NodeMetricsList", vec![self.node_metrics()])
            }
            ["apis", "metrics.k8s.io", "v1beta1", "nodes", name]
                if *name == self.agent.cfg.name =>
            {
                let mut v = self.node_metrics();
                v["kind"] = json!("NodeMetrics");
                v["apiVersion"] = json!(GV);
                json_response(StatusCode::OK, &v)
            }
            ["containerLogs", ns, pod, container] => self.logs(ns, pod, container),
            _ => not_found(path),
        }
    }
}

fn tls_config(agent: &Agent) -> Result<Arc<rustls::ServerConfig>, Error> {
    let names = vec![
        format!("{}.{}.svc", SERVICE.1, SERVICE.0),
        agent.net.node_ip().to_string(),
        agent.cfg.name.clone(),
    ];
    let ck = rcgen::generate_simple_self_signed(names)
        .map_err(|e| Error::Other(format!("making the metrics certificate: {e}")))?;
    let cert = ck.cert.der().clone();
    let key = rustls::pki_types::PrivateKeyDer::Pkcs8(ck.signing_key.serialize_der().into());
    let mut cfg = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| Error::Other(format!("TLS config: {e}")))?
    .with_no_client_auth()
    .with_single_cert(vec![cert], key)
    .map_err(|e| Error::Other(format!("TLS config: {e}")))?;
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}

async fn serve(
    server: Arc<Server>,
    tls: Arc<rustls::ServerConfig>,
    addr: SocketAddr,
) -> Result<(), Error> {
    let std_l = server.agent.net.listen(addr)?;
    std_l
        .set_nonblocking(true)
        .map_err(|e| Error::Other(format!("listener {addr}: {e}")))?;
    let l = tokio::net::TcpListener::from_std(std_l)
        .map_err(|e| Error::Other(format!("listener {addr}: {e}")))?;
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    loop {
        let Ok((tcp, _)) = l.accept().await else {
            continue;
        };
        let acceptor = acceptor.clone();
        let server = server.clone();
        tokio::spawn(async move {
            let Ok(Ok(tls)) =
                tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp)).await
            else {
                return;
            };
            let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                let server = server.clone();
                async move {
                    // exec upgrades the connection, so it takes the request itself.
                    if req.uri().path().starts_with("/exec/") {
                        return Ok::<_, Infallible>(super::exec::serve(&server.agent, req));
                    }
                    Ok::<_, Infallible>(server.handle(&req))
                }
            });
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection_with_upgrades(TokioIo::new(tls), svc)
                .await;
        });
    }
}

/// Registers the APIService, its Service and EndpointSlice.
async fn register(agent: &Agent) -> Result<(), Error> {
    let pp = PatchParams::apply(super::api::MANAGER).force();
    let (ns, name) = SERVICE;
    let svc = json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name, "namespace": ns},
        "spec": {"ports": [{"name": "https", "port": 443, "targetPort": agent.cfg.metrics_port, "protocol": "TCP"}]},
    });
    Api::<Service>::namespaced(agent.client.clone(), ns)
        .patch(name, &pp, &Patch::Apply(&svc))
        .await?;
    let slice_name = format!("{name}-{}", agent.cfg.name);
    let slice = json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": slice_name, "namespace": ns, "labels": {
            "kubernetes.io/service-name": name,
            "endpointslice.kubernetes.io/managed-by": "meshlet-node",
        }},
        "addressType": "IPv4",
        "endpoints": [{"addresses": [agent.net.node_ip().to_string()],
                       "conditions": {"ready": true}, "nodeName": agent.cfg.name}],
        "ports": [{"name": "https", "port": agent.cfg.metrics_port, "protocol": "TCP"}],
    });
    Api::<EndpointSlice>::namespaced(agent.client.clone(), ns)
        .patch(&slice_name, &pp, &Patch::Apply(&slice))
        .await?;
    let apisvc = json!({
        "apiVersion": "apiregistration.k8s.io/v1", "kind": "APIService",
        "metadata": {"name": API_SERVICE},
        "spec": {
            "group": "metrics.k8s.io", "version": "v1beta1",
            "service": {"namespace": ns, "name": name, "port": 443},
            "insecureSkipTLSVerify": true,
            "groupPriorityMinimum": 100, "versionPriority": 100,
        },
    });
    Api::<APIService>::all(agent.client.clone())
        .patch(API_SERVICE, &pp, &Patch::Apply(&apisvc))
        .await?;
    Ok(())
}

/// Removes what [`register`] created (on shutdown, best effort).
pub async fn unregister(agent: &Agent) {
    let dp = DeleteParams::default();
    let (ns, name) = SERVICE;
    let _ = Api::<APIService>::all(agent.client.clone())
        .delete(API_SERVICE, &dp)
        .await;
    let _ = Api::<EndpointSlice>::namespaced(agent.client.clone(), ns)
        .delete(&format!("{name}-{}", agent.cfg.name), &dp)
        .await;
    let _ = Api::<Service>::namespaced(agent.client.clone(), ns)
        .delete(name, &dp)
        .await;
}

/// Samples, serves and registers the metrics API (and the kubelet's log endpoint).
pub async fn run(agent: Agent) -> Result<(), Error> {
    let samples = Arc::new(Mutex::new(Samples::default()));
    let server = Arc::new(Server {
        agent: agent.clone(),
        samples: samples.clone(),
    });
    let tls = tls_config(&agent)?;
    let ip = agent.net.node_ip();
    let mut tasks = tokio::task::JoinSet::new();
    tasks.spawn(serve(
        server.clone(),
        tls.clone(),
        SocketAddr::from((ip, agent.cfg.metrics_port)),
    ));
    tasks.spawn(serve(
        server,
        tls,
        SocketAddr::from((ip, agent.cfg.kubelet_port)),
    ));
    register(&agent).await?;
    tracing::info!(endpoint = %SocketAddr::from((ip, agent.cfg.metrics_port)), "metrics.k8s.io registered");
    let a = agent.clone();
    tasks.spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tick.tick().await;
            let (a, s) = (a.clone(), samples.clone());
            let _ = tokio::task::spawn_blocking(move || sample_all(&a, &s)).await;
        }
    });
    match tasks.join_next().await {
        Some(Ok(r)) => r,
        _ => Err(Error::Other("the metrics server stopped".into())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_selectors() {
        let l: BTreeMap<String, String> = [("app".to_string(), "backend".to_string())]
            .into_iter()
            .collect();
        assert!(selects("app=backend", &l));
        assert!(selects("app==backend", &l));
        assert!(!selects("app!=backend", &l));
        assert!(!selects("app=client", &l));
        assert!(selects("", &l));
        assert!(selects("app", &l));
        assert_eq!(
            query_param(
                Some("labelSelector=app%3Dbackend%2Cx%21%3Dy&limit=5"),
                "labelSelector"
            )
            .as_deref(),
            Some("app=backend,x!=y")
        );
    }

    #[test]
    fn cpu_rate_over_the_window() {
        let t0 = Instant::now();
        let mut h = History::new();
        h.push_back((
            t0,
            Sample {
                cpu_ticks: 0,
                rss_bytes: 1,
            },
        ));
        assert!(usage(&h).is_none());
        let ticks = top::clock_ticks();
        h.push_back((
            t0 + Duration::from_secs(2),
            Sample {
                cpu_ticks: ticks,
                rss_bytes: 4096,
            },
        ));
        let (cpu, mem, w) = usage(&h).unwrap();
        assert_eq!(cpu, 500_000_000);
        assert_eq!(mem, 4096);
        assert_eq!(w, Duration::from_secs(2));
    }
}
