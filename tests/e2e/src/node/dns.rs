//! Cluster DNS, the part of CoreDNS's `kubernetes` plugin that pods need: A records
//! `<service>.<namespace>.svc.cluster.local` -> the Service's ClusterIP, served on
//! UDP port 53 of the node address, and each pod's `/etc/resolv.conf` naming it with
//! the kubelet's search path (`<ns>.svc.cluster.local svc.cluster.local
//! cluster.local`, `ndots:5`), so `http://echo/` from a pod reaches the Service
//! `echo` of its namespace. Names outside `cluster.local` are refused: nothing is
//! forwarded off this machine.

use std::net::{Ipv4Addr, SocketAddr};

use futures_util::StreamExt;
use k8s_openapi::api::core::v1::{Pod, Service};
use kube::{
    runtime::{reflector, watcher, WatchStreamExt},
    Api,
};

use super::{Agent, Error};

/// The cluster's DNS domain.
pub const CLUSTER_DOMAIN: &str = "cluster.local";
/// TTL of the answers: short, Services come and go during tests.
const TTL: u32 = 5;

const RCODE_NXDOMAIN: u8 = 3;
const RCODE_REFUSED: u8 = 5;
const RCODE_FORMERR: u8 = 1;
const TYPE_A: u16 = 1;
const TYPE_ANY: u16 = 255;

/// The resolv.conf the kubelet writes for a pod with `dnsPolicy: ClusterFirst`.
pub fn resolv_conf(namespace: &str, nameserver: Ipv4Addr) -> String {
    format!(
        "search {namespace}.svc.{CLUSTER_DOMAIN} svc.{CLUSTER_DOMAIN} {CLUSTER_DOMAIN}\nnameserver {nameserver}\noptions ndots:5\n"
    )
}

/// Whether the pod gets the cluster's resolv.conf: `ClusterFirst` (the default) off
/// the host network, or `ClusterFirstWithHostNet`; `Default` and `None` keep theirs.
pub fn uses_cluster_dns(pod: &Pod) -> bool {
    let spec = pod.spec.as_ref();
    let host_net = spec.and_then(|s| s.host_network).unwrap_or(false);
    match spec.and_then(|s| s.dns_policy.as_deref()) {
        None | Some("ClusterFirst") => !host_net,
        Some("ClusterFirstWithHostNet") => true,
        _ => false,
    }
}

/// What a name resolves to.
#[derive(Debug, PartialEq, Eq)]
pub enum Lookup {
    /// These addresses.
    Found(Vec<Ipv4Addr>),
    /// No such name in the cluster domain.
    NxDomain,
    /// Not a name this server answers for.
    Refused,
}

/// Resolves `name` (lower case, no trailing dot) with `service(ns, name)` giving a
/// Service's ClusterIPs.
pub fn lookup(name: &str, service: impl Fn(&str, &str) -> Option<Vec<Ipv4Addr>>) -> Lookup {
    let in_domain = name == CLUSTER_DOMAIN || name.ends_with(&format!(".{CLUSTER_DOMAIN}"));
    if !in_domain {
        return Lookup::Refused;
    }
    let Some(rest) = name.strip_suffix(&format!(".svc.{CLUSTER_DOMAIN}")) else {
        return Lookup::NxDomain;
    };
    match rest.split('.').collect::<Vec<_>>()[..] {
        [svc, ns] => match service(ns, svc) {
            Some(ips) if !ips.is_empty() => Lookup::Found(ips),
            _ => Lookup::NxDomain,
        },
        _ => Lookup::NxDomain,
    }
}

/// The question of a query: (name in lower case without the trailing dot, type, end
/// offset of the question), or `None` when it is not one well-formed question.
fn question(q: &[u8]) -> Option<(String, u16, usize)> {
    if q.len() < 12 || u16::from_be_bytes([q[4], q[5]]) != 1 || q[2] & 0x80 != 0 {
        return None;
    }
    let mut i = 12;
    let mut labels = Vec::new();
    loop {
        let l = *q.get(i)? as usize;
        i += 1;
        if l == 0 {
            break;
        }
        if l & 0xc0 != 0 {
            return None;
        }
        labels.push(String::from_utf8_lossy(q.get(i..i + l)?).to_ascii_lowercase());
        i += l;
    }
    let qtype = u16::from_be_bytes([*q.get(i)?, *q.get(i + 1)?]);
    let end = i + 4;
    (q.len() >= end).then(|| (labels.join("."), qtype, end))
}

/// The response to one query, or `None` when it is too short to answer at all.
pub fn respond(q: &[u8], service: impl Fn(&str, &str) -> Option<Vec<Ipv4Addr>>) -> Option<Vec<u8>> {
    if q.len() < 12 {
        return None;
    }
    let header = |rcode: u8, qd: u16, an: u16| {
        let mut r = Vec::with_capacity(64);
        r.extend_from_slice(&q[0..2]);
        // QR=1, opcode copied, AA=1, RD copied; RA=0 (no recursion here).
        r.push(0x80 | (q[2] & 0x79) | 0x04);
        r.push(rcode & 0x0f);
        r.extend_from_slice(&qd.to_be_bytes());
        r.extend_from_slice(&an.to_be_bytes());
        r.extend_from_slice(&[0, 0, 0, 0]);
        r
    };
    let Some((name, qtype, end)) = question(q) else {
        return Some(header(RCODE_FORMERR, 0, 0));
    };
    let (rcode, ips) = match lookup(&name, service) {
        Lookup::Found(ips) if qtype == TYPE_A || qtype == TYPE_ANY => (0, ips),
        // The name exists, just not with this type (AAAA, ...): NODATA.
        Lookup::Found(_) => (0, Vec::new()),
        Lookup::NxDomain => (RCODE_NXDOMAIN, Vec::new()),
        Lookup::Refused => (RCODE_REFUSED, Vec::new()),
    };
    let mut r = header(rcode, 1, ips.len() as u16);
    r.extend_from_slice(&q[12..end]);
    for ip in ips {
        r.extend_from_slice(&[0xc0, 0x0c, 0, 1, 0, 1]);
        r.extend_from_slice(&TTL.to_be_bytes());
        r.extend_from_slice(&[0, 4]);
        r.extend_from_slice(&ip.octets());
    }
    Some(r)
}

/// A Service's IPv4 ClusterIPs (none for headless Services).
pub fn cluster_ips(s: &Service) -> Vec<Ipv4Addr> {
    let spec = s.spec.as_ref();
    let mut ips: Vec<String> = spec.and_then(|s| s.cluster_ips.clone()).unwrap_or_default();
    if ips.is_empty() {
        ips.extend(spec.and_then(|s| s.cluster_ip.clone()));
    }
    ips.iter().filter_map(|ip| ip.parse().ok()).collect()
}

/// Serves cluster DNS on UDP `<node address>:53` in the node namespace until the
/// agent stops.
pub async fn run(agent: Agent) -> Result<(), Error> {
    let (store, writer) = reflector::store::<Service>();
    let watch = reflector(
        writer,
        watcher(
            Api::<Service>::all(agent.client.clone()),
            watcher::Config::default(),
        ),
    )
    .default_backoff()
    .for_each(|_| async {});
    tokio::spawn(watch);
    let addr = SocketAddr::from((agent.net.node_ip(), 53));
    let sock = agent
        .net
        .node()
        .enter(move || std::net::UdpSocket::bind(addr))?
        .and_then(|s| s.set_nonblocking(true).map(|_| s))
        .and_then(tokio::net::UdpSocket::from_std)
        .map_err(|e| {
            Error::Other(format!(
                "cluster DNS: binding udp {addr} in the node namespace: {e}"
            ))
        })?;
    tracing::info!(%addr, "cluster DNS serving {CLUSTER_DOMAIN}");
    let mut buf = [0u8; 1500];
    loop {
        let (n, peer) = match sock.recv_from(&mut buf).await {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!(error = %e, "cluster DNS recv");
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                continue;
            }
        };
        let resp = respond(&buf[..n], |ns, name| {
            let r = reflector::ObjectRef::new(name).within(ns);
            store.get(&r).map(|s| cluster_ips(&s))
        });
        if let Some(resp) = resp {
            if let Err(e) = sock.send_to(&resp, peer).await {
                tracing::debug!(%peer, error = %e, "cluster DNS reply");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn query(name: &str, qtype: u16) -> Vec<u8> {
        let mut q = vec![0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
        for l in name.split('.') {
            q.push(l.len() as u8);
            q.extend_from_slice(l.as_bytes());
        }
        q.push(0);
        q.extend_from_slice(&qtype.to_be_bytes());
        q.extend_from_slice(&[0, 1]);
        q
    }

    fn services(ns: &str, name: &str) -> Option<Vec<Ipv4Addr>> {
        match (ns, name) {
            ("gateway-conformance-mesh", "echo") => Some(vec![Ipv4Addr::new(198, 19, 0, 20)]),
            ("gateway-conformance-mesh", "headless") => Some(vec![]),
            _ => None,
        }
    }

    #[test]
    fn answers_service_names() {
        let q = query("Echo.gateway-conformance-mesh.svc.cluster.local", TYPE_A);
        let r = respond(&q, services).unwrap();
        assert_eq!(&r[0..2], &[0x12, 0x34], "id copied");
        assert_eq!(r[2] & 0x80, 0x80, "a response");
        assert_eq!(r[3] & 0x0f, 0, "NOERROR");
        assert_eq!(&r[6..8], &[0, 1], "one answer");
        assert_eq!(&r[r.len() - 4..], &[198, 19, 0, 20]);
        // The question is echoed as asked.
        assert_eq!(&r[12..q.len()], &q[12..]);
    }

    #[test]
    fn nodata_nxdomain_refused() {
        let aaaa = respond(
            &query("echo.gateway-conformance-mesh.svc.cluster.local", 28),
            services,
        )
        .unwrap();
        assert_eq!(
            (aaaa[3] & 0x0f, aaaa[7]),
            (0, 0),
            "AAAA of a Service: NODATA"
        );
        let search = respond(&query("echo.svc.cluster.local", TYPE_A), services).unwrap();
        assert_eq!(
            search[3] & 0x0f,
            RCODE_NXDOMAIN,
            "the search path's other tries"
        );
        let headless = respond(
            &query(
                "headless.gateway-conformance-mesh.svc.cluster.local",
                TYPE_A,
            ),
            services,
        )
        .unwrap();
        assert_eq!(headless[3] & 0x0f, RCODE_NXDOMAIN);
        let outside = respond(&query("example.org", TYPE_A), services).unwrap();
        assert_eq!(
            outside[3] & 0x0f,
            RCODE_REFUSED,
            "nothing leaves the cluster domain"
        );
        let bad = respond(&[0u8; 12], services).unwrap();
        assert_eq!(bad[3] & 0x0f, RCODE_FORMERR);
        assert!(respond(&[0u8; 5], services).is_none());
    }

    #[test]
    fn resolv_conf_like_the_kubelet() {
        assert_eq!(
            resolv_conf("gateway-conformance-mesh", Ipv4Addr::new(198, 18, 77, 1)),
            "search gateway-conformance-mesh.svc.cluster.local svc.cluster.local cluster.local\nnameserver 198.18.77.1\noptions ndots:5\n"
        );
        let pod = |v: serde_json::Value| -> Pod { serde_json::from_value(v).unwrap() };
        assert!(uses_cluster_dns(&pod(
            serde_json::json!({"spec": {"containers": []}})
        )));
        assert!(!uses_cluster_dns(&pod(
            serde_json::json!({"spec": {"containers": [], "dnsPolicy": "Default"}})
        )));
        assert!(!uses_cluster_dns(&pod(
            serde_json::json!({"spec": {"containers": [], "hostNetwork": true}})
        )));
        assert!(uses_cluster_dns(&pod(
            serde_json::json!({"spec": {"containers": [], "hostNetwork": true, "dnsPolicy": "ClusterFirstWithHostNet"}})
        )));
    }

    #[test]
    fn cluster_ips_skip_headless() {
        let s: Service = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "a"},
            "spec": {"clusterIP": "None", "clusterIPs": ["None"]}
        }))
        .unwrap();
        assert!(cluster_ips(&s).is_empty());
        let s: Service = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "a"},
            "spec": {"clusterIP": "198.19.0.9"}
        }))
        .unwrap();
        assert_eq!(cluster_ips(&s), vec![Ipv4Addr::new(198, 19, 0, 9)]);
    }
}
