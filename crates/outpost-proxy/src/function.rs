//! The function stage: a route's WebAssembly function answers instead of the origin. The
//! guest gets the request with the context the node established (request id, trace, geo,
//! variant, verified identity) as headers only the node can set; its own requests to
//! `http://<group>/…` come back here and take the cache and origin stages like any request.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, Uri, Version};
use http_body::Body as _;
use hyper::body::Incoming;
use outpost_cache::CacheRequest;
use outpost_functions::{FnBody, Outbound, OutboundError, Outcome, Served, headers as fh};
use outpost_guard::Principal;

use crate::body::{LimitedBody, boxed};
use crate::context::RequestContext;
use crate::error::ProxyError;
use crate::filters::{self, X_REQUEST_ID};
use crate::handler::{Forwarded, Hop, OriginFetch, OriginInfo, OutgoingBody, send_to_origin};
use crate::node::{Node, RouteRuntime, Snapshot};

const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");

fn set(headers: &mut HeaderMap, name: &'static str, value: &str) {
    if let Ok(v) = HeaderValue::from_str(value) {
        headers.insert(HeaderName::from_static(name), v);
    }
}

/// Runs the route's function for one request whose headers were already stripped of
/// anything internal.
#[expect(clippy::too_many_arguments, reason = "the request's whole context")]
pub(crate) async fn run(
    node: &Arc<Node>,
    snap: &Arc<Snapshot>,
    index: usize,
    route: &RouteRuntime,
    name: &str,
    ctx: &Arc<RequestContext>,
    hop: Hop,
    principal: Option<&Principal>,
    (method, uri, version): (Method, Uri, Version),
    path_and_query: String,
    mut headers: HeaderMap,
    body: Incoming,
) -> Result<Forwarded, ProxyError> {
    let deployed = node
        .functions()
        .and_then(|f| f.get(name))
        .ok_or_else(|| ProxyError::FunctionUnavailable(name.to_owned()))?;

    // What the guest may trust: set here, after every client copy was stripped.
    headers.insert(X_REQUEST_ID, ctx.request_id.header());
    headers.insert(TRACEPARENT, ctx.trace.header_value());
    let loc = &ctx.location;
    if let Some(c) = &loc.country {
        set(&mut headers, fh::GEO_COUNTRY, c);
    }
    if let Some(r) = &loc.region {
        set(&mut headers, fh::GEO_REGION, r);
    }
    set(&mut headers, fh::GEO_LAT, &format!("{:.4}", loc.point.lat));
    set(&mut headers, fh::GEO_LON, &format!("{:.4}", loc.point.lon));
    if let Some(p) = principal {
        if let Some(sub) = &p.sub {
            set(&mut headers, fh::SUB, sub);
        }
        let claims: serde_json::Map<String, serde_json::Value> = route
            .auth
            .iter()
            .flat_map(|a| a.forward_claims.iter())
            .filter_map(|n| p.claims.get(n).map(|v| (n.clone(), v.clone())))
            .collect();
        set(
            &mut headers,
            fh::CLAIMS,
            &serde_json::Value::Object(claims).to_string(),
        );
    }

    let host = hop
        .host()
        .map(str::to_owned)
        .or_else(|| uri.host().map(str::to_owned));
    let target = match &host {
        Some(h) => format!("http://{h}{path_and_query}"),
        None => path_and_query,
    };
    let target: Uri = target
        .parse()
        .map_err(|_| ProxyError::BadRequest("request target cannot be handed to a function"))?;
    let mut req = Request::new(if body.is_end_stream() {
        crate::body::empty()
    } else {
        let state = Arc::new(crate::body::BodyState::default());
        boxed(LimitedBody::new(body, route.max_body, state))
    });
    *req.method_mut() = method;
    *req.uri_mut() = target;
    *req.version_mut() = version;
    *req.headers_mut() = headers;

    let outbound = Arc::new(FnOutbound {
        node: node.clone(),
        snap: snap.clone(),
        route: index,
        ctx: ctx.clone(),
        hop,
        authenticated: principal.is_some(),
    });
    match deployed.serve(req, outbound).await {
        Served::Response(mut response) => {
            set(
                response.headers_mut(),
                fh::FUNCTION,
                &format!("{}@{}", deployed.name(), deployed.version()),
            );
            Ok(Forwarded {
                response,
                origin_ms: None,
                region: None,
                cache: None,
            })
        }
        Served::Failed(f) => {
            tracing::warn!(
                request_id = %ctx.request_id,
                function = name,
                version = deployed.version(),
                outcome = f.outcome.as_str(),
                detail = %f.detail,
                "Function failed."
            );
            Err(match f.outcome {
                Outcome::Timeout => ProxyError::FunctionTimeout(name.to_owned()),
                Outcome::Unavailable => ProxyError::FunctionUnavailable(name.to_owned()),
                Outcome::BadRequest => ProxyError::FunctionRequest(name.to_owned(), f.detail),
                other => ProxyError::FunctionFailed {
                    name: name.to_owned(),
                    outcome: other.as_str(),
                },
            })
        }
    }
}

/// A function's way to origin groups, with the context of the request it serves.
struct FnOutbound {
    node: Arc<Node>,
    snap: Arc<Snapshot>,
    route: usize,
    ctx: Arc<RequestContext>,
    hop: Hop,
    authenticated: bool,
}

impl Outbound for FnOutbound {
    fn allows(&self, group: &str) -> bool {
        self.snap
            .routes
            .get(self.route)
            .is_some_and(|r| r.function_groups.iter().any(|g| g == group))
    }

    fn send(
        &self,
        group: String,
        req: Request<FnBody>,
    ) -> Pin<Box<dyn Future<Output = Result<http::Response<FnBody>, OutboundError>> + Send>> {
        let node = self.node.clone();
        let snap = self.snap.clone();
        let index = self.route;
        let ctx = self.ctx.clone();
        let hop = self.hop.clone();
        let authenticated = self.authenticated;
        Box::pin(async move {
            let Some(route) = snap.routes.get(index) else {
                return Err(OutboundError::Other("the route is gone".into()));
            };
            if !route.function_groups.contains(&group) {
                return Err(OutboundError::Denied);
            }
            let Some(target) = snap.origins.group(&group).cloned() else {
                return Err(OutboundError::Denied);
            };
            let (parts, body) = req.into_parts();
            let pq = parts
                .uri
                .path_and_query()
                .map_or("/", |p| p.as_str())
                .to_owned();
            let mut headers = parts.headers;
            // A guest copying its request's headers must not pass on what only the node says.
            let present =
                filters::strip_request(&mut headers, &ctx, &snap.locator, &snap.internal_headers);
            let cacheable = parts.method == Method::GET || parts.method == Method::HEAD;
            let result = match &route.cache {
                Some(rc) if cacheable && body.is_end_stream() => {
                    let upstream = Arc::new(OriginFetch {
                        snap: snap.clone(),
                        route: index,
                        path_and_query: pq.clone(),
                        ctx: ctx.clone(),
                        hop,
                        present,
                        group: Some(group.clone()),
                    });
                    let handled = node
                        .cache()
                        .handle(
                            &rc.policy,
                            CacheRequest {
                                host: &group,
                                path_and_query: &pq,
                                method: &parts.method,
                                headers,
                                authenticated,
                            },
                            upstream,
                        )
                        .await;
                    rc.metrics.record(handled.outcome.index());
                    handled.result
                }
                _ => {
                    hop.add_forwarding(&mut headers, &ctx, present);
                    send_to_origin(
                        route,
                        &target,
                        &ctx.request_id,
                        ctx.location.point,
                        &parts.method,
                        &pq,
                        headers,
                        &[],
                        OutgoingBody::Boxed(body),
                    )
                    .await
                    .map(|mut f| {
                        if let (Some(origin_ms), Some(region)) = (f.origin_ms, f.region) {
                            f.response
                                .extensions_mut()
                                .insert(OriginInfo { origin_ms, region });
                        }
                        f.response
                    })
                }
            };
            result.map_err(|e| match e {
                ProxyError::OriginTimeout { .. } => OutboundError::Timeout,
                ProxyError::OriginConnect { .. }
                | ProxyError::NoHealthyEndpoint(_)
                | ProxyError::NoResidentEndpoint { .. } => {
                    OutboundError::Unreachable(e.to_string())
                }
                other => OutboundError::Other(other.to_string()),
            })
        })
    }
}
