//! The context stage: who is asking, from where, under which request id and trace.
//!
//! Built once per request before routing. Request ids from clients are believed only from
//! trusted proxies (a client must not choose the id that correlates our logs); W3C
//! `traceparent` is accepted from anyone, as the spec intends, and this hop gets a new span id.

use std::net::{IpAddr, SocketAddr};

use http::HeaderMap;

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
#[derive(Debug, Clone)]
pub struct ConnInfo {
    /// The TCP peer.
    pub peer: SocketAddr,
    /// Whether the listener is TLS.
    pub scheme: Scheme,
}

/// Per-request context threaded through the stages.
#[derive(Debug, Clone)]
pub struct RequestContext {
    /// Correlation id sent to the origin and back to the client.
    pub request_id: String,
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
            .and_then(|v| v.to_str().ok())
            .filter(|v| is_valid_request_id(v))
            .map(str::to_owned)
            .unwrap_or_else(new_request_id);
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

/// A fresh 128-bit random request id, as 32 lowercase hex digits.
pub fn new_request_id() -> String {
    hex(&fastrand::u128(..).to_be_bytes())
}

/// Lowercase hex; a table lookup, since ids are made on every request.
fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(char::from(DIGITS[usize::from(b >> 4)]));
        s.push(char::from(DIGITS[usize::from(b & 0x0f)]));
    }
    s
}

/// W3C Trace Context (`traceparent`) for one hop.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TraceContext {
    /// 32 lowercase hex digits, never all zero.
    pub trace_id: String,
    /// This hop's span id: 16 lowercase hex digits, never all zero.
    pub span_id: String,
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
            trace_id: trace_id.to_owned(),
            span_id: parent_id.to_owned(),
            flags: u8::from_str_radix(flags, 16).ok()?,
        })
    }

    /// A new trace with this node as root (sampled).
    pub fn new_root() -> TraceContext {
        TraceContext {
            trace_id: hex(&nonzero_u128().to_be_bytes()),
            span_id: new_span_id(),
            flags: 1,
        }
    }

    /// This hop's context: same trace and flags, a new span id.
    pub fn child(&self) -> TraceContext {
        TraceContext {
            trace_id: self.trace_id.clone(),
            span_id: new_span_id(),
            flags: self.flags & 0x01,
        }
    }

    /// The `traceparent` header value to send to the origin.
    pub fn header_value(&self) -> String {
        format!("00-{}-{}-{:02x}", self.trace_id, self.span_id, self.flags)
    }
}

fn nonzero_u128() -> u128 {
    fastrand::u128(1..)
}

fn new_span_id() -> String {
    hex(&fastrand::u64(1..).to_be_bytes())
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
        assert_eq!(child.trace_id, "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_ne!(child.span_id, parent.span_id);
        assert!(child.header_value().ends_with("-01"));
        assert_eq!(child.header_value().len(), 55);
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
        assert!(TraceContext::parse(&root.header_value()).is_some());
        let id = new_request_id();
        assert_eq!(id.len(), 32);
        assert_ne!(id, new_request_id());
    }

    proptest! {
        #[test]
        fn traceparent_parser_never_panics(s in ".{0,80}") {
            let _ = TraceContext::parse(&s);
        }
    }
}
