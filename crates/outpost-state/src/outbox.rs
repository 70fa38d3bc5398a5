//! The outbox: writes the center could not take yet, kept until delivered.
//!
//! An entry is written (and fsync'd) before the client hears `202 Accepted`; the proxy's
//! deliverer sends entries in order per *order key* (the oldest queued entry of each key is the
//! only one due), each with its `Idempotency-Key`, and settles them: delivered (2xx/3xx), failed
//! (a permanent 4xx: kept and visible, never silently dropped) or retried later with backoff.
//! Entries are local to the node: they are the node's promise, not shared state.

use std::collections::HashMap;

use rusqlite::{OptionalExtension, Transaction, params};
use serde::{Deserialize, Serialize};

use crate::StoreError;

/// Where an entry is in its life; the strings are the status API's and the metrics' values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OutboxState {
    /// Waiting for (another) delivery attempt.
    Queued,
    /// The center answered 2xx or 3xx.
    Delivered,
    /// The center refused it for good (4xx other than 408, 425, 429).
    Failed,
}

impl OutboxState {
    /// The lowercase name.
    pub fn as_str(self) -> &'static str {
        match self {
            OutboxState::Queued => "queued",
            OutboxState::Delivered => "delivered",
            OutboxState::Failed => "failed",
        }
    }

    fn parse(s: &str) -> OutboxState {
        match s {
            "delivered" => OutboxState::Delivered,
            "failed" => OutboxState::Failed,
            _ => OutboxState::Queued,
        }
    }
}

/// A request to keep until the center takes it.
#[derive(Debug, Clone, PartialEq)]
pub struct NewEntry {
    /// Random id; also the capability in the status URL.
    pub id: String,
    /// Route name (the deliverer sends through that route's origin stage).
    pub route: String,
    /// Entries with the same key are delivered in the order they were accepted.
    pub order_key: String,
    /// Request method.
    pub method: String,
    /// Path and query as the origin should see them.
    pub uri: String,
    /// Request headers to send (forwarding headers included, identity excluded).
    pub headers: Vec<(String, Vec<u8>)>,
    /// The whole request body.
    pub body: Vec<u8>,
    /// Sent with every attempt; the center dedupes on it.
    pub idempotency_key: String,
    /// Claims to sign a fresh identity with at delivery time (JSON), when the route forwards one.
    pub identity: Option<String>,
    /// Host and path-and-query the client wrote to (before any prefix strip): the cached URL
    /// a delivered write invalidates.
    pub client_url: Option<(String, String)>,
}

/// Per-route bounds on what may wait.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Limits {
    /// Most queued entries.
    pub max_entries: u64,
    /// Most queued body bytes.
    pub max_bytes: u64,
}

/// A stored entry as the deliverer and the status API see it.
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    /// The request.
    pub new: NewEntry,
    /// Global acceptance order.
    pub seq: i64,
    /// Where it is.
    pub state: OutboxState,
    /// Delivery attempts so far.
    pub attempts: u32,
    /// When it was accepted (Unix ms).
    pub created_ms: u64,
    /// When it last changed (Unix ms).
    pub updated_ms: u64,
    /// Why the last attempt did not deliver it.
    pub last_error: Option<String>,
    /// The center's answer, once there is a final one.
    pub response: Option<StoredResponse>,
}

/// The center's final answer, kept for the status API (body capped by the deliverer).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoredResponse {
    /// Status code.
    pub status: u16,
    /// Response headers.
    pub headers: Vec<(String, String)>,
    /// Body (possibly truncated).
    #[serde(with = "serde_bytes")]
    pub body: Vec<u8>,
}

/// How an attempt ended.
#[derive(Debug, Clone, PartialEq)]
pub enum Settlement {
    /// The center took it.
    Delivered(StoredResponse),
    /// The center refused it for good.
    Failed(StoredResponse),
    /// Try again at `next_ms` (Unix ms); `error` says why not now.
    Retry {
        /// Next attempt, Unix ms.
        next_ms: u64,
        /// What went wrong.
        error: String,
    },
}

/// Queue depth of one route.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Depth {
    /// Queued entries.
    pub entries: u64,
    /// Their body bytes.
    pub bytes: u64,
}

pub(crate) type Depths = HashMap<String, Depth>;

/// Loads per-route depths at open.
pub(crate) fn load_depths(conn: &rusqlite::Connection) -> Result<Depths, StoreError> {
    let mut stmt = conn.prepare(
        "SELECT route, count(*), coalesce(sum(length(body)), 0) FROM outbox
         WHERE state = 'queued' GROUP BY route",
    )?;
    let rows = stmt.query_map([], |r| {
        Ok((
            r.get::<_, String>(0)?,
            Depth {
                entries: r.get::<_, i64>(1)? as u64,
                bytes: r.get::<_, i64>(2)? as u64,
            },
        ))
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// Inserts an entry if the route's queue has room; returns its sequence number.
pub(crate) fn insert(
    tx: &Transaction<'_>,
    depths: &Depths,
    entry: &NewEntry,
    limits: Limits,
    now_ms: u64,
) -> Result<i64, StoreError> {
    let d = depths.get(&entry.route).copied().unwrap_or_default();
    if d.entries >= limits.max_entries || d.bytes + entry.body.len() as u64 > limits.max_bytes {
        return Err(StoreError::Full(format!(
            "the outbox of route `{}` is full ({} entries, {} bytes queued; limits {} and {})",
            entry.route, d.entries, d.bytes, limits.max_entries, limits.max_bytes
        )));
    }
    let headers = postcard::to_allocvec(&entry.headers).unwrap_or_default();
    tx.prepare_cached(
        "INSERT INTO outbox (id, route, order_key, method, uri, headers, body, idempotency_key,
                             identity, state, attempts, next_attempt_ms, created_ms, updated_ms,
                             client_host, client_target)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, 'queued', 0, ?10, ?10, ?10, ?11, ?12)",
    )?
    .execute(params![
        entry.id,
        entry.route,
        entry.order_key,
        entry.method,
        entry.uri,
        headers,
        entry.body,
        entry.idempotency_key,
        entry.identity,
        now_ms as i64,
        entry.client_url.as_ref().map(|c| c.0.as_str()),
        entry.client_url.as_ref().map(|c| c.1.as_str()),
    ])?;
    Ok(tx.last_insert_rowid())
}

/// Records how an attempt ended; returns the route and body size when the entry left the
/// queue (so depths can be updated), `None` when it stays queued or was already settled.
pub(crate) fn settle(
    tx: &Transaction<'_>,
    id: &str,
    settlement: &Settlement,
    now_ms: u64,
) -> Result<Option<(String, u64)>, StoreError> {
    let current: Option<(String, String, i64)> = tx
        .query_row(
            "SELECT state, route, length(body) FROM outbox WHERE id = ?1",
            params![id],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )
        .optional()?;
    let Some((state, route, len)) = current else {
        return Ok(None);
    };
    if state != "queued" {
        return Ok(None);
    }
    match settlement {
        Settlement::Retry { next_ms, error } => {
            tx.prepare_cached(
                "UPDATE outbox SET attempts = attempts + 1, next_attempt_ms = ?2,
                        last_error = ?3, updated_ms = ?4 WHERE id = ?1",
            )?
            .execute(params![id, *next_ms as i64, error, now_ms as i64])?;
            Ok(None)
        }
        Settlement::Delivered(resp) | Settlement::Failed(resp) => {
            let state = if matches!(settlement, Settlement::Delivered(_)) {
                "delivered"
            } else {
                "failed"
            };
            let encoded = postcard::to_allocvec(resp).unwrap_or_default();
            // The request body is no longer needed once the center has answered for good.
            tx.prepare_cached(
                "UPDATE outbox SET state = ?2, attempts = attempts + 1, response = ?3,
                        body = x'', updated_ms = ?4, last_error = NULL WHERE id = ?1",
            )?
            .execute(params![id, state, encoded, now_ms as i64])?;
            Ok(Some((route, len as u64)))
        }
    }
}

/// Deletes settled entries last changed before `before_ms`.
pub(crate) fn forget_settled(tx: &Transaction<'_>, before_ms: u64) -> Result<usize, StoreError> {
    Ok(tx.execute(
        "DELETE FROM outbox WHERE state != 'queued' AND updated_ms < ?1",
        params![before_ms as i64],
    )?)
}

const COLUMNS: &str = "id, route, order_key, method, uri, headers, body, idempotency_key, identity,
     seq, state, attempts, created_ms, updated_ms, last_error, response, client_host, client_target";

fn row_to_entry(r: &rusqlite::Row<'_>) -> rusqlite::Result<Entry> {
    let headers: Vec<u8> = r.get(5)?;
    let response: Option<Vec<u8>> = r.get(15)?;
    Ok(Entry {
        new: NewEntry {
            id: r.get(0)?,
            route: r.get(1)?,
            order_key: r.get(2)?,
            method: r.get(3)?,
            uri: r.get(4)?,
            headers: postcard::from_bytes(&headers).unwrap_or_default(),
            body: r.get(6)?,
            idempotency_key: r.get(7)?,
            identity: r.get(8)?,
            client_url: match (
                r.get::<_, Option<String>>(16)?,
                r.get::<_, Option<String>>(17)?,
            ) {
                (Some(h), Some(t)) => Some((h, t)),
                _ => None,
            },
        },
        seq: r.get(9)?,
        state: OutboxState::parse(&r.get::<_, String>(10)?),
        attempts: r.get::<_, i64>(11)? as u32,
        created_ms: r.get::<_, i64>(12)? as u64,
        updated_ms: r.get::<_, i64>(13)? as u64,
        last_error: r.get(14)?,
        response: response.and_then(|b| postcard::from_bytes(&b).ok()),
    })
}

/// The oldest queued entry of each order key whose next attempt is due, oldest first.
pub(crate) fn due(
    conn: &rusqlite::Connection,
    now_ms: u64,
    limit: usize,
) -> Result<Vec<Entry>, StoreError> {
    let sql = format!(
        "SELECT {COLUMNS} FROM outbox WHERE seq IN (
             SELECT min(seq) FROM outbox WHERE state = 'queued' GROUP BY order_key
         ) AND next_attempt_ms <= ?1 ORDER BY seq LIMIT ?2"
    );
    let mut stmt = conn.prepare_cached(&sql)?;
    let rows = stmt.query_map(params![now_ms as i64, limit as i64], row_to_entry)?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// One entry by id.
pub(crate) fn get(conn: &rusqlite::Connection, id: &str) -> Result<Option<Entry>, StoreError> {
    let sql = format!("SELECT {COLUMNS} FROM outbox WHERE id = ?1");
    let mut stmt = conn.prepare_cached(&sql)?;
    Ok(stmt.query_row(params![id], row_to_entry).optional()?)
}

/// Creation time of the oldest queued entry (Unix ms).
pub(crate) fn oldest_queued(conn: &rusqlite::Connection) -> Result<Option<u64>, StoreError> {
    Ok(conn
        .query_row(
            "SELECT min(created_ms) FROM outbox WHERE state = 'queued'",
            [],
            |r| r.get::<_, Option<i64>>(0),
        )?
        .map(|v| v as u64))
}

/// Whether any entry of `order_key` is still queued (a new write must then queue behind it).
pub(crate) fn key_has_queued(
    conn: &rusqlite::Connection,
    order_key: &str,
) -> Result<bool, StoreError> {
    Ok(conn
        .prepare_cached("SELECT 1 FROM outbox WHERE state = 'queued' AND order_key = ?1 LIMIT 1")?
        .query_row(params![order_key], |_| Ok(()))
        .optional()?
        .is_some())
}
