//! Retries of a routed request by its rule's `retry` (Gateway API HTTPRoute retry,
//! GEP-1731), safe by construction and within the backend Service's retry budget.
//!
//! An attempt is retried when it failed before reaching the app (connect refused or
//! timed out, TLS or HTTP handshake failed, HTTP/2 stream refused), or when its
//! response has one of the rule's `codes` (a 504 of the attempt timeout counts as 504,
//! a broken exchange as 502). A request that may have reached the app is retried only
//! when that is safe: its method is idempotent (GET, HEAD, OPTIONS, TRACE, PUT, DELETE)
//! or its whole body was read and kept in the bounded replay buffer
//! ([`super::replay`]). A body larger than the buffer streams through untouched and
//! makes the request non-retryable. Each retry waits `backoff`, and must be granted by
//! the backend Service's [`crate::retry_budget::RetryBudget`]; a refused retry turns
//! the failed answer into 503 and counts `meshlet_retry_budget_exhausted_total`.

use std::{
    future::Future,
    pin::Pin,
    task::{Context, Poll},
};

use bytes::Bytes;
use futures_util::future;
use http::{request::Parts, Method, Request, Response, StatusCode};
use http_body::Body;
use http_body_util::{Either, Full};
use metrics::SharedString;
use tower::ServiceExt;

use super::{
    headers,
    replay::{ReplayBody, DEFAULT_LIMIT},
    route::{synthetic, Routed},
    timeout::AttemptTimedOut,
};
use crate::{errors::ProxyError, target::BoxError};

/// Adds [`Retry`] to a stack.
#[derive(Clone, Copy, Debug)]
pub struct RetryLayer {
    limit: usize,
}

/// Retries routed requests whose rule asks for it.
#[derive(Clone, Debug)]
pub struct Retry<S> {
    inner: S,
    limit: usize,
}

// === impl RetryLayer ===

impl RetryLayer {
    /// Keeps up to `limit` bytes of a request body for retries.
    pub fn new(limit: usize) -> Self {
        Self { limit }
    }
}

impl Default for RetryLayer {
    fn default() -> Self {
        Self::new(DEFAULT_LIMIT)
    }
}

impl<S> tower::Layer<S> for RetryLayer {
    type Service = Retry<S>;

    fn layer(&self, inner: S) -> Retry<S> {
        Retry {
            inner,
            limit: self.limit,
        }
    }
}

/// What an attempt's outcome says about retrying.
enum Verdict {
    /// Final: hand it to the client.
    Done,
    /// Retryable; the request never reached the app.
    Unsent(SharedString),
    /// Retryable if safe; the request may have reached the app.
    Sent(SharedString),
}

fn idempotent(m: &Method) -> bool {
    matches!(
        *m,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
    )
}

fn verdict<L>(
    res: &Result<Response<Either<L, Full<Bytes>>>, ProxyError>,
    codes: &[u16],
) -> Verdict {
    match res {
        Ok(rsp) => {
            let code = rsp.status().as_u16();
            if !codes.contains(&code) {
                Verdict::Done
            } else if rsp.extensions().get::<AttemptTimedOut>().is_some() {
                Verdict::Sent(SharedString::const_str("timeout"))
            } else {
                Verdict::Sent(SharedString::from(code.to_string()))
            }
        }
        Err(
            ProxyError::Connect { .. }
            | ProxyError::ConnectTimeout { .. }
            | ProxyError::Handshake { .. }
            | ProxyError::Tls { .. },
        ) => Verdict::Unsent(SharedString::const_str("connect")),
        Err(e) if refused(e) => Verdict::Unsent(SharedString::const_str("refused")),
        Err(e) if codes.contains(&e.status().as_u16()) => {
            Verdict::Sent(SharedString::const_str("error"))
        }
        Err(_) => Verdict::Done,
    }
}

/// Whether the server refused the HTTP/2 stream (`REFUSED_STREAM`), which RFC 9113
/// §8.7 guarantees means it processed nothing of the request.
fn refused(e: &ProxyError) -> bool {
    let ProxyError::Upstream { source, .. } = e else {
        return false;
    };
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(source);
    while let Some(err) = cur {
        if let Some(h2) = err.downcast_ref::<h2::Error>() {
            return h2.reason() == Some(h2::Reason::REFUSED_STREAM);
        }
        cur = err.source();
    }
    false
}

/// A request's head, kept to build each retry.
fn copy_head(p: &Parts) -> Parts {
    let mut r = Request::new(());
    *r.method_mut() = p.method.clone();
    *r.uri_mut() = p.uri.clone();
    *r.version_mut() = p.version;
    *r.headers_mut() = p.headers.clone();
    *r.extensions_mut() = p.extensions.clone();
    r.into_parts().0
}

impl<S, B, L> tower::Service<Request<B>> for Retry<S>
where
    S: tower::Service<
            Request<ReplayBody<B>>,
            Response = Response<Either<L, Full<Bytes>>>,
            Error = ProxyError,
        > + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    B: Body<Data = Bytes> + Send + Unpin + 'static,
    B::Error: Into<BoxError>,
    L: Send + 'static,
{
    type Response = Response<Either<L, Full<Bytes>>>;
    type Error = ProxyError;
    // Requests without a retry policy pay no allocation here.
    type Future = future::Either<
        S::Future,
        Pin<Box<dyn Future<Output = Result<Self::Response, ProxyError>> + Send>>,
    >;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), ProxyError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let routed = req.extensions().get::<Routed>();
        let retry = routed.filter(|r| r.policy.retry.is_some()).cloned();
        // Upgrades and CONNECT hand the connection over; they are never replayed.
        let tunnel = req.method() == Method::CONNECT || headers::is_upgrade(&req);
        let Some(routed) = retry.filter(|_| !tunnel) else {
            return future::Either::Left(self.inner.call(req.map(ReplayBody::passthrough)));
        };
        // The request is counted before it is sent: it is what earns the budget.
        routed.backend.budget.deposit();
        let (parts, body) = req.into_parts();
        let head = copy_head(&parts);
        let body = ReplayBody::new(body, self.limit);
        let spare = body.replay();
        let first = self.inner.call(Request::from_parts(parts, body));
        let inner = self.inner.clone();
        future::Either::Right(Box::pin(async move {
            let Some(policy) = routed.policy.retry.as_ref() else {
                return first.await;
            };
            let safe_method = idempotent(&head.method);
            let mut res = first.await;
            let mut spare = spare;
            for _ in 0..policy.retries {
                let reason = match verdict(&res, &policy.codes) {
                    Verdict::Done => return res,
                    Verdict::Unsent(r) => r,
                    Verdict::Sent(r) => {
                        let complete = spare.as_ref().is_some_and(|b| b.is_complete());
                        if !(safe_method || complete) {
                            tracing::debug!("not retrying: the request may have reached the app and is not idempotent or fully buffered");
                            return res;
                        }
                        r
                    }
                };
                let Some(body) = spare.take().filter(|b| b.can_replay()) else {
                    tracing::debug!("not retrying: the request body cannot be replayed");
                    return res;
                };
                if !routed.backend.budget.try_withdraw() {
                    if let Some(m) = &routed.metrics {
                        m.retry_budget_exhausted(&routed.label);
                    }
                    let msg = format!(
                        "retry budget of {} exhausted; the failed attempt is not retried",
                        routed.backend.service
                    );
                    let rsp = synthetic(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "retry-budget-exhausted",
                        &msg,
                    );
                    return Ok(rsp.map(Either::Right));
                }
                if let Some(m) = &routed.metrics {
                    m.retry(&routed.label, reason.clone());
                }
                tracing::debug!(%reason, backoff = ?policy.backoff, "retrying");
                // The failed answer (and its connection) is let go before waiting.
                drop(res);
                tokio::time::sleep(policy.backoff).await;
                spare = body.replay();
                let req = Request::from_parts(copy_head(&head), body);
                res = inner.clone().oneshot(req).await;
            }
            res
        }))
    }
}

#[cfg(test)]
mod tests;
