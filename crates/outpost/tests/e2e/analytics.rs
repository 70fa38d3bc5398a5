//! Edge analytics end to end: events posted to a node, counted locally, rolled up into
//! per-window summaries that wait while the center is down and reach it exactly once (by
//! upsert) when it returns; and what that saves compared with shipping raw events.

use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::{Value, json};

use crate::support::*;

const SECS: fn(u64) -> Duration = Duration::from_secs;

/// Ten event types, weighted like a shop's traffic (views dominate, purchases are rare).
const TYPES: [(&str, u32); 10] = [
    ("page_view", 400),
    ("product_view", 200),
    ("search", 100),
    ("add_to_cart", 80),
    ("remove_from_cart", 30),
    ("checkout_start", 40),
    ("purchase", 20),
    ("wishlist_add", 50),
    ("share", 30),
    ("review_submit", 50),
];

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_millis() as u64
}

/// `n` events stamped across `[t0, t0 + span_ms)`: types by weight, keys Zipf-like
/// (log-uniform rank) among 1,000 product paths, values on purchases and carts.
fn workload(n: usize, t0: u64, span_ms: u64) -> Vec<Value> {
    let mut rng = fastrand::Rng::with_seed(42);
    let total: u32 = TYPES.iter().map(|t| t.1).sum();
    (0..n)
        .map(|i| {
            let mut pick = rng.u32(..total);
            let kind = TYPES
                .iter()
                .find(|(_, w)| {
                    if pick < *w {
                        true
                    } else {
                        pick -= w;
                        false
                    }
                })
                .map_or("page_view", |t| t.0);
            let rank = (1000f64.powf(rng.f64()) as u64).clamp(1, 1000);
            let ts = t0 + (i as u64 * span_ms) / n as u64;
            let mut e = json!({"type": kind, "key": format!("/products/{rank}"), "ts": ts});
            if matches!(kind, "purchase" | "add_to_cart") {
                e["value"] = json!(f64::from(rng.u32(100..10_000)) / 100.0);
            }
            e
        })
        .collect()
}

async fn admin_get(node: &Node, path: &str) -> Value {
    let (status, body) = node.state("GET", path, None).await;
    assert_eq!(status, 200, "{path}: {body}");
    body
}

#[tokio::test(flavor = "multi_thread")]
async fn summaries_wait_for_the_center_and_are_counted_once() {
    let mut center = Origin::retail("us-west").await;
    let node = Node::start(
        &NodeConfig::new()
            .id("shop-edge")
            .origin("center", &[(&center, PORTLAND)], "")
            .route("shop", "/", "center", "")
            .raw(&format!(
                "[analytics]\nenabled = true\nwindow = \"1s\"\ngrace = \"200ms\"\ncenter_url = \"{}/analytics/summaries\"\n",
                center.url()
            )),
    )
    .await;
    // The center goes away before the first summary is due: everything must be kept.
    center.kill();

    // 20,000 events in batches of 200. What sets the savings is events per (node, window):
    // the events are stamped into one 1-s window, the traffic a default 60-s window sees at
    // ~333 events/s. Stamped in the next whole second, so they are live (not late) events.
    const N: usize = 20_000;
    let t0 = (now_ms() / 1000 + 1) * 1000;
    let events = workload(N, t0, 1000);
    let mut want: BTreeMap<String, (u64, f64)> = BTreeMap::new();
    let mut keys: BTreeMap<(String, String), u64> = BTreeMap::new();
    for e in &events {
        let kind = e["type"].as_str().expect("type").to_owned();
        let w = want.entry(kind.clone()).or_default();
        w.0 += 1;
        w.1 += e["value"].as_f64().unwrap_or(0.0);
        *keys
            .entry((kind, e["key"].as_str().expect("key").to_owned()))
            .or_default() += 1;
    }
    let mut raw_bytes = 0usize;
    for chunk in events.chunks(200) {
        let body = json!({ "events": chunk }).to_string();
        raw_bytes += body.len();
        let resp = client()
            .post(node.url("/.well-known/outpost/events"))
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .expect("post events");
        assert_eq!(resp.status(), 202);
        let accepted: Value = resp.json().await.expect("json");
        assert_eq!(accepted["accepted"], chunk.len());
    }

    // A bad batch is refused whole, naming the bad event.
    let resp = client()
        .post(node.url("/.well-known/outpost/events"))
        .body(r#"{"events":[{"type":"page_view","key":"/a"},{"key":"/b"}]}"#)
        .send()
        .await
        .expect("post bad");
    assert_eq!(resp.status(), 400);
    let problem: Value = resp.json().await.expect("problem");
    assert!(
        problem["detail"]
            .as_str()
            .unwrap_or("")
            .starts_with("event 1:"),
        "{problem}"
    );

    // The local query API sees every event at once.
    let by_type = admin_get(&node, "/analytics/counts?by=type&limit=100").await;
    let local: BTreeMap<String, u64> = by_type["counts"]
        .as_array()
        .expect("counts")
        .iter()
        .map(|c| {
            (
                c["name"].as_str().expect("name").to_owned(),
                c["count"].as_u64().expect("n"),
            )
        })
        .collect();
    let want_counts: BTreeMap<String, u64> = want.iter().map(|(k, v)| (k.clone(), v.0)).collect();
    assert_eq!(local, want_counts);
    let top = admin_get(
        &node,
        &format!(
            "/analytics/counts?by=key&type=page_view&from_ms={t0}&to_ms={}&limit=1",
            t0 + 1000
        ),
    )
    .await;
    let best = keys
        .iter()
        .filter(|((k, _), _)| k == "page_view")
        .max_by(|a, b| a.1.cmp(b.1).then(b.0.1.cmp(&a.0.1)))
        .expect("page views");
    assert_eq!(top["counts"][0]["name"], best.0.1.as_str());
    assert_eq!(top["counts"][0]["count"], *best.1);

    // The window closes; its summary is tried, fails, and is kept.
    eventually(
        "a summary kept after failed deliveries",
        SECS(30),
        || async {
            let s = admin_get(&node, "/analytics/summaries").await;
            s["pending"].as_u64() >= Some(1)
                && s["summaries"]
                    .as_array()
                    .is_some_and(|l| l.iter().any(|x| x["attempts"].as_u64() >= Some(1)))
        },
    )
    .await;
    let kept = admin_get(&node, "/analytics/summaries").await;
    assert_eq!(kept["stats"]["summaries_sent"], 0, "{kept}");

    // The center returns; every window is delivered.
    center.restart().await;
    eventually("every summary delivered", SECS(90), || async {
        let s = admin_get(&node, "/analytics/summaries").await;
        s["pending"] == 0 && s["summaries"].as_array().is_some_and(|l| !l.is_empty())
    })
    .await;
    let totals: Value = client()
        .get(format!("{}/analytics/totals", center.url()))
        .send()
        .await
        .expect("totals")
        .json()
        .await
        .expect("totals json");
    assert_eq!(totals["events"], N as u64, "{totals}");
    for (kind, (count, sum)) in &want {
        assert_eq!(totals["types"][kind]["count"], *count, "{kind}: {totals}");
        let got = totals["types"][kind]["sum"].as_f64().expect("sum");
        assert!(
            (got - sum).abs() < 1e-6 * sum.max(1.0),
            "{kind}: {got} vs {sum}"
        );
    }

    // A re-send (the node crashed after the center answered, before it recorded that) is an
    // upsert: the center still counts every event once.
    let summaries = admin_get(&node, "/analytics/summaries?limit=100").await;
    let first = &summaries["summaries"][0];
    let again = json!({
        "node": "shop-edge",
        "region": "ap-northeast",
        "window_start_ms": first["window_start_ms"],
        "window_ms": first["window_ms"],
        "version": first["version"],
        "events": first["events"],
        "types": first["types"],
    });
    let resp = client()
        .post(format!("{}/analytics/summaries", center.url()))
        .header(
            "idempotency-key",
            format!("analytics-shop-edge-{}", first["window_start_ms"]),
        )
        .json(&again)
        .send()
        .await
        .expect("re-send");
    assert!(resp.status().is_success());
    let after: Value = client()
        .get(format!("{}/analytics/totals", center.url()))
        .send()
        .await
        .expect("totals")
        .json()
        .await
        .expect("totals json");
    assert_eq!(after["types"], totals["types"]);
    assert_eq!(after["events"], N as u64);

    let stats = &summaries["stats"];
    let sent = stats["summary_bytes_sent"].as_u64().expect("bytes sent");
    let windows = summaries["summaries"].as_array().map_or(0, Vec::len);
    assert!(sent > 0, "{summaries}");
    assert_eq!(stats["event_bytes"], raw_bytes as u64);
    let ratio = raw_bytes as f64 / sent as f64;
    println!(
        "FIGURE analytics bytes: raw {raw_bytes} B in events, {sent} B of summaries sent to the center, ratio {ratio:.0}× ({N} events, {windows} window(s), {} summaries delivered)",
        stats["summaries_sent"]
    );
    assert!(
        ratio >= 100.0,
        "summaries should be ≥ 100× smaller, got {ratio:.1}×"
    );
    eventually(
        "analytics metrics caught up",
        Duration::from_secs(10),
        || async {
            node.metric("outpost_analytics_events_total{result=\"accepted\"}")
                .await
                == N as f64
                && node
                    .metric("outpost_analytics_summaries_total{result=\"sent\"}")
                    .await
                    >= 1.0
                && node.metric("outpost_analytics_pending_summaries").await == 0.0
        },
    )
    .await;
}

/// In a fleet, summaries travel over JetStream (`OUTPOST_ANALYTICS`, one message per node and
/// window, deduplicated by `Nats-Msg-Id`) instead of HTTP.
#[tokio::test(flavor = "multi_thread")]
async fn in_a_fleet_summaries_go_over_jetstream() {
    let hub = Nats::hub();
    let node = Node::start(&NodeConfig::new().id("fleet-shop").raw(&format!(
        "[fleet]\nnats = \"{}\"\njetstream_domain = \"hub\"\n[analytics]\nenabled = true\nwindow = \"1s\"\ngrace = \"200ms\"\n",
        hub.url()
    )))
    .await;
    const N: usize = 1_000;
    let t0 = (now_ms() / 1000 + 1) * 1000;
    let events = workload(N, t0, 1000);
    for chunk in events.chunks(250) {
        let resp = client()
            .post(node.url("/.well-known/outpost/events"))
            .body(json!({ "events": chunk }).to_string())
            .send()
            .await
            .expect("post events");
        assert_eq!(resp.status(), 202);
    }
    eventually("the summary was published", SECS(20), || async {
        let s = admin_get(&node, "/analytics/summaries").await;
        s["summaries"]
            .as_array()
            .is_some_and(|a| !a.is_empty() && a.iter().all(|x| x["delivered"] == true))
    })
    .await;
    // What the center would consume: read the stream with a plain NATS client.
    let script = format!(
        "import asyncio, json, nats\nasync def m():\n    nc = await nats.connect('{}')\n    js = nc.jetstream()\n    sub = await js.pull_subscribe('outpost.analytics.>', stream='OUTPOST_ANALYTICS')\n    msgs = await sub.fetch(100, timeout=2)\n    total = 0\n    for msg in msgs:\n        doc = json.loads(msg.data)\n        assert doc['node'] == 'fleet-shop', doc\n        assert msg.headers.get('Nats-Msg-Id', '').startswith('fleet-shop-'), msg.headers\n        total += sum(t['count'] for t in doc['types'].values())\n    print(total)\n    await nc.close()\nasyncio.run(m())\n",
        hub.url()
    );
    let stdout = run_python(&script);
    assert_eq!(stdout.trim(), N.to_string());
}
