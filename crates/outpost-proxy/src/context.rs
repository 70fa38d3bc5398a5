//! The context stage: who is asking, from where, under which request id and trace.
//!
//! Built once per request before routing. Request ids from clients are believed only from
//! trusted proxies (a client must not choose the id that correlates our logs); W3C
//! `traceparent` is accepted from anyone, as the spec intends, and this hop gets a new span id.

use std::net::{IpAddr, SocketAddr};

use bytes::Bytes;
use http::{HeaderMap, HeaderValue};

use crate::geo::{Location, Locator};

/// Scheme a listener speaks, for `X-Forwarded-Proto`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scheme {
    /// Plain HTTP.
    Http,
    /// HTTP over TLS.
    Https,
}

impl Scheme {
    /// Header value.
    pub fn as_str(self) -> &'static str {
        match self {
            Scheme::Http => "http",
            Scheme::Https => "https",
        }
    }
}

/// Facts about the client connection, shared by every request on it.
#[derive(Debug)]
pub struct ConnInfo {
    /// The TCP peer.
    pub peer: SocketAddr,
    /// Whether the listener is TLS.
    pub scheme: Scheme,
    /// The peer's IP as a header value (`X-Forwarded-For`), made once per connection.
    pub peer_ip: HeaderValue,
    /// What the connection becomes once its HTTP/1.1 ends in a protocol switch.
    tunnel: TunnelSlot,
}

impl ConnInfo {
    /// The facts of a new connection.
    pub fn new(peer: SocketAddr, scheme: Scheme) -> ConnInfo {
        let ip = peer.ip().to_string();
        ConnInfo {
            peer,
            scheme,
            peer_ip: shared_value(ip.into_bytes()).unwrap_or(HeaderValue::from_static("")),
            tunnel: TunnelSlot::default(),
        }
    }

    /// Leaves the tunnel of a switched connection (a WebSocket) for the server to run once
    /// hyper hands the connection over (`crate::tunnel`).
    pub(crate) fn set_tunnel(&self, tunnel: Tunnel) {
        *self.tunnel.lock() = Some(tunnel);
    }

    /// The tunnel left by [`Self::set_tunnel`], if a request switched the connection. The
    /// server runs it inside the connection's task: it keeps the connection's permit, counts
    /// as an open connection and is waited for on drain.
    pub fn take_tunnel(&self) -> Option<Tunnel> {
        self.tunnel.lock().take()
    }
}

/// The rest of a switched connection's life: bytes copied between client and origin.
pub type Tunnel = std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>;

#[derive(Default)]
struct TunnelSlot(std::sync::Mutex<Option<Tunnel>>);

impl TunnelSlot {
    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Tunnel>> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl std::fmt::Debug for TunnelSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.lock().is_some() {
            "Some(Tunnel)"
        } else {
            "None"
        })
    }
}

/// A header value whose clones share its one allocation. `HeaderValue::from_str` copies into
/// a buffer whose first clone allocates again; values sent to the origin and back to the
/// client are cloned on every request.
pub(crate) fn shared_value<T>(bytes: T) -> Option<HeaderValue>
where
    T: AsRef<[u8]> + Send + 'static,
{
    HeaderValue::from_maybe_shared(Bytes::from_owner(bytes)).ok()
}

/// A request's correlation id: visible ASCII, kept as the header value it is sent as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestId(HeaderValue);

impl RequestId {
    /// The id as text.
    pub fn as_str(&self) -> &str {
        // Only visible ASCII is ever stored (checked or generated), so this never fails.
        self.0.to_str().unwrap_or("")
    }

    /// The `X-Request-Id` value (a clone shares the bytes).
    pub fn header(&self) -> HeaderValue {
        self.0.clone()
    }

    /// A fresh 128-bit random id, as 32 lowercase hex digits.
    pub fn generate() -> RequestId {
        let mut digits = [0u8; 32];
        hex_into(&fastrand::u128(..).to_be_bytes(), &mut digits);
        RequestId(shared_value(digits).unwrap_or(HeaderValue::from_static("")))
    }

    /// A client's id, if it is one this node would send on (visible ASCII, 1..=200 bytes).
    fn accept(v: &HeaderValue) -> Option<RequestId> {
        let s = v.to_str().ok()?;
        is_valid_request_id(s).then(|| RequestId(v.clone()))
    }
}

impl std::ops::Deref for RequestId {
    type Target = str;
    fn deref(&self) -> &str {
        self.as_str()
    }
}

impl std::fmt::Display for RequestId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Per-request context threaded through the stages.
#[derive(Debug, Clone)]
pub struct RequestContext {
    /// Correlation id sent to the origin and back to the client.
    pub request_id: RequestId,
    /// W3C trace context for this hop.
    pub trace: TraceContext,
    /// Whether the TCP peer is a trusted proxy.
    pub peer_trusted: bool,
    /// The client's IP after walking trusted proxies.
    pub client_ip: IpAddr,
    /// Where the client is.
    pub location: Location,
}

impl RequestContext {
    /// Builds the context from the connection and request headers.
    pub fn new(conn: &ConnInfo, headers: &HeaderMap, locator: &Locator) -> RequestContext {
        let peer_trusted = locator.is_trusted(conn.peer.ip());
        let client_ip = locator.client_ip(conn.peer.ip(), peer_trusted, headers);
        let location = locator.locate(client_ip, peer_trusted, headers);
        let request_id = peer_trusted
            .then(|| headers.get("x-request-id"))
            .flatten()
            .and_then(RequestId::accept)
            .unwrap_or_else(RequestId::generate);
        let trace = headers
            .get("traceparent")
            .and_then(|v| v.to_str().ok())
            .and_then(TraceContext::parse)
            .map(|parent| parent.child())
            .unwrap_or_else(TraceContext::new_root);
        RequestContext {
            request_id,
            trace,
            peer_trusted,
            client_ip,
            location,
        }
    }
}

fn is_valid_request_id(v: &str) -> bool {
    !v.is_empty() && v.len() <= 200 && v.bytes().all(|b| b.is_ascii_graphic())
}

/// Lowercase hex of `bytes` into `out` (twice as long); a table lookup, since ids are made on
/// every request.
fn hex_into(bytes: &[u8], out: &mut [u8]) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    for (b, pair) in bytes.iter().zip(out.chunks_exact_mut(2)) {
        pair[0] = DIGITS[usize::from(b >> 4)];
        pair[1] = DIGITS[usize::from(b & 0x0f)];
    }
}

fn hex(bytes: &[u8]) -> String {
    let mut out = vec![0u8; bytes.len() * 2];
    hex_into(bytes, &mut out);
    String::from_utf8(out).unwrap_or_default()
}

/// W3C Trace Context (`traceparent`) for one hop. Ids are kept as numbers and written out
/// only where they are sent or logged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TraceContext {
    /// The trace id, never zero.
    trace_id: u128,
    /// This hop's span id, never zero.
    span_id: u64,
    /// Trace flags (bit 0: sampled).
    pub flags: u8,
}

impl TraceContext {
    /// Parses a `traceparent` value per W3C Trace Context level 1; `None` when invalid.
    pub fn parse(v: &str) -> Option<TraceContext> {
        let v = v.trim();
        let parts: Vec<&str> = v.splitn(5, '-').collect();
        if parts.len() < 4 {
            return None;
        }
        let (version, trace_id, parent_id, flags) = (parts[0], parts[1], parts[2], parts[3]);
        let lower_hex = |s: &str, n: usize| {
            s.len() == n && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
        };
        if !lower_hex(version, 2) || version == "ff" {
            return None;
        }
        // Version 00 has exactly four fields; later versions may append more.
        if version == "00" && parts.len() != 4 {
            return None;
        }
        if !lower_hex(trace_id, 32) || trace_id.bytes().all(|b| b == b'0') {
            return None;
        }
        if !lower_hex(parent_id, 16) || parent_id.bytes().all(|b| b == b'0') {
            return None;
        }
        if !lower_hex(flags, 2) {
            return None;
        }
        Some(TraceContext {
            trace_id: u128::from_str_radix(trace_id, 16).ok()?,
            span_id: u64::from_str_radix(parent_id, 16).ok()?,
            flags: u8::from_str_radix(flags, 16).ok()?,
        })
    }

    /// A new trace with this node as root (sampled).
    pub fn new_root() -> TraceContext {
        TraceContext {
            trace_id: fastrand::u128(1..),
            span_id: fastrand::u64(1..),
            flags: 1,
        }
    }

    /// This hop's context: same trace and flags, a new span id.
    pub fn child(&self) -> TraceContext {
        TraceContext {
            trace_id: self.trace_id,
            span_id: fastrand::u64(1..),
            flags: self.flags & 0x01,
        }
    }

    /// The trace id: 32 lowercase hex digits.
    pub fn trace_id(&self) -> String {
        hex(&self.trace_id.to_be_bytes())
    }

    /// This hop's span id: 16 lowercase hex digits.
    pub fn span_id(&self) -> String {
        hex(&self.span_id.to_be_bytes())
    }

    /// The `traceparent` header value to send to the origin (`00-trace-span-flags`).
    pub fn header_value(&self) -> HeaderValue {
        let mut v = [b'-'; 55];
        v[..2].copy_from_slice(b"00");
        hex_into(&self.trace_id.to_be_bytes(), &mut v[3..35]);
        hex_into(&self.span_id.to_be_bytes(), &mut v[36..52]);
        hex_into(&[self.flags], &mut v[53..55]);
        shared_value(v).unwrap_or(HeaderValue::from_static(""))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn valid_traceparent_keeps_trace_and_gets_a_new_span() {
        let parent = TraceContext::parse("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
            .expect("valid");
        let child = parent.child();
        assert_eq!(child.trace_id(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(parent.span_id(), "00f067aa0ba902b7");
        assert_ne!(child.span_id(), parent.span_id());
        let header = child.header_value();
        let header = header.to_str().expect("ascii");
        assert_eq!(
            header,
            format!("00-4bf92f3577b34da6a3ce929d0e0e4736-{}-01", child.span_id())
        );
        assert_eq!(
            TraceContext::parse(header).map(|t| t.trace_id),
            Some(child.trace_id)
        );
    }

    #[test]
    fn invalid_traceparents_are_rejected() {
        for bad in [
            "",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "0-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        ] {
            assert!(TraceContext::parse(bad).is_none(), "{bad:?}");
        }
        assert!(
            TraceContext::parse("01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-x")
                .is_some(),
            "future versions may append fields"
        );
    }

    #[test]
    fn generated_ids_are_well_formed() {
        let root = TraceContext::new_root();
        let header = root.header_value();
        assert_eq!(
            TraceContext::parse(header.to_str().expect("ascii")),
            Some(root)
        );
        let id = RequestId::generate();
        assert_eq!(id.len(), 32);
        assert!(
            id.bytes()
                .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
        );
        assert_ne!(id, RequestId::generate());
        assert_eq!(id.header().to_str().ok(), Some(id.as_str()));
    }

    proptest! {
        #[test]
        fn traceparent_parser_never_panics(s in ".{0,80}") {
            let _ = TraceContext::parse(&s);
        }
    }
}
