//! The admission webhook: AdmissionReview in, AdmissionReview out. All decisions are
//! made by [`mutate`](crate::mutate::mutate); this module only translates, so its error
//! cases are about the request itself (garbage, wrong kind), never about pods.

use std::{sync::Arc, time::Instant};

use axum::{
    body::Bytes,
    extract::{DefaultBodyLimit, State},
    http::{header, StatusCode},
    response::{IntoResponse, Response},
    routing::{get, post},
    Router,
};
use k8s_openapi::api::core::v1::Pod;
use kube_core::{
    admission::{AdmissionRequest, AdmissionResponse, AdmissionReview, Operation},
    DynamicObject,
};
use metrics_exporter_prometheus::PrometheusHandle;

use crate::{
    config::Defaults,
    mutate::{mutate, Context, Outcome},
};

/// Largest AdmissionReview accepted; the API server caps objects well below this.
pub const MAX_BODY_BYTES: usize = 3 * 1024 * 1024;
/// Counter of reviews by `result`.
pub const REVIEWS_TOTAL: &str = "meshlet_injector_reviews_total";
/// Histogram of the time spent deciding one review.
pub const REVIEW_DURATION: &str = "meshlet_injector_review_duration_seconds";

/// How one review ended, the `result` label of [`REVIEWS_TOTAL`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReviewResult {
    /// A patch was returned.
    Injected,
    /// Allowed unchanged (opt-out, hostNetwork, already injected, not a Pod CREATE).
    Skipped,
    /// Refused with a message (bad annotation, reserved port, ...).
    Denied,
    /// The request itself was unusable.
    Error,
}

impl ReviewResult {
    /// The metric label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Injected => "injected",
            Self::Skipped => "skipped",
            Self::Denied => "denied",
            Self::Error => "error",
        }
    }
}

/// What the handlers share.
pub struct AppState {
    /// Sidecar defaults.
    pub defaults: Defaults,
    /// Renders `/metrics`.
    pub metrics: PrometheusHandle,
}

/// The router: `POST /mutate`, `GET /healthz`, `GET /readyz`, `GET /metrics`.
pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/mutate", post(mutate_handler))
        .route("/healthz", get(|| async { "ok\n" }))
        // The server only starts once a certificate is loaded, so serving means ready.
        .route("/readyz", get(|| async { "ok\n" }))
        .route("/metrics", get(metrics_handler))
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(state)
}

async fn metrics_handler(State(state): State<Arc<AppState>>) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.metrics.render(),
    )
        .into_response()
}

async fn mutate_handler(State(state): State<Arc<AppState>>, body: Bytes) -> Response {
    let start = Instant::now();
    let (status, review, result) = review(&body, &state.defaults);
    metrics::counter!(REVIEWS_TOTAL, "result" => result.as_str()).increment(1);
    metrics::histogram!(REVIEW_DURATION).record(start.elapsed().as_secs_f64());
    match to_wire(&review) {
        Ok(json) => (status, [(header::CONTENT_TYPE, "application/json")], json).into_response(),
        Err(error) => {
            tracing::error!(%error, "cannot serialise the AdmissionReview response");
            StatusCode::INTERNAL_SERVER_ERROR.into_response()
        }
    }
}

/// Serialises a response review as the API server reads it. kube-core serialises the
/// patch (`Vec<u8>`) as an array of numbers, but the API is a Go `[]byte`, whose JSON
/// form is a base64 string (kube-rs/kube#1781); so the patch is re-encoded here.
pub fn to_wire(review: &AdmissionReview<DynamicObject>) -> serde_json::Result<Vec<u8>> {
    use base64::Engine as _;
    let mut v = serde_json::to_value(review)?;
    if let Some(patch) = v.pointer_mut("/response/patch") {
        if let Some(items) = patch.as_array() {
            let bytes: Vec<u8> = items
                .iter()
                .filter_map(|b| b.as_u64().and_then(|b| u8::try_from(b).ok()))
                .collect();
            *patch =
                serde_json::Value::String(base64::engine::general_purpose::STANDARD.encode(bytes));
        }
    }
    serde_json::to_vec(&v)
}

fn invalid(message: String) -> (StatusCode, AdmissionReview<DynamicObject>, ReviewResult) {
    tracing::warn!(%message, "unusable admission request");
    let mut res = AdmissionResponse::invalid(&message);
    res.result.code = 400;
    (
        StatusCode::BAD_REQUEST,
        res.into_review(),
        ReviewResult::Error,
    )
}

fn deny(res: AdmissionResponse, message: String) -> AdmissionReview<DynamicObject> {
    let mut res = res.deny(message);
    res.result.code = 400;
    res.result.reason = "BadRequest".to_string();
    res.into_review()
}

/// Decides one raw AdmissionReview body: the HTTP status, the response review and the
/// metric label. Garbage gets HTTP 400; every parsed request gets HTTP 200 with the
/// decision inside, as the API server expects.
pub fn review(
    body: &[u8],
    defaults: &Defaults,
) -> (StatusCode, AdmissionReview<DynamicObject>, ReviewResult) {
    let parsed: AdmissionReview<DynamicObject> = match serde_json::from_slice(body) {
        Ok(r) => r,
        Err(e) => return invalid(format!("the body is not an AdmissionReview: {e}")),
    };
    let req: AdmissionRequest<DynamicObject> = match parsed.try_into() {
        Ok(r) => r,
        Err(_) => return invalid("the AdmissionReview has no request".to_string()),
    };
    let res = AdmissionResponse::from(&req);
    let is_pod = req.kind.group.is_empty() && req.kind.kind == "Pod";
    if !is_pod || req.sub_resource.is_some() || req.operation != Operation::Create {
        // The webhook's rules should only send Pod CREATEs; anything else is let through
        // unchanged rather than blocking an unrelated write.
        tracing::debug!(kind = %req.kind.kind, op = ?req.operation, "not a pod creation, allowed unchanged");
        return (StatusCode::OK, res.into_review(), ReviewResult::Skipped);
    }
    let Some(obj) = req.object.as_ref() else {
        return (
            StatusCode::OK,
            deny(res, "the Pod CREATE request carries no object".to_string()),
            ReviewResult::Error,
        );
    };
    let pod: Pod = match serde_json::to_value(obj).and_then(serde_json::from_value) {
        Ok(p) => p,
        Err(e) => {
            return (
                StatusCode::OK,
                deny(res, format!("the object is not a valid Pod: {e}")),
                ReviewResult::Error,
            )
        }
    };
    let ns = req.namespace.clone();
    let name = pod
        .metadata
        .name
        .clone()
        .or_else(|| pod.metadata.generate_name.as_ref().map(|g| format!("{g}*")))
        .unwrap_or_default();
    let ns_str = ns.as_deref().unwrap_or_default();
    let ctx = Context {
        namespace: ns.clone(),
    };
    match mutate(&pod, &ctx, defaults) {
        Ok(Outcome::Inject(ops)) => {
            let n = ops.len();
            let warnings = crate::mutate::warnings(&pod, defaults);
            match res.clone().with_patch(json_patch::Patch(ops)) {
                Ok(mut res) => {
                    if !warnings.is_empty() {
                        res.warnings = Some(warnings);
                    }
                    tracing::info!(ns = ns_str, pod = %name, ops = n, dry_run = req.dry_run, "injected");
                    (StatusCode::OK, res.into_review(), ReviewResult::Injected)
                }
                Err(e) => (
                    StatusCode::OK,
                    deny(res, format!("internal error serialising the patch: {e}")),
                    ReviewResult::Error,
                ),
            }
        }
        Ok(Outcome::Skip(reason)) => {
            tracing::info!(ns = ns_str, pod = %name, %reason, "skipped");
            (StatusCode::OK, res.into_review(), ReviewResult::Skipped)
        }
        Err(denied) => {
            tracing::info!(ns = ns_str, pod = %name, %denied, "denied");
            let msg = format!("meshlet: pod {ns_str}/{name}: {denied}");
            (StatusCode::OK, deny(res, msg), ReviewResult::Denied)
        }
    }
}
