//! The state API on the admin listener: KV and CRDT objects over HTTP, for operators, scripts
//! and the center. Every call needs the admin token (state may hold anything), checked once by the `admin::require_token` layer.
//!
//! ```text
//! GET    /state/kv/{ns}?prefix=&after=&limit=     list live keys
//! GET    /state/kv/{ns}/{key}                      value (its content type), 404 when absent
//! PUT    /state/kv/{ns}/{key}?ttl=60s              store the body; 204
//! DELETE /state/kv/{ns}/{key}                      204
//! GET    /state/objects                            every CRDT object and its type
//! GET    /state/counters/{name}                    PN-counter value
//! POST   /state/counters/{name}/incr?by=N          add N (default 1, may be negative)
//! GET    /state/gcounters/{name}                   grow-only counter value
//! POST   /state/gcounters/{name}/incr?by=N         add N ≥ 0
//! GET    /state/sets/{name}                        OR-Set elements
//! POST   /state/sets/{name}/add|remove             {"elements": [..]}
//! GET    /state/registers/{name}                   LWW register value (JSON)
//! PUT    /state/registers/{name}                   set to the JSON body; DELETE clears
//! GET    /state/maps/{name}                        LWW map as a JSON object
//! GET    /state/maps/{name}/{key}                  one entry
//! PUT    /state/maps/{name}/{key}                  set to the JSON body; DELETE removes
//! GET    /state/fleet                              replica id, queue, fleet link counters
//! ```

use std::sync::Arc;

use axum::Router;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use bytes::Bytes;
use outpost_state::crdt::{Crdt, Kind};
use outpost_state::{KvCondition, Op, StoreError};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::serve::Lifecycle;

/// The `/state` routes.
pub fn routes() -> Router<Arc<Lifecycle>> {
    Router::new()
        .route("/state/kv/{ns}", get(kv_list))
        .route(
            "/state/kv/{ns}/{*key}",
            get(kv_get).put(kv_put).delete(kv_delete),
        )
        .route("/state/objects", get(objects))
        .route("/state/counters/{name}", get(counter))
        .route("/state/counters/{name}/incr", post(counter_incr))
        .route("/state/gcounters/{name}", get(gcounter))
        .route("/state/gcounters/{name}/incr", post(gcounter_incr))
        .route("/state/sets/{name}", get(set))
        .route("/state/sets/{name}/add", post(set_add))
        .route("/state/sets/{name}/remove", post(set_remove))
        .route(
            "/state/registers/{name}",
            get(register).put(register_set).delete(register_clear),
        )
        .route("/state/maps/{name}", get(map))
        .route(
            "/state/maps/{name}/{*key}",
            get(map_get).put(map_set).delete(map_remove),
        )
        .route("/state/fleet", get(fleet))
        .route("/fleet/status", get(fleet_status))
}

fn error(e: &StoreError) -> Response {
    let status = match e {
        StoreError::KindConflict { .. } => StatusCode::CONFLICT,
        StoreError::Invalid(_) => StatusCode::BAD_REQUEST,
        StoreError::TooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
        StoreError::PreconditionFailed(_) => StatusCode::PRECONDITION_FAILED,
        StoreError::Closed => StatusCode::SERVICE_UNAVAILABLE,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    };
    if status.is_server_error() {
        tracing::error!(error = %e, "State API call failed.");
    }
    (status, axum::Json(json!({ "error": e.to_string() }))).into_response()
}

fn bad_request(msg: impl Into<String>) -> Response {
    (
        StatusCode::BAD_REQUEST,
        axum::Json(json!({ "error": msg.into() })),
    )
        .into_response()
}

fn not_found(what: &str) -> Response {
    (
        StatusCode::NOT_FOUND,
        axum::Json(json!({ "error": format!("{what} not found") })),
    )
        .into_response()
}

#[derive(Debug, Deserialize)]
struct ListQuery {
    #[serde(default)]
    prefix: String,
    after: Option<String>,
    limit: Option<usize>,
}

async fn kv_list(
    State(life): State<Arc<Lifecycle>>,
    Path(ns): Path<String>,
    Query(q): Query<ListQuery>,
) -> Response {
    let limit = q.limit.unwrap_or(100).clamp(1, 1000);
    match life
        .store
        .kv_list(&ns, &q.prefix, q.after.as_deref(), limit)
    {
        Ok(keys) => {
            let next = (keys.len() == limit).then(|| keys[keys.len() - 1].key.clone());
            let keys: Vec<Value> = keys
                .into_iter()
                .map(|k| json!({ "key": k.key, "expires_at_ms": k.expires_ms }))
                .collect();
            axum::Json(json!({ "keys": keys, "next": next })).into_response()
        }
        Err(e) => error(&e),
    }
}

async fn kv_get(
    State(life): State<Arc<Lifecycle>>,
    Path((ns, key)): Path<(String, String)>,
) -> Response {
    match life.store.kv_get(&ns, &key) {
        Ok(Some(entry)) => {
            let ct = entry
                .content_type
                .unwrap_or_else(|| "application/octet-stream".into());
            let mut resp = (StatusCode::OK, entry.value).into_response();
            if let Ok(v) = header::HeaderValue::from_str(&ct) {
                resp.headers_mut().insert(header::CONTENT_TYPE, v);
            }
            if let Some(exp) = entry.expires_ms
                && let Ok(v) = header::HeaderValue::from_str(&exp.to_string())
            {
                resp.headers_mut().insert("x-outpost-expires-at-ms", v);
            }
            resp
        }
        Ok(None) => not_found("key"),
        Err(e) => error(&e),
    }
}

#[derive(Debug, Deserialize)]
struct PutQuery {
    ttl: Option<String>,
}

async fn kv_put(
    State(life): State<Arc<Lifecycle>>,
    headers: HeaderMap,
    Path((ns, key)): Path<(String, String)>,
    Query(q): Query<PutQuery>,
    body: Bytes,
) -> Response {
    let ttl = match q.ttl.as_deref().map(humantime::parse_duration) {
        None => None,
        Some(Ok(d)) => Some(d),
        Some(Err(e)) => {
            return bad_request(format!(
                "ttl: {e}; write a duration such as \"90s\", \"10m\" or \"1h\""
            ));
        }
    };
    let condition = match put_condition(&headers) {
        Ok(c) => c,
        Err(why) => return error(&StoreError::PreconditionFailed(why.to_owned())),
    };
    let ct = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    match life
        .store
        .kv_put_if(&ns, &key, body.to_vec(), ct, ttl, condition)
        .await
    {
        Ok(_) => StatusCode::NO_CONTENT.into_response(),
        Err(e) => error(&e),
    }
}

/// The preconditions of a KV `PUT` (RFC 9110 §13.1.1-13.1.2). Values carry no entity tags, so
/// `If-Match` with tags can never hold (412) and `If-None-Match` with tags always does; `*` asks
/// whether the key has a value, checked atomically with the write.
fn put_condition(headers: &HeaderMap) -> Result<KvCondition, &'static str> {
    let star = |name: header::HeaderName| {
        let values: Vec<&[u8]> = headers.get_all(name).iter().map(|v| v.as_bytes()).collect();
        (!values.is_empty()).then(|| values.iter().any(|v| v.trim_ascii() == b"*"))
    };
    match (star(header::IF_MATCH), star(header::IF_NONE_MATCH)) {
        (Some(false), _) => Err("If-Match names entity tags, and KV values have none"),
        (Some(true), Some(true)) => Err("If-Match: * and If-None-Match: * cannot both hold"),
        (Some(true), _) => Ok(KvCondition::Exists),
        (None, Some(true)) => Ok(KvCondition::Absent),
        (None, _) => Ok(KvCondition::Always),
    }
}

async fn kv_delete(
    State(life): State<Arc<Lifecycle>>,
    Path((ns, key)): Path<(String, String)>,
) -> Response {
    match life.store.kv_delete(&ns, &key).await {
        Ok(_) => StatusCode::NO_CONTENT.into_response(),
        Err(e) => error(&e),
    }
}

async fn objects(State(life): State<Arc<Lifecycle>>) -> Response {
    let list: Vec<Value> = life
        .store
        .objects()
        .into_iter()
        .map(|(name, kind)| json!({ "name": name, "type": kind.as_str() }))
        .collect();
    axum::Json(json!({ "objects": list })).into_response()
}

/// The user-facing value of an object: counters as numbers, sets as arrays, registers and map
/// entries as the JSON they were set to.
fn value_of(obj: &Crdt) -> Value {
    match obj {
        Crdt::LwwRegister(r) => r.value().map_or(Value::Null, parse_stored),
        Crdt::LwwMap(m) => Value::Object(
            m.iter()
                .map(|(k, v)| (k.to_owned(), parse_stored(v)))
                .collect(),
        ),
        other => other.to_json(),
    }
}

fn parse_stored(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or_else(|_| Value::String(text.to_owned()))
}

fn read_object(life: &Lifecycle, name: &str, kind: Kind) -> Response {
    match life.store.object(name) {
        Some(obj) if obj.kind() == kind => {
            axum::Json(json!({ "name": name, "type": kind.as_str(), "value": value_of(&obj) }))
                .into_response()
        }
        Some(obj) => error(&StoreError::KindConflict {
            name: name.to_owned(),
            existing: obj.kind().as_str(),
            wanted: kind.as_str(),
        }),
        // An object never written reads as its empty value, as a fresh counter is 0.
        None => axum::Json(
            json!({ "name": name, "type": kind.as_str(), "value": value_of(&Crdt::empty(kind)) }),
        )
        .into_response(),
    }
}

async fn update(life: &Lifecycle, name: &str, op: Op) -> Response {
    let kind = op.kind();
    match life.store.update(name, op).await {
        Ok(obj) => {
            axum::Json(json!({ "name": name, "type": kind.as_str(), "value": value_of(&obj) }))
                .into_response()
        }
        Err(e) => error(&e),
    }
}

#[derive(Debug, Deserialize)]
struct By {
    by: Option<i64>,
}

async fn counter(State(life): State<Arc<Lifecycle>>, Path(name): Path<String>) -> Response {
    read_object(&life, &name, Kind::PNCounter)
}

async fn counter_incr(
    State(life): State<Arc<Lifecycle>>,
    Path(name): Path<String>,
    Query(q): Query<By>,
) -> Response {
    update(&life, &name, Op::Add(q.by.unwrap_or(1))).await
}

async fn gcounter(State(life): State<Arc<Lifecycle>>, Path(name): Path<String>) -> Response {
    read_object(&life, &name, Kind::GCounter)
}

async fn gcounter_incr(
    State(life): State<Arc<Lifecycle>>,
    Path(name): Path<String>,
    Query(q): Query<By>,
) -> Response {
    let by = q.by.unwrap_or(1);
    let Ok(by) = u64::try_from(by) else {
        return bad_request(
            "a grow-only counter cannot go down; use /state/counters for a PN-counter",
        );
    };
    update(&life, &name, Op::GIncr(by)).await
}

async fn set(State(life): State<Arc<Lifecycle>>, Path(name): Path<String>) -> Response {
    read_object(&life, &name, Kind::ORSet)
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Elements {
    elements: Vec<String>,
}

fn elements(body: &[u8]) -> Result<Vec<String>, String> {
    match serde_json::from_slice::<Elements>(body) {
        Ok(e) if !e.elements.is_empty() => Ok(e.elements),
        Ok(_) => Err("\"elements\" is empty".into()),
        Err(e) => Err(format!("expected {{\"elements\": [\"a\", \"b\"]}}: {e}")),
    }
}

async fn set_add(
    State(life): State<Arc<Lifecycle>>,
    Path(name): Path<String>,
    body: Bytes,
) -> Response {
    match elements(&body) {
        Ok(els) => update(&life, &name, Op::SetAdd(els)).await,
        Err(msg) => bad_request(msg),
    }
}

async fn set_remove(
    State(life): State<Arc<Lifecycle>>,
    Path(name): Path<String>,
    body: Bytes,
) -> Response {
    match elements(&body) {
        Ok(els) => update(&life, &name, Op::SetRemove(els)).await,
        Err(msg) => bad_request(msg),
    }
}

fn json_text(body: &[u8]) -> Result<String, String> {
    serde_json::from_slice::<Value>(body)
        .map(|v| v.to_string())
        .map_err(|e| format!("the body must be one JSON value: {e}"))
}

async fn register(State(life): State<Arc<Lifecycle>>, Path(name): Path<String>) -> Response {
    read_object(&life, &name, Kind::LwwRegister)
}

async fn register_set(
    State(life): State<Arc<Lifecycle>>,
    Path(name): Path<String>,
    body: Bytes,
) -> Response {
    match json_text(&body) {
        Ok(v) => update(&life, &name, Op::RegisterSet(Some(v))).await,
        Err(msg) => bad_request(msg),
    }
}

async fn register_clear(State(life): State<Arc<Lifecycle>>, Path(name): Path<String>) -> Response {
    update(&life, &name, Op::RegisterSet(None)).await
}

async fn map(State(life): State<Arc<Lifecycle>>, Path(name): Path<String>) -> Response {
    read_object(&life, &name, Kind::LwwMap)
}

async fn map_get(
    State(life): State<Arc<Lifecycle>>,
    Path((name, key)): Path<(String, String)>,
) -> Response {
    match life.store.object(&name).as_deref() {
        Some(Crdt::LwwMap(m)) => match m.get(&key) {
            Some(v) => axum::Json(parse_stored(v)).into_response(),
            None => not_found("map key"),
        },
        Some(other) => error(&StoreError::KindConflict {
            name,
            existing: other.kind().as_str(),
            wanted: Kind::LwwMap.as_str(),
        }),
        None => not_found("map key"),
    }
}

async fn map_set(
    State(life): State<Arc<Lifecycle>>,
    Path((name, key)): Path<(String, String)>,
    body: Bytes,
) -> Response {
    match json_text(&body) {
        Ok(v) => update(&life, &name, Op::MapSet(key, v)).await,
        Err(msg) => bad_request(msg),
    }
}

async fn map_remove(
    State(life): State<Arc<Lifecycle>>,
    Path((name, key)): Path<(String, String)>,
) -> Response {
    update(&life, &name, Op::MapRemove(key)).await
}

async fn fleet(State(life): State<Arc<Lifecycle>>) -> Response {
    let unpublished = life.store.unpublished_count().unwrap_or(0);
    let link = life
        .fleet
        .as_ref()
        .map_or(Value::Null, |f| outpost_fleet::status_json(&f.status));
    axum::Json(json!({
        "replica": life.store.replica().to_string(),
        "unpublished": unpublished,
        "fleet": link,
    }))
    .into_response()
}

/// `GET /fleet/status`: every node's heartbeat with its verdict (what `outpost fleet status`
/// prints), read through this node's fleet link.
async fn fleet_status(State(life): State<Arc<Lifecycle>>) -> Response {
    let Some(fleet) = &life.fleet else {
        return (
            StatusCode::NOT_FOUND,
            axum::Json(json!({ "error": "this node has no [fleet] section" })),
        )
            .into_response();
    };
    match fleet.heartbeats().await {
        Ok(beats) => {
            let rules = crate::fleet::health_rules(&life.node.snapshot().config);
            axum::Json(outpost_fleet::heartbeat::json(
                &beats,
                &rules,
                outpost_state::store::now_ms(),
            ))
            .into_response()
        }
        Err(e) => (
            StatusCode::SERVICE_UNAVAILABLE,
            axum::Json(json!({ "error": e })),
        )
            .into_response(),
    }
}
