//! In-process harness: a fake `SO_ORIGINAL_DST`, a proxy on its own thread, and small
//! test servers. For this crate's integration tests and for other crates that want
//! to run the proxy without iptables (feature `test-util`).

use std::{
    collections::HashMap,
    convert::Infallible,
    io::{Read, Write},
    net::{SocketAddr, TcpStream as StdTcpStream},
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Either, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};

use crate::{drain, metrics::Direction, Config, OrigDst, Proxy};

/// A fake original destination per listener; connections on a listener without one
/// report their local address, as the kernel does without a NAT rule.
#[derive(Debug, Default)]
pub struct MockOrigDst {
    dsts: Mutex<HashMap<Direction, SocketAddr>>,
}

impl MockOrigDst {
    /// No destinations yet.
    pub fn new() -> Arc<Self> {
        Arc::default()
    }

    /// Connections on `direction`'s listener go to `dst`.
    pub fn set(&self, direction: Direction, dst: SocketAddr) {
        self.dsts
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(direction, dst);
    }
}

impl OrigDst for MockOrigDst {
    fn orig_dst(
        &self,
        direction: Direction,
        stream: &tokio::net::TcpStream,
    ) -> std::io::Result<SocketAddr> {
        let dsts = self.dsts.lock().unwrap_or_else(|p| p.into_inner());
        match dsts.get(&direction) {
            Some(d) => Ok(*d),
            None => stream.local_addr(),
        }
    }
}

/// A proxy running on its own thread with a current-thread runtime.
pub struct TestProxy {
    /// Outbound listener.
    pub outbound: SocketAddr,
    /// Inbound listener.
    pub inbound: SocketAddr,
    /// Admin server.
    pub admin: SocketAddr,
    /// Its fake original destinations.
    pub orig_dst: Arc<MockOrigDst>,
    shutdown: drain::Trigger,
    thread: Option<std::thread::JoinHandle<bool>>,
}

impl TestProxy {
    /// Starts a proxy on 127.0.0.1 ephemeral ports; `vars` add to or override the
    /// environment (`MESHLET_*`).
    pub fn start(vars: &[(&str, &str)]) -> Self {
        let mut env: Vec<(&str, &str)> = vec![
            (meshlet_api::env::PROXY_OUTBOUND_ADDR, "127.0.0.1:0"),
            (meshlet_api::env::PROXY_INBOUND_ADDR, "127.0.0.1:0"),
            (meshlet_api::env::PROXY_ADMIN_ADDR, "127.0.0.1:0"),
        ];
        env.retain(|(k, _)| !vars.iter().any(|(v, _)| v == k));
        env.extend_from_slice(vars);
        let config = Config::parse(&env[..]).expect("test proxy config");
        let orig_dst = MockOrigDst::new();
        let (tx, rx) = std::sync::mpsc::channel();
        let od = orig_dst.clone();
        let thread = std::thread::Builder::new()
            .name("test-proxy".into())
            .spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("runtime");
                rt.block_on(async move {
                    let running = Proxy::new(config, od)
                        .expect("proxy config")
                        .start()
                        .await
                        .expect("proxy start");
                    let _ = tx.send((running.addrs, running.shutdown_handle()));
                    running.wait().await
                })
            })
            .expect("spawn proxy thread");
        let (addrs, shutdown) = rx.recv().expect("proxy started");
        Self {
            outbound: addrs.outbound,
            inbound: addrs.inbound,
            admin: addrs.admin,
            orig_dst,
            shutdown,
            thread: Some(thread),
        }
    }

    /// Starts the drain, like SIGTERM.
    pub fn shutdown(&self) {
        self.shutdown.start();
    }

    /// Waits for the proxy thread; `true` if the drain finished in time.
    pub fn join(mut self) -> bool {
        self.thread
            .take()
            .map(|t| t.join().unwrap_or(false))
            .unwrap_or(false)
    }

    /// `GET path` on the admin server: status and body.
    pub fn admin_get(&self, path: &str) -> (u16, String) {
        admin_request(self.admin, "GET", path)
    }

    /// The `/metrics` text.
    pub fn metrics(&self) -> String {
        self.admin_get("/metrics").1
    }
}

impl Drop for TestProxy {
    fn drop(&mut self) {
        self.shutdown.start();
    }
}

/// A blocking HTTP/1.0 request to an admin server: status and body.
pub fn admin_request(addr: SocketAddr, method: &str, path: &str) -> (u16, String) {
    let mut s = StdTcpStream::connect(addr).expect("connect admin");
    s.set_read_timeout(Some(Duration::from_secs(10))).ok();
    write!(s, "{method} {path} HTTP/1.0\r\nHost: admin\r\n\r\n").expect("write admin request");
    let mut out = String::new();
    s.read_to_string(&mut out).expect("read admin response");
    let status = out.get(9..12).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = out
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

/// The value of the metric line starting with `prefix` (name plus labels).
pub fn metric_value(text: &str, prefix: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// A test HTTP server: counts connections and answers from [`echo`].
pub struct TestServer {
    /// Where it listens.
    pub addr: SocketAddr,
    /// Connections accepted so far.
    pub connections: Arc<AtomicUsize>,
}

/// Starts an HTTP server on 127.0.0.1 (`h2`: HTTP/2 prior knowledge, else HTTP/1.1
/// with upgrades) that answers with [`echo`].
pub async fn http_server(h2: bool) -> TestServer {
    http_server_on("127.0.0.1:0".parse().expect("static addr"), h2).await
}

/// [`http_server`] on a given address.
pub async fn http_server_on(addr: SocketAddr, h2: bool) -> TestServer {
    let listener = TcpListener::bind(addr).await.expect("bind test server");
    let addr = listener.local_addr().expect("addr");
    let connections = Arc::new(AtomicUsize::new(0));
    let count = connections.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            count.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let io = TokioIo::new(stream);
                let svc = hyper::service::service_fn(echo);
                if h2 {
                    let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                        .serve_connection(io, svc)
                        .await;
                } else {
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(io, svc)
                        .with_upgrades()
                        .await;
                }
            });
        }
    });
    TestServer { addr, connections }
}

/// The test servers' handler:
/// - `/slow?ms=N`: waits N ms, then answers `slow`;
/// - `/status/N`: answers status N;
/// - `/upgrade`: answers 101 and echoes the upgraded bytes (`CONNECT`: 200, then echoes);
/// - anything else: streams the request body back (trailers included) with headers
///   `x-seen-host`, `x-seen-uri`, `x-seen-connection` and `x-seen-te` describing the request.
pub async fn echo(
    mut req: Request<Incoming>,
) -> Result<Response<Either<Incoming, Full<Bytes>>>, Infallible> {
    let path = req.uri().path().to_string();
    let full = |status: u16, body: &'static str| {
        let mut r = Response::new(Either::Right(Full::new(Bytes::from_static(
            body.as_bytes(),
        ))));
        *r.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        r
    };
    if path == "/slow" {
        let ms = req
            .uri()
            .query()
            .and_then(|q| q.strip_prefix("ms="))
            .and_then(|v| v.parse().ok())
            .unwrap_or(500);
        tokio::time::sleep(Duration::from_millis(ms)).await;
        return Ok(full(200, "slow"));
    }
    if let Some(code) = path.strip_prefix("/status/").and_then(|c| c.parse().ok()) {
        return Ok(full(code, ""));
    }
    if path == "/upgrade" || req.method() == http::Method::CONNECT {
        let on = hyper::upgrade::on(&mut req);
        tokio::spawn(async move {
            if let Ok(up) = on.await {
                let mut io = TokioIo::new(up);
                let mut buf = [0u8; 1024];
                while let Ok(n) = io.read(&mut buf).await {
                    if n == 0 || io.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
                let _ = io.shutdown().await;
            }
        });
        if req.method() == http::Method::CONNECT {
            return Ok(full(200, ""));
        }
        let mut r = full(101, "");
        r.headers_mut()
            .insert("upgrade", "echo".parse().expect("static"));
        r.headers_mut()
            .insert("connection", "upgrade".parse().expect("static"));
        return Ok(r);
    }
    let host = req
        .headers()
        .get("host")
        .and_then(|h| h.to_str().ok())
        .map(str::to_string)
        .or_else(|| req.uri().authority().map(|a| a.to_string()))
        .unwrap_or_default();
    let uri = req.uri().to_string();
    let conn = req.headers().get("connection").cloned();
    let te = req.headers().get("te").cloned();
    let mut r = Response::new(Either::Left(req.into_body()));
    let h = r.headers_mut();
    h.insert(
        "x-seen-host",
        host.parse()
            .unwrap_or_else(|_| "?".parse().expect("static")),
    );
    h.insert(
        "x-seen-uri",
        uri.parse().unwrap_or_else(|_| "?".parse().expect("static")),
    );
    if let Some(c) = conn {
        h.insert("x-seen-connection", c);
    }
    if let Some(t) = te {
        h.insert("x-seen-te", t);
    }
    Ok(r)
}

/// A TCP server that writes `banner` as soon as a client connects, then echoes.
pub async fn banner_server(banner: &'static [u8]) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind banner server");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                if s.write_all(banner).await.is_err() {
                    return;
                }
                let mut buf = [0u8; 1024];
                while let Ok(n) = s.read(&mut buf).await {
                    if n == 0 || s.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    addr
}

/// A TCP server that reads until EOF, then answers `reply:` plus what it read.
pub async fn read_to_eof_server() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind eof server");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut got = Vec::new();
                if s.read_to_end(&mut got).await.is_ok() {
                    let _ = s.write_all(b"reply:").await;
                    let _ = s.write_all(&got).await;
                }
            });
        }
    });
    addr
}

/// An HTTP/1 client connection to `addr`.
pub async fn h1_client<B>(addr: SocketAddr) -> hyper::client::conn::http1::SendRequest<B>
where
    B: http_body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let io = TokioIo::new(TcpStream::connect(addr).await.expect("connect"));
    let (tx, conn) = hyper::client::conn::http1::handshake(io)
        .await
        .expect("h1 handshake");
    tokio::spawn(conn.with_upgrades());
    tx
}

/// An HTTP/2 prior-knowledge client connection to `addr`.
pub async fn h2_client<B>(addr: SocketAddr) -> hyper::client::conn::http2::SendRequest<B>
where
    B: http_body::Body + Send + Unpin + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let io = TokioIo::new(TcpStream::connect(addr).await.expect("connect"));
    let (tx, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
        .await
        .expect("h2 handshake");
    tokio::spawn(conn);
    tx
}

/// Reads a whole body.
pub async fn body_bytes<B>(body: B) -> Bytes
where
    B: http_body::Body,
    B::Error: std::fmt::Debug,
{
    body.collect().await.expect("body").to_bytes()
}

/// A request body fed frame by frame from a channel (data and trailers).
pub struct ChannelBody {
    rx: tokio::sync::mpsc::Receiver<http_body::Frame<Bytes>>,
}

impl ChannelBody {
    /// A body and the sender that feeds it; dropping the sender ends it.
    pub fn new() -> (tokio::sync::mpsc::Sender<http_body::Frame<Bytes>>, Self) {
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        (tx, Self { rx })
    }
}

impl http_body::Body for ChannelBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, Infallible>>> {
        self.rx.poll_recv(cx).map(|f| f.map(Ok))
    }
}
