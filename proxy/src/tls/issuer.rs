//! The identity from the control plane's issuer: the proxy makes an ECDSA P-256 key in
//! memory (it never leaves the process), sends a PKCS#10 request with its projected
//! service-account token to `POST /v1/certificate` on the control plane's mesh
//! endpoint (through [`crate::control::ControlPlane`], without a client certificate:
//! the token is what proves who asks), and stores the answer through [`Identity::store`]. It renews at about half the
//! certificate's remaining life (with jitter, so a fleet started together does not
//! renew together), re-reading the token each time (kubelet rotates it), and retries
//! failures with capped exponential backoff while the current certificate serves.
//!
//! The CSR is built here by hand (a few fixed DER structures) with ring, which rustls
//! already links, so the sidecar needs no certificate library.

use std::{
    hash::{BuildHasher, Hasher},
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full, Limited};
use ring::{
    rand::SystemRandom,
    signature::{EcdsaKeyPair, KeyPair as _, ECDSA_P256_SHA256_ASN1_SIGNING},
};
use serde::Deserialize;

use super::identity::{Credentials, Identity};
use crate::{
    config::IssuerConfig,
    control::{ControlError, ControlPlane},
};

/// The issuing route on the mesh endpoint.
pub const PATH: &str = "/v1/certificate";
/// One attempt (connect, handshake, request, answer) may take this long.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// First retry delay after a failure; doubles up to [`MAX_BACKOFF`].
const MIN_BACKOFF: Duration = Duration::from_millis(500);
/// Longest wait between failed attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// Never renew sooner than this after a success, whatever the certificate says.
const MIN_RENEW: Duration = Duration::from_secs(5);
/// Largest answer read (a certificate and a CA are a few KiB).
const MAX_ANSWER: usize = 256 * 1024;

/// Why a certificate could not be had.
#[derive(Debug, thiserror::Error)]
pub enum IssuerError {
    /// The token file could not be read.
    #[error("cannot read the service-account token {path}: {source} (MESHLET_IDENTITY_TOKEN; the injector mounts it)")]
    Token {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The trust anchors or the control plane's name are unusable.
    #[error(transparent)]
    Setup(#[from] ControlError),
    /// Key or CSR generation failed.
    #[error("cannot make the key pair or the CSR: {0}")]
    Crypto(&'static str),
    /// Connecting or talking to the control plane failed.
    #[error("cannot reach the control plane at {addr}: {reason}")]
    Connect {
        /// The address.
        addr: String,
        /// Why.
        reason: String,
    },
    /// The issuer refused the request.
    #[error("the control plane refused the certificate request ({status} {reason}): {message}")]
    Refused {
        /// HTTP status.
        status: u16,
        /// The refusal's reason label.
        reason: String,
        /// Its message.
        message: String,
    },
    /// The answer is unusable.
    #[error("the control plane's answer is unusable: {0}")]
    Answer(String),
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Granted {
    certificate_chain: String,
    trust_anchors: String,
}

#[derive(Deserialize, Default)]
struct Refusal {
    #[serde(default)]
    reason: String,
    #[serde(default)]
    error: String,
}

/// Talks to the issuer.
pub struct IssuerClient {
    control: ControlPlane,
    token_path: PathBuf,
    rng: SystemRandom,
}

impl std::fmt::Debug for IssuerClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IssuerClient")
            .field("control", &self.control)
            .finish_non_exhaustive()
    }
}

// === impl IssuerClient ===

impl IssuerClient {
    /// A client for `cfg`.
    pub fn new(cfg: &IssuerConfig) -> Result<Self, IssuerError> {
        Ok(Self {
            control: ControlPlane::new(&cfg.control_plane, None, REQUEST_TIMEOUT)?,
            token_path: cfg.token_path.clone(),
            rng: SystemRandom::new(),
        })
    }

    /// Makes a key, asks for a certificate and returns the credentials.
    pub async fn fetch(&self, identity: &Identity) -> Result<Credentials, IssuerError> {
        let token = read_token(&self.token_path).await?;
        let (key_pkcs8, csr) = make_csr(&self.rng)?;
        let body = serde_json::json!({ "csr": pem("CERTIFICATE REQUEST", &csr) }).to_string();
        let (status, answer) = tokio::time::timeout(REQUEST_TIMEOUT, self.post(&token, body))
            .await
            .map_err(|_| self.connect_err(format!("no answer within {REQUEST_TIMEOUT:?}")))??;
        if status != 200 {
            let r: Refusal = serde_json::from_slice(&answer).unwrap_or_default();
            return Err(IssuerError::Refused {
                status,
                reason: r.reason,
                message: if r.error.is_empty() {
                    String::from_utf8_lossy(&answer).into_owned()
                } else {
                    r.error
                },
            });
        }
        let g: Granted =
            serde_json::from_slice(&answer).map_err(|e| IssuerError::Answer(e.to_string()))?;
        let key_pem = pem("PRIVATE KEY", &key_pkcs8);
        Credentials::from_pem(
            Path::new("(issued by the control plane)"),
            g.certificate_chain.as_bytes(),
            key_pem.as_bytes(),
            g.trust_anchors.as_bytes(),
            identity.provider(),
        )
        .map_err(|e| IssuerError::Answer(e.to_string()))
    }

    fn connect_err(&self, reason: impl ToString) -> IssuerError {
        IssuerError::Connect {
            addr: self.control.addr().to_string(),
            reason: reason.to_string(),
        }
    }

    async fn post(&self, token: &str, body: String) -> Result<(u16, Bytes), IssuerError> {
        let mut send = self
            .control
            .connect()
            .await
            .map_err(|e| self.connect_err(e))?;
        let req = http::Request::post(PATH)
            .header(http::header::HOST, self.control.name())
            .header(http::header::CONTENT_TYPE, "application/json")
            .header(http::header::AUTHORIZATION, format!("Bearer {token}"))
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| self.connect_err(e))?;
        let rsp = send
            .send_request(req)
            .await
            .map_err(|e| self.connect_err(e))?;
        let status = rsp.status().as_u16();
        let answer = Limited::new(rsp.into_body(), MAX_ANSWER)
            .collect()
            .await
            .map_err(|e| self.connect_err(e))?
            .to_bytes();
        Ok((status, answer))
    }
}

async fn read_token(path: &Path) -> Result<String, IssuerError> {
    let t = tokio::fs::read_to_string(path)
        .await
        .map_err(|source| IssuerError::Token {
            path: path.to_path_buf(),
            source,
        })?;
    Ok(t.trim().to_string())
}

/// Keeps `identity` supplied from the issuer until the task is dropped.
pub async fn run(identity: Arc<Identity>, client: IssuerClient) {
    let mut backoff = MIN_BACKOFF;
    loop {
        let wait = match client.fetch(&identity).await {
            Ok(creds) => {
                let left = Duration::from_secs(creds.not_after.saturating_sub(unix_now()));
                identity.store(creds);
                backoff = MIN_BACKOFF;
                renew_after(left, jitter())
            }
            Err(error) => {
                // A refusal is worth shouting about; it will not fix itself quickly.
                if matches!(error, IssuerError::Refused { .. }) {
                    tracing::error!(%error, retry_in = ?backoff, "no mesh certificate");
                } else {
                    tracing::warn!(%error, retry_in = ?backoff, "no mesh certificate");
                }
                let w = backoff;
                backoff = (backoff * 2).min(MAX_BACKOFF);
                // Same jitter as renewals: a fleet that lost the control plane
                // together must not come back in lock step.
                w.mul_f64(0.75 + 0.5 * jitter())
            }
        };
        tokio::time::sleep(wait).await;
    }
}

/// When to renew a certificate with `left` to live: at 40 to 60 % of it (`jitter` in
/// 0..1), never sooner than [`MIN_RENEW`].
pub fn renew_after(left: Duration, jitter: f64) -> Duration {
    left.mul_f64(0.4 + 0.2 * jitter.clamp(0.0, 1.0))
        .max(MIN_RENEW)
}

/// A number in 0..1, different per process and per call (std's per-process random
/// hasher keys; no crypto needed for spreading timers).
fn jitter() -> f64 {
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos(),
    );
    (h.finish() >> 11) as f64 / (1u64 << 53) as f64
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// A fresh P-256 key (PKCS#8) and a PKCS#10 request over it with an empty subject and
/// no extensions: the issuer decides the name from the token.
pub fn make_csr(rng: &SystemRandom) -> Result<(Vec<u8>, Vec<u8>), IssuerError> {
    let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, rng)
        .map_err(|_| IssuerError::Crypto("P-256 key generation failed"))?;
    let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, pkcs8.as_ref(), rng)
        .map_err(|_| IssuerError::Crypto("the new P-256 key is unusable"))?;
    // SubjectPublicKeyInfo { id-ecPublicKey, prime256v1 } BIT STRING(point)
    let mut spki_alg = Vec::new();
    spki_alg.extend_from_slice(&[0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01]);
    spki_alg.extend_from_slice(&[0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07]);
    let spki = tlv(
        0x30,
        &[tlv(0x30, &spki_alg), bit_string(pair.public_key().as_ref())].concat(),
    );
    // CertificationRequestInfo { version 0, subject (empty Name), spki, [0] {} }
    let info = tlv(
        0x30,
        &[
            vec![0x02, 0x01, 0x00],
            vec![0x30, 0x00],
            spki,
            vec![0xa0, 0x00],
        ]
        .concat(),
    );
    let sig = pair
        .sign(rng, &info)
        .map_err(|_| IssuerError::Crypto("signing the CSR failed"))?;
    // ecdsa-with-SHA256
    let sig_alg = tlv(
        0x30,
        &[0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03, 0x02],
    );
    let csr = tlv(0x30, &[info, sig_alg, bit_string(sig.as_ref())].concat());
    Ok((pkcs8.as_ref().to_vec(), csr))
}

fn bit_string(bytes: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(bytes.len() + 1);
    v.push(0); // no unused bits
    v.extend_from_slice(bytes);
    tlv(0x03, &v)
}

/// One DER TLV (definite length; our structures stay far below 64 KiB).
fn tlv(tag: u8, value: &[u8]) -> Vec<u8> {
    let mut out = vec![tag];
    let n = value.len();
    if n < 0x80 {
        out.push(n as u8);
    } else if n < 0x100 {
        out.extend_from_slice(&[0x81, n as u8]);
    } else {
        out.extend_from_slice(&[0x82, (n >> 8) as u8, n as u8]);
    }
    out.extend_from_slice(value);
    out
}

fn pem(label: &str, der: &[u8]) -> String {
    use std::fmt::Write as _;
    const B64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut b64 = String::with_capacity(der.len() * 4 / 3 + 4);
    for chunk in der.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                b64.push(B64[(n >> (18 - 6 * i)) as usize & 63] as char);
            } else {
                b64.push('=');
            }
        }
    }
    let mut out = format!("-----BEGIN {label}-----\n");
    for line in b64.as_bytes().chunks(64) {
        let _ = writeln!(out, "{}", String::from_utf8_lossy(line));
    }
    let _ = writeln!(out, "-----END {label}-----");
    out
}

#[cfg(test)]
mod tests;
