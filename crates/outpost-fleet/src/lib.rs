//! Outpost's fleet backbone: NATS JetStream carries every node's state changes to every other
//! node, keeps them for nodes that are away, and brings the center's cache invalidations.
//!
//! # Layout
//! - [`connect`]: the NATS connection (credentials, token, TLS), started even when the server is
//!   down — a node without NATS keeps serving from its local store and catches up later.
//! - [`streams`]: the three streams and their settings (one source of truth for names).
//! - [`replication`]: the publisher (drains the store's replication log into `OUTPOST_DELTAS`,
//!   confirmed by JetStream before it is forgotten locally), the applier (a durable consumer per
//!   node, so a node that was away resumes where it stopped) and anti-entropy (each replica's
//!   latest full state per object in `OUTPOST_SNAPSHOTS`, read at start and after every
//!   reconnect, which repairs whatever the delta stream no longer holds).
//! - [`invalidate`]: the center's purges (`outpost.invalidate`) handed to the node's cache.
//! - [`functions`]: function versions made active fleet-wide (components in an object store,
//!   the active one per function in a key-value bucket every node watches).
//!
//! Nothing here is a home-made gossip protocol: ordering, retention, redelivery and durability
//! are JetStream's; merges are the CRDTs' (commutative, associative, idempotent), so duplicates
//! and any delivery order are harmless.

pub mod connect;
pub mod functions;
pub mod heartbeat;
pub mod invalidate;
pub mod replication;
pub mod streams;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use outpost_state::Store;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

pub use functions::Activation;
pub use invalidate::Invalidation;

/// Errors that stop the fleet from starting (the node then refuses to start: a bad fleet config
/// is a config error, not something to discover later).
#[derive(Debug, thiserror::Error)]
pub enum FleetError {
    /// A credentials, token or TLS file could not be read.
    #[error("cannot read {path}: {source}")]
    File {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The NATS client refused the options (bad URL, bad credentials file).
    #[error("NATS connection settings: {0}; check [fleet] nats and the credentials")]
    Connect(String),
    /// The local store failed.
    #[error(transparent)]
    Store(#[from] outpost_state::StoreError),
}

/// Everything the fleet needs from the config, resolved (paths absolute, token read).
#[derive(Debug, Clone)]
pub struct FleetOptions {
    /// This node's id (names its durable consumers).
    pub node_id: String,
    /// Server URLs, comma-separated.
    pub servers: String,
    /// NATS credentials file.
    pub credentials_file: Option<PathBuf>,
    /// NATS token.
    pub token: Option<String>,
    /// CA bundle for TLS to NATS.
    pub tls_ca: Option<PathBuf>,
    /// Client certificate and key for TLS to NATS.
    pub tls_client: Option<(PathBuf, PathBuf)>,
    /// JetStream domain of the hub (through a leaf node).
    pub jetstream_domain: Option<String>,
    /// Retention of the delta stream.
    pub delta_retention: Duration,
    /// How often changed objects are re-published in full.
    pub snapshot_interval: Duration,
    /// JetStream replicas of the streams.
    pub stream_replicas: usize,
    /// Whether to consume the center's invalidations.
    pub invalidations: bool,
    /// How often the node puts its heartbeat.
    pub heartbeat_interval: Duration,
}

/// Live counters of the fleet link: the node's `outpost_fleet_*` metrics, also shown by
/// `/state/fleet`.
pub type FleetStatus = outpost_telemetry::FleetMetrics;

/// A JSON view of the fleet link for the admin API.
pub fn status_json(status: &FleetStatus) -> serde_json::Value {
    serde_json::json!({
        "connected": status.connected.get() == 1,
        "published": status.published.get(),
        "backlog": status.backlog.get(),
        "received": status.received.get(),
        "applied": status.applied.get(),
        "invalidations": status.invalidations.get(),
        "anti_entropy_rounds": status.anti_entropy_rounds.get(),
        "snapshots_published": status.snapshots_published.get(),
        "snapshot_rounds": status.snapshot_rounds.get(),
    })
}

/// A running fleet link.
pub struct Fleet {
    /// Counters, shared with the tasks.
    pub status: Arc<FleetStatus>,
    client: async_nats::Client,
    js: async_nats::jetstream::Context,
    node_id: String,
    replicas: usize,
}

impl Fleet {
    /// Connects (in the background if the server is down) and starts replication, anti-entropy,
    /// the watch of function versions (sent to `activations`) and, when enabled, invalidations
    /// (sent to `invalidations`). Everything stops on `stop`.
    pub async fn start(
        options: FleetOptions,
        store: Store,
        metrics: FleetStatus,
        heartbeat: heartbeat::HeartbeatSource,
        invalidations: mpsc::Sender<Invalidation>,
        activations: mpsc::Sender<Activation>,
        stop: CancellationToken,
    ) -> Result<Fleet, FleetError> {
        let status = Arc::new(metrics);
        let (reconnects_tx, reconnects) = tokio::sync::watch::channel(0u64);
        let client = connect::connect(&options, status.clone(), reconnects_tx).await?;
        let js = match &options.jetstream_domain {
            Some(domain) => async_nats::jetstream::with_domain(client.clone(), domain),
            None => async_nats::jetstream::new(client.clone()),
        };
        let link = replication::Link {
            js: js.clone(),
            store,
            status: status.clone(),
            options: options.clone(),
            stop: stop.clone(),
        };
        tokio::spawn(replication::run(link, reconnects.clone()));
        tokio::spawn(heartbeat::run(
            js.clone(),
            options.heartbeat_interval,
            heartbeat,
            stop.clone(),
        ));
        tokio::spawn(functions::watch(
            js.clone(),
            options.stream_replicas,
            activations,
            reconnects.clone(),
            stop.clone(),
        ));
        if options.invalidations {
            tokio::spawn(invalidate::run(
                js.clone(),
                options.node_id.clone(),
                invalidations,
                status.clone(),
                stop,
            ));
        }
        Ok(Fleet {
            status,
            client,
            js,
            node_id: options.node_id.clone(),
            replicas: options.stream_replicas,
        })
    }

    /// Makes `wasm` (hashing to `sha256`) the active version of function `name` on every node:
    /// uploads it unless the fleet has it, then records it as active, stamped with this node.
    pub async fn publish_function(
        &self,
        name: &str,
        sha256: &str,
        wasm: &[u8],
        at_ms: u64,
    ) -> Result<(), String> {
        // Waiting on JetStream requests through a link that is down would hold the deploy
        // for their timeouts (20 s) only to fail the same way.
        if self.status.connected.get() != 1 {
            return Err("the fleet link is down (NATS unreachable)".into());
        }
        let activation = Activation {
            name: name.to_owned(),
            sha256: sha256.to_owned(),
            by: self.node_id.clone(),
            at_ms,
        };
        functions::publish(&self.js, self.replicas, &activation, wasm).await
    }

    /// Downloads a component another node published, up to `limit` bytes.
    pub async fn fetch_function(&self, sha256: &str, limit: usize) -> Result<Vec<u8>, String> {
        functions::fetch(&self.js, self.replicas, sha256, limit).await
    }

    /// This node's id, as its activations carry it.
    pub fn node_id(&self) -> &str {
        &self.node_id
    }

    /// JetStream on the fleet connection (heartbeats, analytics summaries).
    pub fn jetstream(&self) -> async_nats::jetstream::Context {
        self.js.clone()
    }

    /// Every live heartbeat of the fleet.
    pub async fn heartbeats(&self) -> Result<Vec<heartbeat::Heartbeat>, String> {
        heartbeat::read_all(&self.js).await
    }

    /// Flushes what the client has buffered (best effort, on shutdown).
    pub async fn close(&self) {
        let _ = tokio::time::timeout(Duration::from_secs(2), self.client.flush()).await;
    }
}

/// A name usable as a JetStream consumer name (no dots, spaces or wildcards).
pub(crate) fn consumer_name(prefix: &str, node_id: &str) -> String {
    let clean: String = node_id
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect();
    format!("{prefix}-{clean}")
}

/// Runs `session` again and again until `stop` (or until `done()` says nobody listens any
/// more): a consumer or watch that ends or fails is resumed after a backoff, and its error is
/// logged (`what` names it) on the first failure and every 20th after.
pub(crate) async fn resume<F, Fut>(
    what: &'static str,
    stop: &CancellationToken,
    done: impl Fn() -> bool,
    mut session: F,
) where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<(), String>>,
{
    let mut attempt = 0u32;
    loop {
        let result = session().await;
        if stop.is_cancelled() || done() {
            return;
        }
        attempt += 1;
        if let Err(e) = result
            && (attempt == 1 || attempt.is_multiple_of(20))
        {
            tracing::warn!(error = %e, "{what} interrupted; resuming.");
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(backoff(attempt.min(4))) => {}
        }
    }
}

/// Opens the key-value bucket `config.bucket`, creating it with `config` when it does not exist
/// yet (the first node of a fleet creates what the others then find).
pub(crate) async fn open_kv(
    js: &async_nats::jetstream::Context,
    config: async_nats::jetstream::kv::Config,
) -> Result<async_nats::jetstream::kv::Store, String> {
    match js.get_key_value(config.bucket.as_str()).await {
        Ok(store) => Ok(store),
        Err(_) => {
            let bucket = config.bucket.clone();
            js.create_key_value(config)
                .await
                .map_err(|e| format!("cannot open the key-value bucket {bucket}: {e}"))
        }
    }
}

/// Exponential backoff with full jitter, capped, for reconnect-style retries.
pub(crate) fn backoff(attempt: u32) -> Duration {
    let cap = Duration::from_secs(5);
    let base = Duration::from_millis(100).saturating_mul(1 << attempt.min(6));
    let max = base.min(cap);
    Duration::from_millis(fastrand::u64(
        max.as_millis() as u64 / 2..=max.as_millis() as u64,
    ))
}
