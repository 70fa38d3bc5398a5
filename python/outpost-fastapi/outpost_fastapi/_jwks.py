"""Fetching and caching the edge's JWK set (Ed25519 public keys only)."""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
import re
import time
from collections.abc import Callable, Mapping
from typing import Any

import anyio
import httpx
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

__all__ = ["JWKSCache", "JWKSError", "JWKSUnavailable", "UnknownKeyId", "parse_jwks"]

log = logging.getLogger("outpost_fastapi")

_B64URL = re.compile(r"[A-Za-z0-9_-]*={0,2}")

#: A JWK set larger than this is refused (the edge publishes a handful of ~150-byte keys).
MAX_JWKS_BYTES = 1 << 20


class JWKSError(Exception):
    """The JWK set could not be fetched or is unusable."""


class JWKSUnavailable(JWKSError):
    """No key set has ever been fetched successfully, so no token can be verified."""


class UnknownKeyId(Exception):
    """The token's ``kid`` is not in the (possibly just refetched) key set."""

    def __init__(self, kid: str) -> None:
        super().__init__(kid)
        self.kid = kid


def _b64url_decode(value: object) -> bytes:
    """Strict base64url (RFC 4648 §5) decoding; padding is optional, other characters are errors."""
    if not isinstance(value, str) or not _B64URL.fullmatch(value):
        raise ValueError("not base64url")
    std = value.rstrip("=").translate(str.maketrans("-_", "+/"))
    return base64.b64decode(std + "=" * (-len(std) % 4), validate=True)


def parse_jwks(document: bytes | str | Mapping[str, Any]) -> dict[str, Ed25519PublicKey]:
    """Parse a JWK set, keeping only Ed25519 signature keys: ``kid -> public key``.

    Keys of another type (``kty`` other than ``OKP``, ``crv`` other than ``Ed25519``), keys
    marked for another use or algorithm, and malformed keys are skipped with a warning, so one
    bad entry never takes the good ones down with it. A set with no usable key at all is an
    error (:class:`JWKSError`).
    """
    if isinstance(document, (bytes, str)):
        try:
            document = json.loads(document)
        except (ValueError, UnicodeDecodeError) as e:
            raise JWKSError(f"JWK set is not valid JSON: {e}") from None
    if not isinstance(document, Mapping) or not isinstance(document.get("keys"), list):
        raise JWKSError('JWK set is not a JSON object with a "keys" array')

    keys: dict[str, Ed25519PublicKey] = {}
    for i, jwk in enumerate(document["keys"]):
        if not isinstance(jwk, Mapping):
            log.warning("outpost JWKS: key #%d is not an object; skipped", i)
            continue
        kid = jwk.get("kid")
        if jwk.get("kty") != "OKP" or jwk.get("crv") != "Ed25519":
            log.debug("outpost JWKS: key %r is not an Ed25519 OKP key; skipped", kid)
            continue
        if jwk.get("use", "sig") != "sig" or jwk.get("alg", "EdDSA") != "EdDSA":
            log.debug("outpost JWKS: key %r is not an EdDSA signature key; skipped", kid)
            continue
        if not isinstance(kid, str) or not kid:
            log.warning("outpost JWKS: Ed25519 key #%d has no kid; skipped", i)
            continue
        try:
            raw = _b64url_decode(jwk.get("x"))
        except (ValueError, binascii.Error):
            log.warning("outpost JWKS: key %r: x is not base64url; skipped", kid)
            continue
        if len(raw) != 32:
            log.warning("outpost JWKS: key %r: x is %d bytes, not 32; skipped", kid, len(raw))
            continue
        if kid in keys:
            log.warning("outpost JWKS: duplicate kid %r; the first one is used", kid)
            continue
        keys[kid] = Ed25519PublicKey.from_public_bytes(raw)
    if not keys:
        raise JWKSError("JWK set has no usable Ed25519 signature key")
    return keys


class JWKSCache:
    """The edge's key set, fetched with httpx and cached.

    * The set is fetched on first use and again once it is ``cache_ttl`` seconds old.
    * A token whose ``kid`` is not in the set triggers a refetch (key rotation), at most one
      such refetch per ``min_refetch_interval`` seconds, so a flood of tokens with made-up key
      ids costs the JWKS endpoint at most one request per interval.
    * A failed fetch (network error, non-200, bad JSON, no usable key) keeps the last good set,
      and no new attempt is made for ``min_refetch_interval`` seconds. Only while no set was
      ever fetched is every lookup a fresh attempt; it fails with :class:`JWKSUnavailable`.
    * Concurrent lookups share one fetch.

    ``clock`` is a monotonic clock in seconds (tests substitute a fake one).
    """

    def __init__(
        self,
        url: str,
        *,
        cache_ttl: float = 300,
        min_refetch_interval: float = 10,
        timeout: float = 5,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.url = url
        self.cache_ttl = cache_ttl
        self.min_refetch_interval = min_refetch_interval
        self.timeout = timeout
        self.clock = clock
        self._keys: dict[str, Ed25519PublicKey] | None = None
        self._fetched_at = 0.0
        self._last_kid_refetch: float | None = None  # last refetch caused by an unknown kid
        self._last_failure: float | None = None  # last failed fetch, None after a success
        self._last_error: str | None = None
        self._attempts = 0  # finished fetch attempts
        self._pending = 0  # tasks inside _attempt (fetching or waiting for the fetch)
        self._lock: anyio.Lock | None = None
        self._lock_loop: object = None

    @property
    def kids(self) -> frozenset[str]:
        """Key ids of the current set (empty before the first successful fetch)."""
        return frozenset(self._keys or ())

    @property
    def last_error(self) -> str | None:
        """Why the most recent fetch failed, or ``None`` if it succeeded."""
        return self._last_error

    async def get_key(self, kid: str) -> Ed25519PublicKey:
        """The public key for ``kid``, fetching or refetching the set as described above.

        Raises :class:`JWKSUnavailable` when no set could ever be fetched and
        :class:`UnknownKeyId` when the set has no such key.
        """
        keys = self._keys
        if keys is None:
            await self._attempt()  # (or join the fetch under way)
        else:
            unknown = kid not in keys
            now = self.clock()
            if self._pending:
                if unknown:
                    await self._attempt()  # join the fetch under way: it may bring this kid
            elif self._last_failure is None or now - self._last_failure >= self.min_refetch_interval:
                if now - self._fetched_at >= self.cache_ttl:
                    await self._attempt()
                elif unknown and (
                    self._last_kid_refetch is None
                    or now - self._last_kid_refetch >= self.min_refetch_interval
                ):
                    self._last_kid_refetch = now
                    await self._attempt()
        keys = self._keys
        if keys is None:
            raise JWKSUnavailable(f"cannot fetch the edge's JWKS from {self.url}: {self._last_error}")
        key = keys.get(kid)
        if key is None:
            raise UnknownKeyId(kid)
        return key

    async def refresh(self) -> None:
        """Fetch the set now, ignoring the TTL and rate limit (e.g. to warm up at startup).

        Raises :class:`JWKSError` if the fetch fails; the previous set, if any, stays in use.
        """
        await self._attempt(force=True)
        if self._last_error is not None:
            raise JWKSError(self._last_error)

    def _get_lock(self) -> anyio.Lock:
        # One lock per event loop: a lock is tied to the loop it was first contended in, and
        # one dependency object may serve several loops (e.g. Starlette's TestClient).
        try:
            loop: object = asyncio.get_running_loop()
        except RuntimeError:  # another anyio backend (trio): one loop per process
            loop = "non-asyncio"
        if self._lock is None or self._lock_loop is not loop:
            self._lock = anyio.Lock()
            self._lock_loop = loop
        return self._lock

    async def _attempt(self, *, force: bool = False) -> None:
        seen = self._attempts
        self._pending += 1
        try:
            async with self._get_lock():
                if self._attempts != seen and not force:
                    return  # another task fetched (or tried to) while this one waited: use its result
                try:
                    keys = await self._fetch()
                except JWKSError as e:
                    self._last_error = str(e)
                    self._last_failure = self.clock()
                    if self._keys is None:
                        log.warning("outpost JWKS: %s (no cached keys: tokens cannot be verified)", e)
                    else:
                        log.warning("outpost JWKS: %s (keeping the %d cached keys)", e, len(self._keys))
                else:
                    if self._keys is not None and keys.keys() != self._keys.keys():
                        log.info("outpost JWKS: key ids now %s", sorted(keys))
                    self._keys = keys
                    self._fetched_at = self.clock()
                    self._last_error = None
                    self._last_failure = None
                finally:
                    self._attempts += 1
        finally:
            self._pending -= 1

    async def _fetch(self) -> dict[str, Ed25519PublicKey]:
        try:
            async with httpx.AsyncClient(timeout=self.timeout, follow_redirects=False) as client:
                async with client.stream(
                    "GET", self.url, headers={"accept": "application/jwk-set+json, application/json"}
                ) as resp:
                    if resp.status_code != 200:
                        raise JWKSError(f"GET {self.url} returned HTTP {resp.status_code}")
                    body = bytearray()
                    async for chunk in resp.aiter_bytes():
                        body += chunk
                        if len(body) > MAX_JWKS_BYTES:
                            raise JWKSError(f"GET {self.url}: JWK set larger than {MAX_JWKS_BYTES} bytes")
        except JWKSError:
            raise
        except Exception as e:  # httpx.HTTPError, httpx.InvalidURL, OSError, ...
            raise JWKSError(f"GET {self.url} failed: {type(e).__name__}: {e}") from None
        return parse_jwks(bytes(body))
