//! `meshlet-echo`: see `meshlet_e2e::echo`.
use clap::Parser;

fn main() -> std::process::ExitCode {
    let cli = meshlet_e2e::echo::Cli::parse();
    match meshlet_e2e::echo::run(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("meshlet-echo: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
