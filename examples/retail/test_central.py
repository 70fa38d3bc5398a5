"""Tests for the retail central app (run: .venv/bin/python -m pytest examples/retail)."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

import central


@pytest.fixture
def client(tmp_path, monkeypatch):
    monkeypatch.setattr(central, "SALES_DB", str(tmp_path / "sales.db"))
    with TestClient(central.app) as client:  # `with` runs the lifespan (creates the table)
        yield client


def test_healthz(client):
    r = client.get("/healthz")
    assert r.status_code == 200
    assert r.json() == {"status": "ok", "region": central.REGION}


def test_every_response_has_region_header(client):
    for path in ["/healthz", "/products", "/products/nope", "/sales"]:
        assert client.get(path).headers["x-origin-region"] == central.REGION
    assert client.post("/sales", json={}).headers["x-origin-region"] == central.REGION


def test_products(client):
    r = client.get("/products")
    assert r.status_code == 200
    products = r.json()
    assert len(products) >= 6
    assert all(set(p) == {"sku", "name", "category"} for p in products)

    sku = products[0]["sku"]
    r = client.get(f"/products/{sku}")
    assert r.status_code == 200
    assert r.json() == products[0]


def test_catalog_is_cacheable_with_surrogate_keys(client):
    r = client.get("/products")
    assert "max-age=30" in r.headers["cache-control"]
    assert r.headers["surrogate-key"] == "catalog"
    sku = r.json()[0]["sku"]
    r = client.get(f"/prices/{sku}")
    assert r.headers["surrogate-key"] == f"catalog product-{sku}"
    assert "cache-control" not in client.get("/sales").headers
    assert "cache-control" not in client.get("/products/nope").headers


def test_unknown_product_is_404(client):
    r = client.get("/products/NOPE-999")
    assert r.status_code == 404
    assert r.json() == {"detail": "unknown sku"}


def test_prices(client):
    r = client.get("/prices/TEA-001")
    assert r.status_code == 200
    body = r.json()
    assert body["sku"] == "TEA-001"
    assert body["currency"] == "USD"
    assert isinstance(body["price_cents"], int) and body["price_cents"] > 0

    r = client.get("/prices/NOPE-999")
    assert r.status_code == 404
    assert r.json() == {"detail": "unknown sku"}


def test_every_product_has_a_price(client):
    for product in client.get("/products").json():
        assert client.get(f"/prices/{product['sku']}").status_code == 200


def test_record_and_list_sales(client):
    assert client.get("/sales").json() == []

    first = {"store_id": "store-1", "sku": "TEA-001", "quantity": 2, "unit_price_cents": 699}
    second = {"store_id": "store-2", "sku": "MUG-003", "quantity": 1, "unit_price_cents": 0}
    r1 = client.post("/sales", json=first)
    r2 = client.post("/sales", json=second)
    assert r1.status_code == r2.status_code == 201

    sale = r1.json()
    assert sale["region"] == central.REGION
    assert sale["sale_id"]
    assert sale["total_cents"] == 2 * 699
    assert {k: sale[k] for k in first} == first
    assert r1.json()["sale_id"] != r2.json()["sale_id"]

    listed = client.get("/sales").json()
    assert [s["sale_id"] for s in listed] == [r2.json()["sale_id"], r1.json()["sale_id"]]
    assert listed[1] == sale


@pytest.mark.parametrize(
    "body",
    [
        {},
        {"store_id": "s", "sku": "TEA-001", "quantity": 0, "unit_price_cents": 1},
        {"store_id": "s", "sku": "TEA-001", "quantity": -3, "unit_price_cents": 1},
        {"store_id": "s", "sku": "TEA-001", "quantity": 1, "unit_price_cents": -1},
        {"store_id": "s", "sku": "TEA-001", "quantity": "many", "unit_price_cents": 1},
        {"sku": "TEA-001", "quantity": 1, "unit_price_cents": 1},
    ],
)
def test_invalid_sale_is_422(client, body):
    r = client.post("/sales", json=body)
    assert r.status_code == 422
    assert "detail" in r.json()
    assert client.get("/sales").json() == []


def test_sales_survive_restart(client):
    client.post("/sales", json={"store_id": "s", "sku": "KTL-004", "quantity": 1, "unit_price_cents": 3999})
    with TestClient(central.app) as again:
        assert len(again.get("/sales").json()) == 1


def test_whoami_requires_an_edge_identity(client):
    assert client.get("/whoami").status_code == 401
    forged = client.get("/whoami", headers={"x-outpost-identity": "eyJhbGciOiJub25lIn0.e30."})
    assert forged.status_code == 401


# --- Idempotency-Key: sales redelivered by an edge's outbox are applied once ----------------------

SALE = {"store_id": "store-7", "sku": "COF-002", "quantity": 3, "unit_price_cents": 2499}
KEY = {"Idempotency-Key": "outbox-01JH3Q7Z9XK2"}


def stored_keys() -> list[tuple[str, str, int]]:
    import sqlite3
    from contextlib import closing

    with closing(sqlite3.connect(central.SALES_DB)) as conn:
        return conn.execute("SELECT key, state, status FROM outpost_idempotency").fetchall()


def test_sales_count(client):
    assert client.get("/sales/count").json() == {"count": 0}
    client.post("/sales", json=SALE)
    client.post("/sales", json=SALE)
    assert client.get("/sales/count").json() == {"count": 2}


def test_sale_with_a_key_is_applied_once_and_replayed(client):
    first = client.post("/sales", json=SALE, headers=KEY)
    again = client.post("/sales", json=SALE, headers=KEY)
    assert first.status_code == again.status_code == 201
    assert again.json() == first.json()
    assert again.json()["sale_id"] == first.json()["sale_id"]
    assert "idempotent-replayed" not in first.headers
    assert again.headers["idempotent-replayed"] == "true"
    assert again.headers["x-origin-region"] == central.REGION
    assert client.get("/sales/count").json() == {"count": 1}
    assert stored_keys() == [(KEY["Idempotency-Key"], "done", 201)]
    # Another key is another sale; no key keeps the old behaviour (every POST is a sale).
    other = client.post("/sales", json=SALE, headers={"Idempotency-Key": "outbox-2"})
    assert other.json()["sale_id"] != first.json()["sale_id"]
    client.post("/sales", json=SALE)
    assert client.get("/sales/count").json() == {"count": 3}


def test_sale_key_reused_for_another_sale_is_422(client):
    client.post("/sales", json=SALE, headers=KEY)
    r = client.post("/sales", json={**SALE, "quantity": 4}, headers=KEY)
    assert r.status_code == 422
    assert r.headers["content-type"] == "application/problem+json"
    assert r.json()["title"] == "Idempotency-Key reused for a different request"
    assert client.get("/sales/count").json() == {"count": 1}


def test_invalid_sale_with_a_key_is_not_remembered(client):
    assert client.post("/sales", json={}, headers=KEY).status_code == 422
    assert stored_keys() == []
    assert client.post("/sales", json=SALE, headers=KEY).status_code == 201


def test_failure_after_the_insert_stores_neither_sale_nor_key(tmp_path, monkeypatch):
    # The sale row was written, then the request fails before the commit: the transaction
    # holding both the row and the key is rolled back, so the redelivery applies the sale once.
    monkeypatch.setattr(central, "SALES_DB", str(tmp_path / "sales.db"))
    real_insert = central.insert_sale

    def insert_then_crash(conn, record):
        real_insert(conn, record)
        raise RuntimeError("crash after the insert, before the commit")

    with TestClient(central.app, raise_server_exceptions=False) as client:
        monkeypatch.setattr(central, "insert_sale", insert_then_crash)
        assert client.post("/sales", json=SALE, headers=KEY).status_code == 500
        assert client.get("/sales/count").json() == {"count": 0}
        assert stored_keys() == []

        monkeypatch.setattr(central, "insert_sale", real_insert)
        r = client.post("/sales", json=SALE, headers=KEY)
        assert r.status_code == 201 and "idempotent-replayed" not in r.headers
        assert client.get("/sales/count").json() == {"count": 1}


def test_failed_commit_stores_neither_sale_nor_key(tmp_path, monkeypatch):
    # Both the sale and the key's record are written; the COMMIT itself fails (disk full, kill):
    # neither is kept.
    import sqlite3

    monkeypatch.setattr(central, "SALES_DB", str(tmp_path / "sales.db"))
    real_connect = central.connect
    fail = {"commit": False}
    seen_in_transaction = []

    class FailingCommit(sqlite3.Connection):
        def commit(self):
            if fail["commit"] and self.in_transaction:
                seen_in_transaction.append(
                    [self.execute(f"SELECT COUNT(*) FROM {t}").fetchone()[0] for t in ("sales", "outpost_idempotency")]
                )
                raise sqlite3.OperationalError("disk I/O error (simulated)")
            super().commit()

    def connect():
        conn = sqlite3.connect(central.SALES_DB, timeout=5.0, factory=FailingCommit)
        conn.row_factory = sqlite3.Row
        return conn

    with TestClient(central.app, raise_server_exceptions=False) as client:
        monkeypatch.setattr(central, "connect", connect)
        fail["commit"] = True
        assert client.post("/sales", json=SALE, headers=KEY).status_code == 500
        fail["commit"] = False
        assert seen_in_transaction == [[1, 1]]  # the sale and the key, in one transaction
        assert client.get("/sales/count").json() == {"count": 0}
        assert stored_keys() == []
        monkeypatch.setattr(central, "connect", real_connect)
        assert client.post("/sales", json=SALE, headers=KEY).status_code == 201
        assert client.post("/sales", json=SALE, headers=KEY).headers["idempotent-replayed"] == "true"
        assert client.get("/sales/count").json() == {"count": 1}


def test_concurrent_deliveries_of_one_sale_insert_one_row(client):
    import threading

    barrier = threading.Barrier(8)
    results = []

    def deliver():
        barrier.wait()
        results.append(client.post("/sales", json=SALE, headers=KEY))

    threads = [threading.Thread(target=deliver) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [r.status_code for r in results] == [201] * 8
    assert len({r.json()["sale_id"] for r in results}) == 1
    assert client.get("/sales/count").json() == {"count": 1}


def test_sale_key_survives_restart(client):
    first = client.post("/sales", json=SALE, headers=KEY)
    with TestClient(central.app) as again:
        r = again.post("/sales", json=SALE, headers=KEY)
    assert r.json()["sale_id"] == first.json()["sale_id"]
    assert r.headers["idempotent-replayed"] == "true"


def _summary(node: str, start: int, count: int, version: int = 1) -> dict:
    return {
        "node": node,
        "region": "ap-northeast",
        "window_start_ms": start,
        "window_ms": 60_000,
        "version": version,
        "events": count,
        "types": {
            "page_view": {
                "count": count,
                "sum": float(count),
                "keys": 2,
                "top": {"/products/1": count - 1},
                "other": 1,
            }
        },
    }


def test_analytics_summary_sent_twice_is_counted_once(client):
    s = _summary("edge-1", 1_732_350_000_000, 10)
    for _ in range(2):
        r = client.post("/analytics/summaries", json=s)
        assert r.status_code == 200
    client.post("/analytics/summaries", json=_summary("edge-2", 1_732_350_000_000, 5))
    totals = client.get("/analytics/totals").json()
    assert totals["types"] == {"page_view": {"count": 15, "sum": 15.0}}
    assert totals["events"] == 15
    assert totals["summaries"] == 2
    assert totals["nodes"] == ["edge-1", "edge-2"]


def test_analytics_newer_version_replaces_and_older_is_ignored(client):
    start = 1_732_350_060_000
    client.post("/analytics/summaries", json=_summary("edge-1", start, 10))
    r = client.post("/analytics/summaries", json=_summary("edge-1", start, 12, version=2))
    assert r.json()["stored"] is True
    r = client.post("/analytics/summaries", json=_summary("edge-1", start, 10, version=1))
    assert r.json()["stored"] is False
    assert client.get("/analytics/totals").json()["types"]["page_view"]["count"] == 12


def test_analytics_summary_must_be_well_formed(client):
    bad = _summary("edge-1", 0, 1)
    del bad["types"]
    assert client.post("/analytics/summaries", json=bad).status_code == 422



def test_live_sales_feed_follows_new_sales(client):
    with client.websocket_connect("/live/sales") as ws:
        assert ws.receive_json() == {"region": central.REGION, "sales": 0}
        sale = {"store_id": "store-1", "sku": "TEA-001", "quantity": 1, "unit_price_cents": 450}
        assert client.post("/sales", json=sale).status_code == 201
        assert ws.receive_json() == {"region": central.REGION, "sales": 1}
