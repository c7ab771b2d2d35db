//! In-cluster access to the API server, as pods on a real node have it: the
//! kubelet's `KUBERNETES_SERVICE_HOST`/`_PORT` variables in every container, and
//! the Service `default/kubernetes` (ClusterIP 443) reaching kube-apiserver.
//!
//! kube-apiserver listens on the host's loopback, which no pod namespace can reach,
//! and it runs with `--endpoint-reconciler-type=none`. So the agent listens on the
//! node address, port [`PORT`], in the node namespace, relays each connection to the
//! API server's loopback address (the agent's own, root-namespace socket; TLS passes
//! through untouched, the serving certificate names 198.19.0.1 and
//! `kubernetes.default.svc`), and publishes that address as the EndpointSlice of
//! `default/kubernetes`, so the kube-proxy rules send the ClusterIP there.

use std::net::{Ipv4Addr, SocketAddr};

use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};
use kube::{
    api::{DeleteParams, Patch, PatchParams},
    Api, Client,
};
use serde_json::json;

use super::{Agent, Error};

/// Port of the relay on the node address.
pub const PORT: u16 = 6443;
/// The EndpointSlice this agent writes for `default/kubernetes`.
const SLICE: &str = "kubernetes-meshlet-node";

/// The environment the kubelet gives every container for the `kubernetes` Service.
pub fn kubernetes_env(ip: Ipv4Addr, port: u16) -> Vec<(String, String)> {
    let url = format!("tcp://{ip}:{port}");
    let p = format!("KUBERNETES_PORT_{port}_TCP");
    vec![
        ("KUBERNETES_SERVICE_HOST".into(), ip.to_string()),
        ("KUBERNETES_SERVICE_PORT".into(), port.to_string()),
        ("KUBERNETES_SERVICE_PORT_HTTPS".into(), port.to_string()),
        ("KUBERNETES_PORT".into(), url.clone()),
        (p.clone(), url),
        (format!("{p}_PROTO"), "tcp".into()),
        (format!("{p}_PORT"), port.to_string()),
        (format!("{p}_ADDR"), ip.to_string()),
    ]
}

/// [`kubernetes_env`] for the cluster's `kubernetes` Service; empty when it has no
/// ClusterIP yet (the container then starts without in-cluster API access).
pub async fn service_env(client: &Client) -> Vec<(String, String)> {
    let svc = Api::<Service>::namespaced(client.clone(), "default")
        .get_opt("kubernetes")
        .await
        .ok()
        .flatten();
    let spec = svc.and_then(|s| s.spec);
    let ip = spec
        .as_ref()
        .and_then(|s| s.cluster_ip.as_deref())
        .and_then(|ip| ip.parse::<Ipv4Addr>().ok());
    let port = spec
        .as_ref()
        .and_then(|s| s.ports.as_ref())
        .and_then(|p| p.iter().find(|p| p.name.as_deref() == Some("https")))
        .and_then(|p| u16::try_from(p.port).ok())
        .unwrap_or(443);
    ip.map(|ip| kubernetes_env(ip, port)).unwrap_or_default()
}

/// The API server's address from a kubeconfig: the first `server:` URL.
pub fn api_addr(kubeconfig: &str) -> Option<SocketAddr> {
    let url = kubeconfig
        .lines()
        .find_map(|l| l.trim().strip_prefix("server:"))?
        .trim()
        .trim_matches('"');
    let uri: http::Uri = url.parse().ok()?;
    let host = uri.host()?.trim_start_matches('[').trim_end_matches(']');
    let port = uri
        .port_u16()
        .unwrap_or(if uri.scheme_str() == Some("http") {
            80
        } else {
            443
        });
    Some(SocketAddr::new(host.parse().ok()?, port))
}

/// The EndpointSlice that points `default/kubernetes` at the relay.
pub fn endpoint_slice(node_ip: Ipv4Addr, node: &str) -> serde_json::Value {
    json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": SLICE, "namespace": "default", "labels": {
            "kubernetes.io/service-name": "kubernetes",
            "endpointslice.kubernetes.io/managed-by": "meshlet-node",
        }},
        "addressType": "IPv4",
        "endpoints": [{"addresses": [node_ip.to_string()],
                       "conditions": {"ready": true}, "nodeName": node}],
        "ports": [{"name": "https", "port": PORT, "protocol": "TCP"}],
    })
}

/// Removes the EndpointSlice (on shutdown, best effort).
pub async fn unregister(agent: &Agent) {
    let _ = Api::<EndpointSlice>::namespaced(agent.client.clone(), "default")
        .delete(SLICE, &DeleteParams::default())
        .await;
}

/// Relays `<node address>:PORT` to the API server and publishes the EndpointSlice.
pub async fn run(agent: Agent) -> Result<(), Error> {
    let text = std::fs::read_to_string(&agent.cfg.kubeconfig)
        .map_err(|e| Error::Config(format!("reading {}: {e}", agent.cfg.kubeconfig.display())))?;
    let api = api_addr(&text).ok_or_else(|| {
        Error::Config(format!(
            "{}: no `server: https://HOST:PORT` with an IP address",
            agent.cfg.kubeconfig.display()
        ))
    })?;
    let addr = SocketAddr::from((agent.net.node_ip(), PORT));
    let std_l = agent.net.listen(addr)?;
    let listener = std_l
        .set_nonblocking(true)
        .and_then(|_| tokio::net::TcpListener::from_std(std_l))
        .map_err(|e| Error::Other(format!("API relay {addr}: {e}")))?;
    Api::<EndpointSlice>::namespaced(agent.client.clone(), "default")
        .patch(
            SLICE,
            &PatchParams::apply(super::api::MANAGER).force(),
            &Patch::Apply(&endpoint_slice(agent.net.node_ip(), &agent.cfg.name)),
        )
        .await?;
    tracing::info!(%addr, %api, "default/kubernetes reaches the API server through the node");
    loop {
        let (mut pod_side, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "API relay accept");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        tokio::spawn(async move {
            match tokio::net::TcpStream::connect(api).await {
                Ok(mut api_side) => {
                    let _ = tokio::io::copy_bidirectional(&mut pod_side, &mut api_side).await;
                }
                Err(e) => {
                    tracing::warn!(%peer, %api, error = %e, "API relay: connecting to the API server")
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_like_the_kubelet() {
        let env = kubernetes_env(Ipv4Addr::new(198, 19, 0, 1), 443);
        let get = |k: &str| env.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
        assert_eq!(get("KUBERNETES_SERVICE_HOST"), Some("198.19.0.1"));
        assert_eq!(get("KUBERNETES_SERVICE_PORT"), Some("443"));
        assert_eq!(get("KUBERNETES_PORT"), Some("tcp://198.19.0.1:443"));
        assert_eq!(get("KUBERNETES_PORT_443_TCP_ADDR"), Some("198.19.0.1"));
    }

    #[test]
    fn api_address_from_a_kubeconfig() {
        let kc = "apiVersion: v1\nclusters:\n- cluster:\n    certificate-authority: /x/ca.crt\n    server: https://127.0.0.1:35583\n  name: c\n";
        assert_eq!(api_addr(kc), Some("127.0.0.1:35583".parse().unwrap()));
        assert_eq!(
            api_addr("server: https://[::1]:6443"),
            Some("[::1]:6443".parse().unwrap())
        );
        assert_eq!(api_addr("server: https://localhost:6443"), None);
        assert_eq!(api_addr("nothing"), None);
    }

    #[test]
    fn slice_points_the_service_at_the_relay() {
        let s = endpoint_slice(Ipv4Addr::new(198, 18, 77, 1), "node-1");
        let slice: EndpointSlice = serde_json::from_value(s).unwrap();
        let labels = slice.metadata.labels.unwrap();
        assert_eq!(labels["kubernetes.io/service-name"], "kubernetes");
        assert_eq!(slice.endpoints[0].addresses, vec!["198.18.77.1"]);
        let ports = slice.ports.unwrap();
        assert_eq!(
            (ports[0].name.as_deref(), ports[0].port),
            (Some("https"), Some(6443))
        );
    }
}
