//! `meshlet-node`: the kubelet and kube-proxy of the test control plane; see
//! `meshlet_e2e::node`.
use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use meshlet_e2e::{cluster::Binaries, node};

/// Joins the control plane of `tools/kube/cluster.sh` as a node that runs pods in
/// network namespaces. Needs root. Stops on SIGTERM or Ctrl-C, removing every
/// namespace and process it made.
#[derive(Parser)]
#[command(name = "meshlet-node")]
struct Args {
    /// The control plane's `cluster.env` (KUBECONFIG and EGRESS_SOCKET are read
    /// from it) [default: target/kube-cluster/cluster.env, or $MESHLET_KUBE_DIR/cluster.env].
    #[arg(long)]
    cluster_env: Option<PathBuf>,
    /// Kubeconfig (overrides the one in cluster.env).
    #[arg(long, env = "KUBECONFIG")]
    kubeconfig: Option<PathBuf>,
    /// Node name.
    #[arg(long, default_value = "meshlet-node")]
    name: String,
    /// Third octet of the node's pod /24 in 198.18.0.0/16.
    #[arg(long, default_value_t = 77)]
    subnet: u8,
    /// Pod directories (volumes, logs) [default: a temp dir removed on exit].
    #[arg(long)]
    state_dir: Option<PathBuf>,
    /// Port of metrics.k8s.io on the node address.
    #[arg(long, default_value_t = 4443)]
    metrics_port: u16,
    /// Port of the kubelet endpoint (`kubectl logs`) on the node address.
    #[arg(long, default_value_t = 10250)]
    kubelet_port: u16,
    /// Renew projected service-account tokens every N seconds [default: at 80% of
    /// their lifetime, as the kubelet does].
    #[arg(long)]
    token_refresh_seconds: Option<u64>,
}

fn read_env(path: &PathBuf) -> anyhow::Result<Vec<(String, String)>> {
    let text = std::fs::read_to_string(path).with_context(|| {
        format!(
            "reading {}: start the control plane first with `bash tools/kube/cluster.sh up`",
            path.display()
        )
    })?;
    Ok(text
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect())
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("MESHLET_NODE_LOG")
                .unwrap_or_else(|_| "info".into()),
        )
        .with_ansi(false)
        .init();
    let env_path = args.cluster_env.clone().unwrap_or_else(|| {
        std::env::var_os("MESHLET_KUBE_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("target/kube-cluster"))
            .join("cluster.env")
    });
    let env = read_env(&env_path)?;
    let get = |k: &str| {
        env.iter()
            .find(|(ek, _)| ek == k)
            .map(|(_, v)| PathBuf::from(v))
    };
    let kubeconfig = args
        .kubeconfig
        .clone()
        .or_else(|| get("KUBECONFIG"))
        .context("no kubeconfig: pass --kubeconfig or a cluster.env with KUBECONFIG")?;
    let tmp;
    let state_dir = match args.state_dir.clone() {
        Some(d) => d,
        None => {
            tmp = tempfile::Builder::new().prefix("meshlet-node-").tempdir()?;
            tmp.path().to_path_buf()
        }
    };
    let cfg = node::NodeConfig {
        name: args.name,
        kubeconfig,
        egress_socket: get("EGRESS_SOCKET"),
        subnet: args.subnet,
        state_dir,
        bins: Binaries::locate()?,
        metrics_port: args.metrics_port,
        kubelet_port: args.kubelet_port,
        token_refresh: args
            .token_refresh_seconds
            .map(std::time::Duration::from_secs),
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async {
        let shutdown = async {
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                    .expect("installing a SIGTERM handler");
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        };
        node::run(cfg, shutdown).await
    })?;
    Ok(())
}
