//! meshlet-floor: one half of the floor pair, a minimal mTLS L4 forwarder (see
//! `meshlet_bench::floor`).

use std::{net::SocketAddr, path::PathBuf};

use anyhow::Context;
use clap::{Parser, ValueEnum};
use meshlet_bench::floor;

/// Which half to run.
#[derive(Clone, Copy, Debug, ValueEnum)]
enum Half {
    /// Plaintext in, mTLS out (the client pod's sidecar).
    Client,
    /// mTLS in, plaintext out (the server pod's sidecar).
    Server,
}

/// The cheapest sidecar hop: accept, connect, TLS 1.3 mTLS between the pair, copy.
#[derive(Parser, Debug)]
#[command(name = "meshlet-floor", version)]
struct Args {
    /// client or server.
    #[arg(long, value_enum)]
    mode: Half,
    /// Address to listen on.
    #[arg(long)]
    listen: SocketAddr,
    /// Where every connection goes: the server half (client mode) or the app (server mode).
    #[arg(long)]
    upstream: SocketAddr,
    /// Directory with ca.pem, cert.pem and key.pem (`meshlet-injector ca issue --out`).
    #[arg(long)]
    identity_dir: PathBuf,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let mode = match args.mode {
        Half::Client => floor::client_mode(&args.identity_dir),
        Half::Server => floor::server_mode(&args.identity_dir),
    }?;
    // One thread, as meshlet-proxy with MESHLET_WORKER_THREADS=1.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the tokio runtime")?;
    rt.block_on(async {
        let listener = tokio::net::TcpListener::bind(args.listen)
            .await
            .with_context(|| format!("cannot listen on {}: is the port taken?", args.listen))?;
        eprintln!(
            "meshlet-floor: {:?} half listening on {}, forwarding to {}",
            args.mode, args.listen, args.upstream
        );
        floor::serve(listener, mode, args.upstream).await;
        Ok(())
    })
}
