//! In-cluster API access for pods, as a real node gives it: every container gets
//! `KUBERNETES_SERVICE_HOST`/`_PORT` (the `default/kubernetes` ClusterIP), and the
//! node's kube-proxy sends that ClusterIP to a forwarder on the node address, which
//! dials the API server on the host's loopback (the API server runs with
//! `--endpoint-reconciler-type none`, so the Service has no endpoints of its own).
//! The API server's certificate carries the ClusterIP as a SAN, so clients verify it
//! as they would in a cluster.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use super::{Agent, Error};
use crate::cluster::kubeproxy::ServicePortRule;

/// ClusterIP of `default/kubernetes`: the first address of the Service range
/// (`KUBERNETES_SVC_IP` in tools/kube/cluster.sh).
pub const SERVICE_IP: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 1);
/// Its port.
pub const SERVICE_PORT: u16 = 443;
/// Port of the forwarder on the node address.
pub const FORWARD_PORT: u16 = 6443;
/// kube-proxy's name of the Service port.
const PORT_NAME: &str = "default/kubernetes:https";

/// The env a kubelet gives every container so that in-cluster clients find the API.
pub fn env() -> [(String, String); 2] {
    [
        ("KUBERNETES_SERVICE_HOST".into(), SERVICE_IP.to_string()),
        ("KUBERNETES_SERVICE_PORT".into(), SERVICE_PORT.to_string()),
    ]
}

/// Points `default/kubernetes:https` (which has no endpoints) at the forwarder.
pub fn patch_rules(rules: &mut [ServicePortRule], node_ip: Ipv4Addr) {
    for r in rules.iter_mut() {
        if r.port_name == PORT_NAME && r.endpoints.is_empty() {
            r.endpoints = vec![(IpAddr::V4(node_ip), FORWARD_PORT)];
        }
    }
}

/// Forwards connections on `<node ip>:6443` to the API server of the agent's
/// kubeconfig until the task is dropped.
pub async fn run(agent: Agent) -> Result<(), Error> {
    let upstream = upstream(&agent)?;
    let addr = SocketAddr::new(IpAddr::V4(agent.net.node_ip()), FORWARD_PORT);
    let std_l = agent.net.listen(addr)?;
    std_l
        .set_nonblocking(true)
        .map_err(|e| Error::Other(format!("listener {addr}: {e}")))?;
    let l = tokio::net::TcpListener::from_std(std_l)
        .map_err(|e| Error::Other(format!("listener {addr}: {e}")))?;
    loop {
        let Ok((mut inbound, _)) = l.accept().await else {
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            continue;
        };
        tokio::spawn(async move {
            match tokio::net::TcpStream::connect(upstream).await {
                Ok(mut out) => {
                    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut out).await;
                }
                Err(error) => tracing::warn!(%error, %upstream, "cannot reach the API server"),
            }
        });
    }
}

/// The API server address of the agent's kubeconfig (loopback, as cluster.sh runs it).
fn upstream(agent: &Agent) -> Result<SocketAddr, Error> {
    let kc = kube::config::Kubeconfig::read_from(&agent.cfg.kubeconfig)
        .map_err(|e| Error::Config(format!("{}: {e}", agent.cfg.kubeconfig.display())))?;
    let server = kc
        .clusters
        .first()
        .and_then(|c| c.cluster.as_ref())
        .and_then(|c| c.server.clone())
        .unwrap_or_default();
    let hostport = server
        .strip_prefix("https://")
        .map(|s| s.trim_end_matches('/'))
        .unwrap_or("");
    hostport.parse().map_err(|_| {
        Error::Config(format!(
            "the kubeconfig's server {server:?} is not https://<ip>:<port>; pods get API access only to an API server given by address"
        ))
    })
}
