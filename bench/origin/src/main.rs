//! `outpost-bench-origin`: the origin server behind the benchmarks.
//!
//! Usage: `outpost-bench-origin [--cache-control VALUE] ADDR [BODY_BYTES]`
//!
//! It answers every request, whatever its method or path, with `200 OK`,
//! `content-type: text/plain` and a fixed body of `BODY_BYTES` bytes of `x`
//! (1024 by default), over HTTP/1.1 with keep-alive. It does as little as it
//! can per request so that, when a proxy is put in front of it, the figures
//! measure the proxy and not the origin: the body is built once at start-up
//! and every response only clones a `Bytes` handle to it.
//!
//! Two additions serve the cache benchmark (`bench/cache.sh`):
//!
//! - `--cache-control VALUE` (or `--cache-control=VALUE`) adds
//!   `cache-control: VALUE` to every response, `max-age=30` say, so that a
//!   cache in front stores the responses. Without it, responses carry no
//!   caching headers, as before.
//! - `GET /__count` answers `200`, `cache-control: no-store` and, as plain text,
//!   the number of requests served so far, `/__count` requests not included.
//!   Read before and after a run, it tells how many requests went through the
//!   cache to the origin. Counting costs one relaxed atomic increment per
//!   request (and one path comparison): lost in the run-to-run noise of the
//!   pass-through figures (direct: 9.5 CPU-µs per request afterwards).
//!
//! Every path other than `/__count` gets the same body: a cache in front keys
//! its entries by path, which is all a benchmark needs from an object set.
//!
//! A WebSocket handshake (`Upgrade: websocket`, any path) is accepted, and every
//! text or binary message on it is sent back as it came (`bench/websocket.sh`,
//! with `outpost-bench-wsload` as the client).
//!
//! It runs on a current-thread Tokio runtime: one thread polls the reactor and
//! every connection task, so a wake-up goes to a plain local run queue, with no
//! work-stealing queues, no search for a parked worker to notify and no second
//! thread. The benchmark pins the origin to one core (`taskset -c 1`), where a
//! multi-thread runtime would run a single worker anyway and could only add that
//! machinery. Measured on the 2-vCPU reference machine, the difference is within
//! run-to-run noise (8.6 to 9.8 CPU-µs per request with either runtime: the
//! kernel's side of each request dominates), so the simpler runtime is kept.
//!
//! It is a benchmark tool, not a server to deploy: it has no timeouts, no
//! limits and no graceful shutdown; it stops when it gets a signal.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http_body_util::Full;
use hyper::header::{CACHE_CONTROL, CONNECTION, CONTENT_TYPE, HeaderValue, UPGRADE};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::Role;

/// Body length when `BODY_BYTES` is not given.
const DEFAULT_BODY_BYTES: usize = 1024;

/// The path that answers the request count instead of the body.
const COUNT_PATH: &str = "/__count";

const USAGE: &str = "usage: outpost-bench-origin [--cache-control VALUE] ADDR [BODY_BYTES]";

/// Requests served so far, `/__count` requests not included. Relaxed: it is a
/// statistic read between runs, not a synchronisation point.
static REQUESTS: AtomicU64 = AtomicU64::new(0);

/// What every response carries, built once at start-up.
#[derive(Clone)]
struct Responder {
    body: Bytes,
    text_plain: HeaderValue,
    cache_control: Option<HeaderValue>,
}

impl Responder {
    fn respond(&self, req: &Request<hyper::body::Incoming>) -> Response<Full<Bytes>> {
        if req.uri().path() == COUNT_PATH {
            return self.count();
        }
        REQUESTS.fetch_add(1, Ordering::Relaxed);
        let mut response = Response::new(Full::new(self.body.clone()));
        let headers = response.headers_mut();
        headers.insert(CONTENT_TYPE, self.text_plain.clone());
        if let Some(cache_control) = &self.cache_control {
            headers.insert(CACHE_CONTROL, cache_control.clone());
        }
        response
    }

    fn count(&self) -> Response<Full<Bytes>> {
        let count = REQUESTS.load(Ordering::Relaxed);
        let mut response = Response::new(Full::new(Bytes::from(format!("{count}\n"))));
        let headers = response.headers_mut();
        headers.insert(CONTENT_TYPE, self.text_plain.clone());
        headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
        response
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut positional = Vec::new();
    let mut cache_control = None;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let value = if arg == "--cache-control" {
            Some(args.next().ok_or(USAGE)?)
        } else if let Some(value) = arg.strip_prefix("--cache-control=") {
            Some(value.to_owned())
        } else if arg.starts_with("--") {
            return Err(format!("unknown option {arg}\n{USAGE}").into());
        } else {
            positional.push(arg);
            None
        };
        if let Some(value) = value {
            // What `HeaderValue::from_static` accepts: visible ASCII and tabs.
            if !value
                .bytes()
                .all(|b| b == b'\t' || (b' '..=b'~').contains(&b))
            {
                return Err(format!("--cache-control: not a header value: {value:?}").into());
            }
            // Leaked, like the body, so that cloning the header value per
            // response copies a pointer, with no reference count.
            let value: &'static str = value.leak();
            cache_control = Some(HeaderValue::from_static(value));
        }
    }
    let mut positional = positional.into_iter();
    let addr: SocketAddr = positional
        .next()
        .ok_or(USAGE)?
        .parse()
        .map_err(|e| format!("ADDR: {e}\n{USAGE}"))?;
    let body_bytes = match positional.next() {
        Some(n) => n
            .parse::<usize>()
            .map_err(|e| format!("BODY_BYTES: {e}\n{USAGE}"))?,
        None => DEFAULT_BODY_BYTES,
    };
    if positional.next().is_some() {
        return Err(USAGE.into());
    }

    // Leaked once so that the body is `'static`: cloning a `Bytes` made with
    // `from_static` copies a pointer and a length, with no reference count.
    let body = Bytes::from_static(vec![b'x'; body_bytes].leak());
    let responder = Responder {
        body,
        text_plain: HeaderValue::from_static("text/plain"),
        cache_control,
    };

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()?;
    runtime.block_on(serve(addr, responder))
}

/// Accepts connections on `addr` forever and serves each on its own task.
async fn serve(addr: SocketAddr, responder: Responder) -> Result<(), Box<dyn std::error::Error>> {
    let listener = TcpListener::bind(addr).await?;
    eprintln!(
        "outpost-bench-origin: listening on http://{}, body {} bytes, cache-control: {}",
        listener.local_addr()?,
        responder.body.len(),
        responder
            .cache_control
            .as_ref()
            .map_or("(none)", |v| v.to_str().unwrap_or("(not text)")),
    );

    loop {
        let stream = match listener.accept().await {
            Ok((stream, _peer)) => stream,
            Err(e) => {
                // Typically EMFILE or a connection reset before accept: keep serving.
                eprintln!("outpost-bench-origin: accept: {e}");
                tokio::task::yield_now().await;
                continue;
            }
        };
        // Responses are written in one go; do not let Nagle hold them back.
        if let Err(e) = stream.set_nodelay(true) {
            eprintln!("outpost-bench-origin: TCP_NODELAY: {e}");
        }

        let responder = responder.clone();
        let service = service_fn(move |req: Request<hyper::body::Incoming>| {
            let response = match websocket_accept(&req) {
                Some(accept) => switch(req, accept),
                None => responder.respond(&req),
            };
            async move { Ok::<_, Infallible>(response) }
        });

        tokio::spawn(async move {
            // Keep-alive is on by default in hyper's HTTP/1 server.
            let conn = http1::Builder::new()
                .keep_alive(true)
                .serve_connection(TokioIo::new(stream), service)
                .with_upgrades();
            if let Err(e) = conn.await {
                // A client closing mid-request is normal at the end of a run.
                if !e.is_incomplete_message() {
                    eprintln!("outpost-bench-origin: connection: {e}");
                }
            }
        });
    }
}

/// The `Sec-WebSocket-Accept` for a WebSocket handshake (RFC 6455 §4.2.2), or `None` when the
/// request is not one.
fn websocket_accept(req: &Request<hyper::body::Incoming>) -> Option<HeaderValue> {
    let upgrade = req.headers().get(UPGRADE)?;
    if !upgrade.as_bytes().eq_ignore_ascii_case(b"websocket") {
        return None;
    }
    let key = req.headers().get("sec-websocket-key")?;
    HeaderValue::from_str(&derive_accept_key(key.as_bytes())).ok()
}

/// Answers `101` and, once hyper hands the connection over, echoes every text and binary
/// message until the client closes.
fn switch(mut req: Request<hyper::body::Incoming>, accept: HeaderValue) -> Response<Full<Bytes>> {
    let upgrade = hyper::upgrade::on(&mut req);
    tokio::spawn(async move {
        let Ok(upgraded) = upgrade.await else {
            return;
        };
        let mut ws =
            WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, None).await;
        while let Some(Ok(message)) = ws.next().await {
            if (message.is_binary() || message.is_text()) && ws.send(message).await.is_err() {
                break;
            }
        }
    });
    let mut response = Response::new(Full::new(Bytes::new()));
    *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let headers = response.headers_mut();
    headers.insert(CONNECTION, HeaderValue::from_static("upgrade"));
    headers.insert(UPGRADE, HeaderValue::from_static("websocket"));
    headers.insert("sec-websocket-accept", accept);
    response
}
