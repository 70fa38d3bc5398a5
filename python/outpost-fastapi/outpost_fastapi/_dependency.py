"""FastAPI dependencies: verify ``x-outpost-identity`` and check scopes/roles."""

# No `from __future__ import annotations`: FastAPI must see the real Annotated[..., Depends(x)]
# of the closures below, whose `x` is not a module global.

import binascii
import json
import logging
import re
from collections.abc import Awaitable, Callable
from typing import Annotated, Any

import jwt
from fastapi import Depends, HTTPException, Request

from ._identity import ClaimError, EdgeIdentity
from ._jwks import JWKSCache, JWKSUnavailable, UnknownKeyId, _b64url_decode

__all__ = [
    "DEFAULT_HEADER",
    "ISSUER",
    "IdentityError",
    "OutpostIdentity",
    "require_role",
    "require_scope",
]

log = logging.getLogger("outpost_fastapi")

DEFAULT_HEADER = "x-outpost-identity"
ISSUER = "outpost"
ALGORITHM = "EdDSA"
#: Claims every token must carry (besides the signature and the header's kid).
REQUIRED_CLAIMS = ["iss", "aud", "iat", "nbf", "exp"]

# Compact JWS: base64url header . base64url payload . base64url signature. The signature may be
# empty here only so that an unsigned (alg "none") token gets the more telling error below.
_COMPACT_JWS = re.compile(r"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*")

_STATE_ATTR = "outpost_identity"
_STATE_HEADER_ATTR = "outpost_identity_header"


def _short(value: Any, limit: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


class IdentityError(HTTPException):
    """Why a request's identity was refused: 401 (bad or missing token), 403 (scope or role
    missing) or 503 (no key set could be fetched). ``reason`` is a stable machine-readable code:

    ``missing``, ``multiple``, ``malformed``, ``algorithm``, ``no_kid``, ``unknown_kid``,
    ``bad_signature``, ``expired``, ``not_yet_valid``, ``audience``, ``issuer``,
    ``missing_claim``, ``claims``, ``invalid`` (any other token error), ``jwks_unavailable``,
    ``scope``, ``role``.
    """

    def __init__(self, status_code: int, reason: str, detail: str) -> None:
        headers = {"WWW-Authenticate": "Outpost-Identity"} if status_code == 401 else None
        super().__init__(status_code=status_code, detail=detail, headers=headers)
        self.reason = reason


class OutpostIdentity:
    """FastAPI dependency that verifies the edge's identity token.

    ``Depends(OutpostIdentity(...))`` yields an :class:`EdgeIdentity` (or ``None`` when
    ``required=False`` and the header is absent) and raises :class:`IdentityError` otherwise.
    The identity is also stored as ``request.state.outpost_identity``.

    Create one instance per app (module level) and share it: it holds the JWKS cache.
    """

    def __init__(
        self,
        jwks_url: str,
        audience: str,
        *,
        leeway: float = 5,
        cache_ttl: float = 300,
        required: bool = True,
        header: str = DEFAULT_HEADER,
        issuer: str = ISSUER,
        min_refetch_interval: float = 10,
        timeout: float = 5,
        max_token_length: int = 8192,
    ) -> None:
        if not audience:
            raise ValueError("audience must be the origin group name configured on the edge")
        self.audience = audience
        self.issuer = issuer
        self.leeway = leeway
        self.required = required
        self.header = header.lower()
        self.max_token_length = max_token_length
        self.keys = JWKSCache(
            jwks_url,
            cache_ttl=cache_ttl,
            min_refetch_interval=min_refetch_interval,
            timeout=timeout,
        )

    def __repr__(self) -> str:
        return (
            f"OutpostIdentity({self.keys.url!r}, audience={self.audience!r}, "
            f"required={self.required!r}, header={self.header!r})"
        )

    async def __call__(self, request: Request) -> EdgeIdentity | None:
        values = request.headers.getlist(self.header)
        if not values:
            if not self.required:
                setattr(request.state, _STATE_ATTR, None)
                setattr(request.state, _STATE_HEADER_ATTR, self.header)
                return None
            raise IdentityError(401, "missing", f"missing {self.header} header")
        if len(values) > 1:
            raise IdentityError(401, "multiple", f"more than one {self.header} header")
        identity = await self.verify(values[0])
        setattr(request.state, _STATE_ATTR, identity)
        setattr(request.state, _STATE_HEADER_ATTR, self.header)
        return identity

    async def verify(self, token: str) -> EdgeIdentity:
        """Verify one token (the header's value) and return the identity it carries.

        Raises :class:`IdentityError` (401, or 503 when the JWKS was never reachable).
        """
        h = self.header
        if len(token) > self.max_token_length:
            raise IdentityError(
                401,
                "malformed",
                f"malformed {h} token: {len(token)} characters, limit {self.max_token_length}",
            )
        if not _COMPACT_JWS.fullmatch(token):
            raise IdentityError(
                401, "malformed", f"malformed {h} token: not a compact JWS (three base64url segments)"
            )
        try:
            header = json.loads(_b64url_decode(token.partition(".")[0]))
        except (ValueError, binascii.Error, RecursionError):  # also JSON and UTF-8 errors
            header = None
        if not isinstance(header, dict):
            raise IdentityError(
                401, "malformed", f"malformed {h} token: header is not a base64url-encoded JSON object"
            )

        alg = header.get("alg")
        if alg != ALGORITHM:
            raise IdentityError(
                401, "algorithm", f"{h} token uses alg {_short(alg)}; only {ALGORITHM} is accepted"
            )
        if "crit" in header:
            raise IdentityError(401, "malformed", f"{h} token has unsupported critical header parameters")
        kid = header.get("kid")
        if not isinstance(kid, str) or not kid:
            raise IdentityError(401, "no_kid", f"{h} token has no kid (key id) header")

        try:
            key = await self.keys.get_key(kid)
        except UnknownKeyId:
            raise IdentityError(
                401, "unknown_kid", f"{h} token is signed with unknown key id {_short(kid)}"
            ) from None
        except JWKSUnavailable:
            # Logged with the cause by JWKSCache; the client only learns that it is our fault.
            raise IdentityError(
                503,
                "jwks_unavailable",
                f"cannot verify {h}: the edge's JWKS is unreachable and no keys are cached",
            ) from None

        try:
            payload = jwt.decode(
                token,
                key,
                algorithms=[ALGORITHM],
                audience=self.audience,
                issuer=self.issuer,
                leeway=self.leeway,
                options={"require": REQUIRED_CLAIMS, "strict_aud": True},
            )
        except jwt.InvalidSignatureError:
            raise IdentityError(401, "bad_signature", f"{h} token has a bad signature") from None
        except jwt.ExpiredSignatureError:
            raise IdentityError(401, "expired", f"{h} token has expired") from None
        except jwt.ImmatureSignatureError:
            raise IdentityError(
                401, "not_yet_valid", f"{h} token is not valid yet (nbf/iat in the future)"
            ) from None
        except jwt.InvalidAudienceError:
            raise IdentityError(
                401, "audience", f"{h} token is for another audience (expected {self.audience!r})"
            ) from None
        except jwt.InvalidIssuerError:
            raise IdentityError(
                401, "issuer", f"{h} token has the wrong issuer (expected {self.issuer!r})"
            ) from None
        except jwt.MissingRequiredClaimError as e:
            raise IdentityError(
                401, "missing_claim", f"{h} token lacks the required {_short(e.claim)} claim"
            ) from None
        except jwt.DecodeError as e:
            raise IdentityError(401, "malformed", f"malformed {h} token: {e}") from None
        except jwt.InvalidTokenError as e:
            raise IdentityError(401, "invalid", f"invalid {h} token: {e}") from None
        except Exception:
            # Not expected from PyJWT for any input, but a forged header must never become a 500.
            log.warning("outpost identity: unexpected error while verifying a token", exc_info=True)
            raise IdentityError(401, "malformed", f"malformed {h} token") from None

        try:
            return EdgeIdentity.from_claims(payload)
        except ClaimError as e:
            raise IdentityError(401, "claims", f"{h} token has malformed claims: {e}") from None

    # -- authorization helpers ------------------------------------------------------------

    def require_scope(self, *scopes: str) -> Callable[..., Awaitable[EdgeIdentity]]:
        """A dependency yielding the identity if it has every one of ``scopes``, else 403."""
        return _requirement(self, "scope", scopes)

    def require_role(self, *roles: str) -> Callable[..., Awaitable[EdgeIdentity]]:
        """A dependency yielding the identity if it has every one of ``roles``, else 403."""
        return _requirement(self, "role", roles)


def _check(identity: EdgeIdentity | None, kind: str, wanted: tuple[str, ...], header: str) -> EdgeIdentity:
    if identity is None:
        raise IdentityError(401, "missing", f"missing {header} header")
    granted = identity.scopes if kind == "scope" else identity.roles
    missing = [w for w in wanted if w not in granted]
    if missing:
        plural = "s" if len(missing) > 1 else ""
        raise IdentityError(403, kind, f"missing required {kind}{plural}: {' '.join(missing)}")
    return identity


def _requirement(
    source: OutpostIdentity | None, kind: str, wanted: tuple[str, ...]
) -> Callable[..., Awaitable[EdgeIdentity]]:
    if not wanted or not all(isinstance(w, str) and w for w in wanted):
        raise ValueError(f"require_{kind}() needs one or more non-empty strings")

    if source is not None:
        header = source.header

        async def dependency(identity: Annotated[EdgeIdentity | None, Depends(source)]) -> EdgeIdentity:
            return _check(identity, kind, wanted, header)

    else:

        async def dependency(request: Request) -> EdgeIdentity:  # type: ignore[misc]
            if not hasattr(request.state, _STATE_ATTR):
                raise RuntimeError(
                    f"require_{kind}() without identity= needs an OutpostIdentity dependency to run "
                    "first (e.g. FastAPI(dependencies=[Depends(edge)]) or the route's dependencies=); "
                    f"or use edge.require_{kind}(...)"
                )
            header = getattr(request.state, _STATE_HEADER_ATTR, DEFAULT_HEADER)
            return _check(getattr(request.state, _STATE_ATTR), kind, wanted, header)

    dependency.__name__ = f"require_{kind}_{'_'.join(wanted)}"
    return dependency


def require_scope(
    *scopes: str, identity: OutpostIdentity | None = None
) -> Callable[..., Awaitable[EdgeIdentity]]:
    """Dependency: 403 unless the request's identity has every one of ``scopes``.

    Scopes come from ``claims.scope`` (space-separated string) and ``claims.scp`` (list).
    With ``identity=edge`` it depends on that :class:`OutpostIdentity` (verifying the token if
    nothing did yet); without it, an ``OutpostIdentity`` dependency must already have run for
    the request (app- or router-level ``dependencies=[Depends(edge)]``). Same as
    ``edge.require_scope(*scopes)``.
    """
    return _requirement(identity, "scope", scopes)


def require_role(
    *roles: str, identity: OutpostIdentity | None = None
) -> Callable[..., Awaitable[EdgeIdentity]]:
    """Dependency: 403 unless ``claims.roles`` contains every one of ``roles``.

    See :func:`require_scope` for ``identity``.
    """
    return _requirement(identity, "role", roles)
