use super::*;

fn parse(vars: &[(&str, &str)]) -> Result<Config, ConfigError> {
    Config::parse(vars)
}

#[test]
fn defaults() {
    let c = parse(&[]).unwrap();
    assert_eq!(c.outbound_addr, "0.0.0.0:15001".parse().unwrap());
    assert_eq!(c.inbound_addr, "0.0.0.0:15006".parse().unwrap());
    assert_eq!(c.admin_addr, "0.0.0.0:15020".parse().unwrap());
    assert_eq!(c.config_path, None);
    assert_eq!(c.opaque_ports, None);
    assert_eq!(c.drain_timeout, Duration::from_secs(30));
    assert_eq!(c.log, "info");
    assert_eq!(c.worker_threads, None);
}

#[test]
fn reads_every_variable() {
    let c = parse(&[
        ("MESHLET_OUTBOUND_ADDR", "127.0.0.1:1"),
        ("MESHLET_INBOUND_ADDR", "[::1]:2"),
        ("MESHLET_ADMIN_ADDR", "127.0.0.1:3"),
        ("MESHLET_CONFIG_PATH", "/etc/meshlet/mesh.json"),
        ("MESHLET_OPAQUE_PORTS", " 6379, 25,25 "),
        ("MESHLET_DRAIN_TIMEOUT", "1m30s"),
        ("MESHLET_LOG", "meshlet_proxy=debug,warn"),
        ("MESHLET_WORKER_THREADS", "3"),
        ("MESHLET_POD_IP", "198.18.0.5"),
        ("MESHLET_POD_NAME", "web-0"),
        ("MESHLET_POD_NAMESPACE", "shop"),
        ("MESHLET_SERVICE_ACCOUNT", "web"),
        (
            "MESHLET_APP_PROBES",
            r#"{"/app-health/web/livez":{"httpGet":{"path":"/healthz","port":8080,"scheme":"HTTP"},"timeoutSeconds":1}}"#,
        ),
    ])
    .unwrap();
    assert_eq!(c.inbound_addr, "[::1]:2".parse().unwrap());
    assert_eq!(c.config_path, Some("/etc/meshlet/mesh.json".into()));
    assert_eq!(c.opaque_ports, Some(vec![25, 6379]));
    assert_eq!(c.drain_timeout, Duration::from_secs(90));
    assert_eq!(c.worker_threads, Some(3));
    assert_eq!(c.pod_ip, Some("198.18.0.5".parse().unwrap()));
    assert_eq!(c.pod_namespace.as_deref(), Some("shop"));
    assert_eq!(c.service_account.as_deref(), Some("web"));
    assert_eq!(c.app_probes["/app-health/web/livez"].http_get.port, 8080);
}

#[test]
fn blank_is_unset() {
    let c = parse(&[("MESHLET_POD_IP", ""), ("MESHLET_CONFIG_PATH", " ")]).unwrap();
    assert_eq!(c.pod_ip, None);
    assert_eq!(c.config_path, None);
}

#[test]
fn errors_name_the_variable_and_value() {
    let cases: &[(&str, &str, &str)] = &[
        ("MESHLET_OUTBOUND_ADDR", "15001", "IP address and port"),
        (
            "MESHLET_ADMIN_ADDR",
            "0.0.0.0:15001",
            "same port as MESHLET_OUTBOUND_ADDR",
        ),
        ("MESHLET_OPAQUE_PORTS", "25,smtp", "\"smtp\" is not a port"),
        ("MESHLET_OPAQUE_PORTS", "0", "\"0\" is not a port"),
        ("MESHLET_DRAIN_TIMEOUT", "30", "invalid duration"),
        ("MESHLET_LOG", "meshlet_proxy=loud", "filter"),
        ("MESHLET_WORKER_THREADS", "0", "whole number"),
        ("MESHLET_WORKER_THREADS", "two", "whole number"),
        ("MESHLET_POD_IP", "pod", "IPv4 or IPv6"),
        (
            "MESHLET_APP_PROBES",
            "{\"/app-health/web/livez\": 1}",
            "JSON object the injector writes",
        ),
    ];
    for (name, value, reason) in cases {
        let e = parse(&[(name, value)]).unwrap_err();
        assert_eq!(e.name, *name);
        assert_eq!(e.value, *value);
        let msg = e.to_string();
        assert!(
            msg.starts_with(&format!("{name}={value:?} is invalid")),
            "{msg}"
        );
        assert!(msg.contains(reason), "{name}: {msg}");
    }
}

#[test]
fn map_source() {
    let mut m = HashMap::new();
    m.insert("MESHLET_WORKER_THREADS".to_string(), "2".to_string());
    assert_eq!(Config::parse(&m).unwrap().worker_threads, Some(2));
}

#[test]
fn identity_and_tls_mode() {
    let c = parse(&[]).unwrap();
    assert_eq!((c.identity_dir, c.tls_mode), (None, TlsMode::Permissive));
    let c = parse(&[
        ("MESHLET_IDENTITY_DIR", "/var/run/meshlet/identity"),
        ("MESHLET_TLS_MODE", "strict"),
    ])
    .unwrap();
    assert_eq!(c.identity_dir, Some("/var/run/meshlet/identity".into()));
    assert_eq!(c.tls_mode, TlsMode::Strict);

    let e = parse(&[("MESHLET_TLS_MODE", "STRICT")]).unwrap_err();
    assert_eq!(e.name, "MESHLET_TLS_MODE");
    assert!(e.reason.contains("permissive or strict"), "{e}");
    let e = parse(&[("MESHLET_TLS_MODE", "strict")]).unwrap_err();
    assert!(e.reason.contains("MESHLET_IDENTITY_DIR"), "{e}");
}

#[test]
fn issuer_from_the_control_plane_env() {
    const PEM: &str = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n";
    let base = [
        ("MESHLET_CONTROL_PLANE_ADDR", "198.19.0.12:15012"),
        ("MESHLET_TRUST_ANCHORS", PEM),
        (
            "MESHLET_IDENTITY_TOKEN",
            "/var/run/secrets/meshlet/tokens/token",
        ),
        ("MESHLET_TLS_MODE", "strict"),
    ];
    let c = parse(&base).unwrap();
    let i = c.issuer.unwrap();
    assert_eq!(i.control_plane.addr, "198.19.0.12:15012");
    assert_eq!(i.control_plane.name, "meshlet-injector.meshlet-system.svc");
    assert_eq!(
        i.token_path,
        PathBuf::from("/var/run/secrets/meshlet/tokens/token")
    );

    // An identity directory wins: the operator set it on purpose.
    let mut with_dir = base.to_vec();
    with_dir.push(("MESHLET_IDENTITY_DIR", "/id"));
    assert_eq!(parse(&with_dir).unwrap().issuer, None);

    for (drop, name) in [
        ("MESHLET_TRUST_ANCHORS", "MESHLET_TRUST_ANCHORS"),
        // Config delivery alone needs no token; strict mode then has no identity.
        ("MESHLET_IDENTITY_TOKEN", "MESHLET_TLS_MODE"),
        ("MESHLET_CONTROL_PLANE_ADDR", "MESHLET_TLS_MODE"),
    ] {
        let env: Vec<_> = base.iter().copied().filter(|(k, _)| *k != drop).collect();
        assert_eq!(parse(&env).unwrap_err().name, name, "without {drop}");
    }
    for bad in ["meshlet-injector", ":15012", "host:0", "host:http"] {
        let mut env = base.to_vec();
        env[0].1 = bad;
        assert_eq!(
            parse(&env).unwrap_err().name,
            "MESHLET_CONTROL_PLANE_ADDR",
            "{bad}"
        );
    }
    let mut env = base.to_vec();
    env[1].1 = "not pem";
    assert_eq!(parse(&env).unwrap_err().name, "MESHLET_TRUST_ANCHORS");
}

#[test]
fn control_plane() {
    let pem = "-----BEGIN CERTIFICATE-----\nMAA=\n-----END CERTIFICATE-----\n";
    assert_eq!(parse(&[]).unwrap().control_plane, None);
    let c = parse(&[
        (
            "MESHLET_CONTROL_PLANE_ADDR",
            "meshlet-injector.meshlet-system.svc:15012",
        ),
        ("MESHLET_TRUST_ANCHORS", pem),
    ])
    .unwrap()
    .control_plane
    .unwrap();
    assert_eq!(c.addr, "meshlet-injector.meshlet-system.svc:15012");
    assert_eq!(c.name, meshlet_api::identity::CONTROL_PLANE_NAME);
    assert_eq!(c.trust_anchors, pem.trim());
    let c = parse(&[
        ("MESHLET_CONTROL_PLANE_ADDR", "[::1]:15012"),
        ("MESHLET_CONTROL_PLANE_NAME", "cp.test"),
        ("MESHLET_TRUST_ANCHORS", pem),
    ])
    .unwrap();
    assert_eq!(c.control_plane.unwrap().name, "cp.test");

    for (vars, name) in [
        (
            &[("MESHLET_CONTROL_PLANE_ADDR", "cp:15012")][..],
            "MESHLET_TRUST_ANCHORS",
        ),
        (
            &[
                ("MESHLET_CONTROL_PLANE_ADDR", "cp"),
                ("MESHLET_TRUST_ANCHORS", pem),
            ][..],
            "MESHLET_CONTROL_PLANE_ADDR",
        ),
        (
            &[
                ("MESHLET_CONTROL_PLANE_ADDR", "cp:15012"),
                ("MESHLET_TRUST_ANCHORS", "not pem"),
            ][..],
            "MESHLET_TRUST_ANCHORS",
        ),
        (
            &[
                ("MESHLET_CONTROL_PLANE_ADDR", "cp:15012"),
                ("MESHLET_CONTROL_PLANE_NAME", "not a name!"),
                ("MESHLET_TRUST_ANCHORS", pem),
            ][..],
            "MESHLET_CONTROL_PLANE_NAME",
        ),
    ] {
        let e = parse(vars).unwrap_err();
        assert_eq!(e.name, name, "{e}");
    }
}
