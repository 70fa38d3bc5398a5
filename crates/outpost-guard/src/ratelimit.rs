//! Per-route rate limits: GCRA (governor) keyed by client IP, JWT `sub`, a header or the route
//! alone, with the IETF `RateLimit-Policy` / `RateLimit` headers and `Retry-After` on 429.
//!
//! Memory stays bounded: keys whose state has fully replenished are dropped by a periodic
//! sweep ([`RateLimits::sweep`]), so a scan over millions of spoofed IPs leaves nothing behind
//! once it stops; and no key is longer than [`MAX_KEY_BYTES`].

use std::net::IpAddr;
use std::num::NonZeroU32;
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::middleware::StateInformationMiddleware;
use governor::state::keyed::DefaultKeyedStateStore;
use governor::{Quota, RateLimiter};
use http::{HeaderMap, HeaderName, HeaderValue};

/// Longest key kept (header values are truncated to it).
pub const MAX_KEY_BYTES: usize = 256;

/// What a limit counts by.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LimitKey {
    /// The client IP (after trusted proxies).
    Ip,
    /// The authenticated `sub`; anonymous requests count by IP.
    Sub,
    /// A request header's value (e.g. an API key); requests without it count by IP.
    Header(HeaderName),
    /// Everyone together: a budget for the whole route.
    Route,
}

impl LimitKey {
    /// Parses `ip`, `sub`, `route` or `header:<name>`.
    pub fn parse(s: &str) -> Option<LimitKey> {
        match s {
            "ip" => Some(LimitKey::Ip),
            "sub" => Some(LimitKey::Sub),
            "route" => Some(LimitKey::Route),
            _ => s
                .strip_prefix("header:")
                .and_then(|h| HeaderName::from_bytes(h.trim().as_bytes()).ok())
                .map(LimitKey::Header),
        }
    }
}

type Keyed =
    RateLimiter<String, DefaultKeyedStateStore<String>, DefaultClock, StateInformationMiddleware>;

/// One limit of a route.
pub struct Limit {
    name: String,
    key: LimitKey,
    /// Burst capacity (`q` of the policy).
    burst: u32,
    /// Time for an empty bucket to refill completely (`w` of the policy).
    window: Duration,
    /// Time one request's allowance takes to come back.
    interval: Duration,
    limiter: Keyed,
}

impl std::fmt::Debug for Limit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Limit")
            .field("name", &self.name)
            .field("key", &self.key)
            .field("burst", &self.burst)
            .field("window", &self.window)
            .finish()
    }
}

impl Limit {
    /// `rate` requests per `per`, with bursts of up to `burst` (default: `rate`).
    pub fn new(
        name: &str,
        key: LimitKey,
        rate: u32,
        per: Duration,
        burst: Option<u32>,
    ) -> Option<Limit> {
        let rate = NonZeroU32::new(rate)?;
        let interval = per.checked_div(rate.get()).filter(|d| !d.is_zero())?;
        let burst = NonZeroU32::new(burst.unwrap_or(rate.get()))?;
        let quota = Quota::with_period(interval)?.allow_burst(burst);
        Some(Limit {
            name: name.to_owned(),
            key,
            burst: burst.get(),
            window: interval * burst.get(),
            interval,
            limiter: RateLimiter::keyed(quota).with_middleware::<StateInformationMiddleware>(),
        })
    }

    fn key(&self, ip: IpAddr, sub: Option<&str>, headers: &HeaderMap) -> String {
        let mut k = match &self.key {
            LimitKey::Ip => ip.to_string(),
            LimitKey::Route => String::new(),
            LimitKey::Sub => match sub {
                Some(s) => format!("sub:{s}"),
                None => format!("ip:{ip}"),
            },
            LimitKey::Header(name) => match headers.get(name) {
                Some(v) => format!("h:{}", String::from_utf8_lossy(v.as_bytes())),
                None => format!("ip:{ip}"),
            },
        };
        if k.len() > MAX_KEY_BYTES {
            let mut cut = MAX_KEY_BYTES;
            while !k.is_char_boundary(cut) {
                cut -= 1;
            }
            k.truncate(cut);
        }
        k
    }
}

/// A request over a limit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limited {
    /// The limit that refused it.
    pub limit: String,
    /// When to try again (`Retry-After`, whole seconds rounded up).
    pub retry_after: u64,
    /// The response headers (`RateLimit-Policy`, `RateLimit`, `Retry-After`).
    pub headers: Vec<(HeaderName, HeaderValue)>,
}

/// The `RateLimit-Policy` field name (IETF httpapi draft).
pub const RATELIMIT_POLICY: HeaderName = HeaderName::from_static("ratelimit-policy");
/// The `RateLimit` field name (IETF httpapi draft).
pub const RATELIMIT: HeaderName = HeaderName::from_static("ratelimit");

/// A route's limits.
#[derive(Debug, Default)]
pub struct RateLimits {
    limits: Vec<Limit>,
    /// Precomputed `RateLimit-Policy` value.
    policy: Option<HeaderValue>,
}

/// Which limits a check covers: those that need the authenticated subject run after auth.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// IP, header and route limits: before authentication, so floods cost no signature checks.
    BeforeAuth,
    /// `sub` limits.
    AfterAuth,
}

impl RateLimits {
    /// Combines a route's limits.
    pub fn new(limits: Vec<Limit>) -> RateLimits {
        let policy = (!limits.is_empty())
            .then(|| {
                let v = limits
                    .iter()
                    .map(|l| {
                        format!(
                            "\"{}\";q={};w={}",
                            l.name,
                            l.burst,
                            l.window.as_secs().max(1)
                        )
                    })
                    .collect::<Vec<_>>()
                    .join(", ");
                HeaderValue::from_str(&v).ok()
            })
            .flatten();
        RateLimits { limits, policy }
    }

    /// Whether the route has any limit.
    pub fn is_empty(&self) -> bool {
        self.limits.is_empty()
    }

    /// Counts the request against the limits of `phase`. `Ok` carries the headers to add to the
    /// response (the tightest limit's remaining allowance).
    pub fn check(
        &self,
        phase: Phase,
        ip: IpAddr,
        sub: Option<&str>,
        headers: &HeaderMap,
    ) -> Result<Vec<(HeaderName, HeaderValue)>, Limited> {
        let mut tightest: Option<(&Limit, u32)> = None;
        for limit in self
            .limits
            .iter()
            .filter(|l| (l.key == LimitKey::Sub) == (phase == Phase::AfterAuth))
        {
            let key = limit.key(ip, sub, headers);
            match limit.limiter.check_key(&key) {
                Ok(snapshot) => {
                    let left = snapshot.remaining_burst_capacity();
                    if tightest.is_none_or(|(_, t)| left < t) {
                        tightest = Some((limit, left));
                    }
                }
                Err(not_until) => {
                    let wait = not_until.wait_time_from(DefaultClock::default().now());
                    let retry_after = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
                    let mut out = self.policy_header();
                    out.push((
                        RATELIMIT,
                        header(&format!("\"{}\";r=0;t={}", limit.name, retry_after)),
                    ));
                    out.push((http::header::RETRY_AFTER, HeaderValue::from(retry_after)));
                    return Err(Limited {
                        limit: limit.name.clone(),
                        retry_after,
                        headers: out,
                    });
                }
            }
        }
        let Some((limit, left)) = tightest else {
            return Ok(Vec::new());
        };
        let refill = (limit.interval * (limit.burst - left.min(limit.burst))).as_secs();
        let mut out = self.policy_header();
        out.push((
            RATELIMIT,
            header(&format!("\"{}\";r={left};t={refill}", limit.name)),
        ));
        Ok(out)
    }

    fn policy_header(&self) -> Vec<(HeaderName, HeaderValue)> {
        self.policy
            .iter()
            .map(|p| (RATELIMIT_POLICY, p.clone()))
            .collect()
    }

    /// Drops keys whose allowance has fully come back; returns how many keys remain.
    pub fn sweep(&self) -> usize {
        self.limits
            .iter()
            .map(|l| {
                l.limiter.retain_recent();
                l.limiter.shrink_to_fit();
                l.limiter.len()
            })
            .sum()
    }
}

fn header(s: &str) -> HeaderValue {
    HeaderValue::from_str(s).unwrap_or_else(|_| HeaderValue::from_static("\"limit\""))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(last: u8) -> IpAddr {
        IpAddr::from([192, 0, 2, last])
    }

    #[test]
    fn counts_per_key_and_refuses_with_retry_after() {
        let limits = RateLimits::new(vec![
            Limit::new("per-ip", LimitKey::Ip, 3, Duration::from_secs(60), None).expect("limit"),
        ]);
        let h = HeaderMap::new();
        for left in [2, 1, 0] {
            let ok = limits
                .check(Phase::BeforeAuth, ip(1), None, &h)
                .expect("allowed");
            assert_eq!(
                ok[0],
                (
                    RATELIMIT_POLICY,
                    HeaderValue::from_static("\"per-ip\";q=3;w=60")
                )
            );
            assert!(
                ok[1]
                    .1
                    .to_str()
                    .unwrap_or("")
                    .starts_with(&format!("\"per-ip\";r={left};"))
            );
        }
        let refused = limits
            .check(Phase::BeforeAuth, ip(1), None, &h)
            .expect_err("limited");
        assert_eq!(refused.limit, "per-ip");
        assert!(
            (1..=20).contains(&refused.retry_after),
            "{}",
            refused.retry_after
        );
        assert!(
            refused
                .headers
                .iter()
                .any(|(n, _)| n == http::header::RETRY_AFTER)
        );
        // Another client has its own budget.
        assert!(limits.check(Phase::BeforeAuth, ip(2), None, &h).is_ok());
    }

    #[test]
    fn sub_limits_run_after_auth_and_anonymous_callers_count_by_ip() {
        let limits = RateLimits::new(vec![
            Limit::new("per-user", LimitKey::Sub, 1, Duration::from_secs(60), None).expect("limit"),
        ]);
        let h = HeaderMap::new();
        assert_eq!(
            limits.check(Phase::BeforeAuth, ip(1), None, &h),
            Ok(Vec::new())
        );
        assert!(
            limits
                .check(Phase::AfterAuth, ip(1), Some("alice"), &h)
                .is_ok()
        );
        assert!(
            limits
                .check(Phase::AfterAuth, ip(9), Some("alice"), &h)
                .is_err(),
            "same user, other IP"
        );
        assert!(
            limits
                .check(Phase::AfterAuth, ip(1), Some("bob"), &h)
                .is_ok()
        );
        assert!(limits.check(Phase::AfterAuth, ip(1), None, &h).is_ok());
        assert!(limits.check(Phase::AfterAuth, ip(1), None, &h).is_err());
    }

    #[test]
    fn header_and_route_keys_and_several_limits() {
        let limits = RateLimits::new(vec![
            Limit::new(
                "per-key",
                LimitKey::Header(HeaderName::from_static("x-api-key")),
                2,
                Duration::from_secs(60),
                None,
            )
            .expect("limit"),
            Limit::new("route", LimitKey::Route, 3, Duration::from_secs(60), None).expect("limit"),
        ]);
        let mut a = HeaderMap::new();
        a.insert("x-api-key", HeaderValue::from_static("key-a"));
        let mut b = HeaderMap::new();
        b.insert("x-api-key", HeaderValue::from_static("key-b"));
        assert!(limits.check(Phase::BeforeAuth, ip(1), None, &a).is_ok());
        assert!(limits.check(Phase::BeforeAuth, ip(2), None, &a).is_ok());
        assert_eq!(
            limits
                .check(Phase::BeforeAuth, ip(3), None, &a)
                .map_err(|l| l.limit),
            Err("per-key".to_owned())
        );
        // The refused request did not count against the route; key-b takes the route's third.
        assert!(limits.check(Phase::BeforeAuth, ip(4), None, &b).is_ok());
        // key-b has budget left, but the route's shared budget (3) is spent now.
        assert_eq!(
            limits
                .check(Phase::BeforeAuth, ip(4), None, &b)
                .map_err(|l| l.limit),
            Err("route".to_owned())
        );
    }

    #[test]
    fn idle_keys_are_swept_and_keys_are_bounded() {
        let limits = RateLimits::new(vec![
            Limit::new(
                "fast",
                LimitKey::Header(HeaderName::from_static("x-k")),
                1000,
                Duration::from_millis(100),
                Some(1),
            )
            .expect("limit"),
        ]);
        for i in 0..500 {
            let mut h = HeaderMap::new();
            h.insert(
                "x-k",
                HeaderValue::from_str(&format!("{i}-{}", "x".repeat(400))).expect("v"),
            );
            let _ = limits.check(Phase::BeforeAuth, ip(1), None, &h);
        }
        assert!(limits.sweep() > 0);
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(
            limits.sweep(),
            0,
            "every key replenished, so every key is gone"
        );
        let l = Limit::new(
            "k",
            LimitKey::Header(HeaderName::from_static("x-k")),
            1,
            Duration::from_secs(1),
            None,
        )
        .expect("limit");
        let mut h = HeaderMap::new();
        h.insert("x-k", HeaderValue::from_str(&"é".repeat(300)).expect("v"));
        assert!(l.key(ip(1), None, &h).len() <= MAX_KEY_BYTES);
    }

    #[test]
    fn keys_parse() {
        assert_eq!(LimitKey::parse("ip"), Some(LimitKey::Ip));
        assert_eq!(
            LimitKey::parse("header:X-Api-Key"),
            Some(LimitKey::Header(HeaderName::from_static("x-api-key")))
        );
        assert_eq!(LimitKey::parse("cookie:x"), None);
        assert!(Limit::new("zero", LimitKey::Ip, 0, Duration::from_secs(1), None).is_none());
    }
}
