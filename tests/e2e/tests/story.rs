//! The user's story on the real control plane with `meshlet-node` as its node:
//! `helm install` the chart (the injector runs as pods on the node), `kubectl apply`
//! the sample into its labelled namespace (the real webhook injects, reached through
//! the API server's egress socket), traffic through the sidecars, `kubectl rollout
//! restart`, `kubectl exec` (exit code, stdin, a Service through the sidecar),
//! `kubectl apply` of HTTPRoutes (status, routing by header without a restart, an
//! unknown backend, delete), `kubectl apply` of an AuthorizationPolicy (403 for
//! another meshed caller, 200 for the allowed one, status, delete), `helm upgrade` (same webhook and identity CAs),
//! `kubectl top pod --containers`, `helm uninstall`, nothing left behind.
//!
//! Needs root, the control plane (`bash tools/kube/build.sh`), Helm
//! (`bash scripts/tools.sh ensure_helm`) and `cargo build --workspace --bins`;
//! when something is missing it FAILS saying what to run.

use std::{
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

const SUBNET: u8 = 79;

/// Every injected pod's sidecar holds a certificate the in-cluster issuer signed
/// after a real TokenReview, for exactly the pod's service account: its log names
/// the SPIFFE id, and its expiry metric is about 24 h ahead.
fn identities(k: &Kubectl, prefix: &str, pods: &[Value]) -> Result<()> {
    let secret = k.json(&[
        "-n",
        "meshlet-system",
        "get",
        "secret",
        "meshlet-identity-ca",
    ])?;
    ensure!(
        secret["data"]["tls.crt"].is_string(),
        "the injector did not create the CA Secret: {secret}"
    );
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs_f64();
    let mut ids = Vec::new();
    for p in pods {
        let name = p["metadata"]["name"].as_str().unwrap_or("");
        if name.starts_with("legacy-") {
            continue;
        }
        let sa = p["spec"]["serviceAccountName"]
            .as_str()
            .unwrap_or("default");
        let want = format!("spiffe://cluster.local/ns/hello/sa/{sa}");
        let log = k.run(&["-n", "hello", "logs", name, "-c", "meshlet-proxy"])?;
        ensure!(
            log.lines()
                .any(|l| l.contains("mesh identity loaded") && l.contains(&want)),
            "{name}: no `mesh identity loaded` for {want} in the proxy log:\n{log}"
        );
        let ns = netns::Netns::existing(&format!("{prefix}hello.{name}"));
        let metrics = ns
            .exec(&["curl", "-sS", "-m", "5", "http://127.0.0.1:15020/metrics"])
            .map_err(|e| anyhow::anyhow!("{name}: reading the sidecar's metrics: {e}"))?;
        let expiry = metrics
            .lines()
            .find_map(|l| l.strip_prefix("meshlet_identity_cert_expiry_timestamp_seconds "))
            .and_then(|v| v.trim().parse::<f64>().ok())
            .with_context(|| format!("{name}: no expiry metric"))?;
        ensure!(
            (expiry - now - 24.0 * 3600.0).abs() < 600.0,
            "{name}: certificate expires at {expiry}, not ~24 h from {now}"
        );
        ids.push(format!("{name}={sa}"));
    }
    println!(
        "ok   sidecars got 24 h certificates from the in-cluster issuer (TokenReview): {}",
        ids.join(", ")
    );
    Ok(())
}

/// The backends' sidecars counted the client's requests as mesh mTLS from the
/// client's issued identity (the mesh config from the in-cluster controller says the
/// backend is meshed, the identities come from the issuer).
fn mtls(prefix: &str, pods: &[Value]) -> Result<()> {
    let want = r#"tls="true",peer_identity="spiffe://cluster.local/ns/hello/sa/client"}"#;
    let mut seen = 0.0;
    let mut all = String::new();
    for p in pods {
        let name = p["metadata"]["name"].as_str().unwrap_or("");
        if !name.starts_with("backend-") {
            continue;
        }
        let ns = netns::Netns::existing(&format!("{prefix}hello.{name}"));
        let m = ns
            .exec(&["curl", "-sS", "-m", "5", "http://127.0.0.1:15020/metrics"])
            .map_err(|e| anyhow::anyhow!("{name}: reading the sidecar's metrics: {e}"))?;
        for l in m
            .lines()
            .filter(|l| l.starts_with("meshlet_requests_total{"))
        {
            all.push_str(&format!("{name}: {l}\n"));
            if l.contains(r#"direction="inbound""#) && l.contains(want) {
                seen += l
                    .rsplit(' ')
                    .next()
                    .and_then(|v| v.parse::<f64>().ok())
                    .unwrap_or(0.0);
            }
        }
    }
    ensure!(
        seen >= 3.0,
        "the backends counted {seen} inbound mTLS requests from the client's identity, want 3:\n{all}"
    );
    println!("ok   client -> backend over mesh mTLS: the backends saw {seen} requests from spiffe://cluster.local/ns/hello/sa/client");
    Ok(())
}

/// The condition `type` of our (meshlet.io/controller) parent status of an
/// HTTPRoute, as `(status, reason)`, if it is written for the route's generation.
fn route_condition(route: &Value, kind: &str) -> Option<(String, String)> {
    let generation = route["metadata"]["generation"].as_i64()?;
    let ours = route["status"]["parents"]
        .as_array()?
        .iter()
        .find(|p| p["controllerName"] == meshlet_api::CONTROLLER_NAME)?;
    let c = ours["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == kind)?;
    (c["observedGeneration"].as_i64() == Some(generation)).then(|| {
        (
            c["status"].as_str().unwrap_or("").to_string(),
            c["reason"].as_str().unwrap_or("").to_string(),
        )
    })
}

/// `kubectl get httproute NAME -o yaml`, parsed (what a user reads).
fn route_yaml(k: &Kubectl, name: &str) -> Result<Value> {
    let y = k.run(&["-n", "hello", "get", "httproute", name, "-o", "yaml"])?;
    serde_yaml::from_str(&y).with_context(|| format!("kubectl get httproute {name} -o yaml: {y}"))
}

/// Waits until the route's status from our controller has these (status, reason)s
/// for Accepted and ResolvedRefs at its current generation.
fn wait_route_status(
    k: &Kubectl,
    name: &str,
    accepted: (&str, &str),
    resolved: (&str, &str),
) -> Result<Value> {
    let own = |(s, r): (&str, &str)| Some((s.to_string(), r.to_string()));
    let mut last = Value::Null;
    wait_for(
        &format!("HTTPRoute {name}: Accepted={accepted:?} ResolvedRefs={resolved:?}"),
        Duration::from_secs(30),
        || {
            last = route_yaml(k, name)?;
            Ok((route_condition(&last, "Accepted") == own(accepted)
                && route_condition(&last, "ResolvedRefs") == own(resolved))
            .then(|| last.clone()))
        },
    )
    .with_context(|| format!("last seen: {}", last["status"]))
}

/// One request from inside the client pod: (HTTP status, body).
fn get(ns: &netns::Netns, header: Option<&str>) -> Result<(u16, String)> {
    let mut args = vec!["curl", "-sS", "-m", "5", "-w", "\n%{http_code}"];
    if let Some(h) = header {
        args.extend(["-H", h]);
    }
    args.push("http://198.19.0.10/");
    let out = ns
        .exec(&args)
        .map_err(|e| anyhow::anyhow!("curl through the client's sidecar: {e}"))?;
    let (body, code) = out.trim_end().rsplit_once('\n').unwrap_or(("", out.trim()));
    Ok((code.parse().unwrap_or(0), body.to_string()))
}

/// Polls (every ~10 ms, up to 30 s) until a request answers as `want` says; the time
/// from the start until then.
fn until_routed(
    ns: &netns::Netns,
    what: &str,
    header: Option<&str>,
    want: impl Fn(u16, &str) -> bool,
) -> Result<Duration> {
    let t = Instant::now();
    let mut last = (0, String::new());
    while t.elapsed() < Duration::from_secs(30) {
        last = get(ns, header)?;
        if want(last.0, &last.1) {
            return Ok(t.elapsed());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    anyhow::bail!(
        "{what}: not within 30 s; the last answer was {} {:?}",
        last.0,
        last.1
    )
}

/// `kubectl exec` into the client's app container: `n` requests (with `header`),
/// the pod names that answered.
fn answers(k: &Kubectl, client: &str, header: &str, n: usize) -> Result<Vec<String>> {
    let script =
        format!("for i in $(seq {n}); do curl -sS -m 5 {header} http://198.19.0.10/; echo; done");
    let r = k.ran(
        &[
            "-n", "hello", "exec", client, "-c", "app", "--", "sh", "-c", &script,
        ],
        None,
        Duration::from_secs(60),
    )?;
    ensure!(
        r.code == 0,
        "kubectl exec curl ({script}): exit {}, {}",
        r.code,
        r.stderr
    );
    // The test app answers with a JSON document naming its pod.
    let by: Vec<String> = r
        .stdout
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter_map(|v| v["name"].as_str().map(String::from))
        .collect();
    ensure!(
        by.len() == n,
        "{n} requests ({header}) but {} answers: {:?}",
        by.len(),
        r.stdout
    );
    Ok(by)
}

/// HTTPRoutes on the backend Service, applied while the sidecars run: status from
/// the controller, routing by header, an unknown backend, and deleting them.
fn routes(k: &Kubectl, prefix: &str, client: &str) -> Result<()> {
    let ns = netns::Netns::existing(&format!("{prefix}hello.{client}"));
    let t = Instant::now();
    k.run(&[
        "apply",
        "-f",
        &root()
            .join("samples/hello-route.yaml")
            .display()
            .to_string(),
    ])?;
    until_routed(
        &ns,
        "version: v2 routed to backend-v2",
        Some("version: v2"),
        |c, b| c == 200 && b.contains("backend-v2-"),
    )?;
    let took = t.elapsed();
    let v2 = answers(k, client, "-H 'version: v2'", 10)?;
    ensure!(
        v2.iter().all(|b| b.starts_with("backend-v2-")),
        "version: v2 answered by {v2:?}"
    );
    let plain = answers(k, client, "", 10)?;
    ensure!(
        plain.iter().all(|b| b.starts_with("backend-v1-")),
        "requests without the header answered by {plain:?}, want backend-v1 only"
    );
    println!(
        "ok   kubectl apply HTTPRoute backend-by-version: routed {} ms after kubectl apply started (no pod restart); \
         10/10 `version: v2` -> backend-v2, 10/10 others -> backend-v1 (kubectl exec curl)",
        took.as_millis()
    );
    let r = wait_route_status(
        k,
        "backend-by-version",
        ("True", "Accepted"),
        ("True", "ResolvedRefs"),
    )?;
    println!(
        "ok   kubectl get httproute -o yaml: {} Accepted=True ResolvedRefs=True at observedGeneration {} ({} ms after apply)",
        meshlet_api::CONTROLLER_NAME,
        r["metadata"]["generation"],
        t.elapsed().as_millis()
    );

    // A rule whose backend does not exist: the route is accepted, its refs are not
    // resolved, and it does not disturb the routing in force.
    let missing = r#"
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: backend-missing, namespace: hello}
spec:
  parentRefs: [{group: "", kind: Service, name: backend, port: 80}]
  rules:
    - matches: [{headers: [{name: version, value: v3}]}]
      backendRefs: [{name: backend-v3, port: 80}]
"#;
    let r = k.ran(
        &["apply", "-f", "-"],
        Some(missing.as_bytes()),
        Duration::from_secs(30),
    )?;
    ensure!(
        r.code == 0,
        "kubectl apply HTTPRoute backend-missing: {}",
        r.stderr
    );
    let r = wait_route_status(
        k,
        "backend-missing",
        ("True", "Accepted"),
        ("False", "BackendNotFound"),
    )?;
    let msg = r["status"]["parents"][0]["conditions"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|c| c["type"] == "ResolvedRefs")
        .and_then(|c| c["message"].as_str())
        .unwrap_or("")
        .to_string();
    ensure!(
        msg.contains("backend-v3"),
        "ResolvedRefs message does not name backend-v3: {msg:?}"
    );
    // The Gateway API wants 500s for a rule without a usable backend; meshlet's
    // compiler leaves the whole route out until its refs resolve, so such requests
    // keep the routing they had (here backend-by-version's default rule: backend-v1).
    for _ in 0..5 {
        let (code, body) = get(&ns, Some("version: v3"))?;
        ensure!(
            code == 200 && body.contains("backend-v1-"),
            "version: v3 with route backend-missing: {code} {body:?}, want backend-v1"
        );
    }
    println!("ok   HTTPRoute backend-missing: Accepted=True, ResolvedRefs=False/BackendNotFound ({msg}); `version: v3` still -> backend-v1");

    // Deleting the routes gives the Service its own endpoints back: both versions.
    let t = Instant::now();
    k.run(&[
        "-n",
        "hello",
        "delete",
        "httproute",
        "backend-by-version",
        "backend-missing",
    ])?;
    until_routed(
        &ns,
        "a request without the header reaching backend-v2 again",
        None,
        |c, b| c == 200 && b.contains("backend-v2-"),
    )?;
    let took = t.elapsed();
    let after = answers(k, client, "-H 'version: v3'", 20)?;
    ensure!(
        after.iter().any(|b| b.starts_with("backend-v1-"))
            && after.iter().any(|b| b.starts_with("backend-v2-")),
        "after deleting the routes 20 requests were answered by {after:?}, want both versions"
    );
    println!(
        "ok   kubectl delete httproute: default routing back {} ms after delete (20 requests: both versions)",
        took.as_millis()
    );
    Ok(())
}

/// `kubectl exec` into `pod`'s app container: the HTTP status of one request to the
/// backend Service, through the pod's sidecar.
fn status_from(k: &Kubectl, pod: &str) -> Result<String> {
    let r = k.ran(
        &[
            "-n",
            "hello",
            "exec",
            pod,
            "-c",
            "app",
            "--",
            "curl",
            "-sS",
            "-m",
            "5",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "http://198.19.0.10/",
        ],
        None,
        Duration::from_secs(30),
    )?;
    ensure!(
        r.code == 0,
        "kubectl exec curl from {pod}: exit {}, {}",
        r.code,
        r.stderr
    );
    Ok(r.stdout.trim().to_string())
}

/// `kubectl apply` of an AuthorizationPolicy allowing only the client's
/// ServiceAccount to the backend: another meshed pod (a backend, ServiceAccount
/// backend) gets 403 without a restart while the client still gets 200, the policy
/// shows Accepted=True, and deleting it lets the other pod in again.
fn authorization(k: &Kubectl, client: &str) -> Result<()> {
    let other = hello_pods(k)?
        .iter()
        .filter_map(|p| p["metadata"]["name"].as_str())
        .find(|n| n.starts_with("backend-v2-"))
        .context("no backend-v2 pod")?
        .to_string();
    ensure!(
        status_from(k, &other)? == "200",
        "before any policy, {other} must reach the backend"
    );
    let policy = r#"
apiVersion: policy.meshlet.io/v1alpha1
kind: AuthorizationPolicy
metadata: {name: backend-from-client, namespace: hello}
spec:
  targetRefs: [{group: "", kind: Service, name: backend}]
  action: ALLOW
  rules:
    - sources: [{type: ServiceAccount, serviceAccount: {name: client}}]
"#;
    let t = Instant::now();
    let r = k.ran(
        &["apply", "-f", "-"],
        Some(policy.as_bytes()),
        Duration::from_secs(30),
    )?;
    ensure!(
        r.code == 0,
        "kubectl apply AuthorizationPolicy: {}",
        r.stderr
    );
    let denied = wait_for(
        "403 for the backend's own ServiceAccount",
        Duration::from_secs(30),
        || Ok((status_from(k, &other)? == "403").then_some(t.elapsed())),
    )?;
    let by = answers(k, client, "", 5)?;
    ensure!(
        by.iter().all(|n| n.starts_with("backend-v")),
        "the client, allowed, must still get answers: {by:?}"
    );
    println!(
        "ok   kubectl apply AuthorizationPolicy: {other} (sa/backend) gets 403 {} ms after apply; \
         the client (sa/client) 5/5 answered",
        denied.as_millis()
    );
    let accepted = wait_for("policy Accepted=True", Duration::from_secs(30), || {
        let p = k.json(&[
            "-n",
            "hello",
            "get",
            "authorizationpolicy",
            "backend-from-client",
        ])?;
        let c = p["status"]["conditions"]
            .as_array()
            .and_then(|cs| cs.iter().find(|c| c["type"] == "Accepted"))
            .cloned();
        Ok(c.filter(|c| c["status"] == "True"))
    })?;
    println!(
        "ok   kubectl get authorizationpolicy: Accepted=True ({})",
        accepted["message"]
    );
    k.run(&[
        "-n",
        "hello",
        "delete",
        "authorizationpolicy",
        "backend-from-client",
    ])?;
    wait_for(
        "200 again once the policy is deleted",
        Duration::from_secs(30),
        || Ok((status_from(k, &other)? == "200").then_some(())),
    )?;
    println!("ok   kubectl delete authorizationpolicy: {other} reaches the backend again");
    Ok(())
}

fn hello_pods(k: &Kubectl) -> Result<Vec<Value>> {
    Ok(k.json(&["-n", "hello", "get", "pods"])?["items"]
        .as_array()
        .cloned()
        .unwrap_or_default())
}

fn story() -> Result<()> {
    cluster::check_prereqs().map_err(|e| anyhow::anyhow!("{e}"))?;
    let kube = kube_bin_dir()?;
    let helm_bin = helm_bin()?;
    let bins = cluster::Binaries::locate().map_err(|e| anyhow::anyhow!("{e}"))?;
    let node_bin = bins.dir.join("meshlet-node");
    for b in [&node_bin, &bins.injector] {
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
    let name = format!("story-{}", std::process::id());
    let work = tempfile::Builder::new().prefix("mlnode-story-").tempdir()?;
    // The Gateway API CRDs first, as a user would have them: the controller then
    // watches HTTPRoutes from its start.
    let t = Instant::now();
    let out = cp.script_args(&["gateway-api", "standard"])?;
    ensure!(
        out.status.success(),
        "`tools/kube/cluster.sh gateway-api` failed (it needs Go 1.26 to fetch the CRDs): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    println!(
        "ok   Gateway API CRDs installed in {} ms",
        t.elapsed().as_millis()
    );
    let mut agent = start_agent(&node_bin, &cp, &name, SUBNET, &[], work.path())?;
    let prefix = format!("mlnode-{}-", agent.pid());
    let r = steps(&k, &helm_bin, &prefix, &mut agent);
    if r.is_err() {
        eprintln!("--- meshlet-node log ---\n{}", agent.log());
    }
    r?;
    drop(cp);
    println!("whole story in {:.1} s", t_all.elapsed().as_secs_f64());
    Ok(())
}

fn steps(k: &Kubectl, helm_bin: &Path, prefix: &str, agent: &mut Agent) -> Result<()> {
    let t = Instant::now();
    install_meshlet(helm_bin, &k.kubeconfig)?;
    println!(
        "ok   helm install: injector pods Ready on meshlet-node in {} ms",
        t.elapsed().as_millis()
    );

    let t = Instant::now();
    k.run(&[
        "apply",
        "-f",
        &root().join("samples/hello.yaml").display().to_string(),
    ])?;
    let pods = wait_for("6 pods Ready in hello", Duration::from_secs(90), || {
        let items = hello_pods(k)?;
        Ok((items.len() == 6 && items.iter().all(ready)).then_some(items))
    })?;
    for p in &pods {
        let n = p["metadata"]["name"].as_str().unwrap_or("");
        let inits: Vec<&str> = p["spec"]["initContainers"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|c| c["name"].as_str())
            .collect();
        let injected = p["metadata"]["annotations"]["meshlet.io/status"].is_string();
        if n.starts_with("legacy-") {
            ensure!(
                !injected && inits.is_empty(),
                "{n} opted out but was injected"
            );
        } else {
            ensure!(
                injected && inits == ["meshlet-init", "meshlet-proxy"],
                "{n} not injected by the webhook: init containers {inits:?}"
            );
        }
    }
    println!(
        "ok   webhook injected 5 pods (legacy opted out), all Ready {} ms after apply",
        t.elapsed().as_millis()
    );
    identities(k, prefix, &pods)?;

    let client = pods
        .iter()
        .filter_map(|p| p["metadata"]["name"].as_str())
        .find(|n| n.starts_with("client-"))
        .context("no client pod")?
        .to_string();
    let ns = netns::Netns::existing(&format!("{prefix}hello.{client}"));
    for _ in 0..3 {
        let body = ns
            .exec(&["curl", "-sS", "-m", "5", "http://198.19.0.10/"])
            .map_err(|e| anyhow::anyhow!("curl through the client's sidecar: {e}"))?;
        ensure!(body.contains("backend-v"), "reply {body}");
    }
    println!("ok   client -> backend through both sidecars");
    mtls(prefix, &pods)?;

    exec_steps(k, &client)?;
    routes(k, prefix, &client)?;
    authorization(k, &client)?;
    upgrade(k, helm_bin)?;

    let old: Vec<String> = pods
        .iter()
        .filter_map(|p| p["metadata"]["name"].as_str())
        .filter(|n| n.starts_with("backend-v1-"))
        .map(String::from)
        .collect();
    let t = Instant::now();
    k.run(&["-n", "hello", "rollout", "restart", "deployment/backend-v1"])?;
    k.run(&[
        "-n",
        "hello",
        "rollout",
        "status",
        "deployment/backend-v1",
        "--timeout=90s",
    ])?;
    wait_for(
        "the old backend-v1 pod gone",
        Duration::from_secs(60),
        || {
            let items = hello_pods(k)?;
            let names: Vec<&str> = items
                .iter()
                .filter_map(|p| p["metadata"]["name"].as_str())
                .collect();
            Ok((items.len() == 6
                && items.iter().all(ready)
                && !old.iter().any(|o| names.contains(&o.as_str())))
            .then_some(()))
        },
    )?;
    println!(
        "ok   rollout restart deployment/backend-v1 done in {} ms",
        t.elapsed().as_millis()
    );
    // After the upgrade: the new pod was injected by the upgraded webhook and got its
    // certificate from the upgraded issuer (same CA).
    let fresh: Vec<Value> = hello_pods(k)?
        .into_iter()
        .filter(|p| {
            let n = p["metadata"]["name"].as_str().unwrap_or("");
            n.starts_with("backend-v1-") && !old.iter().any(|o| o == n)
        })
        .collect();
    ensure!(
        fresh.len() == 1,
        "want one new backend-v1 pod, got {}",
        fresh.len()
    );
    ensure!(
        fresh[0]["metadata"]["annotations"]["meshlet.io/status"].is_string(),
        "the backend-v1 pod made after helm upgrade was not injected: {}",
        fresh[0]["metadata"]
    );
    identities(k, prefix, &fresh)?;
    println!("ok   after helm upgrade: the new backend-v1 pod is injected and has its identity");

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
    println!("ok   kubectl top pod --containers:\n{top}");

    helm(
        helm_bin,
        &k.kubeconfig,
        &["uninstall", "meshlet", "-n", "meshlet-system", "--wait"],
    )?;
    let hooks = k.run(&["get", "mutatingwebhookconfigurations", "-o", "name"])?;
    ensure!(
        !hooks.contains("meshlet"),
        "webhook left after uninstall: {hooks}"
    );
    println!("ok   helm uninstall");

    let st = agent.stop()?;
    ensure!(st.success(), "meshlet-node exited {st}");
    let left = netns::list_with_prefix(prefix);
    ensure!(left.is_empty(), "namespaces left: {left:?}");
    println!("ok   agent stopped, no namespace left");
    Ok(())
}

/// The webhook's caBundle and the identity CA, which `helm upgrade` must keep.
fn cas(k: &Kubectl) -> Result<(String, String, String)> {
    let hooks = k.json(&["get", "mutatingwebhookconfigurations"])?;
    let hook = hooks["items"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|h| {
            h["metadata"]["name"]
                .as_str()
                .unwrap_or("")
                .contains("meshlet")
        })
        .context("no meshlet MutatingWebhookConfiguration")?;
    let bundle = hook["webhooks"][0]["clientConfig"]["caBundle"]
        .as_str()
        .context("the webhook has no caBundle")?
        .to_string();
    let id = k.json(&[
        "-n",
        "meshlet-system",
        "get",
        "secret",
        "meshlet-identity-ca",
    ])?;
    let uid = id["metadata"]["uid"].as_str().unwrap_or("").to_string();
    let crt = id["data"]["tls.crt"]
        .as_str()
        .context("meshlet-identity-ca has no tls.crt")?
        .to_string();
    Ok((bundle, crt, uid))
}

/// `helm upgrade` with a changed value rolls the injector pods; the webhook keeps its
/// CA (caBundle unchanged) and the issuer its CA Secret.
fn upgrade(k: &Kubectl, helm_bin: &Path) -> Result<()> {
    let before = cas(k)?;
    let injectors = |k: &Kubectl| -> Result<Vec<String>> {
        Ok(k.json(&["-n", "meshlet-system", "get", "pods"])?["items"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|p| p["metadata"]["name"].as_str().map(String::from))
            .collect())
    };
    let old = injectors(k)?;
    let t = Instant::now();
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
            "injector.logLevel=debug",
            "--wait",
            "--timeout",
            "120s",
        ],
    )?;
    let now = wait_for(
        "only upgraded injector pods left",
        Duration::from_secs(60),
        || {
            let now = injectors(k)?;
            Ok((!now.is_empty() && !now.iter().any(|n| old.contains(n))).then_some(now))
        },
    )?;
    let after = cas(k)?;
    ensure!(
        before.0 == after.0,
        "helm upgrade changed the webhook's caBundle: new pods would be refused"
    );
    ensure!(
        before.1 == after.1 && before.2 == after.2,
        "helm upgrade replaced the identity CA Secret meshlet-identity-ca: issued certificates no longer verify"
    );
    println!(
        "ok   helm upgrade --set injector.logLevel=debug in {} ms: injector pods {old:?} -> {now:?}; webhook caBundle and identity CA Secret unchanged",
        t.elapsed().as_millis()
    );
    Ok(())
}

/// `kubectl exec` into the meshed client (the API server upgrades to SPDY/3.1
/// towards meshlet-node's kubelet endpoint).
fn exec_steps(k: &Kubectl, client: &str) -> Result<()> {
    let t = Instant::now();
    let r = k.ran(
        &[
            "-n",
            "hello",
            "exec",
            client,
            "-c",
            "app",
            "--",
            "sh",
            "-c",
            "echo out; echo err >&2; exit 3",
        ],
        None,
        Duration::from_secs(30),
    )?;
    ensure!(
        r.code == 3 && r.stdout == "out\n" && r.stderr.starts_with("err\n"),
        "kubectl exec sh -c 'echo out; echo err >&2; exit 3': exit {}, stdout {:?}, stderr {:?}",
        r.code,
        r.stdout,
        r.stderr
    );
    println!(
        "ok   kubectl exec: stdout, stderr and exit code 3 in {} ms",
        t.elapsed().as_millis()
    );
    // kubectl speaks WebSocket and the API server translates it to SPDY; client-go's
    // SPDY executor (the Gateway API conformance suite's) is proxied through as is.
    let r = k.ran_env(
        &[
            "-n",
            "hello",
            "exec",
            client,
            "-c",
            "app",
            "--",
            "sh",
            "-c",
            "echo spdy; exit 4",
        ],
        None,
        Duration::from_secs(30),
        &[("KUBECTL_REMOTE_COMMAND_WEBSOCKETS", "false")],
    )?;
    ensure!(
        r.code == 4 && r.stdout == "spdy\n",
        "kubectl exec over SPDY end to end: exit {}, stdout {:?}, stderr {:?}",
        r.code,
        r.stdout,
        r.stderr
    );
    println!(
        "ok   kubectl exec with SPDY all the way (client-go's executor): stdout and exit code 4"
    );
    // A terminal: kubectl -it needs one itself, so it runs under util-linux
    // `script`, whose pty is set to 30x100 first; kubectl sends that size, and the
    // command sees a pty of that size.
    let inner = format!(
        "stty rows 30 cols 100; exec {} --kubeconfig {} -n hello exec -it {client} -c app -- \
         sh -c 'for i in $(seq 50); do s=$(stty size); [ \"$s\" != \"0 0\" ] && break; sleep 0.1; done; \
         echo size $s; tty; exit 5'",
        k.bin.display(),
        k.kubeconfig.display()
    );
    let mut tty = Command::new("script");
    tty.args(["-qec", &inner, "/dev/null"]);
    let out = netns::run_with_timeout(&mut tty, Duration::from_secs(30))?;
    let text = String::from_utf8_lossy(&out.stdout);
    ensure!(
        out.status.code() == Some(5) && text.contains("size 30 100") && text.contains("/dev/pts/"),
        "kubectl exec -it: exit {:?}, output {text:?}",
        out.status.code()
    );
    println!("ok   kubectl exec -it: a pty of the client's size (30x100), exit code 5");
    // Stdin to EOF, and more than one frame of it each way.
    let input: Vec<u8> = (0..200_000u32)
        .flat_map(|i| format!("{i}\n").into_bytes())
        .collect();
    let r = k.ran(
        &["-n", "hello", "exec", "-i", client, "--", "cat"],
        Some(&input),
        Duration::from_secs(30),
    )?;
    ensure!(
        r.code == 0 && r.stdout.as_bytes() == input.as_slice(),
        "kubectl exec -i cat: exit {}, {} of {} bytes echoed, stderr {:?}",
        r.code,
        r.stdout.len(),
        input.len(),
        r.stderr
    );
    let r = k.ran(
        &["-n", "hello", "exec", "-i", client, "--", "cat"],
        Some(b"hi\n"),
        Duration::from_secs(30),
    )?;
    ensure!(
        r.code == 0 && r.stdout == "hi\n",
        "echo hi | kubectl exec -i cat: {:?}",
        r.stdout
    );
    println!(
        "ok   kubectl exec -i: {} bytes of stdin echoed back",
        input.len()
    );

    // From inside the app container, a Service is reached through the sidecar:
    // its outbound request counter goes up by exactly the requests made.
    let count = || -> Result<f64> {
        let r = k.ran(
            &[
                "-n",
                "hello",
                "exec",
                client,
                "-c",
                "app",
                "--",
                "curl",
                "-sS",
                "-m",
                "5",
                "http://127.0.0.1:15020/metrics",
            ],
            None,
            Duration::from_secs(30),
        )?;
        ensure!(r.code == 0, "reading the sidecar's metrics: {}", r.stderr);
        Ok(r.stdout
            .lines()
            .filter(|l| {
                l.starts_with("meshlet_requests_total{") && l.contains("direction=\"outbound\"")
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum())
    };
    let before = count()?;
    let r = k.ran(
        &[
            "-n",
            "hello",
            "exec",
            client,
            "-c",
            "app",
            "--",
            "sh",
            "-c",
            "for i in 1 2 3; do curl -sS -m 5 http://198.19.0.10/; echo; done",
        ],
        None,
        Duration::from_secs(60),
    )?;
    ensure!(
        r.code == 0 && r.stdout.matches("backend-v").count() == 3,
        "curl of the backend Service from kubectl exec: exit {}, stdout {:?}, stderr {:?}",
        r.code,
        r.stdout,
        r.stderr
    );
    let after = count()?;
    ensure!(
        after - before == 3.0,
        "the client's sidecar counted {} of the 3 requests made from kubectl exec",
        after - before
    );
    println!("ok   kubectl exec into the meshed app container: 3 requests to the backend Service, all through its sidecar");
    Ok(())
}

fn main() -> ExitCode {
    match story() {
        Ok(()) => {
            println!("story: passed");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("story: FAILED: {e:#}");
            ExitCode::FAILURE
        }
    }
}
