//! `outpost-bench-origin`: the origin server behind the pass-through benchmarks.
//!
//! Usage: `outpost-bench-origin ADDR [BODY_BYTES]`
//!
//! It answers every request, whatever its method or path, with `200 OK`,
//! `content-type: text/plain` and a fixed body of `BODY_BYTES` bytes of `x`
//! (1024 by default), over HTTP/1.1 with keep-alive. It does as little as it
//! can per request so that, when a proxy is put in front of it, the figures
//! measure the proxy and not the origin: the body is built once at start-up
//! and every response only clones a `Bytes` handle to it.
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

use bytes::Bytes;
use http_body_util::Full;
use hyper::header::{CONTENT_TYPE, HeaderValue};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

/// Body length when `BODY_BYTES` is not given.
const DEFAULT_BODY_BYTES: usize = 1024;

const USAGE: &str = "usage: outpost-bench-origin ADDR [BODY_BYTES]";

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let addr: SocketAddr = args
        .next()
        .ok_or(USAGE)?
        .parse()
        .map_err(|e| format!("ADDR: {e}\n{USAGE}"))?;
    let body_bytes = match args.next() {
        Some(n) => n
            .parse::<usize>()
            .map_err(|e| format!("BODY_BYTES: {e}\n{USAGE}"))?,
        None => DEFAULT_BODY_BYTES,
    };
    if args.next().is_some() {
        return Err(USAGE.into());
    }

    // Leaked once so that the body is `'static`: cloning a `Bytes` made with
    // `from_static` copies a pointer and a length, with no reference count.
    let body = Bytes::from_static(vec![b'x'; body_bytes].leak());

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()?;
    runtime.block_on(serve(addr, body))
}

/// Accepts connections on `addr` forever and serves each on its own task.
async fn serve(addr: SocketAddr, body: Bytes) -> Result<(), Box<dyn std::error::Error>> {
    let listener = TcpListener::bind(addr).await?;
    eprintln!(
        "outpost-bench-origin: listening on http://{}, body {} bytes",
        listener.local_addr()?,
        body.len()
    );

    let text_plain = HeaderValue::from_static("text/plain");
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

        let body = body.clone();
        let text_plain = text_plain.clone();
        let service = service_fn(move |_req: Request<hyper::body::Incoming>| {
            let mut response = Response::new(Full::new(body.clone()));
            response
                .headers_mut()
                .insert(CONTENT_TYPE, text_plain.clone());
            async move { Ok::<_, Infallible>(response) }
        });

        tokio::spawn(async move {
            // Keep-alive is on by default in hyper's HTTP/1 server.
            let conn = http1::Builder::new()
                .keep_alive(true)
                .serve_connection(TokioIo::new(stream), service);
            if let Err(e) = conn.await {
                // A client closing mid-request is normal at the end of a run.
                if !e.is_incomplete_message() {
                    eprintln!("outpost-bench-origin: connection: {e}");
                }
            }
        });
    }
}
