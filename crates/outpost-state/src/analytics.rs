//! Edge analytics: raw events kept at the node, rolled up into one compact summary per
//! (node, window) for the center.
//!
//! Events (`page_view` of `/products/42` at `ts`, optional value) arrive in batches from the
//! public `POST /.well-known/outpost/events` and land in their **own** SQLite file,
//! `<data_dir>/analytics.db`, written by their own thread with group commit, so high-volume
//! analytics never queue behind (or slow down) the outbox's and the KV store's fsync'd commits.
//!
//! # Durability
//! The file runs WAL with `synchronous = NORMAL`: a commit is appended to the WAL with `write()`
//! but not fsync'd (only checkpoints fsync). So a batch the node answered `202` for survives a
//! crash or `kill -9` of the process (the bytes are in the OS page cache and SQLite replays the
//! WAL at the next open), and is lost only if the *machine* goes down (power loss, kernel panic)
//! before the OS writes it back — up to the last few seconds of events. The summaries table is in
//! the same file; a summary lost that way is rebuilt from raw events that survived, or, if those
//! were lost too, under-counts the lost tail. That trade is deliberate: analytics are counted,
//! not promised; the outbox (`outpost.db`, `synchronous = FULL`) is where promises live.
//!
//! # Windows and summaries
//! Time is cut into windows of `window` (default 60 s) aligned to the Unix epoch. A window
//! `[start, start + window)` is *closed* once `now ≥ start + window + grace`; [`Analytics::rollup_at`]
//! turns every closed window that has events into exactly one [`Summary`] row keyed by its start.
//! A summary holds, per event type: the event count, the sum of values, the number of distinct
//! keys, the `top_keys` keys with the most events (with their counts) and the count of the rest
//! as `other`. Rolling the same events up again produces byte-identical JSON, and the center
//! upserts by (node, window start), so a re-send never double counts.
//!
//! Late events (whose window was already rolled up) are accepted and *reopen* their window: it
//! is rolled up again at the next pass, its version bumps and it is sent again, replacing the
//! older summary at the center. To keep that honest, events older than `retention − window`
//! are refused (their window's raw events may already be gone), as are events stamped more than
//! `max_future` ahead of the node's clock. Refused, not clamped: a clamped timestamp would
//! silently count an event in the wrong window.
//!
//! # Retention
//! [`Analytics::sweep_at`] deletes raw events older than `retention` (default 24 h) and delivered
//! summaries whose window started before that. Undelivered summaries are kept however old:
//! they wait for the center.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params};
use serde::Serialize;
use tokio::sync::oneshot;

use crate::store::now_ms;
use crate::{StoreError, schema};

/// The database file's name inside `data_dir`.
pub const FILE_NAME: &str = "analytics.db";
/// `PRAGMA application_id` of an analytics file ("OPAN"), distinct from the store's "OPST".
pub const APPLICATION_ID: i64 = 0x4F50_414E;
/// Longest event type accepted, in bytes.
pub const MAX_KIND: usize = 64;
/// Longest event key accepted, in bytes.
pub const MAX_KEY: usize = 256;
/// Most jobs the writer folds into one transaction.
const MAX_BATCH: usize = 256;

/// Schema migrations, in order; `PRAGMA user_version` counts how many have run. Append only.
const MIGRATIONS: &[&str] = &[
    // 1: raw events, summaries, windows reopened by late events, metadata.
    "CREATE TABLE meta (
        key TEXT PRIMARY KEY,
        value ANY
    ) STRICT, WITHOUT ROWID;
    CREATE TABLE events (
        seq INTEGER PRIMARY KEY,
        ts_ms INTEGER NOT NULL,
        kind TEXT NOT NULL,
        key TEXT NOT NULL,
        value REAL
    ) STRICT;
    CREATE INDEX events_ts ON events (ts_ms);
    CREATE TABLE summaries (
        window_start_ms INTEGER PRIMARY KEY,
        window_ms INTEGER NOT NULL,
        version INTEGER NOT NULL,
        events INTEGER NOT NULL,
        types TEXT NOT NULL,
        created_ms INTEGER NOT NULL,
        delivered INTEGER NOT NULL,
        delivered_ms INTEGER,
        attempts INTEGER NOT NULL,
        next_attempt_ms INTEGER NOT NULL,
        last_error TEXT
    ) STRICT;
    CREATE INDEX summaries_due ON summaries (delivered, next_attempt_ms);
    CREATE TABLE reopened (
        window_start_ms INTEGER PRIMARY KEY
    ) STRICT, WITHOUT ROWID;",
];

/// One analytics event.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    /// When it happened, Unix ms (the client's clock, or the node's when the client gave none).
    pub ts_ms: u64,
    /// Its type (`page_view`, `add_to_cart` …): 1 to [`MAX_KIND`] bytes.
    pub kind: String,
    /// What it is about (a path, a product id …): up to [`MAX_KEY`] bytes, may be empty.
    pub key: String,
    /// A number to sum (a price, a duration), when the event has one.
    pub value: Option<f64>,
}

/// How to open the analytics file and cut its windows.
#[derive(Debug, Clone)]
pub struct AnalyticsOptions {
    /// Directory for the database file (created if missing): the node's `data_dir`.
    pub dir: PathBuf,
    /// This node's id; summaries are per (node, window).
    pub node_id: String,
    /// This node's region label, carried in summaries for the center's reports.
    pub region: Option<String>,
    /// Length of a summary window.
    pub window: Duration,
    /// How long after a window ends it stays open for stragglers before it is rolled up.
    pub grace: Duration,
    /// Keys listed by name per type in a summary; the rest count as `other`.
    pub top_keys: usize,
    /// How long raw events (and delivered summaries) are kept.
    pub retention: Duration,
    /// How far ahead of the node's clock an event may be stamped (client clock skew).
    pub max_future: Duration,
}

impl AnalyticsOptions {
    /// Defaults for node `node_id` storing in `dir`: 60 s windows, 5 s grace, top 50 keys,
    /// 24 h retention, 5 min of allowed clock skew ahead.
    pub fn new(dir: impl Into<PathBuf>, node_id: impl Into<String>) -> AnalyticsOptions {
        AnalyticsOptions {
            dir: dir.into(),
            node_id: node_id.into(),
            region: None,
            window: Duration::from_secs(60),
            grace: Duration::from_secs(5),
            top_keys: 50,
            retention: Duration::from_secs(24 * 3600),
            max_future: Duration::from_secs(300),
        }
    }

    fn window_ms(&self) -> u64 {
        (self.window.as_millis() as u64).max(1)
    }

    /// Oldest timestamp accepted at `now_ms`: a window that old still has all its raw events.
    fn oldest_accepted(&self, now_ms: u64) -> u64 {
        let keep = (self.retention.as_millis() as u64).saturating_sub(self.window_ms());
        now_ms.saturating_sub(keep)
    }
}

/// What the counts query groups by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GroupBy {
    /// Event type.
    Type,
    /// Event key.
    Key,
}

impl GroupBy {
    /// The query-string value (`type`, `key`).
    pub fn as_str(self) -> &'static str {
        match self {
            GroupBy::Type => "type",
            GroupBy::Key => "key",
        }
    }

    /// Parses the query-string value.
    pub fn parse(s: &str) -> Option<GroupBy> {
        match s {
            "type" => Some(GroupBy::Type),
            "key" => Some(GroupBy::Key),
            _ => None,
        }
    }
}

/// One row of a counts query.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Count {
    /// The type or key.
    pub name: String,
    /// Events.
    pub count: u64,
    /// Sum of their values (events without a value add nothing).
    pub sum: f64,
}

/// One type's part of a summary.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TypeSummary {
    /// Events of this type in the window.
    pub count: u64,
    /// Sum of their values.
    pub sum: f64,
    /// Distinct keys among them.
    pub keys: u64,
    /// The keys with the most events (ties by key), and their counts.
    pub top: BTreeMap<String, u64>,
    /// Events whose key is not in `top`.
    pub other: u64,
}

/// A window's rolled-up summary, as stored until the center has it.
#[derive(Debug, Clone, PartialEq)]
pub struct Summary {
    /// Window start, Unix ms (aligned to the window length).
    pub window_start_ms: u64,
    /// Window length, ms.
    pub window_ms: u64,
    /// Bumped each time a late event makes the window roll up again; a delivery only settles
    /// the version it sent.
    pub version: u64,
    /// Events in the window.
    pub events: u64,
    /// Per type, compact JSON (an object keyed by type of [`TypeSummary`]).
    pub types: String,
    /// Whether the center has confirmed it.
    pub delivered: bool,
    /// Delivery attempts that failed so far (and the successful one, once delivered).
    pub attempts: u32,
    /// Earliest next attempt, Unix ms.
    pub next_attempt_ms: u64,
    /// Why the last attempt failed.
    pub last_error: Option<String>,
}

impl Summary {
    /// The document sent to the center (`POST` body, or the NATS message payload).
    pub fn payload(&self, node: &str, region: Option<&str>) -> Vec<u8> {
        // `types` is already JSON; splice it in rather than parse and re-encode it.
        let head = serde_json::json!({
            "node": node,
            "region": region,
            "window_start_ms": self.window_start_ms,
            "window_ms": self.window_ms,
            "version": self.version,
            "events": self.events,
        })
        .to_string();
        let mut out = Vec::with_capacity(head.len() + self.types.len() + 16);
        out.extend_from_slice(&head.as_bytes()[..head.len() - 1]);
        out.extend_from_slice(b",\"types\":");
        out.extend_from_slice(self.types.as_bytes());
        out.push(b'}');
        out
    }

    /// The idempotency key for this summary: the same for every send of any version, so the
    /// center keeps one row per (node, window).
    pub fn idempotency_key(&self, node: &str) -> String {
        format!("analytics-{node}-{}", self.window_start_ms)
    }
}

/// What a sweep removed.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct SweepStats {
    /// Raw events older than the retention.
    pub events: usize,
    /// Delivered summaries older than the retention.
    pub summaries: usize,
}

/// A batch refused because of one event; `index` is its position in the batch.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("event {index}: {message}")]
pub struct BadEvent {
    /// Position of the first bad event in the batch.
    pub index: usize,
    /// What is wrong with it.
    pub message: String,
}

/// Counters since start, the one source for metrics and the admin API.
#[derive(Debug, Default)]
struct Stats {
    events_accepted: AtomicU64,
    events_rejected: AtomicU64,
    event_bytes: AtomicU64,
    summaries_sent: AtomicU64,
    summaries_failed: AtomicU64,
    summary_bytes_sent: AtomicU64,
}

/// A reading of the counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct StatsSnapshot {
    /// Events stored.
    pub events_accepted: u64,
    /// Events in refused batches.
    pub events_rejected: u64,
    /// Request body bytes of accepted batches (what raw shipping would have cost).
    pub event_bytes: u64,
    /// Summaries the center (or JetStream) confirmed.
    pub summaries_sent: u64,
    /// Summary deliveries that failed (retried later).
    pub summaries_failed: u64,
    /// Payload bytes of confirmed summary deliveries.
    pub summary_bytes_sent: u64,
}

/// The node's analytics file; cheap to clone.
#[derive(Clone)]
pub struct Analytics {
    shared: Arc<Shared>,
    jobs: std::sync::mpsc::Sender<Job>,
}

struct Shared {
    path: PathBuf,
    options: AnalyticsOptions,
    /// Read-only connections for queries beside the writer.
    readers: Vec<Mutex<Connection>>,
    stats: Stats,
}

enum Job {
    Ingest {
        events: Vec<Event>,
        reply: oneshot::Sender<Result<usize, StoreError>>,
    },
    Rollup {
        now_ms: u64,
        reply: oneshot::Sender<Result<usize, StoreError>>,
    },
    Settle {
        window_start_ms: u64,
        version: u64,
        outcome: Outcome,
        now_ms: u64,
        reply: oneshot::Sender<Result<bool, StoreError>>,
    },
    Sweep {
        now_ms: u64,
        reply: oneshot::Sender<Result<SweepStats, StoreError>>,
    },
}

enum Outcome {
    Delivered,
    Retry { next_ms: u64, error: String },
}

impl Analytics {
    /// Opens (or creates) `<dir>/analytics.db` and starts its writer thread. Blocking: call it
    /// before serving, or from `spawn_blocking`.
    pub fn open(options: AnalyticsOptions) -> Result<Analytics, StoreError> {
        std::fs::create_dir_all(&options.dir).map_err(|source| StoreError::Io {
            path: options.dir.clone(),
            source,
        })?;
        let path = options.dir.join(FILE_NAME);
        let conn = open_writer(&path)?;
        let rolled_upto = meta_u64(&conn, "rolled_upto_ms")?;
        let readers = (0..2)
            .map(|_| schema::open_reader(&path).map(Mutex::new))
            .collect::<Result<Vec<_>, _>>()?;
        let shared = Arc::new(Shared {
            path: path.clone(),
            options,
            readers,
            stats: Stats::default(),
        });
        let (tx, rx) = std::sync::mpsc::channel();
        let mut writer = Writer {
            conn,
            shared: shared.clone(),
            rolled_upto,
        };
        std::thread::Builder::new()
            .name("outpost-analytics".into())
            .spawn(move || writer.run(rx))
            .map_err(|source| StoreError::Io {
                path: path.clone(),
                source,
            })?;
        tracing::info!(path = %path.display(), "Analytics store open.");
        Ok(Analytics { shared, jobs: tx })
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.shared.path
    }

    /// The options it was opened with.
    pub fn options(&self) -> &AnalyticsOptions {
        &self.shared.options
    }

    /// Checks a batch against the rules at `now_ms`; the first bad event is named.
    pub fn validate(&self, events: &[Event], now_ms: u64) -> Result<(), BadEvent> {
        let o = &self.shared.options;
        let oldest = o.oldest_accepted(now_ms);
        let newest = now_ms.saturating_add(o.max_future.as_millis() as u64);
        for (index, e) in events.iter().enumerate() {
            let bad = |message: String| BadEvent { index, message };
            if e.kind.is_empty() || e.kind.len() > MAX_KIND {
                return Err(bad(format!(
                    "type must be 1 to {MAX_KIND} bytes, not {}",
                    e.kind.len()
                )));
            }
            if e.key.len() > MAX_KEY {
                return Err(bad(format!(
                    "key is {} bytes; the limit is {MAX_KEY}",
                    e.key.len()
                )));
            }
            if e.kind.chars().chain(e.key.chars()).any(char::is_control) {
                return Err(bad(
                    "type and key must not contain control characters".into()
                ));
            }
            if e.value.is_some_and(|v| !v.is_finite()) {
                return Err(bad("value must be a finite number".into()));
            }
            if e.ts_ms < oldest {
                return Err(bad(format!(
                    "ts {} is {} s in the past; events older than {} s are refused (their window may be gone)",
                    e.ts_ms,
                    (now_ms - e.ts_ms) / 1000,
                    (now_ms - oldest) / 1000
                )));
            }
            if e.ts_ms > newest {
                return Err(bad(format!(
                    "ts {} is {} s ahead of this node's clock (limit {} s); send Unix milliseconds",
                    e.ts_ms,
                    (e.ts_ms - now_ms) / 1000,
                    o.max_future.as_secs()
                )));
            }
        }
        Ok(())
    }

    /// Validates and stores a batch (all or nothing); returns how many were stored, once they
    /// are committed. A refused batch is `StoreError::Invalid` naming the first bad event.
    pub async fn ingest(&self, events: Vec<Event>) -> Result<usize, StoreError> {
        self.ingest_at(events, now_ms()).await
    }

    /// [`Analytics::ingest`] with the clock given (tests).
    pub async fn ingest_at(&self, events: Vec<Event>, now_ms: u64) -> Result<usize, StoreError> {
        let n = events.len() as u64;
        if let Err(e) = self.validate(&events, now_ms) {
            self.count_rejected(n);
            return Err(StoreError::Invalid(e.to_string()));
        }
        if events.is_empty() {
            return Ok(0);
        }
        let (reply, rx) = oneshot::channel();
        self.send(Job::Ingest { events, reply })?;
        let stored = rx.await.map_err(|_| StoreError::Closed)??;
        self.shared
            .stats
            .events_accepted
            .fetch_add(stored as u64, Ordering::Relaxed);
        Ok(stored)
    }

    /// Counts events of a batch refused before it reached [`Analytics::ingest`] (bad JSON).
    pub fn count_rejected(&self, events: u64) {
        self.shared
            .stats
            .events_rejected
            .fetch_add(events, Ordering::Relaxed);
    }

    /// Adds the size of an accepted request body (raw bytes, for the savings figure).
    pub fn count_event_bytes(&self, bytes: u64) {
        self.shared
            .stats
            .event_bytes
            .fetch_add(bytes, Ordering::Relaxed);
    }

    /// Events in `[from_ms, to_ms)` grouped by type or key (optionally of one type only), most
    /// frequent first (ties by name), at most `limit` rows.
    pub fn counts(
        &self,
        by: GroupBy,
        kind: Option<&str>,
        from_ms: u64,
        to_ms: u64,
        limit: usize,
    ) -> Result<Vec<Count>, StoreError> {
        let column = match by {
            GroupBy::Type => "kind",
            GroupBy::Key => "key",
        };
        let sql = format!(
            "SELECT {column}, count(*) AS n, total(value) FROM events
             WHERE ts_ms >= ?1 AND ts_ms < ?2 AND (?3 IS NULL OR kind = ?3)
             GROUP BY {column} ORDER BY n DESC, {column} LIMIT ?4"
        );
        self.read(|conn| {
            let mut stmt = conn.prepare_cached(&sql)?;
            let rows = stmt.query_map(
                params![
                    clamp_i64(from_ms),
                    clamp_i64(to_ms),
                    kind,
                    limit.min(i64::MAX as usize) as i64
                ],
                |r| {
                    Ok(Count {
                        name: r.get(0)?,
                        count: r.get::<_, i64>(1)? as u64,
                        sum: r.get(2)?,
                    })
                },
            )?;
            Ok(rows.collect::<Result<_, _>>()?)
        })
    }

    /// Rolls up every window closed at `now_ms` (and every window reopened by late events) into
    /// its summary; returns how many summaries were written. Running it again changes nothing.
    pub async fn rollup_at(&self, now_ms: u64) -> Result<usize, StoreError> {
        let (reply, rx) = oneshot::channel();
        self.send(Job::Rollup { now_ms, reply })?;
        rx.await.map_err(|_| StoreError::Closed)?
    }

    /// Undelivered summaries whose next attempt is due at `now_ms`, oldest window first.
    pub fn due_summaries(&self, now_ms: u64, limit: usize) -> Result<Vec<Summary>, StoreError> {
        self.read(|conn| {
            let sql = format!(
                "SELECT {SUMMARY_COLUMNS} FROM summaries
                 WHERE delivered = 0 AND next_attempt_ms <= ?1
                 ORDER BY window_start_ms LIMIT ?2"
            );
            let mut stmt = conn.prepare_cached(&sql)?;
            let rows = stmt.query_map(params![clamp_i64(now_ms), limit as i64], row_to_summary)?;
            Ok(rows.collect::<Result<_, _>>()?)
        })
    }

    /// The most recent summaries (delivered or not), newest window first.
    pub fn recent_summaries(&self, limit: usize) -> Result<Vec<Summary>, StoreError> {
        self.read(|conn| {
            let sql = format!(
                "SELECT {SUMMARY_COLUMNS} FROM summaries ORDER BY window_start_ms DESC LIMIT ?1"
            );
            let mut stmt = conn.prepare_cached(&sql)?;
            let rows = stmt.query_map(params![limit as i64], row_to_summary)?;
            Ok(rows.collect::<Result<_, _>>()?)
        })
    }

    /// How many summaries wait for the center.
    pub fn pending_summaries(&self) -> Result<u64, StoreError> {
        self.read(|conn| {
            Ok(conn.query_row(
                "SELECT count(*) FROM summaries WHERE delivered = 0",
                [],
                |r| r.get::<_, i64>(0),
            )? as u64)
        })
    }

    /// Records that the center has `version` of the window's summary (sent `bytes` bytes).
    /// Returns false when the window was re-rolled meanwhile (the newer version is still due).
    pub async fn mark_delivered(
        &self,
        window_start_ms: u64,
        version: u64,
        bytes: u64,
    ) -> Result<bool, StoreError> {
        // Counted before the bookkeeping commits, so whoever sees the summary delivered also
        // sees it counted (the bytes went out either way).
        let s = &self.shared.stats;
        s.summaries_sent.fetch_add(1, Ordering::Relaxed);
        s.summary_bytes_sent.fetch_add(bytes, Ordering::Relaxed);
        let (reply, rx) = oneshot::channel();
        self.send(Job::Settle {
            window_start_ms,
            version,
            outcome: Outcome::Delivered,
            now_ms: now_ms(),
            reply,
        })?;
        rx.await.map_err(|_| StoreError::Closed)?
    }

    /// Records a failed delivery; the summary is due again at `next_ms`.
    pub async fn mark_failed(
        &self,
        window_start_ms: u64,
        version: u64,
        next_ms: u64,
        error: String,
    ) -> Result<(), StoreError> {
        self.shared
            .stats
            .summaries_failed
            .fetch_add(1, Ordering::Relaxed);
        let (reply, rx) = oneshot::channel();
        self.send(Job::Settle {
            window_start_ms,
            version,
            outcome: Outcome::Retry { next_ms, error },
            now_ms: now_ms(),
            reply,
        })?;
        rx.await.map_err(|_| StoreError::Closed)?.map(|_| ())
    }

    /// Deletes raw events and delivered summaries older than the retention at `now_ms`.
    pub async fn sweep_at(&self, now_ms: u64) -> Result<SweepStats, StoreError> {
        let (reply, rx) = oneshot::channel();
        self.send(Job::Sweep { now_ms, reply })?;
        rx.await.map_err(|_| StoreError::Closed)?
    }

    /// The counters since start.
    pub fn stats(&self) -> StatsSnapshot {
        let s = &self.shared.stats;
        StatsSnapshot {
            events_accepted: s.events_accepted.load(Ordering::Relaxed),
            events_rejected: s.events_rejected.load(Ordering::Relaxed),
            event_bytes: s.event_bytes.load(Ordering::Relaxed),
            summaries_sent: s.summaries_sent.load(Ordering::Relaxed),
            summaries_failed: s.summaries_failed.load(Ordering::Relaxed),
            summary_bytes_sent: s.summary_bytes_sent.load(Ordering::Relaxed),
        }
    }

    fn send(&self, job: Job) -> Result<(), StoreError> {
        self.jobs.send(job).map_err(|_| StoreError::Closed)
    }

    fn read<T>(
        &self,
        f: impl FnOnce(&Connection) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        for reader in &self.shared.readers {
            if let Ok(conn) = reader.try_lock() {
                return f(&conn);
            }
        }
        let conn = self.shared.readers[0]
            .lock()
            .map_err(|_| StoreError::Closed)?;
        f(&conn)
    }
}

const SUMMARY_COLUMNS: &str = "window_start_ms, window_ms, version, events, types, delivered,
     attempts, next_attempt_ms, last_error";

fn row_to_summary(r: &rusqlite::Row<'_>) -> rusqlite::Result<Summary> {
    Ok(Summary {
        window_start_ms: r.get::<_, i64>(0)? as u64,
        window_ms: r.get::<_, i64>(1)? as u64,
        version: r.get::<_, i64>(2)? as u64,
        events: r.get::<_, i64>(3)? as u64,
        types: r.get(4)?,
        delivered: r.get::<_, i64>(5)? != 0,
        attempts: r.get::<_, i64>(6)? as u32,
        next_attempt_ms: r.get::<_, i64>(7)? as u64,
        last_error: r.get(8)?,
    })
}

fn clamp_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// The writer thread's state: the only connection that writes.
struct Writer {
    conn: Connection,
    shared: Arc<Shared>,
    /// Windows starting before this were rolled up (Unix ms; 0 = none yet).
    rolled_upto: u64,
}

/// A finished job, answered after the commit.
enum Done {
    Ingest(oneshot::Sender<Result<usize, StoreError>>, usize),
    Rollup(oneshot::Sender<Result<usize, StoreError>>, usize),
    Settle(oneshot::Sender<Result<bool, StoreError>>, bool),
    Sweep(oneshot::Sender<Result<SweepStats, StoreError>>, SweepStats),
}

impl Done {
    fn answer(self) {
        match self {
            Done::Ingest(tx, n) | Done::Rollup(tx, n) => {
                let _ = tx.send(Ok(n));
            }
            Done::Settle(tx, b) => {
                let _ = tx.send(Ok(b));
            }
            Done::Sweep(tx, s) => {
                let _ = tx.send(Ok(s));
            }
        }
    }

    fn fail(self, e: &StoreError) {
        let err = || StoreError::Invalid(format!("not stored: {e}"));
        match self {
            Done::Ingest(tx, _) | Done::Rollup(tx, _) => {
                let _ = tx.send(Err(err()));
            }
            Done::Settle(tx, _) => {
                let _ = tx.send(Err(err()));
            }
            Done::Sweep(tx, _) => {
                let _ = tx.send(Err(err()));
            }
        }
    }
}

impl Job {
    fn fail(self, e: &StoreError) {
        let err = || StoreError::Invalid(format!("not stored: {e}"));
        match self {
            Job::Ingest { reply, .. } | Job::Rollup { reply, .. } => {
                let _ = reply.send(Err(err()));
            }
            Job::Settle { reply, .. } => {
                let _ = reply.send(Err(err()));
            }
            Job::Sweep { reply, .. } => {
                let _ = reply.send(Err(err()));
            }
        }
    }
}

impl Writer {
    fn run(&mut self, jobs: std::sync::mpsc::Receiver<Job>) {
        while let Ok(first) = jobs.recv() {
            let mut batch = vec![first];
            while batch.len() < MAX_BATCH {
                match jobs.try_recv() {
                    Ok(job) => batch.push(job),
                    Err(_) => break,
                }
            }
            self.commit_batch(batch);
        }
        tracing::debug!("Analytics writer stopped.");
    }

    /// Runs every queued job in one transaction (group commit); all or none are stored.
    fn commit_batch(&mut self, batch: Vec<Job>) {
        let before = self.rolled_upto;
        let mut done = Vec::with_capacity(batch.len());
        let mut pending = batch.into_iter();
        let result = (|| -> Result<(), StoreError> {
            let tx = self
                .conn
                .transaction_with_behavior(TransactionBehavior::Immediate)?;
            for job in pending.by_ref() {
                done.push(apply(
                    &tx,
                    &self.shared.options,
                    &mut self.rolled_upto,
                    job,
                )?);
            }
            tx.commit()?;
            Ok(())
        })();
        match result {
            Ok(()) => done.into_iter().for_each(Done::answer),
            Err(e) => {
                tracing::error!(error = %e, "Analytics commit failed; the batch was not stored.");
                self.rolled_upto = before;
                done.into_iter().for_each(|d| d.fail(&e));
                pending.for_each(|j| j.fail(&e));
            }
        }
    }
}

/// Runs one job inside the batch's transaction. On an SQL error the job's caller hears it at
/// once and the error goes up: the whole batch is rolled back.
fn apply(
    tx: &rusqlite::Transaction<'_>,
    options: &AnalyticsOptions,
    rolled_upto: &mut u64,
    job: Job,
) -> Result<Done, StoreError> {
    fn settle<T>(
        result: Result<T, StoreError>,
        reply: oneshot::Sender<Result<T, StoreError>>,
        done: impl FnOnce(oneshot::Sender<Result<T, StoreError>>, T) -> Done,
    ) -> Result<Done, StoreError> {
        match result {
            Ok(v) => Ok(done(reply, v)),
            Err(e) => {
                let _ = reply.send(Err(StoreError::Invalid(format!("not stored: {e}"))));
                Err(e)
            }
        }
    }
    match job {
        Job::Ingest { events, reply } => settle(
            insert(tx, options, *rolled_upto, &events),
            reply,
            Done::Ingest,
        ),
        Job::Rollup { now_ms, reply } => settle(
            rollup(tx, options, rolled_upto, now_ms),
            reply,
            Done::Rollup,
        ),
        Job::Settle {
            window_start_ms,
            version,
            outcome,
            now_ms,
            reply,
        } => settle(
            settle_summary(tx, window_start_ms, version, outcome, now_ms),
            reply,
            Done::Settle,
        ),
        Job::Sweep { now_ms, reply } => settle(sweep(tx, options, now_ms), reply, Done::Sweep),
    }
}

fn insert(
    tx: &rusqlite::Transaction<'_>,
    options: &AnalyticsOptions,
    rolled_upto: u64,
    events: &[Event],
) -> Result<usize, StoreError> {
    let window = options.window_ms();
    let mut insert =
        tx.prepare_cached("INSERT INTO events (ts_ms, kind, key, value) VALUES (?1, ?2, ?3, ?4)")?;
    let mut reopen =
        tx.prepare_cached("INSERT OR IGNORE INTO reopened (window_start_ms) VALUES (?1)")?;
    for e in events {
        insert.execute(params![clamp_i64(e.ts_ms), e.kind, e.key, e.value])?;
        if e.ts_ms < rolled_upto {
            // Its window was summarised already: summarise it again, with this event.
            reopen.execute(params![clamp_i64(e.ts_ms / window * window)])?;
        }
    }
    Ok(events.len())
}

fn settle_summary(
    tx: &rusqlite::Transaction<'_>,
    window_start_ms: u64,
    version: u64,
    outcome: Outcome,
    now_ms: u64,
) -> Result<bool, StoreError> {
    let changed = match outcome {
        Outcome::Delivered => tx
            .prepare_cached(
                "UPDATE summaries SET delivered = 1, delivered_ms = ?3,
                        attempts = attempts + 1, last_error = NULL
                 WHERE window_start_ms = ?1 AND version = ?2 AND delivered = 0",
            )?
            .execute(params![
                clamp_i64(window_start_ms),
                clamp_i64(version),
                clamp_i64(now_ms)
            ])?,
        Outcome::Retry { next_ms, error } => tx
            .prepare_cached(
                "UPDATE summaries SET attempts = attempts + 1, next_attempt_ms = ?3,
                        last_error = ?4
                 WHERE window_start_ms = ?1 AND version = ?2 AND delivered = 0",
            )?
            .execute(params![
                clamp_i64(window_start_ms),
                clamp_i64(version),
                clamp_i64(next_ms),
                error
            ])?,
    };
    Ok(changed > 0)
}

fn sweep(
    tx: &rusqlite::Transaction<'_>,
    options: &AnalyticsOptions,
    now_ms: u64,
) -> Result<SweepStats, StoreError> {
    let before = clamp_i64(now_ms.saturating_sub(options.retention.as_millis() as u64));
    let events = tx.execute("DELETE FROM events WHERE ts_ms < ?1", params![before])?;
    let summaries = tx.execute(
        "DELETE FROM summaries WHERE delivered = 1 AND window_start_ms < ?1",
        params![before],
    )?;
    tx.execute(
        "DELETE FROM reopened WHERE window_start_ms < ?1",
        params![before],
    )?;
    Ok(SweepStats { events, summaries })
}

/// Start of the first window still open at `now_ms`: windows starting before it are closed.
pub fn closed_upto(now_ms: u64, window: Duration, grace: Duration) -> u64 {
    let w = (window.as_millis() as u64).max(1);
    let edge = now_ms.saturating_sub(grace.as_millis() as u64);
    edge / w * w
}

fn rollup(
    tx: &rusqlite::Transaction<'_>,
    options: &AnalyticsOptions,
    rolled_upto: &mut u64,
    now_ms: u64,
) -> Result<usize, StoreError> {
    let w = options.window_ms();
    let upto = closed_upto(now_ms, options.window, options.grace);
    let mut windows: Vec<u64> = Vec::new();
    if upto > *rolled_upto {
        let mut stmt = tx.prepare_cached(
            "SELECT DISTINCT ts_ms / ?3 * ?3 FROM events WHERE ts_ms >= ?1 AND ts_ms < ?2",
        )?;
        let rows = stmt.query_map(
            params![clamp_i64(*rolled_upto), clamp_i64(upto), w as i64],
            |r| r.get::<_, i64>(0),
        )?;
        for r in rows {
            windows.push(r? as u64);
        }
    }
    {
        // Reopened windows that are closed again (a late event for a window still open waits).
        let mut stmt =
            tx.prepare_cached("SELECT window_start_ms FROM reopened WHERE window_start_ms < ?1")?;
        let rows = stmt.query_map(params![clamp_i64(upto)], |r| r.get::<_, i64>(0))?;
        for r in rows {
            windows.push(r? as u64);
        }
    }
    windows.sort_unstable();
    windows.dedup();
    let mut written = 0;
    for start in &windows {
        if write_summary(tx, options, *start, w, now_ms)? {
            written += 1;
        }
    }
    tx.execute(
        "DELETE FROM reopened WHERE window_start_ms < ?1",
        params![clamp_i64(upto)],
    )?;
    if upto > *rolled_upto {
        *rolled_upto = upto;
        tx.execute(
            "INSERT INTO meta (key, value) VALUES ('rolled_upto_ms', ?1)
             ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            params![clamp_i64(upto)],
        )?;
    }
    Ok(written)
}

/// Builds the per-type summary of `[start, start + w)` from raw events.
pub(crate) fn summarise(
    conn: &Connection,
    start: u64,
    w: u64,
    top_keys: usize,
) -> Result<(u64, BTreeMap<String, TypeSummary>), StoreError> {
    let (from, to) = (clamp_i64(start), clamp_i64(start.saturating_add(w)));
    let mut types: BTreeMap<String, TypeSummary> = BTreeMap::new();
    let mut total = 0;
    {
        let mut stmt = conn.prepare_cached(
            "SELECT kind, count(*), total(value), count(DISTINCT key) FROM events
             WHERE ts_ms >= ?1 AND ts_ms < ?2 GROUP BY kind",
        )?;
        let mut rows = stmt.query(params![from, to])?;
        while let Some(r) = rows.next()? {
            let count = r.get::<_, i64>(1)? as u64;
            total += count;
            types.insert(
                r.get(0)?,
                TypeSummary {
                    count,
                    sum: r.get(2)?,
                    keys: r.get::<_, i64>(3)? as u64,
                    top: BTreeMap::new(),
                    other: count,
                },
            );
        }
    }
    let mut stmt = conn.prepare_cached(
        "SELECT kind, key, count(*) AS n FROM events WHERE ts_ms >= ?1 AND ts_ms < ?2
         GROUP BY kind, key ORDER BY kind, n DESC, key",
    )?;
    let mut rows = stmt.query(params![from, to])?;
    while let Some(r) = rows.next()? {
        let kind: String = r.get(0)?;
        let n = r.get::<_, i64>(2)? as u64;
        if let Some(t) = types.get_mut(&kind)
            && t.top.len() < top_keys
        {
            t.top.insert(r.get(1)?, n);
            t.other -= n;
        }
    }
    Ok((total, types))
}

/// Writes (or rewrites) a window's summary; a rewrite that changes nothing keeps the row as it
/// is (delivered stays delivered). Returns whether the row changed.
fn write_summary(
    tx: &rusqlite::Transaction<'_>,
    options: &AnalyticsOptions,
    start: u64,
    w: u64,
    now_ms: u64,
) -> Result<bool, StoreError> {
    let (events, types) = summarise(tx, start, w, options.top_keys)?;
    if events == 0 {
        return Ok(false);
    }
    let json = serde_json::to_string(&types).map_err(|e| StoreError::Decode(e.to_string()))?;
    let existing: Option<(String, i64)> = tx
        .query_row(
            "SELECT types, version FROM summaries WHERE window_start_ms = ?1",
            params![clamp_i64(start)],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .optional()?;
    match existing {
        Some((old, _)) if old == json => Ok(false),
        Some((_, version)) => {
            tx.execute(
                "UPDATE summaries SET types = ?2, events = ?3, version = ?4, window_ms = ?5,
                        delivered = 0, delivered_ms = NULL, next_attempt_ms = 0
                 WHERE window_start_ms = ?1",
                params![clamp_i64(start), json, events as i64, version + 1, w as i64],
            )?;
            Ok(true)
        }
        None => {
            tx.execute(
                "INSERT INTO summaries (window_start_ms, window_ms, version, events, types,
                                        created_ms, delivered, attempts, next_attempt_ms)
                 VALUES (?1, ?2, 1, ?3, ?4, ?5, 0, 0, 0)",
                params![
                    clamp_i64(start),
                    w as i64,
                    events as i64,
                    json,
                    clamp_i64(now_ms)
                ],
            )?;
            Ok(true)
        }
    }
}

fn meta_u64(conn: &Connection, key: &str) -> Result<u64, StoreError> {
    Ok(conn
        .query_row("SELECT value FROM meta WHERE key = ?1", [key], |r| {
            r.get::<_, i64>(0)
        })
        .optional()?
        .unwrap_or(0) as u64)
}

/// The analytics file: its own id and migrations; NORMAL sync (see the module docs).
pub const FILE: schema::FileKind = schema::FileKind {
    application_id: APPLICATION_ID,
    migrations: MIGRATIONS,
    // NORMAL: commits reach the WAL (the OS page cache) but are not fsync'd; a process crash
    // loses nothing committed, an OS crash or power loss may lose the last events.
    synchronous: "NORMAL",
    what: "Analytics",
};

/// Opens (creating if needed) the analytics file for writing, checks it is ours, migrates it.
pub fn open_writer(path: &Path) -> Result<Connection, StoreError> {
    schema::open_file(path, &FILE)
}

#[cfg(test)]
mod tests;
