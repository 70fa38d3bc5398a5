"""Test origin for Outpost's end-to-end tests.

The Rust tests start it on a socket they bound themselves, passed as fd 3::

    <venv>/bin/python -m uvicorn --app-dir crates/outpost/tests/origin echo_app:app \
        --fd 3 --log-level warning --no-access-log

Environment: ``REGION`` (default ``test``) names the origin; every response
carries it in an ``X-Origin-Region`` header.

Endpoints
---------
``/echo`` and ``/echo/{path}`` (GET HEAD POST PUT PATCH DELETE OPTIONS)
    JSON description of the request as the origin saw it: method, path,
    raw_path, query, headers (ordered ``[name, value]`` pairs, duplicates
    kept), body_len, body_sha256, region. The body is hashed as it streams.
``POST|PUT /upload``
    Streams the body; returns ``{"len": n, "sha256": hex}``.
``GET|HEAD /bytes/{n}``
    Exactly ``n`` bytes with ``Content-Length: n``; byte ``i`` is ``i % 251``.
    Generated lazily in 64 KiB chunks, so ``n`` may be huge.
``GET /slow?ms=N``
    Sleeps N ms, then answers ``{"slept_ms": N}``.
``GET /slow-body?ms=N``
    Sends ``start\\n`` at once, sleeps N ms, then sends ``end\\n``.
``GET /status/{code}``
    Answers with that status (200-599); JSON ``{"status": code}`` when the
    status allows a body.
``GET /response-headers?Name=value&...``
    Adds each query parameter as a response header (repeats kept).
``GET|POST|PUT|DELETE /cache/{name}``
    A cacheable resource whose headers the query sets: ``cc``
    (Cache-Control), ``etag``, ``lm`` (Last-Modified), ``tag``
    (Surrogate-Key), ``vary``, ``status``, and ``ms`` (delay before the
    head). Answers ``304`` when ``If-None-Match`` equals ``etag``. The JSON
    body is ``{"name", "n", "lang"}`` where ``n`` counts the requests for
    ``name`` (so a test sees which fetch produced a response) and ``lang`` is
    the request's ``Accept-Language``. Unsafe methods answer
    ``{"changed": name}``.
``GET /control/count/{name}``
    ``{"n": n}``: requests ``/cache/{name}`` received, any method.
``GET /images/{name}``
    For a name ending in ``.png``: the same deterministic 64x48 RGB gradient
    PNG (built with zlib + struct only) with ``Content-Type: image/png`` and
    ``Cache-Control: public, max-age=60``; any other name is 404. The source
    images of the resize guest function (examples/functions/resize).
``GET /control/count/images/{name}``
    ``{"n": n}``: requests ``/images/{name}`` received.
``WebSocket /ws/echo``
    Accepts (echoing the first subprotocol offered, if any), sends one text
    message, the JSON ``{"path", "query", "headers", "region"}`` of the
    handshake as the origin saw it, then echoes every text and binary
    message until the client closes; ``bye`` makes the origin close with
    code 4000.
``GET /healthz``
    200 ``{"ok": true, "region": R}``, or 503 while marked unhealthy.
``POST /control/health`` ``{"healthy": bool}``
    Marks the origin healthy or unhealthy.
``GET /control/hits``
    ``{"healthz": n, "total": n, "slow_in_flight": n}``: requests seen since
    start (or the last ``POST /control/hits/reset``), this one included, and
    ``/slow`` requests currently sleeping (what tests wait on to know a request
    is in flight).
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import os
import struct
import zlib
from collections.abc import AsyncIterator

from fastapi import FastAPI, Path, Query, Request, Response, WebSocket, WebSocketDisconnect
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel
from starlette.types import ASGIApp, Message, Receive, Scope, Send

REGION = os.environ.get("REGION", "test")

CHUNK = 64 * 1024
_PERIOD = 251
# Any CHUNK-long window of the i % 251 sequence is a slice of this buffer.
_PATTERN = bytes(i % _PERIOD for i in range(CHUNK + _PERIOD))

healthy = True
hits = {"healthz": 0, "total": 0, "slow_in_flight": 0}


class OriginMiddleware:
    """Counts requests and adds ``X-Origin-Region`` to every response.

    Plain ASGI (not ``@app.middleware``) so request and response bodies
    stream through untouched.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        hits["total"] += 1
        if scope["path"] == "/healthz":
            hits["healthz"] += 1

        region = REGION.encode("latin-1")

        async def send_with_region(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), (b"x-origin-region", region)]
            await send(message)

        await self.app(scope, receive, send_with_region)


app = FastAPI(title="outpost test origin")
app.add_middleware(OriginMiddleware)


async def _digest(request: Request) -> tuple[int, str]:
    """Length and sha256 of the request body, read as it streams."""
    n = 0
    sha = hashlib.sha256()
    async for chunk in request.stream():
        n += len(chunk)
        sha.update(chunk)
    return n, sha.hexdigest()


ECHO_METHODS = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]


@app.api_route("/echo", methods=ECHO_METHODS)
@app.api_route("/echo/{path:path}", methods=ECHO_METHODS)
async def echo(request: Request) -> dict:
    body_len, body_sha256 = await _digest(request)
    scope = request.scope
    return {
        "method": request.method,
        "path": request.url.path,
        "raw_path": scope.get("raw_path", b"").decode("latin-1"),
        "query": request.url.query,
        "headers": [[k.decode("latin-1"), v.decode("latin-1")] for k, v in scope["headers"]],
        "body_len": body_len,
        "body_sha256": body_sha256,
        "region": REGION,
    }


@app.api_route("/upload", methods=["POST", "PUT"])
async def upload(request: Request) -> dict:
    n, sha256 = await _digest(request)
    return {"len": n, "sha256": sha256}


async def _pattern_bytes(n: int) -> AsyncIterator[bytes]:
    offset = 0
    while offset < n:
        size = min(CHUNK, n - offset)
        start = offset % _PERIOD
        yield _PATTERN[start : start + size]
        offset += size


@app.api_route("/bytes/{n}", methods=["GET", "HEAD"])
async def pattern_bytes(request: Request, n: int = Path(ge=0)) -> Response:
    if request.method == "HEAD":
        return Response(media_type="application/octet-stream", headers={"content-length": str(n)})
    return StreamingResponse(
        _pattern_bytes(n),
        media_type="application/octet-stream",
        headers={"content-length": str(n)},
    )


cache_counts: dict[str, int] = {}


@app.api_route("/cache/{name}", methods=["GET", "POST", "PUT", "DELETE"])
async def cacheable(request: Request, name: str) -> Response:
    cache_counts[name] = cache_counts.get(name, 0) + 1
    if request.method != "GET":
        return JSONResponse({"changed": name})
    q = request.query_params
    if "ms" in q:
        await asyncio.sleep(int(q["ms"]) / 1000)
    headers = {}
    for param, header in (
        ("cc", "cache-control"),
        ("etag", "etag"),
        ("lm", "last-modified"),
        ("tag", "surrogate-key"),
        ("vary", "vary"),
    ):
        if param in q:
            headers[header] = q[param]
    if "etag" in q and request.headers.get("if-none-match") == q["etag"]:
        return Response(status_code=304, headers=headers)
    body = {"name": name, "n": cache_counts[name], "lang": request.headers.get("accept-language")}
    return JSONResponse(body, status_code=int(q.get("status", "200")), headers=headers)


@app.get("/control/count/{name}")
async def cache_count(name: str) -> dict:
    return {"n": cache_counts.get(name, 0)}


IMAGE_WIDTH, IMAGE_HEIGHT = 64, 48
image_counts: dict[str, int] = {}


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


@functools.cache
def gradient_png(width: int = IMAGE_WIDTH, height: int = IMAGE_HEIGHT) -> bytes:
    """An 8-bit RGB PNG: red grows left to right, green top to bottom, blue 128."""
    rows = bytearray()
    for y in range(height):
        rows.append(0)  # filter type: none
        g = y * 255 // max(height - 1, 1)
        for x in range(width):
            rows += bytes((x * 255 // max(width - 1, 1), g, 128))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit truecolour
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", header)
        + _png_chunk(b"IDAT", zlib.compress(bytes(rows), 9))
        + _png_chunk(b"IEND", b"")
    )


@app.get("/images/{name}")
async def image(name: str) -> Response:
    image_counts[name] = image_counts.get(name, 0) + 1
    if not name.endswith(".png"):
        return JSONResponse({"error": "not found", "name": name}, status_code=404)
    return Response(
        gradient_png(),
        media_type="image/png",
        headers={"cache-control": "public, max-age=60"},
    )


@app.get("/control/count/images/{name}")
async def image_count(name: str) -> dict:
    return {"n": image_counts.get(name, 0)}


@app.get("/slow")
async def slow(ms: int = Query(0, ge=0)) -> dict:
    hits["slow_in_flight"] += 1
    try:
        await asyncio.sleep(ms / 1000)
    finally:
        hits["slow_in_flight"] -= 1
    return {"slept_ms": ms}


@app.get("/slow-body")
async def slow_body(ms: int = Query(0, ge=0)) -> StreamingResponse:
    async def body() -> AsyncIterator[bytes]:
        yield b"start\n"
        await asyncio.sleep(ms / 1000)
        yield b"end\n"

    return StreamingResponse(body(), media_type="text/plain")


@app.get("/status/{code}")
async def status(code: int = Path(ge=200, le=599)) -> Response:
    if code in (204, 304):
        return Response(status_code=code)
    return JSONResponse({"status": code}, status_code=code)


@app.get("/response-headers")
async def response_headers(request: Request) -> Response:
    items = request.query_params.multi_items()
    response = JSONResponse([[k, v] for k, v in items])
    for name, value in items:
        response.headers.append(name, value)
    return response


@app.websocket("/ws/echo")
async def ws_echo(ws: WebSocket) -> None:
    offered = [p.strip() for p in ws.headers.get("sec-websocket-protocol", "").split(",") if p.strip()]
    await ws.accept(subprotocol=offered[0] if offered else None)
    await ws.send_json(
        {
            "path": ws.url.path,
            "query": ws.url.query,
            "headers": [[k.decode("latin-1"), v.decode("latin-1")] for k, v in ws.scope["headers"]],
            "region": REGION,
        }
    )
    try:
        while True:
            message = await ws.receive()
            if message["type"] == "websocket.disconnect":
                return
            if message.get("text") == "bye":
                await ws.close(code=4000)
                return
            if message.get("text") is not None:
                await ws.send_text(message["text"])
            elif message.get("bytes") is not None:
                await ws.send_bytes(message["bytes"])
    except WebSocketDisconnect:
        return


@app.get("/healthz")
async def healthz() -> JSONResponse:
    return JSONResponse({"ok": healthy, "region": REGION}, status_code=200 if healthy else 503)


class Health(BaseModel):
    healthy: bool


@app.post("/control/health")
async def set_health(health: Health) -> dict:
    global healthy
    healthy = health.healthy
    return {"healthy": healthy}


@app.get("/control/hits")
async def get_hits() -> dict:
    return dict(hits)


@app.post("/control/hits/reset")
async def reset_hits() -> dict:
    hits["healthz"] = hits["total"] = 0  # slow_in_flight is live state, not a count
    return dict(hits)
