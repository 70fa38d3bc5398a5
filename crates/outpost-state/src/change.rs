//! The unit of replication: what one node's write looks like to every other node.
//!
//! A KV write carries its hybrid-logical-clock stamp (last writer wins, deterministically); a
//! CRDT change carries a delta, which is itself a state of the same type, so applying it any
//! number of times, in any order, converges. Full states travel the same way (anti-entropy).

use serde::{Deserialize, Serialize};

use crate::StoreError;
use crate::crdt::{Crdt, Hlc, ReplicaId};

/// One replicated change.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Change {
    /// A KV put, delete or (in snapshots) tombstone.
    Kv(KvWrite),
    /// A CRDT delta or full state for the named object.
    Crdt {
        /// Object name (unique across CRDT types).
        name: String,
        /// The delta (or full state) to merge.
        delta: Crdt,
    },
}

/// A KV write as it is stored and replicated; the newest stamp wins everywhere.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct KvWrite {
    /// Namespace, so applications and functions do not collide.
    pub ns: String,
    /// Key within the namespace.
    pub key: String,
    /// The value; `None` is a delete (a tombstone, kept so an older write cannot resurrect it).
    #[serde(with = "serde_bytes")]
    pub value: Option<Vec<u8>>,
    /// Media type given at put time, returned on get.
    pub content_type: Option<String>,
    /// Absolute expiry (Unix ms); every node expires the key at the same moment.
    pub expires_ms: Option<u64>,
    /// Who wrote it when, in HLC order.
    pub stamp: Hlc,
}

/// One message on the wire: a run of changes from one replica.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Batch {
    /// The replica whose store produced the changes (receivers skip their own).
    pub origin: ReplicaId,
    /// The changes, oldest first.
    pub changes: Vec<Change>,
}

impl Change {
    /// Compact binary form (postcard) for the replication log and the wire.
    pub fn encode(&self) -> Vec<u8> {
        postcard::to_allocvec(self).unwrap_or_default()
    }

    /// Reads what [`Change::encode`] wrote.
    pub fn decode(bytes: &[u8]) -> Result<Change, StoreError> {
        postcard::from_bytes(bytes).map_err(|e| StoreError::Decode(e.to_string()))
    }
}

impl Batch {
    /// Compact binary form (postcard) for one NATS message.
    pub fn encode(&self) -> Vec<u8> {
        postcard::to_allocvec(self).unwrap_or_default()
    }

    /// Reads what [`Batch::encode`] wrote; a foreign or damaged message is an error, not a panic.
    pub fn decode(bytes: &[u8]) -> Result<Batch, StoreError> {
        postcard::from_bytes(bytes).map_err(|e| StoreError::Decode(e.to_string()))
    }
}

/// The 20-byte form of a stamp whose byte order is its HLC order (SQLite compares BLOBs with
/// memcmp, so `WHERE excluded.stamp > kv.stamp` is last-writer-wins).
pub fn stamp_bytes(stamp: &Hlc) -> [u8; 20] {
    let mut out = [0u8; 20];
    out[..8].copy_from_slice(&stamp.wall_ms.to_be_bytes());
    out[8..12].copy_from_slice(&stamp.logical.to_be_bytes());
    out[12..].copy_from_slice(&stamp.replica.0.to_be_bytes());
    out
}

/// Reads [`stamp_bytes`] back.
pub fn stamp_from_bytes(bytes: &[u8]) -> Option<Hlc> {
    let wall = u64::from_be_bytes(bytes.get(..8)?.try_into().ok()?);
    let logical = u32::from_be_bytes(bytes.get(8..12)?.try_into().ok()?);
    let replica = u64::from_be_bytes(bytes.get(12..20)?.try_into().ok()?);
    Some(Hlc {
        wall_ms: wall,
        logical,
        replica: ReplicaId(replica),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamp_bytes_sort_like_stamps() {
        let a = Hlc {
            wall_ms: 5,
            logical: 9,
            replica: ReplicaId(3),
        };
        let b = Hlc {
            wall_ms: 6,
            logical: 0,
            replica: ReplicaId(1),
        };
        let c = Hlc {
            wall_ms: 6,
            logical: 0,
            replica: ReplicaId(2),
        };
        assert!(a < b && b < c);
        assert!(stamp_bytes(&a) < stamp_bytes(&b));
        assert!(stamp_bytes(&b) < stamp_bytes(&c));
        assert_eq!(stamp_from_bytes(&stamp_bytes(&c)), Some(c));
    }

    #[test]
    fn garbage_is_a_decode_error() {
        assert!(Batch::decode(&[0xff, 0xff, 0xff]).is_err());
        assert!(Change::decode(&[]).is_err());
    }
}
