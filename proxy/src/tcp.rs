//! Opaque TCP: splice bytes both ways.
//!
//! Half-close is preserved: when one side finishes writing, the other side's write
//! half is shut down and the opposite direction keeps flowing, so a client that
//! sends a request and then `shutdown(SHUT_WR)` still gets its response.

use std::{
    io,
    pin::Pin,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    task::{Context, Poll},
    time::Duration,
};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::{
    errors::ProxyError,
    io::Reset,
    target::{BoxError, BoxFuture, Target},
    tls::connect::connect,
};

/// Splice buffer per direction: small, since a sidecar holds many idle connections.
pub const BUF_SIZE: usize = 8 * 1024;

/// How a splice ended.
#[derive(Debug, PartialEq, Eq)]
pub enum SpliceEnd {
    /// Both sides closed; bytes client->server and server->client.
    Closed(u64, u64),
    /// Nothing moved for the idle timeout.
    Idle,
}

/// Copies between `client` and `server` until both directions end or nothing moves
/// for `idle` (the check runs every `idle`, so an idle connection is closed between
/// one and two `idle` periods after its last byte).
pub async fn splice<A, B>(
    client: &mut A,
    server: &mut B,
    idle: Option<Duration>,
) -> io::Result<SpliceEnd>
where
    A: AsyncRead + AsyncWrite + Unpin + ?Sized,
    B: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    let Some(idle) = idle else {
        let (a, b) =
            tokio::io::copy_bidirectional_with_sizes(client, server, BUF_SIZE, BUF_SIZE).await?;
        return Ok(SpliceEnd::Closed(a, b));
    };
    let ops = Arc::new(AtomicU64::new(0));
    let mut client = Touch {
        io: client,
        ops: ops.clone(),
    };
    let copy = tokio::io::copy_bidirectional_with_sizes(&mut client, server, BUF_SIZE, BUF_SIZE);
    tokio::pin!(copy);
    let mut seen = ops.load(Ordering::Relaxed);
    loop {
        tokio::select! {
            res = &mut copy => {
                let (a, b) = res?;
                return Ok(SpliceEnd::Closed(a, b));
            }
            _ = tokio::time::sleep(idle) => {
                let now = ops.load(Ordering::Relaxed);
                if now == seen {
                    return Ok(SpliceEnd::Idle);
                }
                seen = now;
            }
        }
    }
}

/// The opaque TCP service: connects to the original destination and splices.
#[derive(Clone, Copy, Debug, Default)]
pub struct ForwardTcp;

impl<I> tower::Service<(Target, I)> for ForwardTcp
where
    I: AsyncRead + AsyncWrite + Reset + Unpin + Send + 'static,
{
    type Response = ();
    type Error = BoxError;
    type Future = BoxFuture<Result<(), BoxError>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, (target, mut io): (Target, I)) -> Self::Future {
        Box::pin(async move {
            let tls = target.tls.client();
            let mut upstream = match connect(target.dst, target.mesh.connect_timeout(), tls).await {
                Ok(s) => s,
                Err(e) => {
                    if matches!(e, ProxyError::ConnectTimeout { .. }) {
                        target.timeout("connect");
                    }
                    io.reset();
                    return Err(e.into());
                }
            };
            if let SpliceEnd::Idle =
                splice(&mut io, &mut upstream, target.mesh.idle_timeout()).await?
            {
                target.timeout("idle");
            }
            Ok(())
        })
    }
}

/// Notes every read or write on the client side; both directions pass through it.
struct Touch<'a, T: ?Sized> {
    io: &'a mut T,
    ops: Arc<AtomicU64>,
}

impl<T: AsyncRead + Unpin + ?Sized> AsyncRead for Touch<'_, T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let res = Pin::new(&mut *self.io).poll_read(cx, buf);
        if res.is_ready() {
            self.ops.fetch_add(1, Ordering::Relaxed);
        }
        res
    }
}

impl<T: AsyncWrite + Unpin + ?Sized> AsyncWrite for Touch<'_, T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let res = Pin::new(&mut *self.io).poll_write(cx, buf);
        if res.is_ready() {
            self.ops.fetch_add(1, Ordering::Relaxed);
        }
        res
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn half_close_keeps_the_other_direction() {
        let (mut app, mut client_side) = tokio::io::duplex(1024);
        let (mut server_side, mut upstream) = tokio::io::duplex(1024);
        let task = tokio::spawn(async move {
            splice(
                &mut client_side,
                &mut server_side,
                Some(Duration::from_secs(5)),
            )
            .await
        });
        app.write_all(b"request").await.unwrap();
        app.shutdown().await.unwrap();
        let mut req = Vec::new();
        upstream.read_to_end(&mut req).await.unwrap();
        assert_eq!(req, b"request", "server sees EOF after the request");
        upstream.write_all(b"response").await.unwrap();
        upstream.shutdown().await.unwrap();
        let mut rsp = Vec::new();
        app.read_to_end(&mut rsp).await.unwrap();
        assert_eq!(rsp, b"response");
        assert_eq!(task.await.unwrap().unwrap(), SpliceEnd::Closed(7, 8));
    }

    #[tokio::test]
    async fn idle_connection_is_closed() {
        let (_app, mut client_side) = tokio::io::duplex(1024);
        let (mut server_side, _upstream) = tokio::io::duplex(1024);
        let start = std::time::Instant::now();
        let end = splice(
            &mut client_side,
            &mut server_side,
            Some(Duration::from_millis(30)),
        )
        .await
        .unwrap();
        assert_eq!(end, SpliceEnd::Idle);
        assert!(start.elapsed() < Duration::from_secs(2));
    }
}
