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
