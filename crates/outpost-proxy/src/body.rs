//! Body plumbing: bodies stream frame by frame; nothing here buffers a whole body.
//!
//! - [`ProxyBody`]: the one boxed body type used on both sides of the proxy.
//! - [`LimitedBody`]: enforces a route's body limit while streaming (→ 413).
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

pin_project_lite::pin_project! {
    /// Streams the inner body and fails once more than `limit` bytes went through.
    pub struct LimitedBody<B> {
        #[pin]
        inner: B,
        remaining: u64,
        limit: u64,
        exceeded: Arc<AtomicBool>,
    }
}

impl<B> LimitedBody<B> {
    /// Wraps `inner`; `exceeded` is set when the limit trips, for the caller to see after the
    /// origin call failed.
    pub fn new(inner: B, limit: u64, exceeded: Arc<AtomicBool>) -> Self {
        LimitedBody {
            inner,
            remaining: limit,
            limit,
            exceeded,
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
        let this = self.project();
        match this.inner.poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    let n = data.len() as u64;
                    if n > *this.remaining {
                        this.exceeded.store(true, Ordering::Relaxed);
                        return Poll::Ready(Some(Err(Box::new(BodyTooLarge(*this.limit)))));
                    }
                    *this.remaining -= n;
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(e.into()))),
            Poll::Ready(None) => Poll::Ready(None),
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
        let flag = Arc::new(AtomicBool::new(false));
        let body = LimitedBody::new(full(vec![0u8; 10]), 9, flag.clone());
        assert!(body.collect().await.is_err());
        assert!(flag.load(Ordering::Relaxed));

        let flag = Arc::new(AtomicBool::new(false));
        let body = LimitedBody::new(full(vec![0u8; 10]), 10, flag.clone());
        let got = body.collect().await.expect("within limit").to_bytes();
        assert_eq!(got.len(), 10);
        assert!(!flag.load(Ordering::Relaxed));
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
