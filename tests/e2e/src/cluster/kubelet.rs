//! The kubelet's part: runs a pod spec's containers as processes in the pod's
//! namespace. Init containers run to completion, native sidecars (`restartPolicy:
//! Always`) until their readiness probe answers, then the app containers start and
//! the pod counts as started once every declared container port listens.

use std::{
    fs::{self, File},
    io::Write,
    net::{Ipv4Addr, SocketAddr},
    path::PathBuf,
    process::{Command, ExitStatus, Stdio},
    time::{Duration, Instant},
};

use k8s_openapi::{api::core::v1::Container, apimachinery::pkg::util::intstr::IntOrString};
use meshlet_api::env as menv;

use super::{io_err, netns, Cluster, Error, PodRun, Proc, GATEWAY, PATH};

/// How long a proxy or app may take to become ready.
const READY_TIMEOUT: Duration = Duration::from_secs(20);
/// How long an init container may run.
const INIT_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a postStart hook may run (a readiness wait takes well under a second).
const POST_START_TIMEOUT: Duration = Duration::from_secs(15);

impl Cluster {
    pub(super) fn start_pod(&self, i: usize) -> Result<(), Error> {
        let pod = &self.pods[i];
        let spec = pod.pod.spec.clone().unwrap_or_default();
        for c in spec.init_containers.iter().flatten() {
            if c.restart_policy.as_deref() == Some("Always") {
                self.spawn(pod, c)?;
                self.wait_probe(pod, c)?;
            } else {
                self.run_init(pod, c)?;
            }
        }
        for c in &spec.containers {
            self.spawn(pod, c)?;
            let hook = c
                .lifecycle
                .as_ref()
                .and_then(|l| l.post_start.as_ref())
                .and_then(|h| h.exec.as_ref())
                .and_then(|e| e.command.clone());
            if let Some(command) = hook {
                // As the kubelet does: the next container starts only once postStart
                // has run to completion, and a failed hook fails the container.
                self.run_post_start(pod, c, command)?;
            } else if c.name == meshlet_api::PROXY_CONTAINER_NAME {
                self.wait_probe(pod, c)?;
            }
        }
        self.wait_listening(pod)
    }

    fn run_post_start(
        &self,
        pod: &PodRun,
        c: &Container,
        command: Vec<String>,
    ) -> Result<(), Error> {
        let hook = Container {
            command: Some(command.clone()),
            args: None,
            ..c.clone()
        };
        let mut cmd = self.command_for(pod, &hook)?;
        let out = netns::run_with_timeout(&mut cmd, POST_START_TIMEOUT).map_err(|e| {
            Error::Other(format!(
                "postStart hook {command:?} of container {} in pod {}: {e}",
                c.name, pod.name
            ))
        })?;
        if out.status.success() {
            return Ok(());
        }
        Err(Error::Other(format!(
            "postStart hook {command:?} of container {} in pod {} failed ({}): {}{}",
            c.name,
            pod.name,
            out.status,
            String::from_utf8_lossy(&out.stdout).trim(),
            String::from_utf8_lossy(&out.stderr).trim()
        )))
    }

    pub(super) fn command_for(&self, pod: &PodRun, c: &Container) -> Result<Command, Error> {
        let (bin, args) = self.bins.resolve(c)?;
        let sc = c.security_context.clone().unwrap_or_default();
        let psc = pod
            .pod
            .spec
            .as_ref()
            .and_then(|s| s.security_context.clone())
            .unwrap_or_default();
        let uid = sc.run_as_user.or(psc.run_as_user).unwrap_or(0);
        let gid = sc.run_as_group.or(psc.run_as_group).unwrap_or(uid);
        let mut cmd = if uid != 0 {
            let mut cmd = pod.netns.command("setpriv");
            cmd.args([
                format!("--reuid={uid}"),
                format!("--regid={gid}"),
                "--clear-groups".into(),
            ]);
            cmd.arg(&bin);
            cmd
        } else {
            pod.netns.command(&bin)
        };
        cmd.args(&args);
        cmd.env_clear().env("PATH", PATH).env("RUST_BACKTRACE", "1");
        let mut env: Vec<(String, String)> = Vec::new();
        for e in c.env.iter().flatten() {
            if let Some(v) = &e.value {
                env.push((e.name.clone(), v.clone()));
            } else if let Some(f) = e.value_from.as_ref().and_then(|v| v.field_ref.as_ref()) {
                let v = match f.field_path.as_str() {
                    "metadata.name" => pod.name.clone(),
                    "metadata.namespace" => pod.namespace.clone(),
                    "status.podIP" => pod.ip.to_string(),
                    "status.podIPs" => std::iter::once(pod.ip.to_string())
                        .chain(pod.ip6.map(|ip| ip.to_string()))
                        .collect::<Vec<_>>()
                        .join(","),
                    "status.hostIP" => GATEWAY.to_string(),
                    "spec.serviceAccountName" => pod.service_account.clone(),
                    "spec.nodeName" => "mle2e-node".into(),
                    other => {
                        return Err(Error::Manifest(format!(
                            "container {} env {}: fieldRef {other} is not supported by the mini-cluster",
                            c.name, e.name
                        )))
                    }
                };
                env.push((e.name.clone(), v));
            } else if let Some(r) = e
                .value_from
                .as_ref()
                .and_then(|v| v.resource_field_ref.as_ref())
            {
                // No cgroup limits here: report the node's size like an unlimited container.
                let v = if r.resource.contains("cpu") { "2" } else { "0" };
                env.push((e.name.clone(), v.into()));
            }
        }
        if c.name == meshlet_api::PROXY_CONTAINER_NAME {
            // The mounted config volume becomes the file the harness wrote.
            env.retain(|(k, _)| k != menv::PROXY_CONFIG_PATH);
            match &self.control {
                // The config server serves the file instead.
                Some(cp) => env.extend(cp.proxy_env()),
                None => env.push((
                    menv::PROXY_CONFIG_PATH.into(),
                    self.mesh_path.display().to_string(),
                )),
            }
            if let Some(dir) = self.proxy_identity(pod)? {
                env.push((menv::PROXY_IDENTITY_DIR.into(), dir.display().to_string()));
            }
            for (k, v) in &self.proxy_env {
                env.retain(|(ek, _)| ek != k);
                env.push((k.clone(), v.clone()));
            }
        }
        cmd.envs(env);
        Ok(cmd)
    }

    pub(super) fn log_path(&self, pod: &str, container: &str) -> PathBuf {
        self.dir
            .path()
            .join("logs")
            .join(format!("{pod}.{container}.log"))
    }

    pub(super) fn spawn(&self, pod: &PodRun, c: &Container) -> Result<(), Error> {
        let mut cmd = self.command_for(pod, c)?;
        let log = self.log_path(&pod.name, &c.name);
        let f = File::create(&log).map_err(io_err(format!("creating {}", log.display())))?;
        let f2 = f.try_clone().map_err(io_err("dup log file"))?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(f)
            .stderr(f2)
            .spawn()
            .map_err(io_err(format!(
                "starting container {} of {}",
                c.name, pod.name
            )))?;
        self.lock().push(Proc {
            pod: pod.name.clone(),
            container: c.name.clone(),
            child,
        });
        Ok(())
    }

    pub(super) fn run_init(&self, pod: &PodRun, c: &Container) -> Result<String, Error> {
        let mut cmd = self.command_for(pod, c)?;
        let out = netns::run_with_timeout(&mut cmd, INIT_TIMEOUT)?;
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let log = self.log_path(&pod.name, &c.name);
        let _ = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .and_then(|mut f| f.write_all(text.as_bytes()));
        if !out.status.success() {
            return Err(Error::Other(format!(
                "init container {} of pod {} failed ({}): {}",
                c.name,
                pod.name,
                out.status,
                text.trim()
            )));
        }
        Ok(text)
    }

    pub(super) fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Proc>> {
        self.procs.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(super) fn exited(&self, pod: &str, container: &str) -> Option<ExitStatus> {
        let mut procs = self.lock();
        procs
            .iter_mut()
            .rev()
            .find(|p| p.pod == pod && p.container == container)
            .and_then(|p| p.child.try_wait().ok().flatten())
    }

    pub(super) fn wait_probe(&self, pod: &PodRun, c: &Container) -> Result<(), Error> {
        let (path, port) = match c
            .readiness_probe
            .as_ref()
            .or(c.startup_probe.as_ref())
            .and_then(|p| p.http_get.as_ref())
        {
            Some(h) => (
                h.path.clone().unwrap_or_else(|| "/".into()),
                match &h.port {
                    IntOrString::Int(p) => *p as u16,
                    IntOrString::String(_) => meshlet_api::ports::ADMIN,
                },
            ),
            None if c.name == meshlet_api::PROXY_CONTAINER_NAME => {
                ("/ready".into(), meshlet_api::ports::ADMIN)
            }
            None => return Ok(()),
        };
        let deadline = Instant::now() + READY_TIMEOUT;
        let mut last = String::new();
        while Instant::now() < deadline {
            if let Some(st) = self.exited(&pod.name, &c.name) {
                return Err(Error::Other(format!(
                    "container {} of pod {} exited ({st}) before it was ready; its log:\n{}",
                    c.name,
                    pod.name,
                    self.log(&pod.name, &c.name)
                )));
            }
            match self.http(
                pod,
                SocketAddr::from((Ipv4Addr::LOCALHOST, port)),
                "GET",
                &path,
            ) {
                Ok((200, _)) => return Ok(()),
                Ok((s, b)) => last = format!("{s} {}", b.trim()),
                Err(e) => last = e.to_string(),
            }
            std::thread::sleep(Duration::from_millis(25));
        }
        Err(Error::Timeout(format!(
            "container {} of pod {} not ready on :{port}{path} within {READY_TIMEOUT:?} (last: {last}); its log:\n{}",
            c.name,
            pod.name,
            self.log(&pod.name, &c.name)
        )))
    }

    /// Waits until every declared container port of the pod's app containers listens.
    pub(super) fn wait_listening(&self, pod: &PodRun) -> Result<(), Error> {
        let mut want: Vec<(u16, bool, String)> = Vec::new();
        for c in pod.containers() {
            if c.name == meshlet_api::PROXY_CONTAINER_NAME {
                continue;
            }
            for p in c.ports.iter().flatten() {
                let udp = p.protocol.as_deref() == Some("UDP");
                want.push((p.container_port as u16, udp, c.name.clone()));
            }
        }
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            let (tcp, udp) = pod.netns.enter(|| {
                (
                    ["tcp", "tcp6"]
                        .map(|t| {
                            fs::read_to_string(format!("/proc/thread-self/net/{t}"))
                                .unwrap_or_default()
                        })
                        .concat(),
                    ["udp", "udp6"]
                        .map(|t| {
                            fs::read_to_string(format!("/proc/thread-self/net/{t}"))
                                .unwrap_or_default()
                        })
                        .concat(),
                )
            })?;
            let missing: Vec<&(u16, bool, String)> = want
                .iter()
                .filter(|(port, is_udp, _)| {
                    let table = if *is_udp { &udp } else { &tcp };
                    !listening(table, *port, if *is_udp { "07" } else { "0A" })
                })
                .collect();
            let Some((port, _, container)) = missing.first() else {
                return Ok(());
            };
            if let Some(st) = self.exited(&pod.name, container) {
                return Err(Error::Other(format!(
                    "container {container} of pod {} exited ({st}); its log:\n{}",
                    pod.name,
                    self.log(&pod.name, container)
                )));
            }
            if Instant::now() > deadline {
                return Err(Error::Timeout(format!(
                    "container {container} of pod {} does not listen on port {port} after {READY_TIMEOUT:?}; its log:\n{}",
                    pod.name,
                    self.log(&pod.name, container)
                )));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Whether `/proc/net/{tcp,udp}` shows a socket on `port` in state `state`
/// (`0A` listening TCP, `07` bound UDP).
pub fn listening(table: &str, port: u16, state: &str) -> bool {
    let want = format!(":{port:04X}");
    table.lines().skip(1).any(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        f.len() > 3 && f[1].ends_with(&want) && f[3] == state
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_listening_sockets() {
        let t = "  sl  local_address rem_address   st\n   0: 00000000:1F90 00000000:0000 0A 00000000:00000000\n   1: 0100007F:3AA6 0100007F:1F90 01 x\n";
        assert!(listening(t, 8080, "0A"));
        assert!(!listening(t, 15014, "0A"));
    }
}
