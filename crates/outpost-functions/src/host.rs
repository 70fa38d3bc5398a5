//! What a guest can reach: its store's state, the `wasi:http` hooks that send its outgoing
//! requests to the node's origin stage, and the memory limiter.

use std::future::Future;
use std::sync::Arc;

use http_body::Body as _;
use http_body_util::BodyExt as _;
use wasmtime::ResourceLimiter;
use wasmtime::component::ResourceTable;
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};
use wasmtime_wasi_http::{
    Error as HttpErr, RequestOptions, WasiBody, WasiHttpCtx, WasiHttpCtxView, WasiHttpHooks,
    WasiHttpView,
};

use crate::{BoxError, Outbound, OutboundError};

/// Per deployed version and settings; shared by all its requests.
pub(crate) struct FnShared {
    /// `wasi:config` values.
    pub config: wasmtime_wasi_config::WasiConfigVariables,
    /// The node's store, behind `wasi:keyvalue`.
    pub store: outpost_state::Store,
    /// KV namespace of the function's bucket.
    pub kv_namespace: String,
}

/// The guest's memory ran past its limit; carried as the trap's error so that the outcome
/// is told apart from a guest's own panic.
#[derive(Debug)]
pub(crate) struct GuestOom {
    pub desired: usize,
}

impl std::fmt::Display for GuestOom {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "guest memory limit exceeded (wanted {} bytes)",
            self.desired
        )
    }
}

impl std::error::Error for GuestOom {}

/// Refuses growth past the function's limit with a trap that says why.
pub(crate) struct OomLimiter {
    pub max: usize,
    pub hit: bool,
}

impl ResourceLimiter for OomLimiter {
    fn memory_growing(
        &mut self,
        _current: usize,
        desired: usize,
        maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if desired > self.max || maximum.is_some_and(|m| desired > m) {
            self.hit = true;
            return Err(wasmtime::Error::new(GuestOom { desired }));
        }
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(desired <= 100_000 && maximum.is_none_or(|m| desired <= m))
    }
}

/// Routes a guest's outgoing requests: `http://<group>/…` to the node's origin stage when the
/// route allows the group, an error the guest sees for anything else.
pub(crate) struct OutpostHooks {
    pub outbound: Arc<dyn Outbound>,
}

type IoFuture = Box<dyn Future<Output = Result<(), HttpErr>> + Send>;

impl WasiHttpHooks for OutpostHooks {
    // The origin stage sets Host for the endpoint it picks.
    fn set_host_header(&mut self) -> bool {
        false
    }

    fn default_scheme(&mut self) -> Option<http::uri::Scheme> {
        Some(http::uri::Scheme::HTTP)
    }

    fn send_request(
        &mut self,
        request: http::Request<WasiBody>,
        _options: Option<RequestOptions>,
        _fut: IoFuture,
    ) -> Box<dyn Future<Output = Result<(http::Response<WasiBody>, IoFuture), HttpErr>> + Send>
    {
        let outbound = self.outbound.clone();
        Box::new(async move {
            let uri = request.uri();
            let group = match (uri.scheme_str(), uri.host()) {
                (Some("http"), Some(h)) if uri.port().is_none() && outbound.allows(h) => {
                    h.to_owned()
                }
                _ => return Err(HttpErr::HttpRequestDenied),
            };
            let declared = request
                .headers()
                .get(http::header::CONTENT_LENGTH)
                .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
            let req = request.map(|b| {
                FinishOnDrop {
                    inner: Some(b.map_err(|e| Box::new(e) as BoxError).boxed_unsync()),
                    declared,
                    sent: 0,
                    ended: false,
                }
                .boxed_unsync()
            });
            let resp = outbound.send(group, req).await.map_err(|e| match e {
                OutboundError::Denied => HttpErr::HttpRequestDenied,
                OutboundError::Unreachable(_) => HttpErr::ConnectionRefused,
                OutboundError::Timeout => HttpErr::HttpResponseTimeout,
                OutboundError::Other(s) => HttpErr::InternalError(Some(s)),
            })?;
            let resp = resp.map(|b| {
                b.map_err(|e| HttpErr::InternalError(Some(e.to_string())))
                    .boxed_unsync()
            });
            Ok((resp, Box::new(async { Ok(()) }) as IoFuture))
        })
    }
}

/// A guest's outgoing request body as the origin stage sees it.
///
/// hyper stops reading a body, and drops it, the moment the `Content-Length` it declared has
/// been written (hyperium/hyper#1521). The guest's side of the body would then be closed before
/// it calls `flush` or `outgoing-body.finish`, and a guest that wrote exactly what it declared
/// would see `StreamError::Closed`, at random, depending on who runs first. Once every declared
/// byte has gone, the rest (the guest's finish, trailers at most) is read to its end in the
/// background instead. A body dropped short of its length (the exchange failed) is dropped, so
/// the guest hears of the failure on its next write.
struct FinishOnDrop {
    inner: Option<crate::FnBody>,
    declared: Option<u64>,
    sent: u64,
    ended: bool,
}

impl http_body::Body for FinishOnDrop {
    type Data = bytes::Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        let Some(inner) = self.inner.as_mut() else {
            return std::task::Poll::Ready(None);
        };
        let polled = std::pin::Pin::new(inner).poll_frame(cx);
        match &polled {
            std::task::Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    self.sent += data.len() as u64;
                }
            }
            std::task::Poll::Ready(None) => self.ended = true,
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.as_ref().is_none_or(|b| b.is_end_stream())
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner
            .as_ref()
            .map_or_else(|| http_body::SizeHint::with_exact(0), |b| b.size_hint())
    }
}

impl Drop for FinishOnDrop {
    fn drop(&mut self) {
        let Some(rest) = self.inner.take() else {
            return;
        };
        if self.ended || rest.is_end_stream() || self.declared != Some(self.sent) {
            return;
        }
        // Every declared byte went out: nothing but the guest's finish (trailers at most) may
        // follow. The store (the other end) is dropped when the function ends or times out.
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(drain(rest, 0));
        }
    }
}

/// Reads what a guest still writes into a body hyper stopped reading, so that its writes and
/// `finish` succeed, and drops it: up to `budget` data bytes, past which the body is dropped
/// and the guest's next write fails. Ends with the body (the guest finished or is gone).
pub(crate) async fn drain<B>(mut body: B, mut budget: u64)
where
    B: http_body::Body<Data = bytes::Bytes> + Unpin,
{
    while let Some(Ok(frame)) = body.frame().await {
        let n = frame.data_ref().map_or(0, |d| d.len() as u64);
        if n > budget {
            return;
        }
        budget -= n;
    }
}

/// One request's store data. One resource table serves WASI, `wasi:http` and `wasi:keyvalue`.
pub struct FnState {
    pub(crate) wasi: WasiCtx,
    pub(crate) http: WasiHttpCtx,
    pub(crate) table: ResourceTable,
    pub(crate) hooks: OutpostHooks,
    pub(crate) limiter: OomLimiter,
    pub(crate) shared: Arc<FnShared>,
}

impl FnState {
    pub(crate) fn new(
        shared: Arc<FnShared>,
        outbound: Arc<dyn Outbound>,
        max_memory: usize,
    ) -> Self {
        // No arguments, environment, preopened directories or stdio; no sockets or name
        // lookups. The defaults already say so; being explicit keeps it that way.
        let mut wasi = WasiCtx::builder();
        wasi.allow_tcp(false)
            .allow_udp(false)
            .allow_ip_name_lookup(false);
        FnState {
            wasi: wasi.build(),
            http: WasiHttpCtx::new(),
            table: ResourceTable::new(),
            hooks: OutpostHooks { outbound },
            limiter: OomLimiter {
                max: max_memory,
                hit: false,
            },
            shared,
        }
    }
}

impl WasiView for FnState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

impl WasiHttpView for FnState {
    fn http(&mut self) -> WasiHttpCtxView<'_> {
        WasiHttpCtxView {
            ctx: &mut self.http,
            table: &mut self.table,
            hooks: &mut self.hooks,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::pin::Pin;
    use std::task::{Context, Poll};

    use bytes::Bytes;
    use http_body::Frame;
    use http_body_util::BodyExt as _;
    use tokio::sync::mpsc;

    use super::FinishOnDrop;
    use crate::BoxError;

    /// The guest's end of an outgoing body: frames sent on a channel.
    struct Chan(mpsc::Receiver<Frame<Bytes>>);

    impl http_body::Body for Chan {
        type Data = Bytes;
        type Error = BoxError;
        fn poll_frame(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
            self.0.poll_recv(cx).map(|f| f.map(Ok))
        }
    }

    fn wrapped(declared: Option<u64>) -> (mpsc::Sender<Frame<Bytes>>, FinishOnDrop) {
        let (tx, rx) = mpsc::channel(1);
        let body = FinishOnDrop {
            inner: Some(Chan(rx).boxed_unsync()),
            declared,
            sent: 0,
            ended: false,
        };
        (tx, body)
    }

    #[tokio::test]
    async fn a_body_dropped_once_its_length_went_out_still_takes_the_guests_finish() {
        let (tx, mut body) = wrapped(Some(3));
        tx.send(Frame::data(Bytes::from_static(b"abc")))
            .await
            .expect("send");
        let frame = body.frame().await.expect("frame").expect("ok");
        assert_eq!(frame.into_data().expect("data"), "abc");
        // What hyper does once Content-Length bytes are written.
        drop(body);
        // The guest's finish (trailers) still has a reader …
        tx.send(Frame::trailers(http::HeaderMap::new()))
            .await
            .expect("the guest's side stays open until it finishes");
        // … and the reader goes away once the guest is done.
        drop(tx);
    }

    #[tokio::test]
    async fn a_body_dropped_short_of_its_length_closes_the_guests_side() {
        let (tx, mut body) = wrapped(Some(10));
        tx.send(Frame::data(Bytes::from_static(b"abc")))
            .await
            .expect("send");
        let _ = body.frame().await;
        drop(body);
        assert!(
            tx.send(Frame::data(Bytes::from_static(b"def")))
                .await
                .is_err(),
            "a failed exchange must show on the guest's next write"
        );
    }

    #[tokio::test]
    async fn a_body_without_a_declared_length_is_not_drained() {
        let (tx, body) = wrapped(None);
        drop(body);
        assert!(tx.send(Frame::data(Bytes::new())).await.is_err());
    }
}
