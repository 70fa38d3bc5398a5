//! Active health checks: a task per endpoint that GETs the check path on an interval and flips
//! the endpoint's verdict after `unhealthy_threshold` failures or `healthy_threshold` successes.

use std::sync::Arc;

use http::{Request, header};
use http_body_util::BodyExt;
use outpost_config::HealthCheck;
use tokio_util::sync::CancellationToken;

use super::Endpoint;
use crate::body::empty;

/// Largest health response body read (the rest is ignored and the connection dropped).
const MAX_HEALTH_BODY: usize = 64 * 1024;

/// Starts checking `endpoint` until `cancel` fires.
pub fn spawn(endpoint: Arc<Endpoint>, cfg: HealthCheck, cancel: CancellationToken) {
    tokio::spawn(async move {
        let mut successes = 0u32;
        let mut failures = 0u32;
        // Spread checks of many endpoints so they do not all fire at once.
        let jitter = cfg.interval.mul_f64(fastrand::f64() * 0.1);
        let mut first = true;
        loop {
            let wait = if first { jitter } else { cfg.interval };
            first = false;
            tokio::select! {
                () = cancel.cancelled() => return,
                () = tokio::time::sleep(wait) => {}
            }
            let ok = check(&endpoint, &cfg).await;
            if ok {
                successes += 1;
                failures = 0;
            } else {
                failures += 1;
                successes = 0;
            }
            let healthy = endpoint.actively_healthy();
            if healthy && failures >= cfg.unhealthy_threshold {
                endpoint.set_active(false);
                tracing::warn!(
                    origin = %endpoint.group,
                    endpoint = %endpoint.authority,
                    region = %endpoint.region,
                    failures,
                    "Endpoint marked unhealthy by active checks."
                );
            } else if !healthy && successes >= cfg.healthy_threshold {
                endpoint.set_active(true);
                tracing::info!(
                    origin = %endpoint.group,
                    endpoint = %endpoint.authority,
                    region = %endpoint.region,
                    successes,
                    "Endpoint healthy again."
                );
            }
        }
    });
}

async fn check(endpoint: &Endpoint, cfg: &HealthCheck) -> bool {
    let Ok(uri) = endpoint.uri_for(&cfg.path) else {
        return false;
    };
    let Ok(req) = Request::get(uri)
        .version(endpoint.version())
        .header(header::HOST, endpoint.authority.as_str())
        .header(
            header::USER_AGENT,
            concat!("outpost-health/", env!("CARGO_PKG_VERSION")),
        )
        .body(empty())
    else {
        return false;
    };
    let fut = async {
        let deadline = crate::alarm::deadline_after(tokio::time::Instant::now(), cfg.timeout);
        let resp = endpoint.exchange(req, &[], deadline).await.ok()?;
        let ok = resp.status().is_success();
        // Read (a bounded amount of) the body so the connection can return to the pool.
        let mut body = resp.into_body();
        let mut read = 0;
        while let Some(Ok(frame)) = body.frame().await {
            read += frame.data_ref().map_or(0, |d| d.len());
            if read > MAX_HEALTH_BODY {
                break;
            }
        }
        Some(ok)
    };
    matches!(tokio::time::timeout(cfg.timeout, fut).await, Ok(Some(true)))
}
