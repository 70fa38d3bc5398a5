"""Token verification through a FastAPI app: valid tokens, time/audience/issuer checks,
algorithm confusion, garbage headers, scopes and roles.

Run: .venv/bin/python -m pytest python/outpost-fastapi
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import random
import time
from datetime import UTC, datetime

import pytest
from outpost_fastapi_testkit import AUDIENCE, DROP, KeyPair, auth, b64url, make_app

from outpost_fastapi import EdgeIdentity, IdentityError, OutpostIdentity


def assert_401(r, fragment: str) -> None:
    assert r.status_code == 401, r.text
    detail = r.json()["detail"]
    assert fragment in detail, detail
    assert r.headers["www-authenticate"] == "Outpost-Identity"


# -- the happy path -------------------------------------------------------------------------


def test_valid_token_exposes_identity(client, key):
    claims = key.claims()
    token = key.token(rid=claims["rid"], iat=claims["iat"], nbf=claims["nbf"], exp=claims["exp"])
    r = client.get("/me", headers=auth(token))
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["sub"] == "user-42"
    assert body["claims"] == {"scope": "read write", "roles": ["admin"]}
    assert body["country"] == "JP"
    assert body["lat"] == 35.68
    assert body["lon"] == 139.69
    assert body["geo_source"] == "header"
    assert body["variants"] == {"checkout": "b"}
    assert body["node"] == "tokyo-1"
    assert body["request_id"] == claims["rid"]
    assert len(body["request_id"]) == 32
    assert body["issued_at"] == datetime.fromtimestamp(claims["iat"], UTC).isoformat()
    assert body["expires_at"] == datetime.fromtimestamp(claims["exp"], UTC).isoformat()
    assert body["raw"]["iss"] == "outpost"
    assert body["raw"]["aud"] == AUDIENCE
    assert body["raw"]["rid"] == claims["rid"]


def test_minimal_anonymous_token(client, key):
    token = key.token(sub=DROP, claims=DROP, geo=DROP, variant=DROP)
    r = client.get("/me", headers=auth(token))
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["sub"] is None
    assert body["claims"] == {} and body["variants"] == {}
    assert body["country"] is None and body["lat"] is None and body["geo_source"] is None
    assert body["node"] == "tokyo-1"


def test_geo_with_null_country_and_partial_keys(client, key):
    r = client.get("/me", headers=auth(key.token(geo={"country": None, "source": "node"})))
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["country"] is None and body["lat"] is None and body["lon"] is None
    assert body["geo_source"] == "node"


def test_identity_is_frozen_and_has_helpers(key):
    identity = EdgeIdentity.from_claims(key.claims(claims={"scp": ["a", "b"], "scope": "c", "roles": "x y"}))
    assert identity.scopes == {"a", "b", "c"}
    assert identity.roles == {"x", "y"}
    assert identity.has_scope("a", "c") and not identity.has_scope("a", "d")
    assert identity.has_role("y") and not identity.has_role("admin")
    assert identity.variant("checkout") == "b"
    assert identity.variant("nope", "control") == "control"
    with pytest.raises(AttributeError):
        identity.sub = "someone-else"  # type: ignore[misc]


def test_custom_header_name(jwks_server, key):
    from fastapi import Depends, FastAPI
    from fastapi.testclient import TestClient

    dep = OutpostIdentity(jwks_server.url, AUDIENCE, header="X-Edge-Token")
    app = FastAPI()

    @app.get("/")
    async def root(identity: EdgeIdentity = Depends(dep)):
        return {"sub": identity.sub}

    with TestClient(app) as c:
        assert c.get("/", headers={"x-edge-token": key.token()}).json() == {"sub": "user-42"}
        assert_401(c.get("/", headers=auth(key.token())), "missing x-edge-token header")


# -- missing header ---------------------------------------------------------------------------


def test_missing_header_required(client):
    assert_401(client.get("/me"), "missing x-outpost-identity header")


def test_missing_header_optional_returns_none(client):
    r = client.get("/maybe")
    assert r.status_code == 200
    assert r.json() == {"identity": None}


def test_optional_with_valid_header_returns_identity(client, key):
    r = client.get("/maybe", headers=auth(key.token()))
    assert r.status_code == 200
    assert r.json()["identity"]["sub"] == "user-42"


@pytest.mark.parametrize("value", ["", "garbage", "a.b.c"])
def test_optional_with_invalid_header_is_still_401(client, value):
    assert_401(client.get("/maybe", headers=auth(value)), "malformed x-outpost-identity token")


def test_optional_with_expired_header_is_still_401(client, key):
    now = int(time.time())
    assert_401(
        client.get("/maybe", headers=auth(key.token(iat=now - 600, nbf=now - 600, exp=now - 540))), "expired"
    )


def test_two_headers_are_refused(client, key):
    token = key.token()
    r = client.get("/me", headers=[("x-outpost-identity", token), ("x-outpost-identity", token)])
    assert_401(r, "more than one x-outpost-identity header")


# -- time, audience, issuer ------------------------------------------------------------------


def test_expired(client, key):
    now = int(time.time())
    assert_401(
        client.get("/me", headers=auth(key.token(iat=now - 120, nbf=now - 120, exp=now - 60))), "has expired"
    )


def test_expiry_within_leeway_is_accepted(client, key):
    now = int(time.time())
    r = client.get("/me", headers=auth(key.token(iat=now - 62, nbf=now - 62, exp=now - 2)))
    assert r.status_code == 200, r.text


def test_not_yet_valid_nbf(client, key):
    now = int(time.time())
    assert_401(client.get("/me", headers=auth(key.token(nbf=now + 60, exp=now + 120))), "not valid yet")


def test_not_yet_valid_iat(client, key):
    now = int(time.time())
    token = key.token(iat=now + 60, nbf=now + 60, exp=now + 120)
    assert_401(client.get("/me", headers=auth(token)), "not valid yet")


def test_small_clock_skew_is_accepted(client, key):
    now = int(time.time())
    r = client.get("/me", headers=auth(key.token(iat=now + 3, nbf=now + 3, exp=now + 63)))
    assert r.status_code == 200, r.text


def test_wrong_audience(client, key):
    assert_401(
        client.get("/me", headers=auth(key.token(aud="billing"))), "another audience (expected 'central')"
    )


def test_audience_list_is_refused(client, key):
    # The contract says aud is one string; a list (even one containing ours) is refused.
    assert_401(client.get("/me", headers=auth(key.token(aud=["central", "billing"]))), "audience")


def test_wrong_issuer(client, key):
    assert_401(client.get("/me", headers=auth(key.token(iss="evil"))), "wrong issuer (expected 'outpost')")


@pytest.mark.parametrize("claim", ["iss", "aud", "iat", "nbf", "exp"])
def test_required_claims(client, key, claim):
    assert_401(
        client.get("/me", headers=auth(key.token(**{claim: DROP}))), f"lacks the required '{claim}' claim"
    )


@pytest.mark.parametrize(
    "overrides, fragment",
    [
        ({"geo": {"lat": "35.6"}}, "geo.lat must be a number"),
        ({"geo": {"lon": True}}, "geo.lon must be a number"),
        ({"geo": {"country": 81}}, "geo.country must be a string"),
        ({"geo": "JP"}, "geo must be an object"),
        ({"claims": ["scope", "read"]}, "claims must be an object"),
        ({"variant": {"checkout": 2}}, "variant.checkout must be a string"),
        ({"node": 1}, "node must be a string"),
        ({"rid": 12345}, "rid must be a string"),
        ({"sub": 42}, "ubject"),  # PyJWT's own check of sub
        ({"exp": str(int(time.time()) + 60)}, "exp must be a number"),
        ({"iat": 1e20}, "not valid yet"),
        ({"exp": 1e20}, "exp is out of range"),
    ],
)
def test_malformed_claims_are_401(client, key, overrides, fragment):
    assert_401(client.get("/me", headers=auth(key.token(**overrides))), fragment)


# -- signature and algorithm ------------------------------------------------------------------


def test_bad_signature_other_key_same_kid(client, key):
    impostor = KeyPair(key.kid)
    assert_401(client.get("/me", headers=auth(impostor.token())), "bad signature")


def test_tampered_payload(client, key):
    h, _, s = key.token().split(".")
    forged = b64url(json.dumps(key.claims(sub="root")).encode())
    assert_401(client.get("/me", headers=auth(f"{h}.{forged}.{s}")), "bad signature")


def test_truncated_signature(client, key):
    assert_401(client.get("/me", headers=auth(key.token()[:-10])), "x-outpost-identity token")


def test_alg_none(client, key):
    header = b64url(json.dumps({"alg": "none", "typ": "JWT", "kid": key.kid}).encode())
    payload = b64url(json.dumps(key.claims()).encode())
    assert_401(
        client.get("/me", headers=auth(f"{header}.{payload}.")), "uses alg 'none'; only EdDSA is accepted"
    )
    # ... also with a (meaningless) signature segment attached
    valid_sig = key.token().split(".")[2]
    assert_401(client.get("/me", headers=auth(f"{header}.{payload}.{valid_sig}")), "alg 'none'")


@pytest.mark.parametrize("alg", ["None", "NONE", "eddsa", "Ed25519", "ES256", "RS256", None, 7])
def test_other_algs_are_refused(client, key, alg):
    token = key.raw_token({"alg": alg, "typ": "JWT", "kid": key.kid}, key.claims())
    assert_401(client.get("/me", headers=auth(token)), "only EdDSA is accepted")


def hs256_token(secret: bytes, kid: str, claims: dict) -> str:
    h = b64url(json.dumps({"alg": "HS256", "typ": "JWT", "kid": kid}).encode())
    p = b64url(json.dumps(claims).encode())
    sig = hmac.new(secret, f"{h}.{p}".encode(), hashlib.sha256).digest()
    return f"{h}.{p}.{b64url(sig)}"


@pytest.mark.parametrize("secret", ["raw", "x", "pem", "jwk"])
def test_alg_confusion_hs256_with_public_key(client, key, secret):
    material = {
        "raw": key.public_bytes,
        "x": key.jwk()["x"].encode(),
        "pem": key.public_pem,
        "jwk": json.dumps(key.jwk()).encode(),
    }[secret]
    token = hs256_token(material, key.kid, key.claims())
    assert_401(client.get("/me", headers=auth(token)), "uses alg 'HS256'; only EdDSA is accepted")


def test_missing_kid(client, key):
    token = key.raw_token({"alg": "EdDSA", "typ": "JWT"}, key.claims())
    assert_401(client.get("/me", headers=auth(token)), "has no kid")


@pytest.mark.parametrize("kid", ["", 7, None, ["edge-2026-01"], {"kid": "edge-2026-01"}])
def test_bad_kid_types(client, key, kid):
    token = key.raw_token({"alg": "EdDSA", "typ": "JWT", "kid": kid}, key.claims())
    assert_401(client.get("/me", headers=auth(token)), "has no kid")


def test_crit_header_is_refused(client, key):
    token = key.raw_token({"alg": "EdDSA", "typ": "JWT", "kid": key.kid, "crit": ["exp"]}, key.claims())
    assert_401(client.get("/me", headers=auth(token)), "critical header")


def test_raw_token_builder_matches_pyjwt(client, key):
    # Sanity check of the test helper used for the negative cases above.
    token = key.raw_token({"alg": "EdDSA", "typ": "JWT", "kid": key.kid}, key.claims())
    assert client.get("/me", headers=auth(token)).status_code == 200


# -- garbage never becomes a 500 ---------------------------------------------------------------


def _random_header_bytes(rng: random.Random, n: int) -> bytes:
    # Any byte a header value can carry (no CR, LF, NUL); the app sees them latin-1 decoded.
    allowed = [b for b in range(1, 256) if b not in (10, 13)]
    return bytes(rng.choice(allowed) for _ in range(n))


GARBAGE = [
    " ",
    ".",
    "..",
    "...",
    "a.b",
    "a.b.c.d",
    "Bearer abc.def.ghi",
    "eyJ.eyJ.eyJ",
    "=.=.=",
    "%%%.%%%.%%%",
    "a" * 100_000,
    ".".join(["a" * 5000] * 3),
    b64url(b"not json") + "." + b64url(b"{}") + ".",
    b64url(b"[1,2]") + "." + b64url(b"{}") + ".",
    b64url(b'"str"') + "." + b64url(b"{}") + ".",
    b64url(b"\xff\xfe") + "." + b64url(b"{}") + ".",
    b64url(b'{"alg":"EdDSA","kid":"edge-2026-01"}') + "." + b64url(b"not json") + "." + b64url(b"x" * 64),
    b64url(b"[" * 6000) + "." + b64url(b"{}") + ".",
    b64url(b'{"a":' * 1200) + "." + b64url(b"{}") + ".",
]


@pytest.mark.parametrize("value", GARBAGE, ids=[f"garbage{i}" for i in range(len(GARBAGE))])
def test_garbage_header_values_are_401(client, value):
    r = client.get("/me", headers=auth(value))
    assert r.status_code == 401, r.text
    assert r.json()["detail"]


def test_random_bytes_are_401(client):
    rng = random.Random(20260101)
    for n in [1, 2, 16, 100, 1000, 5000]:
        for _ in range(5):
            r = client.get("/me", headers=auth(_random_header_bytes(rng, n)))
            assert r.status_code == 401, (n, r.text)
    r = client.get(
        "/me", headers=auth(os.urandom(8192).replace(b"\r", b"").replace(b"\n", b"").replace(b"\0", b""))
    )
    assert r.status_code == 401


def test_huge_header_is_refused_without_parsing(client):
    r = client.get("/me", headers=auth("a" * 20_000 + "." + "b" * 20_000 + "." + "c" * 20_000))
    assert_401(r, "limit 8192")


@pytest.mark.parametrize(
    "payload",
    [
        b"not json",
        b"[1, 2, 3]",
        b'"just a string"',
        b"null",
        b"\xff\xfe\x00",
        b"",
        b'{"exp": ',
        b"[" * 6000,
        b'{"c":' * 1200,
    ],
)
def test_properly_signed_non_json_or_non_object_payload_is_401(client, key, payload):
    token = key.raw_token({"alg": "EdDSA", "typ": "JWT", "kid": key.kid}, payload)
    assert_401(client.get("/me", headers=auth(token)), "x-outpost-identity token")


@pytest.mark.parametrize("header", [[1, 2], "EdDSA", None, 3])
def test_properly_signed_non_object_header_is_401(client, key, header):
    token = key.raw_token(header, key.claims())
    assert_401(client.get("/me", headers=auth(token)), "malformed x-outpost-identity token")


# -- scopes and roles --------------------------------------------------------------------------


def test_require_scope_granted(client, key):
    r = client.post("/write", headers=auth(key.token()))
    assert r.status_code == 200
    assert r.json() == {"sub": "user-42"}


def test_require_scope_missing_is_403(client, key):
    r = client.post("/write", headers=auth(key.token(claims={"scope": "read"})))
    assert r.status_code == 403
    assert r.json()["detail"] == "missing required scope: write"


def test_require_scope_with_scp_list(client, key):
    assert client.post("/write", headers=auth(key.token(claims={"scp": ["write"]}))).status_code == 200


def test_require_scope_without_claims_is_403(client, key):
    assert client.post("/write", headers=auth(key.token(claims=DROP, sub=DROP))).status_code == 403


def test_require_several_scopes(client, key):
    r = client.post("/write-and-delete", headers=auth(key.token()))
    assert r.status_code == 403
    assert r.json()["detail"] == "missing required scope: delete"
    r = client.post("/write-and-delete", headers=auth(key.token(claims={"scope": "read"})))
    assert r.json()["detail"] == "missing required scopes: write delete"
    r = client.post("/write-and-delete", headers=auth(key.token(claims={"scope": "delete write"})))
    assert r.status_code == 200


def test_require_scope_still_authenticates(client, key):
    assert_401(client.post("/write"), "missing x-outpost-identity header")
    assert_401(client.post("/write", headers=auth(key.token(aud="billing"))), "audience")


def test_require_role(client, key):
    assert client.get("/admin", headers=auth(key.token())).status_code == 200
    r = client.get("/admin", headers=auth(key.token(claims={"roles": ["viewer"]})))
    assert r.status_code == 403
    assert r.json()["detail"] == "missing required role: admin"
    assert_401(client.get("/admin"), "missing")


def test_module_level_helpers(client, key):
    assert client.get("/fn/read", headers=auth(key.token())).json() == {"sub": "user-42"}
    assert client.get("/fn/read", headers=auth(key.token(claims={}))).status_code == 403
    r = client.get("/fn/auditor", headers=auth(key.token(claims={"roles": ["auditor"]})))
    assert r.status_code == 200
    r = client.get("/fn/auditor", headers=auth(key.token()))
    assert r.status_code == 403
    assert r.json()["detail"] == "missing required role: auditor"
    # After an optional identity dependency: no header -> 401, not a crash.
    assert_401(client.get("/fn/optional-write"), "missing x-outpost-identity header")
    assert client.get("/fn/optional-write", headers=auth(key.token())).status_code == 200


def test_module_level_helper_without_identity_dependency_is_a_programming_error(client, key):
    with pytest.raises(RuntimeError, match="needs an OutpostIdentity dependency"):
        client.get("/fn/misconfigured", headers=auth(key.token()))


def test_require_helpers_validate_arguments(edge):
    with pytest.raises(ValueError):
        edge.require_scope()
    with pytest.raises(ValueError):
        edge.require_role("")


# -- verify() directly ---------------------------------------------------------------------------


async def _verify(edge: OutpostIdentity, token: str):
    return await edge.verify(token)


def test_verify_outside_fastapi(edge, key):
    import asyncio

    identity = asyncio.run(_verify(edge, key.token()))
    assert identity.sub == "user-42"
    with pytest.raises(IdentityError) as info:
        asyncio.run(_verify(edge, key.token(aud="nope")))
    assert info.value.status_code == 401
    assert info.value.reason == "audience"


def test_app_can_be_built_twice(edge):
    # make_app creates dependencies from the same OutpostIdentity; nothing global is mutated.
    make_app(edge)
    make_app(edge)


def test_openapi_schema_builds(edge):
    # The dependencies take the Request; they must not leak parameters into the schema.
    schema = make_app(edge).openapi()
    assert schema["paths"]["/me"]["get"].get("parameters", []) == []
