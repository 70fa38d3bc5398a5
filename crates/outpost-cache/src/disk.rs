//! The disk tier: one file per primary key under `disk_dir`, bounded in bytes.
//!
//! Writes go to one background thread (write to a temp file, then rename, so a crash leaves
//! either the old file or the new one); requests never wait for them. Reads happen on Tokio's
//! blocking pool. Every file carries CRC-32s of its meta and body sections: a torn, truncated
//! or foreign file is detected, deleted and counted, never served. At start-up the directory
//! is scanned (meta sections only) to rebuild the size-bounded index, so the tier survives
//! restarts.

use std::fs;
use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex, Weak};

use moka::notification::RemovalCause;
use outpost_telemetry::metrics::CacheTierMetrics;

use crate::key::CacheKey;
use crate::object::{self, Object};
use crate::store::{Index, lock};

/// Disk writes queued beyond this are dropped (the memory tier still has the object).
const QUEUE: usize = 4096;

/// Why the disk tier could not open.
#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    /// The directory cannot be created or read.
    #[error("cannot use cache directory {path}: {source}; check that it exists and is writable")]
    Dir {
        /// The directory.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
}

enum Op {
    Write(Arc<str>, Vec<Arc<Object>>),
    Remove(Arc<str>),
    Flush(SyncSender<()>),
}

/// The disk tier.
pub struct Disk {
    dir: PathBuf,
    /// Size-bounded map of what is on disk; evicting an entry deletes its file.
    files: moka::sync::Cache<Arc<str>, u32>,
    queue: SyncSender<Op>,
    startup: Mutex<Vec<(CacheKey, Vec<Arc<str>>)>>,
    index: Arc<Mutex<Option<Weak<Mutex<Index>>>>>,
    metrics: CacheTierMetrics,
    corrupt: CorruptCounter,
}

/// Counts dropped corrupt files (the `outpost_cache_purges_total{kind="corrupt"}` metric).
pub type CorruptCounter = Arc<dyn Fn() + Send + Sync>;

impl std::fmt::Debug for Disk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Disk").field("dir", &self.dir).finish()
    }
}

fn file_name(dir: &Path, key: &str) -> PathBuf {
    let h = xxhash_rust::xxh3::xxh3_128(key.as_bytes());
    let hex = format!("{h:032x}");
    dir.join(&hex[..2]).join(format!("{hex}.oc"))
}

impl Disk {
    /// Opens (creating if needed) the tier in `dir`, bounded to `max_bytes`, and scans what a
    /// previous run left there.
    pub fn open(
        dir: &Path,
        max_bytes: u64,
        metrics: CacheTierMetrics,
        corrupt: CorruptCounter,
    ) -> Result<Disk, DiskError> {
        let err = |source| DiskError::Dir {
            path: dir.to_path_buf(),
            source,
        };
        fs::create_dir_all(dir).map_err(err)?;
        let index: Arc<Mutex<Option<Weak<Mutex<Index>>>>> = Arc::new(Mutex::new(None));
        let listener_dir = dir.to_path_buf();
        let listener_index = index.clone();
        let m = metrics.clone();
        let files = moka::sync::Cache::builder()
            .max_capacity(max_bytes)
            .weigher(|_k: &Arc<str>, size: &u32| *size)
            .eviction_listener(move |key: Arc<Arc<str>>, size: u32, cause| {
                m.bytes.dec_by(i64::from(size));
                m.objects.dec();
                if matches!(cause, RemovalCause::Size | RemovalCause::Expired) {
                    m.evictions.inc();
                    let _ = fs::remove_file(file_name(&listener_dir, &key));
                    let idx = listener_index
                        .lock()
                        .ok()
                        .and_then(|g| g.as_ref().and_then(Weak::upgrade));
                    if let Some(idx) = idx {
                        lock(&idx).remove(&key);
                    }
                }
            })
            .build();

        let mut startup = Vec::new();
        let entries = fs::read_dir(dir).map_err(err)?;
        for sub in entries.flatten() {
            let Ok(inner) = fs::read_dir(sub.path()) else {
                continue;
            };
            for f in inner.flatten() {
                let path = f.path();
                if path.extension().is_some_and(|e| e == "oc") {
                    match scan(&path) {
                        Ok((variants, size)) => {
                            let Some(first) = variants.first() else {
                                let _ = fs::remove_file(&path);
                                continue;
                            };
                            let key = first.key.clone();
                            let mut tags: Vec<Arc<str>> = Vec::new();
                            for v in &variants {
                                tags.extend(v.tags.iter().cloned());
                            }
                            metrics.bytes.inc_by(i64::from(size));
                            metrics.objects.inc();
                            files.insert(key.shared(), size);
                            startup.push((key, tags));
                        }
                        Err(e) => {
                            tracing::warn!(file = %path.display(), error = %e, "Dropped a corrupt cache file.");
                            corrupt();
                            let _ = fs::remove_file(&path);
                        }
                    }
                } else {
                    // Temp files of writes a crash interrupted.
                    let _ = fs::remove_file(&path);
                }
            }
        }
        files.run_pending_tasks();
        let (queue, rx) = std::sync::mpsc::sync_channel(QUEUE);
        let writer = Writer {
            dir: dir.to_path_buf(),
            files: files.clone(),
            metrics: metrics.clone(),
        };
        std::thread::Builder::new()
            .name("outpost-cache-disk".into())
            .spawn(move || writer.run(rx))
            .map_err(err)?;
        Ok(Disk {
            dir: dir.to_path_buf(),
            files,
            queue,
            startup: Mutex::new(startup),
            index,
            metrics,
            corrupt,
        })
    }

    /// The entries found at start-up, for the purge index (taken once).
    pub fn take_startup_index(&self) -> Vec<(CacheKey, Vec<Arc<str>>)> {
        std::mem::take(&mut *self.startup.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// Lets evictions update the shared purge index.
    pub fn set_index(&self, index: Weak<Mutex<Index>>) {
        *self.index.lock().unwrap_or_else(|p| p.into_inner()) = Some(index);
    }

    /// Whether the tier holds `key`.
    pub fn contains(&self, key: &str) -> bool {
        self.files.contains_key(key)
    }

    /// Reads and verifies the entry for `key` (blocking I/O). A corrupt file is deleted.
    pub fn read(&self, key: &str) -> Option<Vec<Object>> {
        let path = file_name(&self.dir, key);
        let bytes = match fs::read(&path) {
            Ok(b) => b,
            Err(_) => {
                self.files.invalidate(key);
                return None;
            }
        };
        let decoded = object::decode_prefix(&bytes).and_then(|(meta_len, ..)| {
            let meta_end = object::PREFIX_LEN + meta_len;
            if bytes.len() < meta_end {
                return Err(object::DecodeError::Malformed("truncated"));
            }
            object::decode(
                &bytes,
                &bytes[object::PREFIX_LEN..meta_end],
                Some(&bytes[meta_end..]),
            )
        });
        match decoded {
            Ok(v) if v.first().is_some_and(|o| o.key.as_str() == key) => Some(v),
            Ok(_) => None,
            Err(e) => {
                tracing::warn!(file = %path.display(), error = %e, "Dropped a corrupt cache file.");
                (self.corrupt)();
                self.remove(key.into());
                None
            }
        }
    }

    /// Queues a write of the entry; dropped when the queue is full.
    pub fn write(&self, key: Arc<str>, variants: Vec<Arc<Object>>) {
        if let Err(TrySendError::Full(_)) = self.queue.try_send(Op::Write(key, variants)) {
            tracing::debug!("Cache disk queue full; write skipped.");
        }
    }

    /// Queues a removal.
    pub fn remove(&self, key: Arc<str>) {
        // Removals must not be lost: block briefly rather than drop.
        let _ = self.queue.send(Op::Remove(key));
    }

    /// Waits until every queued operation is done.
    pub fn flush(&self) {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        if self.queue.send(Op::Flush(tx)).is_ok() {
            let _ = rx.recv();
        }
    }

    /// Runs the index's pending maintenance.
    pub fn settle(&self) {
        self.files.run_pending_tasks();
    }

    /// Bytes the tier accounts for.
    pub fn bytes(&self) -> u64 {
        self.files.weighted_size()
    }

    /// The tier's metrics.
    pub fn metrics(&self) -> &CacheTierMetrics {
        &self.metrics
    }
}

/// Reads a file's prefix and meta (not the body) for the start-up scan.
fn scan(path: &Path) -> Result<(Vec<Object>, u32), Box<dyn std::error::Error>> {
    let mut f = fs::File::open(path)?;
    let size = f.metadata()?.len();
    let mut prefix = [0u8; object::PREFIX_LEN];
    f.read_exact(&mut prefix)?;
    let (meta_len, _, body_len, _) = object::decode_prefix(&prefix)?;
    if (object::PREFIX_LEN + meta_len) as u64 + body_len != size {
        return Err("file size does not match its header".into());
    }
    let mut meta = vec![0u8; meta_len];
    f.read_exact(&mut meta)?;
    let objects = object::decode(&prefix, &meta, None)?;
    Ok((objects, u32::try_from(size).unwrap_or(u32::MAX)))
}

struct Writer {
    dir: PathBuf,
    files: moka::sync::Cache<Arc<str>, u32>,
    metrics: CacheTierMetrics,
}

impl Writer {
    fn run(self, rx: Receiver<Op>) {
        while let Ok(op) = rx.recv() {
            match op {
                Op::Write(key, variants) => {
                    if let Err(e) = self.write(&key, &variants) {
                        tracing::warn!(error = %e, "Cache disk write failed.");
                    }
                }
                Op::Remove(key) => {
                    let _ = fs::remove_file(file_name(&self.dir, &key));
                    if let Some(size) = self.files.remove(&key) {
                        // `remove` reports `Explicit` to the listener, which leaves files alone.
                        let _ = size;
                    }
                }
                Op::Flush(done) => {
                    self.files.run_pending_tasks();
                    let _ = done.send(());
                }
            }
        }
    }

    fn write(&self, key: &Arc<str>, variants: &[Arc<Object>]) -> std::io::Result<()> {
        let path = file_name(&self.dir, key);
        if let Some(parent) = path.parent() {
            fs::create_dir_all(parent)?;
        }
        let bytes = object::encode(variants);
        let tmp = path.with_extension("tmp");
        fs::write(&tmp, &bytes)?;
        fs::rename(&tmp, &path)?;
        let size = u32::try_from(bytes.len()).unwrap_or(u32::MAX);
        self.metrics.bytes.inc_by(i64::from(size));
        self.metrics.objects.inc();
        self.files.insert(key.clone(), size);
        Ok(())
    }
}
