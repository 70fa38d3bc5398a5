//! Last-writer-wins values: [`LwwRegister`] (one optional string) and [`LwwMap`] (string keys to
//! registers). The write with the greatest [`Hlc`] stamp wins on every replica.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::clock::Hlc;

/// A last-writer-wins register holding an optional string.
///
/// `stamp: None` means never written; `value: None` with a stamp means cleared (a tombstone that
/// still beats older writes).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LwwRegister {
    /// The winning write's value; `None` if cleared or never written.
    value: Option<String>,
    /// The winning write's stamp; `None` if never written.
    stamp: Option<Hlc>,
}

impl LwwRegister {
    /// A never-written register.
    pub fn new() -> Self {
        Self::default()
    }

    /// The current value, if set and not cleared.
    pub fn value(&self) -> Option<&str> {
        self.value.as_deref()
    }

    /// The winning write's stamp, if ever written.
    pub fn stamp(&self) -> Option<&Hlc> {
        self.stamp.as_ref()
    }

    /// Writes `value` (`None` clears) at `stamp`; returns the delta to ship. A write older than
    /// the current one changes nothing here, and its delta changes nothing anywhere.
    pub fn set(&mut self, value: Option<String>, stamp: Hlc) -> LwwRegister {
        let delta = LwwRegister {
            value,
            stamp: Some(stamp),
        };
        self.merge(&delta);
        delta
    }

    /// Joins a full state or a delta: the greater stamp wins. Equal stamps (only possible if a
    /// replica id were reused) fall back to the greater value, so the merge stays commutative.
    pub fn merge(&mut self, other: &LwwRegister) {
        if (&other.stamp, &other.value) > (&self.stamp, &self.value) {
            self.stamp = other.stamp;
            self.value.clone_from(&other.value);
        }
    }

    /// Restores the invariant on decoded input: a never-written register holds no value.
    pub(crate) fn normalize(&mut self) {
        if self.stamp.is_none() {
            self.value = None;
        }
    }
}

/// A map from string keys to last-writer-wins registers; removal writes a tombstone.
///
/// Tombstones stay forever (this type has no garbage collection), so heavy key churn grows it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LwwMap {
    /// Every key ever written, live or tombstoned.
    entries: BTreeMap<String, LwwRegister>,
}

impl LwwMap {
    /// An empty map.
    pub fn new() -> Self {
        Self::default()
    }

    /// Writes `key = value` at `stamp`; returns the delta to ship (that one key).
    pub fn set(&mut self, key: impl Into<String>, value: impl Into<String>, stamp: Hlc) -> LwwMap {
        self.write(key.into(), Some(value.into()), stamp)
    }

    /// Removes `key` at `stamp` by writing a tombstone; returns the delta to ship.
    pub fn remove(&mut self, key: impl Into<String>, stamp: Hlc) -> LwwMap {
        self.write(key.into(), None, stamp)
    }

    fn write(&mut self, key: String, value: Option<String>, stamp: Hlc) -> LwwMap {
        let reg = self
            .entries
            .entry(key.clone())
            .or_default()
            .set(value, stamp);
        LwwMap {
            entries: BTreeMap::from([(key, reg)]),
        }
    }

    /// The live value for `key`.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.entries.get(key).and_then(LwwRegister::value)
    }

    /// Live entries in key order (tombstones skipped).
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> + '_ {
        self.entries
            .iter()
            .filter_map(|(k, r)| r.value().map(|v| (k.as_str(), v)))
    }

    /// Every register including tombstones, for inspection and debugging.
    pub fn registers(&self) -> &BTreeMap<String, LwwRegister> {
        &self.entries
    }

    /// Joins a full state or a delta, key by key.
    pub fn merge(&mut self, other: &LwwMap) {
        for (key, theirs) in &other.entries {
            match self.entries.get_mut(key) {
                Some(mine) => mine.merge(theirs),
                None => {
                    if theirs.stamp.is_some() {
                        self.entries.insert(key.clone(), theirs.clone());
                    }
                }
            }
        }
    }

    /// Restores invariants on decoded input: no never-written registers.
    pub(crate) fn normalize(&mut self) {
        self.entries.retain(|_, r| {
            r.normalize();
            r.stamp.is_some()
        });
    }
}
