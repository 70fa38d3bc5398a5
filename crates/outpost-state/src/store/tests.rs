use std::time::Duration;

use super::*;
use crate::crdt::{Crdt, Hlc, ReplicaId};

fn open(dir: &Path, replicate: bool) -> Store {
    let mut o = StoreOptions::new(dir);
    o.replicate = replicate;
    Store::open(o).expect("open store")
}

fn value(store: &Store, name: &str) -> serde_json::Value {
    store.object(name).map(|o| o.to_json()).unwrap_or_default()
}

#[tokio::test]
async fn kv_put_get_delete_and_list() {
    let dir = tempfile::tempdir().expect("tempdir");
    let s = open(dir.path(), false);
    s.kv_put(
        "shop",
        "price:1",
        b"10".to_vec(),
        Some("text/plain".into()),
        None,
    )
    .await
    .expect("put");
    s.kv_put("shop", "price:2", b"20".to_vec(), None, None)
        .await
        .expect("put");
    s.kv_put("shop", "stock:1", b"3".to_vec(), None, None)
        .await
        .expect("put");
    s.kv_put("other", "price:9", b"x".to_vec(), None, None)
        .await
        .expect("put");
    let e = s.kv_get("shop", "price:1").expect("get").expect("present");
    assert_eq!(e.value, b"10");
    assert_eq!(e.content_type.as_deref(), Some("text/plain"));
    assert_eq!(e.stamp.replica, s.replica());

    let keys: Vec<_> = s
        .kv_list("shop", "price:", None, 10)
        .expect("list")
        .into_iter()
        .map(|k| k.key)
        .collect();
    assert_eq!(keys, ["price:1", "price:2"]);
    let page: Vec<_> = s
        .kv_list("shop", "", Some("price:1"), 1)
        .expect("list")
        .into_iter()
        .map(|k| k.key)
        .collect();
    assert_eq!(page, ["price:2"]);

    s.kv_delete("shop", "price:1").await.expect("delete");
    assert!(s.kv_get("shop", "price:1").expect("get").is_none());
    assert_eq!(
        s.kv_list("shop", "price:", None, 10).expect("list").len(),
        1
    );
}

#[tokio::test]
async fn bad_names_and_big_values_are_refused_with_the_limit() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut o = StoreOptions::new(dir.path());
    o.max_value_bytes = 8;
    let s = Store::open(o).expect("open");
    let err = s
        .kv_put("ns", "k", vec![0; 9], None, None)
        .await
        .expect_err("too big");
    assert!(
        err.is_client_error() && err.to_string().contains("8-byte limit"),
        "{err}"
    );
    let err = s
        .kv_put("", "k", vec![], None, None)
        .await
        .expect_err("empty ns");
    assert!(
        err.to_string().contains("namespace must not be empty"),
        "{err}"
    );
    let err = s
        .kv_put("ns", "a\nb", vec![], None, None)
        .await
        .expect_err("control");
    assert!(err.to_string().contains("control characters"), "{err}");
    let err = s
        .kv_put("ns", "k", vec![], None, Some(Duration::ZERO))
        .await
        .expect_err("zero ttl");
    assert!(err.to_string().contains("ttl"), "{err}");
}

#[tokio::test]
async fn expired_keys_are_never_returned_and_are_collected() {
    let dir = tempfile::tempdir().expect("tempdir");
    let s = open(dir.path(), false);
    s.kv_put(
        "ns",
        "short",
        b"v".to_vec(),
        None,
        Some(Duration::from_millis(20)),
    )
    .await
    .expect("put");
    s.kv_put(
        "ns",
        "long",
        b"v".to_vec(),
        None,
        Some(Duration::from_secs(3600)),
    )
    .await
    .expect("put");
    let e = s.kv_get("ns", "short").expect("get").expect("live");
    let expires = e.expires_ms.expect("has expiry");
    // Wait (with a deadline) until the wall clock passes the expiry.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while now_ms() <= expires {
        assert!(std::time::Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(s.kv_get("ns", "short").expect("get").is_none());
    let listed: Vec<_> = s.kv_list("ns", "", None, 10).expect("list");
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].key, "long");

    let stats = s.sweep().await.expect("sweep");
    assert_eq!(
        stats,
        SweepStats {
            expired: 1,
            forgotten: 0
        }
    );
    // The tombstone is kept for the tombstone TTL, then forgotten.
    let later = now_ms() + s.shared.options.tombstone_ttl.as_millis() as u64 + 1000;
    let stats = s.sweep_at(later).await.expect("sweep");
    // By then the hour-long key has expired too, and both tombstones are old enough to go.
    assert_eq!(
        stats,
        SweepStats {
            expired: 1,
            forgotten: 2
        }
    );
}

#[tokio::test]
async fn the_newest_write_wins_whatever_the_arrival_order() {
    let dir = tempfile::tempdir().expect("tempdir");
    let s = open(dir.path(), false);
    let other = ReplicaId(42);
    let stamp = |wall: u64| Hlc {
        wall_ms: wall,
        logical: 0,
        replica: other,
    };
    let write = |v: Option<&str>, wall: u64| {
        Change::Kv(KvWrite {
            ns: "ns".into(),
            key: "k".into(),
            value: v.map(|v| v.as_bytes().to_vec()),
            content_type: None,
            expires_ms: None,
            stamp: stamp(wall),
        })
    };
    let far = now_ms() + 1000;
    assert_eq!(
        s.apply_remote(vec![write(Some("new"), far)])
            .await
            .expect("apply"),
        1
    );
    // An older write arriving late changes nothing.
    assert_eq!(
        s.apply_remote(vec![write(Some("old"), far - 500)])
            .await
            .expect("apply"),
        0
    );
    assert_eq!(
        s.kv_get("ns", "k").expect("get").expect("live").value,
        b"new"
    );
    // A newer delete wins, and its tombstone keeps an older put from resurrecting the key.
    s.apply_remote(vec![write(None, far + 1)])
        .await
        .expect("apply");
    s.apply_remote(vec![write(Some("older"), far - 1)])
        .await
        .expect("apply");
    assert!(s.kv_get("ns", "k").expect("get").is_none());
    // A local write after observing the remote stamp is stamped later, so it wins.
    s.kv_put("ns", "k", b"local".to_vec(), None, None)
        .await
        .expect("put");
    let e = s.kv_get("ns", "k").expect("get").expect("live");
    assert_eq!(e.value, b"local");
    assert!(e.stamp > stamp(far + 1));
}

#[tokio::test]
async fn crdt_state_survives_reopen_including_compaction() {
    let dir = tempfile::tempdir().expect("tempdir");
    let replica;
    {
        let s = open(dir.path(), false);
        replica = s.replica();
        for _ in 0..300 {
            s.update("visits", Op::Add(1)).await.expect("incr");
        }
        s.update("visits", Op::Add(-5)).await.expect("decr");
        s.update("tags", Op::SetAdd(vec!["a".into(), "b".into(), "c".into()]))
            .await
            .expect("add");
        s.update("tags", Op::SetRemove(vec!["b".into()]))
            .await
            .expect("rm");
        s.update("cfg", Op::MapSet("color".into(), "\"red\"".into()))
            .await
            .expect("map");
        s.update("motd", Op::RegisterSet(Some("\"hi\"".into())))
            .await
            .expect("reg");
        s.update("hits", Op::GIncr(7)).await.expect("g");
    }
    let s = open(dir.path(), false);
    assert_eq!(s.replica(), replica, "the replica id is kept with the file");
    assert_eq!(value(&s, "visits"), serde_json::json!(295));
    assert_eq!(value(&s, "tags"), serde_json::json!(["a", "c"]));
    assert_eq!(value(&s, "hits"), serde_json::json!(7));
    assert_eq!(value(&s, "cfg")["color"], serde_json::json!("\"red\""));
    let kinds: Vec<_> = s
        .objects()
        .into_iter()
        .map(|(n, k)| (n, k.as_str()))
        .collect();
    assert_eq!(kinds.len(), 5);
    // The journal was folded into a snapshot at least once (300 deltas > the threshold).
    let conn = schema::open_reader(s.path()).expect("reader");
    let journaled: i64 = conn
        .query_row(
            "SELECT count(*) FROM crdt_delta WHERE name = 'visits'",
            [],
            |r| r.get(0),
        )
        .expect("count");
    assert!(journaled < i64::from(COMPACT_AFTER), "{journaled}");
}

#[tokio::test]
async fn a_lost_disk_comes_back_as_a_new_replica() {
    let a = tempfile::tempdir().expect("tempdir");
    let first = open(a.path(), false).replica();
    drop(a);
    let b = tempfile::tempdir().expect("tempdir");
    assert_ne!(open(b.path(), false).replica(), first);
}

#[tokio::test]
async fn a_kind_conflict_fails_only_that_operation() {
    let dir = tempfile::tempdir().expect("tempdir");
    let s = open(dir.path(), false);
    s.update("x", Op::Add(1)).await.expect("counter");
    let (a, b, c) = tokio::join!(
        s.update("x", Op::SetAdd(vec!["e".into()])),
        s.update("x", Op::Add(2)),
        s.kv_put("ns", "k", b"v".to_vec(), None, None),
    );
    let err = a.expect_err("conflict");
    assert!(
        matches!(
            err,
            StoreError::KindConflict {
                existing: "pncounter",
                ..
            }
        ),
        "{err}"
    );
    b.expect("the counter op in the same batch still commits");
    c.expect("the put in the same batch still commits");
    assert_eq!(value(&s, "x"), serde_json::json!(3));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_increments_are_all_counted() {
    let dir = tempfile::tempdir().expect("tempdir");
    let s = open(dir.path(), false);
    let tasks: Vec<_> = (0..400)
        .map(|_| {
            let s = s.clone();
            tokio::spawn(async move { s.update("n", Op::Add(1)).await })
        })
        .collect();
    for t in tasks {
        t.await.expect("join").expect("incr");
    }
    assert_eq!(value(&s, "n"), serde_json::json!(400));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_kv_increments_each_see_a_distinct_value_and_none_is_lost() {
    let dir = tempfile::tempdir().expect("tempdir");
    let s = open(dir.path(), true);
    let tasks: Vec<_> = (0..300)
        .map(|_| {
            let s = s.clone();
            tokio::spawn(async move { s.kv_increment("fn.app", "visits", 1).await })
        })
        .collect();
    let mut seen = Vec::new();
    for t in tasks {
        seen.push(t.await.expect("join").expect("increment"));
    }
    seen.sort_unstable();
    assert_eq!(seen, (1..=300).collect::<Vec<u64>>());
    let e = s.kv_get("fn.app", "visits").expect("get").expect("present");
    assert_eq!(e.value, b"300");
    // Replicated like any KV write: the last one is queued for the fleet.
    assert_eq!(s.unpublished_count().expect("backlog"), 300);
    // And it is on disk.
    drop(s);
    let s = open(dir.path(), true);
    assert_eq!(
        s.kv_increment("fn.app", "visits", 5).await.expect("incr"),
        305
    );
}

#[tokio::test]
async fn a_kv_increment_refuses_what_is_not_a_counter_and_overflow() {
    let dir = tempfile::tempdir().expect("tempdir");
    let s = open(dir.path(), false);
    s.kv_put("ns", "name", b"alice".to_vec(), None, None)
        .await
        .expect("put");
    let e = s
        .kv_increment("ns", "name", 1)
        .await
        .expect_err("not a counter");
    assert!(e.is_client_error(), "{e}");
    assert!(e.to_string().contains("not a decimal counter"), "{e}");
    assert_eq!(
        s.kv_get("ns", "name").expect("get").expect("kept").value,
        b"alice"
    );
    s.kv_put("ns", "big", u64::MAX.to_string().into_bytes(), None, None)
        .await
        .expect("put");
    let e = s.kv_increment("ns", "big", 1).await.expect_err("overflow");
    assert!(e.to_string().contains("overflow"), "{e}");
    // A failed increment fails only itself: the store keeps writing.
    assert_eq!(s.kv_increment("ns", "fresh", 7).await.expect("incr"), 7);
    let e = s
        .kv_increment("", "k", 1)
        .await
        .expect_err("empty namespace");
    assert!(e.is_client_error(), "{e}");
}

#[tokio::test]
async fn local_changes_are_queued_for_the_fleet_only_when_replicating() {
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let s = open(dir.path(), false);
        s.update("n", Op::Add(1)).await.expect("incr");
        assert_eq!(s.unpublished_count().expect("count"), 0);
    }
    let s = open(dir.path(), true);
    s.update("n", Op::Add(2)).await.expect("incr");
    s.kv_put("ns", "k", b"v".to_vec(), None, None)
        .await
        .expect("put");
    let queued = s.unpublished(0, 1 << 20).expect("unpublished");
    assert_eq!(queued.len(), 2);
    assert!(matches!(&queued[0].1, Change::Crdt { name, .. } if name == "n"));
    assert!(matches!(&queued[1].1, Change::Kv(w) if w.key == "k"));
    // Remote changes are not re-queued: they are already in the fleet's stream.
    let foreign = Change::Crdt {
        name: "n".into(),
        delta: {
            let mut c = crate::crdt::PNCounter::default();
            Crdt::PNCounter(c.add(ReplicaId(7), 10))
        },
    };
    assert_eq!(
        s.apply_remote(vec![foreign.clone()]).await.expect("apply"),
        1
    );
    assert_eq!(
        s.apply_remote(vec![foreign]).await.expect("apply"),
        0,
        "idempotent"
    );
    assert_eq!(value(&s, "n"), serde_json::json!(13));
    assert_eq!(s.unpublished_count().expect("count"), 2);
    s.mark_published(queued[1].0).await.expect("mark");
    assert_eq!(s.unpublished_count().expect("count"), 0);
    assert_eq!(s.published_upto().expect("upto"), queued[1].0);
    let dirty = s.take_dirty();
    assert!(dirty.objects.contains("n"));
    assert!(dirty.kv_buckets.contains(&kv_bucket("ns", "k")));
    assert_eq!(s.take_dirty(), Dirty::default());
}

#[tokio::test]
async fn a_bucket_snapshot_carries_tombstones() {
    let dir = tempfile::tempdir().expect("tempdir");
    let s = open(dir.path(), false);
    s.kv_put("ns", "k", b"v".to_vec(), None, None)
        .await
        .expect("put");
    s.kv_delete("ns", "k").await.expect("delete");
    let rows = s.kv_bucket(kv_bucket("ns", "k")).expect("bucket");
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].value, None);
    // Replaying the snapshot into another store reproduces the deletion.
    let dir2 = tempfile::tempdir().expect("tempdir");
    let t = open(dir2.path(), false);
    t.apply_remote(rows.into_iter().map(Change::Kv).collect())
        .await
        .expect("apply");
    assert!(t.kv_get("ns", "k").expect("get").is_none());
    assert_eq!(t.kv_bucket(kv_bucket("ns", "k")).expect("bucket").len(), 1);
}

fn entry(id: &str, key: &str, body: &str) -> crate::outbox::NewEntry {
    crate::outbox::NewEntry {
        id: id.into(),
        route: "pos".into(),
        order_key: key.into(),
        method: "POST".into(),
        uri: "/sales".into(),
        headers: vec![("content-type".into(), b"application/json".to_vec())],
        body: body.as_bytes().to_vec(),
        idempotency_key: format!("k-{id}"),
        identity: None,
        client_url: Some(("shop.example".into(), format!("/api/sales?{id}"))),
    }
}

const ROOMY: crate::outbox::Limits = crate::outbox::Limits {
    max_entries: 100,
    max_bytes: 1 << 20,
};

fn answer(status: u16) -> crate::outbox::StoredResponse {
    crate::outbox::StoredResponse {
        status,
        headers: vec![("content-type".into(), "application/json".into())],
        body: b"{}".to_vec(),
    }
}

#[tokio::test]
async fn outbox_entries_are_due_in_order_per_key_and_settle() {
    use crate::outbox::{OutboxState, Settlement};
    let dir = tempfile::tempdir().expect("tempdir");
    let s = open(dir.path(), false);
    for (id, key) in [("a1", "store-a"), ("b1", "store-b"), ("a2", "store-a")] {
        s.outbox_put(entry(id, key, "{}"), ROOMY)
            .await
            .expect("put");
    }
    assert_eq!(s.outbox_depths()["pos"].entries, 3);
    let due: Vec<_> = s
        .outbox_due(10)
        .expect("due")
        .into_iter()
        .map(|e| e.new.id)
        .collect();
    assert_eq!(due, ["a1", "b1"], "one head per order key");

    // a1 fails for now: it is retried later, and a2 waits behind it.
    s.outbox_settle(
        "a1",
        Settlement::Retry {
            next_ms: now_ms() + 60_000,
            error: "connect refused".into(),
        },
    )
    .await
    .expect("retry");
    let due: Vec<_> = s
        .outbox_due(10)
        .expect("due")
        .into_iter()
        .map(|e| e.new.id)
        .collect();
    assert_eq!(due, ["b1"]);
    let a1 = s.outbox_get("a1").expect("get").expect("exists");
    assert_eq!((a1.state, a1.attempts), (OutboxState::Queued, 1));
    assert_eq!(a1.last_error.as_deref(), Some("connect refused"));

    s.outbox_settle("b1", Settlement::Delivered(answer(201)))
        .await
        .expect("delivered");
    s.outbox_settle("b1", Settlement::Failed(answer(400)))
        .await
        .expect("a second settlement is ignored");
    let b1 = s.outbox_get("b1").expect("get").expect("exists");
    assert_eq!(b1.state, OutboxState::Delivered);
    assert_eq!(b1.response.map(|r| r.status), Some(201));
    assert!(b1.new.body.is_empty(), "the body is dropped once delivered");
    assert_eq!(s.outbox_depths()["pos"].entries, 2);

    // Permanent refusal: visible as failed, and the next entry of the key becomes due.
    s.outbox_settle("a1", Settlement::Failed(answer(422)))
        .await
        .expect("failed");
    let due: Vec<_> = s
        .outbox_due(10)
        .expect("due")
        .into_iter()
        .map(|e| e.new.id)
        .collect();
    assert_eq!(due, ["a2"]);
    assert_eq!(
        s.outbox_get("a1").expect("get").map(|e| e.state),
        Some(OutboxState::Failed)
    );
}

#[tokio::test]
async fn a_full_outbox_refuses_and_survives_reopen() {
    let dir = tempfile::tempdir().expect("tempdir");
    let limits = crate::outbox::Limits {
        max_entries: 2,
        max_bytes: 1 << 20,
    };
    {
        let s = open(dir.path(), false);
        s.outbox_put(entry("1", "k", "x"), limits)
            .await
            .expect("put");
        s.outbox_put(entry("2", "k", "x"), limits)
            .await
            .expect("put");
        let err = s
            .outbox_put(entry("3", "k", "x"), limits)
            .await
            .expect_err("full");
        assert!(matches!(err, StoreError::Full(_)), "{err}");
        assert!(err.to_string().contains("2 entries"), "{err}");
        let small = crate::outbox::Limits {
            max_entries: 10,
            max_bytes: 3,
        };
        let err = s
            .outbox_put(entry("4", "k", "xxxx"), small)
            .await
            .expect_err("bytes");
        assert!(matches!(err, StoreError::Full(_)), "{err}");
    }
    let s = open(dir.path(), false);
    assert_eq!(s.outbox_depths()["pos"].entries, 2, "depth is reloaded");
    assert!(s.outbox_oldest().expect("oldest").is_some());
    let due = s.outbox_due(10).expect("due");
    assert_eq!(due.len(), 1);
    assert_eq!(due[0].new.headers[0].0, "content-type");
    assert_eq!(due[0].new.idempotency_key, "k-1");
    assert_eq!(
        due[0].new.client_url,
        Some(("shop.example".into(), "/api/sales?1".into()))
    );
}

/// A ttl below 1 ms would be stored as already expired, and one past a century would overflow
/// the expiry time (it panicked the writer thread): both are refused, and the store keeps going.
#[tokio::test]
async fn ttls_out_of_range_are_refused_and_the_store_keeps_writing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let s = open(dir.path(), false);
    for ttl in [
        Duration::from_nanos(1),
        Duration::from_secs(101 * 365 * 86_400),
        Duration::MAX,
    ] {
        let err = s
            .kv_put("ns", "k", b"v".to_vec(), None, Some(ttl))
            .await
            .expect_err("out of range");
        assert!(err.is_client_error(), "{ttl:?}: {err}");
    }
    s.kv_put(
        "ns",
        "k",
        b"v".to_vec(),
        None,
        Some(Duration::from_secs(100 * 365 * 86_400)),
    )
    .await
    .expect("a century is allowed");
    assert!(s.kv_get("ns", "k").expect("get").is_some(), "and readable");
}

/// A counter change that would leave the counter's range is refused (it used to answer
/// success and saturate or clamp, so an acknowledged change did not count), and the counter
/// keeps its exact value.
#[tokio::test]
async fn counter_changes_past_the_range_are_refused_and_change_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let s = open(dir.path(), false);
    s.update("pn", Op::Add(i64::MAX)).await.expect("to the top");
    let err = s.update("pn", Op::Add(1)).await.expect_err("past the top");
    assert!(
        err.is_client_error() && err.to_string().contains("range"),
        "{err}"
    );
    s.update("pn", Op::Add(-5)).await.expect("back down");
    assert_eq!(value(&s, "pn"), serde_json::json!(i64::MAX - 5));
    s.update("neg", Op::Add(i64::MIN + 1))
        .await
        .expect("to the bottom");
    s.update("neg", Op::Add(-1))
        .await
        .expect("exactly i64::MIN");
    assert!(
        s.update("neg", Op::Add(-1)).await.is_err(),
        "past the bottom"
    );
    s.update("g", Op::GIncr(u64::MAX))
        .await
        .expect("to the top");
    assert!(s.update("g", Op::GIncr(1)).await.is_err(), "past the top");
    assert_eq!(value(&s, "g"), serde_json::json!(u64::MAX));
}

/// Conditional writes are checked in the writer's transaction: of many concurrent create-only
/// writes exactly one succeeds; replace-only needs a live (not expired, not deleted) value.
#[tokio::test]
async fn conditional_kv_writes_are_atomic() {
    let dir = tempfile::tempdir().expect("tempdir");
    let s = open(dir.path(), false);
    let mut attempts = tokio::task::JoinSet::new();
    for i in 0..50 {
        let s = s.clone();
        attempts.spawn(async move {
            s.kv_put_if(
                "ns",
                "once",
                format!("{i}").into_bytes(),
                None,
                None,
                KvCondition::Absent,
            )
            .await
        });
    }
    let results: Vec<_> = attempts.join_all().await;
    let won = results.iter().filter(|r| r.is_ok()).count();
    assert_eq!(won, 1, "exactly one create-only write wins");
    assert!(results.iter().all(|r| match r {
        Ok(_) => true,
        Err(e) => matches!(e, StoreError::PreconditionFailed(_)) && e.is_client_error(),
    }));

    let replace = |key: &'static str| {
        let s = s.clone();
        async move {
            s.kv_put_if("ns", key, b"new".to_vec(), None, None, KvCondition::Exists)
                .await
        }
    };
    assert!(replace("missing").await.is_err(), "nothing to replace");
    s.kv_put("ns", "gone", b"v".to_vec(), None, None)
        .await
        .expect("put");
    s.kv_delete("ns", "gone").await.expect("delete");
    assert!(replace("gone").await.is_err(), "a deleted key has no value");
    assert!(replace("once").await.is_ok(), "a live value is replaced");
    assert_eq!(
        s.kv_get("ns", "once").expect("get").map(|e| e.value),
        Some(b"new".to_vec())
    );
}
