//! End-to-end tests: real `outpost` processes in front of real FastAPI origins (uvicorn).
//!
//! One test binary for the whole crate (links once). Every test uses ephemeral ports and
//! waits on conditions with deadlines; nothing depends on a fixed sleep.

mod support;

#[path = "e2e/analytics.rs"]
mod analytics;
#[path = "e2e/cache.rs"]
mod cache;
#[path = "e2e/fleet.rs"]
mod fleet;
#[path = "e2e/functions.rs"]
mod functions;
#[path = "e2e/guard.rs"]
mod guard;
#[path = "e2e/outbox.rs"]
mod outbox;
#[path = "e2e/websocket.rs"]
mod websocket;

use std::time::Duration;

use futures_util::StreamExt;
use serde_json::Value;
use support::*;

const SECS: fn(u64) -> Duration = Duration::from_secs;

use support::echoed as header_of;

async fn one_origin_node(extra_route: &str) -> (Origin, Node) {
    let origin = Origin::echo("us-west").await;
    let node = Node::start(
        &NodeConfig::new()
            .origin("api", &[(&origin, PORTLAND)], "")
            .route("api", "/", "api", extra_route),
    )
    .await;
    (origin, node)
}

#[tokio::test(flavor = "multi_thread")]
async fn methods_bodies_and_forwarding_headers_reach_the_origin() {
    let origin = Origin::echo("us-west").await;
    let node = Node::start(
        &NodeConfig::new()
            .origin("api", &[(&origin, PORTLAND)], "")
            .route("root", "/", "api", "")
            .route("prefixed", "/api", "api", "strip_prefix = true"),
    )
    .await;
    let c = client();

    for method in ["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"] {
        let m = reqwest::Method::from_bytes(method.as_bytes()).expect("method");
        let resp = c
            .request(m, node.url("/echo/things?b=2&a=1"))
            .header("x-outpost-identity", "forged")
            .header("x-served-by", "forged")
            .header(
                "traceparent",
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            )
            .body("hello edge")
            .send()
            .await
            .expect("request");
        assert_eq!(resp.status(), 200, "{method}");
        assert_eq!(resp.headers()["x-served-by"], "test-node");
        assert_eq!(resp.headers()["x-origin-region"], "us-west");
        let timing = resp.headers()["server-timing"]
            .to_str()
            .expect("ascii")
            .to_owned();
        assert!(
            timing.contains("edge;dur=") && timing.contains("origin;dur="),
            "{timing}"
        );
        let rid = resp.headers()["x-request-id"]
            .to_str()
            .expect("ascii")
            .to_owned();
        let echo: Value = resp.json().await.expect("json");
        assert_eq!(echo["method"], method);
        assert_eq!(echo["path"], "/echo/things");
        assert_eq!(echo["query"], "b=2&a=1");
        assert_eq!(echo["body_len"], 10);
        assert_eq!(header_of(&echo, "x-request-id"), vec![rid.as_str()]);
        assert_eq!(header_of(&echo, "x-forwarded-for"), vec!["127.0.0.1"]);
        assert_eq!(header_of(&echo, "x-forwarded-proto"), vec!["http"]);
        assert_eq!(
            header_of(&echo, "x-forwarded-host"),
            vec![node.addr.to_string().as_str()]
        );
        assert_eq!(header_of(&echo, "via"), vec!["1.1 test-node"]);
        assert!(
            header_of(&echo, "x-outpost-identity").is_empty(),
            "spoofed internal header reached the origin"
        );
        assert!(header_of(&echo, "x-served-by").is_empty());
        let tp = header_of(&echo, "traceparent");
        assert_eq!(tp.len(), 1);
        assert!(
            tp[0].starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"),
            "trace id kept: {tp:?}"
        );
        assert!(
            !tp[0].contains("00f067aa0ba902b7"),
            "this hop has its own span id"
        );
    }

    // HEAD: headers only.
    let resp = c.head(node.url("/bytes/1000")).send().await.expect("head");
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-length"], "1000");

    // A route that strips its prefix tells the origin what it removed.
    let echo: Value = c
        .get(node.url("/api/echo/x"))
        .send()
        .await
        .expect("request")
        .json()
        .await
        .expect("json");
    assert_eq!(echo["path"], "/echo/x");
    assert_eq!(header_of(&echo, "x-forwarded-prefix"), vec!["/api"]);

    // Hop-by-hop fields named in Connection never reach the origin (raw client: no library
    // would let us send these).
    let raw = raw_exchange(
        node.addr,
        b"GET /echo/raw HTTP/1.1\r\nHost: shop.test\r\nConnection: close, x-secret\r\nx-secret: 1\r\nKeep-Alive: timeout=5\r\nX-Kept: yes\r\n\r\n",
        SECS(10),
    )
    .await;
    assert!(raw.starts_with("HTTP/1.1 200"), "{raw}");
    let body = raw.split("\r\n\r\n").nth(1).expect("body");
    let echo: Value = serde_json::from_str(body.trim()).expect("json body");
    assert!(header_of(&echo, "x-secret").is_empty(), "{echo}");
    assert!(header_of(&echo, "keep-alive").is_empty());
    assert_eq!(header_of(&echo, "x-kept"), vec!["yes"]);
    assert_eq!(header_of(&echo, "host"), vec!["shop.test"]);

    // Response hop-by-hop fields from the origin are dropped too.
    let resp = c
        .get(node.url("/response-headers?Keep-Alive=timeout%3D99&X-Origin-Extra=1"))
        .send()
        .await
        .expect("request");
    assert!(resp.headers().get("keep-alive").is_none());
    assert_eq!(resp.headers()["x-origin-extra"], "1");

    // Access log: one JSON line per request with route, status and bytes.
    eventually("access log line", SECS(5), || async {
        node.logs.all().iter().any(|l| {
            l.contains("\"Request served.\"")
                && l.contains("\"route\":\"prefixed\"")
                && l.contains("\"aborted\":false")
        })
    })
    .await;
    // Route metrics are recorded when a response body ends, so wait for the last one.
    eventually("9 root requests counted as 2xx", SECS(5), || async {
        node.metric(r#"outpost_http_requests_total{route="root",status_class="2xx"}"#)
            .await
            == 9.0
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn large_bodies_stream_without_buffering() {
    let (_origin, node) = one_origin_node("max_body_bytes = \"2 GiB\"").await;
    let c = client();
    const SIZE: u64 = 1 << 30; // 1 GiB each way

    // Download.
    let resp = c
        .get(node.url(&format!("/bytes/{SIZE}")))
        .send()
        .await
        .expect("download");
    assert_eq!(resp.status(), 200);
    let mut stream = resp.bytes_stream();
    let mut n: u64 = 0;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.expect("chunk");
        for (i, b) in chunk.iter().enumerate() {
            if (n + i as u64).is_multiple_of(4093) {
                assert_eq!(
                    u64::from(*b),
                    (n + i as u64) % 251,
                    "content at {}",
                    n + i as u64
                );
            }
        }
        n += chunk.len() as u64;
    }
    assert_eq!(n, SIZE);

    // Upload, generated on the fly, chunked.
    let chunk = bytes::Bytes::from(vec![7u8; 1 << 20]);
    let body =
        futures_util::stream::iter((0..1024).map(move |_| Ok::<_, std::io::Error>(chunk.clone())));
    let resp = c
        .post(node.url("/upload"))
        .body(reqwest::Body::wrap_stream(body))
        .send()
        .await
        .expect("upload");
    assert_eq!(resp.status(), 200);
    let v: Value = resp.json().await.expect("json");
    assert_eq!(v["len"], SIZE);

    let peak_mib = node.peak_rss_kib() / 1024;
    assert!(
        peak_mib < 100,
        "node peak RSS {peak_mib} MiB: a body was buffered"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn nearest_region_wins_and_failover_keeps_requests_working() {
    let us = Origin::echo("us-west").await;
    let mut eu = Origin::echo("eu-west").await;
    let node = Node::start(
        &NodeConfig::new()
            .raw("[client_location]\ntrusted_proxies = [\"127.0.0.1/32\"]\n[[client_location.networks]]\ncidr = \"127.0.0.2/32\"\nlocation = { lat = 48.85, lon = 2.35 }\ncountry = \"FR\"\n")
            .origin("api", &[(&us, PORTLAND), (&eu, DUBLIN)], "connect_timeout = \"500ms\"\n[origins.api.passive]\nconsecutive_failures = 100")
            .route("api", "/", "api", ""),
    )
    .await;
    let c = client();
    let region = |resp: &reqwest::Response| {
        resp.headers()["x-origin-region"]
            .to_str()
            .expect("ascii")
            .to_owned()
    };

    // No location hints: the node's own (Tokyo) → Portland is nearer than Dublin.
    let r = c.get(node.url("/echo")).send().await.expect("req");
    assert_eq!(region(&r), "us-west");
    // Coordinates of Paris → Dublin.
    let r = c
        .get(node.url("/echo"))
        .header("x-user-lat", "48.85")
        .header("x-user-lon", "2.35")
        .send()
        .await
        .expect("req");
    assert_eq!(region(&r), "eu-west");
    // Country headers: Germany → Dublin, Mexico → Portland.
    for (country, want) in [("DE", "eu-west"), ("MX", "us-west")] {
        let r = c
            .get(node.url("/echo"))
            .header("x-user-country", country)
            .send()
            .await
            .expect("req");
        assert_eq!(region(&r), want, "{country}");
    }

    // A client whose address is in the configured networks table (127.0.0.2/32 → Paris) and
    // that is not a trusted proxy: the table places it, so Dublin answers.
    let from_paris_net = reqwest::Client::builder()
        .no_proxy()
        .local_address("127.0.0.2".parse::<std::net::IpAddr>().expect("ip"))
        .build()
        .expect("client");
    let r = from_paris_net
        .get(node.url("/echo"))
        .send()
        .await
        .expect("req");
    assert_eq!(region(&r), "eu-west", "CIDR table location");

    // Kill Dublin: Paris clients fail over to Portland, for safe and unsafe methods alike
    // (a refused connection means the request never left).
    eu.kill();
    for method in [
        reqwest::Method::GET,
        reqwest::Method::PUT,
        reqwest::Method::POST,
    ] {
        let r = c
            .request(method.clone(), node.url("/echo"))
            .header("x-user-lat", "48.85")
            .header("x-user-lon", "2.35")
            .body("payload")
            .send()
            .await
            .expect("req");
        assert_eq!(r.status(), 200, "{method}");
        assert_eq!(region(&r), "us-west", "{method}");
        let echo: Value = r.json().await.expect("json");
        assert_eq!(echo["body_len"], 7, "the body survived the failover");
    }
    let failed = node
        .metric(&format!(
            "outpost_origin_requests_total{{origin=\"api\",endpoint=\"{}\",outcome=\"connect_error\"}}",
            eu.addr
        ))
        .await;
    assert!(failed >= 3.0, "connect errors recorded: {failed}");
}

#[tokio::test(flavor = "multi_thread")]
async fn location_headers_from_untrusted_peers_are_ignored_and_dropped() {
    let us = Origin::echo("us-west").await;
    let eu = Origin::echo("eu-west").await;
    let node = Node::start(
        &NodeConfig::new()
            .origin("api", &[(&us, PORTLAND), (&eu, DUBLIN)], "")
            .route("api", "/", "api", ""),
    )
    .await;
    let r = client()
        .get(node.url("/echo"))
        .header("x-user-lat", "48.85")
        .header("x-user-lon", "2.35")
        .header("x-forwarded-for", "203.0.113.50")
        .send()
        .await
        .expect("req");
    assert_eq!(r.headers()["x-origin-region"], "us-west");
    let echo: Value = r.json().await.expect("json");
    assert!(header_of(&echo, "x-user-lat").is_empty());
    assert_eq!(
        header_of(&echo, "x-forwarded-for"),
        vec!["127.0.0.1"],
        "spoofed XFF replaced"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn health_checks_eject_and_readmit_endpoints() {
    let us = Origin::echo("us-west").await;
    let mut eu = Origin::echo("eu-west").await;
    let node = Node::start(
        &NodeConfig::new()
            .raw("[client_location]\ntrusted_proxies = [\"127.0.0.1/32\"]\n")
            .origin(
                "api",
                &[(&us, PORTLAND), (&eu, DUBLIN)],
                "connect_timeout = \"500ms\"\n[origins.api.health_check]\npath = \"/healthz\"\ninterval = \"100ms\"\ntimeout = \"100ms\"\nhealthy_threshold = 2\nunhealthy_threshold = 2\n[origins.api.passive]\nconsecutive_failures = 2\nejection_time = \"1s\"",
            )
            .route("api", "/", "api", ""),
    )
    .await;
    let c = client();
    let paris_region = || async {
        let r = c
            .get(node.url("/echo"))
            .header("x-user-country", "FR")
            .send()
            .await
            .expect("req");
        r.headers()["x-origin-region"]
            .to_str()
            .expect("ascii")
            .to_owned()
    };
    assert_eq!(paris_region().await, "eu-west");

    // Active: the origin reports unhealthy → traffic moves, health gauge drops.
    eu.set_healthy(false).await;
    eventually("eu-west marked unhealthy", SECS(10), || {
        node.unavailable(eu.addr)
    })
    .await;
    assert_eq!(paris_region().await, "us-west");
    let gauge = format!(
        "outpost_origin_endpoint_healthy{{origin=\"api\",endpoint=\"{}\",region=\"eu-west\"}}",
        eu.addr
    );
    assert_eq!(node.metric(&gauge).await, 0.0);
    eu.set_healthy(true).await;
    eventually("eu-west healthy again", SECS(10), || {
        node.available(eu.addr)
    })
    .await;
    assert_eq!(paris_region().await, "eu-west");
    assert_eq!(node.metric(&gauge).await, 1.0);

    // Passive + active: the process dies → out; it comes back on the same port → in again.
    eu.kill();
    eventually("dead endpoint out of rotation", SECS(10), || {
        node.unavailable(eu.addr)
    })
    .await;
    assert_eq!(paris_region().await, "us-west");
    eu.restart().await;
    eventually("restarted endpoint back", SECS(15), || {
        node.available(eu.addr)
    })
    .await;
    assert_eq!(paris_region().await, "eu-west");
}

#[tokio::test(flavor = "multi_thread")]
async fn origin_failures_map_to_502_503_504_with_problem_json() {
    let mut origin = Origin::echo("us-west").await;
    let node = Node::start(
        &NodeConfig::new()
            .origin(
                "api",
                &[(&origin, PORTLAND)],
                "connect_timeout = \"500ms\"\n[origins.api.passive]\nconsecutive_failures = 3\nejection_time = \"60s\"",
            )
            .route("slow", "/slow", "api", "timeout = \"300ms\"")
            .route("api", "/", "api", ""),
    )
    .await;
    let c = client();

    let r = c.get(node.url("/slow?ms=3000")).send().await.expect("req");
    assert_eq!(r.status(), 504);
    assert_eq!(r.headers()["content-type"], "application/problem+json");
    let p: Value = r.json().await.expect("json");
    assert_eq!(p["status"], 504);
    assert!(p["request_id"].as_str().is_some_and(|s| s.len() == 32));

    origin.kill();
    for _ in 0..2 {
        let r = c.get(node.url("/echo")).send().await.expect("req");
        assert_eq!(r.status(), 502);
    }
    // The third failure (timeout counted above + two refusals) ejects the only endpoint.
    eventually("endpoint ejected", SECS(5), || {
        node.unavailable(origin.addr)
    })
    .await;
    let r = c.get(node.url("/echo")).send().await.expect("req");
    assert_eq!(r.status(), 503);
    let p: Value = r.json().await.expect("json");
    assert_eq!(p["type"], "urn:outpost:problem:no-healthy-endpoint");
}

#[tokio::test(flavor = "multi_thread")]
async fn hostile_and_malformed_requests_get_clean_errors() {
    let origin = Origin::echo("us-west").await;
    let node = Node::start(
        &NodeConfig::new()
            .raw("[server]\nmax_header_bytes = \"16 KiB\"\nmax_headers = 50\nheader_read_timeout = \"1s\"\nsend_timeout = \"1s\"\n")
            .origin("api", &[(&origin, PORTLAND)], "")
            .route("api", "/echo", "api", "max_body_bytes = 1000")
            .route("bytes", "/bytes", "api", "")
            .route("slow", "/slow-body", "api", ""),
    )
    .await;
    let d = SECS(10);

    let big = "a".repeat(20_000);
    let r = raw_exchange(
        node.addr,
        format!("GET /echo HTTP/1.1\r\nHost: x\r\nX-Big: {big}\r\n\r\n").as_bytes(),
        d,
    )
    .await;
    assert!(r.starts_with("HTTP/1.1 431"), "oversized header: {r:.80}");

    let many: String = (0..60).map(|i| format!("X-H{i}: v\r\n")).collect();
    let r = raw_exchange(
        node.addr,
        format!("GET /echo HTTP/1.1\r\nHost: x\r\n{many}\r\n").as_bytes(),
        d,
    )
    .await;
    assert!(r.starts_with("HTTP/1.1 431"), "too many headers: {r:.80}");

    let r = raw_exchange(node.addr, b"GARBAGE\r\n\r\n", d).await;
    assert!(r.starts_with("HTTP/1.1 400"), "malformed: {r:.80}");

    let r = raw_exchange(
        node.addr,
        b"GET /echo/../admin HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        d,
    )
    .await;
    assert!(r.starts_with("HTTP/1.1 400"), "dot segments: {r:.80}");

    let r = raw_exchange(
        node.addr,
        b"GET /nothing-here HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        d,
    )
    .await;
    assert!(
        r.starts_with("HTTP/1.1 404") && r.contains("application/problem+json"),
        "no route: {r:.120}"
    );

    // Declared too large → 413 without reading the body.
    let r = raw_exchange(
        node.addr,
        b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\nConnection: close\r\n\r\n",
        d,
    )
    .await;
    assert!(r.starts_with("HTTP/1.1 413"), "declared length: {r:.80}");
    // Chunked past the limit → 413 while streaming.
    let chunk = format!("{:x}\r\n{}\r\n", 600, "b".repeat(600));
    let req = format!(
        "POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n{chunk}{chunk}0\r\n\r\n"
    );
    let r = raw_exchange(node.addr, req.as_bytes(), d).await;
    assert!(r.starts_with("HTTP/1.1 413"), "chunked over limit: {r:.80}");

    // Slowloris: a head that never completes is cut off by the header-read timeout.
    let started = std::time::Instant::now();
    let r = raw_exchange(node.addr, b"GET /echo HTTP/1.1\r\nHost: x\r\n", SECS(8)).await;
    assert!(
        started.elapsed() < SECS(6),
        "slow client not cut off ({:?}): {r:.80}",
        started.elapsed()
    );

    // CONNECT is refused.
    let r = raw_exchange(
        node.addr,
        b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n",
        d,
    )
    .await;
    assert!(r.starts_with("HTTP/1.1 405"), "connect: {r:.80}");

    // A connection that never sends a byte is closed too (hyper's timeout starts at the first
    // byte; a silent client would otherwise hold a connection slot for ever). The admin
    // listener has the same guards (it used to have none: idle sockets there could use up the
    // node's file descriptors).
    let slow_clients: [(_, &[u8], bool, &str); 3] = [
        (node.addr, b"", true, "silent client"),
        (
            node.admin,
            b"GET /livez HTTP/1.1\r\nHost: x\r\n",
            false,
            "slow admin client",
        ),
        (node.admin, b"", true, "silent admin client"),
    ];
    for (addr, sent, silent, what) in slow_clients {
        let started = std::time::Instant::now();
        let r = raw_exchange(addr, sent, SECS(8)).await;
        assert!(
            (!silent || r.is_empty()) && started.elapsed() < SECS(6),
            "{what} not cut off ({:?}): {r:.80}",
            started.elapsed()
        );
    }

    // One host per request (RFC 9112 §3.2): two Host lines or none on HTTP/1.1 are refused;
    // an absolute-form target's authority replaces Host, for routing and for the origin.
    let refused: [(&[u8], &str); 3] = [
        (
            b"GET /echo HTTP/1.1\r\nHost: a.test\r\nHost: b.test\r\nConnection: close\r\n\r\n",
            "two hosts",
        ),
        (
            b"GET /echo HTTP/1.1\r\nConnection: close\r\n\r\n",
            "no host",
        ),
        (
            b"GET /echo HTTP/1.1\r\nHost: u@a.test\r\nConnection: close\r\n\r\n",
            "userinfo in host",
        ),
    ];
    for (request, what) in refused {
        let r = raw_exchange(node.addr, request, d).await;
        assert!(r.starts_with("HTTP/1.1 400"), "{what}: {r:.80}");
    }
    let r = raw_exchange(
        node.addr,
        b"GET http://shop.test/echo/abs HTTP/1.1\r\nHost: admin.test\r\nConnection: close\r\n\r\n",
        d,
    )
    .await;
    assert!(r.starts_with("HTTP/1.1 200"), "absolute form: {r:.80}");
    let echo: Value =
        serde_json::from_str(r.split("\r\n\r\n").nth(1).unwrap_or("").trim()).expect("echo json");
    assert_eq!(header_of(&echo, "host"), vec!["shop.test"], "{echo}");

    // A client's broken body is the client's fault: 400, and the origin is not ejected for it
    // (five such requests in a row used to eject it and answer 503 to everyone).
    for _ in 0..6 {
        let r = raw_exchange(
            node.addr,
            b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\nzz\r\nhello\r\n0\r\n\r\n",
            d,
        )
        .await;
        assert!(
            r.starts_with("HTTP/1.1 400") && !r.contains("127.0.0.1"),
            "bad chunk: {r:.300}"
        );
    }
    let r = client()
        .get(node.url("/echo/after-bad-bodies"))
        .send()
        .await
        .expect("req");
    assert_eq!(r.status(), 200, "the origin was not ejected");

    // A client that asks for a large answer and takes none of it is cut off after
    // send_timeout, instead of holding its connection (and an origin connection) for ever.
    {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        const SIZE: usize = 200 << 20;
        let mut s = tokio::net::TcpStream::connect(node.addr)
            .await
            .expect("connect");
        s.write_all(format!("GET /bytes/{SIZE} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
            .await
            .expect("send");
        tokio::time::sleep(SECS(3)).await;
        let mut got = 0usize;
        let mut buf = vec![0u8; 1 << 16];
        let read_all = async {
            loop {
                match s.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => got += n,
                }
            }
        };
        let ended = tokio::time::timeout(SECS(20), read_all).await;
        assert!(ended.is_ok(), "the connection was not closed");
        assert!(
            got < SIZE,
            "the whole answer arrived ({got} bytes): not cut off"
        );
    }

    // The same on HTTP/2 (h2c, hyper's client): a stream whose window the client leaves shut
    // (it reads nothing of the body) is cut after send_timeout too, and its origin connection
    // let go. On HTTP/2 nothing blocks our writes; the node notices that the answer has data
    // nobody asks for, and resets that stream (only that one).
    let h2 = || async {
        let tcp = tokio::net::TcpStream::connect(node.addr)
            .await
            .expect("connect");
        let (sender, conn) = hyper::client::conn::http2::handshake(
            hyper_util::rt::TokioExecutor::new(),
            hyper_util::rt::TokioIo::new(tcp),
        )
        .await
        .expect("h2c handshake");
        (sender, tokio::spawn(conn))
    };
    let get = |path: String| {
        hyper::Request::get(format!("http://x{path}"))
            .body(http_body_util::Empty::<bytes::Bytes>::new())
            .expect("request")
    };
    {
        let (mut sender, driver) = h2().await;
        const SIZE: usize = 200 << 20;
        let resp = sender
            .send_request(get(format!("/bytes/{SIZE}")))
            .await
            .expect("answer head");
        assert_eq!(resp.status(), 200);
        tokio::time::sleep(SECS(3)).await;
        let mut body = resp.into_body();
        let mut got = 0usize;
        let reset = loop {
            match tokio::time::timeout(SECS(20), http_body_util::BodyExt::frame(&mut body)).await {
                Ok(Some(Ok(f))) => got += f.data_ref().map_or(0, |d| d.len()),
                Ok(Some(Err(_))) => break true,
                Ok(None) | Err(_) => break false,
            }
        };
        assert!(reset, "the stalled stream was not cut ({got} bytes)");
        assert!(got < SIZE, "the whole answer arrived: not cut");
        // The connection itself is still up for other streams.
        let resp = sender
            .send_request(get("/echo/after-stall".into()))
            .await
            .expect("another stream on the same connection");
        assert_eq!(resp.status(), 200);
        drop(driver);
    }
    // A slow origin is not a stalled client: 2.5 s between two parts, over send_timeout.
    {
        let (mut sender, _driver) = h2().await;
        let resp = sender
            .send_request(get("/slow-body?ms=2500".into()))
            .await
            .expect("answer head");
        let body = http_body_util::BodyExt::collect(resp.into_body())
            .await
            .expect("the whole answer")
            .to_bytes();
        assert_eq!(&body[..], b"start\nend\n");
    }

    // And the node is still fine.
    let r = client()
        .get(node.url("/echo/ok"))
        .send()
        .await
        .expect("req");
    assert_eq!(r.status(), 200);
}

#[tokio::test(flavor = "multi_thread")]
async fn http2_cleartext_and_tls_with_alpn() {
    let origin = Origin::echo("us-west").await;
    let dir = tempfile::tempdir().expect("tempdir");
    let (config, _) = tls_listener(dir.path());
    let config = config
        .origin("api", &[(&origin, PORTLAND)], "")
        .route("api", "/", "api", "");
    let node = Node::start_in(dir, &config.render()).await;

    // curl, a real client: h2 via ALPN, then HTTP/1.1 over TLS.
    for (flag, want) in [("--http2", "2"), ("--http1.1", "1.1")] {
        let out = tokio::process::Command::new("curl")
            .args([
                "-sk",
                flag,
                "-o",
                "/dev/null",
                "-w",
                "%{http_version} %{http_code}",
            ])
            .arg(format!("https://localhost:{}/echo/tls", node.addr.port()))
            .output()
            .await
            .expect("curl runs");
        assert_eq!(String::from_utf8_lossy(&out.stdout), format!("{want} 200"));
    }
    let out = tokio::process::Command::new("curl")
        .args(["-sk", "--http2"])
        .arg(format!("https://localhost:{}/echo/tls", node.addr.port()))
        .output()
        .await
        .expect("curl runs");
    let echo: Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(header_of(&echo, "x-forwarded-proto"), vec!["https"]);
    assert_eq!(header_of(&echo, "via"), vec!["2 test-node"]);
    assert_eq!(
        header_of(&echo, "host"),
        vec![format!("localhost:{}", node.addr.port()).as_str()]
    );

    // h2c with prior knowledge on a plain listener.
    let (_o2, plain) = one_origin_node("").await;
    let out = tokio::process::Command::new("curl")
        .args([
            "-s",
            "--http2-prior-knowledge",
            "-o",
            "/dev/null",
            "-w",
            "%{http_version} %{http_code}",
        ])
        .arg(plain.url("/echo/h2c"))
        .output()
        .await
        .expect("curl runs");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "2 200");
}

#[tokio::test(flavor = "multi_thread")]
async fn reload_swaps_config_without_dropping_in_flight_requests() {
    let origin = Origin::echo("us-west").await;
    let base = NodeConfig::new().origin("api", &[(&origin, PORTLAND)], "");
    let node = Node::start(
        &base
            .clone()
            .route("old", "/old", "api", "strip_prefix = true"),
    )
    .await;
    let c = client();

    // A slow request is in flight while the config changes.
    let slow = spawn_get(node.url("/old/slow?ms=1500"));
    eventually("slow request reached the origin", SECS(5), || async {
        origin.slow_in_flight().await >= 1
    })
    .await;

    std::fs::write(
        &node.config_path,
        base.clone()
            .route("new", "/new", "api", "strip_prefix = true")
            .render(),
    )
    .expect("rewrite");
    node.signal(libc::SIGHUP);
    eventually("new route live", SECS(10), || async {
        c.get(node.url("/new/echo"))
            .send()
            .await
            .is_ok_and(|r| r.status() == 200)
    })
    .await;
    assert_eq!(
        c.get(node.url("/old/echo"))
            .send()
            .await
            .expect("req")
            .status(),
        404
    );
    assert_eq!(slow.await.expect("join").expect("in-flight request"), 200);

    // A broken config is rejected with file:line:col diagnostics; the old one keeps serving.
    std::fs::write(&node.config_path, "version = 1\n[node]\nid = \"test-node\"\nlocation = { lat = 1.0, lon = 2.0 }\nlisten = 1\n").expect("rewrite");
    node.signal(libc::SIGHUP);
    eventually("rejection logged", SECS(10), || async {
        node.logs.contains("Configuration rejected") && node.logs.contains("outpost.toml:5:1")
    })
    .await;
    assert_eq!(
        c.get(node.url("/new/echo"))
            .send()
            .await
            .expect("req")
            .status(),
        200
    );
    assert_eq!(
        node.metric(r#"outpost_config_reloads_total{result="rejected"}"#)
            .await,
        1.0
    );

    // The admin API reloads too, with its token only.
    std::fs::write(
        &node.config_path,
        base.clone()
            .route("third", "/third", "api", "strip_prefix = true")
            .render(),
    )
    .expect("rewrite");
    let r = c.post(node.admin_url("/reload")).send().await.expect("req");
    assert_eq!(r.status(), 401);
    let r = c
        .post(node.admin_url("/reload"))
        .bearer_auth("test-token")
        .send()
        .await
        .expect("req");
    assert_eq!(r.status(), 200);
    assert_eq!(
        c.get(node.url("/third/echo"))
            .send()
            .await
            .expect("req")
            .status(),
        200
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_drains_in_flight_requests_then_exits_zero() {
    let (origin, mut node) = one_origin_node("").await;
    let c = client();
    let slow = spawn_get(node.url("/slow?ms=1500"));
    eventually("request in flight at the origin", SECS(5), || async {
        origin.slow_in_flight().await >= 1
    })
    .await;
    node.signal(libc::SIGTERM);
    eventually(
        "readyz reports draining or the node is gone",
        SECS(5),
        || async {
            match c.get(node.admin_url("/readyz")).send().await {
                Ok(r) => r.status() == 503,
                Err(_) => true,
            }
        },
    )
    .await;
    assert_eq!(
        slow.await
            .expect("join")
            .expect("in-flight request finished"),
        200
    );
    let status = node.wait_exit(SECS(10)).await;
    assert!(status.success(), "exit status {status}");
    assert!(node.logs.contains("Drained; exiting."));
    assert!(
        tokio::net::TcpStream::connect(node.addr).await.is_err(),
        "listener closed"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn check_validates_configs_with_located_diagnostics() {
    let dir = tempfile::tempdir().expect("tempdir");
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "version = 1\n[node]\nid = \"n\"\nlocation = { lat = 1.0, lon = 2.0 }\n\n[[listeners]]\nadress = \"127.0.0.1:8080\"\n").expect("write");
    let out = std::process::Command::new(outpost_bin())
        .args(["check", "--config"])
        .arg(&bad)
        .output()
        .expect("runs");
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("bad.toml:7:1"), "{err}");
    assert!(err.contains("help: did you mean `addr`?"), "{err}");

    let example = repo_root().join("examples/retail/outpost.toml");
    let out = std::process::Command::new(outpost_bin())
        .args(["check", "--config"])
        .arg(&example)
        .output()
        .expect("runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let out = std::process::Command::new(outpost_bin())
        .args(["serve", "--config"])
        .arg(&bad)
        .output()
        .expect("runs");
    assert_eq!(
        out.status.code(),
        Some(1),
        "serve refuses an invalid config"
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("bad.toml:7:1"));

    for args in [
        vec!["--help"],
        vec!["serve", "--help"],
        vec!["check", "--help"],
        vec!["completions", "bash"],
    ] {
        let out = std::process::Command::new(outpost_bin())
            .args(&args)
            .output()
            .expect("runs");
        assert!(out.status.success(), "{args:?}");
        assert!(!out.stdout.is_empty(), "{args:?}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn retail_example_serves_the_catalog_and_records_sales_through_the_edge() {
    // The origins verify identities against the node's JWKS, so the node's port is chosen
    // first (a free port, released for the node to bind).
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    let jwks = format!("http://127.0.0.1:{port}/.well-known/outpost/jwks.json");
    let mut us = Origin::retail_with_jwks("us-west", &jwks).await;
    let mut eu = Origin::retail_with_jwks("eu-west", &jwks).await;
    // The shipped example config, with the demo's fixed ports swapped for the test's.
    let text = std::fs::read_to_string(repo_root().join("examples/retail/outpost.toml"))
        .expect("example config")
        .replace("127.0.0.1:8080", &format!("127.0.0.1:{port}"))
        .replace("127.0.0.1:9901", "127.0.0.1:0")
        .replace("http://127.0.0.1:8001", &us.url())
        .replace("http://127.0.0.1:8002", &eu.url());
    let node = Node::start_in(tempfile::tempdir().expect("tempdir"), &text).await;
    let c = client();

    let r = c.get(node.url("/api/products")).send().await.expect("req");
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-served-by"], "tokyo-1");
    let products: Value = r.json().await.expect("json");
    assert!(products.as_array().is_some_and(|p| !p.is_empty()));

    let r = c
        .post(node.url("/api/sales"))
        .header("x-user-country", "IE")
        .json(&serde_json::json!({"store_id": "tokyo-ginza", "sku": "TEA-001", "quantity": 2, "unit_price_cents": 450}))
        .send()
        .await
        .expect("req");
    assert_eq!(r.status(), 201);
    assert_eq!(r.headers()["x-origin-region"], "eu-west");

    let r = c
        .post(node.url("/api/sales"))
        .json(&serde_json::json!({"store_id": "x", "sku": "TEA-001", "quantity": 0, "unit_price_cents": 1}))
        .send()
        .await
        .expect("req");
    assert_eq!(r.status(), 422, "FastAPI's validation error passes through");

    // The edge vouches for the request with a signed identity that FastAPI verifies
    // (python/outpost-fastapi); the same call made directly, or forged, is refused.
    let r = c
        .get(node.url("/api/whoami"))
        .header("x-user-country", "IE")
        .send()
        .await
        .expect("whoami");
    assert_eq!(r.status(), 200);
    let me: Value = r.json().await.expect("json");
    assert_eq!(me["node"], "tokyo-1");
    assert_eq!(me["country"], "IE");
    let direct = c
        .get(format!("{}/whoami", eu.url()))
        .send()
        .await
        .expect("direct");
    assert_eq!(direct.status(), 401);
    let forged = c
        .get(format!("{}/whoami", eu.url()))
        .header("x-outpost-identity", "eyJhbGciOiJub25lIn0.e30.")
        .send()
        .await
        .expect("forged");
    assert_eq!(forged.status(), 401);

    // Both regions down: the store keeps selling (202, kept at the edge), and the sale reaches
    // the center once a region is back.
    us.kill();
    eu.kill();
    let r = c
        .post(node.url("/api/sales"))
        .json(&serde_json::json!({"store_id": "tokyo-ginza", "sku": "MUG-003", "quantity": 1, "unit_price_cents": 1200}))
        .send()
        .await
        .expect("req");
    assert_eq!(r.status(), 202);
    let kept: Value = r.json().await.expect("json");
    let status_url = node.url(kept["status_url"].as_str().expect("status url"));
    us.restart().await;
    eventually("the kept sale was delivered", SECS(30), || async {
        let s: Value = c
            .get(&status_url)
            .send()
            .await
            .expect("status")
            .json()
            .await
            .expect("json");
        s["state"] == "delivered" && s["response"]["status"] == 201
    })
    .await;
    let count: Value = c
        .get(format!("{}/sales/count", us.url()))
        .send()
        .await
        .expect("count")
        .json()
        .await
        .expect("json");
    assert_eq!(
        count["count"], 1,
        "us-west's own sale log holds the delivered sale"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn origins_configured_for_h2_get_http2() {
    let addr = h2_origin().await;
    let toml = format!(
        "{}\n[origins.grpcish]\nprotocol = \"h2\"\n[[origins.grpcish.endpoints]]\nurl = \"http://{addr}\"\nregion = \"local\"\nlocation = {{ lat = 0.0, lon = 0.0 }}\n\n[[routes]]\nname = \"h2\"\npath_prefix = \"/\"\norigin = \"grpcish\"\n",
        NodeConfig::new().render()
    );
    let node = Node::start_in(tempfile::tempdir().expect("tempdir"), &toml).await;
    // An HTTP/1.1 client in front, HTTP/2 behind.
    for _ in 0..3 {
        let r = client()
            .get(node.url("/h2/check"))
            .send()
            .await
            .expect("req");
        assert_eq!(r.status(), 200);
        assert_eq!(r.text().await.expect("body"), "HTTP/2.0 /h2/check");
    }
    // A WebSocket handshake cannot cross to an HTTP/2 origin: it is answered as a plain GET.
    let raw = raw_exchange(
        node.addr,
        b"GET /h2/ws HTTP/1.1\r\nHost: edge.test\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
          Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
          Connection: close\r\n\r\n",
        SECS(10),
    )
    .await;
    assert!(raw.starts_with("HTTP/1.1 200 "), "{raw}");
    assert!(raw.ends_with("HTTP/2.0 /h2/ws"), "{raw}");
}

#[tokio::test(flavor = "multi_thread")]
async fn fixed_response_routes_answer_without_the_origin() {
    let origin = Origin::echo("us-west").await;
    let node = Node::start(
        &NodeConfig::new()
            .origin("api", &[(&origin, PORTLAND)], "")
            .route(
                "down",
                "/maintenance",
                "api",
                "[routes.respond]\nstatus = 503\nbody = \"{\\\"back\\\": \\\"soon\\\"}\"\ncontent_type = \"application/json\"",
            ),
    )
    .await;
    let hits = || async {
        let v: Value = client()
            .get(format!("{}/control/hits", origin.url()))
            .send()
            .await
            .expect("hits")
            .json()
            .await
            .expect("hits json");
        v["total"].as_u64().unwrap_or(0) - v["healthz"].as_u64().unwrap_or(0)
    };
    let before = hits().await;
    let r = client()
        .get(node.url("/maintenance/page"))
        .send()
        .await
        .expect("fixed");
    assert_eq!(r.status(), 503);
    assert_eq!(r.headers()["content-type"], "application/json");
    assert!(r.headers().contains_key("x-request-id"));
    assert_eq!(r.text().await.expect("body"), "{\"back\": \"soon\"}");
    // Only the /control/hits calls themselves (and health checks, if any) reached it.
    assert_eq!(hits().await, before + 1);
}
