//! Network namespaces and the commands that run inside them.
//!
//! Every command here names its namespace (`ip -n NS` or `ip netns exec NS`), so the
//! host's root namespace is never changed.

use std::{
    fs::File,
    net::{Ipv4Addr, Ipv6Addr},
    path::Path,
    process::{Command, Output, Stdio},
    time::{Duration, Instant},
};

use nix::sched::CloneFlags;

use super::{Error, GATEWAY, GATEWAY6};

/// Directories where `ip`, `iptables` and friends live on Debian-like systems; added
/// to every command's PATH so a user PATH without the sbin directories still works.
pub const SYSTEM_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// `ip` with a PATH that finds the system tools.
fn ip_cmd() -> Command {
    let mut c = Command::new("ip");
    c.env("PATH", search_path());
    c
}

/// The caller's PATH followed by [`SYSTEM_PATH`].
pub fn search_path() -> String {
    match std::env::var("PATH") {
        Ok(p) if !p.is_empty() => format!("{p}:{SYSTEM_PATH}"),
        _ => SYSTEM_PATH.to_string(),
    }
}

/// A named network namespace (`/run/netns/<name>`).
#[derive(Clone, Debug)]
pub struct Netns {
    name: String,
}

impl Netns {
    /// Creates `name`; fails if it exists.
    pub fn create(name: &str) -> Result<Self, Error> {
        run(ip_cmd().args(["netns", "add", name]))?;
        let ns = Self {
            name: name.to_string(),
        };
        if let Err(e) = ns.ip(&["link", "set", "lo", "up"]) {
            Self::delete(name);
            return Err(e);
        }
        Ok(ns)
    }

    /// A handle on a namespace that already exists (found in `/run/netns`).
    pub fn existing(name: &str) -> Self {
        Self {
            name: name.to_string(),
        }
    }

    /// The namespace's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// `ip -n NS ARGS`.
    pub fn ip(&self, args: &[&str]) -> Result<String, Error> {
        run(ip_cmd().arg("-n").arg(&self.name).args(args))
    }

    /// A command that runs `program` inside the namespace.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = ip_cmd();
        c.args(["netns", "exec", &self.name]).arg(program);
        c
    }

    /// Runs `argv` inside the namespace and returns its stdout; fails on a non-zero exit.
    pub fn exec(&self, argv: &[&str]) -> Result<String, Error> {
        let mut c = self.command(argv[0]);
        c.args(&argv[1..]);
        run(&mut c)
    }

    /// Writes a network sysctl of this namespace (`net.ipv4.ip_forward`): /proc/sys/net
    /// shows the namespace of the writing thread, so no sysctl binary is needed.
    pub fn sysctl(&self, key: &str, value: &str) -> Result<(), Error> {
        let path = format!("/proc/sys/{}", key.replace('.', "/"));
        let value = value.to_string();
        self.enter(move || std::fs::write(&path, value).map_err(|e| (path, e)))?
            .map_err(|(path, source)| Error::Io {
                context: format!("writing {path} in namespace {}", self.name),
                source,
            })
    }

    /// Runs `f` on a thread that has entered the namespace: sockets it creates live
    /// there (setns changes only the calling thread's network namespace).
    pub fn enter<T: Send>(&self, f: impl FnOnce() -> T + Send) -> Result<T, Error> {
        let path = Path::new("/run/netns").join(&self.name);
        let file = File::open(&path).map_err(|e| Error::Io {
            context: format!("opening {}", path.display()),
            source: e,
        })?;
        std::thread::scope(|s| {
            s.spawn(move || {
                nix::sched::setns(&file, CloneFlags::CLONE_NEWNET)
                    .map_err(|e| Error::Other(format!("setns into {}: {e}", path.display())))?;
                Ok(f())
            })
            .join()
            .map_err(|_| Error::Other("a thread inside a namespace panicked".into()))?
        })
    }

    /// Process ids running inside the namespace.
    pub fn pids(&self) -> Vec<i32> {
        ip_cmd()
            .args(["netns", "pids", &self.name])
            .output()
            .map(|o| {
                String::from_utf8_lossy(&o.stdout)
                    .split_whitespace()
                    .filter_map(|p| p.parse().ok())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Deletes the namespace (best effort: used from Drop).
    pub fn delete(name: &str) -> bool {
        ip_cmd()
            .args(["netns", "del", name])
            .stderr(Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false)
    }
}

/// The CNI ADD of the ptp plugin: a veth `veth` in `node` whose peer is `eth0` in
/// `pod`, the pod's /32 (and /128) on `eth0`, a default route via the link-local
/// gateway on the node end, and a host route per pod address in the node.
pub fn wire_pod(
    node: &Netns,
    pod: &Netns,
    veth: &str,
    ip: Ipv4Addr,
    ip6: Option<Ipv6Addr>,
) -> Result<(), Error> {
    let ns_name = pod.name();
    node.ip(&[
        "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns_name,
    ])?;
    let ip_s = ip.to_string();
    let gw = GATEWAY.to_string();
    pod.ip(&["addr", "add", &format!("{ip_s}/32"), "dev", "eth0"])?;
    pod.ip(&["link", "set", "eth0", "up"])?;
    pod.ip(&["route", "add", &gw, "dev", "eth0", "scope", "link"])?;
    pod.ip(&["route", "add", "default", "via", &gw, "dev", "eth0"])?;
    node.ip(&["addr", "add", &format!("{gw}/32"), "dev", veth])?;
    node.ip(&["link", "set", veth, "up"])?;
    node.ip(&[
        "route",
        "add",
        &format!("{ip_s}/32"),
        "dev",
        veth,
        "scope",
        "link",
    ])?;
    if let Some(ip6) = ip6 {
        let ip6_s = ip6.to_string();
        let gw6 = GATEWAY6.to_string();
        pod.ip(&[
            "-6",
            "addr",
            "add",
            &format!("{ip6_s}/128"),
            "dev",
            "eth0",
            "nodad",
        ])?;
        pod.ip(&["-6", "route", "add", "default", "via", &gw6, "dev", "eth0"])?;
        node.ip(&[
            "-6",
            "addr",
            "add",
            &format!("{gw6}/64"),
            "dev",
            veth,
            "nodad",
        ])?;
        node.ip(&["-6", "route", "add", &format!("{ip6_s}/128"), "dev", veth])?;
    }
    Ok(())
}

/// Names of all namespaces whose name starts with `prefix`.
pub fn list_with_prefix(prefix: &str) -> Vec<String> {
    std::fs::read_dir("/run/netns")
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with(prefix))
                .collect()
        })
        .unwrap_or_default()
}

/// Runs a command to completion; fails with its stderr on a non-zero exit.
pub fn run(c: &mut Command) -> Result<String, Error> {
    let out = c.stdin(Stdio::null()).output().map_err(|e| Error::Io {
        context: format!("running {}", show(c)),
        source: e,
    })?;
    check(c, out)
}

/// Turns a finished command into its stdout or an error naming it.
pub fn check(c: &Command, out: Output) -> Result<String, Error> {
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(Error::Command {
            cmd: show(c),
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        })
    }
}

/// Runs a command with a deadline, killing it when the deadline passes.
pub fn run_with_timeout(c: &mut Command, timeout: Duration) -> Result<Output, Error> {
    let mut child = c
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| Error::Io {
            context: format!("running {}", show(c)),
            source: e,
        })?;
    // Drain the pipes on threads so a chatty child cannot block on a full pipe.
    let mut so = child.stdout.take();
    let mut se = child.stderr.take();
    let t_out = std::thread::spawn(move || read_all(so.as_mut()));
    let t_err = std::thread::spawn(move || read_all(se.as_mut()));
    let deadline = Instant::now() + timeout;
    let status = loop {
        match child.try_wait() {
            Ok(Some(s)) => break s,
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(10)),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(Error::Timeout(format!(
                    "{} did not finish within {timeout:?}",
                    show(c)
                )));
            }
        }
    };
    Ok(Output {
        status,
        stdout: t_out.join().unwrap_or_default(),
        stderr: t_err.join().unwrap_or_default(),
    })
}

fn read_all<R: std::io::Read>(r: Option<&mut R>) -> Vec<u8> {
    let mut v = Vec::new();
    if let Some(r) = r {
        let _ = r.read_to_end(&mut v);
    }
    v
}

/// A command line for messages.
pub fn show(c: &Command) -> String {
    std::iter::once(c.get_program())
        .chain(c.get_args())
        .map(|a| a.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ")
}
