//! WebAssembly functions end to end: the example guests built from source by
//! `scripts/build-functions`, run by a real node in front of the real FastAPI echo origin.

use std::time::{Duration, Instant};

use super::support::echoed as header_of;

use serde_json::Value;

use super::support::*;

fn wasm_head() -> String {
    format!(
        "[client_location]\ntrusted_proxies = [\"127.0.0.0/8\"]\n\n[wasm]\ncache_dir = \"{}\"\n",
        wasm_cache_dir().display()
    )
}

/// Width and height from a PNG's IHDR chunk.
fn png_size(bytes: &[u8]) -> Option<(u32, u32)> {
    if bytes.get(..8)? != b"\x89PNG\r\n\x1a\n" || bytes.get(12..16)? != b"IHDR" {
        return None;
    }
    let w = u32::from_be_bytes(bytes.get(16..20)?.try_into().ok()?);
    let h = u32::from_be_bytes(bytes.get(20..24)?.try_into().ok()?);
    Some((w, h))
}

#[tokio::test(flavor = "multi_thread")]
async fn rust_hello_sees_the_context_the_node_sets_and_nothing_forged() {
    let origin = Origin::echo("us-west").await;
    let node = Node::start(
        &NodeConfig::new()
            .raw(&wasm_head())
            .raw(&function_toml("hello", "hello", ""))
            .origin("api", &[(&origin, PORTLAND)], "")
            .route("hello", "/hello", "api", "function = \"hello\""),
    )
    .await;
    let r = client()
        .get(node.url("/hello/there?x=1"))
        .header("x-user-country", "JP")
        .header("x-user-region", "JP-13")
        // Forged context: stripped before the guest sees the request.
        .header("x-outpost-geo-country", "KP")
        .header("x-outpost-sub", "admin")
        .send()
        .await
        .expect("hello");
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-outpost-function"], "hello@1");
    let rid = r.headers()["x-request-id"]
        .to_str()
        .expect("request id")
        .to_owned();
    let v: Value = r.json().await.expect("json");
    assert_eq!(v["path"], "/hello/there?x=1", "{v}");
    assert_eq!(v["request_id"], rid.as_str(), "{v}");
    assert_eq!(v["geo"]["country"], "JP", "{v}");
    assert_eq!(v["geo"]["region"], "JP-13", "{v}");
    assert!(
        v["geo"]["lat"].is_number() || v["geo"]["lat"].is_string(),
        "{v}"
    );
    assert_eq!(
        node.metric("outpost_function_invocations_total{function=\"hello\",outcome=\"ok\"}")
            .await,
        1.0
    );
    assert!(
        node.metrics()
            .await
            .contains("outpost_function_instantiate_duration_seconds_count{function=\"hello\"} 1")
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn authorize_forwards_allowed_requests_and_refuses_the_rest() {
    let origin = Origin::echo("us-west").await;
    let node = Node::start(
        &NodeConfig::new()
            .raw(&wasm_head())
            .raw(&function_toml(
                "authorize",
                "authorize",
                "config = { allowed_countries = \"JP,DE\", rate_per_minute = \"3\", origin = \"api\" }",
            ))
            .origin("api", &[(&origin, PORTLAND)], "")
            .route("orders", "/echo", "api", "function = \"authorize\""),
    )
    .await;
    let c = client();
    let from = |country: &'static str| {
        c.post(node.url("/echo/orders?id=7"))
            .header("x-user-country", country)
            .header("x-client", "c1")
            .body("{\"item\": 1}")
            .send()
    };
    let r = from("FR").await.expect("fr");
    assert_eq!(r.status(), 403);
    let v: Value = r.json().await.expect("json");
    assert!(v["reason"].as_str().unwrap_or("").contains("FR"), "{v}");

    for _ in 0..3 {
        let r = from("JP").await.expect("jp");
        let status = r.status();
        let echo: Value = r.json().await.expect("echo");
        assert_eq!(status, 200, "{echo}");
        // The origin got the request through the node's origin stage: method, path, body,
        // the client's headers, and the node's forwarding headers.
        assert_eq!(echo["method"], "POST", "{echo}");
        assert_eq!(echo["path"], "/echo/orders", "{echo}");
        assert_eq!(header_of(&echo, "x-client"), ["c1"], "{echo}");
        assert!(!header_of(&echo, "via").is_empty(), "{echo}");
        assert!(
            header_of(&echo, "x-outpost-geo-country").is_empty(),
            "{echo}"
        );
    }
    // The fourth request in the same minute is over the function's limit (kept in wasi:keyvalue).
    let r = from("DE").await.expect("de");
    assert_eq!(r.status(), 429);
    assert!(r.headers().contains_key("retry-after"));
    let (status, keys) = node.state("GET", "/state/kv/fn.authorize", None).await;
    assert_eq!(status, 200, "{keys}");
    assert!(keys.to_string().contains("rate:"), "{keys}");
}

#[tokio::test(flavor = "multi_thread")]
async fn image_resizer_fetches_through_the_edge_cache() {
    let origin = Origin::echo("us-west").await;
    let node = Node::start(
        &NodeConfig::new()
            .raw(&wasm_head())
            .raw(&function_toml("resize", "resize", "memory = \"256MiB\""))
            .origin("api", &[(&origin, PORTLAND)], "")
            .route(
                "images",
                "/images",
                "api",
                "function = \"resize\"\n[routes.cache]\n",
            ),
    )
    .await;
    let c = client();
    for (w, h) in [(32, 24), (10, 90), (32, 24)] {
        let r = c
            .get(node.url(&format!("/images/{w}x{h}/pic.png")))
            .send()
            .await
            .expect("resize");
        assert_eq!(r.status(), 200);
        assert_eq!(r.headers()["content-type"], "image/png");
        let bytes = r.bytes().await.expect("png");
        assert_eq!(png_size(&bytes), Some((w, h)));
    }
    // Three resizes, one origin fetch: the function's GETs went through the cache.
    let count: Value = client()
        .get(format!("{}/control/count/images/pic.png", origin.url()))
        .send()
        .await
        .expect("count")
        .json()
        .await
        .expect("count json");
    assert_eq!(count["n"], 1, "{count}");
    let r = c
        .get(node.url("/images/0x5000/pic.png"))
        .send()
        .await
        .expect("bad size");
    assert_eq!(r.status(), 400);
    let r = c
        .get(node.url("/images/10x10/missing.gif"))
        .send()
        .await
        .expect("missing");
    assert_eq!(r.status(), 404);
}

#[tokio::test(flavor = "multi_thread")]
async fn python_function_reads_config_and_keeps_state_in_the_store() {
    let origin = Origin::echo("us-west").await;
    let node = Node::start(
        &NodeConfig::new()
            .raw(&wasm_head())
            .raw(&function_toml(
                "py",
                "python",
                "memory = \"256MiB\"\nconfig = { greeting = \"irasshaimase\" }",
            ))
            .origin("api", &[(&origin, PORTLAND)], "")
            .route("py", "/py", "api", "function = \"py\""),
    )
    .await;
    for n in 1..=2 {
        let r = client()
            .get(node.url("/py/hi"))
            .header("x-user-country", "JP")
            .send()
            .await
            .expect("py");
        assert_eq!(r.status(), 200);
        let v: Value = r.json().await.expect("json");
        assert_eq!(v["hello"], "from python", "{v}");
        assert_eq!(v["greeting"], "irasshaimase", "{v}");
        assert_eq!(v["country"], "JP", "{v}");
        assert_eq!(v["visits"], n, "{v}");
    }
    // HEAD: the client gets no body, and the guest still writes one (without a length, then
    // finishes it); its writes must not fail, so it returns normally.
    let r = client()
        .head(node.url("/py/hi"))
        .send()
        .await
        .expect("head");
    assert_eq!(r.status(), 200);
    let outcome =
        |o: &str| format!("outpost_function_invocations_total{{function=\"py\",outcome=\"{o}\"}}");
    eventually("the HEAD invocation counted", SECS(10), || async {
        node.metric(&outcome("ok")).await + node.metric(&outcome("trap")).await >= 3.0
    })
    .await;
    assert_eq!(node.metric(&outcome("ok")).await, 3.0);
    let (status, v) = node.state("GET", "/state/kv/fn.py/visits", None).await;
    assert_eq!(status, 200);
    assert_eq!(v, 3, "{v}");
}

#[tokio::test(flavor = "multi_thread")]
async fn hostile_guests_are_contained_with_the_right_status() {
    let origin = Origin::echo("us-west").await;
    let node = Node::start(
        &NodeConfig::new()
            .raw(&wasm_head())
            .raw(&function_toml(
                "hostile",
                "hostile",
                "timeout = \"1s\"\nmemory = \"32MiB\"",
            ))
            .origin("api", &[(&origin, PORTLAND)], "")
            .route("hostile", "/", "api", "function = \"hostile\""),
    )
    .await;
    let c = client();
    let get = |path: &'static str| c.get(node.url(path)).send();

    let started = Instant::now();
    let r = get("/spin").await.expect("spin");
    assert_eq!(r.status(), 504);
    assert!(started.elapsed() < Duration::from_secs(5));
    let p: Value = r.json().await.expect("problem");
    assert_eq!(p["type"], "urn:outpost:problem:function-timeout");

    let r = get("/sleep").await.expect("sleep");
    assert_eq!(
        r.status(),
        504,
        "blocked in a host call, cut at the deadline"
    );

    let r = get("/oom").await.expect("oom");
    assert_eq!(r.status(), 500);
    let p: Value = r.json().await.expect("problem");
    assert!(p["detail"].as_str().unwrap_or("").contains("oom"), "{p}");

    let r = get("/trap").await.expect("trap");
    assert_eq!(r.status(), 500);
    let rid = r.headers()["x-request-id"]
        .to_str()
        .expect("rid")
        .to_owned();
    let p: Value = r.json().await.expect("problem");
    assert_eq!(p["request_id"], rid.as_str());
    assert!(p["detail"].as_str().unwrap_or("").contains("trap"), "{p}");
    eventually("the trap in the log under its request id", SECS(5), || {
        let found = node.logs.contains(&rid);
        async move { found }
    })
    .await;

    // Headers sent, then a body that never ends: cut off at the deadline, never a clean end.
    for path in ["/huge", "/stall"] {
        let started = Instant::now();
        let r = get(path).await.expect("headers");
        assert_eq!(r.status(), 200);
        let body = r.bytes().await;
        assert!(
            body.is_err(),
            "{path}: a cut-off body must not look complete"
        );
        assert!(started.elapsed() < Duration::from_secs(5), "{path}");
    }

    let r = get("/forbidden").await.expect("forbidden");
    assert_eq!(r.status(), 502);
    let text = r.text().await.expect("text");
    assert!(text.contains("HttpRequestDenied"), "{text}");

    // No files, no environment, no sockets: the guest asks for each and reports.
    let r = get("/escape").await.expect("escape");
    assert_eq!(r.status(), 200);
    let report = r.text().await.expect("report");
    for reached in ["OPEN", "CONNECTED", "BOUND"] {
        assert!(!report.contains(reached), "{report}");
    }
    assert!(report.contains("env: 0 variables"), "{report}");
    assert!(report.contains("args: 0"), "{report}");

    // hyper stops reading a body once the client has all it can receive (the declared
    // Content-Length, nothing for HEAD): that is not a client gone away. The guest keeps
    // writing and working after it and returns normally (its writes would fail, and /late
    // panic, if the host closed its body), counted as ok, never cancelled.
    let ok = "outpost_function_invocations_total{function=\"hostile\",outcome=\"ok\"}";
    let ok_before = node.metric(ok).await;
    let started = Instant::now();
    let r = get("/late").await.expect("late");
    assert_eq!(r.status(), 200);
    assert_eq!(r.text().await.expect("late body"), "late");
    let r = c.head(node.url("/ok")).send().await.expect("head");
    assert_eq!(r.status(), 200);
    eventually(
        "/late and HEAD /ok ran to their return",
        SECS(5),
        || async { node.metric(ok).await == ok_before + 2.0 },
    )
    .await;
    assert!(started.elapsed() >= Duration::from_millis(300));

    // A client that leaves before the head stops the guest: counted as cancelled, not a trap.
    let gone = c
        .get(node.url("/spin"))
        .timeout(Duration::from_millis(200))
        .send()
        .await;
    assert!(gone.is_err());
    eventually(
        "the abandoned invocation counted as cancelled",
        SECS(5),
        || async {
            node.metric(
                "outpost_function_invocations_total{function=\"hostile\",outcome=\"cancelled\"}",
            )
            .await
                == 1.0
        },
    )
    .await;

    // And the node kept serving through all of it.
    let r = get("/ok").await.expect("ok");
    assert_eq!(r.status(), 200);
    for (outcome, at_least) in [("timeout", 4.0), ("oom", 1.0), ("trap", 1.0), ("ok", 2.0)] {
        let n = node
            .metric(&format!(
                "outpost_function_invocations_total{{function=\"hostile\",outcome=\"{outcome}\"}}"
            ))
            .await;
        assert!(n >= at_least, "{outcome}: {n}");
    }
}

const SECS: fn(u64) -> Duration = Duration::from_secs;

fn fn_cli(node: &Node, args: &[&str]) -> std::process::Output {
    std::process::Command::new(outpost_bin())
        .arg("fn")
        .args(args)
        .arg("--config")
        .arg(&node.config_path)
        .arg("--admin")
        .arg(node.admin.to_string())
        .output()
        .expect("outpost fn runs")
}

/// Runs `outpost fn ARGS` against `node`, which must succeed; returns what it printed.
fn fn_ok(node: &Node, args: &[&str]) -> String {
    let out = fn_cli(node, args);
    let said = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "outpost fn {args:?}: {said}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    said
}

#[tokio::test(flavor = "multi_thread")]
async fn deploy_and_rollback_under_load_without_a_failed_request() {
    let origin = Origin::echo("us-west").await;
    let mut node = Node::start(
        &NodeConfig::new()
            .raw(&wasm_head())
            .raw(&function_toml("edge", "hello", "memory = \"256MiB\""))
            .origin("api", &[(&origin, PORTLAND)], "")
            .route("edge", "/edge", "api", "function = \"edge\""),
    )
    .await;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut load = Vec::new();
    for _ in 0..4 {
        let url = node.url("/edge/x");
        let stop = stop.clone();
        load.push(tokio::spawn(async move {
            let c = client();
            let (mut ok, mut failed, mut seen) =
                (0u32, Vec::new(), std::collections::BTreeSet::new());
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                match c.get(&url).send().await {
                    Ok(r) if r.status() == 200 => {
                        let v = r.headers()["x-outpost-function"]
                            .to_str()
                            .unwrap_or("")
                            .to_owned();
                        if r.bytes().await.is_ok() {
                            ok += 1;
                            seen.insert(v);
                        } else {
                            failed.push("body".to_owned());
                        }
                    }
                    Ok(r) => failed.push(r.status().to_string()),
                    Err(e) => failed.push(e.to_string()),
                }
            }
            (ok, failed, seen)
        }));
    }

    // A broken component is refused and changes nothing.
    let bad = node.dir.path().join("bad.wasm");
    std::fs::write(&bad, b"\0asm\x0d\0\x01\0garbage").expect("write");
    let out = fn_cli(&node, &["deploy", "edge", bad.to_str().expect("path")]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("not a runnable component"), "{err}");

    // v2: the Python function; new requests switch to it atomically.
    let py = guests().join("python.wasm");
    let out = fn_cli(&node, &["deploy", "edge", py.to_str().expect("path")]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("version 2 active"));
    let c = client();
    let r = c.get(node.url("/edge/x")).send().await.expect("v2");
    assert_eq!(r.headers()["x-outpost-function"], "edge@2");
    tokio::time::sleep(Duration::from_millis(300)).await;

    let out = fn_cli(&node, &["rollback", "edge"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r = c.get(node.url("/edge/x")).send().await.expect("v1");
    assert_eq!(r.headers()["x-outpost-function"], "edge@1");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let out = fn_cli(&node, &["rollback", "edge", "2"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    tokio::time::sleep(Duration::from_millis(300)).await;

    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut total = 0;
    let mut seen = std::collections::BTreeSet::new();
    for t in load {
        let (ok, failed, s) = t.await.expect("load task");
        assert!(
            failed.is_empty(),
            "failed requests during deploys: {failed:?}"
        );
        total += ok;
        seen.extend(s);
    }
    assert!(total > 20, "{total}");
    assert!(
        seen.contains("edge@1") && seen.contains("edge@2"),
        "{seen:?}"
    );

    let out = fn_cli(&node, &["list"]);
    let table = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        table.contains("edge") && table.lines().count() == 3,
        "{table}"
    );

    // The choice survives a restart (and nothing is compiled again: the cache has both).
    node.crash_and_restart().await;
    let r = c
        .get(node.url("/edge/x"))
        .send()
        .await
        .expect("after restart");
    assert_eq!(r.headers()["x-outpost-function"], "edge@2");
    assert!(node.logs.contains("\"cached\":true"));
}

#[test]
fn the_functions_example_config_is_valid() {
    guests();
    let out = std::process::Command::new(outpost_bin())
        .args(["check", "--config"])
        .arg(repo_root().join("examples/functions/outpost.toml"))
        .output()
        .expect("outpost check runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A fleet node (hub `hub`) whose route `/` is the function `edge`, `hello` from its config.
fn fleet_fn_node(id: &str, hub: &Nats, origin: &Origin) -> NodeConfig {
    NodeConfig::new()
        .id(id)
        .raw(&format!(
            "[fleet]\nnats = \"{}\"\njetstream_domain = \"hub\"\n",
            hub.url()
        ))
        .raw(&wasm_head())
        .raw(&function_toml("edge", "hello", ""))
        .origin("api", &[(origin, PORTLAND)], "")
        .route("edge", "/", "api", "function = \"edge\"")
}

/// Starts the nodes and waits for each one's fleet link.
async fn start_fn_fleet(configs: &[&NodeConfig]) -> Vec<Node> {
    let mut nodes = Vec::new();
    for cfg in configs {
        let n = Node::start(cfg).await;
        eventually("the fleet link is up", SECS(15), || fleet_link(&n, true)).await;
        nodes.push(n);
    }
    nodes
}

async fn fleet_link(n: &Node, up: bool) -> bool {
    n.state("GET", "/state/fleet", None).await.1["fleet"]["connected"] == up
}

/// Whether `n` runs `guest` on its route: `hostile` answers `/ok` with exactly `ok`, `hello`
/// with its JSON (which also holds "/ok", as the path: hence the exact match).
async fn runs(n: &Node, guest: &str) -> bool {
    let body = match client().get(n.url("/ok")).send().await {
        Ok(r) if r.status() == 200 => r.text().await.unwrap_or_default(),
        _ => return false,
    };
    match guest {
        "hostile" => body == "ok",
        "hello" => body.contains("\"hello\":\"from wasm\""),
        other => panic!("no such guest here: {other}"),
    }
}

/// A function deployed on one node of a fleet runs on every node, a node that joins later runs
/// it too, and a rollback on any node rolls the fleet back (components in a JetStream object
/// store, the active version per function in a key-value bucket every node watches).
#[tokio::test(flavor = "multi_thread")]
async fn a_version_deployed_on_one_node_of_a_fleet_runs_on_every_node() {
    let hub = Nats::hub();
    let origin = Origin::echo("us-west").await;
    let config = |id: &str| fleet_fn_node(id, &hub, &origin);
    let nodes = start_fn_fleet(&[&config("edge-1"), &config("edge-2")]).await;
    for n in &nodes {
        assert!(runs(n, "hello").await);
    }

    let hostile = guests().join("hostile.wasm");
    let said = fn_ok(
        &nodes[0],
        &["deploy", "edge", hostile.to_str().expect("path")],
    );
    assert!(said.contains("fleet: published"), "{said}");
    assert!(runs(&nodes[0], "hostile").await);
    let deployed = Instant::now();
    eventually("edge-2 runs what edge-1 deployed", SECS(30), || {
        runs(&nodes[1], "hostile")
    })
    .await;
    // A figure for the record (not a timed assertion): upload to the object store, the
    // bucket's watch, download, compile (or the compiled cache) and the switch.
    eprintln!(
        "fleet deploy: edge-2 switched {} ms after edge-1's deploy returned",
        deployed.elapsed().as_millis()
    );
    let listed = String::from_utf8_lossy(&fn_cli(&nodes[1], &["list"]).stdout).into_owned();
    assert!(
        listed
            .lines()
            .any(|l| l.contains("fleet") && l.contains('*')),
        "{listed}"
    );

    // A node that joins later runs the fleet's version, not its config's.
    let late = Node::start(&config("edge-3")).await;
    eventually(
        "edge-3 catches up with the fleet's version",
        SECS(30),
        || runs(&late, "hostile"),
    )
    .await;

    // A rollback on any node rolls every node back.
    let said = fn_ok(&nodes[1], &["rollback", "edge"]);
    assert!(said.contains("fleet: published"), "{said}");
    for n in [&nodes[0], &nodes[1], &late] {
        eventually("every node is back on hello", SECS(30), || runs(n, "hello")).await;
    }
}

/// With the fleet's NATS unreachable, a deploy still switches the node at once and says that
/// the fleet did not get it, rather than failing or hanging.
#[tokio::test(flavor = "multi_thread")]
async fn a_deploy_while_the_fleet_is_unreachable_holds_on_the_node_and_says_so() {
    let origin = Origin::echo("us-west").await;
    // A port nothing listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port();
    let node = Node::start(
        &NodeConfig::new()
            .raw(&format!("[fleet]\nnats = \"nats://127.0.0.1:{port}\"\n"))
            .raw(&wasm_head())
            .raw(&function_toml("edge", "hello", ""))
            .origin("api", &[(&origin, PORTLAND)], "")
            .route("edge", "/", "api", "function = \"edge\""),
    )
    .await;
    let hostile = guests().join("hostile.wasm");
    let started = Instant::now();
    let said = fn_ok(&node, &["deploy", "edge", hostile.to_str().expect("path")]);
    assert!(said.contains("fleet: NOT published"), "{said}");
    assert!(said.contains("link is down"), "{said}");
    // Not held for JetStream's request timeouts (20 s) when the link is known to be down.
    assert!(started.elapsed() < SECS(10), "{:?}", started.elapsed());
    let r = client().get(node.url("/ok")).send().await.expect("ok");
    assert_eq!(r.text().await.expect("text"), "ok");
}

/// A deploy made while the backbone is down holds on its node; once the link is back it is
/// newer than the fleet's version, so the node publishes it and every node runs it.
#[tokio::test(flavor = "multi_thread")]
async fn a_deploy_made_while_the_backbone_was_down_wins_once_it_returns() {
    let mut hub = Nats::hub();
    let origin = Origin::echo("us-west").await;
    let nodes = start_fn_fleet(&[
        &fleet_fn_node("edge-1", &hub, &origin),
        &fleet_fn_node("edge-2", &hub, &origin),
    ])
    .await;
    let hostile = guests().join("hostile.wasm");
    let said = fn_ok(
        &nodes[0],
        &["deploy", "edge", hostile.to_str().expect("path")],
    );
    assert!(said.contains("fleet: published"), "{said}");
    eventually("edge-2 runs the fleet's version", SECS(30), || {
        runs(&nodes[1], "hostile")
    })
    .await;

    hub.kill();
    eventually("edge-2 sees the link down", SECS(15), || {
        fleet_link(&nodes[1], false)
    })
    .await;
    let hello = guests().join("hello.wasm");
    let said = fn_ok(
        &nodes[1],
        &["deploy", "edge", hello.to_str().expect("path")],
    );
    assert!(said.contains("fleet: NOT published"), "{said}");
    assert!(runs(&nodes[1], "hello").await);
    assert!(runs(&nodes[0], "hostile").await, "edge-1 cannot know yet");

    hub.start();
    eventually("edge-1 runs what edge-2 deployed offline", SECS(30), || {
        runs(&nodes[0], "hello")
    })
    .await;
    assert!(runs(&nodes[1], "hello").await);
}
