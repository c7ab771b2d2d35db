//! A config server in the mini-cluster: `meshlet-injector serve-config` in the node's
//! namespace, serving the harness's mesh.json (`GET /v1/config` over TLS on
//! `169.254.1.1:15012`, the gateway every pod routes through), and every sidecar
//! watching it through `MESHLET_CONTROL_PLANE_ADDR` instead of reading the file. The
//! server's certificate (for `meshlet-injector.meshlet-system.svc`) comes from a CA of
//! its own, handed to the proxies as `MESHLET_TRUST_ANCHORS`; with mesh mTLS on, the
//! proxies present their workload certificates and get their namespace's view by
//! identity.

use std::{
    fs,
    net::SocketAddr,
    path::PathBuf,
    process::Stdio,
    time::{Duration, Instant},
};

use meshlet_api::env as menv;

use super::{io_err, Cluster, Error, Proc, GATEWAY};

/// The pseudo pod name the server's process is registered under.
pub const POD: &str = "control-plane";
/// Its container name.
pub const CONTAINER: &str = "config-server";
/// How long the server may take to listen.
const START_TIMEOUT: Duration = Duration::from_secs(20);

/// Where the config server listens and what the proxies need to trust it.
#[derive(Clone, Debug)]
pub struct ControlPlane {
    /// Listen address as pods reach it.
    pub addr: SocketAddr,
    dir: PathBuf,
    trust_anchors: String,
}

impl ControlPlane {
    /// Makes the server's certificate under `dir/control-plane`.
    pub(super) fn new(dir: &std::path::Path) -> Result<Self, Error> {
        use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
        let dir = dir.join("control-plane");
        fs::create_dir_all(&dir).map_err(io_err("creating the control-plane dir"))?;
        let rc =
            |e: rcgen::Error| Error::Other(format!("making the config server's certificate: {e}"));
        let ca_key = KeyPair::generate().map_err(rc)?;
        let mut params = CertificateParams::new(Vec::<String>::new()).map_err(rc)?;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca = params.self_signed(&ca_key).map_err(rc)?;
        let issuer = Issuer::new(params, ca_key);
        let key = KeyPair::generate().map_err(rc)?;
        let leaf = CertificateParams::new(vec![meshlet_api::identity::CONTROL_PLANE_NAME.into()])
            .map_err(rc)?
            .signed_by(&key, &issuer)
            .map_err(rc)?;
        fs::write(dir.join("tls.crt"), leaf.pem()).map_err(io_err("writing tls.crt"))?;
        fs::write(dir.join("tls.key"), key.serialize_pem()).map_err(io_err("writing tls.key"))?;
        Ok(Self {
            addr: SocketAddr::from((GATEWAY, meshlet_api::ports::CONTROL_PLANE)),
            dir,
            trust_anchors: ca.pem(),
        })
    }

    /// The proxy env that points at the server (replacing `MESHLET_CONFIG_PATH`).
    pub(super) fn proxy_env(&self) -> Vec<(String, String)> {
        vec![
            (menv::CONTROL_PLANE_ADDR.into(), self.addr.to_string()),
            (menv::TRUST_ANCHORS.into(), self.trust_anchors.clone()),
        ]
    }
}

impl Cluster {
    /// Starts (or restarts) the config server and waits until it listens.
    pub fn start_config_server(&self) -> Result<(), Error> {
        let cp = self
            .control
            .as_ref()
            .ok_or_else(|| Error::Other("the cluster was built without a config server".into()))?;
        let log = self.log_path(POD, CONTAINER);
        let f = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .map_err(io_err(format!("creating {}", log.display())))?;
        let f2 = f.try_clone().map_err(io_err("dup log file"))?;
        let mut cmd = self.node.command(&self.bins.injector);
        cmd.arg("serve-config")
            .arg("--file")
            .arg(&self.mesh_path)
            // Any address of the node: pods reach it as their gateway.
            .args(["--addr", &format!("0.0.0.0:{}", cp.addr.port())])
            .arg("--tls-cert")
            .arg(cp.dir.join("tls.crt"))
            .arg("--tls-key")
            .arg(cp.dir.join("tls.key"))
            .args(["--poll-interval", "100ms", "--heartbeat", "1s"]);
        if let Some(ids) = &self.identities {
            cmd.arg("--client-ca").arg(ids.ca_dir().join("ca.pem"));
        }
        let before = fs::read_to_string(&log).map(|s| s.len()).unwrap_or(0);
        let child = cmd
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(f)
            .stderr(f2)
            .spawn()
            .map_err(io_err("starting meshlet-injector serve-config"))?;
        self.lock().push(Proc {
            pod: POD.into(),
            container: CONTAINER.into(),
            child,
        });
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            let text = fs::read_to_string(&log).unwrap_or_default();
            let new = text.get(before..).unwrap_or_default();
            if new.contains("meshlet config server listening") {
                return Ok(());
            }
            if let Some(st) = self.exited(POD, CONTAINER) {
                return Err(Error::Other(format!(
                    "meshlet-injector serve-config exited with {st}: {}",
                    new.trim()
                )));
            }
            if Instant::now() > deadline {
                return Err(Error::Timeout(format!(
                    "the config server did not listen within {START_TIMEOUT:?}: {}",
                    new.trim()
                )));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Kills the config server (proxies keep their last config).
    pub fn stop_config_server(&self) -> Result<(), Error> {
        let mut procs = self.lock();
        let i = procs
            .iter()
            .position(|p| p.pod == POD && p.container == CONTAINER)
            .ok_or_else(|| Error::Other("the config server is not running".into()))?;
        let mut p = procs.remove(i);
        let _ = p.child.kill();
        p.child
            .wait()
            .map_err(io_err("waiting for the config server"))?;
        Ok(())
    }
}
