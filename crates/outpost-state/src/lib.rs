//! Outpost's edge state: what a node remembers, and how it agrees with the rest of the fleet.
//!
//! # Layout
//! - [`store`]: the node's SQLite file (WAL, `synchronous = FULL`), one writer thread doing group
//!   commits, pooled readers; KV with TTL and tombstones; CRDT objects kept in memory and
//!   journaled as deltas; the replication log the fleet drains.
//! - [`crdt`]: delta-state CRDTs (G-Counter, PN-Counter, OR-Set with dots and a causal context,
//!   LWW register and map on hybrid logical clocks). Pure data, property-tested.
//! - [`change`]: the unit of replication (a KV write or a CRDT delta) and its wire form.
//! - [`outbox`]: writes kept (fsync'd) until the center takes them, settled per entry.
//! - [`schema`]: opening the file, telling ours from foreign or damaged files, migrations.
//! - [`analytics`]: edge analytics in a file of its own (`analytics.db`, WAL, `synchronous =
//!   NORMAL`): raw events, per-window summaries for the center, counts queries, retention.
//!
//! Nothing here knows about NATS: `outpost-fleet` moves [`change::Batch`]es between stores.

pub mod analytics;
pub mod change;
pub mod crdt;
mod error;
pub mod outbox;
pub mod schema;
pub mod store;

pub use change::{Batch, Change, KvWrite};
pub use error::StoreError;
pub use store::{Dirty, KvCondition, KvEntry, KvListed, Op, Store, StoreOptions, SweepStats};
