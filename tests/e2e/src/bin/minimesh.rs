//! `meshlet-minimesh`: the mini-mesh demo (`make demo`); see `meshlet_e2e::demo`.
use std::path::PathBuf;

use clap::Parser;

/// Runs samples/hello.yaml on a mini-mesh of network namespaces, sends traffic, prints
/// what the sidecars saw and a `kubectl top pod --containers` table, then cleans up.
#[derive(Parser)]
#[command(name = "meshlet-minimesh")]
struct Args {
    /// What to do (`demo`, the default).
    #[command(subcommand)]
    command: Option<Cmd>,
    /// Manifests to run [default: ./samples/hello.yaml, else the checkout's sample].
    #[arg(long, global = true)]
    manifests: Option<PathBuf>,
}

#[derive(clap::Subcommand)]
enum Cmd {
    /// Build the mini-mesh, send traffic, print what the sidecars saw, clean up.
    Demo,
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    let (Some(Cmd::Demo) | None) = args.command;
    let manifests = args.manifests.unwrap_or_else(|| {
        let local = PathBuf::from("samples/hello.yaml");
        if local.is_file() {
            local
        } else {
            PathBuf::from(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/../../samples/hello.yaml"
            ))
        }
    });
    match meshlet_e2e::demo::run(&manifests) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("meshlet-minimesh: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
