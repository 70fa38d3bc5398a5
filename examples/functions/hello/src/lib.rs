//! `hello`: answers any request with a small JSON document describing what the
//! host told the guest (path, request id, geo, experiment variant).
//!
//! Deliberately tiny and dependent on nothing but `wasip2`, so it imports only
//! `wasi:http/proxy` interfaces: it is the instantiation benchmark.

use std::io::Write as _;
use wasip2::http::types::{
    Fields, IncomingRequest, OutgoingBody, OutgoingResponse, ResponseOutparam,
};

struct Hello;

impl wasip2::exports::http::incoming_handler::Guest for Hello {
    fn handle(request: IncomingRequest, response_out: ResponseOutparam) {
        let headers = request.headers();
        let h = |name: &str| {
            headers
                .get(name)
                .into_iter()
                .next()
                .map(|v| String::from_utf8_lossy(&v).into_owned())
        };
        let path = request.path_with_query().unwrap_or_else(|| "/".to_owned());
        let body = format!(
            "{{\"hello\":\"from wasm\",\"path\":{},\"request_id\":{},\"geo\":{{\"country\":{},\"region\":{},\"lat\":{},\"lon\":{}}},\"variant\":{}}}",
            json(Some(&path)),
            json(h("x-request-id").as_deref()),
            json(h("x-outpost-geo-country").as_deref()),
            json(h("x-outpost-geo-region").as_deref()),
            number(h("x-outpost-geo-lat").as_deref()),
            number(h("x-outpost-geo-lon").as_deref()),
            json(h("x-outpost-variant").as_deref()),
        );

        let fields = Fields::new();
        let _ = fields.append("content-type", b"application/json");
        let resp = OutgoingResponse::new(fields);
        let _ = resp.set_status_code(200);
        let Ok(out) = resp.body() else { return };
        ResponseOutparam::set(response_out, Ok(resp));
        let Ok(mut stream) = out.write() else { return };
        if stream
            .write_all(body.as_bytes())
            .and_then(|()| std::io::Write::flush(&mut stream))
            .is_err()
        {
            return;
        }
        drop(stream); // the child stream must be dropped before finish
        let _ = OutgoingBody::finish(out, None);
    }
}

/// A JSON string literal, or `null`.
fn json(s: Option<&str>) -> String {
    let Some(s) = s else { return "null".to_owned() };
    let mut o = String::with_capacity(s.len() + 2);
    o.push('"');
    for c in s.chars() {
        match c {
            '"' => o.push_str("\\\""),
            '\\' => o.push_str("\\\\"),
            c if (c as u32) < 0x20 => o.push_str(&format!("\\u{:04x}", c as u32)),
            c => o.push(c),
        }
    }
    o.push('"');
    o
}

/// The header as a JSON number when it is a plain decimal (`-12.5`, `48`), else
/// `null`. Checked by hand rather than with `f64` parsing to keep the module small.
fn number(s: Option<&str>) -> String {
    let Some(s) = s.map(str::trim) else {
        return "null".to_owned();
    };
    let digits = s.strip_prefix('-').unwrap_or(s);
    let (int, frac) = digits.split_once('.').unwrap_or((digits, "0"));
    let all_digits = |p: &str| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit());
    let no_leading_zero = int == "0" || !int.starts_with('0');
    if all_digits(int) && all_digits(frac) && no_leading_zero {
        s.to_owned()
    } else {
        "null".to_owned()
    }
}

wasip2::http::proxy::export!(Hello);
