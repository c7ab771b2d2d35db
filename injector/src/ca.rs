//! The mesh certificate authority: a root CA (ECDSA P-256) that signs short-lived
//! workload certificates carrying a SPIFFE URI SAN.
//!
//! The offline commands (`meshlet-injector ca init|issue`) and the online issuer (a CSR
//! from the proxy plus a TokenReview of its projected token) share this module: both
//! end in [`sign_csr`], which takes only the public key from the CSR and decides every
//! other field itself, so a workload can never ask for a name, a CA bit or a lifetime
//! it was not meant to get. The workload's private key never leaves the pod.

use std::{
    fs,
    io::{Read, Write},
    path::{Path, PathBuf},
    time::{Duration, SystemTime},
};

use meshlet_api::SpiffeId;
use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, PublicKeyData,
    SanType, SerialNumber,
};
use rustls::pki_types::{pem::PemObject, CertificateDer, CertificateSigningRequestDer};

/// The CA certificate (PEM), in a CA directory and in a workload identity directory.
pub const CA_CERT_FILE: &str = "ca.pem";
/// The CA private key (PEM, PKCS#8), only in a CA directory.
pub const CA_KEY_FILE: &str = "ca-key.pem";
/// The workload certificate chain (PEM, leaf first).
pub const CERT_FILE: &str = "cert.pem";
/// The workload private key (PEM, PKCS#8).
pub const KEY_FILE: &str = "key.pem";

/// Default lifetime of a workload certificate.
pub const DEFAULT_LIFETIME: Duration = Duration::from_secs(24 * 3600);
/// Default lifetime of a root CA.
pub const DEFAULT_CA_LIFETIME: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// How far NotBefore is set in the past, so a peer whose clock runs behind ours still
/// accepts a certificate issued just now.
pub const BACKDATE: Duration = Duration::from_secs(5 * 60);
/// Longest workload certificate lifetime the CA signs: rotation, not revocation, is how
/// a mesh takes an identity back.
pub const MAX_LIFETIME: Duration = Duration::from_secs(90 * 24 * 3600);
/// Intermediates a verifier accepts between a workload certificate and the root (the
/// root's pathLenConstraint matches).
pub const MAX_INTERMEDIATES: u8 = 1;

/// Why the CA could not do what was asked.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    /// A file could not be read or written.
    #[error("{action} {path}: {source}")]
    Io {
        /// What was being done ("cannot read", "cannot write").
        action: &'static str,
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A file holds no usable PEM of the expected kind.
    #[error(
        "{path} holds no {what}; point --ca at a directory written by `meshlet-injector ca init`"
    )]
    BadPem {
        /// The file.
        path: PathBuf,
        /// What was expected there.
        what: &'static str,
    },
    /// rcgen refused to build or parse a certificate, key or request.
    #[error("{what}: {source}")]
    Rcgen {
        /// What failed.
        what: &'static str,
        /// rcgen's reason.
        source: rcgen::Error,
    },
    /// The requested lifetime is zero or too long.
    #[error(
        "certificate lifetime {0:?} is out of range: use more than 0 and at most 90 days (2160h)"
    )]
    Lifetime(Duration),
    /// The output directory already holds a CA key.
    #[error(
        "{0} already exists; refusing to overwrite a CA key (remove it or choose another --out)"
    )]
    Exists(PathBuf),
}

/// A loaded CA: its certificate and the issuer that signs with its key.
pub struct Ca {
    issuer: Issuer<'static, KeyPair>,
    cert: CertificateDer<'static>,
    cert_pem: String,
}

/// A workload certificate and, when the CA made the key, its private key.
#[derive(Clone, Debug)]
pub struct Issued {
    /// The certificate chain, PEM (leaf only; the root is in `ca_pem`).
    pub cert_pem: String,
    /// The private key, PEM (PKCS#8).
    pub key_pem: String,
    /// The trust anchor, PEM.
    pub ca_pem: String,
}

// === impl Ca ===

impl std::fmt::Debug for Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ca").finish_non_exhaustive()
    }
}

impl Ca {
    /// Makes a new root CA for `trust_domain`, valid for `lifetime`.
    pub fn generate(trust_domain: &str, lifetime: Duration) -> Result<Self, CaError> {
        let key = KeyPair::generate().map_err(rcgen_err("cannot generate the CA key"))?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "meshlet");
        dn.push(
            DnType::CommonName,
            format!("meshlet root CA {trust_domain}"),
        );
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(MAX_INTERMEDIATES));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let now = SystemTime::now();
        params.not_before = (now - BACKDATE).into();
        params.not_after = (now + lifetime).into();
        params.serial_number = Some(random_serial()?);
        let cert = params
            .self_signed(&key)
            .map_err(rcgen_err("cannot self-sign the CA certificate"))?;
        let cert_pem = cert.pem();
        Ok(Self {
            cert: cert.der().clone(),
            cert_pem,
            issuer: Issuer::new(params, key),
        })
    }

    /// Loads `ca.pem` and `ca-key.pem` from `dir`.
    pub fn load(dir: &Path) -> Result<Self, CaError> {
        let cert_path = dir.join(CA_CERT_FILE);
        let key_path = dir.join(CA_KEY_FILE);
        let cert_pem = read(&cert_path)?;
        let key_pem = read(&key_path)?;
        Self::from_pem(cert_pem, &key_pem).map_err(|bad| CaError::BadPem {
            path: match bad {
                BadPart::Cert => cert_path,
                BadPart::Key => key_path,
            },
            what: bad.what(),
        })
    }

    /// Parses a CA from PEM text (certificate and PKCS#8 key), e.g. from a Secret.
    pub fn from_pem(cert_pem: String, key_pem: &str) -> Result<Self, BadPart> {
        let cert =
            CertificateDer::from_pem_slice(cert_pem.as_bytes()).map_err(|_| BadPart::Cert)?;
        let key = KeyPair::from_pem(key_pem).map_err(|_| BadPart::Key)?;
        let issuer = Issuer::from_ca_cert_der(&cert, key).map_err(|_| BadPart::Cert)?;
        Ok(Self {
            issuer,
            cert,
            cert_pem,
        })
    }

    /// The CA private key, PEM (PKCS#8): only for storing the CA where it came from.
    pub fn key_pem(&self) -> String {
        self.issuer.key().serialize_pem()
    }

    /// Writes `ca.pem` and `ca-key.pem` (mode 0600) into `dir`, creating it; refuses
    /// to overwrite an existing key.
    pub fn save(&self, dir: &Path) -> Result<(), CaError> {
        let key_path = dir.join(CA_KEY_FILE);
        if key_path.exists() {
            return Err(CaError::Exists(key_path));
        }
        create_dir(dir)?;
        write(&dir.join(CA_CERT_FILE), self.cert_pem.as_bytes(), false)?;
        write(
            &key_path,
            self.issuer.key().serialize_pem().as_bytes(),
            true,
        )
    }

    /// The CA certificate, PEM.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The CA certificate, DER.
    pub fn cert_der(&self) -> &CertificateDer<'static> {
        &self.cert
    }

    /// Makes a key pair here and issues a certificate for `id` (the offline path; the
    /// online path is [`sign_csr`], where the key stays with the workload).
    pub fn issue(&self, id: &SpiffeId, lifetime: Duration) -> Result<Issued, CaError> {
        let key = KeyPair::generate().map_err(rcgen_err("cannot generate the workload key"))?;
        let cert = self.sign_key(&key, id, lifetime)?;
        Ok(Issued {
            cert_pem: pem("CERTIFICATE", &cert),
            key_pem: key.serialize_pem(),
            ca_pem: self.cert_pem.clone(),
        })
    }

    /// Signs a workload certificate for `id` over `public_key`.
    pub fn sign_key(
        &self,
        public_key: &impl PublicKeyData,
        id: &SpiffeId,
        lifetime: Duration,
    ) -> Result<CertificateDer<'static>, CaError> {
        if lifetime.is_zero() || lifetime > MAX_LIFETIME {
            return Err(CaError::Lifetime(lifetime));
        }
        let params = workload_params(id, lifetime)?;
        let cert = params
            .signed_by(public_key, &self.issuer)
            .map_err(rcgen_err("cannot sign the workload certificate"))?;
        Ok(cert.der().clone())
    }
}

/// Which half of a CA pair is unusable.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BadPart {
    /// The certificate: no PEM certificate, or not one rcgen can sign with.
    Cert,
    /// The private key: no PEM key, or not one rcgen can sign with.
    Key,
}

impl BadPart {
    /// What was expected, for error messages.
    pub fn what(self) -> &'static str {
        match self {
            Self::Cert => "PEM CA certificate",
            Self::Key => "PEM private key",
        }
    }
}

impl Ca {
    /// Signs a serving certificate for the control plane's mesh endpoint: DNS SANs
    /// `dns_names` for clients that check a server name, plus the URI SAN of its own
    /// service account `id`. The key is made here and returned with it.
    pub fn issue_server(
        &self,
        dns_names: &[String],
        id: &SpiffeId,
        lifetime: Duration,
    ) -> Result<Issued, CaError> {
        if lifetime.is_zero() || lifetime > MAX_LIFETIME {
            return Err(CaError::Lifetime(lifetime));
        }
        let key = KeyPair::generate().map_err(rcgen_err("cannot generate the server key"))?;
        let mut params = workload_params(id, lifetime)?;
        for name in dns_names {
            let dns = name
                .clone()
                .try_into()
                .map_err(rcgen_err("a control-plane DNS name is not a valid DNS SAN"))?;
            params.subject_alt_names.push(SanType::DnsName(dns));
        }
        let cert = params
            .signed_by(&key, &self.issuer)
            .map_err(rcgen_err("cannot sign the control-plane certificate"))?;
        Ok(Issued {
            cert_pem: pem("CERTIFICATE", cert.der()),
            key_pem: key.serialize_pem(),
            ca_pem: self.cert_pem.clone(),
        })
    }
}

/// The certificate fields of a workload: only these, whatever a CSR asked for.
fn workload_params(id: &SpiffeId, lifetime: Duration) -> Result<CertificateParams, CaError> {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    // For humans reading `openssl x509 -text`; peers only look at the URI SAN.
    let mut cn = format!("{}.{}", id.service_account(), id.namespace());
    cn.truncate(64);
    dn.push(DnType::CommonName, cn);
    params.distinguished_name = dn;
    let uri = id
        .to_string()
        .try_into()
        .map_err(rcgen_err("the SPIFFE id is not a valid URI SAN"))?;
    params.subject_alt_names = vec![SanType::URI(uri)];
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.use_authority_key_identifier_extension = true;
    let now = SystemTime::now();
    params.not_before = (now - BACKDATE).into();
    params.not_after = (now + lifetime).into();
    params.serial_number = Some(random_serial()?);
    Ok(params)
}

/// Signs a certificate for `id` over the public key of a PKCS#10 request (DER), valid
/// for `lifetime` from now (NotBefore backdated by [`BACKDATE`]). The request's own
/// subject, SANs and extensions are ignored: the caller has already established who the
/// requester is (the online issuer by TokenReview), and that alone decides `id`. The
/// request's signature is checked, which proves the requester holds the private key.
pub fn sign_csr(
    ca: &Ca,
    csr_der: &[u8],
    id: &SpiffeId,
    lifetime: Duration,
) -> Result<CertificateDer<'static>, CaError> {
    let csr =
        CertificateSigningRequestParams::from_der(&CertificateSigningRequestDer::from(csr_der))
            .map_err(rcgen_err(
                "the certificate signing request is malformed or its signature is wrong",
            ))?;
    ca.sign_key(&csr.public_key, id, lifetime)
}

/// Writes a workload identity directory: `ca.pem`, `cert.pem`, `key.pem` (0600). Each
/// file is written to a temporary name and renamed, so a proxy polling the directory
/// never reads half a file.
pub fn write_identity_dir(dir: &Path, issued: &Issued) -> Result<(), CaError> {
    create_dir(dir)?;
    write(&dir.join(CA_CERT_FILE), issued.ca_pem.as_bytes(), false)?;
    write(&dir.join(KEY_FILE), issued.key_pem.as_bytes(), true)?;
    write(&dir.join(CERT_FILE), issued.cert_pem.as_bytes(), false)
}

/// PEM text of one DER object.
pub fn pem(label: &str, der: &[u8]) -> String {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for line in b64.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(line).unwrap_or_default());
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

fn rcgen_err(what: &'static str) -> impl Fn(rcgen::Error) -> CaError {
    move |source| CaError::Rcgen { what, source }
}

/// 16 random bytes from the kernel, top bit clear (a positive INTEGER): unique serials
/// even when one key is certified twice.
fn random_serial() -> Result<SerialNumber, CaError> {
    let path = Path::new("/dev/urandom");
    let mut b = [0u8; 16];
    fs::File::open(path)
        .and_then(|mut f| f.read_exact(&mut b))
        .map_err(|source| CaError::Io {
            action: "cannot read",
            path: path.into(),
            source,
        })?;
    b[0] &= 0x7f;
    b[0] |= 0x01;
    Ok(SerialNumber::from_slice(&b))
}

fn read(path: &Path) -> Result<String, CaError> {
    fs::read_to_string(path).map_err(|source| CaError::Io {
        action: "cannot read",
        path: path.into(),
        source,
    })
}

fn create_dir(dir: &Path) -> Result<(), CaError> {
    fs::create_dir_all(dir).map_err(|source| CaError::Io {
        action: "cannot create",
        path: dir.into(),
        source,
    })
}

fn write(path: &Path, data: &[u8], secret: bool) -> Result<(), CaError> {
    use std::os::unix::fs::OpenOptionsExt;
    let err = |source| CaError::Io {
        action: "cannot write",
        path: path.into(),
        source,
    };
    let tmp = path.with_extension("tmp");
    let _ = fs::remove_file(&tmp);
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(if secret { 0o600 } else { 0o644 })
        .open(&tmp)
        .map_err(err)?;
    f.write_all(data).and_then(|()| f.sync_all()).map_err(err)?;
    fs::rename(&tmp, path).map_err(err)
}

#[cfg(test)]
mod tests;
