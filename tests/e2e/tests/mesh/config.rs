//! Config delivery: the sidecars watch the mesh config from a config server
//! (`meshlet-injector serve-config` in the node, `cluster/control.rs`) over TLS instead
//! of reading a file; a change reaches every sidecar while traffic flows, and with the
//! server gone they keep routing on the last config.

use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use meshlet_e2e::cluster::{Cluster, ClusterBuilder};

use super::{curl, delta, json, metrics, sample, start, BACKEND, REQUESTS};

/// How fast a change must reach every sidecar.
const PUSH: Duration = Duration::from_secs(1);

/// The generation each meshed sidecar serves, by pod.
fn generations(c: &Cluster) -> Result<Vec<(String, Option<u64>)>> {
    c.pods()
        .iter()
        .filter(|p| p.meshed())
        .map(|p| {
            let (_, body) = c.admin(&p.name, "/config")?;
            Ok((p.name.clone(), json(&body)?["mesh"]["generation"].as_u64()))
        })
        .collect()
}

/// Waits until every sidecar serves `want`; returns how long it took.
fn await_generation(c: &Cluster, want: u64, limit: Duration) -> Result<Duration> {
    let t = Instant::now();
    loop {
        let g = generations(c)?;
        if g.iter().all(|(_, gen)| *gen == Some(want)) {
            return Ok(t.elapsed());
        }
        ensure!(
            t.elapsed() < limit,
            "sidecars serve {g:?} after {limit:?}, want generation {want} everywhere"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn rename_backend(c: &mut Cluster, to: &str) -> Result<u64> {
    let to = to.to_string();
    c.update_mesh_config(|cfg| {
        for s in &mut cfg.services {
            if s.name.starts_with("backend") {
                s.name = to.clone();
            }
        }
    })?;
    Ok(c.mesh_config().generation)
}

pub fn config_delivered_by_the_control_plane() -> Result<()> {
    let mut c = start(ClusterBuilder::new(sample()).config_server(true))?;
    let sidecars = generations(&c)?;
    ensure!(sidecars.len() >= 2, "meshed pods: {sidecars:?}");
    let first = c.mesh_config().generation;
    await_generation(&c, first, Duration::from_secs(10))?;
    // File mode loads its document at start without counting a reload; a watch counts
    // the first document it receives.
    for (pod, _) in &sidecars {
        let ok = metrics(&c, pod)?.sum("meshlet_config_reloads_total", &[("result", "ok")]);
        ensure!(
            ok == 1.0,
            "{pod}: {ok} documents applied, want 1 (the server's)"
        );
    }

    // A change pushed while requests flow reaches every sidecar within PUSH.
    let load = c.spawn_client(
        "client",
        &[
            "sh",
            "-c",
            &format!(
                "for i in $(seq 1 40); do curl -s -o /dev/null -w '%{{http_code}}\\n' \
                 --max-time 5 http://{BACKEND}/load; sleep 0.05; done"
            ),
        ],
    )?;
    std::thread::sleep(Duration::from_millis(300));
    let want = rename_backend(&mut c, "backend-renamed")?;
    let took = await_generation(&c, want, Duration::from_secs(10))?;
    ensure!(
        took < PUSH,
        "the change took {took:?} to reach every sidecar, want < {PUSH:?}"
    );
    println!("    change reached {} sidecars in {took:?}", sidecars.len());
    let out = load
        .wait_with_output()
        .context("waiting for the request loop")?;
    let codes = String::from_utf8_lossy(&out.stdout);
    ensure!(
        codes.lines().count() == 40 && codes.lines().all(|l| l == "200"),
        "requests during the change answered {codes:?}"
    );

    // Server gone: the sidecars stay ready and route with the last config.
    c.stop_config_server()?;
    let before = metrics(&c, "client")?;
    std::thread::sleep(Duration::from_millis(500));
    for _ in 0..3 {
        curl(&c, "client", &[&format!("http://{BACKEND}/after")])?;
    }
    let after = metrics(&c, "client")?;
    let labelled = delta(
        &before,
        &after,
        REQUESTS,
        &[
            ("direction", "outbound"),
            ("service", "hello/backend-renamed"),
        ],
    );
    ensure!(
        labelled == 3.0,
        "{labelled} requests routed with the last config (service hello/backend-renamed), want 3"
    );
    for (pod, gen) in generations(&c)? {
        ensure!(
            gen == Some(want),
            "{pod} serves {gen:?} without the server, want {want}"
        );
        let (s, body) = c.admin(&pod, "/ready")?;
        ensure!(
            s == 200,
            "{pod} /ready answered {s} {body} without the server"
        );
    }

    // Back: the sidecars reconnect on their own and take the next change.
    c.start_config_server()?;
    let want = rename_backend(&mut c, "backend")?;
    let took = await_generation(&c, want, Duration::from_secs(20))?;
    println!("    after the restart, the next change reached every sidecar in {took:?}");
    Ok(())
}
