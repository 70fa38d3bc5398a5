//! A per-endpoint HTTP/1.1 connection pool on hyper's low-level client connections.
//!
//! Why not hyper-util's pooled client (which h2 endpoints still use): on HTTP/1 it spawns a task
//! per request to put the connection back after the response, and checks out through a shared
//! map; that was the largest cost left on the proxy path. Here a connection goes back to its
//! endpoint's idle list the moment the response body ends, with no task and no map.
//!
//! Safety rules: a connection is reused only if the origin did not close it, it is not older
//! than the idle timeout, and hyper says it can take a request; a request that a reused
//! connection rejected before sending (the origin closed it at that moment) goes once more on a
//! fresh connection.

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::uri::Authority;
use http::{Request, Response};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use crate::body::{BoxError, ProxyBody};

/// Why a request could not be exchanged on this pool.
#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    /// No TCP connection could be opened (refused, unreachable, timed out): nothing was sent.
    #[error("connect to {authority} failed: {reason}")]
    Connect {
        /// The endpoint.
        authority: String,
        /// The OS or timeout reason.
        reason: String,
    },
    /// The exchange failed after a connection existed.
    #[error(transparent)]
    Exchange(#[from] hyper::Error),
}

struct Idle {
    sender: SendRequest<ProxyBody>,
    since: Instant,
}

/// TLS to an HTTPS endpoint: the connector and the name its certificate must carry.
pub struct PoolTls {
    /// rustls connector (roots, client certificate, ALPN `http/1.1`).
    pub connector: tokio_rustls::TlsConnector,
    /// SNI and verification name.
    pub server_name: rustls_pki_types::ServerName<'static>,
}

/// Idle HTTP/1.1 connections to one endpoint.
pub struct H1Pool {
    authority: Authority,
    tls: Option<PoolTls>,
    connect_timeout: Duration,
    idle_timeout: Duration,
    max_idle: usize,
    idle: Mutex<Vec<Idle>>,
}

impl std::fmt::Debug for H1Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("H1Pool")
            .field("authority", &self.authority)
            .finish_non_exhaustive()
    }
}

impl H1Pool {
    /// A pool for `authority` (`host:port`), over TLS when `tls` is given.
    pub fn new(
        authority: Authority,
        tls: Option<PoolTls>,
        connect_timeout: Duration,
        idle_timeout: Duration,
        max_idle: usize,
    ) -> Arc<H1Pool> {
        Arc::new(H1Pool {
            authority,
            tls,
            connect_timeout,
            idle_timeout,
            max_idle,
            idle: Mutex::new(Vec::new()),
        })
    }

    /// Sends a request (origin-form URI, Host header set) and returns the response; its body
    /// hands the connection back when it ends.
    pub async fn send(
        self: &Arc<Self>,
        req: Request<ProxyBody>,
    ) -> Result<Response<ProxyBody>, PoolError> {
        let (mut sender, reused) = match self.take_idle().await {
            Some(s) => (s, true),
            None => (self.connect().await?, false),
        };
        match sender.try_send_request(req).await {
            Ok(resp) => Ok(self.wrap(resp, sender)),
            Err(mut e) => {
                // A reused connection the origin had just closed: the request never left, so it
                // can go once more on a fresh connection.
                match (reused, e.take_message()) {
                    (true, Some(req)) => {
                        let mut fresh = self.connect().await?;
                        let resp = fresh.send_request(req).await?;
                        Ok(self.wrap(resp, fresh))
                    }
                    _ => Err(PoolError::Exchange(e.into_error())),
                }
            }
        }
    }

    fn wrap(
        self: &Arc<Self>,
        resp: Response<Incoming>,
        sender: SendRequest<ProxyBody>,
    ) -> Response<ProxyBody> {
        let pool = self.clone();
        resp.map(|inner| {
            http_body_util::BodyExt::boxed_unsync(ReturningBody {
                inner,
                home: Some((pool, sender)),
            })
        })
    }

    async fn take_idle(&self) -> Option<SendRequest<ProxyBody>> {
        loop {
            let idle = {
                let mut list = match self.idle.lock() {
                    Ok(l) => l,
                    Err(p) => p.into_inner(),
                };
                list.pop()?
            };
            if idle.sender.is_closed() || idle.since.elapsed() >= self.idle_timeout {
                continue;
            }
            let mut sender = idle.sender;
            if sender.is_ready() {
                return Some(sender);
            }
            // Put back at the end of its last response: the connection task may not have run
            // since. It becomes ready at its next turn, or reports that it closed.
            if sender.ready().await.is_ok() {
                return Some(sender);
            }
        }
    }

    fn give_back(&self, sender: SendRequest<ProxyBody>) {
        if sender.is_closed() {
            return;
        }
        let mut list = match self.idle.lock() {
            Ok(l) => l,
            Err(p) => p.into_inner(),
        };
        if list.len() < self.max_idle {
            list.push(Idle {
                sender,
                since: Instant::now(),
            });
        }
    }

    async fn connect(&self) -> Result<SendRequest<ProxyBody>, PoolError> {
        let failed = |reason: String| PoolError::Connect {
            authority: self.authority.to_string(),
            reason,
        };
        let stream = tokio::time::timeout(
            self.connect_timeout,
            TcpStream::connect(self.authority.as_str()),
        )
        .await
        .map_err(|_| failed(format!("no connection within {:?}", self.connect_timeout)))?
        .map_err(|e| failed(e.to_string()))?;
        let _ = stream.set_nodelay(true);
        let authority = self.authority.clone();
        let log = move |e: hyper::Error| {
            tracing::debug!(endpoint = %authority, error = %e, "Origin connection ended with an error.");
        };
        let Some(tls) = &self.tls else {
            let (sender, conn) = http1::Builder::new()
                .handshake(TokioIo::new(stream))
                .await
                .map_err(|e| failed(e.to_string()))?;
            tokio::spawn(async move { conn.await.map_err(log) });
            return Ok(sender);
        };
        // The TLS handshake counts against the connect timeout too: a failure here also means
        // nothing was sent.
        let stream = tokio::time::timeout(
            self.connect_timeout,
            tls.connector.connect(tls.server_name.clone(), stream),
        )
        .await
        .map_err(|_| {
            failed(format!(
                "no TLS handshake within {:?}",
                self.connect_timeout
            ))
        })?
        .map_err(|e| failed(format!("TLS handshake failed: {e}")))?;
        let (sender, conn) = http1::Builder::new()
            .handshake(TokioIo::new(stream))
            .await
            .map_err(|e| failed(e.to_string()))?;
        tokio::spawn(async move { conn.await.map_err(log) });
        Ok(sender)
    }
}

/// A response body that returns its connection to the pool when it ends. Dropped early (client
/// gone), it drops the connection instead: unread bytes would corrupt the next exchange.
struct ReturningBody {
    inner: Incoming,
    home: Option<(Arc<H1Pool>, SendRequest<ProxyBody>)>,
}

impl ReturningBody {
    fn go_home(&mut self) {
        if let Some((pool, sender)) = self.home.take() {
            pool.give_back(sender);
        }
    }
}

impl Body for ReturningBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let res = Pin::new(&mut self.inner).poll_frame(cx);
        match &res {
            Poll::Ready(None) => self.go_home(),
            Poll::Ready(Some(Ok(_))) if self.inner.is_end_stream() => self.go_home(),
            Poll::Ready(Some(Err(_))) => {
                self.home = None;
            }
            _ => {}
        }
        res.map(|o| o.map(|r| r.map_err(|e| -> BoxError { Box::new(e) })))
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for ReturningBody {
    fn drop(&mut self) {
        if self.inner.is_end_stream() {
            self.go_home();
        }
    }
}
