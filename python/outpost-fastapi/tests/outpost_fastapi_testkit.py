"""Helpers for the outpost-fastapi tests: Ed25519 keys, a real JWKS HTTP server on a loopback
port, token builders and a small FastAPI app using the dependencies.

(A uniquely named module rather than conftest.py, so that importing it cannot pick up another
directory's conftest.)"""

from __future__ import annotations

import base64
import json
import secrets
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from fastapi import Depends, FastAPI, Request

from outpost_fastapi import (
    JWKS_PATH,
    EdgeIdentity,
    OutpostIdentity,
    require_role,
    require_scope,
)

AUDIENCE = "central"
DROP = object()  # claim value meaning "leave this claim out"


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class KeyPair:
    """An Ed25519 signing key as the edge holds it, with its public JWK."""

    def __init__(self, kid: str) -> None:
        self.kid = kid
        self.private = Ed25519PrivateKey.generate()
        self.public = self.private.public_key()

    @property
    def public_bytes(self) -> bytes:
        return self.public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)

    @property
    def public_pem(self) -> bytes:
        return self.public.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    def jwk(self) -> dict[str, str]:
        return {
            "kty": "OKP",
            "crv": "Ed25519",
            "x": b64url(self.public_bytes),
            "kid": self.kid,
            "alg": "EdDSA",
            "use": "sig",
        }

    def claims(self, **overrides: Any) -> dict[str, Any]:
        """A full claim set as the edge sends it; ``DROP`` removes a claim."""
        now = int(time.time())
        claims: dict[str, Any] = {
            "iss": "outpost",
            "aud": AUDIENCE,
            "iat": now,
            "nbf": now,
            "exp": now + 60,
            "node": "tokyo-1",
            "rid": secrets.token_hex(16),
            "sub": "user-42",
            "claims": {"scope": "read write", "roles": ["admin"]},
            "geo": {"country": "JP", "lat": 35.68, "lon": 139.69, "source": "header"},
            "variant": {"checkout": "b"},
        }
        for name, value in overrides.items():
            if value is DROP:
                claims.pop(name, None)
            else:
                claims[name] = value
        return claims

    def token(self, *, kid: str | None = None, **overrides: Any) -> str:
        """A token signed by this key with PyJWT (the normal path)."""
        return jwt.encode(
            self.claims(**overrides),
            self.private,
            algorithm="EdDSA",
            headers={"kid": self.kid if kid is None else kid},
        )

    def raw_token(self, header: Any, payload: bytes | Any) -> str:
        """A token with arbitrary header/payload, properly Ed25519-signed by this key."""
        h = b64url(json.dumps(header).encode())
        p = b64url(payload if isinstance(payload, bytes) else json.dumps(payload).encode())
        sig = self.private.sign(f"{h}.{p}".encode())
        return f"{h}.{p}.{b64url(sig)}"


class JWKSServer:
    """A real HTTP server on 127.0.0.1:<free port> serving ``jwks`` at the edge's JWKS path."""

    def __init__(self) -> None:
        self.jwks: Any = {"keys": []}
        self.status = 200
        self.body: bytes | None = None  # served verbatim instead of ``jwks`` when set
        self.hits = 0
        self._lock = threading.Lock()
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                with owner._lock:
                    owner.hits += 1
                    status, body = owner.status, owner.body
                    if body is None:
                        body = json.dumps(owner.jwks).encode()
                if self.path != JWKS_PATH:
                    status, body = 404, b"not found"
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}{JWKS_PATH}"
        # A short poll interval: shutdown() waits for the serving loop to notice (default 0.5 s).
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.02,), daemon=True)
        self._thread.start()
        self._running = True

    def publish(self, *keys: KeyPair) -> None:
        with self._lock:
            self.jwks = {"keys": [k.jwk() for k in keys]}

    def stop(self) -> None:
        """Shut the server down and close its socket: connections are refused from now on."""
        if self._running:
            self._running = False
            self._server.shutdown()
            self._server.server_close()
            self._thread.join(5)


class FakeClock:
    """A monotonic clock the tests move by hand (for the JWKS TTL and refetch interval)."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def identity_json(identity: EdgeIdentity | None) -> dict[str, Any] | None:
    if identity is None:
        return None
    return {
        "sub": identity.sub,
        "claims": identity.claims,
        "country": identity.country,
        "lat": identity.lat,
        "lon": identity.lon,
        "geo_source": identity.geo_source,
        "variants": identity.variants,
        "node": identity.node,
        "request_id": identity.request_id,
        "issued_at": identity.issued_at.isoformat() if identity.issued_at else None,
        "expires_at": identity.expires_at.isoformat() if identity.expires_at else None,
        "raw": identity.raw,
    }


def make_app(edge: OutpostIdentity) -> FastAPI:
    optional = OutpostIdentity(edge.keys.url, edge.audience, required=False)
    optional.keys = edge.keys  # share the cache (and the fake clock)
    app = FastAPI()

    @app.get("/me")
    async def me(request: Request, identity: EdgeIdentity = Depends(edge)):
        assert request.state.outpost_identity is identity
        return identity_json(identity)

    @app.get("/maybe")
    async def maybe(identity: EdgeIdentity | None = Depends(optional)):
        return {"identity": identity_json(identity)}

    @app.post("/write")
    async def write(identity: EdgeIdentity = Depends(edge.require_scope("write"))):
        return {"sub": identity.sub}

    @app.post("/write-and-delete")
    async def write_and_delete(identity: EdgeIdentity = Depends(edge.require_scope("write", "delete"))):
        return {"sub": identity.sub}

    @app.get("/admin", dependencies=[Depends(edge.require_role("admin"))])
    async def admin():
        return {"ok": True}

    # Module-level helpers: with identity=, and reading request.state after a route dependency.
    @app.get("/fn/read")
    async def fn_read(identity: EdgeIdentity = Depends(require_scope("read", identity=edge))):
        return {"sub": identity.sub}

    @app.get("/fn/auditor", dependencies=[Depends(edge), Depends(require_role("auditor"))])
    async def fn_auditor():
        return {"ok": True}

    @app.get("/fn/optional-write", dependencies=[Depends(optional), Depends(require_scope("write"))])
    async def fn_optional_write():
        return {"ok": True}

    @app.get("/fn/misconfigured", dependencies=[Depends(require_scope("read"))])
    async def fn_misconfigured():
        return {"ok": True}

    return app


def auth(token: str | bytes) -> dict[str, str | bytes]:
    return {"x-outpost-identity": token}
