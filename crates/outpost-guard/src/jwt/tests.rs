//! Every acceptance and rejection path of the validator, with real keys of every family.

use super::*;
use crate::identity::IdentitySigner;
use jsonwebtoken::{EncodingKey, Header};
use proptest::prelude::*;
use std::path::PathBuf;
use std::time::{SystemTime, UNIX_EPOCH};

fn key_path(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/keys")
        .join(name)
}

fn pem(name: &str) -> Vec<u8> {
    std::fs::read(key_path(name)).expect("test key")
}

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

fn claims(extra: Value) -> Value {
    let mut c = json!({ "sub": "user-1", "iss": "https://idp.test", "aud": "api", "exp": now() + 300, "iat": now() });
    if let (Some(c), Value::Object(extra)) = (c.as_object_mut(), extra) {
        for (k, v) in extra {
            if v.is_null() {
                c.remove(&k);
            } else {
                c.insert(k, v);
            }
        }
    }
    c
}

use serde_json::json;

fn sign(alg: Algorithm, key: &EncodingKey, kid: Option<&str>, claims: &Value) -> String {
    let mut h = Header::new(alg);
    h.kid = kid.map(str::to_owned);
    jsonwebtoken::encode(&h, claims, key).expect("sign")
}

fn rules(algs: &[Algorithm]) -> Rules {
    Rules {
        optional: false,
        algorithms: algs.to_vec(),
        issuer: Some("https://idp.test".into()),
        audience: vec!["api".into()],
        leeway: Duration::from_secs(30),
        cookie: Some("session".into()),
        required_scopes: vec![],
        required_roles: vec![],
        required_claims: BTreeMap::new(),
        forward_claims: vec![],
    }
}

fn static_keys(files: &[&str]) -> KeySource {
    let mut keys = Vec::new();
    for f in files {
        keys.extend(keys::from_file(&key_path(f)).expect("key file"));
    }
    KeySource::Static(Arc::new(keys))
}

fn bearer(token: &str) -> HeaderMap {
    let mut h = HeaderMap::new();
    if let Ok(v) = http::HeaderValue::from_str(&format!("Bearer {token}")) {
        h.insert(http::header::AUTHORIZATION, v);
    }
    h
}

async fn check(auth: &Authenticator, token: &str) -> Result<Option<Principal>, AuthError> {
    auth.authenticate(&bearer(token)).await
}

#[tokio::test]
async fn every_supported_algorithm_verifies_with_its_key_type() {
    let cases: Vec<(Algorithm, EncodingKey, &str)> = vec![
        (
            Algorithm::RS256,
            EncodingKey::from_rsa_pem(&pem("rsa.key")).expect("rsa"),
            "rsa.pub",
        ),
        (
            Algorithm::RS384,
            EncodingKey::from_rsa_pem(&pem("rsa.key")).expect("rsa"),
            "rsa.pub",
        ),
        (
            Algorithm::RS512,
            EncodingKey::from_rsa_pem(&pem("rsa.key")).expect("rsa"),
            "rsa.pub",
        ),
        (
            Algorithm::PS256,
            EncodingKey::from_rsa_pem(&pem("rsa.key")).expect("rsa"),
            "rsa.pub",
        ),
        (
            Algorithm::ES256,
            EncodingKey::from_ec_pem(&pem("ec256.pk8")).expect("ec"),
            "ec256.pub",
        ),
        (
            Algorithm::ES384,
            EncodingKey::from_ec_pem(&pem("ec384.pk8")).expect("ec"),
            "ec384.pub",
        ),
        (
            Algorithm::EdDSA,
            EncodingKey::from_ed_pem(&pem("ed.key")).expect("ed"),
            "ed.pub",
        ),
    ];
    for (alg, key, public) in cases {
        let auth = Authenticator::new(rules(&[alg]), static_keys(&[public]));
        let token = sign(alg, &key, None, &claims(json!({})));
        let p = check(&auth, &token)
            .await
            .expect("valid")
            .expect("principal");
        assert_eq!(p.sub.as_deref(), Some("user-1"), "{alg:?}");
    }
    let secret = keys::from_secret(b"dev-secret");
    let auth = Authenticator::new(
        rules(&[Algorithm::HS256]),
        KeySource::Static(Arc::new(vec![secret])),
    );
    let token = sign(
        Algorithm::HS256,
        &EncodingKey::from_secret(b"dev-secret"),
        None,
        &claims(json!({})),
    );
    assert!(check(&auth, &token).await.is_ok());
    let wrong = sign(
        Algorithm::HS256,
        &EncodingKey::from_secret(b"other"),
        None,
        &claims(json!({})),
    );
    assert_eq!(
        check(&auth, &wrong).await,
        Err(AuthError::Invalid("bad signature".into()))
    );
}

#[tokio::test]
async fn algorithm_confusion_and_none_are_rejected() {
    // The route accepts RS256 and HS256, but its only key is RSA: an HS256 token "signed" with
    // the RSA public key as an HMAC secret must not verify.
    let auth = Authenticator::new(
        rules(&[Algorithm::RS256, Algorithm::HS256]),
        static_keys(&["rsa.pub"]),
    );
    let forged = sign(
        Algorithm::HS256,
        &EncodingKey::from_secret(&pem("rsa.pub")),
        None,
        &claims(json!({})),
    );
    assert!(matches!(
        check(&auth, &forged).await,
        Err(AuthError::Invalid(_))
    ));

    // alg: none, hand-made.
    let b64 = |v: &Value| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string());
    let none = format!(
        "{}.{}.",
        b64(&json!({"alg": "none", "typ": "JWT"})),
        b64(&claims(json!({})))
    );
    assert!(matches!(
        check(&auth, &none).await,
        Err(AuthError::Invalid(_))
    ));

    // An algorithm outside the allowlist, even with a matching key.
    let ps = sign(
        Algorithm::PS256,
        &EncodingKey::from_rsa_pem(&pem("rsa.key")).expect("rsa"),
        None,
        &claims(json!({})),
    );
    assert_eq!(
        check(&auth, &ps).await,
        Err(AuthError::Invalid(
            "algorithm PS256 is not accepted here".into()
        ))
    );
}

#[tokio::test]
async fn registered_claims_are_checked() {
    let key = EncodingKey::from_ed_pem(&pem("ed.key")).expect("ed");
    let auth = Authenticator::new(rules(&[Algorithm::EdDSA]), static_keys(&["ed.pub"]));
    let cases = [
        (json!({"exp": now() - 100}), "token expired"),
        (json!({"nbf": now() + 100}), "token not valid yet"),
        (json!({"iss": "https://evil.test"}), "wrong issuer"),
        (json!({"aud": "other"}), "wrong audience"),
        (json!({"exp": null}), "missing exp"),
        (json!({"exp": "tomorrow"}), "missing exp"),
        (json!({"sub": 42}), "sub is not a string"),
    ];
    for (extra, want) in cases {
        let token = sign(Algorithm::EdDSA, &key, None, &claims(extra.clone()));
        assert_eq!(
            check(&auth, &token).await,
            Err(AuthError::Invalid(want.into())),
            "{extra}"
        );
    }
    // Within the leeway.
    let token = sign(
        Algorithm::EdDSA,
        &key,
        None,
        &claims(json!({"exp": now() - 10})),
    );
    assert!(check(&auth, &token).await.is_ok());
}

#[tokio::test]
async fn hostile_tokens_get_a_clean_401() {
    let auth = Authenticator::new(rules(&[Algorithm::EdDSA]), static_keys(&["ed.pub"]));
    let b64 = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
    let huge = "a".repeat(MAX_TOKEN_BYTES + 1);
    let crit = format!(
        "{}.{}.sig",
        b64(r#"{"alg":"EdDSA","crit":["exp"]}"#),
        b64("{}")
    );
    let not_json = format!("{}.{}.sig", b64("nope"), b64("{}"));
    let bad_payload = format!("{}.{}.sig", b64(r#"{"alg":"EdDSA"}"#), b64("[1,2"));
    for token in [
        "",
        "a.b",
        "!!!.???.###",
        huge.as_str(),
        crit.as_str(),
        not_json.as_str(),
        bad_payload.as_str(),
    ] {
        let got = check(&auth, token).await;
        assert!(
            matches!(got, Err(AuthError::Invalid(_)) | Err(AuthError::Missing)),
            "{token:.40}: {got:?}"
        );
    }
    let mut basic = HeaderMap::new();
    basic.insert(
        http::header::AUTHORIZATION,
        http::HeaderValue::from_static("Basic dXNlcjpwYXNz"),
    );
    assert!(matches!(
        auth.authenticate(&basic).await,
        Err(AuthError::Invalid(_))
    ));
}

#[tokio::test]
async fn token_sources_and_optional_mode() {
    let key = EncodingKey::from_ed_pem(&pem("ed.key")).expect("ed");
    let token = sign(Algorithm::EdDSA, &key, None, &claims(json!({})));
    let auth = Authenticator::new(rules(&[Algorithm::EdDSA]), static_keys(&["ed.pub"]));
    assert_eq!(
        auth.authenticate(&HeaderMap::new()).await,
        Err(AuthError::Missing)
    );
    let mut cookie = HeaderMap::new();
    cookie.insert(
        http::header::COOKIE,
        http::HeaderValue::from_str(&format!("theme=dark; session={token}")).expect("cookie"),
    );
    assert!(
        auth.authenticate(&cookie)
            .await
            .expect("cookie token")
            .is_some()
    );
    let optional = Authenticator::new(
        Rules {
            optional: true,
            ..rules(&[Algorithm::EdDSA])
        },
        static_keys(&["ed.pub"]),
    );
    assert_eq!(optional.authenticate(&HeaderMap::new()).await, Ok(None));
    assert!(matches!(
        check(&optional, "garbage").await,
        Err(AuthError::Invalid(_))
    ));
    assert_eq!(AuthError::Missing.challenge(), "Bearer");
    assert!(
        AuthError::Invalid("bad \"x\"".into())
            .challenge()
            .starts_with("Bearer error=\"invalid_token\"")
    );
}

#[tokio::test]
async fn scope_role_and_claim_rules_answer_403() {
    let key = EncodingKey::from_ed_pem(&pem("ed.key")).expect("ed");
    let auth = Authenticator::new(
        Rules {
            required_scopes: vec!["orders:write".into()],
            required_roles: vec!["cashier".into()],
            required_claims: BTreeMap::from([("tenant".to_owned(), "acme".to_owned())]),
            ..rules(&[Algorithm::EdDSA])
        },
        static_keys(&["ed.pub"]),
    );
    let good = claims(
        json!({"scope": "orders:read orders:write", "roles": ["cashier"], "tenant": "acme"}),
    );
    assert!(
        check(&auth, &sign(Algorithm::EdDSA, &key, None, &good))
            .await
            .is_ok()
    );
    let scp = claims(json!({"scp": ["orders:write"], "roles": ["cashier"], "tenant": "acme"}));
    assert!(
        check(&auth, &sign(Algorithm::EdDSA, &key, None, &scp))
            .await
            .is_ok()
    );
    for bad in [
        json!({"scope": "orders:read", "roles": ["cashier"], "tenant": "acme"}),
        json!({"scope": "orders:write", "roles": "cashier", "tenant": "acme"}),
        json!({"scope": "orders:write", "roles": ["cashier"], "tenant": "other"}),
    ] {
        let got = check(
            &auth,
            &sign(Algorithm::EdDSA, &key, None, &claims(bad.clone())),
        )
        .await;
        assert!(
            matches!(got, Err(AuthError::Forbidden(_))),
            "{bad}: {got:?}"
        );
        assert_eq!(
            got.err().map(|e| e.status()),
            Some(http::StatusCode::FORBIDDEN)
        );
    }
}

/// A JWKS server whose document the test can change and whose hits it can count.
struct JwksServer {
    url: String,
    doc: Arc<std::sync::Mutex<Option<String>>>,
    hits: Arc<std::sync::atomic::AtomicUsize>,
}

async fn jwks_server(doc: String) -> JwksServer {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let doc = Arc::new(std::sync::Mutex::new(Some(doc)));
    let hits = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let (d, h) = (doc.clone(), hits.clone());
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                return;
            };
            let (d, h) = (d.clone(), h.clone());
            tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                let _ = s.read(&mut buf).await;
                h.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let body = d.lock().map(|g| g.clone()).unwrap_or(None);
                let resp = match body {
                    Some(b) => format!("HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{b}", b.len()),
                    None => "HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\nconnection: close\r\n\r\n".to_owned(),
                };
                let _ = s.write_all(resp.as_bytes()).await;
            });
        }
    });
    JwksServer {
        url: format!("http://{addr}/jwks.json"),
        doc,
        hits,
    }
}

fn merged(signers: &[&IdentitySigner]) -> String {
    let keys: Vec<Value> = signers
        .iter()
        .flat_map(|s| {
            let v: Value = serde_json::from_str(s.jwks()).unwrap_or_default();
            v["keys"].as_array().cloned().unwrap_or_default()
        })
        .collect();
    json!({ "keys": keys }).to_string()
}

#[tokio::test]
async fn remote_keys_rotate_refetch_at_a_bounded_rate_and_survive_outages() {
    let a = IdentitySigner::generate(Duration::from_secs(60)).expect("a");
    let b = IdentitySigner::generate(Duration::from_secs(60)).expect("b");
    let server = jwks_server(merged(&[&a])).await;
    let remote = keys::RemoteKeys::start(
        keys::Remote::Jwks(server.url.clone()),
        Duration::from_secs(3600),
    )
    .await
    .expect("first fetch");
    let auth = Authenticator::new(
        Rules {
            issuer: Some("outpost".into()),
            audience: vec!["api".into()],
            ..rules(&[Algorithm::EdDSA])
        },
        KeySource::Remote(remote.clone()),
    );
    let token_a = a.sign("api", Map::new());
    let token_b = b.sign("api", Map::new());
    assert!(check(&auth, &token_a).await.is_ok());
    assert_eq!(server.hits.load(std::sync::atomic::Ordering::SeqCst), 1);

    // Rotation: the issuer adds key b; the first token with b's kid triggers one refetch.
    *server.doc.lock().expect("doc") = Some(merged(&[&a, &b]));
    assert!(check(&auth, &token_b).await.is_ok());
    assert_eq!(server.hits.load(std::sync::atomic::Ordering::SeqCst), 2);

    // Unknown kids do not make the node hammer the issuer.
    let c = IdentitySigner::generate(Duration::from_secs(60)).expect("c");
    for _ in 0..20 {
        assert_eq!(
            check(&auth, &c.sign("api", Map::new())).await,
            Err(AuthError::Invalid("unknown key id".into()))
        );
    }
    assert_eq!(
        server.hits.load(std::sync::atomic::Ordering::SeqCst),
        2,
        "rate-limited"
    );

    // The issuer goes away: the last good set keeps working.
    *server.doc.lock().expect("doc") = None;
    assert!(!remote.refresh().await);
    assert!(check(&auth, &token_a).await.is_ok());
    assert!(check(&auth, &token_b).await.is_ok());
}

#[tokio::test]
async fn oidc_discovery_leads_to_the_jwks() {
    let a = IdentitySigner::generate(Duration::from_secs(60)).expect("a");
    let jwks = jwks_server(merged(&[&a])).await;
    let discovery = jwks_server(json!({ "issuer": "x", "jwks_uri": jwks.url }).to_string()).await;
    let issuer = discovery.url.trim_end_matches("/jwks.json").to_owned();
    // The tiny server answers the same document on any path.
    let remote =
        keys::RemoteKeys::start(keys::Remote::Discovery(issuer), Duration::from_secs(3600))
            .await
            .expect("discovery");
    assert_eq!(remote.current().len(), 1);
    assert!(
        keys::RemoteKeys::start(
            keys::Remote::Jwks("http://127.0.0.1:9/none".into()),
            Duration::from_secs(60)
        )
        .await
        .is_err()
    );
}

proptest! {
    /// Whatever a client puts in Authorization, validation answers without panicking.
    #[test]
    fn arbitrary_tokens_never_panic(token in "[A-Za-z0-9_.=+/-]{0,300}") {
        let rt = tokio::runtime::Builder::new_current_thread().build().expect("rt");
        let auth = Authenticator::new(rules(&[Algorithm::EdDSA, Algorithm::RS256, Algorithm::HS256]), static_keys(&["ed.pub", "rsa.pub"]));
        let got = rt.block_on(check(&auth, &token));
        prop_assert!(got.is_err());
    }
}

#[tokio::test]
async fn verified_tokens_are_remembered_until_they_expire() {
    let key = EncodingKey::from_ed_pem(&pem("ed.key")).expect("ed");
    let auth = Authenticator::new(
        Rules {
            required_scopes: vec!["read".into()],
            leeway: Duration::from_secs(0),
            ..rules(&[Algorithm::EdDSA])
        },
        static_keys(&["ed.pub"]),
    );
    let good = sign(
        Algorithm::EdDSA,
        &key,
        None,
        &claims(json!({"scope": "read"})),
    );
    for _ in 0..3 {
        assert!(check(&auth, &good).await.is_ok());
    }
    // The rules still run on remembered tokens.
    let no_scope = sign(
        Algorithm::EdDSA,
        &key,
        None,
        &claims(json!({"scope": "write"})),
    );
    for _ in 0..2 {
        assert!(matches!(
            check(&auth, &no_scope).await,
            Err(AuthError::Forbidden(_))
        ));
    }
    // A remembered token whose exp passed is checked again, and refused.
    let short = sign(
        Algorithm::EdDSA,
        &key,
        None,
        &claims(json!({"exp": now() + 1, "scope": "read"})),
    );
    assert!(check(&auth, &short).await.is_ok());
    tokio::time::sleep(Duration::from_millis(2100)).await;
    assert_eq!(
        check(&auth, &short).await,
        Err(AuthError::Invalid("token expired".into()))
    );
    // Changing one byte of a remembered token is a different token: verified from scratch.
    let mut forged = good.clone().into_bytes();
    let last = forged.len() - 2;
    forged[last] = if forged[last] == b'A' { b'B' } else { b'A' };
    let forged = String::from_utf8(forged).expect("ascii");
    assert!(matches!(
        check(&auth, &forged).await,
        Err(AuthError::Invalid(_))
    ));
}
