//! `meshlet-proxy`: reads its config from the environment and runs the sidecar.
#![forbid(unsafe_code)]

use std::process::ExitCode;

use meshlet_proxy::{cgroup, config::Env, wait_ready, Config, Error};

/// EX_USAGE: the configuration is unusable.
const EX_USAGE: u8 = 64;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        None => {}
        Some(wait_ready::COMMAND) => return wait(&args[1..]),
        Some(other) => {
            eprintln!(
                "meshlet-proxy: unknown command {other:?}; run it without arguments (the proxy) \
                 or as `meshlet-proxy {} [--timeout 60s]`",
                wait_ready::COMMAND
            );
            return ExitCode::from(EX_USAGE);
        }
    }
    let config = match Config::parse(&Env) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("meshlet-proxy: {e}");
            return ExitCode::from(EX_USAGE);
        }
    };
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(&config.log))
        .with_ansi(false)
        .init();

    let available = std::thread::available_parallelism().map_or(1, |n| n.get());
    let limit = cgroup::cpu_limit();
    let threads = cgroup::worker_threads(config.worker_threads, limit, available);
    tracing::info!(
        config = %serde_json::to_string(&config).unwrap_or_default(),
        worker_threads = threads,
        cpu_limit = ?limit,
        version = meshlet_api::VERSION,
        "starting meshlet-proxy"
    );

    // One worker runs on the main thread with no pool at all: the leanest setup for
    // the common sub-1-CPU sidecar limit.
    let runtime = if threads == 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        b.worker_threads(threads);
        b
    }
    .enable_all()
    .max_blocking_threads(2)
    .build();
    let runtime = match runtime {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("meshlet-proxy: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(meshlet_proxy::run(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            eprintln!("meshlet-proxy: {e}");
            match e {
                Error::Mesh(_) | Error::Control(_) => ExitCode::from(EX_USAGE),
                _ => ExitCode::FAILURE,
            }
        }
    }
}

/// `meshlet-proxy wait-ready`: one line, exit 0 when ready, 1 when not.
fn wait(args: &[String]) -> ExitCode {
    let w = match wait_ready::WaitReady::parse(args, &Env) {
        Ok(w) => w,
        Err(e) => {
            eprintln!("meshlet-proxy {}: {e}", wait_ready::COMMAND);
            return ExitCode::from(EX_USAGE);
        }
    };
    match w.run() {
        Ok(took) => {
            println!(
                "meshlet-proxy: ready (http://{}/ready answered 200 after {:.1}s)",
                w.admin,
                took.as_secs_f64()
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("meshlet-proxy: {e}");
            ExitCode::FAILURE
        }
    }
}
