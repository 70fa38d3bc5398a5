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
//! - [`ratelimit`]: GCRA limits keyed by IP, `sub`, a header or the route, with IETF
//!   `RateLimit` headers.
//! - [`geo`]: country allow/deny rules (451).
//! - [`ab`]: A/B experiments with sticky, weighted variants.
//!
//! Where it sits: the proxy's handler runs [`jwt::Authenticator::authenticate`] after routing
//! and before the cache stage, and signs the identity when a request goes to the origin. The order is geo rule → IP/header/
//! route limits → authentication → `sub` limits, cheapest refusal first.

pub mod ab;
pub mod geo;
pub mod identity;
pub mod jwt;
pub mod keys;
pub mod ratelimit;

pub use identity::{IDENTITY_HEADER, IdentitySigner, JWKS_PATH};
pub use jwt::{AuthError, Authenticator, Principal};
