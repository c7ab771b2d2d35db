//! meshlet-injector binary: parses flags, sets up logging and hands over to the library.
#![forbid(unsafe_code)]

use std::io::Read;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use meshlet_injector::{compile, offline, serve, DefaultsArgs};

/// meshlet's control plane: the sidecar-injecting admission webhook and offline injection.
#[derive(Parser, Debug)]
#[command(name = "meshlet-injector", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Serve the mutating admission webhook over HTTPS (POST /mutate, /healthz, /readyz, /metrics).
    Serve(serve::ServeArgs),
    /// Print manifests with the sidecar injected, as the webhook would admit them.
    Inject {
        /// Manifest file (YAML, multi-document); `-` reads stdin.
        #[arg(short = 'f', long = "filename")]
        file: String,
        /// Write the result here instead of stdout.
        #[arg(short = 'o', long = "output")]
        output: Option<String>,
        #[command(flatten)]
        defaults: DefaultsArgs,
    },
    /// Compile the mesh config JSON (services, identities, HTTPRoutes) from manifest files.
    Compile {
        /// Directory of Kubernetes manifests (.yaml, .yml, .json).
        #[arg(long = "from-files")]
        from_files: std::path::PathBuf,
        /// Write the JSON here instead of stdout.
        #[arg(long)]
        out: Option<std::path::PathBuf>,
    },
}

fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        // Colour codes only for a terminal; in a pod they would clutter the log.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("meshlet-injector: {e:#}");
            // EX_USAGE for bad input, as the other meshlet binaries do.
            std::process::ExitCode::from(64)
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Compile { from_files, out } => {
            let compiled = compile::compile_dir(&from_files)?;
            for p in &compiled.problems {
                eprintln!("meshlet-injector: {p}");
            }
            let json = serde_json::to_string_pretty(&compiled.config)? + "\n";
            match out {
                Some(path) => std::fs::write(&path, json)
                    .with_context(|| format!("cannot write {}", path.display()))?,
                None => print!("{json}"),
            }
            Ok(())
        }
        Command::Serve(args) => {
            let _ = rustls::crypto::ring::default_provider().install_default();
            let rt = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .context("cannot start the tokio runtime")?;
            rt.block_on(serve::run(&args))?;
            Ok(())
        }
        Command::Inject {
            file,
            output,
            defaults,
        } => {
            let defaults = defaults.to_defaults()?;
            let input = if file == "-" {
                let mut s = String::new();
                std::io::stdin()
                    .read_to_string(&mut s)
                    .context("cannot read stdin")?;
                s
            } else {
                std::fs::read_to_string(&file).with_context(|| format!("cannot read {file}"))?
            };
            let out = offline::inject_yaml(&input, &defaults)
                .with_context(|| format!("cannot inject {file}"))?;
            match output {
                Some(path) => {
                    std::fs::write(&path, out).with_context(|| format!("cannot write {path}"))?
                }
                None => print!("{out}"),
            }
            Ok(())
        }
    }
}
