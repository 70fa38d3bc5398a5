"""Tests for the end-to-end test origin (run: .venv/bin/python -m pytest crates/outpost/tests/origin)."""

from __future__ import annotations

import hashlib
import struct
import zlib

import pytest
from fastapi.testclient import TestClient

import echo_app


@pytest.fixture
def client():
    echo_app.healthy = True
    echo_app.hits.update(healthz=0, total=0)
    with TestClient(echo_app.app) as client:
        yield client
    echo_app.healthy = True


def pattern(n: int) -> bytes:
    return bytes(i % 251 for i in range(n))


def test_echo_keeps_duplicate_headers_in_order(client):
    r = client.post(
        "/echo/a/b%20c?x=1&x=2",
        headers=[("X-Dup", "one"), ("X-Other", "mid"), ("X-Dup", "two")],
        content=b"hello",
    )
    assert r.status_code == 200
    assert r.headers["x-origin-region"] == echo_app.REGION
    body = r.json()
    assert body["method"] == "POST"
    assert body["path"] == "/echo/a/b c"
    assert body["raw_path"] == "/echo/a/b%20c"
    assert body["query"] == "x=1&x=2"
    assert body["body_len"] == 5
    assert body["body_sha256"] == hashlib.sha256(b"hello").hexdigest()
    assert body["region"] == echo_app.REGION
    names = [name for name, _ in body["headers"]]
    assert all(name == name.lower() for name in names)
    custom = [h for h in body["headers"] if h[0].startswith("x-")]
    assert custom == [["x-dup", "one"], ["x-other", "mid"], ["x-dup", "two"]]


@pytest.mark.parametrize("method", ["GET", "PUT", "PATCH", "DELETE", "OPTIONS"])
def test_echo_methods(client, method):
    r = client.request(method, "/echo")
    assert r.status_code == 200
    assert r.json()["method"] == method
    assert r.json()["body_len"] == 0


def test_echo_head_has_no_body(client):
    r = client.head("/echo/x")
    assert r.status_code == 200
    assert r.content == b""


@pytest.mark.parametrize("n", [0, 1, 250, 251, 252, 65536, 65537, 3 * 65536 + 17])
def test_bytes(client, n):
    r = client.get(f"/bytes/{n}")
    assert r.status_code == 200
    assert r.headers["content-type"] == "application/octet-stream"
    assert r.headers["content-length"] == str(n)
    assert r.content == pattern(n)


def test_bytes_rejects_negative(client):
    assert client.get("/bytes/-1").status_code == 422


def test_upload_hash(client):
    data = pattern(1_000_003)
    for method in ("POST", "PUT"):
        r = client.request(method, "/upload", content=data)
        assert r.status_code == 200
        assert r.json() == {"len": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def test_upload_streamed_chunks(client):
    chunks = [b"a" * 1000, b"b" * 70000, b"c"]
    r = client.post("/upload", content=iter(chunks))
    joined = b"".join(chunks)
    assert r.json() == {"len": len(joined), "sha256": hashlib.sha256(joined).hexdigest()}


def test_slow(client):
    assert client.get("/slow?ms=5").json() == {"slept_ms": 5}
    r = client.get("/slow-body?ms=5")
    assert r.content == b"start\nend\n"


@pytest.mark.parametrize("code", [200, 201, 404, 418, 500, 502, 503])
def test_status_with_body(client, code):
    r = client.get(f"/status/{code}")
    assert r.status_code == code
    assert r.json() == {"status": code}
    assert r.headers["x-origin-region"] == echo_app.REGION


@pytest.mark.parametrize("code", [204, 304])
def test_status_without_body(client, code):
    r = client.get(f"/status/{code}")
    assert r.status_code == code
    assert r.content == b""


def test_response_headers_repeat(client):
    r = client.get("/response-headers?X-A=1&X-A=2&Cache-Control=no-store")
    assert r.headers.get_list("x-a") == ["1", "2"]
    assert r.headers["cache-control"] == "no-store"


def test_health_flip_and_hits(client):
    r = client.get("/healthz")
    assert r.status_code == 200
    assert r.json() == {"ok": True, "region": echo_app.REGION}

    assert client.post("/control/health", json={"healthy": False}).json() == {"healthy": False}
    r = client.get("/healthz")
    assert r.status_code == 503
    assert r.json()["ok"] is False
    assert r.headers["x-origin-region"] == echo_app.REGION

    assert client.post("/control/health", json={"healthy": True}).status_code == 200
    assert client.get("/healthz").status_code == 200
    assert client.post("/control/health", json={"healthy": "maybe"}).status_code == 422

    # 3 healthz + 3 control/health + this request
    assert client.get("/control/hits").json() == {"healthz": 3, "total": 7, "slow_in_flight": 0}
    assert client.post("/control/hits/reset").json() == {"healthz": 0, "total": 0, "slow_in_flight": 0}


def test_bytes_head(client):
    r = client.head("/bytes/1073741824")
    assert r.status_code == 200
    assert r.headers["content-length"] == "1073741824"
    assert r.content == b""


def test_cacheable_resource_sets_headers_counts_and_answers_304(client):
    r = client.get("/cache/doc", params={"cc": "max-age=60", "etag": '"v1"', "tag": "a b"})
    assert r.status_code == 200
    assert r.headers["cache-control"] == "max-age=60"
    assert r.headers["surrogate-key"] == "a b"
    assert r.json()["n"] == 1
    r = client.get("/cache/doc", params={"etag": '"v1"'}, headers={"if-none-match": '"v1"'})
    assert r.status_code == 304
    assert client.post("/cache/doc").json() == {"changed": "doc"}
    assert client.get("/control/count/doc").json() == {"n": 3}


def _png_chunks(data: bytes) -> list[tuple[bytes, bytes]]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    chunks, pos = [], 8
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length : pos + 12 + length])
        assert crc == zlib.crc32(kind + body)
        chunks.append((kind, body))
        pos += 12 + length
    return chunks


def test_images_png_is_a_deterministic_gradient_and_counted(client):
    echo_app.image_counts.clear()
    r = client.get("/images/cat.png")
    assert r.status_code == 200
    assert r.headers["content-type"] == "image/png"
    assert r.headers["cache-control"] == "public, max-age=60"
    assert r.headers["x-origin-region"] == echo_app.REGION
    assert client.get("/images/other.png").content == r.content  # same bytes every time

    chunks = _png_chunks(r.content)
    assert [kind for kind, _ in chunks] == [b"IHDR", b"IDAT", b"IEND"]
    width, height, depth, colour, _, _, interlace = struct.unpack(">IIBBBBB", chunks[0][1])
    assert (width, height, depth, colour, interlace) == (64, 48, 8, 2, 0)
    raw = zlib.decompress(chunks[1][1])
    stride = 1 + 3 * width
    assert len(raw) == height * stride
    pixel = lambda x, y: tuple(raw[y * stride + 1 + 3 * x : y * stride + 4 + 3 * x])  # noqa: E731
    assert pixel(0, 0) == (0, 0, 128)
    assert pixel(63, 0) == (255, 0, 128)
    assert pixel(0, 47) == (0, 255, 128)

    assert client.get("/control/count/images/cat.png").json() == {"n": 1}
    assert client.get("/control/count/images/other.png").json() == {"n": 1}


@pytest.mark.parametrize("name", ["cat.jpg", "cat", "cat.png.txt"])
def test_images_unknown_extension_is_404(client, name):
    r = client.get(f"/images/{name}")
    assert r.status_code == 404
    assert client.get(f"/control/count/images/{name}").json()["n"] >= 1


def test_ws_echo(client):
    with client.websocket_connect("/ws/echo?x=1", subprotocols=["chat", "other"]) as ws:
        assert ws.accepted_subprotocol == "chat"
        hello = ws.receive_json()
        assert hello["path"] == "/ws/echo"
        assert hello["query"] == "x=1"
        assert hello["region"] == "test"
        ws.send_text("héllo")
        assert ws.receive_text() == "héllo"
        ws.send_bytes(b"\x00\x01\xff")
        assert ws.receive_bytes() == b"\x00\x01\xff"
        ws.send_text("bye")
        closed = ws.receive()
        assert closed["type"] == "websocket.close"
        assert closed["code"] == 4000
