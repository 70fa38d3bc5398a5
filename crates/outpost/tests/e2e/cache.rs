//! The edge cache end to end: a real node in front of the real FastAPI test origin.

use std::time::Duration;

use super::support::*;

const SECS: fn(u64) -> Duration = Duration::from_secs;

fn cache_status(r: &reqwest::Response) -> String {
    r.headers()
        .get("cache-status")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned()
}

async fn cached_node(origin: &Origin, cache: &str, extra: &str) -> Node {
    Node::start(
        &NodeConfig::new()
            .raw(extra)
            .origin("api", &[(origin, PORTLAND)], "")
            .route("api", "/", "api", &format!("[routes.cache]\n{cache}")),
    )
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn hits_revalidation_vary_head_and_invalidation_against_fastapi() {
    let origin = Origin::echo("us-west").await;
    let node = cached_node(&origin, "", "").await;
    let c = client();
    let url = node.url("/cache/doc?cc=max-age%3D2&etag=%22v1%22");

    let first = c.get(&url).send().await.expect("first");
    assert_eq!(first.status(), 200);
    assert_eq!(
        cache_status(&first),
        "outpost; fwd=uri-miss; fwd-status=200; stored"
    );
    // Stored once the body has gone through (a request meanwhile would wait for it: collapsed).
    first.bytes().await.expect("first body");
    let second = c.get(&url).send().await.expect("second");
    assert!(
        cache_status(&second).starts_with("outpost; hit"),
        "{}",
        cache_status(&second)
    );
    assert!(second.headers().contains_key("age"));
    assert_eq!(origin.cache_count("doc").await, 1);

    // Once stale (max-age=2), the node revalidates with If-None-Match and FastAPI answers 304.
    eventually("a revalidation", SECS(10), || {
        let c = c.clone();
        let url = url.clone();
        async move {
            let r = c.get(&url).send().await.expect("get");
            cache_status(&r).contains("fwd=stale; fwd-status=304")
        }
    })
    .await;
    assert_eq!(origin.cache_count("doc").await, 2);

    // A client's own validator gets a 304 from the edge.
    let conditional = c
        .get(&url)
        .header("if-none-match", "\"v1\"")
        .send()
        .await
        .expect("conditional");
    assert_eq!(conditional.status(), 304);

    // HEAD is answered from the stored GET.
    let head = c.head(&url).send().await.expect("head");
    assert!(cache_status(&head).contains("hit") || cache_status(&head).contains("fwd=stale"));

    // Vary: one stored variant per Accept-Language.
    let vary = node.url("/cache/lang?cc=max-age%3D60&vary=Accept-Language");
    for lang in ["en", "fr", "en", "fr"] {
        let r = c
            .get(&vary)
            .header("accept-language", lang)
            .send()
            .await
            .expect("vary");
        let body: serde_json::Value = r.json().await.expect("json");
        assert_eq!(body["lang"], lang);
    }
    assert_eq!(origin.cache_count("lang").await, 2);

    // A successful POST to the URL invalidates it.
    let post = c.post(&url).send().await.expect("post");
    assert_eq!(post.status(), 200);
    assert!(cache_status(&post).starts_with("outpost; fwd=method"));
    let after = c.get(&url).send().await.expect("after");
    assert!(
        cache_status(&after).starts_with("outpost; fwd=uri-miss"),
        "{}",
        cache_status(&after)
    );

    // A miss goes out like a pass-through: forwarding headers added, internal ones stripped.
    let echo: serde_json::Value = c
        .get(node.url("/echo/x"))
        .header("x-outpost-identity", "forged")
        .header("x-request-id", "client-chosen")
        .send()
        .await
        .expect("echo")
        .json()
        .await
        .expect("json");
    let seen = |name: &str| echoed(&echo, name);
    assert_eq!(seen("x-forwarded-for"), ["127.0.0.1"]);
    assert_eq!(seen("via"), ["1.1 test-node"]);
    assert!(seen("x-outpost-identity").is_empty());
    assert_eq!(seen("traceparent").len(), 1);
    let rid = seen("x-request-id");
    assert!(rid.len() == 1 && rid[0] != "client-chosen", "{rid:?}");

    let metrics = node.metrics().await;
    assert!(metrics.contains("outpost_cache_requests_total{route=\"api\",status=\"hit\"}"));
    assert!(metrics.contains("outpost_cache_stored_bytes{tier=\"memory\"}"));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_thousand_concurrent_misses_reach_the_origin_once() {
    let origin = Origin::echo("us-west").await;
    let node = cached_node(&origin, "", "").await;
    let url = node.url("/cache/hot?cc=max-age%3D60&ms=500");
    let c = reqwest::Client::builder()
        .pool_max_idle_per_host(1000)
        .build()
        .expect("client");
    let mut tasks = Vec::new();
    for _ in 0..1000 {
        let (c, url) = (c.clone(), url.clone());
        tasks.push(tokio::spawn(async move {
            let r = c.get(&url).send().await.expect("get");
            let status = r.status().as_u16();
            let body: serde_json::Value = r.json().await.expect("json");
            (status, body["n"].as_u64())
        }));
    }
    for t in tasks {
        assert_eq!(t.await.expect("task"), (200, Some(1)));
    }
    assert_eq!(
        origin.cache_count("hot").await,
        1,
        "exactly one origin request"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn origin_down_serves_stale_if_error() {
    let mut origin = Origin::echo("us-west").await;
    let node = cached_node(&origin, "stale_if_error = \"1h\"", "").await;
    let c = client();
    let url = node.url("/cache/sie?cc=max-age%3D1");
    let prime = c.get(&url).send().await.expect("prime");
    assert_eq!(prime.status(), 200);
    prime.bytes().await.expect("prime body");
    origin.kill();
    eventually("a stale-if-error answer", SECS(10), || {
        let c = c.clone();
        let url = url.clone();
        async move {
            let r = c.get(&url).send().await.expect("get");
            r.status() == 200 && cache_status(&r).contains("detail=stale-if-error")
        }
    })
    .await;
    // Without a stored copy, the same outage is a 502 that says what happened.
    let other = c
        .get(node.url("/cache/never-seen?cc=max-age%3D1"))
        .send()
        .await
        .expect("other");
    assert_eq!(other.status(), 502);
    assert!(cache_status(&other).starts_with("outpost; fwd=uri-miss"));
}

#[tokio::test(flavor = "multi_thread")]
async fn purge_by_tag_prefix_and_url_through_the_cli_and_admin_api() {
    let origin = Origin::echo("us-west").await;
    let node = cached_node(&origin, "", "").await;
    let c = client();
    let urls = [
        ("p1", "/cache/p1?cc=max-age%3D600&tag=product-1%20catalog"),
        ("p2", "/cache/p2?cc=max-age%3D600&tag=catalog"),
        ("p3", "/cache/p3?cc=max-age%3D600"),
    ];
    for (_, path) in urls {
        for _ in 0..2 {
            let r = c.get(node.url(path)).send().await.expect("get");
            r.bytes().await.expect("body");
        }
    }
    let purge = |args: &[&str]| {
        let out = std::process::Command::new(outpost_bin())
            .arg("purge")
            .arg("--config")
            .arg(&node.config_path)
            .arg("--admin")
            .arg(node.admin.to_string())
            .args(args)
            .env("OUTPOST_ADMIN_TOKEN", "test-token")
            .output()
            .expect("outpost purge runs");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    };
    assert_eq!(purge(&["--tag", "catalog"]), "2 cache entries removed");
    for (name, path) in urls {
        let r = c.get(node.url(path)).send().await.expect("after");
        r.bytes().await.expect("body");
        let expect = if name == "p3" { 1 } else { 2 };
        assert_eq!(origin.cache_count(name).await, expect, "{name}");
    }
    // Soft purge by prefix: stale now, but still served while revalidating in the background
    // when the route allows stale-while-revalidate; here (no SWR) the next request revalidates.
    assert_eq!(
        purge(&["--prefix", "/cache/", "--soft"]),
        "3 cache entries marked stale"
    );
    let r = c.get(node.url(urls[2].1)).send().await.expect("soft");
    assert!(
        cache_status(&r).starts_with("outpost; fwd=stale"),
        "{}",
        cache_status(&r)
    );

    // The admin API itself: token required, one target required.
    let unauth = c
        .post(node.admin_url("/cache/purge"))
        .json(&serde_json::json!({ "url": "x" }))
        .send()
        .await
        .expect("unauth");
    assert_eq!(unauth.status(), 401);
    let bad = c
        .post(node.admin_url("/cache/purge"))
        .bearer_auth("test-token")
        .json(&serde_json::json!({ "url": "a", "tag": "b" }))
        .send()
        .await
        .expect("bad");
    assert_eq!(bad.status(), 400);
    let by_url = c
        .post(node.admin_url("/cache/purge"))
        .bearer_auth("test-token")
        .json(&serde_json::json!({ "url": format!("http://{}{}", node.addr, urls[2].1) }))
        .send()
        .await
        .expect("by url");
    let v: serde_json::Value = by_url.json().await.expect("json");
    assert_eq!(v["purged"], 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn disk_tier_survives_a_restart() {
    let origin = Origin::echo("us-west").await;
    let store = tempfile::tempdir().expect("cache dir");
    let extra = format!(
        "[cache]\ndisk_dir = \"{}\"\ndisk_size = \"64 MiB\"\n",
        store.path().display()
    );
    let url_path = "/cache/durable?cc=max-age%3D3600";
    // The host is part of the key, and the restarted node listens on another port.
    let host = "shop.example";
    {
        let mut node = cached_node(&origin, "", &extra).await;
        let r = client()
            .get(node.url(url_path))
            .header("host", host)
            .send()
            .await
            .expect("prime");
        assert_eq!(r.status(), 200);
        r.bytes().await.expect("body");
        eventually("the disk write", SECS(10), || {
            let node = &node;
            async move { node.metric("outpost_cache_objects{tier=\"disk\"}").await >= 1.0 }
        })
        .await;
        node.signal(libc::SIGTERM);
        assert!(node.wait_exit(SECS(10)).await.success());
    }
    let node = cached_node(&origin, "", &extra).await;
    let r = client()
        .get(node.url(url_path))
        .header("host", host)
        .send()
        .await
        .expect("after restart");
    assert!(
        cache_status(&r).starts_with("outpost; hit"),
        "{}",
        cache_status(&r)
    );
    assert_eq!(origin.cache_count("durable").await, 1);
}
