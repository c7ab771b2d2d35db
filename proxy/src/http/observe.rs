//! Records request metrics and turns proxy failures into synthetic responses, so
//! the layers below can fail with a typed error and the client still gets an answer.

use std::{
    convert::Infallible,
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{Either, Full};
use tokio::time::Instant;

use super::route::Routed;
use crate::{errors, errors::ProxyError, metrics::RequestMetrics};

/// Adds [`Observe`] to a stack.
#[derive(Clone)]
pub struct ObserveLayer {
    metrics: Option<Arc<RequestMetrics>>,
}

/// Metrics and error responses around an inner HTTP service.
#[derive(Clone)]
pub struct Observe<S> {
    inner: S,
    metrics: Option<Arc<RequestMetrics>>,
}

impl ObserveLayer {
    /// Records into `metrics`, if given.
    pub fn new(metrics: Option<Arc<RequestMetrics>>) -> Self {
        Self { metrics }
    }
}

impl<S> tower::Layer<S> for ObserveLayer {
    type Service = Observe<S>;

    fn layer(&self, inner: S) -> Observe<S> {
        Observe {
            inner,
            metrics: self.metrics.clone(),
        }
    }
}

impl<S, B, L> tower::Service<Request<B>> for Observe<S>
where
    S: tower::Service<Request<B>, Response = Response<Either<L, Full<Bytes>>>, Error = ProxyError>,
    S::Future: Send + 'static,
{
    type Response = Response<Either<L, Full<Bytes>>>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        match self.inner.poll_ready(cx) {
            Poll::Pending => Poll::Pending,
            // Readiness errors surface again from `call`.
            Poll::Ready(_) => Poll::Ready(Ok(())),
        }
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let start = Instant::now();
        // The route stage above names the route a request took.
        let route = req.extensions().get::<Routed>().map(|r| r.label.clone());
        let fut = self.inner.call(req);
        let metrics = self.metrics.clone();
        Box::pin(async move {
            let rsp = match fut.await {
                Ok(rsp) => rsp,
                Err(error) => {
                    tracing::debug!(%error, "answering with a synthetic response");
                    if let (ProxyError::ConnectTimeout { .. }, Some(m)) = (&error, &metrics) {
                        m.timeout("connect");
                    }
                    errors::respond(&error).map(Either::Right)
                }
            };
            if let Some(m) = metrics {
                m.record_route(rsp.status(), start.elapsed(), route.as_ref());
            }
            Ok(rsp)
        })
    }
}
