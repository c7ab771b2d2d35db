//! A request body that can be sent more than once, within a bounded buffer.
//!
//! The first attempt streams the client's body through, recording each chunk while the
//! total stays within the limit. A retry's copy replays the recorded chunks, then (if
//! the client is still sending) continues with the client's body where the previous
//! copy left it. Once the body outgrows the limit the recording is dropped and the body
//! keeps streaming to the attempt in flight, untouched and unbuffered, but no later
//! copy can be made: the request is no longer retryable. Only one copy reads the
//! client's body at a time; the retry layer starts the next attempt only when
//! [`ReplayBody::can_replay`] says the previous copy gave it back (or it ended).

use std::{
    pin::Pin,
    sync::{Arc, Mutex, MutexGuard},
    task::{Context, Poll},
};

use bytes::{Buf, Bytes};
use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};

use crate::target::BoxError;

/// Bytes of a request body kept for retries by default.
pub const DEFAULT_LIMIT: usize = 64 * 1024;

/// One copy of a request body (see the module docs).
pub struct ReplayBody<B> {
    /// `None`: a plain pass-through, never replayed.
    shared: Option<Arc<Shared<B>>>,
    /// The client's body while this copy reads it.
    rest: Option<B>,
    /// Recorded chunks this copy has sent.
    replayed: usize,
    /// Whether this copy has sent the trailers.
    trailers_sent: bool,
}

struct Shared<B> {
    state: Mutex<State<B>>,
    limit: usize,
}

struct State<B> {
    /// The client's body when no copy reads it.
    rest: Option<B>,
    /// Every chunk read so far (empty once `overflow`).
    chunks: Vec<Bytes>,
    len: usize,
    trailers: Option<HeaderMap>,
    /// The client's body ended (everything is in `chunks`, unless `overflow`).
    ended: bool,
    /// The body outgrew the limit: no replay.
    overflow: bool,
}

// === impl ReplayBody ===

impl<B> ReplayBody<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    /// A body whose first `limit` bytes are kept for copies.
    pub fn new(body: B, limit: usize) -> Self {
        let ended = body.is_end_stream();
        Self {
            shared: Some(Arc::new(Shared {
                state: Mutex::new(State {
                    rest: (!ended).then_some(body),
                    chunks: Vec::new(),
                    len: 0,
                    trailers: None,
                    ended,
                    overflow: false,
                }),
                limit,
            })),
            rest: None,
            replayed: 0,
            trailers_sent: false,
        }
    }

    /// A body that is sent once, with no bookkeeping.
    pub fn passthrough(body: B) -> Self {
        Self {
            shared: None,
            rest: Some(body),
            replayed: 0,
            trailers_sent: false,
        }
    }

    /// Whether a new copy can send the whole body again: nothing was dropped for the
    /// limit, and no other copy is reading the client's body right now.
    pub fn can_replay(&self) -> bool {
        self.shared.as_ref().is_some_and(|s| {
            let st = s.lock();
            !st.overflow && (st.ended || st.rest.is_some())
        })
    }

    /// Whether the client's whole body has been read and kept.
    pub fn is_complete(&self) -> bool {
        self.shared.as_ref().is_some_and(|s| {
            let st = s.lock();
            !st.overflow && st.ended
        })
    }

    /// A new copy that starts from the beginning; `None` for a pass-through body.
    pub fn replay(&self) -> Option<Self> {
        Some(Self {
            shared: Some(self.shared.clone()?),
            rest: None,
            replayed: 0,
            trailers_sent: false,
        })
    }
}

impl<B> Shared<B> {
    fn lock(&self) -> MutexGuard<'_, State<B>> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl<B> Body for ReplayBody<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        let Some(shared) = this.shared.clone() else {
            return match this.rest.as_mut() {
                Some(b) => Pin::new(b).poll_frame(cx).map_err(Into::into),
                None => Poll::Ready(None),
            };
        };
        {
            let mut st = shared.lock();
            if !st.overflow && this.replayed < st.chunks.len() {
                let c = st.chunks[this.replayed].clone();
                this.replayed += 1;
                return Poll::Ready(Some(Ok(Frame::data(c))));
            }
            if st.ended {
                if !this.trailers_sent {
                    this.trailers_sent = true;
                    if let Some(t) = st.trailers.clone() {
                        return Poll::Ready(Some(Ok(Frame::trailers(t))));
                    }
                }
                return Poll::Ready(None);
            }
            if this.rest.is_none() {
                this.rest = st.rest.take();
            }
        }
        let Some(rest) = this.rest.as_mut() else {
            // The retry layer never starts a copy while another reads the body.
            return Poll::Ready(Some(Err(
                "request body is being sent by another attempt".into()
            )));
        };
        let frame = match Pin::new(rest).poll_frame(cx) {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(f) => f,
        };
        let mut st = shared.lock();
        match frame {
            None => {
                st.ended = true;
                this.rest = None;
                this.trailers_sent = true;
                Poll::Ready(None)
            }
            Some(Err(e)) => {
                // A broken client body must never be replayed as if complete.
                st.overflow = true;
                st.chunks = Vec::new();
                Poll::Ready(Some(Err(e.into())))
            }
            Some(Ok(frame)) => {
                if !st.overflow {
                    if let Some(data) = frame.data_ref() {
                        if st.len + data.remaining() > shared.limit {
                            st.overflow = true;
                            st.chunks = Vec::new();
                        } else {
                            st.len += data.remaining();
                            st.chunks.push(data.clone());
                            this.replayed = st.chunks.len();
                        }
                    } else if let Some(t) = frame.trailers_ref() {
                        st.trailers = Some(t.clone());
                        this.trailers_sent = true;
                    }
                }
                if this.rest.as_ref().is_some_and(|r| r.is_end_stream()) {
                    st.ended = true;
                    this.rest = None;
                    this.trailers_sent |= frame.is_trailers();
                }
                Poll::Ready(Some(Ok(frame)))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        let Some(shared) = &self.shared else {
            return self.rest.as_ref().is_none_or(|b| b.is_end_stream());
        };
        let st = shared.lock();
        if st.ended {
            return (st.overflow || self.replayed >= st.chunks.len())
                && (self.trailers_sent || st.trailers.is_none());
        }
        false
    }

    fn size_hint(&self) -> SizeHint {
        let Some(shared) = &self.shared else {
            return self
                .rest
                .as_ref()
                .map_or(SizeHint::with_exact(0), |b| b.size_hint());
        };
        let st = shared.lock();
        let buffered: u64 = if st.overflow {
            0
        } else {
            st.chunks[self.replayed.min(st.chunks.len())..]
                .iter()
                .map(|c| c.len() as u64)
                .sum()
        };
        if st.ended {
            return SizeHint::with_exact(buffered);
        }
        let rest = self
            .rest
            .as_ref()
            .or(st.rest.as_ref())
            .map(|b| b.size_hint());
        match rest {
            Some(h) => {
                let mut out = SizeHint::new();
                out.set_lower(h.lower() + buffered);
                if let Some(u) = h.upper() {
                    out.set_upper(u + buffered);
                }
                out
            }
            None => SizeHint::new(),
        }
    }
}

impl<B> Drop for ReplayBody<B> {
    fn drop(&mut self) {
        // Hand the client's body back so the next copy can go on reading it.
        if let (Some(shared), Some(rest)) = (&self.shared, self.rest.take()) {
            shared.lock().rest = Some(rest);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::ChannelBody;
    use http_body_util::{BodyExt, Full};

    async fn collect<B>(b: ReplayBody<B>) -> (Bytes, Option<HeaderMap>)
    where
        B: Body<Data = Bytes> + Unpin,
        B::Error: Into<BoxError>,
    {
        let c = b.collect().await.expect("body");
        let t = c.trailers().cloned();
        (c.to_bytes(), t)
    }

    #[tokio::test]
    async fn small_body_replays_with_trailers() {
        let (tx, body) = ChannelBody::new();
        let first = ReplayBody::new(body, 16);
        assert!(!first.is_complete());
        let mut trailers = HeaderMap::new();
        trailers.insert("grpc-status", "0".parse().unwrap());
        tx.send(Frame::data(Bytes::from_static(b"hello ")))
            .await
            .unwrap();
        tx.send(Frame::data(Bytes::from_static(b"world")))
            .await
            .unwrap();
        tx.send(Frame::trailers(trailers.clone())).await.unwrap();
        drop(tx);
        let second = first.replay().unwrap();
        let (b, t) = collect(first).await;
        assert_eq!(&b[..], b"hello world");
        assert_eq!(t.as_ref(), Some(&trailers));
        assert!(second.can_replay() && second.is_complete());
        assert_eq!(second.size_hint().exact(), Some(11));
        let third = second.replay().unwrap();
        let (b, t) = collect(second).await;
        assert_eq!(&b[..], b"hello world");
        assert_eq!(
            t.as_ref(),
            Some(&trailers),
            "the copy sends the trailers too"
        );
        assert_eq!(collect(third).await.0, Bytes::from_static(b"hello world"));
    }

    #[tokio::test]
    async fn large_body_streams_once_and_is_not_replayable() {
        let (tx, body) = ChannelBody::new();
        let first = ReplayBody::new(body, 8);
        let spare = first.replay().unwrap();
        let sender = tokio::spawn(async move {
            for _ in 0..4 {
                tx.send(Frame::data(Bytes::from_static(b"0123456789")))
                    .await
                    .unwrap();
            }
        });
        let (b, _) = collect(first).await;
        sender.await.unwrap();
        assert_eq!(b.len(), 40, "the attempt in flight gets the whole body");
        assert!(!spare.can_replay(), "past the limit nothing is kept");
        assert!(!spare.is_complete());
    }

    #[tokio::test]
    async fn a_copy_continues_where_the_previous_stopped() {
        let (tx, body) = ChannelBody::new();
        let mut first = ReplayBody::new(body, 64);
        tx.send(Frame::data(Bytes::from_static(b"ab")))
            .await
            .unwrap();
        let f = first.frame().await.unwrap().unwrap();
        assert_eq!(f.into_data().unwrap(), Bytes::from_static(b"ab"));
        let second = first.replay().unwrap();
        assert!(!second.can_replay(), "the first copy still reads the body");
        drop(first);
        assert!(second.can_replay() && !second.is_complete());
        tx.send(Frame::data(Bytes::from_static(b"cd")))
            .await
            .unwrap();
        drop(tx);
        assert_eq!(collect(second).await.0, Bytes::from_static(b"abcd"));
    }

    #[tokio::test]
    async fn empty_bodies_end_at_once() {
        let b = ReplayBody::new(Full::new(Bytes::new()), 64);
        assert!(b.is_end_stream() && b.is_complete() && b.can_replay());
        assert!(b.replay().unwrap().is_end_stream());
        let p = ReplayBody::passthrough(Full::new(Bytes::from_static(b"x")));
        assert!(!p.can_replay() && p.replay().is_none());
        assert_eq!(collect(p).await.0, Bytes::from_static(b"x"));
    }
}
