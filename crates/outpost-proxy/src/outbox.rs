//! Store-and-forward for writes: the edge keeps accepting POS sales (any unsafe request on a
//! route with `[routes.outbox]`) while the center is unreachable, and delivers them later.
//!
//! On the request path ([`accept`]): the body is read whole (bounded by the route's body
//! limit), the request gets an `Idempotency-Key` (the client's, or a fresh one) and, in
//! `fallback` mode, goes to the center at once; only when the center cannot take it (connect
//! failure, timeout, 502/503/504) is it written to the node's store — fsync'd — and the client
//! gets `202 Accepted` with a status URL. In `always` mode it is stored at once.
//!
//! In the background ([`spawn_deliverer`]): the oldest queued entry of each order key is sent
//! through the route's ordinary origin stage with the same `Idempotency-Key` (so the center's
//! idempotency helper applies it exactly once, however many times it arrives), with exponential
//! backoff and jitter between attempts, and settled as delivered, failed (a permanent 4xx) or
//! retried.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Method, Response, StatusCode, header};
use http_body_util::BodyExt as _;
use outpost_config::{OutboxMode, RouteOutbox as OutboxConfig};
use outpost_state::outbox::{Entry, Limits, NewEntry, Settlement, StoredResponse};
use outpost_state::{Store, StoreError};
use outpost_telemetry::OutboxEvent;
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::body::{ProxyBody, full};
use crate::error::ProxyError;
use crate::node::{Node, RouteRuntime};

/// Where a kept write's status can be read (any listener; the id is the capability).
pub const STATUS_PATH: &str = "/.well-known/outpost/outbox/";
/// The header carrying the idempotency key (IETF draft "The Idempotency-Key HTTP Header Field").
pub const IDEMPOTENCY_KEY: HeaderName = HeaderName::from_static("idempotency-key");
/// Most response body bytes kept for the status API.
const KEPT_RESPONSE_BYTES: usize = 64 * 1024;
/// Entries sent at the same time (different order keys).
const CONCURRENT_DELIVERIES: usize = 16;

/// A route's outbox, compiled from config.
#[derive(Debug, Clone)]
pub struct OutboxPolicy {
    /// When writes are kept.
    pub mode: OutboxMode,
    /// Header whose value orders deliveries (`None`: one queue for the route).
    pub order_header: Option<HeaderName>,
    /// Queue bounds.
    pub limits: Limits,
    /// First retry delay.
    pub retry_initial: Duration,
    /// Longest retry delay.
    pub retry_max: Duration,
}

impl OutboxPolicy {
    /// Compiles `[routes.outbox]` (validated already).
    pub fn from_config(c: &OutboxConfig) -> OutboxPolicy {
        OutboxPolicy {
            mode: c.mode,
            order_header: c
                .order_key
                .strip_prefix("header:")
                .and_then(|h| HeaderName::from_bytes(h.as_bytes()).ok()),
            limits: Limits {
                max_entries: c.max_entries,
                max_bytes: c.max_bytes.as_u64(),
            },
            retry_initial: c.retry_initial,
            retry_max: c.retry_max,
        }
    }

    /// Backoff for entries whose route lost its outbox settings in a reload: the defaults.
    fn orphan() -> OutboxPolicy {
        OutboxPolicy {
            mode: OutboxMode::Fallback,
            order_header: None,
            limits: Limits {
                max_entries: u64::MAX,
                max_bytes: u64::MAX,
            },
            retry_initial: Duration::from_secs(1),
            retry_max: Duration::from_secs(300),
        }
    }

    /// Delay before attempt number `attempts + 1`: doubling from `retry_initial`, capped at
    /// `retry_max`, with jitter (50–100 %) so that a fleet does not retry in lockstep.
    pub fn backoff(&self, attempts: u32) -> Duration {
        let base = self
            .retry_initial
            .saturating_mul(1u32 << attempts.min(20))
            .min(self.retry_max);
        base.mul_f64(0.5 + fastrand::f64() * 0.5)
    }
}

/// Whether an answer from the center means "not now" (the write should be kept) rather than
/// an answer to give the client.
pub fn center_unavailable(status: StatusCode) -> bool {
    matches!(
        status,
        StatusCode::BAD_GATEWAY | StatusCode::SERVICE_UNAVAILABLE | StatusCode::GATEWAY_TIMEOUT
    )
}

/// Whether a delivery error means "try again later".
pub fn retryable(e: &ProxyError) -> bool {
    matches!(
        e,
        ProxyError::NoHealthyEndpoint(_)
            | ProxyError::NoResidentEndpoint { .. }
            | ProxyError::OriginTimeout { .. }
            | ProxyError::OriginConnect { .. }
            | ProxyError::OriginBroken { .. }
    )
}

/// How a final answer settles an entry: 2xx/3xx delivered; a 4xx other than 408 (timeout),
/// 425 (too early) and 429 (slow down) failed for good — except a 409 with `Retry-After`,
/// which is how idempotency layers say "the same key is still being processed"; anything else
/// is retried.
pub fn settle_status(status: StatusCode, headers: &HeaderMap) -> Option<bool> {
    if status.is_success() || status.is_redirection() {
        Some(true)
    } else if status == StatusCode::CONFLICT && headers.contains_key(header::RETRY_AFTER) {
        None
    } else if status.is_client_error() && !matches!(status.as_u16(), 408 | 425 | 429) {
        Some(false)
    } else {
        None
    }
}

/// A fresh random id (128 bits from the OS): unguessable, since it is the status capability.
pub fn new_id() -> Result<String, ProxyError> {
    let mut bytes = [0u8; 16];
    getrandom::fill(&mut bytes).map_err(|e| ProxyError::Store(format!("no randomness: {e}")))?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// The client's `Idempotency-Key` if usable, a fresh one if absent; a malformed one is refused
/// (the client meant something by it).
pub fn idempotency_key(headers: &HeaderMap) -> Result<String, ProxyError> {
    match headers.get(&IDEMPOTENCY_KEY) {
        None => Ok(format!("outpost-{}", new_id()?)),
        Some(v) => {
            let s = v
                .to_str()
                .ok()
                .map(|s| s.trim().trim_matches('"'))
                .filter(|s| !s.is_empty() && s.len() <= 255);
            s.map(str::to_owned).ok_or(ProxyError::BadRequest(
                "Idempotency-Key must be 1-255 visible ASCII characters",
            ))
        }
    }
}

/// Reads a request body whole, within `limit`.
pub async fn read_body(body: hyper::body::Incoming, limit: u64) -> Result<Bytes, ProxyError> {
    let limited = http_body_util::Limited::new(body, usize::try_from(limit).unwrap_or(usize::MAX));
    match limited.collect().await {
        Ok(c) => Ok(c.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => {
            Err(ProxyError::PayloadTooLarge { limit })
        }
        Err(_) => Err(ProxyError::BadRequest("the request body could not be read")),
    }
}

/// Keeps a write: durable before this returns; the `202 Accepted` to send.
pub async fn keep(
    node: &Node,
    route: &RouteRuntime,
    policy: &OutboxPolicy,
    entry: NewEntry,
    reason: &str,
) -> Result<Response<ProxyBody>, ProxyError> {
    let Some(store) = node.store() else {
        return Err(ProxyError::Store("this node has no local store".into()));
    };
    let id = entry.id.clone();
    let key = entry.idempotency_key.clone();
    match store.outbox_put(entry, policy.limits).await {
        Ok(_) => {
            node.metrics()
                .outbox_event(&route.name, OutboxEvent::Queued);
            tracing::info!(route = %route.name, id = %id, reason, "Write kept in the outbox.");
            Ok(accepted(&id, &key, reason))
        }
        Err(StoreError::Full(msg)) => {
            node.metrics()
                .outbox_event(&route.name, OutboxEvent::Rejected);
            Err(ProxyError::OutboxFull(msg))
        }
        Err(e) => Err(ProxyError::Store(e.to_string())),
    }
}

fn accepted(id: &str, key: &str, reason: &str) -> Response<ProxyBody> {
    let url = format!("{STATUS_PATH}{id}");
    let body = json!({
        "id": id,
        "state": "queued",
        "status_url": url,
        "idempotency_key": key,
        "reason": reason,
    });
    let mut resp = Response::new(full(body.to_string()));
    *resp.status_mut() = StatusCode::ACCEPTED;
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    if let Ok(v) = HeaderValue::from_str(&url) {
        h.insert(header::LOCATION, v);
    }
    if let Ok(v) = HeaderValue::from_str(key) {
        h.insert(IDEMPOTENCY_KEY, v);
    }
    resp
}

/// `GET /.well-known/outpost/outbox/{id}`: where a kept write is, and the center's answer.
pub fn status(node: &Node, id: &str) -> Result<Response<ProxyBody>, ProxyError> {
    let Some(store) = node.store() else {
        return Err(ProxyError::NoRoute);
    };
    let entry = store
        .outbox_get(id)
        .map_err(|e| ProxyError::Store(e.to_string()))?
        .ok_or(ProxyError::NoRoute)?;
    let response = entry.response.as_ref().map(|r| {
        json!({
            "status": r.status,
            "headers": r.headers.iter().map(|(k, v)| json!([k, v])).collect::<Vec<_>>(),
            "body": String::from_utf8_lossy(&r.body),
        })
    });
    let body = json!({
        "id": entry.new.id,
        "state": entry.state.as_str(),
        "route": entry.new.route,
        "method": entry.new.method,
        "path": entry.new.uri,
        "idempotency_key": entry.new.idempotency_key,
        "attempts": entry.attempts,
        "created_at_ms": entry.created_ms,
        "updated_at_ms": entry.updated_ms,
        "last_error": entry.last_error,
        "response": response,
    });
    let mut resp = Response::new(full(body.to_string()));
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    Ok(resp)
}

/// Headers as stored: names and raw values.
pub fn headers_to_store(headers: &HeaderMap) -> Vec<(String, Vec<u8>)> {
    headers
        .iter()
        .map(|(k, v)| (k.as_str().to_owned(), v.as_bytes().to_vec()))
        .collect()
}

fn headers_from_store(stored: &[(String, Vec<u8>)]) -> HeaderMap {
    let mut h = HeaderMap::with_capacity(stored.len());
    for (k, v) in stored {
        if let (Ok(k), Ok(v)) = (
            HeaderName::from_bytes(k.as_bytes()),
            HeaderValue::from_bytes(v),
        ) {
            h.append(k, v);
        }
    }
    h
}

/// Delivers queued entries until `stop`; also keeps the outbox gauges current.
pub fn spawn_deliverer(node: Arc<Node>, store: Store, stop: CancellationToken) {
    tokio::spawn(async move {
        let mut in_flight: HashSet<String> = HashSet::new();
        // Which entry each delivery task carries, so a task that panicked frees its entry too.
        let mut carrying: HashMap<tokio::task::Id, String> = HashMap::new();
        let mut tasks = tokio::task::JoinSet::new();
        let mut gauges = tokio::time::interval(Duration::from_secs(1));
        loop {
            if in_flight.len() < CONCURRENT_DELIVERIES {
                match store.outbox_due(CONCURRENT_DELIVERIES * 2) {
                    Ok(due) => {
                        for entry in due {
                            if in_flight.len() >= CONCURRENT_DELIVERIES {
                                break;
                            }
                            if in_flight.insert(entry.new.id.clone()) {
                                let node = node.clone();
                                let store = store.clone();
                                let id = entry.new.id.clone();
                                let task = tasks.spawn(async move {
                                    deliver(&node, &store, entry).await;
                                });
                                carrying.insert(task.id(), id);
                            }
                        }
                    }
                    Err(e) => tracing::error!(error = %e, "Cannot read the outbox."),
                }
            }
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = store.outbox_queued() => {}
                Some(done) = tasks.join_next_with_id() => {
                    let task = match &done {
                        Ok((task, ())) => *task,
                        Err(e) => {
                            tracing::error!(error = %e, "An outbox delivery task failed; its entry stays queued.");
                            e.id()
                        }
                    };
                    if let Some(id) = carrying.remove(&task) {
                        in_flight.remove(&id);
                    }
                }
                _ = gauges.tick() => update_gauges(&node, &store),
                _ = tokio::time::sleep(Duration::from_millis(250)) => {}
            }
        }
        // In-flight deliveries finish or are abandoned; unsettled entries stay queued.
        tasks.shutdown().await;
    });
}

fn update_gauges(node: &Node, store: &Store) {
    for (route, d) in store.outbox_depths() {
        node.metrics().outbox_depth(&route, d.entries, d.bytes);
    }
    let age = store.outbox_oldest().ok().flatten().map_or(0.0, |created| {
        outpost_state::store::now_ms().saturating_sub(created) as f64 / 1000.0
    });
    node.metrics().outbox_oldest(age);
}

/// One attempt at one entry, settled in the store.
async fn deliver(node: &Node, store: &Store, entry: Entry) {
    let snap = node.snapshot();
    let route = snap.routes.iter().find(|r| r.name == entry.new.route);
    let policy = route
        .and_then(|r| r.outbox.clone())
        .unwrap_or_else(OutboxPolicy::orphan);
    let settlement = match route {
        None => Settlement::Retry {
            next_ms: next_attempt(&policy, entry.attempts),
            error: format!(
                "route `{}` is no longer in the config; the entry waits for it",
                entry.new.route
            ),
        },
        Some(route) => attempt(node, &snap, route, &policy, &entry).await,
    };
    let event = match &settlement {
        Settlement::Delivered(_) => OutboxEvent::Delivered,
        Settlement::Failed(_) => OutboxEvent::Failed,
        Settlement::Retry { .. } => OutboxEvent::Retried,
    };
    match &settlement {
        Settlement::Retry { error, .. } => tracing::debug!(
            id = %entry.new.id, attempts = entry.attempts + 1, error = %error,
            "Outbox delivery not done yet; retrying later."
        ),
        Settlement::Failed(r) => tracing::warn!(
            id = %entry.new.id, status = r.status,
            "The center refused a kept write for good; it is marked failed."
        ),
        Settlement::Delivered(r) => tracing::debug!(
            id = %entry.new.id, status = r.status, "Kept write delivered."
        ),
    }
    if let Err(e) = store.outbox_settle(&entry.new.id, settlement).await {
        tracing::error!(id = %entry.new.id, error = %e, "Cannot record an outbox delivery; it will be sent again (the center dedupes it).");
        return;
    }
    node.metrics().outbox_event(&entry.new.route, event);
}

fn next_attempt(policy: &OutboxPolicy, attempts: u32) -> u64 {
    outpost_state::store::now_ms() + policy.backoff(attempts).as_millis() as u64
}

async fn attempt(
    node: &Node,
    snap: &crate::node::Snapshot,
    route: &RouteRuntime,
    policy: &OutboxPolicy,
    entry: &Entry,
) -> Settlement {
    let Ok(method) = Method::from_bytes(entry.new.method.as_bytes()) else {
        return Settlement::Failed(StoredResponse {
            status: 400,
            headers: Vec::new(),
            body: b"unusable method".to_vec(),
        });
    };
    let mut headers = headers_from_store(&entry.new.headers);
    if let Some(claims) = &entry.new.identity
        && route.forward_identity
        && let Ok(serde_json::Value::Object(claims)) = serde_json::from_str(claims)
    {
        // A fresh token: the one the request arrived with may have expired while it waited.
        let token = snap.identity.sign(&route.group_for(&method).name, claims);
        if let Ok(v) = HeaderValue::try_from(token) {
            headers.insert(outpost_guard::IDENTITY_HEADER, v);
        }
    }
    let sent = crate::handler::send_buffered(
        route,
        &entry.new.id,
        snap.config.node.location,
        &method,
        &entry.new.uri,
        headers,
        Bytes::from(entry.new.body.clone()),
    )
    .await;
    match sent {
        Ok(response) => {
            let status = response.status();
            let verdict = settle_status(status, response.headers());
            // The write happened: the edge's copy of what it changed is out of date.
            if verdict == Some(true)
                && let (Some(rc), Some((host, target))) = (&route.cache, &entry.new.client_url)
            {
                node.cache()
                    .invalidate(&rc.policy.key, host, target, response.headers());
            }
            let headers: Vec<(String, String)> = response
                .headers()
                .iter()
                .filter_map(|(k, v)| Some((k.as_str().to_owned(), v.to_str().ok()?.to_owned())))
                .collect();
            let body = read_capped(response.into_body()).await;
            let kept = StoredResponse {
                status: status.as_u16(),
                headers,
                body,
            };
            match verdict {
                Some(true) => Settlement::Delivered(kept),
                Some(false) => Settlement::Failed(kept),
                None => Settlement::Retry {
                    next_ms: next_attempt(policy, entry.attempts),
                    error: format!("the center answered {status}"),
                },
            }
        }
        Err(e) => Settlement::Retry {
            next_ms: next_attempt(policy, entry.attempts),
            error: e.to_string(),
        },
    }
}

async fn read_capped(mut body: ProxyBody) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(frame) = body.frame().await {
        let Ok(frame) = frame else { break };
        if let Ok(data) = frame.into_data() {
            let room = KEPT_RESPONSE_BYTES.saturating_sub(out.len());
            out.extend_from_slice(&data[..data.len().min(room)]);
            // Keep reading to the end so the connection can be reused.
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_settle_as_the_draft_and_common_sense_say() {
        let none = HeaderMap::new();
        let mut retry = HeaderMap::new();
        retry.insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        assert_eq!(settle_status(StatusCode::CREATED, &none), Some(true));
        assert_eq!(settle_status(StatusCode::SEE_OTHER, &none), Some(true));
        assert_eq!(
            settle_status(StatusCode::UNPROCESSABLE_ENTITY, &none),
            Some(false)
        );
        assert_eq!(settle_status(StatusCode::CONFLICT, &none), Some(false));
        assert_eq!(
            settle_status(StatusCode::CONFLICT, &retry),
            None,
            "the same key still in progress at the center"
        );
        assert_eq!(settle_status(StatusCode::TOO_MANY_REQUESTS, &none), None);
        assert_eq!(settle_status(StatusCode::REQUEST_TIMEOUT, &none), None);
        assert_eq!(
            settle_status(StatusCode::INTERNAL_SERVER_ERROR, &none),
            None
        );
        assert!(center_unavailable(StatusCode::SERVICE_UNAVAILABLE));
        assert!(!center_unavailable(StatusCode::INTERNAL_SERVER_ERROR));
    }

    #[test]
    fn backoff_doubles_with_jitter_and_is_capped() {
        let p = OutboxPolicy {
            mode: OutboxMode::Fallback,
            order_header: None,
            limits: Limits {
                max_entries: 1,
                max_bytes: 1,
            },
            retry_initial: Duration::from_millis(100),
            retry_max: Duration::from_secs(2),
        };
        for attempts in 0..40 {
            let d = p.backoff(attempts);
            let base = Duration::from_millis(100)
                .saturating_mul(1 << attempts.min(20))
                .min(Duration::from_secs(2));
            assert!(d >= base / 2 && d <= base, "{attempts}: {d:?} vs {base:?}");
        }
    }

    #[test]
    fn idempotency_keys_are_kept_generated_or_refused() {
        let mut h = HeaderMap::new();
        let generated = idempotency_key(&h).expect("generated");
        assert!(generated.starts_with("outpost-") && generated.len() == 40);
        h.insert(IDEMPOTENCY_KEY, HeaderValue::from_static("\"sale-42\""));
        assert_eq!(idempotency_key(&h).expect("kept"), "sale-42");
        h.insert(
            IDEMPOTENCY_KEY,
            HeaderValue::from_str(&"x".repeat(300)).expect("value"),
        );
        assert!(idempotency_key(&h).is_err());
        assert_ne!(new_id().expect("id"), new_id().expect("id"));
    }
}
