//! The node's live state: an immutable [`Snapshot`] per config, swapped atomically on reload.
//!
//! Each request loads the current snapshot once and keeps it to the end, so a reload never
//! changes the rules under an in-flight request; the old snapshot (and its health-check tasks)
//! goes away when its last request finishes.

use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use http::{HeaderName, HeaderValue};
use outpost_cache::{Cache, CacheOutcome, KeyPolicy, RoutePolicy, StorageConfig};
use outpost_config::Config;
use outpost_guard::jwt::{KeySource, Rules};
use outpost_guard::keys::{self, Remote, RemoteKeys};
use outpost_guard::{Authenticator, IdentitySigner};
use outpost_telemetry::Metrics;
use outpost_telemetry::metrics::{IndexedCounters, RouteMetrics};

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
    /// Origin group for unsafe methods (the center), when reads and writes go apart.
    pub write_group: Option<Arc<OriginGroup>>,
    /// Store-and-forward for writes, when the route has an outbox.
    pub outbox: Option<crate::outbox::OutboxPolicy>,
    /// Matched prefix, stripped before forwarding when `strip_prefix` is set.
    pub prefix: String,
    /// Whether to strip the prefix.
    pub strip_prefix: bool,
    /// Whether WebSocket handshakes go to the origin (`crate::tunnel`).
    pub websocket: bool,
    /// Time allowed for the origin's response head.
    pub timeout: Duration,
    /// Largest request body.
    pub max_body: u64,
    /// Pre-resolved metric handles.
    pub metrics: RouteMetrics,
    /// Caching policy, when the route caches.
    pub cache: Option<RouteCache>,
    /// Token rules, when the route authenticates.
    pub auth: Option<Arc<Authenticator>>,
    /// Whether the origin gets a signed `x-outpost-identity`.
    pub forward_identity: bool,
    /// Rate limits (possibly none).
    pub limits: Arc<outpost_guard::ratelimit::RateLimits>,
    /// Country rule.
    pub geo: Option<outpost_guard::geo::GeoRule>,
    /// Regions the route's requests may go to (empty: any).
    pub residency: Vec<String>,
    /// Experiments of the route.
    pub experiments: Vec<Arc<outpost_guard::ab::Experiment>>,
    /// `outpost_guard_rejections_total{route, reason}`, indexed by [`Rejection`].
    pub rejections: IndexedCounters,
    /// The function that handles the route's requests, when it has one.
    pub function: Option<String>,
    /// Origin groups the route's function may call as `http://<group>/…`.
    pub function_groups: Vec<String>,
    /// The fixed answer of a `[routes.respond]` route.
    pub respond: Option<FixedResponse>,
}

/// A route's fixed answer, ready to clone into responses.
#[derive(Debug, Clone)]
pub struct FixedResponse {
    /// Status code.
    pub status: http::StatusCode,
    /// `Content-Type`.
    pub content_type: HeaderValue,
    /// Body.
    pub body: bytes::Bytes,
}

fn fixed_response(r: &outpost_config::Route) -> Option<FixedResponse> {
    let f = r.respond.as_ref()?;
    Some(FixedResponse {
        status: http::StatusCode::from_u16(f.status).unwrap_or(http::StatusCode::OK),
        content_type: HeaderValue::from_str(&f.content_type)
            .unwrap_or(HeaderValue::from_static("text/plain")),
        body: bytes::Bytes::from(f.body.clone()),
    })
}

impl RouteRuntime {
    /// The group a request with `method` goes to: writes to the center when the route has one.
    pub fn group_for(&self, method: &http::Method) -> &Arc<OriginGroup> {
        match &self.write_group {
            Some(w) if !method.is_safe() => w,
            _ => &self.group,
        }
    }
}

/// Why a guard refused a request (the `reason` label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rejection {
    /// No or invalid token (401).
    Unauthorized,
    /// Token without the required scope, role or claim (403).
    Forbidden,
    /// Over a rate limit (429).
    RateLimited,
    /// Country rule (451).
    Geo,
}

impl Rejection {
    /// Every reason, in index order.
    pub const ALL: [Rejection; 4] = [
        Rejection::Unauthorized,
        Rejection::Forbidden,
        Rejection::RateLimited,
        Rejection::Geo,
    ];

    /// Label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Rejection::Unauthorized => "unauthorized",
            Rejection::Forbidden => "forbidden",
            Rejection::RateLimited => "rate_limited",
            Rejection::Geo => "geo",
        }
    }
}

fn route_limits(r: &outpost_config::Route) -> Arc<outpost_guard::ratelimit::RateLimits> {
    use outpost_guard::ratelimit::{Limit, LimitKey, RateLimits};
    // Validation has checked keys and rates, so nothing is dropped here.
    let limits = r
        .rate_limits
        .iter()
        .filter_map(|l| Limit::new(&l.name, LimitKey::parse(&l.key)?, l.rate, l.per, l.burst))
        .collect();
    Arc::new(RateLimits::new(limits))
}

/// Sweeps idle rate-limit keys every 10 s while the snapshot's limiters are alive.
fn sweep_limits(routes: &[RouteRuntime]) {
    let limits: Vec<_> = routes
        .iter()
        .filter(|r| !r.limits.is_empty())
        .map(|r| Arc::downgrade(&r.limits))
        .collect();
    if limits.is_empty() {
        return;
    }
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(10));
        loop {
            tick.tick().await;
            let mut alive = false;
            for l in limits.iter().filter_map(std::sync::Weak::upgrade) {
                alive = true;
                l.sweep();
            }
            if !alive {
                return;
            }
        }
    });
}

/// A cached route's policy and its cache-status counters.
#[derive(Debug)]
pub struct RouteCache {
    /// RFC 9111 gaps filled by the route's settings, and its key.
    pub policy: Arc<RoutePolicy>,
    /// `outpost_cache_requests_total{route, status}` handles.
    pub metrics: IndexedCounters,
}

/// The request header carrying a request's A/B variants to the origin.
pub const VARIANT_HEADER: &str = "x-outpost-variant";

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
                // Validation rejects invalid names, so none is dropped here. A route in
                // experiments keeps one entry per variant combination.
                headers: c
                    .key
                    .headers
                    .iter()
                    .filter_map(|h| HeaderName::from_bytes(h.as_bytes()).ok())
                    .chain(
                        (!r.experiments.is_empty())
                            .then_some(HeaderName::from_static(VARIANT_HEADER)),
                    )
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

/// The groups a route's function may call: the route's own, its write group, and the ones
/// the function lists.
fn function_groups(config: &Config, r: &outpost_config::Route) -> Vec<String> {
    let Some(f) = &r.function else {
        return Vec::new();
    };
    let mut groups = vec![r.origin.clone()];
    groups.extend(r.write_origin.iter().cloned());
    if let Some(def) = config.functions.get(f) {
        groups.extend(def.origins.iter().cloned());
    }
    groups.sort();
    groups.dedup();
    groups
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
    /// Signs forwarded identities; its JWKS is served on every listener.
    pub identity: Arc<IdentitySigner>,
    /// `[server] internal_headers`, stripped from every client request.
    pub internal_headers: Vec<HeaderName>,
}

/// What a snapshot needs that takes I/O to prepare (remote key sets, key files), done before
/// the synchronous build so that a node never serves a route whose keys it could not load.
#[derive(Debug)]
pub struct Guards {
    auth: std::collections::HashMap<String, Arc<Authenticator>>,
    identity: Arc<IdentitySigner>,
}

impl Guards {
    /// Loads every route's keys and the identity key. `previous` lends its identity signer when
    /// the identity settings did not change (a generated key survives reloads).
    pub async fn prepare(
        config: &Config,
        previous: Option<&Snapshot>,
    ) -> Result<Guards, BuildError> {
        let identity = match previous {
            Some(p)
                if p.config.identity.key_file == config.identity.key_file
                    && p.config.identity.previous_key_files
                        == config.identity.previous_key_files
                    && p.config.identity.ttl == config.identity.ttl =>
            {
                p.identity.clone()
            }
            _ => Arc::new(match &config.identity.key_file {
                Some(file) => {
                    let previous: Vec<_> = config
                        .identity
                        .previous_key_files
                        .iter()
                        .map(|f| config.base_dir.join(f))
                        .collect();
                    IdentitySigner::from_files(
                        &config.base_dir.join(file),
                        &previous,
                        config.identity.ttl,
                    )?
                }
                None => IdentitySigner::generate(config.identity.ttl)?,
            }),
        };
        let mut auth = std::collections::HashMap::new();
        for r in &config.routes {
            let Some(a) = &r.auth else { continue };
            let fail = |reason: String| BuildError::Auth {
                route: r.name.clone(),
                reason,
            };
            let algorithms = a
                .algorithms
                .iter()
                .map(|name| {
                    name.parse()
                        .map_err(|_| fail(format!("unknown algorithm {name}")))
                })
                .collect::<Result<Vec<outpost_guard::jwt::Algorithm>, _>>()?;
            let source = if a.discovery || a.jwks_url.is_some() {
                let remote = match (&a.jwks_url, &a.issuer) {
                    (Some(url), _) => Remote::Jwks(url.clone()),
                    (None, Some(issuer)) => Remote::Discovery(issuer.clone()),
                    (None, None) => return Err(fail("discovery needs an issuer".to_owned())),
                };
                KeySource::Remote(
                    RemoteKeys::start(remote, a.jwks_refresh)
                        .await
                        .map_err(|e| fail(e.to_string()))?,
                )
            } else {
                let mut list = Vec::new();
                for f in &a.key_files {
                    list.extend(
                        keys::from_file(&config.base_dir.join(f))
                            .map_err(|e| fail(e.to_string()))?,
                    );
                }
                let secret = match (&a.hs256_secret, &a.hs256_secret_env) {
                    (_, Some(var)) => Some(std::env::var(var).map_err(|_| {
                        fail(format!(
                            "environment variable {var} (hs256_secret_env) is not set"
                        ))
                    })?),
                    (Some(s), None) => Some(s.clone()),
                    (None, None) => None,
                };
                if let Some(secret) = secret {
                    list.push(keys::from_secret(secret.as_bytes()));
                }
                KeySource::Static(Arc::new(list))
            };
            let rules = Rules {
                optional: a.mode == outpost_config::AuthMode::Optional,
                algorithms,
                issuer: a.issuer.clone(),
                audience: a.audience.clone(),
                leeway: a.leeway,
                cookie: a.cookie.clone(),
                required_scopes: a.required_scopes.clone(),
                required_roles: a.required_roles.clone(),
                required_claims: a.required_claims.clone(),
                forward_claims: a.forward_claims.clone(),
            };
            auth.insert(r.name.clone(), Arc::new(Authenticator::new(rules, source)));
        }
        Ok(Guards { auth, identity })
    }
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
    /// A route's keys cannot be loaded.
    #[error("route `{route}`: {reason}")]
    Auth {
        /// The route.
        route: String,
        /// What failed.
        reason: String,
    },
    /// The identity key cannot be loaded or made.
    #[error(transparent)]
    Identity(#[from] outpost_guard::identity::IdentityError),
}

impl Snapshot {
    fn build(
        config: Config,
        previous: Option<&Snapshot>,
        metrics: &Metrics,
        mut guards: Guards,
    ) -> Result<Snapshot, BuildError> {
        let origins = Origins::build(&config, previous.map(|p| &p.origins), metrics)?;
        let experiments: std::collections::HashMap<String, Arc<outpost_guard::ab::Experiment>> =
            config
                .experiments
                .iter()
                .filter_map(|e| {
                    let variants = e
                        .variants
                        .iter()
                        .map(|v| (v.name.clone(), v.weight))
                        .collect();
                    outpost_guard::ab::Experiment::new(&e.name, e.cookie.as_deref(), variants)
                        .map(|x| (e.name.clone(), Arc::new(x)))
                })
                .collect();
        let mut routes = Vec::with_capacity(config.routes.len());
        for r in &config.routes {
            let group = origins
                .group(&r.origin)
                .ok_or_else(|| BuildError::UnknownOrigin {
                    route: r.name.clone(),
                    origin: r.origin.clone(),
                })?
                .clone();
            let write_group = match &r.write_origin {
                Some(w) => Some(
                    origins
                        .group(w)
                        .ok_or_else(|| BuildError::UnknownOrigin {
                            route: r.name.clone(),
                            origin: w.clone(),
                        })?
                        .clone(),
                ),
                None => None,
            };
            routes.push(RouteRuntime {
                name: r.name.clone(),
                write_group,
                outbox: r
                    .outbox
                    .as_ref()
                    .map(crate::outbox::OutboxPolicy::from_config),
                timeout: r.timeout.unwrap_or(group.response_timeout),
                group,
                prefix: r.path_prefix.clone(),
                strip_prefix: r.strip_prefix,
                // An HTTP/2 origin cannot take an HTTP/1.1 upgrade (its client would strip the
                // fields, with a warning per request): handshakes are plain requests there.
                websocket: r.websocket
                    && config
                        .origins
                        .get(&r.origin)
                        .is_some_and(|o| o.protocol == outpost_config::OriginProtocol::Http1),
                max_body: r
                    .max_body_bytes
                    .unwrap_or(config.server.max_body_bytes)
                    .as_u64(),
                metrics: metrics.route(&r.name),
                cache: route_cache(r, metrics),
                auth: guards.auth.remove(&r.name),
                forward_identity: r.forward_identity,
                limits: route_limits(r),
                geo: r.geo.as_ref().map(|g| outpost_guard::geo::GeoRule {
                    allow: g.allow_countries.clone(),
                    deny: g.deny_countries.clone(),
                }),
                residency: r.residency.clone(),
                rejections: metrics.guard_route(&r.name, &Rejection::ALL.map(Rejection::as_str)),
                experiments: r
                    .experiments
                    .iter()
                    .filter_map(|name| experiments.get(name).cloned())
                    .collect(),
                function: r.function.clone(),
                function_groups: function_groups(&config, r),
                respond: fixed_response(r),
            });
        }
        sweep_limits(&routes);
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
            identity: guards.identity,
            internal_headers: config
                .server
                .internal_headers
                .iter()
                .filter_map(|h| HeaderName::from_bytes(h.as_bytes()).ok())
                .collect(),
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
    /// The node's local store (outbox), attached once by the binary after it is opened.
    store: std::sync::OnceLock<outpost_state::Store>,
    /// The node's analytics store, attached once by the binary when `[analytics] enabled`.
    analytics: std::sync::OnceLock<outpost_state::analytics::Analytics>,
    /// The node's functions, attached once by the binary when the config has any.
    functions: std::sync::OnceLock<Arc<outpost_functions::Functions>>,
}

impl std::fmt::Debug for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Node").finish_non_exhaustive()
    }
}

impl Node {
    /// Builds the first snapshot (fetching remote key sets); must run inside a Tokio runtime
    /// (health checks start).
    pub async fn new(config: Config, metrics: Metrics) -> Result<Arc<Node>, BuildError> {
        let storage = storage_config(&config);
        let cache = Cache::new(&storage, &metrics)?;
        let guards = Guards::prepare(&config, None).await?;
        let snap = Snapshot::build(config, None, &metrics, guards)?;
        Ok(Arc::new(Node {
            current: ArcSwap::from_pointee(snap),
            metrics,
            cache,
            storage,
            store: std::sync::OnceLock::new(),
            analytics: std::sync::OnceLock::new(),
            functions: std::sync::OnceLock::new(),
        }))
    }

    /// Swaps in a new config; on error the current one keeps serving. The caller counts the
    /// attempt (it also sees failures that happen before a config reaches the node) and
    /// serialises reloads.
    pub async fn reload(&self, config: Config) -> Result<(), BuildError> {
        let previous = self.current.load_full();
        let guards = Guards::prepare(&config, Some(&previous)).await?;
        let storage = storage_config(&config);
        if storage.memory_bytes != self.storage.memory_bytes || storage.disk != self.storage.disk {
            tracing::warn!(
                "The [cache] storage settings changed; they apply at the next restart (routes' cache policies apply now)."
            );
        }
        let snap = Snapshot::build(config, Some(&previous), &self.metrics, guards)?;
        self.current.store(Arc::new(snap));
        Ok(())
    }

    /// Attaches the local store (once; later calls are ignored).
    pub fn attach_store(&self, store: outpost_state::Store) {
        let _ = self.store.set(store);
    }

    /// The local store, when attached.
    pub fn store(&self) -> Option<&outpost_state::Store> {
        self.store.get()
    }

    /// Attaches the analytics store (once; later calls are ignored).
    pub fn attach_analytics(&self, analytics: outpost_state::analytics::Analytics) {
        let _ = self.analytics.set(analytics);
    }

    /// The analytics store, when analytics are on.
    pub fn analytics(&self) -> Option<&outpost_state::analytics::Analytics> {
        self.analytics.get()
    }

    /// Attaches the functions registry (once; later calls are ignored).
    pub fn attach_functions(&self, functions: Arc<outpost_functions::Functions>) {
        let _ = self.functions.set(functions);
    }

    /// The functions registry, when the node has functions.
    pub fn functions(&self) -> Option<&Arc<outpost_functions::Functions>> {
        self.functions.get()
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
