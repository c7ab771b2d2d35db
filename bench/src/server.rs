//! A minimal HTTP/1.1 upstream that answers every request with a fixed body, so the
//! benchmarked path, not the app, dominates what is measured.

use std::{convert::Infallible, time::Duration};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{body::Incoming, server::conn::http1, service::service_fn, Request, Response};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

/// What the server answers.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    /// The response body sent for every request.
    pub body: Bytes,
    /// Time to wait before answering; zero for none (tests use it to model a slow app).
    pub delay: Duration,
}

impl ServerConfig {
    /// A server that answers `size` bytes at once.
    pub fn fixed(size: usize) -> Self {
        Self {
            body: Bytes::from(vec![b'x'; size]),
            delay: Duration::ZERO,
        }
    }
}

async fn answer(
    cfg: ServerConfig,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    // Read the whole request body so keep-alive connections stay in sync; a broken
    // body only means the client went away, which the connection reports itself.
    let _ = req.into_body().collect().await;
    if !cfg.delay.is_zero() {
        tokio::time::sleep(cfg.delay).await;
    }
    let mut rsp = Response::new(Full::new(cfg.body));
    rsp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/plain"),
    );
    Ok(rsp)
}

/// Accepts connections forever and serves each on its own task.
pub async fn serve(listener: TcpListener, cfg: ServerConfig) -> std::io::Result<()> {
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(c) => c,
            // Running out of file descriptors or a reset before accept must not end the
            // server: back off briefly and go on.
            Err(_) => {
                tokio::time::sleep(Duration::from_millis(5)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let cfg = cfg.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req| answer(cfg.clone(), req));
            // A client that resets mid-request is normal under load; nothing to report.
            let _ = http1::Builder::new()
                .keep_alive(true)
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}
