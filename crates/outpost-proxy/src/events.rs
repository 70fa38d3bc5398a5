//! `POST /.well-known/outpost/events`: analytics events from clients, kept at the edge.
//!
//! On any public listener, before routing (like the outbox status URL): the node answers it
//! itself and never forwards it. The body is one batch,
//!
//! ```json
//! {"events": [{"type": "page_view", "key": "/products/42", "ts": 1732350000000, "value": 1.0}]}
//! ```
//!
//! where `key` (default `""`), `ts` (Unix ms, default: now) and `value` are optional. A batch is
//! stored whole or not at all: `202 {"accepted": n}` once it is committed to the node's
//! analytics file (see `outpost_state::analytics` for what that survives), `400` problem+json
//! naming the first bad event, `413` beyond `[analytics] max_batch_bytes`, `404` when analytics
//! are off. The center never sees raw events, only per-window summaries.

use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use http_body::Body;
use http_body_util::BodyExt as _;
use outpost_state::StoreError;
use outpost_state::analytics::{Analytics, Event};
use serde::Deserialize;

use crate::body::{ProxyBody, full};
use crate::error::ProxyError;

/// Where clients post events.
pub const EVENTS_PATH: &str = "/.well-known/outpost/events";

/// The request body.
#[derive(Debug, Deserialize)]
struct Batch<E> {
    events: Vec<E>,
}

/// One event as clients send it.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct WireEvent {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    key: String,
    #[serde(default)]
    ts: Option<u64>,
    #[serde(default)]
    value: Option<f64>,
}

/// Handles one events request. `analytics` is the node's analytics store (absent when the node
/// started with analytics off); `config` is the current snapshot's `[analytics]`, so a reload
/// that turns them off takes effect at once.
pub async fn accept<B>(
    analytics: Option<&Analytics>,
    config: &outpost_config::Analytics,
    req: Request<B>,
) -> Result<Response<ProxyBody>, ProxyError>
where
    B: Body<Data = Bytes>,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let Some(analytics) = analytics.filter(|_| config.enabled) else {
        return Err(ProxyError::NoRoute);
    };
    if req.method() != Method::POST {
        return Err(ProxyError::MethodNotAllowed(req.method().to_string()));
    }
    let limit = config.max_batch_bytes.as_u64();
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit) {
        return Err(ProxyError::PayloadTooLarge { limit });
    }
    let limited = http_body_util::Limited::new(
        req.into_body(),
        usize::try_from(limit).unwrap_or(usize::MAX),
    );
    let body = match limited.collect().await {
        Ok(c) => c.to_bytes(),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => {
            return Err(ProxyError::PayloadTooLarge { limit });
        }
        Err(_) => return Err(ProxyError::BadRequest("the request body could not be read")),
    };
    let now = outpost_state::store::now_ms();
    let events = match parse(&body, now) {
        Ok(events) => events,
        Err((events, msg)) => {
            analytics.count_rejected(events);
            return Err(ProxyError::BadEvents(msg));
        }
    };
    match analytics.ingest_at(events, now).await {
        Ok(n) => {
            analytics.count_event_bytes(body.len() as u64);
            Ok(accepted(n))
        }
        Err(e @ StoreError::Invalid(_)) if e.is_client_error() && !is_commit_failure(&e) => {
            Err(ProxyError::BadEvents(e.to_string()))
        }
        Err(e) => Err(ProxyError::Store(e.to_string())),
    }
}

/// The writer reports a failed commit as `Invalid("not stored: …")`; that is the node's fault.
fn is_commit_failure(e: &StoreError) -> bool {
    matches!(e, StoreError::Invalid(m) if m.starts_with("not stored:"))
}

/// Parses a batch; on failure, how many events it held (for the rejected counter) and a message
/// naming the first bad one.
fn parse(body: &[u8], now_ms: u64) -> Result<Vec<Event>, (u64, String)> {
    // Fast path: the whole batch in one pass. Only a bad batch is parsed again, event by event,
    // to say which one is wrong.
    if let Ok(batch) = serde_json::from_slice::<Batch<WireEvent>>(body) {
        return Ok(batch
            .events
            .into_iter()
            .map(|e| Event {
                ts_ms: e.ts.unwrap_or(now_ms),
                kind: e.kind,
                key: e.key,
                value: e.value,
            })
            .collect());
    }
    let batch = match serde_json::from_slice::<Batch<serde_json::Value>>(body) {
        Ok(b) => b,
        Err(e) => {
            return Err((
                0,
                format!(
                    "the body must be {{\"events\": [{{\"type\": …, \"key\": …, \"ts\": …, \"value\": …}}, …]}}: {e}"
                ),
            ));
        }
    };
    let n = batch.events.len() as u64;
    for (i, v) in batch.events.into_iter().enumerate() {
        if let Err(e) = serde_json::from_value::<WireEvent>(v) {
            return Err((n, format!("event {i}: {e}")));
        }
    }
    Err((n, "the events could not be read".into()))
}

fn accepted(n: usize) -> Response<ProxyBody> {
    let mut resp = Response::new(full(format!("{{\"accepted\":{n}}}")));
    *resp.status_mut() = StatusCode::ACCEPTED;
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}

#[cfg(test)]
mod tests {
    use http_body_util::Full;
    use outpost_state::analytics::{AnalyticsOptions, GroupBy};

    use super::*;

    fn config(enabled: bool) -> outpost_config::Analytics {
        outpost_config::Analytics {
            enabled,
            ..Default::default()
        }
    }

    fn post(body: &str) -> Request<Full<Bytes>> {
        Request::post(EVENTS_PATH)
            .body(Full::new(Bytes::from(body.to_owned())))
            .expect("request")
    }

    async fn body(resp: Response<ProxyBody>) -> serde_json::Value {
        let b = resp.into_body().collect().await.expect("body").to_bytes();
        serde_json::from_slice(&b).expect("json")
    }

    fn open() -> (tempfile::TempDir, Analytics) {
        let dir = tempfile::tempdir().expect("tempdir");
        let a = Analytics::open(AnalyticsOptions::new(dir.path(), "edge-1")).expect("open");
        (dir, a)
    }

    #[tokio::test]
    async fn a_batch_is_stored_and_counted() {
        let (_dir, a) = open();
        let now = outpost_state::store::now_ms();
        let json = format!(
            r#"{{"events":[{{"type":"page_view","key":"/products/42","ts":{now},"value":1.5}},{{"type":"page_view"}}]}}"#
        );
        let resp = accept(Some(&a), &config(true), post(&json))
            .await
            .expect("accepted");
        assert_eq!(resp.status(), StatusCode::ACCEPTED);
        assert_eq!(body(resp).await, serde_json::json!({"accepted": 2}));
        let counts = a
            .counts(GroupBy::Key, Some("page_view"), 0, u64::MAX, 10)
            .expect("counts");
        let got: Vec<_> = counts.iter().map(|c| (c.name.as_str(), c.count)).collect();
        assert_eq!(got, vec![("", 1), ("/products/42", 1)]);
        assert_eq!(a.stats().event_bytes, json.len() as u64);
    }

    #[tokio::test]
    async fn bad_batches_are_400_naming_the_first_bad_event() {
        let (_dir, a) = open();
        let cases = [
            ("not json", "the body must be"),
            (
                r#"{"events":[{"type":"a"},{"key":"/x"}]}"#,
                "event 1: missing field `type`",
            ),
            (
                r#"{"events":[{"type":"a","ts":"yesterday"}]}"#,
                "event 0: invalid type",
            ),
            (
                r#"{"events":[{"type":"a","colour":"red"}]}"#,
                "event 0: unknown field `colour`",
            ),
            (
                r#"{"events":[{"type":"a"},{"type":"a"},{"type":""}]}"#,
                "event 2: type must be",
            ),
            (r#"{"events":[{"type":"a","ts":1}]}"#, "event 0: ts 1 is"),
        ];
        for (json, want) in cases {
            let err = accept(Some(&a), &config(true), post(json))
                .await
                .expect_err(json);
            assert_eq!(err.status(), StatusCode::BAD_REQUEST, "{json}");
            assert!(err.to_string().contains(want), "{err} should say {want}");
            assert_eq!(err.code(), "invalid-events");
        }
        assert!(
            a.counts(GroupBy::Type, None, 0, u64::MAX, 10)
                .expect("counts")
                .is_empty()
        );
        assert_eq!(a.stats().events_rejected, 2 + 1 + 1 + 3 + 1);
    }

    #[tokio::test]
    async fn oversized_bodies_are_413_and_disabled_analytics_404() {
        let (_dir, a) = open();
        // Over the default 1 MiB.
        let big = format!(
            r#"{{"events":[{{"type":"a","key":"{}"}}]}}"#,
            "k".repeat(1 << 20)
        );
        let err = accept(Some(&a), &config(true), post(&big))
            .await
            .expect_err("too big");
        assert_eq!(err.status(), StatusCode::PAYLOAD_TOO_LARGE);
        let ok = r#"{"events":[]}"#;
        let err = accept(Some(&a), &config(false), post(ok))
            .await
            .expect_err("off");
        assert_eq!(err.status(), StatusCode::NOT_FOUND);
        let err = accept(None, &config(true), post(ok))
            .await
            .expect_err("no store");
        assert_eq!(err.status(), StatusCode::NOT_FOUND);
        let get = Request::get(EVENTS_PATH)
            .body(Full::new(Bytes::new()))
            .expect("request");
        let err = accept(Some(&a), &config(true), get).await.expect_err("GET");
        assert_eq!(err.status(), StatusCode::METHOD_NOT_ALLOWED);
    }
}
