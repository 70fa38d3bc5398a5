//! Outpost's edge guards: who may pass, and who the origin is told the caller is.
//!
//! # Layout (in the order a guarded request meets them)
//! - [`jwt`]: a route's token rules ([`jwt::Authenticator`]): token from `Authorization:
//!   Bearer` or a cookie, algorithm allowlist matched to key type, signature, `exp`/`nbf`/
//!   `iss`/`aud`, scope/role/claim rules; RFC 6750 challenges.
//! - [`keys`]: verification keys from files, a secret, a JWKS URL or OIDC discovery, with
//!   background refresh and rate-limited refetch on unknown `kid`s.
//! - [`identity`]: the Ed25519-signed `x-outpost-identity` forwarded to origins, and the
//!   node's JWKS.
//!
//! Where it sits: the proxy's handler runs [`jwt::Authenticator::authenticate`] after routing
//! and before the cache stage, and signs the identity when a request goes to the origin.

pub mod identity;
pub mod jwt;
pub mod keys;

pub use identity::{IDENTITY_HEADER, IdentitySigner, JWKS_PATH};
pub use jwt::{AuthError, Authenticator, Principal};
