//! Property and unit tests for the CRDTs: lattice laws (commutative, associative, idempotent),
//! "applying an op == merging its delta", convergence of three replicas under reordered,
//! duplicated and lost deltas, and the scenarios the design relies on (add wins, disk loss,
//! clock skew, delta size).

use std::collections::{BTreeMap, BTreeSet};

use proptest::prelude::*;

use super::*;

const R: [ReplicaId; 3] = [ReplicaId(0xa1), ReplicaId(0xb2), ReplicaId(0xc3)];

/// Property-test cases: enough to find ordering bugs, few enough for a 2-core debug run.
fn config(cases: u32) -> ProptestConfig {
    ProptestConfig {
        cases,
        ..ProptestConfig::default()
    }
}

fn joined<T: Clone>(a: &T, b: &T, merge: impl Fn(&mut T, &T)) -> T {
    let mut out = a.clone();
    merge(&mut out, b);
    out
}

/// Asserts commutativity, associativity and idempotence of `merge` on three states.
fn assert_lattice<T: Clone + PartialEq + std::fmt::Debug>(
    a: &T,
    b: &T,
    c: &T,
    merge: impl Fn(&mut T, &T) + Copy,
) -> Result<(), TestCaseError> {
    prop_assert_eq!(joined(a, b, merge), joined(b, a, merge), "commutative");
    let ab_c = joined(&joined(a, b, merge), c, merge);
    let a_bc = joined(a, &joined(b, c, merge), merge);
    prop_assert_eq!(ab_c, a_bc, "associative");
    prop_assert_eq!(&joined(a, a, merge), a, "idempotent");
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Operation histories shared by the law and convergence tests.

/// One operation at one of three replicas.
#[derive(Debug, Clone)]
enum Op {
    Add(i64),
    SetAdd(u8),
    SetRemove(u8),
    MapSet(u8, u8),
    MapRemove(u8),
}

fn elem(e: u8) -> String {
    format!("e{e}")
}

fn counter_ops() -> impl Strategy<Value = Vec<(usize, Op)>> {
    prop::collection::vec((0..3usize, (-1000i64..1000).prop_map(Op::Add)), 0..40)
}

fn set_ops() -> impl Strategy<Value = Vec<(usize, Op)>> {
    let op = prop_oneof![
        3 => (0..6u8).prop_map(Op::SetAdd),
        2 => (0..6u8).prop_map(Op::SetRemove),
    ];
    prop::collection::vec((0..3usize, op), 0..40)
}

fn map_ops() -> impl Strategy<Value = Vec<(usize, Op)>> {
    let op = prop_oneof![
        3 => (0..5u8, 0..5u8).prop_map(|(k, v)| Op::MapSet(k, v)),
        1 => (0..5u8).prop_map(Op::MapRemove),
    ];
    prop::collection::vec((0..3usize, op), 0..40)
}

/// Three replicas of one CRDT plus per-replica HLC clocks, applying ops and producing deltas.
struct Cluster {
    states: Vec<Crdt>,
    clocks: Vec<HlcClock>,
    /// Physical time per replica; ops advance it a little, sometimes backwards.
    physical: Vec<u64>,
}

impl Cluster {
    fn new(kind: Kind) -> Self {
        Cluster {
            states: vec![Crdt::empty(kind); 3],
            clocks: R.iter().map(|&r| HlcClock::new(r)).collect(),
            physical: vec![1_000, 1_000, 1_000],
        }
    }

    /// Applies `op` at replica `at` and returns (delta, the stamp used for LWW ops).
    fn apply(&mut self, at: usize, op: &Op, step: u64) -> (Crdt, Option<Hlc>) {
        // Physical time wobbles: +0..3 ms, or back 1 ms every so often.
        self.physical[at] = if step % 5 == 4 {
            self.physical[at].saturating_sub(1)
        } else {
            self.physical[at] + step % 3
        };
        let stamp = self.clocks[at].now(self.physical[at]);
        let replica = R[at];
        let delta = match (&mut self.states[at], op) {
            (Crdt::PNCounter(c), Op::Add(by)) => Crdt::from(c.add(replica, *by)),
            (Crdt::GCounter(c), Op::Add(by)) => Crdt::from(c.incr(replica, by.unsigned_abs())),
            (Crdt::ORSet(s), Op::SetAdd(e)) => Crdt::from(s.add(replica, elem(*e))),
            (Crdt::ORSet(s), Op::SetRemove(e)) => Crdt::from(s.remove(&elem(*e))),
            (Crdt::LwwMap(m), Op::MapSet(k, v)) => {
                return (Crdt::from(m.set(elem(*k), elem(*v), stamp)), Some(stamp));
            }
            (Crdt::LwwMap(m), Op::MapRemove(k)) => {
                return (Crdt::from(m.remove(elem(*k), stamp)), Some(stamp));
            }
            (Crdt::LwwRegister(r), Op::MapSet(_, v)) => {
                return (Crdt::from(r.set(Some(elem(*v)), stamp)), Some(stamp));
            }
            (Crdt::LwwRegister(r), Op::MapRemove(_)) => {
                return (Crdt::from(r.set(None, stamp)), Some(stamp));
            }
            (state, op) => panic!("op {op:?} does not apply to {:?}", state.kind()),
        };
        (delta, None)
    }

    /// Delivers a delta (or state) to replica `to`, observing LWW stamps like a real receiver.
    fn deliver(&mut self, to: usize, delta: &Crdt, stamp: Option<Hlc>) {
        if let Some(stamp) = stamp {
            // Drift is bounded by the test's clocks, so this never refuses.
            let observed = self.clocks[to].observe(&stamp, self.physical[to]);
            assert!(observed.is_ok(), "{observed:?}");
        }
        let merged = self.states[to].merge(delta);
        assert!(merged.is_ok(), "{merged:?}");
    }

    /// Anti-entropy: every replica merges every other's full state, in order.
    fn anti_entropy(&mut self) {
        for i in 0..3 {
            for j in 0..3 {
                if i != j {
                    let other = self.states[j].clone();
                    self.deliver(i, &other, None);
                }
            }
        }
    }
}

/// Runs `ops` on a cluster: each op is applied at its origin, its delta queued for the other two
/// replicas (sometimes twice, sometimes dropped if `loss`), and queued deltas are delivered in a
/// random order interleaved with later ops. Returns the cluster and the deltas in op order.
fn run(
    kind: Kind,
    ops: &[(usize, Op)],
    seed: u64,
    loss: bool,
) -> (Cluster, Vec<(Crdt, Option<Hlc>)>) {
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut cluster = Cluster::new(kind);
    let mut pending: Vec<(usize, usize)> = Vec::new(); // (to, delta index)
    let mut deltas = Vec::new();
    for (step, (at, op)) in ops.iter().enumerate() {
        let (delta, stamp) = cluster.apply(*at, op, step as u64);
        let idx = deltas.len();
        deltas.push((delta, stamp));
        for to in (0..3).filter(|to| to != at) {
            if loss && rng.u8(..4) == 0 {
                continue;
            }
            pending.push((to, idx));
            if rng.u8(..4) == 0 {
                pending.push((to, idx)); // duplicate
            }
        }
        // Deliver a random handful now, so later ops see some but not all earlier ones.
        for _ in 0..rng.usize(..=pending.len()) {
            let (to, i) = pending.swap_remove(rng.usize(..pending.len()));
            let (d, s) = &deltas[i];
            cluster.deliver(to, d, *s);
        }
    }
    rng.shuffle(&mut pending);
    for (to, i) in pending {
        let (d, s) = &deltas[i];
        cluster.deliver(to, d, *s);
    }
    (cluster, deltas)
}

fn all_equal(cluster: &Cluster) -> Result<(), TestCaseError> {
    prop_assert_eq!(&cluster.states[0], &cluster.states[1]);
    prop_assert_eq!(&cluster.states[1], &cluster.states[2]);
    Ok(())
}

/// Reference OR-Set semantics with op ids instead of dots and no compaction or merge formula:
/// each replica tracks, per element, the adds it can see and every add it knows was removed or
/// superseded. Deltas are replayed into a single "everyone got everything" replica.
#[derive(Default)]
struct SetModel {
    visible: BTreeMap<u8, BTreeSet<usize>>,
    killed: BTreeSet<usize>,
}

/// What an op's delta tells a peer in the model.
enum ModelDelta {
    Add {
        e: u8,
        tag: usize,
        covers: BTreeSet<usize>,
    },
    Remove {
        kills: BTreeSet<usize>,
    },
}

impl SetModel {
    fn local(&mut self, op: &Op, tag: usize) -> ModelDelta {
        match *op {
            Op::SetAdd(e) => {
                let covers = self
                    .visible
                    .insert(e, BTreeSet::from([tag]))
                    .unwrap_or_default();
                self.killed.extend(&covers);
                ModelDelta::Add { e, tag, covers }
            }
            Op::SetRemove(e) => {
                let kills = self.visible.remove(&e).unwrap_or_default();
                self.killed.extend(&kills);
                ModelDelta::Remove { kills }
            }
            _ => unreachable!("not a set op"),
        }
    }

    fn receive(&mut self, d: &ModelDelta) {
        let kills = match d {
            ModelDelta::Add { covers, .. } => covers,
            ModelDelta::Remove { kills } => kills,
        };
        self.killed.extend(kills);
        for tags in self.visible.values_mut() {
            tags.retain(|t| !kills.contains(t));
        }
        if let ModelDelta::Add { e, tag, .. } = d
            && !self.killed.contains(tag)
        {
            self.visible.entry(*e).or_default().insert(*tag);
        }
        self.visible.retain(|_, tags| !tags.is_empty());
    }

    fn elements(&self) -> Vec<String> {
        self.visible.keys().map(|&e| elem(e)).collect()
    }
}

/// The final elements once every delta reached everyone, by the order-free characterisation of
/// add-wins: an add survives iff no op removed or superseded it. `killed[i]` = the add ops that
/// op `i` removed or superseded at its origin.
fn model_final(ops: &[(usize, Op)], killed_by: &[BTreeSet<usize>]) -> Vec<String> {
    let mut killed: BTreeSet<usize> = BTreeSet::new();
    let mut adds = BTreeMap::new();
    for (i, (_, op)) in ops.iter().enumerate() {
        killed.extend(&killed_by[i]);
        if let Op::SetAdd(e) = op {
            adds.insert(i, *e);
        }
    }
    let live: BTreeSet<u8> = adds
        .iter()
        .filter(|(tag, _)| !killed.contains(*tag))
        .map(|(_, &e)| e)
        .collect();
    live.into_iter().map(elem).collect()
}

// ---------------------------------------------------------------------------------------------
// Lattice laws and "op == merge(delta)".

fn replica_id() -> impl Strategy<Value = ReplicaId> {
    (1..4u64).prop_map(ReplicaId)
}

fn gcounter() -> impl Strategy<Value = GCounter> {
    prop::collection::vec((replica_id(), 0..100u64), 0..4).prop_map(|incs| {
        let mut c = GCounter::new();
        for (r, n) in incs {
            c.incr(r, n);
        }
        c
    })
}

fn pncounter() -> impl Strategy<Value = PNCounter> {
    prop::collection::vec((replica_id(), -100..100i64), 0..6).prop_map(|adds| {
        let mut c = PNCounter::new();
        for (r, by) in adds {
            c.add(r, by);
        }
        c
    })
}

fn hlc() -> impl Strategy<Value = Hlc> {
    (0..4u64, 0..3u32, replica_id()).prop_map(|(wall_ms, logical, replica)| Hlc {
        wall_ms,
        logical,
        replica,
    })
}

fn register() -> impl Strategy<Value = LwwRegister> {
    prop::option::of((prop::option::of(0..3u8), hlc())).prop_map(|w| {
        let mut r = LwwRegister::new();
        if let Some((v, stamp)) = w {
            r.set(v.map(elem), stamp);
        }
        r
    })
}

fn lwwmap() -> impl Strategy<Value = LwwMap> {
    prop::collection::vec((0..4u8, prop::option::of(0..3u8), hlc()), 0..6).prop_map(|ws| {
        let mut m = LwwMap::new();
        for (k, v, stamp) in ws {
            match v {
                Some(v) => m.set(elem(k), elem(v), stamp),
                None => m.remove(elem(k), stamp),
            };
        }
        m
    })
}

/// Reachable OR-Set states: three replicas after a random history with partial syncs, plus all
/// the deltas produced (deltas are states too and must obey the same laws).
fn orsets() -> impl Strategy<Value = Vec<ORSet>> {
    (set_ops(), any::<u64>()).prop_map(|(ops, seed)| {
        let (cluster, deltas) = run(Kind::ORSet, &ops, seed, true);
        let mut out: Vec<ORSet> = cluster
            .states
            .into_iter()
            .chain(deltas.into_iter().map(|(d, _)| d))
            .filter_map(|c| match c {
                Crdt::ORSet(s) => Some(s),
                _ => None,
            })
            .collect();
        out.push(ORSet::new());
        out
    })
}

proptest! {
    #![proptest_config(config(256))]

    #[test]
    fn gcounter_laws(a in gcounter(), b in gcounter(), c in gcounter(), r in replica_id(), n in 0..50u64) {
        assert_lattice(&a, &b, &c, GCounter::merge)?;
        let mut after = a.clone();
        let delta = after.incr(r, n);
        prop_assert_eq!(joined(&a, &delta, GCounter::merge), after);
    }

    #[test]
    fn pncounter_laws(a in pncounter(), b in pncounter(), c in pncounter(), r in replica_id(), by in -50..50i64) {
        assert_lattice(&a, &b, &c, PNCounter::merge)?;
        let mut after = a.clone();
        let delta = after.add(r, by);
        prop_assert_eq!(after.value(), a.value() + by);
        prop_assert_eq!(joined(&a, &delta, PNCounter::merge), after);
    }

    #[test]
    fn register_laws(a in register(), b in register(), c in register(), v in prop::option::of(0..3u8), stamp in hlc()) {
        assert_lattice(&a, &b, &c, LwwRegister::merge)?;
        let mut after = a.clone();
        let delta = after.set(v.map(elem), stamp);
        prop_assert_eq!(joined(&a, &delta, LwwRegister::merge), after);
    }

    #[test]
    fn map_laws(a in lwwmap(), b in lwwmap(), c in lwwmap(), k in 0..4u8, v in prop::option::of(0..3u8), stamp in hlc()) {
        assert_lattice(&a, &b, &c, LwwMap::merge)?;
        let mut after = a.clone();
        let delta = match v {
            Some(v) => after.set(elem(k), elem(v), stamp),
            None => after.remove(elem(k), stamp),
        };
        prop_assert_eq!(joined(&a, &delta, LwwMap::merge), after);
    }
}

proptest! {
    #![proptest_config(config(96))]

    /// `add_all` / `remove_all` give the state and the delta that one `add` / `remove` per
    /// element, merged, give (repeats included).
    #[test]
    fn orset_batch_ops_equal_merged_single_ops(states in orsets(), pick in any::<prop::sample::Index>(), r in 0..3usize, els in prop::collection::vec(0..6u8, 0..8), add in any::<bool>()) {
        let start = &states[pick.index(states.len())];
        let names: Vec<String> = els.iter().map(|e| elem(*e)).collect();
        let (mut one_by_one, mut batch) = (start.clone(), start.clone());
        let mut merged = ORSet::new();
        for n in &names {
            let d = if add { one_by_one.add(R[r], n.clone()) } else { one_by_one.remove(n) };
            merged.merge(&d);
        }
        let delta = if add {
            batch.add_all(R[r], names.iter().cloned())
        } else {
            batch.remove_all(names.iter().map(String::as_str))
        };
        prop_assert_eq!(&batch, &one_by_one);
        prop_assert_eq!(joined(start, &delta, ORSet::merge), joined(start, &merged, ORSet::merge));
        prop_assert_eq!(delta, merged);
    }

    #[test]
    fn orset_laws(states in orsets(), picks in prop::array::uniform3(any::<prop::sample::Index>()), r in 0..3usize, e in 0..6u8, add in any::<bool>()) {
        let [a, b, c] = picks.map(|i| &states[i.index(states.len())]);
        assert_lattice(a, b, c, ORSet::merge)?;
        // Every state the cluster reached is a valid place to apply an op.
        let mut after = a.clone();
        let delta = if add { after.add(R[r], elem(e)) } else { after.remove(&elem(e)) };
        prop_assert_eq!(after.contains(&elem(e)), add);
        prop_assert_eq!(joined(a, &delta, ORSet::merge), after);
    }

    #[test]
    fn crdt_encoding_round_trips(states in orsets(), g in gcounter(), p in pncounter(), r in register(), m in lwwmap()) {
        let values = states.into_iter().map(Crdt::from).chain([g.into(), p.into(), r.into(), m.into()]);
        for v in values {
            let bytes = v.encode();
            let back = Crdt::decode(&bytes);
            prop_assert!(matches!(&back, Ok(b) if *b == v), "{:?} -> {:?}", v, back);
        }
    }

    #[test]
    fn decode_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..64)) {
        let _ = Crdt::decode(&bytes);
    }
}

// ---------------------------------------------------------------------------------------------
// Convergence.

/// For the OR-Set: what each op's origin removed/superseded, read from the delta it produced
/// (dots are mapped back to the op that issued them).
fn killed_tags(deltas: &[(Crdt, Option<Hlc>)]) -> Vec<BTreeSet<usize>> {
    let mut tag_of_dot = BTreeMap::new();
    for (i, (d, _)) in deltas.iter().enumerate() {
        if let Crdt::ORSet(s) = d {
            for dot in s.entries().values().flatten() {
                tag_of_dot.insert(*dot, i);
            }
        }
    }
    deltas
        .iter()
        .enumerate()
        .map(|(i, (d, _))| match d {
            Crdt::ORSet(s) => s
                .context()
                .dots()
                .filter_map(|dot| tag_of_dot.get(&dot).copied())
                .filter(|&t| t != i)
                .collect(),
            _ => BTreeSet::new(),
        })
        .collect()
}

proptest! {
    #![proptest_config(config(256))]

    #[test]
    fn counters_converge_to_the_exact_sum(ops in counter_ops(), seed in any::<u64>(), loss in any::<bool>()) {
        let sum: i64 = ops.iter().map(|(_, op)| match op { Op::Add(by) => *by, _ => 0 }).sum();
        let abs: u64 = ops.iter().map(|(_, op)| match op { Op::Add(by) => by.unsigned_abs(), _ => 0 }).sum();
        for kind in [Kind::PNCounter, Kind::GCounter] {
            let (mut cluster, _) = run(kind, &ops, seed, loss);
            if loss {
                cluster.anti_entropy();
            }
            all_equal(&cluster)?;
            let expected = match kind { Kind::PNCounter => serde_json::json!(sum), _ => serde_json::json!(abs) };
            prop_assert_eq!(cluster.states[0].to_json(), expected);
        }
    }

    #[test]
    fn orset_converges_add_wins(ops in set_ops(), seed in any::<u64>(), loss in any::<bool>()) {
        let (mut cluster, deltas) = run(Kind::ORSet, &ops, seed, loss);
        if loss {
            cluster.anti_entropy();
        }
        all_equal(&cluster)?;
        // An add survives iff no op's delta removed or superseded it.
        let expected = model_final(&ops, &killed_tags(&deltas));
        prop_assert_eq!(cluster.states[0].to_json(), serde_json::json!(expected));
        // And the order-free join of all deltas is the same state.
        let mut all = Crdt::empty(Kind::ORSet);
        for (d, _) in deltas.iter().rev() {
            prop_assert!(all.merge(d).is_ok());
        }
        prop_assert_eq!(&all, &cluster.states[0]);
    }

    #[test]
    fn orset_sequential_is_a_plain_set(ops in set_ops()) {
        // One replica, or three that sync after every op: exactly set semantics.
        let mut model = SetModel::default();
        let mut plain = BTreeSet::new();
        let mut replicas = vec![ORSet::new(); 3];
        for (tag, (at, op)) in ops.iter().enumerate() {
            let delta = match op {
                Op::SetAdd(e) => { plain.insert(elem(*e)); replicas[*at].add(R[*at], elem(*e)) }
                Op::SetRemove(e) => { plain.remove(&elem(*e)); replicas[*at].remove(&elem(*e)) }
                _ => unreachable!(),
            };
            let md = model.local(op, tag);
            model.receive(&md);
            for (i, r) in replicas.iter_mut().enumerate() {
                if i != *at {
                    r.merge(&delta);
                }
            }
        }
        let plain: Vec<String> = plain.into_iter().collect();
        prop_assert_eq!(&model.elements(), &plain);
        for r in &replicas {
            prop_assert_eq!(&r.elements().map(str::to_owned).collect::<Vec<_>>(), &plain);
        }
    }

    #[test]
    fn orset_matches_reference_model(ops in set_ops(), seed in any::<u64>()) {
        // Same random delivery schedule fed to the implementation and to the tag-based model.
        let mut rng = fastrand::Rng::with_seed(seed);
        let mut impls = vec![ORSet::new(); 3];
        let mut models: Vec<SetModel> = (0..3).map(|_| SetModel::default()).collect();
        let mut deltas = Vec::new();
        let mut pending: Vec<(usize, usize)> = Vec::new();
        for (tag, (at, op)) in ops.iter().enumerate() {
            let d = match op {
                Op::SetAdd(e) => impls[*at].add(R[*at], elem(*e)),
                Op::SetRemove(e) => impls[*at].remove(&elem(*e)),
                _ => unreachable!(),
            };
            deltas.push((d, models[*at].local(op, tag)));
            for to in (0..3).filter(|to| to != at) {
                pending.push((to, tag));
            }
            for _ in 0..rng.usize(..=pending.len()) {
                let (to, i) = pending.swap_remove(rng.usize(..pending.len()));
                impls[to].merge(&deltas[i].0);
                models[to].receive(&deltas[i].1);
            }
            for (i, m) in impls.iter().zip(&models) {
                prop_assert_eq!(i.elements().map(str::to_owned).collect::<Vec<_>>(), m.elements());
            }
        }
        rng.shuffle(&mut pending);
        for (to, i) in pending {
            impls[to].merge(&deltas[i].0);
            models[to].receive(&deltas[i].1);
        }
        for (i, m) in impls.iter().zip(&models) {
            prop_assert_eq!(&i.elements().map(str::to_owned).collect::<Vec<_>>(), &m.elements());
        }
        prop_assert_eq!(&impls[0], &impls[1]);
        prop_assert_eq!(&impls[1], &impls[2]);
    }

    #[test]
    fn lww_converges_to_the_greatest_stamp(ops in map_ops(), seed in any::<u64>(), loss in any::<bool>()) {
        for kind in [Kind::LwwMap, Kind::LwwRegister] {
            let (mut cluster, deltas) = run(kind, &ops, seed, loss);
            if loss {
                cluster.anti_entropy();
            }
            all_equal(&cluster)?;
            // Expected: per key, the value of the write with the greatest stamp.
            let mut winners: BTreeMap<String, (Hlc, Option<String>)> = BTreeMap::new();
            for ((_, op), (_, stamp)) in ops.iter().zip(&deltas) {
                let Some(stamp) = *stamp else { continue };
                let (k, v) = match op {
                    Op::MapSet(k, v) => (*k, Some(elem(*v))),
                    Op::MapRemove(k) => (*k, None),
                    _ => unreachable!(),
                };
                let key = if kind == Kind::LwwMap { elem(k) } else { String::new() };
                if winners.get(&key).is_none_or(|(s, _)| stamp > *s) {
                    winners.insert(key, (stamp, v));
                }
            }
            let expected = match kind {
                Kind::LwwMap => serde_json::Value::Object(
                    winners.into_iter().filter_map(|(k, (_, v))| v.map(|v| (k, v.into()))).collect(),
                ),
                _ => winners.into_values().next().and_then(|(_, v)| v).map_or(serde_json::Value::Null, Into::into),
            };
            prop_assert_eq!(cluster.states[0].to_json(), expected);
        }
    }

    #[test]
    fn hlc_stamps_strictly_increase(steps in prop::collection::vec((any::<bool>(), 0..2_000u64, 0..3u64), 1..60)) {
        // Physical time jumps around (including backwards); remote stamps are within drift.
        let mut clock = HlcClock::new(R[0]);
        let mut last = None;
        for (local, physical, remote_wall) in steps {
            if local {
                let stamp = clock.now(physical);
                prop_assert!(last.is_none_or(|l| stamp > l), "{:?} after {:?}", stamp, last);
                last = Some(stamp);
            } else {
                let remote = Hlc { wall_ms: physical + remote_wall, logical: 7, replica: R[1] };
                prop_assert!(clock.observe(&remote, physical).is_ok());
                let next = clock.now(physical);
                prop_assert!(next > remote, "{:?} not after observed {:?}", next, remote);
                prop_assert!(last.is_none_or(|l| next > l));
                last = Some(next);
            }
        }
    }

    #[test]
    fn replica_id_text_round_trips(id in any::<u64>()) {
        let text = ReplicaId(id).to_string();
        prop_assert_eq!(text.len(), 16);
        prop_assert_eq!(text.parse::<ReplicaId>(), Ok(ReplicaId(id)));
    }
}

// ---------------------------------------------------------------------------------------------
// Unit tests.

#[test]
fn orset_concurrent_add_and_remove_add_wins() {
    let (mut a, mut b) = (ORSet::new(), ORSet::new());
    let d = a.add(R[0], "x");
    b.merge(&d);
    // Concurrently: A re-adds x, B removes the x it saw.
    let add = a.add(R[0], "x");
    let rm = b.remove("x");
    a.merge(&rm);
    b.merge(&add);
    assert!(a.contains("x") && b.contains("x"));
    assert_eq!(a, b);

    // Concurrent add at a replica that never saw x at all also wins.
    let (mut c, mut d) = (ORSet::new(), ORSet::new());
    let seen = c.add(R[0], "y");
    d.merge(&seen);
    let rm = d.remove("y");
    let fresh = ORSet::new().add(R[2], "y");
    for s in [&mut c, &mut d] {
        s.merge(&rm);
        s.merge(&fresh);
    }
    assert!(c.contains("y") && d.contains("y"));
}

#[test]
fn orset_remove_only_affects_observed_adds() {
    let mut a = ORSet::new();
    let mut b = ORSet::new();
    // B removes x before hearing of A's add: nothing observed, nothing removed.
    let rm = b.remove("x");
    let add = a.add(R[0], "x");
    a.merge(&rm);
    b.merge(&add);
    assert!(a.contains("x") && b.contains("x"));

    // A remove delivered before the add it observed still cancels it (out-of-order delivery).
    let mut c = ORSet::new();
    let rm = a.remove("x");
    c.merge(&rm);
    c.merge(&add);
    assert!(!c.contains("x"));
    assert_eq!(c.elements().count(), 0);
}

#[test]
fn new_replica_id_after_disk_loss_never_reuses_dots() {
    let old = ReplicaId::random();
    let mut node = ORSet::new();
    let mut peer = ORSet::new();
    for i in 0..5 {
        peer.merge(&node.add(old, format!("k{i}")));
    }
    let old_dots: BTreeSet<Dot> = peer.context().dots().collect();

    // Disk lost: fresh state, fresh id; the node catches up from its peer, then writes.
    let new = ReplicaId::random();
    assert_ne!(new, old);
    assert_ne!(new, ReplicaId(0));
    let mut reborn = ORSet::new();
    let mut new_dots = BTreeSet::new();
    for i in 0..5 {
        new_dots.extend(
            reborn
                .add(new, format!("n{i}"))
                .entries()
                .values()
                .flatten()
                .copied(),
        );
    }
    reborn.merge(&peer);
    new_dots.extend(
        reborn
            .add(new, "after-sync")
            .entries()
            .values()
            .flatten()
            .copied(),
    );
    assert!(new_dots.is_disjoint(&old_dots));
    assert!(new_dots.iter().all(|d| d.replica == new));

    // Both the old and new writes survive a merge in either direction.
    peer.merge(&reborn);
    assert_eq!(peer.len(), 11);

    // Why a new id is required: reusing the old id from empty state reissues a seen dot, and
    // the peer (which saw that dot removed) silently drops the new write.
    let mut peer2 = peer.clone();
    peer2.remove("k0");
    let reused = ORSet::new().add(old, "lost-write");
    let reused_dot = reused.entries()["lost-write"].first().copied();
    assert!(reused_dot.is_some_and(|d| old_dots.contains(&d)));
    peer2.merge(&reused);
    assert!(!peer2.contains("lost-write"));
}

#[test]
fn hlc_monotonic_when_the_wall_clock_goes_backwards() {
    let mut clock = HlcClock::new(R[0]);
    let a = clock.now(10_000);
    let b = clock.now(9_000); // NTP stepped the clock back a second
    let c = clock.now(9_000);
    let d = clock.now(10_001);
    assert!(a < b && b < c && c < d);
    assert_eq!((b.wall_ms, b.logical), (10_000, 1));
    assert_eq!((d.wall_ms, d.logical), (10_001, 0));

    // A restart that resumes from the persisted `last` keeps the order too.
    let mut restarted = HlcClock::resume(R[0], clock.last());
    assert!(restarted.now(5_000) > d);
}

#[test]
fn hlc_observe_follows_causality() {
    let mut a = HlcClock::new(R[0]);
    let mut b = HlcClock::new(R[1]);
    let sent = a.now(5_000);
    // B's clock is 2 s behind, but its next stamp still comes after what it received.
    assert_eq!(b.observe(&sent, 3_000), Ok(()));
    let reply = b.now(3_000);
    assert!(reply > sent);
    assert_eq!((reply.wall_ms, reply.logical), (5_000, 2));
}

#[test]
fn hlc_far_future_remote_is_refused_but_clock_stays_monotonic() {
    let mut clock = HlcClock::new(R[0]).with_max_drift_ms(60_000);
    let before = clock.now(1_000_000);
    let remote = Hlc {
        wall_ms: 1_000_000 + 3_600_000,
        logical: 0,
        replica: R[1],
    };
    let err = clock.observe(&remote, 1_000_000);
    let Err(drift) = err else {
        panic!("expected ClockDrift, got {err:?}")
    };
    assert_eq!(drift.ahead_ms, 3_600_000);
    assert!(drift.to_string().contains("3600000 ms ahead"), "{drift}");
    // Not adopted: our wall time is still ours, but we moved forward logically.
    let after = clock.now(1_000_000);
    assert!(after > before);
    assert_eq!(after.wall_ms, 1_000_000);
    assert!(after < remote);
    // Just inside the limit is adopted.
    let near = Hlc {
        wall_ms: 1_000_000 + 60_000,
        ..remote
    };
    assert_eq!(clock.observe(&near, 1_000_000), Ok(()));
    assert!(clock.now(1_000_000) > near);
}

#[test]
fn causal_context_compacts_out_of_order_dots() {
    let r = R[0];
    let dot = |counter| Dot {
        replica: r,
        counter,
    };
    let mut ctx = CausalContext::new();
    ctx.insert(dot(3));
    ctx.insert(dot(2));
    assert!(ctx.vv().is_empty());
    assert_eq!(ctx.cloud().len(), 2);
    ctx.insert(dot(1));
    assert_eq!(ctx.vv().get(&r), Some(&3));
    assert!(ctx.cloud().is_empty());
    assert!(ctx.contains(&dot(2)) && !ctx.contains(&dot(4)));
    ctx.insert(dot(5));
    assert_eq!(ctx.next_dot(r), dot(6));
    let other = CausalContext::from_dots([dot(4)]);
    ctx.merge(&other);
    assert_eq!(ctx.vv().get(&r), Some(&6));
    assert!(ctx.cloud().is_empty());
    assert_eq!(
        CausalContext::from_dots([dot(1), dot(2)]).vv().get(&r),
        Some(&2)
    );
}

#[test]
fn counters_handle_extremes() {
    let mut p = PNCounter::new();
    p.add(R[0], i64::MAX);
    p.add(R[1], i64::MAX);
    assert_eq!(p.value(), i64::MAX);
    p.add(R[2], i64::MIN);
    assert_eq!(p.value(), i64::MAX - 1);
    p.add(ReplicaId(7), i64::MIN);
    p.add(ReplicaId(8), i64::MIN);
    assert_eq!(p.value(), i64::MIN);
    let mut g = GCounter::new();
    g.incr(R[0], u64::MAX);
    g.incr(R[1], 5);
    assert_eq!(g.value(), u64::MAX);
    assert_eq!(g.incr(R[0], 0), GCounter::new());
}

#[test]
fn kinds_and_mismatch_messages() {
    for kind in Kind::ALL {
        assert_eq!(kind.as_str().parse::<Kind>(), Ok(kind));
        assert_eq!(Crdt::empty(kind).kind(), kind);
    }
    assert!("set".parse::<Kind>().is_err());
    let mut set = Crdt::empty(Kind::ORSet);
    let err = set.merge(&Crdt::empty(Kind::PNCounter));
    assert_eq!(
        err.map_err(|e| e.to_string()),
        Err("cannot merge a pncounter delta into an orset".to_owned())
    );
    assert_eq!(set, Crdt::empty(Kind::ORSet));
}

#[test]
fn user_facing_json() {
    let r = R[0];
    let mut clock = HlcClock::new(r);
    let mut pn = PNCounter::new();
    pn.add(r, -3);
    let mut set = ORSet::new();
    set.add(r, "b");
    set.add(r, "a");
    set.add(r, "c");
    set.remove("c");
    let mut reg = LwwRegister::new();
    let mut map = LwwMap::new();
    map.set("k", "v", clock.now(1));
    map.set("gone", "x", clock.now(1));
    map.remove("gone", clock.now(1));
    assert_eq!(Crdt::from(pn).to_json(), serde_json::json!(-3));
    assert_eq!(Crdt::from(set).to_json(), serde_json::json!(["a", "b"]));
    assert_eq!(Crdt::from(reg.clone()).to_json(), serde_json::Value::Null);
    reg.set(Some("hi".into()), clock.now(2));
    assert_eq!(Crdt::from(reg).to_json(), serde_json::json!("hi"));
    assert_eq!(Crdt::from(map).to_json(), serde_json::json!({"k": "v"}));
}

#[test]
fn decode_rejects_trailing_bytes_and_normalizes() {
    let mut bytes = Crdt::empty(Kind::GCounter).encode();
    bytes.push(0);
    assert!(matches!(
        Crdt::decode(&bytes),
        Err(DecodeError::TrailingBytes(1))
    ));
    assert!(Crdt::decode(&[0xff, 0xff]).is_err());
}

#[test]
fn orset_delta_is_tiny_next_to_the_full_state() {
    // 10,000 elements added by 3 replicas, then merged into one state.
    let mut replicas = vec![ORSet::new(); 3];
    for i in 0..10_000 {
        let at = i % 3;
        replicas[at].add(R[at], format!("element-{i:05}"));
    }
    let mut full = ORSet::new();
    for r in &replicas {
        full.merge(r);
    }
    assert_eq!(full.len(), 10_000);
    let delta = full.add(R[1], "element-10000");
    let full_bytes = Crdt::from(full).encode().len();
    let delta_bytes = Crdt::from(delta).encode().len();
    eprintln!(
        "ORSet with 10,000 elements from 3 replicas: full state {full_bytes} bytes, \
         delta of one add {delta_bytes} bytes"
    );
    assert!(delta_bytes * 10 <= full_bytes);
}
