//! meshlet-loadgen: open-loop fixed-rate (or closed-loop) HTTP/1.1 load; prints JSON.

use std::{io::Write, path::PathBuf};

use anyhow::{bail, Context};
use clap::Parser;
use meshlet_api::Duration;
use meshlet_bench::loadgen::{self, Pace};

/// Sends HTTP/1.1 requests at a fixed rate on a fixed timetable (latency counts from
/// the intended send time, as wrk2 does) and prints a JSON report.
#[derive(Parser, Debug)]
#[command(name = "meshlet-loadgen", version)]
struct Args {
    /// Target, e.g. http://198.18.0.2:8080/
    url: http::Uri,
    /// Requests per second, all connections together (open loop).
    #[arg(long, default_value_t = 1000.0, conflicts_with = "max_throughput")]
    rate: f64,
    /// Closed loop: send back to back on every connection to find the maximum rate.
    #[arg(long)]
    max_throughput: bool,
    /// Measured time (500ms, 30s, 1m).
    #[arg(long, default_value = "30s")]
    duration: Duration,
    /// Time sent before the measured window and not counted.
    #[arg(long, default_value = "5s")]
    warmup: Duration,
    /// Concurrent connections.
    #[arg(long, short = 'c', default_value_t = 8)]
    connections: usize,
    /// A new TCP connection for every request instead of keep-alive.
    #[arg(long)]
    new_connection_per_request: bool,
    /// Request body bytes (0: GET, more: POST).
    #[arg(long, default_value_t = 0)]
    body_size: usize,
    /// Longest a request may take before it counts as an error.
    #[arg(long, default_value = "5s")]
    timeout: Duration,
    /// Sample RSS and CPU of a process over the measured window: NAME=PID (repeatable).
    #[arg(long, value_parser = parse_watch)]
    watch: Vec<(String, u32)>,
    /// Write the JSON report here instead of stdout.
    #[arg(long, short = 'o')]
    output: Option<PathBuf>,
}

fn parse_watch(s: &str) -> Result<(String, u32), String> {
    let (name, pid) = s
        .split_once('=')
        .ok_or_else(|| format!("--watch {s:?}: write it as NAME=PID, e.g. proxy=1234"))?;
    let pid = pid
        .parse()
        .map_err(|_| format!("--watch {s:?}: {pid:?} is not a PID"))?;
    Ok((name.to_string(), pid))
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    // Timer slack (50 µs by default) delays every nanosleep wakeup; the pacing of the
    // timetable should be accurate to a few µs. Threads inherit it from here.
    if let Err(e) = nix::sys::prctl::set_timerslack(1_000) {
        eprintln!("meshlet-loadgen: cannot lower timer slack ({e}); pacing is coarser");
    }
    let cfg = loadgen::Config {
        url: args.url,
        pace: if args.max_throughput {
            Pace::MaxThroughput
        } else {
            Pace::Rate(args.rate)
        },
        duration: args.duration.as_std(),
        warmup: args.warmup.as_std(),
        connections: args.connections,
        new_connection_per_request: args.new_connection_per_request,
        body_size: args.body_size,
        timeout: args.timeout.as_std(),
        watch: args.watch,
    };
    let report = loadgen::run(&cfg)?;
    let json = serde_json::to_string_pretty(&report)?;
    match &args.output {
        Some(path) => std::fs::write(path, json + "\n")
            .with_context(|| format!("cannot write the report to {}", path.display()))?,
        None => writeln!(std::io::stdout(), "{json}")?,
    }
    let l = &report.latency_us;
    eprintln!(
        "meshlet-loadgen: {} ok, {} errors, {:.1} req/s; latency us p50 {:.1} p99 {:.1} p99.9 {:.1} max {:.1}",
        report.count, report.errors, report.achieved_rate, l.p50, l.p99, l.p999, l.max
    );
    if report.count == 0 {
        bail!(
            "no request succeeded ({}); check that the server listens at {}",
            report.first_error.as_deref().unwrap_or("no error recorded"),
            report.url
        );
    }
    Ok(())
}
