//! The mini-cluster: one node namespace, one namespace per pod, processes per container.
//!
//! Topology (the CNI ptp model): each pod is a network namespace with `eth0`, a /32
//! address `198.18.<cluster>.<pod>` and a default route via the link-local gateway
//! `169.254.1.1`, which sits on the node end of the pod's veth. The node namespace has
//! a /32 route per pod and forwards. ClusterIPs (`198.19.0.0/16`) exist only as
//! kube-proxy DNAT rules in the node's nat table, so pod-to-Service traffic is DNATed
//! on its way through the node and un-DNATed on the way back. Nothing is ever written
//! to the host's root namespace.
//!
//! Pods come from Kubernetes manifests: workloads are expanded to pods, the sidecar is
//! injected (by `meshlet-injector inject -f` when it works, else by a stand-in), and a
//! small kubelet runs each container's image as a local binary: init containers to
//! completion, native sidecars until ready, then the app containers. [`Cluster`]'s Drop
//! kills every process it started and deletes every namespace, also on panic.

pub mod capture;
pub mod control;
pub mod identity;
mod kubelet;
pub mod kubeproxy;
pub mod manifest;
pub mod metrics;
pub mod netns;
pub mod sidecar;
pub mod top;

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    io::{Read, Write},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream},
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::{Child, ExitStatus, Output, Stdio},
    sync::{
        atomic::{AtomicU32, Ordering},
        Mutex,
    },
    time::{Duration, Instant},
};

use k8s_openapi::{
    api::core::v1::{Container, Pod, Service},
    apimachinery::pkg::util::intstr::IntOrString,
};
use meshlet_api::{config, MeshConfig, SpiffeId};
use nix::{sys::signal::Signal, unistd::Pid};

pub use self::{kubelet::listening, metrics::Metrics, netns::Netns, sidecar::InjectPath};
use self::{kubeproxy::Protocol, manifest::Manifests};

/// Prefix of every namespace this crate creates; followed by the pid.
pub const NS_PREFIX: &str = "mle2e";
/// Gateway address on the node end of every pod veth.
pub const GATEWAY: Ipv4Addr = Ipv4Addr::new(169, 254, 1, 1);
/// IPv6 gateway (link-local) on the node end of every pod veth.
pub const GATEWAY6: Ipv6Addr = Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 1);
/// The /48 every IPv6 address of the mini-cluster comes from (pods and ClusterIPs).
pub const POD_NET6: [u16; 3] = [0xfd00, 0x6d65, 0x7368];
/// What to install when a tool is missing.
pub const INSTALL_HINT: &str =
    "apt-get install -y iptables iproute2 curl dnsutils util-linux nghttp2-client";
const PATH: &str = netns::SYSTEM_PATH;

static CLUSTERS: AtomicU32 = AtomicU32::new(0);

/// Why the mini-cluster could not do something.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The machine lacks root or a tool.
    #[error("{0}")]
    Prereq(String),
    /// A command exited non-zero.
    #[error("`{cmd}` failed ({status}): {stderr}")]
    Command {
        /// The command line.
        cmd: String,
        /// Its exit status.
        status: String,
        /// Its stderr.
        stderr: String,
    },
    /// An I/O error.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// A manifest the mini-cluster cannot run.
    #[error("manifest: {0}")]
    Manifest(String),
    /// Something did not happen in time.
    #[error("timeout: {0}")]
    Timeout(String),
    /// Anything else, with what to do about it.
    #[error("{0}")]
    Other(String),
}

fn io_err(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
    let context = context.into();
    move |source| Error::Io { context, source }
}

// === Binaries ===

/// The binaries the kubelet maps images to.
#[derive(Clone, Debug)]
pub struct Binaries {
    /// Directory they were found in.
    pub dir: PathBuf,
    /// `meshlet-proxy`.
    pub proxy: PathBuf,
    /// `meshlet-init`.
    pub init: PathBuf,
    /// `meshlet-testapp`.
    pub testapp: PathBuf,
    /// `meshlet-injector` (optional: the stand-in replaces it when absent).
    pub injector: PathBuf,
    /// `meshlet-echo`: what the conformance suite's echo image maps to.
    pub echo: PathBuf,
}

/// The image of the Gateway API conformance suite's mesh pods (Istio's echo app), by
/// repository name: meshlet-echo stands in for it, server and `client` alike.
pub const ECHO_IMAGE_REPO: &str = "echo-advanced";
/// The programs of that image that `kubectl exec` may name (bare or by its path):
/// meshlet-echo runs each as its subcommand.
const ECHO_IMAGE_PROGRAMS: [&str; 2] = ["client", "server"];

impl Binaries {
    /// Finds the binaries next to the running executable (`target/<profile>`, also from
    /// `target/<profile>/deps` where test executables live); `MLE2E_BIN_DIR` overrides.
    pub fn locate() -> Result<Self, Error> {
        let dir = match std::env::var_os("MLE2E_BIN_DIR") {
            Some(d) => PathBuf::from(d),
            None => {
                let exe =
                    std::env::current_exe().map_err(io_err("finding the running executable"))?;
                let mut dir = exe.parent().map(Path::to_path_buf).unwrap_or_default();
                if dir.ends_with("deps") {
                    dir.pop();
                }
                dir
            }
        };
        let b = Self {
            proxy: dir.join("meshlet-proxy"),
            init: dir.join("meshlet-init"),
            testapp: dir.join("meshlet-testapp"),
            injector: dir.join("meshlet-injector"),
            echo: dir.join("meshlet-echo"),
            dir,
        };
        let missing: Vec<String> = [&b.proxy, &b.init, &b.testapp]
            .iter()
            .filter(|p| !p.is_file())
            .map(|p| p.display().to_string())
            .collect();
        if !missing.is_empty() {
            return Err(Error::Prereq(format!(
                "missing {}: run `cargo build --workspace --bins` first",
                missing.join(", ")
            )));
        }
        Ok(b)
    }

    fn by_name(&self, name: &str) -> Option<&Path> {
        match name {
            "meshlet-proxy" => Some(&self.proxy),
            "meshlet-init" => Some(&self.init),
            "meshlet-testapp" => Some(&self.testapp),
            "meshlet-injector" => Some(&self.injector),
            "meshlet-echo" => Some(&self.echo),
            _ => None,
        }
    }

    /// The image table: which binary a container runs and with which arguments.
    ///
    /// A `command` whose first word names a meshlet binary wins; otherwise the image's
    /// repository name picks the binary (`*meshlet-testapp*`, `*meshlet-proxy*`,
    /// `*meshlet-init*`, `*meshlet-injector*`) and `args` follow as for an image
    /// entrypoint. The conformance suite's echo image (`*echo-advanced*`) maps to
    /// meshlet-echo, and a command naming one of that image's programs (`client`,
    /// `server`, as exec runs them) to meshlet-echo with it as the subcommand.
    pub fn resolve(&self, c: &Container) -> Result<(PathBuf, Vec<String>), Error> {
        let command = c.command.clone().unwrap_or_default();
        let args = c.args.clone().unwrap_or_default();
        let image = c.image.clone().unwrap_or_default();
        let repo = image
            .rsplit('/')
            .next()
            .unwrap_or("")
            .split([':', '@'])
            .next()
            .unwrap_or("");
        if let Some(first) = command.first() {
            let base = first.rsplit('/').next().unwrap_or(first);
            if let Some(bin) = self.by_name(base) {
                let mut argv: Vec<String> = command[1..].to_vec();
                argv.extend(args);
                return Ok((bin.to_path_buf(), argv));
            }
            if repo.contains(ECHO_IMAGE_REPO) && ECHO_IMAGE_PROGRAMS.contains(&base) {
                // `server` is the image's entrypoint: meshlet-echo's flags follow.
                let mut argv: Vec<String> = if base == "server" {
                    command[1..].to_vec()
                } else {
                    let mut v = vec![base.to_string()];
                    v.extend_from_slice(&command[1..]);
                    v
                };
                argv.extend(args);
                return Ok((self.echo_bin()?, argv));
            }
            return Err(Error::Manifest(format!(
                "container {} runs {first:?}: the mini-cluster only runs meshlet-proxy, meshlet-init and meshlet-testapp",
                c.name
            )));
        }
        if repo.contains(ECHO_IMAGE_REPO) {
            return Ok((self.echo_bin()?, args));
        }
        let bin = if repo.contains("testapp") {
            &self.testapp
        } else if c.name == meshlet_api::INIT_CONTAINER_NAME || repo.contains("meshlet-init") {
            &self.init
        } else if repo.contains("meshlet-proxy") || (repo == "proxy" && image.contains("meshlet")) {
            &self.proxy
        } else if repo.contains("meshlet-injector") {
            &self.injector
        } else {
            return Err(Error::Manifest(format!(
                "container {} uses image {image:?}: the mini-cluster maps only meshlet-proxy, meshlet-init, meshlet-testapp and the conformance suite's {ECHO_IMAGE_REPO} images to local binaries",
                c.name
            )));
        };
        Ok((bin.clone(), args))
    }

    fn echo_bin(&self) -> Result<PathBuf, Error> {
        if self.echo.is_file() {
            Ok(self.echo.clone())
        } else {
            Err(Error::Prereq(format!(
                "missing {}: the {ECHO_IMAGE_REPO} image maps to it; run `cargo build -p meshlet-e2e --bins` first",
                self.echo.display()
            )))
        }
    }
}

/// Checks root and the tools the mini-cluster runs; the error says what to install.
pub fn check_prereqs() -> Result<(), Error> {
    if !nix::unistd::geteuid().is_root() {
        return Err(Error::Prereq(
            "the e2e mini-cluster needs root (it creates network namespaces and iptables rules inside them): run it as root, e.g. `sudo -E cargo test -p meshlet-e2e --test mesh`".into(),
        ));
    }
    let path = netns::search_path();
    let dirs: Vec<&str> = path.split(':').collect();
    let missing: Vec<&str> = [
        "ip",
        "iptables",
        "iptables-save",
        "iptables-restore",
        "ip6tables-save",
        "ip6tables-restore",
        "curl",
        "dig",
        "setpriv",
        "sha256sum",
        "bash",
        "h2load",
    ]
    .into_iter()
    .filter(|t| !dirs.iter().any(|d| Path::new(d).join(t).is_file()))
    .collect();
    if !missing.is_empty() {
        return Err(Error::Prereq(format!(
            "missing tools: {}. Install them: {INSTALL_HINT}",
            missing.join(", ")
        )));
    }
    Ok(())
}

/// Deletes namespaces of earlier runs whose process is gone (a run killed by SIGKILL
/// cannot clean up after itself).
pub fn remove_stale() {
    for name in netns::list_with_prefix(&format!("{NS_PREFIX}-")) {
        let pid = name.split('-').nth(1).and_then(|p| p.parse::<u32>().ok());
        if let Some(pid) = pid {
            if !Path::new(&format!("/proc/{pid}")).exists() {
                kill_ns_pids(&name);
                netns::Netns::delete(&name);
            }
        }
    }
}

fn kill_ns_pids(name: &str) {
    let ns = Netns::existing(name);
    for pid in ns.pids() {
        let _ = nix::sys::signal::kill(Pid::from_raw(pid), Signal::SIGKILL);
    }
}

/// Namespaces and child processes of this process that are still around.
pub fn leftovers() -> (Vec<String>, Vec<i32>) {
    let me = std::process::id();
    let ns = netns::list_with_prefix(&format!("{NS_PREFIX}-{me}-"));
    let mut pids = Vec::new();
    if let Ok(d) = fs::read_dir("/proc") {
        for e in d.flatten() {
            let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
                continue;
            };
            let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) else {
                continue;
            };
            let Some(rest) = stat.rfind(')').map(|i| &stat[i + 1..]) else {
                continue;
            };
            let f: Vec<&str> = rest.split_whitespace().collect();
            if f.get(1).and_then(|p| p.parse::<u32>().ok()) == Some(me) && f.first() != Some(&"Z") {
                pids.push(pid);
            }
        }
    }
    (ns, pids)
}

// === ClusterBuilder ===

/// How pods get their sidecar.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InjectMode {
    /// The injector when `inject -f` works, else the stand-in (`MLE2E_INJECT` may force
    /// `injector` or `handwritten`).
    Auto,
    /// Only `meshlet-injector inject -f`.
    Injector,
    /// Only the stand-in.
    HandWritten,
}

/// Builds a [`Cluster`] from a manifest file.
#[derive(Clone, Debug)]
pub struct ClusterBuilder {
    file: PathBuf,
    scale: BTreeMap<String, i32>,
    annotations: Vec<(String, String, String)>,
    proxy_env: Vec<(String, String)>,
    inject: InjectMode,
    mtls: bool,
    config_server: bool,
}

impl ClusterBuilder {
    /// A cluster running the objects of `file`.
    pub fn new(file: impl Into<PathBuf>) -> Self {
        Self {
            file: file.into(),
            scale: BTreeMap::new(),
            annotations: Vec::new(),
            proxy_env: Vec::new(),
            inject: InjectMode::Auto,
            mtls: true,
            config_server: false,
        }
    }

    /// Whether a config server (`meshlet-injector serve-config`, [`control`]) serves
    /// the mesh config and every sidecar watches it, instead of reading mesh.json.
    pub fn config_server(mut self, on: bool) -> Self {
        self.config_server = on;
        self
    }

    /// Whether every sidecar gets a workload certificate (mesh mTLS; the default), or
    /// none (plaintext between sidecars, for comparison).
    pub fn mtls(mut self, on: bool) -> Self {
        self.mtls = on;
        self
    }

    /// Overrides the replicas of workload `name`.
    pub fn scale(mut self, name: &str, replicas: i32) -> Self {
        self.scale.insert(name.into(), replicas);
        self
    }

    /// Sets a pod-template annotation of workload `name` before injection (the way a
    /// user would edit the manifest), e.g. `meshlet.io/exclude-outbound-ports`.
    pub fn annotate(mut self, name: &str, key: &str, value: &str) -> Self {
        self.annotations
            .push((name.into(), key.into(), value.into()));
        self
    }

    /// Adds (or overrides) an env var of every meshlet-proxy container.
    pub fn proxy_env(mut self, key: &str, value: &str) -> Self {
        self.proxy_env.push((key.into(), value.into()));
        self
    }

    /// Chooses the injection path.
    pub fn inject(mut self, mode: InjectMode) -> Self {
        self.inject = mode;
        self
    }

    /// Creates the namespaces, rules and processes; on error everything created so far
    /// is removed again.
    pub fn start(self) -> Result<Cluster, Error> {
        check_prereqs()?;
        let bins = Binaries::locate()?;
        remove_stale();
        let yaml = fs::read_to_string(&self.file)
            .map_err(io_err(format!("reading {}", self.file.display())))?;
        // Edited manifests go to a file of their own: the injector reads a file.
        let edited = if self.annotations.is_empty() {
            None
        } else {
            let out = manifest::annotate(&yaml, &self.annotations)?;
            let mut f = tempfile::Builder::new()
                .prefix("mle2e-manifest-")
                .suffix(".yaml")
                .tempfile()
                .map_err(io_err("creating the edited manifest"))?;
            f.write_all(out.as_bytes())
                .map_err(io_err("writing the edited manifest"))?;
            Some((f, out))
        };
        let (file, yaml) = match &edited {
            Some((f, out)) => (f.path().to_path_buf(), out.clone()),
            None => (self.file.clone(), yaml),
        };
        let original = manifest::parse(&yaml)?;
        let mode = match (self.inject, std::env::var("MLE2E_INJECT").ok().as_deref()) {
            (InjectMode::Auto, Some("injector")) => InjectMode::Injector,
            (InjectMode::Auto, Some("handwritten")) => InjectMode::HandWritten,
            (m, _) => m,
        };
        let (pods, inject_path) = injected_pods(&bins, &file, &original, &self.scale, mode)?;

        let n = CLUSTERS.fetch_add(1, Ordering::SeqCst);
        let prefix = format!("{NS_PREFIX}-{}-{n}", std::process::id());
        let dir = tempfile::Builder::new()
            .prefix(&format!("{prefix}-"))
            .tempdir()
            .map_err(io_err("creating the cluster's temp dir"))?;
        // The proxy runs as UID 1337 and must read its config file here.
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755))
            .map_err(io_err("chmod of the temp dir"))?;
        fs::create_dir(dir.path().join("logs")).map_err(io_err("creating logs dir"))?;
        let identities = match self.mtls {
            true => Some(identity::Identities::init(&bins, dir.path())?),
            false => None,
        };
        // Registered for cleanup in the same breath as it is created.
        let node_name = format!("{prefix}-node");
        let node = Netns::create(&node_name)?;
        let mut c = Cluster {
            prefix,
            n,
            bins,
            dir,
            node,
            netns: vec![node_name],
            pods: Vec::new(),
            services: Vec::new(),
            procs: Mutex::new(Vec::new()),
            inject_path,
            mesh: MeshConfig::default(),
            mesh_path: PathBuf::new(),
            proxy_env: self.proxy_env,
            identities,
            control: None,
            dual_stack: false,
            next_pod: 0,
        };
        let dual_stack = original.services.iter().any(|s| {
            let spec = s.spec.clone().unwrap_or_default();
            matches!(cluster_ips("", "", &spec), Ok((_, Some(_))))
        });
        c.build_network(pods, dual_stack)?;
        c.build_services(&original.services)?;
        c.write_mesh_config()?;
        if self.config_server {
            c.control = Some(control::ControlPlane::new(c.dir.path())?);
            c.start_config_server()?;
        }
        for i in 0..c.pods.len() {
            c.start_pod(i)?;
        }
        Ok(c)
    }
}

fn injected_pods(
    bins: &Binaries,
    file: &Path,
    original: &Manifests,
    scale: &BTreeMap<String, i32>,
    mode: InjectMode,
) -> Result<(Vec<Pod>, InjectPath), Error> {
    let from_injector = || -> Result<Vec<Pod>, Error> {
        if !bins.injector.is_file() {
            return Err(Error::Prereq(format!(
                "{} not found: run `cargo build --workspace --bins` first",
                bins.injector.display()
            )));
        }
        let out = sidecar::run_injector(&bins.injector, file)?;
        let pods = manifest::parse(&out)?.pods(scale);
        if !pods.iter().any(sidecar::is_injected) {
            return Err(Error::Other(
                "`meshlet-injector inject -f` printed no pod with a meshlet-proxy container".into(),
            ));
        }
        Ok(pods)
    };
    let hand = || {
        original
            .pods(scale)
            .into_iter()
            .map(|mut p| {
                let ns = p.metadata.namespace.clone().unwrap_or_default();
                if sidecar::wants_injection(&p, &original.namespace_labels(&ns))
                    && !sidecar::is_injected(&p)
                {
                    sidecar::hand_inject(&mut p);
                }
                p
            })
            .collect::<Vec<_>>()
    };
    match mode {
        InjectMode::Injector => Ok((from_injector()?, InjectPath::Injector)),
        InjectMode::HandWritten => Ok((hand(), InjectPath::HandWritten("forced".into()))),
        InjectMode::Auto => match from_injector() {
            Ok(p) => Ok((p, InjectPath::Injector)),
            Err(e) => {
                let first = e.to_string();
                let why = first
                    .lines()
                    .next()
                    .unwrap_or("")
                    .chars()
                    .take(160)
                    .collect();
                Ok((hand(), InjectPath::HandWritten(why)))
            }
        },
    }
}

// === Cluster ===

/// One running pod.
#[derive(Clone, Debug)]
pub struct PodRun {
    /// Pod name.
    pub name: String,
    /// Kubernetes namespace.
    pub namespace: String,
    /// Pod IP.
    pub ip: Ipv4Addr,
    /// Pod IPv6 address, in a dual-stack cluster.
    pub ip6: Option<Ipv6Addr>,
    /// Its network namespace.
    pub netns: Netns,
    /// The (injected) pod spec it runs.
    pub pod: Pod,
    /// Service account (`default` when unset).
    pub service_account: String,
}

impl PodRun {
    /// Whether the pod runs the meshlet sidecar.
    pub fn meshed(&self) -> bool {
        sidecar::is_injected(&self.pod)
    }

    /// The pod's SPIFFE identity.
    pub fn identity(&self) -> Option<SpiffeId> {
        SpiffeId::new(
            meshlet_api::DEFAULT_TRUST_DOMAIN,
            &self.namespace,
            &self.service_account,
        )
        .ok()
    }

    fn labels(&self) -> BTreeMap<String, String> {
        self.pod.metadata.labels.clone().unwrap_or_default()
    }

    fn containers(&self) -> Vec<Container> {
        self.pod
            .spec
            .as_ref()
            .map(|s| s.containers.clone())
            .unwrap_or_default()
    }
}

/// One Service as programmed into the node.
#[derive(Clone, Debug)]
pub struct ServiceRun {
    /// Name.
    pub name: String,
    /// Namespace.
    pub namespace: String,
    /// ClusterIP.
    pub cluster_ip: Ipv4Addr,
    /// IPv6 ClusterIP (dual-stack Services).
    pub cluster_ip6: Option<Ipv6Addr>,
    /// Its ports with their endpoints.
    pub ports: Vec<kubeproxy::ServicePortRule>,
    /// Port name and `appProtocol` per port.
    pub port_meta: Vec<(u16, Option<String>, Option<String>)>,
    /// Names of the pods behind it.
    pub pods: Vec<String>,
    /// The Service spec (selector and ports), for endpoint syncs.
    pub spec: k8s_openapi::api::core::v1::ServiceSpec,
}

struct Proc {
    pod: String,
    container: String,
    child: Child,
}

/// A running mini-cluster; dropping it removes everything it created.
pub struct Cluster {
    prefix: String,
    n: u32,
    bins: Binaries,
    dir: tempfile::TempDir,
    node: Netns,
    netns: Vec<String>,
    pods: Vec<PodRun>,
    services: Vec<ServiceRun>,
    procs: Mutex<Vec<Proc>>,
    inject_path: InjectPath,
    mesh: MeshConfig,
    mesh_path: PathBuf,
    proxy_env: Vec<(String, String)>,
    identities: Option<identity::Identities>,
    control: Option<control::ControlPlane>,
    dual_stack: bool,
    next_pod: usize,
}

impl Cluster {
    /// Prefix of all its namespaces (`mle2e-<pid>-<n>`).
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// How the pods got their sidecar.
    pub fn inject_path(&self) -> &InjectPath {
        &self.inject_path
    }

    /// The mesh config every proxy reads.
    pub fn mesh_config(&self) -> &MeshConfig {
        &self.mesh
    }

    /// The binaries in use.
    pub fn binaries(&self) -> &Binaries {
        &self.bins
    }

    /// The node namespace.
    pub fn node(&self) -> &Netns {
        &self.node
    }

    /// All pods.
    pub fn pods(&self) -> &[PodRun] {
        &self.pods
    }

    /// All services.
    pub fn services(&self) -> &[ServiceRun] {
        &self.services
    }

    /// The first pod whose name starts with `prefix`.
    pub fn pod(&self, prefix: &str) -> Result<&PodRun, Error> {
        self.pods
            .iter()
            .find(|p| p.name.starts_with(prefix))
            .ok_or_else(|| {
                Error::Other(format!(
                    "no pod named {prefix}*; pods: {}",
                    self.pods
                        .iter()
                        .map(|p| p.name.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ))
            })
    }

    /// The ClusterIP of Service `name`.
    pub fn service_ip(&self, name: &str) -> Result<Ipv4Addr, Error> {
        self.services
            .iter()
            .find(|s| s.name == name)
            .map(|s| s.cluster_ip)
            .ok_or_else(|| Error::Other(format!("no service {name}")))
    }

    // --- building ---

    fn build_network(&mut self, pods: Vec<Pod>, dual_stack: bool) -> Result<(), Error> {
        let node = self.node.clone();
        node.sysctl("net.ipv4.ip_forward", "1")?;
        node.sysctl("net.ipv4.conf.all.rp_filter", "0")?;
        node.sysctl("net.ipv4.conf.default.rp_filter", "0")?;
        self.dual_stack = dual_stack;
        if dual_stack {
            node.sysctl("net.ipv6.conf.all.forwarding", "1")?;
            no_dad(&node)?;
        }
        for pod in pods {
            self.add_pod_network(pod)?;
        }
        Ok(())
    }

    /// The CNI ADD of one pod: namespace, veth, addresses, routes.
    fn add_pod_network(&mut self, pod: Pod) -> Result<(), Error> {
        let node = self.node.clone();
        let dual_stack = self.dual_stack;
        let i = self.next_pod;
        self.next_pod += 1;
        {
            let name = pod
                .metadata
                .name
                .clone()
                .ok_or_else(|| Error::Manifest("a pod has no name".into()))?;
            if i > 250 {
                return Err(Error::Manifest(
                    "the mini-cluster holds at most 250 pods".into(),
                ));
            }
            let ip = Ipv4Addr::new(198, 18, (self.n % 256) as u8, (i + 2) as u8);
            let ns_name = format!("{}-{name}", self.prefix);
            let ns = Netns::create(&ns_name)?;
            self.netns.push(ns_name.clone());
            if dual_stack {
                no_dad(&ns)?;
            }
            let veth = format!("vp{i}");
            let ip6 = ip6_of(dual_stack, self.n, i);
            netns::wire_pod(&node, &ns, &veth, ip, ip6)?;
            let service_account = pod
                .spec
                .as_ref()
                .and_then(|s| s.service_account_name.clone())
                .unwrap_or_else(|| "default".into());
            self.pods.push(PodRun {
                name,
                namespace: pod
                    .metadata
                    .namespace
                    .clone()
                    .unwrap_or_else(|| "default".into()),
                ip,
                ip6,
                netns: ns,
                pod,
                service_account,
            });
        }
        Ok(())
    }

    fn build_services(&mut self, services: &[Service]) -> Result<(), Error> {
        let mut next = 100u8;
        for s in services {
            let name = s.metadata.name.clone().unwrap_or_default();
            let namespace = s
                .metadata
                .namespace
                .clone()
                .unwrap_or_else(|| "default".into());
            let spec = s.spec.clone().unwrap_or_default();
            let (v4, v6) = cluster_ips(&namespace, &name, &spec)?;
            let cluster_ip = match v4 {
                Some(ip) => ip,
                None => {
                    next = next
                        .checked_add(1)
                        .ok_or_else(|| Error::Manifest("too many services".into()))?;
                    Ipv4Addr::new(198, 19, 0, next)
                }
            };
            self.services.push(ServiceRun {
                name,
                namespace,
                cluster_ip,
                cluster_ip6: v6,
                spec,
                ports: Vec::new(),
                port_meta: Vec::new(),
                pods: Vec::new(),
            });
        }
        self.sync_endpoints(None)?;
        self.program_kube_proxy()
    }

    /// The endpoints controller's work: each Service's endpoints from the pods that
    /// run now, leaving out the one `terminating`.
    fn sync_endpoints(&mut self, terminating: Option<&str>) -> Result<(), Error> {
        let mut synced = Vec::new();
        for s in &self.services {
            let (namespace, name) = (&s.namespace, &s.name);
            let selector = s.spec.selector.clone().unwrap_or_default();
            let backends: Vec<&PodRun> = self
                .pods
                .iter()
                .filter(|p| Some(p.name.as_str()) != terminating)
                .filter(|p| p.namespace == *namespace && manifest::selects(&selector, &p.labels()))
                .collect();
            let mut ports = Vec::new();
            let mut port_meta = Vec::new();
            for p in s.spec.ports.clone().unwrap_or_default() {
                let protocol = match p.protocol.as_deref() {
                    None | Some("TCP") => Protocol::Tcp,
                    Some("UDP") => Protocol::Udp,
                    Some(other) => {
                        return Err(Error::Manifest(format!(
                            "service {namespace}/{name}: protocol {other} is not supported"
                        )))
                    }
                };
                let port = u16::try_from(p.port)
                    .map_err(|_| Error::Manifest(format!("service {name}: bad port {}", p.port)))?;
                let targets: Vec<(&PodRun, u16)> = backends
                    .iter()
                    .filter_map(|b| Some((*b, target_port(b, p.target_port.as_ref(), port)?)))
                    .collect();
                let port_name =
                    format!("{namespace}/{name}:{}", p.name.clone().unwrap_or_default());
                ports.push(kubeproxy::ServicePortRule {
                    port_name: port_name.clone(),
                    protocol,
                    cluster_ip: s.cluster_ip.into(),
                    port,
                    endpoints: targets
                        .iter()
                        .map(|(b, tp)| (IpAddr::V4(b.ip), *tp))
                        .collect(),
                });
                if let Some(ip6) = s.cluster_ip6 {
                    ports.push(kubeproxy::ServicePortRule {
                        port_name,
                        protocol,
                        cluster_ip: ip6.into(),
                        port,
                        endpoints: targets
                            .iter()
                            .filter_map(|(b, tp)| Some((IpAddr::V6(b.ip6?), *tp)))
                            .collect(),
                    });
                }
                if protocol == Protocol::Tcp {
                    port_meta.push((port, p.name.clone(), p.app_protocol.clone()));
                }
            }
            synced.push((
                ports,
                port_meta,
                backends.iter().map(|p| p.name.clone()).collect(),
            ));
        }
        for (s, (ports, port_meta, pods)) in self.services.iter_mut().zip(synced) {
            s.ports = ports;
            s.port_meta = port_meta;
            s.pods = pods;
        }
        Ok(())
    }

    /// Writes the node's nat rules for every Service port and its current endpoints,
    /// replacing what was there (as kube-proxy's full sync does).
    fn program_kube_proxy(&self) -> Result<(), Error> {
        let rules: Vec<kubeproxy::ServicePortRule> = self
            .services
            .iter()
            .flat_map(|s| s.ports.iter().cloned())
            .collect();
        let (v4, v6): (Vec<_>, Vec<_>) = rules.into_iter().partition(|r| r.cluster_ip.is_ipv4());
        self.restore(
            "iptables-restore",
            &kubeproxy::render(&v4),
            "node-nat.rules",
        )?;
        if !v6.is_empty() {
            self.restore(
                "ip6tables-restore",
                &kubeproxy::render(&v6),
                "node-nat6.rules",
            )?;
        }
        Ok(())
    }

    fn restore(&self, tool: &str, input: &str, keep_as: &str) -> Result<(), Error> {
        fs::write(self.dir.path().join(keep_as), input).map_err(io_err("writing node rules"))?;
        let mut cmd = self.node().command(tool);
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(io_err(format!("running {tool} in the node")))?;
        if let Some(mut stdin) = child.stdin.take() {
            stdin
                .write_all(input.as_bytes())
                .map_err(io_err(format!("writing to {tool}")))?;
        }
        let out = child.wait_with_output().map_err(io_err(tool.to_string()))?;
        netns::check(&cmd, out).map(drop)
    }

    fn write_mesh_config(&mut self) -> Result<(), Error> {
        let mut services = Vec::new();
        for s in &self.services {
            if s.port_meta.is_empty() {
                continue;
            }
            let backends: Vec<&PodRun> = self
                .pods
                .iter()
                .filter(|p| s.pods.contains(&p.name))
                .collect();
            let meshed = !backends.is_empty() && backends.iter().all(|p| p.meshed());
            let identities: BTreeSet<SpiffeId> = if meshed {
                backends.iter().filter_map(|p| p.identity()).collect()
            } else {
                BTreeSet::new()
            };
            // The EndpointSlices' content: each backend address with where every TCP
            // Service port leads on it. Only ready pods are endpoints here (a pod joins
            // after its containers are ready and leaves before it is stopped).
            let mut by_ip: BTreeMap<IpAddr, BTreeMap<u16, u16>> = BTreeMap::new();
            for rule in s.ports.iter().filter(|r| r.protocol == Protocol::Tcp) {
                for (ip, target) in &rule.endpoints {
                    by_ip.entry(*ip).or_default().insert(rule.port, *target);
                }
            }
            let endpoints = by_ip
                .into_iter()
                .map(|(ip, ports)| {
                    let pod = backends
                        .iter()
                        .find(|p| IpAddr::V4(p.ip) == ip || p.ip6.map(IpAddr::V6) == Some(ip));
                    config::Endpoint {
                        ip,
                        ports,
                        ready: true,
                        pod_name: pod.map(|p| p.name.clone()),
                        identity: pod.filter(|p| p.meshed()).and_then(|p| p.identity()),
                    }
                })
                .collect();
            services.push(config::Service {
                name: s.name.clone(),
                namespace: s.namespace.clone(),
                cluster_ips: std::iter::once(IpAddr::V4(s.cluster_ip))
                    .chain(s.cluster_ip6.map(IpAddr::V6))
                    .collect(),
                ports: s
                    .port_meta
                    .iter()
                    .map(|(port, name, app)| config::ServicePort {
                        port: *port,
                        name: name.clone(),
                        app_protocol: app.clone(),
                    })
                    .collect(),
                meshed,
                identities: identities.into_iter().collect(),
                endpoints,
                routes: Vec::new(),
                retry_constraint: None,
                outlier_detection: None,
            });
        }
        let cfg = MeshConfig {
            services,
            // Authorization is the test's to set (update_mesh_config); endpoint
            // changes keep it.
            authorization: self.mesh.authorization.clone(),
            ..Default::default()
        };
        self.store_mesh_config(cfg)
    }

    /// Waits until every sidecar serves the current mesh config generation.
    fn await_mesh_config(&self, limit: Duration) -> Result<(), Error> {
        let want = self.mesh.generation;
        let deadline = Instant::now() + limit;
        for p in self.pods.iter().filter(|p| p.meshed()) {
            loop {
                let gen = self
                    .admin(&p.name, "/config")
                    .ok()
                    .and_then(|(_, body)| serde_json::from_str::<serde_json::Value>(&body).ok())
                    .and_then(|v| v["mesh"]["generation"].as_u64());
                if gen.is_some_and(|g| g >= want) {
                    break;
                }
                if Instant::now() >= deadline {
                    return Err(Error::Other(format!(
                        "the proxy of {} still serves mesh config generation {gen:?} after \
                         {limit:?}, want {want}",
                        p.name
                    )));
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        Ok(())
    }

    /// Validates `cfg`, gives it the next generation and replaces mesh.json atomically
    /// (write, then rename), as a controller would; proxies pick it up on their next poll.
    fn store_mesh_config(&mut self, mut cfg: MeshConfig) -> Result<(), Error> {
        cfg.generation = self.mesh.generation + 1;
        cfg.validate()
            .map_err(|e| Error::Other(format!("the harness built an invalid mesh config: {e}")))?;
        let json = serde_json::to_string_pretty(&cfg)
            .map_err(|e| Error::Other(format!("serializing the mesh config: {e}")))?;
        self.mesh_path = self.dir.path().join("mesh.json");
        let tmp = self.dir.path().join("mesh.json.tmp");
        fs::write(&tmp, json).map_err(io_err("writing mesh.json.tmp"))?;
        fs::set_permissions(&tmp, fs::Permissions::from_mode(0o644))
            .map_err(io_err("chmod mesh.json.tmp"))?;
        fs::rename(&tmp, &self.mesh_path).map_err(io_err("renaming mesh.json.tmp"))?;
        self.mesh = cfg;
        Ok(())
    }

    // --- what tests use ---

    /// A container's log so far (last 4 KiB).
    pub fn log(&self, pod: &str, container: &str) -> String {
        let s = fs::read_to_string(self.log_path(pod, container)).unwrap_or_default();
        let start = s.len().saturating_sub(4096);
        let start = (start..s.len())
            .find(|i| s.is_char_boundary(*i))
            .unwrap_or(s.len());
        s[start..].to_string()
    }

    /// An HTTP/1.0 request from inside the pod's namespace; returns status and body.
    pub fn http(
        &self,
        pod: &PodRun,
        addr: SocketAddr,
        method: &str,
        path: &str,
    ) -> Result<(u16, String), Error> {
        http_in(&pod.netns, addr, method, path)
    }

    /// Runs a container's readiness (or, with `liveness`, liveness) probe the way the
    /// kubelet does: an HTTP GET from the node to the pod IP. Returns status and body.
    pub fn probe(
        &self,
        pod: &str,
        container: &str,
        liveness: bool,
    ) -> Result<(u16, String), Error> {
        let p = self.pod(pod)?;
        let spec = p.pod.spec.clone().unwrap_or_default();
        let c = spec
            .containers
            .iter()
            .chain(spec.init_containers.iter().flatten())
            .find(|c| c.name == container)
            .ok_or_else(|| Error::Other(format!("no container {container} in {}", p.name)))?;
        let probe = if liveness {
            &c.liveness_probe
        } else {
            &c.readiness_probe
        };
        let get = probe
            .as_ref()
            .and_then(|p| p.http_get.clone())
            .ok_or_else(|| {
                Error::Other(format!(
                    "container {container} of {} has no httpGet probe",
                    p.name
                ))
            })?;
        let port = match &get.port {
            IntOrString::Int(n) => u16::try_from(*n).ok(),
            IntOrString::String(name) => c
                .ports
                .iter()
                .flatten()
                .find(|cp| cp.name.as_deref() == Some(name.as_str()))
                .and_then(|cp| u16::try_from(cp.container_port).ok()),
        }
        .ok_or_else(|| {
            Error::Other(format!(
                "probe port {:?} of {container} does not resolve",
                get.port
            ))
        })?;
        let addr = SocketAddr::from((p.ip, port));
        http_in(self.node(), addr, "GET", get.path.as_deref().unwrap_or("/"))
    }

    /// GET on the pod's proxy admin port.
    pub fn admin(&self, pod: &str, path: &str) -> Result<(u16, String), Error> {
        let p = self.pod(pod)?;
        self.http(
            p,
            SocketAddr::from((Ipv4Addr::LOCALHOST, meshlet_api::ports::ADMIN)),
            "GET",
            path,
        )
    }

    /// The pod's proxy metrics.
    pub fn metrics(&self, pod: &str) -> Result<Metrics, Error> {
        match self.admin(pod, "/metrics")? {
            (200, body) => Ok(metrics::parse(&body)),
            (s, body) => Err(Error::Other(format!("GET /metrics of {pod}: {s} {body}"))),
        }
    }

    /// Raw metrics page of the pod's proxy.
    pub fn metrics_text(&self, pod: &str) -> Result<String, Error> {
        Ok(self.admin(pod, "/metrics")?.1)
    }

    /// Runs `argv` as root inside the pod (a client, like `kubectl exec`).
    pub fn exec(&self, pod: &str, argv: &[&str], timeout: Duration) -> Result<Output, Error> {
        let p = self.pod(pod)?;
        let mut c = p.netns.command(argv[0]);
        c.args(&argv[1..]).env("PATH", PATH);
        netns::run_with_timeout(&mut c, timeout)
    }

    /// Runs `argv` in the pod; its stdout, or an error with stderr on a non-zero exit.
    pub fn exec_ok(&self, pod: &str, argv: &[&str], timeout: Duration) -> Result<String, Error> {
        let p = self.pod(pod)?;
        let mut c = p.netns.command(argv[0]);
        c.args(&argv[1..]);
        let out = netns::run_with_timeout(&mut c, timeout)?;
        netns::check(&c, out)
    }

    /// Starts `argv` in the pod without waiting (for requests in flight).
    pub fn spawn_client(&self, pod: &str, argv: &[&str]) -> Result<Child, Error> {
        let p = self.pod(pod)?;
        let mut c = p.netns.command(argv[0]);
        c.args(&argv[1..])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(io_err(format!("starting {} in {pod}", argv[0])))
    }

    /// Runs the test app binary as a client in the pod.
    pub fn testapp(&self, pod: &str, args: &[&str], timeout: Duration) -> Result<String, Error> {
        let bin = self.bins.testapp.display().to_string();
        let mut argv = vec![bin.as_str()];
        argv.extend_from_slice(args);
        self.exec_ok(pod, &argv, timeout)
    }

    /// `iptables-save` of the pod's nat table.
    pub fn iptables_save(&self, pod: &str) -> Result<String, Error> {
        self.exec_ok(
            pod,
            &["iptables-save", "-t", "nat"],
            Duration::from_secs(10),
        )
    }

    /// Runs the pod's `meshlet-init` init container again (as after a pod restart).
    pub fn rerun_init(&self, pod: &str) -> Result<String, Error> {
        let p = self.pod(pod)?;
        let c = p
            .pod
            .spec
            .as_ref()
            .and_then(|s| s.init_containers.as_ref())
            .and_then(|i| {
                i.iter()
                    .find(|c| c.name == meshlet_api::INIT_CONTAINER_NAME)
            })
            .ok_or_else(|| Error::Other(format!("pod {pod} has no meshlet-init container")))?;
        self.run_init(p, c)
    }

    /// Sends `sig` to a container's process.
    pub fn signal(&self, pod: &str, container: &str, sig: Signal) -> Result<(), Error> {
        let p = self.pod(pod)?.name.clone();
        let procs = self.lock();
        let proc = procs
            .iter()
            .rev()
            .find(|x| x.pod == p && x.container == container)
            .ok_or_else(|| Error::Other(format!("no container {container} in {p}")))?;
        nix::sys::signal::kill(Pid::from_raw(proc.child.id() as i32), sig)
            .map_err(|e| Error::Other(format!("kill -{sig} {container} of {p}: {e}")))
    }

    /// Waits for a container's process to exit.
    pub fn wait_exit(
        &self,
        pod: &str,
        container: &str,
        timeout: Duration,
    ) -> Result<ExitStatus, Error> {
        let p = self.pod(pod)?.name.clone();
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(st) = self.exited(&p, container) {
                return Ok(st);
            }
            if Instant::now() > deadline {
                return Err(Error::Timeout(format!(
                    "{container} of {p} still runs after {timeout:?}"
                )));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// (pod, container, pid) of every long-running container process.
    pub fn container_pids(&self) -> Vec<(String, String, i32)> {
        self.lock()
            .iter()
            .map(|p| (p.pod.clone(), p.container.clone(), p.child.id() as i32))
            .collect()
    }

    /// Changes the mesh config every proxy reads and writes it atomically (a rename),
    /// as a controller would; proxies pick it up on their next poll.
    pub fn update_mesh_config(&mut self, f: impl FnOnce(&mut MeshConfig)) -> Result<(), Error> {
        let mut cfg = self.mesh.clone();
        f(&mut cfg);
        self.store_mesh_config(cfg)
    }

    /// Adds one more pod of `workload` (like `kubectl scale`): a copy of an existing
    /// pod's spec under a new name, wired, started, then added to its Services'
    /// endpoints and to the mesh config. Returns the new pod's name.
    pub fn scale_up(&mut self, workload: &str) -> Result<String, Error> {
        let prefix = format!("{workload}-");
        let template = self
            .pods
            .iter()
            .find(|p| p.pod.metadata.generate_name.as_deref() == Some(prefix.as_str()))
            .map(|p| p.pod.clone())
            .ok_or_else(|| {
                Error::Other(format!("no running pod of workload {workload} to copy"))
            })?;
        let name = (0..)
            .map(|k| format!("{prefix}{k}"))
            .find(|n| self.pods.iter().all(|p| p.name != *n))
            .unwrap_or_default();
        let mut pod = template;
        pod.metadata.name = Some(name.clone());
        self.add_pod_network(pod)?;
        self.start_pod(self.pods.len() - 1)?;
        // Ready: only now does the pod become an endpoint, for kube-proxy and proxies.
        self.sync_endpoints(None)?;
        self.program_kube_proxy()?;
        self.write_mesh_config()?;
        Ok(name)
    }

    /// Log file paths, for reports.
    pub fn log_dir(&self) -> PathBuf {
        self.dir.path().join("logs")
    }

    /// Deletes a pod the way a rolling update does: its endpoints leave every Service
    /// first, then its containers get SIGTERM (SIGKILL after `grace`), then its
    /// namespace and veth go.
    pub fn delete_pod(&mut self, prefix: &str, grace: Duration) -> Result<(), Error> {
        let pod = self.pod(prefix)?.clone();
        self.sync_endpoints(Some(&pod.name))?;
        self.program_kube_proxy()?;
        // The endpoint leaves the proxies' config before the pod stops, as it leaves
        // the EndpointSlice first in a cluster (where a preStop delay covers the
        // propagation this wait stands for).
        self.write_mesh_config()?;
        self.await_mesh_config(Duration::from_secs(5))?;
        let mut mine: Vec<Proc> = {
            let mut procs = self.lock();
            let (mine, rest) = std::mem::take(&mut *procs)
                .into_iter()
                .partition(|p| p.pod == pod.name);
            *procs = rest;
            mine
        };
        for p in &mine {
            let _ = nix::sys::signal::kill(Pid::from_raw(p.child.id() as i32), Signal::SIGTERM);
        }
        let deadline = Instant::now() + grace;
        for p in &mut mine {
            while p.child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = p.child.kill();
            let _ = p.child.wait();
        }
        let ns = pod.netns.name().to_string();
        kill_ns_pids(&ns);
        Netns::delete(&ns);
        self.netns.retain(|n| *n != ns);
        self.pods.retain(|p| p.name != pod.name);
        Ok(())
    }

    /// Kills every process and deletes every namespace (also done on drop).
    pub fn teardown(&mut self) {
        let procs = std::mem::take(&mut *self.lock());
        for mut p in procs {
            let _ = p.child.kill();
            let _ = p.child.wait();
        }
        // Container logs die with the temp dir unless asked for (CI artifacts).
        if let Some(keep) = std::env::var_os("MLE2E_LOGS") {
            let dest = PathBuf::from(keep).join(&self.prefix);
            if fs::create_dir_all(&dest).is_ok() {
                for e in fs::read_dir(self.log_dir()).into_iter().flatten().flatten() {
                    let _ = fs::copy(e.path(), dest.join(e.file_name()));
                }
                let _ = fs::copy(&self.mesh_path, dest.join("mesh.json"));
            }
        }
        for ns in self.netns.drain(..).rev() {
            kill_ns_pids(&ns);
            Netns::delete(&ns);
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.teardown();
    }
}

/// An HTTP/1.0 request from inside `ns`; returns status and body.
pub fn http_in(
    ns: &Netns,
    addr: SocketAddr,
    method: &str,
    path: &str,
) -> Result<(u16, String), Error> {
    let req = format!("{method} {path} HTTP/1.0\r\nHost: {addr}\r\nContent-Length: 0\r\n\r\n");
    let raw = ns
        .enter(move || -> std::io::Result<Vec<u8>> {
            let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
            s.set_read_timeout(Some(Duration::from_secs(5)))?;
            s.write_all(req.as_bytes())?;
            let mut buf = Vec::new();
            s.read_to_end(&mut buf)?;
            Ok(buf)
        })?
        .map_err(io_err(format!(
            "{method} http://{addr}{path} in {}",
            ns.name()
        )))?;
    parse_http_response(&raw)
        .ok_or_else(|| Error::Other(format!("{method} {addr}{path}: not an HTTP response")))
}

/// The IPv6 address of pod `i` of cluster `n`, in a dual-stack cluster.
fn ip6_of(dual_stack: bool, n: u32, i: usize) -> Option<Ipv6Addr> {
    dual_stack.then(|| {
        Ipv6Addr::new(
            POD_NET6[0],
            POD_NET6[1],
            POD_NET6[2],
            n as u16,
            0,
            0,
            0,
            (i + 2) as u16,
        )
    })
}

/// Makes addresses usable at once: DAD would hold new IPv6 addresses "tentative" for a
/// second or more, and nothing else shares these links.
fn no_dad(ns: &Netns) -> Result<(), Error> {
    ns.sysctl("net.ipv6.conf.all.accept_dad", "0")?;
    ns.sysctl("net.ipv6.conf.default.accept_dad", "0")
}

/// The Service's IPv4 and IPv6 ClusterIPs from `clusterIP`/`clusterIPs`, each checked
/// to be in the mini-cluster's ranges.
fn cluster_ips(
    namespace: &str,
    name: &str,
    spec: &k8s_openapi::api::core::v1::ServiceSpec,
) -> Result<(Option<Ipv4Addr>, Option<Ipv6Addr>), Error> {
    let mut all: Vec<String> = spec.cluster_ips.clone().unwrap_or_default();
    all.extend(spec.cluster_ip.clone());
    let (mut v4, mut v6) = (None, None);
    for raw in all.iter().filter(|s| !s.is_empty() && *s != "None") {
        match raw.parse::<IpAddr>() {
            Ok(IpAddr::V4(ip)) if ip.octets()[..2] == [198, 19] => v4 = v4.or(Some(ip)),
            Ok(IpAddr::V6(ip)) if ip.segments()[..3] == POD_NET6 => v6 = v6.or(Some(ip)),
            _ => {
                return Err(Error::Manifest(format!(
                    "service {namespace}/{name} has clusterIP {raw}: the mini-cluster uses 198.19.0.0/16 and fd00:6d65:7368::/48 only"
                )))
            }
        }
    }
    Ok((v4, v6))
}

fn target_port(pod: &PodRun, target: Option<&IntOrString>, port: u16) -> Option<u16> {
    match target {
        None => Some(port),
        Some(IntOrString::Int(p)) => u16::try_from(*p).ok(),
        Some(IntOrString::String(name)) => pod
            .containers()
            .iter()
            .flat_map(|c| c.ports.clone().unwrap_or_default())
            .find(|p| p.name.as_deref() == Some(name.as_str()))
            .and_then(|p| u16::try_from(p.container_port).ok()),
    }
}

/// Status and body of a raw HTTP/1.x response (chunked bodies are decoded).
pub fn parse_http_response(raw: &[u8]) -> Option<(u16, String)> {
    let pos = raw.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = String::from_utf8_lossy(&raw[..pos]);
    let status = head.split_whitespace().nth(1)?.parse().ok()?;
    let mut body = raw[pos + 4..].to_vec();
    if head
        .lines()
        .any(|l| l.to_ascii_lowercase().replace(' ', "") == "transfer-encoding:chunked")
    {
        let mut out = Vec::new();
        let mut rest = &body[..];
        while let Some(i) = rest.windows(2).position(|w| w == b"\r\n") {
            let size =
                usize::from_str_radix(String::from_utf8_lossy(&rest[..i]).trim(), 16).ok()?;
            if size == 0 {
                break;
            }
            let start = i + 2;
            out.extend_from_slice(rest.get(start..start + size)?);
            rest = rest.get(start + size + 2..)?;
        }
        body = out;
    }
    Some((status, String::from_utf8_lossy(&body).into_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cluster_ips_stay_in_the_test_ranges() {
        use k8s_openapi::api::core::v1::ServiceSpec;
        let spec = |ips: &[&str]| ServiceSpec {
            cluster_ips: Some(ips.iter().map(|s| s.to_string()).collect()),
            ..Default::default()
        };
        assert_eq!(
            cluster_ips("ns", "s", &spec(&["198.19.0.10", "fd00:6d65:7368:c1::10"])).unwrap(),
            (
                Some(Ipv4Addr::new(198, 19, 0, 10)),
                Some("fd00:6d65:7368:c1::10".parse().unwrap())
            )
        );
        assert_eq!(cluster_ips("ns", "s", &spec(&[])).unwrap(), (None, None));
        let e = cluster_ips("ns", "s", &spec(&["10.96.0.1"])).unwrap_err();
        assert!(e.to_string().contains("198.19.0.0/16"), "{e}");
        assert!(cluster_ips("ns", "s", &spec(&["2001:db8::1"])).is_err());
    }

    #[test]
    fn parses_responses() {
        assert_eq!(
            parse_http_response(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"),
            Some((200, "ok".into()))
        );
        assert_eq!(
            parse_http_response(b"HTTP/1.1 503 x\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n"),
            Some((503, "abcde".into()))
        );
        assert_eq!(parse_http_response(b"garbage"), None);
    }

    #[test]
    fn image_table() {
        let b = Binaries {
            dir: "/b".into(),
            proxy: "/b/meshlet-proxy".into(),
            init: "/b/meshlet-init".into(),
            testapp: "/b/meshlet-testapp".into(),
            injector: "/b/meshlet-injector".into(),
            echo: "/b/meshlet-echo".into(),
        };
        let c = |image: &str, cmd: Option<Vec<&str>>, args: Vec<&str>| Container {
            name: "x".into(),
            image: Some(image.into()),
            command: cmd.map(|v| v.into_iter().map(String::from).collect()),
            args: Some(args.into_iter().map(String::from).collect()),
            ..Default::default()
        };
        assert_eq!(
            b.resolve(&c("meshlet-testapp:latest", None, vec!["http"]))
                .unwrap(),
            (
                PathBuf::from("/b/meshlet-testapp"),
                vec!["http".to_string()]
            )
        );
        assert_eq!(
            b.resolve(&c(
                sidecar::PROXY_IMAGE,
                Some(vec!["/usr/local/bin/meshlet-init"]),
                vec!["--dry-run"]
            ))
            .unwrap(),
            (
                PathBuf::from("/b/meshlet-init"),
                vec!["--dry-run".to_string()]
            )
        );
        assert_eq!(
            b.resolve(&c(sidecar::PROXY_IMAGE, None, vec![])).unwrap().0,
            PathBuf::from("/b/meshlet-proxy")
        );
        assert_eq!(
            b.resolve(&c(
                "ghcr.io/meshlet/meshlet-injector:0.1.0",
                None,
                vec!["serve"]
            ))
            .unwrap()
            .0,
            PathBuf::from("/b/meshlet-injector")
        );
        assert!(b.resolve(&c("nginx:1.27", None, vec![])).is_err());
        // The conformance suite's echo image needs meshlet-echo built.
        let echo = "registry.k8s.io/gateway-api/echo-advanced:v1.5.1";
        let err = b.resolve(&c(echo, None, vec![])).unwrap_err().to_string();
        assert!(
            err.contains("/b/meshlet-echo") && err.contains("cargo build"),
            "{err}"
        );
    }

    #[test]
    fn echo_image_maps_server_and_exec_client() {
        let dir = tempfile::tempdir().unwrap();
        let echo = dir.path().join("meshlet-echo");
        std::fs::write(&echo, b"").unwrap();
        let b = Binaries {
            dir: dir.path().into(),
            proxy: "/b/meshlet-proxy".into(),
            init: "/b/meshlet-init".into(),
            testapp: "/b/meshlet-testapp".into(),
            injector: "/b/meshlet-injector".into(),
            echo: echo.clone(),
        };
        let image = "registry.k8s.io/gateway-api/echo-advanced:v1.5.1";
        let c = |cmd: Option<Vec<&str>>, args: Vec<&str>| Container {
            name: "echo".into(),
            image: Some(image.into()),
            command: cmd.map(|v| v.into_iter().map(String::from).collect()),
            args: Some(args.into_iter().map(String::from).collect()),
            ..Default::default()
        };
        let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        // The Deployment's container: the image's entrypoint with the manifest's args.
        assert_eq!(
            b.resolve(&c(None, vec!["--port=8080", "--tcp=9090"]))
                .unwrap(),
            (echo.clone(), s(&["--port=8080", "--tcp=9090"]))
        );
        // What the suite execs in that container.
        assert_eq!(
            b.resolve(&c(
                Some(vec![
                    "client",
                    "http://echo/v2",
                    "--method=GET",
                    "-H",
                    "Version:two"
                ]),
                vec![]
            ))
            .unwrap(),
            (
                echo.clone(),
                s(&[
                    "client",
                    "http://echo/v2",
                    "--method=GET",
                    "-H",
                    "Version:two"
                ])
            )
        );
        assert_eq!(
            b.resolve(&c(
                Some(vec!["/usr/local/bin/server", "--port=8080"]),
                vec![]
            ))
            .unwrap(),
            (echo.clone(), s(&["--port=8080"]))
        );
        // Other commands in that image are not the image's programs.
        assert!(b
            .resolve(&c(Some(vec!["sh", "-c", "true"]), vec![]))
            .is_err());
    }
}
