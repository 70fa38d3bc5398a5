"""Fixtures for the outpost-fastapi tests (helpers live in outpost_fastapi_testkit)."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient
from outpost_fastapi_testkit import AUDIENCE, FakeClock, JWKSServer, KeyPair, make_app

from outpost_fastapi import OutpostIdentity


@pytest.fixture
def key() -> KeyPair:
    return KeyPair("edge-2026-01")


@pytest.fixture
def jwks_server(key: KeyPair):
    server = JWKSServer()
    server.publish(key)
    yield server
    server.stop()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def edge(jwks_server: JWKSServer, clock: FakeClock) -> OutpostIdentity:
    dep = OutpostIdentity(jwks_server.url, AUDIENCE, timeout=2)
    dep.keys.clock = clock
    return dep


@pytest.fixture
def client(edge: OutpostIdentity):
    with TestClient(make_app(edge)) as c:
        yield c
