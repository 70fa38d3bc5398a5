//! Origin- and client-controlled cache headers through every cache rule: Cache-Control,
//! Expires, Date, Age, Last-Modified, Vary, ETag and the client's conditionals and Range.
#![no_main]

use std::time::{Duration, UNIX_EPOCH};

use http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode};
use libfuzzer_sys::fuzz_target;
use outpost_cache::RoutePolicy;
use outpost_cache::directives::{RequestDirectives, ResponseDirectives};
use outpost_cache::object;
use outpost_cache::policy::{self, Freshness};

const NAMES: [&str; 10] = [
    "cache-control",
    "expires",
    "date",
    "age",
    "last-modified",
    "vary",
    "etag",
    "if-none-match",
    "if-modified-since",
    "range",
];

fuzz_target!(|data: &[u8]| {
    let fields: Vec<&[u8]> = data.split(|b| *b == 0xff).collect();
    let mut headers = HeaderMap::new();
    for (i, field) in fields.iter().enumerate() {
        if let Ok(v) = HeaderValue::from_bytes(field) {
            headers.append(HeaderName::from_static(NAMES[i % NAMES.len()]), v);
        }
    }
    let t = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
    let policy = RoutePolicy::default();
    let dirs = ResponseDirectives::from_headers(&headers);
    let req = RequestDirectives::from_headers(&headers);
    let status = StatusCode::from_u16(200 + u16::from(data.first().copied().unwrap_or(0)) % 400)
        .unwrap_or(StatusCode::OK);
    let asked = policy::Asked {
        method: &Method::GET,
        headers: &headers,
        authenticated: false,
        directives: &req,
    };
    let _ = policy::storable(&asked, status, &headers, &dirs, &policy);
    let fresh = Freshness::compute(status, &headers, &dirs, t, t, &policy);
    let later = t + Duration::from_secs(u64::from(data.len() as u32));
    let _ = policy::reuse(&fresh, false, &req, true, later);
    let _ = fresh.usable_on_error(later);
    let _ = policy::vary_names(&headers);
    if let Some(r) = headers.get("range") {
        let _ = object::byte_range(r, data.len() as u64);
    }
});
