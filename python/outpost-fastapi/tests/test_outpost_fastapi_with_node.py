"""outpost-fastapi against identities minted by a REAL Outpost node.

Starts, on free loopback ports, the FastAPI app in ``node_app.py`` (uvicorn subprocess, verifying
``x-outpost-identity`` against the node's JWKS) and an ``outpost serve`` node in front of it, then
drives requests through the node with httpx: end-user EdDSA tokens signed with the repo's test
key (``crates/outpost-guard/tests/keys/ed.key``) are validated by the node, which forwards its own
signed identity to the app.

The node binary: ``$OUTPOST_BIN``, else ``$CARGO_TARGET_DIR/debug/outpost``, else
``<repo>/target/debug/outpost``. When it is missing the module is skipped, unless
``OUTPOST_REQUIRE_NODE`` is set (non-empty), in which case it fails (``scripts/test`` sets it).
"""

from __future__ import annotations

import base64
import json
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

TESTS_DIR = Path(__file__).resolve().parent
REPO = TESTS_DIR.parents[2]
KEYS_DIR = REPO / "crates" / "outpost-guard" / "tests" / "keys"
USER_KEY = KEYS_DIR / "ed.key"  # signs end-user tokens (PEM, PKCS#8)
USER_PUB = KEYS_DIR / "ed.pub"  # what the node validates them with
NODE_ID = "pytest-node"
AUDIENCE = "central"
JWKS_PATH = "/.well-known/outpost/jwks.json"
START_TIMEOUT = 30.0  # seconds for each process to become ready
POLL = 0.05


# ---------------------------------------------------------------------------------------------
# Binary, ports, processes
# ---------------------------------------------------------------------------------------------


def node_binary() -> Path:
    """The outpost binary to test, or skip/fail (see the module docstring) when it is missing."""
    if os.environ.get("OUTPOST_BIN"):
        candidate = Path(os.environ["OUTPOST_BIN"])
        source = "$OUTPOST_BIN"
    elif os.environ.get("CARGO_TARGET_DIR"):
        candidate = Path(os.environ["CARGO_TARGET_DIR"]) / "debug" / "outpost"
        source = "$CARGO_TARGET_DIR/debug/outpost"
    else:
        candidate = REPO / "target" / "debug" / "outpost"
        source = "<repo>/target/debug/outpost"
    if candidate.is_file() and os.access(candidate, os.X_OK):
        return candidate.resolve()
    message = (
        f"Outpost node binary not found at {candidate} ({source}); build it with "
        "`cargo build -p outpost` or point OUTPOST_BIN at it"
    )
    if os.environ.get("OUTPOST_REQUIRE_NODE"):
        pytest.fail(f"{message} (OUTPOST_REQUIRE_NODE is set, so this is an error)", pytrace=False)
    pytest.skip(message)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path

    def output(self) -> str:
        try:
            return self.log.read_text(errors="replace")[-4000:]
        except OSError:
            return "<no log>"

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(timeout=10)


def spawn(name: str, argv: list[str], log: Path, env: dict[str, str] | None = None) -> Proc:
    with log.open("wb") as out:  # the child keeps its own copy of the descriptor
        popen = subprocess.Popen(
            argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env
        )
    return Proc(name, popen, log)


def wait_ready(proc: Proc, url: str) -> None:
    """Poll ``url`` until it answers 200; fail early if the process dies, or at the deadline."""
    deadline = time.monotonic() + START_TIMEOUT
    last: object = None
    with httpx.Client(trust_env=False, timeout=1.0) as client:
        while True:
            if proc.popen.poll() is not None:
                pytest.fail(
                    f"{proc.name} exited with {proc.popen.returncode} before {url} was ready:\n"
                    f"{proc.output()}",
                    pytrace=False,
                )
            try:
                r = client.get(url)
                if r.status_code == 200:
                    return
                last = f"HTTP {r.status_code}: {r.text[:200]}"
            except httpx.HTTPError as e:
                last = repr(e)
            if time.monotonic() > deadline:
                pytest.fail(
                    f"{proc.name} not ready at {url} after {START_TIMEOUT}s (last: {last}):\n"
                    f"{proc.output()}",
                    pytrace=False,
                )
            time.sleep(POLL)


NODE_CONFIG = """\
version = 1
[node]
id = "{node_id}"
location = {{ lat = 35.68, lon = 139.69 }}
[[listeners]]
addr = "127.0.0.1:{node_port}"
[admin]
addr = "127.0.0.1:{admin_port}"
[client_location]
trusted_proxies = ["127.0.0.0/8"]

[[experiments]]
name = "checkout"
variants = [{{ name = "a", weight = 50 }}, {{ name = "b", weight = 50 }}]

[origins.central]
[[origins.central.endpoints]]
url = "http://127.0.0.1:{app_port}"
region = "test"
location = {{ lat = 35.0, lon = 139.0 }}

[[routes]]
name = "api"
path_prefix = "/"
origin = "central"
forward_identity = true
experiments = ["checkout"]
[routes.auth]
mode = "optional"
algorithms = ["EdDSA"]
key_files = [{user_pub}]
forward_claims = ["scope", "email"]
"""


@dataclass
class Stack:
    node_url: str  # the node's listener: requests go through the edge
    app_url: str  # the FastAPI app directly, bypassing the edge
    admin_url: str


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    binary = node_binary()
    tmp = tmp_path_factory.mktemp("outpost-node")
    procs: list[Proc] = []
    try:
        # The node's port first: the app needs the JWKS URL when it starts.
        node_port = free_port()
        admin_port = free_port()
        app_port = free_port()
        node_url = f"http://127.0.0.1:{node_port}"
        app_url = f"http://127.0.0.1:{app_port}"
        admin_url = f"http://127.0.0.1:{admin_port}"

        env = dict(os.environ)
        env["OUTPOST_JWKS_URL"] = node_url + JWKS_PATH
        env["OUTPOST_AUDIENCE"] = AUDIENCE
        env["NO_PROXY"] = env["no_proxy"] = "127.0.0.1,localhost"
        app = spawn(
            "uvicorn (node_app)",
            [
                sys.executable, "-m", "uvicorn", "node_app:app",
                "--app-dir", str(TESTS_DIR),
                "--host", "127.0.0.1", "--port", str(app_port),
                "--log-level", "warning",
            ],
            tmp / "app.log",
            env,
        )
        procs.append(app)
        wait_ready(app, app_url + "/healthz")

        config = tmp / "outpost.toml"
        config.write_text(
            NODE_CONFIG.format(
                node_id=NODE_ID,
                node_port=node_port,
                admin_port=admin_port,
                app_port=app_port,
                user_pub=json.dumps(str(USER_PUB)),  # a TOML basic string
            )
        )
        node = spawn(
            "outpost node", [str(binary), "serve", "--config", str(config)], tmp / "node.log"
        )
        procs.append(node)
        wait_ready(node, admin_url + "/readyz")

        yield Stack(node_url=node_url, app_url=app_url, admin_url=admin_url)
    finally:
        for proc in reversed(procs):
            proc.stop()


# ---------------------------------------------------------------------------------------------
# Tokens and requests
# ---------------------------------------------------------------------------------------------


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def user_token(
    sub: str = "user-42",
    scope: str = "read",
    email: str = "user42@example.com",
    *,
    key: Any = None,
    exp_in: int = 300,
) -> str:
    """An end user's token as the node expects it: EdDSA, signed by the test key by default."""
    claims = {"sub": sub, "exp": int(time.time()) + exp_in, "scope": scope, "email": email}
    return jwt.encode(claims, key if key is not None else USER_KEY.read_bytes(), algorithm="EdDSA")


def edge_claims(**overrides: Any) -> dict[str, Any]:
    """A well-formed identity claim set, for forging ``x-outpost-identity`` headers."""
    now = int(time.time())
    claims = {
        "iss": "outpost",
        "aud": AUDIENCE,
        "iat": now,
        "nbf": now,
        "exp": now + 60,
        "node": "mallory-node",
        "rid": "0" * 32,
        "sub": "mallory",
        "claims": {"scope": "admin"},
        "geo": {"country": "XX", "source": "header"},
        "variant": {"checkout": "b"},
    }
    claims.update(overrides)
    return claims


def forged_with_fresh_key(kid: str) -> str:
    return jwt.encode(
        edge_claims(), Ed25519PrivateKey.generate(), algorithm="EdDSA", headers={"kid": kid}
    )


def forged_alg_none(kid: str) -> str:
    header = {"alg": "none", "typ": "JWT", "kid": kid}
    return f"{b64url(json.dumps(header).encode())}.{b64url(json.dumps(edge_claims()).encode())}."


def get(
    url: str,
    *,
    token: str | None = None,
    headers: dict[str, str] | None = None,
    cookies: dict[str, str] | None = None,
) -> httpx.Response:
    """One request on a fresh client, so that no cookie carries over between requests."""
    h = dict(headers or {})
    if token is not None:
        h["authorization"] = f"Bearer {token}"
    with httpx.Client(trust_env=False, timeout=10.0, cookies=cookies) as client:
        return client.get(url, headers=h)


def ab_cookie(r: httpx.Response, name: str = "checkout") -> str | None:
    for value in r.headers.get_list("set-cookie"):
        m = re.match(rf"\s*outpost_ab_{name}=([^;]*)", value)
        if m:
            return m.group(1)
    return None


@pytest.fixture(scope="module")
def node_kid(stack: Stack) -> str:
    r = get(stack.node_url + JWKS_PATH)
    assert r.status_code == 200, r.text
    keys = r.json()["keys"]
    assert keys and all(k["kty"] == "OKP" and k["crv"] == "Ed25519" for k in keys)
    return keys[0]["kid"]


# ---------------------------------------------------------------------------------------------
# Through the node
# ---------------------------------------------------------------------------------------------


def test_whoami_with_a_user_token(stack: Stack) -> None:
    r = get(stack.node_url + "/whoami", token=user_token(scope="read write", email="a@example.com"))
    assert r.status_code == 200, r.text
    ident = r.json()

    assert ident["sub"] == "user-42"
    assert ident["node"] == NODE_ID
    assert re.fullmatch(r"[0-9a-f]{32}", ident["request_id"])
    assert ident["request_id"] == r.headers["x-request-id"]
    assert ident["claims"] == {"scope": "read write", "email": "a@example.com"}

    assert set(ident["variants"]) == {"checkout"}
    assert ident["variants"]["checkout"] in {"a", "b"}
    assert ab_cookie(r) == ident["variants"]["checkout"], r.headers.get_list("set-cookie")

    raw = ident["raw"]
    assert raw["iss"] == "outpost"
    assert raw["aud"] == AUDIENCE
    assert raw["exp"] > raw["iat"]
    # No location header and a loopback client: the node falls back to where it stands.
    assert (ident["geo_source"], ident["country"]) == ("node", None)
    assert (ident["lat"], ident["lon"]) == (35.68, 139.69)


def test_each_request_gets_its_own_request_id(stack: Stack) -> None:
    ids = set()
    for _ in range(3):
        r = get(stack.node_url + "/whoami", token=user_token())
        assert r.status_code == 200, r.text
        assert r.json()["request_id"] == r.headers["x-request-id"]
        ids.add(r.json()["request_id"])
    assert len(ids) == 3


@pytest.mark.parametrize("variant", ["a", "b"])
def test_variant_cookie_pins_the_identity_variant(stack: Stack, variant: str) -> None:
    r = get(
        stack.node_url + "/whoami",
        token=user_token(),
        cookies={"outpost_ab_checkout": variant},
    )
    assert r.status_code == 200, r.text
    assert r.json()["variants"] == {"checkout": variant}
    assert ab_cookie(r) is None  # already pinned: nothing to set


def test_country_header_reaches_the_identity(stack: Stack) -> None:
    r = get(stack.node_url + "/whoami", token=user_token(), headers={"x-user-country": "DE"})
    assert r.status_code == 200, r.text
    assert r.json()["country"] == "DE"
    assert r.json()["geo_source"] == "country"


def test_anonymous_requests_still_carry_an_identity(stack: Stack) -> None:
    r = get(stack.node_url + "/maybe")
    assert r.status_code == 200, r.text
    assert r.json() == {"anonymous": False}

    r = get(stack.node_url + "/whoami")
    assert r.status_code == 200, r.text
    ident = r.json()
    assert ident["sub"] is None
    assert ident["claims"] == {}
    assert ident["node"] == NODE_ID
    assert ident["request_id"] == r.headers["x-request-id"]
    assert ident["variants"]["checkout"] in {"a", "b"}


@pytest.mark.parametrize(
    ("scope", "status"), [("read", 403), ("read write", 403), ("admin", 200), ("read admin", 200)]
)
def test_admin_requires_the_admin_scope(stack: Stack, scope: str, status: int) -> None:
    r = get(stack.node_url + "/admin", token=user_token(scope=scope))
    assert r.status_code == status, r.text
    if status == 200:
        assert r.json() == {"admin": True, "sub": "user-42"}
    else:
        assert r.json()["detail"] == "missing required scope: admin"


def test_admin_is_forbidden_to_anonymous_requests(stack: Stack) -> None:
    assert get(stack.node_url + "/admin").status_code == 403


@pytest.mark.parametrize("forge", [forged_with_fresh_key, forged_alg_none, lambda kid: "garbage"])
def test_client_sent_identity_is_replaced_by_the_node(
    stack: Stack, node_kid: str, forge: Callable[[str], str]
) -> None:
    forged = {"x-outpost-identity": forge(node_kid)}

    r = get(stack.node_url + "/whoami", token=user_token(scope="read"), headers=forged)
    assert r.status_code == 200, r.text
    assert r.json()["sub"] == "user-42"
    assert r.json()["node"] == NODE_ID

    # Even without a user token: the app sees the node's anonymous identity, not the forged one.
    r = get(stack.node_url + "/whoami", headers=forged)
    assert r.status_code == 200, r.text
    assert r.json()["sub"] is None
    assert r.json()["node"] == NODE_ID

    r = get(stack.node_url + "/admin", token=user_token(scope="read"), headers=forged)
    assert r.status_code == 403, r.text


@pytest.mark.parametrize(
    "token",
    [
        pytest.param(lambda: "not-a-jwt", id="garbage"),
        pytest.param(lambda: user_token(key=Ed25519PrivateKey.generate()), id="unknown-key"),
        pytest.param(lambda: user_token(exp_in=-3600), id="expired"),
    ],
)
def test_invalid_user_token_is_refused_by_the_node(stack: Stack, token: Callable[[], str]) -> None:
    r = get(stack.node_url + "/whoami", token=token())
    assert r.status_code == 401, r.text
    # The node's RFC 6750 challenge, not the app's (which would be `Outpost-Identity`).
    assert r.headers["www-authenticate"].startswith('Bearer error="invalid_token"'), r.headers


# ---------------------------------------------------------------------------------------------
# Directly to the app, bypassing the node
# ---------------------------------------------------------------------------------------------


def test_direct_request_without_identity_is_refused(stack: Stack) -> None:
    r = get(stack.app_url + "/whoami")
    assert r.status_code == 401
    assert r.headers["www-authenticate"] == "Outpost-Identity"
    assert get(stack.app_url + "/maybe").json() == {"anonymous": True}


@pytest.mark.parametrize(
    ("forge", "detail"),
    [
        (forged_with_fresh_key, "bad signature"),
        (lambda kid: forged_with_fresh_key("made-up-kid"), "unknown key id"),
        (forged_alg_none, "alg 'none'"),
    ],
)
def test_direct_request_with_forged_identity_is_refused(
    stack: Stack, node_kid: str, forge: Callable[[str], str], detail: str
) -> None:
    forged = {"x-outpost-identity": forge(node_kid)}
    for path in ["/whoami", "/admin", "/maybe"]:
        r = get(stack.app_url + path, headers=forged)
        assert r.status_code == 401, (path, r.text)
        assert r.headers["www-authenticate"] == "Outpost-Identity"
        assert detail in r.json()["detail"]
