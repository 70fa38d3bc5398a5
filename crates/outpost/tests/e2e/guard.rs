//! Edge guards end to end: JWT validation at the node and the signed identity the FastAPI
//! origin receives.

use std::time::{SystemTime, UNIX_EPOCH};

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};

use super::support::*;

fn test_key(name: &str) -> std::path::PathBuf {
    repo_root()
        .join("crates/outpost-guard/tests/keys")
        .join(name)
}

fn token(claims: Value) -> String {
    let key =
        EncodingKey::from_ed_pem(&std::fs::read(test_key("ed.key")).expect("key")).expect("ed key");
    jsonwebtoken::encode(&Header::new(Algorithm::EdDSA), &claims, &key).expect("sign")
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn seen<'a>(echo: &'a Value, name: &str) -> Vec<&'a str> {
    echo["headers"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|h| h[0] == name)
        .filter_map(|h| h[1].as_str())
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn jwt_at_the_edge_and_signed_identity_to_the_origin() {
    let origin = Origin::echo("us-west").await;
    let auth = format!(
        "forward_identity = true\n[routes.auth]\nalgorithms = [\"EdDSA\", \"RS256\"]\nkey_files = [\"{}\", \"{}\"]\nissuer = \"https://idp.test\"\naudience = [\"shop\"]\nforward_claims = [\"email\"]\n",
        test_key("ed.pub").display(),
        test_key("rsa.pub").display()
    );
    let admin_only = format!(
        "[routes.auth]\nalgorithms = [\"EdDSA\"]\nkey_files = [\"{}\"]\nrequired_scopes = [\"admin\"]\n",
        test_key("ed.pub").display()
    );
    let node = Node::start(
        &NodeConfig::new()
            .raw("[server]\ninternal_headers = [\"x-internal-user\"]")
            .origin("central", &[(&origin, PORTLAND)], "")
            .route("shop", "/echo", "central", &auth)
            .route("admin", "/echo/admin", "central", &admin_only),
    )
    .await;
    let c = client();

    let missing = c.get(node.url("/echo")).send().await.expect("missing");
    assert_eq!(missing.status(), 401);
    assert_eq!(missing.headers()["www-authenticate"], "Bearer");

    let garbage = c
        .get(node.url("/echo"))
        .bearer_auth("not.a.jwt")
        .send()
        .await
        .expect("garbage");
    assert_eq!(garbage.status(), 401);
    assert!(
        garbage.headers()["www-authenticate"]
            .to_str()
            .unwrap_or("")
            .starts_with("Bearer error=\"invalid_token\"")
    );
    let expired =
        token(json!({"sub": "u1", "iss": "https://idp.test", "aud": "shop", "exp": now() - 3600}));
    let r = c
        .get(node.url("/echo"))
        .bearer_auth(&expired)
        .send()
        .await
        .expect("expired");
    assert_eq!(r.status(), 401);

    let good = token(json!({
        "sub": "user-42", "iss": "https://idp.test", "aud": "shop", "exp": now() + 300,
        "email": "ada@example.com", "scope": "read"
    }));
    let r = c
        .get(node.url("/echo"))
        .bearer_auth(&good)
        .header("x-outpost-identity", "forged")
        .header("x-outpost-anything", "forged")
        .header("x-internal-user", "admin")
        .send()
        .await
        .expect("good");
    assert_eq!(r.status(), 200);
    let request_id = r.headers()["x-request-id"]
        .to_str()
        .unwrap_or("")
        .to_owned();
    let echo: Value = r.json().await.expect("json");
    let identity = seen(&echo, "x-outpost-identity");
    assert_eq!(identity.len(), 1, "exactly one identity, the node's");
    assert_ne!(identity[0], "forged");
    assert!(seen(&echo, "x-outpost-anything").is_empty());
    assert!(
        seen(&echo, "x-internal-user").is_empty(),
        "configured internal header stripped"
    );

    // The origin can verify it with the node's JWKS.
    let jwks = c
        .get(node.url("/.well-known/outpost/jwks.json"))
        .send()
        .await
        .expect("jwks")
        .text()
        .await
        .expect("jwks body");
    let keys = outpost_guard::keys::from_jwks(jwks.as_bytes()).expect("parse jwks");
    let verifier = outpost_guard::Authenticator::new(
        outpost_guard::jwt::Rules {
            optional: false,
            algorithms: vec![Algorithm::EdDSA],
            issuer: Some("outpost".into()),
            audience: vec!["central".into()],
            leeway: std::time::Duration::from_secs(5),
            cookie: None,
            required_scopes: vec![],
            required_roles: vec![],
            required_claims: Default::default(),
            forward_claims: vec![],
        },
        outpost_guard::jwt::KeySource::Static(std::sync::Arc::new(keys)),
    );
    let mut h = http::HeaderMap::new();
    h.insert(
        http::header::AUTHORIZATION,
        http::HeaderValue::from_str(&format!("Bearer {}", identity[0])).expect("header"),
    );
    let p = verifier
        .authenticate(&h)
        .await
        .expect("the identity verifies")
        .expect("present");
    assert_eq!(p.sub.as_deref(), Some("user-42"));
    assert_eq!(p.claims["claims"]["email"], "ada@example.com");
    assert!(
        p.claims["claims"].get("scope").is_none(),
        "only the listed claims"
    );
    assert_eq!(p.claims["node"], "test-node");
    assert_eq!(p.claims["rid"], request_id.as_str());
    assert_eq!(p.claims["geo"]["source"], "node");

    // Insufficient scope on the admin route: 403 with the RFC 6750 error.
    let r = c
        .get(node.url("/echo/admin"))
        .bearer_auth(&good)
        .send()
        .await
        .expect("admin");
    assert_eq!(r.status(), 403);
    assert!(
        r.headers()["www-authenticate"]
            .to_str()
            .unwrap_or("")
            .contains("insufficient_scope")
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn rate_limits_country_rules_and_residency() {
    let us = Origin::echo("us-west").await;
    let mut eu = Origin::echo("eu-west").await;
    let node = Node::start(
        &NodeConfig::new()
            .raw("[client_location]\ntrusted_proxies = [\"127.0.0.0/8\"]")
            .origin("api", &[(&us, PORTLAND), (&eu, DUBLIN)], "")
            .route(
                "limited",
                "/echo/limited",
                "api",
                "[[routes.rate_limits]]\nname = \"per-ip\"\nrate = 3\nper = \"1m\"",
            )
            .route(
                "eu",
                "/echo/eu",
                "api",
                "residency = [\"eu-west\"]\n[routes.geo]\nallow_countries = [\"DE\", \"FR\"]",
            ),
    )
    .await;
    let c = client();

    for left in [2, 1, 0] {
        let r = c.get(node.url("/echo/limited")).send().await.expect("req");
        assert_eq!(r.status(), 200);
        assert_eq!(r.headers()["ratelimit-policy"], "\"per-ip\";q=3;w=60");
        let rl = r.headers()["ratelimit"].to_str().unwrap_or("").to_owned();
        assert!(rl.starts_with(&format!("\"per-ip\";r={left};")), "{rl}");
    }
    let r = c
        .get(node.url("/echo/limited"))
        .send()
        .await
        .expect("limited");
    assert_eq!(r.status(), 429);
    let retry: u64 = r.headers()["retry-after"]
        .to_str()
        .ok()
        .and_then(|v| v.parse().ok())
        .expect("Retry-After seconds");
    assert!((1..=20).contains(&retry), "{retry}");
    assert!(r.headers().contains_key("ratelimit-policy"));
    let problem: Value = r.json().await.expect("problem json");
    assert_eq!(problem["type"], "urn:outpost:problem:rate-limited");

    let from = |country: &'static str| {
        c.get(node.url("/echo/eu"))
            .header("x-user-country", country)
            .send()
    };
    let r = from("US").await.expect("us");
    assert_eq!(r.status(), 451);
    let r = from("DE").await.expect("de");
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-origin-region"], "eu-west");

    // Residency: with eu-west down, German clients get a 503, never us-west.
    eu.kill();
    eventually(
        "the residency refusal",
        std::time::Duration::from_secs(10),
        || async {
            let r = from("DE").await.expect("de");
            r.status() == 503
                && r.json::<Value>().await.ok().is_some_and(|p| {
                    p["type"] == "urn:outpost:problem:no-resident-endpoint"
                        || p["type"] == "urn:outpost:problem:origin-unreachable"
                })
        },
    )
    .await;
    let r = from("FR").await.expect("fr");
    assert_ne!(
        r.headers().get("x-origin-region").map(|v| v.as_bytes()),
        Some(&b"us-west"[..])
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn ab_variants_are_sticky_forwarded_and_part_of_the_cache_key() {
    let origin = Origin::echo("us-west").await;
    let node = Node::start(
        &NodeConfig::new()
            .raw(
                "[client_location]\ntrusted_proxies = [\"127.0.0.0/8\"]\n\n[[experiments]]\nname = \"checkout\"\nvariants = [{ name = \"a\", weight = 50 }, { name = \"b\", weight = 50 }]",
            )
            .origin("api", &[(&origin, PORTLAND)], "")
            .route("shop", "/", "api", "experiments = [\"checkout\"]\n[routes.cache]"),
    )
    .await;
    let c = client();

    let first = c
        .get(node.url("/echo/x"))
        .header("x-outpost-variant", "checkout=forged")
        .send()
        .await
        .expect("first");
    let set_cookie = first.headers()["set-cookie"]
        .to_str()
        .unwrap_or("")
        .to_owned();
    let variant = set_cookie
        .strip_prefix("outpost_ab_checkout=")
        .and_then(|v| v.split(';').next())
        .expect("variant cookie")
        .to_owned();
    assert!(variant == "a" || variant == "b");
    let echo: Value = first.json().await.expect("json");
    assert_eq!(
        seen(&echo, "x-outpost-variant"),
        [format!("checkout={variant}")]
    );

    let again = c
        .get(node.url("/echo/x"))
        .header("cookie", format!("outpost_ab_checkout={variant}"))
        .send()
        .await
        .expect("again");
    assert!(
        again.headers().get("set-cookie").is_none(),
        "already pinned"
    );
    let echo: Value = again.json().await.expect("json");
    assert_eq!(
        seen(&echo, "x-outpost-variant"),
        [format!("checkout={variant}")]
    );

    // One cache entry per variant.
    for v in ["a", "b", "a", "b"] {
        let r = c
            .get(node.url("/cache/ab?cc=max-age%3D60"))
            .header("cookie", format!("outpost_ab_checkout={v}"))
            .send()
            .await
            .expect("cached");
        r.bytes().await.expect("body");
    }
    let count: Value = client()
        .get(format!("{}/control/count/ab", origin.url()))
        .send()
        .await
        .expect("count")
        .json()
        .await
        .expect("json");
    assert_eq!(count["n"], 2, "one origin fetch per variant");

    // New clients (distinct addresses through a trusted proxy) split about evenly.
    let mut b = 0;
    for i in 0..300u32 {
        let r = c
            .get(node.url("/echo/split"))
            .header(
                "x-forwarded-for",
                format!("203.0.{}.{}", i / 250, i % 250 + 1),
            )
            .send()
            .await
            .expect("split");
        if r.headers()["set-cookie"]
            .to_str()
            .unwrap_or("")
            .starts_with("outpost_ab_checkout=b")
        {
            b += 1;
        }
    }
    assert!((100..=200).contains(&b), "b got {b} of 300");
}
