//! WebSocket: an HTTP/1.1 request that asks to switch to `websocket` (RFC 6455 §4.1) goes to
//! the origin with `Connection: upgrade` and `Upgrade: websocket`, through the same guards,
//! endpoint choice, forwarding fields and failover as any request. When the origin answers
//! `101 Switching Protocols` to `websocket`, the client's connection and the origin's are
//! joined and bytes are copied both ways, unread, until either side closes or neither has sent
//! anything for `[server] tunnel_idle_timeout`.
//!
//! Only `websocket` is offered to the origin, whatever else the client listed: other upgrades
//! (`h2c`, `TLS/1.0`) concern the hop they are sent on, and a switch to `h2c` would let a
//! client speak HTTP/2 to the origin past every stage of this node. A 101 to anything but
//! `websocket` is a broken answer (502). Requests that are not a WebSocket handshake lose
//! `Upgrade` as a hop-by-hop field and are answered as plain requests, as before. On a cached
//! route a handshake goes straight to the origin; a function route never switches.
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
use outpost_telemetry::metrics::Metrics;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::time::Instant;

use crate::origin::h1::Stream;

/// The protocol a WebSocket handshake switches to, and the only one ever offered to an origin.
pub const WEBSOCKET: HeaderValue = HeaderValue::from_static("websocket");

/// Whether a request is a WebSocket handshake (RFC 6455 §4.1) to pass on: an HTTP/1.1 `GET`
/// without a body whose `Connection` lists `upgrade`, whose one `Upgrade` lists `websocket`, and
/// which carries `Sec-WebSocket-Key` and `Sec-WebSocket-Version`. Every other request loses its
/// `Upgrade` as a hop-by-hop field.
pub fn is_websocket_handshake(method: &Method, version: Version, headers: &HeaderMap) -> bool {
    if method != Method::GET || version != Version::HTTP_11 {
        return false;
    }
    let mut upgrades = headers.get_all(header::UPGRADE).iter();
    let Some(upgrade) = upgrades.next() else {
        return false;
    };
    let has_body = headers.contains_key(header::TRANSFER_ENCODING)
        || headers
            .get(header::CONTENT_LENGTH)
            .is_some_and(|v| v.as_bytes() != b"0");
    upgrades.next().is_none()
        && lists(upgrade, b"websocket")
        && !has_body
        && headers.contains_key(header::SEC_WEBSOCKET_KEY)
        && headers.contains_key(header::SEC_WEBSOCKET_VERSION)
        && headers
            .get_all(header::CONNECTION)
            .iter()
            .any(|v| lists(v, b"upgrade"))
}

/// Whether an origin's 101 switched to WebSocket, the only protocol it was offered.
pub fn switched_to_websocket(headers: &HeaderMap) -> bool {
    let mut upgrades = headers.get_all(header::UPGRADE).iter();
    upgrades
        .next()
        .is_some_and(|v| v.as_bytes().trim_ascii().eq_ignore_ascii_case(b"websocket"))
        && upgrades.next().is_none()
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
///
/// The server runs this only after hyper's connection ended cleanly (and was dropped, which
/// settles `client` either way); the wait for the hand-over is bounded by `idle` all the same.
pub async fn join(
    client: OnUpgrade,
    (origin, read_ahead): (Stream, BytesMut),
    idle: Duration,
    metrics: Metrics,
) {
    let client = match tokio::time::timeout(idle, client).await {
        Ok(Ok(upgraded)) => upgraded,
        Ok(Err(e)) => {
            tracing::debug!(error = %e, "The client's connection was not handed over; tunnel not opened.");
            return;
        }
        Err(_) => {
            tracing::debug!(
                "The client's connection was not handed over in time; tunnel not opened."
            );
            return;
        }
    };
    let _open = metrics.websocket_opened();
    let mut client = TokioIo::new(client);
    // Flushed: over TLS the bytes would otherwise wait in the session for the next write.
    if !read_ahead.is_empty()
        && (client.write_all(&read_ahead).await.is_err() || client.flush().await.is_err())
    {
        return;
    }
    // The origin connection's read buffer (8 KiB or more): not kept for the tunnel's life.
    let sent_ahead = read_ahead.len() as u64;
    drop(read_ahead);
    let started = Instant::now();
    let last = AtomicU64::new(0);
    let (mut client_rx, mut client_tx) = tokio::io::split(Active {
        io: client,
        last: &last,
        started,
        read: 0,
    });
    let (mut origin_rx, mut origin_tx) = tokio::io::split(Active {
        io: origin,
        last: &last,
        started,
        read: 0,
    });
    // The first side to end ends the tunnel, once what it sent is passed on (as nginx does):
    // WebSocket has no half-close (its closing handshake comes first), and a side left open
    // after the other closed would hold the tunnel, and a connection permit, until the idle
    // timeout.
    let up = async {
        let copied = tokio::io::copy(&mut client_rx, &mut origin_tx).await;
        let _ = origin_tx.shutdown().await;
        copied
    };
    let down = async {
        let copied = tokio::io::copy(&mut origin_rx, &mut client_tx).await;
        let _ = client_tx.shutdown().await;
        copied
    };
    tokio::select! {
        copied = up => log_end("client", copied),
        copied = down => log_end("origin", copied),
        () = silence(&last, started, idle) => {
            tracing::debug!(idle_secs = idle.as_secs_f64(), "Tunnel closed: idle.");
        }
    }
    // What each side sent, however the tunnel ended (a byte read may not have been delivered
    // when it broke).
    let client = client_rx.unsplit(client_tx);
    let origin = origin_rx.unsplit(origin_tx);
    metrics.websocket_bytes(client.read, origin.read + sent_ahead);
}

fn log_end(side: &str, copied: std::io::Result<u64>) {
    match copied {
        Ok(_) => tracing::debug!(side, "Tunnel closed by one side."),
        Err(e) => tracing::debug!(side, error = %e, "Tunnel broken."),
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

/// One side of a tunnel, noting when bytes last arrived on it, and how many did.
struct Active<'a, T> {
    io: T,
    last: &'a AtomicU64,
    started: Instant,
    read: u64,
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
        let n = buf.filled().len() - before;
        if matches!(polled, Poll::Ready(Ok(()))) && n > 0 {
            this.read += n as u64;
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

    /// A handshake's fixed fields, with `fields` added.
    fn handshake(fields: &[(&str, &str)]) -> HeaderMap {
        let mut all = vec![
            ("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ=="),
            ("sec-websocket-version", "13"),
        ];
        all.extend_from_slice(fields);
        headers(&all)
    }

    #[test]
    fn websocket_handshakes_are_recognised() {
        for fields in [
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
            // Offered alongside another protocol: only websocket goes on.
            vec![("connection", "upgrade"), ("upgrade", "h2c, websocket")],
            vec![
                ("connection", "upgrade"),
                ("upgrade", "websocket"),
                ("content-length", "0"),
            ],
        ] {
            assert!(
                is_websocket_handshake(&Method::GET, Version::HTTP_11, &handshake(&fields)),
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
            (
                Method::GET,
                Version::HTTP_11,
                [ws.as_slice(), &[("content-length", "5")]].concat(),
            ),
            (
                Method::GET,
                Version::HTTP_11,
                [ws.as_slice(), &[("transfer-encoding", "chunked")]].concat(),
            ),
        ] {
            assert!(
                !is_websocket_handshake(&method, version, &handshake(&fields)),
                "{method} {version:?} {fields:?}"
            );
        }
        // The handshake's own fields are required too.
        assert!(!is_websocket_handshake(
            &Method::GET,
            Version::HTTP_11,
            &headers(&ws)
        ));
        let no_version = [
            ws.as_slice(),
            &[("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==")],
        ]
        .concat();
        assert!(!is_websocket_handshake(
            &Method::GET,
            Version::HTTP_11,
            &headers(&no_version)
        ));
    }

    #[test]
    fn only_a_switch_to_websocket_is_taken() {
        assert!(switched_to_websocket(&headers(&[("upgrade", "websocket")])));
        assert!(switched_to_websocket(&headers(&[("upgrade", "WebSocket")])));
        for fields in [
            vec![],
            vec![("upgrade", "h2c")],
            vec![("upgrade", "websocket, h2c")],
            vec![("upgrade", "websocket"), ("upgrade", "h2c")],
        ] {
            assert!(!switched_to_websocket(&headers(&fields)), "{fields:?}");
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
