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

use super::support::echoed as seen;

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
    assert_eq!(
        node.metric("outpost_guard_rejections_total{route=\"limited\",reason=\"rate_limited\"}")
            .await,
        1.0
    );

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
    assert_eq!(
        origin.cache_count("ab").await,
        2,
        "one origin fetch per variant"
    );

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

/// A CA, and a server and a client certificate it signed.
pub(crate) fn pki(dir: &std::path::Path) {
    use rcgen::{
        BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose,
        IsCa, KeyPair, SanType,
    };
    // Distinct subject names: OpenSSL (uvicorn) treats a leaf named like its issuer as
    // self-signed and refuses it.
    let dn = |cn: &str| {
        let mut d = DistinguishedName::new();
        d.push(DnType::CommonName, cn);
        d
    };
    let ca_key = KeyPair::generate().expect("ca key");
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("ca params");
    ca_params.distinguished_name = dn("Outpost test CA");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).expect("ca");
    let server_key = KeyPair::generate().expect("server key");
    let mut server = CertificateParams::new(vec!["localhost".to_owned()]).expect("server params");
    server.distinguished_name = dn("localhost");
    server
        .subject_alt_names
        .push(SanType::IpAddress(std::net::IpAddr::from([127, 0, 0, 1])));
    let server = server
        .signed_by(&server_key, &ca, &ca_key)
        .expect("server cert");
    let client_key = KeyPair::generate().expect("client key");
    let mut client = CertificateParams::new(vec!["edge.test".to_owned()]).expect("client params");
    client.distinguished_name = dn("edge.test");
    client.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    let client = client
        .signed_by(&client_key, &ca, &ca_key)
        .expect("client cert");
    for (name, pem) in [
        ("ca.pem", ca.pem()),
        ("server.pem", server.pem()),
        ("server.key", server_key.serialize_pem()),
        ("client.pem", client.pem()),
        ("client.key", client_key.serialize_pem()),
    ] {
        std::fs::write(dir.join(name), pem).expect("write pem");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn https_origins_with_a_private_ca_and_mutual_tls() {
    let pki_dir = tempfile::tempdir().expect("pki dir");
    pki(pki_dir.path());
    let p = |n: &str| pki_dir.path().join(n);
    let origin = Origin::echo_tls(
        "us-west",
        &p("server.pem"),
        &p("server.key"),
        Some(&p("ca.pem")),
    )
    .await;
    let url = format!("https://127.0.0.1:{}", origin.addr.port());
    let endpoint = |group: &str| {
        format!(
            "[[origins.{group}.endpoints]]\nurl = \"{url}\"\nregion = \"us-west\"\nlocation = {{ lat = 45.5, lon = -122.7 }}\n"
        )
    };
    let toml = format!(
        "{}\n[origins.mtls]\ntls = {{ ca_file = \"{ca}\", client_cert = \"{cc}\", client_key = \"{ck}\" }}\n{}\n[origins.nocert]\ntls = {{ ca_file = \"{ca}\" }}\n{}\n[origins.system]\n{}\n[origins.h2]\nprotocol = \"h2\"\ntls = {{ ca_file = \"{ca}\", client_cert = \"{cc}\", client_key = \"{ck}\", server_name = \"localhost\" }}\n{}\n[[routes]]\nname = \"mtls\"\npath_prefix = \"/mtls\"\norigin = \"mtls\"\nstrip_prefix = true\n[[routes]]\nname = \"nocert\"\npath_prefix = \"/nocert\"\norigin = \"nocert\"\nstrip_prefix = true\n[[routes]]\nname = \"system\"\npath_prefix = \"/system\"\norigin = \"system\"\nstrip_prefix = true\n[[routes]]\nname = \"h2\"\npath_prefix = \"/h2\"\norigin = \"h2\"\nstrip_prefix = true\n",
        NodeConfig::new().render(),
        endpoint("mtls"),
        endpoint("nocert"),
        endpoint("system"),
        endpoint("h2"),
        ca = p("ca.pem").display(),
        cc = p("client.pem").display(),
        ck = p("client.key").display(),
    );
    let node = Node::start_in(tempfile::tempdir().expect("dir"), &toml).await;
    let c = client();

    let r = c.get(node.url("/mtls/echo/x")).send().await.expect("mtls");
    assert_eq!(r.status(), 200, "private CA + client certificate");
    let echo: Value = r.json().await.expect("json");
    assert_eq!(echo["path"], "/echo/x");

    // uvicorn serves HTTP/1.1 only, so an h2-only client cannot agree on a protocol: a clean
    // 502, not a hang.
    let r = c.get(node.url("/h2/echo")).send().await.expect("h2");
    assert_eq!(r.status(), 502);

    for route in ["/nocert/echo", "/system/echo"] {
        let r = c.get(node.url(route)).send().await.expect("refused");
        assert_eq!(r.status(), 502, "{route}: the handshake must fail");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_function_sees_the_verified_identity_and_the_origin_gets_it_signed() {
    let origin = Origin::echo("us-west").await;
    let auth = format!(
        "function = \"authorize\"\nforward_identity = true\n[routes.auth]\nalgorithms = [\"EdDSA\"]\nkey_files = [\"{}\"]\nforward_claims = [\"scope\"]\n",
        test_key("ed.pub").display()
    );
    let node = Node::start(
        &NodeConfig::new()
            .raw(&format!(
                "[wasm]\ncache_dir = \"{}\"\n",
                wasm_cache_dir().display()
            ))
            .raw(&function_toml(
                "authorize",
                "authorize",
                "config = { required_scope = \"orders:read\", rate_per_minute = \"100\" }",
            ))
            .origin("api", &[(&origin, PORTLAND)], "")
            .route("orders", "/echo", "api", &auth),
    )
    .await;
    let c = client();
    let call = |scope: &str| {
        let t = token(json!({"sub": "u-42", "scope": scope, "exp": now() + 600}));
        c.get(node.url("/echo/orders"))
            .bearer_auth(t)
            // Forged: the function must see the node's values, not these.
            .header("x-outpost-sub", "admin")
            .header("x-outpost-claims", "{\"scope\": \"orders:read\"}")
            .send()
    };
    let r = call("profile").await.expect("wrong scope");
    assert_eq!(r.status(), 403, "the function read the verified claims");
    let v: Value = r.json().await.expect("json");
    assert!(
        v["reason"].as_str().unwrap_or("").contains("orders:read"),
        "{v}"
    );

    let r = call("orders:read orders:write").await.expect("right scope");
    assert_eq!(r.status(), 200);
    let echo: Value = r.json().await.expect("echo");
    assert_eq!(seen(&echo, "x-outpost-identity").len(), 1, "{echo}");
    assert!(seen(&echo, "x-outpost-sub").is_empty(), "{echo}");
    assert!(seen(&echo, "x-outpost-claims").is_empty(), "{echo}");

    // No token: the guard refuses before the function runs.
    let r = c.get(node.url("/echo/orders")).send().await.expect("anon");
    assert_eq!(r.status(), 401);
    assert_eq!(
        node.metric("outpost_function_invocations_total{function=\"authorize\",outcome=\"ok\"}")
            .await,
        2.0
    );
}
