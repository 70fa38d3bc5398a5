//! Edge analytics, wired: opening `<data_dir>/analytics.db`, the task that rolls closed windows
//! up and ships their summaries to the center, and the admin query API.
//!
//! Summaries travel one of two ways (`[analytics] send_via`):
//! - **HTTP**: `POST center_url` with `Idempotency-Key: analytics-<node>-<window start>` and the
//!   summary document; any 2xx delivers it. The center upserts by (node, window start), so a
//!   re-send (after a crash between the answer and the bookkeeping, or a newer version of a
//!   window reopened by late events) replaces and never adds.
//! - **NATS** (in a fleet): JetStream subject `outpost.analytics.<node>` in the stream
//!   `OUTPOST_ANALYTICS` (7 days, 1 h duplicate window) with `Nats-Msg-Id: <node>-<window start>`
//!   (plus `-v<version>` for re-rolled versions, which must not be dropped as duplicates); the
//!   publish acknowledgement delivers it.
//!
//! Until then a summary waits in the analytics file, retried with backoff (1 s doubling to 60 s,
//! with jitter), however long the center is away.
//!
//! ```text
//! GET /analytics/counts?by=type|key&type=…&from_ms=…&to_ms=…&limit=…   (admin token)
//! GET /analytics/summaries?limit=…                                     (admin token)
//! ```

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use axum::Router;
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use outpost_config::{Config, SendVia};
use outpost_state::analytics::{Analytics, AnalyticsOptions, GroupBy, StatsSnapshot, Summary};
use serde::Deserialize;
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::serve::Lifecycle;

/// The JetStream stream that carries summaries.
pub const STREAM: &str = "OUTPOST_ANALYTICS";
/// Summaries sent per round.
const PER_ROUND: usize = 64;
/// Longest wait for the center's answer (or JetStream's acknowledgement).
const SEND_TIMEOUT: Duration = Duration::from_secs(10);
/// How often old raw events and delivered summaries are swept.
const SWEEP_EVERY: Duration = Duration::from_secs(60);

/// Opens the analytics file when `[analytics] enabled` (blocking work, off the async threads).
pub async fn open(config: &Config) -> anyhow::Result<Option<Analytics>> {
    let a = &config.analytics;
    if !a.enabled {
        return Ok(None);
    }
    let mut options = AnalyticsOptions::new(
        config.base_dir.join(&config.node.data_dir),
        config.node.id.clone(),
    );
    options.region = config.node.region.clone();
    options.window = a.window;
    options.grace = a.grace;
    options.top_keys = a.top_keys;
    options.retention = a.retention;
    let dir = options.dir.clone();
    let analytics = tokio::task::spawn_blocking(move || Analytics::open(options))
        .await
        .context("the analytics opener panicked")?
        .with_context(|| format!("cannot open the analytics store in {}", dir.display()))?;
    Ok(Some(analytics))
}

/// Where summaries go.
enum Sink {
    Http {
        client: reqwest::Client,
        url: String,
    },
    Nats {
        js: async_nats::jetstream::Context,
        replicas: usize,
        /// Whether the stream is known to exist.
        ready: bool,
    },
}

/// Starts the shipper: every few seconds it rolls up closed windows and sends due summaries.
/// `jetstream` is the fleet's context when the node is in one; `report` is called after every
/// round with the counters and the number of summaries still waiting (for metrics).
pub fn spawn(
    analytics: Analytics,
    config: &Config,
    jetstream: Option<async_nats::jetstream::Context>,
    report: impl Fn(&StatsSnapshot, u64) + Send + 'static,
    stop: CancellationToken,
) -> anyhow::Result<()> {
    let a = &config.analytics;
    let via_nats = match a.send_via {
        SendVia::Nats => true,
        SendVia::Http => false,
        SendVia::Auto => config.fleet.is_some(),
    };
    let sink = match (via_nats, jetstream, &a.center_url) {
        (true, Some(js), _) => Sink::Nats {
            js,
            replicas: config.fleet.as_ref().map_or(1, |f| f.stream_replicas),
            ready: false,
        },
        (false, _, Some(url)) => Sink::Http {
            client: reqwest::Client::builder()
                .timeout(SEND_TIMEOUT)
                .build()
                .context("cannot build the HTTP client for analytics")?,
            url: url.clone(),
        },
        (true, None, _) => {
            anyhow::bail!("[analytics] sends over NATS, but the fleet link is not up")
        }
        (false, _, None) => anyhow::bail!("[analytics] has no center_url to send summaries to"),
    };
    let node = config.node.id.clone();
    let region = config.node.region.clone();
    let tick = (a.window / 4).clamp(Duration::from_millis(250), Duration::from_secs(5));
    tracing::info!(
        via = if via_nats { "nats" } else { "http" },
        window_secs = a.window.as_secs_f64(),
        "Analytics summaries will be shipped to the center."
    );
    tokio::spawn(async move {
        let mut shipper = Shipper {
            analytics,
            sink,
            node,
            region,
        };
        let mut ticker = tokio::time::interval(tick);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_sweep = tokio::time::Instant::now();
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = ticker.tick() => {}
            }
            shipper.round().await;
            if last_sweep.elapsed() >= SWEEP_EVERY {
                last_sweep = tokio::time::Instant::now();
                shipper.sweep().await;
            }
            let pending = shipper.analytics.pending_summaries().unwrap_or(0);
            report(&shipper.analytics.stats(), pending);
        }
    });
    Ok(())
}

struct Shipper {
    analytics: Analytics,
    sink: Sink,
    node: String,
    region: Option<String>,
}

impl Shipper {
    async fn round(&mut self) {
        let now = outpost_state::store::now_ms();
        if let Err(e) = self.analytics.rollup_at(now).await {
            tracing::error!(error = %e, "Rolling up analytics windows failed.");
        }
        let due = match self.analytics.due_summaries(now, PER_ROUND) {
            Ok(d) => d,
            Err(e) => {
                tracing::error!(error = %e, "Reading due analytics summaries failed.");
                return;
            }
        };
        for summary in due {
            let payload = summary.payload(&self.node, self.region.as_deref());
            let bytes = payload.len() as u64;
            match self.send(&summary, payload).await {
                Ok(()) => {
                    tracing::debug!(
                        window_start_ms = summary.window_start_ms,
                        version = summary.version,
                        events = summary.events,
                        bytes,
                        "Analytics summary delivered."
                    );
                    if let Err(e) = self
                        .analytics
                        .mark_delivered(summary.window_start_ms, summary.version, bytes)
                        .await
                    {
                        tracing::error!(error = %e, "Recording a delivered summary failed; it will be sent again.");
                    }
                }
                Err(error) => {
                    let next = now + backoff(summary.attempts).as_millis() as u64;
                    tracing::warn!(
                        window_start_ms = summary.window_start_ms,
                        attempts = summary.attempts + 1,
                        error = %error,
                        "Analytics summary not delivered; kept for a later attempt."
                    );
                    if let Err(e) = self
                        .analytics
                        .mark_failed(summary.window_start_ms, summary.version, next, error)
                        .await
                    {
                        tracing::error!(error = %e, "Recording a failed summary delivery failed.");
                    }
                    // The center is likely away: leave the rest for the next round.
                    return;
                }
            }
        }
    }

    async fn send(&mut self, summary: &Summary, payload: Vec<u8>) -> Result<(), String> {
        match &mut self.sink {
            Sink::Http { client, url } => {
                let resp = client
                    .post(url.as_str())
                    .header("content-type", "application/json")
                    .header("idempotency-key", summary.idempotency_key(&self.node))
                    .body(payload)
                    .send()
                    .await
                    .map_err(|e| format!("POST {url}: {e}"))?;
                if resp.status().is_success() {
                    Ok(())
                } else {
                    Err(format!("the center answered {}", resp.status()))
                }
            }
            Sink::Nats {
                js,
                replicas,
                ready,
            } => {
                if !*ready {
                    js.get_or_create_stream(stream_config(*replicas))
                        .await
                        .map_err(|e| format!("stream {STREAM}: {e}"))?;
                    *ready = true;
                }
                let mut headers = async_nats::HeaderMap::new();
                headers.insert("Nats-Msg-Id", msg_id(&self.node, summary).as_str());
                let ack = js
                    .publish_with_headers(
                        format!("outpost.analytics.{}", self.node),
                        headers,
                        payload.into(),
                    )
                    .await
                    .map_err(|e| e.to_string())?;
                tokio::time::timeout(SEND_TIMEOUT, ack)
                    .await
                    .map_err(|_| format!("no acknowledgement within {SEND_TIMEOUT:?}"))?
                    .map_err(|e| e.to_string())?;
                Ok(())
            }
        }
    }

    async fn sweep(&self) {
        match self
            .analytics
            .sweep_at(outpost_state::store::now_ms())
            .await
        {
            Ok(s) if s.events > 0 || s.summaries > 0 => tracing::debug!(
                events = s.events,
                summaries = s.summaries,
                "Swept old analytics."
            ),
            Ok(_) => {}
            Err(e) => tracing::error!(error = %e, "Sweeping old analytics failed."),
        }
    }
}

/// `Nats-Msg-Id` of a summary: JetStream drops a repeat within the duplicate window, while a
/// newer version of the same window (late events) gets an id of its own.
fn msg_id(node: &str, s: &Summary) -> String {
    if s.version <= 1 {
        format!("{node}-{}", s.window_start_ms)
    } else {
        format!("{node}-{}-v{}", s.window_start_ms, s.version)
    }
}

/// Settings of the summaries stream.
pub fn stream_config(replicas: usize) -> async_nats::jetstream::stream::Config {
    async_nats::jetstream::stream::Config {
        name: STREAM.into(),
        description: Some("Outpost: per-window analytics summaries of every node".into()),
        subjects: vec!["outpost.analytics.>".into()],
        max_age: Duration::from_secs(7 * 24 * 3600),
        duplicate_window: Duration::from_secs(3600),
        num_replicas: replicas.max(1),
        ..Default::default()
    }
}

/// Delay before the next attempt: 1 s doubling to 60 s, 50–100 % jitter.
fn backoff(attempts: u32) -> Duration {
    let base = Duration::from_secs(1)
        .saturating_mul(1u32 << attempts.min(6))
        .min(Duration::from_secs(60));
    base.mul_f64(0.5 + fastrand::f64() * 0.5)
}

/// The `/analytics` admin routes.
pub fn routes() -> Router<Arc<Lifecycle>> {
    Router::new()
        .route("/analytics/counts", get(counts))
        .route("/analytics/summaries", get(summaries))
}

/// The analytics store, or the 404 that says how to turn analytics on.
#[expect(
    clippy::result_large_err,
    reason = "the error is the ready-made HTTP response"
)]
fn enabled(life: &Lifecycle) -> Result<&outpost_state::analytics::Analytics, Response> {
    life.node.analytics().ok_or_else(|| {
        failure(
            StatusCode::NOT_FOUND,
            "analytics are off: set [analytics] enabled = true",
        )
    })
}

fn failure(status: StatusCode, msg: impl Into<String>) -> Response {
    (status, axum::Json(json!({ "error": msg.into() }))).into_response()
}

#[derive(Debug, Deserialize)]
struct CountsQuery {
    by: Option<String>,
    #[serde(rename = "type")]
    kind: Option<String>,
    from_ms: Option<u64>,
    to_ms: Option<u64>,
    limit: Option<usize>,
}

async fn counts(State(life): State<Arc<Lifecycle>>, Query(q): Query<CountsQuery>) -> Response {
    let analytics = match enabled(&life) {
        Ok(a) => a,
        Err(resp) => return resp,
    };
    let by = match q.by.as_deref().map(GroupBy::parse) {
        None => GroupBy::Type,
        Some(Some(by)) => by,
        Some(None) => return failure(StatusCode::BAD_REQUEST, "by must be `type` or `key`"),
    };
    let to = q.to_ms.unwrap_or(u64::MAX);
    let from = q.from_ms.unwrap_or(0);
    let limit = q.limit.unwrap_or(100).clamp(1, 10_000);
    match analytics.counts(by, q.kind.as_deref(), from, to, limit) {
        Ok(rows) => axum::Json(json!({
            "by": by.as_str(),
            "type": q.kind,
            "from_ms": from,
            "to_ms": q.to_ms,
            "counts": rows,
        }))
        .into_response(),
        Err(e) => failure(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

#[derive(Debug, Deserialize)]
struct SummariesQuery {
    limit: Option<usize>,
}

async fn summaries(
    State(life): State<Arc<Lifecycle>>,
    Query(q): Query<SummariesQuery>,
) -> Response {
    let analytics = match enabled(&life) {
        Ok(a) => a,
        Err(resp) => return resp,
    };
    let limit = q.limit.unwrap_or(20).clamp(1, 1000);
    let (recent, pending) = match (
        analytics.recent_summaries(limit),
        analytics.pending_summaries(),
    ) {
        (Ok(r), Ok(p)) => (r, p),
        (Err(e), _) | (_, Err(e)) => {
            return failure(StatusCode::INTERNAL_SERVER_ERROR, e.to_string());
        }
    };
    let list: Vec<_> = recent
        .iter()
        .map(|s| {
            json!({
                "window_start_ms": s.window_start_ms,
                "window_ms": s.window_ms,
                "version": s.version,
                "events": s.events,
                "delivered": s.delivered,
                "attempts": s.attempts,
                "last_error": s.last_error,
                "types": serde_json::from_str::<serde_json::Value>(&s.types).unwrap_or_default(),
            })
        })
        .collect();
    axum::Json(json!({
        "pending": pending,
        "stats": analytics.stats(),
        "summaries": list,
    }))
    .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_a_minute() {
        assert!(backoff(0) <= Duration::from_secs(1));
        assert!(backoff(3) >= Duration::from_secs(4));
        assert!(backoff(30) <= Duration::from_secs(60));
        assert!(backoff(30) >= Duration::from_secs(30));
    }

    #[test]
    fn a_newer_version_gets_its_own_message_id() {
        let mut s = Summary {
            window_start_ms: 60_000,
            window_ms: 60_000,
            version: 1,
            events: 1,
            types: "{}".into(),
            delivered: false,
            attempts: 0,
            next_attempt_ms: 0,
            last_error: None,
        };
        assert_eq!(msg_id("edge-1", &s), "edge-1-60000");
        s.version = 2;
        assert_eq!(msg_id("edge-1", &s), "edge-1-60000-v2");
    }
}
