//! Wiring the local store and the fleet link into a running node.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use outpost_config::Config;
use outpost_fleet::heartbeat::{HealthRules, Heartbeat, HeartbeatSource};
use outpost_fleet::{Activation, Fleet, FleetOptions, Invalidation};
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
        heartbeat_interval: f.heartbeat_interval,
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
    let (activations_tx, activations) = mpsc::channel(64);
    let beat = heartbeat_source(config, node.clone(), store.clone());
    let replicas = options.stream_replicas;
    let fleet = Fleet::start(
        options,
        store,
        node.metrics().fleet(),
        beat,
        tx,
        activations_tx,
        stop,
    )
    .await
    .context("cannot start the fleet link")?;
    tokio::spawn(apply_invalidations(rx, node.clone()));
    tokio::spawn(apply_activations(
        activations,
        node,
        fleet.jetstream(),
        replicas,
        config.node.id.clone(),
    ));
    Ok(Some(fleet))
}

/// Switches this node's functions to the versions the fleet made active (one at a time, in
/// the order JetStream delivers them).
async fn apply_activations(
    mut rx: mpsc::Receiver<Activation>,
    node: Arc<Node>,
    js: async_nats::jetstream::Context,
    replicas: usize,
    node_id: String,
) {
    while let Some(a) = rx.recv().await {
        let Some(functions) = node.functions() else {
            tracing::debug!(function = %a.name, "A fleet function version for a node without functions; ignored.");
            continue;
        };
        if functions.get(&a.name).is_none() {
            tracing::debug!(function = %a.name, "A fleet function version for a function this node does not declare; ignored.");
            continue;
        }
        match adopt(functions, &a, &js, replicas, &node_id).await {
            Ok(Some(version)) => tracing::info!(
                function = %a.name,
                version,
                sha256 = %a.sha256,
                by = %a.by,
                "Function version made active by the fleet."
            ),
            Ok(None) => {}
            Err(e) => tracing::warn!(
                function = %a.name,
                sha256 = %a.sha256,
                by = %a.by,
                error = %e,
                "Cannot switch to the fleet's function version; the local one keeps serving."
            ),
        }
    }
}

/// Makes `a` active here; `None` when there was nothing to do: already active, or the active
/// version is one deployed on this node's own admin API after `a` was made. That is a deploy
/// the fleet did not hear of (the link was down): it is kept, and published now, so that the
/// latest deploy wins everywhere. Versions from the config or from the fleet give way: a node
/// that joins runs what the fleet runs.
async fn adopt(
    functions: &outpost_functions::Functions,
    a: &Activation,
    js: &async_nats::jetstream::Context,
    replicas: usize,
    node_id: &str,
) -> Result<Option<u32>, String> {
    if let Some(active) = functions.active_version(&a.name).await {
        if active.sha256 == a.sha256 {
            return Ok(None);
        }
        if active.source == "api" && active.deployed_ms > a.at_ms {
            let wasm = functions
                .component(&active.sha256)
                .map_err(|e| e.to_string())?;
            let mine = Activation {
                name: a.name.clone(),
                sha256: active.sha256.clone(),
                by: node_id.to_owned(),
                at_ms: active.deployed_ms,
            };
            outpost_fleet::functions::publish(js, replicas, &mine, &wasm).await?;
            tracing::info!(
                function = %a.name,
                local_version = active.version,
                sha256 = %active.sha256,
                replaced = %a.sha256,
                "This node's function version, deployed while the fleet link was down, is newer than the fleet's: published."
            );
            return Ok(None);
        }
    }
    let info = match functions.version_of(&a.name, &a.sha256).await {
        Some(version) => functions.rollback(&a.name, Some(version)).await,
        None => {
            let wasm = outpost_fleet::functions::fetch(
                js,
                replicas,
                &a.sha256,
                outpost_functions::MAX_COMPONENT_BYTES,
            )
            .await?;
            functions.adopt(&a.name, &a.sha256, wasm).await
        }
    }
    .map_err(|e| e.to_string())?;
    Ok(Some(info.version))
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

/// Builds this node's heartbeat from its metrics' health window, its outbox and its link.
fn heartbeat_source(config: &Config, node: Arc<Node>, store: Store) -> HeartbeatSource {
    let id = config.node.id.clone();
    let region = config.node.region.clone();
    let window = config
        .fleet
        .as_ref()
        .map_or(300, |f| f.health_window.as_secs().max(1));
    let started = Instant::now();
    Arc::new(move || {
        let health = node.metrics().health().summary(window);
        let depth: u64 = store.outbox_depths().values().map(|d| d.entries).sum();
        let now = outpost_state::store::now_ms();
        let oldest = store
            .outbox_oldest()
            .ok()
            .flatten()
            .map_or(0.0, |c| now.saturating_sub(c) as f64 / 1000.0);
        Heartbeat {
            id: id.clone(),
            region: region.clone(),
            version: crate::serve::VERSION.to_owned(),
            uptime_s: started.elapsed().as_secs(),
            window_s: window,
            requests: health.requests,
            request_rate: health.request_rate,
            error_rate: health.error_rate,
            p99_ms: health.p99_ms,
            cache_hit_ratio: health.cache_hit_ratio,
            outbox_depth: depth,
            outbox_oldest_age_s: oldest,
            replication_backlog: node.metrics().fleet().backlog.get(),
            updated_at_ms: now,
        }
    })
}

/// The health rules of a config's `[fleet]` (defaults without one).
pub fn health_rules(config: &Config) -> HealthRules {
    let (interval, error_rate, p99) = config.fleet.as_ref().map_or(
        (Duration::from_secs(5), 0.01, Duration::from_millis(200)),
        |f| {
            (
                f.heartbeat_interval,
                f.unhealthy_error_rate,
                f.unhealthy_p99,
            )
        },
    );
    HealthRules {
        max_error_rate: error_rate,
        max_p99_ms: p99.as_secs_f64() * 1000.0,
        stale_after_ms: (interval * 3).as_millis() as u64,
    }
}

/// How `outpost fleet status` prints.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum StatusFormat {
    /// A table for people.
    Table,
    /// JSON for scripts.
    Json,
}

/// `outpost fleet status`: reads every heartbeat through NATS and prints the verdicts.
pub fn status_command(path: &std::path::Path, format: StatusFormat) -> anyhow::Result<String> {
    let config = match Config::load(path) {
        Ok(c) => c,
        Err(outpost_config::ConfigError::Invalid(d)) => {
            return Err(anyhow::anyhow!("{}", d.render().trim_end()));
        }
        Err(e) => return Err(e.into()),
    };
    let Some(opts) = options(&config)? else {
        anyhow::bail!(
            "{} has no [fleet] section: a node without a fleet has no fleet status",
            path.display()
        );
    };
    let rules = health_rules(&config);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(async move {
        let client = tokio::time::timeout(
            Duration::from_secs(5),
            outpost_fleet::connect::connect_once(&opts),
        )
        .await
        .map_err(|_| anyhow::anyhow!("no answer from NATS at {} within 5 s", opts.servers))??;
        let js = match &opts.jetstream_domain {
            Some(d) => async_nats::jetstream::with_domain(client, d),
            None => async_nats::jetstream::new(client),
        };
        let beats = outpost_fleet::heartbeat::read_all(&js)
            .await
            .map_err(|e| anyhow::anyhow!(e))?;
        let now = outpost_state::store::now_ms();
        Ok(match format {
            StatusFormat::Table => outpost_fleet::heartbeat::table(&beats, &rules, now),
            StatusFormat::Json => {
                format!(
                    "{:#}\n",
                    outpost_fleet::heartbeat::json(&beats, &rules, now)
                )
            }
        })
    })
}
