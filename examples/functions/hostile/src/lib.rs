//! `hostile`: misbehaves on purpose, for the host's containment tests.
//!
//! | path         | behaviour                                                             |
//! |--------------|-----------------------------------------------------------------------|
//! | `/spin`      | infinite loop before any response (→ epoch deadline)                  |
//! | `/oom`       | allocates and touches 1 MiB chunks forever (→ memory limit)           |
//! | `/trap`      | `panic!` (→ trap)                                                     |
//! | `/huge`      | 200 headers, then 64 KiB body chunks forever                          |
//! | `/stall`     | 200 headers, writes `partial`, flushes, then spins forever            |
//! | `/sleep`     | blocks in a host call (monotonic-clock subscribe-duration, 1 hour)    |
//! | `/forbidden` | outgoing GET `http://example.com/` → 502 `denied: <error code>`       |
//! | `/escape`    | tries files, environment, arguments and sockets; reports what worked  |
//! | `/late`      | 200 `late` with `content-length: 4`, then 300 ms of work, then finish |
//! | `/ok`        | 200 `ok`                                                              |
//!
//! Anything else → 404.

use std::hint::black_box;
use std::io::Write as _;

use outpost_guest::{respond, send};
use wasip2::http::types::{
    Fields, IncomingRequest, OutgoingBody, OutgoingRequest, OutgoingResponse, ResponseOutparam,
    Scheme,
};

struct Hostile;

/// Burns CPU forever without touching the host.
fn spin() -> ! {
    let mut n = 0u64;
    loop {
        n = black_box(n.wrapping_add(1));
    }
}

fn text(out: ResponseOutparam, status: u16, body: &str) {
    respond(
        out,
        status,
        &[("content-type", "text/plain")],
        body.as_bytes(),
    );
}

impl wasip2::exports::http::incoming_handler::Guest for Hostile {
    fn handle(request: IncomingRequest, out: ResponseOutparam) {
        let path = request.path_with_query().unwrap_or_default();
        let path = path.split('?').next().unwrap_or("");
        match path {
            "/spin" => spin(),
            "/oom" => {
                let mut hoard: Vec<Vec<u8>> = Vec::new();
                loop {
                    let mut chunk = vec![0u8; 1 << 20];
                    for i in (0..chunk.len()).step_by(4096) {
                        chunk[i] = 1; // touch every page
                    }
                    hoard.push(black_box(chunk));
                }
            }
            "/trap" => panic!("hostile: trap requested"),
            "/huge" => {
                let resp = OutgoingResponse::new(Fields::new());
                let _ = resp.set_status_code(200);
                let body = resp.body().expect("body");
                ResponseOutparam::set(out, Ok(resp));
                let mut stream = body.write().expect("stream");
                let chunk = vec![b'x'; 64 << 10];
                loop {
                    if stream.write_all(&chunk).is_err() {
                        spin(); // the host stopped reading; keep misbehaving
                    }
                }
            }
            "/stall" => {
                let resp = OutgoingResponse::new(Fields::new());
                let _ = resp.set_status_code(200);
                let body = resp.body().expect("body");
                ResponseOutparam::set(out, Ok(resp));
                let mut stream = body.write().expect("stream");
                let _ = stream.write_all(b"partial");
                let _ = stream.blocking_flush();
                spin()
            }
            "/sleep" => {
                wasip2::clocks::monotonic_clock::subscribe_duration(3600 * 1_000_000_000).block();
                text(out, 200, "woke up after an hour")
            }
            "/forbidden" => {
                let req = OutgoingRequest::new(Fields::new());
                let _ = req.set_scheme(Some(&Scheme::Http));
                let _ = req.set_authority(Some("example.com"));
                let _ = req.set_path_with_query(Some("/"));
                match send(req) {
                    Ok(_) => text(out, 200, "reached"),
                    Err(code) => text(out, 502, &format!("denied: {code:?}")),
                }
            }
            "/escape" => {
                // Everything a guest might try to reach outside its sandbox; each line says
                // what happened. The host grants none of it.
                let mut report = String::new();
                for path in ["/etc/passwd", "/", ".", "/proc/self/environ"] {
                    let r = std::fs::read_dir(path)
                        .map(|_| "listed".to_owned())
                        .or_else(|_| std::fs::read(path).map(|b| format!("read {} bytes", b.len())));
                    report.push_str(&format!("file {path}: {}\n", r.map_or_else(|e| format!("denied ({e})"), |ok| format!("OPEN {ok}"))));
                }
                let vars: Vec<String> = std::env::vars().map(|(k, _)| k).collect();
                report.push_str(&format!("env: {} variables {vars:?}\n", vars.len()));
                report.push_str(&format!("args: {}\n", std::env::args().count()));
                for addr in ["127.0.0.1:22", "1.1.1.1:80"] {
                    let r = std::net::TcpStream::connect(addr);
                    report.push_str(&format!("tcp {addr}: {}\n", r.map_or_else(|e| format!("denied ({e})"), |_| "CONNECTED".to_owned())));
                }
                let r = std::net::UdpSocket::bind("0.0.0.0:0");
                report.push_str(&format!("udp bind: {}\n", r.map_or_else(|e| format!("denied ({e})"), |_| "BOUND".to_owned())));
                text(out, 200, &report)
            }
            "/late" => {
                // The client has the whole answer once its 4 declared bytes are out; the guest
                // goes on working (as after `waitUntil`) and returns normally.
                let fields = Fields::new();
                let _ = fields.append("content-type", b"text/plain");
                let _ = fields.append("content-length", b"4");
                let resp = OutgoingResponse::new(fields);
                let _ = resp.set_status_code(200);
                let body = resp.body().expect("body");
                ResponseOutparam::set(out, Ok(resp));
                let mut stream = body.write().expect("stream");
                let wrote = stream
                    .write_all(b"late")
                    .and_then(|()| std::io::Write::flush(&mut stream));
                drop(stream);
                wasip2::clocks::monotonic_clock::subscribe_duration(300_000_000).block();
                if wrote.is_err() || OutgoingBody::finish(body, None).is_err() {
                    panic!("hostile: the host closed a body whose length was all written");
                }
            }
            "/ok" => text(out, 200, "ok"),
            _ => text(out, 404, "unknown hostile path"),
        }
    }
}

wasip2::http::proxy::export!(Hostile);
