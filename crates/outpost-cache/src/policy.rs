//! RFC 9111 rules as pure functions of headers and time: may a response be stored, how long is
//! it fresh, how old is it, and may a stored response answer this request.
//!
//! Nothing here reads a clock: every function takes `now`, so the unit tests below pin time and
//! check each rule exactly.

use std::time::{Duration, SystemTime};

use http::header::{AUTHORIZATION, EXPIRES, HeaderName, LAST_MODIFIED, SET_COOKIE, VARY};
use http::{HeaderMap, Method, StatusCode};

use crate::directives::{self, MaxStale, Private, RequestDirectives, ResponseDirectives};

/// Longest freshness the `Last-Modified` heuristic may give (RFC 9111 §4.2.2 leaves the cap to
/// the cache; a day keeps a years-old file from being trusted for a month).
pub const HEURISTIC_MAX: Duration = Duration::from_secs(24 * 3600);

/// A route's caching policy, compiled from `[routes.cache]`.
#[derive(Debug, Clone)]
pub struct RoutePolicy {
    /// Lifetime of storable responses without explicit freshness (instead of the heuristic).
    pub default_ttl: Option<Duration>,
    /// Lifetime that replaces the origin's.
    pub override_ttl: Option<Duration>,
    /// `stale-while-revalidate` used when the origin sends none.
    pub stale_while_revalidate: Option<Duration>,
    /// `stale-if-error` used when the origin sends none.
    pub stale_if_error: Option<Duration>,
    /// How long a coalesced request waits for the fetch in flight.
    pub lock_timeout: Duration,
    /// Largest body stored.
    pub max_object_size: u64,
    /// Whether 400 and 422 answers may be stored.
    pub store_validation_errors: bool,
    /// Whether the client's `no-cache`, `max-age`, `max-stale` and `min-fresh` are honoured.
    pub client_directives: bool,
    /// What forms the cache key.
    pub key: crate::key::KeyPolicy,
}

impl Default for RoutePolicy {
    fn default() -> Self {
        RoutePolicy {
            default_ttl: None,
            override_ttl: None,
            stale_while_revalidate: None,
            stale_if_error: None,
            lock_timeout: Duration::from_secs(5),
            max_object_size: 8 << 20,
            store_validation_errors: false,
            client_directives: true,
            key: crate::key::KeyPolicy::default(),
        }
    }
}

/// Why a response was not stored; the `detail` of `Cache-Status` and a log field.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NotStored {
    /// Only GET responses are stored.
    Method,
    /// 1xx, 304 or another status this cache does not store.
    Status,
    /// 206 partial content.
    Partial,
    /// `no-store` in the request.
    RequestNoStore,
    /// `no-store` in the response.
    NoStore,
    /// Unqualified `private`.
    Private,
    /// The request carried `Authorization` and the response did not allow sharing it.
    Authorization,
    /// `Vary: *` can never match a later request.
    VaryStar,
    /// `Set-Cookie` answers are personal.
    SetCookie,
    /// No explicit freshness and the status is not heuristically cacheable, or a lifetime of
    /// zero with nothing to revalidate with.
    NoFreshness,
    /// 400/422 (validation errors) while the route does not store them.
    ValidationError,
    /// Larger than the route's `max_object_size`.
    TooLarge,
    /// `must-understand` with a status code this cache does not understand.
    MustUnderstand,
}

impl NotStored {
    /// The value used in `Cache-Status: …; detail=` and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            NotStored::Method => "method",
            NotStored::Status => "status",
            NotStored::Partial => "partial",
            NotStored::RequestNoStore => "request-no-store",
            NotStored::NoStore => "no-store",
            NotStored::Private => "private",
            NotStored::Authorization => "authorization",
            NotStored::VaryStar => "vary-star",
            NotStored::SetCookie => "set-cookie",
            NotStored::NoFreshness => "no-freshness",
            NotStored::ValidationError => "validation-error",
            NotStored::TooLarge => "too-large",
            NotStored::MustUnderstand => "must-understand",
        }
    }
}

/// RFC 9110 §15.1: status codes that are heuristically cacheable.
pub fn heuristically_cacheable(status: StatusCode) -> bool {
    matches!(
        status.as_u16(),
        200 | 203 | 204 | 206 | 300 | 301 | 308 | 404 | 405 | 410 | 414 | 501
    )
}

/// Status codes whose caching semantics this cache implements (for `must-understand`).
fn understood(status: StatusCode) -> bool {
    matches!(
        status.as_u16(),
        200 | 203 | 204 | 300 | 301 | 302 | 303 | 307 | 308 | 404 | 405 | 410 | 414 | 501
    )
}

/// The response's `Vary` field names, lowercased; `None` for `Vary: *`.
pub fn vary_names(headers: &HeaderMap) -> Option<Vec<HeaderName>> {
    let mut names = Vec::new();
    for line in headers.get_all(VARY) {
        let Ok(line) = line.to_str() else {
            // A Vary we cannot read is as good as `*`: nothing could be matched safely.
            return None;
        };
        for name in line.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            if name == "*" {
                return None;
            }
            let Ok(n) = HeaderName::from_bytes(name.as_bytes()) else {
                return None;
            };
            if !names.contains(&n) {
                names.push(n);
            }
        }
    }
    Some(names)
}

/// The request side of a storability decision.
#[derive(Debug, Clone, Copy)]
pub struct Asked<'a> {
    /// Request method.
    pub method: &'a Method,
    /// Request header section.
    pub headers: &'a HeaderMap,
    /// The edge authenticated the caller (a token in a cookie counts like `Authorization`).
    pub authenticated: bool,
    /// The request's `Cache-Control`.
    pub directives: &'a RequestDirectives,
}

/// RFC 9111 §3: may this response be stored by a shared cache? Size is checked by the caller
/// (it may only be known once the body has been read).
pub fn storable(
    asked: &Asked<'_>,
    status: StatusCode,
    response: &HeaderMap,
    dirs: &ResponseDirectives,
    policy: &RoutePolicy,
) -> Result<(), NotStored> {
    let (method, request, authenticated, req_dirs) = (
        asked.method,
        asked.headers,
        asked.authenticated,
        asked.directives,
    );
    if method != Method::GET {
        return Err(NotStored::Method);
    }
    if status == StatusCode::PARTIAL_CONTENT {
        return Err(NotStored::Partial);
    }
    if status.is_informational() || status == StatusCode::NOT_MODIFIED {
        return Err(NotStored::Status);
    }
    if matches!(status.as_u16(), 400 | 422) && !policy.store_validation_errors {
        return Err(NotStored::ValidationError);
    }
    if dirs.must_understand {
        if !understood(status) {
            return Err(NotStored::MustUnderstand);
        }
    } else if dirs.no_store {
        return Err(NotStored::NoStore);
    }
    if req_dirs.no_store {
        return Err(NotStored::RequestNoStore);
    }
    if dirs.private == Private::All {
        return Err(NotStored::Private);
    }
    if (authenticated || request.contains_key(AUTHORIZATION))
        && !(dirs.public || dirs.must_revalidate || dirs.s_maxage.is_some())
    {
        return Err(NotStored::Authorization);
    }
    if vary_names(response).is_none() {
        return Err(NotStored::VaryStar);
    }
    if response.contains_key(SET_COOKIE) {
        return Err(NotStored::SetCookie);
    }
    let explicit = dirs.max_age.is_some()
        || dirs.s_maxage.is_some()
        || (response.contains_key(EXPIRES) && !dirs.targeted)
        || dirs.public;
    if !explicit && !heuristically_cacheable(status) && policy.override_ttl.is_none() {
        return Err(NotStored::NoFreshness);
    }
    Ok(())
}

/// Everything about a stored response's freshness, computed once when it is stored (or
/// freshened by a 304) and then evaluated against `now`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Freshness {
    /// Freshness lifetime (RFC 9111 §4.2.1).
    pub lifetime: Duration,
    /// Age when received, corrected for the response delay (RFC 9111 §4.2.3).
    pub corrected_initial_age: Duration,
    /// When the response was received; resident time counts from here.
    pub response_time: SystemTime,
    /// How long past its lifetime it may be served while one background refresh runs.
    pub stale_while_revalidate: Duration,
    /// How long past its lifetime it may be served when the origin fails.
    pub stale_if_error: Duration,
    /// `must-revalidate`, `proxy-revalidate` or `s-maxage`: never served stale.
    pub must_revalidate: bool,
    /// Response `no-cache`: revalidated before every reuse.
    pub no_cache: bool,
    /// The lifetime came from a heuristic (or the route's default TTL).
    pub heuristic: bool,
}

impl Freshness {
    /// Computes freshness for a response received at `response_time` for a request sent at
    /// `request_time`.
    pub fn compute(
        status: StatusCode,
        headers: &HeaderMap,
        dirs: &ResponseDirectives,
        request_time: SystemTime,
        response_time: SystemTime,
        policy: &RoutePolicy,
    ) -> Freshness {
        let date = headers
            .get(http::header::DATE)
            .and_then(directives::http_date)
            .unwrap_or(response_time);
        let (lifetime, heuristic) = lifetime(status, headers, dirs, date, policy);

        // RFC 9111 §4.2.3.
        let age_value = headers
            .get(http::header::AGE)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| directives::delta_seconds(v.trim()))
            .map_or(Duration::ZERO, Duration::from_secs);
        let apparent_age = directives::secs_between(date, response_time);
        let response_delay = directives::secs_between(request_time, response_time);
        let corrected_age_value = age_value + response_delay;
        let corrected_initial_age = apparent_age.max(corrected_age_value);

        let secs = |v: Option<u64>, default: Option<Duration>| {
            v.map(Duration::from_secs).or(default).unwrap_or_default()
        };
        Freshness {
            lifetime,
            corrected_initial_age,
            response_time,
            stale_while_revalidate: secs(
                dirs.stale_while_revalidate,
                policy.stale_while_revalidate,
            ),
            stale_if_error: secs(dirs.stale_if_error, policy.stale_if_error),
            must_revalidate: dirs.must_revalidate
                || dirs.proxy_revalidate
                || (dirs.s_maxage.is_some() && policy.override_ttl.is_none()),
            no_cache: dirs.no_cache,
            heuristic,
        }
    }

    /// `current_age` of RFC 9111 §4.2.3.
    pub fn age(&self, now: SystemTime) -> Duration {
        self.corrected_initial_age + directives::secs_between(self.response_time, now)
    }

    /// Seconds of freshness left (negative once stale), as `Cache-Status: ttl=` reports it.
    pub fn ttl(&self, now: SystemTime) -> i64 {
        let age = self.age(now).as_secs() as i64;
        self.lifetime.as_secs() as i64 - age
    }

    /// How far past its lifetime the response is (zero while fresh).
    pub fn staleness(&self, now: SystemTime) -> Duration {
        self.age(now).saturating_sub(self.lifetime)
    }

    /// Whether the response is fresh at `now`.
    pub fn is_fresh(&self, now: SystemTime) -> bool {
        self.lifetime > self.age(now)
    }

    /// RFC 5861 §4: may it answer when the origin failed?
    pub fn usable_on_error(&self, now: SystemTime) -> bool {
        if self.is_fresh(now) {
            return true;
        }
        !self.must_revalidate
            && !self.stale_if_error.is_zero()
            && self.staleness(now) <= self.stale_if_error
    }

    /// Whether keeping it is worth anything: fresh for a while, revalidatable, or servable stale.
    pub fn worth_storing(&self, has_validator: bool) -> bool {
        !self.lifetime.is_zero()
            || has_validator
            || !self.stale_while_revalidate.is_zero()
            || !self.stale_if_error.is_zero()
    }
}

fn lifetime(
    status: StatusCode,
    headers: &HeaderMap,
    dirs: &ResponseDirectives,
    date: SystemTime,
    policy: &RoutePolicy,
) -> (Duration, bool) {
    if let Some(ttl) = policy.override_ttl {
        return (ttl, false);
    }
    if let Some(s) = dirs.s_maxage {
        return (Duration::from_secs(s), false);
    }
    if let Some(s) = dirs.max_age {
        return (Duration::from_secs(s), false);
    }
    if let Some(expires) = headers.get(EXPIRES).filter(|_| !dirs.targeted) {
        // An invalid date (notably "0") means already expired (RFC 9111 §5.3).
        let lifetime = directives::http_date(expires)
            .map_or(Duration::ZERO, |e| directives::secs_between(date, e));
        return (lifetime, false);
    }
    if !(heuristically_cacheable(status) || dirs.public) {
        return (Duration::ZERO, false);
    }
    if let Some(ttl) = policy.default_ttl {
        return (ttl, true);
    }
    // RFC 9111 §4.2.2: a fraction of the time since the last modification.
    let lm = headers.get(LAST_MODIFIED).and_then(directives::http_date);
    match lm {
        Some(lm) => {
            let since = directives::secs_between(lm, date);
            (
                Duration::from_secs(since.as_secs() / 10).min(HEURISTIC_MAX),
                true,
            )
        }
        None => (Duration::ZERO, true),
    }
}

/// How a stored response may be used for a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reuse {
    /// Fresh, and the client accepts it: serve it.
    Fresh,
    /// Stale, but the client's `max-stale` accepts it: serve it.
    StaleAccepted,
    /// Stale within `stale-while-revalidate`: serve it and refresh in the background.
    StaleWhileRevalidate,
    /// Must be validated with the origin first.
    Validate(ValidateWhy),
}

/// Why a stored response must be validated before use (`Cache-Status: fwd=`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ValidateWhy {
    /// It is stale (or was soft-purged).
    Stale,
    /// The client asked (`no-cache`, `max-age`, `min-fresh`).
    Request,
}

/// RFC 9111 §4 and §5.2.1: may `fresh` answer a request with these directives at `now`?
/// `purged` marks a soft-purged response, which is stale whatever its lifetime.
pub fn reuse(
    fresh: &Freshness,
    purged: bool,
    req: &RequestDirectives,
    honour_client: bool,
    now: SystemTime,
) -> Reuse {
    let age = fresh.age(now);
    let is_fresh = !purged && fresh.is_fresh(now);
    if honour_client {
        if req.no_cache {
            return Reuse::Validate(ValidateWhy::Request);
        }
        if req.max_age.is_some_and(|m| age > Duration::from_secs(m)) {
            return Reuse::Validate(ValidateWhy::Request);
        }
        if let Some(min) = req.min_fresh {
            let left = fresh.lifetime.saturating_sub(age);
            if purged || left < Duration::from_secs(min) {
                return Reuse::Validate(ValidateWhy::Request);
            }
        }
    }
    if fresh.no_cache {
        return Reuse::Validate(ValidateWhy::Stale);
    }
    if is_fresh {
        return Reuse::Fresh;
    }
    if fresh.must_revalidate {
        return Reuse::Validate(ValidateWhy::Stale);
    }
    let staleness = if purged {
        fresh.staleness(now).max(Duration::from_secs(1))
    } else {
        fresh.staleness(now)
    };
    if honour_client {
        match req.max_stale {
            Some(MaxStale::Any) => return Reuse::StaleAccepted,
            Some(MaxStale::Seconds(s)) if staleness <= Duration::from_secs(s) => {
                return Reuse::StaleAccepted;
            }
            _ => {}
        }
    }
    if !fresh.stale_while_revalidate.is_zero() && staleness <= fresh.stale_while_revalidate {
        return Reuse::StaleWhileRevalidate;
    }
    Reuse::Validate(ValidateWhy::Stale)
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;
    use http::header::{AGE, CACHE_CONTROL, DATE};

    fn t(secs: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000 + secs)
    }

    fn headers(pairs: &[(&str, String)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (n, v) in pairs {
            h.append(
                HeaderName::from_bytes(n.as_bytes()).expect("name"),
                HeaderValue::from_str(v).expect("value"),
            );
        }
        h
    }

    fn date(secs: u64) -> String {
        directives::fmt_http_date(t(secs))
    }

    fn check(status: u16, resp: &HeaderMap, req: &HeaderMap) -> Result<(), NotStored> {
        storable(
            &Asked {
                method: &Method::GET,
                headers: req,
                authenticated: false,
                directives: &RequestDirectives::from_headers(req),
            },
            StatusCode::from_u16(status).expect("status"),
            resp,
            &ResponseDirectives::from_headers(resp),
            &RoutePolicy::default(),
        )
    }

    fn fresh_of(resp: &HeaderMap, req_at: u64, resp_at: u64, policy: &RoutePolicy) -> Freshness {
        Freshness::compute(
            StatusCode::OK,
            resp,
            &ResponseDirectives::from_headers(resp),
            t(req_at),
            t(resp_at),
            policy,
        )
    }

    #[test]
    fn storability_follows_rfc_9111_section_3() {
        let none = HeaderMap::new();
        let cc = |v: &str| headers(&[("cache-control", v.to_owned())]);
        assert_eq!(check(200, &cc("max-age=60"), &none), Ok(()));
        assert_eq!(
            check(200, &none, &none),
            Ok(()),
            "200 is heuristically cacheable"
        );
        assert_eq!(check(302, &none, &none), Err(NotStored::NoFreshness));
        assert_eq!(check(302, &cc("max-age=5"), &none), Ok(()));
        assert_eq!(
            check(500, &cc("max-age=5"), &none),
            Ok(()),
            "explicit freshness"
        );
        assert_eq!(check(200, &cc("no-store"), &none), Err(NotStored::NoStore));
        assert_eq!(check(200, &cc("private"), &none), Err(NotStored::Private));
        assert_eq!(check(200, &cc("private=\"x-a\", max-age=5"), &none), Ok(()));
        assert_eq!(check(206, &cc("max-age=5"), &none), Err(NotStored::Partial));
        assert_eq!(check(304, &cc("max-age=5"), &none), Err(NotStored::Status));
        assert_eq!(
            check(422, &cc("max-age=5"), &none),
            Err(NotStored::ValidationError)
        );
        assert_eq!(
            check(200, &cc("max-age=5"), &cc("no-store")),
            Err(NotStored::RequestNoStore)
        );
        let vary_star = headers(&[("cache-control", "max-age=5".into()), ("vary", "*".into())]);
        assert_eq!(check(200, &vary_star, &none), Err(NotStored::VaryStar));
        let cookie = headers(&[("set-cookie", "a=b".into())]);
        assert_eq!(check(200, &cookie, &none), Err(NotStored::SetCookie));
    }

    #[test]
    fn must_understand_overrides_no_store_only_for_understood_statuses() {
        let none = HeaderMap::new();
        let h = headers(&[(
            "cache-control",
            "must-understand, no-store, max-age=5".into(),
        )]);
        assert_eq!(check(200, &h, &none), Ok(()));
        assert_eq!(check(299, &h, &none), Err(NotStored::MustUnderstand));
    }

    #[test]
    fn authorization_needs_public_must_revalidate_or_s_maxage() {
        let auth = headers(&[("authorization", "Bearer x".into())]);
        let cc = |v: &str| headers(&[("cache-control", v.to_owned())]);
        assert_eq!(
            check(200, &cc("max-age=60"), &auth),
            Err(NotStored::Authorization)
        );
        for ok in [
            "public, max-age=60",
            "max-age=60, must-revalidate",
            "s-maxage=60",
        ] {
            assert_eq!(check(200, &cc(ok), &auth), Ok(()), "{ok}");
        }
    }

    #[test]
    fn lifetime_prefers_s_maxage_then_max_age_then_expires_then_heuristic() {
        let p = RoutePolicy::default();
        let h = headers(&[
            ("cache-control", "max-age=100, s-maxage=50".into()),
            ("expires", date(1000)),
            ("date", date(0)),
        ]);
        assert_eq!(fresh_of(&h, 0, 0, &p).lifetime, Duration::from_secs(50));
        let h = headers(&[
            ("cache-control", "max-age=100".into()),
            ("expires", date(1000)),
        ]);
        assert_eq!(fresh_of(&h, 0, 0, &p).lifetime, Duration::from_secs(100));
        let h = headers(&[("expires", date(1000)), ("date", date(400))]);
        assert_eq!(fresh_of(&h, 0, 500, &p).lifetime, Duration::from_secs(600));
        let h = headers(&[("expires", "0".into())]);
        assert_eq!(fresh_of(&h, 0, 0, &p).lifetime, Duration::ZERO);
        let h = headers(&[("last-modified", date(0)), ("date", date(1000))]);
        let f = fresh_of(&h, 1000, 1000, &p);
        assert_eq!(f.lifetime, Duration::from_secs(100));
        assert!(f.heuristic);
        let with_default = RoutePolicy {
            default_ttl: Some(Duration::from_secs(7)),
            ..RoutePolicy::default()
        };
        assert_eq!(
            fresh_of(&HeaderMap::new(), 0, 0, &with_default).lifetime,
            Duration::from_secs(7)
        );
        assert_eq!(
            fresh_of(&HeaderMap::new(), 0, 0, &p).lifetime,
            Duration::ZERO
        );
        let overridden = RoutePolicy {
            override_ttl: Some(Duration::from_secs(9)),
            ..RoutePolicy::default()
        };
        let h = headers(&[("cache-control", "max-age=100".into())]);
        assert_eq!(
            fresh_of(&h, 0, 0, &overridden).lifetime,
            Duration::from_secs(9)
        );
    }

    #[test]
    fn age_follows_section_4_2_3() {
        let p = RoutePolicy::default();
        // Origin says Age 10; the request took 2 s; Date is 1 s before receipt.
        let h = headers(&[
            (AGE.as_str(), "10".into()),
            (DATE.as_str(), date(99)),
            (CACHE_CONTROL.as_str(), "max-age=60".into()),
        ]);
        let f = fresh_of(&h, 98, 100, &p);
        assert_eq!(f.corrected_initial_age, Duration::from_secs(12));
        assert_eq!(f.age(t(130)), Duration::from_secs(42));
        assert_eq!(f.ttl(t(130)), 18);
        assert!(f.is_fresh(t(147)));
        assert!(!f.is_fresh(t(148)));
        // A Date far in the past dominates.
        let h = headers(&[
            (DATE.as_str(), date(0)),
            (CACHE_CONTROL.as_str(), "max-age=60".into()),
        ]);
        assert_eq!(
            fresh_of(&h, 100, 100, &p).corrected_initial_age,
            Duration::from_secs(100)
        );
    }

    fn stored(cc: &str) -> Freshness {
        let h = headers(&[("cache-control", cc.to_owned()), ("date", date(0))]);
        fresh_of(&h, 0, 0, &RoutePolicy::default())
    }

    fn req(cc: &str) -> RequestDirectives {
        RequestDirectives::from_headers(&headers(&[("cache-control", cc.to_owned())]))
    }

    #[test]
    fn reuse_decisions() {
        let none = RequestDirectives::default();
        let f = stored("max-age=10, stale-while-revalidate=5");
        assert_eq!(reuse(&f, false, &none, true, t(5)), Reuse::Fresh);
        assert_eq!(
            reuse(&f, false, &none, true, t(12)),
            Reuse::StaleWhileRevalidate
        );
        assert_eq!(
            reuse(&f, false, &none, true, t(16)),
            Reuse::Validate(ValidateWhy::Stale)
        );
        assert_eq!(
            reuse(&stored("max-age=10"), false, &none, true, t(10)),
            Reuse::Validate(ValidateWhy::Stale),
            "stale at the second its lifetime ends, with no SWR window"
        );
        assert_eq!(
            reuse(&f, true, &none, true, t(1)),
            Reuse::StaleWhileRevalidate,
            "soft purge makes it stale"
        );
        assert_eq!(
            reuse(&f, false, &req("no-cache"), true, t(1)),
            Reuse::Validate(ValidateWhy::Request)
        );
        assert_eq!(
            reuse(&f, false, &req("no-cache"), false, t(1)),
            Reuse::Fresh
        );
        assert_eq!(
            reuse(&f, false, &req("max-age=3"), true, t(5)),
            Reuse::Validate(ValidateWhy::Request)
        );
        assert_eq!(
            reuse(&f, false, &req("min-fresh=6"), true, t(5)),
            Reuse::Validate(ValidateWhy::Request)
        );
        assert_eq!(
            reuse(&f, false, &req("max-stale=100"), true, t(50)),
            Reuse::StaleAccepted
        );
        assert_eq!(
            reuse(&f, false, &req("max-stale"), true, t(5000)),
            Reuse::StaleAccepted
        );
        let mr = stored("max-age=10, must-revalidate, stale-while-revalidate=5");
        assert_eq!(
            reuse(&mr, false, &req("max-stale"), true, t(12)),
            Reuse::Validate(ValidateWhy::Stale)
        );
        let nc = stored("max-age=10, no-cache");
        assert_eq!(
            reuse(&nc, false, &none, true, t(1)),
            Reuse::Validate(ValidateWhy::Stale)
        );
        let s = stored("s-maxage=10, max-stale=50");
        assert_eq!(
            reuse(&s, false, &req("max-stale"), true, t(12)),
            Reuse::Validate(ValidateWhy::Stale),
            "s-maxage implies proxy-revalidate"
        );
    }

    #[test]
    fn stale_if_error_window() {
        let f = stored("max-age=10, stale-if-error=20");
        assert!(f.usable_on_error(t(5)));
        assert!(f.usable_on_error(t(30)));
        assert!(!f.usable_on_error(t(31)));
        assert!(!stored("max-age=10").usable_on_error(t(11)));
        assert!(!stored("max-age=10, must-revalidate, stale-if-error=99").usable_on_error(t(11)));
        let with_default = RoutePolicy {
            stale_if_error: Some(Duration::from_secs(60)),
            ..RoutePolicy::default()
        };
        let h = headers(&[("cache-control", "max-age=10".into()), ("date", date(0))]);
        assert!(fresh_of(&h, 0, 0, &with_default).usable_on_error(t(60)));
    }
}
