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
    let eps: Vec<_> = (0..latency.len()).map(|i| Endpoint::new(addr(i))).collect();
    let b = Balancer::new(eps).unwrap();
    let mut rng = Seq(seed);
    let mut now = Instant::now();
    let mut in_flight: VecDeque<(Instant, Pick)> = VecDeque::new();
    let mut counts = vec![0; latency.len()];
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
        let i = (0..latency.len())
            .find(|i| addr(*i) == pick.addr())
            .unwrap();
        counts[i] += 1;
        in_flight.push_back((now + latency[i], pick));
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
fn pending_requests_raise_the_cost() {
    let now = Instant::now();
    let a = Endpoint::new(addr(0));
    let idle = a.cost_at(now);
    let p1 = Pick::new(a.clone(), now);
    let p2 = Pick::new(a.clone(), now);
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
        close(e.estimate_at(t0), ms(80)),
        "a slower answer is taken at once"
    );
    let later = t0 + DECAY;
    let decayed = e.estimate_at(later);
    assert!(
        close(decayed, ms(80) / std::f64::consts::E),
        "decays by e per DECAY: {decayed}"
    );
    e.observe_at(later, Duration::from_millis(1));
    let est = e.estimate_at(later);
    assert!(
        est < ms(80) && est > ms(1),
        "a faster answer pulls it down gradually: {est}"
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
