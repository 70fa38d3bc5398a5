//! The node's live state: an immutable [`Snapshot`] per config, swapped atomically on reload.
//!
//! Each request loads the current snapshot once and keeps it to the end, so a reload never
//! changes the rules under an in-flight request; the old snapshot (and its health-check tasks)
//! goes away when its last request finishes.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use http::HeaderValue;
use outpost_config::Config;
use outpost_telemetry::Metrics;
use outpost_telemetry::metrics::RouteMetrics;

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

/// The node: current snapshot plus what outlives snapshots (metrics).
pub struct Node {
    current: ArcSwap<Snapshot>,
    metrics: Metrics,
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
        let snap = Snapshot::build(config, None, &metrics)?;
        Ok(Arc::new(Node {
            current: ArcSwap::from_pointee(snap),
            metrics,
            reload_lock: Mutex::new(()),
        }))
    }

    /// Swaps in a new config; on error the current one keeps serving. The caller counts the
    /// attempt (it also sees failures that happen before a config reaches the node).
    pub fn reload(&self, config: Config) -> Result<(), BuildError> {
        let _serial = self.reload_lock.lock();
        let previous = self.current.load_full();
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
}
