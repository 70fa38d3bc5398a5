//! Fleet end-to-end: real `outpost` nodes replicating through a real NATS 2.15.1 (JetStream hub,
//! leaf nodes per site), partitions made by killing servers, and the center's invalidations
//! published by the `outpost_fastapi` helper.

use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::support::*;

const SECS: fn(u64) -> Duration = Duration::from_secs;

fn fleet_node(id: &str, nats: &Nats) -> NodeConfig {
    NodeConfig::new().id(id).raw(&format!(
        "[fleet]\nnats = \"{}\"\njetstream_domain = \"hub\"\nsnapshot_interval = \"1s\"\n",
        nats.url()
    ))
}

async fn start_fleet(ids: &[&str], nats: &Nats) -> Vec<Node> {
    let mut nodes = Vec::new();
    for id in ids {
        nodes.push(Node::start(&fleet_node(id, nats)).await);
    }
    for n in &nodes {
        eventually("the fleet link is up", SECS(15), || async {
            n.state("GET", "/state/fleet", None).await.1["fleet"]["connected"] == true
        })
        .await;
    }
    nodes
}

async fn counter(n: &Node, name: &str) -> i64 {
    n.state("GET", &format!("/state/counters/{name}"), None)
        .await
        .1["value"]
        .as_i64()
        .unwrap_or(i64::MIN)
}

async fn incr(n: &Node, name: &str, by: i64) {
    let (status, body) = n
        .state(
            "POST",
            &format!("/state/counters/{name}/incr?by={by}"),
            None,
        )
        .await;
    assert_eq!(status, 200, "{body}");
}

/// A KV value as the raw text stored (None when absent).
async fn kv(n: &Node, ns: &str, key: &str) -> Option<String> {
    let resp = client()
        .get(n.admin_url(&format!("/state/kv/{ns}/{key}")))
        .bearer_auth("test-token")
        .send()
        .await
        .expect("kv get");
    if resp.status() != 200 {
        return None;
    }
    Some(resp.text().await.expect("kv body"))
}

async fn put(n: &Node, ns: &str, key: &str, value: &str) {
    let (status, body) = n
        .state("PUT", &format!("/state/kv/{ns}/{key}"), Some(value))
        .await;
    assert_eq!(status, 204, "{body}");
}

async fn set(n: &Node, name: &str) -> Value {
    n.state("GET", &format!("/state/sets/{name}"), None).await.1["value"].clone()
}

/// Waits until every node reports the same value; returns how long it took.
async fn converge<'a, F, Fut>(
    what: &str,
    nodes: &[&'a Node],
    deadline: Duration,
    read: F,
) -> Duration
where
    F: Fn(&'a Node) -> Fut,
    Fut: std::future::Future<Output = Value>,
{
    let start = Instant::now();
    loop {
        let mut values = Vec::new();
        for n in nodes {
            values.push(read(n).await);
        }
        if values.windows(2).all(|w| w[0] == w[1]) {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < deadline,
            "{what} did not converge in {deadline:?}: {values:?}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

#[tokio::test(flavor = "multi_thread")]
async fn three_nodes_converge_on_kv_and_crdts_and_report_propagation() {
    let hub = Nats::hub();
    let nodes = start_fleet(&["tokyo-1", "osaka-1", "seoul-1"], &hub).await;
    let all: Vec<&Node> = nodes.iter().collect();

    // Every node writes; every node ends with everything.
    for (i, n) in nodes.iter().enumerate() {
        incr(n, "visits", (i as i64 + 1) * 10).await;
        put(n, "shop", &format!("from-{i}"), &format!("v{i}")).await;
        let (s, _) = n
            .state(
                "POST",
                "/state/sets/carts/add",
                Some(&format!("{{\"elements\": [\"cart-{i}\"]}}")),
            )
            .await;
        assert_eq!(s, 200);
        let (s, _) = n
            .state("POST", "/state/gcounters/hits/incr?by=2", None)
            .await;
        assert_eq!(s, 200);
        let (s, _) = n
            .state(
                "PUT",
                &format!("/state/maps/prices/sku-{i}"),
                Some(&format!("{{\"yen\": {}}}", 100 * (i + 1))),
            )
            .await;
        assert_eq!(s, 200);
    }
    converge("visits", &all, SECS(10), |n| async move {
        json!(counter(n, "visits").await)
    })
    .await;
    assert_eq!(counter(&nodes[0], "visits").await, 60);
    for n in &nodes {
        for i in 0..3 {
            eventually("kv replicated", SECS(10), || async {
                kv(n, "shop", &format!("from-{i}")).await.as_deref() == Some(&*format!("v{i}"))
            })
            .await;
        }
    }
    converge(
        "carts",
        &all,
        SECS(10),
        |n| async move { set(n, "carts").await },
    )
    .await;
    assert_eq!(
        set(&nodes[2], "carts").await,
        json!(["cart-0", "cart-1", "cart-2"])
    );
    converge("prices", &all, SECS(10), |n| async move {
        n.state("GET", "/state/maps/prices", None).await.1["value"].clone()
    })
    .await;
    let (_, hits) = nodes[1].state("GET", "/state/gcounters/hits", None).await;
    assert_eq!(hits["value"], 6);

    // Concurrent writes to one key: every node settles on the same (newest-stamped) value.
    let (a, b, c) = tokio::join!(
        put(&nodes[0], "shop", "banner", "a"),
        put(&nodes[1], "shop", "banner", "b"),
        put(&nodes[2], "shop", "banner", "c"),
    );
    let _ = (a, b, c);
    converge("banner", &all, SECS(10), |n| async move {
        json!(kv(n, "shop", "banner").await)
    })
    .await;

    // Propagation: a write on one node, polled on the two others until visible.
    let mut samples = Vec::new();
    for i in 0..60 {
        let writer = &nodes[i % 3];
        let key = format!("p{i}");
        let started = Instant::now();
        put(writer, "prop", &key, "x").await;
        for reader in nodes.iter().filter(|n| n.addr != writer.addr) {
            // A tight poll (not `eventually`'s 25 ms) so the figure is the replication's.
            while kv(reader, "prop", &key).await.is_none() {
                assert!(started.elapsed() < SECS(10), "write {key} not propagated");
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }
        samples.push(started.elapsed().as_secs_f64() * 1000.0);
    }
    samples.sort_by(f64::total_cmp);
    eprintln!(
        "FIGURE propagation (write on one node -> visible on both others, incl. HTTP polling): p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms over {} writes",
        percentile(&samples, 0.5),
        percentile(&samples, 0.99),
        samples[samples.len() - 1],
        samples.len()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_partitioned_site_keeps_writing_and_converges_after_healing_without_loss() {
    let hub = Nats::hub();
    let mut leaf = Nats::leaf(&hub);
    let a = Node::start(&fleet_node("hub-a", &hub)).await;
    let b = Node::start(&fleet_node("hub-b", &hub)).await;
    let mut c = Node::start(&fleet_node("site-c", &leaf)).await;
    for n in [&a, &b, &c] {
        eventually("linked", SECS(15), || async {
            n.state("GET", "/state/fleet", None).await.1["fleet"]["connected"] == true
        })
        .await;
    }
    incr(&a, "stock", 100).await;
    let (s, _) = a.state("POST", "/state/sets/tags", None).await;
    assert_eq!(s, 405, "reading is GET; adding is POST …/add");
    a.state(
        "POST",
        "/state/sets/tags/add",
        Some(r#"{"elements": ["sale", "new"]}"#),
    )
    .await;
    converge("baseline", &[&a, &b, &c], SECS(10), |n| async move {
        json!([counter(n, "stock").await, set(n, "tags").await])
    })
    .await;

    // The site's link goes down: both sides keep accepting writes.
    leaf.kill();
    eventually("site link down", SECS(15), || async {
        c.state("GET", "/state/fleet", None).await.1["fleet"]["connected"] == false
    })
    .await;
    for _ in 0..20 {
        incr(&a, "stock", -1).await;
    }
    for _ in 0..30 {
        incr(&c, "stock", -1).await;
    }
    put(&a, "shop", "hub-side", "1").await;
    put(&c, "shop", "site-side", "1").await;
    // Concurrent remove (hub) and re-add (site) of the same element: the add wins.
    a.state(
        "POST",
        "/state/sets/tags/remove",
        Some(r#"{"elements": ["sale"]}"#),
    )
    .await;
    c.state(
        "POST",
        "/state/sets/tags/add",
        Some(r#"{"elements": ["sale", "site"]}"#),
    )
    .await;
    // The site node crashes while partitioned; its queued writes are on disk.
    c.crash_and_restart().await;
    incr(&c, "stock", -5).await;
    assert_eq!(
        counter(&c, "stock").await,
        65,
        "the site sees its own writes"
    );

    // Heal.
    leaf.start();
    let healed = converge("after heal", &[&a, &b, &c], SECS(20), |n| async move {
        json!([
            counter(n, "stock").await,
            set(n, "tags").await,
            kv(n, "shop", "hub-side").await,
            kv(n, "shop", "site-side").await
        ])
    })
    .await;
    assert_eq!(
        counter(&b, "stock").await,
        100 - 20 - 30 - 5,
        "no update lost"
    );
    assert_eq!(set(&b, "tags").await, json!(["new", "sale", "site"]));
    eventually("the site's backlog drained", SECS(10), || async {
        c.metric("outpost_fleet_backlog_changes").await == 0.0
    })
    .await;
    assert_eq!(c.metric("outpost_fleet_connected").await, 1.0);
    assert!(c.metric("outpost_fleet_changes_published_total").await >= 33.0);
    assert!(a.metric("outpost_fleet_changes_applied_total").await >= 33.0);
    assert_eq!(kv(&b, "shop", "site-side").await.as_deref(), Some("1"));
    eprintln!(
        "FIGURE convergence after the site link healed (leaf restart included): {:.0} ms",
        healed.as_secs_f64() * 1000.0
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_whole_backbone_can_go_down_and_come_back() {
    let mut hub = Nats::hub();
    let nodes = start_fleet(&["n1", "n2", "n3"], &hub).await;
    let all: Vec<&Node> = nodes.iter().collect();
    incr(&nodes[0], "orders", 1).await;
    converge("baseline", &all, SECS(10), |n| async move {
        json!(counter(n, "orders").await)
    })
    .await;
    hub.kill();
    for n in &nodes {
        for _ in 0..10 {
            incr(n, "orders", 1).await;
        }
        put(n, "last", "writer", "someone").await;
    }
    // Each node only sees its own writes while the backbone is down.
    assert_eq!(counter(&nodes[2], "orders").await, 11);
    hub.start();
    let started = Instant::now();
    for n in &nodes {
        eventually("every write everywhere", SECS(30), || async {
            counter(n, "orders").await == 31
        })
        .await;
    }
    let healed = started.elapsed();
    converge("last writer", &all, SECS(10), |n| async move {
        json!(kv(n, "last", "writer").await)
    })
    .await;
    eprintln!(
        "FIGURE convergence after the NATS server came back: {:.0} ms",
        healed.as_secs_f64() * 1000.0
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_new_node_catches_up_from_snapshots_when_the_delta_stream_lost_history() {
    let hub = Nats::hub();
    let first = start_fleet(&["old-1"], &hub).await;
    let old = &first[0];
    for i in 0..5 {
        incr(old, "visits", 1).await;
        put(old, "shop", &format!("k{i}"), "v").await;
    }
    old.state("PUT", "/state/registers/motd", Some("\"welcome\""))
        .await;
    let rounds = || async {
        old.state("GET", "/state/fleet", None).await.1["fleet"]["snapshot_rounds"]
            .as_u64()
            .unwrap_or(0)
    };
    // Two more rounds: the second one started after the last write, so it has published it.
    let after_writes = rounds().await;
    eventually("snapshots published", SECS(15), || async {
        rounds().await >= after_writes + 2
    })
    .await;
    // Forget every delta: only the snapshot stream can tell a newcomer what happened.
    let script = format!(
        "import asyncio, nats\nasync def m():\n    nc = await nats.connect('{}')\n    js = nc.jetstream()\n    await js.purge_stream('OUTPOST_DELTAS')\n    print((await js.stream_info('OUTPOST_DELTAS')).state.messages)\n    await nc.close()\nasyncio.run(m())\n",
        hub.url()
    );
    let stdout = run_python(&script);
    assert_eq!(stdout.trim(), "0");

    let newcomer = Node::start(&fleet_node("new-1", &hub)).await;
    eventually("caught up from snapshots", SECS(15), || async {
        counter(&newcomer, "visits").await == 5
            && kv(&newcomer, "shop", "k4").await.is_some()
            && newcomer.state("GET", "/state/registers/motd", None).await.1["value"] == "welcome"
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn invalidations_from_the_center_purge_every_node() {
    let hub = Nats::hub();
    let origin = Origin::echo("us-west").await;
    let mut nodes = Vec::new();
    for id in ["edge-1", "edge-2", "edge-3"] {
        let cfg = fleet_node(id, &hub)
            .origin("api", &[(&origin, PORTLAND)], "")
            .route("api", "/", "api", "[routes.cache]\ndefault_ttl = \"1h\"");
        nodes.push(Node::start(&cfg).await);
    }
    let c = client();
    let url_of = |n: &Node| n.url("/cache/item?tag=product-42");
    for n in &nodes {
        // Miss, then (once stored) hits.
        eventually("a cache hit", SECS(5), || async {
            let r = c.get(url_of(n)).send().await.expect("get");
            r.headers()["cache-status"]
                .to_str()
                .unwrap_or("")
                .contains("hit")
        })
        .await;
    }
    // The center purges by tag with the outpost_fastapi helper (a real NATS client).
    let script = format!(
        "import asyncio\nfrom outpost_fastapi import Invalidator\nasync def m():\n    async with await Invalidator.connect('{}', source='center') as inv:\n        print(await inv.purge(tags=['product-42']))\nasyncio.run(m())\n",
        hub.url()
    );
    run_python(&script);
    for n in &nodes {
        eventually("the tag purge reached the node", SECS(5), || async {
            n.logs.contains("Applied a fleet invalidation.")
        })
        .await;
        let r = c.get(url_of(n)).send().await.expect("get");
        let status = r.headers()["cache-status"]
            .to_str()
            .unwrap_or("")
            .to_owned();
        assert!(
            !status.contains("hit"),
            "purged, so fetched again: {status}"
        );
    }
    let lags: Vec<f64> = nodes
        .iter()
        .flat_map(|n| n.logs.all())
        .filter_map(|l| serde_json::from_str::<Value>(&l).ok())
        .filter_map(|v| v["propagation_ms"].as_f64())
        .collect();
    assert_eq!(lags.len(), 3, "one purge per node");
    // Measured by each node from the center's publish timestamp (the Python client's start-up
    // is not part of it); generous, so that a loaded CI machine does not fail it.
    assert!(
        lags.iter().all(|ms| *ms < 5_000.0),
        "purged everywhere within the deadline: {lags:?} ms"
    );
    eprintln!(
        "FIGURE invalidation propagation center -> node (publish timestamp to purge applied): {lags:?} ms"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_lone_node_keeps_every_acknowledged_write_through_kill_9() {
    let mut node = Node::start(&NodeConfig::new().id("alone")).await;
    // Writes in flight from many clients at once (they share fsyncs: group commit).
    let mut tasks = Vec::new();
    for i in 0..200 {
        let url = node.admin_url(&format!("/state/kv/pos/sale-{i}"));
        tasks.push(tokio::spawn(async move {
            client()
                .put(url)
                .bearer_auth("test-token")
                .body(format!("{{\"sale\": {i}}}"))
                .send()
                .await
                .map(|r| r.status().as_u16())
        }));
    }
    for _ in 0..50 {
        incr(&node, "sales", 1).await;
    }
    for t in tasks {
        assert_eq!(t.await.expect("join").expect("put"), 204);
    }
    node.crash_and_restart().await;
    for i in 0..200 {
        assert_eq!(
            kv(&node, "pos", &format!("sale-{i}")).await.as_deref(),
            Some(&*format!("{{\"sale\": {i}}}")),
            "acknowledged write {i} survived kill -9"
        );
    }
    assert_eq!(counter(&node, "sales").await, 50);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_state_api_answers_bad_calls_with_clear_errors() {
    let node = Node::start(&NodeConfig::new().id("api")).await;
    let c = client();
    // No token: refused, nothing stored.
    let r = c
        .put(node.admin_url("/state/kv/ns/k"))
        .body("v")
        .send()
        .await
        .expect("put");
    assert_eq!(r.status(), 401);
    assert_eq!(kv(&node, "ns", "k").await, None);

    let (s, body) = node
        .state("PUT", "/state/kv/ns/k?ttl=soon", Some("v"))
        .await;
    assert_eq!(s, 400);
    assert!(
        body["error"].as_str().unwrap_or("").contains("90s"),
        "{body}"
    );

    let (s, _) = node.state("GET", "/state/kv/ns/missing", None).await;
    assert_eq!(s, 404);

    incr(&node, "thing", 1).await;
    let (s, body) = node
        .state(
            "POST",
            "/state/sets/thing/add",
            Some(r#"{"elements": ["x"]}"#),
        )
        .await;
    assert_eq!(s, 409);
    assert!(
        body["error"].as_str().unwrap_or("").contains("pncounter"),
        "{body}"
    );

    let (s, body) = node
        .state("POST", "/state/sets/s/add", Some(r#"{"elements": "x"}"#))
        .await;
    assert_eq!(s, 400, "{body}");
    let (s, _) = node
        .state("POST", "/state/gcounters/g/incr?by=-1", None)
        .await;
    assert_eq!(s, 400);
    let (s, _) = node
        .state("PUT", "/state/registers/r", Some("{not json"))
        .await;
    assert_eq!(s, 400);
    let big = "x".repeat(2 << 20);
    let (s, body) = node.state("PUT", "/state/kv/ns/big", Some(&big)).await;
    assert_eq!(s, 413, "{body}");
    // Just over the value limit (1 MiB) but under the body limit: 413 from the store's check.
    let over = "x".repeat((1 << 20) + 1);
    let (s, body) = node.state("PUT", "/state/kv/ns/big", Some(&over)).await;
    assert_eq!(s, 413, "{body}");
    assert!(
        body["error"].as_str().unwrap_or("").contains("limit"),
        "{body}"
    );
    // TTLs out of range are refused, not stored as already expired (or worse).
    for ttl in ["1ns", "500000000y", "18446744073709551615s"] {
        let (s, body) = node
            .state("PUT", &format!("/state/kv/ns/t?ttl={ttl}"), Some("v"))
            .await;
        assert_eq!(s, 400, "ttl={ttl}: {body}");
    }
    let (s, _) = node.state("PUT", "/state/kv/other/after", Some("v")).await;
    assert_eq!(s, 204, "the store still takes writes");
    // Conditional writes (RFC 9110 §13.1): create-only, replace-only, and entity tags, which
    // KV values never carry, so If-Match with tags never holds.
    let put_if = |key: &'static str, name: &'static str, value: &'static str| {
        c.put(node.admin_url(&format!("/state/kv/cond/{key}")))
            .bearer_auth("test-token")
            .header(name, value)
            .body("v")
            .send()
    };
    let status = |r: reqwest::Result<reqwest::Response>| r.expect("put").status().as_u16();
    assert_eq!(status(put_if("new", "if-none-match", "*").await), 204);
    assert_eq!(status(put_if("new", "if-none-match", "*").await), 412);
    assert_eq!(status(put_if("absent", "if-match", "*").await), 412);
    assert_eq!(status(put_if("new", "if-match", "*").await), 204);
    assert_eq!(status(put_if("new", "if-match", "\"v1\"").await), 412);
    assert_eq!(
        kv(&node, "cond", "absent").await,
        None,
        "a failed condition writes nothing"
    );

    // The auth scheme is case-insensitive (RFC 9110 §11.1).
    let r = c
        .put(node.admin_url("/state/kv/other/scheme"))
        .header("authorization", "bearer  test-token")
        .body("v")
        .send()
        .await
        .expect("put");
    assert_eq!(r.status(), 204);

    // TTL: the key is there, then never returned once expired.
    let (s, _) = node
        .state("PUT", "/state/kv/ns/brief?ttl=300ms", Some("v"))
        .await;
    assert_eq!(s, 204);
    assert_eq!(kv(&node, "ns", "brief").await.as_deref(), Some("v"));
    eventually("the key expired", SECS(5), || async {
        kv(&node, "ns", "brief").await.is_none()
    })
    .await;
    let (s, list) = node.state("GET", "/state/kv/ns", None).await;
    assert_eq!(s, 200);
    assert_eq!(list["keys"], json!([]), "expired keys are not listed");

    // Registers and maps hold JSON.
    node.state("PUT", "/state/registers/motd", Some(r#"{"text": "hi"}"#))
        .await;
    let (_, r) = node.state("GET", "/state/registers/motd", None).await;
    assert_eq!(r["value"], json!({"text": "hi"}));
    node.state("PUT", "/state/maps/cfg/color", Some("\"red\""))
        .await;
    node.state("PUT", "/state/maps/cfg/size", Some("3")).await;
    node.state("DELETE", "/state/maps/cfg/size", None).await;
    let (_, m) = node.state("GET", "/state/maps/cfg", None).await;
    assert_eq!(m["value"], json!({"color": "red"}));
    let (_, objects) = node.state("GET", "/state/objects", None).await;
    assert_eq!(objects["objects"].as_array().map(Vec::len), Some(3));
}

#[tokio::test(flavor = "multi_thread")]
async fn reads_stay_at_the_edge_and_writes_go_to_the_center() {
    // A regional read replica near Tokyo and the central write origin far away.
    let replica = Origin::echo("ap-northeast").await;
    let center = Origin::echo("us-east").await;
    let node = Node::start(
        &NodeConfig::new()
            .id("edge-rw")
            .origin("replicas", &[(&replica, TOKYO)], "")
            .origin("center", &[(&center, PORTLAND)], "")
            .route(
                "api",
                "/",
                "replicas",
                "write_origin = \"center\"\n[routes.cache]\ndefault_ttl = \"1m\"",
            ),
    )
    .await;
    let c = client();
    for _ in 0..2 {
        let r = c
            .get(node.url("/cache/product-1"))
            .send()
            .await
            .expect("get");
        assert_eq!(r.headers()["x-origin-region"], "ap-northeast");
    }
    for method in ["POST", "PUT", "PATCH", "DELETE"] {
        let m = reqwest::Method::from_bytes(method.as_bytes()).expect("method");
        let r = c
            .request(m, node.url("/echo/sale"))
            .body("{}")
            .send()
            .await
            .expect("write");
        assert_eq!(r.status(), 200, "{method}");
        assert_eq!(
            r.headers()["x-origin-region"],
            "us-east",
            "{method} goes to the center"
        );
    }
    for method in ["HEAD", "OPTIONS"] {
        let m = reqwest::Method::from_bytes(method.as_bytes()).expect("method");
        let r = c
            .request(m, node.url("/echo/x"))
            .send()
            .await
            .expect("read");
        assert_eq!(
            r.headers()["x-origin-region"],
            "ap-northeast",
            "{method} stays near"
        );
    }
    // A write through the edge invalidates the edge's cached copy of that URL.
    let before = replica.cache_count("product-1").await;
    let r = c
        .post(node.url("/cache/product-1"))
        .send()
        .await
        .expect("post");
    assert_eq!(r.headers()["x-origin-region"], "us-east");
    let r = c
        .get(node.url("/cache/product-1"))
        .send()
        .await
        .expect("get");
    assert_eq!(r.headers()["x-origin-region"], "ap-northeast");
    assert_eq!(
        replica.cache_count("product-1").await,
        before + 1,
        "refetched after the write"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_token_protected_backbone_needs_the_token() {
    let hub = Nats::hub_with("authorization { token: \"fleet-secret\" }");
    let with_token = |id: &str, token: &str| {
        let cfg = NodeConfig::new().id(id).raw(&format!(
            "[fleet]\nnats = \"{}\"\njetstream_domain = \"hub\"\ntoken_file = \"nats.token\"\n",
            hub.url()
        ));
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("nats.token"), format!("{token}\n")).expect("token");
        (dir, cfg.render())
    };
    let (dir, toml) = with_token("good", "fleet-secret");
    let good = Node::start_in(dir, &toml).await;
    let (dir, toml) = with_token("bad", "wrong");
    let bad = Node::start_in(dir, &toml).await;
    eventually("the node with the token joins", SECS(15), || async {
        good.state("GET", "/state/fleet", None).await.1["fleet"]["connected"] == true
    })
    .await;
    // The node with the wrong token still serves and writes locally, and says why it is alone.
    incr(&bad, "n", 1).await;
    eventually("the refusal is logged", SECS(15), || async {
        bad.logs.contains("uthorization")
    })
    .await;
    assert_eq!(
        bad.state("GET", "/state/fleet", None).await.1["fleet"]["connected"],
        false
    );
    assert_eq!(counter(&bad, "n").await, 1);
}

/// `outpost fleet status` as an operator runs it, against a node's config.
fn fleet_status(node: &Node) -> Value {
    let out = std::process::Command::new(outpost_bin())
        .args(["fleet", "status", "--format", "json", "--config"])
        .arg(&node.config_path)
        .output()
        .expect("outpost fleet status");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("status json")
}

#[tokio::test(flavor = "multi_thread")]
async fn fleet_status_shows_every_node_flags_the_unhealthy_one_and_drops_the_silent_one() {
    let hub = Nats::hub();
    let origin = Origin::echo("us-west").await;
    let mut nodes = Vec::new();
    for id in ["good-1", "bad-1"] {
        let cfg = NodeConfig::new()
            .id(id)
            .raw(&format!(
                "[fleet]\nnats = \"{}\"\njetstream_domain = \"hub\"\nheartbeat_interval = \"200ms\"\n",
                hub.url()
            ))
            .origin("api", &[(&origin, PORTLAND)], "")
            .route("api", "/", "api", "");
        nodes.push(Node::start(&cfg).await);
    }
    let c = client();
    for _ in 0..50 {
        let r = c.get(nodes[0].url("/echo/ok")).send().await.expect("get");
        assert_eq!(r.status(), 200);
    }
    // bad-1 answers 5xx to 1 request in 10: a 10 % error rate.
    for i in 0..50 {
        let path = if i % 10 == 0 {
            "/status/503"
        } else {
            "/echo/ok"
        };
        c.get(nodes[1].url(path)).send().await.expect("get");
    }
    let verdicts = |v: &Value| -> Vec<(String, bool, u64)> {
        v["nodes"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|n| {
                (
                    n["id"].as_str().unwrap_or("").to_owned(),
                    n["healthy"] == true,
                    n["requests"].as_u64().unwrap_or(0),
                )
            })
            .collect()
    };
    eventually("both heartbeats carry the traffic", SECS(10), || async {
        let v = verdicts(&fleet_status(&nodes[0]));
        v.len() == 2 && v.iter().all(|(_, _, r)| *r >= 50)
    })
    .await;
    let status = fleet_status(&nodes[0]);
    let v = verdicts(&status);
    assert_eq!(
        v.iter()
            .map(|(id, ok, _)| (id.as_str(), *ok))
            .collect::<Vec<_>>(),
        [("bad-1", false), ("good-1", true)]
    );
    let bad = &status["nodes"][0];
    assert!(
        (bad["error_rate"].as_f64().unwrap_or(0.0) - 0.1).abs() < 1e-9,
        "{bad}"
    );
    assert!(
        bad["problems"][0]
            .as_str()
            .unwrap_or("")
            .contains("error rate 10.00 %"),
        "{bad}"
    );
    // The same from the admin API.
    let (s, admin) = nodes[1].state("GET", "/fleet/status", None).await;
    assert_eq!(s, 200);
    assert_eq!(admin["nodes"].as_array().map(Vec::len), Some(2));

    // A node that stops heartbeating drops out (its entry expires after three intervals).
    let silent = nodes.pop().expect("bad-1");
    drop(silent);
    eventually("the silent node dropped out", SECS(10), || async {
        verdicts(&fleet_status(&nodes[0])).len() == 1
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_mutual_tls_backbone_admits_nodes_with_a_client_certificate() {
    let pki = tempfile::tempdir().expect("pki dir");
    crate::guard::pki(pki.path());
    let p = |n: &str| pki.path().join(n).display().to_string();
    let hub = Nats::hub_with(&format!(
        "tls {{ cert_file: \"{}\", key_file: \"{}\", ca_file: \"{}\", verify: true, timeout: 2 }}",
        p("server.pem"),
        p("server.key"),
        p("ca.pem")
    ));
    let node = |id: &str, client: bool| {
        let client_tls = if client {
            format!(
                ", client_cert = \"{}\", client_key = \"{}\"",
                p("client.pem"),
                p("client.key")
            )
        } else {
            String::new()
        };
        NodeConfig::new().id(id).raw(&format!(
            "[fleet]\nnats = \"tls://127.0.0.1:{}\"\njetstream_domain = \"hub\"\ntls = {{ ca_file = \"{}\"{client_tls} }}\n",
            hub.port,
            p("ca.pem")
        ))
    };
    let with_cert = Node::start(&node("tls-ok", true)).await;
    let without = Node::start(&node("tls-no-cert", false)).await;
    eventually(
        "the node with a client certificate joins",
        SECS(15),
        || async {
            with_cert.state("GET", "/state/fleet", None).await.1["fleet"]["connected"] == true
        },
    )
    .await;
    incr(&with_cert, "n", 1).await;
    eventually("its change is published over TLS", SECS(10), || async {
        with_cert
            .metric("outpost_fleet_changes_published_total")
            .await
            >= 1.0
    })
    .await;
    // The server verifies clients: no certificate, no fleet (the node still serves locally).
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        without.state("GET", "/state/fleet", None).await.1["fleet"]["connected"],
        false
    );
    incr(&without, "n", 1).await;
    assert_eq!(counter(&without, "n").await, 1);
}
