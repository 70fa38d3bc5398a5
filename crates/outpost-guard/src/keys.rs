//! Verification keys: local files (PEM, JWK, JWKS), an HS256 secret, or a remote JWKS (a URL
//! or an OIDC issuer's discovery document) kept fresh in the background.
//!
//! A remote set is refreshed every `jwks_refresh`; a token naming an unknown `kid` triggers one
//! refetch, at most every [`REFETCH_MIN_INTERVAL`], so a flood of forged `kid`s cannot turn
//! the node into a JWKS-fetching machine. When the issuer is unreachable the last good set
//! keeps working.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwap;
use jsonwebtoken::jwk::{AlgorithmParameters, Jwk, JwkSet};
use jsonwebtoken::{Algorithm, DecodingKey};

/// Least time between two refetches caused by unknown `kid`s.
pub const REFETCH_MIN_INTERVAL: Duration = Duration::from_secs(10);

/// Largest JWKS or discovery document accepted.
const MAX_DOCUMENT: usize = 1 << 20;

/// The kind of key, which decides the algorithms it may verify.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    /// HMAC shared secret (HS*).
    Hmac,
    /// RSA (RS*, PS*).
    Rsa,
    /// ECDSA (ES*).
    Ec,
    /// Ed25519 (EdDSA).
    Ed,
}

/// The family an algorithm belongs to: a token's `alg` must match its key's.
pub fn family(alg: Algorithm) -> Family {
    match alg {
        Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512 => Family::Hmac,
        Algorithm::RS256
        | Algorithm::RS384
        | Algorithm::RS512
        | Algorithm::PS256
        | Algorithm::PS384
        | Algorithm::PS512 => Family::Rsa,
        Algorithm::ES256 | Algorithm::ES384 => Family::Ec,
        Algorithm::EdDSA => Family::Ed,
    }
}

/// One verification key.
#[derive(Clone)]
pub struct Key {
    /// `kid`, when the key has one.
    pub kid: Option<String>,
    /// The algorithm the key is pinned to (JWK `alg`), if any.
    pub alg: Option<Algorithm>,
    /// Its kind.
    pub family: Family,
    /// The key itself.
    pub key: DecodingKey,
}

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Key")
            .field("kid", &self.kid)
            .field("alg", &self.alg)
            .field("family", &self.family)
            .finish()
    }
}

/// Why keys could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// A key file could not be read.
    #[error("cannot read key file {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A key file holds nothing usable.
    #[error(
        "{path}: {reason}; expected a PEM public key (RSA, EC P-256/P-384, Ed25519), a JWK or a JWKS"
    )]
    Parse {
        /// The file.
        path: String,
        /// What was wrong.
        reason: String,
    },
    /// A remote document could not be fetched or read.
    #[error("{url}: {reason}")]
    Fetch {
        /// The URL.
        url: String,
        /// What went wrong.
        reason: String,
    },
}

/// Keys from a JWK, skipping those this node cannot use (e.g. encryption keys).
pub fn from_jwk(jwk: &Jwk) -> Option<Key> {
    if jwk
        .common
        .public_key_use
        .as_ref()
        .is_some_and(|u| !matches!(u, jsonwebtoken::jwk::PublicKeyUse::Signature))
    {
        return None;
    }
    let family = match &jwk.algorithm {
        AlgorithmParameters::RSA(_) => Family::Rsa,
        AlgorithmParameters::EllipticCurve(_) => Family::Ec,
        AlgorithmParameters::OctetKeyPair(_) => Family::Ed,
        AlgorithmParameters::OctetKey(_) => Family::Hmac,
    };
    let alg = jwk
        .common
        .key_algorithm
        .and_then(|a| a.to_string().parse::<Algorithm>().ok());
    Some(Key {
        kid: jwk.common.key_id.clone(),
        alg,
        family,
        key: DecodingKey::from_jwk(jwk).ok()?,
    })
}

/// Keys from a JWKS document; unusable entries are skipped.
pub fn from_jwks(text: &[u8]) -> Result<Vec<Key>, String> {
    let set: JwkSet = serde_json::from_slice(text).map_err(|e| format!("not a JWKS: {e}"))?;
    let keys: Vec<Key> = set.keys.iter().filter_map(from_jwk).collect();
    if keys.is_empty() {
        return Err("the JWKS holds no usable signing key".to_owned());
    }
    Ok(keys)
}

/// Keys from one local file: a PEM public key, a JWK or a JWKS.
pub fn from_file(path: &Path) -> Result<Vec<Key>, KeyError> {
    let shown = path.display().to_string();
    let bytes = std::fs::read(path).map_err(|source| KeyError::Read {
        path: shown.clone(),
        source,
    })?;
    let parse = |reason: String| KeyError::Parse {
        path: shown.clone(),
        reason,
    };
    let text = String::from_utf8_lossy(&bytes);
    if text.trim_start().starts_with('{') {
        if text.contains("\"keys\"") {
            return from_jwks(&bytes).map_err(parse);
        }
        let jwk: Jwk =
            serde_json::from_slice(&bytes).map_err(|e| parse(format!("not a JWK: {e}")))?;
        return from_jwk(&jwk)
            .map(|k| vec![k])
            .ok_or_else(|| parse("the JWK is not a usable signing key".to_owned()));
    }
    let attempts: [(Family, PemLoader); 3] = [
        (Family::Rsa, DecodingKey::from_rsa_pem),
        (Family::Ec, DecodingKey::from_ec_pem),
        (Family::Ed, DecodingKey::from_ed_pem),
    ];
    for (family, load) in attempts {
        if let Ok(key) = load(&bytes) {
            return Ok(vec![Key {
                kid: None,
                alg: None,
                family,
                key,
            }]);
        }
    }
    Err(parse("no PEM public key found".to_owned()))
}

/// A jsonwebtoken PEM constructor for one key family.
type PemLoader = fn(&[u8]) -> jsonwebtoken::errors::Result<DecodingKey>;

/// An HS256 shared secret.
pub fn from_secret(secret: &[u8]) -> Key {
    Key {
        kid: None,
        alg: Some(Algorithm::HS256),
        family: Family::Hmac,
        key: DecodingKey::from_secret(secret),
    }
}

/// Where a remote key set comes from.
#[derive(Debug, Clone)]
pub enum Remote {
    /// A JWKS URL.
    Jwks(String),
    /// An OIDC issuer: `{issuer}/.well-known/openid-configuration` names the `jwks_uri`.
    Discovery(String),
}

/// A remote key set, swapped atomically on refresh.
pub struct RemoteKeys {
    source: Remote,
    keys: ArcSwap<Vec<Key>>,
    /// Unix seconds of the last refetch caused by an unknown `kid`.
    last_refetch: AtomicU64,
    client: reqwest::Client,
}

impl std::fmt::Debug for RemoteKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RemoteKeys")
            .field("source", &self.source)
            .field("keys", &self.keys.load().len())
            .finish()
    }
}

impl RemoteKeys {
    /// Fetches the set once (a node must not start without keys it was told to use) and
    /// starts the background refresh.
    pub async fn start(source: Remote, refresh: Duration) -> Result<Arc<RemoteKeys>, KeyError> {
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(5))
            .build()
            .map_err(|e| KeyError::Fetch {
                url: format!("{source:?}"),
                reason: e.to_string(),
            })?;
        let keys = fetch(&client, &source).await?;
        let remote = Arc::new(RemoteKeys {
            source,
            keys: ArcSwap::from_pointee(keys),
            last_refetch: AtomicU64::new(0),
            client,
        });
        let weak = Arc::downgrade(&remote);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(refresh.max(Duration::from_secs(1)));
            tick.tick().await;
            loop {
                tick.tick().await;
                let Some(remote) = weak.upgrade() else { return };
                remote.refresh().await;
            }
        });
        Ok(remote)
    }

    /// The current set.
    pub fn current(&self) -> Arc<Vec<Key>> {
        self.keys.load_full()
    }

    /// Refetches now; on failure the last good set stays.
    pub async fn refresh(&self) -> bool {
        match fetch(&self.client, &self.source).await {
            Ok(keys) => {
                self.keys.store(Arc::new(keys));
                true
            }
            Err(e) => {
                tracing::warn!(error = %e, "JWKS refresh failed; keeping the last good key set.");
                false
            }
        }
    }

    /// A token named a `kid` we do not have: refetch, unless one happened recently.
    pub async fn refetch_for_unknown_kid(&self) -> bool {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let last = self.last_refetch.load(Ordering::Relaxed);
        if now.saturating_sub(last) < REFETCH_MIN_INTERVAL.as_secs() {
            return false;
        }
        if self
            .last_refetch
            .compare_exchange(last, now, Ordering::AcqRel, Ordering::Relaxed)
            .is_err()
        {
            return false;
        }
        self.refresh().await
    }
}

async fn get(client: &reqwest::Client, url: &str) -> Result<Vec<u8>, KeyError> {
    let failed = |reason: String| KeyError::Fetch {
        url: url.to_owned(),
        reason,
    };
    let resp = client
        .get(url)
        .send()
        .await
        .map_err(|e| failed(e.to_string()))?;
    if !resp.status().is_success() {
        return Err(failed(format!("answered {}", resp.status())));
    }
    let bytes = resp.bytes().await.map_err(|e| failed(e.to_string()))?;
    if bytes.len() > MAX_DOCUMENT {
        return Err(failed("document larger than 1 MiB".to_owned()));
    }
    Ok(bytes.to_vec())
}

async fn fetch(client: &reqwest::Client, source: &Remote) -> Result<Vec<Key>, KeyError> {
    let jwks_url = match source {
        Remote::Jwks(url) => url.clone(),
        Remote::Discovery(issuer) => {
            let url = format!(
                "{}/.well-known/openid-configuration",
                issuer.trim_end_matches('/')
            );
            let doc = get(client, &url).await?;
            let v: serde_json::Value =
                serde_json::from_slice(&doc).map_err(|e| KeyError::Fetch {
                    url: url.clone(),
                    reason: format!("not JSON: {e}"),
                })?;
            v["jwks_uri"]
                .as_str()
                .ok_or_else(|| KeyError::Fetch {
                    url: url.clone(),
                    reason: "no jwks_uri in the discovery document".to_owned(),
                })?
                .to_owned()
        }
    };
    let doc = get(client, &jwks_url).await?;
    from_jwks(&doc).map_err(|reason| KeyError::Fetch {
        url: jwks_url,
        reason,
    })
}
