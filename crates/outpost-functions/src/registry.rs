//! Functions by name: versions on disk, the active one in memory, deploy and rollback.
//!
//! `<data_dir>/functions/` holds `components/<sha256>.wasm` (every version ever deployed,
//! immutable), `cache/` (their compiled form for this engine) and `manifest.json` (versions
//! and which one is active), replaced atomically (write, fsync, rename, fsync the directory)
//! so a crash leaves the old or the new manifest, never half of one.
//!
//! A switch is one pointer swap: requests that already hold the old version finish on it,
//! new ones get the new one.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwap;
use serde::{Deserialize, Serialize};
use wasmtime_wasi_http::p2::bindings::ProxyPre;

use crate::FunctionError;
use crate::engine::Runtime;
use crate::host::{FnShared, FnState};
use crate::invoke::Outcome;
use crate::precompiled::sha256;

/// Largest component a deploy accepts (a componentize-py Python function is ~20–40 MB).
pub const MAX_COMPONENT_BYTES: usize = 256 << 20;

/// Instantiation samples kept per version for the percentiles `outpost fn list` shows.
const SAMPLES: usize = 4096;

/// One version of one function, ready to serve: linked, limits applied.
pub struct Deployed {
    pub(crate) name: String,
    pub(crate) version: u32,
    pub(crate) sha256: String,
    pub(crate) pre: ProxyPre<FnState>,
    pub(crate) shared: Arc<FnShared>,
    pub(crate) timeout: Duration,
    pub(crate) max_memory: usize,
    metrics: outpost_telemetry::metrics::Metrics,
    /// Recent instantiation times in ns (ring buffer).
    samples: Mutex<(Vec<u32>, usize)>,
}

impl Deployed {
    /// The function's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The version number (1, 2, …).
    pub fn version(&self) -> u32 {
        self.version
    }

    /// SHA-256 of the component (hex).
    pub fn sha256(&self) -> &str {
        &self.sha256
    }

    pub(crate) fn record(&self, outcome: Outcome, seconds: f64) {
        self.metrics
            .function_call(&self.name, outcome.as_str(), seconds);
    }

    pub(crate) fn instantiated(&self, took: Duration) {
        self.metrics
            .function_instantiated(&self.name, took.as_secs_f64());
        let ns = u32::try_from(took.as_nanos()).unwrap_or(u32::MAX);
        if let Ok(mut s) = self.samples.lock() {
            let (buf, next) = &mut *s;
            if buf.len() < SAMPLES {
                buf.push(ns);
            } else {
                buf[*next] = ns;
                *next = (*next + 1) % SAMPLES;
            }
        }
    }

    /// p50 and p99 of recent instantiation times in µs, and how many samples they cover.
    pub fn instantiate_percentiles(&self) -> Option<(f64, f64, usize)> {
        let mut v = self.samples.lock().ok()?.0.clone();
        if v.is_empty() {
            return None;
        }
        v.sort_unstable();
        let at = |q: f64| v[((v.len() - 1) as f64 * q).round() as usize] as f64 / 1e3;
        Some((at(0.5), at(0.99), v.len()))
    }
}

/// A version as `outpost fn list` shows it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct VersionInfo {
    /// 1, 2, … in deploy order.
    pub version: u32,
    /// SHA-256 of the component.
    pub sha256: String,
    /// Component size in bytes.
    pub size: u64,
    /// When it was deployed, Unix ms.
    pub deployed_ms: u64,
    /// `config` (from `[functions.NAME] component`), `api` (`outpost fn deploy` on this node)
    /// or `fleet` (made active on another node of the fleet).
    pub source: String,
}

/// A function as `outpost fn list` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct FunctionInfo {
    /// Name.
    pub name: String,
    /// The version serving new requests.
    pub active: u32,
    /// Every version, oldest first.
    pub versions: Vec<VersionInfo>,
    /// Recent instantiation p50/p99 in µs on this node, when it has served.
    pub instantiate_us: Option<serde_json::Value>,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct Manifest {
    functions: BTreeMap<String, ManifestEntry>,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct ManifestEntry {
    active: u32,
    versions: Vec<VersionInfo>,
}

/// Per-function settings from the config, applied to every version.
#[derive(Clone)]
struct Settings {
    timeout: Duration,
    max_memory: usize,
    config: Vec<(String, String)>,
    kv_namespace: String,
}

/// Every function of the node.
pub struct Functions {
    runtime: Runtime,
    dir: PathBuf,
    store: outpost_state::Store,
    metrics: outpost_telemetry::metrics::Metrics,
    active: ArcSwap<HashMap<String, Arc<Deployed>>>,
    settings: Mutex<HashMap<String, Settings>>,
    /// Serialises deploys, rollbacks and reconfiguration (and the manifest file).
    manifest: tokio::sync::Mutex<Manifest>,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn io<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> FunctionError + 'a {
    move |source| FunctionError::Io {
        what,
        path: path.to_path_buf(),
        source,
    }
}

/// Writes `bytes` to `path` so that a crash leaves the old file or the new one.
fn write_durable(path: &Path, bytes: &[u8]) -> Result<(), FunctionError> {
    use std::io::Write as _;
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::File::create(&tmp).map_err(io("create", &tmp))?;
    f.write_all(bytes).map_err(io("write", &tmp))?;
    f.sync_all().map_err(io("fsync", &tmp))?;
    drop(f);
    std::fs::rename(&tmp, path).map_err(io("rename to", path))?;
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io("fsync", dir))
}

fn settings_of(name: &str, f: &outpost_config::Function) -> Settings {
    let mut config: Vec<(String, String)> = f
        .config
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    for (k, var) in &f.config_env {
        match std::env::var(var) {
            Ok(v) => config.push((k.clone(), v)),
            Err(_) => tracing::warn!(
                function = name,
                key = %k,
                variable = %var,
                "Secret for wasi:config is not in the environment; the guest will see no value."
            ),
        }
    }
    Settings {
        timeout: f.timeout,
        max_memory: usize::try_from(f.memory.as_u64()).unwrap_or(usize::MAX),
        config,
        kv_namespace: f
            .kv_namespace
            .clone()
            .unwrap_or_else(|| format!("fn.{name}")),
    }
}

impl Functions {
    /// Opens `<data_dir>/functions`, registers each configured component as a new version
    /// when its content is new, and prepares every active version (compiling only what the
    /// cache lacks). Fails when a configured component cannot run.
    pub async fn open(
        config: &outpost_config::Config,
        data_dir: &Path,
        store: outpost_state::Store,
        metrics: outpost_telemetry::metrics::Metrics,
    ) -> Result<Functions, FunctionError> {
        let dir = data_dir.join("functions");
        let cache = match &config.wasm.cache_dir {
            Some(c) => config.base_dir.join(c),
            None => dir.join("cache"),
        };
        for d in [dir.clone(), dir.join("components"), cache.clone()] {
            std::fs::create_dir_all(&d).map_err(io("create directory", d.as_path()))?;
        }
        let manifest_path = dir.join("manifest.json");
        let manifest = match std::fs::read(&manifest_path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| FunctionError::Manifest {
                path: manifest_path.clone(),
                reason: e.to_string(),
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Manifest::default(),
            Err(e) => return Err(io("read", &manifest_path)(e)),
        };
        let runtime = Runtime::new(config.wasm.max_instances, &cache)?;
        let functions = Functions {
            runtime,
            dir,
            store,
            metrics,
            active: ArcSwap::from_pointee(HashMap::new()),
            settings: Mutex::new(HashMap::new()),
            manifest: tokio::sync::Mutex::new(manifest),
        };
        functions.configure(config).await?;
        Ok(functions)
    }

    /// Applies a (re)loaded config: new settings for every function, a new version for each
    /// configured component whose content changed. A component that is already a version
    /// keeps the manifest's choice, so a rollback survives restarts.
    pub async fn configure(&self, config: &outpost_config::Config) -> Result<(), FunctionError> {
        let mut manifest = self.manifest.lock().await;
        let settings: HashMap<String, Settings> = config
            .functions
            .iter()
            .map(|(n, f)| (n.clone(), settings_of(n, f)))
            .collect();
        // Work on a copy: nothing changes unless every function is ready.
        let mut next = Manifest {
            functions: manifest
                .functions
                .iter()
                .map(|(k, v)| {
                    (
                        k.clone(),
                        ManifestEntry {
                            active: v.active,
                            versions: v.versions.clone(),
                        },
                    )
                })
                .collect(),
        };
        let mut active = HashMap::new();
        for (name, f) in &config.functions {
            let path = config.base_dir.join(&f.component);
            let wasm = std::fs::read(&path).map_err(io("read component", &path))?;
            let sha = sha256(&wasm);
            let entry = next.functions.entry(name.clone()).or_default();
            let version = match entry.versions.iter().any(|v| v.sha256 == sha) {
                true => entry.active,
                false => {
                    let version = entry.versions.iter().map(|v| v.version).max().unwrap_or(0) + 1;
                    self.keep_component(&sha, &wasm)?;
                    entry.versions.push(VersionInfo {
                        version,
                        sha256: sha.clone(),
                        size: wasm.len() as u64,
                        deployed_ms: now_ms(),
                        source: "config".into(),
                    });
                    entry.active = version;
                    version
                }
            };
            let deployed = self.prepare(name, &next, version, &settings).await?;
            active.insert(name.clone(), Arc::new(deployed));
        }
        self.save(&next)?;
        *manifest = next;
        if let Ok(mut m) = self.settings.lock() {
            *m = settings;
        }
        self.active.store(Arc::new(active));
        Ok(())
    }

    /// The version serving new requests of `name`.
    pub fn get(&self, name: &str) -> Option<Arc<Deployed>> {
        self.active.load().get(name).cloned()
    }

    /// Validates `wasm` by compiling and linking it, keeps it as the next version of `name`
    /// and switches new requests to it. An invalid component changes nothing.
    pub async fn deploy(&self, name: &str, wasm: Vec<u8>) -> Result<VersionInfo, FunctionError> {
        let result = self.deploy_inner(name, wasm, "api").await;
        self.metrics.function_deploy(name, result.is_ok());
        result
    }

    /// Deploys `wasm` as the next version of `name` because another node of the fleet made it
    /// active there (`source` = `fleet`). Refused unless it hashes to `sha256`: what the fleet
    /// named is what runs.
    pub async fn adopt(
        &self,
        name: &str,
        sha256: &str,
        wasm: Vec<u8>,
    ) -> Result<VersionInfo, FunctionError> {
        let got = crate::precompiled::sha256(&wasm);
        let result = if got == sha256 {
            self.deploy_inner(name, wasm, "fleet").await
        } else {
            Err(FunctionError::Invalid {
                name: name.to_owned(),
                reason: format!("the fleet named sha256 {sha256} but the bytes hash to {got}"),
            })
        };
        self.metrics.function_deploy(name, result.is_ok());
        result
    }

    /// The version of `name` serving new requests.
    pub async fn active_version(&self, name: &str) -> Option<VersionInfo> {
        let manifest = self.manifest.lock().await;
        let entry = manifest.functions.get(name)?;
        entry
            .versions
            .iter()
            .find(|v| v.version == entry.active)
            .cloned()
    }

    /// The newest version of `name` holding the component `sha256`, if this node has it.
    pub async fn version_of(&self, name: &str, sha256: &str) -> Option<u32> {
        let manifest = self.manifest.lock().await;
        manifest
            .functions
            .get(name)?
            .versions
            .iter()
            .filter(|v| v.sha256 == sha256)
            .map(|v| v.version)
            .max()
    }

    /// The bytes of a component this node keeps (every version it ever ran), to hand to the
    /// fleet.
    pub fn component(&self, sha256: &str) -> Result<Vec<u8>, FunctionError> {
        if sha256.is_empty() || !sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(FunctionError::Invalid {
                name: String::new(),
                reason: format!("{sha256:?} is not a sha256"),
            });
        }
        let path = self.dir.join("components").join(format!("{sha256}.wasm"));
        std::fs::read(&path).map_err(io("read component", &path))
    }

    async fn deploy_inner(
        &self,
        name: &str,
        wasm: Vec<u8>,
        source: &str,
    ) -> Result<VersionInfo, FunctionError> {
        if wasm.len() > MAX_COMPONENT_BYTES {
            return Err(FunctionError::TooLarge {
                size: wasm.len(),
                limit: MAX_COMPONENT_BYTES,
            });
        }
        let settings = self.settings_snapshot();
        if !settings.contains_key(name) {
            return Err(FunctionError::Unknown(name.to_owned()));
        }
        let mut manifest = self.manifest.lock().await;
        let sha = sha256(&wasm);
        let wasm = Arc::new(wasm);
        // Compile and link before anything is written: a bad component leaves no trace.
        let (pre, _) = self.runtime.prepare(name, wasm.clone(), &sha).await?;
        self.keep_component(&sha, &wasm)?;
        let entry = manifest.functions.entry(name.to_owned()).or_default();
        let version = entry.versions.iter().map(|v| v.version).max().unwrap_or(0) + 1;
        let info = VersionInfo {
            version,
            sha256: sha.clone(),
            size: wasm.len() as u64,
            deployed_ms: now_ms(),
            source: source.into(),
        };
        entry.versions.push(info.clone());
        let previous = entry.active;
        entry.active = version;
        if let Err(e) = self.save(&manifest) {
            if let Some(entry) = manifest.functions.get_mut(name) {
                entry.versions.pop();
                entry.active = previous;
            }
            return Err(e);
        }
        self.activate(self.assemble(name, version, sha, pre, &settings)?);
        Ok(info)
    }

    /// Switches `name` back to `version`, or to the newest version older than the active one.
    pub async fn rollback(
        &self,
        name: &str,
        version: Option<u32>,
    ) -> Result<VersionInfo, FunctionError> {
        let result = self.rollback_inner(name, version).await;
        self.metrics.function_deploy(name, result.is_ok());
        result
    }

    async fn rollback_inner(
        &self,
        name: &str,
        version: Option<u32>,
    ) -> Result<VersionInfo, FunctionError> {
        let settings = self.settings_snapshot();
        if !settings.contains_key(name) {
            return Err(FunctionError::Unknown(name.to_owned()));
        }
        let mut manifest = self.manifest.lock().await;
        let entry = manifest
            .functions
            .get(name)
            .ok_or_else(|| FunctionError::Unknown(name.to_owned()))?;
        let target = match version {
            Some(v) => entry
                .versions
                .iter()
                .find(|i| i.version == v)
                .ok_or_else(|| FunctionError::NoSuchVersion {
                    name: name.to_owned(),
                    version: v,
                })?,
            None => entry
                .versions
                .iter()
                .filter(|i| i.version < entry.active)
                .max_by_key(|i| i.version)
                .ok_or_else(|| FunctionError::NothingToRollBack(name.to_owned()))?,
        }
        .clone();
        let deployed = self
            .prepare(name, &manifest, target.version, &settings)
            .await?;
        if let Some(entry) = manifest.functions.get_mut(name) {
            entry.active = target.version;
        }
        self.save(&manifest)?;
        self.activate(deployed);
        Ok(target)
    }

    /// Every function with its versions.
    pub async fn list(&self) -> Vec<FunctionInfo> {
        let manifest = self.manifest.lock().await;
        let active = self.active.load();
        manifest
            .functions
            .iter()
            .filter(|(name, _)| active.contains_key(*name))
            .map(|(name, e)| FunctionInfo {
                name: name.clone(),
                active: e.active,
                versions: e.versions.clone(),
                instantiate_us: active
                    .get(name)
                    .and_then(|d| d.instantiate_percentiles())
                    .map(|(p50, p99, n)| serde_json::json!({"p50": p50, "p99": p99, "samples": n})),
            })
            .collect()
    }

    fn settings_snapshot(&self) -> HashMap<String, Settings> {
        self.settings.lock().map(|m| m.clone()).unwrap_or_default()
    }

    fn activate(&self, deployed: Deployed) {
        let mut next = HashMap::clone(&self.active.load());
        next.insert(deployed.name.clone(), Arc::new(deployed));
        self.active.store(Arc::new(next));
    }

    fn keep_component(&self, sha: &str, wasm: &[u8]) -> Result<(), FunctionError> {
        let path = self.dir.join("components").join(format!("{sha}.wasm"));
        if path.is_file() {
            return Ok(());
        }
        write_durable(&path, wasm)
    }

    async fn prepare(
        &self,
        name: &str,
        manifest: &Manifest,
        version: u32,
        settings: &HashMap<String, Settings>,
    ) -> Result<Deployed, FunctionError> {
        let info = manifest
            .functions
            .get(name)
            .and_then(|e| e.versions.iter().find(|v| v.version == version))
            .ok_or_else(|| FunctionError::NoSuchVersion {
                name: name.to_owned(),
                version,
            })?;
        let path = self
            .dir
            .join("components")
            .join(format!("{}.wasm", info.sha256));
        let wasm = std::fs::read(&path).map_err(io("read component", &path))?;
        let (pre, cached) = self
            .runtime
            .prepare(name, Arc::new(wasm), &info.sha256)
            .await?;
        tracing::info!(function = name, version, cached, "Function ready.");
        self.assemble(name, version, info.sha256.clone(), pre, settings)
    }

    fn assemble(
        &self,
        name: &str,
        version: u32,
        sha256: String,
        pre: ProxyPre<FnState>,
        settings: &HashMap<String, Settings>,
    ) -> Result<Deployed, FunctionError> {
        let s = settings
            .get(name)
            .ok_or_else(|| FunctionError::Unknown(name.to_owned()))?;
        let shared = FnShared {
            config: s.config.iter().cloned().collect(),
            store: self.store.clone(),
            kv_namespace: s.kv_namespace.clone(),
        };
        Ok(Deployed {
            name: name.to_owned(),
            version,
            sha256,
            pre,
            shared: Arc::new(shared),
            timeout: s.timeout,
            max_memory: s.max_memory,
            metrics: self.metrics.clone(),
            samples: Mutex::new((Vec::with_capacity(SAMPLES), 0)),
        })
    }

    fn save(&self, manifest: &Manifest) -> Result<(), FunctionError> {
        let path = self.dir.join("manifest.json");
        let bytes = serde_json::to_vec_pretty(manifest).map_err(|e| FunctionError::Manifest {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        write_durable(&path, &bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(dir: &Path, component: &[u8]) -> outpost_config::Config {
        std::fs::write(dir.join("f.wasm"), component).expect("write component");
        let src = r#"
version = 1
[node]
id = "t"
location = { lat = 0.0, lon = 0.0 }
[[listeners]]
addr = "127.0.0.1:0"
[functions.f]
component = "f.wasm"
[origins.api]
[[origins.api.endpoints]]
url = "http://127.0.0.1:9"
region = "r"
location = { lat = 0.0, lon = 0.0 }
[[routes]]
name = "f"
origin = "api"
function = "f"
"#;
        outpost_config::Config::parse(src, "t.toml", dir).expect("valid config")
    }

    async fn open(dir: &Path, component: &[u8]) -> Result<Functions, FunctionError> {
        let store = outpost_state::Store::open(outpost_state::StoreOptions::new(dir.join("data")))
            .expect("store");
        Functions::open(
            &config(dir, component),
            &dir.join("data"),
            store,
            outpost_telemetry::metrics::Metrics::new("test"),
        )
        .await
    }

    #[tokio::test]
    async fn what_is_not_a_component_is_refused_with_what_to_do() {
        let dir = tempfile::tempdir().expect("tempdir");
        // A valid, empty core module: WebAssembly, but not a component.
        let Err(e) = open(dir.path(), b"\0asm\x01\0\0\0").await else {
            panic!("a core module must be refused");
        };
        let msg = e.to_string();
        assert!(matches!(e, FunctionError::Invalid { .. }), "{msg}");
        assert!(
            msg.contains("wasm32-wasip2") && msg.contains("componentize-py"),
            "{msg}"
        );
        let Err(e) = open(dir.path(), b"not wasm at all").await else {
            panic!("garbage must be refused");
        };
        assert!(matches!(e, FunctionError::Invalid { .. }), "{e}");
        // Nothing was recorded for a component that never ran.
        assert!(!dir.path().join("data/functions/manifest.json").exists());
    }

    #[test]
    fn manifest_writes_replace_the_file_whole() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("manifest.json");
        write_durable(&path, b"{\"functions\":{}}").expect("first");
        write_durable(
            &path,
            b"{\"functions\":{\"a\":{\"active\":1,\"versions\":[]}}}",
        )
        .expect("second");
        let m: Manifest =
            serde_json::from_slice(&std::fs::read(&path).expect("read")).expect("parse");
        assert_eq!(m.functions["a"].active, 1);
        assert!(!path.with_extension("tmp").exists());
    }

    #[test]
    fn outcomes_have_stable_metric_labels() {
        for (o, label) in [
            (Outcome::Ok, "ok"),
            (Outcome::Trap, "trap"),
            (Outcome::Timeout, "timeout"),
            (Outcome::Oom, "oom"),
            (Outcome::Unavailable, "unavailable"),
        ] {
            assert_eq!(o.as_str(), label);
        }
    }
}
