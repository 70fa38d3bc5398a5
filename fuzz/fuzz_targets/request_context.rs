//! Client-controlled request parts through the context stage and the router: headers that
//! carry location, forwarding chains, request ids and trace context, plus host and path.
#![no_main]

use http::{HeaderMap, HeaderName, HeaderValue};
use libfuzzer_sys::fuzz_target;
use outpost_config::{ClientLocation, GeoPoint};
use outpost_proxy::context::{ConnInfo, RequestContext, Scheme, TraceContext};
use outpost_proxy::geo::Locator;
use outpost_proxy::routing::{RouteTable, strip_prefix};

const NAMES: [&str; 7] = [
    "x-forwarded-for",
    "x-user-lat",
    "x-user-lon",
    "x-user-country",
    "x-request-id",
    "traceparent",
    "host",
];

fuzz_target!(|data: &[u8]| {
    // Split the input into fields on 0xff; each field becomes one header value.
    let fields: Vec<&[u8]> = data.split(|b| *b == 0xff).collect();
    let mut headers = HeaderMap::new();
    for (i, field) in fields.iter().enumerate() {
        if let Ok(v) = HeaderValue::from_bytes(field) {
            headers.append(HeaderName::from_static(NAMES[i % NAMES.len()]), v);
        }
    }
    let cfg = ClientLocation {
        trusted_proxies: vec!["127.0.0.0/8".parse().expect("static cidr")],
        ..ClientLocation::default()
    };
    let locator = Locator::new(&cfg, GeoPoint { lat: 0.0, lon: 0.0 });
    let conn = ConnInfo::new("127.0.0.1:1".parse().expect("static addr"), Scheme::Http);
    let ctx = RequestContext::new(&conn, &headers, &locator);
    let traceparent = ctx.trace.header_value();
    assert!(TraceContext::parse(traceparent.to_str().expect("ascii")).is_some());
    assert!(ctx.request_id.header().to_str().is_ok());

    let text = String::from_utf8_lossy(data);
    let (host, path) = text.split_once('/').unwrap_or((&text, ""));
    let path = format!("/{path}");
    let table = RouteTable::new([(None, "/"), (Some("*.example.com"), "/api"), (Some(host), "/x")]);
    let _ = table.find(host, &path);
    assert!(strip_prefix("/api", &path).starts_with('/'));
});
