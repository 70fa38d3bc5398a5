//! The cache stage: given a GET/HEAD on a cached route, answer from storage, revalidate, or
//! fetch through the [`Upstream`] (the proxy's origin stage) and store.
//!
//! - Fresh → served (`hit`); a client's `If-None-Match`/`If-Modified-Since` gets a 304.
//! - Stale within `stale-while-revalidate` → served at once, one background refresh per key.
//! - Stale otherwise (or `no-cache`) → conditional request; a 304 freshens the stored response
//!   (RFC 9111 §3.2); an error or 5xx serves it stale when `stale-if-error` allows.
//! - Miss → one fetch per key at a time: concurrent misses wait (up to the route's lock
//!   timeout) for the first one's response to be stored, then are served from it.

use std::collections::HashMap;
use std::future::Future;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use http::header::{
    CONTENT_LENGTH, CONTENT_LOCATION, DATE, IF_MATCH, IF_MODIFIED_SINCE, IF_NONE_MATCH, IF_RANGE,
    IF_UNMODIFIED_SINCE, LOCATION, RANGE,
};
use http::{HeaderMap, HeaderValue, Method, Response, StatusCode};
use outpost_telemetry::Metrics;
use tokio::sync::watch;

use crate::body::{self, Body, StoringBody};
use crate::directives::{RequestDirectives, ResponseDirectives};
use crate::disk::{Disk, DiskError};
use crate::key::{self, CacheKey, KeyPolicy};
use crate::object::{self, CACHE_TAG, Object, SURROGATE_KEY};
use crate::policy::{self, Freshness, Reuse, RoutePolicy, ValidateWhy};
use crate::status::{CacheOutcome, CacheStatus, Fwd};
use crate::store::{Entry, Store};

/// The `Cache-Status` response field (RFC 9211).
pub const CACHE_STATUS: http::HeaderName = http::HeaderName::from_static("cache-status");

/// The origin side of the cache: the proxy implements it with its origin stage (nearest healthy
/// endpoint, pools, failover), so a fetch here is exactly what a pass-through would send.
pub trait Upstream: Send + Sync + 'static {
    /// What a failed fetch reports (the proxy's error, turned into 502/504 by the caller).
    type Error: Send + 'static;

    /// Sends a bodiless request with this method and header section to the origin.
    fn fetch(
        &self,
        method: Method,
        headers: HeaderMap,
    ) -> impl Future<Output = Result<Response<Body>, Self::Error>> + Send + 'static;
}

/// Where the clock comes from; tests pin it.
pub type Clock = Arc<dyn Fn() -> SystemTime + Send + Sync>;

/// Storage settings (the `[cache]` section).
#[derive(Debug, Clone)]
pub struct StorageConfig {
    /// Memory tier bound in bytes.
    pub memory_bytes: u64,
    /// Disk tier directory and bound, if any.
    pub disk: Option<(PathBuf, u64)>,
}

/// What the cache stage did with one request.
#[derive(Debug)]
pub struct Handled<E> {
    /// For metrics and the access log.
    pub outcome: CacheOutcome,
    /// The `Cache-Status` member (already on `Ok` responses; the caller adds it to errors).
    pub status: CacheStatus,
    /// The response, or the origin error when nothing stored could stand in.
    pub result: Result<Response<Body>, E>,
}

/// One GET or HEAD as the cache stage sees it.
#[derive(Debug)]
pub struct CacheRequest<'a> {
    /// Host the client asked for (part of the key).
    pub host: &'a str,
    /// Path and query the client asked for (before any prefix strip).
    pub path_and_query: &'a str,
    /// GET or HEAD.
    pub method: &'a Method,
    /// The request header section as it would go to the origin (hop-by-hop and internal
    /// fields already removed).
    pub headers: HeaderMap,
    /// The edge authenticated the caller (e.g. by a cookie): its responses are shared only as
    /// RFC 9111 allows for requests with `Authorization`.
    pub authenticated: bool,
}

/// A purge target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PurgeTarget {
    /// One URL (`https://host/path?query` or `host/path?query`), all its variants.
    Url(String),
    /// Every URL starting with this (`host/prefix`, or `/prefix` on every host).
    Prefix(String),
    /// Every response tagged so (`Surrogate-Key` / `Cache-Tag`).
    Tag(String),
}

/// The node's HTTP cache; cheap to clone, shared by every cached route and kept across reloads.
#[derive(Clone)]
pub struct Cache {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Cache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cache")
            .field("store", &self.inner.store)
            .finish()
    }
}

struct Inner {
    store: Store,
    /// Fetches in flight, by primary key; followers wait for the sender to drop.
    flights: Mutex<HashMap<Arc<str>, watch::Receiver<FlightEnd>>>,
    clock: Clock,
    metrics: Metrics,
}

/// How a fetch others waited for ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FlightEnd {
    /// Still running; seen after the leader vanished without a verdict (its client left
    /// mid-body): a waiter then takes over the fetch.
    Pending,
    /// The response is stored: waiters are served from it.
    Stored,
    /// Not storable (or the origin failed): waiters go to the origin themselves.
    Pass,
}

/// One request's context as it moves through the forward path (coalescing, fetch, storing).
struct Ask<U> {
    key: CacheKey,
    policy: Arc<RoutePolicy>,
    /// The request as it would go to the origin.
    headers: HeaderMap,
    /// The edge authenticated the caller (see [`CacheRequest::authenticated`]).
    authenticated: bool,
    upstream: Arc<U>,
    /// A HEAD: answered without a body.
    head: bool,
}

/// Holding this means "my fetch for `key` is the one others wait for".
struct FlightGuard {
    inner: Arc<Inner>,
    key: Arc<str>,
    tx: Option<watch::Sender<FlightEnd>>,
}

impl FlightGuard {
    /// Tells the waiters how the fetch ended (then releases them when dropped).
    fn finish(&self, end: FlightEnd) {
        if let Some(tx) = &self.tx {
            tx.send_replace(end);
        }
    }
}

impl Drop for FlightGuard {
    fn drop(&mut self) {
        let mut flights = self.inner.flights.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(tx) = self.tx.take()
            && flights
                .get(&self.key)
                .is_some_and(|rx| rx.same_channel(&tx.subscribe()))
        {
            flights.remove(&self.key);
        }
        // Dropping the sender wakes every follower.
    }
}

enum Flight {
    Leader(FlightGuard),
    Follower(watch::Receiver<FlightEnd>),
}

/// Request fields a stored response's validators replace, and `Range`: the cache fetches whole
/// responses and evaluates the client's conditions itself.
const CLIENT_CONDITIONALS: [http::HeaderName; 6] = [
    IF_NONE_MATCH,
    IF_MODIFIED_SINCE,
    IF_MATCH,
    IF_UNMODIFIED_SINCE,
    IF_RANGE,
    RANGE,
];

impl Cache {
    /// Opens the storage tiers (scanning the disk tier left by a previous run).
    pub fn new(config: &StorageConfig, metrics: &Metrics) -> Result<Cache, DiskError> {
        Self::with_clock(config, metrics, Arc::new(SystemTime::now))
    }

    /// Like [`Cache::new`] with a custom clock (tests).
    pub fn with_clock(
        config: &StorageConfig,
        metrics: &Metrics,
        clock: Clock,
    ) -> Result<Cache, DiskError> {
        let disk = match &config.disk {
            Some((dir, bytes)) => {
                let m = metrics.clone();
                Some(Disk::open(
                    dir,
                    *bytes,
                    metrics.cache_tier("disk"),
                    Arc::new(move || m.cache_purged("corrupt", 1)),
                )?)
            }
            None => None,
        };
        let store = Store::new(config.memory_bytes, disk, metrics.cache_tier("memory"));
        Ok(Cache {
            inner: Arc::new(Inner {
                store,
                flights: Mutex::new(HashMap::new()),
                clock,
                metrics: metrics.clone(),
            }),
        })
    }

    /// Handles a GET or HEAD (without a body) on a cached route.
    pub async fn handle<U: Upstream>(
        &self,
        policy: &Arc<RoutePolicy>,
        request: CacheRequest<'_>,
        upstream: Arc<U>,
    ) -> Handled<U::Error> {
        let CacheRequest {
            host,
            path_and_query,
            method,
            headers,
            authenticated,
        } = request;
        let inner = &self.inner;
        let head = method == Method::HEAD;
        let req_dirs = RequestDirectives::from_headers(&headers);
        let key = CacheKey::new(&policy.key, host, path_and_query, &headers);
        let (found, fwd) = inner.lookup(&key, &headers).await;
        let now = inner.now();

        let Some(obj) = found else {
            if req_dirs.only_if_cached {
                return only_if_cached(fwd);
            }
            if head {
                // A HEAD miss goes through as it is; only GET responses are stored.
                let result = upstream
                    .fetch(Method::HEAD, headers)
                    .await
                    .map(|r| with_status(strip_tags(r), &CacheStatus::fwd(fwd)));
                return Handled {
                    outcome: CacheOutcome::Miss,
                    status: CacheStatus::fwd(fwd),
                    result,
                };
            }
            let ask = Ask {
                key,
                policy: policy.clone(),
                headers,
                authenticated,
                upstream,
                head,
            };
            return inner.clone().coalesced(ask, None, fwd).await;
        };

        match policy::reuse(
            &obj.fresh,
            obj.purged,
            &req_dirs,
            policy.client_directives,
            now,
        ) {
            Reuse::Fresh => {
                let st = CacheStatus::hit(obj.fresh.ttl(now));
                inner.serve(&obj, &headers, head, CacheOutcome::Hit, st)
            }
            Reuse::StaleAccepted => {
                let mut st = CacheStatus::hit(stale_ttl(&obj, now));
                st.detail = Some("max-stale");
                inner.serve(&obj, &headers, head, CacheOutcome::Stale, st)
            }
            Reuse::StaleWhileRevalidate => {
                inner.clone().refresh_in_background(
                    Ask {
                        key,
                        policy: policy.clone(),
                        headers: headers.clone(),
                        authenticated,
                        upstream,
                        head: false,
                    },
                    obj.clone(),
                );
                let mut st = CacheStatus::hit(stale_ttl(&obj, now));
                st.detail = Some("stale-while-revalidate");
                inner.serve(&obj, &headers, head, CacheOutcome::Stale, st)
            }
            Reuse::Validate(why) => {
                if req_dirs.only_if_cached {
                    return only_if_cached(Fwd::Stale);
                }
                let fwd = match why {
                    ValidateWhy::Stale => Fwd::Stale,
                    ValidateWhy::Request => Fwd::Request,
                };
                let ask = Ask {
                    key,
                    policy: policy.clone(),
                    headers,
                    authenticated,
                    upstream,
                    head,
                };
                inner.clone().coalesced(ask, Some(obj), fwd).await
            }
        }
    }

    /// RFC 9111 §4.4: after an unsafe request succeeded, drop what is stored for its URL and
    /// for the same-host `Location` / `Content-Location` it answered with. Returns the number
    /// of entries removed.
    pub fn invalidate(
        &self,
        key_policy: &KeyPolicy,
        host: &str,
        path_and_query: &str,
        response: &HeaderMap,
    ) -> usize {
        let mut urls = vec![key::url_key(key_policy, host, path_and_query)];
        for name in [LOCATION, CONTENT_LOCATION] {
            if let Some(target) = response.get(&name).and_then(|v| v.to_str().ok())
                && let Some(pq) = same_host_path(target, host)
            {
                urls.push(key::url_key(key_policy, host, pq));
            }
        }
        let keys: Vec<Arc<str>> = {
            let idx = self.inner.store.index();
            urls.iter().flat_map(|u| idx.keys_for_url(u)).collect()
        };
        for k in &keys {
            self.inner.store.remove(k);
        }
        if !keys.is_empty() {
            self.inner
                .metrics
                .cache_purged("invalidate", keys.len() as u64);
        }
        keys.len()
    }

    /// Purges by URL, prefix or tag. Soft purge marks entries stale (still usable for
    /// stale-while-revalidate and stale-if-error); hard purge removes them. Returns the number
    /// of entries affected.
    pub async fn purge(&self, target: &PurgeTarget, soft: bool) -> usize {
        let keys = {
            let idx = self.inner.store.index();
            match target {
                PurgeTarget::Url(u) => {
                    let url = normalise_purge_url(u);
                    let mut keys = idx.keys_for_url(&url);
                    let (host, pq) = url.split_at(url.find('/').unwrap_or(url.len()));
                    let sorted = key::url_key(&KeyPolicy::default(), host, pq);
                    if sorted != url {
                        keys.extend(idx.keys_for_url(&sorted));
                    }
                    keys
                }
                PurgeTarget::Prefix(p) => idx.keys_for_prefix(&normalise_purge_url(p)),
                PurgeTarget::Tag(t) => idx.keys_for_tag(t),
            }
        };
        let store = &self.inner.store;
        for k in &keys {
            if soft {
                if let Some(entry) = store.get(&CacheKey::from_stored(k)).await {
                    let variants = entry
                        .variants
                        .iter()
                        .map(|o| {
                            let mut o = (**o).clone();
                            o.purged = true;
                            Arc::new(o)
                        })
                        .collect();
                    store.replace(k.clone(), Entry { variants });
                }
            } else {
                store.remove(k);
            }
        }
        let kind = if soft { "soft" } else { "hard" };
        self.inner.metrics.cache_purged(kind, keys.len() as u64);
        keys.len()
    }

    /// Waits for queued disk writes (tests and shutdown) and settles counters.
    pub fn flush(&self) {
        self.inner.store.flush();
        self.inner.store.settle();
    }

    /// Entries currently in the memory tier.
    pub fn memory_entries(&self) -> u64 {
        self.inner.store.settle();
        self.inner.store.memory_entries()
    }

    /// Keys known to the purge index (both tiers).
    pub fn indexed_keys(&self) -> usize {
        self.inner.store.index().len()
    }
}

/// Whether a 304 names a different strong entity tag than the stored response has.
fn validator_mismatch(obj: &Object, update: &HeaderMap) -> bool {
    let strong = |v: &HeaderValue| {
        v.to_str()
            .ok()
            .filter(|s| !s.starts_with("W/"))
            .map(str::to_owned)
    };
    match (
        update.get(http::header::ETAG).and_then(strong),
        obj.etag().and_then(strong),
    ) {
        (Some(new), Some(old)) => new != old,
        _ => false,
    }
}

/// `If-Range` (RFC 9110 §13.1.5): the range applies only if the validator still matches
/// (strong entity-tag comparison, or an exact `Last-Modified` date).
fn range_applies(obj: &Object, request: &HeaderMap) -> bool {
    let Some(if_range) = request.get(IF_RANGE) else {
        return true;
    };
    let Ok(v) = if_range.to_str() else {
        return false;
    };
    if v.starts_with('"') {
        return obj
            .etag()
            .and_then(|e| e.to_str().ok())
            .is_some_and(|e| !e.starts_with("W/") && e == v);
    }
    obj.last_modified().is_some_and(|lm| lm == if_range)
}

fn stale_ttl(obj: &Object, now: SystemTime) -> i64 {
    if obj.purged {
        obj.fresh.ttl(now).min(0)
    } else {
        obj.fresh.ttl(now)
    }
}

fn only_if_cached<E>(fwd: Fwd) -> Handled<E> {
    let mut st = CacheStatus::fwd(fwd);
    st.fwd = None;
    st.detail = Some("only-if-cached");
    let mut resp = Response::new(body::empty());
    *resp.status_mut() = StatusCode::GATEWAY_TIMEOUT;
    resp.headers_mut()
        .insert(CONTENT_LENGTH, HeaderValue::from_static("0"));
    Handled {
        outcome: CacheOutcome::Miss,
        result: Ok(with_status(resp, &st)),
        status: st,
    }
}

fn with_status(mut resp: Response<Body>, st: &CacheStatus) -> Response<Body> {
    resp.headers_mut().append(CACHE_STATUS, st.to_header());
    resp
}

fn strip_tags(mut resp: Response<Body>) -> Response<Body> {
    resp.headers_mut().remove(SURROGATE_KEY);
    resp.headers_mut().remove(CACHE_TAG);
    resp
}

/// `scheme://host/...` → `host/...` with the host lowercased; `host/...` as it is.
fn normalise_purge_url(u: &str) -> String {
    // RFC 3986 §6.2.2-6.2.3: scheme and host in any case, the scheme's default port, and the
    // fragment (never part of a request) name the same resource.
    let u = u.split('#').next().unwrap_or(u);
    let strip = |scheme: &str| {
        u.get(..scheme.len())
            .filter(|p| p.eq_ignore_ascii_case(scheme))
            .map(|_| &u[scheme.len()..])
    };
    let (rest, default_port) = match (strip("https://"), strip("http://")) {
        (Some(rest), _) => (rest, Some(":443")),
        (None, Some(rest)) => (rest, Some(":80")),
        (None, None) => (u, None),
    };
    let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    let authority = authority.to_ascii_lowercase();
    let authority = match default_port {
        Some(port) => authority.strip_suffix(port).unwrap_or(&authority),
        None => &authority,
    };
    format!("{authority}{path}")
}

/// The path of a `Location`-style reference when it points at `host` (relative references
/// always do).
fn same_host_path<'a>(target: &'a str, host: &str) -> Option<&'a str> {
    if target.starts_with('/') && !target.starts_with("//") {
        return Some(target);
    }
    let rest = target
        .strip_prefix("https://")
        .or_else(|| target.strip_prefix("http://"))?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    authority.eq_ignore_ascii_case(host).then_some(path)
}

impl Inner {
    fn now(&self) -> SystemTime {
        (self.clock)()
    }

    /// The most recent stored variant matching the request, or why there is none.
    async fn lookup(&self, key: &CacheKey, headers: &HeaderMap) -> (Option<Arc<Object>>, Fwd) {
        let Some(entry) = self.store.get(key).await else {
            return (None, Fwd::UriMiss);
        };
        let found = entry
            .variants
            .iter()
            .find(|o| key::matches(&o.vary, headers))
            .cloned();
        match found {
            Some(o) => (Some(o), Fwd::UriMiss),
            None => (None, Fwd::VaryMiss),
        }
    }

    fn join(self: &Arc<Self>, key: &CacheKey) -> Flight {
        let mut flights = self.flights.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(rx) = flights.get(key.as_str()) {
            return Flight::Follower(rx.clone());
        }
        let (tx, rx) = watch::channel(FlightEnd::Pending);
        flights.insert(key.shared(), rx);
        Flight::Leader(FlightGuard {
            inner: self.clone(),
            key: key.shared(),
            tx: Some(tx),
        })
    }

    /// A forward that concurrent requests for the same key share.
    async fn coalesced<U: Upstream>(
        self: Arc<Self>,
        ask: Ask<U>,
        stale: Option<Arc<Object>>,
        fwd: Fwd,
    ) -> Handled<U::Error> {
        let Ask {
            key,
            policy,
            headers,
            head,
            ..
        } = &ask;
        let deadline = tokio::time::Instant::now() + policy.lock_timeout;
        let guard = loop {
            let mut rx = match self.join(key) {
                Flight::Leader(g) => break Some(g),
                Flight::Follower(rx) => rx,
            };
            let waited =
                tokio::time::timeout_at(deadline, rx.wait_for(|e| *e != FlightEnd::Pending))
                    .await
                    .map(|r| r.map(|end| *end));
            let end = match waited {
                // Timed out: go ourselves.
                Err(_) => break None,
                Ok(Ok(end)) => end,
                // The leader vanished without a verdict: take over (or wait for who did).
                Ok(Err(_)) => continue,
            };
            if end == FlightEnd::Stored
                && let (Some(obj), _) = self.lookup(key, headers).await
            {
                let req_dirs = RequestDirectives::from_headers(headers);
                let now = self.now();
                let reuse = policy::reuse(
                    &obj.fresh,
                    obj.purged,
                    &req_dirs,
                    policy.client_directives,
                    now,
                );
                if matches!(reuse, Reuse::Fresh | Reuse::StaleAccepted) {
                    let mut st = CacheStatus::fwd(fwd);
                    st.collapsed = true;
                    st.ttl = Some(obj.fresh.ttl(now));
                    return self.serve(&obj, headers, *head, CacheOutcome::Hit, st);
                }
            }
            // Not storable, or the stored answer does not fit this request: go ourselves.
            break None;
        };
        self.fetch(ask, stale, fwd, guard).await
    }

    /// Starts one background refresh of `stale` unless one is already running for the key.
    fn refresh_in_background<U: Upstream>(self: Arc<Self>, ask: Ask<U>, stale: Arc<Object>) {
        let Flight::Leader(guard) = self.join(&ask.key) else {
            return;
        };
        tokio::spawn(async move {
            let handled = self.fetch(ask, Some(stale), Fwd::Stale, Some(guard)).await;
            if let Ok(resp) = handled.result {
                body::drain(resp.into_body()).await;
            }
        });
    }

    /// Forwards to the origin (conditionally when `stale` is given) and stores what it may.
    async fn fetch<U: Upstream>(
        self: Arc<Self>,
        ask: Ask<U>,
        mut stale: Option<Arc<Object>>,
        fwd: Fwd,
        guard: Option<FlightGuard>,
    ) -> Handled<U::Error> {
        let (headers, head, policy, upstream) =
            (&ask.headers, ask.head, &ask.policy, &ask.upstream);
        let mut st = CacheStatus::fwd(fwd);
        let mut origin_headers = headers.clone();
        for name in &CLIENT_CONDITIONALS {
            origin_headers.remove(name);
        }
        // Kept for the rare unconditional retry below.
        let plain_headers = stale.as_ref().map(|_| origin_headers.clone());
        if let Some(obj) = &stale {
            if let Some(etag) = obj.etag() {
                origin_headers.insert(IF_NONE_MATCH, etag.clone());
            }
            if let Some(lm) = obj.last_modified() {
                origin_headers.insert(IF_MODIFIED_SINCE, lm.clone());
            }
        }
        let mut request_time = self.now();
        let mut result = upstream.fetch(Method::GET, origin_headers).await;
        let mut response_time = self.now();

        // RFC 9111 §4.3.4: a 304 whose strong validator differs from the stored one does not
        // describe it. Drop that copy and ask again without conditions.
        let mismatch = match (&stale, &result) {
            (Some(obj), Ok(resp)) => {
                resp.status() == StatusCode::NOT_MODIFIED && validator_mismatch(obj, resp.headers())
            }
            _ => false,
        };
        if mismatch && let (Some(obj), Some(plain)) = (stale.take(), plain_headers) {
            self.store.remove_variant(&obj);
            request_time = self.now();
            result = upstream.fetch(Method::GET, plain).await;
            response_time = self.now();
        }

        let resp = match result {
            Ok(r) => r,
            Err(e) => {
                if let Some(g) = &guard {
                    g.finish(FlightEnd::Pass);
                }
                if let Some(obj) = stale
                    && obj.fresh.usable_on_error(response_time)
                {
                    st.detail = Some("stale-if-error");
                    st.ttl = Some(stale_ttl(&obj, response_time));
                    return self.serve(&obj, headers, head, CacheOutcome::Stale, st);
                }
                return Handled {
                    outcome: CacheOutcome::Miss,
                    status: st,
                    result: Err(e),
                };
            }
        };
        let status = resp.status();
        st.fwd_status = Some(status.as_u16());

        if let Some(obj) = &stale {
            if status == StatusCode::NOT_MODIFIED {
                let updated = obj.freshen(resp.headers(), request_time, response_time, policy);
                self.store.put(updated.clone());
                if let Some(g) = guard {
                    g.finish(FlightEnd::Stored);
                }
                st.ttl = Some(updated.fresh.ttl(response_time));
                return self.serve(&updated, headers, head, CacheOutcome::Revalidated, st);
            }
            if matches!(status.as_u16(), 500 | 502 | 503 | 504)
                && obj.fresh.usable_on_error(response_time)
            {
                if let Some(g) = &guard {
                    g.finish(FlightEnd::Pass);
                }
                st.detail = Some("stale-if-error");
                st.ttl = Some(stale_ttl(obj, response_time));
                return self.serve(obj, headers, head, CacheOutcome::Stale, st);
            }
        }
        self.admit(resp, ask, (request_time, response_time), st, stale, guard)
    }

    /// Decides whether a full origin response is stored and returns it to the client,
    /// streaming it into storage when it is.
    fn admit<U: Upstream>(
        self: &Arc<Self>,
        resp: Response<Body>,
        ask: Ask<U>,
        (request_time, response_time): (SystemTime, SystemTime),
        mut st: CacheStatus,
        stale: Option<Arc<Object>>,
        guard: Option<FlightGuard>,
    ) -> Handled<U::Error> {
        let Ask {
            key,
            policy,
            headers: request,
            authenticated,
            ..
        } = ask;
        let (policy, request) = (&policy, &request);
        let (mut parts, body) = resp.into_parts();
        if !parts.headers.contains_key(DATE) {
            parts
                .headers
                .insert(DATE, object::date_value(response_time));
        }
        let dirs = ResponseDirectives::from_headers(&parts.headers);
        let req_dirs = RequestDirectives::from_headers(request);
        let mut verdict = policy::storable(
            &policy::Asked {
                method: &Method::GET,
                headers: request,
                authenticated,
                directives: &req_dirs,
            },
            parts.status,
            &parts.headers,
            &dirs,
            policy,
        );
        let fresh = Freshness::compute(
            parts.status,
            &parts.headers,
            &dirs,
            request_time,
            response_time,
            policy,
        );
        let has_validator = parts.headers.contains_key(http::header::ETAG)
            || parts.headers.contains_key(http::header::LAST_MODIFIED);
        if verdict.is_ok() && !fresh.worth_storing(has_validator) {
            verdict = Err(policy::NotStored::NoFreshness);
        }
        let declared = parts
            .headers
            .get(CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if verdict.is_ok() && declared.is_some_and(|n| n > policy.max_object_size) {
            verdict = Err(policy::NotStored::TooLarge);
        }
        let tags = object::tags_of(&parts.headers);
        let mut stored_headers = parts.headers.clone();
        object::strip_unstorable(&mut stored_headers);
        parts.headers.remove(SURROGATE_KEY);
        parts.headers.remove(CACHE_TAG);

        let Some(vary_names) = policy::vary_names(&parts.headers).filter(|_| verdict.is_ok())
        else {
            if let Some(obj) = &stale {
                // The resource no longer wants to be stored as it was.
                self.store.remove_variant(obj);
            }
            if let Err(reason) = verdict {
                st.detail = Some(reason.as_str());
            }
            if let Some(g) = guard {
                g.finish(FlightEnd::Pass);
            }
            parts.headers.append(CACHE_STATUS, st.to_header());
            return Handled {
                outcome: CacheOutcome::Miss,
                status: st,
                result: Ok(Response::from_parts(parts, body)),
            };
        };
        object::strip_private_fields(&mut stored_headers, &dirs.private);
        let pending = Object {
            key,
            vary: key::secondary(&vary_names, request),
            status: parts.status,
            headers: stored_headers,
            body: bytes::Bytes::new(),
            fresh,
            tags,
            purged: false,
        };
        st.stored = true;
        parts.headers.append(CACHE_STATUS, st.to_header());
        let store_into = self.clone();
        let storing = StoringBody::new(
            body,
            pending,
            policy.max_object_size,
            Box::new(move |obj| store_into.store.put(obj)),
            // After a completed store the waiters find the object; otherwise (too large after
            // all, error, client gone) they were not served by this fetch.
            Box::new(move |stored| {
                if let Some(g) = guard {
                    g.finish(if stored {
                        FlightEnd::Stored
                    } else {
                        FlightEnd::Pass
                    });
                }
            }),
        );
        Handled {
            outcome: CacheOutcome::Miss,
            status: st,
            result: Ok(Response::from_parts(
                parts,
                http_body_util::BodyExt::boxed_unsync(storing),
            )),
        }
    }

    /// A response built from a stored object: 304 when the client's validators match, no body
    /// for HEAD.
    fn serve<E>(
        &self,
        obj: &Object,
        request: &HeaderMap,
        head: bool,
        outcome: CacheOutcome,
        st: CacheStatus,
    ) -> Handled<E> {
        let now = self.now();
        let headers = obj.serve_headers(now);
        let range = request
            .get(RANGE)
            .filter(|_| obj.status == StatusCode::OK && range_applies(obj, request))
            .and_then(|r| object::byte_range(r, obj.body.len() as u64));
        let mut resp = if obj.status.is_success() && obj.not_modified_for(request) {
            let mut r = Response::new(body::empty());
            *r.status_mut() = StatusCode::NOT_MODIFIED;
            *r.headers_mut() = object::not_modified_headers(&headers);
            r
        } else if let Some(range) = range {
            let len = obj.body.len() as u64;
            let mut headers = headers;
            let (status, content_range, data) = match range {
                object::ByteRange::Satisfiable(start, end) => (
                    StatusCode::PARTIAL_CONTENT,
                    format!("bytes {start}-{end}/{len}"),
                    obj.body.slice(
                        usize::try_from(start).unwrap_or(0)..=usize::try_from(end).unwrap_or(0),
                    ),
                ),
                object::ByteRange::Unsatisfiable => (
                    StatusCode::RANGE_NOT_SATISFIABLE,
                    format!("bytes */{len}"),
                    bytes::Bytes::new(),
                ),
            };
            if let Ok(v) = HeaderValue::from_str(&content_range) {
                headers.insert(http::header::CONTENT_RANGE, v);
            }
            headers.insert(CONTENT_LENGTH, HeaderValue::from(data.len()));
            let mut r = Response::new(if head {
                body::empty()
            } else {
                body::full(data)
            });
            *r.status_mut() = status;
            *r.headers_mut() = headers;
            r
        } else {
            let mut r = Response::new(if head {
                body::empty()
            } else {
                body::full(obj.body.clone())
            });
            *r.status_mut() = obj.status;
            *r.headers_mut() = headers;
            if !r.headers().contains_key(CONTENT_LENGTH) {
                r.headers_mut()
                    .insert(CONTENT_LENGTH, HeaderValue::from(obj.body.len()));
            }
            r
        };
        resp.headers_mut().append(CACHE_STATUS, st.to_header());
        Handled {
            outcome,
            status: st,
            result: Ok(resp),
        }
    }
}

#[cfg(test)]
mod tests;
