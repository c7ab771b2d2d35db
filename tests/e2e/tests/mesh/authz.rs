//! Authorization by mesh identity (`AuthorizationPolicy`, GEP-3779 shape) on the
//! mini-mesh of `testdata/authz.yaml`: policies are compiled by `meshlet-injector
//! compile --from-files` from the manifests, the running pods (with their IPs) and the
//! policy YAML, and the `authorization` section goes into the mesh config the sidecars
//! poll, as the offline path and the controller do.

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    path::PathBuf,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context, Result};
use meshlet_api::{authz::Authorization, env as menv, MeshConfig};
use meshlet_e2e::cluster::{http_in, Cluster, ClusterBuilder};

use super::{delta, json, metrics, start, T};

const BACKEND_HTTP: &str = "198.19.0.10:80";
const BACKEND_TCP: &str = "198.19.0.10:3306";
const FRONTEND_ID: &str = "spiffe://cluster.local/ns/shop/sa/frontend";
const DECISIONS: &str = "meshlet_authz_decisions_total";

fn manifest() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("testdata/authz.yaml")
}

fn shop() -> Result<Cluster> {
    start(ClusterBuilder::new(manifest()))
}

/// An AuthorizationPolicy on the backend Service allowing `sources` (YAML flow list)
/// on `ports` (empty: every port).
fn policy(name: &str, sources: &str, ports: &[u16]) -> String {
    let attrs = if ports.is_empty() {
        String::new()
    } else {
        format!(", networkAttributes: {{ports: {ports:?}}}")
    };
    format!(
        "---\napiVersion: policy.meshlet.io/v1alpha1\nkind: AuthorizationPolicy\n\
         metadata: {{name: {name}, namespace: shop}}\n\
         spec:\n  targetRefs: [{{group: \"\", kind: Service, name: backend}}]\n  action: ALLOW\n  \
         rules: [{{sources: {sources}{attrs}}}]\n"
    )
}

fn sa(name: &str) -> String {
    format!("{{type: ServiceAccount, serviceAccount: {{name: {name}}}}}")
}

/// Compiles `extra` (policies, namespace objects) with the cluster's manifests and its
/// running pods through `meshlet-injector compile --from-files`; any problem fails.
fn compile(c: &Cluster, extra: &str) -> Result<Option<Authorization>> {
    let dir = tempfile::tempdir()?;
    std::fs::copy(manifest(), dir.path().join("00-manifest.yaml"))?;
    let mut pods = String::new();
    for p in c.pods() {
        let pod = serde_json::json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": p.name, "namespace": p.namespace,
                         "labels": p.pod.metadata.labels.clone().unwrap_or_default()},
            "status": {"podIP": p.ip.to_string()},
        });
        pods += &format!("---\n{}\n", serde_json::to_string(&pod)?);
    }
    std::fs::write(dir.path().join("10-pods.yaml"), pods)?;
    std::fs::write(dir.path().join("20-authz.yaml"), extra)?;
    let bin = &c.binaries().injector;
    ensure!(
        bin.is_file(),
        "{} is missing: run `cargo build -p meshlet-injector` first",
        bin.display()
    );
    let out = std::process::Command::new(bin)
        .args(["compile", "--from-files"])
        .arg(dir.path())
        .output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(
        out.status.success() && !stderr.contains("left out"),
        "compile failed or left something out: {stderr}"
    );
    let cfg = MeshConfig::from_json(&out.stdout).context("compile printed no mesh config")?;
    Ok(cfg.authorization)
}

/// Puts `a` into the mesh config (an atomic rename, as a controller writes it) and
/// returns the instant just before the write: no proxy can apply it earlier, so flip
/// times measured from there are upper bounds.
fn install(c: &mut Cluster, a: Option<Authorization>) -> Result<Instant> {
    let t = Instant::now();
    c.update_mesh_config(|cfg| cfg.authorization = a)?;
    Ok(t)
}

/// Waits until the backend's proxy serves the current mesh config generation.
fn await_backend(c: &Cluster) -> Result<()> {
    let want = c.mesh_config().generation;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (_, body) = c.admin("backend", "/config")?;
        let gen = json(&body)?["mesh"]["generation"].as_u64();
        if gen >= Some(want) {
            return Ok(());
        }
        ensure!(
            Instant::now() < deadline,
            "backend proxy still serves generation {gen:?}, want {want}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn apply(c: &mut Cluster, extra: &str) -> Result<()> {
    let a = compile(c, extra)?;
    install(c, a)?;
    await_backend(c)
}

/// GET from pod `pod` (through its sidecar when meshed) to the backend Service.
fn get(c: &Cluster, pod: &str, path: &str) -> Result<(u16, String)> {
    let addr: SocketAddr = BACKEND_HTTP.parse()?;
    Ok(http_in(&c.pod(pod)?.netns, addr, "GET", path)?)
}

/// Connects from `pod` to the backend's server-first TCP port: `Some(greeting)` when
/// the banner came, `None` when the connection was closed without a byte.
fn banner(c: &Cluster, pod: &str) -> Result<Option<String>> {
    let addr: SocketAddr = BACKEND_TCP.parse()?;
    let ns = c.pod(pod)?.netns.clone();
    let r = ns.enter(move || -> std::io::Result<Option<String>> {
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        let mut buf = [0u8; 256];
        match s.read(&mut buf) {
            Ok(0) => Ok(None),
            Ok(n) => {
                let _ = s.write_all(b"QUIT\r\n");
                Ok(Some(String::from_utf8_lossy(&buf[..n]).trim().to_string()))
            }
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => Ok(None),
            Err(e) => Err(e),
        }
    })?;
    Ok(r?)
}

fn expect(c: &Cluster, pod: &str, want: u16) -> Result<String> {
    let (status, body) = get(c, pod, &format!("/from-{pod}"))?;
    ensure!(status == want, "{pod} got {status}, want {want}: {body}");
    Ok(body)
}

/// With a policy allowing only `sa/frontend`: frontend gets 200 (the app sees its
/// identity), another meshed client 403 naming the decision, a gRPC request from it
/// PERMISSION_DENIED; the backend counts both decisions with bounded labels.
pub fn authz_policy_allows_only_frontend() -> Result<()> {
    let mut c = shop()?;
    expect(&c, "other", 200).context("before any policy every caller gets in")?;
    apply(
        &mut c,
        &policy("only-frontend", &format!("[{}]", sa("frontend")), &[]),
    )?;
    let before = metrics(&c, "backend")?;
    let body = expect(&c, "frontend", 200)?;
    ensure!(
        json(&body)?["headers"]["meshlet-client-id"] == FRONTEND_ID,
        "answer: {body}"
    );
    let body = expect(&c, "other", 403)?;
    ensure!(
        body.contains("authorization denied: no AuthorizationPolicy targeting this workload"),
        "403 body: {body}"
    );
    ensure!(
        !body.contains("frontend"),
        "the 403 leaks the policy: {body}"
    );
    let out = c.exec_ok(
        "other",
        &[
            "curl",
            "-sS",
            "-i",
            "--max-time",
            "10",
            "-H",
            "content-type: application/grpc",
            "-d",
            "",
            &format!("http://{BACKEND_HTTP}/pkg.Svc/Method"),
        ],
        T,
    )?;
    let head = out.to_ascii_lowercase();
    ensure!(
        head.starts_with("http/1.1 200") && head.contains("grpc-status: 7"),
        "gRPC answer: {out}"
    );
    let after = metrics(&c, "backend")?;
    let allowed = delta(
        &before,
        &after,
        DECISIONS,
        &[
            ("policy", "shop/only-frontend"),
            ("result", "allow"),
            ("client", FRONTEND_ID),
        ],
    );
    let denied = delta(
        &before,
        &after,
        DECISIONS,
        &[("policy", "none"), ("result", "deny"), ("client", "other")],
    );
    ensure!(
        allowed == 1.0 && denied == 2.0,
        "decisions: {allowed} allowed for frontend, {denied} denied for other; want 1 and 2"
    );
    Ok(())
}

/// A TCP client of a denied identity is closed after the handshake without a byte of
/// the server-first banner; the allowed identity gets the banner; the denial is one
/// debug line in the server proxy's log.
pub fn authz_tcp_denied_identity_closed() -> Result<()> {
    let mut c = start(
        ClusterBuilder::new(manifest())
            .proxy_env(menv::PROXY_LOG, "info,meshlet_proxy::authz=debug"),
    )?;
    ensure!(
        banner(&c, "other")?.is_some(),
        "no banner before any policy"
    );
    apply(
        &mut c,
        &policy("only-frontend", &format!("[{}]", sa("frontend")), &[]),
    )?;
    let before = metrics(&c, "backend")?;
    let g = banner(&c, "frontend")?;
    ensure!(
        g.as_deref() == Some("220 backend ready"),
        "frontend got {g:?}"
    );
    let g = banner(&c, "other")?;
    ensure!(g.is_none(), "a denied identity got the banner {g:?}");
    let after = metrics(&c, "backend")?;
    let denied = delta(&before, &after, DECISIONS, &[("result", "deny")]);
    ensure!(denied == 1.0, "{denied} TCP denials counted, want 1");
    let log = c.log(&c.pod("backend")?.name, meshlet_api::PROXY_CONTAINER_NAME);
    let lines: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("authorization denied"))
        .collect();
    ensure!(
        lines.len() == 1 && lines[0].contains("spiffe://cluster.local/ns/shop/sa/other"),
        "want one debug line naming the caller, got {lines:?} in:\n{log}"
    );
    Ok(())
}

/// In permissive mode a plaintext (unmeshed) client gets in until a policy targets the
/// workload; then it has no identity to match and is denied.
pub fn authz_plaintext_denied_once_targeted() -> Result<()> {
    let mut c = shop()?;
    let body = expect(&c, "legacy", 200)?;
    ensure!(
        json(&body)?["headers"].get("meshlet-client-id").is_none(),
        "legacy is not plaintext: {body}"
    );
    // Even a rule naming every service account of the namespace needs an identity.
    apply(
        &mut c,
        &policy(
            "shop-only",
            "[{type: ServiceAccount, serviceAccount: {name: \"*\"}}]",
            &[],
        ),
    )?;
    let before = metrics(&c, "backend")?;
    expect(&c, "legacy", 403)?;
    expect(&c, "other", 200)?;
    let after = metrics(&c, "backend")?;
    let none = delta(
        &before,
        &after,
        DECISIONS,
        &[("result", "deny"), ("client", "none")],
    );
    ensure!(none == 1.0, "{none} plaintext denials counted, want 1");
    Ok(())
}

/// A rule with ports allows only those destination ports on the pod.
pub fn authz_ports_not_named_are_denied() -> Result<()> {
    let mut c = shop()?;
    apply(
        &mut c,
        &policy("banner-only", &format!("[{}]", sa("frontend")), &[3306]),
    )?;
    expect(&c, "frontend", 403).context("HTTP (pod port 8080) is not named")?;
    ensure!(banner(&c, "frontend")?.is_some(), "3306 is named");
    apply(
        &mut c,
        &policy("http-only", &format!("[{}]", sa("frontend")), &[8080]),
    )?;
    expect(&c, "frontend", 200)?;
    ensure!(banner(&c, "frontend")?.is_none(), "3306 is no longer named");
    Ok(())
}

const DENY_NS: &str = "---\napiVersion: v1\nkind: Namespace\nmetadata:\n  name: shop\n  \
     annotations: {meshlet.io/default-inbound-policy: deny}\n";

/// A namespace whose default is `deny` refuses every caller no policy allows, while
/// the kubelet's probes (rewritten to the proxy's 15020) still pass; a policy then lets
/// its caller in.
pub fn authz_namespace_default_deny_keeps_probes() -> Result<()> {
    let mut c = shop()?;
    apply(&mut c, DENY_NS)?;
    for pod in ["frontend", "other", "legacy"] {
        expect(&c, pod, 403)?;
    }
    ensure!(banner(&c, "frontend")?.is_none(), "TCP under deny");
    let probes = |c: &Cluster| -> Result<()> {
        for liveness in [false, true] {
            let (st, body) = c.probe("backend", "app", liveness)?;
            ensure!(
                st == 200,
                "kubelet probe (liveness {liveness}) got {st}: {body}"
            );
        }
        Ok(())
    };
    probes(&c)?;
    let (_, body) = c.admin("backend", "/metrics")?;
    ensure!(
        body.contains("policy=\"default:deny\""),
        "no default:deny decision in the metrics"
    );
    apply(
        &mut c,
        &format!(
            "{DENY_NS}{}",
            policy("only-frontend", &format!("[{}]", sa("frontend")), &[])
        ),
    )?;
    expect(&c, "frontend", 200)?;
    expect(&c, "other", 403)?;
    probes(&c)
}

/// Request outcomes of one loop: (when, status or 0 for an error).
type Samples = Vec<(Instant, u16)>;

fn traffic(c: &Cluster, pod: &str, stop: Arc<AtomicBool>) -> Result<impl FnOnce() -> Samples> {
    let ns = c.pod(pod)?.netns.clone();
    let addr: SocketAddr = BACKEND_HTTP.parse()?;
    Ok(move || {
        let mut out = Vec::new();
        let t = Instant::now();
        // Bounded: 5000 requests or 30 s.
        for i in 0..5000 {
            if stop.load(Ordering::SeqCst) || t.elapsed() > Duration::from_secs(30) {
                break;
            }
            let st = http_in(&ns, addr, "GET", &format!("/loop/{i}")).map_or(0, |(s, _)| s);
            out.push((Instant::now(), st));
            std::thread::sleep(Duration::from_millis(10));
        }
        out
    })
}

/// The first sample after `t0` with status `want`, as time after `t0`; every later
/// sample must have it too.
fn flip(samples: &Samples, t0: Instant, want: u16) -> Result<Duration> {
    let after: Vec<&(Instant, u16)> = samples.iter().filter(|(t, _)| *t > t0).collect();
    let Some(i) = after.iter().position(|(_, s)| *s == want) else {
        bail!("no {want} after the change among {} requests", after.len());
    };
    if let Some((_, s)) = after[i..].iter().find(|(_, s)| *s != want) {
        bail!("after the first {want} a request got {s}");
    }
    Ok(after[i].0 - t0)
}

/// Changing a policy while requests run flips the answer for a second caller within
/// 1 s, both ways, and the allowed caller loses no request.
pub fn authz_policy_change_mid_traffic() -> Result<()> {
    let mut c = shop()?;
    let only = policy("p", &format!("[{}]", sa("frontend")), &[]);
    let both = policy("p", &format!("[{}, {}]", sa("frontend"), sa("other")), &[]);
    apply(&mut c, &only)?;
    let (a_only, a_both) = (compile(&c, &only)?, compile(&c, &both)?);
    let stop = Arc::new(AtomicBool::new(false));
    let allowed_loop = traffic(&c, "frontend", stop.clone())?;
    let flipped_loop = traffic(&c, "other", stop.clone())?;
    let (allowed, flipped, t_open, t_close) = std::thread::scope(|s| -> Result<_> {
        let a = s.spawn(allowed_loop);
        let f = s.spawn(flipped_loop);
        let run = (|| -> Result<(Instant, Instant)> {
            std::thread::sleep(Duration::from_millis(800));
            let t_open = install(&mut c, a_both)?;
            std::thread::sleep(Duration::from_millis(1500));
            let t_close = install(&mut c, a_only)?;
            std::thread::sleep(Duration::from_millis(1500));
            Ok((t_open, t_close))
        })();
        stop.store(true, Ordering::SeqCst);
        let allowed = a.join().map_err(|_| anyhow::anyhow!("loop panicked"))?;
        let flipped = f.join().map_err(|_| anyhow::anyhow!("loop panicked"))?;
        let (o, cl) = run?;
        Ok((allowed, flipped, o, cl))
    })?;
    let failed: Vec<u16> = allowed
        .iter()
        .map(|(_, s)| *s)
        .filter(|s| *s != 200)
        .collect();
    ensure!(
        failed.is_empty() && allowed.len() >= 50,
        "frontend: {} of {} requests failed ({:?})",
        failed.len(),
        allowed.len(),
        &failed[..failed.len().min(5)]
    );
    ensure!(
        flipped
            .iter()
            .take_while(|(t, _)| *t < t_open)
            .all(|(_, s)| *s == 403),
        "other got in before the change"
    );
    let before_close: Samples = flipped
        .iter()
        .copied()
        .filter(|(t, _)| *t < t_close)
        .collect();
    let open = flip(&before_close, t_open, 200).context("opening the policy to other")?;
    let close = flip(&flipped, t_close, 403).context("closing it again")?;
    println!(
        "    {} allowed requests, none lost; other flipped to 200 after {} ms, back to 403 after {} ms",
        allowed.len(),
        open.as_millis(),
        close.as_millis()
    );
    ensure!(
        open <= Duration::from_secs(1) && close <= Duration::from_secs(1),
        "flips took {open:?} and {close:?}, want at most 1 s"
    );
    Ok(())
}
