//! Compiled components on disk, so a restart or a rollback does not compile again.
//!
//! The only module allowed `unsafe`: loading a precompiled component runs its machine code,
//! so the bytes must come from our own `serialize`. Files are named by the component's hash
//! and the engine's compatibility hash, written to a temporary name and renamed, and never
//! modified in place (wasmtime maps them into memory).
#![allow(unsafe_code)]

use std::hash::{Hash, Hasher};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

use sha2::{Digest, Sha256};
use wasmtime::Engine;
use wasmtime::component::Component;

struct ShaHasher(Sha256);

impl Hasher for ShaHasher {
    fn write(&mut self, bytes: &[u8]) {
        self.0.update(bytes);
    }
    fn finish(&self) -> u64 {
        0 // unused: the full digest is taken instead
    }
}

/// Lower-case hex of `bytes`.
pub(crate) fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    bytes.iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

/// SHA-256 of a component, in hex: its identity in the manifest.
pub(crate) fn sha256(wasm: &[u8]) -> String {
    hex(&Sha256::digest(wasm))
}

/// `<sha256(wasm)>-<sha256(engine compatibility)[..16]>.cwasm`
fn file_name(engine: &Engine, wasm_sha: &str) -> String {
    let mut h = ShaHasher(Sha256::new());
    engine.precompile_compatibility_hash().hash(&mut h);
    let engine_hex = hex(&h.0.finalize());
    format!("{wasm_sha}-{}.cwasm", &engine_hex[..16])
}

static TMP_COUNTER: AtomicU64 = AtomicU64::new(0);

/// Loads the compiled form of `wasm` from `dir`, or compiles it and stores it there. CPU
/// heavy on a miss: call from a blocking thread. Returns whether the cache had it.
pub(crate) fn load_or_compile(
    engine: &Engine,
    wasm: &[u8],
    wasm_sha: &str,
    dir: &Path,
) -> wasmtime::Result<(Component, bool)> {
    let path = dir.join(file_name(engine, wasm_sha));
    if path.is_file() {
        // SAFETY: `path` is in the node's private cache directory; it was written by
        // `Component::serialize` below for an engine with the same compatibility hash (in its
        // name), published by rename and never modified in place afterwards, as the mmap
        // `deserialize_file` makes requires. Version or configuration mismatches are detected
        // by wasmtime and returned as errors, which we treat as a miss.
        match unsafe { Component::deserialize_file(engine, &path) } {
            Ok(c) => return Ok((c, true)),
            Err(e) => {
                tracing::warn!(file = %path.display(), error = %e, "Precompiled component unusable; compiling again.");
                let _ = std::fs::remove_file(&path);
            }
        }
    }
    let component = Component::new(engine, wasm)?;
    let bytes = component.serialize()?;
    if let Err(e) = write_new(dir, &path, &bytes) {
        // A cache that cannot be written costs a compile at the next start, nothing else.
        tracing::warn!(dir = %dir.display(), error = %e, "Could not store the compiled component.");
    }
    Ok((component, false))
}

fn write_new(dir: &Path, path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let n = TMP_COUNTER.fetch_add(1, Ordering::Relaxed);
    let tmp = dir.join(format!(".{}-{n}.tmp", std::process::id()));
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, path)
}
