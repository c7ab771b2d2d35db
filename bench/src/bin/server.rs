//! meshlet-bench-server: answers every HTTP/1.1 request with a fixed body.

use std::net::SocketAddr;

use anyhow::Context;
use clap::Parser;
use meshlet_bench::server::{self, ServerConfig};

/// A minimal upstream for benchmarks: fixed-size response, keep-alive.
#[derive(Parser, Debug)]
#[command(name = "meshlet-bench-server", version)]
struct Args {
    /// Address to listen on.
    #[arg(long, default_value = "0.0.0.0:8080")]
    listen: SocketAddr,
    /// Response body bytes.
    #[arg(long, default_value_t = 100)]
    body_size: usize,
    /// Worker threads (1 keeps the app's share of a small machine fixed).
    #[arg(long, default_value_t = 1)]
    threads: usize,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let rt = if args.threads <= 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(args.threads)
            .enable_all()
            .build()
    }
    .context("cannot start the tokio runtime")?;
    rt.block_on(async {
        let listener = tokio::net::TcpListener::bind(args.listen)
            .await
            .with_context(|| format!("cannot listen on {}: is the port taken?", args.listen))?;
        eprintln!("meshlet-bench-server: listening on {}", args.listen);
        server::serve(listener, ServerConfig::fixed(args.body_size))
            .await
            .context("server stopped")
    })
}
