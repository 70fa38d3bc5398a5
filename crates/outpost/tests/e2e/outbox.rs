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
            &format!("[routes.outbox]\nretry_initial = \"50ms\"\nretry_max = \"200ms\"\n{outbox}"),
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
