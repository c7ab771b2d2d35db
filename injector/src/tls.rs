//! The webhook's serving certificate, reloaded from disk without a restart. Kubernetes
//! updates a mounted Secret by swapping a symlink, and cert-manager rotates certificates
//! routinely; a new handshake picks the new certificate up while connections already
//! established keep the one they negotiated.

use std::{
    fmt,
    path::{Path, PathBuf},
    sync::{Arc, RwLock},
    time::Duration,
};

use rustls::{
    crypto::CryptoProvider,
    pki_types::{CertificateDer, PrivateKeyDer},
    server::{ClientHello, ResolvesServerCert},
    sign::CertifiedKey,
    ServerConfig,
};

/// Why the certificate or key could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file could not be read.
    #[error("cannot read {path}: {source}; check --tls-cert/--tls-key and the mounted Secret")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The certificate file holds no PEM certificate.
    #[error("{path} holds no PEM certificate (expected -----BEGIN CERTIFICATE-----)")]
    NoCertificate {
        /// The file.
        path: PathBuf,
    },
    /// The key file holds no PEM private key.
    #[error("{path} holds no PEM private key (expected PKCS#8, PKCS#1 or SEC1)")]
    NoKey {
        /// The file.
        path: PathBuf,
    },
    /// The key is unusable or does not belong to the certificate.
    #[error("the key in {key} does not fit the certificate in {cert}: {source}")]
    Mismatch {
        /// Certificate file.
        cert: PathBuf,
        /// Key file.
        key: PathBuf,
        /// rustls's reason.
        source: rustls::Error,
    },
    /// rustls refused the protocol versions (cannot happen with the ring provider).
    #[error("TLS setup failed: {0}")]
    Config(#[from] rustls::Error),
}

struct Loaded {
    key: Arc<CertifiedKey>,
    cert_pem: Vec<u8>,
    key_pem: Vec<u8>,
}

/// A `ResolvesServerCert` that serves the newest valid certificate from two PEM files.
pub struct ReloadingCert {
    cert_path: PathBuf,
    key_path: PathBuf,
    provider: Arc<CryptoProvider>,
    current: RwLock<Loaded>,
}

impl fmt::Debug for ReloadingCert {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReloadingCert")
            .field("cert_path", &self.cert_path)
            .field("key_path", &self.key_path)
            .finish()
    }
}

// === impl ReloadingCert ===

impl ReloadingCert {
    /// Loads the pair once; fails if it is missing or inconsistent.
    pub fn load(cert_path: &Path, key_path: &Path) -> Result<Arc<Self>, Error> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let cert_pem = read(cert_path)?;
        let key_pem = read(key_path)?;
        let key = parse(&cert_pem, &key_pem, cert_path, key_path, &provider)?;
        Ok(Arc::new(Self {
            cert_path: cert_path.to_path_buf(),
            key_path: key_path.to_path_buf(),
            provider,
            current: RwLock::new(Loaded {
                key,
                cert_pem,
                key_pem,
            }),
        }))
    }

    /// A rustls server config (TLS 1.2 and 1.3, h2 and http/1.1) resolving through `self`.
    pub fn server_config(self: &Arc<Self>) -> Result<ServerConfig, Error> {
        let mut cfg = ServerConfig::builder_with_provider(self.provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
            .with_no_client_auth()
            .with_cert_resolver(self.clone());
        cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(cfg)
    }

    /// Rereads both files and swaps the certificate if they changed. Returns whether it
    /// swapped. A half-written pair (new cert, old key) fails the key check and is retried
    /// on the next call, while the old certificate keeps being served.
    pub async fn reload(&self) -> Result<bool, Error> {
        let cert_pem = tokio::fs::read(&self.cert_path)
            .await
            .map_err(|source| Error::Read {
                path: self.cert_path.clone(),
                source,
            })?;
        let key_pem = tokio::fs::read(&self.key_path)
            .await
            .map_err(|source| Error::Read {
                path: self.key_path.clone(),
                source,
            })?;
        {
            let cur = self.current.read().unwrap_or_else(|e| e.into_inner());
            // Comparing contents rather than mtimes: mtimes can have a one-second
            // granularity, and a Secret update swaps a symlink whose target keeps its own.
            if cur.cert_pem == cert_pem && cur.key_pem == key_pem {
                return Ok(false);
            }
        }
        let key = parse(
            &cert_pem,
            &key_pem,
            &self.cert_path,
            &self.key_path,
            &self.provider,
        )?;
        let mut cur = self.current.write().unwrap_or_else(|e| e.into_inner());
        *cur = Loaded {
            key,
            cert_pem,
            key_pem,
        };
        Ok(true)
    }

    /// Polls the files every `interval` until the task is dropped.
    pub async fn watch(self: Arc<Self>, interval: Duration) {
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            match self.reload().await {
                Ok(true) => {
                    tracing::info!(cert = %self.cert_path.display(), "serving certificate reloaded")
                }
                Ok(false) => {}
                Err(error) => tracing::warn!(%error, "keeping the current serving certificate"),
            }
        }
    }
}

impl ResolvesServerCert for ReloadingCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let cur = self.current.read().unwrap_or_else(|e| e.into_inner());
        Some(cur.key.clone())
    }
}

fn read(path: &Path) -> Result<Vec<u8>, Error> {
    std::fs::read(path).map_err(|source| Error::Read {
        path: path.to_path_buf(),
        source,
    })
}

fn parse(
    cert_pem: &[u8],
    key_pem: &[u8],
    cert_path: &Path,
    key_path: &Path,
    provider: &CryptoProvider,
) -> Result<Arc<CertifiedKey>, Error> {
    let certs: Vec<CertificateDer<'static>> = rustls_pemfile::certs(&mut &cert_pem[..])
        .filter_map(Result::ok)
        .collect();
    if certs.is_empty() {
        return Err(Error::NoCertificate {
            path: cert_path.to_path_buf(),
        });
    }
    let key: PrivateKeyDer<'static> = rustls_pemfile::private_key(&mut &key_pem[..])
        .ok()
        .flatten()
        .ok_or_else(|| Error::NoKey {
            path: key_path.to_path_buf(),
        })?;
    let ck = CertifiedKey::from_der(certs, key, provider).map_err(|source| Error::Mismatch {
        cert: cert_path.to_path_buf(),
        key: key_path.to_path_buf(),
        source,
    })?;
    Ok(Arc::new(ck))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair(name: &str) -> (String, String) {
        let c = rcgen::generate_simple_self_signed(vec![name.to_string()]).unwrap();
        (c.cert.pem(), c.signing_key.serialize_pem())
    }

    #[test]
    fn refuses_missing_empty_and_mismatched_files() {
        let dir = tempfile::tempdir().unwrap();
        let (crt, key) = (dir.path().join("tls.crt"), dir.path().join("tls.key"));
        assert!(matches!(
            ReloadingCert::load(&crt, &key),
            Err(Error::Read { .. })
        ));

        let (c1, k1) = pair("a");
        let (_, k2) = pair("b");
        std::fs::write(&crt, "").unwrap();
        std::fs::write(&key, &k1).unwrap();
        assert!(matches!(
            ReloadingCert::load(&crt, &key),
            Err(Error::NoCertificate { .. })
        ));
        std::fs::write(&crt, &c1).unwrap();
        std::fs::write(&key, "not a key").unwrap();
        assert!(matches!(
            ReloadingCert::load(&crt, &key),
            Err(Error::NoKey { .. })
        ));
        std::fs::write(&key, &k2).unwrap();
        let err = ReloadingCert::load(&crt, &key).unwrap_err();
        assert!(matches!(err, Error::Mismatch { .. }), "{err}");
        std::fs::write(&key, &k1).unwrap();
        assert!(ReloadingCert::load(&crt, &key).is_ok());
    }

    #[tokio::test]
    async fn reload_swaps_only_on_a_valid_change() {
        let dir = tempfile::tempdir().unwrap();
        let (crt, key) = (dir.path().join("tls.crt"), dir.path().join("tls.key"));
        let (c1, k1) = pair("a");
        let (c2, k2) = pair("b");
        std::fs::write(&crt, &c1).unwrap();
        std::fs::write(&key, &k1).unwrap();
        let r = ReloadingCert::load(&crt, &key).unwrap();
        let first = r.current.read().unwrap().key.clone();
        assert!(!r.reload().await.unwrap(), "unchanged files must not swap");
        // Half-written rotation: new cert, old key. Keep serving the old pair.
        std::fs::write(&crt, &c2).unwrap();
        assert!(r.reload().await.is_err());
        assert!(Arc::ptr_eq(&first, &r.current.read().unwrap().key));
        std::fs::write(&key, &k2).unwrap();
        assert!(r.reload().await.unwrap());
        assert!(!Arc::ptr_eq(&first, &r.current.read().unwrap().key));
    }
}
