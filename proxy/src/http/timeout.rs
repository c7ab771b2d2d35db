//! The timeouts of a routed request's rule (Gateway API `timeouts`, GEP-1742):
//! [`RequestTimeoutLayer`] bounds the whole exchange, retries and backoffs included;
//! [`AttemptTimeoutLayer`] bounds each attempt to a backend (`backendRequest`), so the
//! retry layer between them can try again. Both run until the response headers
//! arrive; a body that streams for longer is not cut. A timeout answers 504 and counts
//! `meshlet_timeouts_total{kind="request"|"backend_request"}`. Requests without a
//! [`Routed`] extension, or whose rule sets no timeout, pass through with no timer.

use std::{
    future::Future,
    pin::Pin,
    task::{Context, Poll},
    time::Duration,
};

use bytes::Bytes;
use futures_util::future;
use http::{Request, Response, StatusCode};
use http_body_util::{Either, Full};

use super::route::{synthetic, Routed};
use crate::errors::ProxyError;

/// Marks a 504 the attempt timeout made (so the retry layer can tell it from an
/// upstream's own 504).
#[derive(Clone, Copy, Debug)]
pub struct AttemptTimedOut;

/// Adds [`Timeout`] for `timeouts.request`.
#[derive(Clone, Copy, Debug, Default)]
pub struct RequestTimeoutLayer;

/// Adds [`Timeout`] for `timeouts.backendRequest`.
#[derive(Clone, Copy, Debug, Default)]
pub struct AttemptTimeoutLayer;

/// Which of a rule's timeouts a [`Timeout`] applies.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Request,
    Attempt,
}

/// Bounds the inner service's time to response headers by the rule's timeout.
#[derive(Clone, Debug)]
pub struct Timeout<S> {
    inner: S,
    kind: Kind,
}

impl<S> tower::Layer<S> for RequestTimeoutLayer {
    type Service = Timeout<S>;

    fn layer(&self, inner: S) -> Timeout<S> {
        Timeout {
            inner,
            kind: Kind::Request,
        }
    }
}

impl<S> tower::Layer<S> for AttemptTimeoutLayer {
    type Service = Timeout<S>;

    fn layer(&self, inner: S) -> Timeout<S> {
        Timeout {
            inner,
            kind: Kind::Attempt,
        }
    }
}

impl Kind {
    fn limit(self, r: &Routed) -> Option<Duration> {
        match self {
            Self::Request => r.policy.request_timeout,
            Self::Attempt => r.policy.backend_timeout,
        }
    }

    fn label(self) -> &'static str {
        match self {
            Self::Request => "request",
            Self::Attempt => "backend_request",
        }
    }

    fn error_kind(self) -> &'static str {
        match self {
            Self::Request => "request-timeout",
            Self::Attempt => "backend-request-timeout",
        }
    }
}

impl<S, B, L> tower::Service<Request<B>> for Timeout<S>
where
    S: tower::Service<Request<B>, Response = Response<Either<L, Full<Bytes>>>, Error = ProxyError>,
    S::Future: Send + 'static,
    L: Send + 'static,
{
    type Response = Response<Either<L, Full<Bytes>>>;
    type Error = ProxyError;
    // Requests without a timeout pay no timer and no allocation.
    type Future = future::Either<
        S::Future,
        Pin<Box<dyn Future<Output = Result<Self::Response, ProxyError>> + Send>>,
    >;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), ProxyError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let kind = self.kind;
        let routed = req.extensions().get::<Routed>();
        let limit = routed.and_then(|r| kind.limit(r));
        let Some(limit) = limit else {
            return future::Either::Left(self.inner.call(req));
        };
        let routed = routed.cloned();
        let fut = self.inner.call(req);
        future::Either::Right(Box::pin(async move {
            match tokio::time::timeout(limit, fut).await {
                Ok(res) => res,
                Err(_) => {
                    tracing::debug!(?limit, kind = kind.label(), "routed request timed out");
                    if let Some(r) = &routed {
                        if let Some(m) = &r.metrics {
                            m.route_timeout(&r.label, kind.label());
                        }
                    }
                    let msg = format!(
                        "no response within timeouts.{} ({limit:?})",
                        if kind == Kind::Request {
                            "request"
                        } else {
                            "backendRequest"
                        }
                    );
                    let mut rsp = synthetic(StatusCode::GATEWAY_TIMEOUT, kind.error_kind(), &msg);
                    if kind == Kind::Attempt {
                        rsp.extensions_mut().insert(AttemptTimedOut);
                    }
                    Ok(rsp.map(Either::Right))
                }
            }
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        errors::ERROR_HEADER,
        http::route::tests::{routed, OkBody},
    };
    use tower::{Layer, ServiceExt};

    fn slow(
        ms: u64,
    ) -> impl tower::Service<
        Request<()>,
        Response = Response<Either<OkBody, Full<Bytes>>>,
        Error = ProxyError,
        Future = impl Send,
    > + Clone {
        tower::service_fn(move |_req: Request<()>| async move {
            tokio::time::sleep(Duration::from_millis(ms)).await;
            Ok::<_, ProxyError>(Response::new(Either::Left(OkBody::new(Bytes::new()))))
        })
    }

    fn req(request: Option<u64>, backend: Option<u64>) -> Request<()> {
        let mut r = Request::new(());
        r.extensions_mut().insert(routed(
            request.map(Duration::from_millis),
            backend.map(Duration::from_millis),
            None,
        ));
        r
    }

    #[tokio::test]
    async fn request_timeout_answers_504() {
        let svc = RequestTimeoutLayer.layer(slow(300));
        let start = tokio::time::Instant::now();
        let rsp = svc.clone().oneshot(req(Some(200), None)).await.unwrap();
        assert_eq!(rsp.status(), StatusCode::GATEWAY_TIMEOUT);
        assert_eq!(rsp.headers()[ERROR_HEADER], "request-timeout");
        let took = start.elapsed();
        assert!(
            took >= Duration::from_millis(200) && took < Duration::from_millis(290),
            "{took:?}"
        );
        assert!(rsp.extensions().get::<AttemptTimedOut>().is_none());

        let rsp = svc.clone().oneshot(req(Some(400), None)).await.unwrap();
        assert_eq!(rsp.status(), StatusCode::OK, "fast enough");
        let rsp = svc.clone().oneshot(req(None, Some(10))).await.unwrap();
        assert_eq!(
            rsp.status(),
            StatusCode::OK,
            "the attempt timeout is not its"
        );
        let rsp = svc.oneshot(Request::new(())).await.unwrap();
        assert_eq!(
            rsp.status(),
            StatusCode::OK,
            "unrouted requests have no timer"
        );
    }

    #[tokio::test]
    async fn attempt_timeout_marks_its_504() {
        let svc = AttemptTimeoutLayer.layer(slow(300));
        let rsp = svc
            .clone()
            .oneshot(req(Some(1000), Some(100)))
            .await
            .unwrap();
        assert_eq!(rsp.status(), StatusCode::GATEWAY_TIMEOUT);
        assert_eq!(rsp.headers()[ERROR_HEADER], "backend-request-timeout");
        assert!(rsp.extensions().get::<AttemptTimedOut>().is_some());
        let rsp = svc.oneshot(req(Some(100), None)).await.unwrap();
        assert_eq!(rsp.status(), StatusCode::OK);
    }
}
