//! The echo `client`: sends `--count` requests to one URL over one keep-alive
//! connection (re-dialled when the server closes it) and prints each exchange in the
//! echo format. Redirects are not followed: the suite reads the 3xx itself. Any
//! failed request fails the whole run (exit 1, nothing on stdout), as the image's
//! client does, so the suite retries.

use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{header, HeaderName, HeaderValue, Method, Request, Uri};
use http_body_util::{BodyExt, Empty};
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo};

use super::{canonical_key, go_duration, Error};

/// The client's flags, named as the echo image's `client` takes them.
#[derive(Debug, Clone, clap::Args)]
pub struct Flags {
    /// `http://HOST[:PORT]/PATH` (`http://` is assumed when missing).
    pub url: String,
    /// How many requests to send.
    #[arg(long, default_value_t = 1)]
    pub count: usize,
    /// Requests per second (0: as fast as they complete).
    #[arg(long, default_value_t = 0)]
    pub qps: u32,
    /// Timeout of each request, a Go duration.
    #[arg(long, default_value = "5s")]
    pub timeout: String,
    /// A request header `name:value` (repeatable); `Host:x` sets the authority.
    #[arg(short = 'H', long = "header")]
    pub headers: Vec<String>,
    /// The HTTP method [default: GET].
    #[arg(long)]
    pub method: Option<String>,
    /// Speak HTTP/2 with prior knowledge (h2c) instead of HTTP/1.1.
    #[arg(long)]
    pub http2: bool,
}

/// The most requests one run sends, so a typo cannot loop for hours.
const MAX_COUNT: usize = 100_000;

/// A checked request plan.
#[derive(Debug)]
pub struct Plan {
    /// The URL as given (printed as `Url=`).
    pub url: String,
    /// Where to connect.
    pub host: String,
    /// Its port.
    pub port: u16,
    /// The Host header (authority) to send.
    pub authority: String,
    /// Path and query, as given.
    pub path: String,
    /// Method.
    pub method: Method,
    /// Headers other than Host, in the order given.
    pub headers: Vec<(HeaderName, HeaderValue)>,
}

/// Checks the flags and builds the plan.
pub fn plan(f: &Flags) -> Result<Plan, Error> {
    let url = if f.url.contains("://") {
        f.url.clone()
    } else {
        format!("http://{}", f.url)
    };
    let uri: Uri = url
        .parse()
        .map_err(|e| Error::Usage(format!("URL {url:?} does not parse: {e}")))?;
    match uri.scheme_str() {
        Some("http") => {}
        other => {
            return Err(Error::Usage(format!(
                "URL {url:?}: scheme {} is not supported by meshlet-echo client; use http:// (meshlet claims no GRPCRoute and the mesh tests send plain HTTP)",
                other.unwrap_or("")
            )))
        }
    }
    let auth = uri
        .authority()
        .ok_or_else(|| Error::Usage(format!("URL {url:?} has no host")))?;
    let host = auth.host().trim_start_matches('[').trim_end_matches(']');
    let port = auth.port_u16().unwrap_or(80);
    let mut authority = auth.as_str().to_string();
    let mut headers = Vec::new();
    for h in &f.headers {
        let (name, value) = h.split_once(':').ok_or_else(|| {
            Error::Usage(format!("invalid header format: {h:?} (want name:value)"))
        })?;
        let value = value.trim_matches(' ');
        if name.eq_ignore_ascii_case("host") {
            authority = value.to_string();
            continue;
        }
        let n = HeaderName::from_bytes(name.as_bytes())
            .map_err(|_| Error::Usage(format!("invalid header name in {h:?}")))?;
        let v = HeaderValue::from_str(value)
            .map_err(|_| Error::Usage(format!("invalid header value in {h:?}")))?;
        headers.push((n, v));
    }
    let method = match f.method.as_deref().filter(|m| !m.is_empty()) {
        Some(m) => Method::from_bytes(m.as_bytes())
            .map_err(|_| Error::Usage(format!("invalid method {m:?}")))?,
        None => Method::GET,
    };
    if f.count == 0 || f.count > MAX_COUNT {
        return Err(Error::Usage(format!(
            "--count={} is out of range (1..={MAX_COUNT})",
            f.count
        )));
    }
    Ok(Plan {
        url: f.url.clone(),
        host: host.to_string(),
        port,
        authority,
        path: uri
            .path_and_query()
            .map(|p| p.as_str().to_string())
            .unwrap_or_else(|| "/".into()),
        method,
        headers,
    })
}

/// What came back for one request.
#[derive(Debug)]
pub struct Exchange {
    /// Status code.
    pub status: u16,
    /// Response headers (name as received, value).
    pub headers: Vec<(String, String)>,
    /// Body.
    pub body: String,
}

/// One request's output block: `[i] Url=`, `[i] StatusCode=`, sorted `[i]
/// ResponseHeader=Name:value`, `[i body] line` per non-empty body line, and the
/// blank line that ends it.
pub fn format_exchange(id: usize, url: &str, x: &Exchange) -> String {
    let mut out = format!("[{id}] Url={url}\n[{id}] StatusCode={}\n", x.status);
    let mut hs: Vec<(String, &str)> = x
        .headers
        .iter()
        .map(|(k, v)| (canonical_key(k), v.as_str()))
        .collect();
    // Stable: values of one name stay in the order received.
    hs.sort_by(|a, b| a.0.cmp(&b.0));
    for (k, v) in hs {
        out.push_str(&format!("[{id}] ResponseHeader={k}:{v}\n"));
    }
    for line in x.body.split('\n').filter(|l| !l.is_empty()) {
        out.push_str(&format!("[{id} body] {line}\n"));
    }
    out.push('\n');
    out
}

enum Conn {
    H1(http1::SendRequest<Empty<Bytes>>),
    H2(http2::SendRequest<Empty<Bytes>>),
}

impl Conn {
    fn is_closed(&self) -> bool {
        match self {
            Conn::H1(s) => s.is_closed(),
            Conn::H2(s) => s.is_closed(),
        }
    }
}

async fn dial(p: &Plan, h2: bool) -> Result<Conn, String> {
    let stream = tokio::net::TcpStream::connect((p.host.as_str(), p.port))
        .await
        .map_err(|e| format!("connect {}:{}: {e}", p.host, p.port))?;
    let _ = stream.set_nodelay(true);
    let io = TokioIo::new(stream);
    if h2 {
        let (send, conn) = http2::handshake(TokioExecutor::new(), io)
            .await
            .map_err(|e| format!("h2c handshake: {e}"))?;
        tokio::spawn(conn);
        Ok(Conn::H2(send))
    } else {
        let (send, conn) = http1::handshake(io)
            .await
            .map_err(|e| format!("HTTP/1.1 handshake: {e}"))?;
        tokio::spawn(conn);
        Ok(Conn::H1(send))
    }
}

async fn once(conn: &mut Option<Conn>, p: &Plan, h2: bool) -> Result<Exchange, String> {
    if conn.as_ref().is_none_or(Conn::is_closed) {
        *conn = Some(dial(p, h2).await?);
    }
    let Some(c) = conn.as_mut() else {
        return Err("no connection".into());
    };
    let mut b = Request::builder().method(p.method.clone());
    b = if h2 {
        b.uri(format!("http://{}{}", p.authority, p.path))
    } else {
        b.uri(p.path.as_str())
            .header(header::HOST, p.authority.as_str())
    };
    for (k, v) in &p.headers {
        b = b.header(k, v);
    }
    let req = b
        .body(Empty::new())
        .map_err(|e| format!("building the request: {e}"))?;
    let resp = match c {
        Conn::H1(s) => {
            s.ready().await.map_err(|e| e.to_string())?;
            s.send_request(req).await
        }
        Conn::H2(s) => {
            s.ready().await.map_err(|e| e.to_string())?;
            s.send_request(req).await
        }
    }
    .map_err(|e| e.to_string())?;
    let status = resp.status().as_u16();
    let headers = resp
        .headers()
        .iter()
        .map(|(k, v)| {
            (
                k.as_str().to_string(),
                String::from_utf8_lossy(v.as_bytes()).into_owned(),
            )
        })
        .collect();
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| format!("reading the body: {e}"))?
        .to_bytes();
    Ok(Exchange {
        status,
        headers,
        body: String::from_utf8_lossy(&body).into_owned(),
    })
}

/// Sends the requests; the whole output, or the first failure.
pub async fn run(f: &Flags) -> Result<String, Error> {
    let p = plan(f)?;
    let timeout = go_duration(&f.timeout).ok_or_else(|| {
        Error::Usage(format!(
            "--timeout={:?} is not a duration like 5s",
            f.timeout
        ))
    })?;
    let gap = (f.qps > 0).then(|| Duration::from_secs_f64(1.0 / f64::from(f.qps)));
    let start = Instant::now();
    let mut conn = None;
    let mut out = String::new();
    for id in 0..f.count {
        if let Some(gap) = gap {
            let due = start + gap * id as u32;
            tokio::time::sleep_until(due.into()).await;
        }
        let x = match tokio::time::timeout(timeout, once(&mut conn, &p, f.http2)).await {
            Ok(Ok(x)) => x,
            Ok(Err(reason)) => {
                return Err(Error::Request {
                    id,
                    url: p.url.clone(),
                    reason,
                })
            }
            Err(_) => {
                return Err(Error::Request {
                    id,
                    url: p.url.clone(),
                    reason: format!("no response within {}", f.timeout),
                })
            }
        };
        out.push_str(&format_exchange(id, &p.url, &x));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::echo::{parse_rules, server};

    fn flags(url: &str, extra: &[&str]) -> Flags {
        use clap::Parser;
        #[derive(Parser)]
        struct T {
            #[command(flatten)]
            f: Flags,
        }
        let mut argv = vec!["client", url];
        argv.extend_from_slice(extra);
        T::try_parse_from(argv).unwrap().f
    }

    async fn server(hostname: &str) -> u16 {
        let l = tokio::net::TcpListener::bind(("127.0.0.1", 0))
            .await
            .unwrap();
        let port = l.local_addr().unwrap().port();
        let ctx = Arc::new(server::Ctx {
            port: 8080,
            version: "v1".into(),
            cluster: String::new(),
            hostname: hostname.into(),
        });
        tokio::spawn(server::serve_http(l, ctx));
        port
    }

    #[test]
    fn plans_the_suites_requests() {
        let p = plan(&flags(
            "http://echo/v2?x=1",
            &["--method=POST", "-H", "Host:echo-v2:8080", "-H", "x-a: b"],
        ))
        .unwrap();
        assert_eq!((p.host.as_str(), p.port), ("echo", 80));
        assert_eq!(p.authority, "echo-v2:8080");
        assert_eq!(p.path, "/v2?x=1");
        assert_eq!(p.method, Method::POST);
        assert_eq!(p.headers[0].0.as_str(), "x-a");
        assert_eq!(p.headers[0].1, "b");
        let p = plan(&flags("[fd00:6d65:7368::5]:8080/x", &[])).unwrap();
        assert_eq!((p.host.as_str(), p.port), ("fd00:6d65:7368::5", 8080));
        assert!(plan(&flags("grpc://echo:7070", &[])).is_err());
        assert!(plan(&flags("http://echo/", &["-H", "novalue"])).is_err());
        assert!(plan(&flags("http://echo/", &["--count=0"])).is_err());
    }

    #[test]
    fn format_is_what_the_suite_reads() {
        let x = Exchange {
            status: 302,
            headers: vec![
                ("location".into(), "http://example.org:8083/port".into()),
                ("x-b".into(), "1".into()),
            ],
            body: "Host=echo\n\nHostname=echo-v1-a-b\n".into(),
        };
        let out = format_exchange(3, "http://echo/port", &x);
        assert_eq!(
            out,
            "[3] Url=http://echo/port\n[3] StatusCode=302\n[3] ResponseHeader=Location:http://example.org:8083/port\n[3] ResponseHeader=X-B:1\n[3 body] Host=echo\n[3 body] Hostname=echo-v1-a-b\n\n"
        );
        let p = parse_rules::parse(&out);
        assert_eq!(p.fields["StatusCode"], "302");
        assert_eq!(
            p.response_headers["location"],
            "http://example.org:8083/port"
        );
        assert_eq!(p.fields["Hostname"], "echo-v1-a-b");
    }

    #[test]
    fn client_and_server_round_trip_in_the_suites_format() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let port = server("echo-v1-6f9b8d-k2xq4").await;
            let url = format!("http://127.0.0.1:{port}/v2/example?headers=X-Resp:1&codes=307");
            let out = run(&flags(
                &url,
                &[
                    "--method=PUT",
                    "-H",
                    "Version:two",
                    "-H",
                    "x-header-add:a",
                    "-H",
                    "Host:echo",
                ],
            ))
            .await
            .unwrap();
            let p = parse_rules::parse(&out);
            assert_eq!(p.fields["StatusCode"], "307", "{out}");
            assert_eq!(p.fields["Method"], "PUT");
            assert_eq!(p.fields["Host"], "echo");
            assert_eq!(p.fields["URL"], "/v2/example?headers=X-Resp:1&codes=307");
            assert_eq!(p.fields["Proto"], "HTTP/1.1");
            assert_eq!(p.fields["IP"], "127.0.0.1");
            assert_eq!(p.fields["ServiceVersion"], "v1");
            assert_eq!(p.fields["Hostname"], "echo-v1-6f9b8d-k2xq4");
            assert_eq!(p.request_headers["version"], vec!["two"]);
            assert_eq!(p.request_headers["x-header-add"], vec!["a"]);
            assert_eq!(p.response_headers["x-resp"], "1");
            assert_eq!(p.response_headers["content-type"], "application/text");
            assert_eq!(p.body["Hostname"], "echo-v1-6f9b8d-k2xq4");

            // h2c gives the same fields, with HTTP/2's protocol name.
            let out = run(&flags(&format!("http://127.0.0.1:{port}/h2"), &["--http2"]))
                .await
                .unwrap();
            let p = parse_rules::parse(&out);
            assert_eq!(p.fields["Proto"], "HTTP/2.0", "{out}");
            assert_eq!(p.fields["URL"], "/h2");
        });
    }

    #[test]
    fn a_batch_splits_into_one_response_per_request() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let port = server("echo-v2-77c4b-9zq1p").await;
            let out = run(&flags(
                &format!("http://127.0.0.1:{port}/"),
                &["--count=25"],
            ))
            .await
            .unwrap();
            let all = parse_rules::parse_many(&out);
            assert_eq!(all.len(), 25, "{out}");
            assert!(all
                .iter()
                .all(|p| p.fields["Hostname"] == "echo-v2-77c4b-9zq1p"
                    && p.fields["StatusCode"] == "200"));
        });
    }

    #[test]
    fn a_refused_connection_fails_the_run() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            // A port nobody listens on: bind, note it, close.
            let port = {
                let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
                l.local_addr().unwrap().port()
            };
            let err = run(&flags(
                &format!("http://127.0.0.1:{port}/"),
                &["--timeout=2s"],
            ))
            .await
            .unwrap_err();
            assert!(err.to_string().contains("connect 127.0.0.1"), "{err}");
        });
    }
}
