//! Outpost's request path: from a client's bytes to an origin's response and back.
//!
//! # Layout (in the order a request meets them)
//! - [`server`]: listeners, TLS ([`tls`]), HTTP/1.1 + HTTP/2 connections, limits, drain.
//! - [`context`]: request id, W3C trace context, client IP and location ([`geo`]).
//! - [`routing`]: host + longest path prefix → route.
//! - [`handler`]: the pipeline that runs the stages for one request.
//! - [`origin`]: origin groups, nearest-healthy endpoint choice, pools, health, failover.
//! - [`filters`]: hop-by-hop stripping, forwarded headers, `Via`, `X-Served-By`, `Server-Timing`.
//! - [`error`]: every failure with its source and HTTP status, as problem+json.
//! - [`alarm`]: per-connection timers, re-armed lazily (header-read and response timeouts).
//! - [`tunnel`]: WebSocket upgrades: the client's and origin's connections joined after a 101.
//! - [`body`]: streaming body wrappers (limits, replay for failover, completion hooks).
//! - [`events`]: `POST /.well-known/outpost/events`, analytics batches into the node's
//!   analytics store (answered by the node, never forwarded).
//! - [`node`]: the config snapshot that requests read, swapped atomically on reload.

pub mod alarm;
pub mod body;
pub mod context;
pub mod error;
pub mod events;
pub mod filters;
mod function;
pub mod geo;
pub mod handler;
pub mod node;
pub mod origin;
pub mod outbox;
pub mod routing;
pub mod server;
pub mod tls;
pub mod tunnel;

pub use node::{BuildError, Node, Snapshot};
pub use server::{Server, ServerError};
