//! Listeners: accept loops, TLS handshakes, HTTP/1.1 + HTTP/2 connections, graceful drain.
//!
//! The first stage of the request path. Protection against hostile clients lives here:
//! connection cap, TLS handshake and header-read timeouts (slowloris), head size and header
//! count limits (hyper answers 431), malformed requests (hyper answers 400).
//!
//! Listeners are keyed by their configured address so a reload can add and remove listeners
//! and swap certificates without touching connections on listeners that stay.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
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
            .timer(TokioTimer::new())
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
                self.serve(builder, TokioIo::new(io), conn).await;
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
                self.serve(builder, TokioIo::new(stream), conn).await;
            }
        }
    }

    async fn serve<I>(
        &self,
        builder: auto::Builder<TokioExecutor>,
        io: TokioIo<I>,
        conn: Arc<ConnInfo>,
    ) where
        I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let node = self.node.clone();
        let svc = service_fn(move |req| handle(node.clone(), conn.clone(), req));
        let connection = builder.serve_connection_with_upgrades(io, svc);
        tokio::pin!(connection);
        tokio::select! {
            res = connection.as_mut() => {
                if let Err(e) = res {
                    tracing::debug!(error = %e, "Connection ended with an error.");
                }
            }
            () = self.shutdown.cancelled() => {
                connection.as_mut().graceful_shutdown();
                let _ = connection.await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

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
