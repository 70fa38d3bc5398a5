//! `authorize`: decides at the edge whether a request goes on to the origin or
//! is denied, then either streams the request through to the origin group and
//! its response back, or answers 403 / 429 itself.
//!
//! Settings (wasi:config, all optional):
//! * `allowed_countries`: comma list of ISO codes matched against
//!   `x-outpost-geo-country`; empty or absent = any country.
//! * `required_scope`: must be one of the space-separated words of the `scope`
//!   claim in `x-outpost-claims` (a JSON string, or a JSON array of strings).
//! * `rate_per_minute`: per subject (`x-outpost-sub`), else per first
//!   `x-forwarded-for` address, else `anon`; counted with wasi:keyvalue
//!   `increment` on `rate:<who>:<unix minute>`. Over the limit → 429 with
//!   `retry-after`. If the store fails, the request is refused (503): the
//!   limiter fails closed.
//! * `origin`: the origin group to forward to, default `api`.

use outpost_guest::{
    atomics, config_get, exports::wasi::http::incoming_handler::Guest, kv_open, pump, req_header,
    respond_error, unix_now, wait_response,
};
use wasip2::http::outgoing_handler;
use wasip2::http::types::{
    ErrorCode, Fields, IncomingBody, IncomingRequest, OutgoingBody, OutgoingRequest,
    OutgoingResponse, ResponseOutparam, Scheme,
};

/// Headers that describe one hop (RFC 9110 §7.6.1) or that the host sets itself;
/// never copied between the two connections (wasmtime also refuses most of them).
const HOP_BY_HOP: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "host",
    "http2-settings",
];

struct Authorize;

enum Decision {
    Forward {
        origin: String,
    },
    Deny {
        status: u16,
        error: &'static str,
        reason: String,
        retry_after: Option<u64>,
    },
}

fn deny(status: u16, error: &'static str, reason: impl Into<String>) -> Decision {
    Decision::Deny {
        status,
        error,
        reason: reason.into(),
        retry_after: None,
    }
}

impl Guest for Authorize {
    fn handle(request: IncomingRequest, out: ResponseOutparam) {
        let rid = req_header(&request, "x-request-id");
        match decide(&request) {
            Decision::Forward { origin } => forward(request, out, &origin, rid.as_deref()),
            Decision::Deny {
                status,
                error,
                reason,
                retry_after,
            } => {
                let retry = retry_after.map(|s| s.to_string());
                let extra: Vec<(&str, &str)> = retry
                    .as_deref()
                    .map(|r| ("retry-after", r))
                    .into_iter()
                    .collect();
                respond_error(out, status, &extra, error, &reason, rid.as_deref());
            }
        }
    }
}

fn setting(key: &str) -> Result<Option<String>, Decision> {
    match config_get(key) {
        Ok(v) => Ok(v.map(|s| s.trim().to_owned()).filter(|s| !s.is_empty())),
        Err(e) => Err(deny(500, "config_unavailable", e)),
    }
}

fn decide(req: &IncomingRequest) -> Decision {
    match checks(req) {
        Ok(origin) => Decision::Forward { origin },
        Err(d) => d,
    }
}

/// Runs every check; `Ok(origin group)` when the request may go on.
fn checks(req: &IncomingRequest) -> Result<String, Decision> {
    // 1. Country allow-list.
    if let Some(list) = setting("allowed_countries")? {
        let allowed: Vec<String> = list
            .split(',')
            .map(|c| c.trim().to_ascii_uppercase())
            .filter(|c| !c.is_empty())
            .collect();
        if !allowed.is_empty() {
            match req_header(req, "x-outpost-geo-country") {
                None => return Err(deny(403, "forbidden", "country unknown")),
                Some(c) if !allowed.contains(&c.trim().to_ascii_uppercase()) => {
                    return Err(deny(403, "forbidden", format!("country {c} not allowed")));
                }
                Some(_) => {}
            }
        }
    }

    // 2. Required scope from the forwarded JWT claims.
    if let Some(scope) = setting("required_scope")? {
        let Some(claims) = req_header(req, "x-outpost-claims") else {
            return Err(deny(
                403,
                "forbidden",
                format!("missing scope {scope}: no claims"),
            ));
        };
        let claims: serde_json::Value = serde_json::from_str(&claims)
            .map_err(|e| deny(403, "forbidden", format!("unreadable claims: {e}")))?;
        let has = match claims.get("scope") {
            Some(serde_json::Value::String(s)) => s.split_whitespace().any(|w| w == scope),
            Some(serde_json::Value::Array(a)) => a.iter().any(|w| w.as_str() == Some(&scope)),
            _ => false,
        };
        if !has {
            return Err(deny(403, "forbidden", format!("missing scope {scope}")));
        }
    }

    // 3. Rate limit per subject / client address, one key per minute.
    if let Some(limit) = setting("rate_per_minute")? {
        let limit: u64 = limit.parse().map_err(|_| {
            deny(
                500,
                "bad_config",
                format!("rate_per_minute {limit:?} is not a number"),
            )
        })?;
        let who = req_header(req, "x-outpost-sub")
            .filter(|s| !s.is_empty())
            .or_else(|| {
                req_header(req, "x-forwarded-for")
                    .and_then(|v| v.split(',').next().map(|s| s.trim().to_owned()))
                    .filter(|s| !s.is_empty())
            })
            .unwrap_or_else(|| "anon".to_owned());
        let now = unix_now();
        let key = format!("rate:{who}:{}", now / 60);
        let count = kv_open()
            .and_then(|b| {
                atomics::increment(&b, &key, 1)
                    .map_err(|e| format!("wasi:keyvalue increment: {e:?}"))
            })
            .map_err(|e| deny(503, "rate_limiter_unavailable", e))?;
        if count > limit {
            return Err(Decision::Deny {
                status: 429,
                error: "rate_limited",
                reason: format!("more than {limit} requests per minute for {who}"),
                retry_after: Some(60 - now % 60),
            });
        }
    }

    Ok(setting("origin")?.unwrap_or_else(|| "api".to_owned()))
}

fn copy_headers(from: &Fields) -> Fields {
    let conn: Vec<String> = from
        .get("connection")
        .iter()
        .flat_map(|v| {
            String::from_utf8_lossy(v)
                .split(',')
                .map(|s| s.trim().to_ascii_lowercase())
                .collect::<Vec<_>>()
        })
        .collect();
    let to = Fields::new();
    for (name, value) in from.entries() {
        let lower = name.to_ascii_lowercase();
        if HOP_BY_HOP.contains(&lower.as_str()) || conn.contains(&lower) {
            continue;
        }
        let _ = to.append(&name, &value); // the host refuses a few more; skip those
    }
    to
}

fn bad_gateway(out: ResponseOutparam, reason: String, rid: Option<&str>) {
    respond_error(out, 502, &[], "bad_gateway", &reason, rid);
}

/// Streams `request` to `http://<origin><path>` and the origin's answer back.
fn forward(request: IncomingRequest, out: ResponseOutparam, origin: &str, rid: Option<&str>) {
    let path = request.path_with_query().unwrap_or_else(|| "/".to_owned());
    let outgoing = OutgoingRequest::new(copy_headers(&request.headers()));
    let ok = outgoing.set_method(&request.method()).is_ok()
        && outgoing.set_scheme(Some(&Scheme::Http)).is_ok()
        && outgoing.set_authority(Some(origin)).is_ok()
        && outgoing.set_path_with_query(Some(&path)).is_ok();
    if !ok {
        return respond_error(
            out,
            500,
            &[],
            "bad_config",
            &format!("cannot address origin {origin:?} path {path:?}"),
            rid,
        );
    }
    let Ok(req_body) = outgoing.body() else {
        return bad_gateway(out, "outgoing body unavailable".into(), rid);
    };
    let fut = match outgoing_handler::handle(outgoing, None) {
        Ok(f) => f,
        Err(code) => return bad_gateway(out, format!("{code:?}"), rid),
    };

    // Request body: client → origin, streamed.
    let Ok(client_body) = request.consume() else {
        return bad_gateway(out, "request body already taken".into(), rid);
    };
    let pumped = match (client_body.stream(), req_body.write()) {
        (Ok(mut from), Ok(mut to)) => pump(&mut from, &mut to),
        _ => Err("body streams unavailable".to_owned()),
    };
    drop(IncomingBody::finish(client_body));
    let sent = match pumped {
        Ok(_) => OutgoingBody::finish(req_body, None).map_err(|code| format!("{code:?}")),
        Err(e) => {
            drop(req_body); // unfinished: the origin sees an aborted body
            Err(e)
        }
    };

    // Response: origin → client, streamed. The response has the last word even when the
    // request body could not be written in full: an origin may answer (413, 401 …) before it
    // reads the body, and when the exchange failed its error says more than the body's.
    let resp = match wait_response(fut) {
        Ok(r) => r,
        Err(code) => {
            let reason = match sent {
                Ok(()) => error_text(&code),
                Err(e) => format!("request body: {e}; exchange: {}", error_text(&code)),
            };
            return bad_gateway(out, reason, rid);
        }
    };
    let reply = OutgoingResponse::new(copy_headers(&resp.headers()));
    let _ = reply.set_status_code(resp.status());
    let (Ok(origin_body), Ok(reply_body)) = (resp.consume(), reply.body()) else {
        return bad_gateway(out, "response body unavailable".into(), rid);
    };
    ResponseOutparam::set(out, Ok(reply));
    let pumped = match (origin_body.stream(), reply_body.write()) {
        (Ok(mut from), Ok(mut to)) => pump(&mut from, &mut to),
        _ => Err("body streams unavailable".to_owned()),
    };
    drop(IncomingBody::finish(origin_body));
    if pumped.is_ok() {
        let _ = OutgoingBody::finish(reply_body, None);
    }
    // On error reply_body is dropped unfinished, so the client sees a cut-off body
    // rather than a short one that looks complete.
}

fn error_text(code: &ErrorCode) -> String {
    format!("{code:?}")
}

outpost_guest::export!(Authorize);
