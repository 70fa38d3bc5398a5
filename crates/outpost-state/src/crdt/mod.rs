//! Delta-state CRDTs (Almeida et al., "Delta State Replicated Data Types"): the pure data types
//! under Outpost's replicated state, with no I/O.
//!
//! Every operation mutates the local state and returns a *delta*, a small value of the same type
//! that the replication log ships to peers. Deltas and full states merge through the same
//! `merge`, which is commutative, associative and idempotent, so replicas converge whatever the
//! delivery order, duplication or loss (a lost delta is repaired by merging full states later).
//!
//! Layout:
//! - [`clock`]: [`ReplicaId`], [`Dot`], [`CausalContext`], hybrid logical clocks ([`Hlc`]).
//! - [`counter`]: [`GCounter`], [`PNCounter`].
//! - [`orset`]: [`ORSet`], an add-wins set without tombstones.
//! - [`lww`]: [`LwwRegister`], [`LwwMap`], last-writer-wins by HLC stamp.
//! - this module: [`Crdt`], the type-erased value the store persists and ships, and [`Kind`].

pub mod clock;
pub mod counter;
pub mod lww;
pub mod orset;

#[cfg(test)]
mod tests;

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

pub use clock::{
    CausalContext, ClockDrift, DEFAULT_MAX_DRIFT_MS, Dot, Hlc, HlcClock, ParseReplicaIdError,
    ReplicaId,
};
pub use counter::{GCounter, PNCounter};
pub use lww::{LwwMap, LwwRegister};
pub use orset::ORSet;

/// Which CRDT a value is; the `as_str()` names are used in the API, logs and metric labels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Kind {
    /// [`GCounter`].
    #[serde(rename = "gcounter")]
    GCounter,
    /// [`PNCounter`].
    #[serde(rename = "pncounter")]
    PNCounter,
    /// [`ORSet`].
    #[serde(rename = "orset")]
    ORSet,
    /// [`LwwRegister`].
    #[serde(rename = "register")]
    LwwRegister,
    /// [`LwwMap`].
    #[serde(rename = "map")]
    LwwMap,
}

impl Kind {
    /// Every kind, for help texts and exhaustive tests.
    pub const ALL: [Kind; 5] = [
        Kind::GCounter,
        Kind::PNCounter,
        Kind::ORSet,
        Kind::LwwRegister,
        Kind::LwwMap,
    ];

    /// The kind's name: one source of truth for API paths, logs and metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::GCounter => "gcounter",
            Kind::PNCounter => "pncounter",
            Kind::ORSet => "orset",
            Kind::LwwRegister => "register",
            Kind::LwwMap => "map",
        }
    }

    /// "a"/"an" for messages that name the kind.
    fn article(self) -> &'static str {
        match self {
            Kind::ORSet => "an",
            _ => "a",
        }
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A name that is not one of [`Kind::as_str`]'s.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown CRDT kind {0:?} (expected one of: gcounter, pncounter, orset, register, map)")]
pub struct UnknownKind(pub String);

impl FromStr for Kind {
    type Err = UnknownKind;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Kind::ALL
            .into_iter()
            .find(|k| k.as_str() == s)
            .ok_or_else(|| UnknownKind(s.to_owned()))
    }
}

/// Two CRDTs of different kinds cannot merge: a client or peer named the wrong type for a key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error(
    "cannot merge {} {} delta into {} {}",
    .from.article(), .from, .into.article(), .into
)]
pub struct KindMismatch {
    /// The kind of the stored value.
    pub into: Kind,
    /// The kind of the incoming state or delta.
    pub from: Kind,
}

/// Bytes that are not an encoded [`Crdt`] (corruption, or a peer speaking another format).
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    /// postcard could not decode a `Crdt`.
    #[error("malformed CRDT encoding: {0}")]
    Malformed(#[from] postcard::Error),
    /// A valid value was followed by extra bytes.
    #[error("{0} trailing bytes after an encoded CRDT")]
    TrailingBytes(usize),
}

/// Any CRDT value: what the store persists and the replication log ships, as a full state or a
/// delta.
///
/// The encoding is postcard with the variant index first: do not reorder variants.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Crdt {
    /// A grow-only counter.
    GCounter(GCounter),
    /// An up/down counter.
    PNCounter(PNCounter),
    /// An add-wins set of strings.
    ORSet(ORSet),
    /// A last-writer-wins string.
    LwwRegister(LwwRegister),
    /// A last-writer-wins map of strings.
    LwwMap(LwwMap),
}

impl Crdt {
    /// The bottom value of `kind`: what a key holds before its first write, and what a first
    /// delta merges into.
    pub fn empty(kind: Kind) -> Crdt {
        match kind {
            Kind::GCounter => Crdt::GCounter(GCounter::new()),
            Kind::PNCounter => Crdt::PNCounter(PNCounter::new()),
            Kind::ORSet => Crdt::ORSet(ORSet::new()),
            Kind::LwwRegister => Crdt::LwwRegister(LwwRegister::new()),
            Kind::LwwMap => Crdt::LwwMap(LwwMap::new()),
        }
    }

    /// Which kind this value is.
    pub fn kind(&self) -> Kind {
        match self {
            Crdt::GCounter(_) => Kind::GCounter,
            Crdt::PNCounter(_) => Kind::PNCounter,
            Crdt::ORSet(_) => Kind::ORSet,
            Crdt::LwwRegister(_) => Kind::LwwRegister,
            Crdt::LwwMap(_) => Kind::LwwMap,
        }
    }

    /// Joins a full state or delta of the same kind into `self`; a different kind is refused and
    /// `self` is left unchanged.
    pub fn merge(&mut self, other: &Crdt) -> Result<(), KindMismatch> {
        match (self, other) {
            (Crdt::GCounter(a), Crdt::GCounter(b)) => a.merge(b),
            (Crdt::PNCounter(a), Crdt::PNCounter(b)) => a.merge(b),
            (Crdt::ORSet(a), Crdt::ORSet(b)) => a.merge(b),
            (Crdt::LwwRegister(a), Crdt::LwwRegister(b)) => a.merge(b),
            (Crdt::LwwMap(a), Crdt::LwwMap(b)) => a.merge(b),
            (me, _) => {
                return Err(KindMismatch {
                    into: me.kind(),
                    from: other.kind(),
                });
            }
        }
        Ok(())
    }

    /// The compact binary form (postcard) for storage and replication.
    pub fn encode(&self) -> Vec<u8> {
        // Serializing these types into a Vec cannot fail: no maps with non-string-able keys,
        // no I/O, no length limits.
        postcard::to_stdvec(self).unwrap_or_default()
    }

    /// Parses [`encode`](Self::encode)'s output, rejecting trailing bytes and restoring the
    /// types' invariants (so a hand-crafted input cannot make equal states compare unequal).
    pub fn decode(bytes: &[u8]) -> Result<Crdt, DecodeError> {
        let (mut crdt, rest): (Crdt, &[u8]) = postcard::take_from_bytes(bytes)?;
        if !rest.is_empty() {
            return Err(DecodeError::TrailingBytes(rest.len()));
        }
        match &mut crdt {
            Crdt::GCounter(c) => c.normalize(),
            Crdt::PNCounter(c) => c.normalize(),
            Crdt::ORSet(s) => s.normalize(),
            Crdt::LwwRegister(r) => r.normalize(),
            Crdt::LwwMap(m) => m.normalize(),
        }
        Ok(crdt)
    }

    /// The user-facing value: counter → number, set → sorted array of strings, register → string
    /// or null, map → object of live entries.
    pub fn to_json(&self) -> serde_json::Value {
        use serde_json::Value;
        match self {
            Crdt::GCounter(c) => Value::from(c.value()),
            Crdt::PNCounter(c) => Value::from(c.value()),
            Crdt::ORSet(s) => Value::Array(s.elements().map(Value::from).collect()),
            Crdt::LwwRegister(r) => r.value().map_or(Value::Null, Value::from),
            Crdt::LwwMap(m) => Value::Object(
                m.iter()
                    .map(|(k, v)| (k.to_owned(), Value::from(v)))
                    .collect(),
            ),
        }
    }
}

impl From<GCounter> for Crdt {
    fn from(c: GCounter) -> Self {
        Crdt::GCounter(c)
    }
}

impl From<PNCounter> for Crdt {
    fn from(c: PNCounter) -> Self {
        Crdt::PNCounter(c)
    }
}

impl From<ORSet> for Crdt {
    fn from(s: ORSet) -> Self {
        Crdt::ORSet(s)
    }
}

impl From<LwwRegister> for Crdt {
    fn from(r: LwwRegister) -> Self {
        Crdt::LwwRegister(r)
    }
}

impl From<LwwMap> for Crdt {
    fn from(m: LwwMap) -> Self {
        Crdt::LwwMap(m)
    }
}
