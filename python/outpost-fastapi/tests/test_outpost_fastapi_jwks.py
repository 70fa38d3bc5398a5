"""JWKS fetching against a real HTTP server on a loopback port: caching, rotation, rate-limited
refetches, outages, and parsing of odd key sets.

Run: .venv/bin/python -m pytest python/outpost-fastapi
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket

import pytest
from fastapi.testclient import TestClient
from outpost_fastapi_testkit import AUDIENCE, JWKSServer, KeyPair, auth, b64url, make_app

from outpost_fastapi import JWKS_PATH, JWKSError, OutpostIdentity, parse_jwks


def test_keys_are_fetched_once_and_cached(client, key, jwks_server):
    for _ in range(5):
        assert client.get("/me", headers=auth(key.token())).status_code == 200
    assert jwks_server.hits == 1


def test_no_fetch_without_a_token(client, jwks_server):
    assert client.get("/me").status_code == 401
    assert client.get("/me", headers=auth("junk")).status_code == 401
    assert client.get("/me", headers=auth(KeyPair("x").raw_token({"alg": "none"}, {}))).status_code == 401
    assert jwks_server.hits == 0


def test_cache_ttl_expiry_refetches(client, key, jwks_server, clock):
    assert client.get("/me", headers=auth(key.token())).status_code == 200
    clock.advance(299)
    assert client.get("/me", headers=auth(key.token())).status_code == 200
    assert jwks_server.hits == 1
    clock.advance(2)
    assert client.get("/me", headers=auth(key.token())).status_code == 200
    assert jwks_server.hits == 2


def test_rotation_unknown_kid_triggers_refetch(client, key, jwks_server):
    assert client.get("/me", headers=auth(key.token())).status_code == 200
    new = KeyPair("edge-2026-02")
    jwks_server.publish(key, new)
    # The cache is fresh, but an unknown kid forces a refetch: the new key works at once.
    r = client.get("/me", headers=auth(new.token()))
    assert r.status_code == 200, r.text
    assert jwks_server.hits == 2
    # Both keys are now cached.
    assert client.get("/me", headers=auth(key.token())).status_code == 200
    assert client.get("/me", headers=auth(new.token())).status_code == 200
    assert jwks_server.hits == 2


def test_unknown_kid_is_401_after_refetch(client, key, jwks_server):
    stranger = KeyPair("not-published")
    r = client.get("/me", headers=auth(stranger.token()))
    assert r.status_code == 401
    assert r.json()["detail"] == "x-outpost-identity token is signed with unknown key id 'not-published'"
    assert jwks_server.hits == 1


def test_refetch_is_rate_limited(client, key, jwks_server, clock):
    assert client.get("/me", headers=auth(key.token())).status_code == 200  # t=1000: hit 1
    clock.advance(1)  # t=1001
    for i in range(20):  # a flood of made-up key ids: the first one refetches, the rest wait
        r = client.get("/me", headers=auth(KeyPair(f"made-up-{i}").token()))
        assert r.status_code == 401
        assert "unknown key id" in r.json()["detail"]
    assert jwks_server.hits == 2

    clock.advance(9)  # t=1010: 9 s since the last unknown-kid refetch
    assert client.get("/me", headers=auth(KeyPair("made-up-x").token())).status_code == 401
    assert jwks_server.hits == 2
    clock.advance(1)  # t=1011: 10 s
    assert client.get("/me", headers=auth(KeyPair("made-up-y").token())).status_code == 401
    assert jwks_server.hits == 3
    for _ in range(5):
        assert client.get("/me", headers=auth(KeyPair("made-up-z").token())).status_code == 401
    assert jwks_server.hits == 3

    # A key published within the window is picked up once the window has passed.
    new = KeyPair("edge-2026-02")
    jwks_server.publish(key, new)
    clock.advance(5)  # t=1016
    assert client.get("/me", headers=auth(new.token())).status_code == 401
    assert jwks_server.hits == 3
    clock.advance(5)  # t=1021
    assert client.get("/me", headers=auth(new.token())).status_code == 200
    assert jwks_server.hits == 4
    # Known keys never wait for anything.
    assert client.get("/me", headers=auth(key.token())).status_code == 200
    assert jwks_server.hits == 4


def test_removed_key_stops_working_after_refresh(client, key, jwks_server, clock):
    new = KeyPair("edge-2026-02")
    jwks_server.publish(key, new)
    assert client.get("/me", headers=auth(key.token())).status_code == 200
    jwks_server.publish(new)  # the old key is retired
    clock.advance(301)
    r = client.get("/me", headers=auth(key.token()))
    assert r.status_code == 401
    assert "unknown key id 'edge-2026-01'" in r.json()["detail"]
    assert client.get("/me", headers=auth(new.token())).status_code == 200


def test_jwks_down_after_first_fetch_cached_keys_keep_working(client, key, jwks_server, clock, caplog):
    assert client.get("/me", headers=auth(key.token())).status_code == 200
    jwks_server.stop()  # connection refused from now on

    assert client.get("/me", headers=auth(key.token())).status_code == 200
    # Unknown kid: the refetch fails, the token is refused, the cached keys survive.
    with caplog.at_level(logging.WARNING, logger="outpost_fastapi"):
        r = client.get("/me", headers=auth(KeyPair("edge-2026-02").token()))
    assert r.status_code == 401
    assert "unknown key id" in r.json()["detail"]
    assert any("keeping the 1 cached keys" in m for m in caplog.messages), caplog.messages
    assert client.get("/me", headers=auth(key.token())).status_code == 200

    # Past the TTL: refetches fail, but the last good set is still used.
    clock.advance(3600)
    for _ in range(3):
        assert client.get("/me", headers=auth(key.token())).status_code == 200
        clock.advance(4)


def test_jwks_erroring_after_first_fetch_cached_keys_keep_working(client, key, jwks_server, clock):
    assert client.get("/me", headers=auth(key.token())).status_code == 200
    clock.advance(301)
    jwks_server.status = 500
    assert client.get("/me", headers=auth(key.token())).status_code == 200
    assert jwks_server.hits == 2
    # A failed attempt is not retried on every request.
    clock.advance(1)
    assert client.get("/me", headers=auth(key.token())).status_code == 200
    assert jwks_server.hits == 2
    clock.advance(10)
    assert client.get("/me", headers=auth(key.token())).status_code == 200
    assert jwks_server.hits == 3
    # A set with no usable key is treated as a failure too (not as "revoke everything").
    jwks_server.status = 200
    jwks_server.jwks = {"keys": []}
    clock.advance(10)
    assert client.get("/me", headers=auth(key.token())).status_code == 200
    assert jwks_server.hits == 4


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_jwks_unreachable_and_nothing_cached_is_503(key):
    edge = OutpostIdentity(f"http://127.0.0.1:{_closed_port()}{JWKS_PATH}", AUDIENCE, timeout=2)
    with TestClient(make_app(edge)) as c:
        r = c.get("/me", headers=auth(key.token()))
        assert r.status_code == 503
        assert r.json()["detail"] == (
            "cannot verify x-outpost-identity: the edge's JWKS is unreachable and no keys are cached"
        )
        # Not a credential problem, so no WWW-Authenticate challenge; and no URL leaks out.
        assert "www-authenticate" not in r.headers
        assert "127.0.0.1" not in r.text
        # Requests without a token are still plain 401s.
        assert c.get("/me").status_code == 401
        assert c.get("/maybe").json() == {"identity": None}
    assert "ConnectError" in (edge.keys.last_error or "")


@pytest.mark.parametrize(
    "status, body",
    [
        (500, None),
        (404, None),
        (200, b"<html>not json</html>"),
        (200, b'{"no_keys": []}'),
        (200, b'{"keys": {}}'),
        (200, b'{"keys": []}'),
        (200, b"[]"),
    ],
)
def test_bad_jwks_responses_without_cache_are_503_then_recover(jwks_server, key, status, body):
    jwks_server.status = status
    jwks_server.body = body
    edge = OutpostIdentity(jwks_server.url, AUDIENCE)
    with TestClient(make_app(edge)) as c:
        assert c.get("/me", headers=auth(key.token())).status_code == 503
        # With nothing cached, every request tries again, so the origin recovers immediately.
        jwks_server.status = 200
        jwks_server.body = None
        assert c.get("/me", headers=auth(key.token())).status_code == 200
    assert jwks_server.hits == 2


def test_concurrent_requests_share_one_fetch(jwks_server, key):
    edge = OutpostIdentity(jwks_server.url, AUDIENCE)
    token = key.token()

    async def main():
        return await asyncio.gather(*(edge.verify(token) for _ in range(20)))

    identities = asyncio.run(main())
    assert all(i.sub == "user-42" for i in identities)
    assert jwks_server.hits == 1


def test_refresh_warms_up_and_reports_errors(jwks_server, key):
    edge = OutpostIdentity(jwks_server.url, AUDIENCE)
    asyncio.run(edge.keys.refresh())
    assert edge.keys.kids == {key.kid}
    assert jwks_server.hits == 1
    jwks_server.status = 503
    with pytest.raises(JWKSError, match="HTTP 503"):
        asyncio.run(edge.keys.refresh())
    assert edge.keys.kids == {key.kid}  # still the last good set


def test_one_dependency_serves_several_event_loops(jwks_server, key):
    # TestClient without `with` runs every request in a new event loop; so can a real deployment
    # that shares module-level dependencies between apps. The cache's lock must cope.
    edge = OutpostIdentity(jwks_server.url, AUDIENCE)
    c = TestClient(make_app(edge))
    for _ in range(3):
        assert c.get("/me", headers=auth(key.token())).status_code == 200
    assert jwks_server.hits == 1


def test_redirects_are_not_followed(key):
    target = JWKSServer()
    target.publish(key)
    try:
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        class Redirect(BaseHTTPRequestHandler):
            def do_GET(self):
                self.send_response(302)
                self.send_header("location", target.url)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        server = ThreadingHTTPServer(("127.0.0.1", 0), Redirect)
        thread = threading.Thread(target=server.serve_forever, args=(0.02,), daemon=True)
        thread.start()
        try:
            url = f"http://127.0.0.1:{server.server_address[1]}{JWKS_PATH}"
            edge = OutpostIdentity(url, AUDIENCE)
            with pytest.raises(JWKSError, match="HTTP 302"):
                asyncio.run(edge.keys.refresh())
            assert target.hits == 0
        finally:
            server.shutdown()
            server.server_close()
            thread.join(5)
    finally:
        target.stop()


# -- parse_jwks -----------------------------------------------------------------------------------


def test_parse_jwks_skips_unusable_keys(key, caplog):
    good = key.jwk()
    other = KeyPair("second").jwk()
    doc = {
        "keys": [
            {"kty": "RSA", "kid": "rsa", "n": "AQAB", "e": "AQAB"},
            {"kty": "EC", "crv": "P-256", "kid": "ec", "x": "AA", "y": "AA"},
            {"kty": "OKP", "crv": "X25519", "kid": "x25519", "x": good["x"]},
            {"kty": "OKP", "crv": "Ed448", "kid": "ed448", "x": b64url(bytes(57))},
            {**good, "kid": "enc", "use": "enc"},
            {**good, "kid": "rs", "alg": "RS256"},
            {**good, "kid": "short", "x": b64url(bytes(31))},
            {**good, "kid": "long", "x": b64url(bytes(33))},
            {**good, "kid": "notb64", "x": "!!!!" + good["x"][4:]},
            {**good, "kid": "numeric-x", "x": 12},
            {k: v for k, v in good.items() if k != "kid"},
            {**good, "kid": ""},
            "not an object",
            good,
            {**other, "kid": key.kid},  # duplicate kid: the first one wins
            {k: v for k, v in other.items() if k not in ("alg", "use")},  # alg/use are optional
        ]
    }
    with caplog.at_level(logging.WARNING, logger="outpost_fastapi"):
        keys = parse_jwks(json.dumps(doc))
    assert set(keys) == {key.kid, "second"}
    assert keys[key.kid].public_bytes_raw() == key.public_bytes
    assert any("duplicate kid" in m for m in caplog.messages)


def test_parse_jwks_accepts_padded_base64url(key):
    jwk = key.jwk()
    jwk["x"] += "=" * (-len(jwk["x"]) % 4)
    assert parse_jwks({"keys": [jwk]})[key.kid].public_bytes_raw() == key.public_bytes


def test_parse_jwks_rejects_standard_base64_alphabet(key):
    # x must be base64url; a '+' or '/' (standard alphabet) makes the key unusable.
    raw = bytes([0xFB] * 32)  # encodes to '-' / '_' characters in base64url
    jwk = {**key.jwk(), "x": b64url(raw).replace("-", "+").replace("_", "/")}
    with pytest.raises(JWKSError, match="no usable"):
        parse_jwks({"keys": [jwk]})


@pytest.mark.parametrize("doc", [b"", b"nope", b"[]", b"{}", b'{"keys": null}', b'{"keys": []}', b"\xff"])
def test_parse_jwks_errors(doc):
    with pytest.raises(JWKSError):
        parse_jwks(doc)
