//! Function versions fleet-wide: a component made active on one node becomes active on every
//! node. The components live in a JetStream object store (`outpost_functions`, one object per
//! SHA-256, so a version is uploaded once however often it is switched to); which one is active
//! per function is a JetStream key-value bucket (`outpost_functions_active`, key = function
//! name). Every node watches that bucket (last value per key first, then changes), so a node
//! that was away or starts later still switches to what the fleet runs. Ordering and
//! durability are JetStream's: the last put of a key is what every node ends up with.

use std::time::Duration;

use async_nats::jetstream::{self, kv, object_store};
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use tokio::io::AsyncReadExt;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// The object store of components, by SHA-256.
pub const OBJECTS: &str = "outpost_functions";
/// The key-value bucket of active versions, by function name.
pub const ACTIVE: &str = "outpost_functions_active";

/// "This component is the active version of this function", as one node said it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Activation {
    /// Function name (as in `[functions.NAME]`).
    pub name: String,
    /// SHA-256 of the component, hex: its object's name.
    pub sha256: String,
    /// The node that made it active.
    pub by: String,
    /// When (Unix ms): a node keeps a local version deployed later than this.
    pub at_ms: u64,
}

async fn objects(
    js: &jetstream::Context,
    replicas: usize,
) -> Result<object_store::ObjectStore, String> {
    match js.get_object_store(OBJECTS).await {
        Ok(store) => Ok(store),
        Err(_) => js
            .create_object_store(object_store::Config {
                bucket: OBJECTS.into(),
                description: Some("Outpost function components, by sha256".into()),
                num_replicas: replicas.max(1),
                ..Default::default()
            })
            .await
            .map_err(|e| format!("cannot open the function object store: {e}")),
    }
}

async fn active(js: &jetstream::Context, replicas: usize) -> Result<kv::Store, String> {
    crate::open_kv(
        js,
        kv::Config {
            bucket: ACTIVE.into(),
            description: "Outpost active function versions, by function name".into(),
            history: 16,
            num_replicas: replicas.max(1),
            ..Default::default()
        },
    )
    .await
}

/// Uploads `wasm` (unless the store has it already) and makes it the fleet's active version of
/// `activation.name`.
pub async fn publish(
    js: &jetstream::Context,
    replicas: usize,
    activation: &Activation,
    wasm: &[u8],
) -> Result<(), String> {
    let store = objects(js, replicas).await?;
    if store.info(&activation.sha256).await.is_err() {
        let mut reader = wasm;
        store
            .put(activation.sha256.as_str(), &mut reader)
            .await
            .map_err(|e| format!("cannot upload the component: {e}"))?;
    }
    let bucket = active(js, replicas).await?;
    let value = serde_json::to_vec(activation).map_err(|e| e.to_string())?;
    bucket
        .put(&activation.name, value.into())
        .await
        .map_err(|e| format!("cannot record the active version: {e}"))?;
    Ok(())
}

/// Downloads the component `sha256` (the caller checks the hash before running it).
pub async fn fetch(
    js: &jetstream::Context,
    replicas: usize,
    sha256: &str,
    limit: usize,
) -> Result<Vec<u8>, String> {
    let store = objects(js, replicas).await?;
    let object = store
        .get(sha256)
        .await
        .map_err(|e| format!("cannot fetch component {sha256}: {e}"))?;
    let mut wasm = Vec::new();
    // One byte over the limit is enough to refuse it.
    object
        .take(limit as u64 + 1)
        .read_to_end(&mut wasm)
        .await
        .map_err(|e| format!("cannot read component {sha256}: {e}"))?;
    if wasm.len() > limit {
        return Err(format!(
            "component {sha256} is larger than the {limit}-byte limit"
        ));
    }
    Ok(wasm)
}

/// Hands every activation (the last one per function, then each new one) to `sink` until
/// `stop`; reopens the watch after errors and after every reconnection (`reconnects` ticks),
/// so the current activations come again then: the receiver treats those it already runs as
/// no-ops, and one older than a version deployed here while the link was down is its cue to
/// publish that version.
pub async fn watch(
    js: jetstream::Context,
    replicas: usize,
    sink: mpsc::Sender<Activation>,
    reconnects: tokio::sync::watch::Receiver<u64>,
    stop: CancellationToken,
) {
    crate::resume(
        "Watch of the fleet's function versions",
        &stop,
        || sink.is_closed(),
        || watch_once(&js, replicas, &sink, reconnects.clone(), &stop),
    )
    .await;
}

async fn watch_once(
    js: &jetstream::Context,
    replicas: usize,
    sink: &mpsc::Sender<Activation>,
    mut reconnects: tokio::sync::watch::Receiver<u64>,
    stop: &CancellationToken,
) -> Result<(), String> {
    reconnects.mark_unchanged();
    let bucket = active(js, replicas).await?;
    let mut entries = bucket
        .watch_with_history(">")
        .await
        .map_err(|e| e.to_string())?;
    loop {
        let next = tokio::select! {
            _ = stop.cancelled() => return Ok(()),
            changed = reconnects.changed() => {
                return match changed {
                    Ok(()) => Err("reconnected; watching again from the current versions".into()),
                    Err(_) => Ok(()),
                };
            }
            e = tokio::time::timeout(Duration::from_secs(60), entries.next()) => e,
        };
        let entry = match next {
            // Quiet for a minute: fine, keep watching.
            Err(_idle) => continue,
            Ok(None) => return Err("watch ended".into()),
            Ok(Some(entry)) => entry.map_err(|e| e.to_string())?,
        };
        if entry.operation != kv::Operation::Put {
            continue;
        }
        match serde_json::from_slice::<Activation>(&entry.value) {
            Ok(a) if a.name == entry.key => {
                if sink.send(a).await.is_err() {
                    return Ok(());
                }
            }
            Ok(a) => {
                tracing::warn!(key = %entry.key, name = %a.name, "Ignored a function activation filed under another name.")
            }
            Err(e) => {
                tracing::warn!(key = %entry.key, error = %e, "Ignored a function activation that is not the expected JSON.")
            }
        }
    }
}
