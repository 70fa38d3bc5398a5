//! `outpost purge`: asks a running node to purge its cache, through the admin API described by
//! the same config file the node runs with.

use std::path::Path;

use anyhow::{Context, anyhow, bail};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use outpost_config::Config;
use serde_json::json;

/// Sends `POST /cache/purge` and returns the node's answer as a sentence.
pub fn run(
    config_path: &Path,
    admin: Option<String>,
    url: Option<String>,
    prefix: Option<String>,
    tag: Option<String>,
    soft: bool,
) -> anyhow::Result<String> {
    let config = Config::load(config_path)?;
    let token = crate::serve::admin_token(&config)?.ok_or_else(|| {
        anyhow!("no admin token: set [admin] token_file (or token) in the config, or OUTPOST_ADMIN_TOKEN")
    })?;
    let body = json!({ "url": url, "prefix": prefix, "tag": tag, "soft": soft }).to_string();
    let addr = admin.unwrap_or_else(|| config.admin.addr.clone());
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let (status, text) = runtime.block_on(request(
        &addr,
        &token,
        http::Method::POST,
        "/cache/purge",
        "application/json",
        Bytes::from(body),
    ))?;
    if !status.is_success() {
        bail!(
            "the node at {addr} refused the purge ({status}): {}",
            text.trim()
        );
    }
    let answer: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("unexpected answer: {text}"))?;
    let n = answer["purged"].as_u64().unwrap_or(0);
    let how = if soft { "marked stale" } else { "removed" };
    Ok(format!(
        "{n} cache entr{} {how}",
        if n == 1 { "y" } else { "ies" }
    ))
}

/// One call to the running node's admin API; the answer's status and text.
pub async fn request(
    addr: &str,
    token: &str,
    method: http::Method,
    path: &str,
    content_type: &str,
    body: Bytes,
) -> anyhow::Result<(http::StatusCode, String)> {
    let stream = tokio::net::TcpStream::connect(addr)
        .await
        .with_context(|| format!("cannot reach the admin API at {addr}; is the node running?"))?;
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .context("admin API handshake failed")?;
    tokio::spawn(conn);
    let req = http::Request::builder()
        .method(method)
        .uri(path)
        .header(http::header::HOST, addr)
        .header(http::header::AUTHORIZATION, format!("Bearer {token}"))
        .header(http::header::CONTENT_TYPE, content_type)
        .body(Full::new(body))
        .context("cannot build the admin request")?;
    let resp = sender
        .send_request(req)
        .await
        .context("admin API request failed")?;
    let status = resp.status();
    let bytes = resp
        .into_body()
        .collect()
        .await
        .context("admin API answer cut short")?
        .to_bytes();
    Ok((status, String::from_utf8_lossy(&bytes).into_owned()))
}
