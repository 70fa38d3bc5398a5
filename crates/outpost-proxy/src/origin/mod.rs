//! The origin stage: origin groups, their endpoints, health, and nearest-healthy selection.
//!
//! Each endpoint owns a connection pool (keep-alive, connect timeout: our HTTP/1.1 client in
//! [`h1`] and [`pool`], hyper-util's client for h2) and its health:
//! active checks ([`health`]) and passive ejection after consecutive live failures. Endpoint
//! state survives config reloads when the endpoint's settings did not change, so a reload
//! neither empties connection pools nor forgets that a region is down.

pub mod h1;
pub mod health;
pub mod pool;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use http::uri::{Authority, Scheme};
use http::{Request, Response, header};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use outpost_config::{GeoPoint, OriginGroup as OriginConfig, OriginProtocol, Passive};
use outpost_telemetry::Metrics;
use outpost_telemetry::metrics::{EndpointMetrics, OriginOutcome};
use std::sync::LazyLock;

use tokio_util::sync::{CancellationToken, DropGuard};

use crate::body::{BodyState, BoxError, ProxyBody};
use crate::geo::distance_km;
use h1::ExchangeError;
use pool::{H1Pool, PoolError};

/// How requests reach an endpoint.
enum Transport {
    /// Our own HTTP/1.1 pool (see [`pool`]).
    H1(Arc<H1Pool>),
    /// HTTP/2 (prior knowledge on http://, ALPN h2 on https://): hyper-util's client
    /// multiplexes one connection.
    H2(Box<Client<hyper_rustls::HttpsConnector<HttpConnector>, ProxyBody>>),
}

/// Time base for ejection deadlines stored in atomics.
static EPOCH: LazyLock<Instant> = LazyLock::new(Instant::now);

fn now_ms() -> u64 {
    u64::try_from(EPOCH.elapsed().as_millis()).unwrap_or(u64::MAX)
}

/// What makes two endpoint definitions the same, so state can be carried across reloads.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct EndpointKey {
    group: String,
    url: String,
    protocol: OriginProtocol,
    connect_timeout: Duration,
    pool_idle_timeout: Duration,
    pool_max_idle: usize,
    tls: Option<outpost_config::OriginTls>,
}

/// One endpoint of an origin group, with its pool and health.
pub struct Endpoint {
    /// `host:port`, for logs, metrics and errors.
    pub authority: Authority,
    scheme: Scheme,
    /// Region label from config (shared: every response names it).
    pub region: Arc<str>,
    /// Where the endpoint is.
    pub location: GeoPoint,
    transport: Transport,
    protocol: OriginProtocol,
    /// Result of active checks (true until a check says otherwise).
    active_ok: AtomicBool,
    /// Live failures in a row, for passive ejection.
    consecutive_failures: AtomicU32,
    /// Milliseconds since [`EPOCH`] until which the endpoint is ejected; 0 = not ejected.
    ejected_until: AtomicU64,
    metrics: EndpointMetrics,
    group: String,
    /// Settings this endpoint was built with; equal keys across reloads reuse the endpoint.
    key: EndpointKey,
}

impl std::fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Endpoint")
            .field("authority", &self.authority)
            .field("region", &self.region)
            .finish_non_exhaustive()
    }
}

/// How one attempt on an endpoint failed.
#[derive(Debug)]
pub enum AttemptError {
    /// No connection could be opened; the request never left.
    Connect(BoxError),
    /// No response head within the timeout.
    Timeout,
    /// The exchange broke after the connection was made.
    Broken(BoxError),
    /// The exchange broke because of the client's body (malformed, cut short, over the limit).
    ClientBody,
    /// The timeout expired while the client's body was still arriving.
    ClientBodyTimeout,
}

impl Endpoint {
    fn new(
        key: &EndpointKey,
        cfg: &outpost_config::Endpoint,
        base_dir: &std::path::Path,
        metrics: &Metrics,
    ) -> Result<Self, String> {
        let uri: http::Uri = cfg.url.parse().map_err(|e| format!("{e}"))?;
        let authority = uri.authority().ok_or("no host")?.clone();
        let scheme = uri.scheme().ok_or("no scheme")?.clone();
        let https = scheme == Scheme::HTTPS;
        let transport = match key.protocol {
            OriginProtocol::Http1 => {
                let tls = if https {
                    let config =
                        crate::tls::client_config(key.tls.as_ref(), base_dir, &[b"http/1.1"])
                            .map_err(|e| e.to_string())?;
                    let name = key
                        .tls
                        .as_ref()
                        .and_then(|t| t.server_name.clone())
                        .unwrap_or_else(|| {
                            uri.host()
                                .unwrap_or_default()
                                .trim_matches(['[', ']'])
                                .to_owned()
                        });
                    let server_name = rustls_pki_types::ServerName::try_from(name.clone())
                        .map_err(|_| format!("`{name}` is not a valid TLS server name"))?;
                    Some(pool::PoolTls {
                        connector: tokio_rustls::TlsConnector::from(config),
                        server_name,
                    })
                } else {
                    None
                };
                Transport::H1(H1Pool::new(
                    authority.clone(),
                    tls,
                    key.connect_timeout,
                    key.pool_idle_timeout,
                    key.pool_max_idle,
                ))
            }
            OriginProtocol::H2 => {
                let mut http = HttpConnector::new();
                http.set_connect_timeout(Some(key.connect_timeout));
                http.set_nodelay(true);
                http.enforce_http(false);
                // No ALPN here: hyper-rustls sets `h2` itself (and refuses a preset list).
                let config = crate::tls::client_config(key.tls.as_ref(), base_dir, &[])
                    .map_err(|e| e.to_string())?;
                let builder = hyper_rustls::HttpsConnectorBuilder::new()
                    .with_tls_config((*config).clone())
                    .https_or_http();
                let builder = match key.tls.as_ref().and_then(|t| t.server_name.clone()) {
                    Some(name) => builder.with_server_name_resolver(
                        hyper_rustls::FixedServerNameResolver::new(
                            rustls_pki_types::ServerName::try_from(name.clone())
                                .map_err(|_| format!("`{name}` is not a valid TLS server name"))?,
                        ),
                    ),
                    None => builder,
                };
                let connector = builder.enable_http2().wrap_connector(http);
                Transport::H2(Box::new(
                    Client::builder(TokioExecutor::new())
                        .pool_idle_timeout(key.pool_idle_timeout)
                        .pool_max_idle_per_host(key.pool_max_idle)
                        .pool_timer(TokioTimer::new())
                        .timer(TokioTimer::new())
                        .http2_only(true)
                        .build(connector),
                ))
            }
        };
        let m = metrics.endpoint(&key.group, authority.as_str(), &cfg.region);
        m.set_healthy(true);
        Ok(Endpoint {
            authority,
            scheme,
            region: Arc::from(cfg.region.as_str()),
            location: cfg.location,
            transport,
            protocol: key.protocol,
            active_ok: AtomicBool::new(true),
            consecutive_failures: AtomicU32::new(0),
            ejected_until: AtomicU64::new(0),
            metrics: m,
            group: key.group.clone(),
            key: key.clone(),
        })
    }

    /// Whether the endpoint takes traffic now: active checks pass and it is not ejected.
    pub fn is_available(&self) -> bool {
        if !self.active_ok.load(Ordering::Acquire) {
            return false;
        }
        let until = self.ejected_until.load(Ordering::Relaxed);
        if until == 0 {
            return true;
        }
        if now_ms() < until {
            return false;
        }
        // Ejection over: give it traffic again (one caller announces it).
        if self
            .ejected_until
            .compare_exchange(until, 0, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
        {
            tracing::info!(origin = %self.group, endpoint = %self.authority, "Endpoint re-admitted after passive ejection.");
            self.metrics.set_healthy(true);
        }
        true
    }

    /// Whether active health checks currently pass.
    pub fn actively_healthy(&self) -> bool {
        self.active_ok.load(Ordering::Acquire)
    }

    /// Whether passive ejection currently keeps traffic away.
    pub fn is_ejected(&self) -> bool {
        let until = self.ejected_until.load(Ordering::Relaxed);
        until != 0 && now_ms() < until
    }

    /// The request target for a path on this endpoint, in the form its transport sends:
    /// origin-form for our HTTP/1.1 pool, absolute for the h2 client (which routes by it).
    pub fn uri_for(&self, path_and_query: &str) -> Result<http::Uri, http::Error> {
        match self.protocol {
            OriginProtocol::Http1 => Ok(http::Uri::try_from(path_and_query)?),
            OriginProtocol::H2 => http::Uri::builder()
                .scheme(self.scheme.clone())
                .authority(self.authority.clone())
                .path_and_query(path_and_query)
                .build(),
        }
    }

    /// The HTTP version requests to this endpoint must carry.
    pub fn version(&self) -> http::Version {
        match self.protocol {
            OriginProtocol::Http1 => http::Version::HTTP_11,
            OriginProtocol::H2 => http::Version::HTTP_2,
        }
    }

    /// Sends one request and waits for the response head, classifying the outcome and feeding
    /// passive health. With the response comes the time its head took, in seconds.
    ///
    /// `client_body` is how the client's body went, when it streams one: a failure it explains
    /// (a body cut short, malformed or over the limit, or still arriving at the timeout) is the
    /// client's, is not held against the endpoint and is not counted as an origin error.
    pub async fn send(
        &self,
        req: Request<ProxyBody>,
        forwarding: &[(http::HeaderName, http::HeaderValue)],
        timeout: Duration,
        passive: &Passive,
        client_body: Option<&BodyState>,
    ) -> Result<(Response<ProxyBody>, f64), AttemptError> {
        // tokio's clock: the deadline is a tokio timer's (and moves with a paused test clock).
        let started = tokio::time::Instant::now();
        let deadline = crate::alarm::deadline_after(started, timeout);
        let result = self.exchange(req, forwarding, deadline).await;
        let secs = started.elapsed().as_secs_f64();
        if let Some(body) = client_body {
            match &result {
                Err(AttemptError::Broken(_)) if body.client_broke_it() => {
                    return Err(AttemptError::ClientBody);
                }
                Err(AttemptError::Timeout) if body.client_is_late() => {
                    return Err(AttemptError::ClientBodyTimeout);
                }
                _ => {}
            }
        }
        let outcome = match &result {
            Ok(resp) => {
                let failed = matches!(resp.status().as_u16(), 502..=504);
                self.passive_result(!failed, passive);
                OriginOutcome::Response
            }
            Err(AttemptError::Connect(_)) => OriginOutcome::ConnectError,
            Err(AttemptError::Timeout) => OriginOutcome::Timeout,
            Err(_) => OriginOutcome::Error,
        };
        self.metrics.record(outcome, secs);
        if outcome != OriginOutcome::Response {
            self.passive_result(false, passive);
        }
        result.map(|resp| (resp, secs))
    }

    /// One request/response exchange over the endpoint's transport: a response head by
    /// `deadline` or [`AttemptError::Timeout`], without bookkeeping (health checks use it too).
    /// `forwarding` are fields sent after the request's own, none of them among them but `Via`
    /// ([`crate::filters::forwarding_fields`]).
    pub async fn exchange(
        &self,
        mut req: Request<ProxyBody>,
        forwarding: &[(http::HeaderName, http::HeaderValue)],
        deadline: tokio::time::Instant,
    ) -> Result<Response<ProxyBody>, AttemptError> {
        match &self.transport {
            Transport::H1(pool) => {
                // HTTP/1.1 needs a Host; clients that sent none (HTTP/1.0) get the endpoint's.
                if !req.headers().contains_key(header::HOST)
                    && !forwarding.iter().any(|(name, _)| name == header::HOST)
                    && let Ok(v) = http::HeaderValue::from_str(self.authority.as_str())
                {
                    req.headers_mut().insert(header::HOST, v);
                }
                pool.send(req, forwarding, deadline)
                    .await
                    .map_err(|e| match e {
                        PoolError::Connect { .. } => AttemptError::Connect(Box::new(e)),
                        PoolError::Exchange(ExchangeError::TimedOut) => AttemptError::Timeout,
                        PoolError::Exchange(_) => AttemptError::Broken(Box::new(e)),
                    })
            }
            Transport::H2(client) => {
                let headers = req.headers_mut();
                headers.reserve(forwarding.len());
                for (name, value) in forwarding {
                    headers.append(name, value.clone());
                }
                match tokio::time::timeout_at(deadline, client.request(req)).await {
                    Err(_) => Err(AttemptError::Timeout),
                    Ok(Ok(resp)) => Ok(resp.map(|b| {
                        http_body_util::BodyExt::boxed_unsync(http_body_util::BodyExt::map_err(
                            b,
                            |e| -> BoxError { Box::new(e) },
                        ))
                    })),
                    Ok(Err(e)) if e.is_connect() => Err(AttemptError::Connect(Box::new(e))),
                    Ok(Err(e)) => Err(AttemptError::Broken(Box::new(e))),
                }
            }
        }
    }

    fn passive_result(&self, ok: bool, passive: &Passive) {
        if ok {
            if self.consecutive_failures.load(Ordering::Relaxed) != 0 {
                self.consecutive_failures.store(0, Ordering::Relaxed);
            }
            return;
        }
        if passive.consecutive_failures == 0 {
            return;
        }
        let n = self.consecutive_failures.fetch_add(1, Ordering::Relaxed) + 1;
        if n >= passive.consecutive_failures {
            self.consecutive_failures.store(0, Ordering::Relaxed);
            let until = now_ms().saturating_add(
                u64::try_from(passive.ejection_time.as_millis()).unwrap_or(u64::MAX),
            );
            self.metrics.set_healthy(false);
            self.ejected_until.store(until.max(1), Ordering::Relaxed);
            tracing::warn!(
                origin = %self.group,
                endpoint = %self.authority,
                failures = n,
                ejection_secs = passive.ejection_time.as_secs_f64(),
                "Endpoint ejected after consecutive failures."
            );
        }
    }

    /// Records an active check verdict change.
    fn set_active(&self, ok: bool) {
        // Gauge first: whoever sees the new verdict (admin API, tests) sees the gauge agree.
        self.metrics.set_healthy(ok && !self.is_ejected());
        self.active_ok.store(ok, Ordering::Release);
    }
}

/// A built origin group.
#[derive(Debug)]
pub struct OriginGroup {
    /// Name from config.
    pub name: String,
    /// Endpoints in config order.
    pub endpoints: Vec<Arc<Endpoint>>,
    /// Default response timeout.
    pub response_timeout: Duration,
    /// Passive ejection settings.
    pub passive: Passive,
    /// The node's location, where clients with no location of their own are placed.
    home: GeoPoint,
    /// Indexes into `endpoints`, nearest to `home` first: most requests rank from there, and
    /// ranking costs a haversine (five trigonometric calls) per endpoint.
    home_order: Vec<usize>,
}

impl OriginGroup {
    /// Available endpoints, nearest first.
    pub fn nearest_available(&self, at: GeoPoint) -> Vec<Arc<Endpoint>> {
        if let [only] = self.endpoints.as_slice() {
            // Nothing to rank: no distance to compute.
            return if only.is_available() {
                vec![only.clone()]
            } else {
                Vec::new()
            };
        }
        if at == self.home {
            return self
                .home_order
                .iter()
                .filter_map(|&i| self.endpoints.get(i))
                .filter(|e| e.is_available())
                .cloned()
                .collect();
        }
        let mut ranked: Vec<(f64, &Arc<Endpoint>)> = self
            .endpoints
            .iter()
            .filter(|e| e.is_available())
            .map(|e| (distance_km(at, e.location), e))
            .collect();
        ranked.sort_by(|a, b| a.0.total_cmp(&b.0));
        ranked.into_iter().map(|(_, e)| e.clone()).collect()
    }
}

/// All origin groups of one config, plus the health-check tasks that watch them.
pub struct Origins {
    groups: HashMap<String, Arc<OriginGroup>>,
    /// Stops this generation's health checks when the config is replaced and drained.
    _health: DropGuard,
}

impl std::fmt::Debug for Origins {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Origins")
            .field("groups", &self.groups.keys())
            .finish()
    }
}

/// Why origins could not be built.
#[derive(Debug, thiserror::Error)]
#[error("origin `{group}` endpoint `{url}`: {reason}")]
pub struct OriginBuildError {
    group: String,
    url: String,
    reason: String,
}

impl Origins {
    /// Builds the groups, reusing endpoints of `previous` whose settings are unchanged, and
    /// starts active health checks. Must run inside a Tokio runtime.
    pub fn build(
        config: &outpost_config::Config,
        previous: Option<&Origins>,
        metrics: &Metrics,
    ) -> Result<Origins, OriginBuildError> {
        let mut reusable: HashMap<EndpointKey, Arc<Endpoint>> = HashMap::new();
        if let Some(prev) = previous {
            for group in prev.groups.values() {
                for e in &group.endpoints {
                    reusable.insert(e.key.clone(), e.clone());
                }
            }
        }
        let cancel = CancellationToken::new();
        let mut groups = HashMap::new();
        for (name, cfg) in &config.origins {
            let mut endpoints = Vec::new();
            for ep in &cfg.endpoints {
                let key = key_for(name, cfg, &ep.url);
                let endpoint = match reusable.get(&key) {
                    Some(e) if *e.region == *ep.region && e.location == ep.location => e.clone(),
                    _ => Arc::new(Endpoint::new(&key, ep, &config.base_dir, metrics).map_err(
                        |reason| OriginBuildError {
                            group: name.clone(),
                            url: ep.url.clone(),
                            reason,
                        },
                    )?),
                };
                if let Some(hc) = &cfg.health_check {
                    health::spawn(endpoint.clone(), hc.clone(), cancel.child_token());
                } else if !endpoint.actively_healthy() {
                    // Health checks were removed from config: nothing will clear the old verdict.
                    endpoint.set_active(true);
                }
                endpoints.push(endpoint);
            }
            let home = config.node.location;
            let mut home_order: Vec<usize> = (0..endpoints.len()).collect();
            // Stable, as the ranking of available endpoints is: ties keep config order.
            home_order.sort_by(|&a, &b| {
                let d = |i: usize| distance_km(home, endpoints[i].location);
                d(a).total_cmp(&d(b))
            });
            groups.insert(
                name.clone(),
                Arc::new(OriginGroup {
                    name: name.clone(),
                    endpoints,
                    response_timeout: cfg.response_timeout,
                    passive: cfg.passive.clone(),
                    home,
                    home_order,
                }),
            );
        }
        Ok(Origins {
            groups,
            _health: cancel.drop_guard(),
        })
    }

    /// A group by name.
    pub fn group(&self, name: &str) -> Option<&Arc<OriginGroup>> {
        self.groups.get(name)
    }

    /// Every group, for the admin API.
    pub fn groups(&self) -> impl Iterator<Item = &Arc<OriginGroup>> {
        self.groups.values()
    }
}

fn key_for(group: &str, cfg: &OriginConfig, url: &str) -> EndpointKey {
    EndpointKey {
        group: group.to_owned(),
        url: url.to_owned(),
        protocol: cfg.protocol,
        connect_timeout: cfg.connect_timeout,
        pool_idle_timeout: cfg.pool_idle_timeout,
        pool_max_idle: cfg.pool_max_idle_per_endpoint,
        tls: cfg.tls.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A node in Tokyo in front of four regional endpoints (two of them in the same place).
    fn origins() -> Origins {
        let toml = r#"
version = 1
[node]
id = "tokyo-1"
region = "ap-northeast"
location = { lat = 35.68, lon = 139.69 }
[[listeners]]
addr = "127.0.0.1:0"
[origins.api]
[[origins.api.endpoints]]
url = "http://127.0.0.1:9001"
region = "eu-west"
location = { lat = 53.35, lon = -6.26 }
[[origins.api.endpoints]]
url = "http://127.0.0.1:9002"
region = "us-west"
location = { lat = 45.52, lon = -122.68 }
[[origins.api.endpoints]]
url = "http://127.0.0.1:9003"
region = "ap-south"
location = { lat = 1.35, lon = 103.82 }
[[origins.api.endpoints]]
url = "http://127.0.0.1:9004"
region = "us-west-b"
location = { lat = 45.52, lon = -122.68 }
[[routes]]
name = "api"
path_prefix = "/"
origin = "api"
"#;
        let config = outpost_config::Config::parse(toml, "test.toml", std::path::Path::new("."))
            .expect("config");
        Origins::build(&config, None, &Metrics::new("test")).expect("origins")
    }

    fn regions(ranked: &[Arc<Endpoint>]) -> Vec<&str> {
        ranked.iter().map(|e| &*e.region).collect()
    }

    /// Ranking from the node's own place uses the order computed at build, and agrees with
    /// ranking from a point next to it (computed per request), whatever is available; ties
    /// keep config order.
    #[tokio::test]
    async fn the_precomputed_home_ranking_matches_the_computed_one() {
        let origins = origins();
        let group = origins.group("api").expect("group");
        let home = GeoPoint {
            lat: 35.68,
            lon: 139.69,
        };
        let beside = GeoPoint {
            lat: 35.68 + 1e-9,
            lon: 139.69,
        };
        assert_eq!(
            regions(&group.nearest_available(home)),
            ["ap-south", "us-west", "us-west-b", "eu-west"]
        );
        for down in 0..group.endpoints.len() {
            group.endpoints[down].set_active(false);
            assert_eq!(
                regions(&group.nearest_available(home)),
                regions(&group.nearest_available(beside)),
                "endpoint {down} down"
            );
            assert_eq!(group.nearest_available(home).len(), 3);
            group.endpoints[down].set_active(true);
        }
        // From Dublin the order is another, computed per request.
        let dublin = GeoPoint {
            lat: 53.3,
            lon: -6.2,
        };
        assert_eq!(regions(&group.nearest_available(dublin))[0], "eu-west");
    }
}
