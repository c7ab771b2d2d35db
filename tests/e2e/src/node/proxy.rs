//! kube-proxy (iptables mode) for the node namespace: Services and EndpointSlices
//! are watched, and every change rewrites the nat table with the harness's
//! [`kubeproxy::render`] (a full `iptables-restore`, as kube-proxy's full sync).

use std::{collections::BTreeMap, io::Write, net::IpAddr, process::Stdio, sync::Arc};

use futures_util::StreamExt;
use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};
use kube::{
    runtime::{reflector, watcher, WatchStreamExt},
    Api,
};
use tokio::sync::Notify;

use super::{Agent, Error};
use crate::cluster::{
    kubeproxy::{self, Protocol, ServicePortRule},
    netns,
};

/// The rules for ClusterIPs in 198.19.0.0/16 whose ready endpoints are pod IPs in
/// 198.18.0.0/16 (nothing outside the test ranges is ever programmed).
pub fn rules(services: &[Arc<Service>], slices: &[Arc<EndpointSlice>]) -> Vec<ServicePortRule> {
    let mut by_svc: BTreeMap<(String, String), Vec<&EndpointSlice>> = BTreeMap::new();
    for s in slices {
        if s.address_type != "IPv4" {
            continue;
        }
        let Some(svc) = s
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get("kubernetes.io/service-name"))
        else {
            continue;
        };
        let ns = s.metadata.namespace.clone().unwrap_or_default();
        by_svc.entry((ns, svc.clone())).or_default().push(s);
    }
    let mut out = Vec::new();
    for svc in services {
        let ns = svc.metadata.namespace.clone().unwrap_or_default();
        let name = svc.metadata.name.clone().unwrap_or_default();
        let spec = svc.spec.clone().unwrap_or_default();
        let Some(ip) = spec
            .cluster_ip
            .as_deref()
            .and_then(|ip| ip.parse::<IpAddr>().ok())
            .filter(|ip| matches!(ip, IpAddr::V4(v) if v.octets()[..2] == [198, 19]))
        else {
            continue;
        };
        let slices = by_svc.get(&(ns.clone(), name.clone()));
        for p in spec.ports.iter().flatten() {
            let protocol = match p.protocol.as_deref() {
                None | Some("TCP") => Protocol::Tcp,
                Some("UDP") => Protocol::Udp,
                _ => continue,
            };
            let Ok(port) = u16::try_from(p.port) else {
                continue;
            };
            let pname = p.name.clone().unwrap_or_default();
            let mut endpoints = Vec::new();
            for s in slices.into_iter().flatten() {
                let Some(sp) = s.ports.iter().flatten().find(|sp| {
                    sp.name.clone().unwrap_or_default() == pname
                        && sp.protocol.as_deref().unwrap_or("TCP")
                            == p.protocol.as_deref().unwrap_or("TCP")
                }) else {
                    continue;
                };
                let Some(tp) = sp.port.and_then(|x| u16::try_from(x).ok()) else {
                    continue;
                };
                for e in &s.endpoints {
                    // kube-proxy sends only to ready endpoints (serving+terminating
                    // fallback left out: terminating pods get no new connections here).
                    if e.conditions.as_ref().and_then(|c| c.ready) == Some(false) {
                        continue;
                    }
                    for a in &e.addresses {
                        if let Ok(IpAddr::V4(v)) = a.parse::<IpAddr>() {
                            if v.octets()[..2] == [198, 18] {
                                endpoints.push((IpAddr::V4(v), tp));
                            }
                        }
                    }
                }
            }
            endpoints.sort();
            endpoints.dedup();
            out.push(ServicePortRule {
                port_name: format!("{ns}/{name}:{pname}"),
                protocol,
                cluster_ip: ip,
                port,
                endpoints,
            });
        }
    }
    out.sort_by(|a, b| a.port_name.cmp(&b.port_name).then(a.port.cmp(&b.port)));
    out
}

/// Watches Services and EndpointSlices and resyncs the node's nat table on change.
pub async fn run(agent: Agent) -> Result<(), Error> {
    let (svc_r, svc_w) = reflector::store::<Service>();
    let (eps_r, eps_w) = reflector::store::<EndpointSlice>();
    let changed = Arc::new(Notify::new());
    let c1 = changed.clone();
    let svc_stream = reflector(
        svc_w,
        watcher(
            Api::<Service>::all(agent.client.clone()),
            watcher::Config::default(),
        ),
    )
    .default_backoff()
    .for_each(move |_| {
        c1.notify_one();
        async {}
    });
    let c2 = changed.clone();
    let eps_stream = reflector(
        eps_w,
        watcher(
            Api::<EndpointSlice>::all(agent.client.clone()),
            watcher::Config::default(),
        ),
    )
    .default_backoff()
    .for_each(move |_| {
        c2.notify_one();
        async {}
    });
    tokio::spawn(svc_stream);
    tokio::spawn(eps_stream);
    let mut last = String::new();
    loop {
        changed.notified().await;
        // Coalesce bursts (a rollout changes many objects at once).
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        let mut rules = rules(&svc_r.state(), &eps_r.state());
        super::apiserver::patch_rules(&mut rules, agent.net.node_ip());
        let text = kubeproxy::render(&rules);
        if text == last {
            continue;
        }
        let node = agent.net.node().clone();
        let input = text.clone();
        let res = tokio::task::spawn_blocking(move || -> Result<(), Error> {
            let mut cmd = node.command("iptables-restore");
            let mut child = cmd
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .map_err(|e| Error::Other(format!("running iptables-restore in the node: {e}")))?;
            if let Some(mut stdin) = child.stdin.take() {
                stdin
                    .write_all(input.as_bytes())
                    .map_err(|e| Error::Other(format!("writing to iptables-restore: {e}")))?;
            }
            let out = child
                .wait_with_output()
                .map_err(|e| Error::Other(format!("iptables-restore: {e}")))?;
            netns::check(&cmd, out)?;
            Ok(())
        })
        .await
        .map_err(|e| Error::Other(format!("kube-proxy sync: {e}")))?;
        match res {
            Ok(()) => {
                let eps: usize = rules.iter().map(|r| r.endpoints.len()).sum();
                tracing::info!(
                    ports = rules.len(),
                    endpoints = eps,
                    "kube-proxy rules synced"
                );
                last = text;
            }
            Err(e) => tracing::warn!(error = %e, "kube-proxy sync failed"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn rules_from_services_and_slices() {
        let svc: Service = serde_json::from_value(json!({
            "metadata": {"name": "backend", "namespace": "hello"},
            "spec": {"clusterIP": "198.19.0.10", "ports": [
                {"name": "http", "port": 80, "targetPort": "http"},
                {"name": "dns", "port": 53, "protocol": "UDP"},
            ]},
        }))
        .unwrap();
        let outside: Service = serde_json::from_value(json!({
            "metadata": {"name": "x", "namespace": "hello"},
            "spec": {"clusterIP": "10.96.0.1", "ports": [{"port": 443}]},
        }))
        .unwrap();
        let slice: EndpointSlice = serde_json::from_value(json!({
            "metadata": {"name": "backend-abc", "namespace": "hello",
                         "labels": {"kubernetes.io/service-name": "backend"}},
            "addressType": "IPv4",
            "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
            "endpoints": [
                {"addresses": ["198.18.7.3"], "conditions": {"ready": true}},
                {"addresses": ["198.18.7.2"], "conditions": {"ready": true}},
                {"addresses": ["198.18.7.4"], "conditions": {"ready": false}},
                {"addresses": ["8.8.8.8"], "conditions": {"ready": true}},
            ],
        }))
        .unwrap();
        let r = rules(&[Arc::new(svc), Arc::new(outside)], &[Arc::new(slice)]);
        assert_eq!(r.len(), 2, "{r:?}");
        let http = r.iter().find(|r| r.port == 80).unwrap();
        assert_eq!(http.port_name, "hello/backend:http");
        assert_eq!(
            http.endpoints,
            vec![
                ("198.18.7.2".parse().unwrap(), 8080),
                ("198.18.7.3".parse().unwrap(), 8080)
            ]
        );
        let dns = r.iter().find(|r| r.port == 53).unwrap();
        assert_eq!(dns.protocol, Protocol::Udp);
        assert!(dns.endpoints.is_empty());
    }
}
