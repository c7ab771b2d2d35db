//! The identity issuer against a real kube-apiserver (v1.37.2, `tools/kube/cluster.sh`):
//! the CA Secret bootstrap (two racing bootstraps end with one Secret and one CA; a
//! restart reuses it; a user-provided CA that is missing is refused), then the mesh
//! endpoint on loopback serving `POST /v1/certificate` over TLS, with real
//! TokenReviews:
//!
//! - a TokenRequest token (audience meshlet) gets a certificate for exactly its SA;
//! - a CSR naming another SA is refused (403 identity_mismatch);
//! - a token for another audience is refused (403 wrong_audience);
//! - a token signed with the cluster's service-account key but expired is refused
//!   (401 expired), while the same token unexpired is accepted;
//! - a token of a deleted service account is refused (401 unauthenticated);
//! - a client presenting the issued certificate is seen by routes as its SpiffeId;
//! - the counters `meshlet_identity_issued_total` and `_refused_total{reason}` match.
//!
//! Needs root and the control-plane binaries (`bash tools/kube/build.sh`); when they
//! are missing it FAILS saying so.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Command, ExitCode, Stdio},
    sync::Arc,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use anyhow::{bail, ensure, Context as _, Result};
use base64::Engine as _;
use http_body_util::{BodyExt as _, Full};
use k8s_openapi::api::{
    authentication::v1::{TokenRequest, TokenRequestSpec},
    core::v1::{Namespace, Secret, ServiceAccount},
};
use kube::api::{Api, DeleteParams, ListParams, ObjectMeta, PostParams};
use meshlet_api::SpiffeId;
use meshlet_injector::{
    ca,
    control_plane::{Endpoint, ServerIdentity},
    issuer::{self, ca_secret, kube::KubeReviewer, Issuer},
};
use rustls::pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer, ServerName};

const NS: &str = "issuer-test";
const TD: &str = "cluster.local";

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The folder `tools/kube/build.sh` puts the binaries in (same hash as the script).
fn kube_bin_dir() -> Result<PathBuf> {
    let here = root().join("tools/kube");
    let out = Command::new("bash")
        .arg("-c")
        .arg("cat go.mod go.sum | sha256sum | cut -c1-12")
        .current_dir(&here)
        .output()?;
    let hash = String::from_utf8(out.stdout)?.trim().to_string();
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

/// `cluster.sh up` in a state dir of our own; `down` on drop, also on failure.
struct ControlPlane {
    state: PathBuf,
}

impl ControlPlane {
    fn up() -> Result<Self> {
        ensure!(
            nix_is_root(),
            "run as root: tools/kube/cluster.sh runs the control plane as root"
        );
        let me = Self {
            state: root().join(format!("target/kube-issuer-test-{}", std::process::id())),
        };
        let out = me.script("up")?;
        ensure!(
            out.status.success(),
            "`tools/kube/cluster.sh up` failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(me)
    }

    fn script(&self, cmd: &str) -> Result<std::process::Output> {
        Command::new("bash")
            .arg(root().join("tools/kube/cluster.sh"))
            .arg(cmd)
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

fn nix_is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .map(|l| l.split_whitespace().nth(1) == Some("0"))
        })
        .unwrap_or(false)
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

async fn client(state: &Path) -> Result<kube::Client> {
    let kc = kube::config::Kubeconfig::read_from(state.join("kubeconfig"))?;
    let cfg = kube::Config::from_custom_kubeconfig(kc, &Default::default()).await?;
    Ok(kube::Client::try_from(cfg)?)
}

async fn token(c: &kube::Client, sa: &str, audience: &str) -> Result<String> {
    let api: Api<ServiceAccount> = Api::namespaced(c.clone(), NS);
    let tr = TokenRequest {
        spec: TokenRequestSpec {
            audiences: vec![audience.to_string()],
            expiration_seconds: Some(600),
            ..Default::default()
        },
        ..Default::default()
    };
    let out = api
        .create_token_request(sa, &PostParams::default(), &tr)
        .await?;
    Ok(out.status.context("TokenRequest without status")?.token)
}

/// A bound-style service-account token signed with the cluster's own key (the API
/// server will not mint one that is already expired).
fn mint(state: &Path, sa: &str, uid: &str, exp: u64) -> Result<String> {
    let key = PrivateKeyDer::from_pem_file(state.join("pki/sa.key"))
        .context("reading the cluster's service-account signing key")?;
    let pair = match &key {
        PrivateKeyDer::Pkcs8(k) => ring::signature::RsaKeyPair::from_pkcs8(k.secret_pkcs8_der()),
        PrivateKeyDer::Pkcs1(k) => ring::signature::RsaKeyPair::from_der(k.secret_pkcs1_der()),
        _ => bail!("sa.key is not an RSA key"),
    }
    .map_err(|e| anyhow::anyhow!("sa.key: {e}"))?;
    let b = |v: serde_json::Value| {
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string())
    };
    let iat = exp - 600;
    let signing_input = format!(
        "{}.{}",
        b(serde_json::json!({"alg": "RS256", "typ": "JWT"})),
        b(serde_json::json!({
            "aud": ["meshlet"],
            "exp": exp, "iat": iat, "nbf": iat,
            "iss": "https://kubernetes.default.svc.cluster.local",
            "sub": format!("system:serviceaccount:{NS}:{sa}"),
            "kubernetes.io": {"namespace": NS, "serviceaccount": {"name": sa, "uid": uid}},
        }))
    );
    let mut sig = vec![0; pair.public().modulus_len()];
    pair.sign(
        &ring::signature::RSA_PKCS1_SHA256,
        &ring::rand::SystemRandom::new(),
        signing_input.as_bytes(),
        &mut sig,
    )
    .map_err(|_| anyhow::anyhow!("RSA signing failed"))?;
    Ok(format!(
        "{signing_input}.{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(sig)
    ))
}

fn csr(sans: &[&str]) -> Result<(String, rcgen::KeyPair)> {
    let key = rcgen::KeyPair::generate()?;
    let mut p = rcgen::CertificateParams::default();
    for s in sans {
        p.subject_alt_names
            .push(rcgen::SanType::URI((*s).try_into()?));
    }
    Ok((p.serialize_request(&key)?.pem()?, key))
}

/// One HTTPS request to the mesh endpoint, verified against `anchors` for `name`,
/// optionally presenting a client certificate.
async fn request(
    addr: SocketAddr,
    anchors: &str,
    client_cert: Option<(&str, &str)>,
    method: &str,
    path: &str,
    bearer: Option<&str>,
    body: String,
) -> Result<(u16, String)> {
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(anchors.as_bytes()) {
        roots.add(c?)?;
    }
    let b = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_root_certificates(roots);
    let cfg = match client_cert {
        None => b.with_no_client_auth(),
        Some((cert, key)) => b.with_client_auth_cert(
            CertificateDer::pem_slice_iter(cert.as_bytes()).collect::<Result<_, _>>()?,
            PrivateKeyDer::from_pem_slice(key.as_bytes())?,
        )?,
    };
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let tls = tokio_rustls::TlsConnector::from(Arc::new(cfg))
        .connect(
            ServerName::try_from(meshlet_api::identity::CONTROL_PLANE_NAME.to_string())?,
            tcp,
        )
        .await?;
    let (mut send, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls)).await?;
    tokio::spawn(conn);
    let mut req = http::Request::builder()
        .method(method)
        .uri(path)
        .header("host", meshlet_api::identity::CONTROL_PLANE_NAME)
        .header("content-type", "application/json");
    if let Some(t) = bearer {
        req = req.header("authorization", format!("Bearer {t}"));
    }
    let resp = send
        .send_request(req.body(Full::new(bytes::Bytes::from(body)))?)
        .await?;
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await?.to_bytes();
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

async fn post_csr(
    addr: SocketAddr,
    anchors: &str,
    bearer: &str,
    csr_pem: &str,
) -> Result<(u16, serde_json::Value)> {
    let body = serde_json::to_string(&issuer::CertificateRequest {
        csr: csr_pem.to_string(),
    })?;
    let (st, b) = request(
        addr,
        anchors,
        None,
        "POST",
        issuer::PATH,
        Some(bearer),
        body,
    )
    .await?;
    Ok((
        st,
        serde_json::from_str(&b).with_context(|| format!("body {b:?}"))?,
    ))
}

fn uri_sans(pem: &str) -> Result<Vec<String>> {
    let der = CertificateDer::from_pem_slice(pem.as_bytes())?;
    let (_, x) = x509_parser::parse_x509_certificate(&der)?;
    Ok(x.subject_alternative_name()?
        .map(|s| {
            s.value
                .general_names
                .iter()
                .filter_map(|g| match g {
                    x509_parser::extensions::GeneralName::URI(u) => Some(u.to_string()),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default())
}

fn expect_refused(got: (u16, serde_json::Value), status: u16, reason: &str) -> Result<()> {
    ensure!(
        got.0 == status && got.1["reason"] == reason,
        "expected {status} {reason}, got {} {}",
        got.0,
        got.1
    );
    ensure!(
        got.1["error"].as_str().is_some_and(|e| !e.is_empty()),
        "refusal without a message: {}",
        got.1
    );
    Ok(())
}

async fn ca_bootstrap(c: &kube::Client) -> Result<()> {
    let secrets: Api<Secret> = Api::namespaced(c.clone(), NS);
    for round in 0..3 {
        let name = format!("race-{round}");
        let (a, b) = tokio::join!(
            ca_secret::load_or_create(c.clone(), NS, &name, TD, true),
            ca_secret::load_or_create(c.clone(), NS, &name, TD, true),
        );
        let ((a, oa), (b, ob)) = (a?, b?);
        ensure!(
            a.cert_pem() == b.cert_pem(),
            "round {round}: the racing bootstraps hold different CAs ({oa:?}, {ob:?})"
        );
        let n = secrets
            .list(&ListParams::default())
            .await?
            .items
            .iter()
            .filter(|s| s.metadata.name.as_deref() == Some(&name))
            .count();
        ensure!(n == 1, "round {round}: {n} Secrets named {name}");
        // A restart finds and reuses it.
        let (again, o) = ca_secret::load_or_create(c.clone(), NS, &name, TD, true).await?;
        ensure!(o == ca_secret::Origin::Existing && again.cert_pem() == a.cert_pem());
        println!("ok   bootstrap race {round}: one Secret, one CA ({oa:?} + {ob:?}); reused after restart");
    }
    let missing = ca_secret::load_or_create(c.clone(), NS, "user-ca", TD, false).await;
    match missing {
        Err(e @ ca_secret::CaSecretError::Missing { .. }) => {
            ensure!(e.to_string().contains("create secret tls"), "{e}");
        }
        other => bail!(
            "a missing user-provided CA was not refused: {:?}",
            other.map(|x| x.1)
        ),
    }
    ensure!(
        secrets.get_opt("user-ca").await?.is_none(),
        "a user-provided CA Secret was created"
    );
    println!("ok   missing user-provided CA refused, not created");
    Ok(())
}

async fn issuing(state: &Path, c: &kube::Client) -> Result<()> {
    let metrics = meshlet_injector::serve::metrics_handle();
    let (ca, _) = ca_secret::load_or_create(c.clone(), NS, "meshlet-identity-ca", TD, true).await?;
    let ca = Arc::new(ca);
    let anchors = ca.cert_pem().to_string();
    let issuer = Arc::new(Issuer::new(
        ca.clone(),
        Arc::new(KubeReviewer::new(c.clone())),
        TD,
        ca::DEFAULT_LIFETIME,
    )?);
    let who = ServerIdentity {
        dns_names: ServerIdentity::service_names(
            "meshlet-injector",
            "meshlet-system",
            &[meshlet_api::identity::CONTROL_PLANE_NAME.to_string()],
        ),
        id: SpiffeId::new(TD, "meshlet-system", "meshlet-injector")?,
        lifetime: Duration::from_secs(3600),
    };
    let ep = Endpoint::bind("127.0.0.1:0".parse()?, ca.clone(), who).await?;
    let addr = ep.local_addr()?;
    // A route that reports the client identity the endpoint saw, as delivery reads it.
    let whoami = axum::Router::new().route(
        "/whoami",
        axum::routing::get(|req: axum::extract::Request| async move {
            req.extensions()
                .get::<SpiffeId>()
                .map(|id| id.to_string())
                .unwrap_or_else(|| "anonymous".to_string())
        }),
    );
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(ep.run(issuer::router(issuer).merge(whoami), async move {
        let _ = stop_rx.await;
    }));

    // (a) a real TokenRequest token gets exactly its SA.
    let web = token(c, "web", "meshlet").await?;
    let (csr_pem, key) = csr(&[])?;
    let (st, v) = post_csr(addr, &anchors, &web, &csr_pem).await?;
    ensure!(st == 200, "a valid token was refused: {st} {v}");
    let chain = v["certificateChain"]
        .as_str()
        .context("no certificateChain")?;
    ensure!(
        uri_sans(chain)? == [format!("spiffe://{TD}/ns/{NS}/sa/web")],
        "wrong SAN: {:?}",
        uri_sans(chain)?
    );
    ensure!(
        v["trustAnchors"] == anchors.as_str(),
        "trust anchors differ"
    );
    println!("ok   TokenRequest token for {NS}/web got spiffe://{TD}/ns/{NS}/sa/web");

    // The issued certificate is a client identity the endpoint recognises.
    let key_pem = key.serialize_pem();
    let (st, body) = request(
        addr,
        &anchors,
        Some((chain, &key_pem)),
        "GET",
        "/whoami",
        None,
        String::new(),
    )
    .await?;
    ensure!(
        st == 200 && body == format!("spiffe://{TD}/ns/{NS}/sa/web"),
        "whoami with the issued cert: {st} {body}"
    );
    let (_, body) = request(addr, &anchors, None, "GET", "/whoami", None, String::new()).await?;
    ensure!(body == "anonymous", "whoami without a cert: {body}");
    println!("ok   a client presenting the issued certificate is seen as its SpiffeId");

    // (b) the same token asking for another SA's name.
    let (other, _) = csr(&[&format!("spiffe://{TD}/ns/{NS}/sa/admin")])?;
    expect_refused(
        post_csr(addr, &anchors, &web, &other).await?,
        403,
        "identity_mismatch",
    )?;
    println!("ok   CSR for another identity refused (403 identity_mismatch)");

    // (c) another audience.
    let api_aud = token(c, "web", "https://kubernetes.default.svc.cluster.local").await?;
    expect_refused(
        post_csr(addr, &anchors, &api_aud, &csr_pem).await?,
        403,
        "wrong_audience",
    )?;
    println!("ok   token of another audience refused (403 wrong_audience)");

    // (d) expired, signed with the cluster's key; the same token unexpired passes,
    // so only the expiry differs.
    let sas: Api<ServiceAccount> = Api::namespaced(c.clone(), NS);
    let uid = sas
        .get("web")
        .await?
        .metadata
        .uid
        .context("SA without uid")?;
    let fresh = mint(state, "web", &uid, now() + 600)?;
    let (st, v) = post_csr(addr, &anchors, &fresh, &csr_pem).await?;
    ensure!(
        st == 200,
        "a self-minted valid token was refused ({st} {v}); the minting is wrong"
    );
    let expired = mint(state, "web", &uid, now() - 600)?;
    expect_refused(
        post_csr(addr, &anchors, &expired, &csr_pem).await?,
        401,
        "expired",
    )?;
    println!("ok   expired token refused (401 expired); the same token unexpired accepted");

    // (e) a deleted service account.
    let gone = token(c, "gone", "meshlet").await?;
    sas.delete("gone", &DeleteParams::default()).await?;
    let mut last = (0, serde_json::Value::Null);
    let deleted_at = std::time::Instant::now();
    // The API server caches successful token authentications (about 10 s), so a
    // deleted account's token keeps working for a moment: bounded wait, counted.
    let mut granted_after_delete = 0;
    for _ in 0..150 {
        last = post_csr(addr, &anchors, &gone, &csr_pem).await?;
        if last.0 != 200 {
            break;
        }
        granted_after_delete += 1;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    expect_refused(last, 401, "unauthenticated")?;
    println!(
        "ok   token of a deleted service account refused (401 unauthenticated) {:.1} s after the delete",
        deleted_at.elapsed().as_secs_f64()
    );

    // (f) no token, garbage CSR.
    let (st, b) = request(
        addr,
        &anchors,
        None,
        "POST",
        issuer::PATH,
        None,
        "{\"csr\":\"x\"}".into(),
    )
    .await?;
    ensure!(st == 401 && b.contains("missing_token"), "{st} {b}");
    expect_refused(
        post_csr(addr, &anchors, &web, "junk").await?,
        400,
        "bad_csr",
    )?;
    println!("ok   missing token 401, bad CSR 400");

    let text = metrics.render();
    for (line, want) in [
        ("meshlet_identity_issued_total", 2 + granted_after_delete),
        (
            "meshlet_identity_refused_total{reason=\"identity_mismatch\"}",
            1,
        ),
        (
            "meshlet_identity_refused_total{reason=\"wrong_audience\"}",
            1,
        ),
        ("meshlet_identity_refused_total{reason=\"expired\"}", 1),
        (
            "meshlet_identity_refused_total{reason=\"unauthenticated\"}",
            1,
        ),
        (
            "meshlet_identity_refused_total{reason=\"missing_token\"}",
            1,
        ),
        ("meshlet_identity_refused_total{reason=\"bad_csr\"}", 1),
    ] {
        let got = text
            .lines()
            .find(|l| l.starts_with(line) && l[line.len()..].starts_with(' '))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse::<u64>().ok());
        ensure!(got == Some(want), "{line} = {got:?}, want {want}\n{text}");
    }
    println!("ok   issued/refused counters match");
    let _ = stop_tx.send(());
    let _ = server.await;
    Ok(())
}

async fn story(state: &Path) -> Result<()> {
    let c = client(state).await?;
    let nss: Api<Namespace> = Api::all(c.clone());
    nss.create(
        &PostParams::default(),
        &Namespace {
            metadata: ObjectMeta {
                name: Some(NS.into()),
                ..Default::default()
            },
            ..Default::default()
        },
    )
    .await?;
    let sas: Api<ServiceAccount> = Api::namespaced(c.clone(), NS);
    for sa in ["web", "gone"] {
        sas.create(
            &PostParams::default(),
            &ServiceAccount {
                metadata: ObjectMeta {
                    name: Some(sa.into()),
                    ..Default::default()
                },
                ..Default::default()
            },
        )
        .await?;
    }
    ca_bootstrap(&c).await?;
    issuing(state, &c).await?;
    binary(state, &c).await
}

/// `meshlet-injector serve --identity=true` as the chart runs it.
struct Serve {
    child: std::process::Child,
    log: PathBuf,
}

impl Serve {
    fn start(state: &Path, dir: &Path, webhook: u16, mesh: u16, n: u32) -> Result<Self> {
        let log = dir.join(format!("serve-{n}.log"));
        let child = Command::new(env!("CARGO_BIN_EXE_meshlet-injector"))
            .args([
                "serve",
                &format!("--addr=127.0.0.1:{webhook}"),
                &format!("--tls-cert={}", dir.join("tls.crt").display()),
                &format!("--tls-key={}", dir.join("tls.key").display()),
                "--identity=true",
                &format!("--mesh-addr=127.0.0.1:{mesh}"),
                &format!("--namespace={NS}"),
                "--ca-secret=serve-ca",
                "--cert-lifetime=2h",
                "--control-plane-address=198.19.0.12:15012",
            ])
            .env("KUBECONFIG", state.join("kubeconfig"))
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log)?)
            .spawn()
            .context("starting meshlet-injector serve")?;
        Ok(Self { child, log })
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGTERM and the exit status (bounded).
    fn stop(&mut self) -> Result<std::process::ExitStatus> {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        for _ in 0..200 {
            if let Some(st) = self.child.try_wait()? {
                return Ok(st);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        bail!("meshlet-injector ignored SIGTERM for 10 s")
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// The value of env var `name` anywhere in a JSON Patch.
fn env_value(v: &serde_json::Value, name: &str) -> Option<String> {
    match v {
        serde_json::Value::Object(m) => {
            if m.get("name").and_then(|n| n.as_str()) == Some(name) {
                if let Some(s) = m.get("value").and_then(|x| x.as_str()) {
                    return Some(s.to_string());
                }
            }
            m.values().find_map(|x| env_value(x, name))
        }
        serde_json::Value::Array(a) => a.iter().find_map(|x| env_value(x, name)),
        _ => None,
    }
}

async fn mutate(addr: SocketAddr, anchors: &str) -> Result<serde_json::Value> {
    let review = serde_json::json!({
        "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
        "request": {
            "uid": "3f0d1c4e-1b7a-4f55-9d7e-0c6a1d1f0a01",
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "namespace": "shop", "operation": "CREATE", "userInfo": {"username": "test"},
            "object": {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "web", "namespace": "shop"},
                "spec": {"containers": [{"name": "app", "image": "registry.invalid/app:1"}]}}
        }
    });
    let (st, body) = request(
        addr,
        anchors,
        None,
        "POST",
        "/mutate",
        None,
        review.to_string(),
    )
    .await?;
    ensure!(st == 200, "/mutate: {st} {body}");
    let v: serde_json::Value = serde_json::from_str(&body)?;
    let patch = v["response"]["patch"].as_str().context("no patch")?;
    Ok(serde_json::from_slice(
        &base64::engine::general_purpose::STANDARD.decode(patch)?,
    )?)
}

async fn binary(state: &Path, c: &kube::Client) -> Result<()> {
    let dir = tempfile::tempdir()?;
    // The webhook's own serving certificate, from a CA of the test's.
    let web_ca = ca::Ca::generate(TD, ca::DEFAULT_CA_LIFETIME)?;
    let who = SpiffeId::new(TD, "meshlet-system", "meshlet-injector")?;
    let issued = web_ca.issue_server(
        &[meshlet_api::identity::CONTROL_PLANE_NAME.to_string()],
        &who,
        Duration::from_secs(3600),
    )?;
    std::fs::write(dir.path().join("tls.crt"), &issued.cert_pem)?;
    std::fs::write(dir.path().join("tls.key"), &issued.key_pem)?;
    let (webhook, mesh) = (free_port()?, free_port()?);
    let web_addr: SocketAddr = format!("127.0.0.1:{webhook}").parse()?;
    let mesh_addr: SocketAddr = format!("127.0.0.1:{mesh}").parse()?;
    let secrets: Api<Secret> = Api::namespaced(c.clone(), NS);
    let web = token(c, "web", "meshlet").await?;

    let mut anchors_seen = Vec::new();
    for n in 0..2 {
        let mut serve = Serve::start(state, dir.path(), webhook, mesh, n)?;
        let r = async {
            // Bounded wait for both listeners.
            let mut patch = None;
            for _ in 0..100 {
                if let Ok(p) = mutate(web_addr, web_ca.cert_pem()).await {
                    patch = Some(p);
                    break;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            let patch = patch.context("the webhook never answered")?;
            let secret = secrets.get("serve-ca").await?;
            let ca_pem = String::from_utf8(secret.data.context("no data")?["tls.crt"].0.clone())?;
            ensure!(
                env_value(&patch, "MESHLET_TRUST_ANCHORS").as_deref() == Some(ca_pem.as_str()),
                "the injected trust anchors are not the CA in Secret serve-ca"
            );
            ensure!(
                env_value(&patch, "MESHLET_CONTROL_PLANE_ADDR").as_deref()
                    == Some("198.19.0.12:15012"),
                "control plane address not injected: {patch}"
            );
            ensure!(
                env_value(&patch, "MESHLET_IDENTITY_TOKEN").as_deref()
                    == Some("/var/run/secrets/meshlet/tokens/token"),
                "token path not injected"
            );
            let (csr_pem, _) = csr(&[])?;
            let (st, v) = post_csr(mesh_addr, &ca_pem, &web, &csr_pem).await?;
            ensure!(
                st == 200,
                "the binary's issuer refused a valid token: {st} {v}"
            );
            let chain = v["certificateChain"].as_str().context("no chain")?;
            let der = CertificateDer::from_pem_slice(chain.as_bytes())?;
            let (_, x) = x509_parser::parse_x509_certificate(&der)?;
            let life = x.validity().not_after.timestamp() - x.validity().not_before.timestamp();
            ensure!(
                life == 2 * 3600 + 300,
                "--cert-lifetime=2h (+5 min backdate) gave {life} s"
            );
            anchors_seen.push(ca_pem);
            Ok::<_, anyhow::Error>(())
        }
        .await;
        if let Err(e) = r {
            bail!("{e:#}\n--- meshlet-injector log ---\n{}", serve.log());
        }
        let st = serve.stop()?;
        ensure!(
            st.success(),
            "serve exited with {st} on SIGTERM:\n{}",
            serve.log()
        );
    }
    ensure!(
        anchors_seen[0] == anchors_seen[1],
        "a restarted injector made a new CA instead of reusing Secret serve-ca"
    );
    println!("ok   `meshlet-injector serve --identity=true`: creates the CA Secret, injects its anchors and address, issues 2 h certificates, reuses the CA after a restart, exits 0 on SIGTERM");
    Ok(())
}

fn main() -> ExitCode {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let run = || -> Result<()> {
        kube_bin_dir()?;
        let cp = ControlPlane::up()?;
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?;
        let r = rt.block_on(async {
            tokio::time::timeout(Duration::from_secs(180), story(&cp.state)).await
        });
        drop(cp);
        r.context("the issuer story took over 180 s")?
    };
    match run() {
        Ok(()) => {
            println!("issuer_kube: all passed");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("issuer_kube: FAILED: {e:#}");
            ExitCode::FAILURE
        }
    }
}
