//! The built binary: `--dry-run` output, flag and env wiring, and bad-input exits.
//! Nothing here touches iptables (dry-run and validation never run a program), so it
//! runs anywhere without privilege.

use std::path::Path;
use std::process::{Command, Output};

const BIN: &str = env!("CARGO_BIN_EXE_meshlet-init");

/// The binary with no inherited `MESHLET_*` variables and an empty `PATH`, which proves
/// that dry-run and validation never execute iptables.
fn cmd() -> Command {
    let mut c = Command::new(BIN);
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("MESHLET_") {
            c.env_remove(k);
        }
    }
    c.env("PATH", "/nonexistent-meshlet-init-test");
    c
}

fn golden(name: &str) -> String {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("tests/testdata/{name}.golden"));
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn dry_run_prints_the_golden_payload() {
    let out = cmd().args(["--dry-run", "--ipv6", "off"]).output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out), golden("default"));
    assert_eq!(stderr(&out), "");
}

#[test]
fn dry_run_with_ipv6_auto_shows_both_families() {
    let out = cmd().arg("-n").output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(text.contains("# iptables-nft-restore --noflush"), "{text}");
    assert!(text.contains("# ip6tables-nft-restore --noflush"), "{text}");
    assert!(
        text.contains("-A MESHLET_OUTPUT -d ::1/128 -j RETURN"),
        "{text}"
    );
}

#[test]
fn every_env_var_is_wired() {
    let out = cmd()
        .arg("--dry-run")
        .env("MESHLET_IPV6", "on")
        .env("MESHLET_IPTABLES_BACKEND", "legacy")
        .env("MESHLET_PROXY_UID", "2000")
        .env("MESHLET_PROXY_GID", "2001")
        .env("MESHLET_INBOUND_PORTS", "80,443,9090")
        .env("MESHLET_EXCLUDE_INBOUND_PORTS", "9090,10000-10010")
        .env("MESHLET_EXCLUDE_OUTBOUND_PORTS", "53,5432-5433")
        .env(
            "MESHLET_INCLUDE_OUTBOUND_CIDRS",
            "198.18.0.0/15,fd00:6d65:7368::/48",
        )
        .env(
            "MESHLET_EXCLUDE_OUTBOUND_CIDRS",
            "198.19.255.0/24,fd00:6d65:7368:ff::/64",
        )
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out), golden("combined"));

    let out = cmd()
        .args(["--dry-run", "--ipv6=off"])
        .env("MESHLET_OUTBOUND_PORT", "16001")
        .env("MESHLET_INBOUND_PORT", "16006")
        .env("MESHLET_PROXY_UID", "2000")
        .env("MESHLET_PROXY_GID", "3000")
        .output()
        .unwrap();
    assert_eq!(stdout(&out), golden("custom-uid-gid-ports"));
}

#[test]
fn flags_override_env() {
    let out = cmd()
        .args(["--dry-run", "--ipv6", "off", "--proxy-uid", "1337"])
        .env("MESHLET_PROXY_UID", "4242")
        .output()
        .unwrap();
    assert_eq!(stdout(&out), golden("default"));
}

/// Flags, env vars, and the exact stderr expected.
type Case = (
    &'static [&'static str],
    &'static [(&'static str, &'static str)],
    &'static str,
);

#[test]
fn bad_input_exits_2_with_one_line() {
    let cases: &[Case] = &[
        (
            &[],
            &[("MESHLET_EXCLUDE_INBOUND_PORTS", "22,70000")],
            "meshlet-init: invalid value \"70000\" for --exclude-inbound-ports (MESHLET_EXCLUDE_INBOUND_PORTS): port must be 1-65535\n",
        ),
        (
            &["--exclude-outbound-ports", "8100-8000"],
            &[],
            "meshlet-init: invalid value \"8100-8000\" for --exclude-outbound-ports (MESHLET_EXCLUDE_OUTBOUND_PORTS): range start must not be greater than its end (write low-high, e.g. 8000-8100)\n",
        ),
        (
            &[],
            &[("MESHLET_INCLUDE_OUTBOUND_CIDRS", "10.0.0.0/8,10.1.0.0/99")],
            "meshlet-init: invalid value \"10.1.0.0/99\" for --include-outbound-cidrs (MESHLET_INCLUDE_OUTBOUND_CIDRS): expected a CIDR such as 10.0.0.0/8 or fd00::/8, or a single IP address\n",
        ),
        (
            &["--exclude-outbound-cidrs", "pods"],
            &[],
            "meshlet-init: invalid value \"pods\" for --exclude-outbound-cidrs (MESHLET_EXCLUDE_OUTBOUND_CIDRS): expected a CIDR such as 10.0.0.0/8 or fd00::/8, or a single IP address\n",
        ),
        (
            &["--inbound-ports", "80,*"],
            &[],
            "meshlet-init: invalid value \"80,*\" for --inbound-ports (MESHLET_INBOUND_PORTS): `*` selects everything and must be the only item\n",
        ),
        (
            &[],
            &[("MESHLET_IPTABLES_BACKEND", "bpf")],
            "meshlet-init: invalid value \"bpf\" for --iptables-backend (MESHLET_IPTABLES_BACKEND): must be nft, legacy or auto\n",
        ),
    ];
    // Without --dry-run the same happens before any program runs; tests/netns.rs
    // checks that inside a namespace (never here, in the host's namespace).
    for (args, env, want) in cases {
        let out = cmd()
            .arg("--dry-run")
            .args(*args)
            .envs(env.iter().copied())
            .output()
            .unwrap();
        assert_eq!(
            out.status.code(),
            Some(2),
            "{args:?} {env:?}: {}",
            stderr(&out)
        );
        assert_eq!(stderr(&out), *want, "{args:?} {env:?}");
        assert_eq!(stdout(&out), "");
    }
}

#[test]
fn dry_run_is_only_for_apply() {
    for sub in ["cleanup", "verify"] {
        let out = cmd().args([sub, "--dry-run"]).output().unwrap();
        assert_eq!(out.status.code(), Some(2));
        let err = stderr(&out);
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(err.contains("--dry-run only applies to `apply`"), "{err}");
    }
}
