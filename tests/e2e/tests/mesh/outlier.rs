//! Outlier detection through the client's sidecar: per-request balancing over one
//! HTTP/2 connection, a backend that starts failing every request is ejected within a
//! second and comes back when its ejection ends, and opaque TCP keeps going to the
//! original destination whatever the mesh's endpoint list says.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    process::Child,
    time::{Duration, Instant},
};

use anyhow::{ensure, Context, Result};
use meshlet_api::{config::OutlierDetection, Duration as ApiDuration};
use meshlet_e2e::cluster::{http_in, Cluster, ClusterBuilder};

use super::{delta, json, metrics, sample, start, BACKEND, GREETER, T};

const EJECTIONS: &str = "meshlet_outlier_ejections_total";
const EJECTED: &str = "meshlet_outlier_ejected_endpoints";
const SVC: (&str, &str) = ("service", "hello/backend");
/// The three endpoints of `hello/backend` in these cases.
const BACKENDS: [&str; 3] = ["backend-v1-0", "backend-v1-1", "backend-v2-0"];

fn three_backends() -> Result<Cluster> {
    start(ClusterBuilder::new(sample()).scale("backend-v1", 2))
}

/// One `[unixMs, status, name]` record of `meshlet-testapp http-load`.
#[derive(Debug)]
struct Record {
    ms: u64,
    status: u64,
    name: String,
}

fn records(v: &serde_json::Value) -> Result<Vec<Record>> {
    v["records"]
        .as_array()
        .context("no records")?
        .iter()
        .map(|r| {
            Ok(Record {
                ms: r[0].as_u64().context("record time")?,
                status: r[1].as_u64().context("record status")?,
                name: r[2].as_str().context("record name")?.to_string(),
            })
        })
        .collect()
}

/// A switch of the backend's testapp (`fail`, `heal`, `count`), called from the node
/// as a kubelet would reach the pod; returns the server's answer.
fn switch(c: &Cluster, pod: &str, what: &str) -> Result<serde_json::Value> {
    let ip = c.pod(pod)?.ip;
    let (status, body) = http_in(
        c.node(),
        SocketAddr::from((ip, 8080)),
        "GET",
        &format!("/testapp/{what}"),
    )?;
    ensure!(status == 200, "/testapp/{what} on {pod}: {status} {body}");
    json(&body)
}

/// Waits until the client's proxy serves mesh config generation `want`.
fn await_generation(c: &Cluster, want: u64) -> Result<()> {
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

/// Waits for a spawned client, killing it after `limit`; its stdout as JSON.
fn finish(mut child: Child, limit: Duration) -> Result<serde_json::Value> {
    let deadline = Instant::now() + limit;
    while child.try_wait()?.is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            anyhow::bail!("http-load did not finish within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = child.wait_with_output()?;
    ensure!(
        out.status.success(),
        "http-load failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    json(&String::from_utf8_lossy(&out.stdout))
}

/// (a) One HTTP/2 connection from the app: kube-proxy alone would pin all of it to one
/// pod; the sidecar picks an endpoint per request, so 1000 requests land about a third
/// on each of three endpoints.
pub fn outlier_one_h2_connection_spreads_evenly_over_three_endpoints() -> Result<()> {
    let c = three_backends()?;
    let out = c.testapp(
        "client",
        &[
            "http-load",
            "--h2",
            "--requests",
            "1000",
            "--url",
            &format!("http://{BACKEND}/spread"),
        ],
        Duration::from_secs(120),
    )?;
    let v = json(&out)?;
    let by_name: BTreeMap<String, u64> = serde_json::from_value(v["byName"].clone())?;
    println!(
        "    1000 requests over one h2c connection in {} ms: {by_name:?}",
        v["elapsedMs"]
    );
    ensure!(
        v["byStatus"]["200"] == 1000,
        "not every request succeeded: {}",
        v["byStatus"]
    );
    for b in BACKENDS {
        let n = by_name.get(b).copied().unwrap_or(0);
        ensure!(
            n.abs_diff(333) <= 40,
            "{b} answered {n} of 1000 requests, want 333 ± 40: {by_name:?}"
        );
    }
    Ok(())
}

/// (b) A backend that starts answering 503 to everything stops receiving requests
/// within a second, after at most 5 failures seen by the client; (c) healed, it gets
/// requests again once its ejection is over. The ejection is lengthened to 3 s through
/// the Service's `outlierDetection`, so "stopped" is visible for a while.
pub fn outlier_failing_endpoint_is_ejected_and_returns() -> Result<()> {
    const EJECTION_MS: u64 = 3000;
    let mut c = three_backends()?;
    c.update_mesh_config(|cfg| {
        for s in cfg.services.iter_mut().filter(|s| s.name == "backend") {
            s.outlier_detection = Some(OutlierDetection {
                consecutive_failures: 5,
                base_ejection: ApiDuration::from_millis(EJECTION_MS),
                max_ejection: ApiDuration::from_secs(30),
            });
        }
    })?;
    await_generation(&c, c.mesh_config().generation)?;
    let victim = BACKENDS[2];
    let before = metrics(&c, "client")?;

    let bin = c.binaries().testapp.display().to_string();
    let url = format!("http://{BACKEND}/outlier");
    let load = c.spawn_client(
        "client",
        &[
            &bin,
            "http-load",
            "--h2",
            "--url",
            &url,
            "--requests",
            "100000",
            "--duration-ms",
            "8000",
            "--interval-ms",
            "5",
        ],
    )?;
    std::thread::sleep(Duration::from_millis(1500));
    let failed_at = switch(&c, victim, "fail")?["unixMs"]
        .as_u64()
        .context("no unixMs")?;
    std::thread::sleep(Duration::from_millis(1000));
    let during = metrics(&c, "client");
    std::thread::sleep(Duration::from_millis(500));
    let healed = switch(&c, victim, "heal")?;
    let v = finish(load, Duration::from_secs(30))?;
    let during = during?;
    let after = metrics(&c, "client")?;
    let recs = records(&v)?;
    println!(
        "    {} requests in {} ms: {} {}",
        v["requests"], v["elapsedMs"], v["byName"], v["byStatus"]
    );

    let failures: Vec<&Record> = recs.iter().filter(|r| r.status != 200).collect();
    ensure!(
        !failures.is_empty() && failures.iter().all(|r| r.status == 503 && r.name == victim),
        "only {victim} should fail, with 503: {failures:?}"
    );
    ensure!(
        failures.len() <= 5,
        "the client saw {} failures, want at most 5 (the ejection threshold)",
        failures.len()
    );
    ensure!(
        healed["failed"].as_u64() == Some(failures.len() as u64),
        "{victim} failed {} requests on purpose, the client saw {}",
        healed["failed"],
        failures.len()
    );
    let last_failure = failures.last().map_or(0, |r| r.ms);
    ensure!(
        last_failure.saturating_sub(failed_at) <= 1000,
        "{victim} still got requests {} ms after it started failing",
        last_failure.saturating_sub(failed_at)
    );
    // Ejected: nothing reaches it until the ejection ends (less 100 ms of clock
    // granularity between the processes).
    let back: Vec<&Record> = recs
        .iter()
        .filter(|r| r.name == victim && r.ms > last_failure)
        .collect();
    let first_back = back.first().map(|r| r.ms).context(format!(
        "{victim} never got a request again after its ejection ({} requests after it)",
        recs.iter().filter(|r| r.ms > last_failure).count()
    ))?;
    ensure!(
        first_back >= last_failure + EJECTION_MS - 100,
        "{victim} got a request {} ms after its last failure, inside its {EJECTION_MS} ms \
         ejection",
        first_back - last_failure
    );
    ensure!(
        back.len() >= 10 && back.iter().all(|r| r.status == 200),
        "after its ejection {victim} answered {} requests, want at least 10, all 200",
        back.len()
    );
    println!(
        "    {victim}: {} failures, the last {} ms after it began failing; back {} ms later \
         for {} requests",
        failures.len(),
        last_failure.saturating_sub(failed_at),
        first_back - last_failure,
        back.len()
    );
    let ejections = delta(&before, &after, EJECTIONS, &[SVC]);
    ensure!(ejections == 1.0, "{ejections} ejections counted, want 1");
    let ejected = during.sum(EJECTED, &[SVC]);
    ensure!(
        ejected == 1.0,
        "{EJECTED} was {ejected} during the ejection, want 1"
    );
    let ejected = after.sum(EJECTED, &[SVC]);
    ensure!(ejected == 0.0, "{EJECTED} is {ejected} after it, want 0");
    Ok(())
}

/// (d) Opaque TCP is not balanced by the sidecar: it goes to the original destination
/// (the ClusterIP, then kube-proxy), even when the mesh config lists an endpoint that
/// does not exist, so nothing the balancer or outlier detection decide can touch it.
pub fn outlier_opaque_tcp_goes_to_the_original_destination() -> Result<()> {
    let mut c = hello_greeter()?;
    let nowhere: std::net::IpAddr = "198.18.255.254".parse()?;
    c.update_mesh_config(|cfg| {
        for s in cfg.services.iter_mut().filter(|s| s.name == "greeter") {
            for e in &mut s.endpoints {
                e.ip = nowhere;
            }
        }
    })?;
    await_generation(&c, c.mesh_config().generation)?;
    let (_, body) = c.admin("client", "/config")?;
    ensure!(
        body.contains("198.18.255.254"),
        "the client's proxy does not list the bogus endpoint"
    );
    for i in 0..3 {
        let out = c.testapp(
            "client",
            &["banner-client", "--addr", GREETER, "--send", "PING"],
            T,
        )?;
        let v = json(&out)?;
        ensure!(
            v["greeting"] == "220 greeter ready" && v["reply"] == "250 PING",
            "connection {i} to the opaque port did not reach the greeter: {v}"
        );
    }
    Ok(())
}

fn hello_greeter() -> Result<Cluster> {
    start(ClusterBuilder::new(sample()))
}
