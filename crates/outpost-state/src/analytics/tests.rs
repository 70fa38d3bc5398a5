use std::time::Duration;

use super::*;

/// A pinned "now": 2024-11-23 08:40:00 UTC, a multiple of 60 s.
const NOW: u64 = 1_732_351_200_000;
const MIN: u64 = 60_000;

fn open(dir: &Path) -> Analytics {
    Analytics::open(AnalyticsOptions::new(dir, "edge-1")).expect("open analytics")
}

fn open_with(dir: &Path, f: impl FnOnce(&mut AnalyticsOptions)) -> Analytics {
    let mut o = AnalyticsOptions::new(dir, "edge-1");
    f(&mut o);
    Analytics::open(o).expect("open analytics")
}

fn ev(ts_ms: u64, kind: &str, key: &str, value: Option<f64>) -> Event {
    Event {
        ts_ms,
        kind: kind.into(),
        key: key.into(),
        value,
    }
}

fn types(s: &Summary) -> serde_json::Value {
    serde_json::from_str(&s.types).expect("summary JSON")
}

#[test]
fn a_window_closes_at_its_end_plus_grace() {
    let (w, g) = (Duration::from_secs(60), Duration::from_secs(5));
    // [NOW, NOW+60s) ends at NOW+60s; with 5 s grace it is closed from NOW+65s on.
    assert_eq!(closed_upto(NOW + MIN + 4_999, w, g), NOW);
    assert_eq!(closed_upto(NOW + MIN + 5_000, w, g), NOW + MIN);
    assert_eq!(closed_upto(NOW + 5_000, w, g), NOW);
    assert_eq!(closed_upto(NOW + 4_999, w, g), NOW - MIN);
}

#[tokio::test]
async fn windows_roll_up_only_once_closed_and_split_at_boundaries() {
    let dir = tempfile::tempdir().expect("tempdir");
    let a = open(dir.path());
    a.ingest_at(
        vec![
            ev(NOW - 1, "page_view", "/a", None), // previous window
            ev(NOW, "page_view", "/a", None),     // first ms of the window
            ev(NOW + MIN - 1, "page_view", "/b", Some(2.5)), // last ms of the window
            ev(NOW + MIN, "page_view", "/c", None), // next window
        ],
        NOW + MIN,
    )
    .await
    .expect("ingest");
    // Just before NOW+60s+5s: only the previous window [NOW-60s, NOW) is closed.
    assert_eq!(a.rollup_at(NOW + MIN + 4_999).await.expect("rollup"), 1);
    let due = a.due_summaries(NOW + 2 * MIN, 10).expect("due");
    assert_eq!(due.len(), 1);
    assert_eq!(due[0].window_start_ms, NOW - MIN);
    assert_eq!(due[0].events, 1);
    // At NOW+65s the window [NOW, NOW+60s) closes with exactly its two events.
    assert_eq!(a.rollup_at(NOW + MIN + 5_000).await.expect("rollup"), 1);
    let due = a.due_summaries(NOW + 2 * MIN, 10).expect("due");
    assert_eq!(due.len(), 2);
    let s = &due[1];
    assert_eq!((s.window_start_ms, s.window_ms, s.events), (NOW, MIN, 2));
    let t = types(s);
    assert_eq!(t["page_view"]["count"], 2);
    assert_eq!(t["page_view"]["sum"], 2.5);
    assert_eq!(t["page_view"]["keys"], 2);
    assert_eq!(t["page_view"]["top"], serde_json::json!({"/a": 1, "/b": 1}));
    assert_eq!(t["page_view"]["other"], 0);
}

#[tokio::test]
async fn rolling_up_again_changes_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let a = open(dir.path());
    let batch: Vec<_> = (0..100)
        .map(|i| {
            ev(
                NOW + i * 100,
                ["view", "cart"][i as usize % 2],
                &format!("/p/{}", i % 7),
                Some(1.0),
            )
        })
        .collect();
    a.ingest_at(batch, NOW).await.expect("ingest");
    let later = NOW + 2 * MIN;
    assert_eq!(a.rollup_at(later).await.expect("rollup"), 1);
    let first = a.recent_summaries(10).expect("recent");
    // Again at the same time, later, and from a fresh summarise of the same rows.
    assert_eq!(a.rollup_at(later).await.expect("rollup"), 0);
    assert_eq!(a.rollup_at(later + 10 * MIN).await.expect("rollup"), 0);
    assert_eq!(a.recent_summaries(10).expect("recent"), first);
    let conn = crate::schema::open_reader(a.path()).expect("reader");
    let (events, again) = summarise(&conn, NOW, MIN, 50).expect("summarise");
    assert_eq!(events, 100);
    assert_eq!(serde_json::to_string(&again).expect("json"), first[0].types);
    // The payload is the same bytes each time: a re-send is the same document.
    let p1 = first[0].payload("edge-1", Some("ap-northeast"));
    let p2 = a.recent_summaries(1).expect("recent")[0].payload("edge-1", Some("ap-northeast"));
    assert_eq!(p1, p2);
    let doc: serde_json::Value = serde_json::from_slice(&p1).expect("payload JSON");
    assert_eq!(doc["node"], "edge-1");
    assert_eq!(doc["window_start_ms"], NOW);
    assert_eq!(doc["types"]["view"]["count"], 50);
    assert_eq!(
        first[0].idempotency_key("edge-1"),
        format!("analytics-edge-1-{NOW}")
    );
}

#[tokio::test]
async fn top_keys_are_listed_and_the_rest_is_other() {
    let dir = tempfile::tempdir().expect("tempdir");
    let a = open_with(dir.path(), |o| o.top_keys = 3);
    let mut batch = Vec::new();
    // key k<i> gets 10 - i events: k0 10, k1 9, k2 8, k3 7 … k9 1 (55 in all).
    for i in 0..10u64 {
        for j in 0..(10 - i) {
            batch.push(ev(NOW + j, "page_view", &format!("k{i}"), Some(0.5)));
        }
    }
    // A tie at the cut: "a-tie" also has 8 events and sorts before "k2".
    for j in 0..8 {
        batch.push(ev(NOW + j, "page_view", "a-tie", None));
    }
    batch.push(ev(NOW, "search", "shoes", None));
    a.ingest_at(batch, NOW).await.expect("ingest");
    a.rollup_at(NOW + 2 * MIN).await.expect("rollup");
    let s = &a.recent_summaries(1).expect("recent")[0];
    let t = types(s);
    assert_eq!(
        t["page_view"]["top"],
        serde_json::json!({"k0": 10, "k1": 9, "a-tie": 8})
    );
    assert_eq!(t["page_view"]["count"], 63);
    assert_eq!(t["page_view"]["other"], 63 - 27);
    assert_eq!(t["page_view"]["keys"], 11);
    assert_eq!(t["page_view"]["sum"], 27.5);
    assert_eq!(t["search"]["top"], serde_json::json!({"shoes": 1}));
    assert_eq!(s.events, 64);
}

#[tokio::test]
async fn a_late_event_reopens_its_window_and_a_new_version_is_due() {
    let dir = tempfile::tempdir().expect("tempdir");
    let a = open(dir.path());
    a.ingest_at(vec![ev(NOW + 1, "view", "/a", None)], NOW + 1)
        .await
        .expect("ingest");
    a.rollup_at(NOW + 2 * MIN).await.expect("rollup");
    let s = a.due_summaries(NOW + 2 * MIN, 10).expect("due").remove(0);
    assert!(
        a.mark_delivered(s.window_start_ms, s.version, 100)
            .await
            .expect("mark")
    );
    assert!(a.due_summaries(NOW + 2 * MIN, 10).expect("due").is_empty());
    // Ten minutes late, an event for that window arrives.
    a.ingest_at(vec![ev(NOW + 2, "view", "/b", None)], NOW + 10 * MIN)
        .await
        .expect("late ingest");
    assert_eq!(a.rollup_at(NOW + 10 * MIN).await.expect("rollup"), 1);
    let again = a.due_summaries(NOW + 10 * MIN, 10).expect("due");
    assert_eq!(again.len(), 1);
    assert_eq!(
        (again[0].window_start_ms, again[0].version, again[0].events),
        (NOW, 2, 2)
    );
    // Settling the old version does not settle the new one.
    assert!(!a.mark_delivered(NOW, 1, 100).await.expect("mark"));
    assert_eq!(a.pending_summaries().expect("pending"), 1);
    assert!(a.mark_delivered(NOW, 2, 100).await.expect("mark"));
    assert_eq!(a.pending_summaries().expect("pending"), 0);
    assert_eq!(a.stats().summaries_sent, 3);
    assert_eq!(a.stats().summary_bytes_sent, 300);
}

#[tokio::test]
async fn failed_deliveries_wait_for_their_next_attempt() {
    let dir = tempfile::tempdir().expect("tempdir");
    let a = open(dir.path());
    a.ingest_at(vec![ev(NOW, "view", "/a", None)], NOW)
        .await
        .expect("ingest");
    a.rollup_at(NOW + 2 * MIN).await.expect("rollup");
    a.mark_failed(NOW, 1, NOW + 3 * MIN, "connection refused".into())
        .await
        .expect("fail");
    assert!(
        a.due_summaries(NOW + 3 * MIN - 1, 10)
            .expect("due")
            .is_empty()
    );
    let due = a.due_summaries(NOW + 3 * MIN, 10).expect("due");
    assert_eq!(due[0].attempts, 1);
    assert_eq!(due[0].last_error.as_deref(), Some("connection refused"));
    assert_eq!(a.stats().summaries_failed, 1);
}

#[tokio::test]
async fn retention_drops_old_events_and_delivered_summaries_only() {
    let dir = tempfile::tempdir().expect("tempdir");
    let a = open_with(dir.path(), |o| o.retention = Duration::from_secs(3600));
    let hour = 60 * MIN;
    a.ingest_at(
        vec![
            ev(NOW, "view", "/a", None),
            ev(NOW + MIN, "view", "/b", None),
            ev(NOW + 30 * MIN, "view", "/c", None),
        ],
        NOW + 30 * MIN,
    )
    .await
    .expect("ingest");
    assert_eq!(a.rollup_at(NOW + 40 * MIN).await.expect("rollup"), 3);
    assert!(a.mark_delivered(NOW, 1, 1).await.expect("mark"));
    // An hour and a half later: the events at NOW and NOW+1min are past the 1 h retention;
    // the delivered summary goes, the undelivered one (NOW+1min) stays until delivered.
    let stats = a.sweep_at(NOW + hour + MIN + 1).await.expect("sweep");
    assert_eq!(
        stats,
        SweepStats {
            events: 2,
            summaries: 1
        }
    );
    let left: Vec<_> = a
        .recent_summaries(10)
        .expect("recent")
        .iter()
        .map(|s| s.window_start_ms)
        .collect();
    assert_eq!(left, vec![NOW + 30 * MIN, NOW + MIN]);
    let counts = a
        .counts(GroupBy::Key, None, 0, u64::MAX, 10)
        .expect("counts");
    assert_eq!(counts.len(), 1);
    assert_eq!(counts[0].name, "/c");
}

#[tokio::test]
async fn counts_by_type_and_key_over_a_time_window() {
    let dir = tempfile::tempdir().expect("tempdir");
    let a = open(dir.path());
    a.ingest_at(
        vec![
            ev(NOW, "view", "/a", Some(1.0)),
            ev(NOW + 1, "view", "/a", Some(2.0)),
            ev(NOW + 2, "view", "/b", None),
            ev(NOW + 3, "cart", "/a", Some(10.0)),
            ev(NOW + 1000, "view", "/z", None),
        ],
        NOW,
    )
    .await
    .expect("ingest");
    let by_type = a
        .counts(GroupBy::Type, None, NOW, NOW + 1000, 10)
        .expect("counts");
    assert_eq!(
        by_type,
        vec![
            Count {
                name: "view".into(),
                count: 3,
                sum: 3.0
            },
            Count {
                name: "cart".into(),
                count: 1,
                sum: 10.0
            },
        ]
    );
    let by_key = a
        .counts(GroupBy::Key, Some("view"), NOW, NOW + 2000, 10)
        .expect("counts");
    let names: Vec<_> = by_key.iter().map(|c| (c.name.as_str(), c.count)).collect();
    assert_eq!(names, vec![("/a", 2), ("/b", 1), ("/z", 1)]);
    let limited = a
        .counts(GroupBy::Key, None, NOW, NOW + 2000, 1)
        .expect("counts");
    assert_eq!(limited[0].name, "/a");
    assert_eq!(limited[0].count, 3);
}

#[tokio::test]
async fn a_bad_event_refuses_the_batch_and_names_its_index() {
    let dir = tempfile::tempdir().expect("tempdir");
    let a = open(dir.path());
    let ok = ev(NOW, "view", "/a", None);
    let cases = [
        (ev(NOW, "", "/a", None), "type must be 1 to 64 bytes"),
        (
            ev(NOW, &"t".repeat(65), "/a", None),
            "type must be 1 to 64 bytes",
        ),
        (ev(NOW, "view", &"k".repeat(257), None), "the limit is 256"),
        (ev(NOW, "vi\new", "/a", None), "control characters"),
        (ev(NOW, "view", "/a", Some(f64::NAN)), "finite"),
        (ev(NOW - 24 * 60 * MIN, "view", "/a", None), "in the past"),
        (
            ev(NOW + 6 * MIN, "view", "/a", None),
            "ahead of this node's clock",
        ),
    ];
    for (bad, why) in cases {
        let err = a
            .ingest_at(vec![ok.clone(), ok.clone(), bad], NOW)
            .await
            .expect_err("must refuse");
        let msg = err.to_string();
        assert!(msg.starts_with("event 2: "), "{msg}");
        assert!(msg.contains(why), "{msg} should say {why}");
        assert!(err.is_client_error());
    }
    // Nothing of a refused batch was stored; edges of the accepted range are fine.
    assert!(
        a.counts(GroupBy::Type, None, 0, u64::MAX, 10)
            .expect("counts")
            .is_empty()
    );
    let edge_past = NOW - (24 * 60 - 1) * MIN;
    a.ingest_at(
        vec![
            ev(edge_past, "view", "", None),
            ev(NOW + 5 * MIN, "view", &"k".repeat(256), None),
        ],
        NOW,
    )
    .await
    .expect("edges accepted");
    assert_eq!(a.stats().events_accepted, 2);
    assert_eq!(a.stats().events_rejected, 21);
}

#[test]
fn a_committed_batch_survives_the_process_dying_without_closing() {
    // With WAL + synchronous = NORMAL a commit is written to the WAL before it returns; only
    // the fsync is skipped. A process that dies keeps what it wrote (the OS has it); leaking
    // the connection (no close, no checkpoint) is what `kill -9` looks like to SQLite.
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join(FILE_NAME);
    let conn = open_writer(&path).expect("open");
    let sync: i64 = conn
        .query_row("PRAGMA synchronous", [], |r| r.get(0))
        .expect("pragma");
    assert_eq!(sync, 1, "NORMAL");
    conn.execute(
        "INSERT INTO events (ts_ms, kind, key) VALUES (1, 'view', '/a')",
        [],
    )
    .expect("insert");
    std::mem::forget(conn);
    assert!(dir.path().join(format!("{FILE_NAME}-wal")).exists());
    let again = open_writer(&path).expect("reopen");
    let n: i64 = again
        .query_row("SELECT count(*) FROM events", [], |r| r.get(0))
        .expect("count");
    assert_eq!(n, 1);
}

#[test]
fn the_node_store_is_not_an_analytics_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = crate::store::Store::open(crate::StoreOptions::new(dir.path())).expect("store");
    let err = open_writer(store.path()).expect_err("must refuse");
    assert!(matches!(err, StoreError::Foreign { .. }), "{err}");
    // And both live side by side in one data_dir.
    open(dir.path());
}

#[tokio::test]
async fn summaries_and_the_rollup_mark_survive_a_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let a = open(dir.path());
        a.ingest_at(vec![ev(NOW, "view", "/a", None)], NOW)
            .await
            .expect("ingest");
        a.rollup_at(NOW + 2 * MIN).await.expect("rollup");
    }
    let a = open(dir.path());
    assert_eq!(a.pending_summaries().expect("pending"), 1);
    // A late event after the restart still reopens the window (the mark was persisted).
    a.ingest_at(vec![ev(NOW + 5, "view", "/b", None)], NOW + 3 * MIN)
        .await
        .expect("ingest");
    assert_eq!(a.rollup_at(NOW + 3 * MIN).await.expect("rollup"), 1);
    assert_eq!(a.recent_summaries(1).expect("recent")[0].version, 2);
}
