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
