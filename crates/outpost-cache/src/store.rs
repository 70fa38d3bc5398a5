//! Storage: a byte-bounded memory tier (moka, TinyLFU admission), an optional disk tier
//! ([`crate::disk`]), and the purge index over both (URL → keys, tag → keys).
//!
//! The unit of storage is an [`Entry`]: every stored variant of one primary key. Entries are
//! immutable and replaced whole, so readers never lock.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};

use moka::notification::RemovalCause;
use outpost_telemetry::metrics::CacheTierMetrics;

use crate::disk::Disk;
use crate::key::CacheKey;
use crate::object::Object;

/// Most variants kept per primary key; the oldest goes first (a `Vary` on a high-cardinality
/// header must not grow one key without bound).
pub const MAX_VARIANTS: usize = 16;

/// Every stored variant of one primary key, most recent first.
#[derive(Debug, Clone, Default)]
pub struct Entry {
    /// The variants.
    pub variants: Vec<Arc<Object>>,
}

impl Entry {
    fn weight(&self) -> u32 {
        let w: usize = self.variants.iter().map(|o| o.weight()).sum();
        u32::try_from(w).unwrap_or(u32::MAX)
    }
}

/// URL and tag lookups for purges and invalidations; covers both tiers.
#[derive(Debug, Default)]
pub struct Index {
    by_url: BTreeMap<Arc<str>, HashSet<Arc<str>>>,
    by_tag: HashMap<Arc<str>, HashSet<Arc<str>>>,
    of_key: HashMap<Arc<str>, Indexed>,
}

/// What the index knows of one key: its URL and its tags.
type Indexed = (Arc<str>, Vec<Arc<str>>);

impl Index {
    /// Records that `key` (whose URL part is `url`) is stored with `tags`.
    pub fn add(&mut self, key: &CacheKey, tags: &[Arc<str>]) {
        let k = key.shared();
        let url: Arc<str> = key.url().into();
        self.by_url
            .entry(url.clone())
            .or_default()
            .insert(k.clone());
        let known = &mut self.of_key.entry(k.clone()).or_insert((url, Vec::new())).1;
        for t in tags {
            if !known.contains(t) {
                known.push(t.clone());
                self.by_tag.entry(t.clone()).or_default().insert(k.clone());
            }
        }
    }

    /// Forgets `key`.
    pub fn remove(&mut self, key: &str) {
        let Some((url, tags)) = self.of_key.remove(key) else {
            return;
        };
        if let Some(set) = self.by_url.get_mut(&url) {
            set.remove(key);
            if set.is_empty() {
                self.by_url.remove(&url);
            }
        }
        for t in tags {
            if let Some(set) = self.by_tag.get_mut(&t) {
                set.remove(key);
                if set.is_empty() {
                    self.by_tag.remove(&t);
                }
            }
        }
    }

    /// Keys stored for exactly this URL (`host/path?query`).
    pub fn keys_for_url(&self, url: &str) -> Vec<Arc<str>> {
        self.by_url
            .get(url)
            .map(|s| s.iter().cloned().collect())
            .unwrap_or_default()
    }

    /// Keys whose URL starts with `prefix`; a prefix starting with `/` matches paths on every
    /// host.
    pub fn keys_for_prefix(&self, prefix: &str) -> Vec<Arc<str>> {
        if prefix.starts_with('/') {
            return self
                .by_url
                .iter()
                .filter(|(url, _)| url.find('/').is_some_and(|i| url[i..].starts_with(prefix)))
                .flat_map(|(_, keys)| keys.iter().cloned())
                .collect();
        }
        self.by_url
            .range::<str, _>((
                std::ops::Bound::Included(prefix),
                std::ops::Bound::Unbounded,
            ))
            .take_while(|(url, _)| url.starts_with(prefix))
            .flat_map(|(_, keys)| keys.iter().cloned())
            .collect()
    }

    /// Keys tagged `tag`.
    pub fn keys_for_tag(&self, tag: &str) -> Vec<Arc<str>> {
        self.by_tag
            .get(tag)
            .map(|s| s.iter().cloned().collect())
            .unwrap_or_default()
    }

    /// Number of keys indexed.
    pub fn len(&self) -> usize {
        self.of_key.len()
    }

    /// Whether nothing is indexed.
    pub fn is_empty(&self) -> bool {
        self.of_key.is_empty()
    }
}

/// Both tiers and the index.
pub struct Store {
    memory: moka::sync::Cache<Arc<str>, Arc<Entry>>,
    disk: Option<Arc<Disk>>,
    index: Arc<Mutex<Index>>,
    /// Gauges of the memory tier; they move in `put` and in the eviction listener.
    metrics: CacheTierMetrics,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("memory_entries", &self.memory.entry_count())
            .field("disk", &self.disk.is_some())
            .finish()
    }
}

pub(crate) fn lock(index: &Mutex<Index>) -> MutexGuard<'_, Index> {
    index
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Store {
    /// A store with `memory_bytes` of memory and an optional disk tier (already opened; its
    /// surviving entries are indexed here).
    pub fn new(memory_bytes: u64, disk: Option<Disk>, metrics: CacheTierMetrics) -> Store {
        let index = Arc::new(Mutex::new(Index::default()));
        let disk = disk.map(Arc::new);
        if let Some(d) = &disk {
            let mut idx = lock(&index);
            for (key, tags) in d.take_startup_index() {
                idx.add(&key, &tags);
            }
            drop(idx);
            d.set_index(Arc::downgrade(&index));
        }
        let listener_index = index.clone();
        let listener_disk = disk.clone();
        let m = metrics.clone();
        let memory = moka::sync::Cache::builder()
            .max_capacity(memory_bytes)
            .weigher(|_k: &Arc<str>, v: &Arc<Entry>| v.weight())
            .eviction_listener(move |key: Arc<Arc<str>>, value: Arc<Entry>, cause| {
                m.bytes.dec_by(i64::from(value.weight()));
                m.objects.dec();
                match cause {
                    RemovalCause::Size => {
                        m.evictions.inc();
                    }
                    RemovalCause::Replaced | RemovalCause::Explicit => return,
                    RemovalCause::Expired => {}
                }
                let on_disk = listener_disk.as_ref().is_some_and(|d| d.contains(&key));
                if !on_disk {
                    lock(&listener_index).remove(&key);
                }
            })
            .build();
        Store {
            memory,
            disk,
            index,
            metrics,
        }
    }

    /// The entry for `key` if the memory tier has it (no I/O).
    pub fn get_memory(&self, key: &str) -> Option<Arc<Entry>> {
        self.memory.get(key)
    }

    /// The entry for `key` from memory, else from disk (then promoted to memory).
    pub async fn get(&self, key: &CacheKey) -> Option<Arc<Entry>> {
        if let Some(e) = self.memory.get(key.as_str()) {
            return Some(e);
        }
        let disk = self.disk.clone()?;
        if !disk.contains(key.as_str()) {
            return None;
        }
        let k = key.shared();
        let variants = tokio::task::spawn_blocking(move || disk.read(&k))
            .await
            .ok()
            .flatten()?;
        let entry = Arc::new(Entry {
            variants: variants.into_iter().map(Arc::new).collect(),
        });
        self.put_memory(key.shared(), entry.clone());
        Some(entry)
    }

    fn put_memory(&self, key: Arc<str>, entry: Arc<Entry>) {
        self.metrics.bytes.inc_by(i64::from(entry.weight()));
        self.metrics.objects.inc();
        self.memory.insert(key, entry);
    }

    /// Stores `object`, replacing the variant with the same secondary key.
    pub fn put(&self, object: Object) {
        let object = Arc::new(object);
        let key = object.key.shared();
        let mut variants = vec![object.clone()];
        if let Some(old) = self.memory.get(&key) {
            variants.extend(
                old.variants
                    .iter()
                    .filter(|v| !v.same_variant(&object))
                    .take(MAX_VARIANTS - 1)
                    .cloned(),
            );
        }
        lock(&self.index).add(&object.key, &object.tags);
        let entry = Arc::new(Entry { variants });
        if let Some(d) = &self.disk {
            d.write(key.clone(), entry.variants.clone());
        }
        self.put_memory(key, entry);
    }

    /// Replaces a whole entry (soft purge).
    pub fn replace(&self, key: Arc<str>, entry: Entry) {
        let entry = Arc::new(entry);
        if let Some(d) = &self.disk {
            d.write(key.clone(), entry.variants.clone());
        }
        self.put_memory(key, entry);
    }

    /// Removes one variant (a revalidation said it is gone or no longer storable).
    pub fn remove_variant(&self, object: &Object) {
        let key = object.key.shared();
        let Some(old) = self.memory.get(&key) else {
            self.remove(&key);
            return;
        };
        let rest: Vec<_> = old
            .variants
            .iter()
            .filter(|v| !v.same_variant(object))
            .cloned()
            .collect();
        if rest.is_empty() {
            self.remove(&key);
        } else {
            self.replace(key, Entry { variants: rest });
        }
    }

    /// Removes every variant of `key` from both tiers and the index.
    pub fn remove(&self, key: &str) {
        self.memory.invalidate(key);
        if let Some(d) = &self.disk {
            d.remove(key.into());
        }
        lock(&self.index).remove(key);
    }

    /// The purge index.
    pub fn index(&self) -> MutexGuard<'_, Index> {
        lock(&self.index)
    }

    /// Runs moka's pending maintenance (tests and metrics want settled counts).
    pub fn settle(&self) {
        self.memory.run_pending_tasks();
        if let Some(d) = &self.disk {
            d.settle();
        }
    }

    /// Waits until queued disk writes are on disk (tests, shutdown).
    pub fn flush(&self) {
        if let Some(d) = &self.disk {
            d.flush();
        }
    }

    /// Entries in the memory tier.
    pub fn memory_entries(&self) -> u64 {
        self.memory.entry_count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderMap;

    fn key(url: &str) -> CacheKey {
        let (host, path) = url.split_at(url.find('/').unwrap_or(url.len()));
        CacheKey::new(
            &crate::key::KeyPolicy::default(),
            host,
            path,
            &HeaderMap::new(),
        )
    }

    #[test]
    fn index_finds_by_url_prefix_and_tag() {
        let mut idx = Index::default();
        idx.add(&key("a.com/p/1"), &["t".into()]);
        idx.add(&key("a.com/p/2?x=1"), &["t".into(), "u".into()]);
        idx.add(&key("b.com/p/1"), &[]);
        idx.add(&key("a.com/q"), &[]);
        assert_eq!(idx.keys_for_url("a.com/p/1").len(), 1);
        assert_eq!(idx.keys_for_prefix("a.com/p/").len(), 2);
        assert_eq!(idx.keys_for_prefix("/p/").len(), 3);
        assert_eq!(idx.keys_for_prefix("a.com/").len(), 3);
        assert_eq!(idx.keys_for_tag("t").len(), 2);
        idx.remove("a.com/p/2?x=1");
        assert_eq!(idx.keys_for_tag("t").len(), 1);
        assert!(idx.keys_for_tag("u").is_empty());
        assert_eq!(idx.len(), 3);
    }
}
