"""Invalidator against a real nats-server 2.15.1 (JetStream): stream creation, the message on the
wire, dedupe, and the failure modes (nothing to invalidate, unreachable server, no JetStream)."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import socket
import threading
import time
from typing import Any

import nats
import pytest
from fastapi import FastAPI, Request
from fastapi.testclient import TestClient
from outpost_nats_testkit import NATS_SERVER_VERSION, NatsServer, free_port, nats_server_version

from outpost_fastapi import InvalidationError, Invalidator, invalidator_lifespan
from outpost_fastapi._invalidate import STREAM, SUBJECT, stream_config

NS = 1_000_000_000


def run(coro):
    return asyncio.run(coro)


async def raw_stream_info(url: str) -> dict[str, Any]:
    """The stream's info as the server sends it (durations in nanoseconds), or {} if absent."""
    nc = await nats.connect(url, connect_timeout=2, allow_reconnect=False)
    try:
        msg = await nc.request(f"$JS.API.STREAM.INFO.{STREAM}", b"", timeout=2)
        resp = json.loads(msg.data)
        return {} if "error" in resp else resp
    finally:
        await nc.close()


async def stored_messages(url: str) -> list[Any]:
    nc = await nats.connect(url, connect_timeout=2, allow_reconnect=False)
    try:
        js = nc.jetstream(timeout=2)
        info = await js.stream_info(STREAM)
        return [await js.get_msg(STREAM, seq) for seq in range(info.state.first_seq, info.state.last_seq + 1)]
    finally:
        await nc.close()


async def create_stream(url: str, **overrides: Any) -> Any:
    nc = await nats.connect(url, connect_timeout=2, allow_reconnect=False)
    try:
        return await nc.jetstream(timeout=2).add_stream(config=stream_config().evolve(**overrides))
    finally:
        await nc.close()


def test_the_server_is_the_pinned_wheel_binary():
    assert nats_server_version() == NATS_SERVER_VERSION


def test_purge_creates_the_stream_with_the_contract_config(nats_server: NatsServer):
    async def main():
        assert await raw_stream_info(nats_server.url) == {}
        async with await Invalidator.connect(nats_server.url, source="catalog") as inv:
            seq = await inv.purge(tags=["product:42"])
        return seq, await raw_stream_info(nats_server.url)

    seq, info = run(main())
    assert seq == 1
    config = info["config"]
    assert config["name"] == "OUTPOST_INVALIDATIONS"
    assert config["subjects"] == ["outpost.invalidate"]
    assert config["retention"] == "limits"
    assert config["max_age"] == 24 * 3600 * NS
    assert config["storage"] == "file"
    assert config["discard"] == "old"
    assert config["duplicate_window"] == 120 * NS
    assert info["state"]["messages"] == 1


def test_the_message_carries_the_json_body_and_a_msg_id(nats_server: NatsServer):
    async def main():
        async with await Invalidator.connect(nats_server.url, source="catalog-api") as inv:
            before = time.time() * 1000
            s1 = await inv.purge(
                urls=["shop.example.com/products/42?color=red", "https://shop.example.com/products/42"],
                prefixes=["shop.example.com/products/", "/api/v2/"],
                tags=["product:42", "catalog"],
            )
            s2 = await inv.purge(tags=["product:43"], soft=True)
            after = time.time() * 1000
        return (s1, s2), await stored_messages(nats_server.url), before, after

    seqs, msgs, before, after = run(main())
    assert seqs == (1, 2)
    assert [m.subject for m in msgs] == [SUBJECT, SUBJECT] == ["outpost.invalidate"] * 2
    first, second = (json.loads(m.data.decode("utf-8")) for m in msgs)
    assert set(first) == {"urls", "prefixes", "tags", "soft", "source", "at"}
    assert first["urls"] == ["shop.example.com/products/42?color=red", "https://shop.example.com/products/42"]
    assert first["prefixes"] == ["shop.example.com/products/", "/api/v2/"]
    assert first["tags"] == ["product:42", "catalog"]
    assert first["soft"] is False
    assert first["source"] == "catalog-api"
    assert isinstance(first["at"], (int, float)) and before - 1 <= first["at"] <= after + 1
    assert second == {
        "urls": [],
        "prefixes": [],
        "tags": ["product:43"],
        "soft": True,
        "source": "catalog-api",
        "at": second["at"],
    }
    ids = [m.headers["Nats-Msg-Id"] for m in msgs]
    for msg_id in ids:
        assert re.fullmatch(r"[0-9a-f]{12}4[0-9a-f]{3}[89ab][0-9a-f]{15}", msg_id), msg_id  # uuid4 hex
    assert ids[0] != ids[1]


def test_non_ascii_is_sent_as_utf8(nats_server: NatsServer):
    async def main():
        async with await Invalidator.connect(nats_server.url, source="Katalog ü") as inv:
            await inv.purge(urls=["shop.example.com/produkte/grün"])
        return await stored_messages(nats_server.url)

    (msg,) = run(main())
    assert "grün".encode() in msg.data
    body = json.loads(msg.data.decode("utf-8"))
    assert body["urls"] == ["shop.example.com/produkte/grün"] and body["source"] == "Katalog ü"


def test_default_source_is_the_host_name(nats_server: NatsServer):
    async def main():
        async with await Invalidator.connect(nats_server.url) as inv:
            await inv.purge(tags=["t"])
        return await stored_messages(nats_server.url)

    (msg,) = run(main())
    assert json.loads(msg.data)["source"] == socket.gethostname()


def test_publishing_with_an_existing_stream(nats_server: NatsServer):
    async def main():
        async with await Invalidator.connect(nats_server.url, source="a") as inv:
            assert await inv.purge(tags=["one"]) == 1
        created = (await raw_stream_info(nats_server.url))["created"]
        # A second process (new connection) finds the stream and publishes into it.
        async with await Invalidator.connect(nats_server.url, source="b") as inv:
            assert await inv.purge(tags=["two"]) == 2
            assert await inv.purge(urls=["h/x"]) == 3
        info = await raw_stream_info(nats_server.url)
        return created, info

    created, info = run(main())
    assert info["created"] == created
    assert info["state"]["messages"] == 3


def test_a_stream_created_by_someone_else_with_the_same_config_is_reused(nats_server: NatsServer):
    async def main():
        await create_stream(nats_server.url)
        before = await raw_stream_info(nats_server.url)
        async with await Invalidator.connect(nats_server.url, source="catalog") as inv:
            seq = await inv.purge(prefixes=["/"])
        return before, seq, await raw_stream_info(nats_server.url)

    before, seq, after = run(main())
    assert seq == 1
    assert after["created"] == before["created"]
    assert after["config"] == before["config"]
    assert after["state"]["messages"] == 1


def test_a_stream_with_another_config_is_left_alone(nats_server: NatsServer, caplog):
    async def main():
        await create_stream(nats_server.url, max_age=3600.0, duplicate_window=30.0)
        before = await raw_stream_info(nats_server.url)
        async with await Invalidator.connect(nats_server.url, source="catalog") as inv:
            seq = await inv.purge(tags=["x"])
        return before, seq, await raw_stream_info(nats_server.url)

    with caplog.at_level(logging.WARNING, logger="outpost_fastapi"):
        before, seq, after = run(main())
    assert seq == 1
    assert after["config"] == before["config"]
    assert after["config"]["max_age"] == 3600 * NS
    assert "another configuration" in caplog.text and "max_age" in caplog.text


def test_a_stream_deleted_after_the_first_purge_is_recreated(nats_server: NatsServer):
    async def main():
        async with await Invalidator.connect(nats_server.url, source="catalog") as inv:
            await inv.purge(tags=["a"])
            nc = await nats.connect(nats_server.url, allow_reconnect=False)
            await nc.jetstream(timeout=2).delete_stream(STREAM)
            await nc.close()
            seq = await inv.purge(tags=["b"])
        return seq, await stored_messages(nats_server.url)

    seq, msgs = run(main())
    assert seq == 1
    assert [json.loads(m.data)["tags"] for m in msgs] == [["b"]]


def test_a_retry_with_the_same_msg_id_is_stored_once(nats_server: NatsServer):
    async def main():
        async with await Invalidator.connect(nats_server.url, source="catalog") as inv:
            first = await inv.purge(tags=["a"], msg_id="order-7-update")
            again = await inv.purge(tags=["a"], msg_id="order-7-update")
            other = await inv.purge(tags=["a"])
        return first, again, other, await raw_stream_info(nats_server.url)

    first, again, other, info = run(main())
    assert first == again == 1
    assert other == 2
    assert info["state"]["messages"] == 2


@pytest.mark.parametrize(
    "kwargs",
    [{}, {"urls": [], "prefixes": [], "tags": []}, {"urls": (), "soft": True}, {"tags": iter(())}],
)
def test_an_empty_purge_raises_value_error(nats_server: NatsServer, kwargs):
    async def main():
        async with await Invalidator.connect(nats_server.url, source="catalog") as inv:
            with pytest.raises(ValueError, match="nothing to invalidate"):
                await inv.purge(**kwargs)
        return await raw_stream_info(nats_server.url)

    assert run(main()) == {}  # nothing was published, not even the stream created


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"tags": "product:42"}, TypeError, "list of strings"),
        ({"urls": [b"h/x"]}, TypeError, "must contain strings"),
        ({"tags": [""]}, ValueError, "empty string"),
        ({"tags": ["two words"]}, ValueError, "whitespace"),
        ({"urls": ["h/x\n"]}, ValueError, "whitespace"),
        ({"urls": ["/products/42"]}, ValueError, "needs a host"),
        ({"urls": ["ftp://h/x"]}, ValueError, "http"),
        ({"urls": ["https:///x"]}, ValueError, "http"),
        ({"prefixes": ["https://h/x/"]}, ValueError, "no scheme"),
        ({"tags": ["t"], "soft": "yes"}, TypeError, "soft"),
    ],
)
def test_bad_arguments_are_refused_before_publishing(nats_server: NatsServer, kwargs, error, match):
    async def main():
        async with await Invalidator.connect(nats_server.url, source="catalog") as inv:
            with pytest.raises(error, match=match):
                await inv.purge(**kwargs)
        return await raw_stream_info(nats_server.url)

    assert run(main()) == {}


def test_an_unreachable_server_raises_a_clear_error_within_the_timeout():
    url = f"nats://127.0.0.1:{free_port()}"  # nothing listens there
    started = time.monotonic()
    with pytest.raises(InvalidationError) as e:
        run(Invalidator.connect(url, connect_timeout=0.5))
    elapsed = time.monotonic() - started
    assert elapsed < 0.5 + 0.5, elapsed
    message = str(e.value)
    assert url in message and "NATS URL" in message
    assert "within 0.5 s" in message
    assert "ConnectionRefusedError" in message  # the last attempt's error is named


def test_a_server_that_never_answers_raises_within_the_timeout():
    """A port that accepts connections but never sends NATS's INFO (e.g. the wrong service)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    accepted: list[socket.socket] = []
    stop = threading.Event()

    def accept():
        listener.settimeout(0.05)
        while not stop.is_set():
            try:
                accepted.append(listener.accept()[0])
            except OSError:
                pass

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    url = f"nats://127.0.0.1:{listener.getsockname()[1]}"
    try:
        started = time.monotonic()
        with pytest.raises(InvalidationError, match="within 0.4 s.*: check the NATS URL"):
            run(Invalidator.connect(url, connect_timeout=0.4))
        elapsed = time.monotonic() - started
        assert elapsed < 0.4 + 0.5, elapsed
    finally:
        stop.set()
        thread.join(2)
        for s in accepted:
            s.close()
        listener.close()


def test_a_server_without_jetstream_raises_a_clear_error(nats_server_no_jetstream: NatsServer):
    async def main():
        async with await Invalidator.connect(nats_server_no_jetstream.url, source="catalog") as inv:
            started = time.monotonic()
            with pytest.raises(InvalidationError, match="JetStream is enabled") as e:
                await inv.purge(tags=["x"], timeout=1.0)
            return time.monotonic() - started, e.value

    elapsed, err = run(main())
    assert elapsed < 1.0 + 0.5, elapsed
    assert nats_server_no_jetstream.url in str(err)


def test_a_server_gone_after_connecting_raises_within_the_timeout(nats_server: NatsServer):
    async def main():
        async with await Invalidator.connect(nats_server.url, source="catalog") as inv:
            assert await inv.purge(tags=["a"]) == 1
            nats_server.stop()
            started = time.monotonic()
            with pytest.raises(InvalidationError, match="JetStream") as e:
                await inv.purge(tags=["b"], timeout=0.5)
            return time.monotonic() - started, e.value

    elapsed, err = run(main())
    assert elapsed < 0.5 + 0.5, elapsed
    assert "NATS URL" in str(err) or "closed" in str(err)


def test_close_is_idempotent_and_a_closed_invalidator_refuses(nats_server: NatsServer):
    async def main():
        inv = await Invalidator.connect(nats_server.url, source="catalog")
        assert inv.is_connected
        await inv.close()
        await inv.close()
        assert not inv.is_connected
        with pytest.raises(InvalidationError, match="closed"):
            await inv.purge(tags=["x"])

    run(main())


def test_concurrent_first_purges_share_one_stream_check(nats_server: NatsServer):
    async def main():
        async with await Invalidator.connect(nats_server.url, source="catalog") as inv:
            seqs = await asyncio.gather(*(inv.purge(tags=[f"t{i}"]) for i in range(20)))
        return seqs, await raw_stream_info(nats_server.url)

    seqs, info = run(main())
    assert sorted(seqs) == list(range(1, 21))
    assert info["state"]["messages"] == 20


def test_the_fastapi_lifespan_connects_and_routes_purge(nats_server: NatsServer):
    app = FastAPI(lifespan=invalidator_lifespan(nats_server.url, source="catalog"))

    @app.put("/products/{pid}")
    async def update_product(pid: int, request: Request):
        seq = await request.app.state.invalidator.purge(
            tags=[f"product:{pid}"], urls=[f"shop.example.com/products/{pid}"]
        )
        return {"seq": seq}

    with TestClient(app) as client:
        # ensure_stream at startup: the stream exists before the first purge.
        assert run(raw_stream_info(nats_server.url))["state"]["messages"] == 0
        assert client.put("/products/42").json() == {"seq": 1}
        inv = app.state.invalidator
        assert inv.is_connected
    assert not inv.is_connected  # closed at shutdown

    (msg,) = run(stored_messages(nats_server.url))
    body = json.loads(msg.data)
    assert body["tags"] == ["product:42"] and body["urls"] == ["shop.example.com/products/42"]
    assert body["source"] == "catalog"


def test_the_lifespan_fails_fast_without_jetstream(nats_server_no_jetstream: NatsServer):
    app = FastAPI(lifespan=invalidator_lifespan(nats_server_no_jetstream.url, timeout=0.5))
    with pytest.raises(InvalidationError, match="JetStream is enabled"):
        with TestClient(app):
            pass
