//! The mesh root CA kept in a Secret, so every replica and every restart signs with
//! the same CA: get it; if absent, generate one and create the Secret; if that create
//! loses a race (AlreadyExists), read the winner's. Two replicas starting together end
//! with one Secret and both sign with its CA.

use std::collections::BTreeMap;

use k8s_openapi::{api::core::v1::Secret, ByteString};
use kube::api::{Api, ObjectMeta, PostParams};

use crate::ca::{self, Ca};

/// Default name of the CA Secret in the injector's namespace.
pub const DEFAULT_SECRET: &str = "meshlet-identity-ca";
/// Key of the CA certificate (PEM), as `kubectl create secret tls` writes it.
pub const CERT_KEY: &str = "tls.crt";
/// Key of the CA private key (PEM, PKCS#8).
pub const KEY_KEY: &str = "tls.key";

/// Why the CA could not be had.
#[derive(Debug, thiserror::Error)]
pub enum CaSecretError {
    /// The API server refused or could not be reached.
    #[error("cannot {action} Secret {namespace}/{name}: {source}; check the injector's Role (get and create on secrets in its namespace)")]
    Api {
        /// What was tried.
        action: &'static str,
        /// Namespace.
        namespace: String,
        /// Name.
        name: String,
        /// The client's error.
        source: Box<kube::Error>,
    },
    /// The Secret exists but holds no usable CA.
    #[error("Secret {namespace}/{name} holds no usable {what} under key {key:?}; it must hold a PEM CA certificate in tls.crt and its PKCS#8 key in tls.key")]
    Bad {
        /// Namespace.
        namespace: String,
        /// Name.
        name: String,
        /// Which part.
        what: &'static str,
        /// The data key.
        key: &'static str,
    },
    /// The Secret is missing and creating it is not allowed.
    #[error("Secret {namespace}/{name} does not exist and the injector was told not to create it (a user-provided CA); create it with `kubectl -n {namespace} create secret tls {name} --cert=ca.pem --key=ca-key.pem`")]
    Missing {
        /// Namespace.
        namespace: String,
        /// Name.
        name: String,
    },
    /// Generating a CA failed.
    #[error(transparent)]
    Ca(#[from] ca::CaError),
}

/// How the CA was obtained.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Origin {
    /// Read from an existing Secret.
    Existing,
    /// Generated here and stored in a new Secret.
    Created,
    /// Another replica created it between our get and our create.
    LostRace,
}

/// Reads the CA from Secret `namespace/name`, creating it with a new CA for
/// `trust_domain` when it is absent and `create` is true.
pub async fn load_or_create(
    client: kube::Client,
    namespace: &str,
    name: &str,
    trust_domain: &str,
    create: bool,
) -> Result<(Ca, Origin), CaSecretError> {
    let api: Api<Secret> = Api::namespaced(client, namespace);
    let api_err = |action, source| CaSecretError::Api {
        action,
        namespace: namespace.to_string(),
        name: name.to_string(),
        source: Box::new(source),
    };
    if let Some(s) = api.get_opt(name).await.map_err(|e| api_err("get", e))? {
        return Ok((parse(&s, namespace, name)?, Origin::Existing));
    }
    if !create {
        return Err(CaSecretError::Missing {
            namespace: namespace.to_string(),
            name: name.to_string(),
        });
    }
    let generated = Ca::generate(trust_domain, ca::DEFAULT_CA_LIFETIME)?;
    let secret = Secret {
        metadata: ObjectMeta {
            name: Some(name.to_string()),
            namespace: Some(namespace.to_string()),
            labels: Some(BTreeMap::from([(
                "app.kubernetes.io/part-of".to_string(),
                "meshlet".to_string(),
            )])),
            ..Default::default()
        },
        type_: Some("kubernetes.io/tls".to_string()),
        data: Some(BTreeMap::from([
            (
                CERT_KEY.to_string(),
                ByteString(generated.cert_pem().as_bytes().to_vec()),
            ),
            (
                KEY_KEY.to_string(),
                ByteString(generated.key_pem().into_bytes()),
            ),
        ])),
        ..Default::default()
    };
    match api.create(&PostParams::default(), &secret).await {
        Ok(_) => Ok((generated, Origin::Created)),
        Err(kube::Error::Api(st)) if st.is_already_exists() => {
            let s = api.get(name).await.map_err(|e| api_err("get", e))?;
            Ok((parse(&s, namespace, name)?, Origin::LostRace))
        }
        Err(e) => Err(api_err("create", e)),
    }
}

/// The CA in a Secret's `tls.crt` and `tls.key`.
pub fn parse(secret: &Secret, namespace: &str, name: &str) -> Result<Ca, CaSecretError> {
    let bad = |what, key| CaSecretError::Bad {
        namespace: namespace.to_string(),
        name: name.to_string(),
        what,
        key,
    };
    let get = |key: &'static str, what| {
        secret
            .data
            .as_ref()
            .and_then(|d| d.get(key))
            .and_then(|b| String::from_utf8(b.0.clone()).ok())
            .ok_or_else(|| bad(what, key))
    };
    let cert = get(CERT_KEY, "PEM CA certificate")?;
    let key = get(KEY_KEY, "PEM private key")?;
    Ca::from_pem(cert, &key).map_err(|part| match part {
        ca::BadPart::Cert => bad(part.what(), CERT_KEY),
        ca::BadPart::Key => bad(part.what(), KEY_KEY),
    })
}
