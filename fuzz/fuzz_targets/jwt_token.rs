//! Client-controlled bearer tokens and cookies through the JWT validator: whatever arrives is
//! a clean refusal (or, with a valid signature, a principal), never a panic.
#![no_main]

use std::sync::{Arc, LazyLock};
use std::time::Duration;

use http::{HeaderMap, HeaderValue};
use libfuzzer_sys::fuzz_target;
use outpost_guard::jwt::{Algorithm, KeySource, Rules};
use outpost_guard::{Authenticator, keys};

static AUTH: LazyLock<Authenticator> = LazyLock::new(|| {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../crates/outpost-guard/tests/keys");
    let mut list = Vec::new();
    for f in ["ed.pub", "rsa.pub", "ec256.pub"] {
        list.extend(keys::from_file(&dir.join(f)).unwrap_or_default());
    }
    list.push(keys::from_secret(b"fuzz"));
    Authenticator::new(
        Rules {
            optional: true,
            algorithms: vec![Algorithm::EdDSA, Algorithm::RS256, Algorithm::ES256, Algorithm::HS256],
            issuer: Some("https://idp".into()),
            audience: vec!["api".into()],
            leeway: Duration::from_secs(30),
            cookie: Some("session".into()),
            required_scopes: vec!["read".into()],
            required_roles: vec![],
            required_claims: Default::default(),
            forward_claims: vec![],
        },
        KeySource::Static(Arc::new(list)),
    )
});

fuzz_target!(|data: &[u8]| {
    let runtime = tokio::runtime::Builder::new_current_thread().build();
    let Ok(runtime) = runtime else { return };
    let (auth, cookie) = data.split_at(data.len() / 2);
    let mut headers = HeaderMap::new();
    if let Ok(v) = HeaderValue::from_bytes(auth) {
        headers.insert(http::header::AUTHORIZATION, v);
    }
    if let Ok(v) = HeaderValue::from_bytes(cookie) {
        headers.insert(http::header::COOKIE, v);
    }
    let _ = runtime.block_on(AUTH.authenticate(&headers));
});
