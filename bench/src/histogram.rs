//! A log-linear latency histogram in the spirit of HdrHistogram: exact below 256 ns,
//! then 128 linear sub-buckets per power of two, so every recorded value is kept within
//! 1/128 (0.8 %) of its true value in fixed memory whatever the run length.

use serde::Serialize;

/// Values below this are counted exactly, one bucket per nanosecond.
const EXACT: u64 = 256;
/// Linear sub-buckets per power of two above [`EXACT`].
const SUB: u64 = 128;
/// 256 exact buckets, then 56 octaves (2^8 .. 2^64) of 128 sub-buckets.
const BUCKETS: usize = (EXACT + 56 * SUB) as usize;

/// Counts of latencies in nanoseconds.
#[derive(Clone)]
pub struct Histogram {
    counts: Vec<u64>,
    total: u64,
    sum: u128,
    min: u64,
    max: u64,
}

/// Percentiles of a histogram, in microseconds (fractional).
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Summary {
    /// Number of values.
    pub count: u64,
    /// Smallest value.
    pub min: f64,
    /// Arithmetic mean.
    pub mean: f64,
    /// Median.
    pub p50: f64,
    /// 90th percentile.
    pub p90: f64,
    /// 99th percentile.
    pub p99: f64,
    /// 99.9th percentile.
    pub p999: f64,
    /// Largest value (exact).
    pub max: f64,
}

impl Default for Histogram {
    fn default() -> Self {
        Self::new()
    }
}

// === impl Histogram ===

impl Histogram {
    /// An empty histogram.
    pub fn new() -> Self {
        Self {
            counts: vec![0; BUCKETS],
            total: 0,
            sum: 0,
            min: u64::MAX,
            max: 0,
        }
    }

    fn index(v: u64) -> usize {
        if v < EXACT {
            return v as usize;
        }
        let octave = 63 - u64::from(v.leading_zeros()); // 8..=63
        let shift = octave - 7;
        let mantissa = v >> shift; // 128..=255
        (EXACT + (octave - 8) * SUB + (mantissa - SUB)) as usize
    }

    /// The midpoint of a bucket: the value reported for everything counted in it.
    fn value(index: usize) -> u64 {
        let i = index as u64;
        if i < EXACT {
            return i;
        }
        let octave = (i - EXACT) / SUB + 8;
        let mantissa = (i - EXACT) % SUB + SUB;
        let shift = octave - 7;
        let low = mantissa << shift;
        low + ((1u64 << shift) >> 1)
    }

    /// Counts one value (nanoseconds).
    pub fn record(&mut self, nanos: u64) {
        self.counts[Self::index(nanos)] += 1;
        self.total += 1;
        self.sum += u128::from(nanos);
        self.min = self.min.min(nanos);
        self.max = self.max.max(nanos);
    }

    /// Adds all counts of `other`.
    pub fn merge(&mut self, other: &Histogram) {
        for (a, b) in self.counts.iter_mut().zip(&other.counts) {
            *a += b;
        }
        self.total += other.total;
        self.sum += other.sum;
        self.min = self.min.min(other.min);
        self.max = self.max.max(other.max);
    }

    /// Number of values counted.
    pub fn len(&self) -> u64 {
        self.total
    }

    /// Whether nothing was counted.
    pub fn is_empty(&self) -> bool {
        self.total == 0
    }

    /// The value (nanoseconds) at quantile `q` in `[0, 1]`: the smallest recorded value
    /// such that at least `q` of all values are at or below it (nearest rank).
    pub fn quantile(&self, q: f64) -> u64 {
        if self.total == 0 {
            return 0;
        }
        let rank = ((q.clamp(0.0, 1.0) * self.total as f64).ceil() as u64).max(1);
        if rank >= self.total {
            return self.max;
        }
        let mut seen = 0;
        for (i, c) in self.counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                // The bucket midpoint may lie outside what was seen; never report a
                // value beyond the exact extremes.
                return Self::value(i).clamp(self.min, self.max);
            }
        }
        self.max
    }

    /// Percentiles in microseconds.
    pub fn summary(&self) -> Summary {
        if self.total == 0 {
            return Summary::default();
        }
        let us = |ns: u64| ns as f64 / 1000.0;
        Summary {
            count: self.total,
            min: us(self.min),
            mean: (self.sum as f64 / self.total as f64) / 1000.0,
            p50: us(self.quantile(0.50)),
            p90: us(self.quantile(0.90)),
            p99: us(self.quantile(0.99)),
            p999: us(self.quantile(0.999)),
            max: us(self.max),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Nearest-rank quantile of a sorted slice, the reference the histogram approximates.
    fn exact(sorted: &[u64], q: f64) -> u64 {
        let rank = ((q * sorted.len() as f64).ceil() as usize).max(1);
        sorted[rank - 1]
    }

    #[test]
    fn index_and_value_round_trip_within_precision() {
        let mut v = 1u64;
        while v < u64::MAX / 3 {
            for x in [v, v + 1, v * 3 / 2] {
                let back = Histogram::value(Histogram::index(x));
                let err = (back as f64 - x as f64).abs() / x as f64;
                assert!(err <= 1.0 / 128.0, "{x} -> {back}");
            }
            v *= 2;
        }
        assert_eq!(Histogram::index(255), 255);
        assert_eq!(Histogram::index(256), 256);
        assert_eq!(Histogram::index(u64::MAX), BUCKETS - 1);
    }

    #[test]
    fn quantiles_match_sorted_reference() {
        // A skewed, deterministic pseudo-random sample (xorshift), 1 us .. 50 ms.
        let mut s = 0x2545_f491_4f6c_dd1du64;
        let mut values = Vec::new();
        let mut h = Histogram::new();
        for _ in 0..100_000 {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            let v = 1_000 + (s % 1_000_000) * (s % 50);
            values.push(v);
            h.record(v);
        }
        values.sort_unstable();
        for q in [0.0, 0.5, 0.9, 0.99, 0.999, 1.0] {
            let want = exact(&values, q);
            let got = h.quantile(q);
            let err = (got as f64 - want as f64).abs() / want as f64;
            assert!(err <= 1.0 / 128.0, "q={q}: want {want} got {got}");
        }
        assert_eq!(h.quantile(1.0), *values.last().unwrap());
        assert_eq!(h.len(), 100_000);
    }

    #[test]
    fn merge_adds_counts_and_extremes() {
        let mut a = Histogram::new();
        let mut b = Histogram::new();
        for v in 1..=100u64 {
            a.record(v * 1000);
        }
        b.record(5_000_000);
        a.merge(&b);
        let s = a.summary();
        assert_eq!(s.count, 101);
        assert_eq!(s.max, 5000.0);
        assert_eq!(s.min, 1.0);
        assert!((s.p50 - 51.0).abs() < 0.5, "{s:?}");
    }

    #[test]
    fn empty_summary_is_zero() {
        assert_eq!(Histogram::new().summary(), Summary::default());
        assert_eq!(Histogram::new().quantile(0.99), 0);
    }
}
