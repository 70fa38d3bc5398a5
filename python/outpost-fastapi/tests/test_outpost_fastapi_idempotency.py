"""IdempotencyStore, IdempotencyMiddleware and IdempotencyKey + run_once: the Idempotency-Key
semantics (IETF draft) against a temporary SQLite file."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import threading
from contextlib import closing
from datetime import timedelta

import httpx
import pytest
from fastapi import Depends, FastAPI, Request, Response
from fastapi.responses import JSONResponse
from fastapi.testclient import TestClient

from outpost_fastapi import (
    IdempotencyKey,
    IdempotencyMiddleware,
    IdempotencyStore,
    IdempotentRequest,
    request_fingerprint,
)

KEY = {"Idempotency-Key": "8e03978e-40d5-43e8-bc93-6894a57f9324"}


class Clock:
    def __init__(self, now: float = 1_767_225_600.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def rows(db, table: str = "outpost_idempotency") -> list[tuple]:
    with closing(sqlite3.connect(db)) as conn:
        return conn.execute(f"SELECT key, state, status FROM {table} ORDER BY key").fetchall()


# --- the generic variant: IdempotencyMiddleware ----------------------------------------------------


def middleware_app(store: IdempotencyStore, **options) -> tuple[FastAPI, dict]:
    """/orders counts its runs; /boom answers 500; /slow waits for `release`; /free is not filtered."""
    app = FastAPI()
    calls = {"orders": 0, "boom": 0, "slow": 0, "free": 0, "raise": 0}
    app.state.started = asyncio.Event()
    app.state.release = asyncio.Event()

    @app.post("/orders", status_code=201)
    async def create_order(request: Request, response: Response):
        calls["orders"] += 1
        response.headers["Set-Cookie"] = "seen=1"
        response.headers["X-Order"] = str(calls["orders"])
        return {"order": calls["orders"], "body": (await request.body()).decode()}

    @app.post("/boom")
    async def boom():
        calls["boom"] += 1
        return JSONResponse({"error": "database down"}, status_code=503)

    @app.post("/raise")
    async def fail():
        calls["raise"] += 1
        raise RuntimeError("handler crashed")

    @app.post("/bad")
    async def bad():
        return JSONResponse({"error": "no such product"}, status_code=404)

    @app.post("/slow")
    async def slow():
        calls["slow"] += 1
        app.state.started.set()
        await app.state.release.wait()
        return {"slow": calls["slow"]}

    @app.post("/free")
    async def free():
        calls["free"] += 1
        return {"free": calls["free"]}

    paths = options.pop("paths", ["/orders", "/boom", "/raise", "/bad", "/slow"])
    app.add_middleware(IdempotencyMiddleware, store=store, paths=paths, **options)
    return app, calls


@pytest.fixture
def db(tmp_path):
    return tmp_path / "app.db"


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def store(db, clock):
    return IdempotencyStore(db, clock=clock)


def test_table_is_created_with_the_documented_columns(store, db):
    with closing(sqlite3.connect(db)) as conn:
        cols = [r[1] for r in conn.execute("PRAGMA table_info(outpost_idempotency)")]
        pk = [r[1] for r in conn.execute("PRAGMA table_info(outpost_idempotency)") if r[5]]
    assert cols == ["key", "fingerprint", "state", "status", "headers", "body", "created_at"]
    assert pk == ["key"]


def test_store_arguments_are_checked(db):
    with pytest.raises(ValueError, match="SQL identifier"):
        IdempotencyStore(db, table="x; DROP TABLE y")
    with pytest.raises(ValueError, match="positive"):
        IdempotencyStore(db, ttl=timedelta(0))
    custom = IdempotencyStore(lambda: sqlite3.connect(db), table="keys")
    assert rows(db, "keys") == []
    assert "keys" in repr(custom)


def test_no_key_runs_normally_every_time(store, db):
    app, calls = middleware_app(store)
    with TestClient(app) as client:
        r1 = client.post("/orders", content=b"a")
        r2 = client.post("/orders", content=b"a")
    assert r1.status_code == r2.status_code == 201
    assert calls["orders"] == 2
    assert "idempotent-replayed" not in r2.headers
    assert rows(db) == []


def test_first_request_runs_and_a_repeat_is_replayed(store, db):
    app, calls = middleware_app(store)
    with TestClient(app) as client:
        first = client.post("/orders", content=b'{"sku": "TEA-001"}', headers=KEY)
        again = client.post("/orders", content=b'{"sku": "TEA-001"}', headers=KEY)
        third = client.post("/orders", content=b'{"sku": "TEA-001"}', headers=KEY)
    assert calls["orders"] == 1
    assert first.status_code == again.status_code == third.status_code == 201
    assert again.content == first.content == b'{"order":1,"body":"{\\"sku\\": \\"TEA-001\\"}"}'
    assert "idempotent-replayed" not in first.headers
    assert again.headers["idempotent-replayed"] == "true"
    assert again.headers["x-order"] == "1"
    assert again.headers["set-cookie"] == "seen=1"
    assert again.headers["content-type"] == "application/json"
    assert rows(db) == [(KEY["Idempotency-Key"], "done", 201)]
    stored = store.lookup(KEY["Idempotency-Key"])
    assert stored is not None and stored.body == first.content
    assert "date" not in dict(stored.headers)


def test_other_keys_and_unfiltered_paths_are_independent(store, db):
    app, calls = middleware_app(store)
    with TestClient(app) as client:
        client.post("/orders", content=b"x", headers={"Idempotency-Key": "a"})
        client.post("/orders", content=b"x", headers={"Idempotency-Key": "b"})
        client.post("/free", headers={"Idempotency-Key": "a"})
        client.post("/free", headers={"Idempotency-Key": "a"})
        client.get("/orders", headers={"Idempotency-Key": "a"})  # GET: not handled (405 from the app)
    assert calls["orders"] == 2
    assert calls["free"] == 2
    assert [r[0] for r in rows(db)] == ["a", "b"]


def test_same_key_with_another_body_or_path_is_422(store):
    app, calls = middleware_app(store)
    with TestClient(app) as client:
        assert client.post("/orders", content=b"one", headers=KEY).status_code == 201
        r = client.post("/orders", content=b"two", headers=KEY)
        other_query = client.post("/orders?x=1", content=b"one", headers=KEY)
        other_path = client.post("/bad", content=b"one", headers=KEY)
    assert calls["orders"] == 1
    for resp in (r, other_query, other_path):
        assert resp.status_code == 422
        assert resp.headers["content-type"] == "application/problem+json"
        problem = resp.json()
        assert problem["title"] == "Idempotency-Key reused for a different request"
        assert problem["status"] == 422
        assert problem["reason"] == "mismatch"
        assert "different request" in problem["detail"]


def test_concurrent_same_key_is_409_while_in_progress(store, db):
    asyncio.run(_concurrent_same_key(store, db))


async def _concurrent_same_key(store, db):
    app, calls = middleware_app(store)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://center") as client:
        first = asyncio.create_task(client.post("/slow", content=b"s", headers=KEY))
        await asyncio.wait_for(app.state.started.wait(), 5)  # the handler is running now
        assert rows(db) == [(KEY["Idempotency-Key"], "in_progress", None)]

        dup = await client.post("/slow", content=b"s", headers=KEY)
        assert dup.status_code == 409
        assert dup.headers["retry-after"] == "1"
        assert dup.headers["content-type"] == "application/problem+json"
        assert dup.json()["reason"] == "in_progress"

        app.state.release.set()
        r1 = await asyncio.wait_for(first, 5)
        r3 = await client.post("/slow", content=b"s", headers=KEY)
    assert r1.status_code == r3.status_code == 200
    assert r3.headers["idempotent-replayed"] == "true"
    assert r1.json() == r3.json() == {"slow": 1}
    assert calls["slow"] == 1


def test_many_concurrent_requests_apply_once(store):
    asyncio.run(_many_concurrent(store))


async def _many_concurrent(store):
    app, calls = middleware_app(store)
    app.state.release.set()
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://center") as client:
        responses = await asyncio.gather(
            *(client.post("/orders", content=b"c", headers=KEY) for _ in range(10))
        )
    assert calls["orders"] == 1
    statuses = sorted(r.status_code for r in responses)
    assert set(statuses) <= {201, 409}
    assert statuses.count(201) >= 1
    assert sum(1 for r in responses if r.status_code == 201 and "idempotent-replayed" not in r.headers) == 1


def test_a_stale_in_progress_key_is_taken_over(store, db, clock):
    # A process that died while handling the key left it in progress: after lock_timeout a
    # repeat runs it (before that it is a 409).
    store.claim("dead", request_fingerprint("POST", "/orders", b"z"))
    app, calls = middleware_app(store)
    with TestClient(app) as client:
        assert client.post("/orders", content=b"z", headers={"Idempotency-Key": "dead"}).status_code == 409
        clock.now += 61
        r = client.post("/orders", content=b"z", headers={"Idempotency-Key": "dead"})
    assert r.status_code == 201
    assert calls["orders"] == 1
    assert rows(db) == [("dead", "done", 201)]


def test_5xx_is_not_stored_so_a_retry_runs_again(store, db):
    app, calls = middleware_app(store)
    with TestClient(app, raise_server_exceptions=False) as client:
        assert client.post("/boom", headers=KEY).status_code == 503
        assert client.post("/boom", headers=KEY).status_code == 503
        assert calls["boom"] == 2
        assert rows(db) == []
        k2 = {"Idempotency-Key": "crash"}
        assert client.post("/raise", headers=k2).status_code == 500
        assert client.post("/raise", headers=k2).status_code == 500
        assert calls["raise"] == 2
    assert rows(db) == []


def test_4xx_is_stored(store, db):
    app, _ = middleware_app(store)
    with TestClient(app) as client:
        first = client.post("/bad", headers=KEY)
        again = client.post("/bad", headers=KEY)
    assert first.status_code == again.status_code == 404
    assert again.headers["idempotent-replayed"] == "true"
    assert again.json() == {"error": "no such product"}
    assert rows(db) == [(KEY["Idempotency-Key"], "done", 404)]


def test_expired_keys_run_again_and_are_purged(store, db, clock):
    app, calls = middleware_app(store)
    with TestClient(app) as client:
        client.post("/orders", content=b"1", headers={"Idempotency-Key": "old"})
        clock.now += timedelta(days=6).total_seconds()
        client.post("/orders", content=b"1", headers={"Idempotency-Key": "young"})
        assert client.post("/orders", content=b"1", headers={"Idempotency-Key": "old"}).headers[
            "idempotent-replayed"
        ] == "true"
        assert calls["orders"] == 2

        clock.now += timedelta(days=1, seconds=1).total_seconds()  # "old" is 7 days + 1 s old
        assert store.lookup("old") is None
        assert store.lookup("young") is not None
        # The next request through the store purges lazily: "old" disappears without being used.
        client.post("/orders", content=b"1", headers={"Idempotency-Key": "new"})
        assert [r[0] for r in rows(db)] == ["new", "young"]
        # And an expired key is a new key: it runs again.
        r = client.post("/orders", content=b"other body", headers={"Idempotency-Key": "young"})
        assert r.status_code == 422  # young is 1 day + 1 s old: still remembered
        clock.now += timedelta(days=7).total_seconds()
        r = client.post("/orders", content=b"other body", headers={"Idempotency-Key": "young"})
        assert r.status_code == 201 and "idempotent-replayed" not in r.headers
    assert calls["orders"] == 4


def test_purge_expired_counts(store, db, clock):
    app, _ = middleware_app(store)
    with TestClient(app) as client:
        for k in ("a", "b", "c"):
            client.post("/orders", headers={"Idempotency-Key": k})
    clock.now += timedelta(days=7).total_seconds()
    assert store.purge_expired() == 3
    assert rows(db) == []


def test_required_key_is_400_problem(store):
    app, calls = middleware_app(store, required=True)
    with TestClient(app) as client:
        r = client.post("/orders", content=b"x")
        assert client.post("/free").status_code == 200  # not in paths: never required
    assert r.status_code == 400
    assert r.headers["content-type"] == "application/problem+json"
    problem = r.json()
    assert problem["reason"] == "missing"
    assert problem["title"] == "Idempotency-Key is missing"
    assert "requires an Idempotency-Key header" in problem["detail"]
    assert calls["orders"] == 0


@pytest.mark.parametrize(
    "headers, detail",
    [
        ([("Idempotency-Key", "a"), ("Idempotency-Key", "b")], "more than one"),
        ([("Idempotency-Key", "k" * 256)], "256 characters long, limit 255"),
        ([("Idempotency-Key", " ")], "empty"),
    ],
)
def test_malformed_key_is_400_problem(store, headers, detail):
    app, calls = middleware_app(store)
    with TestClient(app) as client:
        r = client.post("/orders", headers=headers)
        ok = client.post("/orders", headers={"Idempotency-Key": "k" * 255})
    assert r.status_code == 400
    assert r.json()["reason"] == "malformed"
    assert detail in r.json()["detail"]
    assert ok.status_code == 201
    assert calls["orders"] == 1


def test_path_filters(store):
    app, calls = middleware_app(store, paths=["/ord*"])
    with TestClient(app) as client:
        client.post("/orders", headers=KEY)
        assert client.post("/orders", headers=KEY).headers["idempotent-replayed"] == "true"
        client.post("/free", headers=KEY)
        client.post("/free", headers=KEY)
    assert calls == {**calls, "orders": 1, "free": 2}
    with pytest.raises(TypeError, match="list of paths"):
        IdempotencyMiddleware(app, store, paths="/orders")


# --- the strong variant: IdempotencyKey + run_once ---------------------------------------------------


def strong_app(db, store: IdempotencyStore) -> tuple[FastAPI, dict]:
    app = FastAPI()
    calls = {"n": 0}
    fail = {"after_insert": False}

    def connect() -> sqlite3.Connection:
        return sqlite3.connect(db, timeout=10)

    with closing(connect()) as conn:
        conn.execute("CREATE TABLE IF NOT EXISTS items (id INTEGER PRIMARY KEY, name TEXT)")
        conn.commit()

    @app.post("/items", status_code=201)
    def add(payload: dict, idem: IdempotentRequest = Depends(IdempotencyKey())):
        def apply() -> Response:
            calls["n"] += 1
            cur = conn.execute("INSERT INTO items (name) VALUES (?)", (payload["name"],))
            if fail["after_insert"]:
                raise RuntimeError("crash after the insert")
            if payload["name"] == "":
                return JSONResponse({"error": "empty name"}, status_code=400)
            if payload["name"] == "5xx":
                return JSONResponse({"error": "try later"}, status_code=503)
            return JSONResponse({"id": cur.lastrowid, "name": payload["name"]}, status_code=201)

        with closing(connect()) as conn:
            return store.run_once(conn, idem, apply)

    @app.post("/strict")
    def strict(idem: IdempotentRequest = Depends(IdempotencyKey(required=True))):
        return {"key": idem.key}

    app.state.fail = fail
    return app, calls


def item_count(db) -> int:
    with closing(sqlite3.connect(db)) as conn:
        return conn.execute("SELECT COUNT(*) FROM items").fetchone()[0]


def test_run_once_replays_without_running_the_handler(db, store):
    app, calls = strong_app(db, store)
    with TestClient(app) as client:
        first = client.post("/items", json={"name": "tea"}, headers=KEY)
        again = client.post("/items", json={"name": "tea"}, headers=KEY)
        other = client.post("/items", json={"name": "mug"}, headers=KEY)
        plain = client.post("/items", json={"name": "tea"})
    assert first.status_code == again.status_code == 201
    assert again.json() == first.json() == {"id": 1, "name": "tea"}
    assert again.headers["idempotent-replayed"] == "true"
    assert other.status_code == 422 and other.json()["reason"] == "mismatch"
    assert plain.status_code == 201 and plain.json()["id"] == 2
    assert calls["n"] == 2
    assert item_count(db) == 2


def test_run_once_failure_before_commit_stores_neither(db, store):
    app, calls = strong_app(db, store)
    app.state.fail["after_insert"] = True
    with TestClient(app, raise_server_exceptions=False) as client:
        assert client.post("/items", json={"name": "tea"}, headers=KEY).status_code == 500
        assert item_count(db) == 0
        assert rows(db) == []
        app.state.fail["after_insert"] = False
        r = client.post("/items", json={"name": "tea"}, headers=KEY)
    assert r.status_code == 201 and "idempotent-replayed" not in r.headers
    assert item_count(db) == 1
    assert rows(db) == [(KEY["Idempotency-Key"], "done", 201)]


def test_run_once_5xx_rolls_back_and_4xx_is_kept(db, store):
    app, calls = strong_app(db, store)
    with TestClient(app) as client:
        assert client.post("/items", json={"name": "5xx"}, headers=KEY).status_code == 503
        assert item_count(db) == 0 and rows(db) == []
        k = {"Idempotency-Key": "four"}
        assert client.post("/items", json={"name": ""}, headers=k).status_code == 400
        r = client.post("/items", json={"name": ""}, headers=k)
    assert r.status_code == 400 and r.headers["idempotent-replayed"] == "true"
    assert calls["n"] == 2
    assert rows(db) == [("four", "done", 400)]


def test_run_once_concurrent_threads_apply_once(db, store):
    app, calls = strong_app(db, store)
    barrier = threading.Barrier(8)
    results: list[httpx.Response] = []

    def post(client: TestClient) -> None:
        barrier.wait()
        results.append(client.post("/items", json={"name": "tea"}, headers=KEY))

    with TestClient(app) as client:
        threads = [threading.Thread(target=post, args=(client,)) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert calls["n"] == 1
    assert item_count(db) == 1
    assert [r.status_code for r in results] == [201] * 8
    assert len({r.content for r in results}) == 1
    assert sum("idempotent-replayed" not in r.headers for r in results) == 1


def test_run_once_sees_a_middleware_claim_in_progress(db, store):
    app, calls = strong_app(db, store)
    body = json.dumps({"name": "tea"}).encode()
    store.claim(KEY["Idempotency-Key"], request_fingerprint("POST", "/items", body))
    with TestClient(app) as client:
        r = client.post("/items", content=body, headers={**KEY, "content-type": "application/json"})
    assert r.status_code == 409 and r.headers["retry-after"] == "1"
    assert calls["n"] == 0


def test_run_once_misuse_is_a_clear_error(db, store):
    idem = IdempotentRequest("k", request_fingerprint("POST", "/x", b""))
    with closing(sqlite3.connect(db)) as conn:
        conn.execute("CREATE TABLE t (x)")
        conn.execute("INSERT INTO t VALUES (1)")
        with pytest.raises(RuntimeError, match="open transaction"):
            store.run_once(conn, idem, lambda: Response())
        conn.rollback()

        def commits() -> Response:
            conn.execute("INSERT INTO t VALUES (2)")
            conn.commit()
            return Response()

        with pytest.raises(RuntimeError, match="committed or rolled back"):
            store.run_once(conn, idem, commits)
        with pytest.raises(TypeError, match="starlette Response"):
            store.run_once(conn, idem, lambda: {"x": 1})  # type: ignore[arg-type,return-value]
        assert not conn.in_transaction

    other = IdempotencyStore(db, table="absent", create=False)
    with closing(sqlite3.connect(db)) as conn, pytest.raises(RuntimeError, match="create_table"):
        other.run_once(conn, idem, lambda: Response())


def test_run_once_lock_timeout_is_503(db, store):
    idem = IdempotentRequest("k", request_fingerprint("POST", "/x", b""))
    with closing(sqlite3.connect(db)) as holder, closing(sqlite3.connect(db, timeout=0.05)) as conn:
        holder.execute("BEGIN IMMEDIATE")
        r = store.run_once(conn, idem, lambda: Response())
        holder.rollback()
    assert r.status_code == 503
    assert r.headers["retry-after"] == "1"
    assert json.loads(r.body)["reason"] == "busy"


def test_dependency_required_and_malformed(db, store):
    app, _ = strong_app(db, store)
    with TestClient(app) as client:
        missing = client.post("/strict")
        too_long = client.post("/strict", headers={"Idempotency-Key": "x" * 256})
        ok = client.post("/strict", headers={"Idempotency-Key": "abc"})
    assert missing.status_code == 400
    assert missing.headers["content-type"] == "application/problem+json"
    assert "requires an Idempotency-Key header" in missing.json()["detail"]
    assert too_long.status_code == 400 and "limit 255" in too_long.json()["detail"]
    assert ok.json() == {"key": "abc"}


def test_fingerprint():
    assert request_fingerprint("post", "/sales?x=1", b"") == (
        "POST /sales?x=1 sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    )
