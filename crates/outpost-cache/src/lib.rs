//! Outpost's edge HTTP cache: a shared cache by RFC 9111, with RFC 5861 stale serving,
//! request coalescing, a memory and a disk tier, and purge by URL, prefix and tag.
//!
//! # Layout (in the order a cached request meets them)
//! - [`engine`]: the cache stage. [`Cache::handle`] answers a GET/HEAD from storage, revalidates
//!   or fetches through an [`Upstream`] (the proxy's origin stage) and stores.
//! - [`key`]: primary keys (host, path, normalised query, chosen headers and cookies) and
//!   `Vary` secondary keys.
//! - [`directives`]: `Cache-Control` parsing for requests and responses, HTTP dates.
//! - [`policy`]: the RFC 9111 rules as pure functions of headers and time: storability,
//!   freshness lifetime, age, and whether a stored response may be reused.
//! - [`object`]: a stored response; serving it (Age, 304s), freshening it from a 304, and its
//!   checksummed disk format.
//! - [`store`] and [`disk`]: the memory tier (moka, TinyLFU, bounded in bytes), the disk tier
//!   (bounded, survives restarts, drops corrupt files) and the purge index.
//! - [`body`]: streaming the origin's body to the client while keeping the copy to store.
//! - [`status`]: [`CacheOutcome`] (metric label) and the RFC 9211 `Cache-Status` field.
//!
//! Where it sits: the proxy's handler calls [`Cache::handle`] for GET/HEAD on routes with a
//! `[routes.cache]` section and [`Cache::invalidate`] after unsafe methods succeed; the admin
//! API calls [`Cache::purge`].

pub mod body;
pub mod directives;
pub mod disk;
pub mod engine;
pub mod key;
pub mod object;
pub mod policy;
pub mod status;
pub mod store;

pub use engine::{
    CACHE_STATUS, Cache, CacheRequest, Clock, Handled, PurgeTarget, StorageConfig, Upstream,
};
pub use key::KeyPolicy;
pub use policy::RoutePolicy;
pub use status::{CacheOutcome, CacheStatus};
