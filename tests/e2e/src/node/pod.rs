//! One pod's life on the node, on a thread of its own: network namespace, init
//! containers in order, native sidecars (started once their startup probe passes),
//! app containers (postStart hooks run to completion), probes, restarts, and on
//! delete SIGTERM to the app containers, then to the sidecars in reverse order,
//! SIGKILL at the end of the grace period, and the namespace removed.

use std::{
    fs::{self, File},
    net::{Ipv4Addr, SocketAddr, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Condvar, Mutex,
    },
    time::{Duration, Instant},
};

use k8s_openapi::{
    api::core::v1::{Container, Pod, Probe},
    apimachinery::pkg::{apis::meta::v1::Time, util::intstr::IntOrString},
};
use nix::{sys::signal::Signal, unistd::Pid};

use super::{
    api::now,
    lock,
    prep::{self, Kind, Prepared},
    Agent, Error,
};
use crate::cluster::{http_in, netns, Netns};

/// How a container is doing.
#[derive(Clone, Debug)]
pub enum Run {
    /// Not started (reason, message).
    Waiting(String, Option<String>),
    /// Running since.
    Running(Time),
    /// Exited.
    Terminated(Terminated),
}

/// How a container ended.
#[derive(Clone, Debug)]
pub struct Terminated {
    /// Exit code (128 + signal when killed).
    pub exit_code: i32,
    /// The signal that killed it.
    pub signal: Option<i32>,
    /// `Completed` or `Error`.
    pub reason: String,
    /// When it started.
    pub started: Option<Time>,
    /// When it ended.
    pub finished: Time,
}

/// One container's status.
#[derive(Clone, Debug)]
pub struct CState {
    /// Name.
    pub name: String,
    /// Image.
    pub image: String,
    /// Its place in the lifecycle.
    pub kind: Kind,
    /// State.
    pub run: Run,
    /// Last termination, after a restart.
    pub last: Option<Terminated>,
    /// Readiness.
    pub ready: bool,
    /// Startup probe passed (or none).
    pub started: bool,
    /// Restarts.
    pub restarts: i32,
    /// Process id while it runs.
    pub pid: Option<i32>,
}

/// A pod's status as the worker sees it.
#[derive(Clone, Debug)]
pub struct PodState {
    /// The pod as bound.
    pub pod: Pod,
    /// Pod IP once the network is up.
    pub ip: Option<Ipv4Addr>,
    /// When the worker started.
    pub start_time: Option<Time>,
    /// `Pending`, `Running`, `Succeeded`, `Failed`.
    pub phase: &'static str,
    /// The sandbox (namespace) exists.
    pub net_ready: bool,
    /// All init containers completed.
    pub initialized: bool,
    /// Init containers first, then app containers.
    pub containers: Vec<CState>,
    /// Why the pod cannot start, when it cannot.
    pub message: Option<String>,
    /// Condition type -> (status, last transition).
    pub transitions: std::collections::BTreeMap<String, (bool, Time)>,
}

/// How to start a process in one of the pod's containers ([`container_command`]).
#[derive(Debug)]
pub struct ExecTarget {
    /// The pod's network namespace.
    pub netns: String,
    /// The pod's directory (volumes, stages, logs).
    pub dir: PathBuf,
    /// Its containers, init containers first.
    pub containers: Vec<Prepared>,
}

/// What the agent and the worker thread share about one pod.
pub struct PodShared {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
    /// Uid.
    pub uid: String,
    /// Status.
    pub state: Mutex<PodState>,
    /// What `kubectl exec` needs, once the pod's containers are prepared.
    pub exec: Mutex<Option<Arc<ExecTarget>>>,
    deadline: Mutex<Option<Instant>>,
    wake: Condvar,
    deleted: AtomicBool,
    gone: AtomicBool,
}

impl PodShared {
    /// A pod about to start.
    pub fn new(pod: &Pod) -> Self {
        let spec = pod.spec.clone().unwrap_or_default();
        let c = |c: &Container, kind| CState {
            name: c.name.clone(),
            image: c.image.clone().unwrap_or_default(),
            kind,
            run: Run::Waiting(
                if kind == Kind::App || kind == Kind::Sidecar {
                    "PodInitializing".into()
                } else {
                    "ContainerCreating".into()
                },
                None,
            ),
            last: None,
            ready: false,
            started: false,
            restarts: 0,
            pid: None,
        };
        let containers = spec
            .init_containers
            .iter()
            .flatten()
            .map(|x| {
                c(
                    x,
                    if x.restart_policy.as_deref() == Some("Always") {
                        Kind::Sidecar
                    } else {
                        Kind::Init
                    },
                )
            })
            .chain(spec.containers.iter().map(|x| c(x, Kind::App)))
            .collect();
        Self {
            namespace: pod.metadata.namespace.clone().unwrap_or_default(),
            name: pod.metadata.name.clone().unwrap_or_default(),
            uid: pod.metadata.uid.clone().unwrap_or_default(),
            state: Mutex::new(PodState {
                pod: pod.clone(),
                ip: None,
                start_time: None,
                phase: "Pending",
                net_ready: false,
                initialized: false,
                containers,
                message: None,
                transitions: Default::default(),
            }),
            exec: Mutex::new(None),
            deadline: Mutex::new(None),
            wake: Condvar::new(),
            deleted: AtomicBool::new(false),
            gone: AtomicBool::new(false),
        }
    }

    /// Asks the worker to stop within `grace` (a shorter grace than asked before wins).
    pub fn terminate(&self, grace: Duration) {
        let mut d = lock(&self.deadline);
        let new = Instant::now() + grace;
        if d.is_none_or(|old| new < old) {
            *d = Some(new);
        }
        self.wake.notify_all();
    }

    /// When the worker must have stopped, once deletion was asked for.
    pub fn deadline(&self) -> Option<Instant> {
        *lock(&self.deadline)
    }

    /// The pod object is already gone from the API.
    pub fn set_deleted(&self) {
        self.deleted.store(true, Ordering::SeqCst);
    }

    /// Whether the pod object is already gone from the API.
    pub fn deleted(&self) -> bool {
        self.deleted.load(Ordering::SeqCst)
    }

    /// The worker has stopped everything and removed the namespace.
    pub fn gone(&self) -> bool {
        self.gone.load(Ordering::SeqCst)
    }

    /// Sleeps up to `d`, waking early when termination is asked for; true when it was.
    fn sleep(&self, d: Duration) -> bool {
        let g = lock(&self.deadline);
        if g.is_some() {
            return true;
        }
        let (g, _) = self
            .wake
            .wait_timeout(g, d)
            .unwrap_or_else(|p| p.into_inner());
        g.is_some()
    }

    fn stopping(&self) -> bool {
        lock(&self.deadline).is_some()
    }
}

/// Prepares the pod (address, env, volumes) and starts its worker thread; a pod
/// that cannot be prepared (a missing ConfigMap) is retried every 2 s until deleted.
pub async fn start(agent: Agent, pod: Pod, shared: Arc<PodShared>) {
    let key = format!("{}/{}", shared.namespace, shared.name);
    let dir = agent.cfg.state_dir.join("pods").join(format!(
        "{}_{}_{}",
        shared.namespace, shared.name, shared.uid
    ));
    let ip = match agent.net.allocate() {
        Ok(ip) => ip,
        Err(e) => {
            fail_prepare(&agent, &shared, e.to_string());
            return wait_gone(agent, shared, None).await;
        }
    };
    let prepared = loop {
        let r = async {
            let (v, tokens) = prep::volumes(&agent, &pod, ip, &dir).await?;
            let c = prep::containers(&agent, &pod, ip, &v).await?;
            Ok::<_, Error>((c, tokens))
        }
        .await;
        match r {
            Ok(p) => break p,
            Err(e) => {
                tracing::warn!(pod = %key, error = %e, "cannot start the pod yet");
                fail_prepare(&agent, &shared, e.to_string());
                for _ in 0..20 {
                    if shared.stopping() {
                        return wait_gone(agent, shared, Some(ip)).await;
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    };
    let (containers, tokens) = prepared;
    *lock(&shared.exec) = Some(Arc::new(ExecTarget {
        netns: agent.net.pod_ns_name(&shared.namespace, &shared.name),
        dir: dir.clone(),
        containers: containers.clone(),
    }));
    let s2 = shared.clone();
    tokio::spawn(prep::refresh_tokens(
        agent.client.clone(),
        pod.clone(),
        tokens,
        agent.cfg.token_refresh,
        move || s2.gone(),
    ));
    let w = Worker {
        agent: agent.clone(),
        shared: shared.clone(),
        containers,
        procs: Vec::new(),
        ip,
        dir,
        probes: Vec::new(),
    };
    let spawned = std::thread::Builder::new()
        .name(format!("pod-{}", shared.name))
        .spawn(move || w.run());
    if let Err(e) = spawned {
        tracing::error!(pod = %key, error = %e, "cannot start a pod thread");
    }
}

fn fail_prepare(agent: &Agent, shared: &Arc<PodShared>, msg: String) {
    let mut st = lock(&shared.state);
    for c in &mut st.containers {
        c.run = Run::Waiting("CreateContainerConfigError".into(), Some(msg.clone()));
    }
    st.message = Some(msg);
    drop(st);
    let _ = agent.status_tx.send(shared.clone());
}

async fn wait_gone(agent: Agent, shared: Arc<PodShared>, ip: Option<Ipv4Addr>) {
    if let Some(ip) = ip {
        agent.net.release(ip);
    }
    shared.gone.store(true, Ordering::SeqCst);
    let _ = agent.status_tx.send(shared);
}

/// The command that runs `bin args` as container `c` of the pod whose directory
/// is `dir`: inside the pod's network namespace, with the container's volume
/// mounts (a mount namespace of its own), user, group and environment. Container
/// processes, exec probes, hooks and `kubectl exec` all start through it.
pub fn container_command(
    ns: &Netns,
    dir: &Path,
    pod_name: &str,
    c: &Prepared,
    bin: &Path,
    args: &[String],
) -> Command {
    let mut argv: Vec<std::ffi::OsString> = Vec::new();
    if !c.mounts.is_empty() {
        // Volumes appear at their mountPath in a mount namespace of the
        // container's own; the script execs the rest of argv, so the pid stays.
        let stage = dir.join("stage").join(&c.spec.name);
        let _ = fs::create_dir_all(&stage);
        argv.extend(
            [
                "unshare",
                "--mount",
                "--propagation",
                "private",
                "bash",
                "-c",
            ]
            .map(Into::into),
        );
        argv.push(prep::mount_script(&c.mounts, &stage, bin).into());
        argv.push("meshlet-mounts".into());
    }
    if c.uid != 0 || c.gid != 0 {
        argv.push("setpriv".into());
        argv.push(format!("--reuid={}", c.uid).into());
        argv.push(format!("--regid={}", c.gid).into());
        argv.push("--clear-groups".into());
    }
    argv.push(bin.into());
    argv.extend(args.iter().map(Into::into));
    let mut cmd = ns.command(&argv[0]);
    cmd.args(&argv[1..]);
    cmd.env_clear()
        .env("PATH", netns::SYSTEM_PATH)
        .env("HOSTNAME", pod_name)
        .envs(c.env.iter().map(|(k, v)| (k, v)));
    cmd
}

#[derive(Clone, Copy, Default)]
struct ProbeState {
    next: Option<Instant>,
    ok_once: bool,
    fails: i32,
}

struct Worker {
    agent: Agent,
    shared: Arc<PodShared>,
    containers: Vec<Prepared>,
    procs: Vec<Option<(Child, Time)>>,
    ip: Ipv4Addr,
    dir: PathBuf,
    /// (startup, readiness, liveness) per container.
    probes: Vec<[ProbeState; 3]>,
}

enum ProbeResult {
    Ok,
    Fail(String),
}

impl Worker {
    fn notify(&self) {
        let _ = self.agent.status_tx.send(self.shared.clone());
    }

    fn key(&self) -> String {
        format!("{}/{}", self.shared.namespace, self.shared.name)
    }

    fn set<F: FnOnce(&mut PodState)>(&self, f: F) {
        f(&mut lock(&self.shared.state));
        self.notify();
    }

    fn run(mut self) {
        let n = self.containers.len();
        self.procs = (0..n).map(|_| None).collect();
        self.probes = vec![[ProbeState::default(); 3]; n];
        let _ = fs::create_dir_all(self.dir.join("logs"));
        let ns = match self
            .agent
            .net
            .add_pod(&self.shared.namespace, &self.shared.name, self.ip)
        {
            Ok(ns) => ns,
            Err(e) => {
                tracing::error!(pod = %self.key(), error = %e, "pod network");
                self.set(|s| s.message = Some(format!("pod network: {e}")));
                while !self.shared.sleep(Duration::from_secs(1)) {}
                self.agent.net.release(self.ip);
                self.shared.gone.store(true, Ordering::SeqCst);
                self.notify();
                return;
            }
        };
        let ip = self.ip;
        self.set(|s| {
            s.ip = Some(ip);
            s.start_time = Some(now());
            s.net_ready = true;
        });
        if self.init_phase(&ns) {
            self.set(|s| {
                s.initialized = true;
                s.phase = "Running";
            });
            for i in 0..n {
                if self.containers[i].kind == Kind::App && !self.shared.stopping() {
                    self.start_container(&ns, i);
                }
            }
            self.main_loop(&ns);
        }
        self.teardown(&ns);
    }

    /// Init containers and sidecars in order; false when the pod stops meanwhile.
    fn init_phase(&mut self, ns: &Netns) -> bool {
        let restart_never = self.restart_policy() == "Never";
        for i in 0..self.containers.len() {
            match self.containers[i].kind {
                Kind::App => {}
                Kind::Sidecar => {
                    self.start_container(ns, i);
                    // The next init container starts once the startup probe passes.
                    while !lock(&self.shared.state).containers[i].started {
                        if self.shared.sleep(Duration::from_millis(100)) {
                            return false;
                        }
                        self.tick(ns);
                    }
                }
                Kind::Init => {
                    let mut backoff = Duration::from_secs(1);
                    loop {
                        if self.shared.stopping() {
                            return false;
                        }
                        match self.run_to_completion(ns, i) {
                            Some(0) => break,
                            Some(_) if restart_never => {
                                self.set(|s| s.phase = "Failed");
                                while !self.shared.sleep(Duration::from_secs(1)) {}
                                return false;
                            }
                            Some(_) => {
                                if self.shared.sleep(backoff) {
                                    return false;
                                }
                                backoff = (backoff * 2).min(Duration::from_secs(10));
                                lock(&self.shared.state).containers[i].restarts += 1;
                            }
                            None => return false,
                        }
                    }
                }
            }
        }
        true
    }

    fn restart_policy(&self) -> String {
        lock(&self.shared.state)
            .pod
            .spec
            .as_ref()
            .and_then(|s| s.restart_policy.clone())
            .unwrap_or_else(|| "Always".into())
    }

    fn command(&self, ns: &Netns, c: &Prepared, argv: Option<(&PathBuf, &[String])>) -> Command {
        let (bin, args) = argv.unwrap_or((&c.bin, &c.args));
        container_command(ns, &self.dir, &self.shared.name, c, bin, args)
    }

    fn log_file(&self, c: &Prepared) -> Option<(File, File)> {
        let path = self.dir.join("logs").join(format!("{}.log", c.spec.name));
        let f = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .ok()?;
        let f2 = f.try_clone().ok()?;
        Some((f, f2))
    }

    fn spawn(&mut self, ns: &Netns, i: usize) -> Result<(), String> {
        let c = &self.containers[i];
        let mut cmd = self.command(ns, c, None);
        cmd.stdin(Stdio::null());
        if let Some((a, b)) = self.log_file(c) {
            cmd.stdout(a).stderr(b);
        }
        let child = cmd
            .spawn()
            .map_err(|e| format!("starting {}: {e}", c.spec.name))?;
        let t = now();
        let pid = child.id() as i32;
        let has_startup = c.spec.startup_probe.is_some();
        let kind = c.kind;
        self.procs[i] = Some((child, t.clone()));
        self.probes[i] = [ProbeState::default(); 3];
        self.set(|s| {
            let cs = &mut s.containers[i];
            cs.run = Run::Running(t);
            cs.pid = Some(pid);
            cs.started = !has_startup || kind == Kind::Init;
            cs.ready = false;
        });
        Ok(())
    }

    /// Starts container `i` and runs its postStart exec hook to completion.
    fn start_container(&mut self, ns: &Netns, i: usize) {
        if let Err(e) = self.spawn(ns, i) {
            self.set(|s| {
                s.containers[i].run = Run::Waiting("RunContainerError".into(), Some(e));
            });
            return;
        }
        let hook = self.containers[i]
            .spec
            .lifecycle
            .as_ref()
            .and_then(|l| l.post_start.as_ref())
            .and_then(|h| h.exec.as_ref())
            .and_then(|e| e.command.clone());
        if let Some(argv) = hook {
            let ok = self.exec_in(ns, i, &argv, Duration::from_secs(15));
            if let Err(e) = ok {
                tracing::warn!(pod = %self.key(), container = %self.containers[i].spec.name, error = %e, "postStart hook failed; killing the container");
                if let Some((child, _)) = self.procs[i].as_mut() {
                    let _ = child.kill();
                }
            }
        }
    }

    /// Runs `argv` in the container's context (exec probes and hooks).
    fn exec_in(&self, ns: &Netns, i: usize, argv: &[String], t: Duration) -> Result<(), String> {
        let c = &self.containers[i];
        let first = argv.first().ok_or("empty command")?;
        // The image table applies to exec commands too (meshlet binaries by name).
        let probe_c = Container {
            command: Some(argv.to_vec()),
            ..c.spec.clone()
        };
        let (bin, args) = self.agent.cfg.bins.resolve(&probe_c).unwrap_or_else(|_| {
            let bin = prep::which(first).unwrap_or_else(|| PathBuf::from(first));
            (bin, argv[1..].to_vec())
        });
        let mut cmd = self.command(ns, c, Some((&bin, &args)));
        let out = netns::run_with_timeout(&mut cmd, t).map_err(|e| e.to_string())?;
        if out.status.success() {
            Ok(())
        } else {
            Err(format!(
                "{argv:?} exited {}: {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ))
        }
    }

    /// Runs an init container; its exit code, or None when the pod stops meanwhile.
    fn run_to_completion(&mut self, ns: &Netns, i: usize) -> Option<i32> {
        if let Err(e) = self.spawn(ns, i) {
            self.set(|s| {
                s.containers[i].run = Run::Waiting("RunContainerError".into(), Some(e));
            });
            return Some(1);
        }
        let deadline = Instant::now() + Duration::from_secs(300);
        loop {
            if let Some(t) = self.reap(i) {
                return Some(t.exit_code);
            }
            if self.shared.sleep(Duration::from_millis(20)) || Instant::now() > deadline {
                return None;
            }
        }
    }

    /// If container `i` exited, records it and returns how it ended.
    fn reap(&mut self, i: usize) -> Option<Terminated> {
        let (child, started) = self.procs[i].as_mut()?;
        let st = child.try_wait().ok().flatten()?;
        let started = started.clone();
        self.procs[i] = None;
        use std::os::unix::process::ExitStatusExt;
        let signal = st.signal();
        let exit_code = st.code().unwrap_or(128 + signal.unwrap_or(0));
        let t = Terminated {
            exit_code,
            signal,
            reason: if exit_code == 0 { "Completed" } else { "Error" }.into(),
            started: Some(started),
            finished: now(),
        };
        let tt = t.clone();
        self.set(|s| {
            let cs = &mut s.containers[i];
            cs.run = Run::Terminated(tt);
            cs.pid = None;
            cs.ready = false;
        });
        Some(t)
    }

    fn probe(&self, i: usize, p: &Probe) -> ProbeResult {
        let c = &self.containers[i].spec;
        let node = self.agent.net.node();
        let port_of = |port: &IntOrString| match port {
            IntOrString::Int(n) => u16::try_from(*n).ok(),
            IntOrString::String(name) => c
                .ports
                .iter()
                .flatten()
                .find(|cp| cp.name.as_deref() == Some(name.as_str()))
                .and_then(|cp| u16::try_from(cp.container_port).ok()),
        };
        if let Some(h) = &p.http_get {
            let Some(port) = port_of(&h.port) else {
                return ProbeResult::Fail(format!("probe port {:?} does not resolve", h.port));
            };
            let addr = SocketAddr::from((self.ip, port));
            let path = h.path.as_deref().unwrap_or("/");
            if h.scheme.as_deref() == Some("HTTPS") {
                // The kubelet does not verify a probe's certificate; neither does curl -k.
                let url = format!("https://{addr}{path}");
                let mut cmd = node.command("curl");
                cmd.args([
                    "-ksS",
                    "-o",
                    "/dev/null",
                    "-w",
                    "%{http_code}",
                    "-m",
                    "2",
                    &url,
                ]);
                return match netns::run_with_timeout(&mut cmd, Duration::from_secs(3)) {
                    Ok(out) => {
                        let code: u16 = String::from_utf8_lossy(&out.stdout)
                            .trim()
                            .parse()
                            .unwrap_or(0);
                        if (200..400).contains(&code) {
                            ProbeResult::Ok
                        } else {
                            ProbeResult::Fail(format!(
                                "GET {url}: {code} {}",
                                String::from_utf8_lossy(&out.stderr).trim()
                            ))
                        }
                    }
                    Err(e) => ProbeResult::Fail(e.to_string()),
                };
            }
            return match http_in(node, addr, "GET", path) {
                Ok((s, _)) if (200..400).contains(&s) => ProbeResult::Ok,
                Ok((s, b)) => ProbeResult::Fail(format!("HTTP {s}: {}", b.trim())),
                Err(e) => ProbeResult::Fail(e.to_string()),
            };
        }
        if let Some(t) = &p.tcp_socket {
            let Some(port) = port_of(&t.port) else {
                return ProbeResult::Fail(format!("probe port {:?} does not resolve", t.port));
            };
            let addr = SocketAddr::from((self.ip, port));
            return match node
                .enter(move || TcpStream::connect_timeout(&addr, Duration::from_secs(1)))
            {
                Ok(Ok(_)) => ProbeResult::Ok,
                Ok(Err(e)) => ProbeResult::Fail(e.to_string()),
                Err(e) => ProbeResult::Fail(e.to_string()),
            };
        }
        if let Some(e) = p.exec.as_ref().and_then(|e| e.command.clone()) {
            let ns = Netns::existing(
                &self
                    .agent
                    .net
                    .pod_ns_name(&self.shared.namespace, &self.shared.name),
            );
            let t = Duration::from_secs(p.timeout_seconds.unwrap_or(1).max(1) as u64);
            return match self.exec_in(&ns, i, &e, t) {
                Ok(()) => ProbeResult::Ok,
                Err(e) => ProbeResult::Fail(e),
            };
        }
        ProbeResult::Ok
    }

    /// One round: reap exits, restart what must restart, run due probes.
    fn tick(&mut self, ns: &Netns) {
        let policy = self.restart_policy();
        for i in 0..self.containers.len() {
            let kind = self.containers[i].kind;
            if kind == Kind::Init {
                continue;
            }
            if let Some(t) = self.reap(i) {
                tracing::info!(pod = %self.key(), container = %self.containers[i].spec.name, code = t.exit_code, "container exited");
                let again = kind == Kind::Sidecar
                    || policy == "Always"
                    || (policy == "OnFailure" && t.exit_code != 0);
                if again && !self.shared.stopping() {
                    let restarts = {
                        let mut s = lock(&self.shared.state);
                        let cs = &mut s.containers[i];
                        cs.restarts += 1;
                        cs.last = Some(t);
                        cs.restarts
                    };
                    // Back off like the kubelet (10 s doubling), shortened for tests.
                    let wait = Duration::from_millis(500 * (1 << restarts.clamp(0, 5)) as u64);
                    if self.shared.sleep(wait) {
                        return;
                    }
                    self.start_container(ns, i);
                }
                continue;
            }
            if self.procs[i].is_none() {
                continue;
            }
            self.run_probes(i);
        }
        self.update_phase();
    }

    fn run_probes(&mut self, i: usize) {
        let spec = self.containers[i].spec.clone();
        let started = lock(&self.shared.state).containers[i].started;
        let now_i = Instant::now();
        let kinds: [(usize, Option<&Probe>); 3] = [
            (0, spec.startup_probe.as_ref().filter(|_| !started)),
            (1, spec.readiness_probe.as_ref().filter(|_| started)),
            (2, spec.liveness_probe.as_ref().filter(|_| started)),
        ];
        for (k, p) in kinds {
            let Some(p) = p else { continue };
            let ps = self.probes[i][k];
            let period = Duration::from_secs(p.period_seconds.unwrap_or(10).clamp(1, 10) as u64);
            let delay = Duration::from_secs(p.initial_delay_seconds.unwrap_or(0).max(0) as u64);
            if ps.next.is_none() && k == 2 {
                // Liveness waits a whole period (at least its initial delay) first, as
                // the kubelet's does: an app still starting is not dead.
                self.probes[i][k].next = Some(now_i + delay.max(period));
                continue;
            }
            if ps.next.is_some_and(|n| now_i < n) {
                continue;
            }
            let r = self.probe(i, p);
            let ps = &mut self.probes[i][k];
            let ok = matches!(r, ProbeResult::Ok);
            // Until a probe first passes it is retried every 250 ms, not every period:
            // the kubelet would wait a whole period, which only slows tests down.
            ps.next = Some(
                Instant::now()
                    + if ok || ps.ok_once || k == 2 {
                        period
                    } else {
                        Duration::from_millis(250)
                    },
            );
            if ok {
                ps.ok_once = true;
                ps.fails = 0;
            } else {
                ps.fails += 1;
            }
            let fails = ps.fails;
            let threshold = p.failure_threshold.unwrap_or(3);
            match k {
                0 if ok => self.set(|s| s.containers[i].started = true),
                1 => {
                    let ready_now = lock(&self.shared.state).containers[i].ready;
                    let ready = if ok {
                        true
                    } else {
                        ready_now && fails < threshold
                    };
                    if ready != ready_now {
                        self.set(|s| s.containers[i].ready = ready);
                    }
                }
                2 if !ok && fails >= threshold => {
                    if let ProbeResult::Fail(why) = r {
                        tracing::info!(pod = %self.key(), container = %spec.name, %why, "liveness probe failed; restarting");
                    }
                    if let Some((child, _)) = self.procs[i].as_mut() {
                        let _ = child.kill();
                    }
                }
                _ => {}
            }
        }
        // No readiness probe: ready once started.
        if spec.readiness_probe.is_none() {
            let mut s = lock(&self.shared.state);
            let cs = &mut s.containers[i];
            let want = cs.started && matches!(cs.run, Run::Running(_));
            if cs.ready != want {
                cs.ready = want;
                drop(s);
                self.notify();
            }
        }
    }

    fn update_phase(&self) {
        let mut s = lock(&self.shared.state);
        let apps: Vec<&CState> = s
            .containers
            .iter()
            .filter(|c| c.kind == Kind::App)
            .collect();
        let policy = s
            .pod
            .spec
            .as_ref()
            .and_then(|p| p.restart_policy.clone())
            .unwrap_or_else(|| "Always".into());
        let all_done = !apps.is_empty()
            && apps.iter().all(|c| match &c.run {
                Run::Terminated(t) => {
                    policy == "Never" || (policy == "OnFailure" && t.exit_code == 0)
                }
                _ => false,
            });
        if all_done && s.phase == "Running" {
            let ok = apps
                .iter()
                .all(|c| matches!(&c.run, Run::Terminated(t) if t.exit_code == 0));
            s.phase = if ok { "Succeeded" } else { "Failed" };
            drop(s);
            self.notify();
        }
    }

    fn main_loop(&mut self, ns: &Netns) {
        let seen = lock(&self.agent.first_seen).get(&self.shared.uid).copied();
        let mut reported = false;
        while !self.shared.sleep(Duration::from_millis(100)) {
            self.tick(ns);
            if !reported {
                let s = lock(&self.shared.state);
                let all_ready = s
                    .containers
                    .iter()
                    .filter(|c| c.kind != Kind::Init)
                    .all(|c| c.ready);
                drop(s);
                if all_ready {
                    reported = true;
                    let ms = seen.map(|t| t.elapsed().as_millis()).unwrap_or(0);
                    tracing::info!(pod = %self.key(), ms, "all containers ready (ms since the agent first saw the pod)");
                }
            }
        }
    }

    /// Runs the container's preStop hook (exec or httpGet), bounded by the grace
    /// period, before its SIGTERM, as the kubelet does.
    fn pre_stop(&self, ns: &Netns, i: usize, deadline: Instant) {
        let Some(hook) = self.containers[i]
            .spec
            .lifecycle
            .as_ref()
            .and_then(|l| l.pre_stop.clone())
        else {
            return;
        };
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return;
        }
        let name = &self.containers[i].spec.name;
        if let Some(argv) = hook.exec.and_then(|e| e.command) {
            let t = Instant::now();
            match self.exec_in(ns, i, &argv, left) {
                Ok(()) => {
                    tracing::info!(pod = %self.key(), container = %name, ms = t.elapsed().as_millis() as u64, "preStop hook ran")
                }
                Err(e) => {
                    tracing::info!(pod = %self.key(), container = %name, error = %e, "preStop hook failed")
                }
            }
        } else if let Some(h) = hook.http_get {
            let probe = Probe {
                http_get: Some(h),
                ..Default::default()
            };
            if let ProbeResult::Fail(e) = self.probe(i, &probe) {
                tracing::info!(pod = %self.key(), container = %name, error = %e, "preStop hook failed");
            }
        } else if let Some(s) = hook.sleep {
            std::thread::sleep(Duration::from_secs(s.seconds.max(0) as u64).min(left));
        }
    }

    /// SIGTERM to app containers, then sidecars in reverse order, SIGKILL at the
    /// deadline; then the namespace goes.
    fn teardown(&mut self, ns: &Netns) {
        let deadline = self
            .shared
            .deadline()
            .unwrap_or_else(|| Instant::now() + Duration::from_secs(30));
        let t0 = Instant::now();
        let apps: Vec<usize> = (0..self.containers.len())
            .filter(|i| self.containers[*i].kind == Kind::App)
            .collect();
        let sidecars: Vec<usize> = (0..self.containers.len())
            .rev()
            .filter(|i| self.containers[*i].kind != Kind::App)
            .collect();
        for group in [apps, sidecars] {
            for &i in &group {
                if self.procs[i].is_some() {
                    self.pre_stop(ns, i, deadline);
                }
                if let Some((child, _)) = &self.procs[i] {
                    let _ =
                        nix::sys::signal::kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM);
                }
            }
            loop {
                for &i in &group {
                    self.reap(i);
                }
                if group.iter().all(|i| self.procs[*i].is_none()) || Instant::now() >= deadline {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        let mut killed = 0;
        for i in 0..self.procs.len() {
            if let Some((child, _)) = self.procs[i].as_mut() {
                let _ = child.kill();
                let _ = child.wait();
                killed += 1;
            }
            self.reap(i);
        }
        self.agent.net.remove_pod(ns, self.ip);
        // Volumes and logs go with the pod, as the kubelet cleans up pod dirs.
        let _ = fs::remove_dir_all(&self.dir);
        tracing::info!(
            pod = %self.key(),
            ms = t0.elapsed().as_millis() as u64,
            killed,
            "pod stopped"
        );
        self.set(|s| {
            for c in &mut s.containers {
                c.ready = false;
                c.pid = None;
            }
        });
        self.shared.gone.store(true, Ordering::SeqCst);
        self.notify();
    }
}
