//! Retry budgets per destination Service, the Gateway API way (`XBackendTrafficPolicy`
//! `retryConstraint`, GEP-3388): retries are allowed while the retries of the last
//! `budget.interval` stay within `budget.percent` of the requests of that interval, and
//! always while the last `minRetryRate.interval` saw fewer than `minRetryRate.count`
//! retries (so a quiet Service can still retry at all).
//!
//! Retries do not count as requests: a backend failing everything receives at most
//! `(1 + percent/100)` times the clients' requests plus the floor, which is what keeps a
//! retry storm from multiplying an outage. Counts live in a ring of time slots per
//! window, so old traffic leaves the window in steps of a tenth of it.

use std::{sync::Mutex, time::Duration};

use meshlet_api::config::RetryConstraint;
use tokio::time::Instant;

/// Slots per window: the window slides in steps of a tenth of its length.
const SLOTS: usize = 10;

/// One Service's budget; shared by every connection and request that goes to it, and
/// kept across config reloads while its settings stay the same.
#[derive(Debug)]
pub struct RetryBudget {
    constraint: RetryConstraint,
    state: Mutex<State>,
}

#[derive(Debug)]
struct State {
    epoch: Instant,
    budget: Window,
    floor: Window,
}

/// Requests and retries over a sliding window of `SLOTS` slots.
#[derive(Debug)]
struct Window {
    slot: Duration,
    /// (slot number since the epoch, requests, retries).
    slots: [(u64, u64, u64); SLOTS],
}

// === impl RetryBudget ===

impl RetryBudget {
    /// A budget with `constraint`'s settings (the defaults when `None`).
    pub fn new(constraint: Option<&RetryConstraint>) -> Self {
        let constraint = constraint.cloned().unwrap_or_default();
        let now = Instant::now();
        Self {
            state: Mutex::new(State {
                epoch: now,
                budget: Window::new(constraint.budget.interval.as_std()),
                floor: Window::new(constraint.min_retry_rate.interval.as_std()),
            }),
            constraint,
        }
    }

    /// The settings it enforces.
    pub fn constraint(&self) -> &RetryConstraint {
        &self.constraint
    }

    /// Counts one request from a client.
    pub fn deposit(&self) {
        self.deposit_at(Instant::now());
    }

    /// Asks for one retry; counts it when allowed.
    pub fn try_withdraw(&self) -> bool {
        self.try_withdraw_at(Instant::now())
    }

    /// [`RetryBudget::deposit`] at `now`.
    pub fn deposit_at(&self, now: Instant) {
        let mut s = self.lock();
        let t = now.saturating_duration_since(s.epoch);
        s.budget.add(t, 1, 0);
    }

    /// [`RetryBudget::try_withdraw`] at `now`.
    pub fn try_withdraw_at(&self, now: Instant) -> bool {
        let mut s = self.lock();
        let t = now.saturating_duration_since(s.epoch);
        let (requests, retries) = s.budget.sum(t);
        let (_, recent) = s.floor.sum(t);
        let within_budget =
            (retries + 1) * 100 <= requests * u64::from(self.constraint.budget.percent);
        let within_floor = recent < u64::from(self.constraint.min_retry_rate.count);
        if !(within_budget || within_floor) {
            return false;
        }
        s.budget.add(t, 0, 1);
        s.floor.add(t, 0, 1);
        true
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

// === impl Window ===

impl Window {
    fn new(interval: Duration) -> Self {
        Self {
            // Validation keeps intervals at 1s or more; never a zero slot.
            slot: (interval / SLOTS as u32).max(Duration::from_millis(1)),
            slots: [(u64::MAX, 0, 0); SLOTS],
        }
    }

    fn index(&self, t: Duration) -> u64 {
        (t.as_nanos() / self.slot.as_nanos()) as u64
    }

    fn add(&mut self, t: Duration, requests: u64, retries: u64) {
        let n = self.index(t);
        let s = &mut self.slots[(n % SLOTS as u64) as usize];
        if s.0 != n {
            *s = (n, 0, 0);
        }
        s.1 += requests;
        s.2 += retries;
    }

    /// Requests and retries of the slots still inside the window at `t`.
    fn sum(&self, t: Duration) -> (u64, u64) {
        let n = self.index(t);
        self.slots
            .iter()
            .filter(|s| s.0 != u64::MAX && s.0 <= n && n - s.0 < SLOTS as u64)
            .fold((0, 0), |(a, b), s| (a + s.1, b + s.2))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use meshlet_api::{
        config::{RetryBudget as Budget, RetryRate},
        Duration as ApiDuration,
    };

    fn constraint(percent: u32, floor: u32) -> RetryConstraint {
        RetryConstraint {
            budget: Budget {
                percent,
                interval: ApiDuration::from_secs(10),
            },
            min_retry_rate: RetryRate {
                count: floor,
                interval: ApiDuration::from_secs(1),
            },
        }
    }

    #[test]
    fn retries_stay_within_percent_of_requests() {
        let b = RetryBudget::new(Some(&constraint(20, 0)));
        let now = Instant::now();
        assert!(!b.try_withdraw_at(now), "no requests, no floor: nothing");
        for _ in 0..100 {
            b.deposit_at(now);
        }
        let allowed = (0..100).filter(|_| b.try_withdraw_at(now)).count();
        assert_eq!(allowed, 20, "20% of 100 requests");
    }

    #[test]
    fn floor_allows_retries_per_interval() {
        let b = RetryBudget::new(Some(&constraint(20, 3)));
        let t0 = Instant::now();
        assert_eq!((0..10).filter(|_| b.try_withdraw_at(t0)).count(), 3);
        // A second later the floor's window has moved on; the budget's (10 s) still
        // holds the 3 retries but has no requests, so only the floor allows.
        let t1 = t0 + Duration::from_millis(1001);
        assert_eq!((0..10).filter(|_| b.try_withdraw_at(t1)).count(), 3);
    }

    #[test]
    fn old_traffic_leaves_the_window() {
        let b = RetryBudget::new(Some(&constraint(50, 0)));
        let t0 = Instant::now();
        for _ in 0..10 {
            b.deposit_at(t0);
        }
        assert_eq!((0..10).filter(|_| b.try_withdraw_at(t0)).count(), 5);
        // Within the window the budget is spent...
        assert!(!b.try_withdraw_at(t0 + Duration::from_secs(9)));
        // ...and once the requests and retries slid out, nothing is left either.
        let later = t0 + Duration::from_secs(11);
        assert!(!b.try_withdraw_at(later));
        b.deposit_at(later);
        b.deposit_at(later);
        assert!(b.try_withdraw_at(later), "new requests refill it");
        assert!(!b.try_withdraw_at(later));
    }

    #[test]
    fn defaults_are_the_gateway_apis() {
        let b = RetryBudget::new(None);
        let c = b.constraint();
        assert_eq!((c.budget.percent, c.min_retry_rate.count), (20, 10));
        let now = Instant::now();
        assert_eq!((0..50).filter(|_| b.try_withdraw_at(now)).count(), 10);
    }
}
