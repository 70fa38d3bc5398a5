//! Body plumbing: bodies stream frame by frame; nothing here buffers a whole body.
//!
//! - [`ProxyBody`]: the one boxed body type used on both sides of the proxy.
//! - [`LimitedBody`]: enforces a route's body limit while streaming (→ 413) and records in a
//!   [`BodyState`] how the client's body went, so a broken exchange is blamed on the right side.
//! - [`ReplayableBody`]: lets a request whose body was never polled be sent again to another
//!   endpoint after a connect failure.
//! - [`ObservedBody`]: counts bytes and runs a completion hook (access log, metrics) when the
//!   response body ends or is dropped.

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use http_body_util::combinators::UnsyncBoxBody;

/// Any error a body can fail with.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The streaming body type used everywhere on the request path.
pub type ProxyBody = UnsyncBoxBody<Bytes, BoxError>;

/// A complete in-memory body (error pages, admin answers).
pub fn full(data: impl Into<Bytes>) -> ProxyBody {
    http_body_util::Full::new(data.into())
        .map_err(|never| match never {})
        .boxed_unsync()
}

/// An empty body.
pub fn empty() -> ProxyBody {
    http_body_util::Empty::new()
        .map_err(|never| match never {})
        .boxed_unsync()
}

/// Boxes any body with a convertible error.
pub fn boxed<B>(body: B) -> ProxyBody
where
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    body.map_err(Into::into).boxed_unsync()
}

/// The error a [`LimitedBody`] fails with; detected to answer 413.
#[derive(Debug, thiserror::Error)]
#[error("request body exceeds the limit of {0} bytes")]
pub struct BodyTooLarge(pub u64);

/// How a client's request body went on its way to the origin. When the exchange with the origin
/// breaks or times out, this tells the client's fault (a malformed or cut-short body, one over
/// the limit, one still arriving) from the origin's: only the origin's count against its health.
#[derive(Debug, Default)]
pub struct BodyState {
    too_large: AtomicBool,
    failed: AtomicBool,
    ended: AtomicBool,
    /// The last read found no data from the client yet (as opposed to the origin side not
    /// taking more: then hyper does not ask).
    awaiting_client: AtomicBool,
}

impl BodyState {
    /// The body went over the route's limit.
    pub fn too_large(&self) -> bool {
        self.too_large.load(Ordering::Relaxed)
    }

    /// Reading the body from the client failed: bad chunked framing, or the client left or
    /// stopped before its declared length.
    pub fn failed(&self) -> bool {
        self.failed.load(Ordering::Relaxed)
    }

    /// The whole body was read from the client.
    pub fn ended(&self) -> bool {
        self.ended.load(Ordering::Relaxed)
    }

    /// Whether a broken exchange is the client's doing.
    pub fn client_broke_it(&self) -> bool {
        self.too_large() || self.failed()
    }

    /// Whether an exchange that ran out of time was waiting for the client's body: not all of
    /// it arrived, and the forwarding was waiting on the client, not on the origin to read on.
    pub fn client_is_late(&self) -> bool {
        !self.ended() && self.awaiting_client.load(Ordering::Relaxed)
    }
}

pin_project_lite::pin_project! {
    /// Streams the inner body and fails once more than `limit` bytes went through.
    pub struct LimitedBody<B> {
        #[pin]
        inner: B,
        remaining: u64,
        limit: u64,
        state: Arc<BodyState>,
    }
}

impl<B> LimitedBody<B> {
    /// Wraps `inner`; `state` records how it goes, for the caller to see after the origin call
    /// failed.
    pub fn new(inner: B, limit: u64, state: Arc<BodyState>) -> Self {
        LimitedBody {
            inner,
            remaining: limit,
            limit,
            state,
        }
    }
}

impl<B> Body for LimitedBody<B>
where
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let mut this = self.project();
        let polled = this.inner.as_mut().poll_frame(cx);
        this.state
            .awaiting_client
            .store(polled.is_pending(), Ordering::Relaxed);
        match polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    let n = data.len() as u64;
                    if n > *this.remaining {
                        this.state.too_large.store(true, Ordering::Relaxed);
                        return Poll::Ready(Some(Err(Box::new(BodyTooLarge(*this.limit)))));
                    }
                    *this.remaining -= n;
                }
                // hyper stops polling a body that says it is at its end.
                if this.inner.is_end_stream() {
                    this.state.ended.store(true, Ordering::Relaxed);
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => {
                this.state.failed.store(true, Ordering::Relaxed);
                Poll::Ready(Some(Err(e.into())))
            }
            Poll::Ready(None) => {
                this.state.ended.store(true, Ordering::Relaxed);
                Poll::Ready(None)
            }
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Shared slot behind a [`ReplayableBody`].
struct Slot {
    body: Mutex<Option<ProxyBody>>,
    polled: AtomicBool,
}

/// A body that can be handed to a second attempt as long as the first never polled it.
///
/// A connect failure means not one byte of the request left the node, so the untouched body
/// can go to the next endpoint: this is what makes failover possible for uploads too.
pub struct ReplayableBody {
    slot: Arc<Slot>,
}

impl ReplayableBody {
    /// Wraps a body for a possible second attempt.
    pub fn new(body: ProxyBody) -> Self {
        ReplayableBody {
            slot: Arc::new(Slot {
                body: Mutex::new(Some(body)),
                polled: AtomicBool::new(false),
            }),
        }
    }

    /// A handle for one attempt; all handles share the same underlying body.
    pub fn attempt(&self) -> ProxyBody {
        ReplayableBody {
            slot: self.slot.clone(),
        }
        .boxed_unsync()
    }

    /// Whether a new attempt would see the whole body.
    pub fn is_untouched(&self) -> bool {
        !self.slot.polled.load(Ordering::Acquire)
    }
}

impl Body for ReplayableBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        self.slot.polled.store(true, Ordering::Release);
        let mut guard = match self.slot.body.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        };
        match guard.as_mut() {
            Some(body) => Pin::new(body).poll_frame(cx),
            None => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self.slot.body.lock() {
            Ok(g) => g.as_ref().is_none_or(|b| b.is_end_stream()),
            Err(_) => true,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self.slot.body.lock() {
            Ok(g) => g.as_ref().map(|b| b.size_hint()).unwrap_or_default(),
            Err(_) => SizeHint::default(),
        }
    }
}

/// Called once when an observed body finishes: bytes sent, and whether it ended early.
pub type OnEnd = Box<dyn FnOnce(u64, bool) + Send>;

pin_project_lite::pin_project! {
    /// Counts data bytes and calls `on_end` exactly once: at end of stream, on error, or when
    /// dropped early (client went away).
    pub struct ObservedBody<B>
    where
        B: Body,
    {
        #[pin]
        inner: B,
        bytes: u64,
        on_end: Option<OnEnd>,
    }

    impl<B> PinnedDrop for ObservedBody<B>
    where
        B: Body,
    {
        fn drop(this: Pin<&mut Self>) {
            let this = this.project();
            if let Some(f) = this.on_end.take() {
                // hyper stops polling once a body reports its end (Content-Length reached, or
                // an empty body): that is a complete response, not an abort.
                let complete = this.inner.as_ref().get_ref().is_end_stream();
                f(*this.bytes, !complete);
            }
        }
    }
}

impl<B: Body> ObservedBody<B> {
    /// Wraps `inner`; `on_end` runs when it finishes.
    pub fn new(inner: B, on_end: OnEnd) -> Self {
        ObservedBody {
            inner,
            bytes: 0,
            on_end: Some(on_end),
        }
    }
}

impl<B> Body for ObservedBody<B>
where
    B: Body<Data = Bytes, Error = BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.project();
        let res = this.inner.poll_frame(cx);
        match &res {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(d) = frame.data_ref() {
                    *this.bytes += d.len() as u64;
                }
            }
            Poll::Ready(None) => {
                if let Some(f) = this.on_end.take() {
                    f(*this.bytes, false);
                }
            }
            Poll::Ready(Some(Err(_))) => {
                if let Some(f) = this.on_end.take() {
                    f(*this.bytes, true);
                }
            }
            Poll::Pending => {}
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU64;

    #[tokio::test]
    async fn limited_body_fails_past_the_limit_and_flags_it() {
        let state = Arc::new(BodyState::default());
        let body = LimitedBody::new(full(vec![0u8; 10]), 9, state.clone());
        assert!(body.collect().await.is_err());
        assert!(state.too_large() && state.client_broke_it() && !state.ended());

        let state = Arc::new(BodyState::default());
        let body = LimitedBody::new(full(vec![0u8; 10]), 10, state.clone());
        let got = body.collect().await.expect("within limit").to_bytes();
        assert_eq!(got.len(), 10);
        assert!(!state.too_large() && !state.client_broke_it() && state.ended());
    }

    /// A client body that fails (bad chunking, client gone) or stalls is the client's fault;
    /// one the origin side stops reading is not.
    #[tokio::test]
    async fn body_state_tells_the_clients_fault_from_the_origins() {
        /// A client body that answers the given polls in turn.
        type Step = Poll<Option<Result<Frame<Bytes>, BoxError>>>;
        struct Scripted(std::collections::VecDeque<Step>);
        impl Body for Scripted {
            type Data = Bytes;
            type Error = BoxError;
            fn poll_frame(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Step {
                self.0.pop_front().unwrap_or(Poll::Ready(None))
            }
        }
        let script = Scripted(
            [
                Poll::Pending,
                Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(b"abc"))))),
                Poll::Ready(Some(Err("invalid chunk size".into()))),
            ]
            .into(),
        );
        let state = Arc::new(BodyState::default());
        let mut body = std::pin::pin!(LimitedBody::new(script, 100, state.clone()));
        let mut cx = Context::from_waker(std::task::Waker::noop());
        // Nothing from the client yet: waiting on the client.
        assert!(body.as_mut().poll_frame(&mut cx).is_pending());
        assert!(state.client_is_late() && !state.client_broke_it());
        // A chunk arrived and was handed on: now waiting on whoever reads it.
        assert!(matches!(
            body.as_mut().poll_frame(&mut cx),
            Poll::Ready(Some(Ok(_)))
        ));
        assert!(!state.client_is_late());
        // The client's stream fails.
        assert!(matches!(
            body.as_mut().poll_frame(&mut cx),
            Poll::Ready(Some(Err(_)))
        ));
        assert!(state.failed() && state.client_broke_it() && !state.ended());
    }

    #[tokio::test]
    async fn replayable_body_survives_an_unpolled_attempt() {
        let r = ReplayableBody::new(full("hello"));
        drop(r.attempt());
        assert!(r.is_untouched());
        let got = r.attempt().collect().await.expect("body").to_bytes();
        assert_eq!(&got[..], b"hello");
        assert!(!r.is_untouched());
    }

    #[tokio::test]
    async fn observed_body_reports_once_with_bytes() {
        let seen = Arc::new(AtomicU64::new(u64::MAX));
        let s = seen.clone();
        let body = ObservedBody::new(
            full("12345"),
            Box::new(move |n, aborted| {
                assert!(!aborted);
                s.store(n, Ordering::SeqCst);
            }),
        );
        body.collect().await.expect("body");
        assert_eq!(seen.load(Ordering::SeqCst), 5);

        let seen = Arc::new(AtomicBool::new(false));
        let s = seen.clone();
        drop(ObservedBody::new(
            full("x"),
            Box::new(move |_, aborted| s.store(aborted, Ordering::SeqCst)),
        ));
        assert!(
            seen.load(Ordering::SeqCst),
            "dropped early counts as aborted"
        );

        let seen = Arc::new(AtomicBool::new(true));
        let s = seen.clone();
        drop(ObservedBody::new(
            empty(),
            Box::new(move |_, aborted| s.store(aborted, Ordering::SeqCst)),
        ));
        assert!(!seen.load(Ordering::SeqCst), "an empty body is complete");
    }
}
