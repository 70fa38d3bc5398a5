"""Central API of a small retail chain, run as one origin per region.

Outpost sits in front of several copies of this app (one per region) and
routes each request to the closest healthy one. Every response carries an
``X-Origin-Region`` header so you can see which origin answered.

Run one origin::

    REGION=eu-west python -m uvicorn --app-dir examples/retail central:app --port 8002

Environment:

``REGION``
    Name of the region this origin serves (default ``us-west``).
``SALES_DB``
    Path of the SQLite file that stores sales (default
    ``<tmp>/outpost-retail-<region>.db``).

Endpoints: ``GET /healthz``, ``GET /products``, ``GET /products/{sku}``,
``GET /prices/{sku}``, ``POST /sales``, ``GET /sales``, ``GET /sales/count``,
``WebSocket /live/sales``, ``POST /analytics/summaries`` and ``GET /analytics/totals``.

``POST /sales`` honours the ``Idempotency-Key`` header that an Outpost edge sends with every
delivery of a sale it queued in its outbox while this service was unreachable: the sale row
and the key's record are committed in one SQLite transaction, so a key is applied once even
if the edge delivers it again after a crash or a timeout; a repeat gets the first response
(same ``sale_id``) back with ``Idempotent-Replayed: true``.

``POST /analytics/summaries`` takes the per-window analytics summaries that edges send instead
of raw events (``[analytics] center_url``). Each is upserted by (node, window start): a re-send
of the same window replaces the row, never adds to it, so a summary delivered twice (the edge
crashed between our answer and its bookkeeping, or sent a newer version after late events) is
counted once. An older version arriving after a newer one is ignored.
"""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
import tempfile
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, closing
from datetime import datetime, timezone

from fastapi import Depends, FastAPI, HTTPException, Request, Response, WebSocket, status
from fastapi.responses import JSONResponse
from outpost_fastapi import (
    EdgeIdentity,
    IdempotencyKey,
    IdempotencyStore,
    IdempotentRequest,
    OutpostIdentity,
)
from pydantic import BaseModel, Field

REGION = os.environ.get("REGION", "us-west")
SALES_DB = os.environ.get(
    "SALES_DB", os.path.join(tempfile.gettempdir(), f"outpost-retail-{REGION}.db")
)


class Product(BaseModel):
    sku: str
    name: str
    category: str


class Price(BaseModel):
    sku: str
    price_cents: int
    currency: str = "USD"


class SaleIn(BaseModel):
    store_id: str = Field(min_length=1)
    sku: str = Field(min_length=1)
    quantity: int = Field(gt=0)
    unit_price_cents: int = Field(ge=0)


class Sale(SaleIn):
    sale_id: str
    region: str
    total_cents: int
    created_at: str


CATALOG: dict[str, Product] = {
    p.sku: p
    for p in [
        Product(sku="TEA-001", name="Green tea, 100 g", category="grocery"),
        Product(sku="COF-002", name="Espresso beans, 1 kg", category="grocery"),
        Product(sku="MUG-003", name="Stoneware mug", category="kitchen"),
        Product(sku="KTL-004", name="Electric kettle", category="kitchen"),
        Product(sku="TWL-005", name="Cotton tea towel", category="home"),
        Product(sku="CDL-006", name="Beeswax candle", category="home"),
    ]
}

PRICES_CENTS: dict[str, int] = {
    "TEA-001": 699,
    "COF-002": 2499,
    "MUG-003": 1200,
    "KTL-004": 3999,
    "TWL-005": 850,
    "CDL-006": 1550,
}


# --- storage -----------------------------------------------------------------

_SCHEMA = """
CREATE TABLE IF NOT EXISTS sales (
    id               INTEGER PRIMARY KEY AUTOINCREMENT,
    sale_id          TEXT NOT NULL UNIQUE,
    region           TEXT NOT NULL,
    store_id         TEXT NOT NULL,
    sku              TEXT NOT NULL,
    quantity         INTEGER NOT NULL,
    unit_price_cents INTEGER NOT NULL,
    total_cents      INTEGER NOT NULL,
    created_at       TEXT NOT NULL
)
"""


_ANALYTICS_SCHEMA = """
CREATE TABLE IF NOT EXISTS analytics_summaries (
    node            TEXT NOT NULL,
    window_start_ms INTEGER NOT NULL,
    window_ms       INTEGER NOT NULL,
    version         INTEGER NOT NULL,
    region          TEXT,
    events          INTEGER NOT NULL,
    types           TEXT NOT NULL,
    received_at     TEXT NOT NULL,
    PRIMARY KEY (node, window_start_ms)
)
"""


def connect() -> sqlite3.Connection:
    """Open a connection to the sales database (one per request)."""
    conn = sqlite3.connect(SALES_DB, timeout=5.0)
    conn.row_factory = sqlite3.Row
    return conn


# Idempotency keys live in the same database as the sales (table outpost_idempotency), so that
# POST /sales can commit the sale and the key together (IdempotencyStore.run_once). The table
# is created in the lifespan, next to the sales table, because SALES_DB is read at startup.
SALES_IDEMPOTENCY = IdempotencyStore(lambda: connect(), create=False)


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    with closing(connect()) as conn:
        # WAL (persistent in the file): one fsync per commit instead of a rollback journal's
        # several, and readers do not block the writer. synchronous stays FULL: a sale that was
        # answered 201 is on disk.
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
    with closing(connect()) as conn, conn:
        conn.execute(_SCHEMA)
        conn.execute(_ANALYTICS_SCHEMA)
    with closing(connect()) as conn:
        SALES_IDEMPOTENCY.create_table(conn)
    yield


app = FastAPI(title=f"Retail central ({REGION})", lifespan=lifespan)


@app.middleware("http")
async def add_region_header(request: Request, call_next):
    response = await call_next(request)
    response.headers["X-Origin-Region"] = REGION
    return response


# --- edge identity -----------------------------------------------------------

# Requests that came through an Outpost edge carry a signed x-outpost-identity (the route sets
# forward_identity = true); it is verified against the edge's public keys, so a client talking
# to this service directly cannot pretend to be anyone.
EDGE = OutpostIdentity(
    os.environ.get("OUTPOST_JWKS_URL", "http://127.0.0.1:8080/.well-known/outpost/jwks.json"),
    audience="central",
)

# --- endpoints ---------------------------------------------------------------


@app.get("/whoami")
async def whoami(identity: EdgeIdentity = Depends(EDGE)) -> dict:
    """What the edge vouches for: which node, the client's country, user and A/B variants."""
    return {
        "node": identity.node,
        "country": identity.country,
        "sub": identity.sub,
        "request_id": identity.request_id,
        "variants": identity.variants,
        "region": REGION,
    }


@app.get("/healthz")
def healthz() -> dict[str, str]:
    return {"status": "ok", "region": REGION}


# The catalog changes rarely: edges may keep it 30 s, serve it stale for a minute while they
# refresh it, and for an hour if this service is down. Surrogate keys let an operator purge one
# product (`outpost purge --tag product-<sku>`) or the whole catalog (`--tag catalog`).
CATALOG_CACHE = "public, max-age=30, stale-while-revalidate=60, stale-if-error=3600"


def cacheable(response: Response, *tags: str) -> None:
    response.headers["Cache-Control"] = CATALOG_CACHE
    response.headers["Surrogate-Key"] = " ".join(("catalog", *tags))


@app.get("/products")
def list_products(response: Response) -> list[Product]:
    cacheable(response)
    return list(CATALOG.values())


@app.get("/products/{sku}")
def get_product(sku: str, response: Response) -> Product:
    product = CATALOG.get(sku)
    if product is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, detail="unknown sku")
    cacheable(response, f"product-{sku}")
    return product


@app.get("/prices/{sku}")
def get_price(sku: str, response: Response) -> Price:
    if sku not in PRICES_CENTS:
        raise HTTPException(status.HTTP_404_NOT_FOUND, detail="unknown sku")
    cacheable(response, f"product-{sku}")
    return Price(sku=sku, price_cents=PRICES_CENTS[sku])


def insert_sale(conn: sqlite3.Connection, record: Sale) -> None:
    """Write one sale (not committed: the caller's transaction commits it)."""
    conn.execute(
        "INSERT INTO sales (sale_id, region, store_id, sku, quantity,"
        " unit_price_cents, total_cents, created_at)"
        " VALUES (:sale_id, :region, :store_id, :sku, :quantity,"
        " :unit_price_cents, :total_cents, :created_at)",
        record.model_dump(),
    )


@app.post("/sales", status_code=status.HTTP_201_CREATED, response_model=Sale)
def record_sale(sale: SaleIn, idem: IdempotentRequest = Depends(IdempotencyKey())) -> Response:
    # Sync endpoints run in FastAPI's thread pool, so blocking sqlite3 calls
    # do not stall the event loop.
    def apply() -> Response:
        record = Sale(
            **sale.model_dump(),
            sale_id=uuid.uuid4().hex,
            region=REGION,
            total_cents=sale.quantity * sale.unit_price_cents,
            created_at=datetime.now(timezone.utc).isoformat(),
        )
        insert_sale(conn, record)
        return JSONResponse(record.model_dump(), status_code=status.HTTP_201_CREATED)

    # Without an Idempotency-Key this is a plain insert + commit. With one, run_once opens the
    # transaction (BEGIN IMMEDIATE), replays the stored response if the key is already known,
    # and otherwise commits the sale and the key's record together: no crash can leave a sale
    # whose key is forgotten (which a redelivery would insert again) or the reverse.
    with closing(connect()) as conn:
        return SALES_IDEMPOTENCY.run_once(conn, idem, apply)


@app.get("/sales")
def list_sales() -> list[Sale]:
    with closing(connect()) as conn:
        rows = conn.execute(
            "SELECT sale_id, region, store_id, sku, quantity, unit_price_cents,"
            " total_cents, created_at FROM sales ORDER BY id DESC LIMIT 100"
        ).fetchall()
    return [Sale(**dict(row)) for row in rows]


def _count_sales() -> int:
    with closing(connect()) as conn:
        (n,) = conn.execute("SELECT COUNT(*) FROM sales").fetchone()
    return n


@app.get("/sales/count")
def count_sales() -> dict[str, int]:
    """How many sales are stored (e.g. to check that redelivered sales were applied once)."""
    return {"count": _count_sales()}


@app.websocket("/live/sales")
async def live_sales(ws: WebSocket) -> None:
    """A store dashboard's live feed: ``{"region", "sales"}``, the number of sales stored, on
    connect and whenever it changes (looked at twice a second), until the client leaves.
    Through the edge it is a WebSocket like any other: the node sends the handshake to the
    nearest healthy region and carries the frames both ways."""
    await ws.accept()
    last = None
    while True:
        n = await asyncio.to_thread(_count_sales)
        if n != last:
            await ws.send_json({"region": REGION, "sales": n})
            last = n
        try:
            message = await asyncio.wait_for(ws.receive(), timeout=0.5)
        except asyncio.TimeoutError:
            continue
        if message["type"] == "websocket.disconnect":
            return


# --- analytics ---------------------------------------------------------------


class TypeSummary(BaseModel):
    count: int = Field(ge=0)
    sum: float = 0.0
    keys: int = Field(default=0, ge=0)
    top: dict[str, int] = {}
    other: int = Field(default=0, ge=0)


class AnalyticsSummary(BaseModel):
    node: str = Field(min_length=1)
    region: str | None = None
    window_start_ms: int = Field(ge=0)
    window_ms: int = Field(gt=0)
    version: int = Field(default=1, ge=1)
    events: int = Field(default=0, ge=0)
    types: dict[str, TypeSummary]


@app.post("/analytics/summaries")
def receive_summary(summary: AnalyticsSummary) -> dict:
    """Upsert one edge's summary of one window; a re-send replaces, never adds."""
    types = json.dumps({k: v.model_dump() for k, v in summary.types.items()}, sort_keys=True)
    now = datetime.now(timezone.utc).isoformat()
    with closing(connect()) as conn, conn:
        cur = conn.execute(
            """INSERT INTO analytics_summaries
                   (node, window_start_ms, window_ms, version, region, events, types, received_at)
               VALUES (?, ?, ?, ?, ?, ?, ?, ?)
               ON CONFLICT (node, window_start_ms) DO UPDATE SET
                   window_ms = excluded.window_ms, version = excluded.version,
                   region = excluded.region, events = excluded.events,
                   types = excluded.types, received_at = excluded.received_at
               WHERE excluded.version >= analytics_summaries.version""",
            (
                summary.node,
                summary.window_start_ms,
                summary.window_ms,
                summary.version,
                summary.region,
                summary.events,
                types,
                now,
            ),
        )
        stored = cur.rowcount > 0
    return {"node": summary.node, "window_start_ms": summary.window_start_ms, "stored": stored}


@app.get("/analytics/totals")
def analytics_totals() -> dict:
    """Events per type (count and sum) across every node and window received."""
    totals: dict[str, dict[str, float]] = {}
    events = summaries = 0
    nodes: set[str] = set()
    with closing(connect()) as conn:
        for row in conn.execute("SELECT node, events, types FROM analytics_summaries"):
            summaries += 1
            events += row["events"]
            nodes.add(row["node"])
            for kind, t in json.loads(row["types"]).items():
                acc = totals.setdefault(kind, {"count": 0, "sum": 0.0})
                acc["count"] += t["count"]
                acc["sum"] += t["sum"]
    return {"events": events, "summaries": summaries, "nodes": sorted(nodes), "types": totals}
