//! The demo's mesh mTLS part: which identities the sidecars saw (from their metrics)
//! and what a request looks like on the wire with and without the mesh.

use std::collections::BTreeMap;

use crate::cluster::{capture, Cluster, Error};

use super::{section, BACKEND, T};

/// Lines of `tcpdump -A` shown per capture.
const EXCERPT: usize = 14;

/// Prints the identities, then a capture of a meshed and of a plaintext request.
pub(super) fn show(c: &Cluster) -> Result<(), Error> {
    section("mesh mTLS: identities the sidecars saw (peer_identity of inbound mTLS requests)");
    match c.identities() {
        Some(ids) => println!(
            "each meshed pod's proxy got a certificate from `meshlet-injector ca issue` (CA in {}), \
             for spiffe://cluster.local/ns/<namespace>/sa/<service account>",
            ids.ca_dir().display()
        ),
        None => println!("this cluster runs without mTLS (no identities issued)"),
    }
    println!(
        "{:<14} {:<6} {:<45} {:>8}",
        "SERVER POD", "TLS", "PEER IDENTITY", "REQUESTS"
    );
    for p in c.pods().iter().filter(|p| p.meshed()) {
        let m = c.metrics(&p.name)?;
        let mut seen: BTreeMap<(String, String), f64> = BTreeMap::new();
        for s in m.matching("meshlet_requests_total", &[("direction", "inbound")]) {
            let l = |k: &str| s.labels.get(k).cloned().unwrap_or_default();
            let peer = match l("peer_identity") {
                p if p.is_empty() => "(none: plaintext client)".to_string(),
                p => p,
            };
            *seen.entry((l("tls"), peer)).or_default() += s.value;
        }
        for ((tls, peer), n) in seen {
            println!("{:<14} {:<6} {:<45} {:>8}", p.name, tls, peer, n);
        }
    }

    let marker = "DEMO-SECRET-MARKER";
    let url = format!("http://{BACKEND}/{marker}");
    for (pod, what) in [
        (
            "client",
            "meshed client -> meshed backend (sidecar to sidecar, mTLS)",
        ),
        (
            "legacy",
            "opted-out client -> meshed backend (plaintext, control)",
        ),
    ] {
        let mut cap = c.capture(pod)?;
        c.exec_ok(pod, &["curl", "-sS", "--max-time", "20", &url], T)?;
        let pcap = cap.stop()?;
        section(&format!(
            "on the wire: {what}; tcpdump -A on {} (node end of {pod}'s veth)",
            cap.iface
        ));
        println!(
            "marker {marker:?} in the capture: {}",
            if capture::contains(&pcap, marker.as_bytes()) {
                "YES, readable"
            } else {
                "no (encrypted)"
            }
        );
        println!(
            "ClientHello offering ALPN meshlet/1 in the capture: {}",
            if capture::contains(&pcap, meshlet_api::MESH_ALPN) {
                "yes (a new mTLS handshake)"
            } else {
                "no (a connection set up earlier was reused, or no mTLS)"
            }
        );
        println!(
            "TLS application-data record header (17 03 03) in the capture: {}",
            if capture::contains(&pcap, b"\x17\x03\x03") {
                "yes"
            } else {
                "no"
            }
        );
        println!(
            "packets carrying data (each: a tcpdump line, then IP/TCP header and payload as \
             ASCII, non-printable bytes shown as '.'):"
        );
        for l in cap.ascii(EXCERPT)? {
            // Non-printable payload is dots already; keep lines short for a terminal.
            println!("  {}", l.chars().take(110).collect::<String>());
        }
    }
    Ok(())
}
