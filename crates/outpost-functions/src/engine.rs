//! The engine every function shares: pooled instance slots, epoch interruption for deadlines,
//! one linker with everything a guest may import.

use std::path::{Path, PathBuf};
use std::time::Duration;

use wasmtime::component::{Component, Linker};
use wasmtime::{Config, Engine, InstanceAllocationStrategy, PoolingAllocationConfig};
use wasmtime_wasi_http::p2::bindings::ProxyPre;

use crate::FunctionError;
use crate::host::FnState;

/// How often the epoch advances: the granularity of deadlines, and how often a busy guest
/// yields its thread to other requests.
pub(crate) const EPOCH_TICK: Duration = Duration::from_millis(5);

/// The compiled-code engine, its linker and its on-disk cache; one per node.
pub struct Runtime {
    engine: Engine,
    linker: Linker<FnState>,
    cache_dir: PathBuf,
}

impl Runtime {
    /// Builds the engine with `max_instances` pooled slots (concurrent requests over all
    /// functions) and starts its epoch ticker; compiled components are kept in `cache_dir`.
    pub fn new(max_instances: u32, cache_dir: &Path) -> Result<Runtime, FunctionError> {
        // Resetting an instance's memory by scanning for the pages it touched (Linux ≥ 6.7)
        // keeps them resident: no madvise, no page faults on the next request. Measured with
        // the example guests: hello −15–20 CPU-µs per request, Python −0.5 ms (fewer faults).
        let pagemap_scan = PoolingAllocationConfig::is_pagemap_scan_available();
        if !pagemap_scan {
            tracing::info!(
                "PAGEMAP_SCAN unavailable (Linux < 6.7); instance memory is reset with madvise."
            );
        }
        let engine = build_engine(max_instances, pagemap_scan)
            .map_err(|e| FunctionError::Engine(e.to_string()))?;
        let linker = build_linker(&engine).map_err(|e| FunctionError::Engine(e.to_string()))?;
        let weak = engine.weak();
        // Ends with the engine: the thread holds only a weak reference.
        std::thread::Builder::new()
            .name("outpost-epoch".into())
            .spawn(move || {
                loop {
                    std::thread::sleep(EPOCH_TICK);
                    match weak.upgrade() {
                        Some(engine) => engine.increment_epoch(),
                        None => break,
                    }
                }
            })
            .map_err(|e| FunctionError::Engine(format!("epoch thread: {e}")))?;
        Ok(Runtime {
            engine,
            linker,
            cache_dir: cache_dir.to_path_buf(),
        })
    }

    /// Compiles (or loads from the cache) and links `wasm`; fails when it is not a
    /// `wasi:http/proxy` component or imports something the host does not give. CPU heavy:
    /// runs on a blocking thread. Returns whether the compiled form came from the cache.
    pub(crate) async fn prepare(
        &self,
        name: &str,
        wasm: std::sync::Arc<Vec<u8>>,
        sha: &str,
    ) -> Result<(ProxyPre<FnState>, bool), FunctionError> {
        let engine = self.engine.clone();
        let linker = self.linker.clone();
        let dir = self.cache_dir.clone();
        let sha = sha.to_owned();
        let invalid = |reason: String| FunctionError::Invalid {
            name: name.to_owned(),
            reason,
        };
        let joined = tokio::task::spawn_blocking(move || {
            let (component, cached) =
                crate::precompiled::load_or_compile(&engine, &wasm, &sha, &dir)
                    .map_err(|e| format!("{e:#}"))?;
            link(&linker, &component)
                .map(|pre| (pre, cached))
                .map_err(|e| format!("{e:#}"))
        })
        .await;
        match joined {
            Ok(Ok(ok)) => Ok(ok),
            Ok(Err(reason)) => Err(invalid(reason)),
            Err(e) => Err(invalid(format!("compiler task failed: {e}"))),
        }
    }
}

fn build_engine(max_instances: u32, pagemap_scan: bool) -> wasmtime::Result<Engine> {
    let n = max_instances.max(1);
    let mut pool = PoolingAllocationConfig::new();
    // A component holds several core instances (the guest, its adapters, shims) and tables.
    pool.total_component_instances(n)
        .total_core_instances(n.saturating_mul(16))
        .total_memories(n.saturating_mul(2))
        .total_tables(n.saturating_mul(16))
        .total_stacks(n)
        .max_memories_per_module(1)
        .max_component_instance_size(1 << 20)
        .max_core_instance_size(1 << 20)
        .table_keep_resident(16 << 10)
        .max_unused_warm_slots((n / 4).max(1));
    if pagemap_scan {
        // Only the pages an instance touched are restored (memcpy from the image), up to 16 MiB;
        // without the scan the whole range would be memset, so it stays small then.
        pool.pagemap_scan(wasmtime::Enabled::Yes)
            .linear_memory_keep_resident(16 << 20);
    } else {
        pool.linear_memory_keep_resident(64 << 10);
    }
    let mut cfg = Config::new();
    cfg.epoch_interruption(true)
        .wasm_component_model(true)
        .memory_init_cow(true)
        .parallel_compilation(true)
        .allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
    Engine::new(&cfg)
}

/// Everything a guest may import: WASI 0.2 (with no files, environment or network granted
/// per store), `wasi:http` types and outgoing handler, `wasi:keyvalue` and `wasi:config`.
fn build_linker(engine: &Engine) -> wasmtime::Result<Linker<FnState>> {
    let mut linker: Linker<FnState> = Linker::new(engine);
    wasmtime_wasi::p2::add_to_linker_async(&mut linker)?;
    wasmtime_wasi_http::p2::add_only_http_to_linker_async(&mut linker)?;
    crate::kv::add_to_linker(&mut linker)?;
    wasmtime_wasi_config::add_to_linker(&mut linker, |s: &mut FnState| {
        wasmtime_wasi_config::WasiConfig::new(&s.shared.config)
    })?;
    Ok(linker)
}

fn link(linker: &Linker<FnState>, component: &Component) -> wasmtime::Result<ProxyPre<FnState>> {
    ProxyPre::new(linker.instantiate_pre(component)?)
}
