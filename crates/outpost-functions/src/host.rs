//! What a guest can reach: its store's state, the `wasi:http` hooks that send its outgoing
//! requests to the node's origin stage, and the memory limiter.

use std::future::Future;
use std::sync::Arc;

use http_body_util::BodyExt as _;
use wasmtime::ResourceLimiter;
use wasmtime::component::ResourceTable;
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};
use wasmtime_wasi_http::{
    Error as HttpErr, RequestOptions, WasiBody, WasiHttpCtx, WasiHttpCtxView, WasiHttpHooks,
    WasiHttpView,
};

use crate::{BoxError, Outbound, OutboundError};

/// Per deployed version and settings; shared by all its requests.
pub(crate) struct FnShared {
    /// `wasi:config` values.
    pub config: wasmtime_wasi_config::WasiConfigVariables,
    /// The node's store, behind `wasi:keyvalue`.
    pub store: outpost_state::Store,
    /// KV namespace of the function's bucket.
    pub kv_namespace: String,
    /// Serialises read-modify-write (`atomics.increment`) on this node.
    pub kv_lock: Arc<tokio::sync::Mutex<()>>,
}

/// The guest's memory ran past its limit; carried as the trap's error so that the outcome
/// is told apart from a guest's own panic.
#[derive(Debug)]
pub(crate) struct GuestOom {
    pub desired: usize,
}

impl std::fmt::Display for GuestOom {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "guest memory limit exceeded (wanted {} bytes)",
            self.desired
        )
    }
}

impl std::error::Error for GuestOom {}

/// Refuses growth past the function's limit with a trap that says why.
pub(crate) struct OomLimiter {
    pub max: usize,
    pub hit: bool,
}

impl ResourceLimiter for OomLimiter {
    fn memory_growing(
        &mut self,
        _current: usize,
        desired: usize,
        maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if desired > self.max || maximum.is_some_and(|m| desired > m) {
            self.hit = true;
            return Err(wasmtime::Error::new(GuestOom { desired }));
        }
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(desired <= 100_000 && maximum.is_none_or(|m| desired <= m))
    }
}

/// Routes a guest's outgoing requests: `http://<group>/…` to the node's origin stage when the
/// route allows the group, an error the guest sees for anything else.
pub(crate) struct OutpostHooks {
    pub outbound: Arc<dyn Outbound>,
}

type IoFuture = Box<dyn Future<Output = Result<(), HttpErr>> + Send>;

impl WasiHttpHooks for OutpostHooks {
    // The origin stage sets Host for the endpoint it picks.
    fn set_host_header(&mut self) -> bool {
        false
    }

    fn default_scheme(&mut self) -> Option<http::uri::Scheme> {
        Some(http::uri::Scheme::HTTP)
    }

    fn send_request(
        &mut self,
        request: http::Request<WasiBody>,
        _options: Option<RequestOptions>,
        _fut: IoFuture,
    ) -> Box<dyn Future<Output = Result<(http::Response<WasiBody>, IoFuture), HttpErr>> + Send>
    {
        let outbound = self.outbound.clone();
        Box::new(async move {
            let uri = request.uri();
            let group = match (uri.scheme_str(), uri.host()) {
                (Some("http"), Some(h)) if uri.port().is_none() && outbound.allows(h) => {
                    h.to_owned()
                }
                _ => return Err(HttpErr::HttpRequestDenied),
            };
            let req = request.map(|b| b.map_err(|e| Box::new(e) as BoxError).boxed_unsync());
            let resp = outbound.send(group, req).await.map_err(|e| match e {
                OutboundError::Denied => HttpErr::HttpRequestDenied,
                OutboundError::Unreachable(_) => HttpErr::ConnectionRefused,
                OutboundError::Timeout => HttpErr::HttpResponseTimeout,
                OutboundError::Other(s) => HttpErr::InternalError(Some(s)),
            })?;
            let resp = resp.map(|b| {
                b.map_err(|e| HttpErr::InternalError(Some(e.to_string())))
                    .boxed_unsync()
            });
            Ok((resp, Box::new(async { Ok(()) }) as IoFuture))
        })
    }
}

/// One request's store data. One resource table serves WASI, `wasi:http` and `wasi:keyvalue`.
pub struct FnState {
    pub(crate) wasi: WasiCtx,
    pub(crate) http: WasiHttpCtx,
    pub(crate) table: ResourceTable,
    pub(crate) hooks: OutpostHooks,
    pub(crate) limiter: OomLimiter,
    pub(crate) shared: Arc<FnShared>,
}

impl FnState {
    pub(crate) fn new(
        shared: Arc<FnShared>,
        outbound: Arc<dyn Outbound>,
        max_memory: usize,
    ) -> Self {
        // No arguments, environment, preopened directories or stdio; no sockets or name
        // lookups. The defaults already say so; being explicit keeps it that way.
        let mut wasi = WasiCtx::builder();
        wasi.allow_tcp(false)
            .allow_udp(false)
            .allow_ip_name_lookup(false);
        FnState {
            wasi: wasi.build(),
            http: WasiHttpCtx::new(),
            table: ResourceTable::new(),
            hooks: OutpostHooks { outbound },
            limiter: OomLimiter {
                max: max_memory,
                hit: false,
            },
            shared,
        }
    }
}

impl WasiView for FnState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

impl WasiHttpView for FnState {
    fn http(&mut self) -> WasiHttpCtxView<'_> {
        WasiHttpCtxView {
            ctx: &mut self.http,
            table: &mut self.table,
            hooks: &mut self.hooks,
        }
    }
}
