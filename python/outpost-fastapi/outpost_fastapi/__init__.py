"""Verify the identity token an Outpost edge node forwards to a FastAPI origin.

The edge signs a short-lived JWT (EdDSA / Ed25519) into the ``x-outpost-identity`` request
header; :class:`OutpostIdentity` checks it against the edge's JWKS and hands the route an
:class:`EdgeIdentity`::

    from fastapi import Depends, FastAPI
    from outpost_fastapi import EdgeIdentity, OutpostIdentity

    edge = OutpostIdentity("https://edge.example.com/.well-known/outpost/jwks.json", audience="central")
    app = FastAPI()

    @app.get("/me")
    async def me(identity: EdgeIdentity = Depends(edge)):
        return {"sub": identity.sub, "country": identity.country}

:class:`Invalidator` (the ``nats`` extra) tells the edge fleet to drop cached responses, over
NATS JetStream::

    from fastapi import Request
    from outpost_fastapi import invalidator_lifespan

    app = FastAPI(lifespan=invalidator_lifespan("nats://nats.internal:4222", source="catalog"))

    @app.put("/products/{pid}")
    async def update_product(pid: int, request: Request):
        ...
        await request.app.state.invalidator.purge(tags=[f"product:{pid}"])

:class:`IdempotencyStore` applies each ``Idempotency-Key`` (sent by the edge's outbox with
every delivery of a queued write) once, remembering the response in the app's SQLite database:
:meth:`IdempotencyStore.run_once` in the same transaction as the app's write, or
:class:`IdempotencyMiddleware` for any route.
"""

from ._dependency import (
    DEFAULT_HEADER,
    ISSUER,
    IdentityError,
    OutpostIdentity,
    require_role,
    require_scope,
)
from ._idempotency import (
    IDEMPOTENCY_HEADER,
    MAX_KEY_LENGTH,
    REPLAYED_HEADER,
    IdempotencyError,
    IdempotencyKey,
    IdempotencyMiddleware,
    IdempotencyStore,
    IdempotentRequest,
    StoredResponse,
    request_fingerprint,
)
from ._identity import ClaimError, EdgeIdentity
from ._invalidate import InvalidationError, Invalidator, invalidator_lifespan
from ._jwks import JWKSCache, JWKSError, JWKSUnavailable, UnknownKeyId, parse_jwks

JWKS_PATH = "/.well-known/outpost/jwks.json"

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_HEADER",
    "IDEMPOTENCY_HEADER",
    "ISSUER",
    "JWKS_PATH",
    "MAX_KEY_LENGTH",
    "REPLAYED_HEADER",
    "ClaimError",
    "EdgeIdentity",
    "IdempotencyError",
    "IdempotencyKey",
    "IdempotencyMiddleware",
    "IdempotencyStore",
    "IdempotentRequest",
    "IdentityError",
    "InvalidationError",
    "Invalidator",
    "JWKSCache",
    "JWKSError",
    "JWKSUnavailable",
    "OutpostIdentity",
    "StoredResponse",
    "UnknownKeyId",
    "invalidator_lifespan",
    "parse_jwks",
    "request_fingerprint",
    "require_role",
    "require_scope",
]
