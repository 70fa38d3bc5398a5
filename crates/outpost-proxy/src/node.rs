//! The node's live state: an immutable [`Snapshot`] per config, swapped atomically on reload.
//!
//! Each request loads the current snapshot once and keeps it to the end, so a reload never
//! changes the rules under an in-flight request; the old snapshot (and its health-check tasks)
//! goes away when its last request finishes.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use http::{HeaderName, HeaderValue};
use outpost_cache::{Cache, CacheOutcome, KeyPolicy, RoutePolicy, StorageConfig};
use outpost_config::Config;
use outpost_telemetry::Metrics;
use outpost_telemetry::metrics::{CacheRouteMetrics, RouteMetrics};

use crate::geo::Locator;
use crate::origin::{OriginBuildError, OriginGroup, Origins};
use crate::routing::RouteTable;

/// A route compiled for the request path.
#[derive(Debug)]
pub struct RouteRuntime {
    /// Route name (metric label, access log).
    pub name: String,
    /// Origin group serving it.
    pub group: Arc<OriginGroup>,
    /// Matched prefix, stripped before forwarding when `strip_prefix` is set.
    pub prefix: String,
    /// Whether to strip the prefix.
    pub strip_prefix: bool,
    /// Time allowed for the origin's response head.
    pub timeout: Duration,
    /// Largest request body.
    pub max_body: u64,
    /// Pre-resolved metric handles.
    pub metrics: RouteMetrics,
    /// Caching policy, when the route caches.
    pub cache: Option<RouteCache>,
}

/// A cached route's policy and its cache-status counters.
#[derive(Debug)]
pub struct RouteCache {
    /// RFC 9111 gaps filled by the route's settings, and its key.
    pub policy: Arc<RoutePolicy>,
    /// `outpost_cache_requests_total{route, status}` handles.
    pub metrics: CacheRouteMetrics,
}

fn route_cache(r: &outpost_config::Route, metrics: &Metrics) -> Option<RouteCache> {
    let c = r.cache.as_ref().filter(|c| c.enabled)?;
    let labels = CacheOutcome::ALL.map(CacheOutcome::as_str);
    Some(RouteCache {
        policy: Arc::new(RoutePolicy {
            default_ttl: c.default_ttl,
            override_ttl: c.override_ttl,
            stale_while_revalidate: c.stale_while_revalidate,
            stale_if_error: c.stale_if_error,
            lock_timeout: c.lock_timeout,
            max_object_size: c.max_object_size.as_u64(),
            store_validation_errors: c.store_validation_errors,
            client_directives: c.client_directives,
            key: KeyPolicy {
                // Validation rejects invalid names, so none is dropped here.
                headers: c
                    .key
                    .headers
                    .iter()
                    .filter_map(|h| HeaderName::from_bytes(h.as_bytes()).ok())
                    .collect(),
                cookies: c.key.cookies.clone(),
                ignore_query: c.key.ignore_query.clone(),
                sort_query: c.key.sort_query,
            },
        }),
        metrics: metrics.cache_route(&r.name, &labels),
    })
}

/// The storage settings of a config, with the disk directory resolved against the file.
pub fn storage_config(config: &Config) -> StorageConfig {
    StorageConfig {
        memory_bytes: config.cache.memory_size.as_u64(),
        disk: config
            .cache
            .disk_dir
            .as_ref()
            .map(|d| (config.base_dir.join(d), config.cache.disk_size.as_u64())),
    }
}

/// Everything a request needs, built from one config.
#[derive(Debug)]
pub struct Snapshot {
    /// The config this snapshot was built from.
    pub config: Arc<Config>,
    /// `X-Served-By` value.
    pub node_id: HeaderValue,
    /// `Via` entry for HTTP/1.x hops.
    pub via_h1: HeaderValue,
    /// `Via` entry for HTTP/2 hops.
    pub via_h2: HeaderValue,
    /// Compiled routing table; indexes into `routes`.
    pub table: RouteTable,
    /// Compiled routes in config order.
    pub routes: Vec<RouteRuntime>,
    /// Origin groups with live endpoints.
    pub origins: Origins,
    /// Client location resolution.
    pub locator: Locator,
    /// Metrics for requests that matched no route (label `route="_unmatched"`).
    pub unmatched: RouteMetrics,
}

/// Why a config could not be turned into a snapshot.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// An origin endpoint could not be built.
    #[error(transparent)]
    Origin(#[from] OriginBuildError),
    /// A route names an origin that does not exist (validation should have caught it).
    #[error("route `{route}` names unknown origin `{origin}`")]
    UnknownOrigin {
        /// The route.
        route: String,
        /// The missing origin.
        origin: String,
    },
    /// The node id cannot be a header value.
    #[error("node id `{0}` cannot be sent in a header")]
    NodeId(String),
    /// The cache's disk tier cannot be opened.
    #[error(transparent)]
    Cache(#[from] outpost_cache::disk::DiskError),
}

impl Snapshot {
    fn build(
        config: Config,
        previous: Option<&Snapshot>,
        metrics: &Metrics,
    ) -> Result<Snapshot, BuildError> {
        let origins = Origins::build(&config, previous.map(|p| &p.origins), metrics)?;
        let mut routes = Vec::with_capacity(config.routes.len());
        for r in &config.routes {
            let group = origins
                .group(&r.origin)
                .ok_or_else(|| BuildError::UnknownOrigin {
                    route: r.name.clone(),
                    origin: r.origin.clone(),
                })?
                .clone();
            routes.push(RouteRuntime {
                name: r.name.clone(),
                timeout: r.timeout.unwrap_or(group.response_timeout),
                group,
                prefix: r.path_prefix.clone(),
                strip_prefix: r.strip_prefix,
                max_body: r
                    .max_body_bytes
                    .unwrap_or(config.server.max_body_bytes)
                    .as_u64(),
                metrics: metrics.route(&r.name),
                cache: route_cache(r, metrics),
            });
        }
        let table = RouteTable::new(
            config
                .routes
                .iter()
                .map(|r| (r.host.as_deref(), r.path_prefix.as_str())),
        );
        let id = &config.node.id;
        let header =
            |s: String| HeaderValue::try_from(s).map_err(|_| BuildError::NodeId(id.clone()));
        Ok(Snapshot {
            node_id: header(id.clone())?,
            via_h1: header(format!("1.1 {id}"))?,
            via_h2: header(format!("2 {id}"))?,
            locator: Locator::new(&config.client_location, config.node.location),
            table,
            routes,
            origins,
            unmatched: metrics.route("_unmatched"),
            config: Arc::new(config),
        })
    }
}

/// The node: current snapshot plus what outlives snapshots (metrics, the cache).
pub struct Node {
    current: ArcSwap<Snapshot>,
    metrics: Metrics,
    /// One cache for every route; its storage is sized at start-up and kept across reloads.
    cache: Cache,
    storage: StorageConfig,
    /// Serialises reloads so two SIGHUPs cannot interleave their builds.
    reload_lock: Mutex<()>,
}

impl std::fmt::Debug for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Node").finish_non_exhaustive()
    }
}

impl Node {
    /// Builds the first snapshot; must run inside a Tokio runtime (health checks start).
    pub fn new(config: Config, metrics: Metrics) -> Result<Arc<Node>, BuildError> {
        let storage = storage_config(&config);
        let cache = Cache::new(&storage, &metrics)?;
        let snap = Snapshot::build(config, None, &metrics)?;
        Ok(Arc::new(Node {
            current: ArcSwap::from_pointee(snap),
            metrics,
            cache,
            storage,
            reload_lock: Mutex::new(()),
        }))
    }

    /// Swaps in a new config; on error the current one keeps serving. The caller counts the
    /// attempt (it also sees failures that happen before a config reaches the node).
    pub fn reload(&self, config: Config) -> Result<(), BuildError> {
        let _serial = self.reload_lock.lock();
        let previous = self.current.load_full();
        let storage = storage_config(&config);
        if storage.memory_bytes != self.storage.memory_bytes || storage.disk != self.storage.disk {
            tracing::warn!(
                "The [cache] storage settings changed; they apply at the next restart (routes' cache policies apply now)."
            );
        }
        let snap = Snapshot::build(config, Some(&previous), &self.metrics)?;
        self.current.store(Arc::new(snap));
        Ok(())
    }

    /// The snapshot to use for one request.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.current.load_full()
    }

    /// The node's metrics.
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// The node's HTTP cache (purges, the cache stage).
    pub fn cache(&self) -> &Cache {
        &self.cache
    }
}
