//! Counters: [`GCounter`] (grow-only) and [`PNCounter`] (increments and decrements).
//!
//! Each replica only ever raises its own entry, so merging is a pointwise max and a delta is just
//! the writer's new total: re-delivering or reordering deltas cannot double-count.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::clock::ReplicaId;

/// A grow-only counter: one monotonic total per replica; the value is their sum.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GCounter {
    /// Each replica's own running total (no zero entries, so equal counters compare equal).
    counts: BTreeMap<ReplicaId, u64>,
}

impl GCounter {
    /// A counter at zero.
    pub fn new() -> Self {
        Self::default()
    }

    /// Per-replica totals, for inspection and debugging.
    pub fn counts(&self) -> &BTreeMap<ReplicaId, u64> {
        &self.counts
    }

    /// Adds `n` on behalf of `replica` and returns the delta to ship: `{replica: new total}`
    /// (empty if `n` is 0).
    pub fn incr(&mut self, replica: ReplicaId, n: u64) -> GCounter {
        let mut delta = GCounter::new();
        if n == 0 {
            return delta;
        }
        let total = self.counts.entry(replica).or_insert(0);
        *total = total.saturating_add(n);
        delta.counts.insert(replica, *total);
        delta
    }

    /// The counter's value: the sum over replicas, saturating at `u64::MAX`.
    pub fn value(&self) -> u64 {
        self.counts
            .values()
            .fold(0u64, |acc, &n| acc.saturating_add(n))
    }

    /// Whether adding `n` for `replica` keeps both its own count and the sum within `u64`:
    /// beyond, `incr` would saturate and acknowledge an increment that did not count.
    pub fn can_incr(&self, replica: ReplicaId, n: u64) -> bool {
        let own = self.counts.get(&replica).copied().unwrap_or(0);
        let sum: u128 = self.counts.values().map(|&c| u128::from(c)).sum();
        own.checked_add(n).is_some() && sum + u128::from(n) <= u128::from(u64::MAX)
    }

    /// Joins a full state or a delta: pointwise max.
    pub fn merge(&mut self, other: &GCounter) {
        for (&replica, &n) in &other.counts {
            if n == 0 {
                continue;
            }
            let mine = self.counts.entry(replica).or_insert(0);
            *mine = (*mine).max(n);
        }
    }

    /// Restores the no-zero-entries invariant on decoded input.
    pub(crate) fn normalize(&mut self) {
        self.counts.retain(|_, n| *n > 0);
    }
}

/// A counter that goes up and down: two grow-only counters, increments `p` minus decrements `n`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PNCounter {
    /// Sum of increments.
    p: GCounter,
    /// Sum of decrements (as positive amounts).
    n: GCounter,
}

impl PNCounter {
    /// A counter at zero.
    pub fn new() -> Self {
        Self::default()
    }

    /// The increments half.
    pub fn increments(&self) -> &GCounter {
        &self.p
    }

    /// The decrements half.
    pub fn decrements(&self) -> &GCounter {
        &self.n
    }

    /// Adds `by` (negative to subtract) on behalf of `replica`; returns the delta to ship.
    pub fn add(&mut self, replica: ReplicaId, by: i64) -> PNCounter {
        let mut delta = PNCounter::new();
        if by >= 0 {
            delta.p = self.p.incr(replica, by.unsigned_abs());
        } else {
            delta.n = self.n.incr(replica, by.unsigned_abs());
        }
        delta
    }

    /// Whether adding `by` for `replica` keeps the value within `i64` (and each half within
    /// `u64`): beyond, the value would clamp and an acknowledged change would not show.
    pub fn can_add(&self, replica: ReplicaId, by: i64) -> bool {
        let sum = |g: &GCounter| g.counts.values().map(|&n| i128::from(n)).sum::<i128>();
        let next = sum(&self.p) - sum(&self.n) + i128::from(by);
        let half = if by >= 0 { &self.p } else { &self.n };
        i64::try_from(next).is_ok() && half.can_incr(replica, by.unsigned_abs())
    }

    /// The counter's value, computed in `i128` and clamped to the `i64` range.
    pub fn value(&self) -> i64 {
        // Sum each half without saturating, so huge increments and decrements cancel exactly.
        let sum = |g: &GCounter| g.counts.values().map(|&n| i128::from(n)).sum::<i128>();
        let v = sum(&self.p) - sum(&self.n);
        i64::try_from(v).unwrap_or(if v < 0 { i64::MIN } else { i64::MAX })
    }

    /// Joins a full state or a delta: each half merges independently.
    pub fn merge(&mut self, other: &PNCounter) {
        self.p.merge(&other.p);
        self.n.merge(&other.n);
    }

    /// Restores invariants on decoded input.
    pub(crate) fn normalize(&mut self) {
        self.p.normalize();
        self.n.normalize();
    }
}
