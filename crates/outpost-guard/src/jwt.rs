//! JWT validation for a route: find the token, pick the key, verify, check the claims.
//!
//! The order is chosen so that hostile input is rejected as cheaply as possible and never
//! panics: size cap → header (algorithm in the route's allowlist, no `crit`) → key of the
//! algorithm's family (and `kid`) → signature → `exp`/`nbf`/`iss`/`aud` → claim types → the
//! route's scope, role and claim rules (→ 403).

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use http::HeaderMap;
pub use jsonwebtoken::Algorithm;
use jsonwebtoken::Validation;
use serde_json::{Map, Value};

use crate::keys::{self, Key, RemoteKeys};

/// Longest token accepted; real ones are well under 4 KiB.
pub const MAX_TOKEN_BYTES: usize = 8 * 1024;

/// Bytes of verified tokens remembered per route (keys are whole tokens, so a forged token can
/// never match a remembered one).
const VERIFIED_CACHE_BYTES: u64 = 16 << 20;

/// Longest a verified token is remembered, even if its `exp` is later: bounds how long a token
/// signed by a key the issuer has since withdrawn stays accepted.
const VERIFIED_TTL: Duration = Duration::from_secs(300);

/// Why a request is refused; maps to 401 or 403 with an RFC 6750 `WWW-Authenticate`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// No token where one is required.
    #[error("this route requires a bearer token")]
    Missing,
    /// A token was sent but is not acceptable.
    #[error("invalid token: {0}")]
    Invalid(String),
    /// A valid token without what the route requires.
    #[error("insufficient scope: {0}")]
    Forbidden(String),
}

impl AuthError {
    /// The `WWW-Authenticate` challenge (RFC 6750 §3).
    pub fn challenge(&self) -> String {
        match self {
            AuthError::Missing => "Bearer".to_owned(),
            AuthError::Invalid(why) => format!(
                "Bearer error=\"invalid_token\", error_description=\"{}\"",
                quoted(why)
            ),
            AuthError::Forbidden(why) => format!(
                "Bearer error=\"insufficient_scope\", error_description=\"{}\"",
                quoted(why)
            ),
        }
    }

    /// 401 for missing/invalid, 403 for insufficient.
    pub fn status(&self) -> http::StatusCode {
        match self {
            AuthError::Forbidden(_) => http::StatusCode::FORBIDDEN,
            _ => http::StatusCode::UNAUTHORIZED,
        }
    }
}

/// Keeps a description safe inside a quoted-string.
fn quoted(s: &str) -> String {
    s.chars()
        .filter(|c| *c != '"' && *c != '\\' && (' '..='~').contains(c))
        .collect()
}

/// A verified caller.
#[derive(Debug, Clone, PartialEq)]
pub struct Principal {
    /// `sub`, when the token has one.
    pub sub: Option<String>,
    /// Every claim, for forwarding the selected ones.
    pub claims: Map<String, Value>,
}

/// Where a route's keys come from.
#[derive(Debug, Clone)]
pub enum KeySource {
    /// Keys fixed at start (files, secret).
    Static(Arc<Vec<Key>>),
    /// A remote JWKS, refreshed in the background.
    Remote(Arc<RemoteKeys>),
}

/// A route's token rules, compiled.
#[derive(Debug)]
pub struct Authenticator {
    /// No token → anonymous instead of 401.
    pub optional: bool,
    keys: KeySource,
    /// One prepared validation per allowed algorithm.
    validations: HashMap<Algorithm, Validation>,
    cookie: Option<String>,
    required_scopes: Vec<String>,
    required_roles: Vec<String>,
    required_claims: BTreeMap<String, String>,
    /// Claims copied into the forwarded identity.
    pub forward_claims: Vec<String>,
    /// Tokens whose signature and registered claims were verified, until their `exp`: a client
    /// reuses its token for many requests, and a signature check costs 30–100 µs here.
    verified: moka::sync::Cache<Arc<str>, Arc<Principal>>,
    leeway: u64,
}

/// A route's settings, resolved (keys loaded, secrets read).
#[derive(Debug, Clone)]
pub struct Rules {
    /// No token → anonymous.
    pub optional: bool,
    /// Allowed algorithms.
    pub algorithms: Vec<Algorithm>,
    /// Expected issuer.
    pub issuer: Option<String>,
    /// Accepted audiences (empty: not checked).
    pub audience: Vec<String>,
    /// Clock skew.
    pub leeway: Duration,
    /// Token cookie.
    pub cookie: Option<String>,
    /// Scopes required.
    pub required_scopes: Vec<String>,
    /// Roles required.
    pub required_roles: Vec<String>,
    /// Exact claim values required.
    pub required_claims: BTreeMap<String, String>,
    /// Claims to forward.
    pub forward_claims: Vec<String>,
}

impl Authenticator {
    /// Compiles `rules` with `keys`.
    pub fn new(rules: Rules, keys: KeySource) -> Authenticator {
        let validations = rules
            .algorithms
            .iter()
            .map(|alg| {
                let mut v = Validation::new(*alg);
                v.leeway = rules.leeway.as_secs();
                v.validate_nbf = true;
                v.set_required_spec_claims(&["exp"]);
                if let Some(iss) = &rules.issuer {
                    v.set_issuer(&[iss]);
                }
                if rules.audience.is_empty() {
                    v.validate_aud = false;
                } else {
                    v.set_audience(&rules.audience);
                }
                (*alg, v)
            })
            .collect();
        Authenticator {
            optional: rules.optional,
            keys,
            verified: moka::sync::Cache::builder()
                .max_capacity(VERIFIED_CACHE_BYTES)
                .weigher(|k: &Arc<str>, _v: &Arc<Principal>| {
                    u32::try_from(k.len() * 2 + 256).unwrap_or(u32::MAX)
                })
                .time_to_live(VERIFIED_TTL)
                .build(),
            leeway: rules.leeway.as_secs(),
            validations,
            cookie: rules.cookie,
            required_scopes: rules.required_scopes,
            required_roles: rules.required_roles,
            required_claims: rules.required_claims,
            forward_claims: rules.forward_claims,
        }
    }

    /// Finds and checks the request's token: `Ok(None)` for an anonymous request on an
    /// optional route.
    pub async fn authenticate(&self, headers: &HeaderMap) -> Result<Option<Principal>, AuthError> {
        let Some(token) = self.token(headers)? else {
            return if self.optional {
                Ok(None)
            } else {
                Err(AuthError::Missing)
            };
        };
        if let Some(p) = self.verified.get(token) {
            if still_valid(&p, self.leeway) {
                self.check_rules(&p)?;
                return Ok(Some((*p).clone()));
            }
            self.verified.invalidate(token);
        }
        let (alg, kid) = self.header(token)?;
        let Some(validation) = self.validations.get(&alg) else {
            return Err(AuthError::Invalid(format!(
                "algorithm {alg:?} is not accepted here"
            )));
        };
        let claims = match &self.keys {
            KeySource::Static(keys) => verify(token, alg, kid.as_deref(), keys, validation)?,
            KeySource::Remote(remote) => {
                let keys = remote.current();
                match verify(token, alg, kid.as_deref(), &keys, validation) {
                    Err(Unverified::UnknownKid) if remote.refetch_for_unknown_kid().await => {
                        verify(token, alg, kid.as_deref(), &remote.current(), validation)?
                    }
                    other => other?,
                }
            }
        };
        let principal = principal(claims)?;
        self.verified
            .insert(Arc::from(token), Arc::new(principal.clone()));
        self.check_rules(&principal)?;
        Ok(Some(principal))
    }

    /// The token from `Authorization: Bearer` or the configured cookie.
    fn token<'a>(&self, headers: &'a HeaderMap) -> Result<Option<&'a str>, AuthError> {
        if let Some(v) = headers.get(http::header::AUTHORIZATION) {
            let v = v
                .to_str()
                .map_err(|_| AuthError::Invalid("Authorization is not ASCII".to_owned()))?;
            let (scheme, rest) = v.split_once(' ').unwrap_or((v, ""));
            if !scheme.eq_ignore_ascii_case("bearer") {
                return Err(AuthError::Invalid(
                    "Authorization must use the Bearer scheme".to_owned(),
                ));
            }
            return Ok(Some(rest.trim()).filter(|t| !t.is_empty()));
        }
        if let Some(name) = &self.cookie {
            let found = headers
                .get_all(http::header::COOKIE)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .flat_map(|v| v.split(';'))
                .filter_map(|p| p.trim().split_once('='))
                .find(|(n, _)| n == name)
                .map(|(_, v)| v);
            return Ok(found.filter(|t| !t.is_empty()));
        }
        Ok(None)
    }

    /// The header's algorithm and `kid`; refuses oversized tokens and any `crit`.
    fn header(&self, token: &str) -> Result<(Algorithm, Option<String>), AuthError> {
        if token.len() > MAX_TOKEN_BYTES {
            return Err(AuthError::Invalid("token too large".to_owned()));
        }
        let encoded = token
            .split('.')
            .next()
            .ok_or_else(|| AuthError::Invalid("not a JWT".to_owned()))?;
        let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(encoded)
            .map_err(|_| AuthError::Invalid("header is not base64url".to_owned()))?;
        let header: Map<String, Value> = serde_json::from_slice(&raw)
            .map_err(|_| AuthError::Invalid("header is not a JSON object".to_owned()))?;
        if header.contains_key("crit") {
            return Err(AuthError::Invalid(
                "critical header extensions are not supported".to_owned(),
            ));
        }
        let alg = header
            .get("alg")
            .and_then(Value::as_str)
            .ok_or_else(|| AuthError::Invalid("no alg in the header".to_owned()))?;
        let alg: Algorithm = alg
            .parse()
            .map_err(|_| AuthError::Invalid(format!("algorithm {alg:?} is not accepted")))?;
        let kid = match header.get("kid") {
            None => None,
            Some(Value::String(k)) => Some(k.clone()),
            Some(_) => return Err(AuthError::Invalid("kid is not a string".to_owned())),
        };
        Ok((alg, kid))
    }

    fn check_rules(&self, p: &Principal) -> Result<(), AuthError> {
        if !self.required_scopes.is_empty() {
            let mut have: Vec<&str> = Vec::new();
            if let Some(Value::String(s)) = p.claims.get("scope") {
                have.extend(s.split_ascii_whitespace());
            }
            if let Some(Value::Array(list)) = p.claims.get("scp") {
                have.extend(list.iter().filter_map(Value::as_str));
            }
            if let Some(missing) = self
                .required_scopes
                .iter()
                .find(|s| !have.contains(&s.as_str()))
            {
                return Err(AuthError::Forbidden(format!("scope {missing} is required")));
            }
        }
        if !self.required_roles.is_empty() {
            let have: Vec<&str> = match p.claims.get("roles") {
                Some(Value::Array(list)) => list.iter().filter_map(Value::as_str).collect(),
                _ => Vec::new(),
            };
            if let Some(missing) = self
                .required_roles
                .iter()
                .find(|r| !have.contains(&r.as_str()))
            {
                return Err(AuthError::Forbidden(format!("role {missing} is required")));
            }
        }
        for (name, want) in &self.required_claims {
            if p.claims.get(name).and_then(Value::as_str) != Some(want.as_str()) {
                return Err(AuthError::Forbidden(format!("claim {name} must be {want}")));
            }
        }
        Ok(())
    }
}

/// Why no key verified a token.
#[derive(Debug)]
enum Unverified {
    UnknownKid,
    Rejected(AuthError),
}

impl From<Unverified> for AuthError {
    fn from(u: Unverified) -> AuthError {
        match u {
            Unverified::UnknownKid => AuthError::Invalid("unknown key id".to_owned()),
            Unverified::Rejected(e) => e,
        }
    }
}

fn verify(
    token: &str,
    alg: Algorithm,
    kid: Option<&str>,
    keys: &[Key],
    validation: &Validation,
) -> Result<Map<String, Value>, Unverified> {
    let family = keys::family(alg);
    let candidates: Vec<&Key> = keys
        .iter()
        .filter(|k| k.family == family && k.alg.is_none_or(|a| a == alg))
        .filter(|k| match (kid, &k.kid) {
            (Some(want), Some(have)) => want == have,
            _ => true,
        })
        .collect();
    if candidates.is_empty() {
        return Err(if kid.is_some() {
            Unverified::UnknownKid
        } else {
            Unverified::Rejected(AuthError::Invalid(format!("no key for algorithm {alg:?}")))
        });
    }
    let mut last = None;
    for key in candidates {
        match jsonwebtoken::decode::<Map<String, Value>>(token, &key.key, validation) {
            Ok(data) => return Ok(data.claims),
            Err(e) => last = Some(e),
        }
    }
    let reason = match last.as_ref().map(|e| e.kind()) {
        Some(jsonwebtoken::errors::ErrorKind::ExpiredSignature) => "token expired",
        Some(jsonwebtoken::errors::ErrorKind::ImmatureSignature) => "token not valid yet",
        Some(jsonwebtoken::errors::ErrorKind::InvalidIssuer) => "wrong issuer",
        Some(jsonwebtoken::errors::ErrorKind::InvalidAudience) => "wrong audience",
        Some(jsonwebtoken::errors::ErrorKind::InvalidSignature) => "bad signature",
        Some(jsonwebtoken::errors::ErrorKind::MissingRequiredClaim(_)) => "missing exp",
        _ => "malformed token",
    };
    Err(Unverified::Rejected(AuthError::Invalid(reason.to_owned())))
}

/// Whether a remembered token has not expired since it was verified.
fn still_valid(p: &Principal, leeway: u64) -> bool {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    p.claims
        .get("exp")
        .and_then(Value::as_f64)
        .is_some_and(|exp| exp + leeway as f64 >= now as f64)
}

/// Checks claim types the node relies on.
fn principal(claims: Map<String, Value>) -> Result<Principal, AuthError> {
    let sub = match claims.get("sub") {
        None => None,
        Some(Value::String(s)) => Some(s.clone()),
        Some(_) => return Err(AuthError::Invalid("sub is not a string".to_owned())),
    };
    for name in ["exp", "nbf", "iat"] {
        if claims.get(name).is_some_and(|v| !v.is_number()) {
            return Err(AuthError::Invalid(format!("{name} is not a number")));
        }
    }
    Ok(Principal { sub, claims })
}

#[cfg(test)]
mod tests;
