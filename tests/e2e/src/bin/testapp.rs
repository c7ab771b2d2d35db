//! `meshlet-testapp`: see `meshlet_e2e::testapp`.
use clap::Parser;

fn main() -> std::process::ExitCode {
    let cli = meshlet_e2e::testapp::Cli::parse();
    match meshlet_e2e::testapp::run(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("meshlet-testapp: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
