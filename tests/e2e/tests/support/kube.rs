//! What the tests against the real control plane share: `tools/kube/cluster.sh`
//! up/down, the `meshlet-node` process, kubectl, bounded waits.
#![allow(dead_code)]

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context, Result};
use meshlet_e2e::cluster::netns;
use serde_json::Value;

/// The injector Service's pinned ClusterIP: the node agent's DNS is optional, so
/// proxies dial the mesh endpoint by address (the chart derives
/// `controlPlane.address` from it).
const INJECTOR_IP: &str = "198.19.0.12";

/// `helm install`s the chart into meshlet-system as the story and fault tests need it,
/// waiting for the injector pods.
pub fn install_meshlet(helm_bin: &Path, kubeconfig: &Path) -> Result<String> {
    helm(
        helm_bin,
        kubeconfig,
        &[
            "install",
            "meshlet",
            "charts/meshlet",
            "-n",
            "meshlet-system",
            "--create-namespace",
            "--set",
            &format!("injector.service.clusterIP={INJECTOR_IP}"),
            "--wait",
            "--timeout",
            "120s",
        ],
    )
}

pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The folder `tools/kube/build.sh` puts the binaries in (same hash as the script).
pub fn kube_bin_dir() -> Result<PathBuf> {
    let here = root().join("tools/kube");
    let mut cat = Command::new("bash");
    cat.arg("-c")
        .arg("cat go.mod go.sum | sha256sum | cut -c1-12")
        .current_dir(&here);
    let hash = String::from_utf8(cat.output()?.stdout)?.trim().to_string();
    let dir = root().join(format!("target/tools/kube-{hash}"));
    for b in [
        "kube-apiserver",
        "kube-controller-manager",
        "etcd",
        "kubectl",
    ] {
        ensure!(
            dir.join(b).is_file(),
            "{} is missing: build the control plane first with `bash tools/kube/build.sh` (needs Go 1.26, ~6 min cold)",
            dir.join(b).display()
        );
    }
    Ok(dir)
}

/// `tools/kube/cluster.sh up` in a state dir of our own; `down` on drop.
pub struct ControlPlane {
    /// Its state dir (cluster.env, kubeconfig).
    pub state: PathBuf,
}

impl ControlPlane {
    pub fn up() -> Result<Self> {
        let state = root().join(format!("target/kube-node-test-{}", std::process::id()));
        let me = Self { state };
        let out = me.script("up")?;
        ensure!(
            out.status.success(),
            "`tools/kube/cluster.sh up` failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(me)
    }

    pub fn script(&self, cmd: &str) -> Result<std::process::Output> {
        self.script_args(&[cmd])
    }

    /// `tools/kube/cluster.sh ARGS...` on this control plane.
    pub fn script_args(&self, args: &[&str]) -> Result<std::process::Output> {
        Command::new("bash")
            .arg(root().join("tools/kube/cluster.sh"))
            .args(args)
            .env("MESHLET_KUBE_DIR", &self.state)
            .stdin(Stdio::null())
            .output()
            .context("running tools/kube/cluster.sh")
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        let _ = self.script("down");
    }
}

/// The agent process; SIGTERM (then SIGKILL) on drop.
pub struct Agent {
    /// The process.
    pub child: Option<Child>,
    /// Its log file.
    pub log: PathBuf,
}

impl Agent {
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGTERM, then wait up to 20 s; the exit status.
    pub fn stop(&mut self) -> Result<std::process::ExitStatus> {
        let mut child = self.child.take().context("agent already stopped")?;
        let pid = nix::unistd::Pid::from_raw(child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(st) = child.try_wait()? {
                return Ok(st);
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                bail!("meshlet-node ignored SIGTERM for 20 s");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if self.child.is_some() {
            let _ = self.stop();
        }
    }
}

pub struct Kubectl {
    /// The binary.
    pub bin: PathBuf,
    /// The admin kubeconfig.
    pub kubeconfig: PathBuf,
}

impl Kubectl {
    pub fn run(&self, args: &[&str]) -> Result<String> {
        let mut c = Command::new(&self.bin);
        c.arg("--kubeconfig").arg(&self.kubeconfig).args(args);
        let out = netns::run_with_timeout(&mut c, Duration::from_secs(60))?;
        ensure!(
            out.status.success(),
            "kubectl {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    pub fn json(&self, args: &[&str]) -> Result<Value> {
        let mut a = args.to_vec();
        a.extend(["-o", "json"]);
        Ok(serde_json::from_str(&self.run(&a)?)?)
    }
}

/// How a `kubectl` run ended.
pub struct Ran {
    /// Exit code (-1 when killed).
    pub code: i32,
    /// Its stdout.
    pub stdout: String,
    /// Its stderr.
    pub stderr: String,
}

impl Kubectl {
    /// Runs kubectl with `stdin` fed to it, whatever its exit code; killed after
    /// `timeout`.
    pub fn ran(&self, args: &[&str], stdin: Option<&[u8]>, timeout: Duration) -> Result<Ran> {
        self.ran_env(args, stdin, timeout, &[])
    }

    /// [`Kubectl::ran`] with extra environment variables.
    pub fn ran_env(
        &self,
        args: &[&str],
        stdin: Option<&[u8]>,
        timeout: Duration,
        env: &[(&str, &str)],
    ) -> Result<Ran> {
        use std::io::{Read, Write};
        let mut child = Command::new(&self.bin)
            .envs(env.iter().copied())
            .arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .args(args)
            .stdin(if stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("starting kubectl")?;
        let input = stdin.map(<[u8]>::to_vec);
        let mut pipe_in = child.stdin.take();
        let writer = std::thread::spawn(move || {
            if let (Some(p), Some(b)) = (pipe_in.as_mut(), input) {
                let _ = p.write_all(&b);
            }
        });
        let mut so = child.stdout.take().context("kubectl stdout")?;
        let mut se = child.stderr.take().context("kubectl stderr")?;
        let r_out = std::thread::spawn(move || {
            let mut v = Vec::new();
            let _ = so.read_to_end(&mut v);
            v
        });
        let r_err = std::thread::spawn(move || {
            let mut v = Vec::new();
            let _ = se.read_to_end(&mut v);
            v
        });
        let deadline = Instant::now() + timeout;
        let status = loop {
            if let Some(st) = child.try_wait()? {
                break Some(st);
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let _ = writer.join();
        let stdout = String::from_utf8_lossy(&r_out.join().unwrap_or_default()).into_owned();
        let stderr = String::from_utf8_lossy(&r_err.join().unwrap_or_default()).into_owned();
        let Some(status) = status else {
            bail!(
                "kubectl {} did not end within {timeout:?}; stderr: {stderr}",
                args.join(" ")
            );
        };
        Ok(Ran {
            code: status.code().unwrap_or(-1),
            stdout,
            stderr,
        })
    }
}

pub fn wait_for<T>(
    what: &str,
    timeout: Duration,
    mut f: impl FnMut() -> Result<Option<T>>,
) -> Result<T> {
    let deadline = Instant::now() + timeout;
    let mut last = String::new();
    loop {
        match f() {
            Ok(Some(v)) => return Ok(v),
            Ok(None) => {}
            Err(e) => last = format!("{e:#}"),
        }
        if Instant::now() > deadline {
            bail!("timed out after {timeout:?} waiting for {what} (last error: {last})");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

pub fn ready(pod: &Value) -> bool {
    pod["status"]["conditions"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|c| c["type"] == "Ready" && c["status"] == "True")
}

pub fn p50(v: &mut [u128]) -> u128 {
    v.sort();
    v.get(v.len() / 2).copied().unwrap_or(0)
}

pub fn pods_ns_count(prefix: &str, ns: &str) -> usize {
    netns::list_with_prefix(&format!("{prefix}{ns}")).len()
}

/// Starts `meshlet-node` against `cp` with its log under `work`.
pub fn start_agent(
    node_bin: &Path,
    cp: &ControlPlane,
    name: &str,
    subnet: u8,
    extra: &[&str],
    work: &Path,
) -> Result<Agent> {
    let log = work.join("agent.log");
    let child = Command::new(node_bin)
        .arg("--cluster-env")
        .arg(cp.state.join("cluster.env"))
        .args(["--name", name, "--subnet", &subnet.to_string()])
        .args(extra)
        .arg("--state-dir")
        .arg(work.join("state"))
        .env("MESHLET_NODE_LOG", "info")
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&log)?)
        .stderr(std::fs::File::create(work.join("agent.err"))?)
        .spawn()
        .context("starting meshlet-node")?;
    Ok(Agent {
        child: Some(child),
        log,
    })
}

/// Helm from `scripts/tools.sh ensure_helm` (built once, cached).
pub fn helm_bin() -> Result<std::path::PathBuf> {
    let out = Command::new("bash")
        .arg(root().join("scripts/tools.sh"))
        .arg("ensure_helm")
        .output()
        .context("running scripts/tools.sh ensure_helm")?;
    ensure!(
        out.status.success(),
        "no Helm: `bash scripts/tools.sh ensure_helm` failed: {}",
        String::from_utf8_lossy(&out.stderr).trim()
    );
    let path = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let path = std::path::PathBuf::from(path.lines().last().unwrap_or(""));
    ensure!(
        path.is_file(),
        "scripts/tools.sh ensure_helm printed {path:?}, not a file"
    );
    Ok(path)
}

/// Runs helm against the cluster of `kubeconfig`; fails on a non-zero exit.
pub fn helm(bin: &Path, kubeconfig: &Path, args: &[&str]) -> Result<String> {
    let mut c = Command::new(bin);
    c.arg("--kubeconfig")
        .arg(kubeconfig)
        .args(args)
        .current_dir(root());
    let out = netns::run_with_timeout(&mut c, Duration::from_secs(180))?;
    ensure!(
        out.status.success(),
        "helm {} failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}
