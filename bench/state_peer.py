"""bench/state_peer.py: the "center" way of serving the state API, for bench/state.sh.

A small FastAPI app over SQLite with the endpoints of Outpost's state API that state.sh
measures, and the same durability: WAL, synchronous=FULL, a write is answered only after its
commit (one fsync per commit). Written the way a typical Python service does it, not tuned:

    GET  /state/kv/{ns}/{key}              value bytes, 404 when absent (or expired)
    PUT  /state/kv/{ns}/{key}?ttl=60s      store the body; 204
    POST /state/counters/{name}/incr?by=1  {"name", "type": "pncounter", "value"}
    GET  /state/counters/{name}            the same JSON

Every call needs `Authorization: Bearer <STATE_PEER_TOKEN>`.

Handlers are plain `def` functions, which FastAPI runs in its thread pool (the usual way to call
a blocking database driver from FastAPI). Each pool thread has its own SQLite connection (reads
run side by side under WAL); writes are serialised by one process-wide lock, so the app never
waits on SQLite's busy handler, and each write is its own transaction and its own fsync: no
group commit. The counter is a plain integer row (`value = value + by`): a PN-counter of one
replica is just that.

Run (state.sh does it):

    STATE_PEER_DB=/var/tmp/x/peer.db STATE_PEER_TOKEN=secret \
        .venv/bin/python -m uvicorn state_peer:app --app-dir bench --port 8000 --workers 1
"""

import hmac
import os
import re
import sqlite3
import threading
import time

from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

DB_PATH = os.environ["STATE_PEER_DB"]
TOKEN = os.environ["STATE_PEER_TOKEN"].encode()

SCHEMA = """
CREATE TABLE IF NOT EXISTS kv (
    ns TEXT NOT NULL,
    key TEXT NOT NULL,
    value BLOB NOT NULL,
    content_type TEXT,
    expires_ms INTEGER,
    PRIMARY KEY (ns, key)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS counters (
    name TEXT PRIMARY KEY,
    value INTEGER NOT NULL
) WITHOUT ROWID;
"""


def _connect() -> sqlite3.Connection:
    # isolation_level=None: autocommit, transactions are explicit (BEGIN IMMEDIATE ... COMMIT).
    conn = sqlite3.connect(DB_PATH, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA journal_mode=WAL")
    # FULL: in WAL mode, the WAL is fsynced at every commit (Outpost's store does the same).
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("PRAGMA busy_timeout=5000")
    return conn


with _connect() as _setup:
    _setup.executescript(SCHEMA)

_local = threading.local()
_write_lock = threading.Lock()


def db() -> sqlite3.Connection:
    conn = getattr(_local, "conn", None)
    if conn is None:
        conn = _local.conn = _connect()
    return conn


def now_ms() -> int:
    return int(time.time() * 1000)


_TTL = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_UNIT_MS = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000, None: 1000}


def parse_ttl_ms(text: str) -> int | None:
    m = _TTL.match(text)
    if not m:
        return None
    return int(float(m.group(1)) * _UNIT_MS[m.group(2)])


def authorized(request: Request) -> bool:
    given = request.headers.get("authorization", "")
    if not given.startswith("Bearer "):
        return False
    return hmac.compare_digest(given[7:].encode(), TOKEN)


UNAUTHORIZED = Response("missing or wrong token\n", status_code=401, headers={"www-authenticate": "Bearer"})

app = FastAPI()


@app.get("/healthz")
def healthz() -> Response:
    return Response("ok\n", media_type="text/plain")


@app.get("/state/kv/{ns}/{key:path}")
def kv_get(ns: str, key: str, request: Request) -> Response:
    if not authorized(request):
        return UNAUTHORIZED
    row = (
        db()
        .execute(
            "SELECT value, content_type FROM kv WHERE ns = ? AND key = ?"
            " AND (expires_ms IS NULL OR expires_ms > ?)",
            (ns, key, now_ms()),
        )
        .fetchone()
    )
    if row is None:
        return JSONResponse({"error": "key not found"}, status_code=404)
    return Response(row[0], media_type=row[1] or "application/octet-stream")


@app.put("/state/kv/{ns}/{key:path}")
async def kv_put(ns: str, key: str, request: Request, ttl: str | None = None) -> Response:
    # async only to read the body; the write itself goes to the thread pool, as in a def handler.
    if not authorized(request):
        return UNAUTHORIZED
    expires = None
    if ttl is not None:
        ttl_ms = parse_ttl_ms(ttl)
        if not ttl_ms:
            return JSONResponse({"error": f"ttl: cannot read {ttl!r}"}, status_code=400)
        expires = now_ms() + ttl_ms
    body = await request.body()
    content_type = request.headers.get("content-type")
    await run_in_threadpool(_kv_put, ns, key, body, content_type, expires)
    return Response(status_code=204)


def _kv_put(ns: str, key: str, body: bytes, content_type: str | None, expires: int | None) -> None:
    conn = db()
    with _write_lock:
        conn.execute("BEGIN IMMEDIATE")
        try:
            conn.execute(
                "INSERT INTO kv (ns, key, value, content_type, expires_ms) VALUES (?, ?, ?, ?, ?)"
                " ON CONFLICT (ns, key) DO UPDATE SET value = excluded.value,"
                " content_type = excluded.content_type, expires_ms = excluded.expires_ms",
                (ns, key, body, content_type, expires),
            )
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise


@app.post("/state/counters/{name}/incr")
def counter_incr(name: str, request: Request, by: int = 1) -> Response:
    if not authorized(request):
        return UNAUTHORIZED
    conn = db()
    with _write_lock:
        conn.execute("BEGIN IMMEDIATE")
        try:
            value = conn.execute(
                "INSERT INTO counters (name, value) VALUES (?, ?)"
                " ON CONFLICT (name) DO UPDATE SET value = value + excluded.value RETURNING value",
                (name, by),
            ).fetchone()[0]
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
    return JSONResponse({"name": name, "type": "pncounter", "value": value})


@app.get("/state/counters/{name}")
def counter(name: str, request: Request) -> Response:
    if not authorized(request):
        return UNAUTHORIZED
    row = db().execute("SELECT value FROM counters WHERE name = ?", (name,)).fetchone()
    return JSONResponse({"name": name, "type": "pncounter", "value": row[0] if row else 0})
