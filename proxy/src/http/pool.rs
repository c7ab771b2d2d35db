//! Upstream HTTP connections, pooled per (destination, protocol).
//!
//! HTTP/2 multiplexes: one connection per destination, its `SendRequest` shared by
//! every request. HTTP/1 connections carry one request at a time: a request checks
//! one out of the destination's idle list (or connects), and its response body hands
//! it back when it has been read to the end. The idle list is bounded per
//! destination, idle entries expire, and the number of destinations is bounded, so
//! the pool's memory stays flat whatever the traffic.

use std::{
    collections::HashMap,
    net::SocketAddr,
    pin::Pin,
    sync::{Arc, Mutex, MutexGuard},
    task::{Context, Poll},
    time::Duration,
};

use bytes::Bytes;
use http_body::{Body as HttpBody, Frame, SizeHint};
use hyper::{
    body::Incoming,
    client::conn::{http1, http2},
};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::time::Instant;

use crate::{
    errors::ProxyError,
    tls::{connect::connect, ClientTls},
};

/// Idle HTTP/1 connections kept per destination.
pub const MAX_IDLE_PER_DST: usize = 16;
/// Destinations with pooled connections.
pub const MAX_DSTS: usize = 1024;
/// How long an idle HTTP/1 connection is kept.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(90);
/// How long a pooled HTTP/1 connection may take to become ready again.
const READY_TIMEOUT: Duration = Duration::from_millis(500);

/// The pool; cheap to clone.
pub struct Pool<B = Incoming> {
    inner: Arc<Inner<B>>,
}

struct Inner<B> {
    h1: Mutex<HashMap<Key, Vec<Idle<B>>>>,
    h2: Mutex<HashMap<Key, H2Slot<B>>>,
}

/// Connections are pooled per destination and mesh TLS settings: a plaintext
/// connection never carries a request meant for mTLS, nor one verified for a
/// different set of server identities.
type Key = (SocketAddr, Option<u64>);

fn key(dst: SocketAddr, tls: Option<&ClientTls>) -> Key {
    (dst, tls.map(ClientTls::key))
}

/// An idle HTTP/1 connection and when it became idle.
type Idle<B> = (Instant, http1::SendRequest<B>);

/// The HTTP/2 connection to one destination, locked while it is being opened.
type H2Slot<B> = Arc<tokio::sync::Mutex<Option<http2::SendRequest<B>>>>;

/// A checked-out HTTP/1 connection.
pub struct H1Conn<B = Incoming> {
    /// Sends the request.
    pub tx: http1::SendRequest<B>,
    /// Whether it came from the idle list (so a failed send may be retried).
    pub reused: bool,
}

/// A response body that returns its HTTP/1 connection to the pool once read to the end.
pub struct PooledBody<B = Incoming> {
    inner: Incoming,
    checkin: Option<Checkin<B>>,
}

/// Where a finished HTTP/1 connection goes back to.
pub struct Checkin<B = Incoming> {
    pool: Pool<B>,
    key: Key,
    tx: http1::SendRequest<B>,
}

// === impl Pool ===

impl<B> Clone for Pool<B> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
        }
    }
}

impl<B> Default for Pool<B> {
    fn default() -> Self {
        Self {
            inner: Arc::new(Inner {
                h1: Mutex::default(),
                h2: Mutex::default(),
            }),
        }
    }
}

impl<B> Pool<B>
where
    B: HttpBody + Send + Unpin + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    /// An empty pool.
    pub fn new() -> Self {
        Self::default()
    }

    /// An HTTP/1 connection to `dst` (mesh mTLS with `tls`): idle if one is ready,
    /// else a new one.
    pub async fn checkout_h1(
        &self,
        dst: SocketAddr,
        tls: Option<&ClientTls>,
        connect_timeout: Duration,
    ) -> Result<H1Conn<B>, ProxyError> {
        while let Some(mut tx) = self.pop_h1(key(dst, tls)) {
            // Usually ready already: skip arming a timer per request.
            if tx.is_ready() {
                return Ok(H1Conn { tx, reused: true });
            }
            if let Ok(Ok(())) = tokio::time::timeout(READY_TIMEOUT, tx.ready()).await {
                return Ok(H1Conn { tx, reused: true });
            }
        }
        self.checkout_fresh_h1(dst, tls, connect_timeout).await
    }

    /// A new HTTP/1 connection to `dst`.
    pub async fn checkout_fresh_h1(
        &self,
        dst: SocketAddr,
        tls: Option<&ClientTls>,
        connect_timeout: Duration,
    ) -> Result<H1Conn<B>, ProxyError> {
        let io = connect(dst, connect_timeout, tls).await?;
        let (tx, conn) = http1::Builder::new()
            .max_buf_size(super::server::MAX_BUF_BYTES)
            .handshake(TokioIo::new(io))
            .await
            .map_err(|source| ProxyError::Handshake { dst, source })?;
        tokio::spawn(async move {
            if let Err(error) = conn.with_upgrades().await {
                tracing::debug!(%error, "upstream HTTP/1 connection failed");
            }
        });
        Ok(H1Conn { tx, reused: false })
    }

    /// The shared HTTP/2 connection to `dst` (opened if there is none) and whether it
    /// was already open.
    pub async fn checkout_h2(
        &self,
        dst: SocketAddr,
        tls: Option<&ClientTls>,
        connect_timeout: Duration,
    ) -> Result<(http2::SendRequest<B>, bool), ProxyError> {
        let k = key(dst, tls);
        let slot = {
            let mut h2 = lock(&self.inner.h2);
            if !h2.contains_key(&k) && h2.len() >= MAX_DSTS {
                h2.retain(|_, slot| {
                    slot.try_lock()
                        .map_or(true, |tx| tx.as_ref().is_some_and(|tx| !tx.is_closed()))
                });
            }
            match h2.get(&k) {
                Some(slot) => slot.clone(),
                None => {
                    let slot = Arc::new(tokio::sync::Mutex::new(None));
                    if h2.len() < MAX_DSTS {
                        h2.insert(k, slot.clone());
                    }
                    slot
                }
            }
        };
        // Concurrent first requests wait for one connect instead of each opening a
        // connection of their own.
        let mut slot = slot.lock().await;
        if let Some(tx) = slot.as_ref() {
            if !tx.is_closed() {
                return Ok((tx.clone(), true));
            }
        }
        let io = connect(dst, connect_timeout, tls).await?;
        let (tx, conn) = http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .handshake(TokioIo::new(io))
            .await
            .map_err(|source| ProxyError::Handshake { dst, source })?;
        tokio::spawn(async move {
            if let Err(error) = conn.await {
                tracing::debug!(%error, "upstream HTTP/2 connection failed");
            }
        });
        *slot = Some(tx.clone());
        Ok((tx, false))
    }

    /// Idle plaintext HTTP/1 connections to `dst`.
    pub fn idle_h1(&self, dst: SocketAddr) -> usize {
        lock(&self.inner.h1).get(&(dst, None)).map_or(0, Vec::len)
    }

    fn pop_h1(&self, k: Key) -> Option<http1::SendRequest<B>> {
        let mut h1 = lock(&self.inner.h1);
        let idle = h1.get_mut(&k)?;
        let now = Instant::now();
        // Newest first: the most recently used connection is the least likely to
        // have been closed by the server's own idle timeout.
        let found = loop {
            match idle.pop() {
                None => break None,
                Some((at, tx)) if now.duration_since(at) < IDLE_TIMEOUT && !tx.is_closed() => {
                    break Some(tx)
                }
                Some(_) => {}
            }
        };
        if idle.is_empty() {
            h1.remove(&k);
        }
        found
    }
}

impl<B> Pool<B> {
    fn checkin_h1(&self, k: Key, tx: http1::SendRequest<B>) {
        if tx.is_closed() {
            return;
        }
        let mut h1 = lock(&self.inner.h1);
        let now = Instant::now();
        if !h1.contains_key(&k) && h1.len() >= MAX_DSTS {
            h1.retain(|_, idle| {
                idle.retain(|(at, tx)| now.duration_since(*at) < IDLE_TIMEOUT && !tx.is_closed());
                !idle.is_empty()
            });
            if h1.len() >= MAX_DSTS {
                return;
            }
        }
        let idle = h1.entry(k).or_default();
        if idle.len() < MAX_IDLE_PER_DST {
            idle.push((now, tx));
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding the lock leaves a consistent map (every edit is one call).
    m.lock().unwrap_or_else(|p| p.into_inner())
}

// === impl PooledBody ===

impl<B> PooledBody<B> {
    /// Wraps `inner`; `checkin` is the HTTP/1 connection to return at the end.
    pub fn new(inner: Incoming, checkin: Option<Checkin<B>>) -> Self {
        Self { inner, checkin }
    }

    fn finish(&mut self) {
        if let Some(c) = self.checkin.take() {
            c.pool.checkin_h1(c.key, c.tx);
        }
    }
}

impl<B> Checkin<B> {
    /// Returns `tx` to `pool` for `dst` (plaintext) when the body ends.
    pub fn new(pool: Pool<B>, dst: SocketAddr, tx: http1::SendRequest<B>) -> Self {
        Self::with_tls(pool, dst, None, tx)
    }

    /// Returns `tx` to `pool` for `dst` with mesh TLS settings `tls`.
    pub fn with_tls(
        pool: Pool<B>,
        dst: SocketAddr,
        tls: Option<&ClientTls>,
        tx: http1::SendRequest<B>,
    ) -> Self {
        Self {
            pool,
            key: key(dst, tls),
            tx,
        }
    }
}

impl<B> HttpBody for PooledBody<B> {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let res = Pin::new(&mut self.inner).poll_frame(cx);
        match &res {
            Poll::Ready(None) => self.finish(),
            Poll::Ready(Some(Ok(_))) if self.inner.is_end_stream() => self.finish(),
            Poll::Ready(Some(Err(_))) => self.checkin = None,
            _ => {}
        }
        res
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl<B> Drop for PooledBody<B> {
    fn drop(&mut self) {
        // Bodies known to be empty (HEAD, 204, 304) are never polled by the server.
        if self.inner.is_end_stream() {
            self.finish();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use http_body_util::{BodyExt, Empty};

    use super::*;

    /// An HTTP/1 server answering `ok`, counting its connections.
    async fn server() -> (SocketAddr, Arc<AtomicUsize>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let conns = Arc::new(AtomicUsize::new(0));
        let c = conns.clone();
        tokio::spawn(async move {
            while let Ok((s, _)) = listener.accept().await {
                c.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(hyper::server::conn::http1::Builder::new().serve_connection(
                    TokioIo::new(s),
                    hyper::service::service_fn(|_req| async {
                        Ok::<_, std::convert::Infallible>(http::Response::new(
                            http_body_util::Full::new(Bytes::from_static(b"ok")),
                        ))
                    }),
                ));
            }
        });
        (addr, conns)
    }

    async fn request(pool: &Pool<Empty<Bytes>>, dst: SocketAddr) -> bool {
        let mut conn = pool
            .checkout_h1(dst, None, Duration::from_secs(5))
            .await
            .unwrap();
        let rsp = conn
            .tx
            .send_request(http::Request::get("/").body(Empty::new()).unwrap())
            .await
            .unwrap();
        let body = PooledBody::new(
            rsp.into_body(),
            Some(Checkin::new(pool.clone(), dst, conn.tx)),
        );
        assert_eq!(body.collect().await.unwrap().to_bytes(), "ok");
        conn.reused
    }

    #[tokio::test]
    async fn h1_connections_are_reused() {
        let (dst, conns) = server().await;
        let pool = Pool::new();
        assert!(!request(&pool, dst).await, "first request connects");
        assert_eq!(pool.idle_h1(dst), 1, "checked in after the body ended");
        for _ in 0..5 {
            assert!(request(&pool, dst).await, "later requests reuse");
        }
        assert_eq!(conns.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn idle_list_is_bounded() {
        let (dst, _) = server().await;
        let pool: Pool<Empty<Bytes>> = Pool::new();
        let mut open = Vec::new();
        for _ in 0..MAX_IDLE_PER_DST + 4 {
            open.push(
                pool.checkout_fresh_h1(dst, None, Duration::from_secs(5))
                    .await
                    .unwrap(),
            );
        }
        for mut conn in open {
            let rsp = conn
                .tx
                .send_request(http::Request::get("/").body(Empty::new()).unwrap())
                .await
                .unwrap();
            let body = PooledBody::new(
                rsp.into_body(),
                Some(Checkin::new(pool.clone(), dst, conn.tx)),
            );
            body.collect().await.unwrap();
        }
        assert_eq!(pool.idle_h1(dst), MAX_IDLE_PER_DST);
    }

    #[tokio::test]
    async fn refused_connect_is_a_connect_error() {
        let dst = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap()
        };
        let pool: Pool<Empty<Bytes>> = Pool::new();
        match pool.checkout_h1(dst, None, Duration::from_secs(5)).await {
            Err(ProxyError::Connect { dst: d, .. }) => assert_eq!(d, dst),
            Err(e) => panic!("unexpected error {e}"),
            Ok(_) => panic!("connect to a closed port succeeded"),
        }
    }
}
