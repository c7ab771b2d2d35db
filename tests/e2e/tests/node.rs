//! The node agent against a real control plane: `tools/kube/cluster.sh up`, then
//! `meshlet-node` joins it, `kubectl apply -f samples/hello.yaml` (no injector runs,
//! so pods are plain), and the story is checked with the real kubectl: Node Ready
//! with a Lease, pods bound, Running and Ready with pod IPs, a request from one pod
//! to a ClusterIP through the agent's kube-proxy rules, `kubectl top pod
//! --containers`, `kubectl logs`, `kubectl delete pod` within the grace period, and
//! at the end no namespace and no container process left.
//!
//! Needs root, iproute2/iptables/curl and the control-plane binaries
//! (`bash tools/kube/build.sh`); when they are missing it FAILS saying so.

use std::{
    collections::BTreeMap,
    path::Path,
    process::{Command, ExitCode},
    time::{Duration, Instant},
};

use anyhow::{ensure, Context, Result};
use meshlet_e2e::cluster::{self, netns};
use serde_json::Value;

#[path = "support/kube.rs"]
mod support;
use support::*;

const SUBNET: u8 = 78;

fn story() -> Result<()> {
    cluster::check_prereqs().map_err(|e| anyhow::anyhow!("{e}"))?;
    let kube = kube_bin_dir()?;
    let bins = cluster::Binaries::locate().map_err(|e| anyhow::anyhow!("{e}"))?;
    let node_bin = bins.dir.join("meshlet-node");
    ensure!(
        node_bin.is_file(),
        "{} is missing: run `cargo build -p meshlet-e2e --bins` first",
        node_bin.display()
    );
    let t_all = Instant::now();

    let t = Instant::now();
    let cp = ControlPlane::up()?;
    println!("control plane up in {:.1} s", t.elapsed().as_secs_f64());
    let k = Kubectl {
        bin: kube.join("kubectl"),
        kubeconfig: cp.state.join("kubeconfig"),
    };
    let name = format!("node-test-{}", std::process::id());
    let work = tempfile::Builder::new().prefix("mlnode-test-").tempdir()?;
    let mut agent = start_agent(
        &node_bin,
        &cp,
        &name,
        SUBNET,
        &["--token-refresh-seconds", "2"],
        work.path(),
    )?;
    let prefix = format!("mlnode-{}-", agent.pid());
    let r = steps(&k, &name, &prefix, &mut agent, &bins, work.path());
    if r.is_err() {
        eprintln!("--- meshlet-node log ---\n{}", agent.log());
        eprintln!(
            "--- stderr ---\n{}",
            std::fs::read_to_string(work.path().join("agent.err")).unwrap_or_default()
        );
    }
    r?;
    drop(cp);
    println!("whole story in {:.1} s", t_all.elapsed().as_secs_f64());
    Ok(())
}

fn steps(
    k: &Kubectl,
    name: &str,
    prefix: &str,
    agent: &mut Agent,
    bins: &cluster::Binaries,
    work: &Path,
) -> Result<()> {
    // (a) the Node registers, Ready, with its address and a Lease.
    let node = wait_for("the Node to be Ready", Duration::from_secs(30), || {
        let n = k.json(&["get", "node", name])?;
        Ok(n["status"]["conditions"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|c| c["type"] == "Ready" && c["status"] == "True")
            .then_some(n))
    })?;
    let ip = node["status"]["addresses"][0]["address"]
        .as_str()
        .unwrap_or("");
    ensure!(ip == format!("198.18.{SUBNET}.1"), "node InternalIP {ip}");
    ensure!(
        node["status"]["capacity"]["cpu"].as_str().is_some(),
        "no cpu capacity: {node}"
    );
    let lease = k.json(&["-n", "kube-node-lease", "get", "lease", name])?;
    ensure!(lease["spec"]["holderIdentity"] == name, "lease: {lease}");
    println!("ok   node {name} Ready at {ip}, lease held");

    // (b, c) the sample app: bound, running, ready, with pod IPs.
    let t0 = Instant::now();
    k.run(&[
        "apply",
        "-f",
        &root().join("samples/hello.yaml").display().to_string(),
    ])?;
    let mut ready_at: BTreeMap<String, u128> = BTreeMap::new();
    let pods = wait_for(
        "6 pods Ready in namespace hello",
        Duration::from_secs(90),
        || {
            let list = k.json(&["-n", "hello", "get", "pods"])?;
            let items = list["items"].as_array().cloned().unwrap_or_default();
            for p in &items {
                if ready(p) {
                    let n = p["metadata"]["name"].as_str().unwrap_or("").to_string();
                    ready_at.entry(n).or_insert(t0.elapsed().as_millis());
                }
            }
            Ok((items.len() == 6 && items.iter().all(ready)).then_some(items))
        },
    )?;
    let mut ips = Vec::new();
    for p in &pods {
        let pn = p["metadata"]["name"].as_str().unwrap_or("");
        ensure!(p["spec"]["nodeName"] == name, "{pn} not bound to {name}");
        ensure!(p["status"]["phase"] == "Running", "{pn}: {}", p["status"]);
        let ip = p["status"]["podIP"].as_str().unwrap_or("");
        ensure!(
            ip.starts_with(&format!("198.18.{SUBNET}.")) && p["status"]["podIPs"][0]["ip"] == ip,
            "{pn}: podIP {ip:?}"
        );
        ips.push(ip.to_string());
        for c in p["status"]["containerStatuses"]
            .as_array()
            .into_iter()
            .flatten()
        {
            ensure!(
                c["ready"] == true && c["started"] == true && c["state"]["running"].is_object(),
                "{pn}: container status {c}"
            );
        }
    }
    ips.sort();
    ips.dedup();
    ensure!(ips.len() == 6, "pod IPs not unique: {ips:?}");
    let mut apply_ms: Vec<u128> = ready_at.values().copied().collect();
    println!(
        "ok   6 pods Running and Ready; kubectl apply -> pod Ready p50 {} ms, max {} ms",
        p50(&mut apply_ms),
        apply_ms.iter().max().unwrap_or(&0)
    );

    // (e) from the client pod to the backend Service through the node's DNAT rules.
    let client = pods
        .iter()
        .filter_map(|p| p["metadata"]["name"].as_str())
        .find(|n| n.starts_with("client-"))
        .context("no client pod")?
        .to_string();
    let ns = netns::Netns::existing(&format!("{prefix}hello.{client}"));
    let mut seen = BTreeMap::new();
    for _ in 0..16 {
        let body = ns
            .exec(&["curl", "-sS", "-m", "5", "http://198.19.0.10/"])
            .map_err(|e| anyhow::anyhow!("curl from {client} to the backend ClusterIP: {e}"))?;
        let v: Value = serde_json::from_str(&body).with_context(|| format!("reply {body:?}"))?;
        let who = v["name"].as_str().unwrap_or("").to_string();
        ensure!(who.starts_with("backend-v"), "answered by {who:?}");
        *seen
            .entry(who.split('-').take(2).collect::<Vec<_>>().join("-"))
            .or_insert(0) += 1;
    }
    ensure!(seen.len() == 2, "16 requests reached only {seen:?}");
    println!("ok   client -> 198.19.0.10:80 through kube-proxy rules: {seen:?}");

    // (f) kubectl top through the aggregation layer.
    let top = wait_for(
        "kubectl top pod --containers",
        Duration::from_secs(60),
        || {
            let out = k.run(&["-n", "hello", "top", "pod", "--containers"])?;
            Ok((out.lines().count() == 11).then_some(out))
        },
    )?;
    for want in ["backend-v1", "stats", "ws", "greeter", "MEMORY(bytes)"] {
        ensure!(top.contains(want), "kubectl top misses {want}:\n{top}");
    }
    println!("ok   kubectl top pod --containers:\n{top}");
    let logs = k.run(&["-n", "hello", "logs", &client])?;
    ensure!(
        logs.contains("listening on port 8080"),
        "kubectl logs: {logs}"
    );
    println!("ok   kubectl logs {client}");

    // (d) delete with a grace period: SIGTERM, containers gone, object removed.
    let victim = pods
        .iter()
        .filter_map(|p| p["metadata"]["name"].as_str())
        .find(|n| n.starts_with("backend-v2-"))
        .context("no backend-v2 pod")?
        .to_string();
    let t = Instant::now();
    k.run(&[
        "-n",
        "hello",
        "delete",
        "pod",
        &victim,
        "--grace-period=5",
        "--timeout=20s",
    ])?;
    let took = t.elapsed();
    ensure!(
        took < Duration::from_secs(8),
        "delete took {took:?} (grace 5 s)"
    );
    ensure!(
        !netns::list_with_prefix(prefix)
            .iter()
            .any(|n| n.ends_with(&victim)),
        "namespace of {victim} still exists"
    );
    println!(
        "ok   kubectl delete pod {victim} --grace-period=5 returned in {} ms",
        took.as_millis()
    );

    // The Deployment replaces the pod; the new one runs too.
    wait_for("the replacement pod Ready", Duration::from_secs(30), || {
        let items = k.json(&["-n", "hello", "get", "pods"])?["items"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        Ok((items.len() == 6 && items.iter().all(ready)).then_some(()))
    })?;
    ensure!(
        pods_ns_count(prefix, "hello.") == 6,
        "namespaces of hello pods"
    );
    println!("ok   the Deployment's replacement pod is Ready");

    // Volumes at their mountPath, in the container's own mount namespace only:
    // ConfigMap files, a projected token from TokenRequest (audience and expiry
    // from the spec), env from a ConfigMap key, the pod's user.
    k.run(&[
        "apply",
        "-f",
        &root()
            .join("tests/e2e/testdata/node-volumes.yaml")
            .display()
            .to_string(),
    ])?;
    let vp = wait_for(
        "pod node-test/volumes Ready",
        Duration::from_secs(30),
        || {
            let p = k.json(&["-n", "node-test", "get", "pod", "volumes"])?;
            Ok(ready(&p).then_some(p))
        },
    )?;
    let cid = vp["status"]["containerStatuses"][0]["containerID"]
        .as_str()
        .unwrap_or("");
    let pid: i32 = cid
        .rsplit('/')
        .next()
        .unwrap_or("")
        .parse()
        .with_context(|| format!("containerID {cid:?}"))?;
    // /var/run is an absolute symlink, which /proc/PID/root would resolve in the
    // reader's root: name /run directly.
    let in_ctr = |p: &str| {
        let p = p.replace("/var/run/", "/run/");
        std::fs::read_to_string(format!("/proc/{pid}/root{p}"))
            .with_context(|| format!("reading {p} in the container (pid {pid})"))
    };
    ensure!(
        in_ctr("/etc/meshlet-node-test/greeting")? == "hello from a configmap",
        "configmap file"
    );
    let tok = in_ctr("/var/run/secrets/meshlet/tokens/token")?;
    let payload = tok.split('.').nth(1).context("token is not a JWT")?;
    use base64::Engine as _;
    let claims: Value =
        serde_json::from_slice(&base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(payload)?)?;
    ensure!(
        claims["aud"] == serde_json::json!(["meshlet"]),
        "token audience: {claims}"
    );
    let ttl = claims["exp"].as_i64().unwrap_or(0) - claims["iat"].as_i64().unwrap_or(0);
    ensure!(ttl == 900, "token lifetime {ttl} s, spec says 900");
    ensure!(
        claims["kubernetes.io"]["pod"]["name"] == "volumes",
        "token not bound to the pod: {claims}"
    );
    // Renewed (every 2 s here), atomically, and still readable in the container.
    let fresh = wait_for("a renewed token", Duration::from_secs(10), || {
        let t = in_ctr("/var/run/secrets/meshlet/tokens/token")?;
        Ok((t != tok && t.split('.').count() == 3).then_some(t))
    })?;
    ensure!(!fresh.is_empty(), "empty renewed token");
    ensure!(
        in_ctr("/var/run/secrets/kubernetes.io/serviceaccount/namespace")? == "node-test",
        "SA volume"
    );
    let environ = std::fs::read(format!("/proc/{pid}/environ"))?;
    ensure!(
        String::from_utf8_lossy(&environ)
            .split('\0')
            .any(|e| e == "GREETING=hello from a configmap"),
        "env from configMapKeyRef missing"
    );
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    ensure!(
        status
            .lines()
            .any(|l| l.starts_with("Uid:") && l.contains("\t1234\t")),
        "runAsUser 1234 not applied"
    );
    ensure!(
        !Path::new("/etc/meshlet-node-test").exists()
            && !Path::new("/var/run/secrets/meshlet").exists(),
        "volume mounts leaked into the host's mount namespace"
    );
    println!("ok   volumes: configmap file, projected token (aud meshlet, 900 s, bound to the pod, renewed), SA volume, env, uid");

    // A container that ignores SIGTERM is killed when its grace period (2 s) ends.
    wait_for(
        "pod node-test/stubborn Ready",
        Duration::from_secs(30),
        || Ok(ready(&k.json(&["-n", "node-test", "get", "pod", "stubborn"])?).then_some(())),
    )?;
    let t = Instant::now();
    k.run(&[
        "-n",
        "node-test",
        "delete",
        "pod",
        "stubborn",
        "--timeout=20s",
    ])?;
    let took = t.elapsed();
    ensure!(
        took >= Duration::from_secs(2) && took < Duration::from_secs(5),
        "deleting a pod that ignores SIGTERM with grace 2 s took {took:?}"
    );
    ensure!(
        agent.log().lines().any(|l| l.contains("pod stopped")
            && l.contains("node-test/stubborn")
            && l.contains("killed=1")),
        "the agent did not SIGKILL the stubborn container"
    );
    ensure!(
        agent
            .log()
            .lines()
            .any(|l| l.contains("preStop hook ran") && l.contains("node-test/stubborn")),
        "the preStop hook did not run"
    );
    println!(
        "ok   preStop ran, then a container ignoring SIGTERM was killed after its 2 s grace period ({} ms)",
        took.as_millis()
    );

    // Timings the agent measured: first sight of a pod -> all containers ready.
    let mut agent_ms: Vec<u128> = agent
        .log()
        .lines()
        .filter(|l| l.contains("all containers ready"))
        .filter_map(|l| l.rsplit("ms=").next()?.trim().parse().ok())
        .collect();
    let n = agent_ms.len();
    println!(
        "     agent: pod seen -> all containers ready p50 {} ms over {n} pods",
        p50(&mut agent_ms)
    );

    // The same app injected (`meshlet-injector inject -f`): meshlet-init programs
    // the pod's iptables, meshlet-proxy runs as a native sidecar as 1337, and
    // kubectl top tells app and proxy apart.
    meshed(k, prefix, bins, work)?;
    let mut meshed_ms: Vec<u128> = agent
        .log()
        .lines()
        .filter(|l| l.contains("all containers ready"))
        .skip(n)
        .filter_map(|l| l.rsplit("ms=").next()?.trim().parse().ok())
        .collect();
    println!(
        "     agent: injected pod seen -> all containers ready p50 {} ms over {} pods",
        p50(&mut meshed_ms),
        meshed_ms.len()
    );

    // Everything down: no namespace, no container process.
    let mut pids = Vec::new();
    for ns in netns::list_with_prefix(prefix) {
        pids.extend(netns::Netns::existing(&ns).pids());
    }
    ensure!(
        pids.len() >= 10,
        "expected container processes, found {pids:?}"
    );
    let st = agent.stop()?;
    ensure!(st.success(), "meshlet-node exited {st}");
    let left = netns::list_with_prefix(prefix);
    ensure!(left.is_empty(), "namespaces left: {left:?}");
    let alive: Vec<i32> = pids
        .into_iter()
        .filter(|p| Path::new(&format!("/proc/{p}")).exists())
        .collect();
    ensure!(alive.is_empty(), "container processes left: {alive:?}");
    println!("ok   agent stopped: no namespace and no container process left");
    Ok(())
}

fn meshed(k: &Kubectl, prefix: &str, bins: &cluster::Binaries, work: &Path) -> Result<()> {
    ensure!(
        bins.injector.is_file(),
        "{} is missing: run `cargo build --workspace --bins` first",
        bins.injector.display()
    );
    let t = Instant::now();
    k.run(&["delete", "namespace", "hello", "--timeout=60s"])?;
    ensure!(pods_ns_count(prefix, "hello.") == 0, "hello pods still run");
    println!(
        "ok   namespace hello deleted, its pods stopped, in {} ms",
        t.elapsed().as_millis()
    );
    let out = Command::new(&bins.injector)
        .args(["inject", "-f"])
        .arg(root().join("samples/hello.yaml"))
        .output()?;
    ensure!(
        out.status.success(),
        "meshlet-injector inject: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let file = work.join("hello-injected.yaml");
    std::fs::write(&file, &out.stdout)?;
    k.run(&["apply", "-f", &file.display().to_string()])?;
    let pods = wait_for("6 injected pods Ready", Duration::from_secs(90), || {
        let items = k.json(&["-n", "hello", "get", "pods"])?["items"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        Ok((items.len() == 6 && items.iter().all(ready)).then_some(items))
    })?;
    let client = pods
        .iter()
        .find(|p| {
            p["metadata"]["name"]
                .as_str()
                .unwrap_or("")
                .starts_with("client-")
        })
        .context("no client pod")?;
    let inits = client["status"]["initContainerStatuses"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    ensure!(
        inits.len() == 2
            && inits[0]["name"] == "meshlet-init"
            && inits[0]["state"]["terminated"]["reason"] == "Completed"
            && inits[1]["name"] == "meshlet-proxy"
            && inits[1]["ready"] == true
            && inits[1]["started"] == true,
        "init container statuses: {inits:?}"
    );
    let cname = client["metadata"]["name"].as_str().unwrap_or("");
    let ns = netns::Netns::existing(&format!("{prefix}hello.{cname}"));
    let rules = ns
        .exec(&["iptables-save", "-t", "nat"])
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    ensure!(
        rules.contains("MESHLET_OUTPUT"),
        "meshlet-init left no rules:\n{rules}"
    );
    let pid: i32 = inits[1]["containerID"]
        .as_str()
        .unwrap_or("")
        .rsplit('/')
        .next()
        .unwrap_or("")
        .parse()?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    ensure!(
        status
            .lines()
            .any(|l| l.starts_with("Uid:") && l.contains("\t1337\t")),
        "meshlet-proxy does not run as 1337"
    );
    let count = || -> Result<f64> {
        let m = ns
            .exec(&["curl", "-sS", "-m", "5", "http://127.0.0.1:15020/metrics"])
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        Ok(m.lines()
            .filter(|l| {
                l.starts_with("meshlet_requests_total{") && l.contains("direction=\"outbound\"")
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum())
    };
    let before = count()?;
    for _ in 0..5 {
        let body = ns
            .exec(&["curl", "-sS", "-m", "5", "http://198.19.0.10/"])
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        ensure!(body.contains("backend-v"), "reply {body}");
    }
    let after = count()?;
    ensure!(
        after - before == 5.0,
        "the client's sidecar counted {} of 5 requests",
        after - before
    );
    println!("ok   injected pods Ready: meshlet-init rules, proxy as 1337, 5 requests through the client's sidecar");
    let top = wait_for(
        "kubectl top with meshlet-proxy rows",
        Duration::from_secs(60),
        || {
            let out = k.run(&["-n", "hello", "top", "pod", "--containers"])?;
            Ok(
                (out.matches("meshlet-proxy").count() == 5 && out.lines().count() == 16)
                    .then_some(out),
            )
        },
    )?;
    println!("ok   kubectl top pod --containers (injected):\n{top}");
    Ok(())
}

fn main() -> ExitCode {
    match story() {
        Ok(()) => {
            println!("node: passed");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("node: FAILED: {e:#}");
            ExitCode::FAILURE
        }
    }
}
