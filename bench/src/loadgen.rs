//! Open-loop fixed-rate HTTP/1.1 load: requests follow a timetable set before the run
//! and each latency is measured from the time the request was *meant* to be sent (as
//! wrk2 does), so a slow response cannot hide the queue it causes (no coordinated
//! omission). A closed-loop mode sends back to back for maximum throughput.
//!
//! Each connection runs on its own OS thread with a current-thread tokio runtime and
//! waits for its next slot with `nanosleep`: tokio's timer ticks in whole milliseconds,
//! which would add up to 1 ms of pacing error to every sample, more than the proxy
//! overhead this tool exists to measure.

use std::{
    net::{SocketAddr, ToSocketAddrs},
    sync::{Barrier, OnceLock},
    thread,
    time::{Duration, Instant},
};

use bytes::Bytes;
use http::{Method, Request, Uri};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::rt::TokioIo;
use serde::Serialize;
use tokio::{net::TcpStream, runtime};

use crate::{
    histogram::{Histogram, Summary},
    procstat,
    timetable::{self, Plan},
};

/// How requests are paced.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Pace {
    /// Open loop: this many requests per second in total, on a fixed timetable.
    Rate(f64),
    /// Closed loop: every connection sends its next request as soon as the last ends.
    MaxThroughput,
}

/// One load run.
#[derive(Clone, Debug)]
pub struct Config {
    /// `http://host:port/path`.
    pub url: Uri,
    /// Pacing.
    pub pace: Pace,
    /// Measured time.
    pub duration: Duration,
    /// Time before the measured window whose requests are sent but not counted.
    pub warmup: Duration,
    /// Concurrent connections.
    pub connections: usize,
    /// Open a new TCP connection for every request instead of keeping them alive.
    pub new_connection_per_request: bool,
    /// Request body size; 0 sends `GET`, more sends `POST` with that many bytes.
    pub body_size: usize,
    /// Longest a request may take before it counts as an error.
    pub timeout: Duration,
    /// Processes whose RSS and CPU time are sampled over the measured window.
    pub watch: Vec<(String, u32)>,
}

/// Why a run could not start.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The URL lacks what a request needs.
    #[error("bad URL {url}: {why} (write it like http://198.18.0.2:8080/)")]
    Url {
        /// The URL given.
        url: String,
        /// What is wrong.
        why: String,
    },
    /// An option is out of range.
    #[error("{0}")]
    Option(String),
    /// The runtime or a worker thread could not be created.
    #[error("cannot start a worker: {0}")]
    Worker(#[from] std::io::Error),
    /// A watched process could not be read at the start of the window.
    #[error(transparent)]
    Proc(#[from] procstat::ProcError),
}

/// RSS and CPU of one watched process over the measured window.
#[derive(Clone, Debug, Default, Serialize)]
pub struct ProcessReport {
    /// The name given with `--watch`.
    pub name: String,
    /// Its PID.
    pub pid: u32,
    /// RSS (KiB) when the window opened.
    pub rss_kib_start: u64,
    /// Largest RSS (KiB) seen during the window (sampled every 100 ms).
    pub rss_kib_max: u64,
    /// RSS (KiB) when the window closed.
    pub rss_kib_end: u64,
    /// CPU time (user + system, ms) used during the window.
    pub cpu_ms: f64,
    /// CPU time per 1000 successful requests, ms.
    pub cpu_ms_per_1000_requests: f64,
    /// Set when the process vanished or could not be read mid-window.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// The outcome of a run, printed as JSON.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    /// Target URL.
    pub url: String,
    /// `open-loop` or `closed-loop`.
    pub mode: &'static str,
    /// Requests per second asked for (open loop), else `null`.
    pub target_rate: Option<f64>,
    /// Connections used.
    pub connections: usize,
    /// Whether each request had its own connection.
    pub new_connection_per_request: bool,
    /// Request body size, bytes.
    pub body_size: usize,
    /// Warmup, seconds.
    pub warmup_s: f64,
    /// Measured window, seconds.
    pub duration_s: f64,
    /// Successful (2xx) requests scheduled inside the window.
    pub count: u64,
    /// Failed requests (I/O errors, timeouts, non-2xx) scheduled inside the window.
    pub errors: u64,
    /// The first error seen, to say what went wrong.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub first_error: Option<String>,
    /// Every request sent, warmup and failures included: what the proxies on the path
    /// must have counted.
    pub requests_sent: u64,
    /// Successful requests per second over the window.
    pub achieved_rate: f64,
    /// From intended send time to the end of the response body, µs.
    pub latency_us: Summary,
    /// From actual send time to the end of the response body, µs.
    pub service_time_us: Summary,
    /// How late requests left compared to the timetable, µs (open loop only; large
    /// values mean the generator or its connections could not keep up).
    pub send_lag_us: Summary,
    /// Watched processes.
    pub processes: Vec<ProcessReport>,
}

#[derive(Default)]
struct WorkerResult {
    latency: Histogram,
    service: Histogram,
    lag: Histogram,
    ok: u64,
    errors: u64,
    sent: u64,
    first_error: Option<String>,
}

impl WorkerResult {
    fn error(&mut self, counted: bool, e: String) {
        if counted {
            self.errors += 1;
            if self.first_error.is_none() {
                self.first_error = Some(e);
            }
        }
    }
}

/// Resolves the URL's authority to one socket address.
fn resolve(url: &Uri) -> Result<SocketAddr, LoadError> {
    let bad = |why: &str| LoadError::Url {
        url: url.to_string(),
        why: why.into(),
    };
    if url.scheme_str() != Some("http") {
        return Err(bad("only http:// is supported"));
    }
    let host = url.host().ok_or_else(|| bad("no host"))?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let port = url.port_u16().unwrap_or(80);
    (host, port)
        .to_socket_addrs()
        .map_err(|e| bad(&format!("cannot resolve: {e}")))?
        .next()
        .ok_or_else(|| bad("resolves to no address"))
}

struct Conn {
    addr: SocketAddr,
    sender: Option<SendRequest<Full<Bytes>>>,
}

impl Conn {
    async fn connect(&mut self, rt: &runtime::Handle) -> Result<(), String> {
        let stream = TcpStream::connect(self.addr)
            .await
            .map_err(|e| format!("connect {}: {e}", self.addr))?;
        // Requests are small and latency-bound: Nagle would hold them back.
        let _ = stream.set_nodelay(true);
        let (sender, conn) = http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| format!("handshake: {e}"))?;
        rt.spawn(conn);
        self.sender = Some(sender);
        Ok(())
    }

    /// Sends one request and reads the whole response; an error drops the connection.
    async fn request(
        &mut self,
        rt: &runtime::Handle,
        req: Request<Full<Bytes>>,
    ) -> Result<(), String> {
        if self.sender.is_none() {
            self.connect(rt).await?;
        }
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
            rsp.into_body()
                .collect()
                .await
                .map_err(|e| format!("response body: {e}"))?;
            if status.is_success() {
                Ok(())
            } else {
                Err(format!("status {status}"))
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
    addr: SocketAddr,
    k: usize,
    connected: &Barrier,
    go: &Barrier,
    plan: &OnceLock<Plan>,
) -> WorkerResult {
    let mut out = WorkerResult::default();
    let rt = match runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => Some(rt),
        Err(e) => {
            out.error(true, format!("cannot build a runtime: {e}"));
            None
        }
    };
    let mut conn = Conn { addr, sender: None };
    if let (Some(rt), false) = (&rt, cfg.new_connection_per_request) {
        if let Err(e) = rt.block_on(conn.connect(rt.handle())) {
            out.error(true, e);
        }
    }
    connected.wait();
    go.wait();
    let (Some(rt), Some(&plan)) = (rt, plan.get()) else {
        return out;
    };
    let handle = rt.handle().clone();

    let body = Bytes::from(vec![b'x'; cfg.body_size]);
    let method = if cfg.body_size == 0 {
        Method::GET
    } else {
        Method::POST
    };
    let host = cfg.url.authority().map(|a| a.as_str()).unwrap_or_default();
    let path = cfg.url.path_and_query().map(|p| p.as_str()).unwrap_or("/");
    // Closed loop and late requests can spill past `end`; never beyond this.
    let hard_stop = plan.end + cfg.timeout;
    let n = cfg.connections as u64;

    for j in 0u64.. {
        let intended = match cfg.pace {
            Pace::Rate(rate) => {
                let slot = k as u64 + j * n;
                let at = plan.start + Duration::from_secs_f64(slot as f64 / rate);
                if at >= plan.end {
                    break;
                }
                let now = Instant::now();
                if at > now {
                    thread::sleep(at - now);
                }
                at
            }
            Pace::MaxThroughput => {
                let now = Instant::now();
                if now >= plan.end {
                    break;
                }
                now
            }
        };
        let sent = Instant::now();
        if sent >= hard_stop {
            break;
        }
        let counted = intended >= plan.measure_from;
        let req = match Request::builder()
            .method(method.clone())
            .uri(path)
            .header(http::header::HOST, host)
            .body(Full::new(body.clone()))
        {
            Ok(r) => r,
            Err(e) => {
                out.error(counted, format!("building request: {e}"));
                break;
            }
        };
        out.sent += 1;
        let res = rt.block_on(async {
            tokio::time::timeout(cfg.timeout, conn.request(&handle, req))
                .await
                .unwrap_or_else(|_| Err(format!("timed out after {:?}", cfg.timeout)))
        });
        let done = Instant::now();
        if cfg.new_connection_per_request {
            conn.sender = None;
        }
        match res {
            Ok(()) if counted => {
                out.ok += 1;
                out.latency.record(nanos(done - intended));
                out.service.record(nanos(done - sent));
                if matches!(cfg.pace, Pace::Rate(_)) {
                    out.lag.record(nanos(sent - intended));
                }
            }
            Ok(()) => {}
            Err(e) => {
                // A timeout leaves the connection in an unknown state.
                conn.sender = None;
                out.error(counted, e);
            }
        }
    }
    out
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// Samples the watched processes from `from` until `to`.
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
    let mut first_ticks = vec![0u64; procs.len()];
    let mut last_ticks = vec![0u64; procs.len()];
    let tick = Duration::from_millis(100);
    let mut first = true;
    loop {
        let now = Instant::now();
        let last = now >= to;
        for (i, r) in reports.iter_mut().enumerate() {
            if r.error.is_some() {
                continue;
            }
            match procstat::sample(r.pid) {
                Ok(s) => {
                    if first {
                        r.rss_kib_start = s.rss_kib;
                        first_ticks[i] = s.cpu_ticks;
                    }
                    r.rss_kib_max = r.rss_kib_max.max(s.rss_kib);
                    r.rss_kib_end = s.rss_kib;
                    last_ticks[i] = s.cpu_ticks;
                }
                Err(e) => r.error = Some(e.to_string()),
            }
        }
        first = false;
        if last {
            break;
        }
        thread::sleep(tick.min(to - now));
    }
    let hz = procstat::ticks_per_second() as f64;
    for (i, r) in reports.iter_mut().enumerate() {
        r.cpu_ms = (last_ticks[i].saturating_sub(first_ticks[i])) as f64 * 1000.0 / hz;
    }
    reports
}

/// Runs the load and returns the report.
pub fn run(cfg: &Config) -> Result<Report, LoadError> {
    if cfg.connections == 0 {
        return Err(LoadError::Option("--connections must be at least 1".into()));
    }
    if let Pace::Rate(r) = cfg.pace {
        if !(r.is_finite() && r > 0.0) {
            return Err(LoadError::Option(format!(
                "--rate must be a positive number of requests per second, not {r}"
            )));
        }
    }
    if cfg.duration.is_zero() {
        return Err(LoadError::Option(
            "--duration must be more than zero".into(),
        ));
    }
    let addr = resolve(&cfg.url)?;
    for (_, pid) in &cfg.watch {
        procstat::sample(*pid)?;
    }

    let (results, processes) = timetable::run(
        cfg.connections,
        cfg.warmup,
        cfg.duration,
        "loadgen-conn",
        |t| worker(cfg, addr, t.k, t.connected, t.go, t.plan),
        || {
            let mut r = WorkerResult::default();
            r.error(true, "a worker thread panicked".into());
            r
        },
        |from, to| watch(&cfg.watch, from, to),
    )
    .map_err(LoadError::Worker)?;

    let mut total = WorkerResult::default();
    for r in results {
        total.latency.merge(&r.latency);
        total.service.merge(&r.service);
        total.lag.merge(&r.lag);
        total.ok += r.ok;
        total.errors += r.errors;
        total.sent += r.sent;
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
        mode: match cfg.pace {
            Pace::Rate(_) => "open-loop",
            Pace::MaxThroughput => "closed-loop",
        },
        target_rate: match cfg.pace {
            Pace::Rate(r) => Some(r),
            Pace::MaxThroughput => None,
        },
        connections: cfg.connections,
        new_connection_per_request: cfg.new_connection_per_request,
        body_size: cfg.body_size,
        warmup_s: cfg.warmup.as_secs_f64(),
        duration_s: secs,
        count: total.ok,
        errors: total.errors,
        first_error: total.first_error,
        requests_sent: total.sent,
        achieved_rate: total.ok as f64 / secs,
        latency_us: total.latency.summary(),
        service_time_us: total.service.summary(),
        send_lag_us: total.lag.summary(),
        processes,
    })
}
