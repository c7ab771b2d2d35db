//! `load`: an HTTP/1.1 client that sends requests one after another over a keep-alive
//! connection (reconnecting after an error) and prints one JSON line: how many of each
//! status came back, which servers answered (`x-testapp-name`), errors, and the fastest
//! and slowest request. Many requests in one process, where curl would need one
//! process per request.

use std::{collections::BTreeMap, time::Duration};

use bytes::Bytes;
use http::{Method, Request, Uri};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use tokio::time::Instant;

use super::{http::NAME_HEADER, io_ctx, Error};

/// Command line of `load`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// `http://HOST:PORT/PATH?QUERY`.
    #[arg(long)]
    pub url: String,
    /// How many requests.
    #[arg(long, default_value_t = 1)]
    pub requests: usize,
    /// Request method.
    #[arg(long, default_value = "GET")]
    pub method: String,
    /// A request header `name: value` (repeat for several).
    #[arg(long = "header")]
    pub headers: Vec<String>,
    /// Request body size in bytes (zeros; with a content-length).
    #[arg(long, default_value_t = 0)]
    pub body_bytes: usize,
    /// Pause between requests, in milliseconds.
    #[arg(long, default_value_t = 0)]
    pub interval_ms: u64,
    /// Limit per request, in milliseconds.
    #[arg(long, default_value_t = 10_000)]
    pub timeout_ms: u64,
}

/// Runs the load and prints the summary; fails only when the arguments are unusable.
pub async fn run(args: Args) -> Result<(), Error> {
    let uri: Uri = args
        .url
        .parse()
        .map_err(|e| Error::Protocol(format!("--url {}: {e}", args.url)))?;
    let authority = uri
        .authority()
        .ok_or_else(|| Error::Protocol(format!("--url {} has no host", args.url)))?
        .clone();
    let method = Method::from_bytes(args.method.as_bytes())
        .map_err(|e| Error::Protocol(format!("--method {}: {e}", args.method)))?;
    let mut headers = Vec::new();
    for h in &args.headers {
        let (k, v) = h
            .split_once(':')
            .ok_or_else(|| Error::Protocol(format!("--header {h:?} is not `name: value`")))?;
        headers.push((k.trim().to_string(), v.trim().to_string()));
    }
    let connect_to = format!(
        "{}:{}",
        authority.host(),
        authority.port_u16().unwrap_or(80)
    );
    let body = Bytes::from(vec![0u8; args.body_bytes]);
    let path = uri.path_and_query().map_or("/", |p| p.as_str()).to_string();

    let mut statuses: BTreeMap<u16, usize> = BTreeMap::new();
    let mut names: BTreeMap<String, usize> = BTreeMap::new();
    let mut errors = Vec::new();
    let (mut min, mut max) = (f64::MAX, 0f64);
    let mut last_body = String::new();
    let mut conn: Option<hyper::client::conn::http1::SendRequest<Full<Bytes>>> = None;
    let limit = Duration::from_millis(args.timeout_ms);
    for i in 0..args.requests {
        if i > 0 && args.interval_ms > 0 {
            tokio::time::sleep(Duration::from_millis(args.interval_ms)).await;
        }
        let start = Instant::now();
        let one = async {
            if conn.as_ref().is_none_or(|c| c.is_closed()) {
                let stream = tokio::net::TcpStream::connect(connect_to.as_str())
                    .await
                    .map_err(io_ctx(format!("connecting to {connect_to}")))?;
                let (tx, c) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
                    .await
                    .map_err(|e| Error::Protocol(format!("handshake: {e}")))?;
                tokio::spawn(c);
                conn = Some(tx);
            }
            let tx = conn
                .as_mut()
                .ok_or_else(|| Error::Protocol("no connection".into()))?;
            tx.ready()
                .await
                .map_err(|e| Error::Protocol(format!("connection: {e}")))?;
            let mut req = Request::builder()
                .method(method.clone())
                .uri(path.as_str())
                .header("host", authority.as_str());
            for (k, v) in &headers {
                req = req.header(k.as_str(), v.as_str());
            }
            let req = req
                .body(Full::new(body.clone()))
                .map_err(|e| Error::Protocol(format!("request: {e}")))?;
            let rsp = tx
                .send_request(req)
                .await
                .map_err(|e| Error::Protocol(format!("request: {e}")))?;
            let status = rsp.status().as_u16();
            let name = rsp
                .headers()
                .get(NAME_HEADER)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("-")
                .to_string();
            let body = rsp
                .into_body()
                .collect()
                .await
                .map_err(|e| Error::Protocol(format!("response body: {e}")))?
                .to_bytes();
            Ok::<_, Error>((status, name, body))
        };
        match tokio::time::timeout(limit, one).await {
            Ok(Ok((status, name, body))) => {
                let ms = start.elapsed().as_secs_f64() * 1000.0;
                min = min.min(ms);
                max = max.max(ms);
                *statuses.entry(status).or_default() += 1;
                *names.entry(name).or_default() += 1;
                last_body = String::from_utf8_lossy(&body[..body.len().min(512)]).into_owned();
            }
            Ok(Err(e)) => {
                conn = None;
                errors.push(e.to_string());
            }
            Err(_) => {
                conn = None;
                errors.push(format!("request {i} took longer than {limit:?}"));
            }
        }
    }
    let error_count = errors.len();
    errors.truncate(10);
    let summary = serde_json::json!({
        "requests": args.requests,
        "errorCount": error_count,
        "statuses": statuses,
        "names": names,
        "errors": errors,
        "minMs": if min == f64::MAX { 0.0 } else { min },
        "maxMs": max,
        "lastBody": last_body,
    });
    println!("{summary}");
    Ok(())
}
