"""Exactly-once unsafe requests: the ``Idempotency-Key`` header, remembered in SQLite.

An Outpost edge node keeps the writes it could not deliver to the center in its *outbox* and
delivers them later, possibly more than once (a crash between the center applying a write and
the node recording the delivery, or a timeout after the center did apply it). Every attempt,
the first one included, carries the same ``Idempotency-Key`` header (IETF draft "The
Idempotency-Key HTTP Header Field"). The center applies each key once and answers the repeats
with the stored response.

Two ways to use :class:`IdempotencyStore`:

* **Strong** (recommended for writes to the same SQLite database): the handler calls
  :meth:`IdempotencyStore.run_once` with the app's own connection. The app's write and the key's
  record are committed in **one** transaction, so a crash can never leave one without the other::

      IDEM = IdempotencyStore("app.db")

      @app.post("/orders", status_code=201)
      def create_order(order: OrderIn, idem: IdempotentRequest = Depends(IdempotencyKey())):
          with closing(sqlite3.connect("app.db")) as conn:
              def apply() -> Response:
                  conn.execute("INSERT INTO orders ...", ...)
                  return JSONResponse({...}, status_code=201)
              return IDEM.run_once(conn, idem, apply)

* **Generic**: :class:`IdempotencyMiddleware`, a pure ASGI middleware restricted to some paths.
  It works for any route and any storage, but the response is recorded *after* the app has
  committed its own write, in a separate transaction (see the README for the crash window).
"""

import hashlib
import json
import logging
import math
import os
import re
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import timedelta
from enum import Enum
from typing import Any

import anyio.to_thread
from fastapi import HTTPException, Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

__all__ = [
    "IDEMPOTENCY_HEADER",
    "MAX_KEY_LENGTH",
    "REPLAYED_HEADER",
    "IdempotencyError",
    "IdempotencyKey",
    "IdempotencyMiddleware",
    "IdempotencyStore",
    "IdempotentRequest",
    "StoredResponse",
    "request_fingerprint",
]

log = logging.getLogger("outpost_fastapi")

#: Request header carrying the key (matched case-insensitively).
IDEMPOTENCY_HEADER = "Idempotency-Key"
#: Response header added to every replayed response, with the value ``true``.
REPLAYED_HEADER = "Idempotent-Replayed"
#: Longest accepted key, in characters (the edge's keys are far shorter).
MAX_KEY_LENGTH = 255
#: Methods :class:`IdempotencyMiddleware` handles by default (the edge's outbox queues these).
UNSAFE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
PROBLEM_JSON = "application/problem+json"

# Not stored with a response, hence not replayed: hop-by-hop fields (RFC 9110 7.6.1), Date (a
# replay is a new message) and our own replay marker.
_NOT_STORED = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "trailers",
        "transfer-encoding",
        "upgrade",
        "date",
        REPLAYED_HEADER.lower(),
    }
)
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def request_fingerprint(method: str, path: str, body: bytes) -> str:
    """What identifies "the same request" for a key: ``"POST /sales?x=1 sha256:<hex of body>"``.

    ``path`` includes the query string, if any. Two requests with the same key and a different
    fingerprint are a client error (422).
    """
    return f"{method.upper()} {path} sha256:{hashlib.sha256(body).hexdigest()}"


def _path_with_query(scope: Scope) -> str:
    query = scope.get("query_string", b"")
    path = scope.get("path", "")
    return f"{path}?{query.decode('latin-1')}" if query else path


# --- problems (RFC 9457) -------------------------------------------------------------------------


class IdempotencyError(HTTPException):
    """A request refused because of its ``Idempotency-Key``, as an RFC 9457 problem.

    ``reason`` is a stable machine-readable code: ``missing`` (400, the route requires a key),
    ``malformed`` (400: empty, longer than 255 characters, control characters, or the header
    sent twice), ``mismatch`` (422, the key was used for a different request), ``in_progress``
    (409 with ``Retry-After: 1``, the first request with this key has not finished) and ``busy``
    (503 with ``Retry-After: 1``, the database stayed locked).

    Raised by :class:`IdempotencyKey`; FastAPI's default handler renders it as
    ``{"detail": "..."}`` with ``Content-Type: application/problem+json``. :meth:`to_response`
    builds the full problem document, which is what :class:`IdempotencyMiddleware` and
    :meth:`IdempotencyStore.run_once` return.
    """

    _TITLES = {
        "missing": "Idempotency-Key is missing",
        "malformed": "Idempotency-Key is malformed",
        "mismatch": "Idempotency-Key reused for a different request",
        "in_progress": "A request with this Idempotency-Key is being processed",
        "busy": "The idempotency store is busy",
    }

    def __init__(self, status_code: int, reason: str, detail: str) -> None:
        headers = {"Content-Type": PROBLEM_JSON}
        if status_code in (409, 503):
            headers["Retry-After"] = "1"
        super().__init__(status_code=status_code, detail=detail, headers=headers)
        self.reason = reason
        self.title = self._TITLES.get(reason, "Idempotency-Key error")

    def problem(self) -> dict[str, Any]:
        """The RFC 9457 problem document (``reason`` is an extension member)."""
        return {
            "title": self.title,
            "status": self.status_code,
            "detail": self.detail,
            "reason": self.reason,
        }

    def to_response(self) -> Response:
        return Response(
            json.dumps(self.problem()).encode(),
            status_code=self.status_code,
            headers={k: v for k, v in (self.headers or {}).items() if k != "Content-Type"},
            media_type=PROBLEM_JSON,
        )


def _missing(header: str) -> IdempotencyError:
    return IdempotencyError(
        400,
        "missing",
        f"this endpoint requires an {header} header: send a unique key (e.g. a UUID) with the "
        "request and the same key with every retry of it",
    )


def _mismatch(header: str) -> IdempotencyError:
    return IdempotencyError(
        422,
        "mismatch",
        f"{header} reused for a different request: this key was first used with another "
        "method, path or body; use a new key for a new request",
    )


def _in_progress(header: str) -> IdempotencyError:
    return IdempotencyError(
        409,
        "in_progress",
        f"a request with this {header} is still being processed; retry after it has finished",
    )


def _busy(error: Exception) -> IdempotencyError:
    return IdempotencyError(503, "busy", f"the idempotency store's database is busy ({error}); retry")


def _parse_key(values: list[str], header: str, required: bool) -> str | None:
    """The key from the header's values, ``None`` if absent; raises :class:`IdempotencyError`."""
    if not values:
        if required:
            raise _missing(header)
        return None
    if len(values) > 1:
        raise IdempotencyError(400, "malformed", f"more than one {header} header")
    key = values[0].strip()
    if not key:
        raise IdempotencyError(400, "malformed", f"empty {header} header")
    if len(key) > MAX_KEY_LENGTH:
        raise IdempotencyError(
            400, "malformed", f"{header} is {len(key)} characters long, limit {MAX_KEY_LENGTH}"
        )
    if _CONTROL.search(key):
        raise IdempotencyError(400, "malformed", f"{header} contains control characters")
    return key


# --- stored responses ----------------------------------------------------------------------------


@dataclass(frozen=True)
class StoredResponse:
    """A response remembered for a key: what a repeat of the request gets back."""

    status: int
    #: ``(name, value)`` pairs, names lowercase, in the original order (repeated names kept).
    headers: list[tuple[str, str]]
    body: bytes
    #: Unix time the response was stored.
    created_at: float

    def to_response(self) -> Response:
        """A Starlette response replaying it, with ``Idempotent-Replayed: true``."""
        response = Response(self.body, status_code=self.status)
        response.raw_headers = [*self._raw_headers(), (REPLAYED_HEADER.lower().encode(), b"true")]
        return response

    def _raw_headers(self) -> list[tuple[bytes, bytes]]:
        return [(k.encode("latin-1"), v.encode("latin-1")) for k, v in self.headers]


def _storable_headers(raw: Iterable[tuple[bytes, bytes]]) -> list[tuple[str, str]]:
    out = []
    for name, value in raw:
        lname = name.decode("latin-1").lower()
        if lname not in _NOT_STORED:
            out.append((lname, value.decode("latin-1")))
    return out


class _Outcome(Enum):
    NEW = "new"
    MISMATCH = "mismatch"
    IN_PROGRESS = "in_progress"


@dataclass(frozen=True)
class IdempotentRequest:
    """What :class:`IdempotencyKey` hands a route: the key (``None`` when the request has none)
    and the request's fingerprint (see :func:`request_fingerprint`)."""

    key: str | None
    fingerprint: str
    header: str = field(default=IDEMPOTENCY_HEADER, compare=False)


# --- the store -----------------------------------------------------------------------------------


class IdempotencyStore:
    """Keys and their responses, in a table of the app's SQLite database.

    ``database`` is a path, or a callable returning a **new** ``sqlite3.Connection`` on every
    call (the store closes it). It is used by :class:`IdempotencyMiddleware`, :meth:`lookup`,
    :meth:`purge_expired` and :meth:`create_table`; :meth:`run_once` uses the connection the
    app passes it.

    ``ttl``: how long a key is remembered; older keys are forgotten (a repeat runs again) and
    purged lazily, at most once a minute, by the store's own operations. ``lock_timeout``: how
    long a key claimed by :class:`IdempotencyMiddleware` may stay *in progress* before a repeat
    may take it over (the process handling it is presumed dead). ``create=False`` skips creating
    the table now (call :meth:`create_table` later, e.g. in the app's lifespan). ``clock``
    returns Unix time (for tests).

    Table (name ``table``, an SQL identifier): ``key`` TEXT PRIMARY KEY, ``fingerprint``,
    ``state`` (``in_progress`` | ``done``), ``status``, ``headers`` (JSON list of
    ``[name, value]``), ``body`` BLOB, ``created_at`` (Unix seconds: when the key was claimed,
    then when its response was stored).
    """

    def __init__(
        self,
        database: str | os.PathLike[str] | Callable[[], sqlite3.Connection],
        *,
        table: str = "outpost_idempotency",
        ttl: timedelta = timedelta(days=7),
        lock_timeout: timedelta = timedelta(seconds=60),
        busy_timeout: float = 5.0,
        create: bool = True,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not _IDENTIFIER.fullmatch(table):
            raise ValueError(f"table must be an SQL identifier ([A-Za-z_][A-Za-z0-9_]*), got {table!r}")
        if ttl <= timedelta(0) or lock_timeout <= timedelta(0):
            raise ValueError("ttl and lock_timeout must be positive")
        if callable(database):
            self._factory: Callable[[], sqlite3.Connection] = database
            self._describe = getattr(database, "__name__", repr(database))
        else:
            path = os.fspath(database)
            self._factory = lambda: sqlite3.connect(path, timeout=busy_timeout)
            self._describe = path
        self.table = table
        self.ttl = ttl
        self.lock_timeout = lock_timeout
        self.clock = clock
        self.purge_interval = min(ttl.total_seconds(), 60.0)
        self._last_purge = -math.inf
        self._purge_lock = threading.Lock()
        if create:
            self.create_table()

    def __repr__(self) -> str:
        return f"IdempotencyStore({self._describe!r}, table={self.table!r}, ttl={self.ttl!r})"

    # -- public helpers --

    def create_table(self, conn: sqlite3.Connection | None = None) -> None:
        """Create the table and its index if they do not exist (on ``conn``, committing, or on a
        connection of the store's own)."""
        t = self.table
        statements = [
            f"""CREATE TABLE IF NOT EXISTS {t} (
                key         TEXT PRIMARY KEY,
                fingerprint TEXT NOT NULL,
                state       TEXT NOT NULL CHECK (state IN ('in_progress', 'done')),
                status      INTEGER,
                headers     TEXT,
                body        BLOB,
                created_at  REAL NOT NULL
            )""",
            f"CREATE INDEX IF NOT EXISTS {t}_created_at ON {t} (created_at)",
        ]
        if conn is not None:
            for sql in statements:
                conn.execute(sql)
            conn.commit()
            return
        with self._own() as own:
            for sql in statements:
                own.execute(sql)
            own.commit()

    def lookup(self, key: str) -> StoredResponse | None:
        """The response stored for ``key``, or ``None`` (unknown, in progress or expired)."""
        with self._own() as conn:
            row = self._row(conn, key)
        if row is None or row[1] != "done" or row[5] <= self.clock() - self.ttl.total_seconds():
            return None
        return _stored(row)

    def purge_expired(self, conn: sqlite3.Connection | None = None) -> int:
        """Delete every key older than ``ttl`` now; returns how many. Done lazily anyway."""
        if conn is not None:
            n = self._purge(conn, self.clock(), force=True)
            conn.commit()
            return n
        with self._own() as own:
            n = self._purge(own, self.clock(), force=True)
            own.commit()
            return n

    # -- the strong variant --

    def run_once(
        self,
        conn: sqlite3.Connection,
        request: IdempotentRequest | None,
        handler: Callable[[], Response],
    ) -> Response:
        """Run ``handler`` at most once per key, in one transaction with the key's record.

        Opens a transaction on ``conn`` (``BEGIN IMMEDIATE``: concurrent requests wait for
        each other on SQLite's write lock, up to the connection's timeout), then:

        * no key (``request`` is ``None`` or has no key): runs ``handler`` and commits;
        * a key already done with this fingerprint: returns the stored response with
          ``Idempotent-Replayed: true``; ``handler`` does not run;
        * a key used with another fingerprint: a 422 problem; ``handler`` does not run;
        * otherwise runs ``handler``, which writes through ``conn`` **without committing** and
          returns a Starlette ``Response`` with a body (not a streaming one). A status below 500
          is stored in the same transaction and committed with the handler's writes; a 5xx
          rolls everything back (a retry may then succeed). An exception rolls back too and
          propagates: nothing is remembered.

        ``conn`` must not be inside a transaction when called. A lock wait that times out is a
        503 problem with ``Retry-After: 1``. Call it from sync code (a FastAPI ``def`` route
        runs in a thread); from ``async def``, use :meth:`arun_once`.
        """
        if conn.in_transaction:
            raise RuntimeError(
                "run_once must open the transaction itself: commit or roll back the "
                "connection's open transaction before calling it"
            )
        key = request.key if request is not None else None
        try:
            conn.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as e:
            log.warning("idempotency: cannot begin a write transaction: %s", e)
            return _busy(e).to_response()
        try:
            now = self.clock()
            if key is not None:
                assert request is not None
                self._purge(conn, now)
                outcome = self._check(conn, key, request.fingerprint, now, take_over=False)
                if outcome is not _Outcome.NEW:
                    conn.commit()  # keeps the purge / an expired key's deletion
                    if isinstance(outcome, StoredResponse):
                        return outcome.to_response()
                    if outcome is _Outcome.MISMATCH:
                        return _mismatch(request.header).to_response()
                    return _in_progress(request.header).to_response()
            response = handler()
            if not isinstance(response, Response):
                raise TypeError(
                    f"run_once: the handler must return a starlette Response, got {type(response).__name__}"
                )
            if not conn.in_transaction:
                raise RuntimeError(
                    "run_once: the handler committed or rolled back the transaction; it must "
                    "leave the commit to run_once (its writes and the key are committed together)"
                )
            if response.status_code >= 500:
                conn.rollback()
                return response
            if key is not None:
                assert request is not None
                body = getattr(response, "body", None)
                if not isinstance(body, bytes):
                    raise TypeError(
                        f"run_once: cannot store a {type(response).__name__} (no body); return a "
                        "Response, JSONResponse, PlainTextResponse..."
                    )
                self._save(
                    conn, key, request.fingerprint, response.status_code,
                    _storable_headers(response.raw_headers), body, now,
                )
            conn.commit()
            return response
        except sqlite3.OperationalError as e:
            if "no such table" in str(e) and self.table in str(e):
                raise RuntimeError(
                    f"the idempotency table {self.table!r} does not exist in this database: "
                    "call store.create_table(conn) at startup (or create the store with create=True)"
                ) from e
            raise
        finally:
            if conn.in_transaction:
                conn.rollback()

    async def arun_once(
        self,
        conn: sqlite3.Connection,
        request: IdempotentRequest | None,
        handler: Callable[[], Response],
    ) -> Response:
        """:meth:`run_once` in a worker thread, for ``async def`` routes. ``handler`` is sync and
        runs in that thread; ``conn`` must allow it (``check_same_thread=False``)."""
        return await anyio.to_thread.run_sync(self.run_once, conn, request, handler)

    # -- the generic variant (IdempotencyMiddleware) --

    def claim(self, key: str, fingerprint: str) -> "StoredResponse | _Outcome":
        """Mark ``key`` in progress (committed) if it is new; otherwise what to answer."""
        with self._own() as conn:
            conn.execute("BEGIN IMMEDIATE")
            now = self.clock()
            self._purge(conn, now)
            outcome = self._check(conn, key, fingerprint, now, take_over=True)
            if outcome is _Outcome.NEW:
                conn.execute(
                    f"INSERT OR REPLACE INTO {self.table} (key, fingerprint, state, created_at)"
                    " VALUES (?, ?, 'in_progress', ?)",
                    (key, fingerprint, now),
                )
            conn.commit()
            return outcome

    def complete(self, key: str, fingerprint: str, status: int, headers: list[tuple[str, str]], body: bytes) -> None:
        """Store the response of a claimed key (state ``done``)."""
        with self._own() as conn:
            conn.execute("BEGIN IMMEDIATE")
            self._save(conn, key, fingerprint, status, headers, body, self.clock())
            conn.commit()

    def release(self, key: str, fingerprint: str) -> None:
        """Forget a claimed key whose request failed (5xx, exception), so a retry runs again."""
        with self._own() as conn:
            conn.execute(
                f"DELETE FROM {self.table} WHERE key = ? AND fingerprint = ? AND state = 'in_progress'",
                (key, fingerprint),
            )
            conn.commit()

    # -- internals --

    def _own(self) -> "_Closing":
        return _Closing(self._factory())

    def _row(self, conn: sqlite3.Connection, key: str) -> tuple[Any, ...] | None:
        cur = conn.cursor()
        cur.row_factory = None  # positional, whatever the app's row_factory
        return cur.execute(
            f"SELECT fingerprint, state, status, headers, body, created_at FROM {self.table} WHERE key = ?",
            (key,),
        ).fetchone()

    def _check(
        self, conn: sqlite3.Connection, key: str, fingerprint: str, now: float, *, take_over: bool
    ) -> "StoredResponse | _Outcome":
        row = self._row(conn, key)
        if row is None:
            return _Outcome.NEW
        stored_fp, state, _, _, _, created_at = row
        if created_at <= now - self.ttl.total_seconds():
            conn.execute(f"DELETE FROM {self.table} WHERE key = ?", (key,))
            return _Outcome.NEW
        if stored_fp != fingerprint:
            return _Outcome.MISMATCH
        if state == "done":
            return _stored(row)
        if take_over and created_at <= now - self.lock_timeout.total_seconds():
            log.warning(
                "idempotency: key %r was in progress for more than %s: taking it over",
                key, self.lock_timeout,
            )
            return _Outcome.NEW
        return _Outcome.IN_PROGRESS

    def _save(
        self, conn: sqlite3.Connection, key: str, fingerprint: str, status: int,
        headers: list[tuple[str, str]], body: bytes, now: float,
    ) -> None:
        conn.execute(
            f"INSERT OR REPLACE INTO {self.table}"
            " (key, fingerprint, state, status, headers, body, created_at)"
            " VALUES (?, ?, 'done', ?, ?, ?, ?)",
            (key, fingerprint, status, json.dumps([list(h) for h in headers]), body, now),
        )

    def _purge(self, conn: sqlite3.Connection, now: float, *, force: bool = False) -> int:
        with self._purge_lock:
            if not force and now - self._last_purge < self.purge_interval:
                return 0
            self._last_purge = now
        cur = conn.execute(
            f"DELETE FROM {self.table} WHERE created_at <= ?", (now - self.ttl.total_seconds(),)
        )
        if cur.rowcount:
            log.debug("idempotency: purged %d expired keys", cur.rowcount)
        return cur.rowcount


class _Closing:
    """``with``: close the connection at the end, rolling back anything left uncommitted."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn

    def __enter__(self) -> sqlite3.Connection:
        return self.conn

    def __exit__(self, *exc: object) -> None:
        try:
            if self.conn.in_transaction:
                self.conn.rollback()
        finally:
            self.conn.close()


def _stored(row: tuple[Any, ...]) -> StoredResponse:
    _, _, status, headers, body, created_at = row
    return StoredResponse(
        status=status,
        headers=[(k, v) for k, v in json.loads(headers or "[]")],
        body=bytes(body or b""),
        created_at=created_at,
    )


# --- FastAPI dependency (for run_once) -----------------------------------------------------------


class IdempotencyKey:
    """FastAPI dependency: the request's ``Idempotency-Key`` and fingerprint, for
    :meth:`IdempotencyStore.run_once`.

    ``Depends(IdempotencyKey())`` yields an :class:`IdempotentRequest` (``key`` is ``None`` when
    the header is absent), or raises :class:`IdempotencyError` (400) when it is malformed or, with
    ``required=True``, missing. It reads the raw body (FastAPI caches it, so body parameters
    still work) to compute the fingerprint.
    """

    def __init__(self, *, required: bool = False, header: str = IDEMPOTENCY_HEADER) -> None:
        self.required = required
        self.header = header

    def __repr__(self) -> str:
        return f"IdempotencyKey(required={self.required!r}, header={self.header!r})"

    async def __call__(self, request: Request) -> IdempotentRequest:
        key = _parse_key(request.headers.getlist(self.header), self.header, self.required)
        body = await request.body()
        return IdempotentRequest(
            key, request_fingerprint(request.method, _path_with_query(request.scope), body), self.header
        )


# --- ASGI middleware (generic variant) -----------------------------------------------------------


class IdempotencyMiddleware:
    """Pure ASGI middleware applying the ``Idempotency-Key`` semantics to some routes.

    ``app.add_middleware(IdempotencyMiddleware, store=store, paths=["/orders", "/carts/*"])``

    ``paths``: exact paths, prefixes written ``"/prefix/*"``, or compiled regular expressions
    (full match); ``None`` means every path. ``methods``: which methods are handled (default
    POST, PUT, PATCH, DELETE). ``required=True``: a handled request without the header is a
    400 problem. Other requests pass through untouched.

    For a handled request with a key, the request body is read in full (to fingerprint it),
    the key is claimed *in progress* in its own transaction, the app runs, and the response's
    status, headers (minus hop-by-hop and ``Date``) and body are stored before the last body
    chunk is sent; a 5xx or an exception releases the key. A repeat gets the stored response
    with ``Idempotent-Replayed: true``, or a 422 (other request) or 409 (still in progress)
    problem. The app's own write and the record are **two** transactions: see
    :meth:`IdempotencyStore.run_once` for the atomic variant.
    """

    def __init__(
        self,
        app: ASGIApp,
        store: IdempotencyStore,
        *,
        paths: Iterable[str | re.Pattern[str]] | None = None,
        methods: Iterable[str] = UNSAFE_METHODS,
        required: bool = False,
        header: str = IDEMPOTENCY_HEADER,
    ) -> None:
        self.app = app
        self.store = store
        self.methods = frozenset(m.upper() for m in methods)
        self.required = required
        self.header = header
        self._header_bytes = header.lower().encode("latin-1")
        self._exact: set[str] = set()
        self._prefixes: list[str] = []
        self._patterns: list[re.Pattern[str]] = []
        self._all = paths is None
        if isinstance(paths, str):
            raise TypeError("paths must be a list of paths, not a string")
        for p in paths or ():
            if isinstance(p, re.Pattern):
                self._patterns.append(p)
            elif p.endswith("*"):
                self._prefixes.append(p[:-1])
            else:
                self._exact.add(p)

    def _applies(self, scope: Scope) -> bool:
        if scope["type"] != "http" or scope["method"].upper() not in self.methods:
            return False
        if self._all:
            return True
        path = scope["path"]
        return (
            path in self._exact
            or any(path.startswith(p) for p in self._prefixes)
            or any(p.fullmatch(path) for p in self._patterns)
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if not self._applies(scope):
            await self.app(scope, receive, send)
            return
        values = [v.decode("latin-1") for k, v in scope["headers"] if k.lower() == self._header_bytes]
        try:
            key = _parse_key(values, self.header, self.required)
        except IdempotencyError as e:
            await e.to_response()(scope, receive, send)
            return
        if key is None:
            await self.app(scope, receive, send)
            return

        chunks = []
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return  # the client is gone before sending its whole request: nothing ran
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        fingerprint = request_fingerprint(scope["method"], _path_with_query(scope), body)

        try:
            outcome = await anyio.to_thread.run_sync(self.store.claim, key, fingerprint)
        except sqlite3.OperationalError as e:
            log.warning("idempotency: cannot claim key %r: %s", key, e)
            await _busy(e).to_response()(scope, receive, send)
            return
        if isinstance(outcome, StoredResponse):
            await send({
                "type": "http.response.start",
                "status": outcome.status,
                "headers": [*outcome._raw_headers(), (REPLAYED_HEADER.lower().encode(), b"true")],
            })
            await send({"type": "http.response.body", "body": outcome.body})
            return
        if outcome is _Outcome.MISMATCH:
            await _mismatch(self.header).to_response()(scope, receive, send)
            return
        if outcome is _Outcome.IN_PROGRESS:
            await _in_progress(self.header).to_response()(scope, receive, send)
            return

        await self._run(scope, receive, send, key, fingerprint, body)

    async def _run(
        self, scope: Scope, receive: Receive, send: Send, key: str, fingerprint: str, body: bytes
    ) -> None:
        body_given = False

        async def replay_receive() -> Message:
            nonlocal body_given
            if not body_given:
                body_given = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        status = 0
        headers: list[tuple[str, str]] = []
        out: list[bytes] = []
        settled = False

        async def settle(store: bool) -> None:
            nonlocal settled
            settled = True
            try:
                if store:
                    await anyio.to_thread.run_sync(
                        self.store.complete, key, fingerprint, status, headers, b"".join(out)
                    )
                else:
                    await anyio.to_thread.run_sync(self.store.release, key, fingerprint)
            except Exception:
                # The key stays in progress until lock_timeout; a repeat after that runs again.
                log.exception("idempotency: cannot %s key %r", "store the response of" if store else "release", key)

        async def capture(message: Message) -> None:
            nonlocal status, headers
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = _storable_headers(message.get("headers", []))
            elif message["type"] == "http.response.body" and not settled:
                out.append(message.get("body", b""))
                if not message.get("more_body", False):
                    await settle(status < 500)
            await send(message)

        try:
            await self.app(scope, replay_receive, capture)
        finally:
            if not settled:
                with anyio.CancelScope(shield=True):
                    await settle(False)
