//! The timetable every fixed-rate generator of this crate shares: one OS thread per
//! connection, every connection up before the plan is fixed (so connect time never
//! lands in the first samples), then all workers start on the same plan.

use std::{
    io,
    sync::{Barrier, OnceLock},
    thread,
    time::{Duration, Instant},
};

use crate::loadgen::ProcessReport;

/// The shared timetable of one run.
#[derive(Clone, Copy)]
pub(crate) struct Plan {
    /// When the first request is due.
    pub start: Instant,
    /// End of the warmup: samples from here on count.
    pub measure_from: Instant,
    /// When the last request is due.
    pub end: Instant,
}

/// What a worker gets: its index, the two barriers and the plan to read after `go`.
pub(crate) struct Slot<'a> {
    pub k: usize,
    pub connected: &'a Barrier,
    pub go: &'a Barrier,
    pub plan: &'a OnceLock<Plan>,
}

/// Runs `connections` workers named `<name>-<k>` on one plan of `warmup` + `duration`,
/// watching processes over the measured window with `watch`. A worker that panics is
/// replaced by `panicked()`; a thread that cannot be spawned is an error, after the
/// workers already started are released with a plan that ends at once.
pub(crate) fn run<R: Send>(
    connections: usize,
    warmup: Duration,
    duration: Duration,
    name: &str,
    worker: impl Fn(Slot<'_>) -> R + Sync,
    panicked: impl Fn() -> R,
    watch: impl FnOnce(Instant, Instant) -> Vec<ProcessReport>,
) -> io::Result<(Vec<R>, Vec<ProcessReport>)> {
    let connected = Barrier::new(connections + 1);
    let go = Barrier::new(connections + 1);
    let plan = OnceLock::new();
    thread::scope(|s| {
        let mut handles = Vec::with_capacity(connections);
        for k in 0..connections {
            let slot = Slot {
                k,
                connected: &connected,
                go: &go,
                plan: &plan,
            };
            let worker = &worker;
            let h = thread::Builder::new()
                .name(format!("{name}-{k}"))
                .spawn_scoped(s, move || worker(slot));
            match h {
                Ok(h) => handles.push(h),
                Err(e) => {
                    // The workers already started wait at the barriers; they cannot be
                    // released without a plan, so give them one that ends at once.
                    let now = Instant::now();
                    let _ = plan.set(Plan {
                        start: now,
                        measure_from: now,
                        end: now,
                    });
                    for _ in handles.len()..connections {
                        connected.wait();
                        go.wait();
                    }
                    return Err(e);
                }
            }
        }
        connected.wait();
        let start = Instant::now() + Duration::from_millis(10);
        let p = Plan {
            start,
            measure_from: start + warmup,
            end: start + warmup + duration,
        };
        let _ = plan.set(p);
        go.wait();
        let processes = watch(p.measure_from, p.end);
        let results = handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|_| panicked()))
            .collect();
        Ok((results, processes))
    })
}
