"""Outpost guest function in Python, built with componentize-py against the
`outpost:functions/edge` world (../wit):

    componentize-py -d ../wit -w edge componentize app -o app.wasm

Any request -> 200 application/json:
    {"hello": "from python", "path": ..., "request_id": ..., "country": ...,
     "greeting": <wasi:config get("greeting") or null>,
     "visits": <wasi:keyvalue atomics increment of "visits" by 1>}

A failing store or config does not fail the request: the value is null and the
error text is added under "errors".
"""

import json

from componentize_py_types import Err, Ok
from wit_world import exports
from wit_world.imports import atomics, wasi_config_store, wasi_keyvalue_store
from wit_world.imports.types import (
    Fields,
    IncomingRequest,
    OutgoingBody,
    OutgoingResponse,
    ResponseOutparam,
)

# outgoing stream writes are limited to 4096 bytes per blocking_write_and_flush
CHUNK = 4096


def header(request: IncomingRequest, name: str) -> str | None:
    for key, value in request.headers().entries():
        if key == name:
            return value.decode("utf-8", "replace")
    return None


def visits(errors: list[str]) -> int | None:
    try:
        with wasi_keyvalue_store.open("") as bucket:
            return atomics.increment(bucket, "visits", 1)
    except Err as e:
        errors.append(f"wasi:keyvalue: {e.value!r}")
        return None


def greeting(errors: list[str]) -> str | None:
    try:
        return wasi_config_store.get("greeting")
    except Err as e:
        errors.append(f"wasi:config: {e.value!r}")
        return None


class IncomingHandler(exports.IncomingHandler):
    def handle(self, request: IncomingRequest, response_out: ResponseOutparam) -> None:
        errors: list[str] = []
        doc = {
            "hello": "from python",
            "path": request.path_with_query() or "/",
            "request_id": header(request, "x-request-id"),
            "country": header(request, "x-outpost-geo-country"),
            "greeting": greeting(errors),
            "visits": visits(errors),
        }
        if errors:
            doc["errors"] = errors
        payload = json.dumps(doc).encode()

        response = OutgoingResponse(Fields.from_list([("content-type", b"application/json")]))
        response.set_status_code(200)
        body = response.body()
        ResponseOutparam.set(response_out, Ok(response))
        with body.write() as stream:  # the child stream must be dropped before finish
            for i in range(0, len(payload), CHUNK):
                stream.blocking_write_and_flush(payload[i : i + CHUNK])
        OutgoingBody.finish(body, None)
