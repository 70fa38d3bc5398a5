//! The access log: one structured line per request, written when the response body ends.

use std::net::IpAddr;

/// Everything the access log says about one request.
#[derive(Debug, Clone)]
pub struct AccessRecord<'a> {
    /// Correlates with the origin's logs (`X-Request-Id`).
    pub request_id: &'a str,
    /// W3C trace id, to find the trace.
    pub trace_id: &'a str,
    /// The client as the node understands it (after trusted proxies).
    pub client_ip: IpAddr,
    /// Request method.
    pub method: &'a str,
    /// Request path (logs may hold raw paths; metrics never do).
    pub path: &'a str,
    /// `HTTP/1.1`, `HTTP/2.0` …
    pub version: &'a str,
    /// Matched route name, or `-`.
    pub route: &'a str,
    /// Response status sent to the client.
    pub status: u16,
    /// Body bytes sent to the client.
    pub bytes_sent: u64,
    /// Total time, request head to end of response body.
    pub duration_ms: f64,
    /// Time the origin took to answer with a head, if it was asked.
    pub origin_ms: Option<f64>,
    /// Origin endpoint region that answered, if any.
    pub origin_region: Option<&'a str>,
    /// What the cache did (`hit`, `stale`, `miss`, `revalidated`, `bypass`) on cached routes.
    pub cache: Option<&'a str>,
    /// Whether the response body was cut short (client gone or origin broke).
    pub aborted: bool,
}

/// Writes one access-log event at info level under target `outpost::access`.
pub fn log(r: &AccessRecord<'_>) {
    tracing::info!(
        target: "outpost::access",
        request_id = r.request_id,
        trace_id = r.trace_id,
        client_ip = %r.client_ip,
        method = r.method,
        path = r.path,
        version = r.version,
        route = r.route,
        status = r.status,
        bytes_sent = r.bytes_sent,
        duration_ms = r.duration_ms,
        origin_ms = r.origin_ms,
        origin_region = r.origin_region,
        cache = r.cache,
        aborted = r.aborted,
        "Request served."
    );
}
