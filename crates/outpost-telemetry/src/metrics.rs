//! Metric definitions. Names follow `outpost_<noun>_<unit>[_total]`; label values are bounded.
//!
//! The request path never formats label sets per request: it resolves per-route and
//! per-endpoint handles once (when a config is loaded) and increments those.

use std::sync::Arc;

use std::fmt::Write as _;

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// Latency buckets in seconds, 0.5 ms to 30 s: edge hits live at the bottom, slow origins at
/// the top.
const LATENCY_BUCKETS: [f64; 16] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0,
    30.0,
];

/// HTTP status class: five values, so a label that can never explode.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq)]
pub enum StatusClass {
    /// 1xx
    Informational,
    /// 2xx
    Success,
    /// 3xx
    Redirection,
    /// 4xx
    ClientError,
    /// 5xx
    ServerError,
}

impl StatusClass {
    /// Classifies a numeric status code.
    pub fn of(status: u16) -> StatusClass {
        match status {
            100..=199 => StatusClass::Informational,
            200..=299 => StatusClass::Success,
            300..=399 => StatusClass::Redirection,
            400..=499 => StatusClass::ClientError,
            _ => StatusClass::ServerError,
        }
    }

    fn index(self) -> usize {
        self as usize
    }

    /// The label value (`2xx` …).
    pub fn as_str(self) -> &'static str {
        ["1xx", "2xx", "3xx", "4xx", "5xx"][self.index()]
    }
}

impl EncodeLabelValue for StatusClass {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        encoder.write_str(self.as_str())
    }
}

impl EncodeLabelValue for OriginOutcome {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        encoder.write_str(self.as_str())
    }
}

/// How one attempt to reach an origin endpoint ended.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq)]
pub enum OriginOutcome {
    /// A response head arrived (any status).
    Response,
    /// The TCP connection could not be opened.
    ConnectError,
    /// No response head within the response timeout.
    Timeout,
    /// The connection broke or the exchange failed otherwise.
    Error,
}

impl OriginOutcome {
    /// The label and log value.
    pub fn as_str(self) -> &'static str {
        match self {
            OriginOutcome::Response => "response",
            OriginOutcome::ConnectError => "connect_error",
            OriginOutcome::Timeout => "timeout",
            OriginOutcome::Error => "error",
        }
    }
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteStatusLabels {
    route: String,
    status_class: StatusClass,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteLabels {
    route: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EndpointLabels {
    origin: String,
    endpoint: String,
    region: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EndpointOutcomeLabels {
    origin: String,
    endpoint: String,
    outcome: OriginOutcome,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabels {
    result: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DirectionLabels {
    direction: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CacheStatusLabels {
    route: String,
    status: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TierLabels {
    tier: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabels {
    kind: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VersionLabels {
    version: String,
}

fn latency_histogram() -> Histogram {
    Histogram::new(LATENCY_BUCKETS)
}

/// The node's metrics registry and families; cheap to clone (all `Arc`s inside).
#[derive(Clone)]
pub struct Metrics {
    registry: Arc<Registry>,
    requests: Family<RouteStatusLabels, Counter>,
    request_duration: Family<RouteLabels, Histogram, fn() -> Histogram>,
    origin_requests: Family<EndpointOutcomeLabels, Counter>,
    origin_duration: Family<EndpointLabels, Histogram, fn() -> Histogram>,
    endpoint_healthy: Family<EndpointLabels, Gauge>,
    active_connections: Gauge,
    connections: Counter,
    websockets_open: Gauge,
    websocket_bytes_to_origin: Counter,
    websocket_bytes_to_client: Counter,
    config_reloads: Family<ResultLabels, Counter>,
    cache_requests: Family<CacheStatusLabels, Counter>,
    cache_bytes: Family<TierLabels, Gauge>,
    cache_objects: Family<TierLabels, Gauge>,
    cache_evictions: Family<TierLabels, Counter>,
    cache_purges: Family<KindLabels, Counter>,
    guard_rejections: Family<ReasonLabels, Counter>,
    fleet: FleetMetrics,
    outbox_depth: Family<RouteLabels, Gauge>,
    outbox_bytes: Family<RouteLabels, Gauge>,
    outbox_oldest: Gauge<f64, std::sync::atomic::AtomicU64>,
    outbox_events: Family<OutboxLabels, Counter>,
    health: Arc<crate::health::HealthWindow>,
    analytics_events: Family<ResultLabels, Counter>,
    analytics_summaries: Family<ResultLabels, Counter>,
    analytics_pending: Gauge,
    function_calls: Family<FunctionOutcomeLabels, Counter>,
    function_duration: Family<FunctionOutcomeLabels, Histogram, fn() -> Histogram>,
    function_instantiate: Family<FunctionLabels, Histogram, fn() -> Histogram>,
    function_deploys: Family<FunctionResultLabels, Counter>,
    /// Last running totals reported by the analytics shipper (to add only the difference).
    analytics_seen: Arc<std::sync::Mutex<[u64; 4]>>,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FunctionOutcomeLabels {
    function: String,
    outcome: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FunctionLabels {
    function: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FunctionResultLabels {
    function: String,
    result: &'static str,
}

/// Instantiation takes microseconds; the request buckets would put every sample in the first.
fn instantiate_histogram() -> Histogram {
    Histogram::new([
        5e-6, 10e-6, 20e-6, 50e-6, 100e-6, 250e-6, 500e-6, 1e-3, 2.5e-3, 5e-3, 10e-3, 25e-3,
    ])
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutboxLabels {
    route: String,
    event: &'static str,
}

/// What happened to an outbox entry (the `event` label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutboxEvent {
    /// Kept (client got 202).
    Queued,
    /// Refused: the queue was full (507).
    Rejected,
    /// The center took it.
    Delivered,
    /// An attempt did not deliver it; another will follow.
    Retried,
    /// The center refused it for good.
    Failed,
}

impl OutboxEvent {
    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            OutboxEvent::Queued => "queued",
            OutboxEvent::Rejected => "rejected",
            OutboxEvent::Delivered => "delivered",
            OutboxEvent::Retried => "retried",
            OutboxEvent::Failed => "failed",
        }
    }
}

/// The fleet link's health and traffic, shared by `/metrics` and the admin `/state/fleet` view
/// (one source of truth: the admin view reads these).
#[derive(Debug, Clone, Default)]
pub struct FleetMetrics {
    /// 1 while the NATS connection is up.
    pub connected: Gauge,
    /// Local changes confirmed by JetStream.
    pub published: Counter,
    /// Local changes waiting for the fleet (the replication log's length).
    pub backlog: Gauge,
    /// Changes received from other nodes (duplicates and no-ops included).
    pub received: Counter,
    /// Received changes that altered local state.
    pub applied: Counter,
    /// Center invalidations applied to the cache.
    pub invalidations: Counter,
    /// Full-state snapshots published for anti-entropy.
    pub snapshots_published: Counter,
    /// Snapshot rounds finished.
    pub snapshot_rounds: Counter,
    /// Times the snapshot stream was read to its end (start and every reconnect).
    pub anti_entropy_rounds: Counter,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    route: String,
    reason: &'static str,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

impl Metrics {
    /// Creates and registers every metric family of the node.
    pub fn new(version: &str) -> Metrics {
        let mut registry = Registry::with_prefix("outpost");
        let requests = Family::<RouteStatusLabels, Counter>::default();
        registry.register(
            "http_requests",
            "Requests answered, by route and status class",
            requests.clone(),
        );
        let request_duration: Family<RouteLabels, Histogram, fn() -> Histogram> =
            Family::new_with_constructor(latency_histogram);
        registry.register_with_unit(
            "http_request_duration",
            "Time from request head received to response body finished",
            prometheus_client::registry::Unit::Seconds,
            request_duration.clone(),
        );
        let origin_requests = Family::<EndpointOutcomeLabels, Counter>::default();
        registry.register(
            "origin_requests",
            "Attempts to reach an origin endpoint, by outcome",
            origin_requests.clone(),
        );
        let origin_duration: Family<EndpointLabels, Histogram, fn() -> Histogram> =
            Family::new_with_constructor(latency_histogram);
        registry.register_with_unit(
            "origin_response_duration",
            "Time from sending a request to an origin to receiving its response head",
            prometheus_client::registry::Unit::Seconds,
            origin_duration.clone(),
        );
        let endpoint_healthy = Family::<EndpointLabels, Gauge>::default();
        registry.register(
            "origin_endpoint_healthy",
            "1 when the endpoint takes traffic (health checks pass, not ejected), else 0",
            endpoint_healthy.clone(),
        );
        let active_connections = Gauge::default();
        registry.register(
            "http_active_connections",
            "Client connections currently open",
            active_connections.clone(),
        );
        let connections = Counter::default();
        registry.register(
            "http_connections",
            "Client connections accepted",
            connections.clone(),
        );
        let websockets_open = Gauge::default();
        registry.register(
            "http_websockets_open",
            "WebSockets carried now (client connections switched after an origin's 101)",
            websockets_open.clone(),
        );
        let websocket_bytes = Family::<DirectionLabels, Counter>::default();
        registry.register(
            "http_websocket_bytes",
            "Bytes carried through WebSockets, by direction (to_origin, to_client), counted when each closes",
            websocket_bytes.clone(),
        );
        let websocket_bytes_to_origin = websocket_bytes
            .get_or_create(&DirectionLabels {
                direction: "to_origin",
            })
            .clone();
        let websocket_bytes_to_client = websocket_bytes
            .get_or_create(&DirectionLabels {
                direction: "to_client",
            })
            .clone();
        let config_reloads = Family::<ResultLabels, Counter>::default();
        registry.register(
            "config_reloads",
            "Configuration reloads, by result (ok or rejected)",
            config_reloads.clone(),
        );
        let cache_requests = Family::<CacheStatusLabels, Counter>::default();
        registry.register(
            "cache_requests",
            "Requests on cached routes, by route and cache status (hit, stale, miss, revalidated, bypass)",
            cache_requests.clone(),
        );
        let cache_bytes = Family::<TierLabels, Gauge>::default();
        registry.register_with_unit(
            "cache_stored",
            "Bytes of responses stored, by tier (memory, disk)",
            prometheus_client::registry::Unit::Bytes,
            cache_bytes.clone(),
        );
        let cache_objects = Family::<TierLabels, Gauge>::default();
        registry.register(
            "cache_objects",
            "Cache entries (one per primary key, holding its variants) stored, by tier",
            cache_objects.clone(),
        );
        let cache_evictions = Family::<TierLabels, Counter>::default();
        registry.register(
            "cache_evictions",
            "Entries evicted to stay within a tier's size bound",
            cache_evictions.clone(),
        );
        let cache_purges = Family::<KindLabels, Counter>::default();
        registry.register(
            "cache_purges",
            "Entries removed or marked stale by purge or invalidation, by kind (hard, soft, invalidate, corrupt)",
            cache_purges.clone(),
        );
        let guard_rejections = Family::<ReasonLabels, Counter>::default();
        registry.register(
            "guard_rejections",
            "Requests refused by a route's guards, by reason (unauthorized, forbidden, rate_limited, geo)",
            guard_rejections.clone(),
        );
        let fleet = FleetMetrics::default();
        registry.register(
            "fleet_connected",
            "1 while the node's NATS connection is up",
            fleet.connected.clone(),
        );
        registry.register(
            "fleet_changes_published",
            "Local state changes confirmed by JetStream",
            fleet.published.clone(),
        );
        registry.register(
            "fleet_backlog_changes",
            "Local state changes waiting to be published (grows while the fleet link is down)",
            fleet.backlog.clone(),
        );
        registry.register(
            "fleet_changes_received",
            "State changes received from other nodes, duplicates included",
            fleet.received.clone(),
        );
        registry.register(
            "fleet_changes_applied",
            "Received state changes that altered local state",
            fleet.applied.clone(),
        );
        registry.register(
            "fleet_invalidations",
            "Cache invalidations received from the center",
            fleet.invalidations.clone(),
        );
        registry.register(
            "fleet_snapshots_published",
            "Full-state snapshots published for anti-entropy",
            fleet.snapshots_published.clone(),
        );
        registry.register(
            "fleet_anti_entropy_rounds",
            "Reads of the fleet's snapshot stream to its end",
            fleet.anti_entropy_rounds.clone(),
        );
        let outbox_depth = Family::<RouteLabels, Gauge>::default();
        registry.register(
            "outbox_depth",
            "Writes waiting in a route's outbox for the center",
            outbox_depth.clone(),
        );
        let outbox_bytes = Family::<RouteLabels, Gauge>::default();
        registry.register_with_unit(
            "outbox_queued",
            "Body bytes waiting in a route's outbox",
            prometheus_client::registry::Unit::Bytes,
            outbox_bytes.clone(),
        );
        let outbox_oldest = Gauge::<f64, std::sync::atomic::AtomicU64>::default();
        registry.register_with_unit(
            "outbox_oldest_age",
            "Age of the oldest write still waiting in any outbox (0 when empty)",
            prometheus_client::registry::Unit::Seconds,
            outbox_oldest.clone(),
        );
        let outbox_events = Family::<OutboxLabels, Counter>::default();
        registry.register(
            "outbox_events",
            "Outbox entries by event (queued, rejected, delivered, retried, failed)",
            outbox_events.clone(),
        );
        let analytics_events = Family::<ResultLabels, Counter>::default();
        registry.register(
            "analytics_events",
            "Analytics events received on the events endpoint, by result (accepted, rejected)",
            analytics_events.clone(),
        );
        let analytics_summaries = Family::<ResultLabels, Counter>::default();
        registry.register(
            "analytics_summaries",
            "Analytics window summaries sent to the center, by result (sent, failed attempts)",
            analytics_summaries.clone(),
        );
        let analytics_pending = Gauge::default();
        registry.register(
            "analytics_pending_summaries",
            "Closed-window summaries not yet delivered to the center",
            analytics_pending.clone(),
        );
        let function_calls = Family::<FunctionOutcomeLabels, Counter>::default();
        registry.register(
            "function_invocations",
            "Function invocations by outcome (ok, trap, timeout, oom, unavailable)",
            function_calls.clone(),
        );
        let function_duration: Family<FunctionOutcomeLabels, Histogram, fn() -> Histogram> =
            Family::new_with_constructor(latency_histogram);
        registry.register_with_unit(
            "function_duration",
            "Time from instantiation to the guest's return (body streamed), by outcome",
            prometheus_client::registry::Unit::Seconds,
            function_duration.clone(),
        );
        let function_instantiate: Family<FunctionLabels, Histogram, fn() -> Histogram> =
            Family::new_with_constructor(instantiate_histogram);
        registry.register_with_unit(
            "function_instantiate_duration",
            "Time to create a fresh instance (store, limits, instantiate) per request",
            prometheus_client::registry::Unit::Seconds,
            function_instantiate.clone(),
        );
        let function_deploys = Family::<FunctionResultLabels, Counter>::default();
        registry.register(
            "function_deploys",
            "Function deploys and rollbacks by result (ok, rejected)",
            function_deploys.clone(),
        );
        let build_info = Family::<VersionLabels, Gauge>::default();
        build_info
            .get_or_create(&VersionLabels {
                version: version.to_owned(),
            })
            .set(1);
        registry.register("build_info", "Version of the running binary", build_info);
        Metrics {
            registry: Arc::new(registry),
            requests,
            request_duration,
            origin_requests,
            origin_duration,
            endpoint_healthy,
            active_connections,
            connections,
            websockets_open,
            websocket_bytes_to_origin,
            websocket_bytes_to_client,
            config_reloads,
            cache_requests,
            cache_bytes,
            cache_objects,
            cache_evictions,
            cache_purges,
            guard_rejections,
            fleet,
            outbox_depth,
            outbox_bytes,
            outbox_oldest,
            outbox_events,
            health: Arc::new(crate::health::HealthWindow::default()),
            analytics_events,
            analytics_summaries,
            analytics_pending,
            analytics_seen: Arc::new(std::sync::Mutex::new([0; 4])),
            function_calls,
            function_duration,
            function_instantiate,
            function_deploys,
        }
    }

    /// Per-route guard rejection counters, one per reason, in the caller's order.
    pub fn guard_route(&self, route: &str, reasons: &[&'static str]) -> IndexedCounters {
        IndexedCounters {
            by_status: reasons
                .iter()
                .map(|reason| {
                    self.guard_rejections.get_or_create_owned(&ReasonLabels {
                        route: route.to_owned(),
                        reason,
                    })
                })
                .collect(),
        }
    }

    /// Per-route cache counters, one per status label, in the caller's label order.
    pub fn cache_route(&self, route: &str, statuses: &[&'static str]) -> IndexedCounters {
        IndexedCounters {
            by_status: statuses
                .iter()
                .map(|status| {
                    self.cache_requests.get_or_create_owned(&CacheStatusLabels {
                        route: route.to_owned(),
                        status,
                    })
                })
                .collect(),
        }
    }

    /// Handles for one storage tier (`memory` or `disk`).
    pub fn cache_tier(&self, tier: &'static str) -> CacheTierMetrics {
        let labels = TierLabels { tier };
        CacheTierMetrics {
            bytes: self.cache_bytes.get_or_create_owned(&labels),
            objects: self.cache_objects.get_or_create_owned(&labels),
            evictions: self.cache_evictions.get_or_create_owned(&labels),
        }
    }

    /// Counts entries removed or marked stale by a purge of `kind`.
    pub fn cache_purged(&self, kind: &'static str, entries: u64) {
        self.cache_purges
            .get_or_create(&KindLabels { kind })
            .inc_by(entries);
    }

    /// Records one function invocation: its outcome label and how long the guest ran.
    pub fn function_call(&self, function: &str, outcome: &'static str, seconds: f64) {
        let labels = FunctionOutcomeLabels {
            function: function.to_owned(),
            outcome,
        };
        self.function_calls.get_or_create(&labels).inc();
        self.function_duration
            .get_or_create(&labels)
            .observe(seconds);
    }

    /// Records the time one request's fresh instance took to create.
    pub fn function_instantiated(&self, function: &str, seconds: f64) {
        self.function_instantiate
            .get_or_create(&FunctionLabels {
                function: function.to_owned(),
            })
            .observe(seconds);
    }

    /// Counts a deploy or rollback (`ok` or `rejected`).
    pub fn function_deploy(&self, function: &str, ok: bool) {
        self.function_deploys
            .get_or_create(&FunctionResultLabels {
                function: function.to_owned(),
                result: if ok { "ok" } else { "rejected" },
            })
            .inc();
    }

    /// Counts one outbox event of `route`.
    pub fn outbox_event(&self, route: &str, event: OutboxEvent) {
        self.outbox_events
            .get_or_create(&OutboxLabels {
                route: route.to_owned(),
                event: event.as_str(),
            })
            .inc();
    }

    /// Sets a route's outbox depth and the age of the oldest waiting write.
    pub fn outbox_depth(&self, route: &str, entries: u64, bytes: u64) {
        let labels = RouteLabels {
            route: route.to_owned(),
        };
        self.outbox_depth.get_or_create(&labels).set(entries as i64);
        self.outbox_bytes.get_or_create(&labels).set(bytes as i64);
    }

    /// Sets the age of the oldest waiting write, in seconds.
    pub fn outbox_oldest(&self, seconds: f64) {
        self.outbox_oldest.set(seconds);
    }

    /// Brings the analytics counters up to the shipper's running totals (events accepted and
    /// rejected, summaries sent and failed since start) and sets the pending gauge.
    pub fn analytics(&self, accepted: u64, rejected: u64, sent: u64, failed: u64, pending: u64) {
        let totals = [accepted, rejected, sent, failed];
        let mut seen = match self.analytics_seen.lock() {
            Ok(s) => s,
            Err(p) => p.into_inner(),
        };
        let labels = ["accepted", "rejected", "sent", "failed"];
        for i in 0..4 {
            let delta = totals[i].saturating_sub(seen[i]);
            if delta > 0 {
                let family = if i < 2 {
                    &self.analytics_events
                } else {
                    &self.analytics_summaries
                };
                family
                    .get_or_create(&ResultLabels {
                        result: labels[i].to_owned(),
                    })
                    .inc_by(delta);
            }
            seen[i] = seen[i].max(totals[i]);
        }
        self.analytics_pending.set(pending as i64);
    }

    /// The node's recent request and cache figures (fleet heartbeats).
    pub fn health(&self) -> &crate::health::HealthWindow {
        &self.health
    }

    /// Handles of the fleet link's metrics.
    pub fn fleet(&self) -> FleetMetrics {
        self.fleet.clone()
    }

    /// Prometheus text exposition of every metric.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
            out.push_str("# encoding failed\n");
        }
        out
    }

    /// Handles for one route, resolved once per config load.
    pub fn route(&self, route: &str) -> RouteMetrics {
        let classes = [
            StatusClass::Informational,
            StatusClass::Success,
            StatusClass::Redirection,
            StatusClass::ClientError,
            StatusClass::ServerError,
        ]
        .map(|status_class| {
            self.requests.get_or_create_owned(&RouteStatusLabels {
                route: route.to_owned(),
                status_class,
            })
        });
        RouteMetrics {
            by_class: Arc::new(classes),
            duration: self.request_duration.get_or_create_owned(&RouteLabels {
                route: route.to_owned(),
            }),
            health: self.health.clone(),
        }
    }

    /// Handles for one origin endpoint, resolved once per config load.
    pub fn endpoint(&self, origin: &str, endpoint: &str, region: &str) -> EndpointMetrics {
        let labels = EndpointLabels {
            origin: origin.to_owned(),
            endpoint: endpoint.to_owned(),
            region: region.to_owned(),
        };
        let outcome = |outcome| {
            self.origin_requests
                .get_or_create_owned(&EndpointOutcomeLabels {
                    origin: origin.to_owned(),
                    endpoint: endpoint.to_owned(),
                    outcome,
                })
        };
        EndpointMetrics {
            response: outcome(OriginOutcome::Response),
            connect_error: outcome(OriginOutcome::ConnectError),
            timeout: outcome(OriginOutcome::Timeout),
            error: outcome(OriginOutcome::Error),
            duration: self.origin_duration.get_or_create_owned(&labels),
            healthy: self.endpoint_healthy.get_or_create_owned(&labels),
        }
    }

    /// Counts a client connection opening; the returned guard counts it closing.
    pub fn connection_opened(&self) -> ConnectionGuard {
        self.connections.inc();
        self.active_connections.inc();
        ConnectionGuard {
            gauge: self.active_connections.clone(),
        }
    }

    /// Counts a WebSocket opening; the returned guard counts it closing.
    pub fn websocket_opened(&self) -> ConnectionGuard {
        self.websockets_open.inc();
        ConnectionGuard {
            gauge: self.websockets_open.clone(),
        }
    }

    /// Adds what a WebSocket carried, once it closed.
    pub fn websocket_bytes(&self, to_origin: u64, to_client: u64) {
        self.websocket_bytes_to_origin.inc_by(to_origin);
        self.websocket_bytes_to_client.inc_by(to_client);
    }

    /// Counts a config reload attempt.
    pub fn config_reload(&self, ok: bool) {
        let result = if ok { "ok" } else { "rejected" };
        self.config_reloads
            .get_or_create(&ResultLabels {
                result: result.to_owned(),
            })
            .inc();
    }
}

/// Counters of one route, indexed like the label list they were made from (cache statuses,
/// guard rejection reasons): resolved once, so a request only indexes an array.
#[derive(Clone, Debug, Default)]
pub struct IndexedCounters {
    by_status: Vec<Counter>,
}

impl IndexedCounters {
    /// Counts one request with the status at `index`.
    pub fn record(&self, index: usize) {
        if let Some(c) = self.by_status.get(index) {
            c.inc();
        }
    }
}

/// Size and eviction handles of one cache tier.
#[derive(Clone, Debug, Default)]
pub struct CacheTierMetrics {
    /// Bytes stored.
    pub bytes: Gauge,
    /// Entries stored.
    pub objects: Gauge,
    /// Entries evicted for space.
    pub evictions: Counter,
}

/// Per-route handles: a counter per status class and the duration histogram.
#[derive(Clone, Debug)]
pub struct RouteMetrics {
    by_class: Arc<[Counter; 5]>,
    duration: Histogram,
    health: Arc<crate::health::HealthWindow>,
}

impl RouteMetrics {
    /// Records one finished request.
    pub fn record(&self, status: u16, seconds: f64) {
        self.by_class[StatusClass::of(status).index()].inc();
        self.duration.observe(seconds);
        self.health.record(status, seconds);
    }
}

/// Per-endpoint handles: attempt outcomes, response-head latency and the health gauge.
#[derive(Clone, Debug)]
pub struct EndpointMetrics {
    response: Counter,
    connect_error: Counter,
    timeout: Counter,
    error: Counter,
    duration: Histogram,
    healthy: Gauge,
}

impl EndpointMetrics {
    /// Records how one attempt ended, with its latency when a response head arrived.
    pub fn record(&self, outcome: OriginOutcome, seconds: f64) {
        match outcome {
            OriginOutcome::Response => {
                self.response.inc();
                self.duration.observe(seconds);
            }
            OriginOutcome::ConnectError => {
                self.connect_error.inc();
            }
            OriginOutcome::Timeout => {
                self.timeout.inc();
            }
            OriginOutcome::Error => {
                self.error.inc();
            }
        }
    }

    /// Publishes whether the endpoint currently takes traffic.
    pub fn set_healthy(&self, healthy: bool) {
        self.healthy.set(i64::from(healthy));
    }
}

/// Decrements the active-connection gauge when the connection ends.
#[derive(Debug)]
pub struct ConnectionGuard {
    gauge: Gauge,
}

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        self.gauge.dec();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposition_uses_prefix_units_and_bounded_labels() {
        let m = Metrics::new("0.0.0-test");
        m.route("api").record(503, 0.002);
        m.endpoint("central", "127.0.0.1:8001", "us-west")
            .record(OriginOutcome::ConnectError, 0.0);
        let text = m.encode();
        assert!(
            text.contains(r#"outpost_http_requests_total{route="api",status_class="5xx"} 1"#),
            "{text}"
        );
        assert!(text.contains("outpost_http_request_duration_seconds_bucket"));
        assert!(text.contains(
            r#"outpost_origin_requests_total{origin="central",endpoint="127.0.0.1:8001",outcome="connect_error"} 1"#
        ));
        assert!(text.contains(r#"outpost_build_info{version="0.0.0-test"} 1"#));
    }

    #[test]
    fn status_classes_cover_every_code() {
        assert_eq!(StatusClass::of(101), StatusClass::Informational);
        assert_eq!(StatusClass::of(204), StatusClass::Success);
        assert_eq!(StatusClass::of(308), StatusClass::Redirection);
        assert_eq!(StatusClass::of(451), StatusClass::ClientError);
        assert_eq!(StatusClass::of(599), StatusClass::ServerError);
    }
}
