//! The identity a node forwards to origins: a short-lived Ed25519-signed JWT in
//! `x-outpost-identity`, verifiable against the node's JWKS
//! (`/.well-known/outpost/jwks.json`).
//!
//! Signing uses ring's `Ed25519KeyPair` held in memory (a signature is ~20 µs cheaper than
//! re-parsing the PKCS#8 key per token). The `kid` is derived from the public key, so the same
//! key file gives the same `kid` on every node and after every restart; previous keys stay in
//! the JWKS for rotation overlap.

use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use ring::signature::{Ed25519KeyPair, KeyPair as _};
use serde_json::{Map, Value, json};

/// The request header carrying the identity.
pub const IDENTITY_HEADER: http::HeaderName = http::HeaderName::from_static("x-outpost-identity");

/// Path of the node's public keys on every listener.
pub const JWKS_PATH: &str = "/.well-known/outpost/jwks.json";

/// `iss` of every identity token.
pub const ISSUER: &str = "outpost";

/// Why the identity keys could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// A key file could not be read.
    #[error("cannot read identity key {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A key file is not an Ed25519 PKCS#8 private key.
    #[error(
        "{path} is not a PEM PKCS#8 Ed25519 private key; create one with `openssl genpkey -algorithm ed25519 -out {path}`"
    )]
    Parse {
        /// The file.
        path: String,
    },
    /// The system random source failed.
    #[error("cannot generate an identity key: {0}")]
    Generate(String),
}

/// Signs identities; publishes the public keys.
pub struct IdentitySigner {
    kid: String,
    pair: Ed25519KeyPair,
    jwks: String,
    ttl: Duration,
}

impl std::fmt::Debug for IdentitySigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IdentitySigner")
            .field("kid", &self.kid)
            .finish()
    }
}

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

fn kid_of(public: &[u8]) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, public);
    b64(&digest.as_ref()[..12])
}

fn jwk(public: &[u8]) -> Value {
    json!({
        "kty": "OKP",
        "crv": "Ed25519",
        "x": b64(public),
        "kid": kid_of(public),
        "alg": "EdDSA",
        "use": "sig",
    })
}

fn load(path: &Path) -> Result<Ed25519KeyPair, IdentityError> {
    let shown = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|source| IdentityError::Read {
        path: shown.clone(),
        source,
    })?;
    let body: String = text
        .lines()
        .filter(|l| !l.starts_with("-----"))
        .map(str::trim)
        .collect();
    let der = base64::engine::general_purpose::STANDARD
        .decode(body)
        .map_err(|_| IdentityError::Parse {
            path: shown.clone(),
        })?;
    Ed25519KeyPair::from_pkcs8_maybe_unchecked(&der)
        .map_err(|_| IdentityError::Parse { path: shown })
}

impl IdentitySigner {
    /// A signer with a fresh key (kept in memory only).
    pub fn generate(ttl: Duration) -> Result<IdentitySigner, IdentityError> {
        let rng = ring::rand::SystemRandom::new();
        let pkcs8 = Ed25519KeyPair::generate_pkcs8(&rng)
            .map_err(|e| IdentityError::Generate(e.to_string()))?;
        let pair = Ed25519KeyPair::from_pkcs8(pkcs8.as_ref())
            .map_err(|e| IdentityError::Generate(e.to_string()))?;
        Ok(Self::with(pair, &[], ttl))
    }

    /// A signer with the key in `current`, also publishing the keys in `previous`.
    pub fn from_files(
        current: &Path,
        previous: &[impl AsRef<Path>],
        ttl: Duration,
    ) -> Result<IdentitySigner, IdentityError> {
        let pair = load(current)?;
        let old = previous
            .iter()
            .map(|p| load(p.as_ref()))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self::with(pair, &old, ttl))
    }

    fn with(pair: Ed25519KeyPair, previous: &[Ed25519KeyPair], ttl: Duration) -> IdentitySigner {
        let public = pair.public_key().as_ref().to_vec();
        let mut keys = vec![jwk(&public)];
        keys.extend(previous.iter().map(|p| jwk(p.public_key().as_ref())));
        IdentitySigner {
            kid: kid_of(&public),
            pair,
            jwks: json!({ "keys": keys }).to_string(),
            ttl,
        }
    }

    /// The JWKS document.
    pub fn jwks(&self) -> &str {
        &self.jwks
    }

    /// The current key's id.
    pub fn kid(&self) -> &str {
        &self.kid
    }

    /// Signs `claims` (without the registered ones) for audience `aud`; adds `iss`, `aud`,
    /// `iat`, `nbf` and `exp`.
    pub fn sign(&self, aud: &str, mut claims: Map<String, Value>) -> String {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        claims.insert("iss".into(), ISSUER.into());
        claims.insert("aud".into(), aud.into());
        claims.insert("iat".into(), now.into());
        claims.insert("nbf".into(), now.into());
        claims.insert("exp".into(), (now + self.ttl.as_secs()).into());
        let header = json!({ "alg": "EdDSA", "typ": "JWT", "kid": self.kid });
        let mut token = b64(header.to_string().as_bytes());
        token.push('.');
        token.push_str(&b64(Value::Object(claims).to_string().as_bytes()));
        let signature = self.pair.sign(token.as_bytes());
        token.push('.');
        token.push_str(&b64(signature.as_ref()));
        token
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::jwt::{Authenticator, KeySource, Rules};
    use jsonwebtoken::Algorithm;
    use std::sync::Arc;

    fn verifier(signer: &IdentitySigner, aud: &str) -> Authenticator {
        let keys = crate::keys::from_jwks(signer.jwks().as_bytes()).expect("jwks");
        Authenticator::new(
            Rules {
                optional: false,
                algorithms: vec![Algorithm::EdDSA],
                issuer: Some(ISSUER.into()),
                audience: vec![aud.into()],
                leeway: Duration::from_secs(5),
                cookie: None,
                required_scopes: vec![],
                required_roles: vec![],
                required_claims: Default::default(),
                forward_claims: vec![],
            },
            KeySource::Static(Arc::new(keys)),
        )
    }

    fn bearer(token: &str) -> http::HeaderMap {
        let mut h = http::HeaderMap::new();
        h.insert(
            http::header::AUTHORIZATION,
            http::HeaderValue::from_str(&format!("Bearer {token}")).expect("header"),
        );
        h
    }

    #[tokio::test]
    async fn rotation_publishes_the_previous_key_until_it_is_dropped() {
        let keys = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/keys");
        let old = IdentitySigner::from_files(
            &keys.join("ed.key"),
            &[] as &[&Path],
            Duration::from_secs(60),
        )
        .expect("old key");
        let new = IdentitySigner::from_files(
            &keys.join("ed2.key"),
            &[keys.join("ed.key")],
            Duration::from_secs(60),
        )
        .expect("new key");
        assert_ne!(old.kid(), new.kid());
        let again = IdentitySigner::from_files(
            &keys.join("ed.key"),
            &[] as &[&Path],
            Duration::from_secs(60),
        )
        .expect("same file");
        assert_eq!(
            old.kid(),
            again.kid(),
            "the kid follows the key, not the process"
        );
        let in_flight = old.sign("central", Map::new());
        assert!(
            verifier(&new, "central")
                .authenticate(&bearer(&in_flight))
                .await
                .is_ok(),
            "tokens of the previous key verify during the overlap"
        );
        let bad = std::env::temp_dir().join(format!("outpost-not-a-key-{}", std::process::id()));
        std::fs::write(
            &bad,
            "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
        )
        .expect("write");
        let err = IdentitySigner::from_files(&bad, &[] as &[&Path], Duration::from_secs(60))
            .expect_err("garbage");
        assert!(err.to_string().contains("openssl genpkey"), "{err}");
        let _ = std::fs::remove_file(bad);
    }

    #[tokio::test]
    async fn signed_identities_verify_against_the_published_jwks() {
        let signer = IdentitySigner::generate(Duration::from_secs(60)).expect("key");
        let mut claims = Map::new();
        claims.insert("sub".into(), "user-1".into());
        claims.insert("node".into(), "tokyo-1".into());
        let token = signer.sign("central", claims);
        let p = verifier(&signer, "central")
            .authenticate(&bearer(&token))
            .await
            .expect("valid")
            .expect("present");
        assert_eq!(p.sub.as_deref(), Some("user-1"));
        assert_eq!(p.claims["iss"], "outpost");
        assert!(
            verifier(&signer, "other")
                .authenticate(&bearer(&token))
                .await
                .is_err(),
            "audience is bound"
        );
        let other = IdentitySigner::generate(Duration::from_secs(60)).expect("key");
        assert!(
            verifier(&other, "central")
                .authenticate(&bearer(&token))
                .await
                .is_err(),
            "another node's key does not verify it"
        );
        let jwks: Value = serde_json::from_str(signer.jwks()).expect("json");
        assert_eq!(jwks["keys"][0]["kid"], signer.kid());
        assert_eq!(jwks["keys"][0]["crv"], "Ed25519");
    }
}
