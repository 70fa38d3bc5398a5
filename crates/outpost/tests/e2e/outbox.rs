//! The outbox end to end: writes kept while the center is down, delivered when it returns,
//! with their idempotency keys; permanent refusals visible; a full outbox says so.

use std::time::Duration;

use serde_json::Value;

use crate::support::*;

const SECS: fn(u64) -> Duration = Duration::from_secs;

fn outbox_node(origin: &Origin, outbox: &str) -> NodeConfig {
    NodeConfig::new()
        .id("pos-edge")
        .origin(
            "center",
            &[(origin, PORTLAND)],
            "connect_timeout = \"300ms\"\nresponse_timeout = \"2s\"\n[origins.center.passive]\nejection_time = \"300ms\"",
        )
        .route(
            "pos",
            "/",
            "center",
            &if outbox.contains("retry_initial") {
                format!("[routes.outbox]\n{outbox}")
            } else {
                format!("[routes.outbox]\nretry_initial = \"50ms\"\nretry_max = \"200ms\"\n{outbox}")
            },
        )
}

async fn status_of(node: &Node, url: &str) -> Value {
    client()
        .get(node.url(url))
        .send()
        .await
        .expect("status")
        .json()
        .await
        .expect("status json")
}

#[tokio::test(flavor = "multi_thread")]
async fn writes_are_kept_while_the_center_is_down_and_delivered_with_their_key() {
    let mut center = Origin::echo("us-west").await;
    let node = Node::start(&outbox_node(&center, "")).await;
    let c = client();

    // Center up: the write goes straight through, with an Idempotency-Key added.
    let r = c
        .post(node.url("/echo/sales"))
        .body(r#"{"sku": "TEA-001"}"#)
        .send()
        .await
        .expect("post");
    assert_eq!(r.status(), 200);
    let echo: Value = r.json().await.expect("json");
    let key = echoed(&echo, "idempotency-key");
    assert_eq!(key.len(), 1);
    assert!(key[0].starts_with("outpost-"), "{key:?}");

    // Center down: 202 with a status URL, and the client's own key is kept.
    center.kill();
    let r = c
        .post(node.url("/echo/sales"))
        .header("idempotency-key", "sale-2")
        .body(r#"{"sku": "TEA-002"}"#)
        .send()
        .await
        .expect("post");
    assert_eq!(r.status(), 202);
    assert_eq!(r.headers()["idempotency-key"], "sale-2");
    let accepted: Value = r.json().await.expect("json");
    let url = accepted["status_url"]
        .as_str()
        .expect("status url")
        .to_owned();
    assert!(url.starts_with("/.well-known/outpost/outbox/"), "{url}");
    let s = status_of(&node, &url).await;
    assert_eq!(s["state"], "queued");
    assert_eq!(s["idempotency_key"], "sale-2");

    // Retries happen (and are counted) while it is down.
    eventually("a few attempts", SECS(10), || async {
        status_of(&node, &url).await["attempts"]
            .as_u64()
            .unwrap_or(0)
            >= 2
    })
    .await;
    eventually("the depth gauge shows it", SECS(5), || async {
        node.metric("outpost_outbox_depth{route=\"pos\"}").await >= 1.0
    })
    .await;

    center.restart().await;
    eventually("delivered", SECS(15), || async {
        status_of(&node, &url).await["state"] == "delivered"
    })
    .await;
    let s = status_of(&node, &url).await;
    assert_eq!(s["response"]["status"], 200);
    let delivered: Value =
        serde_json::from_str(s["response"]["body"].as_str().unwrap_or("{}")).expect("echo");
    assert_eq!(echoed(&delivered, "idempotency-key"), ["sale-2"]);
    assert_eq!(delivered["method"], "POST");
    assert_eq!(delivered["body_len"], 18);
    eventually("the depth gauge drains", SECS(5), || async {
        node.metric("outpost_outbox_depth{route=\"pos\"}").await == 0.0
    })
    .await;
    assert!(
        node.metric("outpost_outbox_events_total{route=\"pos\",event=\"delivered\"}")
            .await
            >= 1.0
    );

    // Unknown ids are 404; reads are never kept.
    let r = c
        .get(node.url("/.well-known/outpost/outbox/00000000000000000000000000000000"))
        .send()
        .await
        .expect("get");
    assert_eq!(r.status(), 404);
}

#[tokio::test(flavor = "multi_thread")]
async fn write_behind_answers_at_once_and_keeps_order_per_key() {
    let center = Origin::echo("us-west").await;
    let node = Node::start(&outbox_node(
        &center,
        "mode = \"always\"\norder_key = \"header:x-store-id\"",
    ))
    .await;
    let c = client();
    let mut urls = Vec::new();
    for i in 0..20 {
        let r = c
            .put(node.url(&format!("/cache/stock-{}", i % 2)))
            .header("x-store-id", format!("store-{}", i % 2))
            .body(format!("{i}"))
            .send()
            .await
            .expect("put");
        assert_eq!(r.status(), 202);
        let v: Value = r.json().await.expect("json");
        urls.push(v["status_url"].as_str().expect("url").to_owned());
    }
    for url in &urls {
        eventually("delivered", SECS(15), || async {
            status_of(&node, url).await["state"] == "delivered"
        })
        .await;
    }
    // Each store's writes reached the center in the order they were accepted: the echo app
    // counts requests per name, so the n-th delivery of a store sees count n.
    for (i, url) in urls.iter().enumerate() {
        let s = status_of(&node, url).await;
        let body: Value =
            serde_json::from_str(s["response"]["body"].as_str().unwrap_or("{}")).expect("json");
        assert_eq!(body["changed"], format!("stock-{}", i % 2));
    }
    assert_eq!(center.cache_count("stock-0").await, 10);
    assert_eq!(center.cache_count("stock-1").await, 10);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_permanent_refusal_is_kept_visible_and_a_full_outbox_says_so() {
    let center = Origin::echo("us-west").await;
    let node = Node::start(&outbox_node(&center, "mode = \"always\"\nmax_entries = 3")).await;
    let c = client();
    // POST /status/422 is 405 at the center: a permanent refusal.
    let r = c
        .post(node.url("/status/422"))
        .body("x")
        .send()
        .await
        .expect("post");
    assert_eq!(r.status(), 202);
    let v: Value = r.json().await.expect("json");
    let url = v["status_url"].as_str().expect("url").to_owned();
    eventually("failed for good", SECS(10), || async {
        status_of(&node, &url).await["state"] == "failed"
    })
    .await;
    let s = status_of(&node, &url).await;
    assert_eq!(s["response"]["status"], 405);
    assert_eq!(s["attempts"], 1, "a permanent refusal is not retried");

    // Fill the outbox: stop deliveries by pointing at a dead center.
    drop(center);
    let mut statuses = Vec::new();
    for _ in 0..5 {
        let r = c
            .post(node.url("/echo/x"))
            .body("y")
            .send()
            .await
            .expect("post");
        statuses.push(r.status().as_u16());
        if r.status() == 507 {
            let body: Value = r.json().await.expect("problem");
            assert!(
                body["detail"].as_str().unwrap_or("").contains("is full"),
                "{body}"
            );
        }
    }
    assert_eq!(statuses, [202, 202, 202, 507, 507]);
    assert!(
        node.metric("outpost_outbox_events_total{route=\"pos\",event=\"rejected\"}")
            .await
            >= 2.0
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn kept_writes_survive_kill_9_and_are_delivered_after_restart() {
    let mut center = Origin::echo("us-west").await;
    let mut node = Node::start(&outbox_node(&center, "")).await;
    center.kill();
    let c = client();
    let mut urls = Vec::new();
    for i in 0..30 {
        let r = c
            .post(node.url(&format!("/cache/sale-{i}")))
            .body("{}")
            .send()
            .await
            .expect("post");
        assert_eq!(r.status(), 202);
        let v: Value = r.json().await.expect("json");
        urls.push(v["status_url"].as_str().expect("url").to_owned());
    }
    node.crash_and_restart().await;
    center.restart().await;
    for url in &urls {
        eventually("delivered after the crash", SECS(20), || async {
            status_of(&node, url).await["state"] == "delivered"
        })
        .await;
    }
    for i in 0..30 {
        assert_eq!(center.cache_count(&format!("sale-{i}")).await, 1);
    }
}

/// The smart retail store's promise, measured: 10,000 POS sales through a node whose center
/// goes down and whose own process is killed with SIGKILL, again and again. Every terminal
/// retries a sale (same Idempotency-Key) until the edge answers 201 or 202, as a real POS
/// would. The center (the retail app, deduplicating with outpost_fastapi's IdempotencyStore)
/// must end with exactly 10,000 sales: none lost, none applied twice.
#[tokio::test(flavor = "multi_thread")]
async fn ten_thousand_sales_through_outages_and_kill_9_arrive_exactly_once() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU64, Ordering};

    const SALES: u64 = 10_000;
    const TERMINALS: u64 = 16;
    let mut center = Origin::retail("us-west").await;
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port");
    let config = NodeConfig::new()
        .id("store-1")
        .listeners(&format!("[[listeners]]\naddr = \"127.0.0.1:{port}\"\n"))
        .origin(
            "center",
            &[(&center, PORTLAND)],
            "connect_timeout = \"300ms\"\nresponse_timeout = \"3s\"\n[origins.center.passive]\nejection_time = \"200ms\"",
        )
        .route(
            "pos",
            "/api",
            "center",
            "strip_prefix = true\n[routes.outbox]\norder_key = \"header:x-terminal\"\nretry_initial = \"50ms\"\nretry_max = \"500ms\"",
        );
    let mut node = Node::start(&config).await;
    let base = format!("http://127.0.0.1:{port}");

    let next = Arc::new(AtomicU64::new(0));
    let direct = Arc::new(AtomicU64::new(0));
    let kept = Arc::new(AtomicU64::new(0));
    let retries = Arc::new(AtomicU64::new(0));
    let mut terminals = Vec::new();
    for t in 0..TERMINALS {
        let (next, direct, kept, retries, base) = (
            next.clone(),
            direct.clone(),
            kept.clone(),
            retries.clone(),
            base.clone(),
        );
        terminals.push(tokio::spawn(async move {
            let c = reqwest::Client::builder()
                .no_proxy()
                .timeout(Duration::from_secs(10))
                .build()
                .expect("client");
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= SALES {
                    return;
                }
                let body = format!(
                    r#"{{"store_id":"store-1","sku":"SKU-{}","quantity":1,"unit_price_cents":{}}}"#,
                    i % 97,
                    100 + i % 13
                );
                loop {
                    let sent = c
                        .post(format!("{base}/api/sales"))
                        .header("content-type", "application/json")
                        .header("idempotency-key", format!("sale-{i}"))
                        .header("x-terminal", format!("t{t}"))
                        .body(body.clone())
                        .send()
                        .await;
                    match sent.map(|r| r.status().as_u16()) {
                        Ok(201) => {
                            direct.fetch_add(1, Ordering::Relaxed);
                            break;
                        }
                        Ok(202) => {
                            kept.fetch_add(1, Ordering::Relaxed);
                            break;
                        }
                        // The node is down (or answered something else): try the same sale again.
                        _ => {
                            retries.fetch_add(1, Ordering::Relaxed);
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                    }
                }
                // A till's pace (at most 1,600 sales/s from 16 terminals): queued sales are
                // taken at once, and unpaced terminals would finish before the chaos does.
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }));
    }

    // Chaos while the sales flow: center outages and node kills, interleaved, each when the
    // terminals reach a share of the sales (not after a fixed time: on a fast machine they
    // would finish before the chaos did).
    let started = std::time::Instant::now();
    let mut outages = 0;
    let mut kills = 0;
    // Events that began while terminals were still taking sales (the later ones may come
    // after the last sale: they still kill a node whose outbox holds undelivered sales).
    let mut during_sales = 0;
    let milestones = [1_000, 2_500, 4_000, 5_500, 7_000, 8_500];
    for (round, milestone) in milestones.into_iter().enumerate() {
        while next.load(Ordering::Relaxed) < milestone {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        if next.load(Ordering::Relaxed) < SALES {
            during_sales += 1;
        }
        if round % 2 == 0 {
            center.kill();
            outages += 1;
            tokio::time::sleep(Duration::from_millis(800)).await;
            node.crash_and_restart().await;
            kills += 1;
            center.restart().await;
        } else {
            node.crash_and_restart().await;
            kills += 1;
        }
    }
    for t in terminals {
        t.await.expect("terminal");
    }
    let accepted = direct.load(Ordering::Relaxed) + kept.load(Ordering::Relaxed);
    assert_eq!(accepted, SALES, "every sale was eventually accepted");

    // Drain: every kept sale reaches the center.
    let count = || async {
        let v: Value = client()
            .get(format!("{}/sales/count", center.url()))
            .send()
            .await
            .expect("count")
            .json()
            .await
            .expect("count json");
        v["count"].as_u64().unwrap_or(0)
    };
    let drain = std::time::Instant::now();
    loop {
        let depth = node.metric("outpost_outbox_depth{route=\"pos\"}").await;
        let stored = count().await;
        if depth == 0.0 && stored >= SALES {
            break;
        }
        if drain.elapsed() > SECS(120) {
            let events: Vec<String> = node
                .metrics()
                .await
                .lines()
                .filter(|l| l.starts_with("outpost_outbox"))
                .map(str::to_owned)
                .collect();
            panic!(
                "the outbox did not drain: depth {depth}, center holds {stored}\n{}\n{}",
                events.join("\n"),
                node.logs
                    .all()
                    .iter()
                    .filter(|l| l.contains("WARN") || l.contains("ERROR"))
                    .take(20)
                    .cloned()
                    .collect::<Vec<_>>()
                    .join("\n")
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Nothing more arrives later (a duplicate would show up as a count above SALES).
    tokio::time::sleep(Duration::from_millis(500)).await;
    let stored = count().await;
    let lost = SALES.saturating_sub(stored);
    let duplicated = stored.saturating_sub(SALES);
    eprintln!(
        "FIGURE outbox crash test: {SALES} sales, {} answered 201 directly, {} kept (202), {} client retries, {outages} center outages, {kills} node kill -9s ({during_sales} events while sales were taken), {:.1} s; center holds {stored}: lost = {lost}, duplicated = {duplicated}",
        direct.load(Ordering::Relaxed),
        kept.load(Ordering::Relaxed),
        retries.load(Ordering::Relaxed),
        started.elapsed().as_secs_f64()
    );
    assert_eq!((lost, duplicated), (0, 0));
    assert!(
        kept.load(Ordering::Relaxed) > 0,
        "the outages made the node keep sales"
    );
    assert_eq!((kills, outages), (6, 3));
    assert!(
        during_sales >= 3,
        "only {during_sales} of the 6 outages and kills hit while sales were being taken"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn while_writes_wait_new_ones_of_the_same_key_queue_behind_them() {
    let mut center = Origin::echo("us-west").await;
    // Retries 5 s apart: a-1's next delivery attempt comes well after the center is back and
    // a-2 was posted (with 50-200 ms retries, a-1 was sometimes delivered first, and a-2 then
    // rightly went straight through).
    let node = Node::start(&outbox_node(
        &center,
        "order_key = \"header:x-store-id\"\nretry_initial = \"5s\"\nretry_max = \"5s\"",
    ))
    .await;
    let c = client();
    center.kill();
    let post = |store: &'static str, name: &'static str| {
        let c = c.clone();
        let url = node.url(&format!("/cache/{name}"));
        async move {
            c.post(url)
                .header("x-store-id", store)
                .body("{}")
                .send()
                .await
                .expect("post")
                .status()
                .as_u16()
        }
    };
    assert_eq!(post("a", "a-1").await, 202);
    // The center is back before the deliverer's next attempt; the second write of store a must
    // still wait for the first, while store b's first write goes straight through.
    center.restart().await;
    assert_eq!(post("a", "a-2").await, 202, "queued behind a-1");
    eventually("store b goes straight through", SECS(10), || async {
        post("b", "b-1").await == 200
    })
    .await;
    eventually("store a delivered in order", SECS(15), || async {
        center.cache_count("a-2").await == 1
    })
    .await;
    assert_eq!(center.cache_count("a-1").await, 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_kept_write_invalidates_the_cached_copy_once_delivered() {
    let mut center = Origin::echo("us-west").await;
    let node = Node::start(&outbox_node(&center, "").route(
        "cached",
        "/cache",
        "center",
        "[routes.cache]\ndefault_ttl = \"1h\"\n[routes.outbox]\nretry_initial = \"50ms\"\nretry_max = \"200ms\"",
    ))
    .await;
    let c = client();
    let cache_status = |r: &reqwest::Response| {
        r.headers()
            .get("cache-status")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned()
    };
    eventually("cached", SECS(5), || async {
        let r = c.get(node.url("/cache/item-7")).send().await.expect("get");
        cache_status(&r).contains("hit")
    })
    .await;
    center.kill();
    let r = c
        .put(node.url("/cache/item-7"))
        .body("new price")
        .send()
        .await
        .expect("put");
    assert_eq!(r.status(), 202);
    let url = r.json::<Value>().await.expect("json")["status_url"]
        .as_str()
        .expect("url")
        .to_owned();
    // Still the old copy while the write waits (stale-if-error is not even needed: it is fresh).
    let r = c.get(node.url("/cache/item-7")).send().await.expect("get");
    assert!(cache_status(&r).contains("hit"));
    center.restart().await;
    eventually("delivered", SECS(15), || async {
        status_of(&node, &url).await["state"] == "delivered"
    })
    .await;
    let r = c.get(node.url("/cache/item-7")).send().await.expect("get");
    assert!(
        !cache_status(&r).contains("hit"),
        "the delivered write invalidated the copy: {}",
        cache_status(&r)
    );
}
