//! The config controller against a real kube-apiserver (`tools/kube/cluster.sh`): no
//! node agent runs, so EndpointSlices are written directly, as the EndpointSlice
//! controller would for ready pods.
//!
//! One story, in order: the controller starts before the Gateway API CRDs exist and
//! still publishes Services with their endpoints and identities; the CRDs are
//! installed and routes show up without a restart; a route with an unknown backend
//! gets ResolvedRefs=False/BackendNotFound and never reaches the document while the
//! good route does; a GRPCRoute is accepted and compiled, one with an unsupported
//! filter is refused, an HTTPRoute on the GRPCRoute's port is Conflicted; observedGeneration follows the route; another controller's parent
//! status is kept; an unchanged world writes no status; `controller --print` prints
//! the document; deleting the route removes it; deleting the CRD removes every route;
//! of two controllers sharing a Lease, the one that got it keeps it. The
//! AuthorizationPolicy CRD, installed while the controller runs: a policy on a Service
//! is compiled onto its endpoint and Accepted, one on a missing Service is refused
//! (TargetNotFound) and never published, a deleted one leaves the document.
//!
//! Needs root, Go (for the Gateway API module) and the control-plane binaries
//! (`bash tools/kube/build.sh`); when they are missing it FAILS saying so.

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context, Result};
use k8s_openapi::{
    api::coordination::v1::Lease,
    apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
};
use kube::{
    api::{Api, DeleteParams, DynamicObject, Patch, PatchParams},
    config::{KubeConfigOptions, Kubeconfig},
    core::{ApiResource, GroupVersionKind},
    Client, Config,
};
use meshlet_api::{route::RouteKind, MeshConfig, CONTROLLER_NAME};
use meshlet_injector::controller::{
    self,
    lease::{LeaseOptions, LEASE_NAME},
    route_names, Options,
};
use serde_json::{json, Value};
use tokio::sync::watch;

const NS: &str = "ctl-test";

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Fails with what to do when the control plane cannot run here.
fn check_prereqs() -> Result<()> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    let uid = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|l| l.split_whitespace().next())
        .unwrap_or("");
    ensure!(
        uid == "0",
        "the controller test starts a real kube-apiserver with tools/kube/cluster.sh, which \
         runs as root; run the tests as root (CI does)"
    );
    let out = Command::new("bash")
        .arg("-c")
        .arg("cat go.mod go.sum | sha256sum | cut -c1-12")
        .current_dir(root().join("tools/kube"))
        .output()?;
    let hash = String::from_utf8(out.stdout)?.trim().to_string();
    let dir = root().join(format!("target/tools/kube-{hash}"));
    for b in [
        "kube-apiserver",
        "kube-controller-manager",
        "etcd",
        "kubectl",
    ] {
        ensure!(
            dir.join(b).is_file(),
            "{} is missing: build the control plane first with `bash tools/kube/build.sh` \
             (needs Go 1.26, ~6 min cold)",
            dir.join(b).display()
        );
    }
    ensure!(
        Command::new("go").arg("version").output().is_ok(),
        "go is missing: `tools/kube/cluster.sh gateway-api` needs Go 1.26 to fetch the \
         Gateway API CRDs"
    );
    Ok(())
}

/// `cluster.sh up` in a state dir of our own; `down` on drop, also when a step fails.
struct ControlPlane {
    state: PathBuf,
}

impl ControlPlane {
    fn up() -> Result<Self> {
        let me = Self {
            state: root().join(format!(
                "target/kube-controller-test-{}",
                std::process::id()
            )),
        };
        me.script(&["up"])?;
        Ok(me)
    }

    fn script(&self, args: &[&str]) -> Result<()> {
        let out = Command::new("bash")
            .arg(root().join("tools/kube/cluster.sh"))
            .args(args)
            .env("MESHLET_KUBE_DIR", &self.state)
            .stdin(Stdio::null())
            .output()
            .context("running tools/kube/cluster.sh")?;
        ensure!(
            out.status.success(),
            "`tools/kube/cluster.sh {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(())
    }

    fn kubeconfig(&self) -> PathBuf {
        self.state.join("kubeconfig")
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        let _ = self.script(&["down"]);
    }
}

fn resource(kind: &str) -> Result<(ApiResource, bool)> {
    let (g, v, plural, namespaced) = match kind {
        "Namespace" => ("", "v1", "namespaces", false),
        "ServiceAccount" => ("", "v1", "serviceaccounts", true),
        "Service" => ("", "v1", "services", true),
        "Pod" => ("", "v1", "pods", true),
        "EndpointSlice" => ("discovery.k8s.io", "v1", "endpointslices", true),
        "HTTPRoute" => ("gateway.networking.k8s.io", "v1", "httproutes", true),
        "GRPCRoute" => ("gateway.networking.k8s.io", "v1", "grpcroutes", true),
        "AuthorizationPolicy" => (
            "policy.meshlet.io",
            "v1alpha1",
            "authorizationpolicies",
            true,
        ),
        other => bail!("the test does not know kind {other}"),
    };
    Ok((
        ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk(g, v, kind), plural),
        namespaced,
    ))
}

fn api_for(client: &Client, kind: &str) -> Result<Api<DynamicObject>> {
    let (ar, namespaced) = resource(kind)?;
    Ok(if namespaced {
        Api::namespaced_with(client.clone(), NS, &ar)
    } else {
        Api::all_with(client.clone(), &ar)
    })
}

/// Server-side apply of one object (kind from the object).
async fn apply(client: &Client, obj: Value) -> Result<DynamicObject> {
    let kind = obj["kind"].as_str().unwrap_or("").to_string();
    let name = obj["metadata"]["name"].as_str().unwrap_or("").to_string();
    let api = api_for(client, &kind)?;
    let pp = PatchParams::apply("controller-test").force();
    api.patch(&name, &pp, &Patch::Apply(&obj))
        .await
        .with_context(|| format!("apply {kind} {name}"))
}

async fn get_route(client: &Client, name: &str) -> Result<Value> {
    get_route_of(client, "HTTPRoute", name).await
}

async fn get_route_of(client: &Client, kind: &str, name: &str) -> Result<Value> {
    let r = api_for(client, kind)?.get(name).await?;
    Ok(serde_json::to_value(r)?)
}

fn route(name: &str, path: &str, backend: &str) -> Value {
    json!({
        "apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
        "metadata": {"name": name, "namespace": NS},
        "spec": {
            "parentRefs": [{"group": "", "kind": "Service", "name": "web", "port": 80}],
            "rules": [{"matches": [{"path": {"type": "PathPrefix", "value": path}}],
                       "backendRefs": [{"name": backend, "port": 80}]}],
        },
    })
}

/// Our parent status of a route: (Accepted, ResolvedRefs) as (status, reason,
/// observedGeneration), when written.
fn our_conditions(r: &Value) -> Option<[(String, String, i64); 2]> {
    let ours = r["status"]["parents"]
        .as_array()?
        .iter()
        .find(|p| p["controllerName"] == CONTROLLER_NAME)?;
    let get = |t: &str| {
        let c = ours["conditions"]
            .as_array()?
            .iter()
            .find(|c| c["type"] == t)?;
        Some((
            c["status"].as_str()?.to_string(),
            c["reason"].as_str()?.to_string(),
            c["observedGeneration"].as_i64()?,
        ))
    };
    Some([get("Accepted")?, get("ResolvedRefs")?])
}

async fn wait_status(
    client: &Client,
    name: &str,
    want: [(&str, &str); 2],
    generation: i64,
) -> Result<Value> {
    wait_status_of(client, "HTTPRoute", name, want, generation).await
}

async fn wait_status_of(
    client: &Client,
    kind: &str,
    name: &str,
    want: [(&str, &str); 2],
    generation: i64,
) -> Result<Value> {
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut last = Value::Null;
    while Instant::now() < deadline {
        last = get_route_of(client, kind, name).await?;
        if let Some([a, r]) = our_conditions(&last) {
            if (a.0.as_str(), a.1.as_str()) == want[0]
                && (r.0.as_str(), r.1.as_str()) == want[1]
                && a.2 == generation
                && r.2 == generation
            {
                return Ok(last);
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bail!(
        "{kind} {name} never got Accepted={:?} ResolvedRefs={:?} at generation {generation}; status: {}",
        want[0],
        want[1],
        last["status"]
    )
}

async fn wait_doc(
    rx: &mut watch::Receiver<Arc<MeshConfig>>,
    what: &str,
    timeout: Duration,
    f: impl FnMut(&Arc<MeshConfig>) -> bool,
) -> Result<Arc<MeshConfig>> {
    let got = match tokio::time::timeout(timeout, rx.wait_for(f)).await {
        Ok(Ok(doc)) => Some(doc.clone()),
        Ok(Err(_)) => bail!("the controller stopped while waiting for {what}"),
        Err(_) => None,
    };
    got.with_context(|| {
        format!(
            "no document with {what} within {timeout:?}; last: {}",
            serde_json::to_string(&**rx.borrow()).unwrap_or_default()
        )
    })
}

/// A process we started, killed (SIGKILL) and reaped when the test ends or fails.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The chart's AuthorizationPolicy CRD, applied as the chart would install it.
async fn install_policy_crd(client: &Client) -> Result<()> {
    let path = root().join("charts/meshlet/crds/authorizationpolicies.policy.meshlet.io.yaml");
    let crd: CustomResourceDefinition = serde_yaml::from_str(&std::fs::read_to_string(&path)?)
        .with_context(|| format!("parsing {}", path.display()))?;
    let name = crd.metadata.name.clone().unwrap_or_default();
    let api = Api::<CustomResourceDefinition>::all(client.clone());
    api.patch(
        &name,
        &PatchParams::apply("controller-test").force(),
        &Patch::Apply(&crd),
    )
    .await
    .with_context(|| format!("apply CRD {name}"))?;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let established = api.get(&name).await?.status.is_some_and(|s| {
            s.conditions
                .unwrap_or_default()
                .iter()
                .any(|c| c.type_ == "Established" && c.status == "True")
        });
        if established {
            return Ok(());
        }
        ensure!(
            Instant::now() < deadline,
            "CRD {name} not Established within 30 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn authz_policy(name: &str, service: &str) -> Value {
    json!({
        "apiVersion": "policy.meshlet.io/v1alpha1", "kind": "AuthorizationPolicy",
        "metadata": {"name": name, "namespace": NS},
        "spec": {
            "targetRefs": [{"group": "", "kind": "Service", "name": service}],
            "action": "ALLOW",
            "rules": [{"sources": [{"type": "ServiceAccount",
                                    "serviceAccount": {"name": "client"}}],
                       "networkAttributes": {"ports": [8080]}}],
        },
    })
}

/// The Accepted condition of an AuthorizationPolicy as (status, reason,
/// observedGeneration), once it is `want` at `generation`.
async fn wait_policy_status(
    client: &Client,
    name: &str,
    want: (&str, &str),
    generation: i64,
) -> Result<Value> {
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut last = Value::Null;
    while Instant::now() < deadline {
        last = get_route_of(client, "AuthorizationPolicy", name).await?;
        let accepted = last["status"]["conditions"]
            .as_array()
            .and_then(|cs| cs.iter().find(|c| c["type"] == "Accepted"))
            .cloned();
        if let Some(c) = accepted {
            if c["status"] == want.0
                && c["reason"] == want.1
                && c["observedGeneration"] == generation
            {
                return Ok(c);
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bail!(
        "AuthorizationPolicy {name} never got Accepted={want:?} at generation {generation}; status: {}",
        last["status"]
    )
}

fn has_policy(doc: &MeshConfig, name: &str) -> bool {
    doc.authorization.as_ref().is_some_and(|a| {
        a.policies
            .iter()
            .any(|p| p.namespace == NS && p.name == name)
    })
}

fn has_route(doc: &MeshConfig, name: &str) -> bool {
    route_names(doc).contains(&format!("{NS}/{name}"))
}

#[test]
fn controller_against_a_real_api_server() -> Result<()> {
    check_prereqs()?;
    let t = Instant::now();
    let cp = ControlPlane::up()?;
    println!("control plane up in {:.1} s", t.elapsed().as_secs_f64());
    let _ = rustls::crypto::ring::default_provider().install_default();
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(story(&cp))
}

async fn story(cp: &ControlPlane) -> Result<()> {
    let kc = Kubeconfig::read_from(cp.kubeconfig())?;
    let config = Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default()).await?;
    let client = Client::try_from(config)?;

    for obj in [
        json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NS}}),
        json!({"apiVersion": "v1", "kind": "ServiceAccount",
               "metadata": {"name": "web", "namespace": NS}}),
        json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web", "namespace": NS},
               "spec": {"selector": {"app": "web"},
                        "ports": [{"name": "http", "port": 80, "targetPort": 8080}]}}),
        // Meshed: the injector's status annotation. Pending forever (no scheduler).
        json!({"apiVersion": "v1", "kind": "Pod",
               "metadata": {"name": "web-0", "namespace": NS, "labels": {"app": "web"},
                            "annotations": {"meshlet.io/status": "{\"version\":\"test\"}"}},
               "spec": {"serviceAccountName": "web",
                        "containers": [{"name": "app", "image": "registry.invalid/app:1"}]}}),
        json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
               "metadata": {"name": "web-test", "namespace": NS,
                            "labels": {"kubernetes.io/service-name": "web"}},
               "addressType": "IPv4",
               "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
               "endpoints": [{"addresses": ["198.18.5.10"], "conditions": {"ready": true},
                              "targetRef": {"kind": "Pod", "name": "web-0", "namespace": NS}}]}),
    ] {
        apply(&client, obj).await?;
    }

    // (1) No Gateway API CRDs yet: the controller still publishes.
    let t = Instant::now();
    let lease = |identity: &str| LeaseOptions {
        namespace: NS.into(),
        identity: identity.into(),
        duration: Duration::from_secs(15),
    };
    let mut rx = controller::spawn(
        client.clone(),
        Options {
            write_status: true,
            debounce: Duration::from_millis(75),
            lease: Some(lease("ctl-a")),
            default_inbound_policy: Default::default(),
        },
    );
    // A second replica: it compiles too; only one of the two holds the Lease.
    let rx_b = controller::spawn(
        client.clone(),
        Options {
            lease: Some(lease("ctl-b")),
            ..Options::default()
        },
    );
    let seen: Arc<Mutex<Vec<Arc<MeshConfig>>>> = Arc::default();
    let mut follow = rx.clone();
    let log = seen.clone();
    tokio::spawn(async move {
        while follow.changed().await.is_ok() {
            let doc = follow.borrow_and_update().clone();
            log.lock().unwrap_or_else(|p| p.into_inner()).push(doc);
        }
    });
    let doc = wait_doc(
        &mut rx,
        "Service web with its endpoint",
        Duration::from_secs(30),
        |d| {
            d.services.iter().any(|s| {
                s.namespace == NS
                    && s.name == "web"
                    && s.endpoints
                        .iter()
                        .any(|e| e.ip.to_string() == "198.18.5.10")
            })
        },
    )
    .await?;
    println!(
        "ok   first document (generation {}) without Gateway API CRDs in {} ms",
        doc.generation,
        t.elapsed().as_millis()
    );
    let web = doc
        .services
        .iter()
        .find(|s| s.namespace == NS && s.name == "web")
        .context("web")?;
    let e = &web.endpoints[0];
    ensure!(
        e.ready && e.pod_name.as_deref() == Some("web-0"),
        "endpoint: {e:?}"
    );
    ensure!(
        e.identity.as_ref().map(ToString::to_string)
            == Some(format!("spiffe://cluster.local/ns/{NS}/sa/web")),
        "endpoint identity: {e:?}"
    );
    ensure!(e.target_port(80) == Some(8080), "target port: {e:?}");
    ensure!(web.meshed && web.identities.len() == 1, "service: {web:?}");
    ensure!(web
        .cluster_ips
        .iter()
        .all(|ip| ip.to_string().starts_with("198.19.")));
    println!("ok   endpoint 198.18.5.10 -> 8080, identity of ServiceAccount web");
    // Both replicas race to create the Lease; whoever wins must keep it.
    let leases = Api::<Lease>::namespaced(client.clone(), NS);
    let deadline = Instant::now() + Duration::from_secs(10);
    let first_holder = loop {
        let holder = leases
            .get_opt(LEASE_NAME)
            .await?
            .and_then(|l| l.spec)
            .and_then(|s| s.holder_identity);
        match holder {
            Some(h) => break h,
            None if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(100)).await
            }
            None => bail!("no controller created Lease {NS}/{LEASE_NAME} within 10 s"),
        }
    };

    // (2) CRDs installed while the controller runs; routes follow without a restart.
    cp.script(&["gateway-api", "standard"])?;
    let t = Instant::now();
    apply(&client, route("web", "/api", "web")).await?;
    apply(&client, route("broken", "/b", "nope")).await?;
    wait_doc(&mut rx, "HTTPRoute web", Duration::from_secs(60), |d| {
        has_route(d, "web")
    })
    .await?;
    println!(
        "ok   CRDs installed later: route web in the document after {} ms",
        t.elapsed().as_millis()
    );
    wait_status(
        &client,
        "web",
        [("True", "Accepted"), ("True", "ResolvedRefs")],
        1,
    )
    .await?;
    println!("ok   web: Accepted=True, ResolvedRefs=True, observedGeneration 1");
    let broken = wait_status(
        &client,
        "broken",
        [("True", "Accepted"), ("False", "BackendNotFound")],
        1,
    )
    .await?;
    let ours = broken["status"]["parents"][0].clone();
    ensure!(ours["controllerName"] == CONTROLLER_NAME, "{ours}");
    ensure!(ours["parentRef"]["name"] == "web", "{ours}");
    println!("ok   broken: ResolvedRefs=False/BackendNotFound");

    // (2a) The AuthorizationPolicy CRD installed while the controller runs: a policy
    // on Service web reaches the document, resolved to web's endpoint, and is
    // Accepted; one on a missing Service is refused with the field at fault and never
    // published; deleting a policy removes it.
    install_policy_crd(&client).await?;
    let t = Instant::now();
    apply(&client, authz_policy("web-from-client", "web")).await?;
    apply(&client, authz_policy("ghost", "nope")).await?;
    let doc = wait_doc(
        &mut rx,
        "AuthorizationPolicy web-from-client",
        Duration::from_secs(60),
        |d| has_policy(d, "web-from-client"),
    )
    .await?;
    let authz = doc.authorization.as_ref().context("authorization")?;
    let id = format!("{NS}/web-from-client");
    let targeted: Vec<String> = authz
        .workloads
        .iter()
        .filter(|w| w.policies.contains(&id))
        .flat_map(|w| w.ips.iter().map(ToString::to_string))
        .collect();
    ensure!(
        targeted == ["198.18.5.10"],
        "policy web-from-client targets {targeted:?}, want web's endpoint 198.18.5.10"
    );
    ensure!(!has_policy(&doc, "ghost"), "policy ghost in the document");
    println!(
        "ok   policy CRD installed later: web-from-client in the document after {} ms, on 198.18.5.10",
        t.elapsed().as_millis()
    );
    wait_policy_status(&client, "web-from-client", ("True", "Accepted"), 1).await?;
    let ghost = wait_policy_status(&client, "ghost", ("False", "TargetNotFound"), 1).await?;
    let message = ghost["message"].as_str().unwrap_or_default();
    ensure!(
        message.contains("spec.targetRefs[0]") && message.contains("nope"),
        "ghost's message must name the field and the Service: {message}"
    );
    println!(
        "ok   web-from-client: Accepted=True; ghost: Accepted=False/TargetNotFound ({message})"
    );
    api_for(&client, "AuthorizationPolicy")?
        .delete("web-from-client", &DeleteParams::default())
        .await?;
    wait_doc(
        &mut rx,
        "no policy web-from-client",
        Duration::from_secs(10),
        |d| !has_policy(d, "web-from-client"),
    )
    .await?;
    println!("ok   deleted policy web-from-client left the document");

    // (2b) GRPCRoutes on Service rpc: one accepted and in the document, one with an
    // unsupported filter refused; an HTTPRoute on the same port is Conflicted.
    apply(
        &client,
        json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "rpc", "namespace": NS},
               "spec": {"selector": {"app": "web"},
                        "ports": [{"name": "grpc", "port": 50051, "targetPort": 8080}]}}),
    )
    .await?;
    let grpc = |name: &str, filters: Value| {
        json!({
            "apiVersion": "gateway.networking.k8s.io/v1", "kind": "GRPCRoute",
            "metadata": {"name": name, "namespace": NS},
            "spec": {
                "parentRefs": [{"group": "", "kind": "Service", "name": "rpc", "port": 50051}],
                "rules": [{"matches": [{"method": {"service": "pkg.Svc", "method": "Get"}}],
                           "filters": filters,
                           "backendRefs": [{"name": "rpc", "port": 50051}]}],
            },
        })
    };
    apply(&client, grpc("rpc", json!([]))).await?;
    apply(
        &client,
        grpc(
            "rpc-mirror",
            json!([{"type": "RequestMirror",
                    "requestMirror": {"backendRef": {"name": "web", "port": 80}}}]),
        ),
    )
    .await?;
    let mut http_on_rpc = route("rpc-http", "/", "rpc");
    http_on_rpc["spec"]["parentRefs"][0]["name"] = "rpc".into();
    http_on_rpc["spec"]["parentRefs"][0]["port"] = 50051.into();
    http_on_rpc["spec"]["rules"][0]["backendRefs"][0]["port"] = 50051.into();
    apply(&client, http_on_rpc).await?;
    let doc = wait_doc(&mut rx, "GRPCRoute rpc", Duration::from_secs(30), |d| {
        has_route(d, "rpc")
    })
    .await?;
    let rpc = doc
        .services
        .iter()
        .find(|s| s.namespace == NS && s.name == "rpc")
        .context("Service rpc")?;
    let kinds: Vec<(&str, RouteKind, String)> = rpc
        .routes
        .iter()
        .map(|r| {
            let path = r.rules[0].matches[0].path.as_ref().map(|p| p.value.clone());
            (r.name.as_str(), r.kind, path.unwrap_or_default())
        })
        .collect();
    ensure!(
        kinds == [("rpc", RouteKind::Grpc, "/pkg.Svc/Get".to_string())],
        "routes of Service rpc: {kinds:?} (rpc-mirror refused, rpc-http conflicted)"
    );
    wait_status_of(
        &client,
        "GRPCRoute",
        "rpc",
        [("True", "Accepted"), ("True", "ResolvedRefs")],
        1,
    )
    .await?;
    let mirror = wait_status_of(
        &client,
        "GRPCRoute",
        "rpc-mirror",
        [("False", "UnsupportedValue"), ("True", "ResolvedRefs")],
        1,
    )
    .await?;
    ensure!(
        mirror["status"]["parents"][0]["conditions"]
            .to_string()
            .contains("RequestMirror"),
        "{}",
        mirror["status"]
    );
    wait_status(
        &client,
        "rpc-http",
        [("False", "Conflicted"), ("True", "ResolvedRefs")],
        1,
    )
    .await?;
    println!(
        "ok   GRPCRoute rpc: Accepted, /pkg.Svc/Get in the document; rpc-mirror: \
         UnsupportedValue; HTTPRoute rpc-http on its port: Conflicted"
    );
    for (kind, name) in [
        ("GRPCRoute", "rpc"),
        ("GRPCRoute", "rpc-mirror"),
        ("HTTPRoute", "rpc-http"),
    ] {
        api_for(&client, kind)?
            .delete(name, &DeleteParams::default())
            .await?;
    }
    wait_doc(&mut rx, "no GRPCRoute rpc", Duration::from_secs(10), |d| {
        !has_route(d, "rpc")
    })
    .await?;

    // (3) observedGeneration follows the route.
    apply(&client, route("web", "/v2", "web")).await?;
    wait_status(
        &client,
        "web",
        [("True", "Accepted"), ("True", "ResolvedRefs")],
        2,
    )
    .await?;
    wait_doc(&mut rx, "route web on /v2", Duration::from_secs(10), |d| {
        serde_json::to_string(&**d)
            .unwrap_or_default()
            .contains("\"/v2\"")
    })
    .await?;
    println!("ok   spec change: observedGeneration 2, document has /v2");

    // (4) A Gateway controller's parent status survives our writes.
    let current = get_route(&client, "web").await?;
    let foreign = json!({
        "parentRef": {"group": "gateway.networking.k8s.io", "kind": "Gateway", "name": "gw"},
        "controllerName": "example.com/gateway-controller",
        "conditions": [{"type": "Accepted", "status": "True", "reason": "Accepted",
                        "message": "someone else's", "observedGeneration": 2,
                        "lastTransitionTime": "2026-01-01T00:00:00Z"}],
    });
    let mut parents = vec![foreign.clone()];
    parents.extend(
        current["status"]["parents"]
            .as_array()
            .cloned()
            .unwrap_or_default(),
    );
    api_for(&client, "HTTPRoute")?
        .patch_status(
            "web",
            &PatchParams::default(),
            &Patch::Merge(&json!({"status": {"parents": parents}})),
        )
        .await?;
    apply(&client, route("web", "/v3", "web")).await?;
    let r = wait_status(
        &client,
        "web",
        [("True", "Accepted"), ("True", "ResolvedRefs")],
        3,
    )
    .await?;
    ensure!(
        r["status"]["parents"][0] == foreign,
        "the other controller's parent status changed: {}",
        r["status"]
    );
    println!("ok   another controller's parent status kept across our write");

    // (5) An unchanged world writes no status, even when the document changes.
    let rv = |v: &Value| {
        v["metadata"]["resourceVersion"]
            .as_str()
            .unwrap_or("")
            .to_string()
    };
    let before = [
        rv(&get_route(&client, "web").await?),
        rv(&get_route(&client, "broken").await?),
        rv(&get_route_of(&client, "AuthorizationPolicy", "ghost").await?),
    ];
    apply(
        &client,
        json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "other", "namespace": NS},
               "spec": {"ports": [{"port": 9000}]}}),
    )
    .await?;
    wait_doc(&mut rx, "Service other", Duration::from_secs(10), |d| {
        d.services.iter().any(|s| s.name == "other")
    })
    .await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = [
        rv(&get_route(&client, "web").await?),
        rv(&get_route(&client, "broken").await?),
        rv(&get_route_of(&client, "AuthorizationPolicy", "ghost").await?),
    ];
    ensure!(
        before == after,
        "routes or policies were written though nothing about them changed: {before:?} -> {after:?}"
    );
    println!("ok   no status write for an unchanged route or policy (resourceVersions {after:?})");

    // (6) `meshlet-injector controller --print` prints the same routes.
    let kubeconfig = cp.kubeconfig();
    let out = tokio::task::spawn_blocking(move || {
        Command::new(env!("CARGO_BIN_EXE_meshlet-injector"))
            .args(["controller", "--print", "--timeout", "30s"])
            .env("KUBECONFIG", kubeconfig)
            .stdin(Stdio::null())
            .output()
    })
    .await??;
    ensure!(
        out.status.success(),
        "controller --print failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let printed = MeshConfig::from_json(&out.stdout)?;
    ensure!(
        has_route(&printed, "web") && !has_route(&printed, "broken"),
        "printed routes: {:?}",
        route_names(&printed)
    );
    ensure!(
        printed.generation == 1,
        "a fresh controller prints generation 1"
    );
    println!("ok   controller --print: {:?}", route_names(&printed));

    // (6b) `serve --controller` runs the controller next to the webhook.
    let work = tempfile::tempdir()?;
    let ck = rcgen::generate_simple_self_signed(vec!["localhost".to_string()])?;
    std::fs::write(work.path().join("tls.crt"), ck.cert.pem())?;
    std::fs::write(work.path().join("tls.key"), ck.signing_key.serialize_pem())?;
    let log = work.path().join("serve.log");
    let child = Command::new(env!("CARGO_BIN_EXE_meshlet-injector"))
        .args(["serve", "--controller", "--addr", "127.0.0.1:0"])
        .arg("--tls-cert")
        .arg(work.path().join("tls.crt"))
        .arg("--tls-key")
        .arg(work.path().join("tls.key"))
        .env("KUBECONFIG", cp.kubeconfig())
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log)?)
        .spawn()?;
    let _serve = KillOnDrop(child);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if text.contains("mesh config changed") && text.contains("webhook listening") {
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "serve --controller published no mesh config within 30 s; its log:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    drop(_serve);
    println!("ok   serve --controller: webhook listening and mesh config published");

    // (7) Deleting the route removes it.
    api_for(&client, "HTTPRoute")?
        .delete("web", &DeleteParams::default())
        .await?;
    wait_doc(&mut rx, "no route web", Duration::from_secs(10), |d| {
        !has_route(d, "web")
    })
    .await?;
    println!("ok   deleted route web left the document");

    // (8) The CRD goes away while the controller runs: its routes leave the document.
    apply(&client, route("keep", "/keep", "web")).await?;
    wait_doc(&mut rx, "route keep", Duration::from_secs(10), |d| {
        has_route(d, "keep")
    })
    .await?;
    Api::<CustomResourceDefinition>::all(client.clone())
        .delete(
            "httproutes.gateway.networking.k8s.io",
            &DeleteParams::default(),
        )
        .await?;
    let t = Instant::now();
    let doc = wait_doc(&mut rx, "no routes", Duration::from_secs(60), |d| {
        route_names(d).is_empty()
    })
    .await?;
    ensure!(
        doc.services.iter().any(|s| s.name == "web"),
        "Services stay when the CRD goes"
    );
    println!(
        "ok   HTTPRoute CRD deleted: routes gone from the document after {} ms, Services stay",
        t.elapsed().as_millis()
    );

    let spec = leases.get(LEASE_NAME).await?.spec.unwrap_or_default();
    ensure!(
        spec.holder_identity.as_deref() == Some(first_holder.as_str())
            && spec.lease_transitions == Some(0),
        "the Lease moved from {first_holder}, which kept renewing it: {spec:?}"
    );
    ensure!(
        rx_b.borrow().generation > 0,
        "the replica without the Lease still publishes"
    );
    println!("ok   Lease held by {first_holder} throughout, never taken over");

    let seen = seen.lock().unwrap_or_else(|p| p.into_inner());
    ensure!(
        seen.iter().all(|d| !has_route(d, "broken")),
        "route broken reached a published document"
    );
    ensure!(
        seen.iter().all(|d| !has_policy(d, "ghost")),
        "policy ghost reached a published document"
    );
    ensure!(
        seen.windows(2)
            .all(|w| w[1].generation > w[0].generation && w[1] != w[0]),
        "every published document is new and one generation up"
    );
    println!(
        "ok   {} documents published, none with route broken",
        seen.len()
    );
    Ok(())
}
