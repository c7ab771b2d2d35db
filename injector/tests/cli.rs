//! The `meshlet-injector` binary as a user runs it.

use std::{
    io::Write,
    process::{Command, Stdio},
};

const BIN: &str = env!("CARGO_BIN_EXE_meshlet-injector");

fn testdata(name: &str) -> String {
    format!(
        "{}/tests/testdata/inject/{name}",
        env!("CARGO_MANIFEST_DIR")
    )
}

#[test]
fn inject_file_matches_the_golden() {
    let out = Command::new(BIN)
        .args(["inject", "-f", &testdata("job.yaml")])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let golden = std::fs::read_to_string(testdata("job.yaml.injected")).unwrap();
    assert_eq!(String::from_utf8(out.stdout).unwrap(), golden);
}

#[test]
fn inject_reads_stdin_and_takes_flags() {
    let mut child = Command::new(BIN)
        .args([
            "inject",
            "-f",
            "-",
            "--native-sidecar=false",
            "--proxy-image=registry.test/proxy:9",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let input = std::fs::read(testdata("job.yaml")).unwrap();
    child.stdin.take().unwrap().write_all(&input).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("image: registry.test/proxy:9"), "{text}");
    assert!(
        text.contains("wait-ready"),
        "classic sidecar expected:\n{text}"
    );
}

#[test]
fn refusals_exit_64_with_one_clear_line() {
    let out = Command::new(BIN)
        .args(["inject", "-f", &testdata("error-bad-annotation.yaml")])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(
        err.contains("meshlet.io/exclude-outbound-ports") && err.contains("\"22,http\""),
        "{err}"
    );
    assert!(
        out.stdout.is_empty(),
        "nothing is printed for a refused manifest"
    );

    let out = Command::new(BIN)
        .args(["inject", "-f", "/nonexistent/x.yaml"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/x.yaml"));
}

#[test]
fn serve_fails_fast_on_missing_certificates() {
    let out = Command::new(BIN)
        .args([
            "serve",
            "--addr=127.0.0.1:0",
            "--tls-cert=/nonexistent/tls.crt",
            "--tls-key=/nonexistent/tls.key",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/tls.crt"));
}

#[test]
fn ca_init_and_issue_write_an_identity_dir() {
    use std::os::unix::fs::PermissionsExt;
    let tmp = tempfile::tempdir().unwrap();
    let ca_dir = tmp.path().join("ca");
    let out_dir = tmp.path().join("web");
    let run = |args: &[&str]| Command::new(BIN).args(args).output().unwrap();
    let ca = ca_dir.to_str().unwrap();
    let out = run(&["ca", "init", "--out", ca]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = run(&[
        "ca",
        "issue",
        "--ca",
        ca,
        "--namespace",
        "shop",
        "--service-account",
        "web",
        "--lifetime",
        "2h",
        "--out",
        out_dir.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for f in ["ca.pem", "cert.pem", "key.pem"] {
        assert!(out_dir.join(f).exists(), "{f} written");
    }
    let mode = std::fs::metadata(out_dir.join("key.pem"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    let pem = std::fs::read_to_string(out_dir.join("cert.pem")).unwrap();
    let (_, der) = x509_parser::pem::parse_x509_pem(pem.as_bytes()).unwrap();
    let cert = der.parse_x509().unwrap();
    let san = cert.subject_alternative_name().unwrap().unwrap();
    assert_eq!(
        format!("{:?}", san.value.general_names),
        r#"[URI("spiffe://cluster.local/ns/shop/sa/web")]"#
    );
    let v = cert.validity();
    let life = v.not_after.timestamp() - v.not_before.timestamp();
    assert_eq!(life, 2 * 3600 + 300, "2h plus the 5 minute backdate");

    // A second init never overwrites the CA key; a bad name is refused clearly.
    let again = run(&["ca", "init", "--out", ca]);
    assert_eq!(again.status.code(), Some(64));
    assert!(
        String::from_utf8_lossy(&again.stderr).contains("already exists"),
        "{}",
        String::from_utf8_lossy(&again.stderr)
    );
    let bad = run(&[
        "ca",
        "issue",
        "--ca",
        ca,
        "--namespace",
        "Shop",
        "--service-account",
        "web",
        "--out",
        out_dir.to_str().unwrap(),
    ]);
    assert_eq!(bad.status.code(), Some(64));
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(err.contains("bad namespace"), "{err}");
}

#[test]
fn serve_config_streams_the_compiled_manifests_and_each_change() {
    use std::io::{BufRead, BufReader, Read};
    let svc = "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: shop}\n\
               spec: {clusterIP: 198.19.0.10, ports: [{port: 80}]}\n";
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("svc.yaml"), svc).unwrap();
    let mut child = Command::new(BIN)
        .args([
            "serve-config",
            "--plaintext-loopback",
            "--addr",
            "127.0.0.1:0",
        ])
        .args(["--poll-interval", "50ms", "--from-files"])
        .arg(dir.path())
        .env("RUST_LOG", "info")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let mut stderr = BufReader::new(child.stderr.take().unwrap());
    let _child = Kill(child);
    let mut addr = None;
    for _ in 0..50 {
        let mut line = String::new();
        if stderr.read_line(&mut line).unwrap() == 0 {
            break;
        }
        if line.contains("config server listening") {
            addr = line
                .split_whitespace()
                .find_map(|w| w.strip_prefix("addr="))
                .map(str::to_string);
            break;
        }
    }
    let addr = addr.expect("no listening line with addr=");
    let mut s = std::net::TcpStream::connect(&addr).unwrap();
    s.set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .unwrap();
    write!(
        s,
        "GET /v1/config?namespace=shop HTTP/1.1\r\nHost: cp\r\n\r\n"
    )
    .unwrap();
    let mut seen = Vec::new();
    let mut read_until = |needle: &str| -> String {
        let mut buf = [0u8; 4096];
        while !String::from_utf8_lossy(&seen).contains(needle) {
            let n = s.read(&mut buf).expect("stream went silent");
            assert!(n > 0, "stream ended: {}", String::from_utf8_lossy(&seen));
            seen.extend_from_slice(&buf[..n]);
        }
        String::from_utf8_lossy(&seen).into_owned()
    };
    let head = read_until(r#""name":"web""#);
    assert!(head.contains("application/x-ndjson"), "{head}");
    std::fs::write(
        dir.path().join("svc.yaml"),
        svc.replace("port: 80", "port: 81"),
    )
    .unwrap();
    read_until(r#""port":81"#);

    let out = Command::new(BIN)
        .args([
            "serve-config",
            "--plaintext-loopback",
            "--addr",
            "0.0.0.0:0",
        ])
        .arg("--from-files")
        .arg(dir.path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("needs a loopback --addr"), "{err}");
}
