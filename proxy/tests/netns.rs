//! Real-kernel tests: the built `meshlet-proxy` runs as UID 1337 inside a throw-away
//! network namespace per test (`mlproxy-<test>-<pid>`, deleted by a Drop guard even
//! when the test panics) with iptables REDIRECT rules like meshlet-init's, so
//! `SO_ORIGINAL_DST` / `IP6T_SO_ORIGINAL_DST` are the kernel's, not a fake.
//!
//! A "ClusterIP" (198.19.99.10:80, [fd00:6d65:7368:99::10]:80) is DNATed to an app
//! on the namespace's own address (198.18.99.1:8080), as kube-proxy would.
//!
//! They need root, iptables and iproute2 and util-linux (`setpriv`); when something
//! is missing they FAIL saying what to install. Nothing touches the host namespace.

use std::{
    fs::File,
    io::{Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    process::{Child, Command},
    time::{Duration, Instant},
};

use nix::{
    sched::{setns, CloneFlags},
    sys::signal::Signal,
    unistd::Pid,
};

const BIN: &str = env!("CARGO_BIN_EXE_meshlet-proxy");
const POD_IP: &str = "198.18.99.1";
const POD_IP6: &str = "fd00:6d65:7368:99::1";
const CLUSTER_IP: &str = "198.19.99.10";
const CLUSTER_IP6: &str = "fd00:6d65:7368:99::10";

fn preflight() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "netns tests need root (they create network namespaces and program iptables inside them): \
         run `sudo -E cargo test -p meshlet-proxy --test netns`"
    );
    for tool in ["ip", "iptables", "ip6tables", "setpriv"] {
        let found = std::env::var_os("PATH")
            .map(|p| std::env::split_paths(&p).any(|d| d.join(tool).exists()))
            .unwrap_or(false);
        assert!(
            found,
            "netns tests need `{tool}` in PATH: apt-get install -y iptables iproute2 util-linux"
        );
    }
}

/// A network namespace owned by one test.
struct Netns {
    name: String,
}

impl Netns {
    fn new(test: &str) -> Self {
        preflight();
        let name = format!("mlproxy-{test}-{}", std::process::id());
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
        let out = Command::new("ip")
            .args(["netns", "add", &name])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "ip netns add {name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let ns = Self { name };
        for cmd in [
            "ip link set lo up",
            // No dummy module everywhere; a veth pair kept inside the namespace works.
            "ip link add pod0 type veth peer name pod1",
            "ip link set pod1 up",
            &format!("ip addr add {POD_IP}/24 dev pod0"),
            &format!("ip -6 addr add {POD_IP6}/64 dev pod0 nodad"),
            "ip link set pod0 up",
            // The "Service" range needs a route for the first routing decision;
            // the NAT rules then send the packets elsewhere.
            "ip route add 198.19.99.0/24 dev pod0",
        ] {
            ns.sh(cmd);
        }
        ns
    }

    fn sh(&self, cmd: &str) {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.name])
            .args(cmd.split_whitespace())
            .output()
            .unwrap_or_else(|e| panic!("{cmd}: {e}"));
        assert!(
            out.status.success(),
            "{cmd}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// The rules meshlet-init and kube-proxy would write, for the test's ClusterIPs.
    fn redirect(&self) {
        for (ipt, cip, app) in [
            ("iptables", CLUSTER_IP, format!("{POD_IP}:8080")),
            ("ip6tables", CLUSTER_IP6, format!("[{POD_IP6}]:8080")),
        ] {
            // The app's traffic goes to the sidecar; the sidecar's own (UID 1337) is
            // never redirected and reaches the "Service" through the node's DNAT.
            self.sh(&format!(
                "{ipt} -t nat -A OUTPUT -p tcp -d {cip} --dport 80 -m owner ! --uid-owner 1337 -j REDIRECT --to-ports 15001"
            ));
            self.sh(&format!(
                "{ipt} -t nat -A OUTPUT -p tcp -d {cip} --dport 80 -j DNAT --to-destination {app}"
            ));
        }
    }

    /// Runs `f` on a thread that has entered the namespace (sockets it creates live there).
    fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        let path = format!("/var/run/netns/{}", self.name);
        std::thread::spawn(move || {
            let fd = File::open(&path).unwrap_or_else(|e| panic!("open {path}: {e}"));
            setns(fd, CloneFlags::CLONE_NEWNET).expect("setns");
            f()
        })
        .join()
        .expect("netns thread")
    }

    /// Starts an app that answers every request with `hello from app` on `addr`.
    fn app(&self, addr: SocketAddr) {
        let listener = self.run(move || TcpListener::bind(addr).expect("bind app"));
        std::thread::spawn(move || {
            for mut s in listener.incoming().flatten() {
                let mut head = Vec::new();
                let mut b = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") && s.read(&mut b).map(|n| n > 0).unwrap_or(false)
                {
                    head.push(b[0]);
                }
                let _ = s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 14\r\nConnection: close\r\n\r\nhello from app");
            }
        });
    }

    /// Starts the proxy binary as UID 1337, like the injected sidecar.
    fn proxy(&self) -> Proxy {
        self.proxy_bin(BIN)
    }

    fn proxy_bin(&self, bin: &str) -> Proxy {
        self.proxy_as(bin, 1337, &[])
    }

    /// Starts `bin` as `uid` with extra env `vars`; waits for its admin `/ready`.
    fn proxy_as(&self, bin: &str, uid: u32, vars: &[(&str, &str)]) -> Proxy {
        let uid = uid.to_string();
        let child = Command::new("ip")
            .args([
                "netns",
                "exec",
                &self.name,
                "setpriv",
                "--reuid",
                &uid,
                "--regid",
                &uid,
                "--clear-groups",
                bin,
            ])
            .env("MESHLET_POD_IP", POD_IP)
            .env("MESHLET_DRAIN_TIMEOUT", "2s")
            .env("MESHLET_LOG", "warn")
            .envs(vars.iter().copied())
            .spawn()
            .expect("spawn meshlet-proxy");
        let p = Proxy { child };
        let admin = vars
            .iter()
            .find(|(k, _)| *k == "MESHLET_ADMIN_ADDR")
            .map_or("127.0.0.1:15020", |(_, v)| v);
        let admin: SocketAddr = admin.replace("0.0.0.0", "127.0.0.1").parse().unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while self
            .request(admin, "/ready")
            .map(|r| !r.starts_with("HTTP/1.1 200"))
            .unwrap_or(true)
        {
            assert!(Instant::now() < deadline, "proxy never became ready");
            std::thread::sleep(Duration::from_millis(20));
        }
        p
    }

    /// One HTTP/1.1 request from inside the namespace (as root, so it is redirected).
    fn request(&self, addr: SocketAddr, path: &str) -> std::io::Result<String> {
        let path = path.to_string();
        self.run(move || {
            let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
            s.set_read_timeout(Some(Duration::from_secs(5)))?;
            write!(
                s,
                "GET {path} HTTP/1.1\r\nHost: web.shop\r\nConnection: close\r\n\r\n"
            )?;
            let mut out = String::new();
            s.read_to_string(&mut out)?;
            Ok(out)
        })
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

struct Proxy {
    child: Child,
}

impl Proxy {
    fn terminate(mut self) -> Option<i32> {
        nix::sys::signal::kill(Pid::from_raw(self.child.id() as i32), Signal::SIGTERM).unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return s.code();
            }
            assert!(Instant::now() < deadline, "no exit after SIGTERM");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn redirected_ipv4_and_ipv6_reach_the_original_destination() {
    let ns = Netns::new("origdst");
    ns.redirect();
    ns.app(format!("{POD_IP}:8080").parse().unwrap());
    ns.app(format!("[{POD_IP6}]:8080").parse().unwrap());
    let proxy = ns.proxy();

    for cip in [format!("{CLUSTER_IP}:80"), format!("[{CLUSTER_IP6}]:80")] {
        let rsp = ns.request(cip.parse().unwrap(), "/hello").unwrap();
        assert!(
            rsp.starts_with("HTTP/1.1 200") && rsp.ends_with("hello from app"),
            "{cip}: {rsp}"
        );
    }

    // A connection straight to the sidecar's port has itself as original destination.
    let looped = ns
        .request(format!("{POD_IP}:15001").parse().unwrap(), "/")
        .unwrap_or_default();
    assert_eq!(looped, "", "a loop gets no answer");

    let metrics = ns
        .request("127.0.0.1:15020".parse().unwrap(), "/metrics")
        .unwrap();
    assert!(
        metrics.contains(r#"meshlet_requests_total{direction="outbound",service="unknown",status_code="200",tls="false"} 2"#),
        "{metrics}"
    );
    assert!(metrics.contains(r#"reason="loop"} 1"#), "{metrics}");
    assert_eq!(proxy.terminate(), Some(0));
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn cpu_secs(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    meshlet_proxy::metrics::cpu_seconds(&stat).unwrap_or(0.0)
}

/// Latency percentiles (µs) of `conns` keep-alive HTTP/1.1 connections to `addr`, each
/// sending one request every `conns` ms (so 1000 req/s in total) for `secs`.
fn latency(ns: &Netns, addr: SocketAddr, conns: usize, secs: u64) -> (u64, u64, u64, usize) {
    let path = format!("/var/run/netns/{}", ns.name);
    std::thread::spawn(move || {
        setns(File::open(&path).unwrap(), CloneFlags::CLONE_NEWNET).unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let mut tasks = Vec::new();
            for _ in 0..conns {
                tasks.push(tokio::spawn(async move {
                    let mut tx = meshlet_proxy::test_util::h1_client::<
                        http_body_util::Empty<bytes::Bytes>,
                    >(addr)
                    .await;
                    let mut tick = tokio::time::interval(Duration::from_millis(conns as u64));
                    let end = Instant::now() + Duration::from_secs(secs);
                    let mut samples = Vec::new();
                    while Instant::now() < end {
                        tick.tick().await;
                        let start = Instant::now();
                        tx.ready().await.unwrap();
                        let req = http::Request::get("/")
                            .header("host", "web.shop")
                            .body(Default::default())
                            .unwrap();
                        let rsp = tx.send_request(req).await.unwrap();
                        assert!(rsp.status().is_success());
                        meshlet_proxy::test_util::body_bytes(rsp.into_body()).await;
                        samples.push(start.elapsed().as_micros() as u64);
                    }
                    samples
                }));
            }
            let mut all = Vec::new();
            for t in tasks {
                all.extend(t.await.unwrap());
            }
            all.sort_unstable();
            let pct = |p: f64| all[((all.len() as f64 * p) as usize).min(all.len() - 1)];
            (pct(0.5), pct(0.99), pct(0.999), all.len())
        })
    })
    .join()
    .unwrap()
}

/// Resident memory idle and at 1000 req/s, and the latency a client + server sidecar
/// pair adds. A measurement, not a regression test: run it with
/// `MESHLET_PROXY_BIN=/abs/path/target/release/meshlet-proxy cargo test -p meshlet-proxy --test netns -- --ignored --nocapture`.
///
/// One namespace plays both pods: the app's connect to the ClusterIP goes to the
/// client sidecar (UID 1337, 15001), whose connect is redirected to the server
/// sidecar (UID 1338, inbound 25006), whose connect is DNATed to the app.
#[test]
#[ignore]
fn measure_rss_and_latency() {
    let bin = std::env::var("MESHLET_PROXY_BIN").unwrap_or_else(|_| BIN.to_string());
    let ns = Netns::new("measure");
    for rule in [
        format!("iptables -t nat -A OUTPUT -p tcp -d {CLUSTER_IP} --dport 80 -m owner --uid-owner 1337 -j REDIRECT --to-ports 25006"),
        format!("iptables -t nat -A OUTPUT -p tcp -d {CLUSTER_IP} --dport 80 -m owner --uid-owner 1338 -j DNAT --to-destination {POD_IP}:8080"),
        format!("iptables -t nat -A OUTPUT -p tcp -d {CLUSTER_IP} --dport 80 -j REDIRECT --to-ports 15001"),
    ] {
        ns.sh(&rule);
    }
    let app: SocketAddr = format!("{POD_IP}:8080").parse().unwrap();
    let path = format!("/var/run/netns/{}", ns.name);
    std::thread::spawn(move || {
        setns(File::open(&path).unwrap(), CloneFlags::CLONE_NEWNET).unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            meshlet_proxy::test_util::http_server_on(app, false).await;
            std::future::pending::<()>().await
        });
    });
    std::thread::sleep(Duration::from_millis(200));
    // MESHLET_MEASURE_MTLS=1: the pair speaks mesh mTLS (identities from the mesh CA,
    // the ClusterIP marked meshed in the client's mesh config).
    let pki = std::env::var_os("MESHLET_MEASURE_MTLS").map(|_| mtls_files());
    let dir = |name: &str| {
        pki.as_ref()
            .map(|d| d.path().join(name).to_str().unwrap().to_string())
    };
    let (client_id, server_id, mesh) = (dir("client"), dir("server"), dir("mesh.json"));
    let mut client_env = Vec::new();
    let mut server_env = vec![
        ("MESHLET_OUTBOUND_ADDR", "127.0.0.1:25001"),
        ("MESHLET_INBOUND_ADDR", "0.0.0.0:25006"),
        ("MESHLET_ADMIN_ADDR", "127.0.0.1:25020"),
    ];
    if let (Some(c), Some(s), Some(m)) = (&client_id, &server_id, &mesh) {
        client_env.push(("MESHLET_IDENTITY_DIR", c.as_str()));
        client_env.push(("MESHLET_CONFIG_PATH", m.as_str()));
        server_env.push(("MESHLET_IDENTITY_DIR", s.as_str()));
    }
    let client = ns.proxy_as(&bin, 1337, &client_env);
    let server = ns.proxy_as(&bin, 1338, &server_env);
    std::thread::sleep(Duration::from_millis(500));
    let idle = (rss_kib(client.child.id()), rss_kib(server.child.id()));

    let pids = [client.child.id(), server.child.id()];
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let s = stop.clone();
    let sampler = std::thread::spawn(move || {
        let mut peak = 0;
        while !s.load(std::sync::atomic::Ordering::Relaxed) {
            for p in pids {
                peak = peak.max(rss_kib(p));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        peak
    });
    let direct = latency(&ns, app, 10, 10);
    let cpu_before = (cpu_secs(pids[0]), cpu_secs(pids[1]));
    let through = latency(&ns, format!("{CLUSTER_IP}:80").parse().unwrap(), 10, 10);
    let cpu = (
        cpu_secs(pids[0]) - cpu_before.0,
        cpu_secs(pids[1]) - cpu_before.1,
    );
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let peak = sampler.join().unwrap();
    eprintln!("binary: {bin}, mTLS: {}", pki.is_some());
    eprintln!(
        "idle RSS: client {} KiB, server {} KiB; peak at 1000 req/s: {peak} KiB",
        idle.0, idle.1
    );
    eprintln!(
        "direct       p50 {}us p99 {}us p99.9 {}us ({} requests)",
        direct.0, direct.1, direct.2, direct.3
    );
    eprintln!(
        "sidecar pair p50 {}us p99 {}us p99.9 {}us ({} requests)",
        through.0, through.1, through.2, through.3
    );
    eprintln!(
        "added: p50 {}us p99 {}us",
        through.0.saturating_sub(direct.0),
        through.1.saturating_sub(direct.1)
    );
    let per_k = |c: f64| c * 1000.0 / through.3 as f64;
    eprintln!(
        "CPU-seconds per 1000 requests: client sidecar {:.3}, server sidecar {:.3}",
        per_k(cpu.0),
        per_k(cpu.1)
    );
    if pki.is_some() {
        let m = ns
            .request("127.0.0.1:25020".parse().unwrap(), "/metrics")
            .unwrap();
        assert!(
            m.contains(r#"tls="true",peer_identity="spiffe://cluster.local/ns/shop/sa/client""#),
            "the pair spoke mTLS:\n{m}"
        );
    }
    assert_eq!(client.terminate(), Some(0));
    assert_eq!(server.terminate(), Some(0));
}

/// Identities for the measured pair, readable by their UIDs: `client/` (1337),
/// `server/` (1338) and the client's `mesh.json`.
fn mtls_files() -> tempfile::TempDir {
    use meshlet_injector::ca::{self, Ca};
    use std::os::unix::fs::{chown, PermissionsExt};
    let root = tempfile::tempdir().unwrap();
    std::fs::set_permissions(root.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let ca = Ca::generate("cluster.local", ca::DEFAULT_CA_LIFETIME).unwrap();
    for (name, sa, uid) in [("client", "client", 1337), ("server", "web", 1338)] {
        let id = meshlet_api::SpiffeId::new("cluster.local", "shop", sa).unwrap();
        let d = root.path().join(name);
        ca::write_identity_dir(&d, &ca.issue(&id, ca::DEFAULT_LIFETIME).unwrap()).unwrap();
        for f in ["", "ca.pem", "cert.pem", "key.pem"] {
            chown(d.join(f), Some(uid), Some(uid)).unwrap();
        }
    }
    let mesh = serde_json::json!({"services": [{
        "name": "web", "namespace": "shop", "clusterIPs": [CLUSTER_IP],
        "ports": [{"port": 80}], "meshed": true,
        "identities": ["spiffe://cluster.local/ns/shop/sa/web"],
    }]});
    std::fs::write(root.path().join("mesh.json"), mesh.to_string()).unwrap();
    root
}
