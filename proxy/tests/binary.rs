//! The `meshlet-proxy` binary: exit codes, readiness, SIGTERM.

use std::{
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use meshlet_proxy::test_util::admin_request;
use nix::{sys::signal::Signal, unistd::Pid};

const BIN: &str = env!("CARGO_BIN_EXE_meshlet-proxy");

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[test]
fn bad_env_exits_64_naming_the_variable() {
    let out = Command::new(BIN)
        .env("MESHLET_WORKER_THREADS", "zero")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(r#"MESHLET_WORKER_THREADS="zero" is invalid"#),
        "{err}"
    );
}

#[test]
fn bad_mesh_file_at_start_is_fatal() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("mesh.json");
    std::fs::write(&path, r#"{"services": [{"name": "x"}]}"#).unwrap();
    let out = Command::new(BIN)
        .env("MESHLET_OUTBOUND_ADDR", "127.0.0.1:0")
        .env("MESHLET_INBOUND_ADDR", "127.0.0.1:0")
        .env("MESHLET_ADMIN_ADDR", "127.0.0.1:0")
        .env("MESHLET_CONFIG_PATH", &path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("refusing mesh config") && err.contains("mesh.json"),
        "{err}"
    );
}

#[test]
fn sigterm_drains_and_exits_0() {
    let admin = format!("127.0.0.1:{}", free_port());
    let mut child = Command::new(BIN)
        .env(
            "MESHLET_OUTBOUND_ADDR",
            format!("127.0.0.1:{}", free_port()),
        )
        .env("MESHLET_INBOUND_ADDR", format!("127.0.0.1:{}", free_port()))
        .env("MESHLET_ADMIN_ADDR", &admin)
        .env("MESHLET_LOG", "warn")
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let admin = admin.parse().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if std::net::TcpStream::connect(admin).is_ok()
            && admin_request(admin, "GET", "/ready").0 == 200
        {
            break;
        }
        assert!(Instant::now() < deadline, "proxy never became ready");
        std::thread::sleep(Duration::from_millis(20));
    }
    let status =
        std::fs::read_to_string(format!("/proc/{}/status", child.id())).unwrap_or_default();
    if let Some(rss) = status.lines().find(|l| l.starts_with("VmRSS")) {
        eprintln!("idle meshlet-proxy (debug build) {rss}");
    }
    nix::sys::signal::kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let code = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s.code();
        }
        assert!(Instant::now() < deadline, "no exit after SIGTERM");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(code, Some(0));
}

fn start_proxy(admin: &str) -> std::process::Child {
    Command::new(BIN)
        .env(
            "MESHLET_OUTBOUND_ADDR",
            format!("127.0.0.1:{}", free_port()),
        )
        .env("MESHLET_INBOUND_ADDR", format!("127.0.0.1:{}", free_port()))
        .env("MESHLET_ADMIN_ADDR", admin)
        .env("MESHLET_LOG", "warn")
        .stdout(Stdio::null())
        .spawn()
        .unwrap()
}

fn stop(mut child: std::process::Child) {
    let _ = child.kill();
    let _ = child.wait();
}

#[test]
fn wait_ready_waits_for_the_proxy_and_exits_0() {
    let admin = format!("127.0.0.1:{}", free_port());
    // Started first: it must keep polling until the proxy is up.
    let waiter = Command::new(BIN)
        .args(["wait-ready", "--timeout", "20s"])
        .env("MESHLET_ADMIN_ADDR", &admin)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let proxy = start_proxy(&admin);
    let out = waiter.wait_with_output().unwrap();
    stop(proxy);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(stdout.lines().count(), 1, "one line: {stdout:?}");
    assert!(
        stdout.contains("ready") && stdout.contains(&admin),
        "{stdout}"
    );
}

#[test]
fn wait_ready_times_out_with_exit_1_and_starts_no_proxy() {
    // Unspecified admin address: wait-ready must ask loopback, find nobody, and not
    // become a proxy itself (which would answer its own /ready).
    let port = free_port();
    let start = Instant::now();
    let out = Command::new(BIN)
        .args(["wait-ready", "--timeout=400ms"])
        .env("MESHLET_ADMIN_ADDR", format!("0.0.0.0:{port}"))
        .env(
            "MESHLET_OUTBOUND_ADDR",
            format!("127.0.0.1:{}", free_port()),
        )
        .env("MESHLET_INBOUND_ADDR", format!("127.0.0.1:{}", free_port()))
        .output()
        .unwrap();
    let took = start.elapsed();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        took < Duration::from_secs(3),
        "took {took:?} for a 400ms timeout"
    );
    assert_eq!(stderr.lines().count(), 1, "one line: {stderr:?}");
    assert!(
        stderr.contains("not ready after") && stderr.contains(&format!("127.0.0.1:{port}/ready")),
        "{stderr}"
    );
    assert!(out.stdout.is_empty());
}

#[test]
fn wait_ready_refuses_bad_arguments() {
    for (args, want) in [
        (
            &["wait-ready", "--timeout", "soon"][..],
            "positive duration",
        ),
        (&["wait-ready", "--verbose"], "usage"),
        (&["serve"], "unknown command"),
    ] {
        let out = Command::new(BIN).args(args).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{args:?}: {stderr}");
        assert!(stderr.contains(want), "{args:?}: {stderr}");
    }
}
