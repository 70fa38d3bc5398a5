//! The NATS connection, with the fleet's options.

use std::sync::Arc;
use std::time::Duration;

use async_nats::{ConnectOptions, Event};

use crate::{FleetError, FleetOptions, FleetStatus};

/// Connects to `options.servers`. Returns at once even when no server answers: the client keeps
/// trying in the background, and `reconnects` ticks on every (re)connection so anti-entropy
/// runs again.
pub async fn connect(
    options: &FleetOptions,
    status: Arc<FleetStatus>,
    reconnects: tokio::sync::watch::Sender<u64>,
) -> Result<async_nats::Client, FleetError> {
    let mut opts = auth_options(options).await?;
    let name = format!("outpost {}", options.node_id);
    let node = options.node_id.clone();
    opts = opts
        .name(name)
        .retry_on_initial_connect()
        .max_reconnects(None)
        .connection_timeout(Duration::from_secs(2))
        .ping_interval(Duration::from_secs(5))
        .event_callback(move |event| {
            let status = status.clone();
            let reconnects = reconnects.clone();
            let node = node.clone();
            async move {
                match event {
                    Event::Connected => {
                        status.connected.set(1);
                        reconnects.send_modify(|n| *n += 1);
                        tracing::info!(node = %node, "Fleet link up (NATS connected).");
                    }
                    Event::Disconnected => {
                        status.connected.set(0);
                        tracing::warn!(node = %node, "Fleet link down; serving from the local store and queueing changes.");
                    }
                    other => tracing::debug!(event = %other, "NATS event."),
                }
            }
        });
    let addrs = servers(options)?;
    opts.connect(addrs)
        .await
        .map_err(|e| FleetError::Connect(e.to_string()))
}

/// A one-shot connection for command-line tools: fails fast when no server answers.
pub async fn connect_once(options: &FleetOptions) -> Result<async_nats::Client, FleetError> {
    let addrs = servers(options)?;
    auth_options(options)
        .await?
        .connection_timeout(Duration::from_secs(3))
        .connect(addrs)
        .await
        .map_err(|e| FleetError::Connect(e.to_string()))
}

/// Credentials, token and TLS from the fleet settings.
async fn auth_options(options: &FleetOptions) -> Result<ConnectOptions, FleetError> {
    let mut opts = match &options.credentials_file {
        Some(path) => ConnectOptions::with_credentials_file(path)
            .await
            .map_err(|source| FleetError::File {
                path: path.clone(),
                source,
            })?,
        None => ConnectOptions::new(),
    };
    if let Some(token) = &options.token {
        opts = opts.token(token.clone());
    }
    if let Some(ca) = &options.tls_ca {
        opts = opts.add_root_certificates(ca.clone()).require_tls(true);
    }
    if let Some((cert, key)) = &options.tls_client {
        opts = opts.add_client_certificate(cert.clone(), key.clone());
    }
    Ok(opts)
}

fn servers(options: &FleetOptions) -> Result<Vec<async_nats::ServerAddr>, FleetError> {
    options
        .servers
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| s.parse::<async_nats::ServerAddr>())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| FleetError::Connect(e.to_string()))
}
