//! The admin API (axum), loopback by default.
//!
//! Read-only endpoints (`/metrics`, `/livez`, `/readyz`, `/origins`) are open on the admin
//! listener; anything that changes the node (`POST /reload`, `POST /cache/purge`, later
//! deploys) needs `Authorization: Bearer <token>` and is disabled when no token is configured.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::serve::Lifecycle;

/// Serves the admin API until `shutdown` fires.
pub async fn serve(
    listener: tokio::net::TcpListener,
    life: Arc<Lifecycle>,
    shutdown: CancellationToken,
) {
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/livez", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/origins", get(origins))
        .route("/reload", post(reload))
        .route("/cache/purge", post(purge))
        .merge(
            // Everything that reads or changes state needs the token: checked once, here.
            crate::state_api::routes()
                .merge(crate::analytics::routes())
                .merge(crate::functions_api::routes())
                .route_layer(axum::middleware::from_fn_with_state(
                    life.clone(),
                    require_token,
                )),
        )
        .with_state(life.clone());
    let limits = life.node.snapshot().config.server.clone();
    serve_connections(listener, app, limits, shutdown).await;
}

/// Most admin connections at once. The admin API is for operators and the CLI: a few dozen is
/// plenty, and the cap keeps idle sockets from using up the node's file descriptors (which the
/// proxy listeners need).
const ADMIN_MAX_CONNECTIONS: usize = 64;

/// The admin listener's accept loop, with the proxy listeners' guards: a connection cap, the
/// first-byte and header-read timeouts (slowloris) and the send timeout. `axum::serve` has none
/// of these.
async fn serve_connections(
    listener: tokio::net::TcpListener,
    app: Router,
    limits: outpost_config::Server,
    shutdown: CancellationToken,
) {
    use hyper_util::rt::{TokioIo, TokioTimer};
    use outpost_proxy::server::{SendDeadline, first_bytes};

    let permits = Arc::new(tokio::sync::Semaphore::new(ADMIN_MAX_CONNECTIONS));
    let connections = tokio_util::task::TaskTracker::new();
    loop {
        let permit = tokio::select! {
            () = shutdown.cancelled() => break,
            p = permits.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
        };
        let (stream, peer) = tokio::select! {
            () = shutdown.cancelled() => break,
            a = listener.accept() => match a {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "Admin accept failed.");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let svc = hyper_util::service::TowerToHyperService::new(app.clone());
        let shutdown = shutdown.clone();
        let limits = limits.clone();
        connections.spawn(async move {
            let _permit = permit;
            if !first_bytes(&stream, limits.header_read_timeout, &shutdown).await {
                tracing::debug!(%peer, "Admin connection sent nothing in time; closed.");
                return;
            }
            let io = TokioIo::new(SendDeadline::new(stream, limits.send_timeout));
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(limits.header_read_timeout)
                .serve_connection(io, svc);
            tokio::pin!(conn);
            tokio::select! {
                res = conn.as_mut() => {
                    if let Err(e) = res {
                        tracing::debug!(%peer, error = %e, "Admin connection ended with an error.");
                    }
                }
                () = shutdown.cancelled() => {
                    conn.as_mut().graceful_shutdown();
                    let _ = conn.await;
                }
            }
        });
    }
    connections.close();
    connections.wait().await;
}

async fn metrics(State(life): State<Arc<Lifecycle>>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        life.node.metrics().encode(),
    )
        .into_response()
}

async fn readyz(State(life): State<Arc<Lifecycle>>) -> Response {
    if life.draining.load(Ordering::Acquire) {
        (StatusCode::SERVICE_UNAVAILABLE, "draining\n").into_response()
    } else if !life.store.is_writable() {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "the local store takes no writes (see the log); restart the node\n",
        )
            .into_response()
    } else if life.ready.load(Ordering::Acquire) {
        (StatusCode::OK, "ready\n").into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "starting\n").into_response()
    }
}

/// Each origin group's endpoints and whether they take traffic: the operator's first question
/// when requests fail over.
async fn origins(State(life): State<Arc<Lifecycle>>) -> Response {
    let snap = life.node.snapshot();
    let mut groups: Vec<_> = snap
        .origins
        .groups()
        .map(|g| {
            let endpoints: Vec<_> = g
                .endpoints
                .iter()
                .map(|e| {
                    json!({
                        "endpoint": e.authority.as_str(),
                        "region": &*e.region,
                        "location": { "lat": e.location.lat, "lon": e.location.lon },
                        "healthy": e.actively_healthy(),
                        "ejected": e.is_ejected(),
                        "available": e.is_available(),
                    })
                })
                .collect();
            (
                g.name.clone(),
                json!({ "name": g.name, "endpoints": endpoints }),
            )
        })
        .collect();
    groups.sort_by(|a, b| a.0.cmp(&b.0));
    let list: Vec<_> = groups.into_iter().map(|(_, v)| v).collect();
    axum::Json(json!({ "origins": list })).into_response()
}

async fn reload(State(life): State<Arc<Lifecycle>>, headers: HeaderMap) -> Response {
    if let Err(resp) = authorize(&life, &headers) {
        return resp;
    }
    match life.reload().await {
        Ok(()) => {
            tracing::info!("Configuration reloaded (admin API).");
            (StatusCode::OK, "reloaded\n").into_response()
        }
        Err(diagnostics) => {
            tracing::error!(diagnostics = %diagnostics, "Configuration rejected; the previous one keeps serving.");
            (StatusCode::UNPROCESSABLE_ENTITY, diagnostics).into_response()
        }
    }
}

/// `POST /cache/purge` body: exactly one target, and whether to mark stale instead of remove.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PurgeRequest {
    /// One URL (`https://host/path?query` or `host/path?query`).
    #[serde(default)]
    pub url: Option<String>,
    /// A URL prefix (`host/path/`), or a path prefix on every host (`/path/`).
    #[serde(default)]
    pub prefix: Option<String>,
    /// A tag from `Surrogate-Key` / `Cache-Tag`.
    #[serde(default)]
    pub tag: Option<String>,
    /// Mark stale (still usable by stale-while-revalidate / stale-if-error) instead of removing.
    #[serde(default)]
    pub soft: bool,
}

impl PurgeRequest {
    /// The one target, or why the request is unusable.
    pub fn target(&self) -> Result<outpost_cache::PurgeTarget, &'static str> {
        use outpost_cache::PurgeTarget;
        match (&self.url, &self.prefix, &self.tag) {
            (Some(u), None, None) if !u.is_empty() => Ok(PurgeTarget::Url(u.clone())),
            (None, Some(p), None) if !p.is_empty() => Ok(PurgeTarget::Prefix(p.clone())),
            (None, None, Some(t)) if !t.is_empty() => Ok(PurgeTarget::Tag(t.clone())),
            _ => Err("give exactly one non-empty target: \"url\", \"prefix\" or \"tag\""),
        }
    }
}

async fn purge(
    State(life): State<Arc<Lifecycle>>,
    headers: HeaderMap,
    body: bytes::Bytes,
) -> Response {
    if let Err(resp) = authorize(&life, &headers) {
        return resp;
    }
    let request: PurgeRequest = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => {
            return (
                StatusCode::BAD_REQUEST,
                axum::Json(json!({ "error": format!("invalid purge request: {e}") })),
            )
                .into_response();
        }
    };
    let target = match request.target() {
        Ok(t) => t,
        Err(msg) => {
            return (StatusCode::BAD_REQUEST, axum::Json(json!({ "error": msg }))).into_response();
        }
    };
    let purged = life.node.cache().purge(&target, request.soft).await;
    // A target can be up to the body limit long: the log gets its start.
    let shown: String = format!("{target:?}").chars().take(300).collect();
    tracing::info!(target = %shown, soft = request.soft, purged, "Cache purged (admin API).");
    axum::Json(json!({ "purged": purged, "soft": request.soft })).into_response()
}

/// Layer for the state and analytics routes: the admin token, or the ready-made refusal.
async fn require_token(
    State(life): State<Arc<Lifecycle>>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    match authorize(&life, request.headers()) {
        Ok(()) => next.run(request).await,
        Err(resp) => resp,
    }
}

/// Checks the bearer token in constant time.
#[expect(
    clippy::result_large_err,
    reason = "the error is the ready-made HTTP response"
)]
fn authorize(life: &Lifecycle, headers: &HeaderMap) -> Result<(), Response> {
    let Some(expected) = life.admin_token.as_deref() else {
        return Err((
            StatusCode::FORBIDDEN,
            "mutating admin calls are disabled: set [admin] token_file or OUTPOST_ADMIN_TOKEN\n",
        )
            .into_response());
    };
    // RFC 9110 §11.1, §11.4: the scheme in any case, then one or more spaces.
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map_or("", |(_, token)| token.trim_start_matches(' '));
    if constant_time_eq(given.as_bytes(), expected.as_bytes()) {
        Ok(())
    } else {
        Err((
            StatusCode::UNAUTHORIZED,
            [(header::WWW_AUTHENTICATE, "Bearer")],
            "missing or wrong admin token\n",
        )
            .into_response())
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::constant_time_eq;

    #[test]
    fn token_comparison() {
        assert!(constant_time_eq(b"secret", b"secret"));
        assert!(!constant_time_eq(b"secret", b"secreT"));
        assert!(!constant_time_eq(b"secret", b"secret2"));
    }
}
