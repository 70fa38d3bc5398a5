//! The configuration model: one struct per section of `outpost.toml`.
//!
//! Every struct denies unknown keys (a typo is an error with a did-you-mean, never silently
//! ignored), durations are humantime strings (`"30s"`, `"250ms"`) and sizes are byte counts or
//! strings such as `"10 MiB"`.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use bytesize::ByteSize;
use ipnet::IpNet;
use serde::Deserialize;

/// The whole node configuration, as read from one TOML file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Format version, so a future incompatible format is refused instead of misread.
    pub version: u32,
    /// Who this node is and where it stands; the location is the fallback client location.
    pub node: Node,
    /// Public listeners; a node needs at least one.
    #[serde(default)]
    pub listeners: Vec<Listener>,
    /// The operator's listener (metrics, health, later purge and deploys).
    #[serde(default)]
    pub admin: Admin,
    /// Log format and the access log switch.
    #[serde(default)]
    pub log: Log,
    /// Limits and timeouts that protect the node from slow or oversized clients.
    #[serde(default)]
    pub server: Server,
    /// How the node decides where a client is, which drives nearest-origin selection.
    #[serde(default)]
    pub client_location: ClientLocation,
    /// Named origin groups; routes refer to them by name.
    #[serde(default)]
    pub origins: BTreeMap<String, OriginGroup>,
    /// Routes, matched by host and longest path prefix.
    #[serde(default)]
    pub routes: Vec<Route>,
    /// The node's HTTP cache (shared by every route that enables caching).
    #[serde(default)]
    pub cache: Cache,
    /// The node's key for signing the identity it forwards to origins.
    #[serde(default)]
    pub identity: Identity,
    /// A/B experiments; routes name the ones they take part in.
    #[serde(default)]
    pub experiments: Vec<Experiment>,
    /// The node's local store (KV, CRDTs) under `[node] data_dir`.
    #[serde(default)]
    pub state: State,
    /// Joining a fleet over NATS JetStream; absent = the node works alone on its local store.
    #[serde(default)]
    pub fleet: Option<Fleet>,
    /// Edge analytics: the public events endpoint and per-window summaries for the center.
    #[serde(default)]
    pub analytics: Analytics,
    /// WebAssembly functions (`wasi:http` components) that routes can run instead of, or in
    /// front of, an origin.
    #[serde(default)]
    pub functions: BTreeMap<String, Function>,
    /// The node's WebAssembly engine: how many function instances may run at once.
    #[serde(default)]
    pub wasm: Wasm,
    /// Directory of the config file, for resolving relative paths; not part of the TOML.
    #[serde(skip)]
    pub base_dir: PathBuf,
}

/// A point on Earth in decimal degrees.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GeoPoint {
    /// Latitude, −90 to 90.
    pub lat: f64,
    /// Longitude, −180 to 180.
    pub lon: f64,
}

/// Identity of this edge node.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Node {
    /// Stable node name, shown in `X-Served-By`, `Via` and logs.
    pub id: String,
    /// Region label of the node (free text, e.g. `ap-northeast`).
    #[serde(default)]
    pub region: Option<String>,
    /// Where the node stands; used when nothing better is known about a client.
    pub location: GeoPoint,
    /// Worker threads; 0 = one per CPU the process may run on. With one worker the node runs a
    /// single-threaded event loop (no cross-thread scheduling), like one nginx worker.
    #[serde(default)]
    pub workers: usize,
    /// Directory for what the node must not forget (the SQLite store); relative to the config
    /// file. Give every node its own.
    #[serde(default = "default_data_dir")]
    pub data_dir: PathBuf,
}

fn default_data_dir() -> PathBuf {
    PathBuf::from("outpost-data")
}

/// A route's outbox: store-and-forward for writes.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteOutbox {
    /// `fallback`: try the center first and keep the write only when it is unreachable
    /// (connect failure, timeout, 502/503/504); `always`: keep every write and answer 202 at
    /// once (write-behind).
    #[serde(default)]
    pub mode: OutboxMode,
    /// Writes with the same key are delivered in the order they were accepted: `route` (one
    /// queue for the route) or `header:<name>` (e.g. `header:x-store-id`).
    #[serde(default = "default_order_key")]
    pub order_key: String,
    /// Most writes waiting for this route; beyond it new writes get 507.
    #[serde(default = "default_outbox_entries")]
    pub max_entries: u64,
    /// Most body bytes waiting for this route.
    #[serde(default = "default_outbox_bytes")]
    pub max_bytes: ByteSize,
    /// First retry delay; doubles (with jitter) up to `retry_max`.
    #[serde(default = "default_retry_initial", with = "humantime_serde")]
    pub retry_initial: Duration,
    /// Longest delay between two attempts.
    #[serde(default = "default_retry_max", with = "humantime_serde")]
    pub retry_max: Duration,
}

/// When the outbox keeps a write.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OutboxMode {
    /// Only when the center cannot take it now.
    #[default]
    Fallback,
    /// Always (write-behind: the client never waits for the center).
    Always,
}

fn default_order_key() -> String {
    "route".to_owned()
}
fn default_outbox_entries() -> u64 {
    100_000
}
fn default_outbox_bytes() -> ByteSize {
    ByteSize::gib(1)
}
fn default_retry_initial() -> Duration {
    Duration::from_secs(1)
}
fn default_retry_max() -> Duration {
    Duration::from_secs(300)
}

/// Local store settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct State {
    /// How long deleted and expired keys are remembered so that a late, older write cannot
    /// bring them back; a node offline longer than this should be wiped before rejoining.
    #[serde(default = "default_tombstone_ttl", with = "humantime_serde")]
    pub tombstone_ttl: Duration,
    /// Largest KV value (and register or map value).
    #[serde(default = "default_max_value_size")]
    pub max_value_size: ByteSize,
    /// How often expired keys are swept into tombstones.
    #[serde(default = "default_sweep_interval", with = "humantime_serde")]
    pub sweep_interval: Duration,
}

impl Default for State {
    fn default() -> Self {
        State {
            tombstone_ttl: default_tombstone_ttl(),
            max_value_size: default_max_value_size(),
            sweep_interval: default_sweep_interval(),
        }
    }
}

fn default_tombstone_ttl() -> Duration {
    Duration::from_secs(7 * 24 * 3600)
}
fn default_max_value_size() -> ByteSize {
    ByteSize::mib(1)
}
fn default_sweep_interval() -> Duration {
    Duration::from_secs(30)
}

/// Edge analytics: events posted to `/.well-known/outpost/events` are kept in
/// `<data_dir>/analytics.db` and rolled up into one summary per window for the center.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Analytics {
    /// Accept events on the public listeners (off: the endpoint answers 404).
    #[serde(default)]
    pub enabled: bool,
    /// Length of a summary window; the center gets one summary per node and window.
    #[serde(default = "default_analytics_window", with = "humantime_serde")]
    pub window: Duration,
    /// How long after a window ends it still waits for stragglers before it is summarised.
    #[serde(default = "default_analytics_grace", with = "humantime_serde")]
    pub grace: Duration,
    /// Keys listed by name per event type in a summary; the rest are counted as `other`.
    #[serde(default = "default_top_keys")]
    pub top_keys: usize,
    /// How long raw events (and delivered summaries) are kept at the node.
    #[serde(default = "default_analytics_retention", with = "humantime_serde")]
    pub retention: Duration,
    /// Largest events request body; beyond it the node answers 413.
    #[serde(default = "default_max_batch_bytes")]
    pub max_batch_bytes: ByteSize,
    /// Where summaries are POSTed (`http(s)://…/analytics/summaries`) when they do not go
    /// over the fleet.
    #[serde(default)]
    pub center_url: Option<String>,
    /// How summaries reach the center: `auto` (NATS when `[fleet]` is set, else
    /// `center_url`), `nats` or `http`.
    #[serde(default)]
    pub send_via: SendVia,
}

impl Default for Analytics {
    fn default() -> Self {
        Analytics {
            enabled: false,
            window: default_analytics_window(),
            grace: default_analytics_grace(),
            top_keys: default_top_keys(),
            retention: default_analytics_retention(),
            max_batch_bytes: default_max_batch_bytes(),
            center_url: None,
            send_via: SendVia::default(),
        }
    }
}

/// The way analytics summaries travel to the center.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SendVia {
    /// NATS JetStream when the node is in a fleet, HTTP to `center_url` otherwise.
    #[default]
    Auto,
    /// JetStream subject `outpost.analytics.<node id>` (needs `[fleet]`).
    Nats,
    /// HTTP POST to `center_url`.
    Http,
}

impl SendVia {
    /// The lowercase name.
    pub fn as_str(self) -> &'static str {
        match self {
            SendVia::Auto => "auto",
            SendVia::Nats => "nats",
            SendVia::Http => "http",
        }
    }
}

fn default_analytics_window() -> Duration {
    Duration::from_secs(60)
}
fn default_analytics_grace() -> Duration {
    Duration::from_secs(5)
}
fn default_top_keys() -> usize {
    50
}
fn default_analytics_retention() -> Duration {
    Duration::from_secs(24 * 3600)
}
fn default_max_batch_bytes() -> ByteSize {
    ByteSize::mib(1)
}

/// The fleet backbone: a NATS server with JetStream (usually the site's leaf node).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Fleet {
    /// Server URLs, comma-separated: `nats://host:4222` or `tls://host:4222`.
    pub nats: String,
    /// NATS credentials file (JWT + nkey seed), relative to the config file.
    #[serde(default)]
    pub credentials_file: Option<PathBuf>,
    /// File holding a NATS auth token (first line), relative to the config file.
    #[serde(default)]
    pub token_file: Option<PathBuf>,
    /// TLS to the NATS server.
    #[serde(default)]
    pub tls: Option<FleetTls>,
    /// JetStream domain of the hub, when the node talks to a site's leaf node whose own
    /// server has no JetStream (the hub's `jetstream { domain = … }`).
    #[serde(default)]
    pub jetstream_domain: Option<String>,
    /// How long the replication stream keeps deltas; a node away longer catches up from
    /// snapshots (anti-entropy) instead.
    #[serde(default = "default_delta_retention", with = "humantime_serde")]
    pub delta_retention: Duration,
    /// How often changed objects are re-published in full for anti-entropy.
    #[serde(default = "default_snapshot_interval", with = "humantime_serde")]
    pub snapshot_interval: Duration,
    /// JetStream replicas for the fleet's streams (1 for one server, 3 for a cluster).
    #[serde(default = "default_stream_replicas")]
    pub stream_replicas: usize,
    /// Apply cache invalidations published by the center on `outpost.invalidate`.
    #[serde(default = "yes")]
    pub invalidations: bool,
    /// How often the node puts its heartbeat (fleet status); a node silent for three
    /// intervals drops out.
    #[serde(default = "default_heartbeat_interval", with = "humantime_serde")]
    pub heartbeat_interval: Duration,
    /// The window heartbeat figures (request rate, error rate, p99, hit ratio) cover.
    #[serde(default = "default_health_window", with = "humantime_serde")]
    pub health_window: Duration,
    /// A node whose error rate over the window reaches this (0.01 = 1 %) is unhealthy.
    #[serde(default = "default_unhealthy_error_rate")]
    pub unhealthy_error_rate: f64,
    /// A node whose p99 over the window reaches this is unhealthy.
    #[serde(default = "default_unhealthy_p99", with = "humantime_serde")]
    pub unhealthy_p99: Duration,
}

fn default_heartbeat_interval() -> Duration {
    Duration::from_secs(5)
}
fn default_health_window() -> Duration {
    Duration::from_secs(300)
}
fn default_unhealthy_error_rate() -> f64 {
    0.01
}
fn default_unhealthy_p99() -> Duration {
    Duration::from_millis(200)
}

/// TLS settings for the NATS connection.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FleetTls {
    /// PEM CA bundle that signs the server's certificate.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// PEM client certificate, for servers that verify clients.
    #[serde(default)]
    pub client_cert: Option<PathBuf>,
    /// PEM private key of `client_cert`.
    #[serde(default)]
    pub client_key: Option<PathBuf>,
}

fn default_delta_retention() -> Duration {
    Duration::from_secs(24 * 3600)
}
fn default_snapshot_interval() -> Duration {
    Duration::from_secs(30)
}
fn default_stream_replicas() -> usize {
    1
}

/// One public listener.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Listener {
    /// `ip:port` to bind; port 0 picks a free port (tests).
    pub addr: String,
    /// Serve HTTPS with these PEM files; ALPN offers h2 and http/1.1.
    #[serde(default)]
    pub tls: Option<Tls>,
    /// Accept HTTP/2 (h2c prior knowledge on plain listeners, ALPN `h2` on TLS).
    #[serde(default = "yes")]
    pub http2: bool,
}

/// Certificate chain and private key files for a TLS listener.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Tls {
    /// PEM certificate chain, leaf first; relative to the config file.
    pub cert: PathBuf,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1); relative to the config file.
    pub key: PathBuf,
}

/// The admin listener: loopback by default, token required for anything that changes state.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Admin {
    /// `ip:port` of the admin API.
    #[serde(default = "default_admin_addr")]
    pub addr: String,
    /// Bearer token for mutating admin calls; `OUTPOST_ADMIN_TOKEN` overrides it.
    #[serde(default)]
    pub token: Option<String>,
    /// File holding the token (first line), for secrets kept out of the config.
    #[serde(default)]
    pub token_file: Option<PathBuf>,
}

impl Default for Admin {
    fn default() -> Self {
        Admin {
            addr: default_admin_addr(),
            token: None,
            token_file: None,
        }
    }
}

/// Log output settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Log {
    /// `auto` (JSON when stdout is not a terminal), `json` or `text`.
    #[serde(default)]
    pub format: LogFormat,
    /// A tracing filter such as `info` or `outpost_proxy=debug,info`; `RUST_LOG` overrides it.
    #[serde(default = "default_log_level")]
    pub level: String,
    /// One line per request at info level; off for benchmarks.
    #[serde(default = "yes")]
    pub access_log: bool,
}

impl Default for Log {
    fn default() -> Self {
        Log {
            format: LogFormat::Auto,
            level: default_log_level(),
            access_log: true,
        }
    }
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// JSON when stdout is not a terminal, readable text when it is.
    #[default]
    Auto,
    /// Always one JSON object per line.
    Json,
    /// Always human-readable text.
    Text,
}

/// Server-wide protections against slow, oversized or malformed clients.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Server {
    /// Largest request head (request line + headers) accepted; larger → 431.
    #[serde(default = "default_max_header_bytes")]
    pub max_header_bytes: ByteSize,
    /// Most header fields accepted in one request; more → 431.
    #[serde(default = "default_max_headers")]
    pub max_headers: usize,
    /// A client must send its whole request head within this time (slowloris guard).
    #[serde(default = "default_header_read_timeout", with = "humantime_serde")]
    pub header_read_timeout: Duration,
    /// A client that takes nothing of a response for this long is disconnected (nginx's
    /// `send_timeout`): it would otherwise hold its connection, and an origin connection, for ever.
    #[serde(default = "default_send_timeout", with = "humantime_serde")]
    pub send_timeout: Duration,
    /// Largest request body for routes that do not set their own; larger → 413.
    #[serde(default = "default_max_body_bytes")]
    pub max_body_bytes: ByteSize,
    /// On SIGTERM, how long in-flight requests may take to finish before the node exits.
    #[serde(default = "default_drain_timeout", with = "humantime_serde")]
    pub drain_timeout: Duration,
    /// An upgraded connection (WebSocket) over which no byte has gone either way for this long
    /// is closed: a peer that vanished without a close would otherwise hold it, and an origin
    /// connection, for ever.
    #[serde(default = "default_tunnel_idle_timeout", with = "humantime_serde")]
    pub tunnel_idle_timeout: Duration,
    /// Most concurrent client connections; beyond this, new connections wait in the kernel backlog.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// Request headers the origin trusts as set by the edge (besides every `x-outpost-*`):
    /// removed from every client request, so a client can never forge them.
    #[serde(default)]
    pub internal_headers: Vec<String>,
}

impl Default for Server {
    fn default() -> Self {
        Server {
            max_header_bytes: default_max_header_bytes(),
            max_headers: default_max_headers(),
            header_read_timeout: default_header_read_timeout(),
            send_timeout: default_send_timeout(),
            max_body_bytes: default_max_body_bytes(),
            drain_timeout: default_drain_timeout(),
            tunnel_idle_timeout: default_tunnel_idle_timeout(),
            max_connections: default_max_connections(),
            internal_headers: Vec::new(),
        }
    }
}

/// Where client locations come from, in order: trusted headers, the network table, the node.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientLocation {
    /// Peers whose `X-Forwarded-For`, location and request-id headers are believed.
    #[serde(default)]
    pub trusted_proxies: Vec<IpNet>,
    /// Header carrying the client's latitude (trusted peers only).
    #[serde(default = "default_lat_header")]
    pub lat_header: String,
    /// Header carrying the client's longitude (trusted peers only).
    #[serde(default = "default_lon_header")]
    pub lon_header: String,
    /// Header carrying the client's ISO 3166-1 alpha-2 country (trusted peers only).
    #[serde(default = "default_country_header")]
    pub country_header: String,
    /// Header carrying the client's region (ISO 3166-2 subdivision such as `JP-13`, or the CDN's
    /// region name; trusted peers only), passed to functions.
    #[serde(default = "default_region_header")]
    pub region_header: String,
    /// Known networks and where they are, for clients that come without trusted headers.
    #[serde(default)]
    pub networks: Vec<Network>,
}

impl Default for ClientLocation {
    fn default() -> Self {
        ClientLocation {
            trusted_proxies: Vec::new(),
            lat_header: default_lat_header(),
            lon_header: default_lon_header(),
            country_header: default_country_header(),
            region_header: default_region_header(),
            networks: Vec::new(),
        }
    }
}

/// A CIDR block and where its clients are.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Network {
    /// The block, e.g. `203.0.113.0/24`; the most specific block wins.
    pub cidr: IpNet,
    /// Where the block's clients are.
    pub location: GeoPoint,
    /// ISO country code of the block, if known.
    #[serde(default)]
    pub country: Option<String>,
}

/// A named set of origin endpoints serving the same application in different regions.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OriginGroup {
    /// Protocol spoken to the endpoints.
    #[serde(default)]
    pub protocol: OriginProtocol,
    /// Time allowed to open a TCP connection; a failure here moves to the next-nearest endpoint.
    #[serde(default = "default_connect_timeout", with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Time allowed from sending the request to receiving the response head → 504 after it.
    #[serde(default = "default_response_timeout", with = "humantime_serde")]
    pub response_timeout: Duration,
    /// How long an idle pooled connection is kept. Keep it below the origin's own keep-alive
    /// timeout (uvicorn closes idle connections after 5 s) or requests race a closing socket.
    #[serde(default = "default_pool_idle_timeout", with = "humantime_serde")]
    pub pool_idle_timeout: Duration,
    /// Most idle pooled connections kept per endpoint.
    #[serde(default = "default_pool_max_idle")]
    pub pool_max_idle_per_endpoint: usize,
    /// Active health checks; without this section only passive ejection applies.
    #[serde(default)]
    pub health_check: Option<HealthCheck>,
    /// Passive ejection of endpoints that fail in live traffic.
    #[serde(default)]
    pub passive: Passive,
    /// The endpoints; at least one.
    #[serde(default)]
    pub endpoints: Vec<Endpoint>,
    /// TLS settings for `https://` endpoints (system roots by default).
    #[serde(default)]
    pub tls: Option<OriginTls>,
}

/// How the node verifies (and authenticates to) HTTPS origins.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OriginTls {
    /// PEM CA bundle to trust instead of the system roots (a private PKI).
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// PEM client certificate chain for mutual TLS.
    #[serde(default)]
    pub client_cert: Option<PathBuf>,
    /// PEM private key of the client certificate.
    #[serde(default)]
    pub client_key: Option<PathBuf>,
    /// Name to verify the certificate against instead of the URL's host.
    #[serde(default)]
    pub server_name: Option<String>,
}

/// Protocol spoken to an origin.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OriginProtocol {
    /// HTTP/1.1 with keep-alive.
    #[default]
    Http1,
    /// HTTP/2 with prior knowledge (h2c); one multiplexed connection per endpoint.
    H2,
}

/// Active health check settings of an origin group.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthCheck {
    /// Path requested with GET; a 2xx answer counts as healthy.
    #[serde(default = "default_health_path")]
    pub path: String,
    /// Time between checks of one endpoint.
    #[serde(default = "default_health_interval", with = "humantime_serde")]
    pub interval: Duration,
    /// Time a check may take before it counts as failed.
    #[serde(default = "default_health_timeout", with = "humantime_serde")]
    pub timeout: Duration,
    /// Consecutive successes that bring an unhealthy endpoint back.
    #[serde(default = "default_healthy_threshold")]
    pub healthy_threshold: u32,
    /// Consecutive failures that take a healthy endpoint out.
    #[serde(default = "default_unhealthy_threshold")]
    pub unhealthy_threshold: u32,
}

/// Passive ejection: live-traffic failures take an endpoint out for a while.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Passive {
    /// Consecutive connect failures, timeouts or 502/503/504 answers that eject; 0 disables.
    #[serde(default = "default_consecutive_failures")]
    pub consecutive_failures: u32,
    /// How long an ejected endpoint is skipped before it gets traffic again.
    #[serde(default = "default_ejection_time", with = "humantime_serde")]
    pub ejection_time: Duration,
}

impl Default for Passive {
    fn default() -> Self {
        Passive {
            consecutive_failures: default_consecutive_failures(),
            ejection_time: default_ejection_time(),
        }
    }
}

/// One regional deployment of an origin.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Endpoint {
    /// `http://host:port`, no path.
    pub url: String,
    /// Region label, reported in logs and used by residency rules.
    pub region: String,
    /// Where the endpoint is; the nearest healthy endpoint to the client is chosen.
    pub location: GeoPoint,
}

/// A route: which requests go where.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Route {
    /// Unique name; the `route` label on metrics and the access log.
    pub name: String,
    /// Host to match: exact (`shop.example.com`), wildcard (`*.example.com`) or absent for any.
    #[serde(default)]
    pub host: Option<String>,
    /// Path prefix to match on segment boundaries; the longest match wins.
    #[serde(default = "default_path_prefix")]
    pub path_prefix: String,
    /// Origin group that serves the route.
    pub origin: String,
    /// Remove the prefix before forwarding (and send `X-Forwarded-Prefix`).
    #[serde(default)]
    pub strip_prefix: bool,
    /// Keep unsafe requests the center cannot take now, and deliver them later (exactly once
    /// with the center's idempotency helper).
    #[serde(default)]
    pub outbox: Option<RouteOutbox>,
    /// Origin group for unsafe methods (POST, PUT, PATCH, DELETE …): reads are served near
    /// the user (edge cache, regional replicas in `origin`), writes go to the center.
    #[serde(default)]
    pub write_origin: Option<String>,
    /// Response timeout for this route, overriding the origin group's.
    #[serde(default, with = "humantime_serde")]
    pub timeout: Option<Duration>,
    /// Largest request body for this route, overriding `[server] max_body_bytes`.
    #[serde(default)]
    pub max_body_bytes: Option<ByteSize>,
    /// Edge caching for this route; absent = responses are never stored.
    #[serde(default)]
    pub cache: Option<RouteCache>,
    /// JWT validation at the edge; absent = no authentication on this route.
    #[serde(default)]
    pub auth: Option<RouteAuth>,
    /// Send the origin a signed `x-outpost-identity` (subject, selected claims, geo, node,
    /// request id), verifiable against the node's JWKS.
    #[serde(default)]
    pub forward_identity: bool,
    /// Carry WebSockets to the origin (handshakes go through the guards; the origin decides);
    /// `false` answers a handshake as a plain request, without `Upgrade`.
    #[serde(default = "yes")]
    pub websocket: bool,
    /// GCRA rate limits; a request must pass all of them.
    #[serde(default)]
    pub rate_limits: Vec<RateLimit>,
    /// Country rules (451 when refused).
    #[serde(default)]
    pub geo: Option<RouteGeo>,
    /// Origin regions this route's requests may go to; with none of them available the
    /// request fails (503) rather than leave them. Empty = any region.
    #[serde(default)]
    pub residency: Vec<String>,
    /// Experiments this route takes part in: each request gets a sticky variant, forwarded in
    /// `x-outpost-variant` (and the identity), and part of the cache key.
    #[serde(default)]
    pub experiments: Vec<String>,
    /// A function (`[functions.<name>]`) that handles this route's requests after the guards;
    /// it reaches `origin` (and the groups the function lists) as `http://<group>/…`.
    #[serde(default)]
    pub function: Option<String>,
    /// A fixed answer from the node itself (maintenance pages, health probes, `robots.txt`),
    /// like nginx's `return`; the origin is never asked.
    #[serde(default)]
    pub respond: Option<RouteRespond>,
}

/// A fixed response a route answers with.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteRespond {
    /// Status code (default 200).
    #[serde(default = "default_respond_status")]
    pub status: u16,
    /// Response body.
    #[serde(default)]
    pub body: String,
    /// `Content-Type` (default `text/plain; charset=utf-8`).
    #[serde(default = "default_respond_type")]
    pub content_type: String,
}

fn default_respond_status() -> u16 {
    200
}

fn default_respond_type() -> String {
    "text/plain; charset=utf-8".into()
}

/// One WebAssembly function: a `wasi:http/proxy` component and its sandbox.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Function {
    /// The `.wasm` component, relative to the config file. Deployed as a new version when its
    /// content changes; `outpost fn deploy` adds versions without touching the config.
    pub component: PathBuf,
    /// Wall-clock budget per request, response body included (→ 504 before the headers, a
    /// cut-off body after).
    #[serde(default = "default_fn_timeout", with = "humantime_serde")]
    pub timeout: Duration,
    /// Linear memory limit per instance (→ 500 when exceeded).
    #[serde(default = "default_fn_memory")]
    pub memory: ByteSize,
    /// Origin groups the function may call besides its route's `origin` and `write_origin`.
    #[serde(default)]
    pub origins: Vec<String>,
    /// Values the guest reads through `wasi:config/store`.
    #[serde(default)]
    pub config: BTreeMap<String, String>,
    /// Secrets for `wasi:config/store`: key → name of an environment variable of the node
    /// read at start, so the value never sits in the config file.
    #[serde(default)]
    pub config_env: BTreeMap<String, String>,
    /// KV namespace behind the guest's `wasi:keyvalue` bucket (default `fn.<name>`).
    #[serde(default)]
    pub kv_namespace: Option<String>,
}

fn default_fn_timeout() -> Duration {
    Duration::from_secs(10)
}

fn default_fn_memory() -> ByteSize {
    ByteSize::mib(128)
}

/// The WebAssembly engine shared by every function.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Wasm {
    /// Function instances that may run at once across all functions; one more gets 503.
    /// Each reserves address space (not memory) up front.
    #[serde(default = "default_wasm_instances")]
    pub max_instances: u32,
    /// Where compiled components are kept (relative to the config file); default
    /// `<data_dir>/functions/cache`. Nodes on one machine may share it.
    #[serde(default)]
    pub cache_dir: Option<PathBuf>,
}

impl Default for Wasm {
    fn default() -> Self {
        Wasm {
            max_instances: default_wasm_instances(),
            cache_dir: None,
        }
    }
}

fn default_wasm_instances() -> u32 {
    256
}

/// An A/B experiment.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Experiment {
    /// Name, referred to by routes.
    pub name: String,
    /// Cookie pinning a client to its variant (default `outpost_ab_<name>`).
    #[serde(default)]
    pub cookie: Option<String>,
    /// Variants and their weights.
    pub variants: Vec<Variant>,
}

/// One variant of an experiment.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Variant {
    /// Name (sent to the origin and stored in the cookie).
    pub name: String,
    /// Relative weight.
    pub weight: u32,
}

/// One rate limit of a route.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimit {
    /// Name shown in `RateLimit-Policy` and logs.
    pub name: String,
    /// What is counted: `ip`, `sub` (JWT subject), `header:<name>` or `route`.
    #[serde(default = "default_limit_key")]
    pub key: String,
    /// Requests allowed per `per`.
    pub rate: u32,
    /// The period `rate` applies to.
    #[serde(with = "humantime_serde")]
    pub per: Duration,
    /// Largest burst (default: `rate`).
    #[serde(default)]
    pub burst: Option<u32>,
}

/// Country rules of a route (ISO 3166-1 alpha-2 codes).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteGeo {
    /// Only these countries are admitted (clients of unknown country are refused).
    #[serde(default)]
    pub allow_countries: Vec<String>,
    /// These countries are refused.
    #[serde(default)]
    pub deny_countries: Vec<String>,
}

/// The node's identity-signing keys (Ed25519).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Identity {
    /// PEM (PKCS#8) Ed25519 private key, relative to the config file. Without it the node
    /// makes a fresh key at every start, and origins refetch the JWKS when they see its `kid`.
    #[serde(default)]
    pub key_file: Option<PathBuf>,
    /// Keys of earlier rotations, still published in the JWKS so that tokens signed with them
    /// verify until they expire.
    #[serde(default)]
    pub previous_key_files: Vec<PathBuf>,
    /// Lifetime of each identity token.
    #[serde(default = "default_identity_ttl", with = "humantime_serde")]
    pub ttl: Duration,
}

impl Default for Identity {
    fn default() -> Self {
        Identity {
            key_file: None,
            previous_key_files: Vec::new(),
            ttl: default_identity_ttl(),
        }
    }
}

/// Whether a route demands a token.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AuthMode {
    /// No valid token → 401.
    #[default]
    Required,
    /// No token → anonymous; an invalid token is still a 401.
    Optional,
}

/// JWT validation for one route.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteAuth {
    /// `required` or `optional`.
    #[serde(default)]
    pub mode: AuthMode,
    /// Expected `iss`; with `discovery = true` also where the OIDC discovery document is.
    #[serde(default)]
    pub issuer: Option<String>,
    /// Fetch `{issuer}/.well-known/openid-configuration` and use its `jwks_uri`.
    #[serde(default)]
    pub discovery: bool,
    /// A JWKS URL to fetch keys from (instead of discovery).
    #[serde(default)]
    pub jwks_url: Option<String>,
    /// Local key files: PEM public keys (RSA, EC P-256/P-384, Ed25519) or JWK/JWKS JSON.
    #[serde(default)]
    pub key_files: Vec<PathBuf>,
    /// Shared HS256 secret, for development; prefer `hs256_secret_env`.
    #[serde(default)]
    pub hs256_secret: Option<String>,
    /// Environment variable holding the HS256 secret.
    #[serde(default)]
    pub hs256_secret_env: Option<String>,
    /// Accepted algorithms (RS256, RS384, RS512, PS256, ES256, ES384, EdDSA, HS256); a token
    /// must use one of them *and* the key type it names.
    pub algorithms: Vec<String>,
    /// Accepted `aud` values; empty = `aud` not checked.
    #[serde(default)]
    pub audience: Vec<String>,
    /// Clock skew allowed on `exp` and `nbf`.
    #[serde(default = "default_leeway", with = "humantime_serde")]
    pub leeway: Duration,
    /// Cookie to read the token from when there is no `Authorization: Bearer`.
    #[serde(default)]
    pub cookie: Option<String>,
    /// Scopes the token must carry (`scope` string or `scp` list) → 403 otherwise.
    #[serde(default)]
    pub required_scopes: Vec<String>,
    /// Roles the token must carry (`roles` list) → 403 otherwise.
    #[serde(default)]
    pub required_roles: Vec<String>,
    /// Claims that must have exactly these string values → 403 otherwise.
    #[serde(default)]
    pub required_claims: BTreeMap<String, String>,
    /// Claims copied into the forwarded identity.
    #[serde(default)]
    pub forward_claims: Vec<String>,
    /// How often remote key sets are refreshed in the background.
    #[serde(default = "default_jwks_refresh", with = "humantime_serde")]
    pub jwks_refresh: Duration,
}

/// Storage shared by every cached route: a memory tier and an optional disk tier.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Cache {
    /// Bytes of responses (headers and bodies) kept in memory; admission and eviction are
    /// TinyLFU, so one-hit wonders do not push out popular objects.
    #[serde(default = "default_cache_memory")]
    pub memory_size: ByteSize,
    /// Directory of the disk tier, relative to the config file; absent = memory only. The
    /// disk tier survives restarts; corrupt entries are detected and dropped.
    #[serde(default)]
    pub disk_dir: Option<PathBuf>,
    /// Bytes the disk tier may use.
    #[serde(default = "default_cache_disk")]
    pub disk_size: ByteSize,
}

impl Default for Cache {
    fn default() -> Self {
        Cache {
            memory_size: default_cache_memory(),
            disk_dir: None,
            disk_size: default_cache_disk(),
        }
    }
}

/// Per-route caching policy. HTTP semantics (RFC 9111) apply first; these settings fill the
/// gaps an origin leaves and decide what forms the cache key.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteCache {
    /// Switch caching off without deleting the section.
    #[serde(default = "yes")]
    pub enabled: bool,
    /// Freshness for storable responses that carry no explicit lifetime (no `max-age`,
    /// `s-maxage` or `Expires`); without it the RFC 9111 heuristic (10% of the time since
    /// `Last-Modified`) applies.
    #[serde(default, with = "humantime_serde")]
    pub default_ttl: Option<Duration>,
    /// Freshness that replaces whatever the origin says, for origins that cannot be fixed.
    /// `no-store` and `private` are still obeyed.
    #[serde(default, with = "humantime_serde")]
    pub override_ttl: Option<Duration>,
    /// `stale-while-revalidate` window added when the origin sends none (RFC 5861).
    #[serde(default, with = "humantime_serde")]
    pub stale_while_revalidate: Option<Duration>,
    /// `stale-if-error` window added when the origin sends none (RFC 5861).
    #[serde(default, with = "humantime_serde")]
    pub stale_if_error: Option<Duration>,
    /// How long concurrent misses for one key wait for the first one's origin fetch before
    /// going to the origin themselves.
    #[serde(default = "default_lock_timeout", with = "humantime_serde")]
    pub lock_timeout: Duration,
    /// Largest response stored; larger ones stream through uncached.
    #[serde(default = "default_max_object_size")]
    pub max_object_size: ByteSize,
    /// Store 400 and 422 answers (FastAPI validation errors) when their headers allow it;
    /// off by default because they describe one client's bad input, not the resource.
    #[serde(default)]
    pub store_validation_errors: bool,
    /// Honour clients' `Cache-Control` request directives (`no-cache`, `max-age`,
    /// `max-stale`, `min-fresh`); off shields the origin from clients that force refetches.
    /// `no-store` and `only-if-cached` are always honoured.
    #[serde(default = "yes")]
    pub client_directives: bool,
    /// What, besides method, host, path and query, tells two requests apart.
    #[serde(default)]
    pub key: CacheKey,
}

/// The parts of a request that form its cache key.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CacheKey {
    /// Request headers whose values join the key (case-insensitive names).
    #[serde(default)]
    pub headers: Vec<String>,
    /// Cookies whose values join the key; other cookies are ignored by the key.
    #[serde(default)]
    pub cookies: Vec<String>,
    /// Query parameters left out of the key (tracking parameters such as `utm_source`); a
    /// trailing `*` matches a prefix (`utm_*`).
    #[serde(default)]
    pub ignore_query: Vec<String>,
    /// Sort query parameters so `?a=1&b=2` and `?b=2&a=1` share an entry.
    #[serde(default = "yes")]
    pub sort_query: bool,
}

impl Default for CacheKey {
    fn default() -> Self {
        CacheKey {
            headers: Vec::new(),
            cookies: Vec::new(),
            ignore_query: Vec::new(),
            sort_query: true,
        }
    }
}

fn yes() -> bool {
    true
}
fn default_admin_addr() -> String {
    "127.0.0.1:9901".to_owned()
}
fn default_log_level() -> String {
    "info".to_owned()
}
fn default_max_header_bytes() -> ByteSize {
    ByteSize::kib(64)
}
fn default_max_headers() -> usize {
    100
}
fn default_header_read_timeout() -> Duration {
    Duration::from_secs(10)
}
fn default_send_timeout() -> Duration {
    Duration::from_secs(60)
}
fn default_max_body_bytes() -> ByteSize {
    ByteSize::mib(100)
}
fn default_drain_timeout() -> Duration {
    Duration::from_secs(30)
}
fn default_tunnel_idle_timeout() -> Duration {
    Duration::from_secs(300)
}
fn default_max_connections() -> usize {
    10_000
}
fn default_lat_header() -> String {
    "x-user-lat".to_owned()
}
fn default_lon_header() -> String {
    "x-user-lon".to_owned()
}
fn default_country_header() -> String {
    "x-user-country".to_owned()
}
fn default_region_header() -> String {
    "x-user-region".to_owned()
}
fn default_connect_timeout() -> Duration {
    Duration::from_secs(2)
}
fn default_response_timeout() -> Duration {
    Duration::from_secs(30)
}
fn default_pool_idle_timeout() -> Duration {
    Duration::from_secs(4)
}
fn default_pool_max_idle() -> usize {
    64
}
fn default_health_path() -> String {
    "/healthz".to_owned()
}
fn default_health_interval() -> Duration {
    Duration::from_secs(5)
}
fn default_health_timeout() -> Duration {
    Duration::from_secs(2)
}
fn default_healthy_threshold() -> u32 {
    2
}
fn default_unhealthy_threshold() -> u32 {
    3
}
fn default_consecutive_failures() -> u32 {
    5
}
fn default_ejection_time() -> Duration {
    Duration::from_secs(30)
}
fn default_limit_key() -> String {
    "ip".to_owned()
}
fn default_identity_ttl() -> Duration {
    Duration::from_secs(60)
}
fn default_leeway() -> Duration {
    Duration::from_secs(30)
}
fn default_jwks_refresh() -> Duration {
    Duration::from_secs(300)
}
fn default_cache_memory() -> ByteSize {
    ByteSize::mib(256)
}
fn default_cache_disk() -> ByteSize {
    ByteSize::gib(1)
}
fn default_lock_timeout() -> Duration {
    Duration::from_secs(5)
}
fn default_max_object_size() -> ByteSize {
    ByteSize::mib(8)
}
fn default_path_prefix() -> String {
    "/".to_owned()
}
