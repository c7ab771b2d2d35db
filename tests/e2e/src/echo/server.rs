//! The echo server: every HTTP request (HTTP/1.1 or h2c) is answered with the
//! request as `Field=value` lines, in the echo image's order: ServiceVersion,
//! ServicePort, Host, URL, Cluster, IstioVersion, Method, Proto, IP, Alpn, one
//! RequestHeader per header value (names sorted, Go's canonical form, no Host), and
//! Hostname (the pod name). Query parameters as the image takes them: `delay=DUR`
//! waits, `headers=name:value[,name:value]` sets response headers,
//! `codes=code[:weight][,...]` picks the status.

use std::{
    convert::Infallible,
    net::{IpAddr, SocketAddr},
    sync::Arc,
    time::Duration,
};

use bytes::Bytes;
use http::{header, HeaderName, HeaderValue, Request, Response, StatusCode, Version};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::{
    rt::{TokioExecutor, TokioIo},
    server::conn::auto,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::{canonical_key, go_duration, io_ctx, Error};

/// The server's flags, named as the echo image's entrypoint takes them.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct Flags {
    /// HTTP port (repeatable) [default: 8080].
    #[arg(long)]
    pub port: Vec<u16>,
    /// gRPC port (repeatable): accepted, not served (meshlet claims no GRPCRoute).
    #[arg(long)]
    pub grpc: Vec<u16>,
    /// TCP echo port (repeatable): bytes come back as sent.
    #[arg(long)]
    pub tcp: Vec<u16>,
    /// Ports among --port that speak TLS: accepted, not served (the image's
    /// /cert.crt is not on this machine and no mesh HTTP test dials them).
    #[arg(long)]
    pub tls: Vec<u16>,
    /// TLS certificate file (kept for the image's command line).
    #[arg(long)]
    pub crt: Option<String>,
    /// TLS key file (kept for the image's command line).
    #[arg(long)]
    pub key: Option<String>,
    /// The `ServiceVersion` field.
    #[arg(long = "version", default_value = "")]
    pub service_version: String,
    /// The `Cluster` field.
    #[arg(long, default_value = "")]
    pub cluster: String,
}

/// Longest `delay=` honoured, so a typo cannot park a connection for hours.
const MAX_DELAY: Duration = Duration::from_secs(60);

/// What a handler needs besides the request.
#[derive(Debug)]
pub struct Ctx {
    /// The port this listener serves (the `ServicePort` field).
    pub port: u16,
    /// `ServiceVersion`.
    pub version: String,
    /// `Cluster`.
    pub cluster: String,
    /// `Hostname`: the pod name.
    pub hostname: String,
}

/// The pod name: `HOSTNAME` (the kubelet and meshlet-node set it), else the kernel's.
pub fn hostname() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.is_empty())
        .or_else(|| {
            std::fs::read_to_string("/proc/sys/kernel/hostname")
                .ok()
                .map(|h| h.trim().to_string())
        })
        .unwrap_or_default()
}

/// Serves every port of `flags` until the process is killed.
pub async fn serve(flags: Flags) -> Result<(), Error> {
    let mut ports = flags.port.clone();
    if ports.is_empty() {
        ports.push(8080);
    }
    let host = hostname();
    let mut tasks = tokio::task::JoinSet::new();
    for port in ports {
        if flags.tls.contains(&port) {
            eprintln!("meshlet-echo: port {port} is a TLS port: not served");
            continue;
        }
        let listener = bind(port).await?;
        let ctx = Arc::new(Ctx {
            port,
            version: flags.service_version.clone(),
            cluster: flags.cluster.clone(),
            hostname: host.clone(),
        });
        eprintln!("meshlet-echo {host}: HTTP/1.1 and h2c on port {port}");
        tasks.spawn(serve_http(listener, ctx));
    }
    for port in flags.tcp.clone() {
        let listener = bind(port).await?;
        eprintln!("meshlet-echo {host}: TCP echo on port {port}");
        tasks.spawn(serve_tcp(listener));
    }
    for port in &flags.grpc {
        eprintln!("meshlet-echo: gRPC port {port}: not served");
    }
    match tasks.join_next().await {
        Some(Ok(r)) => r,
        Some(Err(e)) => Err(Error::Usage(format!("a listener task failed: {e}"))),
        None => Err(Error::Usage(
            "no port to serve: pass --port=N (plain HTTP) or --tcp=N".into(),
        )),
    }
}

/// Listens on `[::]:port` (IPv4 too), or `0.0.0.0:port` where there is no IPv6.
pub async fn bind(port: u16) -> Result<tokio::net::TcpListener, Error> {
    match tokio::net::TcpListener::bind(("::", port)).await {
        Ok(l) => Ok(l),
        Err(_) => tokio::net::TcpListener::bind(("0.0.0.0", port))
            .await
            .map_err(io_ctx(format!("binding port {port}"))),
    }
}

/// Accepts HTTP connections on `listener` forever.
pub async fn serve_http(listener: tokio::net::TcpListener, ctx: Arc<Ctx>) -> Result<(), Error> {
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                eprintln!("meshlet-echo: accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let ctx = ctx.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| {
                let ctx = ctx.clone();
                async move { Ok::<_, Infallible>(handle(req, &ctx, peer).await) }
            });
            if let Err(e) = auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), svc)
                .await
            {
                eprintln!("meshlet-echo: connection from {peer}: {e}");
            }
        });
    }
}

async fn serve_tcp(listener: tokio::net::TcpListener) -> Result<(), Error> {
    loop {
        let (mut stream, _) = match listener.accept().await {
            Ok(c) => c,
            Err(_) => {
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        tokio::spawn(async move {
            let mut buf = vec![0u8; 16 * 1024];
            while let Ok(n) = stream.read(&mut buf).await {
                if n == 0 || stream.write_all(&buf[..n]).await.is_err() {
                    break;
                }
            }
        });
    }
}

fn query_params(query: Option<&str>) -> Vec<(String, String)> {
    query
        .unwrap_or("")
        .split('&')
        .filter(|kv| !kv.is_empty())
        .map(|kv| {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            (percent_decode(k), percent_decode(v))
        })
        .collect()
}

/// Form decoding: `+` is a space, `%XX` a byte; bad escapes stay as they are.
fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < b.len() => {
                let hex = |c: u8| (c as char).to_digit(16);
                match (hex(b[i + 1]), hex(b[i + 2])) {
                    (Some(h), Some(l)) => {
                        out.push((h * 16 + l) as u8);
                        i += 2;
                    }
                    _ => out.push(b'%'),
                }
            }
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// `codes=500:1,200:1`: the status picked by weight (`seed` in `0..sum of weights`).
pub fn pick_code(spec: &str, seed: u64) -> Result<StatusCode, String> {
    let mut codes = Vec::new();
    for part in spec.split(',') {
        let (code, weight) = match part.split_once(':') {
            Some((c, w)) => (
                c,
                w.parse::<u64>()
                    .map_err(|_| format!("invalid {part:?} (want code or code:count)"))?,
            ),
            None => (part, 1),
        };
        let code: u16 = code
            .parse()
            .map_err(|_| format!("invalid {part:?} (want code or code:count)"))?;
        if !(200..600).contains(&code) {
            return Err(format!("invalid HTTP response code {code}"));
        }
        codes.push((code, weight));
    }
    let total: u64 = codes.iter().map(|(_, w)| w).sum();
    let Some(&(last, _)) = codes.last() else {
        return Err("codes= is empty".into());
    };
    if total == 0 {
        return StatusCode::from_u16(last).map_err(|e| e.to_string());
    }
    let mut slice = seed % total;
    for (code, w) in codes {
        if slice < w {
            return StatusCode::from_u16(code).map_err(|e| e.to_string());
        }
        slice -= w;
    }
    StatusCode::from_u16(last).map_err(|e| e.to_string())
}

fn proto(v: Version) -> &'static str {
    match v {
        Version::HTTP_09 => "HTTP/0.9",
        Version::HTTP_10 => "HTTP/1.0",
        Version::HTTP_2 => "HTTP/2.0",
        Version::HTTP_3 => "HTTP/3.0",
        _ => "HTTP/1.1",
    }
}

/// The body the echo image writes for a request seen from `peer`.
pub fn payload<B>(req: &Request<B>, ctx: &Ctx, peer: IpAddr) -> String {
    let host = req
        .headers()
        .get(header::HOST)
        .map(|h| String::from_utf8_lossy(h.as_bytes()).into_owned())
        .or_else(|| req.uri().authority().map(|a| a.to_string()))
        .unwrap_or_default();
    // The request target as sent (Go's RequestURI): origin form, or the absolute form
    // an HTTP/1 client sent through a proxy.
    let uri = if req.version() != Version::HTTP_2 && req.uri().scheme().is_some() {
        req.uri().to_string()
    } else {
        req.uri()
            .path_and_query()
            .map(|p| p.as_str().to_string())
            .unwrap_or_else(|| "/".into())
    };
    let mut out = String::new();
    let mut field = |k: &str, v: &str| {
        out.push_str(k);
        out.push('=');
        out.push_str(v);
        out.push('\n');
    };
    field("ServiceVersion", &ctx.version);
    field("ServicePort", &ctx.port.to_string());
    field("Host", &host);
    field("URL", &uri);
    field("Cluster", &ctx.cluster);
    field("IstioVersion", "");
    field("Method", req.method().as_str());
    field("Proto", proto(req.version()));
    field("IP", &peer.to_canonical().to_string());
    // Plain text only: no TLS, so no negotiated ALPN.
    field("Alpn", "");
    let mut names: Vec<(String, &HeaderName)> = req
        .headers()
        .keys()
        .filter(|k| *k != header::HOST)
        .map(|k| (canonical_key(k.as_str()), k))
        .collect();
    names.sort_by(|a, b| a.0.cmp(&b.0).then_with(|| a.1.as_str().cmp(b.1.as_str())));
    names.dedup_by(|a, b| a.1 == b.1);
    for (canon, name) in names {
        for v in req.headers().get_all(name) {
            field(
                "RequestHeader",
                &format!("{canon}:{}", String::from_utf8_lossy(v.as_bytes())),
            );
        }
    }
    field("Hostname", &ctx.hostname);
    out
}

async fn handle(req: Request<Incoming>, ctx: &Ctx, peer: SocketAddr) -> Response<Full<Bytes>> {
    let params = query_params(req.uri().query());
    let param = |k: &str| {
        params
            .iter()
            .find(|(pk, _)| pk == k)
            .map(|(_, v)| v.as_str())
    };
    let mut errors = String::new();
    if let Some(d) = param("delay").filter(|d| !d.is_empty()) {
        match go_duration(d) {
            Some(d) => tokio::time::sleep(d.min(MAX_DELAY)).await,
            None => errors.push_str(&format!(
                "error delaying response error: bad duration {d:?}\n"
            )),
        }
    }
    let mut extra = Vec::new();
    if let Some(hs) = param("headers").filter(|h| !h.is_empty()) {
        for h in hs.split(',') {
            match h.split_once(':') {
                Some((n, v)) if !v.contains(':') => match (
                    HeaderName::from_bytes(n.as_bytes()),
                    HeaderValue::from_str(v),
                ) {
                    (Ok(n), Ok(v)) => extra.push((n, v)),
                    _ => errors.push_str(&format!("response headers error: invalid {h:?}\n")),
                },
                _ => errors.push_str(&format!(
                    "response headers error: invalid {h:?} (want name:value)\n"
                )),
            }
        }
    }
    let status = match param("codes").filter(|c| !c.is_empty()) {
        None => StatusCode::OK,
        Some(spec) => {
            let seed = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.subsec_nanos() as u64)
                .unwrap_or(0);
            pick_code(spec, seed).unwrap_or_else(|e| {
                errors.push_str(&format!("codes error: {e}\n"));
                StatusCode::BAD_REQUEST
            })
        }
    };
    let body = format!("{errors}{}", payload(&req, ctx, peer.ip()));
    // Drain the request body so keep-alive connections stay usable.
    let _ = req.into_body().collect().await;
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/text"),
    );
    for (n, v) in extra {
        resp.headers_mut().insert(n, v);
    }
    resp
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::echo::parse_rules;

    fn ctx() -> Ctx {
        Ctx {
            port: 8080,
            version: String::new(),
            cluster: String::new(),
            hostname: "echo-v1-5d7f9c-x2x9k".into(),
        }
    }

    #[test]
    fn payload_reads_back_through_the_suites_rules() {
        let req = Request::builder()
            .method("POST")
            .uri("/v2/example?x=1")
            .header("host", "echo")
            .header("x-header-add", "a")
            .header("x-header-add", "b")
            .header("version", "two")
            .body(())
            .unwrap();
        let body = payload(&req, &ctx(), "::ffff:198.18.77.3".parse().unwrap());
        let p = parse_rules::parse(&body);
        assert_eq!(p.fields["Host"], "echo");
        assert_eq!(p.fields["URL"], "/v2/example?x=1");
        assert_eq!(p.fields["Method"], "POST");
        assert_eq!(p.fields["Proto"], "HTTP/1.1");
        assert_eq!(p.fields["IP"], "198.18.77.3");
        assert_eq!(p.fields["ServicePort"], "8080");
        assert_eq!(p.fields["Hostname"], "echo-v1-5d7f9c-x2x9k");
        // Repeated headers stay separate values in order: the suite joins them with ",".
        assert_eq!(p.request_headers["x-header-add"], vec!["a", "b"]);
        assert_eq!(p.request_headers["version"], vec!["two"]);
        assert!(
            !p.request_headers.contains_key("host"),
            "Go moves Host out of the header map: {body}"
        );
        assert!(body.contains("RequestHeader=X-Header-Add:a\n"), "{body}");
        // Sorted by name, Hostname last, as the image writes them.
        let v = body.find("RequestHeader=Version").unwrap();
        let x = body.find("RequestHeader=X-Header-Add").unwrap();
        assert!(
            v < x && body.ends_with("Hostname=echo-v1-5d7f9c-x2x9k\n"),
            "{body}"
        );
    }

    #[test]
    fn codes_pick_by_weight() {
        assert_eq!(pick_code("302", 7).unwrap(), StatusCode::FOUND);
        assert_eq!(pick_code("500:1,200:1", 0).unwrap(), 500);
        assert_eq!(pick_code("500:1,200:1", 1).unwrap(), 200);
        assert_eq!(pick_code("500:9,200:1", 9).unwrap(), 200);
        assert!(pick_code("700", 0).is_err());
        assert!(pick_code("abc", 0).is_err());
    }

    #[test]
    fn query_params_decode() {
        let q = query_params(Some("headers=X-A:1,X-B:2&delay=10ms&a+b=%41"));
        assert_eq!(q[0], ("headers".into(), "X-A:1,X-B:2".into()));
        assert_eq!(q[1], ("delay".into(), "10ms".into()));
        assert_eq!(q[2], ("a b".into(), "A".into()));
        assert_eq!(percent_decode("%zz%4"), "%zz%4");
    }
}
