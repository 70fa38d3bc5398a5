//! One request through a function: a fresh store and instance, the guest's handler in its own
//! task, its response head awaited up to the deadline, its body streamed with a cut-off.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::task::{Context, Poll};
use std::time::Instant as StdInstant;

use bytes::Bytes;
use http_body::{Body, Frame};
use http_body_util::BodyExt as _;
use tokio::time::Instant;
use wasmtime::{Store, Trap, UpdateDeadline};
use wasmtime_wasi_http::WasiHttpView as _;
use wasmtime_wasi_http::p2::bindings::http::types::Scheme;
use wasmtime_wasi_http::p2::body::HyperOutgoingBody;

use crate::host::{FnState, GuestOom};
use crate::registry::Deployed;
use crate::{BoxError, FnBody, Outbound};

/// How an invocation ended: the `outcome` label of `outpost_function_invocations`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Outcome {
    /// The guest returned normally.
    Ok = 0,
    /// The guest trapped or panicked, or answered with an error code.
    Trap = 1,
    /// The guest ran past its wall-clock budget.
    Timeout = 2,
    /// The guest ran past its memory limit.
    Oom = 3,
    /// No instance slot was free (the node is at `[wasm] max_instances`).
    Unavailable = 4,
    /// The client went away before the guest finished.
    Cancelled = 5,
    /// The request could not be handed to the guest (no host, for instance).
    BadRequest = 6,
}

impl Outcome {
    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::Trap => "trap",
            Outcome::Timeout => "timeout",
            Outcome::Oom => "oom",
            Outcome::Unavailable => "unavailable",
            Outcome::Cancelled => "cancelled",
            Outcome::BadRequest => "bad_request",
        }
    }

    fn from_u8(v: u8) -> Outcome {
        match v {
            0 => Outcome::Ok,
            1 => Outcome::Trap,
            3 => Outcome::Oom,
            4 => Outcome::Unavailable,
            5 => Outcome::Cancelled,
            6 => Outcome::BadRequest,
            _ => Outcome::Timeout,
        }
    }
}

/// A function that could not produce a response head.
#[derive(Debug)]
pub struct Failure {
    /// What happened (decides the status: 504 timeout, 503 unavailable, 400 bad request, 500
    /// otherwise).
    pub outcome: Outcome,
    /// For the log: the trap message with its wasm backtrace, the guest's error code, …
    pub detail: String,
}

/// What a function made of a request.
pub enum Served {
    /// The guest's response; the body streams while the guest runs and errors (the client
    /// sees a cut-off, not a complete body) if the guest fails or overruns.
    Response(http::Response<FnBody>),
    /// No response head.
    Failed(Failure),
}

fn classify(err: &wasmtime::Error, oom_hit: bool) -> Outcome {
    if oom_hit || err.is::<GuestOom>() {
        Outcome::Oom
    } else if matches!(err.downcast_ref::<Trap>(), Some(Trap::Interrupt)) {
        Outcome::Timeout
    } else if err.is::<wasmtime::PoolConcurrencyLimitError>() {
        Outcome::Unavailable
    } else {
        Outcome::Trap
    }
}

/// Records the invocation exactly once, however the task ends: normally, or aborted at the
/// deadline (timeout) or because the client left (cancelled).
struct Record {
    deployed: Arc<Deployed>,
    started: StdInstant,
    /// Outcome to record if the task is dropped before setting its own.
    cell: Arc<AtomicU8>,
}

impl Drop for Record {
    fn drop(&mut self) {
        let outcome = Outcome::from_u8(self.cell.load(Ordering::Acquire));
        self.deployed
            .record(outcome, self.started.elapsed().as_secs_f64());
    }
}

impl Deployed {
    /// Runs this version for one request. `outbound` carries the request's context for the
    /// guest's own requests.
    pub async fn serve(
        self: &Arc<Self>,
        req: http::Request<FnBody>,
        outbound: Arc<dyn Outbound>,
    ) -> Served {
        let deadline = Instant::now() + self.timeout;
        let started = StdInstant::now();
        let head_request = req.method() == http::Method::HEAD;
        let state = FnState::new(self.shared.clone(), outbound, self.max_memory);
        let mut store = Store::new(self.pre.engine(), state);
        store.limiter(|s| &mut s.limiter);
        store.set_epoch_deadline(1);
        let std_deadline = deadline.into_std();
        // Every tick: interrupt past the deadline, else yield so that a busy guest shares its
        // thread with other requests and the host's timers can fire.
        store.epoch_deadline_callback(move |_cx| {
            if StdInstant::now() >= std_deadline {
                Ok(UpdateDeadline::Interrupt)
            } else {
                Ok(UpdateDeadline::Yield(1))
            }
        });
        let store_ns = started.elapsed();

        let req = req.map(|b| {
            b.map_err(|e| wasmtime_wasi_http::Error::InternalError(Some(e.to_string())))
                .boxed_unsync()
        });
        let (tx, rx) = tokio::sync::oneshot::channel();
        let handles = {
            let mut h = store.data_mut().http();
            h.new_incoming_request(Scheme::Http, req)
                .and_then(|incoming| h.new_response_outparam(tx).map(|out| (incoming, out)))
        };
        let (incoming, out) = match handles {
            Ok(pair) => pair,
            Err(e) => {
                return Served::Failed(Failure {
                    outcome: Outcome::BadRequest,
                    detail: format!("{e:#}"),
                });
            }
        };

        let cell = Arc::new(AtomicU8::new(Outcome::Timeout as u8));
        let record = Record {
            deployed: self.clone(),
            started,
            cell: cell.clone(),
        };
        let (done_tx, done_rx) = tokio::sync::oneshot::channel::<(Outcome, String)>();
        let pre = self.pre.clone();
        let me = self.clone();
        let task = tokio::spawn(async move {
            let record = record;
            let instantiating = StdInstant::now();
            let result = match pre.instantiate_async(&mut store).await {
                Ok(proxy) => {
                    me.instantiated(store_ns + instantiating.elapsed());
                    proxy
                        .wasi_http_incoming_handler()
                        .call_handle(&mut store, incoming, out)
                        .await
                }
                Err(e) => Err(e),
            };
            let (outcome, detail) = match result {
                Ok(()) => (Outcome::Ok, String::new()),
                Err(e) => (classify(&e, store.data().limiter.hit), format!("{e:?}")),
            };
            record.cell.store(outcome as u8, Ordering::Release);
            // Dropping the store closes the response body channel.
            drop(store);
            drop(record);
            let _ = done_tx.send((outcome, detail));
        });
        let abort = task.abort_handle();
        // The client may leave before the head: hyper drops this future, and the guest must
        // stop then rather than run to its deadline (counted as cancelled, not as a trap).
        let mut cancel = CancelOnDrop {
            abort: abort.clone(),
            cell: cell.clone(),
            armed: true,
        };
        let head = tokio::time::timeout_at(deadline, rx).await;
        cancel.armed = false;

        match head {
            Ok(Ok(Ok(resp))) => {
                let status = resp.status();
                // What the client can receive: no body at all for these (RFC 9110 §6.4.1).
                let bodiless = head_request
                    || status.is_informational()
                    || status == http::StatusCode::NO_CONTENT
                    || status == http::StatusCode::NOT_MODIFIED;
                let declared = resp
                    .headers()
                    .get(http::header::CONTENT_LENGTH)
                    .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
                Served::Response(resp.map(|body| {
                    GuardedBody {
                        inner: Some(body),
                        deadline: Box::pin(tokio::time::sleep_until(deadline)),
                        done: Some(done_rx),
                        abort,
                        cell,
                        declared,
                        sent: 0,
                        bodiless,
                    }
                    .boxed_unsync()
                }))
            }
            Ok(Ok(Err(code))) => {
                // The guest answered `response-outparam.set(err(code))`; let it finish.
                Served::Failed(Failure {
                    outcome: Outcome::Trap,
                    detail: format!("guest answered with error code {code:?}"),
                })
            }
            Ok(Err(_closed)) => match done_rx.await {
                // Returned (or died) without setting a response.
                Ok((Outcome::Ok, _)) => Served::Failed(Failure {
                    outcome: Outcome::Trap,
                    detail: "guest returned without setting a response".into(),
                }),
                Ok((outcome, detail)) => Served::Failed(Failure { outcome, detail }),
                Err(_) => Served::Failed(Failure {
                    outcome: Outcome::Trap,
                    detail: "guest task ended abnormally".into(),
                }),
            },
            Err(_elapsed) => {
                abort.abort();
                Served::Failed(Failure {
                    outcome: Outcome::Timeout,
                    detail: format!(
                        "no response head within the function's {:?} budget",
                        self.timeout
                    ),
                })
            }
        }
    }
}

/// Stops the guest and records `cancelled` when dropped while armed.
struct CancelOnDrop {
    abort: tokio::task::AbortHandle,
    cell: Arc<AtomicU8>,
    armed: bool,
}

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        if self.armed {
            cancel(&self.cell, &self.abort);
        }
    }
}

/// Marks an unfinished invocation as cancelled (unless it already has an outcome) and stops it.
fn cancel(cell: &AtomicU8, abort: &tokio::task::AbortHandle) {
    let _ = cell.compare_exchange(
        Outcome::Timeout as u8,
        Outcome::Cancelled as u8,
        Ordering::AcqRel,
        Ordering::Acquire,
    );
    abort.abort();
}

/// The guest's streamed response body, cut off at the deadline. The body channel also ends
/// cleanly when the store is dropped (trap, abort), which would make a truncated body look
/// complete; a guest that did not return normally turns the end into an error instead.
/// Most a guest may still write, unread, into a body without a declared length that the
/// client does not receive (the answer to a HEAD request).
const DRAIN_LIMIT: u64 = 1 << 20;

struct GuardedBody {
    /// `None` only while being dropped.
    inner: Option<HyperOutgoingBody>,
    deadline: Pin<Box<tokio::time::Sleep>>,
    done: Option<tokio::sync::oneshot::Receiver<(Outcome, String)>>,
    abort: tokio::task::AbortHandle,
    cell: Arc<AtomicU8>,
    /// The guest's `Content-Length`, if it set one.
    declared: Option<u64>,
    /// Body bytes handed to the server so far.
    sent: u64,
    /// The client gets no body (HEAD, 1xx, 204, 304): the server never reads this one.
    bodiless: bool,
}

/// Why a function's response body ended early.
#[derive(Debug)]
struct BodyCutOff(&'static str);

impl std::fmt::Display for BodyCutOff {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.0)
    }
}

impl std::error::Error for BodyCutOff {}

impl GuardedBody {
    fn cut(&mut self, why: &'static str) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        self.abort.abort();
        self.done = None;
        Poll::Ready(Some(Err(Box::new(BodyCutOff(why)))))
    }
}

impl Body for GuardedBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        let Some(inner) = this.inner.as_mut() else {
            return Poll::Ready(None);
        };
        match Pin::new(inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(f))) => {
                if let Some(data) = f.data_ref() {
                    this.sent += data.len() as u64;
                }
                return Poll::Ready(Some(Ok(f)));
            }
            Poll::Ready(Some(Err(e))) => return Poll::Ready(Some(Err(Box::new(e)))),
            Poll::Ready(None) => {
                let Some(done) = this.done.as_mut() else {
                    return Poll::Ready(None);
                };
                return match Pin::new(done).poll(cx) {
                    Poll::Ready(Ok((Outcome::Ok, _))) => {
                        this.done = None;
                        Poll::Ready(None)
                    }
                    Poll::Ready(_) => this.cut("the function failed while sending its body"),
                    Poll::Pending => {
                        // Body finished, guest not returned yet: wait, but not past the deadline.
                        if this.deadline.as_mut().poll(cx).is_ready() {
                            this.abort.abort();
                            this.done = None;
                            return Poll::Ready(None);
                        }
                        Poll::Pending
                    }
                };
            }
            Poll::Pending => {}
        }
        if this.deadline.as_mut().poll(cx).is_ready() {
            return this.cut("the function did not finish its body in time");
        }
        Poll::Pending
    }

    fn is_end_stream(&self) -> bool {
        self.done.is_none() && self.inner.as_ref().is_none_or(|b| b.is_end_stream())
    }
}

impl Drop for GuardedBody {
    fn drop(&mut self) {
        let Some(done) = self.done.take() else {
            return;
        };
        if self.abort.is_finished() {
            return;
        }
        // hyper drops a body, without reading on, once the client has all it can receive: the
        // declared Content-Length went out, or the answer has no body (HEAD, 204, 304). The
        // guest may still be finishing its body or working after its answer; that is not a
        // client gone away, so it runs on to its return, within its deadline, and what it
        // still writes (bounded by its Content-Length, which wasmtime enforces, or by
        // DRAIN_LIMIT without one) is read and dropped so that its writes do not fail. Otherwise the client left mid-body: stop
        // the guest now rather than at the deadline.
        let delivered = self.bodiless || self.declared == Some(self.sent);
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            cancel(&self.cell, &self.abort);
            return;
        };
        if !delivered {
            cancel(&self.cell, &self.abort);
            return;
        }
        let rest = self.inner.take();
        // What is still read: the rest of the declared length, or for a body nobody receives
        // and no length bounds (HEAD), up to DRAIN_LIMIT; past that the guest's writes fail.
        let budget = self
            .declared
            .map_or(DRAIN_LIMIT, |d| d.saturating_sub(self.sent));
        let deadline = self.deadline.deadline();
        let abort = self.abort.clone();
        rt.spawn(async move {
            let finish = async move {
                if let Some(rest) = rest {
                    crate::host::drain(rest, budget).await;
                }
                let _ = done.await;
            };
            // Past the deadline the outcome stays `timeout`, as for any guest that overruns.
            if tokio::time::timeout_at(deadline, finish).await.is_err() {
                abort.abort();
            }
        });
    }
}
