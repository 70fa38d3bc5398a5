//! Header filters on the way to the origin and on the way back (RFC 9110 §7.6).
//!
//! Request side: hop-by-hop fields go (including those named by `Connection`), client-supplied
//! internal headers go, and the node adds `X-Forwarded-*`, `Via`, `X-Request-Id` and
//! `traceparent`. Response side: hop-by-hop fields go and the node adds `Via`, `X-Served-By`,
//! `X-Request-Id` and `Server-Timing`.

use http::header::{self, HeaderMap, HeaderName, HeaderValue};

use crate::context::{RequestContext, Scheme};
use crate::geo::Locator;

/// Fields that describe one connection, never forwarded (RFC 9110 §7.6.1, plus the
/// de-facto `Proxy-Connection` and `Keep-Alive`).
const HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
];

/// Removes hop-by-hop fields, including every field the `Connection` header names.
/// `Upgrade` goes too: the handler puts it back on a WebSocket handshake (`crate::tunnel`).
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    strip_matching(headers, |_| false);
}

/// Removes hop-by-hop fields and every field for which `extra` is true, in one pass over the
/// map (a request carries a handful of fields; a pass is cheaper than a lookup per name).
fn strip_matching(headers: &mut HeaderMap, mut extra: impl FnMut(&HeaderName) -> bool) {
    let mut doomed: Vec<HeaderName> = Vec::new();
    for name in headers.keys() {
        if name == header::CONNECTION {
            for v in headers.get_all(header::CONNECTION) {
                let listed = v.to_str().unwrap_or("").split(',');
                doomed.extend(
                    listed.filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok()),
                );
            }
        }
        if HOP_BY_HOP.contains(name) || name == header::UPGRADE || extra(name) {
            doomed.push(name.clone());
        }
    }
    for name in doomed {
        headers.remove(name);
    }
}

/// What the request filter needs to know besides the headers.
pub struct ForwardInfo<'a> {
    /// Host the client asked for (Host header or `:authority`).
    pub host: Option<&'a HeaderValue>,
    /// Listener scheme.
    pub scheme: Scheme,
    /// The TCP peer's address.
    pub peer_ip: &'a HeaderValue,
    /// The stripped prefix, when the route strips one.
    pub stripped_prefix: Option<&'a str>,
    /// `Via` entry of this hop (`1.1 tokyo-1`).
    pub via: &'a HeaderValue,
}

const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
const X_FORWARDED_PREFIX: HeaderName = HeaderName::from_static("x-forwarded-prefix");
const FORWARDED: HeaderName = HeaderName::from_static("forwarded");
/// Correlation id header.
pub const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
/// Which node served a response.
pub const X_SERVED_BY: HeaderName = HeaderName::from_static("x-served-by");
const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
const SERVER_TIMING: HeaderName = HeaderName::from_static("server-timing");

/// Prepares request headers for the origin: [`strip_request`] then [`add_forwarding`].
pub fn request_headers(
    headers: &mut HeaderMap,
    ctx: &RequestContext,
    info: &ForwardInfo<'_>,
    locator: &Locator,
) {
    let present = strip_request(headers, ctx, locator, &[]);
    add_forwarding(headers, ctx, info, present);
}

/// Removes what must never travel on or influence anything: hop-by-hop fields, internal
/// `x-outpost-*` headers and, from untrusted peers, location and forwarding headers. The cache
/// stage sees requests in this state.
/// `internal` lists the operator's extra internal headers (`[server] internal_headers`).
/// Returns which of the fields the node sets on the way out the request still carries.
pub fn strip_request(
    headers: &mut HeaderMap,
    ctx: &RequestContext,
    locator: &Locator,
    internal: &[HeaderName],
) -> Present {
    let untrusted = !ctx.peer_trusted;
    let location = locator.location_headers();
    let forwarded = [
        X_FORWARDED_PROTO,
        X_FORWARDED_HOST,
        X_FORWARDED_PREFIX,
        FORWARDED,
    ];
    let stripped = |name: &HeaderName| {
        is_internal(name)
            || internal.contains(name)
            || (untrusted && (location.contains(&name) || forwarded.contains(name)))
    };
    let mut present = Present(0);
    strip_matching(headers, |name| {
        let strip = stripped(name)
            || underscore_twin(name).is_some_and(|twin| stripped(&twin) || set_here(&twin));
        if !strip {
            present.note(name);
        }
        strip
    });
    present
}

/// `x_forwarded_for` for `x-forwarded-for`: CGI and WSGI servers (and some frameworks) map both
/// spellings to one variable, so a twin of a field this node strips or sets would reach the
/// application as if the node had sent it. nginx drops every underscore field by default; here
/// only the twins of managed fields go.
fn underscore_twin(name: &HeaderName) -> Option<HeaderName> {
    let s = name.as_str();
    s.contains('_')
        .then(|| HeaderName::from_bytes(s.replace('_', "-").as_bytes()).ok())
        .flatten()
}

/// Fields this node sets on every forwarded request, replacing what a client sent.
fn set_here(name: &HeaderName) -> bool {
    [
        X_FORWARDED_FOR,
        X_REQUEST_ID,
        TRACEPARENT,
        header::VIA,
        header::HOST,
    ]
    .contains(name)
}

/// Which of the fields [`forwarding_fields`] sets a request may carry already. [`strip_request`]
/// notes them in its pass over the headers, so that a request carrying none of them (nearly
/// all) costs no lookup for them; a name noted may have been removed since, never the reverse.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Present(u8);

impl Present {
    const FOR: u8 = 1;
    const PROTO: u8 = 2;
    const HOST: u8 = 4;
    const PREFIX: u8 = 8;
    const REQUEST_ID: u8 = 16;
    const TRACEPARENT: u8 = 32;

    /// Nothing known: every field is looked up (headers that did not come through
    /// [`strip_request`]).
    pub const UNKNOWN: Present = Present(u8::MAX);

    fn note(&mut self, name: &HeaderName) {
        let s = name.as_str();
        if !s.starts_with(['x', 't']) {
            return;
        }
        self.0 |= match s {
            "x-forwarded-for" => Self::FOR,
            "x-forwarded-proto" => Self::PROTO,
            "x-forwarded-host" => Self::HOST,
            "x-forwarded-prefix" => Self::PREFIX,
            "x-request-id" => Self::REQUEST_ID,
            "traceparent" => Self::TRACEPARENT,
            _ => 0,
        };
    }

    fn has(self, field: u8) -> bool {
        self.0 & field != 0
    }
}

/// Adds what the origin learns about the hop: `X-Forwarded-*`, `Host` for HTTP/2 clients,
/// `Via`, `X-Request-Id` and `traceparent`. Runs only for requests that go to an origin.
/// `present` is what [`strip_request`] found in these headers.
pub fn add_forwarding(
    headers: &mut HeaderMap,
    ctx: &RequestContext,
    info: &ForwardInfo<'_>,
    present: Present,
) {
    let fields = forwarding_fields(headers, ctx, info, present);
    // One growth for the fields added, instead of a rehash at each threshold crossed.
    headers.reserve(fields.len());
    for (name, value) in fields {
        headers.append(name, value);
    }
}

/// The fields [`add_forwarding`] adds, with what they replace already taken out of `headers`:
/// appended to `headers` after these, in order, they make the request the origin must see.
/// Only `Via` may also be among `headers` (ours is the list's last entry). The
/// HTTP/1.1 origin client writes them straight into the request head instead, which spares a
/// header-map insertion (hash, probe, bucket) per field on every proxied request.
pub fn forwarding_fields(
    headers: &mut HeaderMap,
    ctx: &RequestContext,
    info: &ForwardInfo<'_>,
    present: Present,
) -> Vec<(HeaderName, HeaderValue)> {
    // `present` may name a field that is gone, never miss one that is there: a field added
    // between `strip_request` and here would go out twice, the client's and ours.
    debug_assert!(
        [
            (Present::FOR, X_FORWARDED_FOR),
            (Present::PROTO, X_FORWARDED_PROTO),
            (Present::HOST, X_FORWARDED_HOST),
            (Present::PREFIX, X_FORWARDED_PREFIX),
            (Present::REQUEST_ID, X_REQUEST_ID),
            (Present::TRACEPARENT, TRACEPARENT),
        ]
        .iter()
        .all(|(bit, name)| present.has(*bit) || !headers.contains_key(name)),
        "a managed field was added after strip_request"
    );
    let mut fields = Vec::with_capacity(8);
    // X-Forwarded-For: a trusted proxy's chain is extended, anyone else's is replaced (empty
    // entries at the chain's start are not carried on).
    let mut chain = String::new();
    if present.has(Present::FOR) {
        if ctx.peer_trusted {
            for v in headers.get_all(&X_FORWARDED_FOR) {
                if let Ok(s) = v.to_str() {
                    if !chain.is_empty() {
                        chain.push_str(", ");
                    }
                    chain.push_str(s);
                }
            }
        }
        headers.remove(&X_FORWARDED_FOR);
    }
    let forwarded_for = if chain.is_empty() {
        info.peer_ip.clone()
    } else {
        chain.push_str(", ");
        chain.push_str(info.peer_ip.to_str().unwrap_or(""));
        HeaderValue::from_str(&chain).unwrap_or_else(|_| info.peer_ip.clone())
    };
    fields.push((X_FORWARDED_FOR, forwarded_for));
    // Proto and host: what a trusted proxy said stands.
    if !(present.has(Present::PROTO) && headers.contains_key(&X_FORWARDED_PROTO)) {
        fields.push((
            X_FORWARDED_PROTO,
            HeaderValue::from_static(info.scheme.as_str()),
        ));
    }
    if let Some(host) = info.host {
        if !(present.has(Present::HOST) && headers.contains_key(&X_FORWARDED_HOST)) {
            fields.push((X_FORWARDED_HOST, host.clone()));
        }
        // HTTP/2 clients send :authority instead of Host; the origin needs a Host.
        if !headers.contains_key(header::HOST) {
            fields.push((header::HOST, host.clone()));
        }
    }
    if let Some(prefix) = info.stripped_prefix {
        let prefix = prefix.trim_end_matches('/');
        let prior = present
            .has(Present::PREFIX)
            .then(|| headers.get(&X_FORWARDED_PREFIX))
            .flatten()
            .and_then(|v| v.to_str().ok())
            .map(|p| p.trim_end_matches('/').to_owned());
        let value = match prior {
            Some(p) => HeaderValue::from_str(&format!("{p}{prefix}")),
            None => HeaderValue::from_str(prefix),
        };
        // An unusable prefix leaves what was there.
        if let Ok(v) = value {
            if present.has(Present::PREFIX) {
                headers.remove(&X_FORWARDED_PREFIX);
            }
            fields.push((X_FORWARDED_PREFIX, v));
        }
    }
    fields.push((header::VIA, info.via.clone()));
    if present.has(Present::REQUEST_ID) {
        headers.remove(&X_REQUEST_ID);
    }
    fields.push((X_REQUEST_ID, ctx.request_id.header()));
    if present.has(Present::TRACEPARENT) {
        headers.remove(&TRACEPARENT);
    }
    fields.push((TRACEPARENT, ctx.trace.header_value()));
    fields
}

/// Headers only this node may set; a client must never be able to fake them.
fn is_internal(name: &HeaderName) -> bool {
    name.as_str().starts_with("x-outpost-") || name == X_SERVED_BY
}

/// Timings reported in `Server-Timing`.
pub struct Timings {
    /// Time spent in this node up to the response head, excluding the origin.
    pub edge_ms: f64,
    /// Time the origin took to send its response head, if asked.
    pub origin_ms: Option<f64>,
}

/// Finishes response headers for the client.
pub fn response_headers(
    headers: &mut HeaderMap,
    via: &HeaderValue,
    node_id: &HeaderValue,
    request_id: &HeaderValue,
    timings: &Timings,
) {
    strip_hop_by_hop(headers);
    headers.append(header::VIA, via.clone());
    headers.insert(X_SERVED_BY, node_id.clone());
    headers.insert(X_REQUEST_ID, request_id.clone());
    let mut timing = Text::<64>::default();
    timing.push(b"edge;dur=");
    timing.millis(timings.edge_ms);
    if let Some(o) = timings.origin_ms {
        timing.push(b", origin;dur=");
        timing.millis(o);
    }
    if let Ok(v) = HeaderValue::from_bytes(timing.as_bytes()) {
        headers.append(SERVER_TIMING, v);
    }
}

/// A short header value written on the stack: `format!` would allocate and grow a `String`
/// on every request, and then `HeaderValue` copies it again.
struct Text<const N: usize> {
    buf: [u8; N],
    len: usize,
}

impl<const N: usize> Default for Text<N> {
    fn default() -> Self {
        Text {
            buf: [0; N],
            len: 0,
        }
    }
}

impl<const N: usize> Text<N> {
    /// Appends what fits.
    fn push(&mut self, bytes: &[u8]) {
        let n = bytes.len().min(N - self.len);
        self.buf[self.len..self.len + n].copy_from_slice(&bytes[..n]);
        self.len += n;
    }

    /// Milliseconds with three decimals, with integer arithmetic (float formatting is
    /// measurably slow on a per-request path).
    fn millis(&mut self, ms: f64) {
        // Saturates for absurd values; durations here are far below u64::MAX µs.
        let micros = (ms.max(0.0) * 1000.0).round() as u64;
        self.int(micros / 1000);
        let frac = micros % 1000;
        self.push(&[
            b'.',
            b'0' + (frac / 100) as u8,
            b'0' + (frac / 10 % 10) as u8,
            b'0' + (frac % 10) as u8,
        ]);
    }

    fn int(&mut self, mut n: u64) {
        let mut digits = [0u8; 20];
        let mut i = digits.len();
        loop {
            i -= 1;
            digits[i] = b'0' + (n % 10) as u8;
            n /= 10;
            if n == 0 {
                break;
            }
        }
        self.push(&digits[i..]);
    }

    fn as_bytes(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

/// Whether the request already passed through the node whose `Via` entry ends in `node_id`.
pub fn is_loop(headers: &HeaderMap, node_id: &str) -> bool {
    headers
        .get_all(header::VIA)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|entry| {
            let mut parts = entry.split_whitespace();
            let _protocol = parts.next();
            parts.next() == Some(node_id)
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::context::{ConnInfo, RequestContext};
    use outpost_config::{ClientLocation, GeoPoint};

    fn ctx(trusted: bool) -> (RequestContext, Locator) {
        let cfg = ClientLocation {
            trusted_proxies: if trusted {
                vec!["127.0.0.0/8".parse().expect("cidr")]
            } else {
                vec![]
            },
            ..ClientLocation::default()
        };
        let locator = Locator::new(&cfg, GeoPoint { lat: 0.0, lon: 0.0 });
        let conn = ConnInfo::new("127.0.0.1:5000".parse().expect("addr"), Scheme::Http);
        (
            RequestContext::new(&conn, &HeaderMap::new(), &locator),
            locator,
        )
    }

    fn hm(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, HeaderValue::from_static(v));
        }
        h
    }

    #[test]
    fn hop_by_hop_and_connection_named_fields_are_removed() {
        let mut h = hm(&[
            ("connection", "keep-alive, x-secret"),
            ("x-secret", "1"),
            ("keep-alive", "timeout=5"),
            ("te", "trailers"),
            ("transfer-encoding", "chunked"),
            ("upgrade", "websocket"),
            ("x-kept", "yes"),
        ]);
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1, "{h:?}");
        assert!(h.contains_key("x-kept"));
    }

    #[test]
    fn untrusted_clients_cannot_spoof_internal_or_forwarded_headers() {
        let (ctx, locator) = ctx(false);
        let mut h = hm(&[
            ("x-outpost-identity", "forged"),
            ("x-served-by", "forged"),
            ("x-forwarded-for", "1.2.3.4"),
            ("x-forwarded-proto", "https"),
            ("x-user-lat", "1"),
            // Underscore twins, which CGI/WSGI origins read as the dashed fields.
            ("x_outpost_identity", "forged"),
            ("x_served_by", "forged"),
            ("x_forwarded_for", "6.6.6.6"),
            ("x_forwarded_host", "evil.test"),
            ("x_request_id", "mine"),
            ("x_user_lat", "1"),
            ("x_app_flag", "kept"),
        ]);
        let via = HeaderValue::from_static("1.1 edge");
        let info = ForwardInfo {
            host: Some(&HeaderValue::from_static("shop.test")),
            scheme: Scheme::Http,
            peer_ip: &HeaderValue::from_static("127.0.0.1"),
            stripped_prefix: Some("/api"),
            via: &via,
        };
        request_headers(&mut h, &ctx, &info, &locator);
        assert!(!h.contains_key("x-outpost-identity"));
        assert!(!h.contains_key("x-served-by"));
        assert!(!h.contains_key("x-user-lat"));
        for twin in [
            "x_outpost_identity",
            "x_served_by",
            "x_forwarded_for",
            "x_forwarded_host",
            "x_request_id",
            "x_user_lat",
        ] {
            assert!(!h.contains_key(twin), "{twin}");
        }
        assert_eq!(h["x_app_flag"], "kept");
        assert_eq!(h["x-forwarded-for"], "127.0.0.1");
        assert_eq!(h["x-forwarded-proto"], "http");
        assert_eq!(h["x-forwarded-host"], "shop.test");
        assert_eq!(h["x-forwarded-prefix"], "/api");
        assert_eq!(h["host"], "shop.test");
        assert_eq!(h["via"], "1.1 edge");
        assert_eq!(h["x-request-id"], ctx.request_id.as_str());
        assert!(h["traceparent"].to_str().expect("ascii").starts_with("00-"));
    }

    /// The three ways to the same request: fields added to the map with what the strip pass
    /// found, added with nothing known (every field looked up), or returned for the origin
    /// client to write after the map's. Each field once, with the same values in the same
    /// order, for clients that send none of the managed fields, all of them, twice, or name
    /// them in `Connection`; from trusted and untrusted peers; over HTTP/1 and HTTP/2.
    #[test]
    fn forwarding_fields_match_whichever_way_they_are_added() {
        type Fields<'a> = &'a [(&'static str, &'static str)];
        let sent: [Fields; 11] = [
            &[("host", "shop.test"), ("accept", "*/*")],
            &[
                ("host", "shop.test"),
                ("x-forwarded-for", "1.2.3.4"),
                ("x-forwarded-for", "5.6.7.8"),
                ("x-forwarded-proto", "https"),
                ("x-forwarded-host", "front.test"),
                ("x-forwarded-prefix", "/outer/"),
                ("x-request-id", "client-id"),
                (
                    "traceparent",
                    "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
                ),
                ("via", "1.1 upstream"),
            ],
            &[
                ("connection", "x-request-id, traceparent"),
                ("x-request-id", "a"),
                ("traceparent", "b"),
                ("host", "shop.test"),
            ],
            // HTTP/2: no Host field (`:authority` instead).
            &[("x-forwarded-for", "1.2.3.4"), ("accept", "*/*")],
            &[("x-forwarded-prefix", "/outer//"), ("host", "shop.test")],
            &[("x_forwarded_for", "6.6.6.6"), ("host", "shop.test")],
            &[("x_request_id", "mine"), ("x_forwarded_proto", "ftp")],
            // Empty entries in a chain.
            &[
                ("x-forwarded-for", ""),
                ("x-forwarded-for", "1.2.3.4"),
                ("host", "a"),
            ],
            // Fields named by Connection: noted, then removed by the strip pass.
            &[
                (
                    "connection",
                    "x-forwarded-for, x-forwarded-proto, x-forwarded-prefix",
                ),
                ("x-forwarded-for", "1.2.3.4"),
                ("x-forwarded-proto", "https"),
                ("x-forwarded-prefix", "/p"),
            ],
            // Repeated managed fields.
            &[
                ("x-forwarded-proto", "https"),
                ("x-forwarded-proto", "http"),
                ("x-forwarded-host", "a.test"),
                ("x-forwarded-host", "b.test"),
                ("x-forwarded-prefix", "/a"),
                ("x-forwarded-prefix", "/b"),
                ("x-request-id", "one"),
                ("x-request-id", "two"),
            ],
            &[],
        ];
        let via = HeaderValue::from_static("1.1 edge");
        let host = HeaderValue::from_static("shop.test");
        let peer = HeaderValue::from_static("127.0.0.1");
        for (trusted, no_host) in [(false, false), (true, false), (true, true)] {
            let (ctx, locator) = ctx(trusted);
            for fields in sent {
                for prefix in [None, Some("/api/"), Some("/")] {
                    let info = ForwardInfo {
                        // No host known: an HTTP/1.0 request without one.
                        host: (!no_host).then_some(&host),
                        scheme: if trusted { Scheme::Https } else { Scheme::Http },
                        peer_ip: &peer,
                        stripped_prefix: prefix,
                        via: &via,
                    };
                    let case = format!("trusted {trusted}, prefix {prefix:?}, {fields:?}");
                    let added = {
                        let mut h = hm(fields);
                        let present = strip_request(&mut h, &ctx, &locator, &[]);
                        add_forwarding(&mut h, &ctx, &info, present);
                        h
                    };
                    let looked_up = {
                        let mut h = hm(fields);
                        strip_request(&mut h, &ctx, &locator, &[]);
                        add_forwarding(&mut h, &ctx, &info, Present::UNKNOWN);
                        h
                    };
                    let written = {
                        let mut h = hm(fields);
                        let present = strip_request(&mut h, &ctx, &locator, &[]);
                        let extra = forwarding_fields(&mut h, &ctx, &info, present);
                        for (name, _) in &extra {
                            // `Via` is a list: ours follows the client's entries.
                            let list = name == header::VIA;
                            assert!(list || !h.contains_key(name), "{name} twice: {case}");
                        }
                        for (name, value) in extra {
                            h.append(name, value);
                        }
                        h
                    };
                    assert_eq!(added, looked_up, "{case}");
                    assert_eq!(added, written, "{case}");
                    assert_eq!(added.get_all("x-forwarded-for").iter().count(), 1, "{case}");
                    if info.host.is_some() {
                        for once in ["x-forwarded-proto", "x-forwarded-host", "host"] {
                            let n = added.get_all(once).iter().count();
                            // A trusted proxy's repeated fields stand as they came.
                            assert!(n == 1 || (trusted && n == 2), "{once} x{n}: {case}");
                        }
                    }
                    assert_eq!(added["x-request-id"], ctx.request_id.as_str(), "{case}");
                    assert_eq!(added["traceparent"], ctx.trace.header_value(), "{case}");
                    assert_eq!(
                        added.get_all("via").iter().next_back(),
                        Some(&via),
                        "ours comes last: {case}"
                    );
                }
            }
        }
    }

    #[test]
    fn trusted_proxies_chains_are_extended() {
        let (ctx, locator) = ctx(true);
        let mut h = hm(&[
            ("x-forwarded-for", "1.2.3.4"),
            ("x-forwarded-proto", "https"),
        ]);
        let via = HeaderValue::from_static("1.1 edge");
        let info = ForwardInfo {
            host: None,
            scheme: Scheme::Http,
            peer_ip: &HeaderValue::from_static("127.0.0.1"),
            stripped_prefix: None,
            via: &via,
        };
        request_headers(&mut h, &ctx, &info, &locator);
        assert_eq!(h["x-forwarded-for"], "1.2.3.4, 127.0.0.1");
        assert_eq!(h["x-forwarded-proto"], "https");
    }

    #[test]
    fn loops_are_detected_by_node_id_in_via() {
        assert!(is_loop(&hm(&[("via", "1.1 a, 2 tokyo-1")]), "tokyo-1"));
        assert!(!is_loop(&hm(&[("via", "1.1 tokyo-10")]), "tokyo-1"));
    }

    #[test]
    fn response_headers_get_node_identity_and_timing() {
        let mut h = hm(&[("connection", "close"), ("x-served-by", "origin-lie")]);
        response_headers(
            &mut h,
            &HeaderValue::from_static("1.1 edge"),
            &HeaderValue::from_static("edge"),
            &HeaderValue::from_static("rid"),
            &Timings {
                edge_ms: 0.5,
                origin_ms: Some(12.25),
            },
        );
        assert!(!h.contains_key("connection"));
        assert_eq!(h["x-served-by"], "edge");
        assert_eq!(h["x-request-id"], "rid");
        assert_eq!(h["server-timing"], "edge;dur=0.500, origin;dur=12.250");
    }

    #[test]
    fn server_timing_millis_are_exact_to_the_microsecond() {
        for (ms, text) in [
            (0.0, "0.000"),
            (0.0004, "0.000"),
            (0.0005, "0.001"),
            (1.5, "1.500"),
            (-3.0, "0.000"),
            (12_345.678_9, "12345.679"),
            (1e30, "18446744073709551.615"),
        ] {
            let mut t = Text::<64>::default();
            t.millis(ms);
            assert_eq!(std::str::from_utf8(t.as_bytes()), Ok(text), "{ms}");
        }
    }
}
