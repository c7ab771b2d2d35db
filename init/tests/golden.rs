//! Golden tests: for each named option set, the iptables-restore transcript that
//! `meshlet-init --dry-run` would print must equal `tests/testdata/<name>.golden`.
//! `UPDATE_GOLDEN=1 cargo test -p meshlet-init --test golden` rewrites the files;
//! review the diff before committing.

use std::path::{Path, PathBuf};

use meshlet_api::parse::{parse_cidr_list, parse_cidr_selection, parse_port_ranges, Selection};
use meshlet_init::config::{BackendChoice, Config, Ipv6Mode};
use meshlet_init::exec::Recording;
use meshlet_init::rules::{Family, RuleSet};

type Mutator = fn(&mut Config);

/// Named mutations of the default configuration (istio's getCommonTestCases shape).
fn cases() -> Vec<(&'static str, Mutator)> {
    vec![
        ("default", |_| {}),
        ("inbound-ports", |c| {
            c.inbound_ports = Selection::Only(vec![80, 8080])
        }),
        ("no-inbound-capture", |c| {
            c.inbound_ports = Selection::Only(vec![])
        }),
        ("exclude-inbound-ports", |c| {
            c.exclude_inbound_ports = parse_port_ranges("22,9000-9100,15020").unwrap()
        }),
        ("exclude-outbound-ports", |c| {
            c.exclude_outbound_ports = parse_port_ranges("25,3306,8000-8100").unwrap()
        }),
        ("include-cidrs", |c| {
            c.include_outbound_cidrs = parse_cidr_selection("10.0.0.0/8,198.19.0.0/16").unwrap()
        }),
        ("exclude-cidrs", |c| {
            c.exclude_outbound_cidrs = parse_cidr_list("10.96.0.0/12,169.254.169.254").unwrap()
        }),
        ("include-exclude-cidrs", |c| {
            c.include_outbound_cidrs = parse_cidr_selection("10.0.0.0/8").unwrap();
            c.exclude_outbound_cidrs = parse_cidr_list("10.96.0.1/32").unwrap();
        }),
        ("ipv6-on", |c| c.ipv6 = Ipv6Mode::On),
        ("custom-uid-gid-ports", |c| {
            c.proxy_uid = 2000;
            c.proxy_gid = 3000;
            c.outbound_port = 16001;
            c.inbound_port = 16006;
        }),
        ("legacy-backend", |c| c.backend = BackendChoice::Legacy),
        ("combined", |c| {
            c.ipv6 = Ipv6Mode::On;
            c.backend = BackendChoice::Legacy;
            c.proxy_uid = 2000;
            c.proxy_gid = 2001;
            c.inbound_ports = Selection::Only(vec![80, 443, 9090]);
            c.exclude_inbound_ports = parse_port_ranges("9090,10000-10010").unwrap();
            c.exclude_outbound_ports = parse_port_ranges("53,5432-5433").unwrap();
            c.include_outbound_cidrs =
                parse_cidr_selection("198.18.0.0/15,fd00:6d65:7368::/48").unwrap();
            c.exclude_outbound_cidrs =
                parse_cidr_list("198.19.255.0/24,fd00:6d65:7368:ff::/64").unwrap();
        }),
    ]
}

fn base() -> Config {
    // The pod is taken to have no IPv6 (auto), so ipv6-on shows what IPv6 adds.
    Config::default()
}

fn testdata(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/testdata")
        .join(format!("{name}.golden"))
}

fn render(cfg: &Config, rec: &Recording) -> String {
    meshlet_init::apply(cfg, rec, false, false).expect("dry apply");
    rec.restore_transcript()
}

fn compare_to_golden(name: &str, got: &str) {
    let path = testdata(name);
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, got).unwrap();
        return;
    }
    let want = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "{}: {e}; create it with UPDATE_GOLDEN=1 cargo test -p meshlet-init --test golden",
            path.display()
        )
    });
    if want != got {
        let (w, g): (Vec<_>, Vec<_>) = (want.lines().collect(), got.lines().collect());
        let at = w
            .iter()
            .zip(&g)
            .position(|(a, b)| a != b)
            .unwrap_or(w.len().min(g.len()));
        panic!(
            "{name}: output differs from {} at line {}:\n  golden: {:?}\n  got:    {:?}\n\
             full output:\n{got}\nif the change is intended: UPDATE_GOLDEN=1 cargo test -p meshlet-init --test golden",
            path.display(),
            at + 1,
            w.get(at),
            g.get(at),
        );
    }
}

#[test]
fn restore_payloads_match_golden_files() {
    for (name, mutate) in cases() {
        let mut cfg = base();
        mutate(&mut cfg);
        let got = render(&cfg, &Recording::new());
        compare_to_golden(name, &got);
    }
}

/// A rerun over an already-programmed table rebuilds the chains but adds no jump.
#[test]
fn rerun_payload_matches_golden_file() {
    let cfg = base();
    let set = RuleSet::build(&cfg, Family::V4);
    let mut save = String::from("*nat\n:PREROUTING ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n");
    for r in set.jumps.iter().chain(&set.rules) {
        save.push_str(&format!("{}\n", r.line()));
    }
    save.push_str("COMMIT\n");
    let rec = Recording::new().with_output("iptables-nft-save", &save);
    let got = render(&cfg, &rec);
    assert!(
        !got.contains("-A PREROUTING") && !got.contains("-A OUTPUT "),
        "{got}"
    );
    compare_to_golden("rerun", &got);
}

/// Every golden file belongs to a case, so a renamed case leaves no stale file behind.
#[test]
fn no_stale_golden_files() {
    let mut names: Vec<&str> = cases().iter().map(|(n, _)| *n).collect();
    names.push("rerun");
    assert!(names.len() >= 10);
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/testdata");
    for entry in std::fs::read_dir(&dir).expect("tests/testdata exists") {
        let file = entry.unwrap().file_name().into_string().unwrap();
        let stem = file.strip_suffix(".golden").unwrap_or(&file);
        assert!(
            names.contains(&stem),
            "stale file {file} in {}",
            dir.display()
        );
    }
}
