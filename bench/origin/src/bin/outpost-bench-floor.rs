//! `outpost-bench-floor`: the leanest pass-through proxy that hyper allows, as a
//! floor for `bench/proxy.sh`.
//!
//! Usage: `outpost-bench-floor LISTEN_ADDR ORIGIN_ADDR`
//!
//! Outpost's client side is hyper's HTTP/1 server and its requests and
//! responses are `http` types with `HeaderMap`s (DESIGN.md §4). Whatever
//! Outpost does per request is on top of what this program does: it accepts a
//! connection, opens one origin connection of its own for it (no pool to look
//! up, no endpoint to choose), and hands each request to hyper's HTTP/1 client
//! on that connection untouched (no header is read, removed or added, no
//! timeout, no metric, no log), then the response back untouched. It runs on a
//! current-thread Tokio runtime and Outpost's allocator, as Outpost does with one worker.
//!
//! Its CPU per request, measured in the same run as nginx and Outpost, says how
//! much of Outpost's cost is the hyper/Tokio stack itself, which no change to
//! Outpost's own code can remove. It is a benchmark tool, not a proxy: it does
//! not handle hop-by-hop fields, errors or slow clients.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};

use bytes::Bytes;
use http_body_util::{Either, Full};
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};

// Outpost's own allocator, the very file: the floor should not pay glibc's malloc where
// Outpost pays mimalloc's.
#[path = "../../../../crates/outpost/src/alloc.rs"]
mod alloc;

#[global_allocator]
static GLOBAL: alloc::MiMalloc = alloc::MiMalloc;

const USAGE: &str = "usage: outpost-bench-floor LISTEN_ADDR ORIGIN_ADDR";

/// The origin's body as it comes, or our own 502 text: no boxing per response.
type Body = Either<Incoming, Full<Bytes>>;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let (Some(listen), Some(origin), None) = (args.next(), args.next(), args.next()) else {
        return Err(USAGE.into());
    };
    let listen: SocketAddr = listen
        .parse()
        .map_err(|e| format!("LISTEN_ADDR: {e}\n{USAGE}"))?;
    let origin: SocketAddr = origin
        .parse()
        .map_err(|e| format!("ORIGIN_ADDR: {e}\n{USAGE}"))?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()?;
    runtime.block_on(serve(listen, origin))
}

/// Accepts connections forever; each gets its own task and origin connection.
async fn serve(listen: SocketAddr, origin: SocketAddr) -> Result<(), Box<dyn std::error::Error>> {
    let listener = TcpListener::bind(listen).await?;
    eprintln!(
        "outpost-bench-floor: listening on http://{}, origin {origin}",
        listener.local_addr()?
    );
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _peer)) => stream,
            Err(e) => {
                eprintln!("outpost-bench-floor: accept: {e}");
                tokio::task::yield_now().await;
                continue;
            }
        };
        tokio::spawn(async move {
            if let Err(e) = connection(stream, origin).await {
                eprintln!("outpost-bench-floor: connection: {e}");
            }
        });
    }
}

/// Serves one client connection over one origin connection of its own.
async fn connection(
    client: TcpStream,
    origin: SocketAddr,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    client.set_nodelay(true)?;
    let upstream = TcpStream::connect(origin).await?;
    upstream.set_nodelay(true)?;
    let (sender, origin_conn) =
        hyper::client::conn::http1::handshake(TokioIo::new(upstream)).await?;
    tokio::spawn(async move {
        if let Err(e) = origin_conn.await {
            eprintln!("outpost-bench-floor: origin connection: {e}");
        }
    });
    // hyper's server calls the service for a request only once the previous
    // response is written, so the sender is never wanted twice at once; the
    // mutex is only there to make that `Send`.
    let sender: Arc<Mutex<Option<SendRequest<Incoming>>>> = Arc::new(Mutex::new(Some(sender)));
    let service = service_fn(move |req: Request<Incoming>| {
        let sender = Arc::clone(&sender);
        async move { Ok::<_, Infallible>(forward(&sender, req).await) }
    });
    let result = http1::Builder::new()
        .keep_alive(true)
        .serve_connection(TokioIo::new(client), service)
        .await;
    match result {
        Err(e) if !e.is_incomplete_message() => Err(e.into()),
        _ => Ok(()),
    }
}

/// Sends `req` on the connection's origin connection and returns its response,
/// or a 502 if the origin connection is gone.
async fn forward(
    sender: &Mutex<Option<SendRequest<Incoming>>>,
    req: Request<Incoming>,
) -> Response<Body> {
    let taken = sender.lock().unwrap_or_else(PoisonError::into_inner).take();
    let Some(mut s) = taken else {
        return bad_gateway();
    };
    if s.ready().await.is_err() {
        return bad_gateway();
    }
    let response = s.send_request(req);
    *sender.lock().unwrap_or_else(PoisonError::into_inner) = Some(s);
    match response.await {
        Ok(response) => response.map(Either::Left),
        Err(_) => bad_gateway(),
    }
}

fn bad_gateway() -> Response<Body> {
    let mut response = Response::new(Either::Right(Full::new(Bytes::from_static(
        b"origin connection failed\n",
    ))));
    *response.status_mut() = StatusCode::BAD_GATEWAY;
    response
}
