//! Serves one accepted connection as HTTP/1 or HTTP/2, and shuts it down gracefully
//! when the drain starts (HTTP/1: close after the response in flight; HTTP/2: GOAWAY).

use std::convert::Infallible;

use http::{Request, Response};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tower::ServiceExt;

use super::Body;
use crate::{detect::Protocol, drain};

/// Largest request head (request line plus headers) accepted; bigger ones get 431.
pub const MAX_HEADER_BYTES: usize = 64 * 1024;

/// Serves HTTP on `io` until the client closes or the drain finishes the connection.
pub async fn serve<I, S>(
    io: I,
    protocol: Protocol,
    svc: S,
    drain: &drain::Watch,
) -> Result<(), hyper::Error>
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    S: tower::Service<Request<Incoming>, Response = Response<Body>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    let svc = hyper::service::service_fn(move |req| svc.clone().oneshot(req));
    let io = TokioIo::new(io);
    if protocol == Protocol::H2 {
        let conn = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .max_header_list_size(MAX_HEADER_BYTES as u32)
            .serve_connection(io, svc);
        tokio::pin!(conn);
        tokio::select! {
            res = conn.as_mut() => res,
            _ = drain.signaled() => {
                conn.as_mut().graceful_shutdown();
                conn.await
            }
        }
    } else {
        let conn = hyper::server::conn::http1::Builder::new()
            .timer(TokioTimer::new())
            // Keep-alive connections from the app may idle for long; hyper's header
            // timer would also run while idle and cut them.
            .header_read_timeout(None)
            .max_header_size(MAX_HEADER_BYTES)
            .serve_connection(io, svc)
            .with_upgrades();
        tokio::pin!(conn);
        tokio::select! {
            res = conn.as_mut() => res,
            _ = drain.signaled() => {
                conn.as_mut().graceful_shutdown();
                conn.await
            }
        }
    }
}
