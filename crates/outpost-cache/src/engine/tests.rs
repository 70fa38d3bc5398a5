//! The cache stage against a scripted in-process upstream and a pinned clock: every rule of
//! the module docs, deterministically.

use super::*;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, UNIX_EPOCH};

use bytes::Bytes;
use http_body_util::BodyExt as _;
use tokio::sync::Semaphore;

type Reply = Result<(u16, Vec<(&'static str, String)>, Bytes), &'static str>;
type Script = Box<dyn FnMut(&HeaderMap) -> Reply + Send>;

struct Fake {
    calls: AtomicUsize,
    seen: Mutex<Vec<HeaderMap>>,
    script: Mutex<Script>,
    gate: Option<Arc<Semaphore>>,
}

impl Fake {
    fn new(script: impl FnMut(&HeaderMap) -> Reply + Send + 'static) -> Arc<Fake> {
        Arc::new(Fake {
            calls: AtomicUsize::new(0),
            seen: Mutex::new(Vec::new()),
            script: Mutex::new(Box::new(script)),
            gate: None,
        })
    }

    fn gated(
        gate: Arc<Semaphore>,
        script: impl FnMut(&HeaderMap) -> Reply + Send + 'static,
    ) -> Arc<Fake> {
        Arc::new(Fake {
            calls: AtomicUsize::new(0),
            seen: Mutex::new(Vec::new()),
            script: Mutex::new(Box::new(script)),
            gate: Some(gate),
        })
    }

    fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }

    fn last_seen(&self) -> HeaderMap {
        self.seen
            .lock()
            .expect("lock")
            .last()
            .cloned()
            .unwrap_or_default()
    }
}

impl Upstream for Fake {
    type Error = &'static str;

    fn fetch(
        &self,
        _method: Method,
        headers: HeaderMap,
    ) -> impl Future<Output = Result<Response<Body>, &'static str>> + Send + 'static {
        self.calls.fetch_add(1, Ordering::SeqCst);
        let reply = (self.script.lock().expect("lock"))(&headers);
        self.seen.lock().expect("lock").push(headers);
        let gate = self.gate.clone();
        async move {
            if let Some(g) = gate {
                let permit = g.acquire().await.map_err(|_| "gate closed")?;
                permit.forget();
            }
            let (status, headers, body) = reply?;
            let mut r = Response::new(body::full(body));
            *r.status_mut() = StatusCode::from_u16(status).map_err(|_| "status")?;
            for (n, v) in headers {
                r.headers_mut().append(
                    http::HeaderName::from_static(n),
                    HeaderValue::from_str(&v).map_err(|_| "value")?,
                );
            }
            Ok(r)
        }
    }
}

/// A 200 with `max-age=60` and an entity tag.
fn tagged(etag: &str, body: &'static str) -> Reply {
    Ok((
        200,
        vec![
            ("cache-control", "max-age=60".to_owned()),
            ("etag", etag.to_owned()),
        ],
        Bytes::from_static(body.as_bytes()),
    ))
}

/// An answer with the given status, fields and body.
fn reply(status: u16, fields: &[(&'static str, &str)], body: &'static [u8]) -> Reply {
    Ok((
        status,
        fields.iter().map(|(n, v)| (*n, (*v).to_owned())).collect(),
        Bytes::from_static(body),
    ))
}

fn ok(cc: &str, body: &'static str) -> Reply {
    Ok((
        200,
        vec![("cache-control", cc.to_owned())],
        Bytes::from_static(body.as_bytes()),
    ))
}

struct Harness {
    cache: Cache,
    time: Arc<Mutex<SystemTime>>,
    policy: Arc<RoutePolicy>,
    _dir: Option<tempfile::TempDir>,
}

impl Harness {
    fn new() -> Harness {
        Self::with(RoutePolicy::default(), None)
    }

    fn with(policy: RoutePolicy, dir: Option<tempfile::TempDir>) -> Harness {
        let time = Arc::new(Mutex::new(UNIX_EPOCH + Duration::from_secs(1_700_000_000)));
        let t = time.clone();
        let config = StorageConfig {
            memory_bytes: 64 << 20,
            disk: dir.as_ref().map(|d| (d.path().to_path_buf(), 64 << 20)),
        };
        let cache = Cache::with_clock(
            &config,
            &Metrics::new("test"),
            Arc::new(move || *t.lock().expect("clock")),
        )
        .expect("cache opens");
        Harness {
            cache,
            time,
            policy: Arc::new(policy),
            _dir: dir,
        }
    }

    fn advance(&self, secs: u64) {
        *self.time.lock().expect("clock") += Duration::from_secs(secs);
    }

    async fn get(&self, fake: &Arc<Fake>, path: &str, headers: &[(&'static str, &str)]) -> Got {
        self.request(fake, Method::GET, path, headers).await
    }

    /// The cache stage's answer, its body not read (as hyper leaves a body already at its end).
    async fn handled(
        &self,
        fake: &Arc<Fake>,
        method: &Method,
        path: &str,
        headers: HeaderMap,
        authenticated: bool,
    ) -> Handled<&'static str> {
        self.cache
            .handle(
                &self.policy,
                CacheRequest {
                    host: "shop.test",
                    path_and_query: path,
                    method,
                    headers,
                    authenticated,
                },
                fake.clone(),
            )
            .await
    }

    async fn request(
        &self,
        fake: &Arc<Fake>,
        method: Method,
        path: &str,
        headers: &[(&'static str, &str)],
    ) -> Got {
        let mut h = HeaderMap::new();
        for (n, v) in headers {
            h.append(
                http::HeaderName::from_static(n),
                HeaderValue::from_str(v).expect("value"),
            );
        }
        let handled = self.handled(fake, &method, path, h, false).await;
        let outcome = handled.outcome;
        match handled.result {
            Ok(resp) => {
                let (parts, body) = resp.into_parts();
                let body = body.collect().await.expect("body").to_bytes();
                Got {
                    status: parts.status.as_u16(),
                    headers: parts.headers,
                    body,
                    outcome,
                    error: None,
                }
            }
            Err(e) => Got {
                status: 0,
                headers: HeaderMap::new(),
                body: Bytes::new(),
                outcome,
                error: Some(e),
            },
        }
    }
}

#[derive(Debug)]
struct Got {
    status: u16,
    headers: HeaderMap,
    body: Bytes,
    outcome: CacheOutcome,
    error: Option<&'static str>,
}

impl Got {
    fn cache_status(&self) -> &str {
        self.headers
            .get(CACHE_STATUS)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
    }
    fn header(&self, name: &str) -> &str {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
    }
}

#[tokio::test]
async fn miss_is_stored_then_hit_with_age() {
    let h = Harness::new();
    let fake = Fake::new(|_| ok("max-age=60", "hello"));
    let first = h.get(&fake, "/a", &[]).await;
    assert_eq!(
        first.cache_status(),
        "outpost; fwd=uri-miss; fwd-status=200; stored"
    );
    assert_eq!(first.outcome, CacheOutcome::Miss);
    assert_eq!(first.body, "hello");
    h.advance(10);
    let second = h.get(&fake, "/a", &[]).await;
    assert_eq!(second.cache_status(), "outpost; hit; ttl=50");
    assert_eq!(second.header("age"), "10");
    assert_eq!(second.body, "hello");
    assert_eq!(second.outcome, CacheOutcome::Hit);
    assert_eq!(fake.calls(), 1);
    h.advance(51);
    let third = h.get(&fake, "/a", &[]).await;
    assert!(
        third.cache_status().starts_with("outpost; fwd=stale"),
        "{}",
        third.cache_status()
    );
    assert_eq!(fake.calls(), 2);
}

#[tokio::test]
async fn query_order_and_ignored_parameters_share_an_entry() {
    let h = Harness::with(
        RoutePolicy {
            key: KeyPolicy {
                ignore_query: vec!["utm_*".into()],
                ..KeyPolicy::default()
            },
            ..RoutePolicy::default()
        },
        None,
    );
    let fake = Fake::new(|_| ok("max-age=60", "x"));
    h.get(&fake, "/p?b=2&a=1", &[]).await;
    let again = h.get(&fake, "/p?a=1&utm_source=mail&b=2", &[]).await;
    assert_eq!(again.outcome, CacheOutcome::Hit);
    assert_eq!(fake.calls(), 1);
}

#[tokio::test]
async fn uncacheable_responses_are_not_stored() {
    for (cc, extra, detail) in [
        ("no-store", None, "no-store"),
        ("private, max-age=60", None, "private"),
        ("max-age=60", Some(("set-cookie", "a=b")), "set-cookie"),
        ("max-age=60", Some(("vary", "*")), "vary-star"),
    ] {
        let h = Harness::new();
        let fake = Fake::new(move |_| {
            let mut headers = vec![("cache-control", cc.to_owned())];
            if let Some((n, v)) = extra {
                headers.push((n, v.to_owned()));
            }
            Ok((200, headers, Bytes::from_static(b"x")))
        });
        let first = h.get(&fake, "/a", &[]).await;
        assert!(
            first.cache_status().ends_with(&format!("detail={detail}")),
            "{cc}: {}",
            first.cache_status()
        );
        h.get(&fake, "/a", &[]).await;
        assert_eq!(fake.calls(), 2, "{cc}");
    }
}

#[tokio::test]
async fn validation_errors_are_not_stored_unless_configured() {
    let reply = |_: &HeaderMap| {
        Ok((
            422,
            vec![("cache-control", "max-age=60".to_owned())],
            Bytes::from_static(b"{}"),
        ))
    };
    let h = Harness::new();
    let fake = Fake::new(reply);
    h.get(&fake, "/a", &[]).await;
    h.get(&fake, "/a", &[]).await;
    assert_eq!(fake.calls(), 2);
    let h = Harness::with(
        RoutePolicy {
            store_validation_errors: true,
            ..RoutePolicy::default()
        },
        None,
    );
    let fake = Fake::new(reply);
    h.get(&fake, "/a", &[]).await;
    assert_eq!(h.get(&fake, "/a", &[]).await.status, 422);
    assert_eq!(fake.calls(), 1);
}

#[tokio::test]
async fn authorization_requests_share_only_what_the_origin_allows() {
    let h = Harness::new();
    let fake = Fake::new(|_| ok("max-age=60", "secret"));
    h.get(&fake, "/me", &[("authorization", "Bearer a")]).await;
    h.get(&fake, "/me", &[("authorization", "Bearer b")]).await;
    assert_eq!(fake.calls(), 2);
    let fake = Fake::new(|_| ok("public, max-age=60", "shared"));
    h.get(&fake, "/pub", &[("authorization", "Bearer a")]).await;
    assert_eq!(
        h.get(&fake, "/pub", &[("authorization", "Bearer b")])
            .await
            .outcome,
        CacheOutcome::Hit
    );
}

#[tokio::test]
async fn stale_responses_are_revalidated_and_304_headers_merged() {
    let h = Harness::new();
    let fake = Fake::new(|req| {
        if req.get("if-none-match").is_some_and(|v| v == "\"v1\"") {
            Ok((
                304,
                vec![
                    ("cache-control", "max-age=100".to_owned()),
                    ("x-version", "2".to_owned()),
                    ("etag", "\"v1\"".to_owned()),
                ],
                Bytes::new(),
            ))
        } else {
            Ok((
                200,
                vec![
                    ("cache-control", "max-age=10".to_owned()),
                    ("etag", "\"v1\"".to_owned()),
                    ("x-version", "1".to_owned()),
                    ("content-length", "4".to_owned()),
                ],
                Bytes::from_static(b"body"),
            ))
        }
    });
    h.get(&fake, "/r", &[]).await;
    h.advance(20);
    let revalidated = h.get(&fake, "/r", &[]).await;
    assert_eq!(
        revalidated.cache_status(),
        "outpost; fwd=stale; fwd-status=304; ttl=100"
    );
    assert_eq!(revalidated.outcome, CacheOutcome::Revalidated);
    assert_eq!(revalidated.status, 200);
    assert_eq!(revalidated.body, "body");
    assert_eq!(revalidated.header("x-version"), "2");
    assert_eq!(revalidated.header("content-length"), "4");
    assert_eq!(fake.last_seen()["if-none-match"], "\"v1\"");
    h.advance(50);
    let hit = h.get(&fake, "/r", &[]).await;
    assert_eq!(hit.outcome, CacheOutcome::Hit);
    assert_eq!(hit.header("x-version"), "2");
    assert_eq!(fake.calls(), 2);
}

#[tokio::test]
async fn client_conditionals_get_304_from_storage_and_are_not_forwarded() {
    let h = Harness::new();
    let fake = Fake::new(|_| tagged("W/\"e\"", "full"));
    let first = h.get(&fake, "/c", &[("if-none-match", "W/\"e\"")]).await;
    assert_eq!(
        first.status, 200,
        "a miss fetches and returns the full response"
    );
    assert!(fake.last_seen().get("if-none-match").is_none());
    let second = h.get(&fake, "/c", &[("if-none-match", "\"e\"")]).await;
    assert_eq!(second.status, 304);
    assert!(second.body.is_empty());
    assert_eq!(second.header("etag"), "W/\"e\"");
    assert!(second.cache_status().starts_with("outpost; hit"));
}

#[tokio::test]
async fn head_is_answered_from_a_stored_get() {
    let h = Harness::new();
    let fake = Fake::new(|_| ok("max-age=60", "12345"));
    let miss = h.request(&fake, Method::HEAD, "/h", &[]).await;
    assert_eq!(miss.outcome, CacheOutcome::Miss);
    h.get(&fake, "/h", &[]).await;
    let head = h.request(&fake, Method::HEAD, "/h", &[]).await;
    assert_eq!(head.outcome, CacheOutcome::Hit);
    assert!(head.body.is_empty());
    assert_eq!(head.header("content-length"), "5");
    assert_eq!(fake.calls(), 2);
}

#[tokio::test]
async fn vary_keeps_one_variant_per_selecting_header_value() {
    let h = Harness::new();
    let fake = Fake::new(|req| {
        let lang = req
            .get("accept-language")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("none")
            .to_owned();
        Ok((
            200,
            vec![
                ("cache-control", "max-age=60".to_owned()),
                ("vary", "Accept-Language".to_owned()),
                ("content-language", lang),
            ],
            Bytes::from_static(b"x"),
        ))
    });
    h.get(&fake, "/v", &[("accept-language", "en")]).await;
    let fr = h.get(&fake, "/v", &[("accept-language", "fr")]).await;
    assert!(
        fr.cache_status().contains("fwd=vary-miss"),
        "{}",
        fr.cache_status()
    );
    let en = h.get(&fake, "/v", &[("accept-language", "en")]).await;
    assert_eq!(en.outcome, CacheOutcome::Hit);
    assert_eq!(en.header("content-language"), "en");
    let fr = h.get(&fake, "/v", &[("accept-language", "fr")]).await;
    assert_eq!(fr.header("content-language"), "fr");
    assert_eq!(fake.calls(), 2);
}

#[tokio::test]
async fn client_directives_force_validation_when_honoured() {
    let h = Harness::new();
    let fake = Fake::new(|_| ok("max-age=60", "x"));
    h.get(&fake, "/d", &[]).await;
    let forced = h.get(&fake, "/d", &[("cache-control", "no-cache")]).await;
    assert!(forced.cache_status().starts_with("outpost; fwd=request"));
    h.advance(30);
    let min_fresh = h.get(&fake, "/d", &[("cache-control", "max-age=10")]).await;
    assert!(min_fresh.cache_status().starts_with("outpost; fwd=request"));
    assert_eq!(fake.calls(), 3);

    let shielded = Harness::with(
        RoutePolicy {
            client_directives: false,
            ..RoutePolicy::default()
        },
        None,
    );
    let fake = Fake::new(|_| ok("max-age=60", "x"));
    shielded.get(&fake, "/d", &[]).await;
    let hit = shielded
        .get(&fake, "/d", &[("cache-control", "no-cache")])
        .await;
    assert_eq!(hit.outcome, CacheOutcome::Hit);
}

#[tokio::test]
async fn only_if_cached_never_contacts_the_origin() {
    let h = Harness::new();
    let fake = Fake::new(|_| ok("max-age=60", "x"));
    let got = h
        .get(&fake, "/o", &[("cache-control", "only-if-cached")])
        .await;
    assert_eq!(got.status, 504);
    assert_eq!(fake.calls(), 0);
    h.get(&fake, "/o", &[]).await;
    let got = h
        .get(&fake, "/o", &[("cache-control", "only-if-cached")])
        .await;
    assert_eq!(got.status, 200);
}

#[tokio::test]
async fn stale_while_revalidate_serves_at_once_and_refreshes_once() {
    let h = Harness::new();
    let n = Arc::new(AtomicUsize::new(0));
    let counter = n.clone();
    let gate = Arc::new(Semaphore::new(1));
    let fake = Fake::gated(gate.clone(), move |_| {
        let i = counter.fetch_add(1, Ordering::SeqCst);
        Ok((
            200,
            vec![
                (
                    "cache-control",
                    "max-age=10, stale-while-revalidate=30".to_owned(),
                ),
                ("x-n", i.to_string()),
            ],
            Bytes::from_static(b"v"),
        ))
    });
    h.get(&fake, "/s", &[]).await;
    h.advance(15);
    // The refresh is held at the gate: every request meanwhile gets the stale copy at once.
    for _ in 0..20 {
        let got = h.get(&fake, "/s", &[]).await;
        assert_eq!(got.outcome, CacheOutcome::Stale);
        assert_eq!(got.header("x-n"), "0");
        assert_eq!(
            got.cache_status(),
            "outpost; hit; ttl=-5; detail=stale-while-revalidate"
        );
    }
    for _ in 0..10 {
        tokio::task::yield_now().await;
    }
    assert_eq!(fake.calls(), 2, "exactly one background refresh");
    for _ in 0..5 {
        assert_eq!(h.get(&fake, "/s", &[]).await.outcome, CacheOutcome::Stale);
    }
    assert_eq!(fake.calls(), 2, "still one while it runs");
    gate.add_permits(1);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let got = h.get(&fake, "/s", &[]).await;
        if got.header("x-n") == "1" {
            assert_eq!(got.outcome, CacheOutcome::Hit);
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "refresh never landed"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    h.advance(100);
    gate.add_permits(10);
    let too_stale = h.get(&fake, "/s", &[]).await;
    assert!(too_stale.cache_status().starts_with("outpost; fwd=stale"));
}

#[tokio::test]
async fn stale_if_error_serves_stale_on_errors_within_the_window() {
    let h = Harness::new();
    let mode = Arc::new(AtomicUsize::new(0));
    let m = mode.clone();
    let fake = Fake::new(move |_| match m.load(Ordering::SeqCst) {
        0 => ok("max-age=10, stale-if-error=60", "good"),
        1 => Ok((503, vec![], Bytes::from_static(b"down"))),
        _ => Err("connection refused"),
    });
    h.get(&fake, "/e", &[]).await;
    h.advance(20);
    mode.store(1, Ordering::SeqCst);
    let got = h.get(&fake, "/e", &[]).await;
    assert_eq!(got.body, "good");
    assert_eq!(
        got.cache_status(),
        "outpost; fwd=stale; fwd-status=503; ttl=-10; detail=stale-if-error"
    );
    assert_eq!(got.outcome, CacheOutcome::Stale);
    mode.store(2, Ordering::SeqCst);
    assert_eq!(h.get(&fake, "/e", &[]).await.body, "good");
    h.advance(60);
    let late = h.get(&fake, "/e", &[]).await;
    assert_eq!(late.error, Some("connection refused"));
}

#[tokio::test]
async fn route_defaults_add_stale_if_error_but_must_revalidate_wins() {
    let policy = RoutePolicy {
        stale_if_error: Some(Duration::from_secs(300)),
        ..RoutePolicy::default()
    };
    let h = Harness::with(policy.clone(), None);
    let down = Arc::new(AtomicUsize::new(0));
    let d = down.clone();
    let fake = Fake::new(move |_| {
        if d.load(Ordering::SeqCst) == 1 {
            Err("refused")
        } else {
            ok("max-age=1", "a")
        }
    });
    h.get(&fake, "/x", &[]).await;
    h.advance(10);
    down.store(1, Ordering::SeqCst);
    assert_eq!(h.get(&fake, "/x", &[]).await.body, "a");

    let h = Harness::with(policy, None);
    let down = Arc::new(AtomicUsize::new(0));
    let d = down.clone();
    let fake = Fake::new(move |_| {
        if d.load(Ordering::SeqCst) == 1 {
            Err("refused")
        } else {
            ok("max-age=1, must-revalidate", "a")
        }
    });
    h.get(&fake, "/x", &[]).await;
    h.advance(10);
    down.store(1, Ordering::SeqCst);
    assert_eq!(h.get(&fake, "/x", &[]).await.error, Some("refused"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_concurrent_misses_make_one_origin_request() {
    let h = Arc::new(Harness::new());
    let gate = Arc::new(Semaphore::new(0));
    let fake = Fake::gated(gate.clone(), |_| ok("max-age=60", "coalesced"));
    let mut tasks = Vec::new();
    for _ in 0..1000 {
        let h = h.clone();
        let fake = fake.clone();
        tasks.push(tokio::spawn(async move { h.get(&fake, "/hot", &[]).await }));
    }
    // Let the requests pile up behind the one fetch, then let the origin answer.
    while fake.calls() == 0 {
        tokio::task::yield_now().await;
    }
    tokio::time::sleep(Duration::from_millis(50)).await;
    gate.add_permits(1);
    let mut collapsed = 0;
    for t in tasks {
        let got = t.await.expect("task");
        assert_eq!(got.body, "coalesced");
        if got.cache_status().contains("collapsed") {
            collapsed += 1;
        }
    }
    assert_eq!(fake.calls(), 1, "exactly one origin request");
    assert!(collapsed > 0);
}

#[tokio::test(start_paused = true)]
async fn waiters_go_to_the_origin_themselves_after_the_lock_timeout() {
    let h = Arc::new(Harness::with(
        RoutePolicy {
            lock_timeout: Duration::from_millis(100),
            ..RoutePolicy::default()
        },
        None,
    ));
    let gate = Arc::new(Semaphore::new(0));
    let fake = Fake::gated(gate.clone(), |_| ok("max-age=60", "x"));
    let leader = {
        let (h, fake) = (h.clone(), fake.clone());
        tokio::spawn(async move { h.get(&fake, "/slow", &[]).await })
    };
    while fake.calls() == 0 {
        tokio::task::yield_now().await;
    }
    let follower = {
        let (h, fake) = (h.clone(), fake.clone());
        tokio::spawn(async move { h.get(&fake, "/slow", &[]).await })
    };
    tokio::time::sleep(Duration::from_millis(150)).await;
    assert_eq!(fake.calls(), 2, "the follower gave up waiting");
    gate.add_permits(2);
    assert_eq!(leader.await.expect("leader").status, 200);
    assert_eq!(follower.await.expect("follower").status, 200);
}

#[tokio::test]
async fn large_bodies_stream_through_uncached() {
    let h = Harness::with(
        RoutePolicy {
            max_object_size: 4,
            ..RoutePolicy::default()
        },
        None,
    );
    let declared = Fake::new(|_| {
        Ok((
            200,
            vec![
                ("cache-control", "max-age=60".to_owned()),
                ("content-length", "10".to_owned()),
            ],
            Bytes::from_static(b"0123456789"),
        ))
    });
    let got = h.get(&declared, "/big", &[]).await;
    assert_eq!(got.body, "0123456789");
    assert!(got.cache_status().ends_with("detail=too-large"));
    h.get(&declared, "/big", &[]).await;
    assert_eq!(declared.calls(), 2);
    // Without Content-Length the limit trips while streaming; the client still gets it all.
    let undeclared = Fake::new(|_| ok("max-age=60", "0123456789"));
    assert_eq!(h.get(&undeclared, "/big2", &[]).await.body, "0123456789");
    h.get(&undeclared, "/big2", &[]).await;
    assert_eq!(undeclared.calls(), 2);
}

#[tokio::test]
async fn unsafe_requests_invalidate_the_uri_and_same_host_locations() {
    let h = Harness::new();
    let fake = Fake::new(|_| ok("max-age=60", "x"));
    for p in ["/items/1", "/items/2", "/items/3"] {
        h.get(&fake, p, &[]).await;
    }
    let mut resp = HeaderMap::new();
    resp.insert(LOCATION, HeaderValue::from_static("/items/2"));
    resp.insert(
        CONTENT_LOCATION,
        HeaderValue::from_static("https://other.test/items/3"),
    );
    let n = h
        .cache
        .invalidate(&KeyPolicy::default(), "shop.test", "/items/1", &resp);
    assert_eq!(n, 2);
    assert_eq!(
        h.get(&fake, "/items/1", &[]).await.outcome,
        CacheOutcome::Miss
    );
    assert_eq!(
        h.get(&fake, "/items/2", &[]).await.outcome,
        CacheOutcome::Miss
    );
    assert_eq!(
        h.get(&fake, "/items/3", &[]).await.outcome,
        CacheOutcome::Hit
    );
}

#[tokio::test]
async fn purge_by_url_prefix_and_tag_hard_and_soft() {
    let h = Harness::new();
    let fake = Fake::new(|_| {
        Ok((
            200,
            vec![
                (
                    "cache-control",
                    "max-age=60, stale-while-revalidate=60".to_owned(),
                ),
                ("surrogate-key", "product-1 catalog".to_owned()),
            ],
            Bytes::from_static(b"x"),
        ))
    });
    for p in ["/p/1", "/p/2", "/q/1"] {
        let got = h.get(&fake, p, &[]).await;
        assert!(
            got.headers.get("surrogate-key").is_none(),
            "tags stay internal"
        );
    }
    assert_eq!(
        h.cache
            .purge(&PurgeTarget::Url("https://shop.test/p/1".into()), false)
            .await,
        1
    );
    assert_eq!(h.get(&fake, "/p/1", &[]).await.outcome, CacheOutcome::Miss);
    assert_eq!(
        h.cache
            .purge(&PurgeTarget::Prefix("/p/".into()), false)
            .await,
        2
    );
    assert_eq!(h.get(&fake, "/p/2", &[]).await.outcome, CacheOutcome::Miss);
    assert_eq!(
        h.cache
            .purge(&PurgeTarget::Tag("catalog".into()), true)
            .await,
        2,
        "/p/2 (fetched again) and /q/1"
    );
    let soft = h.get(&fake, "/q/1", &[]).await;
    assert_eq!(
        soft.outcome,
        CacheOutcome::Stale,
        "soft purge keeps SWR usable"
    );
    assert!(soft.cache_status().contains("stale-while-revalidate"));
    assert_eq!(
        h.cache
            .purge(&PurgeTarget::Tag("nothing".into()), false)
            .await,
        0
    );
}

/// Spellings of one URL (RFC 3986 §6.2.2-6.2.3) purge the same entry.
#[tokio::test]
async fn purge_urls_match_in_any_equivalent_spelling() {
    let h = Harness::new();
    let fake = Fake::new(|_| ok("max-age=60", "x"));
    for spelling in [
        "HTTP://SHOP.test/u/1",
        "http://shop.test:80/u/1",
        "HTTPS://shop.test:443/u/1",
        "https://shop.test/u/1#section",
    ] {
        h.get(&fake, "/u/1", &[]).await;
        assert_eq!(
            h.cache
                .purge(&PurgeTarget::Url(spelling.into()), false)
                .await,
            1,
            "{spelling}"
        );
    }
    h.get(&fake, "/u/1", &[]).await;
    assert_eq!(
        h.cache
            .purge(&PurgeTarget::Url("http://shop.test:8080/u/1".into()), false)
            .await,
        0,
        "another port is another origin"
    );
}

#[tokio::test]
async fn heuristic_freshness_only_for_heuristically_cacheable_statuses() {
    let h = Harness::new();
    let lm =
        crate::directives::fmt_http_date(UNIX_EPOCH + Duration::from_secs(1_700_000_000 - 1000));
    let fake = Fake::new(move |_| {
        Ok((
            200,
            vec![("last-modified", lm.clone())],
            Bytes::from_static(b"x"),
        ))
    });
    h.get(&fake, "/lm", &[]).await;
    h.advance(50);
    assert_eq!(
        h.get(&fake, "/lm", &[]).await.outcome,
        CacheOutcome::Hit,
        "10% of 1000 s"
    );
    let plain = Fake::new(|_| Ok((200, vec![], Bytes::from_static(b"x"))));
    h.get(&plain, "/plain", &[]).await;
    h.get(&plain, "/plain", &[]).await;
    assert_eq!(plain.calls(), 2, "no validator and no lifetime: not stored");
}

#[tokio::test]
async fn disk_tier_survives_a_restart_and_drops_corrupt_files() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().to_path_buf();
    let fake = Fake::new(|_| ok("max-age=600", "persisted"));
    {
        let config = StorageConfig {
            memory_bytes: 1 << 20,
            disk: Some((path.clone(), 1 << 20)),
        };
        let cache = Cache::new(&config, &Metrics::new("t")).expect("opens");
        let policy = Arc::new(RoutePolicy::default());
        for p in ["/d1", "/d2"] {
            let handled = cache
                .handle(
                    &policy,
                    CacheRequest {
                        host: "h",
                        path_and_query: p,
                        method: &Method::GET,
                        headers: HeaderMap::new(),
                        authenticated: false,
                    },
                    fake.clone(),
                )
                .await;
            let body = handled.result.expect("ok").into_body();
            body.collect().await.expect("body");
        }
        cache.flush();
    }
    // Corrupt one file: flip a byte in the body.
    let mut files = Vec::new();
    for sub in std::fs::read_dir(&path).expect("dir").flatten() {
        for f in std::fs::read_dir(sub.path()).expect("sub").flatten() {
            files.push(f.path());
        }
    }
    assert_eq!(files.len(), 2);
    let mut bytes = std::fs::read(&files[0]).expect("read");
    let last = bytes.len() - 1;
    bytes[last] ^= 0xff;
    std::fs::write(&files[0], bytes).expect("write");

    let config = StorageConfig {
        memory_bytes: 1 << 20,
        disk: Some((path.clone(), 1 << 20)),
    };
    let metrics = Metrics::new("t");
    let cache = Cache::new(&config, &metrics).expect("reopens");
    assert_eq!(cache.indexed_keys(), 2);
    let policy = Arc::new(RoutePolicy::default());
    let mut hits = 0;
    for p in ["/d1", "/d2"] {
        let handled = cache
            .handle(
                &policy,
                CacheRequest {
                    host: "h",
                    path_and_query: p,
                    method: &Method::GET,
                    headers: HeaderMap::new(),
                    authenticated: false,
                },
                fake.clone(),
            )
            .await;
        if handled.outcome == CacheOutcome::Hit {
            hits += 1;
        }
        let resp = handled.result.expect("ok");
        assert_eq!(
            resp.into_body().collect().await.expect("b").to_bytes(),
            "persisted"
        );
    }
    assert_eq!(hits, 1, "the intact entry is a hit, the corrupt one a miss");
    assert_eq!(fake.calls(), 3);
    assert!(
        metrics
            .encode()
            .contains("outpost_cache_purges_total{kind=\"corrupt\"} 1")
    );
}

#[tokio::test]
async fn ranges_are_served_from_a_stored_body() {
    let h = Harness::new();
    let fake = Fake::new(|_| tagged("\"strong\"", "0123456789"));
    let miss = h.get(&fake, "/r", &[("range", "bytes=0-3")]).await;
    assert_eq!(
        miss.status, 200,
        "a miss fetches and returns the whole body"
    );
    assert!(fake.last_seen().get("range").is_none());
    let part = h.get(&fake, "/r", &[("range", "bytes=2-4")]).await;
    assert_eq!(part.status, 206);
    assert_eq!(part.body, "234");
    assert_eq!(part.header("content-range"), "bytes 2-4/10");
    assert_eq!(part.header("content-length"), "3");
    let none = h.get(&fake, "/r", &[("range", "bytes=20-")]).await;
    assert_eq!(none.status, 416);
    assert_eq!(none.header("content-range"), "bytes */10");
    let stale_validator = h
        .get(
            &fake,
            "/r",
            &[("range", "bytes=0-1"), ("if-range", "\"old\"")],
        )
        .await;
    assert_eq!(stale_validator.status, 200);
    assert_eq!(stale_validator.body, "0123456789");
    assert_eq!(fake.calls(), 1);
}

#[tokio::test]
async fn a_leader_whose_client_leaves_hands_the_fetch_to_a_waiter() {
    let h = Arc::new(Harness::new());
    let gate = Arc::new(Semaphore::new(0));
    let fake = Fake::gated(gate.clone(), |_| ok("max-age=60", "payload"));
    let leader = {
        let (h, fake) = (h.clone(), fake.clone());
        tokio::spawn(async move {
            let handled = h
                .handled(&fake, &Method::GET, "/gone", HeaderMap::new(), false)
                .await;
            // The client disconnects: the response (and its storing body) is dropped unread.
            drop(handled);
        })
    };
    while fake.calls() == 0 {
        tokio::task::yield_now().await;
    }
    let follower = {
        let (h, fake) = (h.clone(), fake.clone());
        tokio::spawn(async move { h.get(&fake, "/gone", &[]).await })
    };
    gate.add_permits(2);
    leader.await.expect("leader");
    let got = follower.await.expect("follower");
    assert_eq!(got.body, "payload");
    assert_eq!(fake.calls(), 2, "the waiter took the fetch over");
    assert_eq!(h.get(&fake, "/gone", &[]).await.outcome, CacheOutcome::Hit);
}

#[tokio::test]
async fn a_304_for_another_representation_is_not_merged() {
    let h = Harness::new();
    let n = Arc::new(AtomicUsize::new(0));
    let counter = n.clone();
    let fake = Fake::new(move |req| {
        let i = counter.fetch_add(1, Ordering::SeqCst);
        if req.contains_key("if-none-match") {
            // A broken or racing origin: "not modified", but naming another version.
            return Ok((304, vec![("etag", "\"v9\"".to_owned())], Bytes::new()));
        }
        Ok((
            200,
            vec![
                ("cache-control", "max-age=10".to_owned()),
                ("etag", format!("\"v{i}\"")),
            ],
            Bytes::from(format!("body {i}")),
        ))
    });
    h.get(&fake, "/m", &[]).await;
    h.advance(20);
    let got = h.get(&fake, "/m", &[]).await;
    assert_eq!(got.status, 200);
    assert_eq!(got.body, "body 2", "refetched without conditions");
    assert_eq!(fake.calls(), 3);
}

#[tokio::test]
async fn both_tiers_stay_within_their_byte_bounds() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = StorageConfig {
        memory_bytes: 2 << 20,
        disk: Some((dir.path().to_path_buf(), 3 << 20)),
    };
    let metrics = Metrics::new("t");
    let cache = Cache::new(&config, &metrics).expect("opens");
    let policy = Arc::new(RoutePolicy::default());
    static BODY: [u8; 64 * 1024] = [b'x'; 64 * 1024];
    let fake = Fake::new(|_| ok("max-age=600", std::str::from_utf8(&BODY).unwrap_or("")));
    // 200 objects of 64 KiB: 12.5 MiB offered to a 2 MiB memory tier and a 3 MiB disk tier.
    for i in 0..200 {
        let handled = cache
            .handle(
                &policy,
                CacheRequest {
                    host: "h",
                    path_and_query: &format!("/o/{i}"),
                    method: &Method::GET,
                    headers: HeaderMap::new(),
                    authenticated: false,
                },
                fake.clone(),
            )
            .await;
        handled
            .result
            .expect("ok")
            .into_body()
            .collect()
            .await
            .expect("body");
    }
    cache.flush();
    let text = metrics.encode();
    let sample = |name: &str| -> f64 {
        text.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(-1.0)
    };
    let mem = sample("outpost_cache_stored_bytes{tier=\"memory\"}");
    let disk = sample("outpost_cache_stored_bytes{tier=\"disk\"}");
    assert!(
        mem > 0.0 && mem <= f64::from(2u32 << 20),
        "memory tier holds {mem} bytes"
    );
    assert!(
        disk > 0.0 && disk <= f64::from(3u32 << 20),
        "disk tier holds {disk} bytes"
    );
    let on_disk: u64 = std::fs::read_dir(dir.path())
        .expect("dir")
        .flatten()
        .flat_map(|d| std::fs::read_dir(d.path()).into_iter().flatten().flatten())
        .filter_map(|f| f.metadata().ok().map(|m| m.len()))
        .sum();
    assert!(on_disk <= 3 << 20, "files on disk: {on_disk} bytes");
    assert!(sample("outpost_cache_evictions_total{tier=\"memory\"}") > 0.0);
    assert!(sample("outpost_cache_evictions_total{tier=\"disk\"}") > 0.0);
}

#[tokio::test]
async fn requests_the_edge_authenticated_share_only_what_the_origin_allows() {
    let h = Harness::new();
    let fake = Fake::new(|_| ok("max-age=60", "personal"));
    for _ in 0..2 {
        let handled = h
            .handled(&fake, &Method::GET, "/me", HeaderMap::new(), true)
            .await;
        assert_eq!(handled.status.detail, Some("authorization"));
    }
    assert_eq!(
        fake.calls(),
        2,
        "a cookie-authenticated answer is not shared"
    );
}

/// hyper never polls a body that is already at its end (it writes `content-length: 0`), so an
/// empty answer must be stored without its body being read.
#[tokio::test]
async fn empty_answers_are_stored_without_their_body_being_read() {
    let h = Harness::new();
    let fake = Fake::new(|_| reply(204, &[("cache-control", "max-age=60")], b""));
    let handled = h
        .handled(&fake, &Method::GET, "/empty", HeaderMap::new(), false)
        .await;
    let resp = handled.result.expect("response");
    assert!(http_body::Body::is_end_stream(resp.body()));
    assert!(
        resp.headers()[CACHE_STATUS]
            .to_str()
            .expect("ascii")
            .ends_with("stored")
    );
    drop(resp);
    let second = h.get(&fake, "/empty", &[]).await;
    assert_eq!(second.status, 204);
    assert_eq!(second.outcome, CacheOutcome::Hit, "{second:?}");
    assert_eq!(fake.calls(), 1);
}

/// RFC 9111 §3.1: proxy authentication fields are never stored, nor added by a 304.
#[tokio::test]
async fn proxy_authentication_fields_are_never_stored() {
    let h = Harness::new();
    let mut n = 0;
    let fake = Fake::new(move |_| {
        n += 1;
        if n == 1 {
            reply(
                200,
                &[
                    ("cache-control", "max-age=1"),
                    ("etag", "\"v1\""),
                    ("proxy-authentication-info", "nextnonce=a"),
                    ("proxy-authenticate", "Basic realm=x"),
                    ("x-kept", "1"),
                ],
                b"body",
            )
        } else {
            reply(
                304,
                &[
                    ("cache-control", "max-age=60"),
                    ("proxy-authentication-info", "nextnonce=b"),
                ],
                b"",
            )
        }
    });
    let first = h.get(&fake, "/p", &[]).await;
    assert_eq!(first.header("proxy-authentication-info"), "nextnonce=a");
    let hit = h.get(&fake, "/p", &[]).await;
    assert_eq!(hit.outcome, CacheOutcome::Hit);
    assert_eq!(hit.header("x-kept"), "1");
    assert!(!hit.headers.contains_key("proxy-authentication-info"));
    assert!(!hit.headers.contains_key("proxy-authenticate"));
    h.advance(5);
    let revalidated = h.get(&fake, "/p", &[]).await;
    assert_eq!(fake.calls(), 2);
    assert_eq!(revalidated.body, "body");
    let again = h.get(&fake, "/p", &[]).await;
    assert_eq!(again.outcome, CacheOutcome::Hit);
    assert!(
        !again.headers.contains_key("proxy-authentication-info"),
        "{again:?}"
    );
}

/// RFC 9213: `CDN-Cache-Control` decides for this cache; `Cache-Control` and `Expires` are
/// ignored then, and forwarded untouched like the targeted field itself.
#[tokio::test]
async fn cdn_cache_control_overrides_cache_control_and_expires() {
    let h = Harness::new();
    let fake = Fake::new(|_| {
        reply(
            200,
            &[
                ("cache-control", "no-store"),
                ("expires", "Thu, 01 Jan 1970 00:00:00 GMT"),
                ("cdn-cache-control", "max-age=60"),
            ],
            b"edge",
        )
    });
    let first = h.get(&fake, "/cdn", &[]).await;
    assert!(first.cache_status().ends_with("stored"), "{first:?}");
    assert_eq!(first.header("cdn-cache-control"), "max-age=60");
    h.advance(30);
    let hit = h.get(&fake, "/cdn", &[]).await;
    assert_eq!(hit.outcome, CacheOutcome::Hit);
    assert_eq!(hit.header("cache-control"), "no-store");
    assert_eq!(fake.calls(), 1);

    let fake = Fake::new(|_| {
        reply(
            200,
            &[
                ("cache-control", "max-age=600"),
                ("expires", "Fri, 01 Jan 2100 00:00:00 GMT"),
                ("cdn-cache-control", "max-age=0"),
            ],
            b"edge",
        )
    });
    h.get(&fake, "/zero", &[]).await;
    h.get(&fake, "/zero", &[]).await;
    assert_eq!(fake.calls(), 2, "max-age=0 in the targeted field wins");
}
