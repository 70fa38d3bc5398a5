//! `outpost-bench-wsload`: a WebSocket load generator for `bench/websocket.sh`.
//!
//! Usage: `outpost-bench-wsload URL CONNECTIONS SECONDS MESSAGE_BYTES`
//!        `outpost-bench-wsload --hold URL CONNECTIONS SECONDS`
//!
//! Opens `CONNECTIONS` WebSockets to `URL` (a `ws://` URL; the handshakes are done before the
//! clock starts), then on each sends a binary message of `MESSAGE_BYTES` bytes, waits for it to
//! come back (the bench origin echoes), checks it, and sends the next, for `SECONDS`. Prints one
//! line: `round_trips N rate R p50_us P p99_us Q errors E`. A round trip is two messages
//! through whatever is between client and origin, one each way.
//!
//! With `--hold`: opens `CONNECTIONS` WebSockets, makes one small round trip on each, prints
//! `open N`, keeps them all open and quiet for `SECONDS`, then closes them (the memory a proxy
//! keeps per open WebSocket, read by the caller meanwhile).
//!
//! wrk cannot speak WebSocket; this is the same idea (closed loop, fixed connection count, on a
//! current-thread runtime pinned by the caller), written with tokio-tungstenite.

use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;

const USAGE: &str = "usage: outpost-bench-wsload URL CONNECTIONS SECONDS MESSAGE_BYTES\n       outpost-bench-wsload --hold URL CONNECTIONS SECONDS";

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    match args.as_slice() {
        [flag, url, connections, seconds] if flag == "--hold" => runtime.block_on(hold(
            url.clone(),
            arg(connections, "CONNECTIONS")?,
            Duration::from_secs_f64(arg(seconds, "SECONDS")?),
        )),
        [url, connections, seconds, bytes] => runtime.block_on(run(
            url.clone(),
            arg(connections, "CONNECTIONS")?,
            Duration::from_secs_f64(arg(seconds, "SECONDS")?),
            arg(bytes, "MESSAGE_BYTES")?,
        )),
        _ => Err(USAGE.into()),
    }
}

/// Parses the argument `name`, or says which and why.
fn arg<T: std::str::FromStr>(value: &str, name: &str) -> Result<T, String>
where
    T::Err: std::fmt::Display,
{
    value.parse().map_err(|e| format!("{name}: {e}\n{USAGE}"))
}

async fn run(
    url: String,
    connections: usize,
    duration: Duration,
    bytes: usize,
) -> Result<(), Box<dyn std::error::Error>> {
    let mut sockets = Vec::with_capacity(connections);
    for _ in 0..connections {
        let (ws, _) = tokio_tungstenite::connect_async(url.as_str()).await?;
        sockets.push(ws);
    }
    let payload: Vec<u8> = (0..bytes).map(|i| (i % 251) as u8).collect();
    let deadline = Instant::now() + duration;
    let started = Instant::now();
    let tasks: Vec<_> = sockets
        .into_iter()
        .map(|mut ws| {
            let payload = payload.clone();
            tokio::spawn(async move {
                let mut latencies: Vec<u32> = Vec::new();
                let mut errors = 0u64;
                while Instant::now() < deadline {
                    let sent = Instant::now();
                    if ws.send(Message::binary(payload.clone())).await.is_err() {
                        errors += 1;
                        break;
                    }
                    match ws.next().await {
                        Some(Ok(Message::Binary(echo))) if echo[..] == payload[..] => {
                            let us = sent.elapsed().as_micros();
                            latencies.push(u32::try_from(us).unwrap_or(u32::MAX));
                        }
                        _ => {
                            errors += 1;
                            break;
                        }
                    }
                }
                let _ = ws.close(None).await;
                (latencies, errors)
            })
        })
        .collect();
    let mut all = Vec::new();
    let mut errors = 0;
    for task in tasks {
        let (latencies, e) = task.await?;
        all.extend(latencies);
        errors += e;
    }
    let elapsed = started.elapsed().as_secs_f64();
    all.sort_unstable();
    let pct = |p: f64| {
        all.get(((all.len() as f64 * p) as usize).min(all.len().saturating_sub(1)))
            .copied()
            .unwrap_or(0)
    };
    println!(
        "round_trips {} rate {:.0} p50_us {} p99_us {} errors {}",
        all.len(),
        all.len() as f64 / elapsed,
        pct(0.50),
        pct(0.99),
        errors
    );
    Ok(())
}

/// Opens `connections` WebSockets, one round trip each, then holds them open and quiet.
async fn hold(
    url: String,
    connections: usize,
    duration: Duration,
) -> Result<(), Box<dyn std::error::Error>> {
    let mut sockets = Vec::with_capacity(connections);
    for _ in 0..connections {
        let (mut ws, _) = tokio_tungstenite::connect_async(url.as_str()).await?;
        ws.send(Message::binary(vec![b'x'; 64])).await?;
        match ws.next().await {
            Some(Ok(Message::Binary(_))) => {}
            other => return Err(format!("no echo: {other:?}").into()),
        }
        sockets.push(ws);
    }
    println!("open {}", sockets.len());
    tokio::time::sleep(duration).await;
    for mut ws in sockets {
        let _ = ws.close(None).await;
    }
    Ok(())
}
