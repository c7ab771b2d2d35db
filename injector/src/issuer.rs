//! The identity issuer: `POST /v1/certificate` on the control plane's mesh endpoint
//! (port 15012, [`crate::control_plane`]).
//!
//! A proxy makes its key pair in memory and sends a PKCS#10 request with its projected
//! service-account token:
//!
//! ```text
//! POST /v1/certificate
//! Authorization: Bearer <projected token, audience "meshlet">
//! Content-Type: application/json
//!
//! {"csr": "-----BEGIN CERTIFICATE REQUEST-----\n..."}      (PEM, one request)
//! ```
//!
//! The answer is `200 {"certificateChain": PEM, "trustAnchors": PEM}` or an error
//! `{"reason": "...", "error": "..."}` with 400 (bad request or CSR), 401 (no, bad or
//! expired token), 403 (wrong audience, not a service account, a CSR naming another
//! identity) or 503 (the TokenReview could not be made).
//!
//! Who the caller is comes from a TokenReview alone (`status.user.username` =
//! `system:serviceaccount:NS:SA`, with `status.audiences` holding [`TOKEN_AUDIENCE`]),
//! never from the CSR. The CSR only contributes its public key, after its signature is
//! checked; a CSR that asks for a SAN other than the caller's own SPIFFE id is refused
//! (a proxy that asks for someone else's name is misconfigured or hostile, and saying
//! so beats silently issuing a different name). Its subject is ignored and replaced.

pub mod ca_secret;
pub mod kube;

use std::{future::Future, pin::Pin, sync::Arc, time::Duration};

use axum::{
    extract::{DefaultBodyLimit, State},
    http::{header, HeaderMap, StatusCode},
    response::{IntoResponse, Response},
    routing::post,
    Json, Router,
};
use meshlet_api::{identity::TOKEN_AUDIENCE, SpiffeId};
use rcgen::{CertificateSigningRequestParams, SanType};
use rustls::pki_types::{pem::PemObject, CertificateSigningRequestDer};
use serde::{Deserialize, Serialize};

use crate::ca::{self, Ca};

/// The issuing route.
pub const PATH: &str = "/v1/certificate";
/// Certificates issued, counter.
pub const ISSUED_TOTAL: &str = "meshlet_identity_issued_total";
/// Requests refused, counter by `reason` ([`Reason::as_str`]).
pub const REFUSED_TOTAL: &str = "meshlet_identity_refused_total";
/// A CSR with a P-256 key is under 1 KiB; the limit keeps garbage cheap.
pub const MAX_BODY_BYTES: usize = 64 * 1024;
/// Prefix of a service account's username in a TokenReview.
const SA_PREFIX: &str = "system:serviceaccount:";

/// The request body.
#[derive(Debug, Deserialize, Serialize)]
pub struct CertificateRequest {
    /// One PKCS#10 certificate signing request, PEM (`CERTIFICATE REQUEST`).
    pub csr: String,
}

/// The answer to a granted request.
#[derive(Debug, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CertificateResponse {
    /// The workload certificate, PEM, leaf first.
    pub certificate_chain: String,
    /// The mesh trust anchors (root CA certificates), PEM.
    pub trust_anchors: String,
}

/// The body of a refusal.
#[derive(Debug, Deserialize, Serialize)]
pub struct ErrorBody {
    /// Machine-readable reason (the metric label).
    pub reason: String,
    /// What was wrong and what to do.
    pub error: String,
}

/// What the API server said about a token (the fields of a TokenReview's status that
/// the issuer uses).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Review {
    /// `status.authenticated`.
    pub authenticated: bool,
    /// `status.user.username`.
    pub username: String,
    /// `status.audiences`.
    pub audiences: Vec<String>,
    /// `status.error`.
    pub error: Option<String>,
}

/// The TokenReview could not be made (API server unreachable, RBAC missing).
#[derive(Debug, thiserror::Error)]
#[error("TokenReview failed: {0}; check that the injector can reach the API server and may create tokenreviews (ClusterRole)")]
pub struct ReviewError(pub String);

/// A boxed future of a review (object-safe, so tests can fake the API server).
pub type ReviewFuture<'a> = Pin<Box<dyn Future<Output = Result<Review, ReviewError>> + Send + 'a>>;

/// Checks a bearer token; the real one is [`kube::KubeReviewer`].
pub trait TokenReviewer: Send + Sync + 'static {
    /// Reviews `token` for the audience [`TOKEN_AUDIENCE`].
    fn review<'a>(&'a self, token: &'a str) -> ReviewFuture<'a>;
}

/// Why a request was refused: the `reason` label of [`REFUSED_TOTAL`], a fixed set.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reason {
    /// No `Authorization: Bearer` header.
    MissingToken,
    /// The API server did not authenticate the token (bad signature, deleted pod or
    /// service account, unknown issuer).
    Unauthenticated,
    /// The token has expired.
    Expired,
    /// The token is not for the audience `meshlet`.
    WrongAudience,
    /// The token authenticates something other than a service account.
    NotServiceAccount,
    /// The body is not the JSON this route takes, or the CSR is malformed or its
    /// signature is wrong.
    BadCsr,
    /// The CSR asks for a name other than the caller's SPIFFE id.
    IdentityMismatch,
    /// The TokenReview could not be made.
    ReviewUnavailable,
    /// Signing failed.
    Internal,
}

impl Reason {
    /// Every reason, for zero-initialised metrics.
    pub const ALL: [Reason; 9] = [
        Self::MissingToken,
        Self::Unauthenticated,
        Self::Expired,
        Self::WrongAudience,
        Self::NotServiceAccount,
        Self::BadCsr,
        Self::IdentityMismatch,
        Self::ReviewUnavailable,
        Self::Internal,
    ];

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::MissingToken => "missing_token",
            Self::Unauthenticated => "unauthenticated",
            Self::Expired => "expired",
            Self::WrongAudience => "wrong_audience",
            Self::NotServiceAccount => "not_service_account",
            Self::BadCsr => "bad_csr",
            Self::IdentityMismatch => "identity_mismatch",
            Self::ReviewUnavailable => "review_unavailable",
            Self::Internal => "internal",
        }
    }

    /// The HTTP status of the refusal.
    pub fn status(self) -> StatusCode {
        match self {
            Self::MissingToken | Self::Unauthenticated | Self::Expired => StatusCode::UNAUTHORIZED,
            Self::WrongAudience | Self::NotServiceAccount | Self::IdentityMismatch => {
                StatusCode::FORBIDDEN
            }
            Self::BadCsr => StatusCode::BAD_REQUEST,
            Self::ReviewUnavailable => StatusCode::SERVICE_UNAVAILABLE,
            Self::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

/// A refused request: the reason and a message for the caller's log.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct Refusal {
    /// Why, as a fixed label.
    pub reason: Reason,
    /// What was wrong and what to do.
    pub message: String,
}

impl Refusal {
    fn new(reason: Reason, message: impl Into<String>) -> Self {
        Self {
            reason,
            message: message.into(),
        }
    }
}

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        let body = ErrorBody {
            reason: self.reason.as_str().to_string(),
            error: self.message,
        };
        let mut r = (self.reason.status(), Json(body)).into_response();
        if self.reason.status() == StatusCode::UNAUTHORIZED {
            r.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                header::HeaderValue::from_static("Bearer"),
            );
        }
        r
    }
}

/// The issuer: a CA, a token reviewer and the issuing policy.
pub struct Issuer {
    ca: Arc<Ca>,
    reviewer: Arc<dyn TokenReviewer>,
    trust_domain: String,
    lifetime: Duration,
}

impl std::fmt::Debug for Issuer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Issuer")
            .field("trust_domain", &self.trust_domain)
            .field("lifetime", &self.lifetime)
            .finish_non_exhaustive()
    }
}

// === impl Issuer ===

impl Issuer {
    /// An issuer signing with `ca` certificates of `lifetime` in `trust_domain`.
    pub fn new(
        ca: Arc<Ca>,
        reviewer: Arc<dyn TokenReviewer>,
        trust_domain: &str,
        lifetime: Duration,
    ) -> Result<Self, ca::CaError> {
        if lifetime.is_zero() || lifetime > ca::MAX_LIFETIME {
            return Err(ca::CaError::Lifetime(lifetime));
        }
        // Registered at zero so a dashboard sees every series from the start.
        metrics::counter!(ISSUED_TOTAL).absolute(0);
        for r in Reason::ALL {
            metrics::counter!(REFUSED_TOTAL, "reason" => r.as_str()).absolute(0);
        }
        Ok(Self {
            ca,
            reviewer,
            trust_domain: trust_domain.to_string(),
            lifetime,
        })
    }

    /// The CA's certificate, PEM.
    pub fn trust_anchors(&self) -> &str {
        self.ca.cert_pem()
    }

    /// Decides one request: `bearer` is the token from the Authorization header and
    /// `csr_pem` the request's CSR. Counts the outcome.
    pub async fn issue(
        &self,
        bearer: Option<&str>,
        csr_pem: &str,
    ) -> Result<CertificateResponse, Refusal> {
        let r = self.decide(bearer, csr_pem).await;
        match &r {
            Ok(_) => metrics::counter!(ISSUED_TOTAL).increment(1),
            Err(refusal) => {
                metrics::counter!(REFUSED_TOTAL, "reason" => refusal.reason.as_str()).increment(1)
            }
        }
        r
    }

    async fn decide(
        &self,
        bearer: Option<&str>,
        csr_pem: &str,
    ) -> Result<CertificateResponse, Refusal> {
        let token = bearer.filter(|t| !t.is_empty()).ok_or_else(|| {
            Refusal::new(
                Reason::MissingToken,
                "no bearer token: send the projected service-account token (audience \"meshlet\") as `Authorization: Bearer <token>`",
            )
        })?;
        // The CSR is parsed first: cheap, and a malformed one needs no API call.
        let csr = parse_csr(csr_pem)?;
        let review = self
            .reviewer
            .review(token)
            .await
            .map_err(|e| Refusal::new(Reason::ReviewUnavailable, e.to_string()))?;
        let id = identity_of(&review, token, &self.trust_domain)?;
        check_sans(&csr, &id)?;
        let cert = self
            .ca
            .sign_key(&csr.public_key, &id, self.lifetime)
            .map_err(|e| Refusal::new(Reason::Internal, e.to_string()))?;
        tracing::info!(%id, "issued a workload certificate");
        Ok(CertificateResponse {
            certificate_chain: ca::pem("CERTIFICATE", &cert),
            trust_anchors: self.ca.cert_pem().to_string(),
        })
    }
}

/// Parses a PEM CSR and checks its signature (proof that the caller holds the key).
pub fn parse_csr(csr_pem: &str) -> Result<CertificateSigningRequestParams, Refusal> {
    let der = CertificateSigningRequestDer::from_pem_slice(csr_pem.as_bytes()).map_err(|_| {
        Refusal::new(
            Reason::BadCsr,
            "field \"csr\" holds no PEM CERTIFICATE REQUEST (expected -----BEGIN CERTIFICATE REQUEST-----)",
        )
    })?;
    CertificateSigningRequestParams::from_der(&der).map_err(|e| {
        Refusal::new(
            Reason::BadCsr,
            format!("the certificate signing request is malformed or its signature does not verify: {e}"),
        )
    })
}

/// A CSR may name no SAN, or only the caller's own SPIFFE id.
pub fn check_sans(csr: &CertificateSigningRequestParams, id: &SpiffeId) -> Result<(), Refusal> {
    let want = id.to_string();
    for san in &csr.params.subject_alt_names {
        let ok = matches!(san, SanType::URI(u) if u.as_str() == want);
        if !ok {
            return Err(Refusal::new(
                Reason::IdentityMismatch,
                format!(
                    "the CSR asks for {san:?}, but the token authenticates {want}; request no SAN or exactly {want}"
                ),
            ));
        }
    }
    Ok(())
}

/// The SPIFFE id a review grants, or why it grants none. `token` is only decoded
/// (never trusted) to name the reason of a failed review.
pub fn identity_of(review: &Review, token: &str, trust_domain: &str) -> Result<SpiffeId, Refusal> {
    if !review.authenticated {
        let claims = unverified_claims(token);
        let api = review.error.as_deref().unwrap_or("no reason given");
        if let Some(c) = &claims {
            if !c.audiences.iter().any(|a| a == TOKEN_AUDIENCE) {
                return Err(Refusal::new(
                    Reason::WrongAudience,
                    format!(
                        "the token is for audience {:?}, not {TOKEN_AUDIENCE:?}; mount a projected token with audience {TOKEN_AUDIENCE:?}",
                        c.audiences
                    ),
                ));
            }
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0);
            if c.exp.is_some_and(|exp| exp <= now) {
                return Err(Refusal::new(
                    Reason::Expired,
                    "the token has expired; read the projected token file again (kubelet rotates it)",
                ));
            }
        }
        return Err(Refusal::new(
            Reason::Unauthenticated,
            format!("the API server did not authenticate the token: {api}"),
        ));
    }
    if !review.audiences.iter().any(|a| a == TOKEN_AUDIENCE) {
        return Err(Refusal::new(
            Reason::WrongAudience,
            format!(
                "the token is valid for {:?}, not {TOKEN_AUDIENCE:?}; mount a projected token with audience {TOKEN_AUDIENCE:?}",
                review.audiences
            ),
        ));
    }
    let not_sa = || {
        Refusal::new(
            Reason::NotServiceAccount,
            format!(
                "the token authenticates {:?}, not a service account; use the pod's projected service-account token",
                review.username
            ),
        )
    };
    let rest = review.username.strip_prefix(SA_PREFIX).ok_or_else(not_sa)?;
    let (ns, sa) = rest.split_once(':').ok_or_else(not_sa)?;
    SpiffeId::new(trust_domain, ns, sa).map_err(|e| {
        Refusal::new(
            Reason::NotServiceAccount,
            format!("service account {rest:?} gives no SPIFFE id: {e}"),
        )
    })
}

/// The claims of a JWT read without verifying it.
#[derive(Debug, Default)]
struct Claims {
    audiences: Vec<String>,
    exp: Option<u64>,
}

fn unverified_claims(token: &str) -> Option<Claims> {
    use base64::Engine as _;
    let payload = token.split('.').nth(1)?;
    let json = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .ok()?;
    let v: serde_json::Value = serde_json::from_slice(&json).ok()?;
    let audiences = match &v["aud"] {
        serde_json::Value::String(s) => vec![s.clone()],
        serde_json::Value::Array(a) => a
            .iter()
            .filter_map(|x| x.as_str().map(str::to_string))
            .collect(),
        _ => Vec::new(),
    };
    Some(Claims {
        audiences,
        exp: v["exp"].as_u64(),
    })
}

/// The issuer's routes: `POST /v1/certificate`.
pub fn router(issuer: Arc<Issuer>) -> Router {
    Router::new()
        .route(PATH, post(handler))
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(issuer)
}

async fn handler(State(issuer): State<Arc<Issuer>>, headers: HeaderMap, body: String) -> Response {
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    let req: CertificateRequest = match serde_json::from_str(&body) {
        Ok(r) => r,
        Err(e) => {
            let refusal = Refusal::new(
                Reason::BadCsr,
                format!("the body is not {{\"csr\": \"<PEM CERTIFICATE REQUEST>\"}}: {e}"),
            );
            metrics::counter!(REFUSED_TOTAL, "reason" => refusal.reason.as_str()).increment(1);
            return refusal.into_response();
        }
    };
    match issuer.issue(bearer, &req.csr).await {
        Ok(resp) => Json(resp).into_response(),
        Err(refusal) => {
            tracing::info!(reason = refusal.reason.as_str(), error = %refusal.message, "refused a certificate request");
            refusal.into_response()
        }
    }
}

#[cfg(test)]
mod tests;
