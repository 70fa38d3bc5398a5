//! Moving state between nodes: publish local changes, apply everyone else's, and anti-entropy.

use std::sync::Arc;
use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::jetstream::consumer::{AckPolicy, DeliverPolicy, pull};
use async_nats::jetstream::{self, Context};
use futures_util::StreamExt;
use outpost_state::{Batch, Change, Store};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::{FleetOptions, FleetStatus, backoff, consumer_name, streams};

/// Largest batch of changes in one message (NATS' default max_payload is 1 MiB).
const MAX_MESSAGE: usize = 256 * 1024;

/// What the replication tasks share.
#[derive(Clone)]
pub struct Link {
    /// JetStream on the fleet connection.
    pub js: Context,
    /// The node's store.
    pub store: Store,
    /// Counters.
    pub status: Arc<FleetStatus>,
    /// Settings.
    pub options: FleetOptions,
    /// Ends every task.
    pub stop: CancellationToken,
}

/// Runs replication until `link.stop`: streams are ensured, then publisher, applier and
/// anti-entropy run side by side, each retrying on its own when the link drops.
pub async fn run(link: Link, reconnects: watch::Receiver<u64>) {
    let mut attempt = 0u32;
    loop {
        match ensure_streams(&link).await {
            Ok(()) => break,
            Err(e) => {
                if attempt.is_multiple_of(10) {
                    tracing::warn!(error = %e, "Cannot set up the fleet's JetStream streams yet; retrying.");
                }
                attempt += 1;
                tokio::select! {
                    _ = link.stop.cancelled() => return,
                    _ = tokio::time::sleep(backoff(attempt)) => {}
                }
            }
        }
    }
    if let Err(e) = link.store.mark_all_dirty() {
        tracing::error!(error = %e, "Cannot list local state for the first snapshot round.");
    }
    let publisher = tokio::spawn(publish_loop(link.clone()));
    let applier = tokio::spawn(apply_loop(link.clone()));
    let entropy = tokio::spawn(anti_entropy_loop(link.clone(), reconnects));
    let _ = tokio::join!(publisher, applier, entropy);
}

async fn ensure_streams(link: &Link) -> Result<(), String> {
    let r = link.options.stream_replicas;
    for config in [
        streams::deltas(link.options.delta_retention, r),
        streams::snapshots(r),
        streams::invalidations(r),
    ] {
        let name = config.name.clone();
        link.js
            .get_or_create_stream(config)
            .await
            .map_err(|e| format!("stream {name}: {e}"))?;
    }
    Ok(())
}

/// Drains the store's replication log into the delta stream. A change leaves the log only once
/// JetStream has acknowledged it (so it is stored, on as many replicas as configured); a crash
/// in between re-sends it, which merges harmlessly.
async fn publish_loop(link: Link) {
    let replica = link.store.replica().to_string();
    let subject = streams::delta_subject(&replica);
    let mut attempt = 0u32;
    let mut after = link.store.published_upto().unwrap_or(0);
    loop {
        let pending = match link.store.unpublished(after, MAX_MESSAGE) {
            Ok(p) => p,
            Err(e) => {
                tracing::error!(error = %e, "Cannot read the replication log.");
                Vec::new()
            }
        };
        if pending.is_empty() {
            link.status.backlog.set(0);
            tokio::select! {
                _ = link.stop.cancelled() => return,
                _ = link.store.logged() => {}
                // A wake-up may slip between the read and the wait; poll now and then too.
                _ = tokio::time::sleep(Duration::from_millis(500)) => {}
            }
            continue;
        }
        let first = pending[0].0;
        let last = pending[pending.len() - 1].0;
        let batch = Batch {
            origin: link.store.replica(),
            changes: pending.into_iter().map(|(_, c)| c).collect(),
        };
        let count = batch.changes.len() as u64;
        let mut headers = HeaderMap::new();
        headers.insert("Nats-Msg-Id", format!("{replica}-{first}-{last}").as_str());
        let sent = async {
            let ack = link
                .js
                .publish_with_headers(subject.clone(), headers, batch.encode().into())
                .await
                .map_err(|e| e.to_string())?;
            tokio::time::timeout(Duration::from_secs(5), ack)
                .await
                .map_err(|_| "no acknowledgement within 5 s".to_owned())?
                .map_err(|e| e.to_string())
        }
        .await;
        match sent {
            Ok(_) => {
                attempt = 0;
                after = last;
                link.status.published.inc_by(count);
                if let Err(e) = link.store.mark_published(last).await {
                    tracing::error!(error = %e, "Cannot record published changes; they will be re-sent.");
                }
            }
            Err(e) => {
                attempt += 1;
                if let Ok(n) = link.store.unpublished_count() {
                    link.status.backlog.set(n as i64);
                }
                if attempt == 1 || attempt.is_multiple_of(20) {
                    tracing::warn!(error = %e, queued_from = first, "Cannot publish changes to the fleet yet; they stay queued.");
                }
                tokio::select! {
                    _ = link.stop.cancelled() => return,
                    _ = tokio::time::sleep(backoff(attempt)) => {}
                }
            }
        }
    }
}

/// Applies other nodes' changes from a durable consumer named after this node: after a
/// disconnection or restart it resumes where it stopped.
async fn apply_loop(link: Link) {
    let name = consumer_name("deltas", &link.options.node_id);
    crate::resume(
        "Fleet delta consumer",
        &link.stop,
        || false,
        || consume_deltas(&link, &name),
    )
    .await;
}

async fn consume_deltas(link: &Link, name: &str) -> Result<(), String> {
    let stream = link
        .js
        .get_stream(streams::DELTAS)
        .await
        .map_err(|e| e.to_string())?;
    let consumer: jetstream::consumer::Consumer<pull::Config> = stream
        .get_or_create_consumer(
            name,
            pull::Config {
                durable_name: Some(name.to_owned()),
                description: Some(format!("Outpost node {}", link.options.node_id)),
                deliver_policy: DeliverPolicy::All,
                ack_policy: AckPolicy::Explicit,
                ack_wait: Duration::from_secs(30),
                max_ack_pending: 10_000,
                ..Default::default()
            },
        )
        .await
        .map_err(|e| e.to_string())?;
    let mut messages = consumer
        .stream()
        .max_messages_per_batch(256)
        .heartbeat(Duration::from_secs(5))
        .expires(Duration::from_secs(30))
        .messages()
        .await
        .map_err(|e| e.to_string())?;
    let own = link.store.replica();
    loop {
        let next = tokio::select! {
            _ = link.stop.cancelled() => return Ok(()),
            m = messages.next() => m,
        };
        let Some(message) = next else {
            return Err("consumer stream ended".into());
        };
        let message = message.map_err(|e| e.to_string())?;
        match Batch::decode(&message.payload) {
            Ok(batch) if batch.origin == own => {}
            Ok(batch) => {
                let n = batch.changes.len() as u64;
                let applied = link
                    .store
                    .apply_remote(batch.changes)
                    .await
                    .map_err(|e| e.to_string())?;
                link.status.received.inc_by(n);
                link.status.applied.inc_by(applied as u64);
            }
            Err(e) => {
                tracing::warn!(subject = %message.subject, error = %e, "Dropped an undecodable fleet message.");
            }
        }
        message.ack().await.map_err(|e| e.to_string())?;
    }
}

/// Anti-entropy: read every replica's snapshots at start and after every reconnect, and
/// publish this replica's changed objects every `snapshot_interval`.
async fn anti_entropy_loop(link: Link, mut reconnects: watch::Receiver<u64>) {
    let mut read_needed = true;
    let mut ticker = tokio::time::interval(link.options.snapshot_interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut attempt = 0u32;
    loop {
        if read_needed {
            match read_snapshots(&link).await {
                Ok(applied) => {
                    read_needed = false;
                    attempt = 0;
                    link.status.anti_entropy_rounds.inc_by(1);
                    if applied > 0 {
                        tracing::info!(
                            applied,
                            "Anti-entropy repaired state from fleet snapshots."
                        );
                    }
                }
                Err(e) => {
                    attempt += 1;
                    if attempt == 1 || attempt.is_multiple_of(20) {
                        tracing::warn!(error = %e, "Cannot read fleet snapshots yet; retrying.");
                    }
                }
            }
        }
        tokio::select! {
            _ = link.stop.cancelled() => return,
            changed = reconnects.changed() => {
                if changed.is_err() {
                    return;
                }
                read_needed = true;
            }
            _ = ticker.tick() => {
                publish_snapshots(&link).await;
                link.status.snapshot_rounds.inc_by(1);
            }
            _ = tokio::time::sleep(backoff(attempt)), if read_needed => {}
        }
    }
}

/// Reads the whole snapshot stream once and merges other replicas' states; returns how many
/// changes altered anything here.
async fn read_snapshots(link: &Link) -> Result<usize, String> {
    let stream = link
        .js
        .get_stream(streams::SNAPSHOTS)
        .await
        .map_err(|e| e.to_string())?;
    let consumer = stream
        .create_consumer(pull::Config {
            deliver_policy: DeliverPolicy::All,
            ack_policy: AckPolicy::None,
            inactive_threshold: Duration::from_secs(60),
            ..Default::default()
        })
        .await
        .map_err(|e| e.to_string())?;
    let own = link.store.replica();
    let mut applied = 0;
    loop {
        let mut batch = consumer
            .fetch()
            .max_messages(256)
            .messages()
            .await
            .map_err(|e| e.to_string())?;
        let mut seen = 0;
        while let Some(message) = batch.next().await {
            let message = message.map_err(|e| e.to_string())?;
            seen += 1;
            match Batch::decode(&message.payload) {
                Ok(b) if b.origin == own => {}
                Ok(b) => {
                    applied += link
                        .store
                        .apply_remote(b.changes)
                        .await
                        .map_err(|e| e.to_string())?;
                }
                Err(e) => {
                    tracing::warn!(subject = %message.subject, error = %e, "Dropped an undecodable snapshot.");
                }
            }
        }
        if seen == 0 {
            return Ok(applied);
        }
    }
}

/// Publishes the full state of every object and KV bucket changed since the last round; what
/// cannot be published stays dirty for the next round.
async fn publish_snapshots(link: &Link) {
    let dirty = link.store.take_dirty();
    if dirty.objects.is_empty() && dirty.kv_buckets.is_empty() {
        return;
    }
    let replica = link.store.replica();
    let rs = replica.to_string();
    let mut failed = outpost_state::Dirty::default();
    for name in &dirty.objects {
        let Some(obj) = link.store.object(name) else {
            continue;
        };
        let batch = Batch {
            origin: replica,
            changes: vec![Change::Crdt {
                name: name.clone(),
                delta: (*obj).clone(),
            }],
        };
        let subject = streams::object_snapshot_subject(&rs, name);
        if publish_confirmed(&link.js, subject, batch.encode())
            .await
            .is_err()
        {
            failed.objects.insert(name.clone());
        } else {
            link.status.snapshots_published.inc_by(1);
        }
    }
    for &bucket in &dirty.kv_buckets {
        let rows = match link.store.kv_bucket(bucket) {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(error = %e, bucket, "Cannot read a KV bucket for its snapshot.");
                failed.kv_buckets.insert(bucket);
                continue;
            }
        };
        let batch = Batch {
            origin: replica,
            changes: rows.into_iter().map(Change::Kv).collect(),
        };
        let subject = streams::kv_snapshot_subject(&rs, bucket);
        if publish_confirmed(&link.js, subject, batch.encode())
            .await
            .is_err()
        {
            failed.kv_buckets.insert(bucket);
        } else {
            link.status.snapshots_published.inc_by(1);
        }
    }
    if !failed.objects.is_empty() || !failed.kv_buckets.is_empty() {
        link.store.restore_dirty(failed);
    }
}

async fn publish_confirmed(js: &Context, subject: String, payload: Vec<u8>) -> Result<(), String> {
    let len = payload.len();
    let ack = js
        .publish(subject.clone(), payload.into())
        .await
        .map_err(|e| e.to_string())?;
    match tokio::time::timeout(Duration::from_secs(5), ack).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => {
            tracing::warn!(subject, bytes = len, error = %e, "Snapshot not stored; retrying next round.");
            Err(e.to_string())
        }
        Err(_) => Err("no acknowledgement".into()),
    }
}
