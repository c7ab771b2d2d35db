//! Open-loop fixed-rate load on a mutating admission webhook over HTTPS, the way
//! kube-apiserver calls it: `POST` of an AdmissionReview v1 over TLS, every response
//! checked to be an allowed review of the same `uid` with a non-empty JSON Patch.
//!
//! Pacing and latency follow [`crate::loadgen`]: request *g* is due at `start + g / R`,
//! connection *k* sends requests *k*, *k+N*, ...; latency counts from the intended send
//! time (no coordinated omission), one OS thread with a current-thread runtime per
//! connection, `nanosleep` for the slots. Two connection modes:
//!
//! - keep-alive (what the API server does: its HTTP client pools connections to a
//!   webhook), connections set up before the timetable starts;
//! - a new TCP + TLS connection per review, full handshake every time: session
//!   resumption is off because the API server's Go client has no session cache.

use std::{
    fs,
    net::{SocketAddr, ToSocketAddrs},
    path::{Path, PathBuf},
    sync::{Arc, Barrier, OnceLock},
    thread,
    time::{Duration, Instant},
};

use base64::Engine as _;
use bytes::Bytes;
use http::{header, HeaderName, HeaderValue, Method, Request, Uri};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::rt::TokioIo;
use rustls::{
    client::Resumption,
    pki_types::{CertificateDer, ServerName},
    ClientConfig, RootCertStore,
};
use serde::Serialize;
use serde_json::Value;
use tokio::{net::TcpStream, runtime};
use tokio_rustls::TlsConnector;

use crate::{
    histogram::{Histogram, Summary},
    loadgen::ProcessReport,
    procstat,
    timetable::{self, Plan},
};

/// Stands in for `request.uid` in the serialized review until each request gets its own.
const UID_SLOT: &str = "meshlet-bench-uid-slot-7f3c9a";

/// One webhook load run.
#[derive(Clone, Debug)]
pub struct Config {
    /// `https://host:port/path` of the webhook.
    pub url: Uri,
    /// PEM file of the CA(s) that signed the webhook's serving certificate.
    pub ca_file: PathBuf,
    /// Name checked against the certificate; defaults to the URL's host.
    pub server_name: Option<String>,
    /// The AdmissionReview sent (its `request.uid` is replaced in every request).
    pub review: ReviewTemplate,
    /// Extra request headers.
    pub headers: Vec<(HeaderName, HeaderValue)>,
    /// Reviews per second, all connections together.
    pub rate: f64,
    /// Measured time.
    pub duration: Duration,
    /// Time before the measured window whose reviews are sent and checked, not timed.
    pub warmup: Duration,
    /// Concurrent connections.
    pub connections: usize,
    /// A new TCP + TLS connection for every review instead of keep-alive.
    pub new_connection_per_request: bool,
    /// Longest a review may take before it counts as an error.
    pub timeout: Duration,
    /// Processes whose RSS and CPU time are sampled over the measured window.
    pub watch: Vec<(String, u32)>,
}

/// Why a run could not start.
#[derive(Debug, thiserror::Error)]
pub enum WebhookError {
    /// The URL lacks what a request needs.
    #[error("bad URL {url}: {why} (write it like https://127.0.0.1:8443/mutate)")]
    Url {
        /// The URL given.
        url: String,
        /// What is wrong.
        why: String,
    },
    /// An option is out of range.
    #[error("{0}")]
    Option(String),
    /// The CA file is unreadable or holds no usable certificate.
    #[error("--cacert {path}: {why} (give the PEM CA that signed the webhook's certificate)")]
    Ca {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        why: String,
    },
    /// The review file is not an AdmissionReview.
    #[error("--body-file: {0} (give an AdmissionReview v1 as the API server sends it)")]
    Review(String),
    /// The runtime or a worker thread could not be created.
    #[error("cannot start a worker: {0}")]
    Worker(#[from] std::io::Error),
    /// A watched process could not be read at the start of the window.
    #[error(transparent)]
    Proc(#[from] procstat::ProcError),
}

// === impl ReviewTemplate ===

/// A serialized AdmissionReview with a hole where `request.uid` goes, so each request
/// carries its own uid (as every API server call does) at the cost of one copy.
#[derive(Clone, Debug)]
pub struct ReviewTemplate {
    head: Bytes,
    tail: Bytes,
}

impl ReviewTemplate {
    /// Parses an AdmissionReview v1 (JSON) whose `request` is an object.
    pub fn parse(json: &[u8]) -> Result<Self, WebhookError> {
        let bad = |why: String| WebhookError::Review(why);
        let mut v: Value =
            serde_json::from_slice(json).map_err(|e| bad(format!("not JSON: {e}")))?;
        if v["kind"] != "AdmissionReview" || v["apiVersion"] != "admission.k8s.io/v1" {
            return Err(bad(format!(
                "kind {} apiVersion {}, expected AdmissionReview admission.k8s.io/v1",
                v["kind"], v["apiVersion"]
            )));
        }
        let Some(req) = v.get_mut("request").and_then(Value::as_object_mut) else {
            return Err(bad("no request object".into()));
        };
        req.insert("uid".into(), Value::String(UID_SLOT.into()));
        // Compact, as the API server sends it.
        let s = serde_json::to_string(&v).map_err(|e| bad(e.to_string()))?;
        let (head, tail) = s
            .split_once(UID_SLOT)
            .ok_or_else(|| bad("request.uid could not be placed".into()))?;
        if tail.contains(UID_SLOT) {
            return Err(bad(format!("the review contains the string {UID_SLOT}")));
        }
        Ok(Self {
            head: Bytes::copy_from_slice(head.as_bytes()),
            tail: Bytes::copy_from_slice(tail.as_bytes()),
        })
    }

    /// Reads and parses a file.
    pub fn from_file(path: &Path) -> Result<Self, WebhookError> {
        let json = fs::read(path)
            .map_err(|e| WebhookError::Review(format!("cannot read {}: {e}", path.display())))?;
        Self::parse(&json)
    }

    /// The review with `uid` in place.
    pub fn render(&self, uid: &str) -> Bytes {
        let mut b = Vec::with_capacity(self.head.len() + uid.len() + self.tail.len());
        b.extend_from_slice(&self.head);
        b.extend_from_slice(uid.as_bytes());
        b.extend_from_slice(&self.tail);
        Bytes::from(b)
    }

    /// Size of a rendered review, bytes.
    pub fn len(&self) -> usize {
        self.head.len() + request_uid(0).len() + self.tail.len()
    }

    /// Never true: a review always has content.
    pub fn is_empty(&self) -> bool {
        false
    }
}

/// The uid of request number `seq` in a run: a UUID-shaped string, unique per request.
pub fn request_uid(seq: u64) -> String {
    format!("6d657368-6c65-4000-8000-{:012x}", seq & 0xffff_ffff_ffff)
}

/// What one webhook response said.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Allowed, same uid, `patchType: JSONPatch` and a non-empty patch: injected.
    Injected {
        /// Operations in the patch.
        ops: usize,
    },
    /// Anything else, with what was wrong.
    NotInjected(String),
}

/// Checks a response body against the uid of its request.
pub fn check_response(body: &[u8], uid: &str) -> Verdict {
    let no = Verdict::NotInjected;
    let v: Value = match serde_json::from_slice(body) {
        Ok(v) => v,
        Err(e) => return no(format!("response is not JSON: {e}")),
    };
    let r = &v["response"];
    if v["kind"] != "AdmissionReview" || r.is_null() {
        return no("response is not an AdmissionReview with a response".into());
    }
    if r["uid"] != uid {
        return no(format!("response uid {} for request uid {uid}", r["uid"]));
    }
    if r["allowed"] != true {
        return no(format!("not allowed: {}", r["status"]));
    }
    if r["patchType"] != "JSONPatch" {
        return no(format!(
            "allowed without a JSONPatch (patchType {})",
            r["patchType"]
        ));
    }
    let Some(b64) = r["patch"].as_str() else {
        return no("patchType JSONPatch but no patch".into());
    };
    let patch = match base64::engine::general_purpose::STANDARD.decode(b64) {
        Ok(p) => p,
        Err(e) => return no(format!("patch is not base64: {e}")),
    };
    match serde_json::from_slice::<Vec<Value>>(&patch) {
        Ok(ops) if ops.is_empty() => no("empty JSON Patch".into()),
        Ok(ops)
            if ops
                .iter()
                .all(|op| op["op"].is_string() && op["path"].is_string()) =>
        {
            Verdict::Injected { ops: ops.len() }
        }
        Ok(_) => no("patch has an operation without op or path".into()),
        Err(e) => no(format!("patch is not a JSON Patch array: {e}")),
    }
}

/// A rustls client config trusting only the CAs in `ca_file`, ring provider, TLS 1.2
/// and 1.3, ALPN `http/1.1`, no session resumption.
pub fn client_config(ca_file: &Path) -> Result<Arc<ClientConfig>, WebhookError> {
    let bad = |why: String| WebhookError::Ca {
        path: ca_file.to_path_buf(),
        why,
    };
    let pem = fs::read(ca_file).map_err(|e| bad(format!("cannot read: {e}")))?;
    let mut roots = RootCertStore::empty();
    for cert in rustls_pemfile::certs(&mut &pem[..]) {
        let cert: CertificateDer<'static> = cert.map_err(|e| bad(format!("bad PEM: {e}")))?;
        roots
            .add(cert)
            .map_err(|e| bad(format!("unusable certificate: {e}")))?;
    }
    if roots.is_empty() {
        return Err(bad("no PEM certificate in the file".into()));
    }
    let mut cfg =
        ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .map_err(|e| bad(format!("TLS setup: {e}")))?
            .with_root_certificates(roots)
            .with_no_client_auth();
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    cfg.resumption = Resumption::disabled();
    Ok(Arc::new(cfg))
}

/// The outcome of a run, printed as JSON.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    /// Webhook URL.
    pub url: String,
    /// Reviews per second asked for.
    pub target_rate: f64,
    /// Connections used.
    pub connections: usize,
    /// Whether each review had its own TCP + TLS connection.
    pub new_connection_per_request: bool,
    /// Size of one review, bytes.
    pub review_bytes: usize,
    /// Negotiated TLS version and cipher suite, e.g. `TLSv1_3 TLS13_AES_256_GCM_SHA384`.
    pub tls: Option<String>,
    /// Warmup, seconds.
    pub warmup_s: f64,
    /// Measured window, seconds.
    pub duration_s: f64,
    /// Reviews scheduled inside the window that came back injected.
    pub count: u64,
    /// Reviews inside the window answered with anything but an injection.
    pub not_injected: u64,
    /// Reviews inside the window that failed (I/O, TLS, timeout, non-200).
    pub errors: u64,
    /// The first failure or non-injection, to say what went wrong.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub first_error: Option<String>,
    /// Every review sent, warmup and failures included.
    pub requests_sent: u64,
    /// Every response that was an injection, warmup included: equals `requests_sent`
    /// when every single review was answered with a patch.
    pub injected_total: u64,
    /// JSON Patch operations in the last injected response.
    pub patch_ops: usize,
    /// Injected reviews per second over the window.
    pub achieved_rate: f64,
    /// From intended send time to the end of the response body, µs.
    pub latency_us: Summary,
    /// From actual send time to the end of the response body, µs.
    pub service_time_us: Summary,
    /// How late reviews left compared to the timetable, µs.
    pub send_lag_us: Summary,
    /// TCP connect + TLS handshake + HTTP/1.1 setup of each connection made, µs.
    pub connect_us: Summary,
    /// Watched processes.
    pub processes: Vec<ProcessReport>,
}

#[derive(Default)]
struct WorkerResult {
    latency: Histogram,
    service: Histogram,
    lag: Histogram,
    connect: Histogram,
    ok: u64,
    not_injected: u64,
    errors: u64,
    sent: u64,
    injected_total: u64,
    patch_ops: usize,
    tls: Option<String>,
    first_error: Option<String>,
}

impl WorkerResult {
    fn note(&mut self, e: String) {
        if self.first_error.is_none() {
            self.first_error = Some(e);
        }
    }
}

/// What every connection of a run shares.
struct Target {
    addr: SocketAddr,
    name: ServerName<'static>,
    tls: TlsConnector,
    host: HeaderValue,
    path: String,
    headers: Vec<(HeaderName, HeaderValue)>,
}

fn target(cfg: &Config) -> Result<Target, WebhookError> {
    let bad = |why: String| WebhookError::Url {
        url: cfg.url.to_string(),
        why,
    };
    if cfg.url.scheme_str() != Some("https") {
        return Err(bad("a webhook is called over https://".into()));
    }
    let host = cfg.url.host().ok_or_else(|| bad("no host".into()))?;
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    let port = cfg.url.port_u16().unwrap_or(443);
    let addr = (bare, port)
        .to_socket_addrs()
        .map_err(|e| bad(format!("cannot resolve: {e}")))?
        .next()
        .ok_or_else(|| bad("resolves to no address".into()))?;
    let name = cfg.server_name.as_deref().unwrap_or(bare).to_string();
    let name = ServerName::try_from(name.clone())
        .map_err(|e| WebhookError::Option(format!("--server-name {name:?}: {e}")))?;
    let authority = cfg.url.authority().map(|a| a.as_str()).unwrap_or(bare);
    let host = HeaderValue::from_str(authority).map_err(|e| bad(e.to_string()))?;
    let path = cfg
        .url
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or("/")
        .to_string();
    Ok(Target {
        addr,
        name,
        tls: TlsConnector::from(client_config(&cfg.ca_file)?),
        host,
        path,
        headers: cfg.headers.clone(),
    })
}

struct Conn<'a> {
    target: &'a Target,
    sender: Option<SendRequest<Full<Bytes>>>,
}

impl Conn<'_> {
    async fn connect(
        &mut self,
        rt: &runtime::Handle,
        out: &mut WorkerResult,
    ) -> Result<(), String> {
        let t0 = Instant::now();
        let t = self.target;
        let tcp = TcpStream::connect(t.addr)
            .await
            .map_err(|e| format!("connect {}: {e}", t.addr))?;
        // Reviews are small and latency-bound: Nagle would hold them back.
        let _ = tcp.set_nodelay(true);
        let tls = t
            .tls
            .connect(t.name.clone(), tcp)
            .await
            .map_err(|e| format!("TLS handshake with {}: {e}", t.addr))?;
        if out.tls.is_none() {
            let c = tls.get_ref().1;
            if let (Some(v), Some(s)) = (c.protocol_version(), c.negotiated_cipher_suite()) {
                out.tls = Some(format!("{v:?} {:?}", s.suite()));
            }
        }
        let (sender, conn) = http1::handshake(TokioIo::new(tls))
            .await
            .map_err(|e| format!("HTTP/1.1 handshake: {e}"))?;
        rt.spawn(conn);
        self.sender = Some(sender);
        out.connect.record(nanos(t0.elapsed()));
        Ok(())
    }

    /// Sends one review and reads the whole response; an error drops the connection.
    async fn review(
        &mut self,
        rt: &runtime::Handle,
        out: &mut WorkerResult,
        body: Bytes,
    ) -> Result<Bytes, String> {
        if self.sender.is_none() {
            self.connect(rt, out).await?;
        }
        let t = self.target;
        let mut req = Request::builder()
            .method(Method::POST)
            .uri(t.path.as_str())
            .header(header::HOST, t.host.clone())
            .header(header::CONTENT_TYPE, "application/json")
            .header(header::ACCEPT, "application/json");
        for (k, v) in &t.headers {
            req = req.header(k, v);
        }
        let req = req
            .body(Full::new(body))
            .map_err(|e| format!("building request: {e}"))?;
        let Some(sender) = self.sender.as_mut() else {
            return Err("not connected".into());
        };
        let res = async {
            sender
                .ready()
                .await
                .map_err(|e| format!("connection: {e}"))?;
            let rsp = sender
                .send_request(req)
                .await
                .map_err(|e| format!("request: {e}"))?;
            let status = rsp.status();
            let body = rsp
                .into_body()
                .collect()
                .await
                .map_err(|e| format!("response body: {e}"))?
                .to_bytes();
            if status == http::StatusCode::OK {
                Ok(body)
            } else {
                Err(format!(
                    "status {status}: {}",
                    String::from_utf8_lossy(&body[..body.len().min(200)])
                ))
            }
        }
        .await;
        if res.is_err() {
            self.sender = None;
        }
        res
    }
}

fn worker(
    cfg: &Config,
    target: &Target,
    k: usize,
    connected: &Barrier,
    go: &Barrier,
    plan: &OnceLock<Plan>,
) -> WorkerResult {
    let mut out = WorkerResult::default();
    let rt = match runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => Some(rt),
        Err(e) => {
            out.errors += 1;
            out.note(format!("cannot build a runtime: {e}"));
            None
        }
    };
    let mut conn = Conn {
        target,
        sender: None,
    };
    if let (Some(rt), false) = (&rt, cfg.new_connection_per_request) {
        if let Err(e) = rt.block_on(conn.connect(rt.handle(), &mut out)) {
            out.errors += 1;
            out.note(e);
        }
    }
    connected.wait();
    go.wait();
    let (Some(rt), Some(&plan)) = (rt, plan.get()) else {
        return out;
    };
    let handle = rt.handle().clone();
    let hard_stop = plan.end + cfg.timeout;
    let n = cfg.connections as u64;

    for j in 0u64.. {
        let seq = k as u64 + j * n;
        let intended = plan.start + Duration::from_secs_f64(seq as f64 / cfg.rate);
        if intended >= plan.end {
            break;
        }
        let now = Instant::now();
        if intended > now {
            thread::sleep(intended - now);
        }
        let sent = Instant::now();
        if sent >= hard_stop {
            break;
        }
        let counted = intended >= plan.measure_from;
        let uid = request_uid(seq);
        let body = cfg.review.render(&uid);
        out.sent += 1;
        let res = rt.block_on(async {
            tokio::time::timeout(cfg.timeout, conn.review(&handle, &mut out, body))
                .await
                .unwrap_or_else(|_| Err(format!("timed out after {:?}", cfg.timeout)))
        });
        let done = Instant::now();
        if cfg.new_connection_per_request {
            conn.sender = None;
        }
        match res.map(|body| check_response(&body, &uid)) {
            Ok(Verdict::Injected { ops }) => {
                out.injected_total += 1;
                out.patch_ops = ops;
                if counted {
                    out.ok += 1;
                    out.latency.record(nanos(done - intended));
                    out.service.record(nanos(done - sent));
                    out.lag.record(nanos(sent - intended));
                }
            }
            Ok(Verdict::NotInjected(why)) => {
                out.not_injected += u64::from(counted);
                out.note(format!("review {uid}: {why}"));
            }
            Err(e) => {
                // A timeout leaves the connection in an unknown state.
                conn.sender = None;
                out.errors += u64::from(counted);
                out.note(format!("review {uid}: {e}"));
            }
        }
    }
    out
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// Samples the watched processes every 100 ms from `from` until `to`.
fn watch(procs: &[(String, u32)], from: Instant, to: Instant) -> Vec<ProcessReport> {
    let mut reports: Vec<ProcessReport> = procs
        .iter()
        .map(|(name, pid)| ProcessReport {
            name: name.clone(),
            pid: *pid,
            ..Default::default()
        })
        .collect();
    if procs.is_empty() {
        return reports;
    }
    let now = Instant::now();
    if from > now {
        thread::sleep(from - now);
    }
    let mut first: Vec<Option<u64>> = vec![None; procs.len()];
    let mut last = vec![0u64; procs.len()];
    loop {
        let now = Instant::now();
        for (i, r) in reports.iter_mut().enumerate() {
            if r.error.is_some() {
                continue;
            }
            match procstat::sample(r.pid) {
                Ok(s) => {
                    if first[i].is_none() {
                        first[i] = Some(s.cpu_ticks);
                        r.rss_kib_start = s.rss_kib;
                    }
                    r.rss_kib_max = r.rss_kib_max.max(s.rss_kib);
                    r.rss_kib_end = s.rss_kib;
                    last[i] = s.cpu_ticks;
                }
                Err(e) => r.error = Some(e.to_string()),
            }
        }
        if now >= to {
            break;
        }
        thread::sleep(Duration::from_millis(100).min(to - now));
    }
    let hz = procstat::ticks_per_second() as f64;
    for (i, r) in reports.iter_mut().enumerate() {
        let ticks = last[i].saturating_sub(first[i].unwrap_or(last[i]));
        r.cpu_ms = ticks as f64 * 1000.0 / hz;
    }
    reports
}

/// Runs the load and returns the report.
pub fn run(cfg: &Config) -> Result<Report, WebhookError> {
    if cfg.connections == 0 {
        return Err(WebhookError::Option(
            "--connections must be at least 1".into(),
        ));
    }
    if !(cfg.rate.is_finite() && cfg.rate > 0.0) {
        return Err(WebhookError::Option(format!(
            "--rate must be a positive number of reviews per second, not {}",
            cfg.rate
        )));
    }
    if cfg.duration.is_zero() {
        return Err(WebhookError::Option(
            "--duration must be more than zero".into(),
        ));
    }
    let target = target(cfg)?;
    for (_, pid) in &cfg.watch {
        procstat::sample(*pid)?;
    }

    let (results, processes) = timetable::run(
        cfg.connections,
        cfg.warmup,
        cfg.duration,
        "webhook-conn",
        |t| worker(cfg, &target, t.k, t.connected, t.go, t.plan),
        || WorkerResult {
            errors: 1,
            first_error: Some("a worker thread panicked".into()),
            ..Default::default()
        },
        |from, to| watch(&cfg.watch, from, to),
    )
    .map_err(WebhookError::Worker)?;

    let mut total = WorkerResult::default();
    for r in results {
        total.latency.merge(&r.latency);
        total.service.merge(&r.service);
        total.lag.merge(&r.lag);
        total.connect.merge(&r.connect);
        total.ok += r.ok;
        total.not_injected += r.not_injected;
        total.errors += r.errors;
        total.sent += r.sent;
        total.injected_total += r.injected_total;
        total.patch_ops = total.patch_ops.max(r.patch_ops);
        if total.tls.is_none() {
            total.tls = r.tls;
        }
        if total.first_error.is_none() {
            total.first_error = r.first_error;
        }
    }
    let secs = cfg.duration.as_secs_f64();
    let processes = processes
        .into_iter()
        .map(|mut p| {
            if total.ok > 0 {
                p.cpu_ms_per_1000_requests = p.cpu_ms * 1000.0 / total.ok as f64;
            }
            p
        })
        .collect();
    Ok(Report {
        url: cfg.url.to_string(),
        target_rate: cfg.rate,
        connections: cfg.connections,
        new_connection_per_request: cfg.new_connection_per_request,
        review_bytes: cfg.review.len(),
        tls: total.tls,
        warmup_s: cfg.warmup.as_secs_f64(),
        duration_s: secs,
        count: total.ok,
        not_injected: total.not_injected,
        errors: total.errors,
        first_error: total.first_error,
        requests_sent: total.sent,
        injected_total: total.injected_total,
        patch_ops: total.patch_ops,
        achieved_rate: total.ok as f64 / secs,
        latency_us: total.latency.summary(),
        service_time_us: total.service.summary(),
        send_lag_us: total.lag.summary(),
        connect_us: total.connect.summary(),
        processes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn response(uid: &str, allowed: bool, patch: Option<&str>) -> Vec<u8> {
        let mut r = serde_json::json!({"uid": uid, "allowed": allowed});
        if let Some(p) = patch {
            r["patchType"] = "JSONPatch".into();
            r["patch"] = base64::engine::general_purpose::STANDARD.encode(p).into();
        }
        serde_json::to_vec(&serde_json::json!({
            "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "response": r
        }))
        .unwrap()
    }

    #[test]
    fn template_puts_a_fresh_uid_in_each_review() {
        let t = ReviewTemplate::parse(
            br#"{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview",
                 "request":{"uid":"old","object":{"metadata":{"name":"p"}}}}"#,
        )
        .unwrap();
        let a = t.render(&request_uid(1));
        let b = t.render(&request_uid(2));
        assert_ne!(a, b);
        assert_eq!(a.len(), t.len());
        let v: Value = serde_json::from_slice(&a).unwrap();
        assert_eq!(v["request"]["uid"], request_uid(1));
        assert_eq!(v["request"]["object"]["metadata"]["name"], "p");
        assert!(!String::from_utf8_lossy(&a).contains("old"));
    }

    #[test]
    fn template_refuses_what_is_not_a_review() {
        for bad in [
            &br#"{"kind":"Pod","apiVersion":"v1"}"#[..],
            br#"{"kind":"AdmissionReview","apiVersion":"admission.k8s.io/v1"}"#,
            b"not json",
        ] {
            assert!(matches!(
                ReviewTemplate::parse(bad),
                Err(WebhookError::Review(_))
            ));
        }
    }

    #[test]
    fn only_an_allowed_patch_for_the_same_uid_is_an_injection() {
        let u = request_uid(7);
        let patch = r#"[{"op":"add","path":"/metadata/annotations","value":{}}]"#;
        assert_eq!(
            check_response(&response(&u, true, Some(patch)), &u),
            Verdict::Injected { ops: 1 }
        );
        let not = |body: Vec<u8>| matches!(check_response(&body, &u), Verdict::NotInjected(_));
        assert!(
            not(response(&request_uid(8), true, Some(patch))),
            "uid mismatch"
        );
        assert!(not(response(&u, false, None)), "denied");
        assert!(not(response(&u, true, None)), "allowed unchanged");
        assert!(not(response(&u, true, Some("[]"))), "empty patch");
        assert!(
            not(response(&u, true, Some(r#"{"op":"add"}"#))),
            "not an array"
        );
        assert!(not(b"<html>".to_vec()), "not JSON");
    }
}
