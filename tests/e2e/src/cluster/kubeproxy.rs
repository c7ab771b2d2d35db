//! ClusterIPs the way kube-proxy's iptables mode writes them, for the node namespace.
//!
//! `KUBE-SERVICES` matches ClusterIP and port and jumps to `KUBE-SVC-<hash>`, which
//! picks an endpoint with `-m statistic --mode random --probability 1/(n-i)` and jumps
//! to `KUBE-SEP-<hash>`, which DNATs. A pod that reaches itself through its Service
//! (hairpin) is masqueraded, as kube-proxy does, so the reply comes back through the
//! node. Chain names use kube-proxy's hash: base32(sha256(port name + protocol)).

use std::{
    fmt::Write,
    net::{IpAddr, SocketAddr},
};

use ring::digest;

/// L4 protocol of a Service port.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    /// TCP.
    Tcp,
    /// UDP.
    Udp,
}

impl Protocol {
    fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        }
    }
}

/// One Service port and its ready endpoints.
#[derive(Clone, Debug)]
pub struct ServicePortRule {
    /// `namespace/name:port-name`, as kube-proxy names a service port.
    pub port_name: String,
    /// Protocol.
    pub protocol: Protocol,
    /// ClusterIP.
    pub cluster_ip: IpAddr,
    /// Service port.
    pub port: u16,
    /// Pod IP and target port of each ready endpoint.
    pub endpoints: Vec<(IpAddr, u16)>,
}

fn hash(s: &str) -> String {
    const ALPHABET: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
    let d = digest::digest(&digest::SHA256, s.as_bytes());
    let mut out = String::new();
    let (mut acc, mut bits) = (0u32, 0u32);
    for &b in d.as_ref() {
        acc = (acc << 8) | b as u32;
        bits += 8;
        while bits >= 5 {
            bits -= 5;
            out.push(ALPHABET[((acc >> bits) & 31) as usize] as char);
        }
        if out.len() >= 16 {
            break;
        }
    }
    out.truncate(16);
    out
}

/// The `KUBE-SVC-` chain of a service port.
pub fn svc_chain(port_name: &str, protocol: Protocol) -> String {
    format!(
        "KUBE-SVC-{}",
        hash(&format!("{port_name}{}", protocol.as_str()))
    )
}

/// The `KUBE-SEP-` chain of one endpoint of a service port.
pub fn sep_chain(port_name: &str, protocol: Protocol, ep: (IpAddr, u16)) -> String {
    format!(
        "KUBE-SEP-{}",
        hash(&format!(
            "{port_name}{}{}:{}",
            protocol.as_str(),
            ep.0,
            ep.1
        ))
    )
}

fn host(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(ip) => format!("{ip}/32"),
        IpAddr::V6(ip) => format!("{ip}/128"),
    }
}

/// The `iptables-restore` (or, for IPv6 rules, `ip6tables-restore`) input for the
/// node's nat table; pass the rules of one address family.
pub fn render(rules: &[ServicePortRule]) -> String {
    let mut chains = vec![
        "KUBE-SERVICES".to_string(),
        "KUBE-POSTROUTING".into(),
        "KUBE-MARK-MASQ".into(),
    ];
    let mut body = String::new();
    // Writing to a String cannot fail; the results are ignored below for that reason.
    let _ = writeln!(
        body,
        "-A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES"
    );
    let _ = writeln!(
        body,
        "-A OUTPUT -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES"
    );
    let _ = writeln!(
        body,
        "-A POSTROUTING -m comment --comment \"kubernetes postrouting rules\" -j KUBE-POSTROUTING"
    );
    let _ = writeln!(body, "-A KUBE-MARK-MASQ -j MARK --or-mark 0x4000");
    let _ = writeln!(
        body,
        "-A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN"
    );
    let _ = writeln!(body, "-A KUBE-POSTROUTING -j MARK --xor-mark 0x4000");
    let _ = writeln!(
        body,
        "-A KUBE-POSTROUTING -m comment --comment \"kubernetes service traffic requiring SNAT\" -j MASQUERADE --random-fully"
    );
    for r in rules.iter().filter(|r| !r.endpoints.is_empty()) {
        let proto = r.protocol.as_str();
        let svc = svc_chain(&r.port_name, r.protocol);
        chains.push(svc.clone());
        let _ = writeln!(
            body,
            "-A KUBE-SERVICES -d {} -p {proto} -m comment --comment \"{} cluster IP\" -m {proto} --dport {} -j {svc}",
            host(r.cluster_ip), r.port_name, r.port
        );
        let n = r.endpoints.len();
        for (i, ep) in r.endpoints.iter().enumerate() {
            let sep = sep_chain(&r.port_name, r.protocol, *ep);
            let dst = SocketAddr::from(*ep);
            chains.push(sep.clone());
            let stat = if i + 1 < n {
                format!(
                    " -m statistic --mode random --probability {:.10}",
                    1.0 / (n - i) as f64
                )
            } else {
                String::new()
            };
            let _ = writeln!(
                body,
                "-A {svc} -m comment --comment \"{} -> {dst}\"{stat} -j {sep}",
                r.port_name
            );
            let _ = writeln!(
                body,
                "-A {sep} -s {} -m comment --comment \"{}\" -j KUBE-MARK-MASQ",
                host(ep.0),
                r.port_name
            );
            let _ = writeln!(
                body,
                "-A {sep} -p {proto} -m comment --comment \"{}\" -m {proto} -j DNAT --to-destination {dst}",
                r.port_name
            );
        }
    }
    let mut out = String::from("*nat\n");
    for c in ["PREROUTING", "INPUT", "OUTPUT", "POSTROUTING"] {
        let _ = writeln!(out, ":{c} ACCEPT [0:0]");
    }
    for c in chains {
        let _ = writeln!(out, ":{c} - [0:0]");
    }
    out.push_str(&body);
    out.push_str("COMMIT\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{Ipv4Addr, Ipv6Addr};

    #[test]
    fn ipv6_rules_use_brackets_and_128() {
        let ip: Ipv6Addr = "fd00:6d65:7368:c1::10".parse().unwrap();
        let ep: Ipv6Addr = "fd00:6d65:7368:1::2".parse().unwrap();
        let out = render(&[ServicePortRule {
            port_name: "hello6/backend:http".into(),
            protocol: Protocol::Tcp,
            cluster_ip: ip.into(),
            port: 80,
            endpoints: vec![(ep.into(), 8080)],
        }]);
        assert!(out.contains("-d fd00:6d65:7368:c1::10/128 -p tcp"), "{out}");
        assert!(out.contains("-s fd00:6d65:7368:1::2/128"), "{out}");
        assert!(
            out.contains("--to-destination [fd00:6d65:7368:1::2]:8080"),
            "{out}"
        );
    }

    #[test]
    fn spreads_over_endpoints_like_kube_proxy() {
        let r = ServicePortRule {
            port_name: "hello/backend:http".into(),
            protocol: Protocol::Tcp,
            cluster_ip: Ipv4Addr::new(198, 19, 0, 10).into(),
            port: 80,
            endpoints: vec![
                (Ipv4Addr::new(198, 18, 0, 2).into(), 8080),
                (Ipv4Addr::new(198, 18, 0, 3).into(), 8080),
                (Ipv4Addr::new(198, 18, 0, 4).into(), 8080),
            ],
        };
        let out = render(&[r]);
        let svc = svc_chain("hello/backend:http", Protocol::Tcp);
        assert!(svc.len() == "KUBE-SVC-".len() + 16, "{svc}");
        assert!(out.contains(&format!(
            "-A KUBE-SERVICES -d 198.19.0.10/32 -p tcp -m comment --comment \"hello/backend:http cluster IP\" -m tcp --dport 80 -j {svc}"
        )));
        assert_eq!(out.matches("--probability 0.3333333333").count(), 1);
        assert_eq!(out.matches("--probability 0.5000000000").count(), 1);
        assert_eq!(out.matches("-j DNAT --to-destination").count(), 3);
        // The last endpoint is taken unconditionally.
        let last = sep_chain(
            "hello/backend:http",
            Protocol::Tcp,
            (Ipv4Addr::new(198, 18, 0, 4).into(), 8080),
        );
        assert!(out.contains(&format!("198.18.0.4:8080\" -j {last}")));
        assert!(out.starts_with("*nat\n") && out.ends_with("COMMIT\n"));
    }

    #[test]
    fn service_without_endpoints_gets_no_rules() {
        let r = ServicePortRule {
            port_name: "hello/empty:http".into(),
            protocol: Protocol::Udp,
            cluster_ip: Ipv4Addr::new(198, 19, 0, 11).into(),
            port: 53,
            endpoints: vec![],
        };
        assert!(!render(&[r]).contains("198.19.0.11"));
    }
}
