//! HTTP/1.1 and h2c (prior knowledge) server.
//!
//! Routes: `/bytes/N` streams N pattern bytes, `/upload` answers the length and
//! SHA-256 of the request body, `/slow?ms=N` answers after N ms, `/status/N` answers
//! status N, `/count` answers how many requests the server received (all but `/count`,
//! the switches and the probes' `/ready` and `/live`), anything else echoes the request
//! as JSON. With `--fail-every N` every N-th counted request is read whole and answered
//! 503.
//!
//! Switches for outlier tests: `/testapp/fail` makes every other request answer 503
//! from then on, `/testapp/heal` ends that, `/testapp/count` tells how many requests
//! were served and how many of them failed on purpose.

use std::{
    convert::Infallible,
    net::SocketAddr,
    pin::Pin,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    task::{Context, Poll},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use bytes::Bytes;
use http::{header, Request, Response, StatusCode};
use http_body::{Body, Frame, SizeHint};
use http_body_util::{combinators::BoxBody, BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::{
    rt::{TokioExecutor, TokioIo},
    server::conn::auto,
};

use super::{
    pattern::{Digest, Pattern},
    Error,
};

/// Response header carrying the server's name.
pub const NAME_HEADER: &str = "x-testapp-name";
/// Longest `/slow` delay, so a typo cannot park a connection for hours.
const MAX_SLOW_MS: u64 = 60_000;
/// How much of a request body the echo route returns.
const ECHO_BODY_LIMIT: usize = 4096;

type RespBody = BoxBody<Bytes, Infallible>;

/// Requests counted so far for `/count` and `--fail-every` (see the module docs).
static COUNTED: AtomicU64 = AtomicU64::new(0);

/// Where the switch routes live; they are never failed or counted.
const SWITCH_PREFIX: &str = "/testapp/";

/// The server's switch and counters, shared by its connections.
#[derive(Default)]
struct State {
    failing: AtomicBool,
    served: AtomicU64,
    failed: AtomicU64,
}

/// Milliseconds since the unix epoch, as the load client stamps its records.
pub fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Serves until the process is killed; `fail_every` > 0 answers every N-th request 503.
pub async fn serve(port: u16, name: String, fail_every: u64) -> Result<(), Error> {
    let listener = super::bind_tcp(port).await?;
    eprintln!("testapp http {name}: listening on port {port} (IPv4 and IPv6) (HTTP/1.1 and h2c)");
    let name: Arc<str> = name.into();
    let state = Arc::new(State::default());
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                eprintln!("testapp http: accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let name = name.clone();
        let state = state.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| {
                handle(req, name.clone(), peer, state.clone(), fail_every)
            });
            if let Err(e) = auto::Builder::new(TokioExecutor::new())
                .serve_connection_with_upgrades(TokioIo::new(stream), svc)
                .await
            {
                eprintln!("testapp http: connection from {peer}: {e}");
            }
        });
    }
}

async fn handle(
    req: Request<Incoming>,
    name: Arc<str>,
    peer: SocketAddr,
    state: Arc<State>,
    fail_every: u64,
) -> Result<Response<RespBody>, Infallible> {
    let path = req.uri().path().to_string();
    if !path.starts_with(SWITCH_PREFIX) {
        state.served.fetch_add(1, Ordering::Relaxed);
    }
    let counted =
        !path.starts_with(SWITCH_PREFIX) && !matches!(path.as_str(), "/count" | "/ready" | "/live");
    let n = if counted {
        COUNTED.fetch_add(1, Ordering::SeqCst) + 1
    } else {
        0
    };
    let resp = if let Some(switch) = path.strip_prefix(SWITCH_PREFIX) {
        switch_route(switch, &name, &state)
    } else if state.failing.load(Ordering::Relaxed) {
        state.failed.fetch_add(1, Ordering::Relaxed);
        text(
            StatusCode::SERVICE_UNAVAILABLE,
            "failing on purpose (/testapp/fail)\n",
        )
    } else if counted && fail_every > 0 && n.is_multiple_of(fail_every) {
        // Read the whole body first: the client must be able to tell that the request
        // arrived intact even though it failed.
        let len = match req.into_body().collect().await {
            Ok(b) => b.to_bytes().len(),
            Err(_) => 0,
        };
        text(
            StatusCode::SERVICE_UNAVAILABLE,
            &format!("flaky: request {n} fails ({len} body bytes read)\n"),
        )
    } else if path == "/count" {
        json(serde_json::json!({ "name": &*name, "requests": COUNTED.load(Ordering::SeqCst) }))
    } else if let Some(n) = path.strip_prefix("/bytes/") {
        match n.parse::<u64>() {
            Ok(n) => Response::new(PatternBody(Pattern::new(n)).boxed()),
            Err(_) => text(StatusCode::BAD_REQUEST, "bytes/N needs a number\n"),
        }
    } else if path == "/upload" {
        upload(req, &name).await
    } else if let Some(code) = path.strip_prefix("/status/") {
        match code
            .parse::<u16>()
            .ok()
            .and_then(|c| StatusCode::from_u16(c).ok())
        {
            Some(code) => text(code, &format!("status {code}\n")),
            None => text(StatusCode::BAD_REQUEST, "status/N needs a status code\n"),
        }
    } else {
        if path == "/slow" {
            let ms = query_param(req.uri().query(), "ms")
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(1000)
                .min(MAX_SLOW_MS);
            tokio::time::sleep(Duration::from_millis(ms)).await;
        }
        echo(req, &name, peer).await
    };
    let mut resp = resp;
    if let Ok(v) = header::HeaderValue::from_str(&name) {
        resp.headers_mut().insert(NAME_HEADER, v);
    }
    Ok(resp)
}

fn switch_route(switch: &str, name: &str, state: &State) -> Response<RespBody> {
    let counts = |at: &str| {
        serde_json::json!({
            "name": name,
            "at": at,
            "unixMs": unix_ms(),
            "failing": state.failing.load(Ordering::Relaxed),
            "served": state.served.load(Ordering::Relaxed),
            "failed": state.failed.load(Ordering::Relaxed),
        })
    };
    match switch {
        "fail" => {
            state.failing.store(true, Ordering::Relaxed);
            eprintln!("testapp http {name}: failing every request from now on");
            json(counts("fail"))
        }
        "heal" => {
            state.failing.store(false, Ordering::Relaxed);
            eprintln!("testapp http {name}: healthy again");
            json(counts("heal"))
        }
        "count" => json(counts("count")),
        other => text(
            StatusCode::NOT_FOUND,
            &format!("no switch {other:?}: use /testapp/fail, /testapp/heal or /testapp/count\n"),
        ),
    }
}

fn query_param<'a>(query: Option<&'a str>, key: &str) -> Option<&'a str> {
    query?
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .find(|(k, _)| *k == key)
        .map(|(_, v)| v)
}

fn text(status: StatusCode, body: &str) -> Response<RespBody> {
    let mut r = Response::new(Full::new(Bytes::from(body.to_string())).boxed());
    *r.status_mut() = status;
    r
}

fn json(value: serde_json::Value) -> Response<RespBody> {
    let mut body = value.to_string();
    body.push('\n');
    let mut r = Response::new(Full::new(Bytes::from(body)).boxed());
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    r
}

async fn upload(req: Request<Incoming>, name: &str) -> Response<RespBody> {
    let mut body = req.into_body();
    let mut digest = Digest::default();
    while let Some(frame) = body.frame().await {
        match frame {
            Ok(f) => {
                if let Some(d) = f.data_ref() {
                    digest.update(d);
                }
            }
            Err(e) => return text(StatusCode::BAD_REQUEST, &format!("body error: {e}\n")),
        }
    }
    let (length, sha256) = digest.finish();
    json(serde_json::json!({ "name": name, "length": length, "sha256": sha256 }))
}

async fn echo(req: Request<Incoming>, name: &str, peer: SocketAddr) -> Response<RespBody> {
    let (parts, body) = req.into_parts();
    let body = match body.collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => return text(StatusCode::BAD_REQUEST, &format!("body error: {e}\n")),
    };
    let headers: serde_json::Map<String, serde_json::Value> = parts
        .headers
        .iter()
        .map(|(k, v)| {
            (
                k.as_str().to_string(),
                String::from_utf8_lossy(v.as_bytes()).into_owned().into(),
            )
        })
        .collect();
    let shown = &body[..body.len().min(ECHO_BODY_LIMIT)];
    json(serde_json::json!({
        "name": name,
        "method": parts.method.as_str(),
        "path": parts.uri.path_and_query().map(|p| p.as_str()).unwrap_or("/"),
        "version": format!("{:?}", parts.version),
        "peer": peer.to_string(),
        "headers": headers,
        "bodyLength": body.len(),
        "body": String::from_utf8_lossy(shown),
    }))
}

/// Streams the pattern with an exact size hint, so HTTP/1.1 gets a content-length.
struct PatternBody(Pattern);

impl Body for PatternBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        Poll::Ready(self.0.next_chunk().map(|c| Ok(Frame::data(c))))
    }

    fn is_end_stream(&self) -> bool {
        self.0.remaining() == 0
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.0.remaining())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_params() {
        assert_eq!(query_param(Some("a=1&ms=250"), "ms"), Some("250"));
        assert_eq!(query_param(Some("a=1"), "ms"), None);
        assert_eq!(query_param(None, "ms"), None);
    }
}
