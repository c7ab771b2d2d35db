//! Mesh mTLS cases: identities provisioned by the harness (`cluster/identity.rs`), the
//! bytes on the wire, strict vs permissive, the identity the server sees, rotation
//! under traffic, and what strict mode does with garbage.

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    os::unix::fs::MetadataExt,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{bail, ensure, Context, Result};
use meshlet_api::env as menv;
use meshlet_e2e::cluster::{capture, http_in, Cluster, ClusterBuilder, Metrics};

use super::{curl, delta, json, metrics, sample, start, BACKEND, REQUESTS, T};

const EXPIRY: &str = "meshlet_identity_cert_expiry_timestamp_seconds";
const HANDSHAKE_ERRORS: &str = "meshlet_tls_handshake_errors_total";
const CLIENT_ID: &str = "spiffe://cluster.local/ns/hello/sa/client";
const BACKENDS: [&str; 2] = ["backend-v1", "backend-v2"];

fn strict() -> ClusterBuilder {
    ClusterBuilder::new(sample())
        .annotate("backend-v1", meshlet_api::annotations::TLS_MODE, "strict")
        .annotate("backend-v2", meshlet_api::annotations::TLS_MODE, "strict")
}

fn proxy_environ(c: &Cluster, pod: &str) -> Result<String> {
    let name = c.pod(pod)?.name.clone();
    let pid = c
        .container_pids()
        .into_iter()
        .find(|(p, ct, _)| *p == name && ct == meshlet_api::PROXY_CONTAINER_NAME)
        .map(|(_, _, pid)| pid)
        .with_context(|| format!("no proxy process in {pod}"))?;
    let raw = std::fs::read(format!("/proc/{pid}/environ"))?;
    Ok(String::from_utf8_lossy(&raw).replace('\0', "\n"))
}

fn backends_metrics(c: &Cluster) -> Result<Vec<Metrics>> {
    BACKENDS.iter().map(|p| metrics(c, p)).collect()
}

fn sum_delta(before: &[Metrics], after: &[Metrics], name: &str, f: &[(&str, &str)]) -> f64 {
    before
        .iter()
        .zip(after)
        .map(|(b, a)| delta(b, a, name, f))
        .sum()
}

fn now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or_default()
}

/// Every injected pod's proxy gets an identity for its namespace/service account;
/// `.mtls(false)` gives none and the sidecars talk plaintext.
pub fn mtls_identity_provisioned_per_pod() -> Result<()> {
    let c = start(ClusterBuilder::new(sample()))?;
    let ids = c.identities().context("mTLS is off by default")?;
    let mut meshed = 0;
    for p in c.pods() {
        let dir = ids.dir_of(&p.name);
        if !p.meshed() {
            ensure!(!dir.exists(), "unmeshed pod {} got an identity", p.name);
            continue;
        }
        meshed += 1;
        for f in ["ca.pem", "cert.pem", "key.pem"] {
            let m =
                std::fs::metadata(dir.join(f)).with_context(|| format!("{} of {}", f, p.name))?;
            ensure!(
                m.uid() == meshlet_api::PROXY_UID,
                "{f} of {} is owned by uid {}, the proxy runs as 1337",
                p.name,
                m.uid()
            );
        }
        let env = proxy_environ(&c, &p.name)?;
        let want = format!("{}={}", menv::PROXY_IDENTITY_DIR, dir.display());
        ensure!(
            env.lines().any(|l| l == want),
            "proxy of {} lacks {want}:\n{env}",
            p.name
        );
        let m = metrics(&c, &p.name)?;
        let exp = m.sum(EXPIRY, &[]);
        ensure!(
            (exp - (now() + 24.0 * 3600.0)).abs() < 600.0,
            "{} proxy: {EXPIRY} = {exp}, want about now + 24 h",
            p.name
        );
    }
    ensure!(meshed >= 5, "only {meshed} meshed pods");
    // The sidecars' SANs are what the mesh config expects: one request proves it.
    let body = curl(&c, "client", &[&format!("http://{BACKEND}/who")])?;
    ensure!(
        json(&body)?["headers"]["meshlet-client-id"] == CLIENT_ID,
        "answer: {body}"
    );
    drop(c);

    let c = start(ClusterBuilder::new(sample()).mtls(false))?;
    ensure!(c.identities().is_none(), "identities with mtls(false)");
    let env = proxy_environ(&c, "client")?;
    ensure!(
        !env.contains(menv::PROXY_IDENTITY_DIR),
        "identity dir set with mtls(false):\n{env}"
    );
    ensure!(
        !metrics(&c, "client")?.has(EXPIRY),
        "expiry metric without identity"
    );
    let before = backends_metrics(&c)?;
    let body = curl(&c, "client", &[&format!("http://{BACKEND}/plain")])?;
    let v = json(&body)?;
    ensure!(
        v["headers"].get("meshlet-client-id").is_none(),
        "answer: {body}"
    );
    let after = backends_metrics(&c)?;
    let plain = sum_delta(
        &before,
        &after,
        REQUESTS,
        &[("direction", "inbound"), ("tls", "false")],
    );
    ensure!(
        plain == 1.0,
        "backends counted {plain} plaintext inbound requests, want 1"
    );
    Ok(())
}

/// A request between two meshed pods is TLS on the wire (its marker never shows, the
/// mesh ALPN does); the same request from an opted-out pod shows the marker.
pub fn mtls_bytes_on_the_wire_are_tls() -> Result<()> {
    let c = start(ClusterBuilder::new(sample()))?;
    let marker = format!("MARKER-{}-plaintext", std::process::id());
    let url = format!("http://{BACKEND}/{marker}");
    let body = format!("body-{marker}");
    let request = |pod: &str| -> Result<Vec<u8>> {
        let mut cap = c.capture(pod)?;
        let answer = curl(&c, pod, &["-d", &body, &url])?;
        let pcap = cap.stop()?;
        let v = json(&answer)?;
        ensure!(
            v["body"] == body.as_str() && v["path"] == format!("/{marker}").as_str(),
            "the backend app did not get the marked request from {pod}: {answer}"
        );
        Ok(pcap)
    };
    let meshed = request("client")?;
    ensure!(
        meshed.len() > 1000,
        "capture on the client's veth holds {} bytes",
        meshed.len()
    );
    ensure!(
        !capture::contains(&meshed, marker.as_bytes()),
        "the marker crossed the wire in plaintext between two meshed pods"
    );
    ensure!(
        capture::contains(&meshed, meshlet_api::MESH_ALPN),
        "no ClientHello offering ALPN {} in the client's capture",
        String::from_utf8_lossy(meshlet_api::MESH_ALPN)
    );
    let control = request("legacy")?;
    ensure!(
        capture::contains(&control, marker.as_bytes()),
        "control: the opted-out pod's plaintext request does not show the marker, so the capture proves nothing"
    );
    Ok(())
}

/// `meshlet.io/tls-mode: strict` on the server refuses an unmeshed client; permissive
/// (the default) accepts it; meshed clients get through both.
pub fn mtls_strict_refuses_unmeshed_permissive_accepts() -> Result<()> {
    let c = start(strict())?;
    let before = backends_metrics(&c)?;
    let out = c.exec(
        "legacy",
        &[
            "curl",
            "-sS",
            "--max-time",
            "10",
            &format!("http://{BACKEND}/legacy"),
        ],
        T,
    )?;
    ensure!(
        !out.status.success(),
        "strict backend answered an unmeshed client: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    let body = curl(&c, "client", &[&format!("http://{BACKEND}/meshed")])?;
    ensure!(
        json(&body)?["headers"]["meshlet-client-id"] == CLIENT_ID,
        "answer: {body}"
    );
    let after = backends_metrics(&c)?;
    let refused = sum_delta(
        &before,
        &after,
        HANDSHAKE_ERRORS,
        &[("direction", "inbound"), ("reason", "plaintext")],
    );
    ensure!(
        refused >= 1.0,
        "no plaintext refusal counted (got {refused})"
    );
    let plain = sum_delta(
        &before,
        &after,
        REQUESTS,
        &[("direction", "inbound"), ("tls", "false")],
    );
    ensure!(
        plain == 0.0,
        "strict backends served {plain} plaintext requests"
    );
    drop(c);

    let c = start(ClusterBuilder::new(sample()))?;
    let body = curl(&c, "legacy", &[&format!("http://{BACKEND}/legacy")])?;
    ensure!(
        json(&body)?["headers"].get("meshlet-client-id").is_none(),
        "permissive backend: {body}"
    );
    Ok(())
}

/// The server app sees the client's SPIFFE id; the server's metrics count the request
/// as mTLS from that identity, the client's as mTLS outbound.
pub fn mtls_server_sees_client_identity() -> Result<()> {
    let c = start(ClusterBuilder::new(sample()))?;
    let before = backends_metrics(&c)?;
    let cb = metrics(&c, "client")?;
    let body = curl(&c, "client", &[&format!("http://{BACKEND}/who")])?;
    let v = json(&body)?;
    ensure!(
        v["headers"]["meshlet-client-id"] == CLIENT_ID,
        "answer: {body}"
    );
    let after = backends_metrics(&c)?;
    let ca = metrics(&c, "client")?;
    let seen = sum_delta(
        &before,
        &after,
        REQUESTS,
        &[
            ("direction", "inbound"),
            ("tls", "true"),
            ("peer_identity", CLIENT_ID),
        ],
    );
    ensure!(
        seen == 1.0,
        "backends counted {seen} mTLS requests from {CLIENT_ID}, want 1"
    );
    let out = delta(
        &cb,
        &ca,
        REQUESTS,
        &[("direction", "outbound"), ("tls", "true")],
    );
    ensure!(
        out == 1.0,
        "client counted {out} outbound mTLS requests, want 1"
    );
    Ok(())
}

fn expiry(c: &Cluster, pod: &str) -> Result<f64> {
    Ok(metrics(c, pod)?.sum(EXPIRY, &[]))
}

/// Reissuing the client's and the servers' certificates while requests run loses
/// none, and the proxies export the new NotAfter.
pub fn mtls_rotation_mid_traffic_loses_nothing() -> Result<()> {
    let c = start(strict())?;
    let client = c.pod("client")?.clone();
    let addr: SocketAddr = format!("{BACKEND}:80").parse()?;
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failures) = std::thread::scope(|s| -> Result<(u32, Vec<String>)> {
        let stop2 = stop.clone();
        let ns = client.netns.clone();
        let loop_ = s.spawn(move || {
            let (mut ok, mut failures) = (0u32, Vec::new());
            let t = Instant::now();
            // Bounded: at most 2000 requests or 30 s.
            for i in 0..2000 {
                if (stop2.load(Ordering::SeqCst) && i > 0) || t.elapsed() > Duration::from_secs(30)
                {
                    break;
                }
                match http_in(&ns, addr, "GET", &format!("/rot/{i}")) {
                    Ok((200, _)) => ok += 1,
                    Ok((st, b)) => failures.push(format!("#{i}: {st} {b}")),
                    Err(e) => failures.push(format!("#{i}: {e}")),
                }
            }
            (ok, failures)
        });
        std::thread::sleep(Duration::from_millis(300));
        let lifetime = Duration::from_secs(48 * 3600);
        for p in ["client", "backend-v1", "backend-v2"] {
            c.rotate_identity(p, lifetime)?;
        }
        let want = now() + 48.0 * 3600.0;
        let deadline = Instant::now() + Duration::from_secs(10);
        for p in ["client", "backend-v1", "backend-v2"] {
            loop {
                let e = expiry(&c, p)?;
                if (e - want).abs() < 120.0 {
                    break;
                }
                if Instant::now() > deadline {
                    stop.store(true, Ordering::SeqCst);
                    bail!("{p}: {EXPIRY} = {e} after rotation, want about {want}");
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        // Traffic goes on a while on the new certificates.
        std::thread::sleep(Duration::from_millis(700));
        stop.store(true, Ordering::SeqCst);
        loop_
            .join()
            .map_err(|_| anyhow::anyhow!("the request loop panicked"))
    })?;
    println!(
        "    {ok} requests during rotation, {} failed",
        failures.len()
    );
    ensure!(
        failures.is_empty(),
        "{} of {} requests failed: {:?}",
        failures.len(),
        ok as usize + failures.len(),
        &failures[..failures.len().min(5)]
    );
    ensure!(ok >= 20, "only {ok} requests ran during the rotation");
    // New connections (new handshakes) work with the new certificates.
    let body = curl(
        &c,
        "client",
        &[
            "-H",
            "Connection: close",
            &format!("http://{BACKEND}/after"),
        ],
    )?;
    ensure!(
        json(&body)?["headers"]["meshlet-client-id"] == CLIENT_ID,
        "after rotation: {body}"
    );
    Ok(())
}

/// Sends `bytes` to `addr` from pod `pod` and tells whether the server closed the
/// connection (EOF or reset) within 5 s without answering anything.
fn closed_without_answer(
    c: &Cluster,
    pod: &str,
    addr: SocketAddr,
    bytes: &'static [u8],
) -> Result<bool> {
    let ns = c.pod(pod)?.netns.clone();
    let r = ns.enter(move || -> std::io::Result<bool> {
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        s.write_all(bytes)?;
        let mut buf = [0u8; 64];
        match s.read(&mut buf) {
            Ok(0) => Ok(true),
            Ok(_) => Ok(false),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => Ok(true),
            Err(e) => Err(e),
        }
    })?;
    Ok(r?)
}

/// Under strict, garbage, plaintext and a non-mesh TLS ClientHello sent straight to
/// the server pod are closed and counted by reason, while a concurrent good request
/// through the mesh succeeds.
pub fn mtls_strict_closes_garbage_and_foreign_tls() -> Result<()> {
    let c = start(strict())?;
    let target = SocketAddr::from((c.pod("backend-v1")?.ip, 8080));
    let before = metrics(&c, "backend-v1")?;
    let slow = c.spawn_client(
        "client",
        &[
            "curl",
            "-sS",
            "--max-time",
            "20",
            &format!("http://{BACKEND}/slow?ms=1500"),
        ],
    )?;
    let malformed = closed_without_answer(&c, "legacy", target, b"\x16\x03\x01\x00\x08garbage!")?;
    let plaintext = closed_without_answer(&c, "legacy", target, b"\x00\xffnot-a-protocol\r\n")?;
    let foreign = c.exec(
        "legacy",
        &[
            "curl",
            "-sS",
            "-k",
            "--max-time",
            "10",
            &format!("https://{target}/"),
        ],
        T,
    )?;
    let good = slow.wait_with_output()?;
    ensure!(malformed, "a malformed TLS record was answered");
    ensure!(plaintext, "plaintext garbage was answered");
    ensure!(
        !foreign.status.success(),
        "a non-mesh TLS client got an answer: {}",
        String::from_utf8_lossy(&foreign.stdout)
    );
    ensure!(
        good.status.success(),
        "the concurrent mesh request failed: {}",
        String::from_utf8_lossy(&good.stderr)
    );
    ensure!(
        json(&String::from_utf8_lossy(&good.stdout))?["headers"]["meshlet-client-id"] == CLIENT_ID
    );
    let after = metrics(&c, "backend-v1")?;
    for reason in ["malformed", "plaintext", "non_mesh_tls"] {
        let n = delta(
            &before,
            &after,
            HANDSHAKE_ERRORS,
            &[("direction", "inbound"), ("reason", reason)],
        );
        ensure!(
            n >= 1.0,
            "{HANDSHAKE_ERRORS}{{reason={reason}}} moved by {n}, want >= 1"
        );
    }
    Ok(())
}
