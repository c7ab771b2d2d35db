//! Request-level load balancing over a Service's ready endpoints.
//!
//! kube-proxy picks a backend per *connection*; a sidecar that pools connections
//! to the ClusterIP would pin every request of an app to one pod. So the outbound
//! HTTP path resolves a ClusterIP:port to its endpoints and picks one per *request*:
//! power of two choices (two endpoints at random, the cheaper wins) over a peak-EWMA
//! cost, as Linkerd's balancer does with tower's `PeakEwma`.
//!
//! Cost = latency estimate x (requests in flight + 1). The estimate jumps to any
//! slower observation (peak) and otherwise moves toward new observations with a
//! weight that grows with the time since the last one; between observations it decays
//! toward zero, so an endpoint nobody picked becomes cheap and gets probed again, and
//! equally fast endpoints take turns. New endpoints start at [`DEFAULT_RTT`], so they
//! tie and the random pair decides; costs within [`TIE_BAND`] of each other are ties
//! too (unlike tower, which compares exactly).
//!
//! Endpoint state ([`Endpoint`]) is shared, not per balancer: a config reload builds
//! new balancers that reuse the state of endpoints that stay (see
//! `mesh::Snapshot::new`), and a request in flight holds its [`Pick`], so a reload
//! neither drops it nor loses its measurement. Failures go through
//! [`Pick::failed`], the seam where outlier ejection will plug in.

use std::{
    cell::Cell,
    collections::hash_map::RandomState,
    hash::BuildHasher,
    net::SocketAddr,
    sync::{
        atomic::{AtomicU32, AtomicU64, Ordering},
        Arc,
    },
    time::Duration,
};

use tokio::time::Instant;

/// Estimate of an endpoint nothing is known about yet (Linkerd's default).
pub const DEFAULT_RTT: Duration = Duration::from_millis(30);
/// Time constant of the estimate's decay (Linkerd's default).
pub const DECAY: Duration = Duration::from_secs(10);
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

/// One endpoint's address and load, shared by every balancer that lists it.
#[derive(Debug)]
pub struct Endpoint {
    addr: SocketAddr,
    /// Requests picked and not yet answered.
    pending: AtomicU32,
    /// The estimate in nanoseconds (`f64` bits) as of `at`.
    rtt_ns: AtomicU64,
    /// When `rtt_ns` was written, in nanoseconds since `epoch`.
    at: AtomicU64,
    epoch: Instant,
}

/// Picks among a fixed set of endpoints; rebuilt on config reloads.
#[derive(Debug)]
pub struct Balancer {
    endpoints: Box<[Arc<Endpoint>]>,
}

/// A request's claim on an endpoint: counts as in flight until dropped.
#[derive(Debug)]
pub struct Pick {
    endpoint: Arc<Endpoint>,
    start: Instant,
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
            epoch: Instant::now(),
        })
    }

    /// Where requests go.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Requests in flight.
    pub fn pending(&self) -> u32 {
        self.pending.load(Ordering::Relaxed)
    }

    /// The latency estimate at `now`, in nanoseconds.
    pub fn estimate_at(&self, now: Instant) -> f64 {
        self.decayed(now).0
    }

    /// The load-weighted cost at `now`.
    pub fn cost_at(&self, now: Instant) -> f64 {
        self.estimate_at(now) * f64::from(self.pending() + 1)
    }

    /// Folds in an observed latency (time to response headers).
    pub fn observe_at(&self, now: Instant, rtt: Duration) {
        let rtt = rtt.as_nanos() as f64;
        let (est, decay) = self.decayed(now);
        let next = if rtt > est {
            rtt
        } else {
            est + rtt * (1.0 - decay)
        };
        self.store(now, next);
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
}

// === impl Balancer ===

impl Balancer {
    /// A balancer over `endpoints`; `None` when there is none.
    pub fn new(endpoints: Vec<Arc<Endpoint>>) -> Option<Self> {
        (!endpoints.is_empty()).then(|| Self {
            endpoints: endpoints.into_boxed_slice(),
        })
    }

    /// The endpoints it picks from.
    pub fn endpoints(&self) -> &[Arc<Endpoint>] {
        &self.endpoints
    }

    /// Picks an endpoint for one request, avoiding `exclude` (an endpoint that just
    /// failed) when there is another; `None` when only the excluded one is left.
    pub fn pick(&self, exclude: Option<SocketAddr>) -> Option<Pick> {
        self.pick_with(Instant::now(), random(), exclude)
    }

    /// [`Balancer::pick`] with the clock and the random draw given (for tests).
    pub fn pick_with(&self, now: Instant, r: u64, exclude: Option<SocketAddr>) -> Option<Pick> {
        let eps = &self.endpoints;
        let n = eps.len();
        let chosen = if n == 1 {
            &eps[0]
        } else {
            // Two distinct indices from one draw.
            let i = (r as u32 as usize) % n;
            let mut j = ((r >> 32) as usize) % (n - 1);
            if j >= i {
                j += 1;
            }
            let (a, b) = (&eps[i], &eps[j]);
            match exclude {
                Some(x) if a.addr == x => b,
                Some(x) if b.addr == x => a,
                // A tie keeps `a`, itself a random choice.
                _ if b.cost_at(now) < a.cost_at(now) * (1.0 - TIE_BAND) => b,
                _ => a,
            }
        };
        if Some(chosen.addr) == exclude {
            return None;
        }
        Some(Pick::new(chosen.clone(), now))
    }
}

// === impl Pick ===

impl Pick {
    fn new(endpoint: Arc<Endpoint>, start: Instant) -> Self {
        endpoint.pending.fetch_add(1, Ordering::Relaxed);
        Self { endpoint, start }
    }

    /// Where the request goes.
    pub fn addr(&self) -> SocketAddr {
        self.endpoint.addr
    }

    /// The request leaves for the endpoint now (its connection is ready): latency
    /// counts from here.
    pub fn dispatched(&mut self) {
        self.start = Instant::now();
    }

    /// The response headers arrived: records the latency since dispatch.
    pub fn answered(self) {
        let now = Instant::now();
        let rtt = now.saturating_duration_since(self.start);
        self.endpoint.observe_at(now, rtt);
        tracing::trace!(endpoint = %self.endpoint.addr, ?rtt, estimate_ns = self.endpoint.estimate_at(now), "answered");
    }

    /// The endpoint could not be reached. Outlier ejection will hook in here; for now
    /// the failure only raises the endpoint's cost.
    pub fn failed(self) {
        self.endpoint.failed_at(Instant::now());
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
