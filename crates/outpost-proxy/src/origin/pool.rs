//! A per-endpoint pool of idle HTTP/1.1 connections ([`h1`](super::h1) does the exchanges).
//!
//! Why not hyper-util's pooled client (which h2 endpoints still use): on HTTP/1 it spawns a task
//! per request to put the connection back after the response, and checks out through a shared
//! map. Here a connection goes back to its endpoint's idle list the moment the response body
//! ends, with no task and no map.
//!
//! Safety rules: a connection is reused only if it is not older than the idle timeout and
//! nothing arrived on it while idle (a close, or stray bytes). A request that a reused
//! connection failed before any response byte arrived goes once more on a fresh connection
//! when that cannot repeat an action: its body was never read, and either nothing was written
//! or the method is idempotent.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::uri::Authority;
use http::{HeaderName, HeaderValue, Request, Response};
use tokio::net::TcpStream;
use tokio::time::Instant;

use super::h1::{self, Conn, ExchangeError, Stream};
use crate::body::ProxyBody;

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
    Exchange(#[from] ExchangeError),
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
    idle: Mutex<Vec<Conn>>,
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
        forwarding: &[(HeaderName, HeaderValue)],
        deadline: Instant,
    ) -> Result<Response<ProxyBody>, PoolError> {
        let (head, body) = req.into_parts();
        let (conn, reused) = match self.take_idle() {
            Some(c) => (c, true),
            None => (self.connect_by(deadline).await?, false),
        };
        match h1::exchange(conn, (&head, forwarding), body, self, deadline).await {
            Ok(resp) => Ok(resp),
            // A reused connection the origin had just closed: the request can go once more.
            Err(h1::Failure {
                error,
                retry: Some(body),
            }) if reused => {
                tracing::debug!(endpoint = %self.authority, error = %error, "Reused origin connection failed; retrying on a fresh one.");
                let fresh = self.connect_by(deadline).await?;
                h1::exchange(fresh, (&head, forwarding), body, self, deadline)
                    .await
                    .map_err(|f| PoolError::Exchange(f.error))
            }
            Err(failure) => Err(PoolError::Exchange(failure.error)),
        }
    }

    pub(super) fn take_idle(&self) -> Option<Conn> {
        let mut list = match self.idle.lock() {
            Ok(l) => l,
            Err(p) => p.into_inner(),
        };
        while let Some(mut conn) = list.pop() {
            if conn.since.elapsed() < self.idle_timeout && conn.still_open() {
                return Some(conn);
            }
        }
        None
    }

    /// The idle list, for tests that look at a pooled connection.
    #[cfg(test)]
    pub(super) fn idle_for_test(&self) -> std::sync::MutexGuard<'_, Vec<Conn>> {
        match self.idle.lock() {
            Ok(l) => l,
            Err(p) => p.into_inner(),
        }
    }

    /// Takes a connection back after a clean exchange.
    pub(super) fn give_back(&self, conn: Conn) {
        let mut list = match self.idle.lock() {
            Ok(l) => l,
            Err(p) => p.into_inner(),
        };
        // The oldest idle connection is at the bottom (the list is used as a stack): retire it
        // once past the idle timeout, so that a burst's leftovers are closed as traffic goes
        // on instead of waiting, closed by the origin, until something digs down to them.
        if list
            .first()
            .is_some_and(|oldest| conn.since.duration_since(oldest.since) >= self.idle_timeout)
        {
            list.remove(0);
        }
        if list.len() < self.max_idle {
            list.push(conn);
        }
    }

    /// [`Self::connect`], within the exchange's deadline too (a connect timeout longer than
    /// the route's timeout does not stretch it).
    async fn connect_by(&self, deadline: Instant) -> Result<Conn, PoolError> {
        tokio::time::timeout_at(deadline, self.connect())
            .await
            .unwrap_or(Err(PoolError::Exchange(ExchangeError::TimedOut)))
    }

    async fn connect(&self) -> Result<Conn, PoolError> {
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
        let Some(tls) = &self.tls else {
            return Ok(Conn::new(Stream::Plain(stream)));
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
        Ok(Conn::new(Stream::Tls(Box::new(stream))))
    }
}
