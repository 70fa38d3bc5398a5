//! The node's recent health in numbers: request rate, error rate, p99 latency and cache hit
//! ratio over a sliding window (5 minutes by default), for fleet heartbeats and `outpost fleet
//! status` — the figures an operator checks against "error rate < 1 %, p99 < 200 ms".
//!
//! One slot per second in a ring; recording is a few relaxed atomic adds (no lock on the
//! request path). A slot is reset by the first request of a new second; two threads racing on
//! that reset can lose a handful of counts, which a health figure tolerates.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

/// Slots (seconds) kept: the longest window that can be asked for.
pub const MAX_WINDOW_SECS: usize = 600;
/// Latency buckets: four per power of two of microseconds (≈19 % wide), up to ~1.1 hours.
const BUCKETS: usize = 4 * 32;

struct Slot {
    second: AtomicU64,
    requests: AtomicU64,
    errors: AtomicU64,
    cache_lookups: AtomicU64,
    cache_hits: AtomicU64,
    latency: [AtomicU64; BUCKETS],
}

impl Slot {
    fn new() -> Slot {
        Slot {
            second: AtomicU64::new(0),
            requests: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            cache_lookups: AtomicU64::new(0),
            cache_hits: AtomicU64::new(0),
            latency: std::array::from_fn(|_| AtomicU64::new(0)),
        }
    }

    fn reset_to(&self, second: u64) {
        let seen = self.second.load(Ordering::Acquire);
        if seen != second
            && self
                .second
                .compare_exchange(seen, second, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
        {
            self.requests.store(0, Ordering::Relaxed);
            self.errors.store(0, Ordering::Relaxed);
            self.cache_lookups.store(0, Ordering::Relaxed);
            self.cache_hits.store(0, Ordering::Relaxed);
            for b in &self.latency {
                b.store(0, Ordering::Relaxed);
            }
        }
    }
}

/// The sliding window.
pub struct HealthWindow {
    slots: Box<[Slot]>,
}

impl std::fmt::Debug for HealthWindow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("HealthWindow")
    }
}

impl Default for HealthWindow {
    fn default() -> Self {
        HealthWindow {
            slots: (0..MAX_WINDOW_SECS).map(|_| Slot::new()).collect(),
        }
    }
}

/// What the window says.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Health {
    /// Requests in the window.
    pub requests: u64,
    /// Requests per second over the window.
    pub request_rate: f64,
    /// Share of 5xx answers (0 to 1).
    pub error_rate: f64,
    /// 99th percentile of request duration, in milliseconds (upper edge of its bucket).
    pub p99_ms: f64,
    /// Share of cached-route lookups answered from the cache (0 to 1; 0 with no lookups).
    pub cache_hit_ratio: f64,
}

fn bucket_of(micros: u64) -> usize {
    if micros < 2 {
        return 0;
    }
    let log2 = 63 - u64::from(micros.leading_zeros());
    // Two bits below the leading one pick the quarter.
    let quarter = if log2 >= 2 {
        (micros >> (log2 - 2)) & 3
    } else {
        (micros << (2 - log2)) & 3
    };
    ((log2 as usize) * 4 + quarter as usize).min(BUCKETS - 1)
}

fn bucket_upper_micros(bucket: usize) -> f64 {
    let log2 = (bucket / 4) as i32;
    let quarter = (bucket % 4) as f64;
    2f64.powi(log2) * (1.0 + (quarter + 1.0) / 4.0)
}

fn now_second() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl HealthWindow {
    /// Records one finished request.
    pub fn record(&self, status: u16, seconds: f64) {
        self.record_at(now_second(), status, seconds);
    }

    /// [`HealthWindow::record`] at a given second (tests).
    pub fn record_at(&self, second: u64, status: u16, seconds: f64) {
        let slot = &self.slots[(second % MAX_WINDOW_SECS as u64) as usize];
        slot.reset_to(second);
        slot.requests.fetch_add(1, Ordering::Relaxed);
        if status >= 500 {
            slot.errors.fetch_add(1, Ordering::Relaxed);
        }
        let micros = (seconds * 1e6).max(0.0) as u64;
        slot.latency[bucket_of(micros)].fetch_add(1, Ordering::Relaxed);
    }

    /// Records one cache lookup on a cached route.
    pub fn record_cache(&self, hit: bool) {
        self.record_cache_at(now_second(), hit);
    }

    /// [`HealthWindow::record_cache`] at a given second (tests).
    pub fn record_cache_at(&self, second: u64, hit: bool) {
        let slot = &self.slots[(second % MAX_WINDOW_SECS as u64) as usize];
        slot.reset_to(second);
        slot.cache_lookups.fetch_add(1, Ordering::Relaxed);
        if hit {
            slot.cache_hits.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// The figures over the last `window_secs` seconds (capped at [`MAX_WINDOW_SECS`]).
    pub fn summary(&self, window_secs: u64) -> Health {
        self.summary_at(now_second(), window_secs)
    }

    /// [`HealthWindow::summary`] as of `now` (tests).
    pub fn summary_at(&self, now: u64, window_secs: u64) -> Health {
        let window = window_secs.clamp(1, MAX_WINDOW_SECS as u64);
        let oldest = now.saturating_sub(window - 1);
        let mut requests = 0;
        let mut errors = 0;
        let mut lookups = 0;
        let mut hits = 0;
        let mut latency = [0u64; BUCKETS];
        for slot in self.slots.iter() {
            let s = slot.second.load(Ordering::Acquire);
            if s < oldest || s > now {
                continue;
            }
            requests += slot.requests.load(Ordering::Relaxed);
            errors += slot.errors.load(Ordering::Relaxed);
            lookups += slot.cache_lookups.load(Ordering::Relaxed);
            hits += slot.cache_hits.load(Ordering::Relaxed);
            for (acc, b) in latency.iter_mut().zip(slot.latency.iter()) {
                *acc += b.load(Ordering::Relaxed);
            }
        }
        let p99_ms = if requests == 0 {
            0.0
        } else {
            let rank = (requests as f64 * 0.99).ceil() as u64;
            let mut seen = 0;
            let mut p = 0.0;
            for (i, n) in latency.iter().enumerate() {
                seen += n;
                if seen >= rank {
                    p = bucket_upper_micros(i) / 1000.0;
                    break;
                }
            }
            p
        };
        Health {
            requests,
            request_rate: requests as f64 / window as f64,
            error_rate: if requests == 0 {
                0.0
            } else {
                errors as f64 / requests as f64
            },
            p99_ms,
            cache_hit_ratio: if lookups == 0 {
                0.0
            } else {
                hits as f64 / lookups as f64
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_ordered_and_about_a_fifth_wide() {
        let mut last = 0;
        for us in [
            1u64,
            2,
            3,
            5,
            10,
            100,
            1_000,
            10_000,
            199_000,
            250_000,
            3_600_000_000,
        ] {
            let b = bucket_of(us);
            assert!(b >= last, "{us}");
            last = b;
            let upper = bucket_upper_micros(b);
            assert!(upper >= us as f64 || b == BUCKETS - 1, "{us} ≤ {upper}");
            assert!(us < 4 || upper <= us as f64 * 1.26, "{us}: {upper}");
        }
    }

    #[test]
    fn rates_and_p99_over_the_window() {
        let w = HealthWindow::default();
        let now = 1_000_000;
        // 1000 requests over 100 s: 10 of them 5xx, 20 slow (300 ms), the rest 5 ms.
        for i in 0..1000u64 {
            let second = now - (i % 100);
            let status = if i % 100 == 0 { 503 } else { 200 };
            let seconds = if i % 50 == 1 { 0.3 } else { 0.005 };
            w.record_at(second, status, seconds);
        }
        for i in 0..10 {
            w.record_cache_at(now, i < 9);
        }
        let h = w.summary_at(now, 300);
        assert_eq!(h.requests, 1000);
        assert!((h.error_rate - 0.01).abs() < 1e-9);
        assert!((h.request_rate - 1000.0 / 300.0).abs() < 1e-9);
        assert!(h.p99_ms >= 300.0 && h.p99_ms < 380.0, "{}", h.p99_ms);
        assert!((h.cache_hit_ratio - 0.9).abs() < 1e-9);
        // A narrower window sees only its seconds; old slots are not counted.
        assert_eq!(w.summary_at(now, 10).requests, 100);
        assert_eq!(w.summary_at(now + 1000, 300).requests, 0);
    }

    #[test]
    fn a_reused_slot_starts_from_zero() {
        let w = HealthWindow::default();
        w.record_at(5, 500, 0.001);
        w.record_at(5 + MAX_WINDOW_SECS as u64, 200, 0.001);
        let h = w.summary_at(5 + MAX_WINDOW_SECS as u64, 1);
        assert_eq!((h.requests, h.error_rate), (1, 0.0));
    }
}
