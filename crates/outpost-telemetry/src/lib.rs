//! Outpost's telemetry: every metric defined once, log output set up once, one access-log shape.
//!
//! # Layout
//! - [`metrics`]: the Prometheus registry and typed handles (`outpost_` prefix, base units,
//!   bounded labels: route and origin names from config, status classes — never raw paths).
//! - [`logging`]: `tracing` subscriber setup — JSON lines when stdout is not a terminal.
//! - [`access`]: the access-log record written at the end of every request.
//!
//! Where it sits: the proxy records into these handles on the request path; the admin API
//! encodes the registry on `GET /metrics`.

pub mod access;
pub mod health;
pub mod logging;
pub mod metrics;

pub use metrics::{FleetMetrics, Metrics, OutboxEvent};
