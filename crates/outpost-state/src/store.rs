//! The node's local store: one SQLite file under `data_dir`, one writer thread, a few readers.
//!
//! Every write (a KV put, a CRDT operation, a batch of changes from another node) goes to the
//! writer thread, which runs whatever has queued up in one transaction and fsyncs once (group
//! commit), so many concurrent writers cost one fsync, and a caller hears "stored" only after
//! its write is on disk. Reads of KV go straight to SQLite on a pooled read-only connection (WAL
//! lets them run beside the writer); CRDT objects live in memory as well and are read from there.
//!
//! CRDT objects are persisted as a snapshot plus a journal of deltas (`crdt_delta`); since merges
//! are idempotent, loading is "snapshot ⊔ every delta" and compaction needs no care about order.
//! When the node is in a fleet, each local change is also appended to `replication_log` in the
//! same transaction, which the fleet publisher drains: a change is never acknowledged without
//! being queued for the fleet.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params};
use tokio::sync::{Notify, oneshot};

use crate::StoreError;
use crate::change::{Change, KvWrite, stamp_bytes, stamp_from_bytes};
use crate::crdt::{Crdt, Hlc, HlcClock, Kind, ReplicaId};
use crate::{outbox, schema};

/// The database file's name inside `data_dir`.
pub const FILE_NAME: &str = "outpost.db";
/// KV rows are grouped in this many buckets for anti-entropy snapshots.
pub const KV_BUCKETS: u16 = 256;
/// A CRDT's delta journal is folded into its snapshot after this many deltas.
const COMPACT_AFTER: u32 = 256;
/// Most jobs the writer folds into one transaction.
const MAX_BATCH: usize = 512;
/// Longest namespace, object or key name accepted.
const MAX_NAME: usize = 128;
/// Longest KV key, set element or map key accepted.
const MAX_KEY: usize = 1024;
/// Longest KV time to live: expiry times must stay within the store's `i64` milliseconds, and
/// a century is a key that never expires in all but name.
const MAX_TTL: Duration = Duration::from_secs(100 * 365 * 86_400);

/// How to open the store.
#[derive(Debug, Clone)]
pub struct StoreOptions {
    /// Directory for the database file (created if missing).
    pub dir: PathBuf,
    /// Queue local changes for the fleet (only when `[fleet]` is configured; alone, nothing
    /// would drain the queue).
    pub replicate: bool,
    /// How long deleted and expired KV keys are remembered, so an older write that arrives late
    /// cannot bring them back.
    pub tombstone_ttl: Duration,
    /// Largest KV value (and register or map value) accepted.
    pub max_value_bytes: usize,
}

impl StoreOptions {
    /// Defaults for a store in `dir`: not replicating, 7-day tombstones, 1 MiB values.
    pub fn new(dir: impl Into<PathBuf>) -> StoreOptions {
        StoreOptions {
            dir: dir.into(),
            replicate: false,
            tombstone_ttl: Duration::from_secs(7 * 24 * 3600),
            max_value_bytes: 1 << 20,
        }
    }
}

/// An operation on a named CRDT object; the object is created by its first operation.
#[derive(Debug, Clone, PartialEq)]
pub enum Op {
    /// Add to a grow-only counter.
    GIncr(u64),
    /// Add (or subtract) on a PN-counter.
    Add(i64),
    /// Add elements to an OR-Set.
    SetAdd(Vec<String>),
    /// Remove elements (as observed here) from an OR-Set.
    SetRemove(Vec<String>),
    /// Set (or clear, with `None`) a last-writer-wins register.
    RegisterSet(Option<String>),
    /// Set one key of a last-writer-wins map.
    MapSet(String, String),
    /// Remove one key of a last-writer-wins map.
    MapRemove(String),
}

impl Op {
    /// The object type this operation applies to.
    pub fn kind(&self) -> Kind {
        match self {
            Op::GIncr(_) => Kind::GCounter,
            Op::Add(_) => Kind::PNCounter,
            Op::SetAdd(_) | Op::SetRemove(_) => Kind::ORSet,
            Op::RegisterSet(_) => Kind::LwwRegister,
            Op::MapSet(..) | Op::MapRemove(_) => Kind::LwwMap,
        }
    }
}

/// A live KV value.
#[derive(Debug, Clone, PartialEq)]
pub struct KvEntry {
    /// The bytes stored.
    pub value: Vec<u8>,
    /// Media type given at put time.
    pub content_type: Option<String>,
    /// Absolute expiry, Unix ms.
    pub expires_ms: Option<u64>,
    /// The winning write's stamp.
    pub stamp: Hlc,
}

/// One key in a listing.
#[derive(Debug, Clone, PartialEq)]
pub struct KvListed {
    /// The key.
    pub key: String,
    /// Absolute expiry, Unix ms.
    pub expires_ms: Option<u64>,
}

/// What a sweep did, for logs and tests.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct SweepStats {
    /// Keys whose TTL ran out (now tombstones).
    pub expired: usize,
    /// Tombstones older than the tombstone TTL, forgotten.
    pub forgotten: usize,
}

/// Objects and KV buckets changed since the fleet last published snapshots of them.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Dirty {
    /// CRDT object names.
    pub objects: BTreeSet<String>,
    /// KV buckets (see [`kv_bucket`]).
    pub kv_buckets: BTreeSet<u16>,
}

/// The node's store; cheap to clone, shared by the admin API, the fleet and (later) functions.
#[derive(Clone)]
pub struct Store {
    shared: Arc<Shared>,
    jobs: std::sync::mpsc::Sender<Job>,
}

struct Shared {
    path: PathBuf,
    replica: ReplicaId,
    options: StoreOptions,
    /// CRDT objects as of the last commit; the writer replaces entries after each commit.
    objects: RwLock<HashMap<String, Arc<Crdt>>>,
    /// What anti-entropy snapshots must re-send.
    dirty: Mutex<Dirty>,
    /// Woken after a commit that queued local changes for the fleet.
    logged: Notify,
    /// Read-only connections for KV reads.
    readers: Vec<Mutex<Connection>>,
    /// Queued outbox entries and bytes per route, as of the last commit.
    depths: Mutex<outbox::Depths>,
    /// Woken after a commit that queued outbox entries.
    queued: Notify,
    /// Cleared when the writer thread ends (a bug that panics it): the node can then take no
    /// write, and its readiness must say so.
    writing: AtomicBool,
}

/// Clears [`Shared::writing`] when the writer thread ends, by return or by panic.
struct WriterAlive(Arc<Shared>);

impl Drop for WriterAlive {
    fn drop(&mut self) {
        self.0.writing.store(false, Ordering::Release);
        if std::thread::panicking() {
            tracing::error!(
                "The local store's writer stopped after a bug; no write can be accepted until the node restarts."
            );
        }
    }
}

enum Job {
    Kv {
        write: PendingKv,
        reply: oneshot::Sender<Result<Hlc, StoreError>>,
    },
    KvIncrement {
        ns: String,
        key: String,
        delta: u64,
        reply: oneshot::Sender<Result<u64, StoreError>>,
    },
    Crdt {
        name: String,
        op: Op,
        reply: oneshot::Sender<Result<Arc<Crdt>, StoreError>>,
    },
    Remote {
        changes: Vec<Change>,
        reply: oneshot::Sender<Result<usize, StoreError>>,
    },
    Published {
        upto: i64,
        reply: oneshot::Sender<Result<(), StoreError>>,
    },
    Sweep {
        now_ms: u64,
        reply: oneshot::Sender<Result<SweepStats, StoreError>>,
    },
    OutboxPut {
        entry: Box<outbox::NewEntry>,
        limits: outbox::Limits,
        reply: oneshot::Sender<Result<i64, StoreError>>,
    },
    OutboxSettle {
        id: String,
        settlement: outbox::Settlement,
        reply: oneshot::Sender<Result<(), StoreError>>,
    },
}

struct PendingKv {
    ns: String,
    key: String,
    value: Option<Vec<u8>>,
    content_type: Option<String>,
    ttl: Option<Duration>,
    condition: KvCondition,
}

/// What must hold of a key for a write to go ahead, checked in the writer's transaction so no
/// other write can slip in between (the HTTP API's `If-Match: *` / `If-None-Match: *`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum KvCondition {
    /// Write whatever is there.
    #[default]
    Always,
    /// Only replace a live value (`If-Match: *`).
    Exists,
    /// Only create: the key has no live value (`If-None-Match: *`).
    Absent,
}

impl Store {
    /// Opens (or creates) the store in `options.dir` and starts its writer thread. Blocking: call
    /// it before serving, or from `spawn_blocking`.
    pub fn open(options: StoreOptions) -> Result<Store, StoreError> {
        std::fs::create_dir_all(&options.dir).map_err(|source| StoreError::Io {
            path: options.dir.clone(),
            source,
        })?;
        let path = options.dir.join(FILE_NAME);
        let conn = schema::open_writer(&path)?;
        let replica = replica_id(&conn)?;
        let (objects, journal) = load_objects(&conn)?;
        let depths = outbox::load_depths(&conn)?;
        let mut clock = HlcClock::new(replica);
        if let Some(last) = last_stamp(&conn)? {
            // Never issue a stamp below one already written, even if the wall clock went back.
            let _ = clock.observe(&last, now_ms());
        }
        let readers = (0..4)
            .map(|_| schema::open_reader(&path).map(Mutex::new))
            .collect::<Result<Vec<_>, _>>()?;
        let shared = Arc::new(Shared {
            path: path.clone(),
            replica,
            options: options.clone(),
            objects: RwLock::new(objects),
            dirty: Mutex::new(Dirty::default()),
            logged: Notify::new(),
            readers,
            depths: Mutex::new(depths),
            queued: Notify::new(),
            writing: AtomicBool::new(true),
        });
        let (tx, rx) = std::sync::mpsc::channel();
        let mut writer = Writer {
            conn,
            shared: shared.clone(),
            clock,
            journal,
        };
        let alive = WriterAlive(shared.clone());
        std::thread::Builder::new()
            .name("outpost-store".into())
            .spawn(move || {
                let _alive = alive;
                writer.run(rx);
            })
            .map_err(|source| StoreError::Io {
                path: path.clone(),
                source,
            })?;
        tracing::info!(path = %path.display(), replica = %replica, "Local store open.");
        Ok(Store { shared, jobs: tx })
    }

    /// This store's replica id: random at creation, so a node that lost its disk comes back as a
    /// new replica and never reuses a dot.
    pub fn replica(&self) -> ReplicaId {
        self.shared.replica
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.shared.path
    }

    /// Stores `value` under `ns`/`key`, expiring after `ttl`; returns once it is on disk.
    pub async fn kv_put(
        &self,
        ns: &str,
        key: &str,
        value: Vec<u8>,
        content_type: Option<String>,
        ttl: Option<Duration>,
    ) -> Result<Hlc, StoreError> {
        self.kv_put_if(ns, key, value, content_type, ttl, KvCondition::Always)
            .await
    }

    /// [`Store::kv_put`] if `condition` holds when the write is applied; otherwise
    /// [`StoreError::PreconditionFailed`] and nothing changes.
    pub async fn kv_put_if(
        &self,
        ns: &str,
        key: &str,
        value: Vec<u8>,
        content_type: Option<String>,
        ttl: Option<Duration>,
        condition: KvCondition,
    ) -> Result<Hlc, StoreError> {
        check_name("namespace", ns, MAX_NAME)?;
        check_name("key", key, MAX_KEY)?;
        self.check_value(value.len())?;
        if let Some(t) = ttl {
            if t < Duration::from_millis(1) {
                return Err(StoreError::Invalid("ttl must be at least 1 ms".into()));
            }
            if t > MAX_TTL {
                return Err(StoreError::Invalid(format!(
                    "ttl must be at most {} days (100 years); leave it out for a key that never expires",
                    MAX_TTL.as_secs() / 86_400
                )));
            }
        }
        self.kv_write(PendingKv {
            ns: ns.into(),
            key: key.into(),
            value: Some(value),
            content_type,
            ttl,
            condition,
        })
        .await
    }

    /// Deletes `ns`/`key` (a tombstone, replicated like a put); returns once it is on disk.
    pub async fn kv_delete(&self, ns: &str, key: &str) -> Result<Hlc, StoreError> {
        check_name("namespace", ns, MAX_NAME)?;
        check_name("key", key, MAX_KEY)?;
        self.kv_write(PendingKv {
            ns: ns.into(),
            key: key.into(),
            value: None,
            content_type: None,
            ttl: None,
            condition: KvCondition::Always,
        })
        .await
    }

    /// Adds `delta` to the decimal counter `ns`/`key` (absent counts as 0) and returns the new
    /// value once it is on disk. The read and the write happen in the writer's transaction, so
    /// concurrent increments of a key never lose one, and they share a commit (one fsync for
    /// a batch) instead of queueing behind each other's. The value is a KV value like any other
    /// (text, replicated last-writer-wins: for a sum over the fleet use a PN-counter).
    pub async fn kv_increment(&self, ns: &str, key: &str, delta: u64) -> Result<u64, StoreError> {
        check_name("namespace", ns, MAX_NAME)?;
        check_name("key", key, MAX_KEY)?;
        let (reply, rx) = oneshot::channel();
        self.send(Job::KvIncrement {
            ns: ns.into(),
            key: key.into(),
            delta,
            reply,
        })?;
        rx.await.map_err(|_| StoreError::Closed)?
    }

    async fn kv_write(&self, write: PendingKv) -> Result<Hlc, StoreError> {
        let (reply, rx) = oneshot::channel();
        self.send(Job::Kv { write, reply })?;
        rx.await.map_err(|_| StoreError::Closed)?
    }

    /// Whether the store still takes writes (its writer thread runs): readiness reports it.
    pub fn is_writable(&self) -> bool {
        self.shared.writing.load(Ordering::Acquire)
    }

    /// The live value of `ns`/`key`: expired and deleted keys are absent.
    pub fn kv_get(&self, ns: &str, key: &str) -> Result<Option<KvEntry>, StoreError> {
        self.read(|conn| {
            let mut stmt = conn.prepare_cached(
                "SELECT value, content_type, expires_ms, stamp FROM kv
                 WHERE ns = ?1 AND key = ?2 AND value IS NOT NULL
                   AND (expires_ms IS NULL OR expires_ms > ?3)",
            )?;
            let row = stmt
                .query_row(params![ns, key, now_ms() as i64], |r| {
                    Ok((
                        r.get::<_, Vec<u8>>(0)?,
                        r.get::<_, Option<String>>(1)?,
                        r.get::<_, Option<i64>>(2)?,
                        r.get::<_, Vec<u8>>(3)?,
                    ))
                })
                .optional()?;
            Ok(row.map(|(value, content_type, expires, stamp)| KvEntry {
                value,
                content_type,
                expires_ms: expires.map(|e| e as u64),
                stamp: stamp_from_bytes(&stamp).unwrap_or(Hlc {
                    wall_ms: 0,
                    logical: 0,
                    replica: ReplicaId(0),
                }),
            }))
        })
    }

    /// Live keys of `ns` starting with `prefix`, in byte order, after `after` (a cursor: the
    /// last key of the previous page), at most `limit`.
    pub fn kv_list(
        &self,
        ns: &str,
        prefix: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<KvListed>, StoreError> {
        let upper = format!("{prefix}\u{10FFFF}");
        let lower = match after {
            Some(a) if a >= prefix => a.to_owned(),
            _ => String::new(),
        };
        self.read(|conn| {
            let mut stmt = conn.prepare_cached(
                "SELECT key, expires_ms FROM kv
                 WHERE ns = ?1 AND key >= ?2 AND key < ?3 AND key > ?4 AND value IS NOT NULL
                   AND (expires_ms IS NULL OR expires_ms > ?5)
                 ORDER BY key LIMIT ?6",
            )?;
            let rows = stmt.query_map(
                params![ns, prefix, upper, lower, now_ms() as i64, limit as i64],
                |r| {
                    Ok(KvListed {
                        key: r.get(0)?,
                        expires_ms: r.get::<_, Option<i64>>(1)?.map(|e| e as u64),
                    })
                },
            )?;
            Ok(rows.collect::<Result<Vec<_>, _>>()?)
        })
    }

    /// Applies `op` to the object `name` (creating it), durably; returns the object afterwards.
    pub async fn update(&self, name: &str, op: Op) -> Result<Arc<Crdt>, StoreError> {
        check_name("object name", name, MAX_NAME)?;
        match &op {
            Op::SetAdd(els) | Op::SetRemove(els) => {
                for e in els {
                    check_name("set element", e, MAX_KEY)?;
                }
            }
            Op::MapSet(k, v) => {
                check_name("map key", k, MAX_KEY)?;
                self.check_value(v.len())?;
            }
            Op::MapRemove(k) => check_name("map key", k, MAX_KEY)?,
            Op::RegisterSet(Some(v)) => self.check_value(v.len())?,
            _ => {}
        }
        let (reply, rx) = oneshot::channel();
        self.send(Job::Crdt {
            name: name.into(),
            op,
            reply,
        })?;
        rx.await.map_err(|_| StoreError::Closed)?
    }

    fn check_value(&self, len: usize) -> Result<(), StoreError> {
        let limit = self.shared.options.max_value_bytes;
        if len > limit {
            return Err(StoreError::TooLarge { len, limit });
        }
        Ok(())
    }

    /// The object `name` as of the last commit.
    pub fn object(&self, name: &str) -> Option<Arc<Crdt>> {
        self.shared
            .objects
            .read()
            .ok()
            .and_then(|m| m.get(name).cloned())
    }

    /// Every object's name and type, sorted by name.
    pub fn objects(&self) -> Vec<(String, Kind)> {
        let mut out: Vec<_> = self
            .shared
            .objects
            .read()
            .map(|m| m.iter().map(|(k, v)| (k.clone(), v.kind())).collect())
            .unwrap_or_default();
        out.sort();
        out
    }

    /// Merges changes that came from other nodes (deltas, KV writes, full states); returns how
    /// many changed anything here. Idempotent: applying the same changes again changes nothing.
    pub async fn apply_remote(&self, changes: Vec<Change>) -> Result<usize, StoreError> {
        let (reply, rx) = oneshot::channel();
        self.send(Job::Remote { changes, reply })?;
        rx.await.map_err(|_| StoreError::Closed)?
    }

    /// Local changes queued for the fleet after sequence `after`, oldest first, up to about
    /// `max_bytes`.
    pub fn unpublished(
        &self,
        after: i64,
        max_bytes: usize,
    ) -> Result<Vec<(i64, Change)>, StoreError> {
        self.read(|conn| {
            let mut stmt = conn.prepare_cached(
                "SELECT seq, change FROM replication_log WHERE seq > ?1 ORDER BY seq LIMIT 4096",
            )?;
            let mut rows = stmt.query(params![after])?;
            let mut out = Vec::new();
            let mut bytes = 0;
            while let Some(row) = rows.next()? {
                let blob: Vec<u8> = row.get(1)?;
                bytes += blob.len();
                out.push((row.get::<_, i64>(0)?, Change::decode(&blob)?));
                if bytes >= max_bytes {
                    break;
                }
            }
            Ok(out)
        })
    }

    /// The sequence up to which the fleet has confirmed local changes.
    pub fn published_upto(&self) -> Result<i64, StoreError> {
        self.read(|conn| {
            Ok(conn
                .query_row(
                    "SELECT value FROM meta WHERE key = 'published_upto'",
                    [],
                    |r| r.get::<_, i64>(0),
                )
                .optional()?
                .unwrap_or(0))
        })
    }

    /// How many local changes wait for the fleet.
    pub fn unpublished_count(&self) -> Result<u64, StoreError> {
        self.read(|conn| {
            Ok(
                conn.query_row("SELECT count(*) FROM replication_log", [], |r| {
                    r.get::<_, i64>(0)
                })? as u64,
            )
        })
    }

    /// Records that the fleet holds every local change up to `upto`, and forgets them here.
    pub async fn mark_published(&self, upto: i64) -> Result<(), StoreError> {
        let (reply, rx) = oneshot::channel();
        self.send(Job::Published { upto, reply })?;
        rx.await.map_err(|_| StoreError::Closed)?
    }

    /// Woken whenever local changes were queued for the fleet.
    pub async fn logged(&self) {
        self.shared.logged.notified().await;
    }

    /// Takes the set of objects and KV buckets changed since the last call.
    pub fn take_dirty(&self) -> Dirty {
        self.shared
            .dirty
            .lock()
            .map(|mut d| std::mem::take(&mut *d))
            .unwrap_or_default()
    }

    /// Marks everything dirty, so the next snapshot round re-sends the whole state.
    pub fn mark_all_dirty(&self) -> Result<(), StoreError> {
        let names: Vec<String> = self.objects().into_iter().map(|(n, _)| n).collect();
        let buckets: Vec<u16> = self.read(|conn| {
            let mut stmt = conn.prepare_cached("SELECT DISTINCT bucket FROM kv")?;
            let rows = stmt.query_map([], |r| r.get::<_, i64>(0))?;
            Ok(rows
                .filter_map(Result::ok)
                .map(|b| b as u16)
                .collect::<Vec<_>>())
        })?;
        if let Ok(mut d) = self.shared.dirty.lock() {
            d.objects.extend(names);
            d.kv_buckets.extend(buckets);
        }
        Ok(())
    }

    /// Puts back what [`Store::take_dirty`] took but could not be published.
    pub fn restore_dirty(&self, mut dirty: Dirty) {
        if let Ok(mut d) = self.shared.dirty.lock() {
            d.objects.append(&mut dirty.objects);
            d.kv_buckets.append(&mut dirty.kv_buckets);
        }
    }

    /// Every KV row (live, expired or deleted) in one bucket, as replicable writes: the bucket's
    /// full state for anti-entropy.
    pub fn kv_bucket(&self, bucket: u16) -> Result<Vec<KvWrite>, StoreError> {
        self.read(|conn| {
            let mut stmt = conn.prepare_cached(
                "SELECT ns, key, value, content_type, expires_ms, stamp FROM kv WHERE bucket = ?1",
            )?;
            let rows = stmt.query_map(params![bucket as i64], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, Option<Vec<u8>>>(2)?,
                    r.get::<_, Option<String>>(3)?,
                    r.get::<_, Option<i64>>(4)?,
                    r.get::<_, Vec<u8>>(5)?,
                ))
            })?;
            let mut out = Vec::new();
            for row in rows {
                let (ns, key, value, content_type, expires, stamp) = row?;
                let Some(stamp) = stamp_from_bytes(&stamp) else {
                    continue;
                };
                out.push(KvWrite {
                    ns,
                    key,
                    value,
                    content_type,
                    expires_ms: expires.map(|e| e as u64),
                    stamp,
                });
            }
            Ok(out)
        })
    }

    /// Turns expired keys into tombstones and forgets tombstones older than the tombstone TTL.
    pub async fn sweep(&self) -> Result<SweepStats, StoreError> {
        self.sweep_at(now_ms()).await
    }

    /// [`Store::sweep`] as of `now_ms` (tests move time forward).
    pub async fn sweep_at(&self, now_ms: u64) -> Result<SweepStats, StoreError> {
        let (reply, rx) = oneshot::channel();
        self.send(Job::Sweep { now_ms, reply })?;
        rx.await.map_err(|_| StoreError::Closed)?
    }

    /// Keeps a write for the center, durably (the caller answers 202 only after this returns);
    /// refused with [`StoreError::Full`] when the route's queue is at its limits.
    pub async fn outbox_put(
        &self,
        entry: outbox::NewEntry,
        limits: outbox::Limits,
    ) -> Result<i64, StoreError> {
        let (reply, rx) = oneshot::channel();
        self.send(Job::OutboxPut {
            entry: Box::new(entry),
            limits,
            reply,
        })?;
        rx.await.map_err(|_| StoreError::Closed)?
    }

    /// Records how a delivery attempt ended.
    pub async fn outbox_settle(
        &self,
        id: &str,
        settlement: outbox::Settlement,
    ) -> Result<(), StoreError> {
        let (reply, rx) = oneshot::channel();
        self.send(Job::OutboxSettle {
            id: id.to_owned(),
            settlement,
            reply,
        })?;
        rx.await.map_err(|_| StoreError::Closed)?
    }

    /// Entries due for an attempt: the oldest queued one of each order key, if its time came.
    pub fn outbox_due(&self, limit: usize) -> Result<Vec<outbox::Entry>, StoreError> {
        // The deliverer asks four times a second on every node, outbox routes or not: an empty
        // outbox (the depths are updated before the deliverer is woken) costs no query.
        if !self.outbox_has_entries() {
            return Ok(Vec::new());
        }
        self.read(|conn| outbox::due(conn, now_ms(), limit))
    }

    fn outbox_has_entries(&self) -> bool {
        self.shared
            .depths
            .lock()
            .map(|d| d.values().any(|d| d.entries > 0))
            .unwrap_or(true)
    }

    /// Whether writes of `order_key` (on `route`) are waiting: a new one must queue behind
    /// them to keep their order. Cheap when the route's queue is empty.
    pub fn outbox_waiting(&self, route: &str, order_key: &str) -> Result<bool, StoreError> {
        let any = self
            .shared
            .depths
            .lock()
            .map(|d| d.get(route).is_some_and(|d| d.entries > 0))
            .unwrap_or(true);
        if !any {
            return Ok(false);
        }
        self.read(|conn| outbox::key_has_queued(conn, order_key))
    }

    /// One entry, for the status API.
    pub fn outbox_get(&self, id: &str) -> Result<Option<outbox::Entry>, StoreError> {
        self.read(|conn| outbox::get(conn, id))
    }

    /// Queued entries and bytes per route.
    pub fn outbox_depths(&self) -> outbox::Depths {
        self.shared
            .depths
            .lock()
            .map(|d| d.clone())
            .unwrap_or_default()
    }

    /// When the oldest queued entry was accepted (Unix ms).
    pub fn outbox_oldest(&self) -> Result<Option<u64>, StoreError> {
        if !self.outbox_has_entries() {
            return Ok(None);
        }
        self.read(outbox::oldest_queued)
    }

    /// Woken when entries were queued.
    pub async fn outbox_queued(&self) {
        self.shared.queued.notified().await;
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
        let i = fastrand::usize(..self.shared.readers.len());
        let conn = self.shared.readers[i]
            .lock()
            .map_err(|_| StoreError::Closed)?;
        f(&conn)
    }
}

/// The anti-entropy bucket of a KV key (FNV-1a, stable across builds and restarts).
pub fn kv_bucket(ns: &str, key: &str) -> u16 {
    let mut h: u32 = 0x811c_9dc5;
    for b in ns.bytes().chain([0u8]).chain(key.bytes()) {
        h ^= u32::from(b);
        h = h.wrapping_mul(0x0100_0193);
    }
    (h % u32::from(KV_BUCKETS)) as u16
}

/// Wall-clock milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn check_name(what: &str, name: &str, max: usize) -> Result<(), StoreError> {
    if name.is_empty() {
        return Err(StoreError::Invalid(format!("{what} must not be empty")));
    }
    if name.len() > max {
        return Err(StoreError::Invalid(format!(
            "{what} is {} bytes long; the limit is {max}",
            name.len()
        )));
    }
    if name.chars().any(char::is_control) {
        return Err(StoreError::Invalid(format!(
            "{what} {name:?} contains control characters"
        )));
    }
    Ok(())
}

fn replica_id(conn: &Connection) -> Result<ReplicaId, StoreError> {
    let existing: Option<i64> = conn
        .query_row("SELECT value FROM meta WHERE key = 'replica_id'", [], |r| {
            r.get(0)
        })
        .optional()?;
    if let Some(id) = existing {
        return Ok(ReplicaId(id as u64));
    }
    let id = ReplicaId::random();
    conn.execute(
        "INSERT INTO meta (key, value) VALUES ('replica_id', ?1)",
        params![id.0 as i64],
    )?;
    Ok(id)
}

fn last_stamp(conn: &Connection) -> Result<Option<Hlc>, StoreError> {
    let bytes: Option<Vec<u8>> = conn
        .query_row("SELECT value FROM meta WHERE key = 'last_stamp'", [], |r| {
            r.get(0)
        })
        .optional()?;
    Ok(bytes.and_then(|b| stamp_from_bytes(&b)))
}

type Loaded = (HashMap<String, Arc<Crdt>>, HashMap<String, u32>);

fn load_objects(conn: &Connection) -> Result<Loaded, StoreError> {
    let mut objects: HashMap<String, Crdt> = HashMap::new();
    let mut journal: HashMap<String, u32> = HashMap::new();
    {
        let mut stmt = conn.prepare("SELECT name, state FROM crdt")?;
        let mut rows = stmt.query([])?;
        while let Some(row) = rows.next()? {
            let name: String = row.get(0)?;
            let state = Crdt::decode(&row.get::<_, Vec<u8>>(1)?)
                .map_err(|e| StoreError::Decode(format!("object {name:?}: {e}")))?;
            objects.insert(name, state);
        }
    }
    let mut stmt = conn.prepare("SELECT name, delta FROM crdt_delta ORDER BY seq")?;
    let mut rows = stmt.query([])?;
    while let Some(row) = rows.next()? {
        let name: String = row.get(0)?;
        let delta = Crdt::decode(&row.get::<_, Vec<u8>>(1)?)
            .map_err(|e| StoreError::Decode(format!("delta of {name:?}: {e}")))?;
        let obj = objects
            .entry(name.clone())
            .or_insert_with(|| Crdt::empty(delta.kind()));
        obj.merge(&delta)
            .map_err(|e| StoreError::Decode(format!("delta of {name:?}: {e}")))?;
        *journal.entry(name).or_default() += 1;
    }
    Ok((
        objects.into_iter().map(|(k, v)| (k, Arc::new(v))).collect(),
        journal,
    ))
}

/// The writer thread's state: the only connection that writes.
struct Writer {
    conn: Connection,
    shared: Arc<Shared>,
    clock: HlcClock,
    /// Deltas journaled per object since its last snapshot.
    journal: HashMap<String, u32>,
}

/// A finished job, answered after the commit.
enum Done {
    Kv(oneshot::Sender<Result<Hlc, StoreError>>, Hlc),
    KvIncrement(oneshot::Sender<Result<u64, StoreError>>, u64),
    Crdt(oneshot::Sender<Result<Arc<Crdt>, StoreError>>, String),
    Remote(oneshot::Sender<Result<usize, StoreError>>, usize),
    Published(oneshot::Sender<Result<(), StoreError>>),
    Sweep(oneshot::Sender<Result<SweepStats, StoreError>>, SweepStats),
    OutboxPut(oneshot::Sender<Result<i64, StoreError>>, i64),
    OutboxSettle(oneshot::Sender<Result<(), StoreError>>),
    Failed(Job, StoreError),
}

/// Effects of one transaction, installed only once it commits.
#[derive(Default)]
struct Staged {
    objects: HashMap<String, Crdt>,
    dirty: Dirty,
    logged: bool,
    last_stamp: Option<Hlc>,
    /// Outbox depth changes per route: (entries, bytes), signed.
    depths: HashMap<String, (i64, i64)>,
    queued: bool,
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
        tracing::debug!("Local store writer stopped.");
    }

    fn commit_batch(&mut self, batch: Vec<Job>) {
        let mut staged = Staged::default();
        let mut done = Vec::with_capacity(batch.len());
        let result = (|| -> Result<(), StoreError> {
            let tx = self
                .conn
                .transaction_with_behavior(TransactionBehavior::Immediate)?;
            for job in batch {
                done.push(apply(
                    &tx,
                    &self.shared,
                    &mut self.clock,
                    &mut self.journal,
                    &mut staged,
                    job,
                ));
            }
            if let Some(e) = done.iter().find_map(|d| match d {
                Done::Failed(_, e) if !e.is_client_error() => Some(e.to_string()),
                _ => None,
            }) {
                // A statement failed half-way through a job: store none of the batch rather
                // than part of a job (a KV row without its replication entry, say).
                return Err(StoreError::Invalid(e));
            }
            if let Some(stamp) = &staged.last_stamp {
                tx.execute(
                    "INSERT INTO meta (key, value) VALUES ('last_stamp', ?1)
                     ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                    params![stamp_bytes(stamp).to_vec()],
                )?;
            }
            tx.commit()?;
            Ok(())
        })();
        match result {
            Ok(()) => {
                if !staged.objects.is_empty()
                    && let Ok(mut objects) = self.shared.objects.write()
                {
                    for (name, obj) in staged.objects {
                        objects.insert(name, Arc::new(obj));
                    }
                }
                if let Ok(mut d) = self.shared.dirty.lock() {
                    d.objects.append(&mut staged.dirty.objects);
                    d.kv_buckets.append(&mut staged.dirty.kv_buckets);
                }
                if staged.logged {
                    self.shared.logged.notify_waiters();
                    self.shared.logged.notify_one();
                }
                if !staged.depths.is_empty()
                    && let Ok(mut depths) = self.shared.depths.lock()
                {
                    for (route, (n, b)) in staged.depths {
                        let d = depths.entry(route).or_default();
                        d.entries = (d.entries as i64 + n).max(0) as u64;
                        d.bytes = (d.bytes as i64 + b).max(0) as u64;
                    }
                }
                if staged.queued {
                    self.shared.queued.notify_waiters();
                    self.shared.queued.notify_one();
                }
                for d in done {
                    self.answer(d);
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "Local store commit failed; the batch was not stored.");
                // Journal counts may have moved for objects that were not stored: recount lazily
                // by forcing a snapshot next time they change.
                for name in staged.objects.keys() {
                    self.journal.insert(name.clone(), COMPACT_AFTER);
                }
                for d in done {
                    let err = StoreError::Invalid(format!("not stored: {e}"));
                    fail(d, err);
                }
            }
        }
    }

    fn answer(&self, done: Done) {
        match done {
            Done::Kv(tx, stamp) => {
                let _ = tx.send(Ok(stamp));
            }
            Done::KvIncrement(tx, value) => {
                let _ = tx.send(Ok(value));
            }
            Done::Crdt(tx, name) => {
                let obj = self
                    .shared
                    .objects
                    .read()
                    .ok()
                    .and_then(|m| m.get(&name).cloned());
                let _ = tx.send(obj.ok_or(StoreError::Closed));
            }
            Done::Remote(tx, n) => {
                let _ = tx.send(Ok(n));
            }
            Done::Published(tx) => {
                let _ = tx.send(Ok(()));
            }
            Done::Sweep(tx, stats) => {
                let _ = tx.send(Ok(stats));
            }
            Done::OutboxPut(tx, seq) => {
                let _ = tx.send(Ok(seq));
            }
            Done::OutboxSettle(tx) => {
                let _ = tx.send(Ok(()));
            }
            Done::Failed(job, e) => fail_job(job, e),
        }
    }
}

fn fail(done: Done, err: StoreError) {
    match done {
        Done::Kv(tx, _) => {
            let _ = tx.send(Err(err));
        }
        Done::KvIncrement(tx, _) => {
            let _ = tx.send(Err(err));
        }
        Done::Crdt(tx, _) => {
            let _ = tx.send(Err(err));
        }
        Done::Remote(tx, _) => {
            let _ = tx.send(Err(err));
        }
        Done::Published(tx) => {
            let _ = tx.send(Err(err));
        }
        Done::Sweep(tx, _) => {
            let _ = tx.send(Err(err));
        }
        Done::OutboxPut(tx, _) => {
            let _ = tx.send(Err(err));
        }
        Done::OutboxSettle(tx) => {
            let _ = tx.send(Err(err));
        }
        Done::Failed(job, e) => fail_job(job, e),
    }
}

fn fail_job(job: Job, err: StoreError) {
    match job {
        Job::Kv { reply, .. } => {
            let _ = reply.send(Err(err));
        }
        Job::KvIncrement { reply, .. } => {
            let _ = reply.send(Err(err));
        }
        Job::Crdt { reply, .. } => {
            let _ = reply.send(Err(err));
        }
        Job::Remote { reply, .. } => {
            let _ = reply.send(Err(err));
        }
        Job::Published { reply, .. } => {
            let _ = reply.send(Err(err));
        }
        Job::Sweep { reply, .. } => {
            let _ = reply.send(Err(err));
        }
        Job::OutboxPut { reply, .. } => {
            let _ = reply.send(Err(err));
        }
        Job::OutboxSettle { reply, .. } => {
            let _ = reply.send(Err(err));
        }
    }
}

/// Runs one job inside the batch's transaction. Client mistakes (a kind conflict) fail only
/// that job; an SQL error comes back as `Done::Failed` too, and the caller then rolls the whole
/// batch back.
fn apply(
    tx: &rusqlite::Transaction<'_>,
    shared: &Shared,
    clock: &mut HlcClock,
    journal: &mut HashMap<String, u32>,
    staged: &mut Staged,
    job: Job,
) -> Done {
    match job {
        Job::Kv { write, reply } => {
            if write.condition != KvCondition::Always {
                let live = tx
                    .prepare_cached(
                        "SELECT 1 FROM kv WHERE ns = ?1 AND key = ?2 AND value IS NOT NULL
                           AND (expires_ms IS NULL OR expires_ms > ?3)",
                    )
                    .and_then(|mut s| s.exists(params![write.ns, write.key, now_ms() as i64]));
                let live = match live {
                    Ok(l) => l,
                    Err(e) => return Done::Failed(Job::Kv { write, reply }, e.into()),
                };
                let unmet = match write.condition {
                    KvCondition::Exists if !live => Some("the key has no value to replace"),
                    KvCondition::Absent if live => Some("the key already has a value"),
                    _ => None,
                };
                if let Some(why) = unmet {
                    let err = StoreError::PreconditionFailed(why.to_owned());
                    return Done::Failed(Job::Kv { write, reply }, err);
                }
            }
            let stamp = clock.now(now_ms());
            // `kv_put` keeps ttl within MAX_TTL; saturate anyway rather than wrap.
            let expires_ms = write.ttl.map(|t| {
                let ttl_ms = u64::try_from(t.as_millis()).unwrap_or(u64::MAX);
                stamp
                    .wall_ms
                    .max(now_ms())
                    .saturating_add(ttl_ms)
                    .min(i64::MAX as u64)
            });
            let w = KvWrite {
                ns: write.ns,
                key: write.key,
                value: write.value,
                content_type: write.content_type,
                expires_ms,
                stamp,
            };
            let result = kv_upsert(tx, &w).and_then(|_| {
                if shared.options.replicate {
                    log_change(tx, &Change::Kv(w.clone()))?;
                    staged.logged = true;
                }
                Ok(())
            });
            staged.last_stamp = Some(stamp);
            match result {
                Ok(()) => {
                    staged.dirty.kv_buckets.insert(kv_bucket(&w.ns, &w.key));
                    Done::Kv(reply, stamp)
                }
                Err(e) => Done::Failed(
                    Job::Kv {
                        write: pending(w),
                        reply,
                    },
                    e,
                ),
            }
        }
        Job::KvIncrement {
            ns,
            key,
            delta,
            reply,
        } => match kv_increment(tx, shared, clock, staged, &ns, &key, delta) {
            Ok(value) => Done::KvIncrement(reply, value),
            Err(e) => Done::Failed(
                Job::KvIncrement {
                    ns,
                    key,
                    delta,
                    reply,
                },
                e,
            ),
        },
        Job::Crdt { name, op, reply } => {
            let kind = op.kind();
            let obj = staged.objects.entry(name.clone()).or_insert_with(|| {
                shared
                    .objects
                    .read()
                    .ok()
                    .and_then(|m| m.get(&name).map(|o| (**o).clone()))
                    .unwrap_or_else(|| Crdt::empty(kind))
            });
            if obj.kind() != kind {
                let err = StoreError::KindConflict {
                    name: name.clone(),
                    existing: obj.kind().as_str(),
                    wanted: kind.as_str(),
                };
                return Done::Failed(Job::Crdt { name, op, reply }, err);
            }
            let in_range = match (&*obj, &op) {
                (Crdt::GCounter(c), Op::GIncr(n)) => c.can_incr(clock.replica(), *n),
                (Crdt::PNCounter(c), Op::Add(by)) => c.can_add(clock.replica(), *by),
                _ => true,
            };
            if !in_range {
                let err = StoreError::Invalid(format!(
                    "counter `{name}` would leave its range ({}); the change was not applied",
                    if kind == Kind::GCounter {
                        "0 to 18446744073709551615"
                    } else {
                        "-9223372036854775808 to 9223372036854775807"
                    }
                ));
                return Done::Failed(Job::Crdt { name, op, reply }, err);
            }
            let delta = apply_op(obj, &op, clock, &mut staged.last_stamp);
            let result = persist_delta(tx, journal, &name, obj, &delta).and_then(|_| {
                if shared.options.replicate {
                    log_change(
                        tx,
                        &Change::Crdt {
                            name: name.clone(),
                            delta,
                        },
                    )?;
                    staged.logged = true;
                }
                Ok(())
            });
            match result {
                Ok(()) => {
                    staged.dirty.objects.insert(name.clone());
                    Done::Crdt(reply, name)
                }
                Err(e) => Done::Failed(Job::Crdt { name, op, reply }, e),
            }
        }
        Job::Remote { changes, reply } => {
            let mut applied = 0;
            for change in changes {
                let r = match change {
                    Change::Kv(w) => {
                        if let Err(drift) = clock.observe(&w.stamp, now_ms()) {
                            // The write still counts (LWW must agree everywhere); the clock
                            // does not jump ahead with it. A node's clock is probably wrong.
                            tracing::warn!(error = %drift, key = %w.key, "A replicated write is stamped far in the future; check the nodes' clocks (NTP).");
                        }
                        kv_upsert(tx, &w).inspect(|&changed| {
                            if changed {
                                staged.dirty.kv_buckets.insert(kv_bucket(&w.ns, &w.key));
                            }
                        })
                    }
                    Change::Crdt { name, delta } => {
                        merge_remote(tx, shared, journal, staged, &name, &delta)
                    }
                };
                match r {
                    Ok(true) => applied += 1,
                    Ok(false) => {}
                    Err(e) => {
                        return Done::Failed(
                            Job::Remote {
                                changes: Vec::new(),
                                reply,
                            },
                            e,
                        );
                    }
                }
            }
            Done::Remote(reply, applied)
        }
        Job::Published { upto, reply } => {
            let r = tx
                .execute(
                    "INSERT INTO meta (key, value) VALUES ('published_upto', ?1)
                     ON CONFLICT (key) DO UPDATE SET value = max(value, excluded.value)",
                    params![upto],
                )
                .and_then(|_| {
                    tx.execute("DELETE FROM replication_log WHERE seq <= ?1", params![upto])
                });
            match r {
                Ok(_) => Done::Published(reply),
                Err(e) => Done::Failed(Job::Published { upto, reply }, e.into()),
            }
        }
        Job::OutboxPut {
            entry,
            limits,
            reply,
        } => {
            // Depth as of the last commit plus what this batch already queued.
            let mut depths = shared.depths.lock().map(|d| d.clone()).unwrap_or_default();
            for (route, (n, b)) in &staged.depths {
                let d = depths.entry(route.clone()).or_default();
                d.entries = (d.entries as i64 + n).max(0) as u64;
                d.bytes = (d.bytes as i64 + b).max(0) as u64;
            }
            match outbox::insert(tx, &depths, &entry, limits, now_ms()) {
                Ok(seq) => {
                    let d = staged.depths.entry(entry.route.clone()).or_default();
                    d.0 += 1;
                    d.1 += entry.body.len() as i64;
                    staged.queued = true;
                    Done::OutboxPut(reply, seq)
                }
                Err(e) => Done::Failed(
                    Job::OutboxPut {
                        entry,
                        limits,
                        reply,
                    },
                    e,
                ),
            }
        }
        Job::OutboxSettle {
            id,
            settlement,
            reply,
        } => match outbox::settle(tx, &id, &settlement, now_ms()) {
            Ok(left) => {
                if let Some((route, bytes)) = left {
                    let d = staged.depths.entry(route).or_default();
                    d.0 -= 1;
                    d.1 -= bytes as i64;
                }
                Done::OutboxSettle(reply)
            }
            Err(e) => Done::Failed(
                Job::OutboxSettle {
                    id,
                    settlement,
                    reply,
                },
                e,
            ),
        },
        Job::Sweep { now_ms, reply } => {
            let horizon = now_ms.saturating_sub(shared.options.tombstone_ttl.as_millis() as u64);
            let r = (|| -> Result<SweepStats, StoreError> {
                let expired = tx.execute(
                    "UPDATE kv SET value = NULL, content_type = NULL, expires_ms = NULL
                     WHERE expires_ms IS NOT NULL AND expires_ms <= ?1 AND value IS NOT NULL",
                    params![now_ms as i64],
                )?;
                let forgotten = tx.execute(
                    "DELETE FROM kv WHERE value IS NULL AND stamp_ms < ?1",
                    params![horizon as i64],
                )?;
                outbox::forget_settled(tx, horizon)?;
                Ok(SweepStats { expired, forgotten })
            })();
            match r {
                Ok(stats) => Done::Sweep(reply, stats),
                Err(e) => Done::Failed(Job::Sweep { now_ms, reply }, e),
            }
        }
    }
}

fn pending(w: KvWrite) -> PendingKv {
    PendingKv {
        ns: w.ns,
        key: w.key,
        value: w.value,
        content_type: w.content_type,
        ttl: None,
        condition: KvCondition::Always,
    }
}

fn apply_op(obj: &mut Crdt, op: &Op, clock: &mut HlcClock, last_stamp: &mut Option<Hlc>) -> Crdt {
    let replica = clock.replica();
    match (obj, op) {
        (Crdt::GCounter(c), Op::GIncr(n)) => Crdt::GCounter(c.incr(replica, *n)),
        (Crdt::PNCounter(c), Op::Add(n)) => Crdt::PNCounter(c.add(replica, *n)),
        (Crdt::ORSet(s), Op::SetAdd(els)) => Crdt::ORSet(s.add_all(replica, els.iter().cloned())),
        (Crdt::ORSet(s), Op::SetRemove(els)) => {
            Crdt::ORSet(s.remove_all(els.iter().map(String::as_str)))
        }
        (Crdt::LwwRegister(r), Op::RegisterSet(v)) => {
            let stamp = clock.now(now_ms());
            *last_stamp = Some(stamp);
            Crdt::LwwRegister(r.set(v.clone(), stamp))
        }
        (Crdt::LwwMap(m), Op::MapSet(k, v)) => {
            let stamp = clock.now(now_ms());
            *last_stamp = Some(stamp);
            Crdt::LwwMap(m.set(k.clone(), v.clone(), stamp))
        }
        (Crdt::LwwMap(m), Op::MapRemove(k)) => {
            let stamp = clock.now(now_ms());
            *last_stamp = Some(stamp);
            Crdt::LwwMap(m.remove(k.clone(), stamp))
        }
        // The caller checked kinds; an impossible pair produces an empty delta of the object.
        (obj, _) => Crdt::empty(obj.kind()),
    }
}

/// Journals a delta, or folds the journal into a snapshot when it has grown long (or when the
/// delta is as big as the state, as full-state merges are).
fn persist_delta(
    tx: &rusqlite::Transaction<'_>,
    journal: &mut HashMap<String, u32>,
    name: &str,
    state: &Crdt,
    delta: &Crdt,
) -> Result<(), StoreError> {
    let count = journal.entry(name.to_owned()).or_default();
    let delta_bytes = delta.encode();
    if *count + 1 >= COMPACT_AFTER || delta_bytes.len() > 4096 {
        tx.execute(
            "INSERT INTO crdt (name, state) VALUES (?1, ?2)
             ON CONFLICT (name) DO UPDATE SET state = excluded.state",
            params![name, state.encode()],
        )?;
        tx.execute("DELETE FROM crdt_delta WHERE name = ?1", params![name])?;
        *count = 0;
    } else {
        tx.prepare_cached("INSERT INTO crdt_delta (name, delta) VALUES (?1, ?2)")?
            .execute(params![name, delta_bytes])?;
        *count += 1;
    }
    Ok(())
}

fn merge_remote(
    tx: &rusqlite::Transaction<'_>,
    shared: &Shared,
    journal: &mut HashMap<String, u32>,
    staged: &mut Staged,
    name: &str,
    delta: &Crdt,
) -> Result<bool, StoreError> {
    let obj = staged.objects.entry(name.to_owned()).or_insert_with(|| {
        shared
            .objects
            .read()
            .ok()
            .and_then(|m| m.get(name).map(|o| (**o).clone()))
            .unwrap_or_else(|| Crdt::empty(delta.kind()))
    });
    let before = obj.clone();
    if let Err(e) = obj.merge(delta) {
        // Another node used the name for another type: keep ours, say so, do not stop the batch.
        tracing::warn!(object = name, error = %e, "Ignored a replicated change of another type.");
        return Ok(false);
    }
    if *obj == before {
        return Ok(false);
    }
    persist_delta(tx, journal, name, obj, delta)?;
    staged.dirty.objects.insert(name.to_owned());
    Ok(true)
}

/// Last-writer-wins upsert; returns whether the row changed.
/// The read-modify-write of [`Store::kv_increment`], inside the batch's transaction (which
/// sees the batch's earlier writes).
fn kv_increment(
    tx: &rusqlite::Transaction<'_>,
    shared: &Shared,
    clock: &mut HlcClock,
    staged: &mut Staged,
    ns: &str,
    key: &str,
    delta: u64,
) -> Result<u64, StoreError> {
    let current: Option<Vec<u8>> = tx
        .prepare_cached(
            "SELECT value FROM kv WHERE ns = ?1 AND key = ?2 AND value IS NOT NULL
               AND (expires_ms IS NULL OR expires_ms > ?3)",
        )?
        .query_row(params![ns, key, now_ms() as i64], |r| r.get(0))
        .optional()?;
    let current = match current {
        None => 0,
        Some(v) => std::str::from_utf8(&v)
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok())
            .ok_or_else(|| {
                StoreError::Invalid(format!(
                    "the value of `{key}` is not a decimal counter; increment only keys that hold one"
                ))
            })?,
    };
    let value = current.checked_add(delta).ok_or_else(|| {
        StoreError::Invalid(format!(
            "counter `{key}` would overflow a 64-bit unsigned value"
        ))
    })?;
    let stamp = clock.now(now_ms());
    let w = KvWrite {
        ns: ns.to_owned(),
        key: key.to_owned(),
        value: Some(value.to_string().into_bytes()),
        content_type: None,
        expires_ms: None,
        stamp,
    };
    if !kv_upsert(tx, &w)? {
        // The stored value carries a stamp ahead of this node's clock (a replica whose clock
        // runs ahead, see `HlcClock::observe`): the increment would not stick.
        return Err(StoreError::Invalid(format!(
            "counter `{key}` holds a value stamped ahead of this node's clock; check the nodes' clocks (NTP)"
        )));
    }
    if shared.options.replicate {
        log_change(tx, &Change::Kv(w.clone()))?;
        staged.logged = true;
    }
    staged.last_stamp = Some(stamp);
    staged.dirty.kv_buckets.insert(kv_bucket(ns, key));
    Ok(value)
}

fn kv_upsert(tx: &rusqlite::Transaction<'_>, w: &KvWrite) -> Result<bool, StoreError> {
    let n = tx
        .prepare_cached(
            "INSERT INTO kv (ns, key, value, content_type, expires_ms, stamp, stamp_ms, bucket)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)
             ON CONFLICT (ns, key) DO UPDATE SET
                value = excluded.value, content_type = excluded.content_type,
                expires_ms = excluded.expires_ms, stamp = excluded.stamp,
                stamp_ms = excluded.stamp_ms
             WHERE excluded.stamp > kv.stamp",
        )?
        .execute(params![
            w.ns,
            w.key,
            w.value,
            w.content_type,
            w.expires_ms.map(|e| e as i64),
            stamp_bytes(&w.stamp).to_vec(),
            w.stamp.wall_ms as i64,
            i64::from(kv_bucket(&w.ns, &w.key)),
        ])?;
    Ok(n > 0)
}

fn log_change(tx: &rusqlite::Transaction<'_>, change: &Change) -> Result<(), StoreError> {
    tx.prepare_cached("INSERT INTO replication_log (change) VALUES (?1)")?
        .execute(params![change.encode()])?;
    Ok(())
}

#[cfg(test)]
mod tests;
