//! `meshlet-proxy`: reads its config from the environment and runs the sidecar.
#![forbid(unsafe_code)]

use std::process::ExitCode;

use meshlet_proxy::{cgroup, config::Env, Config, Error};

/// EX_USAGE: the configuration is unusable.
const EX_USAGE: u8 = 64;

fn main() -> ExitCode {
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
                Error::Mesh(_) => ExitCode::from(EX_USAGE),
                _ => ExitCode::FAILURE,
            }
        }
    }
}
