//! Errors on the request path, each knowing who caused it and which HTTP status it becomes.
//!
//! One place maps failures to statuses, so `502` vs `504` vs `503` is decided here and nowhere
//! else; clients get an RFC 9457 `application/problem+json` body carrying the request id.

use std::time::Duration;

use http::{HeaderValue, Response, StatusCode};

use crate::body::{ProxyBody, full};

/// Who caused a failure: decides whether it is the client's fault, the origin's or ours.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorSource {
    /// The client sent something we refuse.
    Downstream,
    /// The origin failed or could not be reached.
    Upstream,
    /// Outpost itself (configuration, a bug).
    Internal,
}

/// A failure on the request path.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// No route matches the host and path.
    #[error("no route matches this host and path")]
    NoRoute,
    /// The request target is not something we forward (dot segments, CONNECT, asterisk form).
    #[error("{0}")]
    BadRequest(&'static str),
    /// The method is not proxied.
    #[error("method {0} is not supported by this node")]
    MethodNotAllowed(String),
    /// The client's body broke off or was malformed (bad chunked framing, the client left
    /// before its declared length) while it was being forwarded.
    #[error("the request body was malformed or ended before its declared length")]
    ClientBody,
    /// The client's body was still arriving when the origin's time was up.
    #[error("the request body did not arrive in time")]
    ClientBodyTimeout,
    /// The body is larger than the route allows.
    #[error("request body exceeds this route's limit of {limit} bytes")]
    PayloadTooLarge {
        /// The route's limit.
        limit: u64,
    },
    /// An analytics events batch the node refuses (bad JSON, or an event breaking a rule); the
    /// message names the first bad event's index.
    #[error("{0}")]
    BadEvents(String),
    /// The request already passed through this node.
    #[error("request loop detected: this node already forwarded this request")]
    Loop,
    /// Every endpoint of the origin group is unhealthy or ejected.
    #[error("no healthy endpoint in origin group `{0}`")]
    NoHealthyEndpoint(String),
    /// The origin did not send a response head in time.
    #[error("origin {endpoint} did not answer within {timeout:?}")]
    OriginTimeout {
        /// `host:port` of the endpoint.
        endpoint: String,
        /// The timeout that expired.
        timeout: Duration,
    },
    /// No connection could be opened to the origin (after failover, if any).
    #[error("could not connect to origin {endpoint}")]
    OriginConnect {
        /// `host:port` of the last endpoint tried.
        endpoint: String,
    },
    /// The exchange with the origin broke.
    #[error("origin {endpoint} failed: {reason}")]
    OriginBroken {
        /// `host:port` of the endpoint.
        endpoint: String,
        /// What went wrong.
        reason: String,
    },
    /// The route's token rules refused the request (401 or 403).
    #[error(transparent)]
    Auth(#[from] outpost_guard::AuthError),
    /// A rate limit refused the request.
    #[error("rate limit `{}` exceeded; retry in {} s", .0.limit, .0.retry_after)]
    RateLimited(outpost_guard::ratelimit::Limited),
    /// The route is not available in the client's country.
    #[error("this resource is not available in {0}")]
    Geo(String),
    /// The route's residency regions have no available endpoint (and it may not fail over).
    #[error("no healthy endpoint of origin group `{group}` in the route's regions ({regions})")]
    NoResidentEndpoint {
        /// The origin group.
        group: String,
        /// The allowed regions.
        regions: String,
    },
    /// The route's outbox is at its limits while the center is unreachable.
    #[error("{0}; the write was not accepted, retry later")]
    OutboxFull(String),
    /// The local store could not keep the write.
    #[error("the write could not be stored at the edge ({0}); retry later")]
    Store(String),
    /// The route's function ran past its time budget before answering.
    #[error("function `{0}` did not answer in time")]
    FunctionTimeout(String),
    /// The route's function trapped, panicked or ran out of memory (details in the log,
    /// under this request id).
    #[error(
        "function `{name}` failed ({outcome}); the node's log has the details under this request id"
    )]
    FunctionFailed {
        /// Function name.
        name: String,
        /// `trap` or `oom`.
        outcome: &'static str,
    },
    /// The route's function is not running here (not loaded, or no free instance slot).
    #[error("function `{0}` is not available on this node right now; retry shortly")]
    FunctionUnavailable(String),
    /// The request could not be handed to the function.
    #[error("the request cannot be handed to function `{0}`: {1}")]
    FunctionRequest(String, String),
}

impl ProxyError {
    /// Who caused it.
    pub fn source(&self) -> ErrorSource {
        match self {
            ProxyError::NoRoute
            | ProxyError::BadRequest(_)
            | ProxyError::ClientBody
            | ProxyError::ClientBodyTimeout
            | ProxyError::BadEvents(_)
            | ProxyError::MethodNotAllowed(_)
            | ProxyError::PayloadTooLarge { .. }
            | ProxyError::Auth(_)
            | ProxyError::RateLimited(_)
            | ProxyError::Geo(_)
            | ProxyError::FunctionRequest(..) => ErrorSource::Downstream,
            ProxyError::NoHealthyEndpoint(_)
            | ProxyError::NoResidentEndpoint { .. }
            | ProxyError::OriginTimeout { .. }
            | ProxyError::OriginConnect { .. }
            | ProxyError::OriginBroken { .. } => ErrorSource::Upstream,
            ProxyError::Loop
            | ProxyError::OutboxFull(_)
            | ProxyError::Store(_)
            | ProxyError::FunctionTimeout(_)
            | ProxyError::FunctionFailed { .. }
            | ProxyError::FunctionUnavailable(_) => ErrorSource::Internal,
        }
    }

    /// The status sent to the client.
    pub fn status(&self) -> StatusCode {
        match self {
            ProxyError::NoRoute => StatusCode::NOT_FOUND,
            ProxyError::BadRequest(_) | ProxyError::BadEvents(_) | ProxyError::ClientBody => {
                StatusCode::BAD_REQUEST
            }
            ProxyError::ClientBodyTimeout => StatusCode::REQUEST_TIMEOUT,
            ProxyError::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            ProxyError::PayloadTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            ProxyError::Loop => StatusCode::LOOP_DETECTED,
            ProxyError::NoHealthyEndpoint(_) => StatusCode::SERVICE_UNAVAILABLE,
            ProxyError::OriginTimeout { .. } => StatusCode::GATEWAY_TIMEOUT,
            ProxyError::OriginConnect { .. } | ProxyError::OriginBroken { .. } => {
                StatusCode::BAD_GATEWAY
            }
            ProxyError::Auth(e) => e.status(),
            ProxyError::RateLimited(_) => StatusCode::TOO_MANY_REQUESTS,
            ProxyError::Geo(_) => StatusCode::UNAVAILABLE_FOR_LEGAL_REASONS,
            ProxyError::NoResidentEndpoint { .. } => StatusCode::SERVICE_UNAVAILABLE,
            ProxyError::OutboxFull(_) => StatusCode::INSUFFICIENT_STORAGE,
            ProxyError::Store(_) => StatusCode::SERVICE_UNAVAILABLE,
            ProxyError::FunctionTimeout(_) => StatusCode::GATEWAY_TIMEOUT,
            ProxyError::FunctionFailed { .. } => StatusCode::INTERNAL_SERVER_ERROR,
            ProxyError::FunctionUnavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            ProxyError::FunctionRequest(..) => StatusCode::BAD_REQUEST,
        }
    }

    /// Stable machine-readable code, also the `type` suffix of the problem document.
    pub fn code(&self) -> &'static str {
        match self {
            ProxyError::NoRoute => "no-route",
            ProxyError::BadRequest(_) => "bad-request",
            ProxyError::ClientBody => "bad-request-body",
            ProxyError::ClientBodyTimeout => "request-body-timeout",
            ProxyError::BadEvents(_) => "invalid-events",
            ProxyError::MethodNotAllowed(_) => "method-not-allowed",
            ProxyError::PayloadTooLarge { .. } => "payload-too-large",
            ProxyError::Loop => "loop-detected",
            ProxyError::NoHealthyEndpoint(_) => "no-healthy-endpoint",
            ProxyError::OriginTimeout { .. } => "origin-timeout",
            ProxyError::OriginConnect { .. } => "origin-unreachable",
            ProxyError::OriginBroken { .. } => "origin-error",
            ProxyError::Auth(outpost_guard::AuthError::Forbidden(_)) => "insufficient-scope",
            ProxyError::Auth(_) => "unauthorized",
            ProxyError::RateLimited(_) => "rate-limited",
            ProxyError::Geo(_) => "unavailable-for-legal-reasons",
            ProxyError::NoResidentEndpoint { .. } => "no-resident-endpoint",
            ProxyError::OutboxFull(_) => "outbox-full",
            ProxyError::Store(_) => "store-unavailable",
            ProxyError::FunctionTimeout(_) => "function-timeout",
            ProxyError::FunctionFailed { .. } => "function-failed",
            ProxyError::FunctionUnavailable(_) => "function-unavailable",
            ProxyError::FunctionRequest(..) => "function-bad-request",
        }
    }

    /// What the client is told. Origin failures name neither the endpoint's address nor the
    /// transport's error (both are in the node's log under the request id).
    pub fn client_detail(&self) -> String {
        match self {
            ProxyError::OriginTimeout { timeout, .. } => {
                format!("the origin did not answer within {timeout:?}")
            }
            ProxyError::OriginConnect { .. } => "the origin could not be reached".to_owned(),
            ProxyError::OriginBroken { .. } => {
                "the origin's answer could not be received; the node's log has the details under this request id".to_owned()
            }
            other => other.to_string(),
        }
    }

    /// The problem+json response for this error (with an RFC 6750 challenge for auth).
    pub fn to_response(&self, request_id: &str) -> Response<ProxyBody> {
        let mut resp = problem(
            self.status(),
            self.code(),
            &self.client_detail(),
            request_id,
        );
        match self {
            ProxyError::Auth(e) => {
                if let Ok(v) = HeaderValue::from_str(&e.challenge()) {
                    resp.headers_mut().insert(http::header::WWW_AUTHENTICATE, v);
                }
            }
            ProxyError::RateLimited(limited) => {
                for (name, value) in &limited.headers {
                    resp.headers_mut().append(name, value.clone());
                }
            }
            ProxyError::FunctionUnavailable(_) => {
                resp.headers_mut()
                    .insert(http::header::RETRY_AFTER, HeaderValue::from_static("1"));
            }
            _ => {}
        }
        resp
    }
}

/// Builds an RFC 9457 problem response.
pub fn problem(
    status: StatusCode,
    code: &str,
    detail: &str,
    request_id: &str,
) -> Response<ProxyBody> {
    let body = serde_json::json!({
        "type": format!("urn:outpost:problem:{code}"),
        "title": status.canonical_reason().unwrap_or("Error"),
        "status": status.as_u16(),
        "detail": detail,
        "request_id": request_id,
    });
    let mut resp = Response::new(full(body.to_string()));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/problem+json"),
    );
    resp.headers_mut().insert(
        http::header::CACHE_CONTROL,
        HeaderValue::from_static("no-store"),
    );
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upstream_failures_map_to_gateway_statuses() {
        let e = ProxyError::OriginTimeout {
            endpoint: "a:1".into(),
            timeout: Duration::from_secs(1),
        };
        assert_eq!(e.status(), StatusCode::GATEWAY_TIMEOUT);
        assert_eq!(e.source(), ErrorSource::Upstream);
        assert_eq!(
            ProxyError::OriginConnect {
                endpoint: "a:1".into()
            }
            .status(),
            StatusCode::BAD_GATEWAY
        );
        assert_eq!(
            ProxyError::NoHealthyEndpoint("x".into()).status(),
            StatusCode::SERVICE_UNAVAILABLE
        );
    }

    #[test]
    fn clients_are_not_told_origin_addresses_or_transport_errors() {
        let e = ProxyError::OriginBroken {
            endpoint: "10.0.0.7:8000".into(),
            reason: "error from user's Body stream: invalid chunk size".into(),
        };
        assert!(e.to_string().contains("10.0.0.7"), "the log keeps it");
        let detail = e.client_detail();
        assert!(
            !detail.contains("10.0.0.7") && !detail.contains("chunk"),
            "{detail}"
        );
        for e in [
            ProxyError::OriginConnect {
                endpoint: "10.0.0.7:8000".into(),
            },
            ProxyError::OriginTimeout {
                endpoint: "10.0.0.7:8000".into(),
                timeout: Duration::from_secs(5),
            },
        ] {
            assert!(!e.client_detail().contains("10.0.0.7"));
        }
    }

    #[test]
    fn problem_documents_carry_type_status_and_request_id() {
        let r = ProxyError::NoHealthyEndpoint("central".into()).to_response("rid-1");
        assert_eq!(r.status(), 503);
        assert_eq!(r.headers()["content-type"], "application/problem+json");
    }
}
