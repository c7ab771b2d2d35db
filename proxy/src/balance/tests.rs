use std::collections::VecDeque;

use super::*;

/// A deterministic stand-in for [`random`], so a run is reproducible.
struct Seq(u64);

impl Seq {
    fn next(&mut self) -> u64 {
        // splitmix64
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}

fn addr(i: usize) -> SocketAddr {
    SocketAddr::from(([198, 18, 0, 2 + i as u8], 8080))
}

/// Sends `requests` requests, one every `interval`, to endpoints that answer after
/// `latency[i]`; returns how many each endpoint got.
fn simulate(latency: &[Duration], requests: usize, interval: Duration, seed: u64) -> Vec<usize> {
    simulate_with(
        latency.len(),
        |i, _| latency[i],
        requests,
        interval,
        seed,
        Duration::ZERO,
    )
}

/// [`simulate`] with endpoint `i` answering its `k`th request after `latency(i, k)`,
/// the first request `idle` after the endpoints appeared.
fn simulate_with(
    n: usize,
    latency: impl Fn(usize, usize) -> Duration,
    requests: usize,
    interval: Duration,
    seed: u64,
    idle: Duration,
) -> Vec<usize> {
    let eps: Vec<_> = (0..n).map(|i| Endpoint::new(addr(i))).collect();
    let b = Balancer::new(eps).unwrap();
    let mut rng = Seq(seed);
    let mut now = Instant::now() + idle;
    let mut in_flight: VecDeque<(Instant, Pick)> = VecDeque::new();
    let mut counts = vec![0; n];
    for _ in 0..requests {
        now += interval;
        // Answer everything due by now, oldest deadline first.
        in_flight.make_contiguous().sort_by_key(|(due, _)| *due);
        while in_flight.front().is_some_and(|(due, _)| *due <= now) {
            let (due, pick) = in_flight.pop_front().unwrap();
            pick.endpoint
                .observe_at(due, due.saturating_duration_since(pick.start));
        }
        let pick = b.pick_with(now, rng.next(), None).unwrap();
        let i = (0..n).find(|i| addr(*i) == pick.addr()).unwrap();
        in_flight.push_back((now + latency(i, counts[i]), pick));
        counts[i] += 1;
    }
    counts
}

#[test]
fn equal_endpoints_share_evenly() {
    let ms = Duration::from_millis(1);
    // Sequential (each answered before the next) and concurrent (about 5 in flight).
    for (interval, what) in [(2 * ms, "sequential"), (ms / 5, "concurrent")] {
        for seed in 1..=5 {
            let counts = simulate(&[ms, ms, ms], 1000, interval, seed);
            eprintln!("{what}, seed {seed}: {counts:?}");
            assert_eq!(counts.iter().sum::<usize>(), 1000);
            for c in &counts {
                assert!(
                    c.abs_diff(333) <= 40,
                    "{what}, seed {seed}: 1000 requests over 3 equal endpoints landed {counts:?}"
                );
            }
        }
    }
}

#[test]
fn slow_endpoint_gets_fewer() {
    let ms = Duration::from_millis(1);
    for (interval, what) in [(2 * ms, "sequential"), (ms / 5, "concurrent")] {
        // Slower than the prior: its first answer is a peak, it is avoided at once.
        let counts = simulate(&[ms, ms, 50 * ms], 1000, interval, 7);
        eprintln!("{what}, 50 ms: {counts:?}");
        assert!(
            counts[2] < 50 && counts[0] > 400 && counts[1] > 400,
            "{what}: the 50 ms endpoint should get far fewer than the 1 ms ones: {counts:?}"
        );
        // Faster than the prior: learnt as the prior decays (DECAY), so fewer, not none.
        let counts = simulate(&[ms, ms, 10 * ms], 1000, interval, 7);
        eprintln!("{what}, 10 ms: {counts:?}");
        assert!(
            counts[2] < 300 && counts[2] < counts[0] && counts[2] < counts[1],
            "{what}: the 10 ms endpoint should get fewer than its third: {counts:?}"
        );
    }
}

#[test]
fn a_lone_slow_answer_does_not_starve_an_endpoint() {
    let ms = Duration::from_millis(1);
    // Endpoint 2's first answer is slower than the prior (a cold path), endpoint 1
    // hiccups once mid-run; every other answer takes 1 ms. The first request comes
    // a second after the endpoints appeared, as after a proxy's start.
    for seed in 1..=5 {
        let counts = simulate_with(
            3,
            |i, k| match (i, k) {
                (2, 0) => 60 * ms,
                (1, 100) => 60 * ms,
                _ => ms,
            },
            1000,
            2 * ms,
            seed,
            Duration::from_secs(1),
        );
        eprintln!("seed {seed}: {counts:?}");
        for c in &counts {
            assert!(
                c.abs_diff(333) <= 40,
                "seed {seed}: a single slow answer skewed 1000 requests to {counts:?}"
            );
        }
    }
}

#[test]
fn pending_requests_raise_the_cost() {
    let now = Instant::now();
    let a = Endpoint::new(addr(0));
    let idle = a.cost_at(now);
    let b = Balancer::new(vec![a.clone()]).unwrap();
    let p1 = b.pick_with(now, 0, None).unwrap();
    let p2 = b.pick_with(now, 1, None).unwrap();
    assert_eq!(a.pending(), 2);
    assert_eq!(a.cost_at(now), 3.0 * idle);
    drop((p1, p2));
    assert_eq!(a.pending(), 0, "dropping a pick ends it, answered or not");
}

#[test]
fn estimate_takes_peaks_then_decays() {
    let e = Endpoint::new(addr(0));
    let t0 = Instant::now();
    let ms = |n: u64| Duration::from_millis(n).as_nanos() as f64;
    // Within 1 us: the endpoint's clock started a moment before t0.
    let close = |a: f64, b: f64| (a - b).abs() < 1e3;
    assert!(
        close(e.estimate_at(t0), ms(30)),
        "unknown starts at the default"
    );
    e.observe_at(t0, Duration::from_millis(80));
    assert!(
        e.estimate_at(t0) < ms(31),
        "a lone slower answer is not a peak yet"
    );
    e.observe_at(t0, Duration::from_millis(80));
    assert!(
        close(e.estimate_at(t0), ms(80)),
        "a second slower answer in a row is taken at once"
    );
    let peak = e.peak_at(t0 + PEAK_DECAY);
    assert!(
        close(peak, ms(80) / std::f64::consts::E),
        "the peak decays by e per PEAK_DECAY: {peak}"
    );
    // Beneath it, the average: the prior and the two answers, weighted by time.
    let later = t0 + DECAY;
    let decayed = e.estimate_at(later);
    assert!(
        close(decayed, ms(30) / std::f64::consts::E),
        "the average decays by e per DECAY: {decayed}"
    );
    // A fast answer resets the pending peak; a lone slow one right after it moves
    // the average by its time weight, which is zero at the same instant.
    e.observe_at(later, Duration::from_millis(1));
    let before = e.estimate_at(later);
    e.observe_at(later, Duration::from_millis(60));
    let est = e.estimate_at(later);
    assert!(
        close(est, before) && est < ms(30),
        "a lone slower answer is no peak: {est}"
    );
}

#[test]
fn failover_avoids_the_failed_endpoint() {
    let now = Instant::now();
    let b = Balancer::new((0..3).map(|i| Endpoint::new(addr(i))).collect()).unwrap();
    let mut rng = Seq(3);
    for _ in 0..100 {
        let p = b.pick_with(now, rng.next(), Some(addr(1))).unwrap();
        assert_ne!(p.addr(), addr(1));
    }
    let one = Balancer::new(vec![Endpoint::new(addr(0))]).unwrap();
    assert!(one.pick_with(now, 0, Some(addr(0))).is_none());
    assert!(Balancer::new(Vec::new()).is_none());

    // A failed endpoint loses every comparison with a healthy one afterwards.
    b.endpoints()[1].failed_at(now);
    let mut hits = 0;
    for _ in 0..300 {
        if b.pick_with(now, rng.next(), None).unwrap().addr() == addr(1) {
            hits += 1;
        }
    }
    assert_eq!(hits, 0, "the failed endpoint was picked {hits} times");
}

#[test]
fn random_draws_spread() {
    let mut seen = [0usize; 3];
    for _ in 0..3000 {
        seen[(random() % 3) as usize] += 1;
    }
    assert!(seen.iter().all(|c| c.abs_diff(1000) < 200), "{seen:?}");
}

// === outlier detection ===

const MS: Duration = Duration::from_millis(1);
const S: Duration = Duration::from_secs(1);

/// A balancer over `n` endpoints ejecting after 5 failures, 1 s doubling to 30 s.
fn outlier_balancer(n: usize) -> Balancer {
    let eps = (0..n).map(|i| Endpoint::new(addr(i))).collect();
    Balancer::with_outlier(eps, Arc::new(Outlier::default())).unwrap()
}

/// A pick of endpoint `i`, as if the balancer had chosen it at `now`.
fn pick_of(b: &Balancer, i: usize, now: Instant) -> Pick {
    Pick::new(b.shared.endpoints[i].clone(), b.shared.clone(), now)
}

/// `k` requests to endpoint `i` sent at `now`, each answered `status` at once.
fn answer(b: &Balancer, i: usize, now: Instant, k: usize, status: u16) {
    for _ in 0..k {
        pick_of(b, i, now).responded_at(now, StatusCode::from_u16(status).unwrap());
    }
}

/// How many of 300 picks at `now` land on each endpoint.
fn spread(b: &Balancer, now: Instant, seed: u64) -> Vec<usize> {
    let mut rng = Seq(seed);
    let n = b.endpoints().len();
    let mut counts = vec![0; n];
    for _ in 0..300 {
        let p = b.pick_with(now, rng.next(), None).unwrap();
        counts[(0..n).find(|i| addr(*i) == p.addr()).unwrap()] += 1;
    }
    counts
}

#[test]
fn gateway_failures_count_other_statuses_do_not() {
    for code in [502, 503, 504] {
        assert!(is_endpoint_failure(StatusCode::from_u16(code).unwrap()));
    }
    for code in [200, 204, 301, 404, 429, 500, 501, 505] {
        assert!(
            !is_endpoint_failure(StatusCode::from_u16(code).unwrap()),
            "{code}"
        );
    }
}

#[test]
fn ejected_at_the_threshold_and_skipped() {
    let b = outlier_balancer(3);
    let t = Instant::now();
    let e = &b.endpoints()[0];
    answer(&b, 0, t, 4, 503);
    assert!(
        !e.is_ejected_at(t),
        "4 failures are below the threshold of 5"
    );
    // A 500 is an answer of a working endpoint: it breaks the run (as in Envoy's
    // gateway failure count).
    answer(&b, 0, t, 1, 500);
    answer(&b, 0, t, 4, 503);
    assert!(!e.is_ejected_at(t));
    answer(&b, 0, t, 1, 503);
    assert!(
        e.is_ejected_at(t),
        "the 5th gateway failure in a row ejects"
    );
    let counts = spread(&b, t, 11);
    assert_eq!(counts[0], 0, "an ejected endpoint was picked: {counts:?}");
    assert!(
        counts[1].abs_diff(150) < 40 && counts[2].abs_diff(150) < 40,
        "the two left should share: {counts:?}"
    );
    // Connect failures count the same way.
    let t = t + 5 * S;
    for _ in 0..5 {
        pick_of(&b, 1, t).failed_at(t);
    }
    assert!(b.endpoints()[1].is_ejected_at(t + MS));
}

#[test]
fn a_success_resets_the_count() {
    let b = outlier_balancer(3);
    let t = Instant::now();
    answer(&b, 0, t, 4, 502);
    answer(&b, 0, t, 1, 200);
    answer(&b, 0, t, 4, 504);
    assert!(
        !b.endpoints()[0].is_ejected_at(t),
        "4 + 4 failures split by a success are not 5 in a row"
    );
    answer(&b, 0, t, 1, 504);
    assert!(b.endpoints()[0].is_ejected_at(t));
}

#[test]
fn backoff_grows_while_failing_and_resets_after_a_success() {
    let b = outlier_balancer(3);
    let e = b.endpoints()[0].clone();
    let mut t = Instant::now();
    answer(&b, 0, t, 5, 503);
    // Each ejection in a row doubles, capped at 30 s; back on probation, the first
    // failure ejects again.
    for want in [1, 2, 4, 8, 16, 30, 30] {
        let want = want * S;
        assert!(
            e.is_ejected_at(t + want - MS),
            "still ejected before {want:?}"
        );
        assert!(!e.is_ejected_at(t + want), "back after {want:?}");
        t += want;
        assert!(spread(&b, t, 5)[0] > 0, "it takes requests again");
        answer(&b, 0, t, 1, 503);
    }
    // A success on probation clears it: one failure no longer ejects, and the next
    // ejection is back to the base.
    t += 30 * S;
    assert!(!e.is_ejected_at(t));
    answer(&b, 0, t, 1, 200);
    answer(&b, 0, t, 4, 503);
    assert!(!e.is_ejected_at(t));
    answer(&b, 0, t, 1, 503);
    assert!(e.is_ejected_at(t + S - MS) && !e.is_ejected_at(t + S));
}

#[test]
fn the_last_eligible_endpoint_is_never_ejected() {
    let one = outlier_balancer(1);
    let t = Instant::now();
    answer(&one, 0, t, 50, 503);
    assert!(!one.endpoints()[0].is_ejected_at(t));
    assert!(one.pick_with(t, 0, None).is_some());

    let b = outlier_balancer(2);
    // Endpoint clocks start when they are made; a fake clock starts after.
    let t = Instant::now();
    answer(&b, 0, t, 5, 503);
    assert!(b.endpoints()[0].is_ejected_at(t));
    answer(&b, 1, t, 20, 503);
    assert!(
        !b.endpoints()[1].is_ejected_at(t),
        "the other one is ejected: this one stays"
    );
    assert_eq!(spread(&b, t, 3), vec![0, 300]);
    // Once the first is back, the second goes at its next failure (it is far over
    // the threshold) and the first takes everything.
    let t = t + S;
    answer(&b, 1, t, 1, 503);
    assert!(b.endpoints()[1].is_ejected_at(t));
    assert_eq!(spread(&b, t, 3), vec![300, 0]);

    // Ejected through another balancer (an endpoint shared by two Services) so that
    // none is left: picks ignore ejection rather than fail.
    let shared = b.endpoints()[0].clone();
    let other = Balancer::with_outlier(
        vec![shared.clone(), Endpoint::new(addr(5))],
        Arc::new(Outlier::default()),
    )
    .unwrap();
    answer(&other, 0, t, 1, 503);
    assert!(shared.is_ejected_at(t) && b.endpoints()[1].is_ejected_at(t));
    assert_eq!(spread(&b, t, 3).iter().sum::<usize>(), 300);
}

#[test]
fn ejection_is_invisible_to_requests_in_flight() {
    let b = outlier_balancer(3);
    let t = Instant::now();
    let e = b.endpoints()[0].clone();
    // Three requests leave, then five failures eject the endpoint.
    let mut in_flight: Vec<Pick> = (0..3).map(|_| pick_of(&b, 0, t)).collect();
    answer(&b, 0, t + MS, 5, 503);
    assert!(e.is_ejected_at(t + MS));
    assert_eq!(e.pending(), 3, "the requests in flight keep their picks");
    // Their outcomes date from before the ejection: a failure does not eject again
    // (on probation it would), a success does not clear the probation.
    let late = t + 2 * S;
    in_flight
        .pop()
        .unwrap()
        .responded_at(late, StatusCode::SERVICE_UNAVAILABLE);
    in_flight.pop().unwrap().responded_at(late, StatusCode::OK);
    assert!(
        !e.is_ejected_at(late),
        "the stale failure extended the ejection"
    );
    in_flight.pop().unwrap().failed_at(late);
    assert!(!e.is_ejected_at(late));
    answer(&b, 0, late, 1, 503);
    assert!(
        e.is_ejected_at(late),
        "still on probation: the first fresh failure ejects again"
    );
    assert!(e.is_ejected_at(late + 2 * S - MS) && !e.is_ejected_at(late + 2 * S));
}

#[test]
fn zero_consecutive_failures_never_ejects() {
    let off = Outlier::new(SharedString::const_str("shop/web"), 0, S, 30 * S, None);
    let b = Balancer::with_outlier(
        (0..3).map(|i| Endpoint::new(addr(i))).collect(),
        Arc::new(off),
    )
    .unwrap();
    let t = Instant::now();
    answer(&b, 0, t, 100, 503);
    assert!(!b.endpoints()[0].is_ejected_at(t));
}

#[test]
fn backoff_is_capped() {
    let o = Outlier::new(SharedString::const_str("a/b"), 5, 3 * S, 10 * S, None);
    let got: Vec<Duration> = (1..=5).map(|n| o.backoff(n)).collect();
    assert_eq!(got, vec![3 * S, 6 * S, 10 * S, 10 * S, 10 * S]);
    assert_eq!(o.backoff(u32::MAX), 10 * S, "no overflow");
}
