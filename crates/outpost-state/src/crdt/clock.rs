//! Identity and time for CRDTs: who wrote (`ReplicaId`), which write (`Dot`), what a replica has
//! seen (`CausalContext`) and when, in a clock-skew-tolerant total order (`Hlc`, `HlcClock`).
//!
//! Nothing here reads the clock except [`HlcClock::now_system`]; every other method takes the
//! physical time as an argument so tests control it.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::str::FromStr;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

/// A node's identity as a CRDT writer; every dot and HLC stamp carries one so writes from
/// different nodes never collide.
///
/// A node that loses its disk must take a new [`ReplicaId::random`] rather than reuse its old id:
/// its fresh state no longer knows which counters it already handed out, so reusing the id would
/// reissue dots other replicas have seen (and silently drop the new writes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ReplicaId(pub u64);

impl ReplicaId {
    /// A fresh random id (never 0), for a new node or one that lost its state.
    pub fn random() -> Self {
        ReplicaId(fastrand::u64(1..))
    }
}

impl fmt::Display for ReplicaId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

/// Why a string is not a [`ReplicaId`]; the text form is exactly 16 lowercase hex digits.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid replica id {0:?}: expected 16 lowercase hex digits")]
pub struct ParseReplicaIdError(pub String);

impl FromStr for ReplicaId {
    type Err = ParseReplicaIdError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let well_formed = s.len() == 16
            && s.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
        if !well_formed {
            return Err(ParseReplicaIdError(s.to_owned()));
        }
        u64::from_str_radix(s, 16)
            .map(ReplicaId)
            .map_err(|_| ParseReplicaIdError(s.to_owned()))
    }
}

/// One write event: the `counter`-th event issued by `replica`. Dots name the adds an OR-Set
/// keeps, so a remove deletes exactly the adds it saw.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Dot {
    /// The replica that issued the event.
    pub replica: ReplicaId,
    /// The replica's event number; starts at 1, so a version vector entry `n` covers `1..=n`.
    pub counter: u64,
}

impl fmt::Display for Dot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.replica, self.counter)
    }
}

/// The set of dots a state (or delta) has seen, stored as a version vector plus a "cloud" of
/// dots that are not contiguous with it; the cloud is what lets deltas arrive out of order.
///
/// Always compacted after a mutation: no cloud dot is covered by, or adjacent to, the version
/// vector, and the vector holds no zero entries, so equal sets have equal representations.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CausalContext {
    /// `vv[r] = n`: every dot `r:1..=n` has been seen.
    vv: BTreeMap<ReplicaId, u64>,
    /// Seen dots beyond a gap in `vv` (e.g. a delta that arrived before its predecessors).
    cloud: BTreeSet<Dot>,
}

impl CausalContext {
    /// An empty context: nothing seen.
    pub fn new() -> Self {
        Self::default()
    }

    /// A context holding exactly `dots`, the shape a delta carries.
    pub fn from_dots(dots: impl IntoIterator<Item = Dot>) -> Self {
        let mut ctx = CausalContext {
            vv: BTreeMap::new(),
            cloud: dots.into_iter().filter(|d| d.counter > 0).collect(),
        };
        ctx.compact();
        ctx
    }

    /// The contiguous part: replica → highest counter `n` with all of `1..=n` seen.
    pub fn vv(&self) -> &BTreeMap<ReplicaId, u64> {
        &self.vv
    }

    /// The non-contiguous part: seen dots after a gap.
    pub fn cloud(&self) -> &BTreeSet<Dot> {
        &self.cloud
    }

    /// Whether nothing has been seen.
    pub fn is_empty(&self) -> bool {
        self.vv.is_empty() && self.cloud.is_empty()
    }

    /// Whether `dot` has been seen; a seen dot that is absent from a state was removed.
    pub fn contains(&self, dot: &Dot) -> bool {
        self.vv.get(&dot.replica).is_some_and(|&n| dot.counter <= n) || self.cloud.contains(dot)
    }

    /// Records `dot` as seen.
    pub fn insert(&mut self, dot: Dot) {
        if dot.counter == 0 || self.contains(&dot) {
            return;
        }
        self.cloud.insert(dot);
        self.compact();
    }

    /// Joins `other` into `self` (set union of the seen dots).
    pub fn merge(&mut self, other: &CausalContext) {
        for (&replica, &n) in &other.vv {
            let mine = self.vv.entry(replica).or_insert(0);
            *mine = (*mine).max(n);
        }
        self.cloud.extend(other.cloud.iter().copied());
        self.compact();
    }

    /// Folds cloud dots contiguous with the version vector into it and drops covered ones.
    pub fn compact(&mut self) {
        self.vv.retain(|_, n| *n > 0);
        // Dots sort by (replica, counter), so one pass sees each replica's dots in order and a
        // run `n+1, n+2, ..` folds completely.
        let mut keep = BTreeSet::new();
        for dot in std::mem::take(&mut self.cloud) {
            let n = self.vv.get(&dot.replica).copied().unwrap_or(0);
            if dot.counter <= n {
                continue;
            }
            if dot.counter == n + 1 {
                self.vv.insert(dot.replica, dot.counter);
            } else {
                keep.insert(dot);
            }
        }
        self.cloud = keep;
    }

    /// Issues `replica`'s next dot (highest counter seen for it + 1) and records it as seen.
    pub fn next_dot(&mut self, replica: ReplicaId) -> Dot {
        let in_vv = self.vv.get(&replica).copied().unwrap_or(0);
        let in_cloud = self
            .cloud
            .range(
                Dot {
                    replica,
                    counter: 0,
                }..=Dot {
                    replica,
                    counter: u64::MAX,
                },
            )
            .next_back()
            .map_or(0, |d| d.counter);
        let dot = Dot {
            replica,
            counter: in_vv.max(in_cloud).saturating_add(1),
        };
        self.insert(dot);
        dot
    }

    /// Every dot in the context, for debugging and tests (may be large: it expands the vector).
    pub fn dots(&self) -> impl Iterator<Item = Dot> + '_ {
        self.vv
            .iter()
            .flat_map(|(&replica, &n)| (1..=n).map(move |counter| Dot { replica, counter }))
            .chain(self.cloud.iter().copied())
    }
}

/// A hybrid logical clock stamp: physical milliseconds, a logical tiebreak for events in the same
/// millisecond (or while the wall clock lags), and the writer, so two stamps are never equal and
/// last-writer-wins has one answer on every replica.
///
/// Ordered by `(wall_ms, logical, replica)`; the field order makes the derived `Ord` do that.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Hlc {
    /// Milliseconds since the Unix epoch, never behind any stamp this clock saw.
    pub wall_ms: u64,
    /// Events within the same `wall_ms`.
    pub logical: u32,
    /// The replica that issued the stamp; the final tiebreak.
    pub replica: ReplicaId,
}

impl fmt::Display for Hlc {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}@{}", self.wall_ms, self.logical, self.replica)
    }
}

/// How far ahead of our physical clock a remote stamp may be before [`HlcClock::observe`] stops
/// adopting it: one minute, so one node with a wild clock cannot drag the fleet into the future.
pub const DEFAULT_MAX_DRIFT_MS: u64 = 60_000;

/// A remote stamp was too far in the future to adopt; the caller logs it (a peer's clock is off).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error(
    "remote clock {remote} is {ahead_ms} ms ahead of local physical time {physical_ms} ms \
     (more than the {max_drift_ms} ms allowed); not adopting its wall time"
)]
pub struct ClockDrift {
    /// The stamp that was too far ahead.
    pub remote: Hlc,
    /// Our physical time when we saw it.
    pub physical_ms: u64,
    /// How far ahead it was.
    pub ahead_ms: u64,
    /// The limit it exceeded.
    pub max_drift_ms: u64,
}

/// A replica's hybrid logical clock: issues stamps that never go backwards even if the wall clock
/// does, and that follow causality across replicas via [`observe`](Self::observe).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HlcClock {
    /// Written into every stamp issued.
    replica: ReplicaId,
    /// `(wall_ms, logical)` of the last stamp issued or observed; the floor for the next one.
    last: (u64, u32),
    /// Remote stamps further ahead of physical time than this are not adopted.
    max_drift_ms: u64,
}

impl HlcClock {
    /// A clock for `replica` that has issued nothing yet, with [`DEFAULT_MAX_DRIFT_MS`].
    pub fn new(replica: ReplicaId) -> Self {
        HlcClock {
            replica,
            last: (0, 0),
            max_drift_ms: DEFAULT_MAX_DRIFT_MS,
        }
    }

    /// A clock resuming from a persisted [`last`](Self::last), so a restart with the wall clock
    /// set back cannot issue stamps below ones already written.
    pub fn resume(replica: ReplicaId, last: (u64, u32)) -> Self {
        HlcClock {
            last,
            ..HlcClock::new(replica)
        }
    }

    /// Sets how far ahead a remote stamp may be before it is refused.
    pub fn with_max_drift_ms(mut self, max_drift_ms: u64) -> Self {
        self.max_drift_ms = max_drift_ms;
        self
    }

    /// The replica this clock stamps for.
    pub fn replica(&self) -> ReplicaId {
        self.replica
    }

    /// `(wall_ms, logical)` of the latest stamp issued or observed; persist it to [`resume`](Self::resume).
    pub fn last(&self) -> (u64, u32) {
        self.last
    }

    /// The allowed remote drift in milliseconds.
    pub fn max_drift_ms(&self) -> u64 {
        self.max_drift_ms
    }

    /// A stamp for a local event at `physical_ms` (HLC send rule): greater than every stamp this
    /// clock issued or observed.
    pub fn now(&mut self, physical_ms: u64) -> Hlc {
        self.last = tick(self.last, physical_ms);
        self.stamp()
    }

    /// [`now`](Self::now) with the system wall clock.
    pub fn now_system(&mut self) -> Hlc {
        self.now(system_ms())
    }

    /// Folds in a stamp received from another replica (HLC receive rule), so our next stamp is
    /// after it. A remote wall time more than `max_drift_ms` ahead of `physical_ms` is not
    /// adopted: the clock still advances (logically) and the drift is returned for logging.
    pub fn observe(&mut self, remote: &Hlc, physical_ms: u64) -> Result<(), ClockDrift> {
        let ahead_ms = remote.wall_ms.saturating_sub(physical_ms);
        if ahead_ms > self.max_drift_ms {
            self.last = tick(self.last, physical_ms);
            return Err(ClockDrift {
                remote: *remote,
                physical_ms,
                ahead_ms,
                max_drift_ms: self.max_drift_ms,
            });
        }
        let (l, c) = self.last;
        let (lm, cm) = (remote.wall_ms, remote.logical);
        let wall = l.max(lm).max(physical_ms);
        self.last = if wall == l && wall == lm {
            bump(wall, c.max(cm))
        } else if wall == l {
            bump(wall, c)
        } else if wall == lm {
            bump(wall, cm)
        } else {
            (wall, 0)
        };
        Ok(())
    }

    fn stamp(&self) -> Hlc {
        Hlc {
            wall_ms: self.last.0,
            logical: self.last.1,
            replica: self.replica,
        }
    }
}

/// HLC send rule: wall time if it moved forward, else one logical step past the last stamp.
fn tick(last: (u64, u32), physical_ms: u64) -> (u64, u32) {
    if physical_ms > last.0 {
        (physical_ms, 0)
    } else {
        bump(last.0, last.1)
    }
}

/// One logical step after `(wall, logical)`; on the (theoretical) logical overflow, borrows a
/// millisecond so stamps stay strictly increasing.
fn bump(wall: u64, logical: u32) -> (u64, u32) {
    match logical.checked_add(1) {
        Some(next) => (wall, next),
        None => (wall.saturating_add(1), 0),
    }
}

/// Milliseconds since the Unix epoch; 0 if the system clock is before it.
fn system_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}
