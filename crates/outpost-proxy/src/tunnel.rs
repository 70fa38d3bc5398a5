//! WebSocket: an HTTP/1.1 request that asks to switch to `websocket` (RFC 6455 §4.1) goes to
//! the origin with its `Connection: upgrade` and `Upgrade`, through the same guards, endpoint
//! choice, forwarding fields and failover as any request. When the origin answers
//! `101 Switching Protocols`, the client's connection and the origin's are joined and bytes are
//! copied both ways, unread, until either side closes or neither has sent anything for
//! `[server] tunnel_idle_timeout`.
//!
//! Only `websocket` is tunnelled: other upgrades (`h2c`, `TLS/1.0`) concern the hop they are
//! sent on, so `Upgrade` is removed from them as a hop-by-hop field and they are answered as
//! plain requests, as before. A cached or function route never switches.
//!
//! The tunnel runs inside the client connection's task, after hyper lets go of the connection
//! ([`crate::context::ConnInfo::take_tunnel`]): it holds the connection's permit, counts as an
//! open connection, and on SIGTERM the drain waits for it up to `drain_timeout`.

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::BytesMut;
use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, Version};
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::time::Instant;

use crate::origin::h1::Stream;

/// The `Upgrade` value to send on when a request asks for a WebSocket: an HTTP/1.1 `GET`
/// whose `Connection` lists `upgrade` and whose `Upgrade` lists `websocket`. `None` for every
/// other request (their `Upgrade` is dropped as hop-by-hop).
pub fn websocket_upgrade(
    method: &Method,
    version: Version,
    headers: &HeaderMap,
) -> Option<HeaderValue> {
    if method != Method::GET || version != Version::HTTP_11 {
        return None;
    }
    let mut upgrades = headers.get_all(header::UPGRADE).iter();
    let upgrade = upgrades.next()?;
    if upgrades.next().is_some() || !lists(upgrade, b"websocket") {
        return None;
    }
    headers
        .get_all(header::CONNECTION)
        .iter()
        .any(|v| lists(v, b"upgrade"))
        .then(|| upgrade.clone())
}

/// Whether a comma-separated field value lists `token` (case-insensitive); a protocol may
/// carry a version (`websocket/13`), which does not count as `websocket`.
fn lists(value: &HeaderValue, token: &[u8]) -> bool {
    value
        .as_bytes()
        .split(|b| *b == b',')
        .any(|t| t.trim_ascii().eq_ignore_ascii_case(token))
}

/// Joins the client's connection (once hyper has written the 101 and hands it over) with the
/// origin's, first giving the client what the origin sent past its 101 head, and copies both
/// ways until one side closes or both are silent for `idle`.
pub async fn join(client: OnUpgrade, (origin, read_ahead): (Stream, BytesMut), idle: Duration) {
    let client = match client.await {
        Ok(upgraded) => upgraded,
        Err(e) => {
            tracing::debug!(error = %e, "The client's connection was not handed over; tunnel not opened.");
            return;
        }
    };
    let mut client = TokioIo::new(client);
    if !read_ahead.is_empty() && client.write_all(&read_ahead).await.is_err() {
        return;
    }
    let started = Instant::now();
    let last = AtomicU64::new(0);
    let mut client = Active {
        io: client,
        last: &last,
        started,
    };
    let mut origin = Active {
        io: origin,
        last: &last,
        started,
    };
    tokio::select! {
        copied = tokio::io::copy_bidirectional(&mut client, &mut origin) => match copied {
            Ok((up, down)) => tracing::debug!(up, down, "Tunnel closed."),
            Err(e) => tracing::debug!(error = %e, "Tunnel broken."),
        },
        () = silence(&last, started, idle) => {
            tracing::debug!(idle_secs = idle.as_secs_f64(), "Tunnel closed: idle.");
        }
    }
}

/// Returns once nothing has moved through the tunnel for `idle` (`last`: milliseconds after
/// `started` of the last byte either way).
async fn silence(last: &AtomicU64, started: Instant, idle: Duration) {
    loop {
        let moved = started + Duration::from_millis(last.load(Ordering::Relaxed));
        let deadline = crate::alarm::deadline_after(moved, idle);
        if Instant::now() >= deadline {
            return;
        }
        tokio::time::sleep_until(deadline).await;
    }
}

/// One side of a tunnel, noting when bytes last arrived on it.
struct Active<'a, T> {
    io: T,
    last: &'a AtomicU64,
    started: Instant,
}

impl<T> Active<'_, T> {
    fn moved(&self) {
        let ms = u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last.store(ms, Ordering::Relaxed);
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Active<'_, T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let polled = Pin::new(&mut this.io).poll_read(cx, buf);
        if matches!(polled, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            this.moved();
        }
        polled
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Active<'_, T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        // Every byte written was read first, and noted then: one clock read per piece.
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(fields: &[(&str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in fields {
            map.append(
                http::HeaderName::from_bytes(name.as_bytes()).expect("name"),
                HeaderValue::from_str(value).expect("value"),
            );
        }
        map
    }

    #[test]
    fn websocket_handshakes_are_recognised() {
        let asks = [
            vec![("connection", "Upgrade"), ("upgrade", "websocket")],
            vec![
                ("connection", "keep-alive, Upgrade"),
                ("upgrade", "WebSocket"),
            ],
            vec![
                ("connection", "keep-alive"),
                ("connection", "upgrade"),
                ("upgrade", "websocket"),
            ],
            vec![("connection", "upgrade"), ("upgrade", "foo/2, websocket")],
        ];
        for fields in asks {
            let got = websocket_upgrade(&Method::GET, Version::HTTP_11, &headers(&fields));
            let want = fields
                .iter()
                .find(|(n, _)| *n == "upgrade")
                .map(|(_, v)| *v);
            assert_eq!(
                got.as_ref().and_then(|v| v.to_str().ok()),
                want,
                "{fields:?}"
            );
        }
    }

    #[test]
    fn other_requests_are_not_switched() {
        let ws = [("connection", "upgrade"), ("upgrade", "websocket")];
        for (method, version, fields) in [
            (Method::POST, Version::HTTP_11, ws.to_vec()),
            (Method::GET, Version::HTTP_10, ws.to_vec()),
            (Method::GET, Version::HTTP_2, ws.to_vec()),
            (
                Method::GET,
                Version::HTTP_11,
                vec![("upgrade", "websocket")],
            ),
            (
                Method::GET,
                Version::HTTP_11,
                vec![("connection", "upgrade")],
            ),
            (
                Method::GET,
                Version::HTTP_11,
                vec![("connection", "upgrade"), ("upgrade", "h2c")],
            ),
            (
                Method::GET,
                Version::HTTP_11,
                vec![("connection", "upgrade"), ("upgrade", "websocket/13")],
            ),
            (
                Method::GET,
                Version::HTTP_11,
                vec![("connection", "upgraded"), ("upgrade", "websocket")],
            ),
            (
                Method::GET,
                Version::HTTP_11,
                vec![
                    ("connection", "upgrade"),
                    ("upgrade", "websocket"),
                    ("upgrade", "websocket"),
                ],
            ),
        ] {
            assert_eq!(
                websocket_upgrade(&method, version, &headers(&fields)),
                None,
                "{method} {version:?} {fields:?}"
            );
        }
    }

    #[tokio::test(start_paused = true)]
    async fn silence_waits_for_the_last_byte_plus_idle() {
        let started = Instant::now();
        let last = AtomicU64::new(0);
        let idle = Duration::from_secs(10);
        let waiting = silence(&last, started, idle);
        tokio::pin!(waiting);
        // Bytes moved at 6 s: silence is reached at 16 s, not at 10 s.
        tokio::select! {
            () = &mut waiting => panic!("silence before any time passed"),
            () = tokio::time::sleep(Duration::from_secs(6)) => {}
        }
        last.store(6_000, Ordering::Relaxed);
        tokio::select! {
            () = &mut waiting => panic!("silence 10 s after the start though bytes moved at 6 s"),
            () = tokio::time::sleep(Duration::from_secs(9)) => {}
        }
        tokio::select! {
            () = &mut waiting => {}
            () = tokio::time::sleep(Duration::from_secs(2)) => panic!("no silence 16 s in"),
        }
        assert!(Instant::now() >= started + Duration::from_secs(16));
    }
}
