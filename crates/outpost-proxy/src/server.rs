//! Listeners: accept loops, TLS handshakes, HTTP/1.1 + HTTP/2 connections, graceful drain.
//!
//! The first stage of the request path. Protection against hostile clients lives here:
//! connection cap, TLS handshake and header-read timeouts (slowloris), head size and header
//! count limits (hyper answers 431), malformed requests (hyper answers 400).
//!
//! Listeners are keyed by their configured address so a reload can add and remove listeners
//! and swap certificates without touching connections on listeners that stay.

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use arc_swap::ArcSwap;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use outpost_config::Config;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::body::{BoxError, ProxyBody};
use crate::context::{ConnInfo, Scheme};
use crate::handler::handle;
use crate::node::Node;
use crate::tls::{TlsError, acceptor};

/// Smallest read buffer hyper accepts.
const MIN_HEAD_BUFFER: usize = 8192;

/// Why listeners could not be (re)configured.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// A listener address could not be bound.
    #[error("cannot listen on {addr}: {source}; is another process using the port?")]
    Bind {
        /// The address.
        addr: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// A TLS certificate or key is unusable.
    #[error(transparent)]
    Tls(#[from] TlsError),
}

/// Waits until the client sends something. hyper's header-read timeout starts with a request's
/// first byte, so a client that connects and stays silent would hold a connection slot (of
/// `max_connections`) forever.
/// A drain does not wait for such a client either.
pub async fn first_bytes(tcp: &TcpStream, within: Duration, shutdown: &CancellationToken) -> bool {
    // `peek`, not `readable`: readiness may be reported before any byte is there.
    let mut byte = [0u8; 1];
    tokio::select! {
        got = tokio::time::timeout(within, tcp.peek(&mut byte)) => matches!(got, Ok(Ok(_))),
        () = shutdown.cancelled() => false,
    }
}

pin_project_lite::pin_project! {
    /// A client connection whose writes fail once the client has taken nothing for `limit`
    /// (nginx's `send_timeout`). Without it a client that never reads a large response holds its
    /// connection and the origin connection feeding it for ever; memory stays bounded either way.
    pub struct SendDeadline<I> {
        #[pin]
        io: I,
        limit: Duration,
        // Started at the first write that could not go through, dropped at the next that did.
        stalled: Option<Pin<Box<tokio::time::Sleep>>>,
    }
}

impl<I> SendDeadline<I> {
    /// Wraps a client connection; its writes fail after `limit` without progress.
    pub fn new(io: I, limit: Duration) -> Self {
        SendDeadline {
            io,
            limit,
            stalled: None,
        }
    }

    /// The wrapped connection.
    pub fn get_ref(&self) -> &I {
        &self.io
    }
}

/// Tracks one write attempt: progress drops the timer; no progress starts it (or keeps it
/// running) and fails once the client has taken nothing for `limit`.
fn track<T>(
    polled: Poll<std::io::Result<T>>,
    slot: &mut Option<Pin<Box<tokio::time::Sleep>>>,
    limit: Duration,
    cx: &mut Context<'_>,
) -> Poll<std::io::Result<T>> {
    if polled.is_ready() {
        *slot = None;
        return polled;
    }
    let timer = slot.get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
    match timer.as_mut().poll(cx) {
        Poll::Ready(()) => Poll::Ready(Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            "the client took nothing of the response within send_timeout",
        ))),
        Poll::Pending => Poll::Pending,
    }
}

impl<I: AsyncRead> AsyncRead for SendDeadline<I> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        self.project().io.poll_read(cx, buf)
    }
}

impl<I: AsyncWrite> AsyncWrite for SendDeadline<I> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.project();
        let polled = this.io.poll_write(cx, buf);
        track(polled, this.stalled, *this.limit, cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.project();
        let polled = this.io.poll_write_vectored(cx, bufs);
        track(polled, this.stalled, *this.limit, cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let this = self.project();
        let polled = this.io.poll_flush(cx);
        track(polled, this.stalled, *this.limit, cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.project().io.poll_shutdown(cx)
    }
}

/// Per-listener settings that a reload may change in place.
struct ListenerSettings {
    tls: Option<TlsAcceptor>,
    http2: bool,
}

struct ListenerHandle {
    local: SocketAddr,
    settings: Arc<ArcSwap<ListenerSettings>>,
    stop: CancellationToken,
}

/// Listener changes computed from a new config, applied only if the rest of the reload works.
pub struct ListenerPlan {
    bind: Vec<(String, TcpListener, ListenerSettings)>,
    update: Vec<(String, ListenerSettings)>,
    remove: Vec<String>,
}

/// All listeners of the node and their connections.
pub struct Server {
    node: Arc<Node>,
    listeners: Mutex<HashMap<String, ListenerHandle>>,
    /// Tracks connection tasks, to wait for them on drain.
    connections: TaskTracker,
    /// Fired on drain: connections finish their current request and close.
    shutdown: CancellationToken,
    /// Caps concurrent connections.
    permits: Arc<Semaphore>,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server").finish_non_exhaustive()
    }
}

impl Server {
    /// Binds every configured listener and starts accepting.
    pub async fn start(node: Arc<Node>) -> Result<Arc<Server>, ServerError> {
        let config = node.snapshot().config.clone();
        let server = Arc::new(Server {
            permits: Arc::new(Semaphore::new(config.server.max_connections.max(1))),
            node,
            listeners: Mutex::new(HashMap::new()),
            connections: TaskTracker::new(),
            shutdown: CancellationToken::new(),
        });
        let plan = server.plan(&config).await?;
        server.commit(plan);
        Ok(server)
    }

    /// Addresses actually bound (port 0 resolved), in no particular order.
    pub fn local_addrs(&self) -> Vec<SocketAddr> {
        match self.listeners.lock() {
            Ok(l) => l.values().map(|h| h.local).collect(),
            Err(_) => Vec::new(),
        }
    }

    /// Binds new listeners and loads certificates for a config, without changing anything yet.
    pub async fn plan(&self, config: &Config) -> Result<ListenerPlan, ServerError> {
        let existing: Vec<String> = match self.listeners.lock() {
            Ok(l) => l.keys().cloned().collect(),
            Err(_) => Vec::new(),
        };
        let mut plan = ListenerPlan {
            bind: Vec::new(),
            update: Vec::new(),
            remove: existing
                .iter()
                .filter(|a| !config.listeners.iter().any(|l| &l.addr == *a))
                .cloned()
                .collect(),
        };
        for l in &config.listeners {
            let tls = match &l.tls {
                Some(t) => Some(acceptor(t, &config.base_dir, l.http2)?),
                None => None,
            };
            let settings = ListenerSettings {
                tls,
                http2: l.http2,
            };
            if existing.contains(&l.addr) {
                plan.update.push((l.addr.clone(), settings));
            } else {
                let listener =
                    TcpListener::bind(&l.addr)
                        .await
                        .map_err(|source| ServerError::Bind {
                            addr: l.addr.clone(),
                            source,
                        })?;
                plan.bind.push((l.addr.clone(), listener, settings));
            }
        }
        Ok(plan)
    }

    /// Applies a plan: start new listeners, update kept ones, stop removed ones (their open
    /// connections finish normally).
    pub fn commit(self: &Arc<Self>, plan: ListenerPlan) {
        let Ok(mut listeners) = self.listeners.lock() else {
            return;
        };
        for addr in plan.remove {
            if let Some(h) = listeners.remove(&addr) {
                h.stop.cancel();
                tracing::info!(addr = %h.local, "Listener closed.");
            }
        }
        for (addr, settings) in plan.update {
            if let Some(h) = listeners.get(&addr) {
                h.settings.store(Arc::new(settings));
            }
        }
        for (addr, listener, settings) in plan.bind {
            let local = listener
                .local_addr()
                .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)));
            let tls = settings.tls.is_some();
            let settings = Arc::new(ArcSwap::from_pointee(settings));
            let stop = self.shutdown.child_token();
            tracing::info!(addr = %local, tls, "Listening.");
            tokio::spawn(
                self.clone()
                    .accept_loop(listener, settings.clone(), stop.clone()),
            );
            listeners.insert(
                addr,
                ListenerHandle {
                    local,
                    settings,
                    stop,
                },
            );
        }
    }

    /// Stops accepting, asks every connection to finish its in-flight requests and close, and
    /// waits up to `timeout`. Returns whether everything finished in time.
    pub async fn drain(&self, timeout: Duration) -> bool {
        self.shutdown.cancel();
        self.connections.close();
        tokio::time::timeout(timeout, self.connections.wait())
            .await
            .is_ok()
    }

    /// Connections currently open.
    pub fn open_connections(&self) -> usize {
        self.connections.len()
    }

    async fn accept_loop(
        self: Arc<Self>,
        listener: TcpListener,
        settings: Arc<ArcSwap<ListenerSettings>>,
        stop: CancellationToken,
    ) {
        loop {
            let permit = tokio::select! {
                () = stop.cancelled() => return,
                p = self.permits.clone().acquire_owned() => match p {
                    Ok(p) => p,
                    Err(_) => return,
                },
            };
            let accepted = tokio::select! {
                () = stop.cancelled() => return,
                a = listener.accept() => a,
            };
            let (stream, peer) = match accepted {
                Ok(a) => a,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(error = %e, "Accept failed.");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let settings = settings.load_full();
            let this = self.clone();
            self.connections.spawn(async move {
                this.serve_connection(stream, peer, &settings).await;
                drop(permit);
            });
        }
    }

    async fn serve_connection(
        &self,
        stream: TcpStream,
        peer: SocketAddr,
        settings: &ListenerSettings,
    ) {
        let _guard = self.node.metrics().connection_opened();
        let _ = stream.set_nodelay(true);
        let config = self.node.snapshot().config.clone();
        let limits = &config.server;
        let head_bytes = usize::try_from(limits.max_header_bytes.as_u64())
            .unwrap_or(usize::MAX)
            .max(MIN_HEAD_BUFFER);

        let mut builder = auto::Builder::new(TokioExecutor::new());
        builder
            .http1()
            // One lazily re-armed timer for the connection, not one registered per request.
            .timer(crate::alarm::ConnTimer::default())
            .header_read_timeout(limits.header_read_timeout)
            .max_buf_size(head_bytes)
            .max_headers(limits.max_headers)
            .keep_alive(true);
        builder
            .http2()
            .timer(TokioTimer::new())
            .max_header_list_size(u32::try_from(head_bytes).unwrap_or(u32::MAX))
            .keep_alive_interval(Some(Duration::from_secs(30)))
            .keep_alive_timeout(Duration::from_secs(10));
        if !settings.http2 {
            builder = builder.http1_only();
        }

        match &settings.tls {
            None => {
                if !first_bytes(&stream, limits.header_read_timeout, &self.shutdown).await {
                    tracing::debug!(%peer, "Connection sent nothing in time; closed.");
                    return;
                }
                let conn = Arc::new(ConnInfo::new(peer, Scheme::Http));
                let io = SendDeadline::new(stream, limits.send_timeout);
                self.serve(builder, TokioIo::new(io), conn, limits.send_timeout)
                    .await;
            }
            Some(tls) => {
                let io = SendDeadline::new(stream, limits.send_timeout);
                let handshake =
                    tokio::time::timeout(limits.header_read_timeout, tls.accept(io)).await;
                let stream = match handshake {
                    Ok(Ok(s)) => s,
                    Ok(Err(e)) => {
                        tracing::debug!(%peer, error = %e, "TLS handshake failed.");
                        return;
                    }
                    Err(_) => {
                        tracing::debug!(%peer, "TLS handshake timed out.");
                        return;
                    }
                };
                // Plaintext that came with the handshake is already there to read.
                if stream.get_ref().1.wants_read()
                    && !first_bytes(
                        stream.get_ref().0.get_ref(),
                        limits.header_read_timeout,
                        &self.shutdown,
                    )
                    .await
                {
                    tracing::debug!(%peer, "Connection sent nothing after its handshake; closed.");
                    return;
                }
                if stream.get_ref().1.alpn_protocol() == Some(b"h2") {
                    builder = builder.http2_only();
                }
                let conn = Arc::new(ConnInfo::new(peer, Scheme::Https));
                self.serve(builder, TokioIo::new(stream), conn, limits.send_timeout)
                    .await;
            }
        }
    }

    async fn serve<I>(
        &self,
        builder: auto::Builder<TokioExecutor>,
        io: TokioIo<I>,
        conn: Arc<ConnInfo>,
        send_timeout: Duration,
    ) where
        I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let node = self.node.clone();
        let switched = conn.clone();
        // Ends the stall watch's task with the connection (not with shutdown: stalled streams
        // are still cut while the node drains).
        let done = CancellationToken::new();
        let _done_on_exit = done.clone().drop_guard();
        let stalls = Arc::new(StallWatch::new(send_timeout, done));
        let svc = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
            // Only HTTP/2 answers are watched (HTTP/1 has SendDeadline); nothing extra for HTTP/1.
            let watch = (req.version() == hyper::Version::HTTP_2).then(|| stalls.clone());
            let (node, conn) = (node.clone(), conn.clone());
            // The handler's future is built inside this one, in place: it is large, and moving
            // a built one in here would copy all of it on every request.
            async move {
                let resp = handle(node, conn, req).await?;
                Ok::<_, Infallible>(match watch {
                    Some(w) => resp.map(|body| w.watch(body)),
                    None => resp,
                })
            }
        });
        let ended = {
            // On the heap: the connection's task outlives it when it becomes a WebSocket, and
            // its future would otherwise keep room for it all that time.
            let mut connection = Box::pin(builder.serve_connection_with_upgrades(io, svc));
            tokio::select! {
                res = connection.as_mut() => res,
                () = self.shutdown.cancelled() => {
                    connection.as_mut().graceful_shutdown();
                    connection.await
                }
            }
            // hyper's connection is dropped here: on an error it would otherwise keep the
            // pending upgrade of a 101 it failed to write, and the tunnel would wait for it.
        };
        let tunnel = switched.take_tunnel();
        match ended {
            // A WebSocket: hyper has written the 101 and handed the connection over. The
            // tunnel runs here, on the connection's task, so that it holds its permit and the
            // drain waits for it (up to drain_timeout).
            Ok(()) => {
                if let Some(tunnel) = tunnel {
                    tunnel.await;
                }
            }
            Err(e) => tracing::debug!(error = %e, "Connection ended with an error."),
        }
    }
}

/// Largest piece of an HTTP/2 answer handed to hyper at once. hyper asks for the next piece
/// only once the client's window covers the whole previous one; with pieces as large as an
/// origin read (up to 256 KiB) a client reading slowly but steadily through a 64 KiB window
/// would look stalled.
const H2_PIECE: usize = 16 * 1024;

/// Notices HTTP/2 answers the client stopped taking. On HTTP/1 a client that reads nothing
/// blocks our writes, which [`SendDeadline`] times out; on HTTP/2 the client holds a stream's
/// flow-control window at zero instead, hyper then simply stops asking the answer's body for
/// data, and nothing would ever free the origin connection behind it. Each HTTP/2 answer's body
/// records since when it has had data waiting to be asked for; a task started with the
/// connection's first such body drops a body that has waited `send_timeout` (freeing its origin
/// connection) and the stream is reset when hyper next asks. Only that stream: the others on
/// the connection go on. A slow origin is not a stall: a body waiting on its origin is not owed.
pub struct StallWatch {
    /// One entry per watched body; dropped bodies leave an entry nobody else holds.
    bodies: Mutex<Vec<Arc<Entry>>>,
    registered: tokio::sync::Notify,
    /// Tokio's clock (not std's), so that tests can run it paused.
    epoch: tokio::time::Instant,
    limit: Duration,
    /// Cancelled when the connection ends; ends the watching task.
    done: CancellationToken,
    started: std::sync::atomic::AtomicBool,
}

/// A watched body, shared by the body and the watching task.
struct Entry {
    /// Milliseconds after the watch's epoch since the body has been owed a poll; 0 while not.
    owed: AtomicU64,
    /// The answer's body; taken (dropped) by the watch when it stalled.
    body: Mutex<Option<ProxyBody>>,
}

impl Entry {
    fn body(&self) -> std::sync::MutexGuard<'_, Option<ProxyBody>> {
        match self.body.lock() {
            Ok(b) => b,
            Err(p) => p.into_inner(),
        }
    }
}

/// Milliseconds since `epoch`, never 0 (0 means "not owed").
fn millis_since(epoch: tokio::time::Instant) -> u64 {
    u64::try_from(epoch.elapsed().as_millis())
        .unwrap_or(u64::MAX)
        .max(1)
}

/// Why a stalled HTTP/2 answer ended (hyper resets the stream with it).
#[derive(Debug, thiserror::Error)]
#[error("the client took none of this answer for send_timeout")]
pub struct Stalled;

impl StallWatch {
    /// A watch for one connection; `done` is cancelled when the connection ends.
    pub fn new(limit: Duration, done: CancellationToken) -> StallWatch {
        StallWatch {
            bodies: Mutex::default(),
            registered: tokio::sync::Notify::new(),
            epoch: tokio::time::Instant::now(),
            limit,
            done,
            started: std::sync::atomic::AtomicBool::new(false),
        }
    }

    fn bodies(&self) -> std::sync::MutexGuard<'_, Vec<Arc<Entry>>> {
        match self.bodies.lock() {
            Ok(b) => b,
            Err(p) => p.into_inner(),
        }
    }

    /// Watches an HTTP/2 answer's body (starting the watching task with the first).
    pub fn watch(self: &Arc<Self>, body: ProxyBody) -> ProxyBody {
        // Owed from the start: hyper asks a new stream's body for data at once, window allowing.
        let since = if http_body::Body::is_end_stream(&body) {
            0
        } else {
            millis_since(self.epoch)
        };
        let entry = Arc::new(Entry {
            owed: AtomicU64::new(since),
            body: Mutex::new(Some(body)),
        });
        {
            let mut bodies = self.bodies();
            bodies.retain(|b| Arc::strong_count(b) > 1);
            bodies.push(entry.clone());
        }
        self.registered.notify_one();
        if !self.started.swap(true, Ordering::Relaxed) {
            let this = self.clone();
            tokio::spawn(async move {
                tokio::select! {
                    () = this.done.cancelled() => {}
                    () = this.cut_stalls() => {}
                }
            });
        }
        http_body_util::BodyExt::boxed_unsync(Watched {
            entry,
            rest: bytes::Bytes::new(),
            epoch: self.epoch,
        })
    }

    /// Drops every watched body that has been owed a poll for `limit`, for as long as the
    /// connection lasts. Without watched bodies (every HTTP/1 connection) it only waits, with
    /// no timer.
    async fn cut_stalls(&self) {
        let limit_ms = u64::try_from(self.limit.as_millis()).unwrap_or(u64::MAX);
        let every = (self.limit / 4).clamp(Duration::from_millis(10), Duration::from_secs(1));
        loop {
            let watching = {
                let mut bodies = self.bodies();
                bodies.retain(|b| Arc::strong_count(b) > 1);
                !bodies.is_empty()
            };
            if !watching {
                self.registered.notified().await;
                continue;
            }
            tokio::time::sleep(every).await;
            let now = millis_since(self.epoch);
            let stalled: Vec<Arc<Entry>> = self
                .bodies()
                .iter()
                .filter(|b| {
                    let since = b.owed.load(Ordering::Relaxed);
                    Arc::strong_count(b) > 1 && since != 0 && now.saturating_sub(since) >= limit_ms
                })
                .cloned()
                .collect();
            for entry in stalled {
                entry.owed.store(0, Ordering::Relaxed);
                // Dropped here, outside any lock of ours: frees its origin connection now.
                let body = entry.body().take();
                drop(body);
                tracing::debug!(
                    "HTTP/2 client took none of an answer for send_timeout; stream cut."
                );
            }
        }
    }
}

/// An HTTP/2 answer's body, keeping its [`StallWatch`] entry current and handing data to hyper
/// in pieces of at most [`H2_PIECE`].
struct Watched {
    entry: Arc<Entry>,
    /// The part of the last data frame not handed over yet.
    rest: bytes::Bytes,
    epoch: tokio::time::Instant,
}

impl Watched {
    fn piece(&mut self) -> bytes::Bytes {
        let n = self.rest.len().min(H2_PIECE);
        self.rest.split_to(n)
    }
}

impl http_body::Body for Watched {
    type Data = bytes::Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<bytes::Bytes>, BoxError>>> {
        let this = &mut *self;
        if !this.rest.is_empty() {
            this.entry
                .owed
                .store(millis_since(this.epoch), Ordering::Relaxed);
            return Poll::Ready(Some(Ok(http_body::Frame::data(this.piece()))));
        }
        let mut guard = this.entry.body();
        let Some(inner) = guard.as_mut() else {
            return Poll::Ready(Some(Err(Box::new(Stalled))));
        };
        let polled = Pin::new(&mut *inner).poll_frame(cx);
        let ended = inner.is_end_stream();
        drop(guard);
        let polled = match polled {
            Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                Ok(data) if data.len() > H2_PIECE => {
                    this.rest = data;
                    Poll::Ready(Some(Ok(http_body::Frame::data(this.piece()))))
                }
                Ok(data) => Poll::Ready(Some(Ok(http_body::Frame::data(data)))),
                Err(frame) => Poll::Ready(Some(Ok(frame))),
            },
            other => other,
        };
        let owed = match &polled {
            // Data handed over: the next ask is up to the client's window.
            Poll::Ready(Some(Ok(_))) if !ended || !this.rest.is_empty() => millis_since(this.epoch),
            // Waiting on the origin, or done.
            _ => 0,
        };
        this.entry.owed.store(owed, Ordering::Relaxed);
        polled
    }

    fn is_end_stream(&self) -> bool {
        // A stalled (dropped) body is not at its end: the next ask gets the error that resets
        // the stream.
        self.rest.is_empty()
            && self
                .entry
                .body()
                .as_ref()
                .is_some_and(|b| b.is_end_stream())
    }

    fn size_hint(&self) -> http_body::SizeHint {
        let rest = self.rest.len() as u64;
        match self.entry.body().as_ref() {
            Some(b) => {
                let inner = b.size_hint();
                let mut hint = http_body::SizeHint::new();
                hint.set_lower(inner.lower().saturating_add(rest));
                if let Some(upper) = inner.upper() {
                    hint.set_upper(upper.saturating_add(rest));
                }
                hint
            }
            None => http_body::SizeHint::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Sets its flag when dropped: tells when a body was let go.
    struct DropFlag(Arc<std::sync::atomic::AtomicBool>);

    impl Drop for DropFlag {
        fn drop(&mut self) {
            self.0.store(true, Ordering::SeqCst);
        }
    }

    /// A body that yields one frame, then waits for `more` before ending; `dropped` is set
    /// when it is dropped.
    fn one_then_wait(
        more: tokio::sync::oneshot::Receiver<()>,
        dropped: Arc<std::sync::atomic::AtomicBool>,
    ) -> ProxyBody {
        use http_body_util::BodyExt;
        let first = futures_util::stream::once(async {
            Ok::<_, BoxError>(http_body::Frame::data(bytes::Bytes::from_static(b"x")))
        });
        let flag = DropFlag(dropped);
        let rest = futures_util::stream::once(async move {
            let _flag = flag;
            let _ = more.await;
            Ok::<_, BoxError>(http_body::Frame::data(bytes::Bytes::from_static(b"y")))
        });
        http_body_util::StreamBody::new(futures_util::StreamExt::chain(first, rest)).boxed_unsync()
    }

    #[tokio::test(start_paused = true)]
    async fn an_http2_answer_nobody_asks_for_is_cut_a_slow_origin_is_not() {
        use http_body_util::BodyExt;
        let limit = Duration::from_secs(60);
        let watch = Arc::new(StallWatch::new(limit, CancellationToken::new()));

        // Asked once, handed data, then never asked again (the client's window is shut): the
        // body (and the origin connection behind it) is let go, and the next ask fails.
        let dropped = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (_more, wait) = tokio::sync::oneshot::channel();
        let mut stalled = watch.watch(one_then_wait(wait, dropped.clone()));
        let first = stalled.frame().await.expect("frame").expect("data");
        assert_eq!(first.into_data().expect("data"), &b"x"[..]);
        tokio::time::sleep(limit - Duration::from_secs(1)).await;
        assert!(!dropped.load(Ordering::SeqCst), "cut before send_timeout");
        tokio::time::sleep(Duration::from_secs(17)).await;
        assert!(dropped.load(Ordering::SeqCst), "not cut after send_timeout");
        let next = stalled.frame().await.expect("a frame");
        assert!(next.is_err(), "the stream must end in an error (a reset)");

        // Asked again and waiting on its origin for 10 minutes: not the client's doing.
        let dropped = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (more, wait) = tokio::sync::oneshot::channel();
        let mut body = watch.watch(one_then_wait(wait, dropped.clone()));
        body.frame().await.expect("frame").expect("data");
        let pending = futures_util::poll!(body.frame());
        assert!(pending.is_pending(), "the origin has sent nothing more");
        tokio::time::sleep(Duration::from_secs(600)).await;
        assert!(
            !dropped.load(Ordering::SeqCst),
            "a slow origin was taken for a stalled client"
        );
        more.send(()).expect("origin sends");
        let last = body.frame().await.expect("frame").expect("data");
        assert_eq!(last.into_data().expect("data"), &b"y"[..]);
        assert!(body.frame().await.is_none());
        watch.done.cancel();
    }

    #[tokio::test]
    async fn large_frames_go_to_hyper_in_pieces() {
        use http_body_util::BodyExt;
        let watch = Arc::new(StallWatch::new(
            Duration::from_secs(60),
            CancellationToken::new(),
        ));
        let big = bytes::Bytes::from(vec![7u8; 100 * 1024]);
        let mut body = watch.watch(crate::body::full(big.clone()));
        assert_eq!(http_body::Body::size_hint(&body).exact(), Some(100 * 1024));
        let mut got = Vec::new();
        while let Some(frame) = body.frame().await {
            let data = frame.expect("frame").into_data().expect("data");
            assert!(data.len() <= H2_PIECE);
            got.extend_from_slice(&data);
        }
        assert_eq!(got, big);
        assert!(http_body::Body::is_end_stream(&body));
        watch.done.cancel();
    }

    /// An h2c server whose answers go through a [`StallWatch`] (`limit`): `/big` is 40 frames
    /// of 256 KiB ready at once (an origin outpacing its client), anything else an endless
    /// stream of 16 KiB frames. Returns a hyper h2 client (64 KiB stream windows) to it.
    async fn h2_pair(
        limit: Duration,
    ) -> hyper::client::conn::http2::SendRequest<http_body_util::Empty<bytes::Bytes>> {
        use http_body_util::BodyExt;
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let done = CancellationToken::new();
            let _done = done.clone().drop_guard();
            let stalls = Arc::new(StallWatch::new(limit, done));
            let svc = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                let body = if req.uri().path() == "/big" {
                    let frames = (0..40).map(|_| {
                        Ok::<_, BoxError>(http_body::Frame::data(bytes::Bytes::from(vec![
                            b'a';
                            256 * 1024
                        ])))
                    });
                    http_body_util::StreamBody::new(futures_util::stream::iter(frames))
                        .boxed_unsync()
                } else {
                    let frames = futures_util::stream::repeat_with(|| {
                        Ok::<_, BoxError>(http_body::Frame::data(bytes::Bytes::from(vec![
                            b's';
                            16 * 1024
                        ])))
                    });
                    http_body_util::StreamBody::new(frames).boxed_unsync()
                };
                let w = stalls.clone();
                async move { Ok::<_, Infallible>(hyper::Response::new(w.watch(body))) }
            });
            let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                .timer(TokioTimer::new())
                .serve_connection(TokioIo::new(tcp), svc)
                .await;
        });
        let tcp = TcpStream::connect(addr).await.expect("connect");
        let (sender, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
            .initial_stream_window_size(65_535)
            .initial_connection_window_size(16 << 20)
            .handshake(TokioIo::new(tcp))
            .await
            .expect("handshake");
        tokio::spawn(conn);
        sender
    }

    fn h2_get(path: &str) -> hyper::Request<http_body_util::Empty<bytes::Bytes>> {
        let mut req = hyper::Request::new(http_body_util::Empty::new());
        *req.uri_mut() = format!("http://x{path}").parse().expect("uri");
        req
    }

    /// Over a real HTTP/2 connection (send_timeout 1 s): a stream whose window the client
    /// leaves shut is cut, its neighbour taking data at full speed goes on, and a client that
    /// takes a frame every 100 ms (slow but steady) is not cut.
    #[tokio::test]
    async fn on_http2_only_the_stalled_stream_is_cut() {
        use http_body_util::BodyExt;
        let mut sender = h2_pair(Duration::from_secs(1)).await;
        let unread = sender.send_request(h2_get("/big")).await.expect("head");
        let slow = sender.send_request(h2_get("/big")).await.expect("head");
        let fast = sender.send_request(h2_get("/stream")).await.expect("head");
        let (mut slow, mut fast) = (slow.into_body(), fast.into_body());
        let until = tokio::time::Instant::now() + Duration::from_secs(3);
        let mut next_slow = tokio::time::Instant::now();
        while tokio::time::Instant::now() < until {
            tokio::select! {
                frame = fast.frame() => {
                    frame.expect("the fast stream goes on").expect("no error on the fast stream");
                }
                () = tokio::time::sleep_until(next_slow) => {
                    slow.frame()
                        .await
                        .expect("the slow stream goes on")
                        .expect("no error on the slow but steady stream");
                    next_slow += Duration::from_millis(100);
                }
            }
        }
        // The unread one was cut: what was buffered arrives, then the reset.
        let mut unread = unread.into_body();
        let mut got = 0usize;
        let ended = loop {
            match tokio::time::timeout(Duration::from_secs(10), unread.frame()).await {
                Ok(Some(Ok(f))) => got += f.data_ref().map_or(0, |d| d.len()),
                Ok(Some(Err(_))) => break true,
                Ok(None) | Err(_) => break false,
            }
        };
        assert!(ended, "the stalled stream was not cut (took {got} bytes)");
        assert!(got < 40 * 256 * 1024, "the whole answer arrived");
    }

    /// A client that reads nothing: once its buffer is full, writes fail after the limit.
    #[tokio::test(start_paused = true)]
    async fn a_client_that_takes_nothing_is_cut_off_after_send_timeout() {
        let (ours, _client) = tokio::io::duplex(64);
        let mut io = SendDeadline::new(ours, Duration::from_secs(60));
        let started = tokio::time::Instant::now();
        let err = io
            .write_all(&[7u8; 1024])
            .await
            .expect_err("the client never reads");
        assert_eq!(err.kind(), std::io::ErrorKind::TimedOut);
        assert_eq!(started.elapsed(), Duration::from_secs(60));
    }

    /// A slow client that keeps taking something is never cut off, however long it all takes.
    #[tokio::test(start_paused = true)]
    async fn a_slow_client_that_keeps_reading_is_not_cut_off() {
        let (ours, mut client) = tokio::io::duplex(64);
        let reader = tokio::spawn(async move {
            let mut got = Vec::new();
            let mut buf = [0u8; 64];
            loop {
                tokio::time::sleep(Duration::from_secs(50)).await;
                match client.read(&mut buf).await {
                    Ok(0) | Err(_) => return got,
                    Ok(n) => got.extend_from_slice(&buf[..n]),
                }
            }
        });
        let mut io = SendDeadline::new(ours, Duration::from_secs(60));
        io.write_all(&[7u8; 1024])
            .await
            .expect("the client keeps reading");
        io.shutdown().await.expect("shutdown");
        drop(io);
        let got = reader.await.expect("reader");
        assert_eq!(got.len(), 1024);
    }
}
