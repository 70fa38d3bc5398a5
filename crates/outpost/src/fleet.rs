//! Wiring the local store and the fleet link into a running node.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use outpost_config::Config;
use outpost_fleet::{Fleet, FleetOptions, Invalidation};
use outpost_proxy::Node;
use outpost_state::{Store, StoreOptions};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// Opens the node's store under `[node] data_dir` (blocking work, off the async threads).
pub async fn open_store(config: &Config) -> anyhow::Result<Store> {
    let mut options = StoreOptions::new(config.base_dir.join(&config.node.data_dir));
    options.replicate = config.fleet.is_some();
    options.tombstone_ttl = config.state.tombstone_ttl;
    options.max_value_bytes = config.state.max_value_size.as_u64() as usize;
    let dir = options.dir.clone();
    tokio::task::spawn_blocking(move || Store::open(options))
        .await
        .context("the store opener panicked")?
        .with_context(|| format!("cannot open the local store in {}", dir.display()))
}

/// Sweeps expired keys every `[state] sweep_interval` until `stop`.
pub fn spawn_sweeper(store: Store, every: Duration, stop: CancellationToken) {
    tokio::spawn(async move {
        let mut ticker = tokio::time::interval(every);
        ticker.tick().await;
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = ticker.tick() => {}
            }
            match store.sweep().await {
                Ok(s) if s.expired > 0 || s.forgotten > 0 => {
                    tracing::debug!(
                        expired = s.expired,
                        forgotten = s.forgotten,
                        "Swept the local store."
                    );
                }
                Ok(_) => {}
                Err(e) => tracing::error!(error = %e, "Sweeping the local store failed."),
            }
        }
    });
}

/// The fleet settings of `config`, with files resolved and the token read.
pub fn options(config: &Config) -> anyhow::Result<Option<FleetOptions>> {
    let Some(f) = &config.fleet else {
        return Ok(None);
    };
    let token = match &f.token_file {
        Some(file) => {
            let path = config.base_dir.join(file);
            let text = std::fs::read_to_string(&path)
                .with_context(|| format!("cannot read [fleet] token_file {}", path.display()))?;
            Some(text.lines().next().unwrap_or("").trim().to_owned())
        }
        None => None,
    };
    let tls = f.tls.as_ref();
    Ok(Some(FleetOptions {
        node_id: config.node.id.clone(),
        servers: f.nats.clone(),
        credentials_file: f.credentials_file.as_ref().map(|p| config.base_dir.join(p)),
        token,
        tls_ca: tls
            .and_then(|t| t.ca_file.as_ref())
            .map(|p| config.base_dir.join(p)),
        tls_client: tls.and_then(|t| match (&t.client_cert, &t.client_key) {
            (Some(c), Some(k)) => Some((config.base_dir.join(c), config.base_dir.join(k))),
            _ => None,
        }),
        jetstream_domain: f.jetstream_domain.clone(),
        delta_retention: f.delta_retention,
        snapshot_interval: f.snapshot_interval,
        stream_replicas: f.stream_replicas,
        invalidations: f.invalidations,
    }))
}

/// Starts the fleet link (when configured) and the task that applies the center's
/// invalidations to the node's cache.
pub async fn start(
    config: &Config,
    store: Store,
    node: Arc<Node>,
    stop: CancellationToken,
) -> anyhow::Result<Option<Fleet>> {
    let Some(options) = options(config)? else {
        return Ok(None);
    };
    let (tx, rx) = mpsc::channel(1024);
    let fleet = Fleet::start(options, store, node.metrics().fleet(), tx, stop)
        .await
        .context("cannot start the fleet link")?;
    tokio::spawn(apply_invalidations(rx, node));
    Ok(Some(fleet))
}

async fn apply_invalidations(mut rx: mpsc::Receiver<Invalidation>, node: Arc<Node>) {
    use outpost_cache::PurgeTarget;
    while let Some(inv) = rx.recv().await {
        let started = Instant::now();
        let cache = node.cache();
        let mut purged = 0;
        let targets = inv
            .urls
            .iter()
            .map(|u| PurgeTarget::Url(u.clone()))
            .chain(inv.prefixes.iter().map(|p| PurgeTarget::Prefix(p.clone())))
            .chain(inv.tags.iter().map(|t| PurgeTarget::Tag(t.clone())));
        for target in targets {
            purged += cache.purge(&target, inv.soft).await;
        }
        let lag_ms = inv
            .at
            .map(|at| outpost_state::store::now_ms() as f64 - at)
            .filter(|l| *l >= 0.0);
        tracing::info!(
            source = inv.source.as_deref().unwrap_or(""),
            urls = inv.urls.len(),
            prefixes = inv.prefixes.len(),
            tags = inv.tags.len(),
            soft = inv.soft,
            purged,
            propagation_ms = lag_ms,
            apply_us = started.elapsed().as_micros() as u64,
            "Applied a fleet invalidation."
        );
    }
}
