//! Shared code for Outpost's example guest functions.
//!
//! * [`bindings`]: `wit-bindgen` bindings of the `outpost:functions/edge` world
//!   (`../wit/world.wit`): `wasi:keyvalue/{store,atomics}@0.2.0-draft` and
//!   `wasi:config/store@0.2.0-rc.1`. Every `wasi:http`/`wasi:io`/... interface is
//!   mapped onto the `wasip2` crate, so the HTTP types are `wasip2`'s and the two
//!   crates mix freely. Guests using kv/config export their handler with
//!   [`export!`] (a guest that needs neither can use `wasip2::http::proxy::export!`).
//! * small conveniences over `wasip2::http`: reading headers, sending a complete
//!   response, reading or streaming bodies, calling an origin group.
//!
//! Only the interfaces a guest actually calls end up as imports of its component.

use std::io::{Read as _, Write as _};

use wasip2::http::outgoing_handler;
use wasip2::http::types::{
    ErrorCode, Fields, IncomingBody, IncomingRequest, IncomingResponse, OutgoingBody,
    OutgoingRequest, OutgoingResponse, ResponseOutparam,
};
use wasip2::io::streams::{InputStream, OutputStream};

/// Generated bindings for the `edge` world.
pub mod bindings {
    wit_bindgen::generate!({
        path: "../wit",
        world: "outpost:functions/edge",
        with: {
            "wasi:http/types@0.2.12": wasip2::http::types,
            "wasi:http/outgoing-handler@0.2.12": wasip2::http::outgoing_handler,
            "wasi:io/error@0.2.12": wasip2::io::error,
            "wasi:io/poll@0.2.12": wasip2::io::poll,
            "wasi:io/streams@0.2.12": wasip2::io::streams,
            "wasi:clocks/monotonic-clock@0.2.12": wasip2::clocks::monotonic_clock,
            "wasi:clocks/wall-clock@0.2.12": wasip2::clocks::wall_clock,
            "wasi:random/random@0.2.12": wasip2::random::random,
            "wasi:cli/stdin@0.2.12": wasip2::cli::stdin,
            "wasi:cli/stdout@0.2.12": wasip2::cli::stdout,
            "wasi:cli/stderr@0.2.12": wasip2::cli::stderr,
            "wasi:keyvalue/store@0.2.0-draft": generate,
            "wasi:keyvalue/atomics@0.2.0-draft": generate,
            "wasi:config/store@0.2.0-rc.1": generate,
        },
        pub_export_macro: true,
        default_bindings_module: "outpost_guest::bindings",
    });
}

pub use bindings::export;
pub use bindings::exports;
/// `wasi:config/store@0.2.0-rc.1`.
pub use bindings::wasi::config::store as config;
/// `wasi:keyvalue/{store,atomics}@0.2.0-draft`.
pub use bindings::wasi::keyvalue::{atomics, store as kv};

/// `wasi:config` `get(key)`; the host's error is rendered as text.
pub fn config_get(key: &str) -> Result<Option<String>, String> {
    config::get(key).map_err(|e| format!("wasi:config get {key:?}: {e:?}"))
}

/// Opens the node's default key-value bucket (the host accepts `""` and `"default"`).
pub fn kv_open() -> Result<kv::Bucket, String> {
    kv::open("").map_err(|e| format!("wasi:keyvalue open: {e:?}"))
}

/// First value of header `name` (lower case), lossily decoded as UTF-8.
pub fn header(fields: &Fields, name: &str) -> Option<String> {
    fields
        .get(name)
        .into_iter()
        .next()
        .map(|v| String::from_utf8_lossy(&v).into_owned())
}

/// First value of request header `name`.
pub fn req_header(req: &IncomingRequest, name: &str) -> Option<String> {
    header(&req.headers(), name)
}

/// Seconds since the Unix epoch (wasi:clocks wall-clock).
pub fn unix_now() -> u64 {
    wasip2::clocks::wall_clock::now().seconds
}

/// Sends a complete response: status, headers, body.
pub fn respond(out: ResponseOutparam, status: u16, headers: &[(&str, &str)], body: &[u8]) {
    let fields = Fields::new();
    for (k, v) in headers {
        // Only forbidden or malformed names fail; the callers pass constants.
        let _ = fields.append(k, v.as_bytes());
    }
    let resp = OutgoingResponse::new(fields);
    let _ = resp.set_status_code(status);
    let Ok(body_res) = resp.body() else { return };
    ResponseOutparam::set(out, Ok(resp));
    finish_with(body_res, body);
}

/// Writes `body` into an outgoing body and finishes it.
pub fn finish_with(body_res: OutgoingBody, body: &[u8]) {
    let Ok(mut stream) = body_res.write() else {
        return;
    };
    if stream
        .write_all(body)
        .and_then(|()| std::io::Write::flush(&mut stream))
        .is_err()
    {
        return; // the receiver went away; dropping without finish marks the body incomplete
    }
    drop(stream); // the child stream must be gone before finish
    let _ = OutgoingBody::finish(body_res, None);
}

/// A JSON error response `{"error":..,"reason":..,"request_id":..}`.
pub fn respond_error(
    out: ResponseOutparam,
    status: u16,
    extra_headers: &[(&str, &str)],
    error: &str,
    reason: &str,
    request_id: Option<&str>,
) {
    let body = format!(
        "{{\"error\":{},\"reason\":{},\"request_id\":{}}}",
        json_str(error),
        json_str(reason),
        json_opt(request_id)
    );
    let mut headers = vec![("content-type", "application/json")];
    headers.extend_from_slice(extra_headers);
    respond(out, status, &headers, body.as_bytes());
}

/// `s` as a JSON string literal.
pub fn json_str(s: &str) -> String {
    let mut o = String::with_capacity(s.len() + 2);
    o.push('"');
    for c in s.chars() {
        match c {
            '"' => o.push_str("\\\""),
            '\\' => o.push_str("\\\\"),
            '\n' => o.push_str("\\n"),
            '\r' => o.push_str("\\r"),
            '\t' => o.push_str("\\t"),
            c if (c as u32) < 0x20 => o.push_str(&format!("\\u{:04x}", c as u32)),
            c => o.push(c),
        }
    }
    o.push('"');
    o
}

/// `Some(s)` as a JSON string, `None` as `null`.
pub fn json_opt(s: Option<&str>) -> String {
    s.map_or_else(|| "null".to_owned(), json_str)
}

/// Reads a whole input stream, failing past `limit` bytes.
pub fn read_all(stream: &mut InputStream, limit: usize) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    let mut buf = vec![0u8; 64 << 10];
    loop {
        let n = stream.read(&mut buf).map_err(|e| e.to_string())?;
        if n == 0 {
            return Ok(out);
        }
        if out.len() + n > limit {
            return Err(format!("body larger than {limit} bytes"));
        }
        out.extend_from_slice(&buf[..n]);
    }
}

/// Reads an incoming body to the end (trailers are ignored).
pub fn read_body(body: IncomingBody, limit: usize) -> Result<Vec<u8>, String> {
    let mut stream = body
        .stream()
        .map_err(|()| "body stream already taken".to_owned())?;
    let bytes = read_all(&mut stream, limit)?;
    drop(stream);
    drop(IncomingBody::finish(body));
    Ok(bytes)
}

/// Copies `input` into `output` until `input` closes; returns the byte count.
/// Errors carry which side failed.
pub fn pump(input: &mut InputStream, output: &mut OutputStream) -> Result<u64, String> {
    let mut total = 0u64;
    let mut buf = vec![0u8; 64 << 10];
    loop {
        let n = input.read(&mut buf).map_err(|e| format!("read: {e}"))?;
        if n == 0 {
            std::io::Write::flush(output).map_err(|e| format!("flush: {e}"))?;
            return Ok(total);
        }
        output
            .write_all(&buf[..n])
            .map_err(|e| format!("write: {e}"))?;
        total += n as u64;
    }
}

/// Starts an outgoing request and waits for the response head.
///
/// Write the request body (if any) between [`outgoing_handler::handle`] and
/// waiting; for body-less requests this does both.
pub fn send(req: OutgoingRequest) -> Result<IncomingResponse, ErrorCode> {
    let fut = outgoing_handler::handle(req, None)?;
    wait_response(fut)
}

/// Waits for a `future-incoming-response`.
pub fn wait_response(
    fut: wasip2::http::types::FutureIncomingResponse,
) -> Result<IncomingResponse, ErrorCode> {
    fut.subscribe().block();
    match fut.get() {
        Some(Ok(r)) => r,
        Some(Err(())) => Err(ErrorCode::InternalError(Some(
            "response already taken".into(),
        ))),
        None => Err(ErrorCode::InternalError(Some(
            "response not ready after block".into(),
        ))),
    }
}
