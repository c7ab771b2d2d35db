//! The workload identity: certificate chain, private key and trust anchor from
//! `MESHLET_IDENTITY_DIR`, reloaded when the files change and swapped atomically.
//!
//! The directory holds `cert.pem` (leaf first, then any intermediate), `key.pem`
//! (PKCS#8 or SEC1) and `ca.pem` (the mesh trust anchor), as `meshlet-injector ca
//! issue` writes them and as a mounted Secret or projected volume presents them. The
//! rustls configs are built once; their resolvers and verifiers read the current
//! [`Credentials`] at each handshake, so a rotation applies to new handshakes while
//! established connections keep the keys they negotiated.

use std::{
    collections::HashMap,
    fmt,
    hash::{DefaultHasher, Hash, Hasher},
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

use arc_swap::ArcSwapOption;
use meshlet_api::{SpiffeId, MESH_ALPN};
use metrics::Gauge;
use rustls::{
    client::{ClientSessionMemoryCache, ResolvesClientCert, Resumption},
    crypto::CryptoProvider,
    pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer},
    server::{
        danger::ClientCertVerifier, ClientHello, ResolvesServerCert, ServerSessionMemoryCache,
        WebPkiClientVerifier,
    },
    sign::CertifiedKey,
    ClientConfig, RootCertStore, ServerConfig, SignatureScheme,
};

use super::{
    connect::ClientTls,
    der,
    verify::{self, ClientVerifier, ServerVerifier},
    VERSIONS,
};
use crate::metrics::Metrics;

/// The certificate chain file.
pub const CERT_FILE: &str = "cert.pem";
/// The private key file.
pub const KEY_FILE: &str = "key.pem";
/// The trust anchor file.
pub const CA_FILE: &str = "ca.pem";
/// How often the directory is looked at.
pub const POLL_INTERVAL: Duration = Duration::from_secs(1);

/// Server-side TLS 1.3 sessions kept for resumption.
const SERVER_SESSIONS: usize = 64;
/// Client-side sessions kept (per server name a few tickets each).
const CLIENT_SESSIONS: usize = 32;
/// Client configs cached, one per distinct set of expected server identities.
const MAX_CLIENT_CONFIGS: usize = 64;

/// Why the identity files cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// A file could not be read.
    #[error(
        "cannot read {path}: {source} (check MESHLET_IDENTITY_DIR and the mounted identity volume)"
    )]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A file holds no PEM of the expected kind.
    #[error("{path} holds no {what}")]
    Pem {
        /// The file.
        path: PathBuf,
        /// What was expected.
        what: &'static str,
    },
    /// The key does not fit the certificate, or rustls cannot use it.
    #[error(
        "key.pem does not belong to cert.pem in {dir}: {source}; write both from the same issue"
    )]
    Key {
        /// The directory.
        dir: PathBuf,
        /// rustls's reason.
        source: rustls::Error,
    },
    /// Our own certificate has no usable SPIFFE id.
    #[error("cert.pem in {dir} has no usable SPIFFE id: {source}")]
    Id {
        /// The directory.
        dir: PathBuf,
        /// What is wrong.
        source: verify::VerifyError,
    },
    /// Our own certificate does not chain to the trust anchor.
    #[error("cert.pem in {dir} is not valid under ca.pem: {source}; reissue it from the mesh CA")]
    Untrusted {
        /// The directory.
        dir: PathBuf,
        /// rustls's reason.
        source: rustls::Error,
    },
    /// rustls refused to build a config.
    #[error("TLS setup failed: {0}")]
    Config(String),
}

/// One loaded identity; immutable, replaced whole on rotation.
pub struct Credentials {
    /// Our SPIFFE id (from cert.pem).
    pub id: SpiffeId,
    /// Chain and signing key.
    pub key: Arc<CertifiedKey>,
    /// The mesh trust anchor(s).
    pub roots: Arc<RootCertStore>,
    /// webpki's client chain validation under `roots`.
    pub client_verifier: Arc<dyn ClientCertVerifier>,
    /// NotAfter of our certificate, unix seconds.
    pub not_after: u64,
}

/// The identity store and the TLS configs built over it.
pub struct Identity {
    /// `None` when the certificate comes from the control plane's issuer.
    dir: Option<PathBuf>,
    creds: Arc<ArcSwapOption<Credentials>>,
    provider: Arc<CryptoProvider>,
    server: Arc<ServerConfig>,
    clients: Mutex<HashMap<Arc<[SpiffeId]>, Arc<ClientConfig>>>,
    resumption: Resumption,
    expiry: Gauge,
    metrics: Arc<Metrics>,
}

/// Hands rustls the current certificate (both as server and as client).
struct CertResolver(Arc<ArcSwapOption<Credentials>>);

// === impl Credentials ===

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials")
            .field("id", &self.id)
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

impl Credentials {
    /// Reads and checks the three files in `dir`.
    pub fn load(dir: &Path, provider: &Arc<CryptoProvider>) -> Result<Self, IdentityError> {
        let [cert, key, ca] = read_all(dir)?;
        Self::from_pem(dir, &cert, &key, &ca, provider)
    }

    /// Parses and checks PEM contents (`dir` only names them in errors).
    pub fn from_pem(
        dir: &Path,
        cert: &[u8],
        key: &[u8],
        ca: &[u8],
        provider: &Arc<CryptoProvider>,
    ) -> Result<Self, IdentityError> {
        let pem_err = |file: &str, what| IdentityError::Pem {
            path: dir.join(file),
            what,
        };
        let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(cert)
            .collect::<Result<_, _>>()
            .map_err(|_| pem_err(CERT_FILE, "readable PEM certificate"))?;
        if chain.is_empty() {
            return Err(pem_err(CERT_FILE, "PEM certificate"));
        }
        let key = PrivateKeyDer::from_pem_slice(key)
            .map_err(|_| pem_err(KEY_FILE, "PEM private key (PKCS#8 or SEC1)"))?;
        let mut roots = RootCertStore::empty();
        for c in CertificateDer::pem_slice_iter(ca) {
            let c = c.map_err(|_| pem_err(CA_FILE, "readable PEM certificate"))?;
            roots
                .add(c)
                .map_err(|_| pem_err(CA_FILE, "usable CA certificate"))?;
        }
        if roots.is_empty() {
            return Err(pem_err(CA_FILE, "PEM CA certificate"));
        }
        let dir_err = || dir.to_path_buf();
        let key =
            CertifiedKey::from_der(chain, key, provider).map_err(|source| IdentityError::Key {
                dir: dir_err(),
                source,
            })?;
        let leaf = &key.cert[0];
        let id = verify::peer_id(leaf).map_err(|source| IdentityError::Id {
            dir: dir_err(),
            source,
        })?;
        let not_after = der::parse(leaf).map(|i| i.not_after).unwrap_or(0);
        let roots = Arc::new(roots);
        // Our peers will run the same check; failing here names the real problem.
        let parsed = rustls::server::ParsedCertificate::try_from(leaf).map_err(|source| {
            IdentityError::Untrusted {
                dir: dir_err(),
                source,
            }
        })?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &parsed,
            &roots,
            &key.cert[1..],
            rustls::pki_types::UnixTime::now(),
            provider.signature_verification_algorithms.all,
        )
        .map_err(|source| IdentityError::Untrusted {
            dir: dir_err(),
            source,
        })?;
        let client_verifier =
            WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone())
                .build()
                .map_err(|e| IdentityError::Config(e.to_string()))?;
        Ok(Self {
            id,
            key: Arc::new(key),
            roots,
            client_verifier,
            not_after,
        })
    }
}

fn read_all(dir: &Path) -> Result<[Vec<u8>; 3], IdentityError> {
    let read = |file: &str| {
        let path = dir.join(file);
        std::fs::read(&path).map_err(|source| IdentityError::Read { path, source })
    };
    Ok([read(CERT_FILE)?, read(KEY_FILE)?, read(CA_FILE)?])
}

// === impl Identity ===

impl Identity {
    /// An identity store for `dir`; loads the files if they are there already (else
    /// it starts empty and [`watch`] fills it when they appear).
    pub fn new(dir: PathBuf, metrics: Arc<Metrics>) -> Result<Arc<Self>, IdentityError> {
        let id = Self::build(Some(dir), metrics)?;
        if let Some(dir) = &id.dir {
            match Credentials::load(dir, &id.provider) {
                Ok(c) => id.store(c),
                Err(error) => {
                    tracing::warn!(%error, "no mesh identity yet; not ready until it loads")
                }
            }
        }
        Ok(id)
    }

    /// An empty identity store that the issuer client ([`super::issuer::run`]) fills.
    pub fn issued(metrics: Arc<Metrics>) -> Result<Arc<Self>, IdentityError> {
        Self::build(None, metrics)
    }

    fn build(dir: Option<PathBuf>, metrics: Arc<Metrics>) -> Result<Arc<Self>, IdentityError> {
        let provider = super::provider();
        let creds = Arc::new(ArcSwapOption::empty());
        let algs = provider.signature_verification_algorithms;
        let mut server = ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(VERSIONS)
            .map_err(|e| IdentityError::Config(e.to_string()))?
            .with_client_cert_verifier(Arc::new(ClientVerifier::new(creds.clone(), algs)))
            .with_cert_resolver(Arc::new(CertResolver(creds.clone())));
        server.alpn_protocols = vec![MESH_ALPN.to_vec()];
        server.session_storage = ServerSessionMemoryCache::new(SERVER_SESSIONS);
        server.send_tls13_tickets = 1;
        let expiry = metrics.gauge(crate::metrics::CERT_EXPIRY, Vec::new());
        let id = Arc::new(Self {
            dir,
            creds,
            provider,
            server: Arc::new(server),
            clients: Mutex::default(),
            resumption: Resumption::store(Arc::new(ClientSessionMemoryCache::new(CLIENT_SESSIONS))),
            expiry,
            metrics,
        });
        Ok(id)
    }

    /// The directory watched, if the identity comes from files.
    pub fn dir(&self) -> Option<&Path> {
        self.dir.as_deref()
    }

    /// The crypto provider of every config built here.
    pub fn provider(&self) -> &Arc<CryptoProvider> {
        &self.provider
    }

    /// Whether a certificate is loaded.
    pub fn is_loaded(&self) -> bool {
        self.creds.load().is_some()
    }

    /// The credentials in force.
    pub fn current(&self) -> Option<Arc<Credentials>> {
        self.creds.load_full()
    }

    /// Swaps in new credentials.
    pub fn store(&self, creds: Credentials) {
        tracing::info!(id = %creds.id, not_after = creds.not_after, "mesh identity loaded");
        self.expiry.set(creds.not_after as f64);
        self.creds.store(Some(Arc::new(creds)));
    }

    /// The inbound TLS config.
    pub fn server_config(&self) -> Arc<ServerConfig> {
        self.server.clone()
    }

    /// The outbound TLS config that accepts a server presenting one of `expected`.
    pub fn client_config(
        &self,
        expected: &Arc<[SpiffeId]>,
    ) -> Result<Arc<ClientConfig>, IdentityError> {
        let mut clients = self.clients.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = clients.get(expected) {
            return Ok(c.clone());
        }
        let verifier = ServerVerifier::new(
            self.creds.clone(),
            expected.clone(),
            self.provider.signature_verification_algorithms,
        );
        let mut cfg = ClientConfig::builder_with_provider(self.provider.clone())
            .with_protocol_versions(VERSIONS)
            .map_err(|e| IdentityError::Config(e.to_string()))?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(verifier))
            .with_client_cert_resolver(Arc::new(CertResolver(self.creds.clone())));
        cfg.alpn_protocols = vec![MESH_ALPN.to_vec()];
        // The server name below is only a session-cache key, not a name to send.
        cfg.enable_sni = false;
        cfg.resumption = self.resumption.clone();
        let cfg = Arc::new(cfg);
        if clients.len() >= MAX_CLIENT_CONFIGS {
            clients.clear();
        }
        clients.insert(expected.clone(), cfg.clone());
        Ok(cfg)
    }

    /// What an outbound connection to a meshed destination whose pods present one of
    /// `expected` needs to originate mTLS.
    pub fn client_tls(&self, expected: &Arc<[SpiffeId]>) -> Result<ClientTls, IdentityError> {
        let config = self.client_config(expected)?;
        let mut h = DefaultHasher::new();
        expected.hash(&mut h);
        Ok(ClientTls::new(config, h.finish(), self.metrics.clone()))
    }
}

/// Polls `identity`'s directory until the task is dropped, swapping in each valid
/// new set of files. A half-written set (new cert, old key) is refused and retried at
/// the next poll; the last good identity keeps serving meanwhile.
pub async fn watch(identity: Arc<Identity>, every: Duration) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    let Some(dir) = identity.dir.clone() else {
        return;
    };
    let mut w = DirWatch::new(dir, identity.is_loaded());
    loop {
        tick.tick().await;
        match w.poll(&identity.provider) {
            None => {}
            Some(Ok(creds)) => identity.store(creds),
            Some(Err(error)) => {
                tracing::warn!(%error, "keeping the current mesh identity")
            }
        }
    }
}

/// Notices changes of the three identity files (see `mesh::FileWatch` for why stat
/// plus a content hash, and why a periodic re-read).
pub struct DirWatch {
    dir: PathBuf,
    stamps: Vec<Option<(SystemTime, u64)>>,
    hash: Option<u64>,
    failed: Option<u64>,
    polls: u32,
}

impl DirWatch {
    /// Watches `dir`; `loaded` says whether its current content is already in use.
    pub fn new(dir: PathBuf, loaded: bool) -> Self {
        let stamps = stamps(&dir);
        let hash = if loaded {
            read_all(&dir).ok().map(|f| hash(&f))
        } else {
            None
        };
        Self {
            dir,
            stamps,
            hash,
            failed: None,
            polls: 0,
        }
    }

    /// Looks once: `None` when nothing new, else the new credentials or why the new
    /// files cannot be used (reported once per distinct content).
    pub fn poll(
        &mut self,
        provider: &Arc<CryptoProvider>,
    ) -> Option<Result<Credentials, IdentityError>> {
        self.polls = self.polls.wrapping_add(1);
        let now = stamps(&self.dir);
        if now == self.stamps && self.hash.is_some() && !self.polls.is_multiple_of(10) {
            return None;
        }
        self.stamps = now;
        let files = match read_all(&self.dir) {
            Ok(f) => f,
            // Missing files: not yet provisioned, or mid-swap. Say so once.
            Err(e) => {
                return (self.failed != Some(0)).then(|| {
                    self.failed = Some(0);
                    Err(e)
                })
            }
        };
        let h = hash(&files);
        if Some(h) == self.hash || Some(h) == self.failed {
            return None;
        }
        let [cert, key, ca] = &files;
        match Credentials::from_pem(&self.dir, cert, key, ca, provider) {
            Ok(c) => {
                self.hash = Some(h);
                self.failed = None;
                Some(Ok(c))
            }
            Err(e) => {
                self.failed = Some(h);
                Some(Err(e))
            }
        }
    }
}

fn stamps(dir: &Path) -> Vec<Option<(SystemTime, u64)>> {
    [CERT_FILE, KEY_FILE, CA_FILE]
        .iter()
        .map(|f| {
            let md = std::fs::metadata(dir.join(f)).ok()?;
            Some((md.modified().ok()?, md.len()))
        })
        .collect()
}

fn hash(files: &[Vec<u8>; 3]) -> u64 {
    let mut h = DefaultHasher::new();
    files.hash(&mut h);
    // Never 0, which marks "unreadable".
    h.finish() | 1
}

// === impl CertResolver ===

impl fmt::Debug for CertResolver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("CertResolver")
    }
}

impl ResolvesServerCert for CertResolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.0.load().as_ref().map(|c| c.key.clone())
    }
}

impl ResolvesClientCert for CertResolver {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        self.0.load().as_ref().map(|c| c.key.clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}
