//! Routing cases: the HTTPRoutes, GRPCRoutes and retry budgets of `mesh/routing/routes.yaml`,
//! compiled by `meshlet-injector compile --from-files` and put into the cluster's mesh
//! config, applied by the client's sidecar to traffic from the client pod. The load
//! comes from `meshlet-testapp load` (one process, keep-alive HTTP/1.1), the backends'
//! own request counters from their `/count`.

use std::{
    net::SocketAddr,
    path::PathBuf,
    process::Stdio,
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context, Result};
use meshlet_api::MeshConfig;
use meshlet_e2e::cluster::{Cluster, ClusterBuilder};

use super::{curl, delta, json, metrics, start, REQUESTS};

const BACKEND: &str = "198.19.1.10";
const FLAKY: &str = "198.19.1.13";
const BROKEN: &str = "198.19.1.14";
const GREETER: &str = "198.19.1.15";
const ROUTE: &str = "route/backend";

fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/mesh/routing")
}

/// The routing app with its routes in force at the client's sidecar.
fn routed_cluster() -> Result<Cluster> {
    let mut c = start(ClusterBuilder::new(dir().join("app.yaml")))?;
    let compiled = compile_routes(&c)?;
    c.update_mesh_config(|cfg| {
        for s in &mut cfg.services {
            if let Some(from) = compiled
                .services
                .iter()
                .find(|o| o.namespace == s.namespace && o.name == s.name)
            {
                s.routes = from.routes.clone();
                s.retry_constraint = from.retry_constraint.clone();
            }
        }
    })?;
    await_generation(&c)?;
    Ok(c)
}

/// `meshlet-injector compile --from-files` over the app and its routes; refuses any
/// route or policy the compiler left out.
fn compile_routes(c: &Cluster) -> Result<MeshConfig> {
    let out = std::process::Command::new(&c.binaries().injector)
        .args(["compile", "--from-files"])
        .arg(dir())
        .stdin(Stdio::null())
        .output()
        .context("running meshlet-injector compile")?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(
        out.status.success() && stderr.trim().is_empty(),
        "meshlet-injector compile: {} {stderr}",
        out.status
    );
    let cfg = MeshConfig::from_json(&out.stdout).context("compiled mesh config")?;
    let backend = cfg
        .services
        .iter()
        .find(|s| s.name == "backend")
        .context("no Service backend")?;
    ensure!(
        backend.routes.len() == 1,
        "routes of backend: {:?}",
        backend.routes
    );
    Ok(cfg)
}

/// Waits until the client's sidecar serves the cluster's mesh config generation.
fn await_generation(c: &Cluster) -> Result<()> {
    let want = c.mesh_config().generation;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (_, body) = c.admin("client", "/config")?;
        let gen = json(&body)?["mesh"]["generation"].as_u64();
        if gen == Some(want) {
            return Ok(());
        }
        ensure!(
            Instant::now() < deadline,
            "client proxy still serves generation {gen:?}, want {want}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `meshlet-testapp load` from the client pod; its JSON summary.
fn load(c: &Cluster, url: &str, extra: &[&str]) -> Result<serde_json::Value> {
    let mut args = vec!["load", "--url", url];
    args.extend_from_slice(extra);
    json(&c.testapp("client", &args, Duration::from_secs(120))?)
}

/// Requests answered with `status`.
fn status_count(v: &serde_json::Value, status: u16) -> u64 {
    v["statuses"][status.to_string()].as_u64().unwrap_or(0)
}

/// Requests answered by pods whose name starts with `prefix`.
fn answered_by(v: &serde_json::Value, prefix: &str) -> u64 {
    v["names"]
        .as_object()
        .map(|m| {
            m.iter()
                .filter(|(k, _)| k.starts_with(prefix))
                .filter_map(|(_, n)| n.as_u64())
                .sum()
        })
        .unwrap_or(0)
}

/// What a backend pod's app counted (`/count`, from inside its pod, around the proxy).
fn received(c: &Cluster, pod: &str) -> Result<u64> {
    let p = c.pod(pod)?;
    let (s, body) = c.http(p, SocketAddr::from(([127, 0, 0, 1], 8080)), "GET", "/count")?;
    ensure!(s == 200, "/count of {pod}: {s} {body}");
    json(&body)?["requests"]
        .as_u64()
        .with_context(|| format!("/count of {pod}: {body}"))
}

fn all_ok(v: &serde_json::Value, n: u64) -> Result<()> {
    ensure!(
        status_count(v, 200) == n && v["errorCount"] == 0,
        "want {n} answers 200 and no errors: {v}"
    );
    Ok(())
}

pub fn routing_by_headers_weights_redirects_rewrites_timeouts() -> Result<()> {
    let c = routed_cluster()?;
    let before = metrics(&c, "client")?;
    let url = format!("http://{BACKEND}/");

    // Header match: `version: v2` goes to v2, anything else to v1.
    let v2 = load(&c, &url, &["--requests", "20", "--header", "version: v2"])?;
    all_ok(&v2, 20)?;
    ensure!(answered_by(&v2, "backend-v2") == 20, "version: v2 → {v2}");
    let v1 = load(&c, &url, &["--requests", "20", "--header", "version: v3"])?;
    all_ok(&v1, 20)?;
    ensure!(answered_by(&v1, "backend-v1") == 20, "version: v3 → {v1}");

    // The same over HTTP/2 (h2c prior knowledge from the app).
    let out = curl(
        &c,
        "client",
        &[
            "--http2-prior-knowledge",
            "-H",
            "version: v2",
            "-w",
            "\n%{http_version}",
            &url,
        ],
    )?;
    let (body, version) = out.rsplit_once('\n').context("no curl -w line")?;
    let name = json(body)?["name"].as_str().unwrap_or_default().to_string();
    ensure!(
        version == "2" && name.starts_with("backend-v2"),
        "h2 with version: v2 went to {name} over HTTP/{version}"
    );

    // Weighted split 80/20, by request (one keep-alive connection).
    let n = 2000;
    let split = load(
        &c,
        &format!("http://{BACKEND}/split"),
        &["--requests", &n.to_string()],
    )?;
    all_ok(&split, n)?;
    let share = answered_by(&split, "backend-v2") as f64 / n as f64;
    println!(
        "    v2 got {:.1}% of {n} requests (weight 20)",
        share * 100.0
    );
    ensure!(
        (0.17..=0.23).contains(&share),
        "v2's share {share:.3} is not 20% ± 3 points: {split}"
    );

    // Redirect: answered by the client's sidecar, the backend never sees it.
    let out = curl(
        &c,
        "client",
        &[
            "-o",
            "/dev/null",
            "-w",
            "%{http_code} %{redirect_url}",
            &format!("http://{BACKEND}/old/page?q=1"),
        ],
    )?;
    ensure!(
        out == format!("301 http://{BACKEND}/new/page?q=1"),
        "redirect: {out}"
    );

    // URLRewrite (host and path prefix) and header modifiers both ways.
    let out = curl(
        &c,
        "client",
        &[
            "-i",
            "-H",
            "x-secret: s3",
            &format!("http://{BACKEND}/api/items?x=1"),
        ],
    )?;
    let (head, body) = out.split_once("\r\n\r\n").context("no header end")?;
    ensure!(
        head.to_ascii_lowercase().contains("\r\nx-routed: yes"),
        "response header not added: {head}"
    );
    let v = json(body)?;
    ensure!(
        v["path"] == "/v1/items?x=1" && v["headers"]["host"] == "api.internal",
        "rewrite: {v}"
    );
    ensure!(
        v["headers"]["x-route"] == "api" && v["headers"].get("x-secret").is_none(),
        "request headers: {v}"
    );
    ensure!(
        v["name"]
            .as_str()
            .unwrap_or_default()
            .starts_with("backend-v1"),
        "rewrite went to {v}"
    );

    // timeouts.request 200ms against a backend that takes 1 s.
    let slow = load(
        &c,
        &format!("http://{BACKEND}/slow?ms=1000"),
        &["--requests", "3"],
    )?;
    ensure!(status_count(&slow, 504) == 3, "want three 504: {slow}");
    let (min, max) = (
        slow["minMs"].as_f64().unwrap_or(0.0),
        slow["maxMs"].as_f64().unwrap_or(0.0),
    );
    println!("    504 after {min:.0}–{max:.0} ms (timeouts.request 200ms)");
    ensure!(
        min >= 200.0 && max <= 260.0,
        "504 after {min:.0}–{max:.0} ms, want 200–260 ms"
    );

    let after = metrics(&c, "client")?;
    let routed = delta(
        &before,
        &after,
        REQUESTS,
        &[("direction", "outbound"), ("route", ROUTE)],
    );
    ensure!(
        routed == (20 + 20 + 1 + n + 1 + 1 + 3) as f64,
        "client proxy counted {routed} requests with route={ROUTE}"
    );
    let timeouts = delta(
        &before,
        &after,
        "meshlet_timeouts_total",
        &[("route", ROUTE), ("kind", "request")],
    );
    ensure!(
        timeouts == 3.0,
        "{timeouts} request timeouts counted, want 3"
    );
    Ok(())
}

pub fn routing_retries_are_safe_and_within_budget() -> Result<()> {
    let c = routed_cluster()?;

    // A backend failing every request, budget 20% over 10 s plus 10 per second: its
    // load stays within 1.2× the client's requests plus the floor.
    let n = 500u64;
    let t = Instant::now();
    let broken = load(
        &c,
        &format!("http://{BROKEN}/"),
        &["--requests", &n.to_string()],
    )?;
    let secs = t.elapsed().as_secs_f64();
    ensure!(status_count(&broken, 503) == n, "{broken}");
    let got = received(&c, "broken")?;
    let floor = 10.0 * (secs.ceil() + 1.0);
    let bound = 1.2 * n as f64 + floor;
    println!(
        "    broken backend received {got} for {n} requests in {secs:.1} s (bound {bound:.0})"
    );
    ensure!(got > n, "no retry at all: {got}");
    ensure!(
        got as f64 <= bound,
        "broken backend received {got} for {n} requests, more than 1.2×{n} + {floor}"
    );
    let m = metrics(&c, "client")?;
    let exhausted = m.sum(
        "meshlet_retry_budget_exhausted_total",
        &[("route", "route/broken")],
    );
    ensure!(exhausted > 0.0, "no budget exhaustion counted");

    // Every third request to flaky fails: retries hide all of it from GETs.
    let before = metrics(&c, "client")?;
    let n = 300u64;
    let flaky = load(
        &c,
        &format!("http://{FLAKY}/"),
        &["--requests", &n.to_string()],
    )?;
    all_ok(&flaky, n)?;
    let got = received(&c, "flaky")?;
    ensure!(
        (n + n / 2 - 1..=n + n / 2).contains(&got),
        "flaky received {got} for {n} requests, want about 1.5×"
    );
    let after = metrics(&c, "client")?;
    let retries = delta(
        &before,
        &after,
        "meshlet_retries_total",
        &[("route", "route/flaky"), ("reason", "503")],
    );
    ensure!(
        retries == (got - n) as f64,
        "{retries} retries counted, the backend saw {} extra requests",
        got - n
    );

    // A POST whose body outgrew the replay buffer is never retried, and arrives whole.
    // Wait for the floor to allow retries again, so only safety can refuse them.
    std::thread::sleep(Duration::from_millis(1100));
    let start_count = received(&c, "broken")?;
    let big = load(
        &c,
        &format!("http://{BROKEN}/"),
        &["--method", "POST", "--body-bytes", "102400"],
    )?;
    ensure!(status_count(&big, 503) == 1, "{big}");
    ensure!(
        big["lastBody"]
            .as_str()
            .unwrap_or_default()
            .contains("102400 body bytes read"),
        "the backend did not get the whole body: {big}"
    );
    let seen = received(&c, "broken")? - start_count;
    ensure!(
        seen == 1,
        "the 100 KiB POST reached the backend {seen} times, want once"
    );

    // A small POST fits the buffer: it is replayed (1 + 3 attempts).
    let small = load(
        &c,
        &format!("http://{BROKEN}/"),
        &["--method", "POST", "--body-bytes", "1024"],
    )?;
    ensure!(status_count(&small, 503) == 1, "{small}");
    let seen = received(&c, "broken")? - start_count - 1;
    ensure!(seen == 4, "the buffered POST was sent {seen} times, want 4");
    Ok(())
}

pub fn routing_change_under_traffic_loses_no_request() -> Result<()> {
    let mut c = routed_cluster()?;
    let bin = c.binaries().testapp.display().to_string();
    let url = format!("http://{BACKEND}/");
    let n = 400;
    let child = c.spawn_client(
        "client",
        &[
            &bin,
            "load",
            "--url",
            &url,
            "--requests",
            &n.to_string(),
            "--interval-ms",
            "10",
        ],
    )?;
    std::thread::sleep(Duration::from_millis(1500));
    // The default rule now sends to v2 instead of v1.
    c.update_mesh_config(|cfg| {
        for s in cfg.services.iter_mut().filter(|s| s.name == "backend") {
            for r in &mut s.routes {
                if let Some(rule) = r.rules.last_mut() {
                    for b in &mut rule.backend_refs {
                        b.name = "backend-v2".into();
                    }
                }
            }
        }
    })?;
    await_generation(&c)?;
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut child = child;
    loop {
        if child.try_wait()?.is_some() {
            break;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("the load client did not finish within 60 s");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let out = child.wait_with_output()?;
    let v = json(&String::from_utf8_lossy(&out.stdout))?;
    all_ok(&v, n)?;
    let (v1, v2) = (answered_by(&v, "backend-v1"), answered_by(&v, "backend-v2"));
    println!("    {v1} requests to v1 before the change, {v2} to v2 after");
    ensure!(
        v1 > 0 && v2 > 0 && v1 + v2 == n,
        "the change did not take effect on the open connection: {v}"
    );
    Ok(())
}

/// A gRPC-shaped call from the client app: h2c with prior knowledge, `POST`,
/// `content-type: application/grpc`, one empty length-prefixed message. The echo's JSON.
fn grpc_call(c: &Cluster, path: &str) -> Result<serde_json::Value> {
    let out = curl(
        c,
        "client",
        &[
            "--http2-prior-knowledge",
            "-X",
            "POST",
            "-H",
            "content-type: application/grpc",
            "-H",
            "te: trailers",
            "--data-binary",
            "@/dev/null",
            "-w",
            "\n%{http_version}",
            &format!("http://{GREETER}{path}"),
        ],
    )?;
    let (body, version) = out.rsplit_once('\n').context("no curl -w line")?;
    ensure!(
        version == "2",
        "{path}: the client spoke HTTP/{version}, want 2"
    );
    json(body)
}

pub fn routing_grpc_route_by_service_and_method() -> Result<()> {
    let c = routed_cluster()?;
    let before = metrics(&c, "client")?;
    // The GRPCRoute's exact service and method: v2, with the rule's request header.
    let v = grpc_call(&c, "/pkg.Greeter/SayHello")?;
    let name = v["name"].as_str().unwrap_or_default();
    ensure!(
        name.starts_with("backend-v2") && v["method"] == "POST",
        "/pkg.Greeter/SayHello went to {name}: {v}"
    );
    ensure!(
        v["headers"]["x-route"] == "grpc-exact"
            && v["headers"]["content-type"] == "application/grpc",
        "the backend saw the wrong headers: {v}"
    );
    // Another method of the same service, and another service: the catch-all rule, v1.
    for path in ["/pkg.Greeter/SayBye", "/other.Svc/SayHello"] {
        let v = grpc_call(&c, path)?;
        let name = v["name"].as_str().unwrap_or_default();
        ensure!(
            name.starts_with("backend-v1") && v["headers"]["x-route"].is_null(),
            "{path} went to {name}: {v}"
        );
    }
    let after = metrics(&c, "client")?;
    let routed = delta(
        &before,
        &after,
        REQUESTS,
        &[("direction", "outbound"), ("route", "route/greeter")],
    );
    ensure!(
        routed == 3.0,
        "the client proxy counted {routed} requests with route=route/greeter, want 3"
    );
    println!("    GRPCRoute: SayHello -> v2 with x-route, other calls -> v1");
    Ok(())
}
