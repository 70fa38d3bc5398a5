"""A small FastAPI origin behind a real Outpost node, for test_outpost_fastapi_with_node.py.

Run by that test with uvicorn as a subprocess (``uvicorn node_app:app --app-dir <tests dir>``);
the node's JWKS URL comes from the ``OUTPOST_JWKS_URL`` environment variable. Not a test module.
"""

from __future__ import annotations

import os
from dataclasses import asdict
from typing import Any

from fastapi import Depends, FastAPI

from outpost_fastapi import EdgeIdentity, OutpostIdentity

JWKS_URL = os.environ["OUTPOST_JWKS_URL"]
AUDIENCE = os.environ.get("OUTPOST_AUDIENCE", "central")

edge = OutpostIdentity(jwks_url=JWKS_URL, audience=AUDIENCE, timeout=2)
maybe_edge = OutpostIdentity(jwks_url=JWKS_URL, audience=AUDIENCE, required=False, timeout=2)

app = FastAPI()


def identity_json(identity: EdgeIdentity) -> dict[str, Any]:
    fields = asdict(identity)
    for name in ("issued_at", "expires_at"):
        value = fields.get(name)
        if value is not None:
            fields[name] = value.isoformat()
    return fields


@app.get("/healthz")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@app.get("/whoami")
async def whoami(identity: EdgeIdentity = Depends(edge)) -> dict[str, Any]:
    return identity_json(identity)


@app.get("/admin")
async def admin(identity: EdgeIdentity = Depends(edge.require_scope("admin"))) -> dict[str, Any]:
    return {"admin": True, "sub": identity.sub}


@app.get("/maybe")
async def maybe(identity: EdgeIdentity | None = Depends(maybe_edge)) -> dict[str, bool]:
    return {"anonymous": identity is None}
