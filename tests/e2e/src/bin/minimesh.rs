//! `meshlet-minimesh`: the mini-mesh demo (`make demo`); see `meshlet_e2e::demo`.
use std::path::PathBuf;

use clap::Parser;

/// Runs samples/hello.yaml on a mini-mesh of network namespaces, sends traffic, prints
/// what the sidecars saw and a `kubectl top pod --containers` table, then cleans up.
#[derive(Parser)]
#[command(name = "meshlet-minimesh")]
struct Args {
    /// Manifests to run.
    #[arg(long, default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/../../samples/hello.yaml"))]
    manifests: PathBuf,
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    match meshlet_e2e::demo::run(&args.manifests) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("meshlet-minimesh: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
