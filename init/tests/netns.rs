//! Real-kernel tests: the built `meshlet-init` runs inside a throw-away network
//! namespace per test (`mlinit-<test>-<pid>`, deleted by a Drop guard even when the
//! test panics), via `ip netns exec`, never in the host's namespace.
//!
//! They need root, iptables (nft and legacy), iproute2, util-linux (`setpriv`) and
//! bash; when something is missing they FAIL saying what to install. Run with
//! `cargo test -p meshlet-init --test netns` as root.

use std::fs::File;
use std::io::Read;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use nix::sched::{setns, CloneFlags};
use nix::sys::socket::{getsockopt, sockopt};

const BIN: &str = env!("CARGO_BIN_EXE_meshlet-init");

// === helpers ===

fn preflight() {
    if !nix::unistd::geteuid().is_root() {
        panic!(
            "netns tests need root (they create network namespaces and program iptables inside them): \
             run `sudo -E cargo test -p meshlet-init --test netns`"
        );
    }
    for tool in [
        "ip",
        "iptables-nft-save",
        "iptables-legacy-save",
        "ip6tables-nft-save",
        "setpriv",
        "bash",
        "timeout",
    ] {
        let found = std::env::var_os("PATH")
            .map(|p| std::env::split_paths(&p).any(|d| d.join(tool).exists()))
            .unwrap_or(false);
        if !found {
            panic!(
                "netns tests need `{tool}` in PATH: apt-get install -y iptables iproute2 util-linux bash coreutils"
            );
        }
    }
}

fn run(cmd: &mut Command) -> Output {
    cmd.output()
        .unwrap_or_else(|e| panic!("could not run {cmd:?}: {e}"))
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// A network namespace owned by one test.
struct Netns {
    name: String,
}

impl Netns {
    fn new(test: &str) -> Self {
        preflight();
        let name = format!("mlinit-{test}-{}", std::process::id());
        // A leftover from a crashed run with a recycled pid would make `add` fail.
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
        let out = run(Command::new("ip").args(["netns", "add", &name]));
        assert!(
            out.status.success(),
            "ip netns add {name}: {}",
            text(&out.stderr)
        );
        let ns = Self { name };
        ns.sh(&["ip", "link", "set", "lo", "up"]);
        ns
    }

    /// `ip netns exec <ns> args...` with no inherited `MESHLET_*` variables.
    fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name]).args(args);
        for (k, _) in std::env::vars_os() {
            if k.to_string_lossy().starts_with("MESHLET_") {
                c.env_remove(k);
            }
        }
        c
    }

    /// Runs a setup command that must succeed.
    fn sh(&self, args: &[&str]) -> String {
        let out = run(&mut self.cmd(args));
        assert!(
            out.status.success(),
            "{args:?} in {}: {}",
            self.name,
            text(&out.stderr)
        );
        text(&out.stdout)
    }

    /// Runs meshlet-init inside the namespace.
    fn init(&self, args: &[&str], env: &[(&str, &str)]) -> Output {
        let mut c = self.cmd(&[BIN]);
        c.args(args).envs(env.iter().copied());
        run(&mut c)
    }

    fn init_ok(&self, args: &[&str], env: &[(&str, &str)]) -> String {
        let out = self.init(args, env);
        assert!(
            out.status.success(),
            "meshlet-init {args:?} {env:?} failed: {}{}",
            text(&out.stdout),
            text(&out.stderr)
        );
        text(&out.stdout)
    }

    /// meshlet's rules in one backend/family, as `-A` lines (without `-t nat`, so
    /// looking does not create a table).
    fn meshlet_rules(&self, backend: &str, v6: bool) -> Vec<String> {
        let prefix = if v6 { "ip6tables" } else { "iptables" };
        let save = self.sh(&[&format!("{prefix}-{backend}-save")]);
        meshlet_lines(&save)
    }

    /// Panics if any backend or family holds a trace of meshlet.
    fn assert_clean(&self) {
        for backend in ["nft", "legacy"] {
            for v6 in [false, true] {
                let prefix = if v6 { "ip6tables" } else { "iptables" };
                let save = self.sh(&[&format!("{prefix}-{backend}-save")]);
                assert!(
                    !save.contains("MESHLET"),
                    "{prefix}-{backend}-save in {} still shows meshlet:\n{save}",
                    self.name
                );
            }
        }
    }

    fn path(&self) -> String {
        format!("/run/netns/{}", self.name)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

/// Rules of the nat table that belong to meshlet: in its chains or jumping into them.
fn meshlet_lines(save: &str) -> Vec<String> {
    let mut in_nat = false;
    let mut out = Vec::new();
    for line in save.lines() {
        if let Some(t) = line.strip_prefix('*') {
            in_nat = t == "nat";
        } else if in_nat && line.starts_with("-A ") && line.contains("MESHLET_") {
            out.push(line.to_string());
        }
    }
    sort_by_chain(out)
}

/// iptables-save lists built-in chains first, the restore payload lists them last:
/// compare chain by chain, keeping the order inside each chain (it is semantic).
fn sort_by_chain(mut lines: Vec<String>) -> Vec<String> {
    let order = [
        "PREROUTING",
        "OUTPUT",
        "MESHLET_INBOUND",
        "MESHLET_IN_REDIRECT",
        "MESHLET_OUTPUT",
        "MESHLET_REDIRECT",
    ];
    lines.sort_by_key(|l| {
        let chain = l.split_whitespace().nth(1).unwrap_or("");
        order
            .iter()
            .position(|c| *c == chain)
            .unwrap_or(order.len())
    });
    lines
}

/// The `-A` lines of the `index`-th payload of a golden file.
fn golden_rules(name: &str, index: usize) -> Vec<String> {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("tests/testdata/{name}.golden"));
    let golden = std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    let payload = golden
        .split("# ")
        .filter(|s| !s.is_empty())
        .nth(index)
        .unwrap_or_else(|| panic!("{name}.golden has no payload {index}"));
    sort_by_chain(
        payload
            .lines()
            .filter(|l| l.starts_with("-A "))
            .map(String::from)
            .collect(),
    )
}

// === lifecycle per backend ===

fn lifecycle(backend: &str) {
    let ns = Netns::new(&format!("life-{backend}"));
    let env = [
        ("MESHLET_IPTABLES_BACKEND", backend),
        ("MESHLET_IPV6", "on"),
    ];
    let out = ns.init_ok(&[], &env);
    assert!(out.contains(&format!("({backend} backend)")), "{out}");
    let v4 = golden_rules("ipv6-on", 0);
    let v6 = golden_rules("ipv6-on", 1);
    assert!(v4.len() > 10 && v6.iter().any(|l| l.contains("::1/128")));
    assert_eq!(
        ns.meshlet_rules(backend, false),
        v4,
        "IPv4 rules after apply"
    );
    assert_eq!(
        ns.meshlet_rules(backend, true),
        v6,
        "IPv6 rules after apply"
    );

    // A rerun (pod restart) leaves exactly one copy of everything.
    ns.init_ok(&["apply"], &env);
    assert_eq!(
        ns.meshlet_rules(backend, false),
        v4,
        "IPv4 rules after rerun"
    );
    assert_eq!(
        ns.meshlet_rules(backend, true),
        v6,
        "IPv6 rules after rerun"
    );
    ns.init_ok(&["verify"], &env);

    // verify notices a rule that went missing, and says which.
    ns.sh(&[
        &format!("iptables-{backend}"),
        "-w",
        "10",
        "-t",
        "nat",
        "-D",
        "MESHLET_OUTPUT",
        "-o",
        "lo",
        "-j",
        "RETURN",
    ]);
    let out = ns.init(&["verify"], &env);
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert!(
        err.contains("rule missing: -A MESHLET_OUTPUT -o lo -j RETURN") && err.lines().count() == 1,
        "{err}"
    );
    // ...and apply repairs it.
    ns.init_ok(&[], &env);
    assert_eq!(
        ns.meshlet_rules(backend, false),
        v4,
        "IPv4 rules after repair"
    );

    // Cleanup ignores the options, so a bad value cannot block teardown.
    let out = ns.init_ok(&["cleanup"], &[("MESHLET_EXCLUDE_INBOUND_PORTS", "99999")]);
    assert!(
        out.contains("removed IPv4") && out.contains("removed IPv6"),
        "{out}"
    );
    ns.assert_clean();
    let out = ns.init_ok(&["cleanup"], &[]);
    assert!(out.contains("nothing to clean up"), "{out}");
    ns.assert_clean();
}

#[test]
fn nft_apply_rerun_verify_cleanup() {
    lifecycle("nft");
}

#[test]
fn legacy_apply_rerun_verify_cleanup() {
    lifecycle("legacy");
}

#[test]
fn auto_backend_follows_existing_rules() {
    let ns = Netns::new("auto");
    // The "node" already uses legacy: a rule of someone else's in the filter table.
    ns.sh(&[
        "iptables-legacy",
        "-w",
        "10",
        "-A",
        "INPUT",
        "-p",
        "udp",
        "-j",
        "ACCEPT",
    ]);
    let out = ns.init_ok(&[], &[("MESHLET_IPV6", "off")]);
    assert!(out.contains("(legacy backend)"), "{out}");
    assert_eq!(
        ns.meshlet_rules("legacy", false),
        golden_rules("default", 0)
    );
    assert!(ns.meshlet_rules("nft", false).is_empty());
    ns.init_ok(&["cleanup"], &[]);
    ns.assert_clean();
    // Cleanup touched nothing else.
    assert!(ns
        .sh(&["iptables-legacy-save"])
        .contains("-A INPUT -p udp -j ACCEPT"));
}

#[test]
fn invalid_option_leaves_no_rules() {
    let ns = Netns::new("invalid");
    for (k, v) in [
        ("MESHLET_EXCLUDE_OUTBOUND_PORTS", "22,99999"),
        ("MESHLET_INCLUDE_OUTBOUND_CIDRS", "10.0.0.0/8,not-a-cidr"),
    ] {
        let out = ns.init(&[], &[(k, v)]);
        assert_eq!(out.status.code(), Some(2), "{k}={v}");
        let err = text(&out.stderr);
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(
            err.starts_with("meshlet-init: invalid value") && err.contains(k),
            "{err}"
        );
    }
    ns.assert_clean();
}

#[test]
fn no_net_admin_fails_clearly_and_leaves_no_rules() {
    let ns = Netns::new("nocap");
    for backend in ["nft", "legacy", "auto"] {
        // Root, but without NET_ADMIN/NET_RAW: what a pod without the capability gets.
        let mut c = ns.cmd(&[
            "setpriv",
            "--inh-caps=-all",
            "--bounding-set=-net_admin,-net_raw",
            BIN,
        ]);
        c.env("MESHLET_IPTABLES_BACKEND", backend);
        let out = run(&mut c);
        assert_eq!(out.status.code(), Some(1), "{backend}");
        let err = text(&out.stderr);
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(err.contains("NET_ADMIN and NET_RAW"), "{err}");
    }
    ns.assert_clean();
}

#[test]
fn missing_iptables_fails_clearly_and_leaves_no_rules() {
    let ns = Netns::new("nobin");
    let mut c = ns.cmd(&["/usr/bin/env", "PATH=/nonexistent-meshlet-init", BIN]);
    let out = run(&mut c);
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("install iptables"), "{err}");

    // Only the IPv4 binaries: IPv4 applies, IPv6 cannot, and IPv4 is rolled back,
    // so the pod is never left half-captured.
    let dir = tempfile::tempdir().unwrap();
    for b in [
        "iptables-nft-save",
        "iptables-nft-restore",
        "iptables-legacy-save",
    ] {
        let target = String::from_utf8(
            run(Command::new("sh").args(["-c", &format!("command -v {b}")])).stdout,
        )
        .unwrap();
        std::os::unix::fs::symlink(target.trim(), dir.path().join(b)).unwrap();
    }
    let path = format!("PATH={}", dir.path().display());
    let mut c = ns.cmd(&["/usr/bin/env", &path, BIN, "--ipv6", "on"]);
    let out = run(&mut c);
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert!(
        err.contains("`ip6tables-nft-save` was not found") && err.contains("install iptables"),
        "{err}"
    );
    ns.assert_clean();
}

// === traffic ===

/// A listener created inside `ns`: a socket belongs to the namespace it was made in,
/// so a short-lived thread enters the namespace, binds, and hands the socket back.
fn listen_in(ns: &Netns, addr: SocketAddr) -> TcpListener {
    let path = ns.path();
    std::thread::spawn(move || {
        let f = File::open(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
        setns(&f, CloneFlags::CLONE_NEWNET).expect("setns into the test namespace");
        let l = TcpListener::bind(addr).unwrap_or_else(|e| panic!("bind {addr}: {e}"));
        l.set_nonblocking(true).unwrap();
        l
    })
    .join()
    .expect("listener thread")
}

/// Takes a connection that already completed (the client has exited), if any.
fn accepted(l: &TcpListener) -> Option<(TcpStream, String)> {
    let deadline = Instant::now() + Duration::from_millis(500);
    loop {
        match l.accept() {
            Ok((s, _)) => {
                s.set_nonblocking(false).unwrap();
                s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
                let mut buf = String::new();
                let _ = (&s).take(64).read_to_string(&mut buf);
                return Some((s, buf));
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(_) => return None,
        }
    }
}

fn original_dst(s: &TcpStream) -> SocketAddrV4 {
    let sin = getsockopt(s, sockopt::OriginalDst).expect("SO_ORIGINAL_DST");
    SocketAddrV4::new(
        Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr)),
        u16::from_be(sin.sin_port),
    )
}

/// Connects from inside `ns` (optionally as a given uid/gid) and sends `msg`.
fn connect_from(ns: &Netns, as_user: Option<&str>, dst: &str, port: u16, msg: &str) -> Output {
    let script = format!("exec 3<>/dev/tcp/{dst}/{port} && printf {msg} >&3");
    let mut args: Vec<&str> = vec!["timeout", "5"];
    if let Some(id) = as_user {
        args.extend(["setpriv", "--reuid", id, "--regid", id, "--clear-groups"]);
    }
    args.extend(["bash", "-c", &script]);
    run(&mut ns.cmd(&args))
}

#[test]
fn traffic_is_redirected_except_the_proxys_own() {
    let pod = Netns::new("tpod");
    let peer = Netns::new("tpeer");
    // A veth between the "pod" and a "peer" namespace, made inside the pod namespace
    // so the host namespace never sees it.
    pod.sh(&[
        "ip", "link", "add", "mlv0", "type", "veth", "peer", "name", "mlv1", "netns", &peer.name,
    ]);
    pod.sh(&["ip", "addr", "add", "198.18.200.1/24", "dev", "mlv0"]);
    pod.sh(&["ip", "link", "set", "mlv0", "up"]);
    peer.sh(&["ip", "addr", "add", "198.18.200.2/24", "dev", "mlv1"]);
    peer.sh(&["ip", "link", "set", "mlv1", "up"]);

    let any = |port| SocketAddr::from((Ipv4Addr::UNSPECIFIED, port));
    let outbound = listen_in(&pod, any(15001));
    let inbound = listen_in(&pod, any(15006));
    let admin = listen_in(&pod, any(15020));
    let app = listen_in(&pod, any(8080));
    let upstream = listen_in(&peer, SocketAddr::from(([198, 18, 200, 2], 80)));

    pod.init_ok(&[], &[("MESHLET_IPV6", "off")]);

    // The app (root here, any uid but 1337) connects out: it lands on 15001, and the
    // proxy can read where it was going.
    let out = connect_from(&pod, None, "198.18.200.2", 80, "app");
    assert!(out.status.success(), "app connect: {}", text(&out.stderr));
    let (s, data) = accepted(&outbound).expect("app connection redirected to 15001");
    assert_eq!(
        original_dst(&s),
        "198.18.200.2:80".parse::<SocketAddrV4>().unwrap()
    );
    assert_eq!(data, "app");
    assert!(
        accepted(&upstream).is_none(),
        "app connection bypassed the proxy"
    );

    // The proxy (uid/gid 1337) connects out: it reaches the peer directly.
    let out = connect_from(&pod, Some("1337"), "198.18.200.2", 80, "proxy");
    assert!(out.status.success(), "proxy connect: {}", text(&out.stderr));
    let (_, data) = accepted(&upstream).expect("uid 1337 reaches the destination directly");
    assert_eq!(data, "proxy");
    assert!(
        accepted(&outbound).is_none(),
        "uid 1337 was redirected (loop)"
    );

    // Inbound from the peer: any port lands on 15006 with its original destination,
    // except the admin port, which kubelet probes and Prometheus reach directly.
    let out = connect_from(&peer, None, "198.18.200.1", 8080, "in");
    assert!(
        out.status.success(),
        "inbound connect: {}",
        text(&out.stderr)
    );
    let (s, data) = accepted(&inbound).expect("inbound connection redirected to 15006");
    assert_eq!(
        original_dst(&s),
        "198.18.200.1:8080".parse::<SocketAddrV4>().unwrap()
    );
    assert_eq!(data, "in");
    let out = connect_from(&peer, None, "198.18.200.1", 15020, "probe");
    assert!(out.status.success(), "admin connect: {}", text(&out.stderr));
    let (s, data) = accepted(&admin).expect("admin port reached directly");
    assert_eq!(data, "probe");
    assert!(
        getsockopt(&s, sockopt::OriginalDst).is_err() || original_dst(&s).port() == 15020,
        "admin connection must not be redirected"
    );
    assert!(accepted(&inbound).is_none());
    assert!(accepted(&app).is_none(), "inbound bypassed the proxy");

    // The proxy forwards inbound traffic to the app on the pod IP as uid 1337: that
    // must reach the app, not loop back into 15006 or 15001.
    let out = connect_from(&pod, Some("1337"), "198.18.200.1", 8080, "fwd");
    assert!(out.status.success(), "proxy to app: {}", text(&out.stderr));
    let (_, data) = accepted(&app).expect("proxy reaches the app on the pod IP");
    assert_eq!(data, "fwd");
    // The app talking to itself over loopback bypasses the proxy too.
    let out = connect_from(&pod, None, "127.0.0.1", 8080, "self");
    assert!(out.status.success(), "app to itself: {}", text(&out.stderr));
    let (_, data) = accepted(&app).expect("loopback reaches the app directly");
    assert_eq!(data, "self");
    assert!(accepted(&inbound).is_none() && accepted(&outbound).is_none());

    // UDP is never captured: DNS keeps working.
    let dns = udp_in(&peer, SocketAddr::from(([198, 18, 200, 2], 53)));
    let out = run(&mut pod.cmd(&[
        "timeout",
        "5",
        "bash",
        "-c",
        "printf query >/dev/udp/198.18.200.2/53",
    ]));
    assert!(out.status.success(), "udp send: {}", text(&out.stderr));
    let mut buf = [0u8; 16];
    let (n, _) = dns
        .recv_from(&mut buf)
        .expect("UDP datagram reaches the peer directly");
    assert_eq!(&buf[..n], b"query");
}

fn udp_in(ns: &Netns, addr: SocketAddr) -> std::net::UdpSocket {
    let path = ns.path();
    std::thread::spawn(move || {
        let f = File::open(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
        setns(&f, CloneFlags::CLONE_NEWNET).expect("setns into the test namespace");
        let s = std::net::UdpSocket::bind(addr).unwrap_or_else(|e| panic!("bind {addr}: {e}"));
        s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        s
    })
    .join()
    .expect("udp thread")
}
