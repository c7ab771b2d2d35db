//! `meshlet-minimesh`: the demo `make demo` runs.
//!
//! Builds the mini-mesh from `samples/hello.yaml`, shows one injected pod and its
//! redirect rules, sends HTTP/1.1, h2c, WebSocket, server-first TCP and DNS traffic,
//! prints what the sidecars counted, the mTLS peer identities they saw and a packet
//! capture of a meshed vs a plaintext request, a `kubectl top pod --containers` table measured
//! from `/proc`, then removes everything.

use std::{
    collections::BTreeMap,
    path::Path,
    time::{Duration, Instant},
};

mod mtls;

use crate::cluster::{self, metrics::Metrics, top, Cluster, ClusterBuilder, Error};

const BACKEND: &str = "198.19.0.10";
const GREETER: &str = "198.19.0.20:3306";
const T: Duration = Duration::from_secs(30);

fn section(title: &str) {
    println!("\n== {title} ==");
}

/// Runs the demo on `manifests`.
pub fn run(manifests: &Path) -> Result<(), Error> {
    println!("meshlet mini-mesh demo");
    println!(
        "This is NOT a Kubernetes cluster: it is a mini-mesh of Linux network namespaces on this \
         machine. One 'node' namespace routes; each pod is a namespace with a veth (CNI ptp style); \
         Services are kube-proxy-style DNAT rules (198.19.0.0/16) in the node. Each pod runs the real \
         meshlet-init and meshlet-proxy binaries (as UID 1337) next to meshlet-testapp processes."
    );
    println!("manifests: {}", manifests.display());
    let t = Instant::now();
    let c = ClusterBuilder::new(manifests).start()?;
    println!(
        "started {} pods in {:.1}s (namespaces {}-*); sidecars from {}",
        c.pods().len(),
        t.elapsed().as_secs_f64(),
        c.prefix(),
        c.inject_path()
    );
    pods_table(&c);
    injected_pod(&c, "backend-v1")?;

    let pids = c.container_pids();
    let before: Vec<Option<top::Sample>> =
        pids.iter().map(|(_, _, pid)| top::sample(*pid)).collect();
    let started = Instant::now();
    traffic(&c)?;
    let window = started.elapsed();
    let after: Vec<Option<top::Sample>> =
        pids.iter().map(|(_, _, pid)| top::sample(*pid)).collect();

    sidecar_metrics(&c)?;
    mtls::show(&c)?;

    section("kubectl top pod --containers (measured from /proc)");
    let rows: Vec<top::Row> = pids
        .iter()
        .zip(before.iter().zip(after.iter()))
        .filter_map(|((pod, container, _), (b, a))| {
            let (b, a) = ((*b)?, (*a)?);
            Some(top::Row {
                pod: pod.clone(),
                container: container.clone(),
                millicores: top::millicores(b, a, window),
                memory_bytes: a.rss_bytes,
            })
        })
        .collect();
    print!("{}", top::format(&rows));
    println!(
        "(CPU: millicores averaged over the {:.1}s traffic window; MEMORY: resident set size from \
         /proc/<pid>/status. metrics-server would report the cgroup working set instead.)",
        window.as_secs_f64()
    );
    let proxies: Vec<&top::Row> = rows
        .iter()
        .filter(|r| r.container == meshlet_api::PROXY_CONTAINER_NAME)
        .collect();
    if !proxies.is_empty() {
        let max = proxies.iter().map(|r| r.memory_bytes).max().unwrap_or(0);
        let bin = &c.binaries().proxy;
        let bin = std::fs::canonicalize(bin).unwrap_or_else(|_| bin.clone());
        let profile = if bin.components().any(|c| c.as_os_str() == "release") {
            "release build"
        } else {
            "debug build: `MLE2E_BIN_DIR` can point at release binaries"
        };
        println!(
            "{} meshlet-proxy sidecars; largest RSS {:.1} MiB ({}, {profile}).",
            proxies.len(),
            max as f64 / (1024.0 * 1024.0),
            bin.display()
        );
    }

    section("cleanup");
    let prefix = c.prefix().to_string();
    drop(c);
    let left = cluster::netns::list_with_prefix(&prefix);
    println!(
        "all processes killed, namespaces {prefix}-* deleted ({} left).",
        left.len()
    );
    if !left.is_empty() {
        return Err(Error::Other(format!("namespaces left behind: {left:?}")));
    }
    Ok(())
}

fn pods_table(c: &Cluster) {
    section("pods");
    println!("{:<16} {:<13} {:<8} CONTAINERS", "POD", "IP", "MESHED");
    for p in c.pods() {
        let spec = p.pod.spec.clone().unwrap_or_default();
        let inits: Vec<String> = spec
            .init_containers
            .iter()
            .flatten()
            .map(|c| {
                if c.restart_policy.as_deref() == Some("Always") {
                    format!("{} (native sidecar)", c.name)
                } else {
                    format!("{} (init)", c.name)
                }
            })
            .collect();
        let apps: Vec<String> = spec.containers.iter().map(|c| c.name.clone()).collect();
        println!(
            "{:<16} {:<13} {:<8} {}",
            p.name,
            p.ip.to_string(),
            if p.meshed() { "yes" } else { "no" },
            inits.into_iter().chain(apps).collect::<Vec<_>>().join(", ")
        );
    }
    println!("services:");
    for s in c.services() {
        let ports: Vec<String> = s
            .ports
            .iter()
            .map(|p| format!("{}/{:?}", p.port, p.protocol).to_lowercase())
            .collect();
        println!(
            "  {}/{} {} ports {} -> {}",
            s.namespace,
            s.name,
            s.cluster_ip,
            ports.join(","),
            s.pods.join(",")
        );
    }
}

fn injected_pod(c: &Cluster, pod: &str) -> Result<(), Error> {
    let p = c.pod(pod)?;
    section(&format!("injected pod {}", p.name));
    let spec = p.pod.spec.clone().unwrap_or_default();
    for ic in spec.init_containers.iter().flatten() {
        let env: Vec<String> = ic
            .env
            .iter()
            .flatten()
            .filter_map(|e| {
                e.value
                    .as_ref()
                    .map(|v| format!("{}={}", e.name, shorten(v)))
            })
            .collect();
        let user = ic
            .security_context
            .as_ref()
            .and_then(|s| s.run_as_user)
            .map(|u| format!(" uid {u}"))
            .unwrap_or_default();
        println!(
            "  {} [{}]{user}: {}",
            ic.name,
            ic.image.clone().unwrap_or_default(),
            env.join(" ")
        );
    }
    println!("  redirect rules meshlet-init applied (iptables-save -t nat, inside the pod):");
    let rules = c.iptables_save(&p.name)?;
    for l in rules
        .lines()
        .filter(|l| l.starts_with("-A") && l.contains("MESHLET"))
        .take(20)
    {
        println!("    {l}");
    }
    Ok(())
}

fn shorten(v: &str) -> String {
    if v.chars().count() > 40 {
        format!("{}...", v.chars().take(37).collect::<String>())
    } else {
        v.to_string()
    }
}

fn curl(c: &Cluster, args: &[&str]) -> Result<String, Error> {
    let mut argv = vec!["curl", "-sS", "--max-time", "20"];
    argv.extend_from_slice(args);
    c.exec_ok("client", &argv, T)
}

fn traffic(c: &Cluster) -> Result<(), Error> {
    section("traffic from pod client");
    let mut by_backend: BTreeMap<String, u32> = BTreeMap::new();
    for i in 0..20 {
        let body = curl(c, &[&format!("http://{BACKEND}/demo/{i}")])?;
        let name = serde_json::from_str::<serde_json::Value>(&body)
            .ok()
            .and_then(|v| v["name"].as_str().map(String::from))
            .unwrap_or_else(|| "?".into());
        *by_backend.entry(name).or_default() += 1;
    }
    println!(
        "  HTTP/1.1  20 x GET http://{BACKEND}/demo/N (Service backend) answered by {by_backend:?}"
    );
    if by_backend.len() == 1 {
        println!(
            "            note: one backend took every request: the client's proxy reuses its pooled \
             upstream connection to the ClusterIP, and kube-proxy's DNAT balances per connection, \
             not per request"
        );
    }
    let mut versions = BTreeMap::new();
    for _ in 0..10 {
        let v = curl(
            c,
            &[
                "--http2-prior-knowledge",
                "-o",
                "/dev/null",
                "-w",
                "%{http_version}",
                &format!("http://{BACKEND}/h2"),
            ],
        )?;
        *versions.entry(format!("HTTP/{v}")).or_insert(0) += 1;
    }
    println!("  h2c       10 x curl --http2-prior-knowledge: {versions:?}");
    for _ in 0..3 {
        curl(
            c,
            &["-o", "/dev/null", &format!("http://{BACKEND}/status/503")],
        )?;
    }
    println!("  HTTP/1.1  3 x GET /status/503 (to show status codes in the metrics)");
    let t = Instant::now();
    let sum = c.exec_ok(
        "client",
        &[
            "bash",
            "-o",
            "pipefail",
            "-c",
            &format!(
                "curl -sS --max-time 60 http://{BACKEND}/bytes/{} | sha256sum",
                10 * 1024 * 1024
            ),
        ],
        T,
    )?;
    let want = crate::testapp::pattern::sha256_of_pattern(10 * 1024 * 1024);
    println!(
        "  HTTP/1.1  10 MiB download in {:.2}s, checksum {}",
        t.elapsed().as_secs_f64(),
        if sum.starts_with(&want) {
            "matches"
        } else {
            "DIFFERS"
        }
    );
    for (label, extra) in [("h2c     ", vec![]), ("HTTP/1.1", vec!["--h1"])] {
        let mut argv = vec!["h2load", "-n", "3000", "-c", "4", "-m", "8"];
        argv.extend(extra);
        let url = format!("http://{BACKEND}/load");
        argv.push(&url);
        let out = c.exec_ok("client", &argv, T)?;
        let pick = |prefix: &str| {
            out.lines()
                .find(|l| l.starts_with(prefix))
                .unwrap_or("")
                .trim()
                .to_string()
        };
        println!(
            "  {label}  h2load 3000 requests over 4 connections: {}; {}",
            pick("finished in"),
            pick("requests:")
        );
    }
    let ws = c.testapp(
        "client",
        &[
            "ws-client",
            "--url",
            &format!("ws://{BACKEND}:8081/chat"),
            "--message",
            "hi",
            "--message",
            "mesh",
        ],
        T,
    )?;
    println!("  WebSocket ws://{BACKEND}:8081/chat: {}", ws.trim());
    let mut ms = Vec::new();
    for _ in 0..5 {
        let out = c.testapp("client", &["banner-client", "--addr", GREETER], T)?;
        if let Some(v) = serde_json::from_str::<serde_json::Value>(&out)
            .ok()
            .and_then(|v| v["greetingMs"].as_f64())
        {
            ms.push(format!("{v:.1}"));
        }
    }
    println!(
        "  TCP       5 x server-first protocol on opaque port {GREETER}: greeting after [{}] ms (detect timeout would be 1000 ms)",
        ms.join(", ")
    );
    let dig = c.exec_ok(
        "client",
        &[
            "dig",
            "@198.19.0.53",
            "+short",
            "+time=2",
            "backend.hello.svc.cluster.local",
        ],
        T,
    )?;
    println!(
        "  UDP       dig backend.hello.svc.cluster.local @198.19.0.53 -> {} (UDP is not captured)",
        dig.trim()
    );
    Ok(())
}

fn sidecar_metrics(c: &Cluster) -> Result<(), Error> {
    section("what the sidecars saw (GET :15020/metrics of each pod)");
    println!(
        "{:<14} {:<9} {:<15} {:>6} {:>8}",
        "POD", "DIRECTION", "SERVICE", "STATUS", "REQUESTS"
    );
    let mut scraped: Vec<(String, Metrics)> = Vec::new();
    for p in c.pods().iter().filter(|p| p.meshed()) {
        let m = c.metrics(&p.name)?;
        for s in m.matching("meshlet_requests_total", &[]) {
            let l = |k: &str| s.labels.get(k).cloned().unwrap_or_default();
            println!(
                "{:<14} {:<9} {:<15} {:>6} {:>8}",
                p.name,
                l("direction"),
                l("service"),
                l("status_code"),
                s.value
            );
        }
        scraped.push((p.name.clone(), m));
    }
    println!(
        "\n{:<14} {:<9} {:>11} {:>14} {:>14}",
        "POD", "DIRECTION", "CONNECTIONS", "BYTES READ", "BYTES WRITTEN"
    );
    for (pod, m) in &scraped {
        for dir in ["outbound", "inbound"] {
            let f = [("direction", dir)];
            let conns = m.sum("meshlet_tcp_connections_opened_total", &f);
            if conns == 0.0 {
                continue;
            }
            println!(
                "{:<14} {:<9} {:>11} {:>14} {:>14}",
                pod,
                dir,
                conns,
                m.sum("meshlet_tcp_received_bytes_total", &f),
                m.sum("meshlet_tcp_sent_bytes_total", &f)
            );
        }
    }
    Ok(())
}
