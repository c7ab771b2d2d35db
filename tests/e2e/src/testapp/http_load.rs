//! `http-load`: requests to one URL over ONE client connection (HTTP/1.1 keep-alive or
//! h2c prior knowledge), one after another, recording who answered what and when.
//!
//! Prints one JSON object: `requests`, `byName` (the `x-testapp-name` of each answer),
//! `byStatus`, and `records`, one `[unixMs, status, name]` per request, so a test can
//! tell when an endpoint stopped (or started again) receiving traffic.

use std::{
    collections::BTreeMap,
    time::{Duration, Instant},
};

use bytes::Bytes;
use http::{header, Request, Uri};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpStream;

use super::{http::unix_ms, http::NAME_HEADER, io_ctx, Error};

/// When the run ends.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// At most this many requests.
    pub requests: u64,
    /// At most this long.
    pub duration: Duration,
    /// Pause after each answer.
    pub interval: Duration,
}

enum Sender {
    H1(hyper::client::conn::http1::SendRequest<Empty<Bytes>>),
    H2(hyper::client::conn::http2::SendRequest<Empty<Bytes>>),
}

/// Runs the load and prints the summary; fails when the connection breaks.
pub async fn run(url: &str, h2: bool, limits: Limits) -> Result<(), Error> {
    let uri: Uri = url
        .parse()
        .map_err(|e| Error::Protocol(format!("bad URL {url:?}: {e}")))?;
    let authority = uri
        .authority()
        .ok_or_else(|| Error::Protocol(format!("URL {url:?} has no host")))?
        .clone();
    let addr = format!(
        "{}:{}",
        authority.host(),
        authority.port_u16().unwrap_or(80)
    );
    let stream = TcpStream::connect(&addr)
        .await
        .map_err(io_ctx(format!("connecting to {addr}")))?;
    stream.set_nodelay(true).ok();
    let io = TokioIo::new(stream);
    let mut tx = if h2 {
        let (tx, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
            .await
            .map_err(|e| Error::Protocol(format!("h2 handshake with {addr}: {e}")))?;
        tokio::spawn(conn);
        Sender::H2(tx)
    } else {
        let (tx, conn) = hyper::client::conn::http1::handshake(io)
            .await
            .map_err(|e| Error::Protocol(format!("HTTP/1.1 handshake with {addr}: {e}")))?;
        tokio::spawn(conn);
        Sender::H1(tx)
    };
    let path = uri.path_and_query().map_or("/", |p| p.as_str()).to_string();
    let start = Instant::now();
    let mut records = Vec::new();
    let mut by_name = BTreeMap::<String, u64>::new();
    let mut by_status = BTreeMap::<String, u64>::new();
    let mut n = 0;
    while n < limits.requests && start.elapsed() < limits.duration {
        n += 1;
        let rsp = match &mut tx {
            Sender::H1(tx) => {
                let req = Request::get(path.as_str())
                    .header(header::HOST, authority.as_str())
                    .body(Empty::new())
                    .map_err(|e| Error::Protocol(format!("building the request: {e}")))?;
                tx.ready()
                    .await
                    .map_err(|e| Error::Protocol(format!("request {n}: connection lost: {e}")))?;
                tx.send_request(req).await
            }
            Sender::H2(tx) => {
                let req = Request::get(uri.clone())
                    .body(Empty::new())
                    .map_err(|e| Error::Protocol(format!("building the request: {e}")))?;
                tx.ready()
                    .await
                    .map_err(|e| Error::Protocol(format!("request {n}: connection lost: {e}")))?;
                tx.send_request(req).await
            }
        }
        .map_err(|e| Error::Protocol(format!("request {n} failed: {e}")))?;
        let status = rsp.status().as_u16();
        let name = rsp
            .headers()
            .get(NAME_HEADER)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("-")
            .to_string();
        rsp.into_body()
            .collect()
            .await
            .map_err(|e| Error::Protocol(format!("request {n}: body: {e}")))?;
        records.push(serde_json::json!([unix_ms(), status, name]));
        *by_name.entry(name).or_default() += 1;
        *by_status.entry(status.to_string()).or_default() += 1;
        if !limits.interval.is_zero() {
            tokio::time::sleep(limits.interval).await;
        }
    }
    let out = serde_json::json!({
        "requests": n,
        "protocol": if h2 { "h2c" } else { "http/1.1" },
        "elapsedMs": start.elapsed().as_millis() as u64,
        "byName": by_name,
        "byStatus": by_status,
        "records": records,
    });
    println!("{out}");
    Ok(())
}
