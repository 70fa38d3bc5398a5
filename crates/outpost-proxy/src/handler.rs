//! The request pipeline: context → route → origin stage → response filters → access log.
//!
//! This is the one function every request goes through; later stages (guards, cache,
//! functions) slot in between routing and the origin stage.

use std::convert::Infallible;
use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use http::{HeaderValue, Method, Request, Response, Version, header};
use http_body::Body as _;
use http_body_util::BodyExt as _;
use hyper::body::Incoming;
use outpost_telemetry::access::{self, AccessRecord};
use outpost_telemetry::metrics::RouteMetrics;

use crate::body::{LimitedBody, ObservedBody, ProxyBody, ReplayableBody, boxed, empty};
use crate::context::{ConnInfo, RequestContext};
use crate::error::{ErrorSource, ProxyError};
use crate::filters::{self, ForwardInfo, Timings};
use crate::node::{Node, RouteRuntime, Snapshot};
use crate::origin::AttemptError;
use crate::routing::strip_prefix;

/// A response from an origin, with what the logs need to know about it.
struct Forwarded {
    response: Response<ProxyBody>,
    origin_ms: f64,
    region: String,
}

/// Handles one request end to end. Never fails: every error becomes a response.
pub async fn handle(
    node: Arc<Node>,
    conn: Arc<ConnInfo>,
    req: Request<Incoming>,
) -> Result<Response<ProxyBody>, Infallible> {
    let started = Instant::now();
    let snap = node.snapshot();
    let ctx = RequestContext::new(&conn, req.headers(), &snap.locator);
    let log = snap.config.log.access_log.then(|| AccessInfo {
        method: req.method().as_str().to_owned(),
        path: req.uri().path().to_owned(),
        version: req.version(),
        client_ip: ctx.client_ip,
        request_id: ctx.request_id.clone(),
        trace_id: ctx.trace.trace_id.clone(),
        route: String::new(),
        origin_region: None,
        origin_ms: None,
    });
    let via = if req.version() == Version::HTTP_2 {
        snap.via_h2.clone()
    } else {
        snap.via_h1.clone()
    };

    let (route, result) = proxy(&snap, &conn, &ctx, &via, req).await;
    let (mut resp, origin_ms, region) = match result {
        Ok(f) => (f.response, Some(f.origin_ms), Some(f.region)),
        Err(e) => {
            if e.source() == ErrorSource::Downstream {
                tracing::debug!(request_id = %ctx.request_id, error = %e, "Request refused.");
            } else {
                tracing::warn!(request_id = %ctx.request_id, error = %e, "Request failed.");
            }
            (e.to_response(&ctx.request_id), None, None)
        }
    };
    let total_ms = started.elapsed().as_secs_f64() * 1e3;
    filters::response_headers(
        resp.headers_mut(),
        &via,
        &snap.node_id,
        &ctx.request_id,
        &Timings {
            edge_ms: (total_ms - origin_ms.unwrap_or(0.0)).max(0.0),
            origin_ms,
        },
    );

    let status = resp.status().as_u16();
    let (metrics, route_name) = match route.and_then(|i| snap.routes.get(i)) {
        Some(r) => (r.metrics.clone(), r.name.as_str()),
        None => (snap.unmatched.clone(), "-"),
    };
    let log = log.map(|mut l| {
        l.route = route_name.to_owned();
        l.origin_ms = origin_ms;
        l.origin_region = region;
        l
    });
    Ok(observe(resp, started, status, metrics, log))
}

/// What the access log needs, captured before the request is consumed.
struct AccessInfo {
    method: String,
    path: String,
    version: Version,
    client_ip: IpAddr,
    request_id: String,
    trace_id: String,
    route: String,
    origin_region: Option<String>,
    origin_ms: Option<f64>,
}

fn observe(
    resp: Response<ProxyBody>,
    started: Instant,
    status: u16,
    metrics: RouteMetrics,
    log: Option<AccessInfo>,
) -> Response<ProxyBody> {
    resp.map(|body| {
        ObservedBody::new(
            body,
            Box::new(move |bytes, aborted| {
                let secs = started.elapsed().as_secs_f64();
                metrics.record(status, secs);
                if let Some(l) = log {
                    access::log(&AccessRecord {
                        request_id: &l.request_id,
                        trace_id: &l.trace_id,
                        client_ip: l.client_ip,
                        method: &l.method,
                        path: &l.path,
                        version: version_str(l.version),
                        route: &l.route,
                        status,
                        bytes_sent: bytes,
                        duration_ms: secs * 1e3,
                        origin_ms: l.origin_ms,
                        origin_region: l.origin_region.as_deref(),
                        aborted,
                    });
                }
            }),
        )
        .boxed_unsync()
    })
}

fn version_str(v: Version) -> &'static str {
    match v {
        Version::HTTP_09 => "HTTP/0.9",
        Version::HTTP_10 => "HTTP/1.0",
        Version::HTTP_11 => "HTTP/1.1",
        Version::HTTP_2 => "HTTP/2.0",
        Version::HTTP_3 => "HTTP/3.0",
        _ => "HTTP/?",
    }
}

/// The host the client asked for: `:authority` (HTTP/2, absolute-form) or the Host header.
fn request_host<'a>(uri: &'a http::Uri, headers: &'a http::HeaderMap) -> Option<&'a str> {
    uri.authority()
        .map(|a| a.as_str())
        .or_else(|| headers.get(header::HOST)?.to_str().ok())
}

/// Dot segments would let `/public/../admin` match the `/public` route and reach `/admin`.
fn has_dot_segment(path: &str) -> bool {
    path.split('/').any(|seg| {
        seg == "."
            || seg == ".."
            || seg.eq_ignore_ascii_case("%2e")
            || seg.eq_ignore_ascii_case("%2e%2e")
            || seg.eq_ignore_ascii_case(".%2e")
            || seg.eq_ignore_ascii_case("%2e.")
    })
}

async fn proxy(
    snap: &Snapshot,
    conn: &ConnInfo,
    ctx: &RequestContext,
    via: &HeaderValue,
    req: Request<Incoming>,
) -> (Option<usize>, Result<Forwarded, ProxyError>) {
    if req.method() == Method::CONNECT {
        return (None, Err(ProxyError::MethodNotAllowed("CONNECT".into())));
    }
    let path = req.uri().path();
    if !path.starts_with('/') {
        return (
            None,
            Err(ProxyError::BadRequest(
                "request target must be an absolute path",
            )),
        );
    }
    if has_dot_segment(path) {
        return (
            None,
            Err(ProxyError::BadRequest(
                "request path must not contain '.' or '..' segments",
            )),
        );
    }
    if filters::is_loop(req.headers(), &snap.config.node.id) {
        return (None, Err(ProxyError::Loop));
    }
    let host = request_host(req.uri(), req.headers()).unwrap_or("");
    let Some(index) = snap.table.find(host, path) else {
        return (None, Err(ProxyError::NoRoute));
    };
    let Some(route) = snap.routes.get(index) else {
        return (None, Err(ProxyError::NoRoute));
    };
    (Some(index), forward(snap, route, conn, ctx, via, req).await)
}

async fn forward(
    snap: &Snapshot,
    route: &RouteRuntime,
    conn: &ConnInfo,
    ctx: &RequestContext,
    via: &HeaderValue,
    req: Request<Incoming>,
) -> Result<Forwarded, ProxyError> {
    let too_large = ProxyError::PayloadTooLarge {
        limit: route.max_body,
    };
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > route.max_body) {
        return Err(too_large);
    }

    let (parts, body) = req.into_parts();
    let host = request_host(&parts.uri, &parts.headers).map(str::to_owned);
    let original_path = parts.uri.path();
    let new_path = if route.strip_prefix {
        strip_prefix(&route.prefix, original_path)
    } else {
        original_path
    };
    let path_and_query = match parts.uri.query() {
        Some(q) => format!("{new_path}?{q}"),
        None => new_path.to_owned(),
    };
    let mut headers = parts.headers;
    let peer_ip = conn.peer.ip().to_string();
    filters::request_headers(
        &mut headers,
        ctx,
        &ForwardInfo {
            host: host.as_deref(),
            scheme: conn.scheme,
            peer_ip: &peer_ip,
            stripped_prefix: route.strip_prefix.then_some(route.prefix.as_str()),
            via,
        },
        &snap.locator,
    );

    let candidates = route.group.nearest_available(ctx.location.point);
    if candidates.is_empty() {
        return Err(ProxyError::NoHealthyEndpoint(route.group.name.clone()));
    }
    // One retry on another endpoint, only when the first could not even connect.
    let attempts = candidates.len().min(2);
    // Bodiless requests (most GETs) need neither the limit flag nor the replay machinery; a
    // body is made replayable only when a second endpoint could receive it.
    let mut exceeded = None;
    let mut source = if body.is_end_stream() {
        BodySource::Empty
    } else {
        let flag = Arc::new(AtomicBool::new(false));
        let limited = boxed(LimitedBody::new(body, route.max_body, flag.clone()));
        exceeded = Some(flag);
        if attempts > 1 {
            BodySource::Replay(ReplayableBody::new(limited))
        } else {
            BodySource::Once(Some(limited))
        }
    };
    let mut headers = Some(headers);
    let mut last_error = None;
    for (i, endpoint) in candidates.iter().take(attempts).enumerate() {
        let attempt_headers = if i + 1 < attempts {
            headers.clone().unwrap_or_default()
        } else {
            headers.take().unwrap_or_default()
        };
        let uri = endpoint
            .uri_for(&path_and_query)
            .map_err(|_| ProxyError::BadRequest("request target cannot be forwarded"))?;
        let mut upstream = Request::new(source.attempt());
        *upstream.method_mut() = parts.method.clone();
        *upstream.uri_mut() = uri;
        *upstream.version_mut() = endpoint.version();
        *upstream.headers_mut() = attempt_headers;

        let sent = Instant::now();
        match endpoint
            .send(upstream, route.timeout, &route.group.passive)
            .await
        {
            Ok(response) => {
                return Ok(Forwarded {
                    response,
                    origin_ms: sent.elapsed().as_secs_f64() * 1e3,
                    region: endpoint.region.clone(),
                });
            }
            Err(AttemptError::Connect(e)) => {
                tracing::warn!(
                    request_id = %ctx.request_id,
                    endpoint = %endpoint.authority,
                    error = %error_chain(e.as_ref()),
                    "Origin connect failed."
                );
                last_error = Some(ProxyError::OriginConnect {
                    endpoint: endpoint.authority.to_string(),
                });
                if !source.can_retry() {
                    break;
                }
            }
            Err(AttemptError::Timeout) => {
                return Err(ProxyError::OriginTimeout {
                    endpoint: endpoint.authority.to_string(),
                    timeout: route.timeout,
                });
            }
            Err(AttemptError::Broken(e)) => {
                if exceeded.is_some_and(|f| f.load(Ordering::Relaxed)) {
                    return Err(too_large);
                }
                return Err(ProxyError::OriginBroken {
                    endpoint: endpoint.authority.to_string(),
                    reason: error_chain(e.as_ref()),
                });
            }
        }
    }
    Err(last_error.unwrap_or_else(|| ProxyError::NoHealthyEndpoint(route.group.name.clone())))
}

/// Where each attempt's request body comes from.
enum BodySource {
    /// No body: every attempt gets an empty one.
    Empty,
    /// One attempt only: the body is handed over once.
    Once(Option<ProxyBody>),
    /// A second attempt is possible while the first never polled the body.
    Replay(ReplayableBody),
}

impl BodySource {
    fn attempt(&mut self) -> ProxyBody {
        match self {
            BodySource::Empty => empty(),
            BodySource::Once(body) => body.take().unwrap_or_else(empty),
            BodySource::Replay(r) => r.attempt(),
        }
    }

    fn can_retry(&self) -> bool {
        match self {
            BodySource::Empty => true,
            BodySource::Once(_) => false,
            BodySource::Replay(r) => r.is_untouched(),
        }
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(inner) = source {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        source = inner.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dot_segments_are_refused_in_any_spelling() {
        for p in [
            "/a/../b",
            "/a/./b",
            "/..",
            "/a/%2e%2e/b",
            "/a/%2E/b",
            "/a/.%2e",
        ] {
            assert!(has_dot_segment(p), "{p}");
        }
        for p in ["/a/b", "/a/.well-known/x", "/a/..b", "/"] {
            assert!(!has_dot_segment(p), "{p}");
        }
    }
}
