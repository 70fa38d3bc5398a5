//! The fleet's JetStream streams: names, subjects and settings in one place.
//!
//! The Python helper in `python/outpost-fastapi` creates `OUTPOST_INVALIDATIONS` with the same
//! settings; keep the two in step.

use std::time::Duration;

use async_nats::jetstream::stream::{Config, DiscardPolicy, RetentionPolicy, StorageType};

/// Every node's deltas and KV writes; retention-limited (`[fleet] delta_retention`).
pub const DELTAS: &str = "OUTPOST_DELTAS";
/// Each replica's latest full state per object (one message per subject): anti-entropy.
pub const SNAPSHOTS: &str = "OUTPOST_SNAPSHOTS";
/// The center's cache invalidations.
pub const INVALIDATIONS: &str = "OUTPOST_INVALIDATIONS";
/// Subject the center publishes invalidations on.
pub const INVALIDATE_SUBJECT: &str = "outpost.invalidate";

/// Subject of a replica's deltas.
pub fn delta_subject(replica: &str) -> String {
    format!("outpost.delta.{replica}")
}

/// Subject of a replica's full state of one CRDT object (name hex-encoded: any name is a
/// valid subject token that way).
pub fn object_snapshot_subject(replica: &str, name: &str) -> String {
    let mut hex = String::with_capacity(name.len() * 2);
    for b in name.bytes() {
        hex.push_str(&format!("{b:02x}"));
    }
    format!("outpost.snap.{replica}.o.{hex}")
}

/// Subject of a replica's full state of one KV bucket.
pub fn kv_snapshot_subject(replica: &str, bucket: u16) -> String {
    format!("outpost.snap.{replica}.kv.{bucket}")
}

/// Settings of the delta stream.
pub fn deltas(retention: Duration, replicas: usize) -> Config {
    Config {
        name: DELTAS.into(),
        description: Some("Outpost: CRDT deltas and KV writes of every node".into()),
        subjects: vec!["outpost.delta.>".into()],
        retention: RetentionPolicy::Limits,
        discard: DiscardPolicy::Old,
        storage: StorageType::File,
        max_age: retention,
        num_replicas: replicas,
        duplicate_window: Duration::from_secs(120),
        ..Default::default()
    }
}

/// Settings of the snapshot stream: only the newest message per subject is kept.
pub fn snapshots(replicas: usize) -> Config {
    Config {
        name: SNAPSHOTS.into(),
        description: Some("Outpost: latest full state per replica and object".into()),
        subjects: vec!["outpost.snap.>".into()],
        retention: RetentionPolicy::Limits,
        discard: DiscardPolicy::Old,
        storage: StorageType::File,
        max_messages_per_subject: 1,
        num_replicas: replicas,
        ..Default::default()
    }
}

/// Settings of the invalidation stream (must equal the Python helper's).
pub fn invalidations(replicas: usize) -> Config {
    Config {
        name: INVALIDATIONS.into(),
        description: None,
        subjects: vec![INVALIDATE_SUBJECT.into()],
        retention: RetentionPolicy::Limits,
        discard: DiscardPolicy::Old,
        storage: StorageType::File,
        max_age: Duration::from_secs(24 * 3600),
        num_replicas: replicas,
        duplicate_window: Duration::from_secs(120),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn any_object_name_makes_a_valid_subject() {
        let s = object_snapshot_subject("00ff", "a.b *>c");
        assert_eq!(s, "outpost.snap.00ff.o.612e62202a3e63");
        assert!(!s.contains(' ') && !s.contains('*') && !s.contains('>'));
    }
}
