//! The request pipeline: context → route → cache stage → origin stage → response filters →
//! access log.
//!
//! This is the one function every request goes through; later stages (guards, functions) slot
//! in between routing and the cache stage. On a route with `[routes.cache]`, GET and HEAD go
//! through [`outpost_cache::Cache::handle`], whose origin side ([`OriginFetch`]) is the same
//! origin stage a pass-through uses; unsafe methods pass through and, when they succeed,
//! invalidate what is stored for their URL.

use std::convert::Infallible;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Instant;

use http::header::HeaderName;
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, Version, header};
use http_body::Body as _;
use http_body_util::BodyExt as _;
use hyper::body::Incoming;
use outpost_cache::status::Fwd;
use outpost_cache::{CACHE_STATUS, CacheOutcome, CacheRequest, CacheStatus, Upstream};
use outpost_config::GeoPoint;
use outpost_guard::ab::Assignment;
use outpost_guard::ratelimit::Phase;
use outpost_guard::{IDENTITY_HEADER, JWKS_PATH, Principal};
use outpost_telemetry::access::{self, AccessRecord};
use outpost_telemetry::metrics::RouteMetrics;

use crate::body::{BodyState, LimitedBody, ObservedBody, ProxyBody, ReplayableBody, boxed, empty};
use crate::context::{ConnInfo, RequestContext, RequestId};
use crate::error::{ErrorSource, ProxyError};
use crate::filters::{self, ForwardInfo, Present, Timings};
use crate::node::{Node, Rejection, RouteCache, RouteRuntime, Snapshot, VARIANT_HEADER};
use crate::origin::AttemptError;
use crate::origin::h1::Switched;
use crate::routing::strip_prefix;
use crate::tunnel;

/// A response from an origin or the cache, with what the logs need to know about it.
pub(crate) struct Forwarded {
    pub(crate) response: Response<ProxyBody>,
    /// Time to the origin's response head, when the origin was asked.
    pub(crate) origin_ms: Option<f64>,
    /// Region of the endpoint that answered, when one did.
    pub(crate) region: Option<Arc<str>>,
    /// What the cache stage did, on cached routes.
    pub(crate) cache: Option<CacheOutcome>,
}

/// Where an origin response came from, carried in its extensions through the cache stage.
#[derive(Debug, Clone)]
pub(crate) struct OriginInfo {
    pub(crate) origin_ms: f64,
    pub(crate) region: Arc<str>,
}

/// Handles one request end to end. Never fails: every error becomes a response.
pub async fn handle(
    node: Arc<Node>,
    conn: Arc<ConnInfo>,
    req: Request<Incoming>,
) -> Result<Response<ProxyBody>, Infallible> {
    let started = Instant::now();
    let snap = node.snapshot();
    // Shared, so that a cache miss's origin fetch (which may outlive the request as a
    // background refresh) can add the forwarding headers without copying the context.
    let ctx = Arc::new(RequestContext::new(&conn, req.headers(), &snap.locator));
    let log = snap.config.log.access_log.then(|| AccessInfo {
        method: req.method().as_str().to_owned(),
        path: req.uri().path().to_owned(),
        version: req.version(),
        client_ip: ctx.client_ip,
        request_id: ctx.request_id.clone(),
        trace_id: ctx.trace.trace_id(),
        route: String::new(),
        origin_region: None,
        origin_ms: None,
        cache: None,
    });
    let via = if req.version() == Version::HTTP_2 {
        snap.via_h2.clone()
    } else {
        snap.via_h1.clone()
    };

    let (route, result) = proxy(&node, &snap, &conn, &ctx, &via, req).await;
    let ctx = &*ctx;
    let (mut resp, origin_ms, region, cache) = match result {
        Ok(f) => (f.response, f.origin_ms, f.region, f.cache),
        Err(e) => {
            log_failure(ctx, &e);
            (e.to_response(&ctx.request_id), None, None, None)
        }
    };
    // The answer is this node's message, in this node's HTTP version (RFC 9110 §6.2), not the
    // origin's (an HTTP/1.0 origin's status line would otherwise reach the client).
    *resp.version_mut() = Version::default();
    let total_ms = started.elapsed().as_secs_f64() * 1e3;
    // A switch (WebSocket) keeps its `Upgrade`, which the hop-by-hop pass below removes.
    let switched_to = if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
        resp.headers().get(header::UPGRADE).cloned()
    } else {
        None
    };
    filters::response_headers(
        resp.headers_mut(),
        &via,
        &snap.node_id,
        &ctx.request_id.header(),
        &Timings {
            edge_ms: (total_ms - origin_ms.unwrap_or(0.0)).max(0.0),
            origin_ms,
        },
    );
    if let Some(protocol) = switched_to {
        let h = resp.headers_mut();
        h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        h.insert(header::UPGRADE, protocol);
    }

    let status = resp.status().as_u16();
    let (metrics, route_name) = match route.and_then(|i| snap.routes.get(i)) {
        Some(r) => (r.metrics.clone(), r.name.as_str()),
        None => (snap.unmatched.clone(), "-"),
    };
    let log = log.map(|mut l| {
        l.route = route_name.to_owned();
        l.origin_ms = origin_ms;
        l.origin_region = region;
        l.cache = cache.map(CacheOutcome::as_str);
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
    request_id: RequestId,
    trace_id: String,
    route: String,
    origin_region: Option<Arc<str>>,
    origin_ms: Option<f64>,
    cache: Option<&'static str>,
}

fn log_failure(ctx: &RequestContext, e: &ProxyError) {
    if e.source() == ErrorSource::Downstream {
        tracing::debug!(request_id = %ctx.request_id, error = %e, "Request refused.");
    } else {
        tracing::warn!(request_id = %ctx.request_id, error = %e, "Request failed.");
    }
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
                        cache: l.cache,
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

/// Makes the request's host one thing for routing, the cache and the origin (RFC 9112 §3.2,
/// RFC 9113 §8.3.1): one valid `Host` (no userinfo, path or spaces); an absolute-form target's
/// authority replaces `Host`; an HTTP/2 `Host` must agree with `:authority`; HTTP/1.1 and
/// HTTP/2 requests must name a host (HTTP/1.0 may not, and the origin then gets the endpoint's).
fn settle_host<B>(req: &mut Request<B>) -> Result<(), &'static str> {
    let mut hosts = req.headers().get_all(header::HOST).iter();
    let host = hosts.next();
    if hosts.next().is_some() {
        return Err("more than one Host header");
    }
    if let Some(h) = host
        && !is_valid_host(h.as_bytes())
    {
        return Err("invalid Host header");
    }
    let Some(authority) = req.uri().authority() else {
        if host.is_none() && req.version() != Version::HTTP_10 && req.version() != Version::HTTP_09
        {
            return Err("the request names no host (Host header or :authority)");
        }
        return Ok(());
    };
    if !is_valid_host(authority.as_str().as_bytes()) {
        return Err("invalid authority in the request target");
    }
    if req.version() == Version::HTTP_2 {
        if host.is_some_and(|h| {
            !h.as_bytes()
                .eq_ignore_ascii_case(authority.as_str().as_bytes())
        }) {
            return Err("Host header does not match :authority");
        }
        return Ok(());
    }
    // Absolute form: the target's authority wins over whatever Host said.
    let value = HeaderValue::from_str(authority.as_str())
        .map_err(|_| "invalid authority in the request target")?;
    req.headers_mut().insert(header::HOST, value);
    Ok(())
}

/// `uri-host [ ":" port ]` without userinfo (RFC 9110 §7.2, RFC 3986 §3.2.2): what a Host or
/// `:authority` may be. Checked by hand, byte by byte: it runs on every request, and `Authority`
/// parsing copies the value first.
fn is_valid_host(v: &[u8]) -> bool {
    let (host, port) = match v.strip_prefix(b"[") {
        // An IP literal: `[v6]` or `[v6]:port`.
        Some(rest) => {
            let Some(close) = rest.iter().position(|b| *b == b']') else {
                return false;
            };
            let (literal, after) = (&rest[..close], &rest[close + 1..]);
            let literal_ok = !literal.is_empty()
                && literal
                    .iter()
                    .all(|b| b.is_ascii_hexdigit() || matches!(b, b':' | b'.' | b'v' | b'V'));
            if !literal_ok {
                return false;
            }
            match after {
                [] => return true,
                [b':', port @ ..] => (&b"x"[..], port),
                _ => return false,
            }
        }
        None => match v.iter().position(|b| *b == b':') {
            Some(colon) => (&v[..colon], &v[colon + 1..]),
            None => (v, &b""[..]),
        },
    };
    let reg_name_ok = !host.is_empty()
        && host.iter().all(|b| {
            b.is_ascii_alphanumeric()
                || matches!(
                    b,
                    b'-' | b'.'
                        | b'_'
                        | b'~'
                        | b'%'
                        | b'!'
                        | b'$'
                        | b'&'
                        | b'\''
                        | b'('
                        | b')'
                        | b'*'
                        | b'+'
                        | b','
                        | b';'
                        | b'='
                )
        });
    reg_name_ok && port.iter().all(u8::is_ascii_digit)
}

/// [`request_host`] as a header value to forward: the client's own `Host` value (a clone
/// shares its bytes) or, for `:authority`, a copy.
fn request_host_value(uri: &http::Uri, headers: &http::HeaderMap) -> Option<HeaderValue> {
    match uri.authority() {
        Some(a) => HeaderValue::from_str(a.as_str()).ok(),
        None => headers
            .get(header::HOST)
            .filter(|v| v.to_str().is_ok())
            .cloned(),
    }
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
    node: &Arc<Node>,
    snap: &Arc<Snapshot>,
    conn: &ConnInfo,
    ctx: &Arc<RequestContext>,
    via: &HeaderValue,
    mut req: Request<Incoming>,
) -> (Option<usize>, Result<Forwarded, ProxyError>) {
    if req.method() == Method::CONNECT {
        return (None, Err(ProxyError::MethodNotAllowed("CONNECT".into())));
    }
    if let Err(why) = settle_host(&mut req) {
        return (None, Err(ProxyError::BadRequest(why)));
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
    if path == JWKS_PATH && (req.method() == Method::GET || req.method() == Method::HEAD) {
        return (None, Ok(jwks(snap)));
    }
    if let Some(id) = path.strip_prefix(crate::outbox::STATUS_PATH)
        && (req.method() == Method::GET || req.method() == Method::HEAD)
    {
        return (
            None,
            crate::outbox::status(node, id).map(|response| Forwarded {
                response,
                origin_ms: None,
                region: None,
                cache: None,
            }),
        );
    }
    if path == crate::events::EVENTS_PATH {
        let result = crate::events::accept(node.analytics(), &snap.config.analytics, req).await;
        let forwarded = |response| Forwarded {
            response,
            origin_ms: None,
            region: None,
            cache: None,
        };
        return (None, result.map(forwarded));
    }
    let host = request_host(req.uri(), req.headers()).unwrap_or("");
    let Some(index) = snap.table.find(host, path) else {
        return (None, Err(ProxyError::NoRoute));
    };
    let Some(route) = snap.routes.get(index) else {
        return (None, Err(ProxyError::NoRoute));
    };
    // Guards, cheapest refusal first: country, then limits that need no token, then the token,
    // then limits by subject.
    if let Some(geo) = &route.geo
        && !geo.admits(ctx.location.country.as_deref())
    {
        let country = ctx
            .location
            .country
            .clone()
            .unwrap_or_else(|| "your location".into());
        return (Some(index), Err(ProxyError::Geo(country)));
    }
    let mut limit_headers = Vec::new();
    if !route.limits.is_empty() {
        match route
            .limits
            .check(Phase::BeforeAuth, ctx.client_ip, None, req.headers())
        {
            Ok(h) => limit_headers = h,
            Err(limited) => {
                route.rejections.record(Rejection::RateLimited as usize);
                return (Some(index), Err(ProxyError::RateLimited(limited)));
            }
        }
    }
    let principal = match &route.auth {
        Some(auth) => match auth.authenticate(req.headers()).await {
            Ok(p) => p,
            Err(e) => {
                let why = match e {
                    outpost_guard::AuthError::Forbidden(_) => Rejection::Forbidden,
                    _ => Rejection::Unauthorized,
                };
                route.rejections.record(why as usize);
                return (Some(index), Err(e.into()));
            }
        },
        None => None,
    };
    if !route.limits.is_empty() {
        let sub = principal.as_ref().and_then(|p| p.sub.as_deref());
        match route
            .limits
            .check(Phase::AfterAuth, ctx.client_ip, sub, req.headers())
        {
            Ok(h) if !h.is_empty() => limit_headers = h,
            Ok(_) => {}
            Err(limited) => {
                route.rejections.record(Rejection::RateLimited as usize);
                return (Some(index), Err(ProxyError::RateLimited(limited)));
            }
        }
    }
    let variants: Vec<Assignment> = route
        .experiments
        .iter()
        .map(|e| {
            let pinned = outpost_cache::key::cookie_value(req.headers(), &e.cookie);
            let sub = principal.as_ref().and_then(|p| p.sub.as_deref());
            e.assign(pinned, sub, ctx.client_ip)
        })
        .collect();
    let guarded = Guarded {
        principal,
        variants: &variants,
    };
    let result = forward(node, snap, index, route, conn, ctx, via, guarded, req).await;
    (
        Some(index),
        result.map(|mut f| {
            let h = f.response.headers_mut();
            for (name, value) in limit_headers {
                h.append(name, value);
            }
            for (e, a) in route.experiments.iter().zip(&variants) {
                if a.new
                    && let Ok(v) = HeaderValue::from_str(&e.set_cookie(&a.variant))
                {
                    h.append(header::SET_COOKIE, v);
                }
            }
            f
        }),
    )
}

/// What the guards established about a request.
pub(crate) struct Guarded<'a> {
    /// The verified caller, on authenticated routes.
    pub(crate) principal: Option<Principal>,
    /// One variant per experiment of the route.
    pub(crate) variants: &'a [Assignment],
}

/// The node's public identity keys, for origins verifying `x-outpost-identity`.
fn jwks(snap: &Snapshot) -> Forwarded {
    let mut response = Response::new(crate::body::full(snap.identity.jwks().to_owned()));
    let h = response.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/jwk-set+json"),
    );
    h.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("public, max-age=300"),
    );
    Forwarded {
        response,
        origin_ms: None,
        region: None,
        cache: None,
    }
}

/// The claims of the identity forwarded for one request.
fn identity_claims(
    snap: &Snapshot,
    route: &RouteRuntime,
    ctx: &RequestContext,
    principal: Option<&Principal>,
    variants: &[Assignment],
) -> serde_json::Map<String, serde_json::Value> {
    use serde_json::{Value, json};
    let mut c = serde_json::Map::new();
    c.insert("node".into(), snap.config.node.id.clone().into());
    c.insert("rid".into(), ctx.request_id.as_str().into());
    if let Some(p) = principal {
        if let Some(sub) = &p.sub {
            c.insert("sub".into(), sub.clone().into());
        }
        let forwarded: serde_json::Map<String, Value> = route
            .auth
            .iter()
            .flat_map(|a| a.forward_claims.iter())
            .filter_map(|name| p.claims.get(name).map(|v| (name.clone(), v.clone())))
            .collect();
        if !forwarded.is_empty() {
            c.insert("claims".into(), Value::Object(forwarded));
        }
    }
    if !variants.is_empty() {
        let v: serde_json::Map<String, Value> = variants
            .iter()
            .map(|a| (a.experiment.clone(), Value::from(a.variant.clone())))
            .collect();
        c.insert("variant".into(), Value::Object(v));
    }
    c.insert(
        "geo".into(),
        json!({
            "country": ctx.location.country,
            "lat": ctx.location.point.lat,
            "lon": ctx.location.point.lon,
            "source": ctx.location.source.as_str(),
        }),
    );
    c
}

#[expect(clippy::too_many_arguments, reason = "the request's whole context")]
async fn forward(
    node: &Arc<Node>,
    snap: &Arc<Snapshot>,
    index: usize,
    route: &RouteRuntime,
    conn: &ConnInfo,
    ctx: &Arc<RequestContext>,
    via: &HeaderValue,
    guarded: Guarded<'_>,
    req: Request<Incoming>,
) -> Result<Forwarded, ProxyError> {
    let Guarded {
        principal,
        variants,
    } = guarded;
    if let Some(fixed) = &route.respond {
        let mut response = Response::new(crate::body::full(fixed.body.clone()));
        *response.status_mut() = fixed.status;
        response
            .headers_mut()
            .insert(header::CONTENT_TYPE, fixed.content_type.clone());
        return Ok(Forwarded {
            response,
            origin_ms: None,
            region: None,
            cache: None,
        });
    }
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > route.max_body) {
        return Err(ProxyError::PayloadTooLarge {
            limit: route.max_body,
        });
    }

    let (mut parts, body) = req.into_parts();
    // hyper leaves an upgrade handle on HTTP/1.1 requests that carry `Upgrade` only: the
    // header check is not paid by other requests.
    let upgrade = parts
        .extensions
        .remove::<hyper::upgrade::OnUpgrade>()
        .filter(|_| {
            route.websocket
                && tunnel::is_websocket_handshake(&parts.method, parts.version, &parts.headers)
        });
    let host = request_host_value(&parts.uri, &parts.headers);
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
    let present = filters::strip_request(&mut headers, ctx, &snap.locator, &snap.internal_headers);
    if !variants.is_empty() {
        let v = variants
            .iter()
            .map(|a| format!("{}={}", a.experiment, a.variant))
            .collect::<Vec<_>>()
            .join(", ");
        if let Ok(v) = HeaderValue::from_str(&v) {
            headers.insert(VARIANT_HEADER, v);
        }
    }
    let authenticated = principal.is_some();
    let hop = Hop {
        host,
        scheme: conn.scheme,
        peer_ip: conn.peer_ip.clone(),
        stripped_prefix: route.strip_prefix.then(|| route.prefix.clone()),
        via: via.clone(),
        identity: route.forward_identity.then(|| Identity {
            signer: snap.identity.clone(),
            audience: route.group_for(&parts.method).name.clone(),
            claims: identity_claims(snap, route, ctx, principal.as_ref(), variants),
        }),
    };

    if let Some(name) = &route.function {
        return crate::function::run(
            node,
            snap,
            index,
            route,
            name,
            ctx,
            hop,
            principal.as_ref(),
            (parts.method, parts.uri, parts.version),
            path_and_query,
            headers,
            body,
        )
        .await;
    }

    if let Some(policy) = &route.outbox
        && !parts.method.is_safe()
    {
        return keep_or_forward(
            node,
            route,
            policy,
            ctx,
            (&hop, present),
            (&parts.method, &parts.uri),
            path_and_query,
            headers,
            body,
        )
        .await;
    }

    // Straight to the origin: routes without a cache, and WebSocket handshakes on any route
    // (an outbox route too: a handshake is a GET).
    let rc = match &route.cache {
        Some(rc) if upgrade.is_none() => rc,
        _ => {
            let forwarding = hop.forwarding_fields(&mut headers, ctx, present);
            if upgrade.is_some() {
                // Back in, after `strip_request` removed them as hop-by-hop: this hop asks too,
                // for WebSocket only (see `tunnel`).
                headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
                headers.insert(header::UPGRADE, tunnel::WEBSOCKET);
            }
            let mut forwarded = send_to_origin(
                route,
                route.group_for(&parts.method),
                &ctx.request_id,
                ctx.location.point,
                &parts.method,
                &path_and_query,
                headers,
                &forwarding,
                OutgoingBody::Stream(body),
            )
            .await?;
            if let Some(client) = upgrade
                && let Some(origin) = forwarded
                    .response
                    .extensions_mut()
                    .remove::<Switched>()
                    .and_then(|s| s.take())
            {
                let idle = snap.config.server.tunnel_idle_timeout;
                let metrics = node.metrics().clone();
                conn.set_tunnel(Box::pin(tunnel::join(client, origin, idle, metrics)));
            }
            return Ok(forwarded);
        }
    };
    let client_pq = parts
        .uri
        .path_and_query()
        .map_or("/", |pq| pq.as_str())
        .to_owned();
    let host = hop.host().unwrap_or_default().to_owned();
    let cacheable = parts.method == Method::GET || parts.method == Method::HEAD;
    if cacheable && body.is_end_stream() {
        let upstream = Arc::new(OriginFetch {
            snap: snap.clone(),
            route: index,
            path_and_query,
            ctx: ctx.clone(),
            hop,
            present,
            group: None,
        });
        let handled = node
            .cache()
            .handle(
                &rc.policy,
                CacheRequest {
                    host: &host,
                    path_and_query: &client_pq,
                    method: &parts.method,
                    headers,
                    authenticated,
                },
                upstream,
            )
            .await;
        rc.metrics.record(handled.outcome.index());
        node.metrics().health().record_cache(matches!(
            handled.outcome,
            CacheOutcome::Hit | CacheOutcome::Stale
        ));
        return Ok(match handled.result {
            Ok(response) => {
                let info = response.extensions().get::<OriginInfo>().cloned();
                Forwarded {
                    response,
                    origin_ms: info.as_ref().map(|i| i.origin_ms),
                    region: info.map(|i| i.region),
                    cache: Some(handled.outcome),
                }
            }
            Err(e) => {
                log_failure(ctx, &e);
                let mut response = e.to_response(&ctx.request_id);
                response
                    .headers_mut()
                    .append(CACHE_STATUS, handled.status.to_header());
                Forwarded {
                    response,
                    origin_ms: None,
                    region: None,
                    cache: Some(handled.outcome),
                }
            }
        });
    }
    hop.add_forwarding(&mut headers, ctx, present);
    bypass(
        node,
        rc,
        route,
        ctx,
        &host,
        &client_pq,
        &parts.method,
        path_and_query,
        headers,
        body,
    )
    .await
}

/// An unsafe request on an outbox route: to the center now (fallback mode) and kept only when
/// the center cannot take it, or kept at once (always mode). Either way it carries an
/// `Idempotency-Key`, the same one on every later delivery.
#[expect(clippy::too_many_arguments, reason = "the request's whole context")]
async fn keep_or_forward(
    node: &Node,
    route: &RouteRuntime,
    policy: &crate::outbox::OutboxPolicy,
    ctx: &RequestContext,
    (hop, present): (&Hop, Present),
    (method, uri): (&Method, &http::Uri),
    path_and_query: String,
    mut headers: HeaderMap,
    body: Incoming,
) -> Result<Forwarded, ProxyError> {
    use crate::outbox;
    let key = outbox::idempotency_key(&headers)?;
    let bytes = outbox::read_body(body, route.max_body).await?;
    if let Ok(v) = HeaderValue::from_str(&key) {
        headers.insert(outbox::IDEMPOTENCY_KEY, v);
    }
    let order_key = match &policy.order_header {
        Some(h) => format!(
            "{}\u{1f}{}",
            route.name,
            headers.get(h).and_then(|v| v.to_str().ok()).unwrap_or("")
        ),
        None => route.name.clone(),
    };
    let mut plain = headers;
    hop.add_plain_forwarding(&mut plain, ctx, present);
    let waiting = match node.store() {
        Some(store) => store
            .outbox_waiting(&route.name, &order_key)
            .map_err(|e| ProxyError::Store(e.to_string()))?,
        None => false,
    };
    let reason = if policy.mode == outpost_config::OutboxMode::Always {
        "write-behind route".to_owned()
    } else if waiting {
        // Earlier writes of the same order key are still waiting: this one queues behind
        // them, so the center sees them in the order they were accepted.
        "earlier writes of the same order key are still queued".to_owned()
    } else {
        let mut now = plain.clone();
        hop.add_identity(&mut now);
        match send_to_origin(
            route,
            route.group_for(method),
            &ctx.request_id,
            ctx.location.point,
            method,
            &path_and_query,
            now,
            &[],
            OutgoingBody::Buffered(bytes.clone()),
        )
        .await
        {
            Ok(f) if !outbox::center_unavailable(f.response.status()) => {
                let status = f.response.status();
                if let Some(rc) = &route.cache
                    && (status.is_success() || status.is_redirection())
                {
                    let client_pq = uri.path_and_query().map_or("/", |pq| pq.as_str());
                    node.cache().invalidate(
                        &rc.policy.key,
                        hop.host().unwrap_or(""),
                        client_pq,
                        f.response.headers(),
                    );
                }
                return Ok(f);
            }
            Ok(f) => format!("the center answered {}", f.response.status()),
            Err(e) if outbox::retryable(&e) => e.to_string(),
            Err(e) => return Err(e),
        }
    };
    let entry = outpost_state::outbox::NewEntry {
        id: outbox::new_id()?,
        route: route.name.clone(),
        order_key,
        method: method.as_str().to_owned(),
        uri: path_and_query,
        headers: outbox::headers_to_store(&plain),
        body: bytes.to_vec(),
        idempotency_key: key,
        identity: hop
            .identity
            .as_ref()
            .map(|i| serde_json::Value::Object(i.claims.clone()).to_string()),
        client_url: Some((
            hop.host().unwrap_or_default().to_owned(),
            uri.path_and_query()
                .map_or("/", |pq| pq.as_str())
                .to_owned(),
        )),
    };
    let response = outbox::keep(node, route, policy, entry, &reason).await?;
    Ok(Forwarded {
        response,
        origin_ms: None,
        region: None,
        cache: None,
    })
}

/// A request the cache cannot answer (unsafe method, or a GET with a body) on a cached route:
/// forwarded as it is; a successful unsafe request invalidates what is stored for its URL.
#[expect(clippy::too_many_arguments, reason = "the request's whole context")]
async fn bypass(
    node: &Node,
    rc: &RouteCache,
    route: &RouteRuntime,
    ctx: &RequestContext,
    host: &str,
    client_pq: &str,
    method: &Method,
    path_and_query: String,
    headers: HeaderMap,
    body: Incoming,
) -> Result<Forwarded, ProxyError> {
    let safe = method.is_safe();
    let mut st = if safe {
        CacheStatus::fwd(Fwd::Bypass)
    } else {
        CacheStatus::fwd(Fwd::Method)
    };
    if safe {
        st.detail = Some("request-body");
    }
    rc.metrics.record(CacheOutcome::Bypass.index());
    let mut f = send_to_origin(
        route,
        route.group_for(method),
        &ctx.request_id,
        ctx.location.point,
        method,
        &path_and_query,
        headers,
        &[],
        OutgoingBody::Stream(body),
    )
    .await?;
    let status = f.response.status();
    st.fwd_status = Some(status.as_u16());
    if !safe && (status.is_success() || status.is_redirection()) {
        node.cache()
            .invalidate(&rc.policy.key, host, client_pq, f.response.headers());
    }
    f.response
        .headers_mut()
        .append(CACHE_STATUS, st.to_header());
    f.cache = Some(CacheOutcome::Bypass);
    Ok(f)
}

/// What the forwarding headers say about this hop, owned so that a cache miss can add them
/// after the lookup (a hit never needs them).
#[derive(Clone)]
pub(crate) struct Hop {
    /// The host the client asked for, as sent in `X-Forwarded-Host` (and `Host` to h2 clients).
    host: Option<HeaderValue>,
    scheme: crate::context::Scheme,
    peer_ip: HeaderValue,
    stripped_prefix: Option<String>,
    via: HeaderValue,
    /// Set on routes that forward a signed identity.
    identity: Option<Identity>,
}

/// What goes into `x-outpost-identity`; signed when the request leaves for the origin.
#[derive(Clone)]
struct Identity {
    signer: Arc<outpost_guard::IdentitySigner>,
    audience: String,
    claims: serde_json::Map<String, serde_json::Value>,
}

impl Hop {
    /// The host the client asked for.
    pub(crate) fn host(&self) -> Option<&str> {
        self.host.as_ref().and_then(|h| h.to_str().ok())
    }

    /// Adds the forwarding fields to `headers` (`present`: what [`filters::strip_request`] found
    /// in them).
    pub(crate) fn add_forwarding(
        &self,
        headers: &mut HeaderMap,
        ctx: &RequestContext,
        present: Present,
    ) {
        self.add_identity(headers);
        self.add_plain_forwarding(headers, ctx, present);
    }

    /// [`Self::add_forwarding`] with the plain forwarding fields returned instead of added, for
    /// the origin client to send after `headers` (see [`filters::forwarding_fields`]).
    pub(crate) fn forwarding_fields(
        &self,
        headers: &mut HeaderMap,
        ctx: &RequestContext,
        present: Present,
    ) -> Vec<(HeaderName, HeaderValue)> {
        self.add_identity(headers);
        filters::forwarding_fields(headers, ctx, &self.info(), present)
    }

    /// A freshly signed `x-outpost-identity`, on routes that forward one.
    fn add_identity(&self, headers: &mut HeaderMap) {
        if let Some(id) = &self.identity {
            let token = id.signer.sign(&id.audience, id.claims.clone());
            if let Ok(v) = HeaderValue::try_from(token) {
                headers.insert(IDENTITY_HEADER, v);
            }
        }
    }

    /// `X-Forwarded-*`, `Via`, request id and trace context.
    fn add_plain_forwarding(
        &self,
        headers: &mut HeaderMap,
        ctx: &RequestContext,
        present: Present,
    ) {
        filters::add_forwarding(headers, ctx, &self.info(), present);
    }

    fn info(&self) -> ForwardInfo<'_> {
        ForwardInfo {
            host: self.host.as_ref(),
            scheme: self.scheme,
            peer_ip: &self.peer_ip,
            stripped_prefix: self.stripped_prefix.as_deref(),
            via: &self.via,
        }
    }
}

/// The cache stage's way to the origin: the route's origin stage, owned so that a background
/// refresh can outlive the request that started it.
pub(crate) struct OriginFetch {
    pub(crate) snap: Arc<Snapshot>,
    pub(crate) route: usize,
    pub(crate) path_and_query: String,
    pub(crate) ctx: Arc<RequestContext>,
    pub(crate) hop: Hop,
    /// What [`filters::strip_request`] found in the headers the cache hands to `fetch`.
    pub(crate) present: Present,
    /// The origin group to ask instead of the route's (a function's request to a group).
    pub(crate) group: Option<String>,
}

impl Upstream for OriginFetch {
    type Error = ProxyError;

    fn fetch(
        &self,
        method: Method,
        mut headers: HeaderMap,
    ) -> impl Future<Output = Result<Response<ProxyBody>, ProxyError>> + Send + 'static {
        self.hop
            .add_forwarding(&mut headers, &self.ctx, self.present);
        let snap = self.snap.clone();
        let route = self.route;
        let path_and_query = self.path_and_query.clone();
        let request_id = self.ctx.request_id.clone();
        let at = self.ctx.location.point;
        let group = self.group.clone();
        async move {
            let Some(route) = snap.routes.get(route) else {
                return Err(ProxyError::NoRoute);
            };
            let group = match &group {
                Some(name) => snap
                    .origins
                    .group(name)
                    .ok_or_else(|| ProxyError::NoHealthyEndpoint(name.clone()))?,
                None => route.group_for(&method),
            };
            let f = send_to_origin(
                route,
                group,
                &request_id,
                at,
                &method,
                &path_and_query,
                headers,
                &[],
                OutgoingBody::Empty,
            )
            .await?;
            let mut response = f.response;
            // The cache stores what it gets: hop-by-hop fields never reach it.
            filters::strip_hop_by_hop(response.headers_mut());
            if let (Some(origin_ms), Some(region)) = (f.origin_ms, f.region) {
                response
                    .extensions_mut()
                    .insert(OriginInfo { origin_ms, region });
            }
            Ok(response)
        }
    }
}

/// The origin stage: nearest available endpoint, one retry on the next-nearest when the first
/// could not even connect (and the body was not consumed yet).
#[expect(clippy::too_many_arguments, reason = "the request's whole context")]
pub(crate) async fn send_to_origin(
    route: &RouteRuntime,
    group: &crate::origin::OriginGroup,
    request_id: &str,
    at: GeoPoint,
    method: &Method,
    path_and_query: &str,
    headers: HeaderMap,
    forwarding: &[(HeaderName, HeaderValue)],
    body: OutgoingBody,
) -> Result<Forwarded, ProxyError> {
    let too_large = ProxyError::PayloadTooLarge {
        limit: route.max_body,
    };
    let mut candidates = group.nearest_available(at);
    if !route.residency.is_empty() {
        candidates.retain(|e| route.residency.iter().any(|r| **r == *e.region));
        if candidates.is_empty() {
            return Err(ProxyError::NoResidentEndpoint {
                group: group.name.clone(),
                regions: route.residency.join(", "),
            });
        }
    }
    if candidates.is_empty() {
        return Err(ProxyError::NoHealthyEndpoint(group.name.clone()));
    }
    // One retry on another endpoint, only when the first could not even connect.
    let attempts = candidates.len().min(2);
    // Bodiless requests (most GETs) need neither the limit flag nor the replay machinery; a
    // body is made replayable only when a second endpoint could receive it.
    let (mut source, client_body) = match body {
        OutgoingBody::Buffered(bytes) => (BodySource::Buffered(bytes), None),
        OutgoingBody::Stream(body) if !body.is_end_stream() => {
            BodySource::limited(body, route.max_body, attempts)
        }
        OutgoingBody::Boxed(body) if !body.is_end_stream() => {
            BodySource::limited(body, route.max_body, attempts)
        }
        _ => (BodySource::Empty, None),
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
            .uri_for(path_and_query)
            .map_err(|_| ProxyError::BadRequest("request target cannot be forwarded"))?;
        let mut upstream = Request::new(source.attempt());
        *upstream.method_mut() = method.clone();
        *upstream.uri_mut() = uri;
        *upstream.version_mut() = endpoint.version();
        *upstream.headers_mut() = attempt_headers;

        let sent = endpoint
            .send(
                upstream,
                forwarding,
                route.timeout,
                &group.passive,
                client_body.as_deref(),
            )
            .await;
        match sent {
            // Our HTTP/1.1 client returns a 101 only to a request that asked for it, with the
            // connection in `Switched`; a switch to anything but the WebSocket offered is
            // broken too (the connection is dropped with the response).
            Ok((response, _))
                if response.status() == StatusCode::SWITCHING_PROTOCOLS
                    && (response.extensions().get::<Switched>().is_none()
                        || !tunnel::switched_to_websocket(response.headers())) =>
            {
                return Err(ProxyError::OriginBroken {
                    endpoint: endpoint.authority.to_string(),
                    reason: "it switched protocols unasked, or to another than websocket".into(),
                });
            }
            // hyper removes only `chunked`; any other transfer coding (gzip, chunked) would reach
            // the client as raw compressed bytes once the hop-by-hop field is dropped.
            Ok((response, _)) if has_unremovable_coding(response.headers()) => {
                return Err(ProxyError::OriginBroken {
                    endpoint: endpoint.authority.to_string(),
                    reason: "it used a transfer coding other than chunked".into(),
                });
            }
            Ok((response, secs)) => {
                return Ok(Forwarded {
                    response,
                    origin_ms: Some(secs * 1e3),
                    region: Some(endpoint.region.clone()),
                    cache: None,
                });
            }
            Err(AttemptError::Connect(e)) => {
                tracing::warn!(
                    request_id = %request_id,
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
            Err(AttemptError::ClientBody) => {
                if client_body.as_deref().is_some_and(BodyState::too_large) {
                    return Err(too_large);
                }
                return Err(ProxyError::ClientBody);
            }
            Err(AttemptError::ClientBodyTimeout) => return Err(ProxyError::ClientBodyTimeout),
            Err(AttemptError::Broken(e)) => {
                return Err(ProxyError::OriginBroken {
                    endpoint: endpoint.authority.to_string(),
                    reason: error_chain(e.as_ref()),
                });
            }
        }
    }
    Err(last_error.unwrap_or_else(|| ProxyError::NoHealthyEndpoint(group.name.clone())))
}

/// Whether a response's `Transfer-Encoding` names a coding besides `chunked` (RFC 9112 §6.1).
fn has_unremovable_coding(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::TRANSFER_ENCODING)
        .iter()
        .flat_map(|v| v.as_bytes().split(|b| *b == b','))
        .map(<[u8]>::trim_ascii)
        .any(|coding| !coding.is_empty() && !coding.eq_ignore_ascii_case(b"chunked"))
}

/// The request body to send: none, the client's stream, or bytes already read (outbox).
pub(crate) enum OutgoingBody {
    /// No body.
    Empty,
    /// The client's body, streamed.
    Stream(Incoming),
    /// A body read whole; every attempt can send it.
    Buffered(bytes::Bytes),
    /// A body from inside the node (a function's request), streamed.
    Boxed(ProxyBody),
}

/// The origin stage for a body already in memory (the outbox deliverer's way in).
pub(crate) async fn send_buffered(
    route: &RouteRuntime,
    request_id: &str,
    at: GeoPoint,
    method: &Method,
    path_and_query: &str,
    headers: HeaderMap,
    body: bytes::Bytes,
) -> Result<Response<ProxyBody>, ProxyError> {
    send_to_origin(
        route,
        route.group_for(method),
        request_id,
        at,
        method,
        path_and_query,
        headers,
        &[],
        OutgoingBody::Buffered(body),
    )
    .await
    .map(|f| f.response)
}

/// Where each attempt's request body comes from.
enum BodySource {
    /// No body: every attempt gets an empty one.
    Empty,
    /// Bytes in memory: any number of attempts.
    Buffered(bytes::Bytes),
    /// One attempt only: the body is handed over once.
    Once(Option<ProxyBody>),
    /// A second attempt is possible while the first never polled the body.
    Replay(ReplayableBody),
}

impl BodySource {
    /// A streamed body held to `limit` bytes (its state says whether it went over, failed or
    /// ended), replayable when a second endpoint could receive it.
    fn limited<B>(body: B, limit: u64, attempts: usize) -> (BodySource, Option<Arc<BodyState>>)
    where
        B: http_body::Body<Data = bytes::Bytes> + Send + 'static,
        B::Error: Into<crate::body::BoxError>,
    {
        let state = Arc::new(BodyState::default());
        let limited = boxed(LimitedBody::new(body, limit, state.clone()));
        let source = if attempts > 1 {
            BodySource::Replay(ReplayableBody::new(limited))
        } else {
            BodySource::Once(Some(limited))
        };
        (source, Some(state))
    }

    fn attempt(&mut self) -> ProxyBody {
        match self {
            BodySource::Empty => empty(),
            BodySource::Buffered(b) => crate::body::full(b.clone()),
            BodySource::Once(body) => body.take().unwrap_or_else(empty),
            BodySource::Replay(r) => r.attempt(),
        }
    }

    fn can_retry(&self) -> bool {
        match self {
            BodySource::Empty | BodySource::Buffered(_) => true,
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
    fn only_chunked_transfer_coding_passes() {
        let te = |v: &'static str| {
            let mut h = HeaderMap::new();
            h.insert(header::TRANSFER_ENCODING, HeaderValue::from_static(v));
            has_unremovable_coding(&h)
        };
        assert!(!has_unremovable_coding(&HeaderMap::new()));
        assert!(!te("chunked") && !te("Chunked "));
        assert!(te("gzip, chunked") && te("deflate"));
    }

    #[test]
    fn hosts_are_uri_host_and_port_only() {
        for ok in [
            "a.example",
            "a.example:8080",
            "127.0.0.1:1",
            "[::1]",
            "[::1]:443",
            "x:",
        ] {
            assert!(is_valid_host(ok.as_bytes()), "{ok}");
        }
        for bad in [
            "",
            "u@a.example",
            "a.example/evil?x",
            "a.example b",
            "a, b",
            "a.example:http",
            "::1",
            "[::1",
            "[::1]x",
            ":80",
        ] {
            assert!(!is_valid_host(bad.as_bytes()), "{bad}");
        }
    }

    fn req(version: Version, target: &str, hosts: &[&'static str]) -> Request<()> {
        let mut r = Request::builder()
            .version(version)
            .uri(target)
            .body(())
            .expect("request");
        for h in hosts {
            r.headers_mut()
                .append(header::HOST, HeaderValue::from_static(h));
        }
        r
    }

    #[test]
    fn one_host_rules_routing_cache_and_origin() {
        // Absolute form: the target's authority replaces Host (RFC 9112 §3.2.2).
        let mut r = req(
            Version::HTTP_11,
            "http://public.example/x",
            &["admin.example"],
        );
        assert_eq!(settle_host(&mut r), Ok(()));
        assert_eq!(r.headers()[header::HOST], "public.example");
        assert_eq!(request_host(r.uri(), r.headers()), Some("public.example"));
        // Two Host lines, a missing one on HTTP/1.1, userinfo: refused.
        let two = &mut req(Version::HTTP_11, "/x", &["a.example", "b.example"]);
        assert!(settle_host(two).is_err());
        assert!(settle_host(&mut req(Version::HTTP_11, "/x", &[])).is_err());
        assert!(settle_host(&mut req(Version::HTTP_10, "/x", &[])).is_ok());
        assert!(settle_host(&mut req(Version::HTTP_11, "http://u:p@a.example/", &[])).is_err());
        // HTTP/2: Host must agree with :authority; one of them must be there.
        let h2 = |target, hosts| req(Version::HTTP_2, target, hosts);
        assert!(settle_host(&mut h2("https://a.example/", &["b.example"])).is_err());
        assert!(settle_host(&mut h2("https://a.example/", &["A.example"])).is_ok());
        assert!(settle_host(&mut h2("https://a.example/", &[])).is_ok());
        assert!(settle_host(&mut h2("/x", &[])).is_err());
    }

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
