//! Functions on the admin listener (token required, checked by `admin::require_token`) and the
//! `outpost fn` commands that call it.
//!
//! ```text
//! GET  /functions                          every function: versions, hashes, active, instantiation p50/p99
//! POST /functions/{name}/versions          body = the .wasm component; compiled, validated, activated (201)
//! POST /functions/{name}/rollback?version=N  back to N, or to the newest older version without N
//! ```

use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, anyhow, bail};
use axum::Router;
use axum::extract::{DefaultBodyLimit, Path as UrlPath, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use bytes::Bytes;
use outpost_config::Config;
use outpost_functions::FunctionError;
use serde::Deserialize;
use serde_json::json;

use crate::serve::Lifecycle;

/// The `/functions` routes.
pub fn routes() -> Router<Arc<Lifecycle>> {
    Router::new()
        .route("/functions", get(list))
        .route(
            "/functions/{name}/versions",
            post(deploy).layer(DefaultBodyLimit::max(
                outpost_functions::MAX_COMPONENT_BYTES,
            )),
        )
        .route("/functions/{name}/rollback", post(rollback))
}

fn error(e: &FunctionError) -> Response {
    let status = match e {
        FunctionError::Unknown(_) | FunctionError::NoSuchVersion { .. } => StatusCode::NOT_FOUND,
        FunctionError::Invalid { .. } | FunctionError::NothingToRollBack(_) => {
            StatusCode::UNPROCESSABLE_ENTITY
        }
        FunctionError::TooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    };
    (status, axum::Json(json!({ "error": e.to_string() }))).into_response()
}

fn no_functions() -> Response {
    (
        StatusCode::NOT_FOUND,
        axum::Json(json!({
            "error": "this node has no functions; declare them with [functions.NAME] tables and reload"
        })),
    )
        .into_response()
}

async fn list(State(life): State<Arc<Lifecycle>>) -> Response {
    let Some(f) = life.node.functions() else {
        return axum::Json(json!({ "functions": [] })).into_response();
    };
    axum::Json(json!({ "functions": f.list().await })).into_response()
}

async fn deploy(
    State(life): State<Arc<Lifecycle>>,
    UrlPath(name): UrlPath<String>,
    body: Bytes,
) -> Response {
    let Some(f) = life.node.functions() else {
        return no_functions();
    };
    match f.deploy(&name, body.to_vec()).await {
        Ok(v) => {
            tracing::info!(function = %name, version = v.version, sha256 = %v.sha256, "Function deployed.");
            let fleet = publish(&life, &name, &v.sha256, &body, v.deployed_ms).await;
            let mut answer = json!(v);
            answer["fleet"] = fleet;
            (StatusCode::CREATED, axum::Json(answer)).into_response()
        }
        Err(e) => {
            tracing::warn!(function = %name, error = %e, "Deploy rejected; the active version keeps serving.");
            error(&e)
        }
    }
}

#[derive(Deserialize)]
struct RollbackQuery {
    version: Option<u32>,
}

async fn rollback(
    State(life): State<Arc<Lifecycle>>,
    UrlPath(name): UrlPath<String>,
    Query(q): Query<RollbackQuery>,
) -> Response {
    let Some(f) = life.node.functions() else {
        return no_functions();
    };
    match f.rollback(&name, q.version).await {
        Ok(v) => {
            tracing::info!(function = %name, version = v.version, "Function rolled back.");
            let fleet = match f.component(&v.sha256) {
                Ok(wasm) => publish(&life, &name, &v.sha256, &wasm, now_ms()).await,
                Err(e) => json!({ "error": e.to_string() }),
            };
            let mut answer = json!(v);
            answer["fleet"] = fleet;
            axum::Json(answer).into_response()
        }
        Err(e) => error(&e),
    }
}

/// Makes the version this node just switched to the fleet's (when the node is in a fleet):
/// `"published"`, `"none"` (no `[fleet]`), or `{"error": …}`; the local switch stands either way.
async fn publish(
    life: &Lifecycle,
    name: &str,
    sha256: &str,
    wasm: &[u8],
    at_ms: u64,
) -> serde_json::Value {
    let Some(fleet) = &life.fleet else {
        return json!("none");
    };
    match fleet.publish_function(name, sha256, wasm, at_ms).await {
        Ok(()) => {
            tracing::info!(function = %name, sha256, "Function version published to the fleet.");
            json!("published")
        }
        Err(e) => {
            tracing::warn!(function = %name, sha256, error = %e, "Function version not published to the fleet; it is active on this node only.");
            json!({ "error": e })
        }
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// The fleet's word in a deploy or rollback answer, for the CLI.
fn fleet_line(v: &serde_json::Value) -> String {
    match &v["fleet"] {
        serde_json::Value::String(s) if s == "published" => {
            "fleet: published; every node switches to it\n".into()
        }
        serde_json::Value::Object(o) => format!(
            "fleet: NOT published ({}); active on this node only\n",
            o.get("error")
                .and_then(|e| e.as_str())
                .unwrap_or("unknown error")
        ),
        _ => String::new(),
    }
}

/// How `outpost fn list` prints.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum ListFormat {
    /// One line per version, the active one marked.
    Table,
    /// The admin API's JSON.
    Json,
}

/// What `outpost fn` was asked to do.
pub enum FnCommand {
    /// Deploy a component file as the next version.
    Deploy {
        name: String,
        file: std::path::PathBuf,
    },
    /// Show versions.
    List { format: ListFormat },
    /// Switch back.
    Rollback { name: String, version: Option<u32> },
}

/// Runs an `outpost fn` command against the node described by `config_path`.
pub fn run(config_path: &Path, admin: Option<String>, cmd: FnCommand) -> anyhow::Result<String> {
    let config = Config::load(config_path)?;
    let token = crate::serve::admin_token(&config)?.ok_or_else(|| {
        anyhow!("no admin token: set [admin] token_file (or token) in the config, or OUTPOST_ADMIN_TOKEN")
    })?;
    let addr = admin.unwrap_or_else(|| config.admin.addr.clone());
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let call = |method: http::Method, path: String, body: Bytes| {
        runtime.block_on(crate::purge::request(
            &addr,
            &token,
            method,
            &path,
            "application/wasm",
            body,
        ))
    };
    match cmd {
        FnCommand::Deploy { name, file } => {
            let wasm = std::fs::read(&file)
                .with_context(|| format!("cannot read component {}", file.display()))?;
            let (status, text) = call(
                http::Method::POST,
                format!("/functions/{name}/versions"),
                Bytes::from(wasm),
            )?;
            if !status.is_success() {
                bail!("deploy refused ({status}): {}", answer_error(&text));
            }
            let v: serde_json::Value = serde_json::from_str(&text)
                .with_context(|| format!("unexpected answer: {text}"))?;
            Ok(format!(
                "{name}: version {} active (sha256 {}, {} bytes)\n{}",
                v["version"],
                v["sha256"].as_str().unwrap_or("?"),
                v["size"],
                fleet_line(&v)
            ))
        }
        FnCommand::Rollback { name, version } => {
            let q = version.map(|v| format!("?version={v}")).unwrap_or_default();
            let (status, text) = call(
                http::Method::POST,
                format!("/functions/{name}/rollback{q}"),
                Bytes::new(),
            )?;
            if !status.is_success() {
                bail!("rollback refused ({status}): {}", answer_error(&text));
            }
            let v: serde_json::Value = serde_json::from_str(&text)
                .with_context(|| format!("unexpected answer: {text}"))?;
            Ok(format!(
                "{name}: version {} active\n{}",
                v["version"],
                fleet_line(&v)
            ))
        }
        FnCommand::List { format } => {
            let (status, text) = call(http::Method::GET, "/functions".into(), Bytes::new())?;
            if !status.is_success() {
                bail!("listing refused ({status}): {}", answer_error(&text));
            }
            match format {
                ListFormat::Json => Ok(format!("{}\n", text.trim_end())),
                ListFormat::Table => table(&text),
            }
        }
    }
}

fn answer_error(text: &str) -> String {
    serde_json::from_str::<serde_json::Value>(text)
        .ok()
        .and_then(|v| v["error"].as_str().map(str::to_owned))
        .unwrap_or_else(|| text.trim().to_owned())
}

fn table(text: &str) -> anyhow::Result<String> {
    let v: serde_json::Value =
        serde_json::from_str(text).with_context(|| format!("unexpected answer: {text}"))?;
    let mut out = String::from(
        "FUNCTION          VERSION  ACTIVE  SHA256        SIZE        SOURCE  INSTANTIATE p50/p99\n",
    );
    for f in v["functions"].as_array().into_iter().flatten() {
        let name = f["name"].as_str().unwrap_or("?");
        let active = f["active"].as_u64().unwrap_or(0);
        let inst = match (
            f["instantiate_us"]["p50"].as_f64(),
            f["instantiate_us"]["p99"].as_f64(),
        ) {
            (Some(a), Some(b)) => format!("{a:.1}/{b:.1} µs"),
            _ => "-".into(),
        };
        for ver in f["versions"].as_array().into_iter().flatten() {
            let n = ver["version"].as_u64().unwrap_or(0);
            let sha = ver["sha256"].as_str().unwrap_or("");
            out.push_str(&format!(
                "{name:<17} {n:<8} {:<7} {:<13} {:<11} {:<7} {}\n",
                if n == active { "*" } else { "" },
                sha.get(..12).unwrap_or(sha),
                ver["size"].as_u64().unwrap_or(0),
                ver["source"].as_str().unwrap_or(""),
                if n == active { inst.as_str() } else { "" },
            ));
        }
    }
    Ok(out)
}
