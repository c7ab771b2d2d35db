//! Workload identities for the sidecars: what a node agent (or cert-manager's CSI
//! driver) would mount into each pod. One CA per cluster (`meshlet-injector ca init`),
//! one certificate per pod for its namespace and service account (`ca issue`), owned by
//! the proxy's UID so the sidecar can read its key, and `MESHLET_IDENTITY_DIR` pointing
//! at it. Rotation is the same `ca issue` into the same directory.

use std::{
    fs,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use super::{io_err, netns, Binaries, Cluster, Error, PodRun};

/// How long issuing a certificate may take (key generation is milliseconds).
const ISSUE_TIMEOUT: Duration = Duration::from_secs(20);

/// The cluster's CA and where pod identities go.
#[derive(Clone, Debug)]
pub struct Identities {
    injector: PathBuf,
    ca: PathBuf,
    root: PathBuf,
}

impl Identities {
    /// Creates the cluster CA under `dir/ca` (`meshlet-injector ca init`).
    pub fn init(bins: &Binaries, dir: &Path) -> Result<Self, Error> {
        if !bins.injector.is_file() {
            return Err(Error::Prereq(format!(
                "{} not found: the mini-cluster issues sidecar certificates with it; run \
                 `cargo build --workspace --bins` (or build the cluster with `.mtls(false)`)",
                bins.injector.display()
            )));
        }
        let ca = dir.join("ca");
        let root = dir.join("identities");
        fs::create_dir(&root).map_err(io_err("creating the identities dir"))?;
        // The proxy (UID 1337) walks through it to its own directory.
        fs::set_permissions(&root, fs::Permissions::from_mode(0o755))
            .map_err(io_err("chmod of the identities dir"))?;
        let mut cmd = Command::new(&bins.injector);
        cmd.args(["ca", "init", "--out"]).arg(&ca);
        let out = netns::run_with_timeout(&mut cmd, ISSUE_TIMEOUT)?;
        netns::check(&cmd, out)?;
        Ok(Self {
            injector: bins.injector.clone(),
            ca,
            root,
        })
    }

    /// The CA directory (`ca.pem`, `ca-key.pem`).
    pub fn ca_dir(&self) -> &Path {
        &self.ca
    }

    /// Where pod `pod`'s identity lives (it may not be issued yet).
    pub fn dir_of(&self, pod: &str) -> PathBuf {
        self.root.join(pod).join("identity")
    }

    /// Issues (or reissues: rotation) the pod's certificate for its namespace and
    /// service account, valid for `lifetime`, and hands the files to the proxy's UID.
    pub fn issue(&self, pod: &PodRun, lifetime: Duration) -> Result<PathBuf, Error> {
        let dir = self.dir_of(&pod.name);
        if let Some(parent) = dir.parent() {
            fs::create_dir_all(parent).map_err(io_err(format!("creating {}", parent.display())))?;
            fs::set_permissions(parent, fs::Permissions::from_mode(0o755))
                .map_err(io_err("chmod of the pod's identity parent"))?;
        }
        let mut cmd = Command::new(&self.injector);
        cmd.args(["ca", "issue", "--ca"])
            .arg(&self.ca)
            .args(["--namespace", &pod.namespace])
            .args(["--service-account", &pod.service_account])
            .args(["--lifetime", &lifetime_arg(lifetime)])
            .arg("--out")
            .arg(&dir);
        let out = netns::run_with_timeout(&mut cmd, ISSUE_TIMEOUT)?;
        netns::check(&cmd, out)?;
        let uid = nix::unistd::Uid::from_raw(meshlet_api::PROXY_UID);
        let gid = nix::unistd::Gid::from_raw(meshlet_api::PROXY_GID);
        let mut paths = vec![dir.clone()];
        for e in fs::read_dir(&dir).map_err(io_err(format!("listing {}", dir.display())))? {
            paths.push(e.map_err(io_err("listing the identity dir"))?.path());
        }
        for p in paths {
            nix::unistd::chown(&p, Some(uid), Some(gid)).map_err(|e| {
                Error::Other(format!(
                    "chown 1337:1337 {}: {e} (the proxy must read its key)",
                    p.display()
                ))
            })?;
        }
        Ok(dir)
    }
}

impl Cluster {
    /// The identity dir of a meshed pod's proxy, issued on first use; `None` when the
    /// cluster runs without mTLS.
    pub(super) fn proxy_identity(&self, pod: &PodRun) -> Result<Option<PathBuf>, Error> {
        let Some(ids) = &self.identities else {
            return Ok(None);
        };
        let dir = ids.dir_of(&pod.name);
        if dir.join("cert.pem").is_file() {
            return Ok(Some(dir));
        }
        ids.issue(pod, DEFAULT_LIFETIME).map(Some)
    }

    /// The cluster's identity provisioning, when mTLS is on.
    pub fn identities(&self) -> Option<&Identities> {
        self.identities.as_ref()
    }

    /// Reissues the certificate of pod `pod` into the same directory (a rotation as a
    /// node agent does it); the proxy picks it up on its next poll.
    pub fn rotate_identity(&self, pod: &str, lifetime: Duration) -> Result<PathBuf, Error> {
        let p = self.pod(pod)?;
        let ids = self.identities.as_ref().ok_or_else(|| {
            Error::Other(
                "this cluster runs without mTLS (`.mtls(false)`): nothing to rotate".into(),
            )
        })?;
        ids.issue(p, lifetime)
    }
}

/// A Gateway API duration (at most 5 digits per unit, so whole hours as `h`).
fn lifetime_arg(d: Duration) -> String {
    let s = d.as_secs();
    match s % 3600 {
        0 => format!("{}h", s / 3600),
        _ => format!("{s}s"),
    }
}

/// Lifetime of the certificates a pod starts with.
pub const DEFAULT_LIFETIME: Duration = Duration::from_secs(24 * 3600);
