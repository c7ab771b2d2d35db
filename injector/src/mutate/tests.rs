use super::*;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

fn pod(yaml: &str) -> Pod {
    serde_yaml::from_str(yaml).expect("test pod parses")
}

fn ops(o: Outcome) -> Vec<PatchOperation> {
    match o {
        Outcome::Inject(ops) => ops,
        Outcome::Skip(r) => panic!("expected injection, skipped: {r}"),
    }
}

const BASIC: &str = r#"
metadata: {name: web}
spec:
  containers:
  - name: web
    image: nginx
    ports: [{containerPort: 8080, name: http}]
    readinessProbe: {httpGet: {path: /ready, port: http}, timeoutSeconds: 2}
    livenessProbe: {tcpSocket: {port: 8080}}
"#;

fn apply(p: &Pod, ops: &[PatchOperation]) -> Pod {
    let mut v = serde_json::to_value(p).unwrap();
    json_patch::patch(&mut v, ops).unwrap();
    serde_json::from_value(v).unwrap()
}

#[test]
fn injects_init_first_and_native_proxy_second() {
    let p = pod(BASIC);
    let out = apply(
        &p,
        &ops(mutate(&p, &Context::default(), &Defaults::default()).unwrap()),
    );
    let spec = out.spec.unwrap();
    let inits: Vec<_> = spec
        .init_containers
        .unwrap()
        .iter()
        .map(|c| c.name.clone())
        .collect();
    assert_eq!(inits, ["meshlet-init", "meshlet-proxy"]);
    assert_eq!(spec.containers.len(), 1);
    let web = &spec.containers[0];
    let rp = web
        .readiness_probe
        .as_ref()
        .unwrap()
        .http_get
        .as_ref()
        .unwrap();
    assert_eq!(rp.path.as_deref(), Some("/app-health/web/readyz"));
    assert_eq!(rp.port, IntOrString::Int(15020));
    assert!(web.liveness_probe.as_ref().unwrap().tcp_socket.is_some());
    let anns = out.metadata.annotations.unwrap();
    assert!(anns.contains_key(ann::STATUS));
    let originals: Value = serde_json::from_str(&anns[ann::ORIGINAL_PROBES]).unwrap();
    assert_eq!(
        originals["web"]["readinessProbe"]["httpGet"]["port"],
        "http"
    );
}

#[test]
fn named_probe_port_is_resolved_for_the_proxy() {
    let p = pod(BASIC);
    let out = apply(
        &p,
        &ops(mutate(&p, &Context::default(), &Defaults::default()).unwrap()),
    );
    let proxy = out.spec.unwrap().init_containers.unwrap().remove(1);
    let env = proxy.env.unwrap();
    let probes = env.iter().find(|e| e.name == "MESHLET_APP_PROBES").unwrap();
    let probes: AppProbes = serde_json::from_str(probes.value.as_deref().unwrap()).unwrap();
    let p = &probes["/app-health/web/readyz"];
    assert_eq!(p.http_get.port, 8080);
    assert_eq!(p.http_get.path, "/ready");
    assert_eq!(p.timeout_seconds, 2);
    assert_eq!(probes.len(), 1);
}

#[test]
fn classic_sidecar_is_first_container_and_probe_indices_stay_right() {
    let mut p = pod(BASIC);
    p.metadata.annotations = Some([(ann::NATIVE_SIDECAR.to_string(), "false".to_string())].into());
    let out = apply(
        &p,
        &ops(mutate(&p, &Context::default(), &Defaults::default()).unwrap()),
    );
    let spec = out.spec.unwrap();
    assert_eq!(spec.init_containers.unwrap().len(), 1);
    assert_eq!(spec.containers[0].name, "meshlet-proxy");
    assert!(spec.containers[0].lifecycle.is_some());
    assert_eq!(
        out.metadata.annotations.as_ref().unwrap()[DEFAULT_CONTAINER],
        "web"
    );
    assert!(spec.containers[0].restart_policy.is_none());
    let web = &spec.containers[1];
    assert_eq!(
        web.readiness_probe
            .as_ref()
            .unwrap()
            .http_get
            .as_ref()
            .unwrap()
            .path
            .as_deref(),
        Some("/app-health/web/readyz")
    );
}

#[test]
fn skips() {
    let d = Defaults::default();
    let ctx = Context::default();
    let mut host = pod(BASIC);
    host.spec.as_mut().unwrap().host_network = Some(true);
    assert_eq!(
        mutate(&host, &ctx, &d).unwrap(),
        Outcome::Skip(SkipReason::HostNetwork)
    );
    let mut out = pod(BASIC);
    out.metadata.labels = Some([("meshlet.io/inject".to_string(), "disabled".to_string())].into());
    assert_eq!(
        mutate(&out, &ctx, &d).unwrap(),
        Outcome::Skip(SkipReason::OptedOut)
    );
    let p = pod(BASIC);
    let injected = apply(&p, &ops(mutate(&p, &ctx, &d).unwrap()));
    assert_eq!(
        mutate(&injected, &ctx, &d).unwrap(),
        Outcome::Skip(SkipReason::AlreadyInjected)
    );
}

#[test]
fn denials() {
    let d = Defaults::default();
    let ctx = Context::default();
    let mut p = pod(BASIC);
    p.spec.as_mut().unwrap().containers[0]
        .ports
        .as_mut()
        .unwrap()[0]
        .container_port = 15006;
    assert!(matches!(
        mutate(&p, &ctx, &d),
        Err(Denied::ReservedPort { port: 15006, .. })
    ));

    let mut p = pod(BASIC);
    p.spec.as_mut().unwrap().security_context =
        Some(k8s_openapi::api::core::v1::PodSecurityContext {
            run_as_user: Some(1337),
            ..Default::default()
        });
    let err = mutate(&p, &ctx, &d).unwrap_err();
    assert!(err.to_string().contains("UID 1337"), "{err}");

    let mut p = pod(BASIC);
    p.metadata.annotations = Some(
        [
            (ann::PROXY_CPU.to_string(), "2".to_string()),
            (ann::PROXY_CPU_LIMIT.to_string(), "1".to_string()),
        ]
        .into(),
    );
    assert!(matches!(
        mutate(&p, &ctx, &d),
        Err(Denied::RequestAboveLimit { .. })
    ));
}

#[test]
fn annotated_request_raises_default_limit() {
    let mut p = pod(BASIC);
    p.metadata.annotations = Some([(ann::PROXY_MEMORY.to_string(), "1Gi".to_string())].into());
    let out = apply(
        &p,
        &ops(mutate(&p, &Context::default(), &Defaults::default()).unwrap()),
    );
    let proxy = out.spec.unwrap().init_containers.unwrap().remove(1);
    let res = proxy.resources.unwrap();
    assert_eq!(res.requests.unwrap()["memory"].0, "1Gi");
    assert_eq!(res.limits.unwrap()["memory"].0, "1Gi");
}

#[test]
fn annotation_keys_are_pointer_escaped() {
    let mut p = pod(BASIC);
    p.metadata.annotations = Some([("a".to_string(), "b".to_string())].into());
    let ops = ops(mutate(&p, &Context::default(), &Defaults::default()).unwrap());
    let paths: Vec<String> = ops.iter().map(|o| o.path().to_string()).collect();
    assert!(
        paths.contains(&"/metadata/annotations/meshlet.io~1status".to_string()),
        "{paths:?}"
    );
}

#[test]
fn system_namespaces_are_never_injected() {
    let d = Defaults::default();
    for ns in ["kube-system", "meshlet-system"] {
        let ctx = Context {
            namespace: Some(ns.to_string()),
        };
        assert_eq!(
            mutate(&pod(BASIC), &ctx, &d).unwrap(),
            Outcome::Skip(SkipReason::SystemNamespace)
        );
        let mut p = pod(BASIC);
        p.metadata.namespace = Some(ns.to_string());
        assert_eq!(
            mutate(&p, &Context::default(), &d).unwrap(),
            Outcome::Skip(SkipReason::SystemNamespace)
        );
    }
    let ctx = Context {
        namespace: Some("kube-systemd".to_string()),
    };
    assert!(matches!(
        mutate(&pod(BASIC), &ctx, &d).unwrap(),
        Outcome::Inject(_)
    ));
}

#[test]
fn classic_sidecar_with_app_init_containers_warns() {
    let mut p = pod(BASIC);
    p.spec.as_mut().unwrap().init_containers = Some(vec![Container {
        name: "wait-for-db".into(),
        ..Default::default()
    }]);
    let d = Defaults::default();
    assert!(
        warnings(&p, &d).is_empty(),
        "native sidecars serve init containers"
    );
    p.metadata.annotations = Some([(ann::NATIVE_SIDECAR.to_string(), "false".to_string())].into());
    let w = warnings(&p, &d);
    assert_eq!(w.len(), 1);
    assert!(w[0].contains("wait-for-db"), "{w:?}");
}

#[test]
fn grace_period_becomes_the_drain_deadline() {
    let drain = |grace: Option<i64>| {
        let mut p = pod(BASIC);
        p.spec.as_mut().unwrap().termination_grace_period_seconds = grace;
        let out = apply(
            &p,
            &ops(mutate(&p, &Context::default(), &Defaults::default()).unwrap()),
        );
        let proxy = out.spec.unwrap().init_containers.unwrap().remove(1);
        proxy
            .env
            .unwrap()
            .into_iter()
            .find(|e| e.name == "MESHLET_DRAIN_TIMEOUT")
            .and_then(|e| e.value)
    };
    assert_eq!(drain(None), None);
    assert_eq!(drain(Some(0)).as_deref(), Some("0s"));
    assert_eq!(drain(Some(90)).as_deref(), Some("1m30s"));
}

#[test]
fn identity_env_points_the_proxy_at_the_issuer_and_its_token() {
    let p = pod(BASIC);
    let env_of = |d: &Defaults| {
        let out = apply(&p, &ops(mutate(&p, &Context::default(), d).unwrap()));
        let spec = out.spec.unwrap();
        let proxy = spec
            .init_containers
            .unwrap()
            .into_iter()
            .find(|c| c.name == "meshlet-proxy")
            .unwrap();
        let mount = proxy.volume_mounts.clone().unwrap()[0].mount_path.clone();
        let env: std::collections::BTreeMap<String, String> = proxy
            .env
            .unwrap()
            .into_iter()
            .filter_map(|e| Some((e.name, e.value?)))
            .collect();
        (env, mount)
    };
    // Offline: nothing about the control plane.
    let (env, _) = env_of(&Defaults::default());
    assert!(!env
        .keys()
        .any(|k| k.contains("CONTROL_PLANE") || k.contains("TRUST")));

    let d = Defaults {
        identity: Some(crate::config::IdentityEnv {
            address: "198.19.0.12:15012".into(),
            name: "meshlet-injector.meshlet-system.svc".into(),
            trust_anchors: "-----BEGIN CERTIFICATE-----\nx\n-----END CERTIFICATE-----\n".into(),
        }),
        ..Defaults::default()
    };
    let (env, mount) = env_of(&d);
    assert_eq!(
        env[meshlet_api::env::CONTROL_PLANE_ADDR],
        "198.19.0.12:15012"
    );
    assert_eq!(
        env[meshlet_api::env::CONTROL_PLANE_NAME],
        "meshlet-injector.meshlet-system.svc"
    );
    assert!(env[meshlet_api::env::TRUST_ANCHORS].starts_with("-----BEGIN CERTIFICATE-----"));
    // The token path is inside the projected token volume the proxy mounts.
    assert_eq!(
        env[meshlet_api::env::IDENTITY_TOKEN_PATH],
        format!("{mount}/token")
    );
}
