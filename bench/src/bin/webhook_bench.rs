//! meshlet-webhook-bench: open-loop fixed-rate AdmissionReviews over HTTPS; prints JSON.

use std::{io::Write, path::PathBuf};

use anyhow::{bail, Context};
use clap::Parser;
use http::{HeaderName, HeaderValue};
use meshlet_api::Duration;
use meshlet_bench::webhook::{self, ReviewTemplate};

/// POSTs an AdmissionReview to a webhook over HTTPS at a fixed rate on a fixed timetable
/// (latency counts from the intended send time), checks that every response is an
/// allowed review of the same uid with a JSON Patch, and prints a JSON report. Exits 1
/// when any review failed or was not injected.
#[derive(Parser, Debug)]
#[command(name = "meshlet-webhook-bench", version)]
struct Args {
    /// Webhook URL, e.g. https://127.0.0.1:8443/mutate
    url: http::Uri,
    /// PEM CA that signed the webhook's serving certificate.
    #[arg(long)]
    cacert: PathBuf,
    /// AdmissionReview v1 JSON to send (request.uid is replaced in every review).
    #[arg(long)]
    body_file: PathBuf,
    /// Extra request header `Name: value` (repeatable).
    #[arg(long, short = 'H', value_parser = parse_header)]
    header: Vec<(HeaderName, HeaderValue)>,
    /// Name to verify the certificate against (default: the URL's host).
    #[arg(long)]
    server_name: Option<String>,
    /// Reviews per second, all connections together.
    #[arg(long, default_value_t = 200.0)]
    rate: f64,
    /// Measured time (500ms, 30s, 1m).
    #[arg(long, default_value = "30s")]
    duration: Duration,
    /// Time sent (and checked) before the measured window, not timed.
    #[arg(long, default_value = "5s")]
    warmup: Duration,
    /// Concurrent connections.
    #[arg(long, short = 'c', default_value_t = 4)]
    connections: usize,
    /// A new TCP + TLS connection (full handshake) for every review instead of keep-alive.
    #[arg(long)]
    new_connection_per_request: bool,
    /// Longest a review may take before it counts as an error (the API server's
    /// default webhook timeout is 10s).
    #[arg(long, default_value = "5s")]
    timeout: Duration,
    /// Sample RSS and CPU of a process over the measured window: NAME=PID (repeatable).
    #[arg(long, value_parser = parse_watch)]
    watch: Vec<(String, u32)>,
    /// Write the JSON report here instead of stdout.
    #[arg(long, short = 'o')]
    output: Option<PathBuf>,
}

fn parse_header(s: &str) -> Result<(HeaderName, HeaderValue), String> {
    let (name, value) = s
        .split_once(':')
        .ok_or_else(|| format!("--header {s:?}: write it as 'Name: value'"))?;
    let name = HeaderName::from_bytes(name.trim().as_bytes())
        .map_err(|e| format!("--header {s:?}: bad name: {e}"))?;
    let value = HeaderValue::from_str(value.trim())
        .map_err(|e| format!("--header {s:?}: bad value: {e}"))?;
    Ok((name, value))
}

fn parse_watch(s: &str) -> Result<(String, u32), String> {
    let (name, pid) = s
        .split_once('=')
        .ok_or_else(|| format!("--watch {s:?}: write it as NAME=PID, e.g. injector=1234"))?;
    let pid = pid
        .parse()
        .map_err(|_| format!("--watch {s:?}: {pid:?} is not a PID"))?;
    Ok((name.to_string(), pid))
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    // Pacing to a few µs needs less than the default 50 µs timer slack.
    if let Err(e) = nix::sys::prctl::set_timerslack(1_000) {
        eprintln!("meshlet-webhook-bench: cannot lower timer slack ({e}); pacing is coarser");
    }
    let cfg = webhook::Config {
        url: args.url,
        ca_file: args.cacert,
        server_name: args.server_name,
        review: ReviewTemplate::from_file(&args.body_file)?,
        headers: args.header,
        rate: args.rate,
        duration: args.duration.as_std(),
        warmup: args.warmup.as_std(),
        connections: args.connections,
        new_connection_per_request: args.new_connection_per_request,
        timeout: args.timeout.as_std(),
        watch: args.watch,
    };
    let report = webhook::run(&cfg)?;
    let json = serde_json::to_string_pretty(&report)?;
    match &args.output {
        Some(path) => std::fs::write(path, json + "\n")
            .with_context(|| format!("cannot write the report to {}", path.display()))?,
        None => writeln!(std::io::stdout(), "{json}")?,
    }
    let l = &report.latency_us;
    eprintln!(
        "meshlet-webhook-bench: {} injected, {} not injected, {} errors, {:.1} reviews/s; \
         latency us p50 {:.1} p99 {:.1} p99.9 {:.1} max {:.1}",
        report.count,
        report.not_injected,
        report.errors,
        report.achieved_rate,
        l.p50,
        l.p99,
        l.p999,
        l.max
    );
    if report.injected_total != report.requests_sent || report.count == 0 {
        bail!(
            "{} of {} reviews were not answered with a patch; first: {}",
            report.requests_sent - report.injected_total,
            report.requests_sent,
            report.first_error.as_deref().unwrap_or("none recorded")
        );
    }
    Ok(())
}
