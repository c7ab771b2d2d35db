//! Request-level load balancing over a Service's ready endpoints.
//!
//! kube-proxy picks a backend per *connection*; a sidecar that pools connections
//! to the ClusterIP would pin every request of an app to one pod. So the outbound
//! HTTP path resolves a ClusterIP:port to its endpoints and picks one per *request*:
//! power of two choices (two endpoints at random, the cheaper wins) over a peak-EWMA
//! cost, as Linkerd's balancer does with tower's `PeakEwma`.
//!
//! Cost = latency estimate x (requests in flight + 1). The estimate jumps to a slower
//! observation (peak) once the next one confirms it, and the peak fades within a
//! fraction of a second (see [`Endpoint::observe_at`]); beneath it an average moves
//! toward new observations with a
//! weight that grows with the time since the last one; between observations it decays
//! toward zero, so an endpoint nobody picked becomes cheap and gets probed again, and
//! equally fast endpoints take turns. New endpoints start at [`DEFAULT_RTT`], so they
//! tie and the random pair decides; costs within [`TIE_BAND`] of each other are ties
//! too (unlike tower, which compares exactly).
//!
//! Endpoint state ([`Endpoint`]) is shared, not per balancer: a config reload builds
//! new balancers that reuse the state of endpoints that stay (see
//! `mesh::Snapshot::new`), and a request in flight holds its [`Pick`], so a reload
//! neither drops it nor loses its measurement.
//!
//! Outlier detection (passive health checking, as Envoy's outlier detection and
//! Linkerd's failure accrual): every outcome of a pick is reported back
//! ([`Pick::responded`], [`Pick::failed`]). An endpoint whose requests fail
//! [`Outlier::consecutive_failures`] times in a row is ejected: picks skip it for a
//! backoff that starts at [`Outlier::base_ejection`] and doubles with every ejection in a
//! row, up to [`Outlier::max_ejection`]. When the backoff ends it takes requests again on
//! probation: its first failure ejects it again (longer), its first success clears it.
//! Requests already in flight are never touched by an ejection, and their outcomes, which
//! date from before it, do not count. At least one endpoint of a balancer always stays
//! eligible: the last one is never ejected, and if every endpoint is ejected anyway (an
//! endpoint shared by two Services) picks ignore ejection.

use std::{
    cell::Cell,
    collections::hash_map::RandomState,
    hash::BuildHasher,
    net::SocketAddr,
    sync::{
        atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering},
        Arc, Mutex, MutexGuard,
    },
    time::Duration,
};

use http::StatusCode;
use metrics::{Label, SharedString};
use tokio::time::Instant;

use crate::metrics::{Metrics, OUTLIER_EJECTIONS};

/// Estimate of an endpoint nothing is known about yet (Linkerd's default).
pub const DEFAULT_RTT: Duration = Duration::from_millis(30);
/// Time constant of the estimate's decay (Linkerd's default).
pub const DECAY: Duration = Duration::from_secs(10);
/// The most one answer weighs in the average (tower weighs it by the time since the
/// previous one, which after an idle while is nearly all of it).
pub const MAX_SAMPLE_WEIGHT: f64 = 0.02;
/// Time constant of a peak's decay: how soon an endpoint that answered slowly is
/// tried again (see [`Endpoint::observe_at`]).
pub const PEAK_DECAY: Duration = Duration::from_millis(100);
/// Costs closer than this fraction of the larger one are a tie, decided at random.
/// Estimates of equally fast endpoints differ by noise, and at low request rates an
/// estimate moves slowly (it is weighted by time, `DECAY`), so an exact comparison
/// would let a few microseconds of noise send every request to one endpoint for
/// seconds. A truly slower endpoint (or one with more requests in flight: each
/// doubles the cost at least once) is far outside the band.
pub const TIE_BAND: f64 = 0.1;
/// Estimate after a failed connect: the endpoint loses every comparison with a healthy
/// one until it decays (or the config drops it).
pub const FAILURE_PENALTY: Duration = Duration::from_secs(1);

/// Failures in a row that eject an endpoint, unless the Service says otherwise.
pub const DEFAULT_CONSECUTIVE_FAILURES: u32 = 5;
/// The first ejection's length, unless the Service says otherwise. Short, because a
/// pod that failed a few requests (restarting, briefly overloaded) is often fine a
/// second later, and the backoff grows for one that is not.
pub const DEFAULT_BASE_EJECTION: Duration = Duration::from_secs(1);
/// The longest ejection, unless the Service says otherwise.
pub const DEFAULT_MAX_EJECTION: Duration = Duration::from_secs(30);

/// One endpoint's address, load and health, shared by every balancer that lists it.
#[derive(Debug)]
pub struct Endpoint {
    addr: SocketAddr,
    /// Requests picked and not yet answered.
    pending: AtomicU32,
    /// The estimate in nanoseconds (`f64` bits) as of `at`.
    rtt_ns: AtomicU64,
    /// When `rtt_ns` was written, in nanoseconds since `epoch`.
    at: AtomicU64,
    /// Whether the last observation was slower than the estimate (a peak waiting
    /// for confirmation).
    slower: AtomicBool,
    /// The last confirmed peak in nanoseconds (`f64` bits), as of `peak_since`.
    peak_ns: AtomicU64,
    /// When `peak_ns` was written, in nanoseconds since `epoch`.
    peak_since: AtomicU64,
    /// Until when it is ejected, in nanoseconds since `epoch` (0: never was). Read on
    /// every pick, so an atomic rather than behind `health`'s lock.
    ejected_until: AtomicU64,
    /// Whether `health` differs from its clean state: a success then takes the lock
    /// to clear it. Keeps the lock off the path of healthy endpoints.
    troubled: AtomicBool,
    health: Mutex<Health>,
    epoch: Instant,
}

/// Outlier detection bookkeeping of one endpoint.
#[derive(Debug, Default)]
struct Health {
    /// Failures in a row since the last success or ejection.
    consecutive: u32,
    /// Ejections in a row without a success in between; sets the backoff.
    ejections: u32,
    /// Ejected before and no success since: the next failure ejects again.
    probation: bool,
    /// When it was last ejected, in nanoseconds since `epoch`: outcomes of requests
    /// sent before then are stale.
    ejected_at: Option<u64>,
}

/// Outlier detection settings of one Service, shared by its balancers.
#[derive(Clone)]
pub struct Outlier {
    /// Failures in a row that eject an endpoint; 0 never ejects.
    pub consecutive_failures: u32,
    /// The first ejection's length; each further ejection in a row doubles it.
    pub base_ejection: Duration,
    /// The longest ejection.
    pub max_ejection: Duration,
    /// `namespace/name`, for logs and the ejection counter.
    service: SharedString,
    metrics: Option<Arc<Metrics>>,
}

/// Picks among a fixed set of endpoints; rebuilt on config reloads.
#[derive(Debug)]
pub struct Balancer {
    shared: Arc<Shared>,
}

/// What a balancer's picks need after the pick: the other endpoints (the
/// last-endpoint guard) and the Service's outlier settings.
#[derive(Debug)]
struct Shared {
    endpoints: Box<[Arc<Endpoint>]>,
    outlier: Arc<Outlier>,
    /// Serialises ejection decisions, so two endpoints failing at once cannot both
    /// see the other as the one left and leave none.
    ejecting: Mutex<()>,
}

/// A request's claim on an endpoint: counts as in flight until dropped.
#[derive(Debug)]
pub struct Pick {
    endpoint: Arc<Endpoint>,
    balancer: Arc<Shared>,
    start: Instant,
}

/// Whether a response status counts against the endpoint that sent it.
///
/// 502, 503 and 504 say the endpoint (or what stands behind it) cannot serve right
/// now: overloaded, shutting down, its own upstream gone. A 500 is not counted: it is
/// the app's answer to *this* request, and a request that crashes the app crashes
/// every replica alike, so counting it would eject healthy pods in turn and pile the
/// load onto the last one while fixing nothing. That is Envoy's
/// `consecutive_gateway_failure` rather than its `consecutive_5xx`; other 5xx codes
/// (501, 505, ...) describe the request too.
pub fn is_endpoint_failure(status: StatusCode) -> bool {
    matches!(status.as_u16(), 502..=504)
}

// === impl Endpoint ===

impl Endpoint {
    /// A new endpoint at `addr` with the default estimate.
    pub fn new(addr: SocketAddr) -> Arc<Self> {
        Arc::new(Self {
            addr,
            pending: AtomicU32::new(0),
            rtt_ns: AtomicU64::new((DEFAULT_RTT.as_nanos() as f64).to_bits()),
            at: AtomicU64::new(0),
            slower: AtomicBool::new(false),
            peak_ns: AtomicU64::new(0f64.to_bits()),
            peak_since: AtomicU64::new(0),
            ejected_until: AtomicU64::new(0),
            troubled: AtomicBool::new(false),
            health: Mutex::default(),
            epoch: Instant::now(),
        })
    }

    /// Whether picks skip it at `now`.
    pub fn is_ejected_at(&self, now: Instant) -> bool {
        self.since_epoch(now) < self.ejected_until.load(Ordering::Relaxed)
    }

    /// Where requests go.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Requests in flight.
    pub fn pending(&self) -> u32 {
        self.pending.load(Ordering::Relaxed)
    }

    /// The latency estimate at `now`, in nanoseconds: the average or a recent peak,
    /// whichever is higher.
    pub fn estimate_at(&self, now: Instant) -> f64 {
        self.decayed(now).0.max(self.peak_at(now))
    }

    /// The load-weighted cost at `now`.
    pub fn cost_at(&self, now: Instant) -> f64 {
        self.estimate_at(now) * f64::from(self.pending() + 1)
    }

    /// Folds in an observed latency (time to response headers).
    ///
    /// Unlike tower's `PeakEwma`, a peak is kept apart from the average and decays
    /// within [`PEAK_DECAY`] rather than [`DECAY`], and is taken only when the next
    /// observation is slower than the estimate too. The costlier endpoint of a pair
    /// always loses, so an endpoint whose estimate is too high gets no request that
    /// could correct it: in tower a lone slow answer (a cold first request, the
    /// scheduler of a loaded node) starves a healthy pod for tens of seconds. Here it
    /// is ignored, and a real slowdown makes the endpoint lose comparisons until its
    /// peak has decayed below the others, then it gets a request again: a slow
    /// endpoint is re-checked a few times a second, and one that recovered is back
    /// at its share within a fraction of a second. For the same reason one answer
    /// moves the average by at most [`MAX_SAMPLE_WEIGHT`]: after an idle while, its
    /// time weight would make the first answer (often a cold one) the whole average.
    pub fn observe_at(&self, now: Instant, rtt: Duration) {
        let rtt = rtt.as_nanos() as f64;
        let (avg, decay) = self.decayed(now);
        let slower = rtt > avg.max(self.peak_at(now));
        if self.slower.swap(slower, Ordering::Relaxed) && slower {
            self.peak_ns.store(rtt.to_bits(), Ordering::Relaxed);
            self.peak_since
                .store(self.since_epoch(now), Ordering::Relaxed);
        }
        self.store(now, avg + rtt * (1.0 - decay).min(MAX_SAMPLE_WEIGHT));
    }

    /// The last peak, decayed toward zero by [`PEAK_DECAY`].
    fn peak_at(&self, now: Instant) -> f64 {
        let peak = f64::from_bits(self.peak_ns.load(Ordering::Relaxed));
        let since = self.peak_since.load(Ordering::Relaxed);
        let elapsed = self.since_epoch(now).saturating_sub(since) as f64;
        peak * (-elapsed / PEAK_DECAY.as_nanos() as f64).exp()
    }

    /// Marks a failed connect: the endpoint becomes expensive until it decays.
    pub fn failed_at(&self, now: Instant) {
        let penalty = FAILURE_PENALTY.as_nanos() as f64;
        if self.decayed(now).0 < penalty {
            self.store(now, penalty);
        }
    }

    /// The estimate decayed toward zero since it was written, and the decay factor.
    fn decayed(&self, now: Instant) -> (f64, f64) {
        let stored = f64::from_bits(self.rtt_ns.load(Ordering::Relaxed));
        let at = self.at.load(Ordering::Relaxed);
        let now_ns = self.since_epoch(now);
        let elapsed = now_ns.saturating_sub(at) as f64;
        let decay = (-elapsed / DECAY.as_nanos() as f64).exp();
        (stored * decay, decay)
    }

    // Two relaxed stores, not one atomic update: a racing observation may be lost or
    // paired with the other's timestamp, which only blurs an estimate that is an
    // estimate anyway; no lock is taken per request.
    fn store(&self, now: Instant, rtt_ns: f64) {
        self.rtt_ns.store(rtt_ns.to_bits(), Ordering::Relaxed);
        self.at.store(self.since_epoch(now), Ordering::Relaxed);
    }

    fn since_epoch(&self, now: Instant) -> u64 {
        u64::try_from(now.saturating_duration_since(self.epoch).as_nanos()).unwrap_or(u64::MAX)
    }

    fn health(&self) -> MutexGuard<'_, Health> {
        // The state is a few counters, valid at every step: a panic elsewhere
        // cannot leave it half-written.
        self.health.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A request sent at `sent` succeeded at `now`.
    fn succeeded(&self, sent: Instant) {
        if !self.troubled.load(Ordering::Relaxed) {
            return;
        }
        let mut h = self.health();
        if h.ejected_at.is_some_and(|at| self.since_epoch(sent) < at) {
            return;
        }
        *h = Health {
            ejected_at: h.ejected_at,
            ..Health::default()
        };
        self.troubled.store(false, Ordering::Relaxed);
    }

    /// A request sent at `sent` failed at `now`: counts towards an ejection.
    fn failed_request(&self, sent: Instant, now: Instant, balancer: &Shared) {
        let mut h = self.health();
        let now_ns = self.since_epoch(now);
        // Sent before the last ejection: that failure was already accounted for (or
        // came too late to matter); ejection is invisible to requests in flight.
        if h.ejected_at.is_some_and(|at| self.since_epoch(sent) < at) {
            return;
        }
        h.consecutive = h.consecutive.saturating_add(1);
        self.troubled.store(true, Ordering::Relaxed);
        let o = &balancer.outlier;
        if o.consecutive_failures == 0 || !(h.probation || h.consecutive >= o.consecutive_failures)
        {
            return;
        }
        let _deciding = balancer.ejecting.lock().unwrap_or_else(|p| p.into_inner());
        let others = balancer
            .endpoints
            .iter()
            .filter(|e| e.addr != self.addr && !e.is_ejected_at(now))
            .count();
        if others == 0 {
            tracing::debug!(service = %o.service, endpoint = %self.addr, failures = h.consecutive,
                "not ejecting the last eligible endpoint");
            return;
        }
        h.ejections = h.ejections.saturating_add(1);
        let backoff = o.backoff(h.ejections);
        h.consecutive = 0;
        h.probation = true;
        h.ejected_at = Some(now_ns);
        let until = now_ns.saturating_add(u64::try_from(backoff.as_nanos()).unwrap_or(u64::MAX));
        self.ejected_until.store(until, Ordering::Relaxed);
        tracing::info!(service = %o.service, endpoint = %self.addr, ?backoff,
            in_a_row = h.ejections, "endpoint ejected after consecutive failures");
        if let Some(m) = &o.metrics {
            m.counter(
                OUTLIER_EJECTIONS,
                vec![Label::new("service", o.service.clone())],
            )
            .increment(1);
        }
    }
}

// === impl Outlier ===

impl Outlier {
    /// Settings for Service `service` (`namespace/name`); ejections are counted in
    /// `metrics` when given.
    pub fn new(
        service: SharedString,
        consecutive_failures: u32,
        base_ejection: Duration,
        max_ejection: Duration,
        metrics: Option<Arc<Metrics>>,
    ) -> Self {
        Self {
            consecutive_failures,
            base_ejection,
            max_ejection,
            service,
            metrics,
        }
    }

    /// The ejection after `n` in a row: the base, doubled per earlier one, capped.
    pub fn backoff(&self, n: u32) -> Duration {
        let doublings = n.saturating_sub(1).min(31);
        self.base_ejection
            .saturating_mul(1 << doublings)
            .min(self.max_ejection)
    }
}

impl std::fmt::Debug for Outlier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Outlier")
            .field("service", &&*self.service)
            .field("consecutive_failures", &self.consecutive_failures)
            .field("base_ejection", &self.base_ejection)
            .field("max_ejection", &self.max_ejection)
            .finish()
    }
}

impl Default for Outlier {
    fn default() -> Self {
        Self::new(
            SharedString::const_str("unknown"),
            DEFAULT_CONSECUTIVE_FAILURES,
            DEFAULT_BASE_EJECTION,
            DEFAULT_MAX_EJECTION,
            None,
        )
    }
}

// === impl Balancer ===

impl Balancer {
    /// A balancer over `endpoints` with the default outlier settings; `None` when
    /// there is none.
    pub fn new(endpoints: Vec<Arc<Endpoint>>) -> Option<Self> {
        Self::with_outlier(endpoints, Arc::new(Outlier::default()))
    }

    /// A balancer over `endpoints` that ejects by `outlier`; `None` when there is none.
    pub fn with_outlier(endpoints: Vec<Arc<Endpoint>>, outlier: Arc<Outlier>) -> Option<Self> {
        (!endpoints.is_empty()).then(|| Self {
            shared: Arc::new(Shared {
                endpoints: endpoints.into_boxed_slice(),
                outlier,
                ejecting: Mutex::new(()),
            }),
        })
    }

    /// The endpoints it picks from.
    pub fn endpoints(&self) -> &[Arc<Endpoint>] {
        &self.shared.endpoints
    }

    /// Picks an endpoint for one request, avoiding `exclude` (an endpoint that just
    /// failed) when there is another; `None` when only the excluded one is left.
    pub fn pick(&self, exclude: Option<SocketAddr>) -> Option<Pick> {
        self.pick_with(Instant::now(), random(), exclude)
    }

    /// [`Balancer::pick`] with the clock and the random draw given (for tests).
    pub fn pick_with(&self, now: Instant, r: u64, exclude: Option<SocketAddr>) -> Option<Pick> {
        let eps = &self.shared.endpoints;
        let n = eps.len();
        let eligible = |e: &Endpoint| Some(e.addr) != exclude && !e.is_ejected_at(now);
        let cheaper = |a: &'_ Arc<Endpoint>, b: &'_ Arc<Endpoint>| -> Arc<Endpoint> {
            // A tie keeps `a`, itself a random choice.
            if b.cost_at(now) < a.cost_at(now) * (1.0 - TIE_BAND) {
                b.clone()
            } else {
                a.clone()
            }
        };
        let chosen = if n == 1 {
            // The only endpoint is never ejected (nor skipped if it was).
            (Some(eps[0].addr) != exclude).then(|| eps[0].clone())
        } else {
            // Usually both of the random pair may take the request. Otherwise draw
            // again: accepting the first eligible pair keeps every eligible pair
            // equally likely. A few misses in a row (many ejected) go to a count.
            let mut r = r;
            let mut chosen = None;
            for _ in 0..4 {
                let (i, j) = pair(r, n);
                if eligible(&eps[i]) && eligible(&eps[j]) {
                    chosen = Some(cheaper(&eps[i], &eps[j]));
                    break;
                }
                r = mix(r);
            }
            chosen.or_else(|| {
                let ok = |e: &&Arc<Endpoint>| eligible(e);
                let not_excluded = |e: &&Arc<Endpoint>| Some(e.addr) != exclude;
                // Everything ejected (the guard keeps one, but an endpoint shared by
                // two Services can be ejected through the other): ignore ejection
                // rather than fail the request.
                let filter: &dyn Fn(&&Arc<Endpoint>) -> bool = if eps.iter().any(|e| ok(&e)) {
                    &ok
                } else {
                    &not_excluded
                };
                let m = eps.iter().filter(|e| filter(e)).count();
                let nth = |k: usize| eps.iter().filter(|e| filter(e)).nth(k);
                match m {
                    0 => None,
                    1 => nth(0).cloned(),
                    m => {
                        let (i, j) = pair(r, m);
                        Some(cheaper(nth(i)?, nth(j)?))
                    }
                }
            })
        }?;
        Some(Pick::new(chosen, self.shared.clone(), now))
    }
}

/// Two distinct indices below `n` (at least 2) from one draw.
fn pair(r: u64, n: usize) -> (usize, usize) {
    let i = (r as u32 as usize) % n;
    let mut j = ((r >> 32) as usize) % (n - 1);
    if j >= i {
        j += 1;
    }
    (i, j)
}

/// A new draw from an old one (a splitmix64 step).
fn mix(r: u64) -> u64 {
    let mut z = r.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

// === impl Pick ===

impl Pick {
    fn new(endpoint: Arc<Endpoint>, balancer: Arc<Shared>, start: Instant) -> Self {
        endpoint.pending.fetch_add(1, Ordering::Relaxed);
        Self {
            endpoint,
            balancer,
            start,
        }
    }

    /// Where the request goes.
    pub fn addr(&self) -> SocketAddr {
        self.endpoint.addr
    }

    /// The request leaves for the endpoint now (its connection is ready): latency
    /// counts from here.
    pub fn dispatched(&mut self) {
        self.dispatched_at(Instant::now());
    }

    /// [`Pick::dispatched`] at `now`.
    pub fn dispatched_at(&mut self, now: Instant) {
        self.start = now;
    }

    /// Response headers with `status` arrived: records the latency since dispatch,
    /// and the outcome for outlier detection ([`is_endpoint_failure`]).
    pub fn responded(self, status: StatusCode) {
        self.responded_at(Instant::now(), status);
    }

    /// [`Pick::responded`] at `now`.
    pub fn responded_at(self, now: Instant, status: StatusCode) {
        let rtt = now.saturating_duration_since(self.start);
        // A fast 503 is still a measured latency; ejection, not the estimate, is what
        // keeps requests away from an endpoint that answers only failures.
        self.endpoint.observe_at(now, rtt);
        tracing::trace!(endpoint = %self.endpoint.addr, ?rtt, %status, estimate_ns = self.endpoint.estimate_at(now), "answered");
        if is_endpoint_failure(status) {
            self.endpoint
                .failed_request(self.start, now, &self.balancer);
        } else {
            self.endpoint.succeeded(self.start);
        }
    }

    /// A successful answer: [`Pick::responded`] with 200.
    pub fn answered(self) {
        self.responded(StatusCode::OK);
    }

    /// The endpoint could not be reached (connect error or timeout, TLS handshake
    /// failure): its cost jumps and the failure counts towards an ejection.
    pub fn failed(self) {
        self.failed_at(Instant::now());
    }

    /// [`Pick::failed`] at `now`.
    pub fn failed_at(self, now: Instant) {
        self.endpoint.failed_at(now);
        self.endpoint
            .failed_request(self.start, now, &self.balancer);
    }
}

impl Drop for Pick {
    fn drop(&mut self) {
        self.endpoint.pending.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A cheap per-thread random number (xorshift64*, seeded per thread from the
/// std hasher's random keys): fairness needs no cryptography, and no lock or
/// allocation per request.
fn random() -> u64 {
    thread_local! {
        static STATE: Cell<u64> = Cell::new(RandomState::new().hash_one(0u64) | 1);
    }
    STATE.with(|s| {
        let mut x = s.get();
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        s.set(x);
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    })
}

#[cfg(test)]
mod tests;
