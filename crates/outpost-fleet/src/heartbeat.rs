//! Fleet status: every node puts a heartbeat in a JetStream key-value bucket whose entries
//! expire (`max_age`), so a node that stops heartbeating drops out of the table by itself.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, kv};
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::backoff;

/// The key-value bucket of heartbeats.
pub const BUCKET: &str = "outpost_nodes";

/// One node's heartbeat: who it is and how it is doing over the health window.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Heartbeat {
    /// Node id.
    pub id: String,
    /// Region label.
    pub region: Option<String>,
    /// Outpost version.
    pub version: String,
    /// Seconds since the node started.
    pub uptime_s: u64,
    /// Length of the window the figures cover, in seconds.
    pub window_s: u64,
    /// Requests answered in the window.
    pub requests: u64,
    /// Requests per second over the window.
    pub request_rate: f64,
    /// Share of 5xx answers (0 to 1).
    pub error_rate: f64,
    /// 99th percentile request duration, ms.
    pub p99_ms: f64,
    /// Share of cache lookups answered from the cache.
    pub cache_hit_ratio: f64,
    /// Writes waiting in the outbox.
    pub outbox_depth: u64,
    /// Age of the oldest waiting write, seconds.
    pub outbox_oldest_age_s: f64,
    /// Local state changes not yet published to the fleet.
    pub replication_backlog: i64,
    /// When this heartbeat was made (Unix ms).
    pub updated_at_ms: u64,
}

/// When a node counts as unhealthy.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct HealthRules {
    /// Error rate at or above which a node is unhealthy (0.01 = 1 %).
    pub max_error_rate: f64,
    /// p99 at or above which a node is unhealthy, ms.
    pub max_p99_ms: f64,
    /// A heartbeat older than this is stale, ms.
    pub stale_after_ms: u64,
}

impl HealthRules {
    /// What is wrong with a node (empty: healthy).
    pub fn problems(&self, hb: &Heartbeat, now_ms: u64) -> Vec<String> {
        let mut out = Vec::new();
        if hb.requests > 0 && hb.error_rate >= self.max_error_rate {
            out.push(format!(
                "error rate {:.2} % ≥ {:.2} %",
                hb.error_rate * 100.0,
                self.max_error_rate * 100.0
            ));
        }
        if hb.requests > 0 && hb.p99_ms >= self.max_p99_ms {
            out.push(format!(
                "p99 {:.0} ms ≥ {:.0} ms",
                hb.p99_ms, self.max_p99_ms
            ));
        }
        let age = now_ms.saturating_sub(hb.updated_at_ms);
        if age > self.stale_after_ms {
            out.push(format!("last heartbeat {:.0} s ago", age as f64 / 1000.0));
        }
        out
    }
}

/// Where a heartbeat's figures come from (the binary reads metrics, the store, the link).
pub type HeartbeatSource = Arc<dyn Fn() -> Heartbeat + Send + Sync>;

/// Opens (creating if needed) the heartbeat bucket; entries live three intervals.
pub async fn bucket(js: &jetstream::Context, interval: Duration) -> Result<kv::Store, String> {
    crate::open_kv(
        js,
        kv::Config {
            bucket: BUCKET.into(),
            description: "Outpost node heartbeats (entries expire)".into(),
            history: 1,
            max_age: interval * 3,
            storage: jetstream::stream::StorageType::Memory,
            ..Default::default()
        },
    )
    .await
}

/// Puts this node's heartbeat every `interval` until `stop`.
pub async fn run(
    js: jetstream::Context,
    interval: Duration,
    source: HeartbeatSource,
    stop: CancellationToken,
) {
    let mut store = None;
    let mut attempt = 0u32;
    loop {
        if store.is_none() {
            match bucket(&js, interval).await {
                Ok(s) => store = Some(s),
                Err(e) => {
                    attempt += 1;
                    if attempt == 1 || attempt.is_multiple_of(20) {
                        tracing::warn!(error = %e, "Cannot open the heartbeat bucket yet; retrying.");
                    }
                }
            }
        }
        if let Some(s) = &store {
            let hb = source();
            let key = hb.id.clone();
            match serde_json::to_vec(&hb) {
                Ok(bytes) => {
                    if let Err(e) = s.put(key, bytes.into()).await {
                        tracing::debug!(error = %e, "Heartbeat not sent.");
                    }
                }
                Err(e) => tracing::error!(error = %e, "Cannot encode the heartbeat."),
            }
        }
        let pause = if store.is_some() {
            interval
        } else {
            backoff(attempt)
        };
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(pause) => {}
        }
    }
}

/// Every live heartbeat in the bucket, sorted by node id.
pub async fn read_all(js: &jetstream::Context) -> Result<Vec<Heartbeat>, String> {
    let store = js
        .get_key_value(BUCKET)
        .await
        .map_err(|e| format!("no heartbeat bucket ({e}); is any node of the fleet running?"))?;
    let mut keys = store.keys().await.map_err(|e| e.to_string())?;
    let mut out = Vec::new();
    while let Some(key) = keys.next().await {
        let Ok(key) = key else { continue };
        if let Ok(Some(bytes)) = store.get(&key).await
            && let Ok(hb) = serde_json::from_slice::<Heartbeat>(&bytes)
        {
            out.push(hb);
        }
    }
    out.sort_by(|a, b| a.id.cmp(&b.id));
    Ok(out)
}

/// The `outpost fleet status` table.
pub fn table(beats: &[Heartbeat], rules: &HealthRules, now_ms: u64) -> String {
    let mut out = format!(
        "{:<16} {:<14} {:<8} {:>9} {:>9} {:>7} {:>9} {:>6} {:>8} {:>10}  {}\n",
        "NODE",
        "REGION",
        "VERSION",
        "UPTIME",
        "REQ/S",
        "ERR%",
        "P99(ms)",
        "HIT%",
        "OUTBOX",
        "OLDEST(s)",
        "STATUS"
    );
    for hb in beats {
        let problems = rules.problems(hb, now_ms);
        let status = if problems.is_empty() {
            "healthy".to_owned()
        } else {
            format!("UNHEALTHY: {}", problems.join("; "))
        };
        out.push_str(&format!(
            "{:<16} {:<14} {:<8} {:>9} {:>9.1} {:>7.2} {:>9.1} {:>6.1} {:>8} {:>10.1}  {}\n",
            hb.id,
            hb.region.as_deref().unwrap_or("-"),
            hb.version,
            uptime(hb.uptime_s),
            hb.request_rate,
            hb.error_rate * 100.0,
            hb.p99_ms,
            hb.cache_hit_ratio * 100.0,
            hb.outbox_depth,
            hb.outbox_oldest_age_s,
            status
        ));
    }
    if beats.is_empty() {
        out.push_str("(no node has sent a heartbeat recently)\n");
    }
    out
}

/// JSON for `--format json` and the admin API: heartbeats with their verdicts.
pub fn json(beats: &[Heartbeat], rules: &HealthRules, now_ms: u64) -> serde_json::Value {
    let nodes: Vec<serde_json::Value> = beats
        .iter()
        .map(|hb| {
            let problems = rules.problems(hb, now_ms);
            let mut v = serde_json::to_value(hb).unwrap_or_default();
            if let Some(o) = v.as_object_mut() {
                o.insert("healthy".into(), problems.is_empty().into());
                o.insert("problems".into(), problems.into());
            }
            v
        })
        .collect();
    serde_json::json!({ "nodes": nodes })
}

fn uptime(s: u64) -> String {
    match s {
        0..=59 => format!("{s}s"),
        60..=3599 => format!("{}m{}s", s / 60, s % 60),
        3600..=86_399 => format!("{}h{}m", s / 3600, (s % 3600) / 60),
        _ => format!("{}d{}h", s / 86_400, (s % 86_400) / 3600),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hb(error_rate: f64, p99_ms: f64, updated_at_ms: u64) -> Heartbeat {
        Heartbeat {
            id: "tokyo-1".into(),
            region: Some("ap-northeast".into()),
            version: "0.1.0".into(),
            uptime_s: 3725,
            window_s: 300,
            requests: 1000,
            request_rate: 3.3,
            error_rate,
            p99_ms,
            cache_hit_ratio: 0.9,
            outbox_depth: 0,
            outbox_oldest_age_s: 0.0,
            replication_backlog: 0,
            updated_at_ms,
        }
    }

    const RULES: HealthRules = HealthRules {
        max_error_rate: 0.01,
        max_p99_ms: 200.0,
        stale_after_ms: 15_000,
    };

    #[test]
    fn the_issue_thresholds_decide_health() {
        assert!(RULES.problems(&hb(0.005, 120.0, 1000), 1000).is_empty());
        assert_eq!(RULES.problems(&hb(0.01, 120.0, 1000), 1000).len(), 1);
        assert_eq!(RULES.problems(&hb(0.0, 200.0, 1000), 1000).len(), 1);
        assert_eq!(RULES.problems(&hb(0.02, 250.0, 1000), 100_000).len(), 3);
        let t = table(&[hb(0.02, 80.0, 1000)], &RULES, 1000);
        assert!(t.contains("UNHEALTHY: error rate 2.00 %"), "{t}");
        assert!(t.contains("1h2m"), "{t}");
        let j = json(&[hb(0.0, 80.0, 1000)], &RULES, 1000);
        assert_eq!(j["nodes"][0]["healthy"], true);
    }
}
