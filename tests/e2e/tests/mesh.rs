//! End-to-end tests on the netns mini-cluster running `samples/hello.yaml`.
//!
//! A runner of our own (`harness = false`): each case builds its own cluster, cases
//! run one after another, and the suite ends by checking that no namespace and no
//! process of this run is left. Needs root, iptables, iproute2, curl and dig; when they
//! are missing every case FAILS with the install command, it never passes silently.
//!
//! `cargo test -p meshlet-e2e --test mesh [-- FILTER...]`

use std::{
    panic::AssertUnwindSafe,
    path::PathBuf,
    process::ExitCode,
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context, Result};
use k8s_openapi::api::core::v1::Container;
use meshlet_api::env as menv;
use meshlet_e2e::{
    cluster::{self, Cluster, ClusterBuilder, InjectMode, InjectPath, Metrics},
    testapp::pattern,
};
use nix::sys::signal::Signal;

const BACKEND: &str = "198.19.0.10";
const GREETER: &str = "198.19.0.20:3306";
const DNS: &str = "198.19.0.53";
const SVC_BACKEND: &str = "hello/backend";
const SVC_GREETER: &str = "hello/greeter";
const REQUESTS: &str = "meshlet_requests_total";
const OPENED: &str = "meshlet_tcp_connections_opened_total";
const SENT: &str = "meshlet_tcp_sent_bytes_total";
const RECEIVED: &str = "meshlet_tcp_received_bytes_total";
const T: Duration = Duration::from_secs(30);

// Mesh mTLS cases live in a file of their own.
#[path = "mesh/mtls.rs"]
mod mtls;
use mtls::*;
#[path = "mesh/config.rs"]
mod config;
use config::*;
// HTTPRoute cases (routing, timeouts, retries, budgets) too.
#[path = "mesh/routing.rs"]
mod routing;
use routing::*;
#[path = "mesh/authz.rs"]
mod authz;
use authz::*;

// Outlier detection cases.
#[path = "mesh/outlier.rs"]
mod outlier;
use outlier::*;

// HTTP/1.1 multiplexed over HTTP/2 between sidecars.
#[path = "mesh/multiplex.rs"]
mod multiplex;
use multiplex::*;

type Case = (&'static str, fn() -> Result<()>);

/// Names each case after its function.
macro_rules! cases {
    ($($f:ident),* $(,)?) => { &[$((stringify!($f), $f as fn() -> Result<()>)),*] };
}

const CASES: &[Case] = cases![
    http1_through_both_sidecars,
    h2c_prior_knowledge,
    websocket_echo,
    server_first_tcp_on_opaque_port,
    tcp_half_close_through_both_sidecars,
    excluded_inbound_port_bypasses_proxy,
    upload_and_download_100mib,
    metrics_count_requests_bytes_connections,
    h2load_h2c_and_http1_counts_exact,
    sigterm_drains_in_flight_request,
    udp_dns_not_captured,
    init_rerun_is_idempotent,
    pods_come_from_the_injector,
    unmeshed_client_reaches_meshed_service,
    kube_proxy_spreads_connections,
    meshed_client_requests_reach_every_backend,
    backend_pod_deleted_requests_keep_working,
    rolling_update_replaces_every_backend,
    mesh_config_reload_takes_effect,
    admin_endpoints_and_shutdown,
    dual_stack_ipv6_through_both_sidecars,
    excluded_outbound_port_bypasses_client_proxy,
    excluded_outbound_cidr_bypasses_client_proxy,
    classic_sidecar_when_native_is_off,
    rewritten_app_probes_answer_from_the_node,
    mtls_identity_provisioned_per_pod,
    mtls_bytes_on_the_wire_are_tls,
    mtls_strict_refuses_unmeshed_permissive_accepts,
    mtls_server_sees_client_identity,
    mtls_rotation_mid_traffic_loses_nothing,
    mtls_strict_closes_garbage_and_foreign_tls,
    outlier_one_h2_connection_spreads_evenly_over_three_endpoints,
    outlier_failing_endpoint_is_ejected_and_returns,
    outlier_opaque_tcp_goes_to_the_original_destination,
    mtls_http1_connections_multiplex_over_one_h2_connection,
    config_delivered_by_the_control_plane,
    routing_by_headers_weights_redirects_rewrites_timeouts,
    routing_retries_are_safe_and_within_budget,
    routing_change_under_traffic_loses_no_request,
    routing_grpc_route_by_service_and_method,
    authz_policy_allows_only_frontend,
    authz_tcp_denied_identity_closed,
    authz_plaintext_denied_once_targeted,
    authz_ports_not_named_are_denied,
    authz_namespace_default_deny_keeps_probes,
    authz_policy_change_mid_traffic,
];

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|a| a == "--list") {
        for (name, _) in CASES {
            println!("{name}: test");
        }
        println!("suite_leaves_nothing_behind: test");
        println!("root_namespace_untouched: test");
        return ExitCode::SUCCESS;
    }
    // Flags libtest would take (--nocapture, --test-threads=N, ...) are accepted and
    // ignored; plain words filter cases by substring.
    let filters: Vec<&str> = args
        .iter()
        .filter(|a| !a.starts_with('-'))
        .map(String::as_str)
        .collect();
    let selected: Vec<&Case> = CASES
        .iter()
        .filter(|(n, _)| filters.is_empty() || filters.iter().any(|f| n.contains(f)))
        .collect();
    if selected.is_empty() {
        // As libtest does: a filter meant for other test binaries selects nothing here.
        println!("\nrunning 0 tests (no case matches {filters:?})");
        return ExitCode::SUCCESS;
    }
    let started = Instant::now();
    println!(
        "\nrunning {} tests (netns mini-cluster, pid {})",
        selected.len() + 2,
        std::process::id()
    );
    let mut failed = Vec::new();
    let prereq = cluster::check_prereqs().and_then(|()| cluster::Binaries::locate().map(drop));
    let root_before = root_namespace_snapshot();
    for (name, f) in &selected {
        let t = Instant::now();
        let result = match &prereq {
            Err(e) => Err(anyhow::anyhow!("{e}")),
            Ok(()) => match std::panic::catch_unwind(AssertUnwindSafe(f)) {
                Ok(r) => r,
                Err(p) => Err(anyhow::anyhow!(
                    "panicked: {}",
                    p.downcast_ref::<String>()
                        .cloned()
                        .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                        .unwrap_or_default()
                )),
            },
        };
        match result {
            Ok(()) => println!("test {name} ... ok ({:.1}s)", t.elapsed().as_secs_f64()),
            Err(e) => {
                println!(
                    "test {name} ... FAILED ({:.1}s)\n    {e:#}",
                    t.elapsed().as_secs_f64()
                );
                failed.push(name.to_string());
            }
        }
    }
    // Every cluster is dropped by now: nothing of this run may remain.
    let (ns, pids) = cluster::leftovers();
    if ns.is_empty() && pids.is_empty() {
        println!("test suite_leaves_nothing_behind ... ok");
    } else {
        println!("test suite_leaves_nothing_behind ... FAILED\n    namespaces left: {ns:?}, processes left: {pids:?}");
        failed.push("suite_leaves_nothing_behind".into());
    }
    // NETWORK SAFETY: the host's own namespace shows nothing of ours afterwards.
    let root_after = root_namespace_snapshot();
    if root_before == root_after {
        println!("test root_namespace_untouched ... ok");
    } else {
        println!(
            "test root_namespace_untouched ... FAILED\n    before: {root_before:#?}\n    after: {root_after:#?}"
        );
        failed.push("root_namespace_untouched".into());
    }
    let total = selected.len() + 2;
    println!(
        "\ntest result: {}. {} passed; {} failed; finished in {:.1}s",
        if failed.is_empty() { "ok" } else { "FAILED" },
        total - failed.len(),
        failed.len(),
        started.elapsed().as_secs_f64()
    );
    if failed.is_empty() {
        ExitCode::SUCCESS
    } else {
        println!("failures: {}", failed.join(", "));
        ExitCode::FAILURE
    }
}

// === helpers ===

/// What of the host's root namespace this suite could touch, read-only: forwarding
/// sysctls, and routes, addresses and nat rules that mention the test ranges or our
/// chains.
fn root_namespace_snapshot() -> Vec<String> {
    let ours = |l: &&str| {
        [
            "198.18.",
            "198.19.",
            "fd00:6d65:7368",
            "MESHLET",
            "KUBE-",
            "169.254.1.1",
        ]
        .iter()
        .any(|m| l.contains(m))
    };
    let mut out = Vec::new();
    for f in [
        "/proc/sys/net/ipv4/ip_forward",
        "/proc/sys/net/ipv6/conf/all/forwarding",
    ] {
        out.push(format!(
            "{f}={}",
            std::fs::read_to_string(f).unwrap_or_default().trim()
        ));
    }
    for argv in [
        &["ip", "-4", "route", "show", "table", "all"][..],
        &["ip", "-6", "route", "show", "table", "all"],
        &["ip", "addr"],
        &["iptables-save", "-t", "nat"],
        &["ip6tables-save", "-t", "nat"],
    ] {
        let text = std::process::Command::new(argv[0])
            .args(&argv[1..])
            .env("PATH", cluster::netns::search_path())
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default();
        out.extend(
            text.lines()
                .filter(ours)
                .map(|l| format!("{}: {l}", argv.join(" "))),
        );
    }
    out
}

fn sample() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../samples/hello.yaml")
}

fn start(b: ClusterBuilder) -> Result<Cluster> {
    let c = b.start().context("starting the mini-cluster")?;
    println!("    [{}] sidecars from {}", c.prefix(), c.inject_path());
    Ok(c)
}

fn hello() -> Result<Cluster> {
    start(ClusterBuilder::new(sample()))
}

fn curl(c: &Cluster, pod: &str, args: &[&str]) -> Result<String> {
    let mut argv = vec!["curl", "-sS", "--max-time", "30"];
    argv.extend_from_slice(args);
    Ok(c.exec_ok(pod, &argv, T)?)
}

fn metrics(c: &Cluster, pod: &str) -> Result<Metrics> {
    c.metrics(pod)
        .with_context(|| format!("reading the metrics of {pod}"))
}

fn json(s: &str) -> Result<serde_json::Value> {
    serde_json::from_str(s.trim()).with_context(|| format!("not JSON: {s:?}"))
}

/// Delta of `name{filter}` between two scrapes.
fn delta(before: &Metrics, after: &Metrics, name: &str, filter: &[(&str, &str)]) -> f64 {
    after.sum(name, filter) - before.sum(name, filter)
}

fn out_of(dir: &str, svc: &'static str) -> Vec<(&'static str, &'static str)> {
    vec![
        (
            "direction",
            if dir == "in" { "inbound" } else { "outbound" },
        ),
        ("service", svc),
    ]
}

// === cases ===

fn http1_through_both_sidecars() -> Result<()> {
    let c = hello()?;
    let pods = ["client", "backend-v1", "backend-v2"];
    let before: Vec<Metrics> = pods.iter().map(|p| metrics(&c, p)).collect::<Result<_>>()?;
    let body = curl(
        &c,
        "client",
        &["-H", "x-e2e: yes", &format!("http://{BACKEND}/hello?x=1")],
    )?;
    let v = json(&body)?;
    let answered = v["name"].as_str().unwrap_or_default().to_string();
    ensure!(
        answered.starts_with("backend-v"),
        "answer not from a backend pod: {v}"
    );
    ensure!(
        v["path"] == "/hello?x=1" && v["method"] == "GET",
        "echo is wrong: {v}"
    );
    ensure!(
        v["headers"]["x-e2e"] == "yes",
        "header x-e2e lost on the way: {v}"
    );
    let after: Vec<Metrics> = pods.iter().map(|p| metrics(&c, p)).collect::<Result<_>>()?;
    let out = delta(
        &before[0],
        &after[0],
        REQUESTS,
        &[
            ("direction", "outbound"),
            ("service", SVC_BACKEND),
            ("status_code", "200"),
        ],
    );
    ensure!(
        out == 1.0,
        "client proxy counted {out} outbound requests to {SVC_BACKEND}, want 1:\n{}",
        c.metrics_text("client")?
    );
    let idx = if answered.starts_with("backend-v1") {
        1
    } else {
        2
    };
    // Inbound, the Service comes from the mesh config's endpoints (pod IP, target port).
    let inb = delta(
        &before[idx],
        &after[idx],
        REQUESTS,
        &[
            ("direction", "inbound"),
            ("service", SVC_BACKEND),
            ("status_code", "200"),
        ],
    );
    ensure!(
        inb == 1.0,
        "{answered}'s proxy counted {inb} inbound requests of {SVC_BACKEND}, want 1:\n{}",
        c.metrics_text(&answered)?
    );
    let other = 3 - idx;
    let none = delta(
        &before[other],
        &after[other],
        REQUESTS,
        &[("direction", "inbound")],
    );
    ensure!(
        none == 0.0,
        "the backend that did not answer counted {none} requests"
    );
    Ok(())
}

fn h2c_prior_knowledge() -> Result<()> {
    let c = hello()?;
    let before = metrics(&c, "client")?;
    let out = curl(
        &c,
        "client",
        &[
            "--http2-prior-knowledge",
            "-w",
            "\n%{http_version} %{http_code}",
            &format!("http://{BACKEND}/h2"),
        ],
    )?;
    let (body, tail) = out.rsplit_once('\n').context("no curl -w line")?;
    ensure!(
        tail == "2 200",
        "curl saw `{tail}`, want HTTP/2 200; body {body}"
    );
    let v = json(body)?;
    ensure!(v["path"] == "/h2", "echo is wrong: {v}");
    let after = metrics(&c, "client")?;
    let n = delta(&before, &after, REQUESTS, &out_of("out", SVC_BACKEND));
    ensure!(n == 1.0, "client proxy counted {n} h2 requests, want 1");
    println!(
        "    backend saw {} (curl spoke HTTP/2 to the client's proxy)",
        v["version"]
    );
    Ok(())
}

fn websocket_echo() -> Result<()> {
    let c = hello()?;
    let before = metrics(&c, "client")?;
    let out = c.testapp(
        "client",
        &[
            "ws-client",
            "--url",
            &format!("ws://{BACKEND}:8081/chat"),
            "--message",
            "hello",
            "--message",
            "meshlet ws",
        ],
        T,
    )?;
    let v = json(&out)?;
    ensure!(v["ok"] == true && v["echoed"] == 2, "websocket: {v}");
    let after = metrics(&c, "client")?;
    let n = delta(&before, &after, OPENED, &out_of("out", SVC_BACKEND));
    ensure!(
        n == 1.0,
        "client proxy opened {n} connections for the WebSocket, want 1"
    );
    Ok(())
}

fn server_first_tcp_on_opaque_port() -> Result<()> {
    let c = hello()?;
    let (cb, gb) = (metrics(&c, "client")?, metrics(&c, "greeter")?);
    let out = c.testapp(
        "client",
        &["banner-client", "--addr", GREETER, "--send", "PING"],
        T,
    )?;
    let v = json(&out)?;
    let ms = v["greetingMs"].as_f64().context("no greetingMs")?;
    ensure!(v["greeting"] == "220 greeter ready", "greeting: {v}");
    ensure!(
        ms < 300.0,
        "greeting took {ms:.0} ms: the proxy waited for the client (detect timeout is 1 s)"
    );
    ensure!(v["reply"] == "250 PING", "reply: {v}");
    let (ca, ga) = (metrics(&c, "client")?, metrics(&c, "greeter")?);
    let o = delta(&cb, &ca, OPENED, &out_of("out", SVC_GREETER));
    let i = delta(&gb, &ga, OPENED, &[("direction", "inbound")]);
    ensure!(
        o == 1.0 && i == 1.0,
        "connections: client outbound {o}, greeter inbound {i}; want 1 and 1"
    );
    let detect = delta(&cb, &ca, "meshlet_timeouts_total", &[("kind", "detect")])
        + delta(&gb, &ga, "meshlet_timeouts_total", &[("kind", "detect")]);
    ensure!(detect == 0.0, "{detect} detect timeouts on an opaque port");
    println!("    greeting after {ms:.1} ms");
    Ok(())
}

fn excluded_inbound_port_bypasses_proxy() -> Result<()> {
    let c = hello()?;
    let ip = c.pod("backend-v1")?.ip;
    let before = metrics(&c, "backend-v1")?;
    let body = curl(&c, "client", &[&format!("http://{ip}:9090/direct")])?;
    ensure!(
        json(&body)?["name"] == "stats",
        "stats port answered {body}"
    );
    let mid = metrics(&c, "backend-v1")?;
    let moved = delta(&before, &mid, OPENED, &[("direction", "inbound")]);
    ensure!(
        moved == 0.0,
        "backend-v1's proxy saw {moved} inbound connections on excluded port 9090"
    );
    // Control: the captured port on the same pod does move the counter.
    curl(&c, "client", &[&format!("http://{ip}:8080/captured")])?;
    let after = metrics(&c, "backend-v1")?;
    let moved = delta(&mid, &after, OPENED, &[("direction", "inbound")]);
    ensure!(
        moved == 1.0,
        "control request to captured port 8080 moved the counter by {moved}, want 1"
    );
    Ok(())
}

fn upload_and_download_100mib() -> Result<()> {
    const N: u64 = 100 * 1024 * 1024;
    let c = hello()?;
    let want = pattern::sha256_of_pattern(N);
    let before = metrics(&c, "client")?;
    let testapp = c.binaries().testapp.display().to_string();
    let t = Instant::now();
    let up = c.exec_ok(
        "client",
        &["bash", "-o", "pipefail", "-c", &format!(
            "{testapp} pattern --bytes {N} | curl -sS --max-time 120 -H 'Expect:' -X POST -T - http://{BACKEND}/upload"
        )],
        Duration::from_secs(150),
    )?;
    let up_s = t.elapsed().as_secs_f64();
    let v = json(&up)?;
    ensure!(
        v["length"] == N,
        "upload arrived with {} bytes, want {N}",
        v["length"]
    );
    ensure!(
        v["sha256"] == want.as_str(),
        "upload checksum {} != {want}",
        v["sha256"]
    );
    let t = Instant::now();
    let down = c.exec_ok(
        "client",
        &[
            "bash",
            "-o",
            "pipefail",
            "-c",
            &format!("curl -sS --max-time 120 http://{BACKEND}/bytes/{N} | sha256sum"),
        ],
        Duration::from_secs(150),
    )?;
    let down_s = t.elapsed().as_secs_f64();
    let got = down.split_whitespace().next().unwrap_or_default();
    ensure!(got == want, "download checksum {got} != {want}");
    let after = metrics(&c, "client")?;
    let (rx, tx) = (
        delta(&before, &after, RECEIVED, &out_of("out", SVC_BACKEND)),
        delta(&before, &after, SENT, &out_of("out", SVC_BACKEND)),
    );
    ensure!(
        rx >= N as f64 && tx >= N as f64,
        "client proxy carried {rx} B up and {tx} B down, want >= {N} each: the transfer went around it"
    );
    println!(
        "    100 MiB up in {up_s:.2}s, down in {down_s:.2}s, sha256 {}",
        &want[..16]
    );
    Ok(())
}

fn metrics_count_requests_bytes_connections() -> Result<()> {
    // One backend, so the server side counts are exact too.
    let c = start(ClusterBuilder::new(sample()).scale("backend-v2", 0))?;
    let (cb, sb) = (metrics(&c, "client")?, metrics(&c, "backend-v1")?);
    let url = format!("http://{BACKEND}");
    for i in 0..3 {
        curl(&c, "client", &[&format!("{url}/get/{i}")])?;
    }
    for _ in 0..2 {
        curl(
            &c,
            "client",
            &["-o", "/dev/null", &format!("{url}/status/404")],
        )?;
    }
    let payload = "x".repeat(50_000);
    curl(
        &c,
        "client",
        &[
            "-H",
            "Expect:",
            "--data-binary",
            &payload,
            &format!("{url}/upload"),
        ],
    )?;
    curl(
        &c,
        "client",
        &["-o", "/dev/null", &format!("{url}/bytes/200000")],
    )?;
    let (ca, sa) = (metrics(&c, "client")?, metrics(&c, "backend-v1")?);
    let req = |m0: &Metrics, m1: &Metrics, dir: &str, code: &str| {
        delta(
            m0,
            m1,
            REQUESTS,
            &[
                ("direction", dir),
                ("service", SVC_BACKEND),
                ("status_code", code),
            ],
        )
    };
    let got = [
        req(&cb, &ca, "outbound", "200"),
        req(&cb, &ca, "outbound", "404"),
        delta(
            &sb,
            &sa,
            REQUESTS,
            &[("direction", "inbound"), ("status_code", "200")],
        ),
        delta(
            &sb,
            &sa,
            REQUESTS,
            &[("direction", "inbound"), ("status_code", "404")],
        ),
    ];
    ensure!(
        got == [5.0, 2.0, 5.0, 2.0],
        "requests (client 200, client 404, server 200, server 404) = {got:?}, want [5, 2, 5, 2]"
    );
    let conns = delta(&cb, &ca, OPENED, &out_of("out", SVC_BACKEND));
    ensure!(
        conns == 7.0,
        "client proxy opened {conns} outbound connections, want 7 (one per curl)"
    );
    let inbound_conns = delta(&sb, &sa, OPENED, &[("direction", "inbound")]);
    ensure!(
        (1.0..=7.0).contains(&inbound_conns),
        "server proxy opened {inbound_conns} inbound connections"
    );
    // Received = bytes read from the app (requests), sent = bytes written to it.
    let rx = delta(&cb, &ca, RECEIVED, &out_of("out", SVC_BACKEND));
    let tx = delta(&cb, &ca, SENT, &out_of("out", SVC_BACKEND));
    ensure!(
        rx >= 50_000.0,
        "client proxy read {rx} bytes from the app, want >= 50000"
    );
    ensure!(
        tx >= 200_000.0,
        "client proxy wrote {tx} bytes to the app, want >= 200000"
    );
    let srx = delta(&sb, &sa, RECEIVED, &[("direction", "inbound")]);
    let stx = delta(&sb, &sa, SENT, &[("direction", "inbound")]);
    ensure!(
        srx >= 50_000.0 && stx >= 200_000.0,
        "server proxy bytes: read {srx}, wrote {stx}"
    );
    println!("    client: {conns} conns, {rx} B in, {tx} B out; server: {inbound_conns} conns, {srx} B in, {stx} B out");
    Ok(())
}

fn sigterm_drains_in_flight_request() -> Result<()> {
    let c = start(
        ClusterBuilder::new(sample())
            .scale("backend-v2", 0)
            .proxy_env(meshlet_api::env::PROXY_DRAIN_TIMEOUT, "5s"),
    )?;
    let t = Instant::now();
    let client = c.spawn_client(
        "client",
        &[
            "curl",
            "-sS",
            "--max-time",
            "10",
            "-w",
            "\n%{http_code}",
            &format!("http://{BACKEND}/slow?ms=1000"),
        ],
    )?;
    // The request must be in the server proxy's hands when the signal lands; on a
    // loaded machine curl may need more than a moment to get there (the backend holds
    // it for 1 s, so polling up to 800 ms still signals mid-request).
    let mut inflight = 0.0;
    for _ in 0..40 {
        std::thread::sleep(Duration::from_millis(20));
        inflight = metrics(&c, "backend-v1")?.sum(OPENED, &[("direction", "inbound")]);
        if inflight >= 1.0 {
            break;
        }
    }
    ensure!(
        inflight == 1.0,
        "backend-v1's proxy holds {inflight} inbound connections at SIGTERM time, want 1"
    );
    c.signal(
        "backend-v1",
        meshlet_api::PROXY_CONTAINER_NAME,
        Signal::SIGTERM,
    )?;
    let out = client.wait_with_output().context("waiting for curl")?;
    let elapsed = t.elapsed();
    let stdout = String::from_utf8_lossy(&out.stdout);
    ensure!(
        out.status.success() && stdout.ends_with("\n200"),
        "in-flight request did not complete across SIGTERM: {} {stdout} {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    ensure!(
        elapsed >= Duration::from_millis(950),
        "answered after {elapsed:?}, before the app's 1 s"
    );
    let st = c.wait_exit(
        "backend-v1",
        meshlet_api::PROXY_CONTAINER_NAME,
        Duration::from_secs(8),
    )?;
    ensure!(
        st.success(),
        "proxy exited with {st} after SIGTERM; log:\n{}",
        c.log("backend-v1-0", meshlet_api::PROXY_CONTAINER_NAME)
    );
    println!(
        "    request done in {:.2}s, proxy exited 0",
        elapsed.as_secs_f64()
    );
    Ok(())
}

fn udp_dns_not_captured() -> Result<()> {
    let c = hello()?;
    let before = metrics(&c, "client")?;
    let out = c.exec_ok(
        "client",
        &[
            "dig",
            &format!("@{DNS}"),
            "+short",
            "+time=2",
            "+tries=2",
            "backend.hello.svc.cluster.local",
        ],
        T,
    )?;
    ensure!(
        out.trim() == BACKEND,
        "dig answered {out:?}, want {BACKEND}"
    );
    let after = metrics(&c, "client")?;
    let n = delta(&before, &after, OPENED, &[]);
    ensure!(
        n == 0.0,
        "client proxy accepted {n} connections during a UDP query"
    );
    let rules = c.iptables_save("client")?;
    ensure!(
        rules.contains("MESHLET_OUTPUT"),
        "the client pod has no capture rules:\n{rules}"
    );
    // Control: TCP from the same pod is captured.
    curl(&c, "client", &[&format!("http://{BACKEND}/tcp-control")])?;
    let n = delta(&after, &metrics(&c, "client")?, OPENED, &[]);
    ensure!(
        n == 1.0,
        "control TCP request moved the client proxy's connections by {n}, want 1"
    );
    ensure!(
        !rules
            .lines()
            .any(|l| l.contains("-p udp") && l.contains("REDIRECT")),
        "UDP is redirected:\n{rules}"
    );
    Ok(())
}

fn rule_lines(save: &str) -> Vec<String> {
    save.lines()
        .filter(|l| l.starts_with("-A "))
        .map(str::to_string)
        .collect()
}

fn init_rerun_is_idempotent() -> Result<()> {
    let c = hello()?;
    let first = rule_lines(&c.iptables_save("client")?);
    ensure!(
        first.iter().any(|l| l.contains("MESHLET_")),
        "no MESHLET_ rules in the client pod:\n{first:#?}"
    );
    c.rerun_init("client").context("rerunning meshlet-init")?;
    let second = rule_lines(&c.iptables_save("client")?);
    let mut sorted = second.clone();
    sorted.sort();
    let before_len = sorted.len();
    sorted.dedup();
    ensure!(
        sorted.len() == before_len,
        "duplicate rules after the rerun:\n{second:#?}"
    );
    let mut a = first.clone();
    a.sort();
    ensure!(
        a == sorted,
        "rules changed on rerun:\nbefore {first:#?}\nafter {second:#?}"
    );
    for jump in ["-A PREROUTING", "-A OUTPUT"] {
        let n = second
            .iter()
            .filter(|l| l.starts_with(jump) && l.contains("MESHLET_"))
            .count();
        ensure!(n == 1, "{n} jumps from {jump} into MESHLET_ chains, want 1");
    }
    let before = metrics(&c, "client")?;
    let body = curl(&c, "client", &[&format!("http://{BACKEND}/after-rerun")])?;
    ensure!(
        json(&body)?["path"] == "/after-rerun",
        "traffic broken after rerun: {body}"
    );
    let n = delta(
        &before,
        &metrics(&c, "client")?,
        REQUESTS,
        &out_of("out", SVC_BACKEND),
    );
    if n != 1.0 {
        bail!("after the rerun the request went around the proxy (counted {n})");
    }
    println!("    {} rules, unchanged by the rerun", second.len());
    Ok(())
}

fn env_of(c: &Container, name: &str) -> Option<String> {
    c.env
        .iter()
        .flatten()
        .find(|e| e.name == name)
        .and_then(|e| e.value.clone())
}

fn pods_come_from_the_injector() -> Result<()> {
    let c = start(ClusterBuilder::new(sample()).inject(InjectMode::Injector))
        .context("`meshlet-injector inject -f samples/hello.yaml` must produce the pods the mini-cluster runs")?;
    ensure!(
        *c.inject_path() == InjectPath::Injector,
        "path {}",
        c.inject_path()
    );
    let b = c
        .pod("backend-v1")?
        .pod
        .spec
        .clone()
        .context("pod without spec")?;
    let all: Vec<Container> = b
        .init_containers
        .clone()
        .unwrap_or_default()
        .into_iter()
        .chain(b.containers.clone())
        .collect();
    let init = all
        .iter()
        .find(|c| c.name == meshlet_api::INIT_CONTAINER_NAME)
        .context("no meshlet-init in backend-v1")?;
    let excl = env_of(init, menv::INIT_EXCLUDE_INBOUND_PORTS).unwrap_or_default();
    ensure!(
        excl.split(',').any(|p| p == "9090"),
        "the exclude-inbound-ports annotation did not reach meshlet-init: {excl:?}"
    );
    let proxy = all
        .iter()
        .find(|c| c.name == meshlet_api::PROXY_CONTAINER_NAME)
        .context("no meshlet-proxy in backend-v1")?;
    let sc = proxy.security_context.clone().unwrap_or_default();
    ensure!(
        sc.run_as_user == Some(meshlet_api::PROXY_UID.into()),
        "proxy runs as {:?}, want {}",
        sc.run_as_user,
        meshlet_api::PROXY_UID
    );
    ensure!(
        !c.pod("legacy")?.meshed(),
        "the opted-out legacy pod was injected"
    );
    // The kubelet honoured the securityContext: every proxy process runs as 1337.
    let proxies: Vec<(String, i32)> = c
        .container_pids()
        .into_iter()
        .filter(|(_, name, _)| name == meshlet_api::PROXY_CONTAINER_NAME)
        .map(|(pod, _, pid)| (pod, pid))
        .collect();
    ensure!(
        proxies.len() == 5,
        "{} proxies running, want 5 (every pod but legacy)",
        proxies.len()
    );
    for (pod, pid) in proxies {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
        let ids = |key: &str| -> Option<String> {
            let l = status.lines().find(|l| l.starts_with(key))?;
            Some(l.split_whitespace().skip(1).collect::<Vec<_>>().join(" "))
        };
        ensure!(
            ids("Uid:").as_deref() == Some("1337 1337 1337 1337")
                && ids("Gid:").as_deref() == Some("1337 1337 1337 1337"),
            "proxy of {pod} runs as uid {:?} gid {:?}",
            ids("Uid:"),
            ids("Gid:")
        );
    }
    // The rules in the pod are the ones the injected env asked for.
    let rules = c.iptables_save("backend-v1")?;
    ensure!(
        rules.contains("--dport 9090 -j RETURN"),
        "port 9090 is not excluded in the pod:\n{rules}"
    );
    let body = curl(&c, "client", &[&format!("http://{BACKEND}/injected")])?;
    ensure!(json(&body)?["path"] == "/injected", "traffic: {body}");
    Ok(())
}

fn unmeshed_client_reaches_meshed_service() -> Result<()> {
    let c = hello()?;
    let rules = c.iptables_save("legacy")?;
    ensure!(
        !rules.contains("MESHLET"),
        "the opted-out pod has capture rules:\n{rules}"
    );
    let pods = ["backend-v1", "backend-v2"];
    let before: Vec<Metrics> = pods.iter().map(|p| metrics(&c, p)).collect::<Result<_>>()?;
    let body = curl(&c, "legacy", &[&format!("http://{BACKEND}/from-legacy")])?;
    ensure!(
        json(&body)?["name"]
            .as_str()
            .unwrap_or_default()
            .starts_with("backend-v"),
        "answer: {body}"
    );
    let after: Vec<Metrics> = pods.iter().map(|p| metrics(&c, p)).collect::<Result<_>>()?;
    let n: f64 = (0..2)
        .map(|i| {
            delta(
                &before[i],
                &after[i],
                REQUESTS,
                &[("direction", "inbound"), ("status_code", "200")],
            )
        })
        .sum();
    ensure!(
        n == 1.0,
        "the backends' proxies counted {n} plaintext inbound requests, want 1"
    );
    Ok(())
}

/// `requests: N total, N started, N done, S succeeded, F failed, ...` of h2load.
fn h2load_succeeded(out: &str) -> Option<(u64, u64)> {
    let line = out.lines().find(|l| l.starts_with("requests:"))?;
    let num = |word: &str| -> Option<u64> {
        let i = line.find(word)?;
        line[..i].trim_end().rsplit([' ', ',']).next()?.parse().ok()
    };
    Some((num(" succeeded")?, num(" total")?))
}

fn h2load_h2c_and_http1_counts_exact() -> Result<()> {
    const N: u64 = 400;
    let c = start(ClusterBuilder::new(sample()).scale("backend-v2", 0))?;
    let url = format!("http://{BACKEND}/load");
    for (proto, extra) in [("h2c", vec![]), ("http/1.1", vec!["--h1"])] {
        let (cb, sb) = (metrics(&c, "client")?, metrics(&c, "backend-v1")?);
        let n = N.to_string();
        let mut argv = vec!["h2load", "-n", &n, "-c", "4", "-m", "8"];
        argv.extend(extra);
        argv.push(&url);
        let out = c.exec_ok("client", &argv, Duration::from_secs(90))?;
        let (ok, total) =
            h2load_succeeded(&out).with_context(|| format!("h2load output:\n{out}"))?;
        ensure!(
            ok == N && total == N,
            "{proto}: h2load {ok}/{total} succeeded, want {N}:\n{out}"
        );
        let (ca, sa) = (metrics(&c, "client")?, metrics(&c, "backend-v1")?);
        let o = delta(
            &cb,
            &ca,
            REQUESTS,
            &[
                ("direction", "outbound"),
                ("service", SVC_BACKEND),
                ("status_code", "200"),
            ],
        );
        let i = delta(
            &sb,
            &sa,
            REQUESTS,
            &[("direction", "inbound"), ("status_code", "200")],
        );
        ensure!(
            o == N as f64 && i == N as f64,
            "{proto}: proxies counted {o} outbound / {i} inbound, want {N}"
        );
        let rate = out
            .lines()
            .find(|l| l.starts_with("finished in"))
            .unwrap_or("")
            .trim();
        println!("    {proto}: {N} requests, 4 connections: {rate}");
    }
    Ok(())
}

/// The node's kube-proxy rules pick an endpoint per connection: 20 fresh connections
/// from an unmeshed pod reach both backends (all on one: probability 2 * 0.5^20).
fn kube_proxy_spreads_connections() -> Result<()> {
    let c = hello()?;
    let mut seen = std::collections::BTreeMap::<String, u32>::new();
    for i in 0..20 {
        let body = curl(&c, "legacy", &[&format!("http://{BACKEND}/spread/{i}")])?;
        let name = json(&body)?["name"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        *seen.entry(name).or_default() += 1;
    }
    ensure!(
        seen.len() == 2 && seen.keys().all(|k| k.starts_with("backend-v")),
        "20 connections through the ClusterIP reached {seen:?}, want both backends"
    );
    println!("    {seen:?}");
    Ok(())
}

/// The client half-closes after its line; the reply and the server's FIN must still
/// come back through both proxies' splice.
fn tcp_half_close_through_both_sidecars() -> Result<()> {
    let c = hello()?;
    let before = metrics(&c, "greeter")?;
    let out = c.testapp(
        "client",
        &[
            "banner-client",
            "--addr",
            GREETER,
            "--send",
            "HALF",
            "--half-close",
        ],
        T,
    )?;
    let v = json(&out)?;
    ensure!(
        v["reply"] == "250 HALF" && v["bye"].is_null(),
        "half-close: {v}"
    );
    let after = metrics(&c, "greeter")?;
    let n = delta(&before, &after, OPENED, &[("direction", "inbound")]);
    ensure!(n == 1.0, "greeter's proxy saw {n} connections, want 1");
    Ok(())
}

fn mesh_config_reload_takes_effect() -> Result<()> {
    let mut c = hello()?;
    let before = metrics(&c, "client")?;
    curl(&c, "client", &[&format!("http://{BACKEND}/before")])?;
    c.update_mesh_config(|cfg| {
        for s in &mut cfg.services {
            if s.name == "backend" {
                s.name = "backend-renamed".into();
            }
        }
    })?;
    let want = c.mesh_config().generation;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (_, body) = c.admin("client", "/config")?;
        let gen = json(&body)?["mesh"]["generation"].as_u64();
        if gen == Some(want) {
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "client proxy still serves generation {gen:?}, want {want}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    curl(&c, "client", &[&format!("http://{BACKEND}/after")])?;
    let after = metrics(&c, "client")?;
    let reloads = delta(
        &before,
        &after,
        "meshlet_config_reloads_total",
        &[("result", "ok")],
    );
    ensure!(
        reloads == 1.0,
        "{reloads} successful reloads counted, want 1"
    );
    let old = delta(&before, &after, REQUESTS, &out_of("out", SVC_BACKEND));
    let new = delta(
        &before,
        &after,
        REQUESTS,
        &[
            ("direction", "outbound"),
            ("service", "hello/backend-renamed"),
        ],
    );
    ensure!(
        old == 1.0 && new == 1.0,
        "requests labelled old/new service: {old}/{new}, want 1/1"
    );
    Ok(())
}

fn admin_endpoints_and_shutdown() -> Result<()> {
    let c = hello()?;
    let (s, body) = c.admin("greeter", "/live")?;
    ensure!(s == 200, "/live answered {s} {body}");
    let (s, body) = c.admin("greeter", "/config")?;
    let v = json(&body)?;
    let names: Vec<&str> = v["mesh"]["services"]
        .as_array()
        .context("no mesh.services in /config")?
        .iter()
        .filter_map(|s| s["name"].as_str())
        .collect();
    ensure!(
        s == 200 && names.contains(&"backend") && names.contains(&"greeter"),
        "/config services {names:?}"
    );
    let p = c.pod("greeter")?;
    let admin = std::net::SocketAddr::from(([127, 0, 0, 1], meshlet_api::ports::ADMIN));
    let (s, body) = c.http(p, admin, "POST", "/shutdown")?;
    ensure!(s == 200, "POST /shutdown answered {s} {body}");
    let st = c.wait_exit(
        "greeter",
        meshlet_api::PROXY_CONTAINER_NAME,
        Duration::from_secs(10),
    )?;
    ensure!(st.success(), "proxy exited with {st} after POST /shutdown");
    Ok(())
}

fn dual_stack_ipv6_through_both_sidecars() -> Result<()> {
    let c = start(ClusterBuilder::new(
        sample().with_file_name("dualstack.yaml"),
    ))?;
    let rules6 = c.exec_ok("client", &["ip6tables-save", "-t", "nat"], T)?;
    ensure!(
        rules6.contains("MESHLET_OUTPUT") && rules6.contains("MESHLET_INBOUND"),
        "meshlet-init programmed no IPv6 capture in a dual-stack pod:\n{rules6}"
    );
    let (cb, sb) = (metrics(&c, "client")?, metrics(&c, "backend")?);
    for (url, peer_v6) in [
        ("http://[fd00:6d65:7368:c1::10]/v6", true),
        ("http://198.19.1.10/v4", false),
    ] {
        let body = curl(&c, "client", &["-g", url])?;
        let v = json(&body)?;
        ensure!(
            v["name"]
                .as_str()
                .unwrap_or_default()
                .starts_with("backend-")
                && url.ends_with(v["path"].as_str().unwrap_or("?")),
            "{url}: {v}"
        );
        // The server proxy forwards to the pod address of the same family.
        let peer = v["peer"].as_str().unwrap_or_default();
        ensure!(
            peer.starts_with("[fd00:6d65:7368:") == peer_v6,
            "{url}: the app saw peer {peer}"
        );
    }
    let (ca, sa) = (metrics(&c, "client")?, metrics(&c, "backend")?);
    let o = delta(
        &cb,
        &ca,
        REQUESTS,
        &[
            ("direction", "outbound"),
            ("service", "hello6/backend"),
            ("status_code", "200"),
        ],
    );
    let i = delta(
        &sb,
        &sa,
        REQUESTS,
        &[("direction", "inbound"), ("status_code", "200")],
    );
    ensure!(
        o == 2.0 && i == 2.0,
        "proxies counted {o} outbound / {i} inbound requests over IPv6 + IPv4, want 2 / 2"
    );
    Ok(())
}

/// With `annotation` on the client, the server-first TCP service is reached around the
/// client's proxy (and still through the greeter's); HTTP to the backend is the
/// control that still goes through it.
fn outbound_bypass(annotation: &str, value: &str) -> Result<()> {
    let c = start(ClusterBuilder::new(sample()).annotate("client", annotation, value))?;
    let (cb, gb) = (metrics(&c, "client")?, metrics(&c, "greeter")?);
    let out = c.testapp("client", &["banner-client", "--addr", GREETER], T)?;
    ensure!(json(&out)?["reply"] == "250 PING", "greeter: {out}");
    let (ca, ga) = (metrics(&c, "client")?, metrics(&c, "greeter")?);
    let o = delta(&cb, &ca, OPENED, &[("direction", "outbound")]);
    let i = delta(&gb, &ga, OPENED, &[("direction", "inbound")]);
    ensure!(
        o == 0.0,
        "{annotation}={value}: the client's proxy still took {o} connections to {GREETER}"
    );
    ensure!(i == 1.0, "the greeter's proxy saw {i} connections, want 1");
    curl(&c, "client", &[&format!("http://{BACKEND}/control")])?;
    let n = delta(
        &ca,
        &metrics(&c, "client")?,
        OPENED,
        &[("direction", "outbound")],
    );
    ensure!(
        n == 1.0,
        "control: HTTP to the backend moved the client's proxy by {n}, want 1"
    );
    Ok(())
}

fn excluded_outbound_port_bypasses_client_proxy() -> Result<()> {
    outbound_bypass(meshlet_api::annotations::EXCLUDE_OUTBOUND_PORTS, "3306")
}

fn excluded_outbound_cidr_bypasses_client_proxy() -> Result<()> {
    outbound_bypass(
        meshlet_api::annotations::EXCLUDE_OUTBOUND_CIDRS,
        "198.19.0.20/32",
    )
}

/// `meshlet.io/native-sidecar: "false"`: the proxy is the first app container and its
/// postStart hook must hold the app back until the proxy is ready.
fn classic_sidecar_when_native_is_off() -> Result<()> {
    let c = start(
        ClusterBuilder::new(sample())
            .scale("backend-v2", 0)
            .annotate(
                "backend-v1",
                meshlet_api::annotations::NATIVE_SIDECAR,
                "false",
            ),
    )?;
    let spec = c.pod("backend-v1")?.pod.spec.clone().context("no spec")?;
    ensure!(
        spec.containers.first().map(|c| c.name.as_str()) == Some(meshlet_api::PROXY_CONTAINER_NAME),
        "meshlet-proxy is not the first container: {:?}",
        spec.containers.iter().map(|c| &c.name).collect::<Vec<_>>()
    );
    let before = metrics(&c, "backend-v1")?;
    let body = curl(&c, "client", &[&format!("http://{BACKEND}/classic")])?;
    ensure!(json(&body)?["path"] == "/classic", "answer: {body}");
    let n = delta(
        &before,
        &metrics(&c, "backend-v1")?,
        REQUESTS,
        &[("direction", "inbound")],
    );
    ensure!(
        n == 1.0,
        "classic sidecar counted {n} inbound requests, want 1"
    );
    Ok(())
}

/// What `kube_proxy_spreads_connections` shows without a sidecar must hold with one:
/// 20 requests (each a new connection from the app) reach both backends. A proxy that
/// pins every request to one pooled connection to the ClusterIP breaks the Service's
/// load balancing (all on one: probability 2 * 0.5^20 if balanced per connection).
fn meshed_client_requests_reach_every_backend() -> Result<()> {
    let c = start(
        ClusterBuilder::new(sample()).proxy_env("MESHLET_LOG", "meshlet_proxy::balance=trace,info"),
    )?;
    let mut seen = std::collections::BTreeMap::<String, u32>::new();
    for i in 0..20 {
        let body = curl(&c, "client", &[&format!("http://{BACKEND}/spread/{i}")])?;
        let name = json(&body)?["name"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        *seen.entry(name).or_default() += 1;
    }
    ensure!(
        seen.len() == 2,
        "20 requests from the meshed client reached only {seen:?}: the client's proxy reuses one \
         pooled connection to the ClusterIP, so kube-proxy balances nothing (it picks a backend \
         per connection); an unmeshed client reaches both"
    );
    println!("    {seen:?} (a connection each)");

    // One keep-alive connection from the app: kube-proxy alone would send all of it to
    // one backend; the sidecar picks an endpoint per request.
    let urls: Vec<String> = (0..20)
        .map(|i| format!("http://{BACKEND}/keepalive/{i}"))
        .collect();
    let mut args: Vec<&str> = vec!["-w", "\n"];
    args.extend(urls.iter().map(String::as_str));
    let out = curl(&c, "client", &args)?;
    let mut one_conn = std::collections::BTreeMap::<String, u32>::new();
    for line in out.lines().filter(|l| !l.trim().is_empty()) {
        let name = json(line)?["name"].as_str().unwrap_or_default().to_string();
        *one_conn.entry(name).or_default() += 1;
    }
    ensure!(
        one_conn.values().sum::<u32>() == 20 && one_conn.len() == 2,
        "20 requests on one keep-alive connection reached {one_conn:?}, want both backends: \
         the client's proxy should balance each request over the Service's endpoints"
    );
    println!("    {one_conn:?} (one keep-alive connection)");
    Ok(())
}

/// The injector points the app's httpGet probes at the proxy's `/app-health/...` on the
/// admin port; probed from the node as the kubelet does, they must reach the app.
fn rewritten_app_probes_answer_from_the_node() -> Result<()> {
    let c = hello()?;
    let spec = c.pod("backend-v1")?.pod.spec.clone().context("no spec")?;
    let app = spec
        .containers
        .iter()
        .find(|c| c.name == "app")
        .context("no app container")?;
    let get = app
        .readiness_probe
        .as_ref()
        .and_then(|p| p.http_get.as_ref())
        .context("no readiness probe")?;
    let path = get.path.clone().unwrap_or_default();
    ensure!(
        path.starts_with("/app-health/")
            && get.port == k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(15020),
        "readiness probe not rewritten to the admin port: {get:?}"
    );
    for liveness in [false, true] {
        let (status, body) = c.probe("backend-v1", "app", liveness)?;
        ensure!(
            status == 200,
            "{} probe {path} answered {status} {}: the proxy does not serve /app-health",
            if liveness { "liveness" } else { "readiness" },
            body.trim()
        );
    }
    Ok(())
}

/// A rolling update deletes the backend the client's proxy has a pooled connection
/// to: its endpoint leaves the Service, it gets SIGTERM, its namespace goes. Every
/// request after that must be answered by the other backend: none of them reached an
/// app, so failing over to a new connection is always safe.
fn backend_pod_deleted_requests_keep_working() -> Result<()> {
    let mut c = hello()?;
    let url = format!("http://{BACKEND}/rollout");
    let mut last = String::new();
    for _ in 0..5 {
        last = json(&curl(&c, "client", &[&url])?)?["name"]
            .as_str()
            .unwrap_or_default()
            .to_string();
    }
    ensure!(
        last.starts_with("backend-v"),
        "warm-up answered by {last:?}"
    );
    let survivor = if last.starts_with("backend-v1") {
        "backend-v2-0"
    } else {
        "backend-v1-0"
    };
    c.delete_pod(&last, Duration::from_secs(5))?;
    let mut failures = Vec::new();
    for i in 0..10 {
        let out = c.exec(
            "client",
            &[
                "curl",
                "-sS",
                "--max-time",
                "5",
                "-w",
                "\n%{http_code}",
                &url,
            ],
            T,
        )?;
        let stdout = String::from_utf8_lossy(&out.stdout).to_string();
        let answered = stdout
            .rsplit_once('\n')
            .and_then(|(body, code)| (code == "200").then_some(body))
            .and_then(|body| serde_json::from_str::<serde_json::Value>(body).ok())
            .and_then(|v| v["name"].as_str().map(String::from));
        if answered.as_deref() != Some(survivor) {
            failures.push(format!(
                "#{i}: {} {}",
                stdout.replace('\n', " "),
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
    }
    ensure!(
        failures.is_empty(),
        "after deleting {last}, {}/10 requests were not answered by {survivor}: {failures:#?}",
        failures.len()
    );
    Ok(())
}

/// Scale a new backend pod up, then delete both old ones: the client keeps being
/// answered, in the end only by the new pod, through its sidecar.
fn rolling_update_replaces_every_backend() -> Result<()> {
    let mut c = hello()?;
    let url = format!("http://{BACKEND}/rolling");
    curl(&c, "client", &[&url])?;
    let gen = c.mesh_config().generation;
    let new = c.scale_up("backend-v1")?;
    ensure!(
        c.mesh_config().generation > gen,
        "the mesh config was not rewritten for {new}"
    );
    for old in ["backend-v1-0", "backend-v2-0"] {
        c.delete_pod(old, Duration::from_secs(5))?;
        curl(&c, "client", &[&url])
            .with_context(|| format!("request right after deleting {old}"))?;
    }
    let before = metrics(&c, &new)?;
    for _ in 0..10 {
        let v = json(&curl(&c, "client", &[&url])?)?;
        ensure!(
            v["name"] == new.as_str(),
            "answered by {} after the rollout, want {new}",
            v["name"]
        );
    }
    let n = delta(
        &before,
        &metrics(&c, &new)?,
        REQUESTS,
        &[("direction", "inbound")],
    );
    ensure!(n == 10.0, "{new}'s proxy counted {n} requests, want 10");
    Ok(())
}
