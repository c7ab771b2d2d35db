//! The node's own objects: the Node (status: Ready, capacity, addresses) and its
//! Lease in `kube-node-lease`, renewed every 10 s as the kubelet does.

use std::{path::Path, time::Duration};

use k8s_openapi::{
    api::{coordination::v1::Lease, core::v1::Node},
    apimachinery::pkg::apis::meta::v1::{MicroTime, Time},
    jiff::Timestamp,
};
use kube::{
    api::{Api, Patch, PatchParams},
    config::{KubeConfigOptions, Kubeconfig},
    Client, Config,
};
use serde_json::json;

use super::{Agent, Error};

/// Field manager of everything the agent applies.
pub const MANAGER: &str = "meshlet-node";
/// Version the node reports (the control plane's).
pub const KUBELET_VERSION: &str = "v1.37.2";

/// A client from a kubeconfig file.
pub async fn client(kubeconfig: &Path) -> Result<Client, Error> {
    let kc = Kubeconfig::read_from(kubeconfig).map_err(|e| {
        Error::Config(format!(
            "{}: {e}; start the control plane with `bash tools/kube/cluster.sh up` and pass its kubeconfig",
            kubeconfig.display()
        ))
    })?;
    let config = Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
        .await
        .map_err(|e| Error::Config(format!("{}: {e}", kubeconfig.display())))?;
    Ok(Client::try_from(config)?)
}

/// Now, as a Kubernetes `Time` (whole seconds).
pub fn now() -> Time {
    Time(Timestamp::now())
}

fn mem_total_ki() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

/// CPUs of this machine.
pub fn cpus() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

fn kernel() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// The Node's status as the kubelet reports it.
pub fn node_status(agent: &Agent) -> serde_json::Value {
    let resources = json!({
        "cpu": cpus().to_string(),
        "memory": format!("{}Ki", mem_total_ki()),
        "pods": "110",
        "ephemeral-storage": "10Gi",
    });
    let t = now();
    let cond = |ty: &str, status: &str, reason: &str, msg: &str| {
        json!({"type": ty, "status": status, "reason": reason, "message": msg,
               "lastHeartbeatTime": t, "lastTransitionTime": t})
    };
    json!({
        "capacity": resources,
        "allocatable": resources,
        "conditions": [
            cond("MemoryPressure", "False", "KubeletHasSufficientMemory", "meshlet-node does not measure memory pressure"),
            cond("DiskPressure", "False", "KubeletHasNoDiskPressure", "meshlet-node does not measure disk pressure"),
            cond("PIDPressure", "False", "KubeletHasSufficientPID", "meshlet-node does not measure PID pressure"),
            cond("Ready", "True", "KubeletReady", "meshlet-node is posting ready status"),
        ],
        "addresses": [
            {"type": "InternalIP", "address": agent.net.node_ip().to_string()},
            {"type": "Hostname", "address": agent.cfg.name},
        ],
        "daemonEndpoints": {"kubeletEndpoint": {"Port": agent.cfg.kubelet_port}},
        "nodeInfo": {
            "machineID": "", "systemUUID": "", "bootID": "",
            "kernelVersion": kernel(),
            "osImage": "meshlet mini-cluster",
            "containerRuntimeVersion": "meshlet://0.1.0",
            "kubeletVersion": KUBELET_VERSION,
            "kubeProxyVersion": KUBELET_VERSION,
            "operatingSystem": "linux",
            "architecture": std::env::consts::ARCH.replace("x86_64", "amd64").replace("aarch64", "arm64"),
        },
    })
}

/// Creates or updates the Node and reports it Ready.
pub async fn register_node(agent: &Agent) -> Result<(), Error> {
    let nodes: Api<Node> = Api::all(agent.client.clone());
    let name = &agent.cfg.name;
    let cidr = agent.net.pod_cidr();
    let node = json!({
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": name,
            "labels": {
                "kubernetes.io/hostname": name,
                "kubernetes.io/os": "linux",
                "kubernetes.io/arch": std::env::consts::ARCH.replace("x86_64", "amd64").replace("aarch64", "arm64"),
                "node.meshlet.io/agent": "meshlet-node",
            },
        },
        "spec": {"podCIDR": cidr, "podCIDRs": [cidr]},
    });
    let pp = PatchParams::apply(MANAGER).force();
    nodes
        .patch(name, &pp, &Patch::Apply(&node))
        .await
        .map_err(|e| {
            Error::Other(format!(
                "registering node {name} (pod CIDR {cidr}): {e}; a Node of that name from an earlier run with another --subnet cannot change its podCIDR: delete it (`kubectl delete node {name}`) or pick another --name"
            ))
        })?;
    update_status(agent).await?;
    renew_lease(agent).await
}

async fn update_status(agent: &Agent) -> Result<(), Error> {
    let nodes: Api<Node> = Api::all(agent.client.clone());
    let patch = json!({"status": node_status(agent)});
    nodes
        .patch_status(
            &agent.cfg.name,
            &PatchParams::default(),
            &Patch::Merge(&patch),
        )
        .await?;
    Ok(())
}

async fn renew_lease(agent: &Agent) -> Result<(), Error> {
    let leases: Api<Lease> = Api::namespaced(agent.client.clone(), "kube-node-lease");
    let name = &agent.cfg.name;
    let lease = json!({
        "apiVersion": "coordination.k8s.io/v1",
        "kind": "Lease",
        "metadata": {"name": name, "namespace": "kube-node-lease"},
        "spec": {
            "holderIdentity": name,
            "leaseDurationSeconds": 40,
            "renewTime": MicroTime(Timestamp::now()),
        },
    });
    leases
        .patch(
            name,
            &PatchParams::apply(MANAGER).force(),
            &Patch::Apply(&lease),
        )
        .await?;
    Ok(())
}

/// Renews the Lease every 10 s and the Node's conditions every 60 s.
pub async fn heartbeat(agent: Agent) -> Result<(), Error> {
    let mut tick = tokio::time::interval(Duration::from_secs(10));
    let mut n = 0u64;
    loop {
        tick.tick().await;
        n += 1;
        if let Err(e) = renew_lease(&agent).await {
            tracing::warn!(error = %e, "renewing the node lease");
        }
        if n.is_multiple_of(6) {
            if let Err(e) = update_status(&agent).await {
                tracing::warn!(error = %e, "updating the node status");
            }
        }
    }
}
