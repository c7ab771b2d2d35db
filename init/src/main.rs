//! Thin entry point: parse flags and env, run, print one line on failure.
#![forbid(unsafe_code)]

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = meshlet_init::config::Cli::parse();
    match meshlet_init::run(&cli, &mut std::io::stdout()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("meshlet-init: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}
