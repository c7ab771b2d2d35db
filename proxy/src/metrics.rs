//! Golden metrics, rendered as Prometheus text on the admin server.
//!
//! The proxy owns its [`PrometheusRecorder`] instead of installing a global one, so
//! several proxies can run in one test process and each `/metrics` shows only its own
//! traffic. Handles are registered once per connection (not per request) and then
//! updated with atomic adds.
//!
//! Labels are bounded by construction: `direction` is one of two values, `service` is
//! `namespace/name` from the mesh config or `unknown`, `status_code` is an HTTP status,
//! `tls` is `true|false`, and `peer_identity` (inbound mTLS only) is the client's SPIFFE
//! id, capped at [`MAX_PEER_LABELS`] distinct values (then `other`). Raw paths, client
//! IPs and ports of unknown destinations never become labels.

use std::{
    collections::HashSet,
    fs,
    sync::{Arc, Mutex},
};

use metrics::{
    Counter, Gauge, Histogram, Key, KeyName, Label, Metadata, Recorder, SharedString, Unit,
};
use metrics_exporter_prometheus::{
    Matcher, PrometheusBuilder, PrometheusHandle, PrometheusRecorder,
};

use crate::{
    io::CountingIo,
    loop_guard::LoopDetected,
    target::{is_caused_by, BoxError, BoxFuture, Target, TlsStatus},
    tls::Reason,
};

/// Requests by direction, service, status code and TLS.
pub const REQUESTS: &str = "meshlet_requests_total";
/// Time to response headers, by direction, service and TLS.
pub const REQUEST_DURATION: &str = "meshlet_request_duration_seconds";
/// Accepted connections.
pub const TCP_OPENED: &str = "meshlet_tcp_connections_opened_total";
/// Closed accepted connections, with `reason` (`ok`, `error`, `loop`).
pub const TCP_CLOSED: &str = "meshlet_tcp_connections_closed_total";
/// Bytes the proxy wrote to accepted connections.
pub const TCP_SENT: &str = "meshlet_tcp_sent_bytes_total";
/// Bytes the proxy read from accepted connections.
pub const TCP_RECEIVED: &str = "meshlet_tcp_received_bytes_total";
/// Retries of routed requests, with `route` and `reason`.
pub const RETRIES: &str = "meshlet_retries_total";
/// Retries a Service's retry budget refused (the client got 503).
pub const RETRY_BUDGET_EXHAUSTED: &str = "meshlet_retry_budget_exhausted_total";
/// Timeouts, with `kind` (`detect`, `connect`, `idle`; routed requests also `request`,
/// `backend_request` with `service` and `route`).
pub const TIMEOUTS: &str = "meshlet_timeouts_total";
/// Failed TLS handshakes.
pub const TLS_HANDSHAKE_ERRORS: &str = "meshlet_tls_handshake_errors_total";
/// When the workload certificate expires (unix seconds).
pub const CERT_EXPIRY: &str = "meshlet_identity_cert_expiry_timestamp_seconds";
/// Mesh config reloads, with `result` (`ok`, `error`).
pub const CONFIG_RELOADS: &str = "meshlet_config_reloads_total";

/// Endpoints ejected by outlier detection, by `service`.
pub const OUTLIER_EJECTIONS: &str = "meshlet_outlier_ejections_total";
/// Endpoints ejected right now, by `service` (computed when scraped).
pub const OUTLIER_EJECTED: &str = "meshlet_outlier_ejected_endpoints";

/// Buckets of [`REQUEST_DURATION`]: 0.5 ms to 10 s, dense below 100 ms where a
/// sidecar's overhead shows.
pub const DURATION_BUCKETS: [f64; 16] = [
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    f64::INFINITY,
];

static META: Metadata<'static> =
    Metadata::new(module_path!(), metrics::Level::INFO, Some(module_path!()));

/// Unknown destinations share one label value.
pub const UNKNOWN_SERVICE: &str = "unknown";

/// Distinct `peer_identity` label values; later identities share `other`.
pub const MAX_PEER_LABELS: usize = 128;

/// Which listener a connection came through.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    /// Into the pod, through 15006.
    Inbound,
    /// Out of the pod, through 15001.
    Outbound,
}

/// The proxy's metrics registry.
pub struct Metrics {
    recorder: PrometheusRecorder,
    handle: PrometheusHandle,
    peers: Mutex<HashSet<Arc<str>>>,
}

/// Handles for one accepted connection.
#[derive(Clone)]
pub struct ConnMetrics {
    /// Bytes written to the accepted connection.
    pub sent: Counter,
    /// Bytes read from the accepted connection.
    pub received: Counter,
    labels: Arc<ConnLabels>,
}

struct ConnLabels {
    direction: Direction,
    service: SharedString,
    tls: bool,
    peer: Option<SharedString>,
    metrics: Arc<Metrics>,
}

/// Per-connection request metrics; caches the counter of each status seen.
pub struct RequestMetrics {
    duration: Histogram,
    by_status: std::sync::Mutex<Vec<(u16, Counter)>>,
    /// Routed requests: (route, status or 0 for the histogram, handle).
    by_route: std::sync::Mutex<Vec<(SharedString, u16, RouteHandle)>>,
    labels: Arc<ConnLabels>,
}

#[derive(Clone)]
enum RouteHandle {
    Requests(Counter),
    Duration(Histogram),
}

// === impl Direction ===

impl Direction {
    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Inbound => "inbound",
            Self::Outbound => "outbound",
        }
    }
}

impl std::fmt::Display for Direction {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

// === impl Metrics ===

impl Metrics {
    /// A fresh registry with every metric described.
    pub fn new() -> Arc<Self> {
        let recorder = PrometheusBuilder::new()
            .set_buckets_for_metric(Matcher::Full(REQUEST_DURATION.into()), &DURATION_BUCKETS)
            .map(PrometheusBuilder::build_recorder)
            // Only fails for an empty bucket list, which the constant is not.
            .unwrap_or_else(|_| PrometheusBuilder::new().build_recorder());
        let handle = recorder.handle();
        let m = Self {
            recorder,
            handle,
            peers: Mutex::default(),
        };
        let counters: [(&'static str, &'static str); 11] = [
            (REQUESTS, "HTTP requests proxied, by response status"),
            (TCP_OPENED, "Connections accepted"),
            (TCP_CLOSED, "Accepted connections closed"),
            (TCP_SENT, "Bytes the proxy sent on accepted connections"),
            (
                TCP_RECEIVED,
                "Bytes the proxy received on accepted connections",
            ),
            (RETRIES, "Requests retried"),
            (
                RETRY_BUDGET_EXHAUSTED,
                "Retries refused by the destination's retry budget",
            ),
            (TIMEOUTS, "Timeouts (detect, connect, idle)"),
            (TLS_HANDSHAKE_ERRORS, "Failed TLS handshakes"),
            (CONFIG_RELOADS, "Mesh config reloads"),
            (
                OUTLIER_EJECTIONS,
                "Endpoints ejected after consecutive failures",
            ),
        ];
        for (name, help) in counters {
            m.recorder
                .describe_counter(KeyName::from_const_str(name), None, help.into());
        }
        m.recorder.describe_histogram(
            KeyName::from_const_str(REQUEST_DURATION),
            Some(Unit::Seconds),
            "Time from request to response headers".into(),
        );
        m.recorder.describe_gauge(
            KeyName::from_const_str(OUTLIER_EJECTED),
            None,
            "Endpoints currently ejected by outlier detection".into(),
        );
        m.recorder.describe_gauge(
            KeyName::from_const_str(CERT_EXPIRY),
            Some(Unit::Seconds),
            "Expiry of the workload certificate (unix time)".into(),
        );
        // Show the counters that have no producer yet at zero, so dashboards and
        // alerts can be written against every name from the start.
        for d in [Direction::Inbound, Direction::Outbound] {
            m.counter(
                RETRIES,
                vec![Label::from_static_parts("direction", d.as_str())],
            )
            .absolute(0);
            for reason in Reason::ALL {
                m.counter(
                    TLS_HANDSHAKE_ERRORS,
                    vec![
                        Label::from_static_parts("direction", d.as_str()),
                        Label::from_static_parts("reason", reason.as_str()),
                    ],
                )
                .absolute(0);
            }
        }
        for result in ["ok", "error"] {
            m.counter(
                CONFIG_RELOADS,
                vec![Label::from_static_parts("result", result)],
            )
            .absolute(0);
        }
        Arc::new(m)
    }

    /// A counter handle.
    pub fn counter(&self, name: &'static str, labels: Vec<Label>) -> Counter {
        self.recorder
            .register_counter(&Key::from_parts(name, labels), &META)
    }

    /// A gauge handle.
    pub fn gauge(&self, name: &'static str, labels: Vec<Label>) -> Gauge {
        self.recorder
            .register_gauge(&Key::from_parts(name, labels), &META)
    }

    /// A histogram handle.
    pub fn histogram(&self, name: &'static str, labels: Vec<Label>) -> Histogram {
        self.recorder
            .register_histogram(&Key::from_parts(name, labels), &META)
    }

    /// Counts a config reload.
    pub fn config_reload(&self, ok: bool) {
        let result = if ok { "ok" } else { "error" };
        self.counter(
            CONFIG_RELOADS,
            vec![Label::from_static_parts("result", result)],
        )
        .increment(1);
    }

    /// Counts a timeout of `kind` (`detect`, `connect`, `idle`).
    pub fn timeout(&self, direction: Direction, kind: &'static str) {
        self.counter(
            TIMEOUTS,
            vec![
                Label::from_static_parts("direction", direction.as_str()),
                Label::from_static_parts("kind", kind),
            ],
        )
        .increment(1);
    }

    /// Registers the handles of a new plaintext connection and counts it as opened.
    pub fn connection(
        self: &Arc<Self>,
        direction: Direction,
        service: SharedString,
    ) -> ConnMetrics {
        self.connection_tls(direction, service, &TlsStatus::Plain)
    }

    /// Registers the handles of a new accepted connection with its TLS status and
    /// counts it as opened.
    pub fn connection_tls(
        self: &Arc<Self>,
        direction: Direction,
        service: SharedString,
        tls: &TlsStatus,
    ) -> ConnMetrics {
        let labels = Arc::new(ConnLabels {
            direction,
            service,
            tls: tls.is_tls(),
            peer: tls.peer().map(|p| self.peer_label(p)),
            metrics: self.clone(),
        });
        self.counter(TCP_OPENED, labels.base(None)).increment(1);
        ConnMetrics {
            sent: self.counter(TCP_SENT, labels.base(None)),
            received: self.counter(TCP_RECEIVED, labels.base(None)),
            labels,
        }
    }

    /// The `peer_identity` value for `id`, bounded.
    fn peer_label(&self, id: &Arc<str>) -> SharedString {
        let mut peers = self.peers.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(known) = peers.get(id) {
            return SharedString::from(known.clone());
        }
        if peers.len() >= MAX_PEER_LABELS {
            return SharedString::const_str("other");
        }
        peers.insert(id.clone());
        SharedString::from(id.clone())
    }

    /// Folds recorded histogram samples into their buckets. Samples queue up until
    /// this runs (or a scrape renders), so it must run periodically or memory grows
    /// with traffic when nobody scrapes.
    pub fn upkeep(&self) {
        self.handle.run_upkeep();
    }

    /// Runs [`Metrics::upkeep`] every `every`, until the task is dropped.
    pub async fn upkeep_every(self: Arc<Self>, every: std::time::Duration) {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            self.upkeep();
        }
    }

    /// Prometheus text of every metric, plus process CPU and memory.
    pub fn render(&self) -> String {
        let mut out = self.handle.render();
        let stat = fs::read_to_string("/proc/self/stat").unwrap_or_default();
        let status = fs::read_to_string("/proc/self/status").unwrap_or_default();
        if let Some(cpu) = cpu_seconds(&stat) {
            out.push_str(
                "# HELP process_cpu_seconds_total Total user and system CPU time spent in seconds.\n\
                 # TYPE process_cpu_seconds_total counter\n",
            );
            out.push_str(&format!("process_cpu_seconds_total {cpu}\n\n"));
        }
        if let Some(rss) = resident_bytes(&status) {
            out.push_str(
                "# HELP process_resident_memory_bytes Resident memory size in bytes.\n\
                 # TYPE process_resident_memory_bytes gauge\n",
            );
            out.push_str(&format!("process_resident_memory_bytes {rss}\n"));
        }
        out
    }
}

// === impl ConnMetrics ===

impl std::fmt::Debug for ConnMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnMetrics")
            .field("direction", &self.labels.direction)
            .field("service", &&*self.labels.service)
            .finish()
    }
}

impl ConnLabels {
    /// direction, service, then `status_code` if given, then tls and peer_identity.
    fn base(&self, status: Option<Label>) -> Vec<Label> {
        let mut v = Vec::with_capacity(5);
        v.push(Label::from_static_parts(
            "direction",
            self.direction.as_str(),
        ));
        v.push(Label::new("service", self.service.clone()));
        v.extend(status);
        v.push(Label::from_static_parts(
            "tls",
            if self.tls { "true" } else { "false" },
        ));
        if let Some(p) = &self.peer {
            v.push(Label::new("peer_identity", p.clone()));
        }
        v
    }
}

impl ConnLabels {
    /// [`ConnLabels::base`] with `route` after `service`.
    fn routed(&self, route: &SharedString, status: Option<Label>) -> Vec<Label> {
        let mut v = self.base(status);
        v.insert(2, Label::new("route", route.clone()));
        v
    }
}

impl ConnMetrics {
    /// Counts the connection as closed with `reason`.
    pub fn closed(&self, reason: &'static str) {
        let l = &self.labels;
        let mut labels = l.base(None);
        labels.push(Label::from_static_parts("reason", reason));
        l.metrics.counter(TCP_CLOSED, labels).increment(1);
    }

    /// Request metrics for HTTP served on this connection.
    pub fn requests(&self) -> RequestMetrics {
        let l = &self.labels;
        RequestMetrics {
            duration: l.metrics.histogram(REQUEST_DURATION, l.base(None)),
            by_status: Default::default(),
            by_route: Default::default(),
            labels: l.clone(),
        }
    }

    /// Counts a timeout of `kind` on this connection.
    pub fn timeout(&self, kind: &'static str) {
        self.labels.metrics.timeout(self.labels.direction, kind);
    }
}

// === impl RequestMetrics ===

impl RequestMetrics {
    /// Counts a timeout of `kind` while serving a request.
    pub fn timeout(&self, kind: &'static str) {
        self.labels.metrics.timeout(self.labels.direction, kind);
    }

    /// Records one finished request that a route (`namespace/name`) selected, with the
    /// extra label `route`; `None` records it as [`RequestMetrics::record`] does.
    pub fn record_route(
        &self,
        status: http::StatusCode,
        elapsed: std::time::Duration,
        route: Option<&SharedString>,
    ) {
        let Some(route) = route else {
            return self.record(status, elapsed);
        };
        let code = status.as_u16();
        let handle = |code: u16| {
            let mut cache = self.by_route.lock().unwrap_or_else(|p| p.into_inner());
            if let Some((_, _, h)) = cache.iter().find(|(r, c, _)| *c == code && r == route) {
                return h.clone();
            }
            let l = &self.labels;
            let h = if code == 0 {
                RouteHandle::Duration(l.metrics.histogram(REQUEST_DURATION, l.routed(route, None)))
            } else {
                let status = Label::new("status_code", code.to_string());
                RouteHandle::Requests(l.metrics.counter(REQUESTS, l.routed(route, Some(status))))
            };
            // Routes are bounded by the config; the cap guards against churn.
            if cache.len() < 64 {
                cache.push((route.clone(), code, h.clone()));
            }
            h
        };
        if let RouteHandle::Duration(h) = handle(0) {
            h.record(elapsed.as_secs_f64());
        }
        if let RouteHandle::Requests(c) = handle(code) {
            c.increment(1);
        }
    }

    /// Counts a timeout of a routed request: `kind` is `request` or `backend_request`.
    pub fn route_timeout(&self, route: &SharedString, kind: &'static str) {
        let l = &self.labels;
        let mut labels = l.routed(route, None);
        labels.retain(|x| x.key() != "tls" && x.key() != "peer_identity");
        labels.push(Label::from_static_parts("kind", kind));
        l.metrics.counter(TIMEOUTS, labels).increment(1);
    }

    /// Counts a retry of a routed request, and why (`5xx` code, `connect`, `error`,
    /// `timeout`).
    pub fn retry(&self, route: &SharedString, reason: SharedString) {
        let l = &self.labels;
        let mut labels = l.routed(route, None);
        labels.retain(|x| x.key() != "tls" && x.key() != "peer_identity");
        labels.push(Label::new("reason", reason));
        l.metrics.counter(RETRIES, labels).increment(1);
    }

    /// Counts a retry the Service's retry budget refused.
    pub fn retry_budget_exhausted(&self, route: &SharedString) {
        let l = &self.labels;
        let mut labels = l.routed(route, None);
        labels.retain(|x| x.key() != "tls" && x.key() != "peer_identity");
        l.metrics
            .counter(RETRY_BUDGET_EXHAUSTED, labels)
            .increment(1);
    }

    /// Records one finished request.
    pub fn record(&self, status: http::StatusCode, elapsed: std::time::Duration) {
        self.duration.record(elapsed.as_secs_f64());
        let code = status.as_u16();
        let mut cache = match self.by_status.lock() {
            Ok(c) => c,
            Err(poisoned) => poisoned.into_inner(),
        };
        if let Some((_, c)) = cache.iter().find(|(s, _)| *s == code) {
            c.increment(1);
            return;
        }
        let l = &self.labels;
        let c = l.metrics.counter(
            REQUESTS,
            l.base(Some(Label::new("status_code", code.to_string()))),
        );
        c.increment(1);
        // A handful of statuses per connection is normal; the bound only guards
        // against a pathological upstream cycling through every code.
        if cache.len() < 16 {
            cache.push((code, c));
        }
    }
}

// === ConnMetricsLayer ===

/// The metrics stage: counts the connection opened and closed (with a reason taken
/// from the error chain) and counts bytes on the accepted IO, so HTTP and opaque
/// connections are measured the same way.
#[derive(Clone)]
pub struct ConnMetricsLayer {
    metrics: Arc<Metrics>,
}

/// See [`ConnMetricsLayer`].
#[derive(Clone)]
pub struct CountConn<S> {
    inner: S,
    metrics: Arc<Metrics>,
}

impl ConnMetricsLayer {
    /// Records into `metrics`.
    pub fn new(metrics: Arc<Metrics>) -> Self {
        Self { metrics }
    }
}

impl<S> tower::Layer<S> for ConnMetricsLayer {
    type Service = CountConn<S>;

    fn layer(&self, inner: S) -> CountConn<S> {
        CountConn {
            inner,
            metrics: self.metrics.clone(),
        }
    }
}

impl<S, I> tower::Service<(Target, I)> for CountConn<S>
where
    S: tower::Service<(Target, CountingIo<I>), Response = (), Error = BoxError>,
    S::Future: Send + 'static,
{
    type Response = ();
    type Error = BoxError;
    type Future = BoxFuture<Result<(), BoxError>>;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, (mut target, io): (Target, I)) -> Self::Future {
        let m = self.metrics.connection_tls(
            target.direction,
            target.mesh.service_label(target.dst),
            &target.tls,
        );
        let io = CountingIo::new(io, m.sent.clone(), m.received.clone());
        target.metrics = Some(m.clone());
        let fut = self.inner.call((target, io));
        Box::pin(async move {
            let res = fut.await;
            let reason = match &res {
                Ok(()) => "ok",
                Err(e) if is_caused_by::<LoopDetected>(&**e) => "loop",
                Err(_) => "error",
            };
            m.closed(reason);
            res
        })
    }
}

/// utime + stime from `/proc/self/stat`, in seconds.
pub fn cpu_seconds(stat: &str) -> Option<f64> {
    // The command name may contain spaces and parentheses; fields restart after the
    // last ')'. utime and stime are fields 14 and 15 (1-based), i.e. 11 and 12 here.
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace();
    let utime: u64 = fields.nth(11)?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    // /proc reports in USER_HZ, which Linux fixes at 100 for user space.
    Some((utime + stime) as f64 / 100.0)
}

/// VmRSS from `/proc/self/status`, in bytes.
pub fn resident_bytes(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_bounded_labels() {
        let m = Metrics::new();
        let conn = m.connection(Direction::Outbound, "shop/web".into());
        conn.sent.increment(10);
        conn.received.increment(7);
        let reqs = conn.requests();
        reqs.record(http::StatusCode::OK, std::time::Duration::from_millis(2));
        reqs.record(http::StatusCode::OK, std::time::Duration::from_millis(2));
        reqs.record(
            http::StatusCode::BAD_GATEWAY,
            std::time::Duration::from_millis(1),
        );
        conn.closed("ok");
        m.config_reload(false);
        let text = m.render();
        let has = |line: &str| {
            assert!(
                text.lines().any(|l| l == line),
                "missing {line:?} in\n{text}"
            );
        };
        has(
            r#"meshlet_tcp_sent_bytes_total{direction="outbound",service="shop/web",tls="false"} 10"#,
        );
        has(
            r#"meshlet_tcp_received_bytes_total{direction="outbound",service="shop/web",tls="false"} 7"#,
        );
        has(
            r#"meshlet_requests_total{direction="outbound",service="shop/web",status_code="200",tls="false"} 2"#,
        );
        has(
            r#"meshlet_requests_total{direction="outbound",service="shop/web",status_code="502",tls="false"} 1"#,
        );
        has(
            r#"meshlet_tcp_connections_opened_total{direction="outbound",service="shop/web",tls="false"} 1"#,
        );
        has(
            r#"meshlet_tcp_connections_closed_total{direction="outbound",service="shop/web",tls="false",reason="ok"} 1"#,
        );
        has(r#"meshlet_config_reloads_total{result="error"} 1"#);
        has(r#"meshlet_config_reloads_total{result="ok"} 0"#);
        has(r#"meshlet_retries_total{direction="inbound"} 0"#);
        has(
            r#"meshlet_request_duration_seconds_bucket{direction="outbound",service="shop/web",tls="false",le="0.0025"} 3"#,
        );
        has(
            r#"meshlet_request_duration_seconds_bucket{direction="outbound",service="shop/web",tls="false",le="0.0005"} 0"#,
        );
        assert!(text.contains("process_resident_memory_bytes "), "{text}");
        assert!(text.contains("process_cpu_seconds_total "), "{text}");
    }

    #[test]
    fn upkeep_keeps_histogram_counts() {
        let m = Metrics::new();
        let reqs = m.connection(Direction::Inbound, "a/b".into()).requests();
        for _ in 0..1000 {
            reqs.record(http::StatusCode::OK, std::time::Duration::from_micros(700));
        }
        m.upkeep();
        reqs.record(http::StatusCode::OK, std::time::Duration::from_micros(700));
        m.upkeep();
        let text = m.render();
        let line = r#"meshlet_request_duration_seconds_count{direction="inbound",service="a/b",tls="false"} 1001"#;
        assert!(text.lines().any(|l| l == line), "{text}");
    }

    #[test]
    fn registries_are_independent() {
        let a = Metrics::new();
        let b = Metrics::new();
        a.connection(Direction::Inbound, UNKNOWN_SERVICE.into());
        assert!(a.render().contains(TCP_OPENED));
        assert!(!b.render().contains(&format!("{TCP_OPENED}{{")));
    }

    #[test]
    fn parses_proc_files() {
        let stat = "123 (my (odd) cmd) S 1 2 3 4 5 6 7 8 9 10 250 50 0 0 20 0 4 0 100";
        assert_eq!(cpu_seconds(stat), Some(3.0));
        assert_eq!(cpu_seconds("garbage"), None);
        let status = "Name:\tx\nVmRSS:\t    3120 kB\nThreads:\t2\n";
        assert_eq!(resident_bytes(status), Some(3120 * 1024));
        assert_eq!(resident_bytes("Name: x\n"), None);
    }

    #[tokio::test]
    async fn conn_layer_counts_bytes_and_close_reasons() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        use tower::{Layer, ServiceExt};

        use crate::{io::CountingIo, loop_guard::LoopDetected, mesh::Snapshot};

        let m = Metrics::new();
        let layer = ConnMetricsLayer::new(m.clone());
        let target = Target {
            direction: Direction::Inbound,
            dst: "198.18.0.5:8080".parse().unwrap(),
            local: None,
            mesh: Arc::new(Snapshot::new(Default::default(), None)),
            metrics: None,
            tls: Default::default(),
            silent: false,
        };
        let echo = layer.layer(tower::service_fn(
            |(t, mut io): (Target, CountingIo<tokio::io::DuplexStream>)| async move {
                assert!(t.metrics.is_some(), "later stages get the handles");
                let mut buf = [0u8; 4];
                io.read_exact(&mut buf).await?;
                io.write_all(b"pong!").await?;
                Ok::<(), BoxError>(())
            },
        ));
        let (mut client, server) = tokio::io::duplex(64);
        client.write_all(b"ping").await.unwrap();
        echo.oneshot((target.clone(), server)).await.unwrap();

        let refuse = layer.layer(tower::service_fn(
            |(t, _): (Target, CountingIo<()>)| async move {
                Err::<(), BoxError>(LoopDetected { dst: t.dst }.into())
            },
        ));
        assert!(refuse.oneshot((target, ())).await.is_err());

        let text = m.render();
        let l = r#"direction="inbound",service="unknown",tls="false""#;
        for line in [
            format!("meshlet_tcp_received_bytes_total{{{l}}} 4"),
            format!("meshlet_tcp_sent_bytes_total{{{l}}} 5"),
            format!("meshlet_tcp_connections_opened_total{{{l}}} 2"),
            format!(r#"meshlet_tcp_connections_closed_total{{{l},reason="ok"}} 1"#),
            format!(r#"meshlet_tcp_connections_closed_total{{{l},reason="loop"}} 1"#),
        ] {
            assert!(text.lines().any(|x| x == line), "missing {line} in\n{text}");
        }
    }
}
