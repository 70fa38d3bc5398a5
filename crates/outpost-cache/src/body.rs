//! Bodies: the boxed streaming type shared with the proxy, and [`StoringBody`], which streams
//! an origin body to the client while keeping a copy to store when it ends.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use http_body::{Frame, SizeHint};
use http_body_util::BodyExt as _;
use http_body_util::combinators::UnsyncBoxBody;

use crate::object::Object;

/// Any error a body can fail with.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The streaming body type on both sides of the cache (the proxy's `ProxyBody`).
pub type Body = UnsyncBoxBody<Bytes, BoxError>;

/// A complete in-memory body.
pub fn full(data: Bytes) -> Body {
    http_body_util::Full::new(data)
        .map_err(|never| match never {})
        .boxed_unsync()
}

/// An empty body.
pub fn empty() -> Body {
    http_body_util::Empty::new()
        .map_err(|never| match never {})
        .boxed_unsync()
}

/// Called with the finished object when the whole body went through within the size limit.
pub type OnComplete = Box<dyn FnOnce(Object) + Send>;

/// Runs once when the copy is stored (`true`) or given up (`false`).
pub type OnDone = Box<dyn FnOnce(bool) + Send>;

/// Streams `inner` unchanged and, if it ends cleanly within `limit` bytes, hands the object
/// (with the collected body) to `on_complete`. Going over the limit or an error gives the copy
/// up; either way `on_done` runs, which releases coalesced waiters. Dropped early (the client
/// left), it drops `on_done` unrun: waiters then take the fetch over.
pub struct StoringBody {
    inner: Body,
    pending: Option<(Object, OnComplete)>,
    chunks: Vec<Bytes>,
    collected: usize,
    limit: usize,
    on_done: Option<OnDone>,
}

impl StoringBody {
    /// Wraps `inner`; `object` has everything but the body. A body already at its end (a 204,
    /// an empty 200) is stored at once: hyper never polls such a body, so the end would never
    /// be seen.
    pub fn new(
        inner: Body,
        object: Object,
        limit: u64,
        on_complete: OnComplete,
        on_done: OnDone,
    ) -> StoringBody {
        let mut body = StoringBody {
            inner,
            pending: Some((object, on_complete)),
            chunks: Vec::new(),
            collected: 0,
            limit: usize::try_from(limit).unwrap_or(usize::MAX),
            on_done: Some(on_done),
        };
        if http_body::Body::is_end_stream(&body.inner) {
            body.finish();
        }
        body
    }

    fn finish(&mut self) {
        if let Some((mut object, complete)) = self.pending.take() {
            let body = match self.chunks.len() {
                0 => Bytes::new(),
                1 => self.chunks.pop().unwrap_or_default(),
                _ => {
                    let mut b = BytesMut::with_capacity(self.collected);
                    for c in self.chunks.drain(..) {
                        b.extend_from_slice(&c);
                    }
                    b.freeze()
                }
            };
            object.body = body;
            complete(object);
            self.release(true);
        } else {
            self.release(false);
        }
    }

    fn abandon(&mut self) {
        self.pending = None;
        self.chunks = Vec::new();
        self.release(false);
    }

    fn release(&mut self, stored: bool) {
        if let Some(done) = self.on_done.take() {
            done(stored);
        }
    }
}

impl http_body::Body for StoringBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref()
                    && this.pending.is_some()
                {
                    this.collected += data.len();
                    if this.collected > this.limit {
                        // Too large after all (no Content-Length up front): stream it uncached.
                        this.abandon();
                    } else {
                        this.chunks.push(data.clone());
                    }
                }
                if this.inner.is_end_stream() {
                    this.finish();
                }
            }
            Poll::Ready(Some(Err(_))) => this.abandon(),
            Poll::Ready(None) => this.finish(),
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Reads a body to its end, discarding the data (background refreshes store as they read).
pub async fn drain(mut body: Body) {
    while let Some(frame) = body.frame().await {
        if frame.is_err() {
            break;
        }
    }
}
