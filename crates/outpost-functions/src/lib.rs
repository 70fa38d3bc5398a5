//! Outpost's programmable edge: WebAssembly functions that implement the `wasi:http/proxy`
//! world, run in a fresh sandboxed instance per request.
//!
//! The request's path through this crate:
//! - [`Functions`] (registry) holds the active version of every function, deploys new ones
//!   (compiled once, cached on disk, validated against what the host links) and rolls back;
//! - [`Deployed::serve`] (invoke) instantiates the version's pre-linked component in a new
//!   store with its memory limit and wall-clock deadline, hands it the request and streams
//!   its response back, cutting off a body the guest never finishes;
//! - the guest's outgoing `wasi:http` requests (host) are allowed only to the origin groups
//!   its route names and travel through the node's own origin stage via [`Outbound`];
//! - its `wasi:keyvalue` bucket (kv) is a namespace of the node's store, its `wasi:config`
//!   values come from the function's config. No files, no environment, no sockets.
//!
//! wasmtime is most of this workspace's build; keeping it in this one crate keeps everyone
//! else's incremental builds short.

mod engine;
mod error;
mod host;
mod invoke;
mod kv;
mod precompiled;
mod registry;

use std::future::Future;
use std::pin::Pin;

pub use engine::Runtime;
pub use error::FunctionError;
pub use invoke::{Failure, Outcome, Served};
pub use registry::{Deployed, FunctionInfo, Functions, MAX_COMPONENT_BYTES, VersionInfo};

/// Boxed error for bodies crossing the host boundary.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Body type of requests and responses between the node and a function.
pub type FnBody = http_body_util::combinators::UnsyncBoxBody<bytes::Bytes, BoxError>;

/// Request headers the host sets for every guest; client-sent copies never reach it.
pub mod headers {
    /// ISO country of the client, when known.
    pub const GEO_COUNTRY: &str = "x-outpost-geo-country";
    /// Region (subdivision) of the client, when a location source told it.
    pub const GEO_REGION: &str = "x-outpost-geo-region";
    /// Latitude of the client in decimal degrees.
    pub const GEO_LAT: &str = "x-outpost-geo-lat";
    /// Longitude of the client in decimal degrees.
    pub const GEO_LON: &str = "x-outpost-geo-lon";
    /// Verified subject (`sub`) on authenticated routes.
    pub const SUB: &str = "x-outpost-sub";
    /// The claims the route forwards, as a JSON object, on authenticated routes.
    pub const CLAIMS: &str = "x-outpost-claims";
    /// The function and version answering, on responses.
    pub const FUNCTION: &str = "x-outpost-function";
}

/// Why an outgoing request from a guest did not get a response; each maps to the
/// `wasi:http` error code the guest sees.
#[derive(Debug, thiserror::Error)]
pub enum OutboundError {
    /// The host is not an origin group this function may call.
    #[error("requests may only go to the origin groups the route allows")]
    Denied,
    /// No endpoint of the group could be connected to.
    #[error("origin unreachable: {0}")]
    Unreachable(String),
    /// The origin did not answer in time.
    #[error("origin timed out")]
    Timeout,
    /// Anything else (a broken response, a request the origin stage refused).
    #[error("{0}")]
    Other(String),
}

/// The node's way out for a guest's `wasi:http` requests: the origin stage (nearest healthy
/// endpoint, failover) and, on cached routes, the edge cache. One per request, so it knows the
/// request's context (client location, request id, route).
pub trait Outbound: Send + Sync + 'static {
    /// Whether this request's function may call `group`.
    fn allows(&self, group: &str) -> bool;

    /// Sends `req` (absolute URI `http://<group>/…`) to origin group `group`.
    fn send(
        &self,
        group: String,
        req: http::Request<FnBody>,
    ) -> Pin<Box<dyn Future<Output = Result<http::Response<FnBody>, OutboundError>> + Send>>;
}
