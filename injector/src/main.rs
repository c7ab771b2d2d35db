//! meshlet-injector binary: parses flags, sets up logging and hands over to the library.
#![forbid(unsafe_code)]

use std::io::Read;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use meshlet_api::SpiffeId;
use meshlet_injector::{ca, compile, controller, offline, serve, serve_config, DefaultsArgs};

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
    Serve(Box<serve::ServeArgs>),
    /// Serve proxies their mesh config (GET /v1/config, a watch) compiled from manifest
    /// files, re-published when the files change.
    ServeConfig(serve_config::ServeConfigArgs),
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
        /// Mesh-wide default inbound policy for workloads no AuthorizationPolicy
        /// targets: all-allowed, mesh-only or deny (a namespace's
        /// meshlet.io/default-inbound-policy annotation overrides it).
        #[arg(long, default_value = "all-allowed")]
        default_inbound_policy: meshlet_api::authz::DefaultPolicy,
    },
    /// Run the config controller against the cluster of the current kubeconfig: watch
    /// Services, EndpointSlices, Pods, Namespaces, Gateway API routes and
    /// AuthorizationPolicies, write their status;
    /// `--print` prints the compiled mesh config once and exits.
    Controller(controller::ControllerArgs),
    /// Offline mesh CA: make a root CA, issue workload certificates from it.
    #[command(subcommand)]
    Ca(CaCommand),
}

#[derive(Subcommand, Debug)]
enum CaCommand {
    /// Create a root CA (ECDSA P-256): writes ca.pem and ca-key.pem (0600) into --out.
    Init {
        /// Directory to write into (created if missing; an existing CA key is never overwritten).
        #[arg(long)]
        out: std::path::PathBuf,
        /// SPIFFE trust domain, shown in the CA's name.
        #[arg(long, default_value = meshlet_api::DEFAULT_TRUST_DOMAIN)]
        trust_domain: String,
        /// How long the CA is valid (e.g. 87600h).
        #[arg(long, default_value = "87600h")]
        lifetime: meshlet_api::Duration,
    },
    /// Issue a workload certificate: writes ca.pem, cert.pem and key.pem (0600) into
    /// --out, the layout meshlet-proxy reads from MESHLET_IDENTITY_DIR.
    Issue {
        /// CA directory written by `ca init`.
        #[arg(long)]
        ca: std::path::PathBuf,
        /// The workload's namespace.
        #[arg(long)]
        namespace: String,
        /// The workload's service account.
        #[arg(long)]
        service_account: String,
        /// SPIFFE trust domain.
        #[arg(long, default_value = meshlet_api::DEFAULT_TRUST_DOMAIN)]
        trust_domain: String,
        /// How long the certificate is valid (NotBefore is backdated 5 minutes).
        #[arg(long, default_value = "24h")]
        lifetime: meshlet_api::Duration,
        /// Directory to write into (created if missing; files are replaced atomically).
        #[arg(long)]
        out: std::path::PathBuf,
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
        Command::Compile {
            from_files,
            out,
            default_inbound_policy,
        } => {
            let opts = compile::Options {
                default_inbound_policy,
            };
            let compiled = compile::compile_dir_with(&from_files, &opts)?;
            for p in &compiled.problems {
                eprintln!("meshlet-injector: {p}");
            }
            for b in &compiled.bad_annotations {
                eprintln!("meshlet-injector: {b}");
            }
            for c in &compiled.conflicts {
                eprintln!("meshlet-injector: {c}");
            }
            for p in &compiled.authz_problems {
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
        Command::Controller(args) => {
            let _ = rustls::crypto::ring::default_provider().install_default();
            let rt = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .context("cannot start the tokio runtime")?;
            if let Some(doc) = rt.block_on(controller::command(&args))? {
                print!("{}", serde_json::to_string_pretty(&*doc)? + "\n");
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
        Command::ServeConfig(args) => {
            let _ = rustls::crypto::ring::default_provider().install_default();
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .context("cannot start the tokio runtime")?;
            rt.block_on(serve_config::run(&args, serve::shutdown_signal()))?;
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
        Command::Ca(cmd) => run_ca(cmd),
    }
}

fn run_ca(cmd: CaCommand) -> anyhow::Result<()> {
    match cmd {
        CaCommand::Init {
            out,
            trust_domain,
            lifetime,
        } => {
            let root = ca::Ca::generate(&trust_domain, lifetime.as_std())?;
            root.save(&out)?;
            eprintln!(
                "wrote {} and {}",
                out.join(ca::CA_CERT_FILE).display(),
                out.join(ca::CA_KEY_FILE).display()
            );
            Ok(())
        }
        CaCommand::Issue {
            ca: dir,
            namespace,
            service_account,
            trust_domain,
            lifetime,
            out,
        } => {
            let id = SpiffeId::new(&trust_domain, &namespace, &service_account).context(
                "--trust-domain, --namespace and --service-account must form a SPIFFE id",
            )?;
            let root = ca::Ca::load(&dir)?;
            let issued = root.issue(&id, lifetime.as_std())?;
            ca::write_identity_dir(&out, &issued)?;
            eprintln!("issued {id} into {}", out.display());
            Ok(())
        }
    }
}
