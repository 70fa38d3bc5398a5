//! The center's cache invalidations, from `outpost.invalidate` to the node's cache.
//!
//! Published by the center (`outpost_fastapi.Invalidator`) into a stream, consumed here through
//! a durable consumer per node, so a node that was disconnected applies the purges it missed
//! before it would have served the stale copies for long.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::Context;
use async_nats::jetstream::consumer::{AckPolicy, DeliverPolicy, pull};
use futures_util::StreamExt;
use serde::Deserialize;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::{FleetStatus, consumer_name, streams};

/// One invalidation message (the JSON the center publishes).
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Invalidation {
    /// URLs (`host/path?query` or full URLs).
    #[serde(default)]
    pub urls: Vec<String>,
    /// URL prefixes (`host/path/`) or path prefixes on every host (`/path/`).
    #[serde(default)]
    pub prefixes: Vec<String>,
    /// Surrogate-Key / Cache-Tag tags.
    #[serde(default)]
    pub tags: Vec<String>,
    /// Mark stale (still usable by stale-while-revalidate / stale-if-error) instead of removing.
    #[serde(default)]
    pub soft: bool,
    /// Who sent it, for logs.
    #[serde(default)]
    pub source: Option<String>,
    /// When the center sent it (Unix ms), to measure propagation.
    #[serde(default)]
    pub at: Option<f64>,
}

/// Consumes invalidations until `stop`, handing each to `sink` (the binary purges the cache and
/// then the message is acknowledged).
pub async fn run(
    js: Context,
    node_id: String,
    sink: mpsc::Sender<Invalidation>,
    status: Arc<FleetStatus>,
    stop: CancellationToken,
) {
    let name = consumer_name("invalidate", &node_id);
    crate::resume(
        "Invalidation consumer",
        &stop,
        || sink.is_closed(),
        || consume(&js, &name, &sink, &status, &stop),
    )
    .await;
}

async fn consume(
    js: &Context,
    name: &str,
    sink: &mpsc::Sender<Invalidation>,
    status: &FleetStatus,
    stop: &CancellationToken,
) -> Result<(), String> {
    let stream = js
        .get_stream(streams::INVALIDATIONS)
        .await
        .map_err(|e| e.to_string())?;
    let consumer = stream
        .get_or_create_consumer(
            name,
            pull::Config {
                durable_name: Some(name.to_owned()),
                // A node's first start has nothing cached that older purges could concern.
                deliver_policy: DeliverPolicy::New,
                ack_policy: AckPolicy::Explicit,
                ack_wait: Duration::from_secs(30),
                ..Default::default()
            },
        )
        .await
        .map_err(|e| e.to_string())?;
    let mut messages = consumer
        .stream()
        .heartbeat(Duration::from_secs(5))
        .expires(Duration::from_secs(30))
        .messages()
        .await
        .map_err(|e| e.to_string())?;
    loop {
        let next = tokio::select! {
            _ = stop.cancelled() => return Ok(()),
            m = messages.next() => m,
        };
        let Some(message) = next else {
            return Err("consumer stream ended".into());
        };
        let message = message.map_err(|e| e.to_string())?;
        match serde_json::from_slice::<Invalidation>(&message.payload) {
            Ok(inv) => {
                status.invalidations.inc_by(1);
                if sink.send(inv).await.is_err() {
                    return Ok(());
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "Dropped an invalidation that is not the expected JSON.");
            }
        }
        message.ack().await.map_err(|e| e.to_string())?;
    }
}
