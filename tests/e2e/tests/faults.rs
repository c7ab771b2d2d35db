//! Faults on the real control plane (issue #5), with `meshlet-node` as the node and
//! the chart installed by Helm, checked one after another:
//!
//! - the API server restarts (`tools/kube/cluster.sh restart apiserver`) while a
//!   meshed client calls a meshed backend: not one request fails while it is
//!   down, and afterwards the node agent has reconnected (a pod created then is
//!   bound, injected and runs);
//! - a namespace labelled after its pods were created: nothing changes until the
//!   pods are replaced, `kubectl rollout restart` then gives them the sidecar;
//! - an injector container killed (SIGKILL): the node restarts it and injection
//!   works again;
//! - no injector pod with `failurePolicy: Fail`: new pods in a meshed namespace are
//!   refused with a message naming the webhook and saying why;
//! - no injector pod with `failurePolicy: Ignore` (a chart value): pods start
//!   without the sidecar, and the API server counts it in
//!   `apiserver_admission_webhook_fail_open_count`.
//!
//! Needs root, the control plane (`bash tools/kube/build.sh`), Helm
//! (`bash scripts/tools.sh ensure_helm`) and `cargo build --workspace --bins`;
//! when something is missing it FAILS saying what to run.

use std::{
    path::Path,
    process::{Command, ExitCode},
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use anyhow::{ensure, Context, Result};
use meshlet_e2e::cluster::{self, netns};
use serde_json::Value;

#[path = "support/kube.rs"]
mod support;
use support::*;

const SUBNET: u8 = 86;
/// The webhook the chart registers for labelled namespaces.
const NS_WEBHOOK: &str = "namespace.inject.meshlet.io";

fn pods(k: &Kubectl, ns: &str) -> Result<Vec<Value>> {
    Ok(k.json(&["-n", ns, "get", "pods"])?["items"]
        .as_array()
        .cloned()
        .unwrap_or_default())
}

fn name(p: &Value) -> &str {
    p["metadata"]["name"].as_str().unwrap_or("")
}

fn injected(p: &Value) -> bool {
    let inits: Vec<&str> = p["spec"]["initContainers"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|c| c["name"].as_str())
        .collect();
    p["metadata"]["annotations"]["meshlet.io/status"].is_string()
        && inits.contains(&"meshlet-proxy")
}

fn apply(k: &Kubectl, yaml: &str) -> Result<()> {
    let r = k.ran(
        &["apply", "-f", "-"],
        Some(yaml.as_bytes()),
        Duration::from_secs(60),
    )?;
    ensure!(r.code == 0, "kubectl apply failed: {}", r.stderr.trim());
    Ok(())
}

fn fail_open_count(k: &Kubectl) -> Result<f64> {
    let m = k.run(&["get", "--raw", "/metrics"])?;
    Ok(m.lines()
        .filter(|l| {
            l.starts_with("apiserver_admission_webhook_fail_open_count{")
                && l.contains(&format!("name=\"{NS_WEBHOOK}\""))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum())
}

/// Scales the injector to no pod and waits until none is left.
fn no_injector(k: &Kubectl) -> Result<()> {
    k.run(&[
        "-n",
        "meshlet-system",
        "scale",
        "deployment/meshlet-injector",
        "--replicas",
        "0",
    ])?;
    wait_for("no injector pod left", Duration::from_secs(60), || {
        let left = pods(k, "meshlet-system")?
            .iter()
            .filter(|p| name(p).starts_with("meshlet-injector"))
            .count();
        Ok((left == 0).then_some(()))
    })
}

fn plain_pod(name: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: hello}}\nspec:\n  containers:\n    - name: app\n      image: meshlet-testapp:latest\n      args: [http, --port, \"8080\"]\n"
    )
}

fn faults() -> Result<()> {
    cluster::check_prereqs().map_err(|e| anyhow::anyhow!("{e}"))?;
    let kube = kube_bin_dir()?;
    let helm_bin = helm_bin()?;
    let bins = cluster::Binaries::locate().map_err(|e| anyhow::anyhow!("{e}"))?;
    let node_bin = bins.dir.join("meshlet-node");
    for b in [&node_bin, &bins.injector, &bins.proxy] {
        ensure!(
            b.is_file(),
            "{} is missing: run `cargo build --workspace --bins` first",
            b.display()
        );
    }
    let t_all = Instant::now();
    let cp = ControlPlane::up()?;
    let k = Kubectl {
        bin: kube.join("kubectl"),
        kubeconfig: cp.state.join("kubeconfig"),
    };
    let node = format!("faults-{}", std::process::id());
    let work = tempfile::Builder::new()
        .prefix("mlnode-faults-")
        .tempdir()?;
    let mut agent = start_agent(&node_bin, &cp, &node, SUBNET, &[], work.path())?;
    let prefix = format!("mlnode-{}-", agent.pid());
    let r = steps(&k, &cp, &helm_bin, &node, &prefix, &mut agent);
    if r.is_err() {
        eprintln!("--- meshlet-node log (last 80 lines) ---");
        let log = agent.log();
        let lines: Vec<&str> = log.lines().collect();
        for l in &lines[lines.len().saturating_sub(80)..] {
            eprintln!("{l}");
        }
    }
    r?;
    drop(cp);
    println!("all faults in {:.1} s", t_all.elapsed().as_secs_f64());
    Ok(())
}

fn steps(
    k: &Kubectl,
    cp: &ControlPlane,
    helm_bin: &Path,
    node: &str,
    prefix: &str,
    agent: &mut Agent,
) -> Result<()> {
    install_meshlet(helm_bin, &k.kubeconfig)?;
    k.run(&[
        "apply",
        "-f",
        &root().join("samples/hello.yaml").display().to_string(),
    ])?;
    // A namespace whose pods exist before it is labelled for injection.
    apply(
        k,
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: late}\n---\n\
         apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: web, namespace: late}\n\
         spec:\n  replicas: 2\n  selector: {matchLabels: {app: web}}\n  template:\n\
         \x20   metadata: {labels: {app: web}}\n    spec:\n      containers:\n\
         \x20       - name: app\n          image: meshlet-testapp:latest\n\
         \x20         args: [http, --port, \"8080\"]\n",
    )?;
    let hello = wait_for("6 pods Ready in hello", Duration::from_secs(90), || {
        let items = pods(k, "hello")?;
        Ok((items.len() == 6 && items.iter().all(ready)).then_some(items))
    })?;
    let late = wait_for("2 pods Ready in late", Duration::from_secs(60), || {
        let items = pods(k, "late")?;
        Ok((items.len() == 2 && items.iter().all(ready)).then_some(items))
    })?;
    ensure!(
        late.iter().all(|p| !injected(p)),
        "pods in the unlabelled namespace late got a sidecar"
    );
    println!(
        "ok   chart installed, hello meshed and Ready, late (unlabelled) Ready without sidecars"
    );

    apiserver_restart(k, cp, &hello, node, prefix)?;
    label_late(k, &late)?;
    injector_killed(k)?;
    injector_down(k, helm_bin)?;

    helm(
        helm_bin,
        &k.kubeconfig,
        &["uninstall", "meshlet", "-n", "meshlet-system", "--wait"],
    )?;
    let st = agent.stop()?;
    ensure!(st.success(), "meshlet-node exited {st}");
    let left = netns::list_with_prefix(prefix);
    ensure!(left.is_empty(), "namespaces left: {left:?}");
    println!("ok   chart uninstalled, agent stopped, no namespace left");
    Ok(())
}

/// Meshed traffic keeps flowing while the API server is down, and the node agent
/// works again after it is back.
fn apiserver_restart(
    k: &Kubectl,
    cp: &ControlPlane,
    hello: &[Value],
    node: &str,
    prefix: &str,
) -> Result<()> {
    let client = hello
        .iter()
        .map(name)
        .find(|n| n.starts_with("client-"))
        .context("no client pod in hello")?
        .to_string();
    let ns = netns::Netns::existing(&format!("{prefix}hello.{client}"));
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let last_error = Arc::new(std::sync::Mutex::new(String::new()));
    let traffic = {
        let (stop, ok, failed, last_error) =
            (stop.clone(), ok.clone(), failed.clone(), last_error.clone());
        std::thread::spawn(move || {
            let deadline = Instant::now() + Duration::from_secs(180);
            while !stop.load(Ordering::SeqCst) && Instant::now() < deadline {
                match ns.exec(&["curl", "-sS", "-m", "2", "http://198.19.0.10/"]) {
                    Ok(body) if body.contains("backend-v") => {
                        ok.fetch_add(1, Ordering::SeqCst);
                    }
                    Ok(body) => {
                        failed.fetch_add(1, Ordering::SeqCst);
                        *last_error.lock().unwrap_or_else(|p| p.into_inner()) = body;
                    }
                    Err(e) => {
                        failed.fetch_add(1, Ordering::SeqCst);
                        *last_error.lock().unwrap_or_else(|p| p.into_inner()) = e.to_string();
                    }
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        })
    };
    // Whether the API server really was unreachable, seen from a client.
    let down_seen = {
        let (stop, kubectl, kubeconfig) = (stop.clone(), k.bin.clone(), k.kubeconfig.clone());
        std::thread::spawn(move || {
            let mut down = 0u32;
            let deadline = Instant::now() + Duration::from_secs(180);
            while !stop.load(Ordering::SeqCst) && Instant::now() < deadline {
                let mut c = Command::new(&kubectl);
                c.arg("--kubeconfig").arg(&kubeconfig).args([
                    "get",
                    "--raw",
                    "/readyz",
                    "--request-timeout=1s",
                ]);
                if !netns::run_with_timeout(&mut c, Duration::from_secs(3))
                    .is_ok_and(|o| o.status.success())
                {
                    down += 1;
                }
                std::thread::sleep(Duration::from_millis(500));
            }
            down
        })
    };
    std::thread::sleep(Duration::from_secs(1));
    let t = Instant::now();
    let out = cp.script_args(&["restart", "apiserver", "3"]);
    let restart_s = t.elapsed().as_secs_f64();
    // Traffic goes on a little after the API server is back.
    std::thread::sleep(Duration::from_secs(2));
    stop.store(true, Ordering::SeqCst);
    let _ = traffic.join();
    let down = down_seen.join().unwrap_or(0);
    let out = out?;
    ensure!(
        out.status.success(),
        "`cluster.sh restart apiserver` failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (ok, failed) = (ok.load(Ordering::SeqCst), failed.load(Ordering::SeqCst));
    ensure!(
        down >= 2,
        "the API server was never seen down during the restart ({down} failed /readyz)"
    );
    ensure!(
        failed == 0,
        "{failed} of {} requests failed while the API server restarted; last: {}",
        ok + failed,
        last_error.lock().unwrap_or_else(|p| p.into_inner())
    );
    ensure!(ok >= 20, "only {ok} requests in {restart_s:.0} s");
    println!(
        "ok   API server restarted ({restart_s:.1} s, unreachable for {down} probes 0.5 s apart): {ok} meshed requests, 0 failed"
    );

    // The agent's watches reconnected: a pod created now is bound, injected, runs.
    let t = Instant::now();
    apply(k, &plain_pod("after-restart"))?;
    let p = wait_for(
        "the pod created after the restart to be Ready",
        Duration::from_secs(90),
        || {
            let p = k.json(&["-n", "hello", "get", "pod", "after-restart"])?;
            Ok(ready(&p).then_some(p))
        },
    )?;
    ensure!(
        p["spec"]["nodeName"] == node,
        "bound to {} instead of {node}",
        p["spec"]["nodeName"]
    );
    ensure!(
        injected(&p),
        "the pod created after the restart has no sidecar"
    );
    println!(
        "ok   node agent reconnected: a pod created after the restart was bound, injected and Ready in {} ms",
        t.elapsed().as_millis()
    );
    k.run(&[
        "-n",
        "hello",
        "delete",
        "pod",
        "after-restart",
        "--wait=false",
    ])?;
    Ok(())
}

/// Labelling a namespace changes no running pod; a rollout restart injects.
fn label_late(k: &Kubectl, late: &[Value]) -> Result<()> {
    let uids: Vec<String> = late
        .iter()
        .filter_map(|p| p["metadata"]["uid"].as_str().map(String::from))
        .collect();
    k.run(&["label", "namespace", "late", "meshlet.io/inject=enabled"])?;
    std::thread::sleep(Duration::from_secs(3));
    let now = pods(k, "late")?;
    let now_uids: Vec<String> = now
        .iter()
        .filter_map(|p| p["metadata"]["uid"].as_str().map(String::from))
        .collect();
    ensure!(
        now_uids == uids && now.iter().all(|p| !injected(p) && ready(p)),
        "labelling the namespace changed its running pods: {:?} -> {:?}",
        uids,
        now_uids
    );
    println!("ok   namespace late labelled: its 2 running pods unchanged 3 s later, still without sidecar");
    let t = Instant::now();
    k.run(&["-n", "late", "rollout", "restart", "deployment/web"])?;
    k.run(&[
        "-n",
        "late",
        "rollout",
        "status",
        "deployment/web",
        "--timeout=90s",
    ])?;
    let new = wait_for(
        "late's pods replaced and Ready",
        Duration::from_secs(60),
        || {
            let items = pods(k, "late")?;
            Ok((items.len() == 2
                && items.iter().all(ready)
                && items.iter().all(|p| {
                    !uids
                        .iter()
                        .any(|u| p["metadata"]["uid"].as_str() == Some(u.as_str()))
                }))
            .then_some(items))
        },
    )?;
    ensure!(
        new.iter().all(injected),
        "after rollout restart the pods of late have no sidecar"
    );
    println!(
        "ok   rollout restart in late: 2 new pods with the sidecar, Ready in {} ms",
        t.elapsed().as_millis()
    );
    Ok(())
}

/// An injector container killed with SIGKILL: the node restarts it, and new
/// pods are injected again.
fn injector_killed(k: &Kubectl) -> Result<()> {
    let injectors: Vec<Value> = pods(k, "meshlet-system")?
        .into_iter()
        .filter(|p| name(p).starts_with("meshlet-injector"))
        .collect();
    let victim = injectors.first().context("no injector pod")?;
    let victim_name = name(victim).to_string();
    let cs = &victim["status"]["containerStatuses"][0];
    let restarts = cs["restartCount"].as_i64().unwrap_or(0);
    // meshlet://<pod uid>/<container>/<pid>
    let pid: i32 = cs["containerID"]
        .as_str()
        .and_then(|id| id.rsplit('/').next())
        .and_then(|p| p.parse().ok())
        .context("the injector's containerID names no pid")?;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .with_context(|| format!("killing the injector process {pid}"))?;
    let t = Instant::now();
    wait_for(
        "the killed injector restarted and Ready",
        Duration::from_secs(60),
        || {
            let p = k.json(&["-n", "meshlet-system", "get", "pod", &victim_name])?;
            let n = p["status"]["containerStatuses"][0]["restartCount"]
                .as_i64()
                .unwrap_or(0);
            Ok((n > restarts && ready(&p)).then_some(()))
        },
    )?;
    let restarted_ms = t.elapsed().as_millis();
    apply(k, &plain_pod("after-kill"))?;
    let p = k.json(&["-n", "hello", "get", "pod", "after-kill"])?;
    ensure!(
        injected(&p),
        "a pod created after the injector came back has no sidecar"
    );
    k.run(&["-n", "hello", "delete", "pod", "after-kill", "--wait=false"])?;
    println!(
        "ok   injector container SIGKILLed: the node restarted it, Ready again in {restarted_ms} ms; new pods injected"
    );
    Ok(())
}

/// No injector pod: refused with failurePolicy Fail, admitted unmeshed with Ignore.
fn injector_down(k: &Kubectl, helm_bin: &Path) -> Result<()> {
    no_injector(k)?;
    let msg = wait_for(
        "a pod in hello to be refused",
        Duration::from_secs(30),
        || {
            let r = k.ran(
                &["apply", "-f", "-"],
                Some(plain_pod("refused").as_bytes()),
                Duration::from_secs(30),
            )?;
            if r.code == 0 {
                // Admitted by an injector still listed: try again, without it.
                k.run(&["-n", "hello", "delete", "pod", "refused", "--wait=false"])?;
                return Ok(None);
            }
            Ok(Some(r.stderr))
        },
    )?;
    ensure!(
        msg.contains(&format!("failed calling webhook \"{NS_WEBHOOK}\"")),
        "refused, but the message does not name the webhook: {msg}"
    );
    let why = msg
        .split("failed to call webhook:")
        .nth(1)
        .map(str::trim)
        .unwrap_or("");
    ensure!(
        why.contains("no endpoints available")
            || why.contains("connection refused")
            || why.contains("no route"),
        "refused, but the message does not say why: {msg}"
    );
    println!(
        "ok   no injector, failurePolicy Fail: pod refused: {}",
        msg.trim()
    );

    helm(
        helm_bin,
        &k.kubeconfig,
        &[
            "upgrade",
            "meshlet",
            "charts/meshlet",
            "-n",
            "meshlet-system",
            "--reuse-values",
            "--set",
            "webhook.failurePolicy=Ignore",
            "--wait",
            "--timeout",
            "120s",
        ],
    )?;
    let policies = k.run(&[
        "get",
        "mutatingwebhookconfigurations",
        "-o",
        "jsonpath={.items[*].webhooks[*].failurePolicy}",
    ])?;
    ensure!(
        policies.split_whitespace().all(|p| p == "Ignore"),
        "webhook.failurePolicy=Ignore gave failure policies {policies:?}"
    );
    no_injector(k)?;
    let before = fail_open_count(k)? as u64;
    let p = wait_for(
        "a pod admitted without the injector",
        Duration::from_secs(30),
        || {
            let r = k.ran(
                &["apply", "-f", "-"],
                Some(plain_pod("unmeshed").as_bytes()),
                Duration::from_secs(30),
            )?;
            ensure!(
                r.code == 0,
                "with failurePolicy Ignore the pod was refused: {}",
                r.stderr
            );
            let p = k.json(&["-n", "hello", "get", "pod", "unmeshed"])?;
            Ok(ready(&p).then_some(p))
        },
    )?;
    ensure!(
        !injected(&p),
        "the pod admitted while no injector ran has a sidecar"
    );
    let after = fail_open_count(k)? as u64;
    ensure!(
        after > before,
        "apiserver_admission_webhook_fail_open_count{{name=\"{NS_WEBHOOK}\"}} went {before} -> {after}"
    );
    println!(
        "ok   no injector, failurePolicy Ignore: pod started without sidecar; apiserver_admission_webhook_fail_open_count{{name=\"{NS_WEBHOOK}\"}} {before} -> {after}"
    );
    Ok(())
}

fn main() -> ExitCode {
    match faults() {
        Ok(()) => {
            println!("faults: passed");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("faults: FAILED: {e:#}");
            ExitCode::FAILURE
        }
    }
}
