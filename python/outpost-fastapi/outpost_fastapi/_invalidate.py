"""Center -> edge cache invalidations, published to NATS JetStream (the ``nats`` extra).

The edge nodes consume the stream ``OUTPOST_INVALIDATIONS`` (subject ``outpost.invalidate``);
this module is the publishing side: one JSON message per :meth:`Invalidator.purge`, published
with JetStream so that the call returns only once the server has stored it (the PubAck), with a
``Nats-Msg-Id`` header so that a retried publish is stored once.

``nats-py`` is imported lazily: ``import outpost_fastapi`` works without it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from nats.aio.client import Client as NATSClient
    from nats.js.api import StreamConfig

__all__ = [
    "DUPLICATE_WINDOW",
    "MAX_AGE",
    "STREAM",
    "SUBJECT",
    "InvalidationError",
    "Invalidator",
    "invalidator_lifespan",
    "stream_config",
]

log = logging.getLogger("outpost_fastapi")

#: JetStream stream the edge nodes consume.
STREAM = "OUTPOST_INVALIDATIONS"
#: Subject the invalidations are published on (the stream's only subject).
SUBJECT = "outpost.invalidate"
#: Seconds a message is kept in the stream (a node offline for longer has to drop its cache).
MAX_AGE = 24 * 3600.0
#: Seconds during which JetStream drops a second message with the same ``Nats-Msg-Id``.
DUPLICATE_WINDOW = 120.0

_NO_STREAM = 10059  # JetStream API err_code: stream not found
_STREAM_NAME_IN_USE = 10058  # JetStream API err_code: stream name already in use (another config)


class InvalidationError(Exception):
    """An invalidation could not be delivered to JetStream (or the connection failed).

    The message says what to check; the underlying nats-py error is the ``__cause__``.
    """


def _missing_nats() -> InvalidationError:
    return InvalidationError(
        "outpost_fastapi.Invalidator needs nats-py: pip install 'outpost-fastapi[nats]' (or nats-py)"
    )


def stream_config() -> StreamConfig:
    """The stream configuration of the wire contract (what :class:`Invalidator` creates)."""
    try:
        from nats.js.api import DiscardPolicy, RetentionPolicy, StorageType, StreamConfig
    except ImportError:
        raise _missing_nats() from None
    return StreamConfig(
        name=STREAM,
        subjects=[SUBJECT],
        retention=RetentionPolicy.LIMITS,
        max_age=MAX_AGE,
        storage=StorageType.FILE,
        discard=DiscardPolicy.OLD,
        duplicate_window=DUPLICATE_WINDOW,
    )


def _config_differences(have: StreamConfig) -> list[str]:
    want = stream_config()
    diffs = []
    for field in ("subjects", "retention", "max_age", "storage", "discard", "duplicate_window"):
        a, b = getattr(have, field), getattr(want, field)
        if isinstance(b, float) and isinstance(a, (int, float)):
            same = abs(a - b) < 1e-6
        else:
            same = a == b
        if not same:
            diffs.append(f"{field}={a!r} (contract: {b!r})")
    return diffs


def _items(name: str, values: Iterable[str]) -> list[str]:
    if isinstance(values, (str, bytes)):
        raise TypeError(
            f"{name} must be a list of strings, not a single {type(values).__name__}: {name}=[{values!r}]"
        )
    out = []
    for v in values:
        if not isinstance(v, str):
            raise TypeError(f"{name} must contain strings, got {type(v).__name__}: {v!r}")
        if not v:
            raise ValueError(f"{name} must not contain an empty string")
        if any(c.isspace() or ord(c) < 0x20 or ord(c) == 0x7F for c in v):
            raise ValueError(f"{name} entry contains whitespace or a control character: {v!r}")
        out.append(v)
    return out


def _check_url(url: str) -> None:
    if "://" in url:
        scheme, _, rest = url.partition("://")
        if scheme.lower() not in ("http", "https") or not rest or rest.startswith("/"):
            raise ValueError(f"urls entry must be host/path?query or an http(s)://host/path URL: {url!r}")
    elif url.startswith("/"):
        raise ValueError(
            f"urls entry needs a host (host/path?query or https://host/path): {url!r}; "
            f"to invalidate a path on every host use prefixes=[{url!r}]"
        )


def _check_prefix(prefix: str) -> None:
    if "://" in prefix:
        raise ValueError(f"prefixes entry must be host/path/ or /path/ (no scheme): {prefix!r}")


def build_message(
    *,
    urls: Iterable[str] = (),
    prefixes: Iterable[str] = (),
    tags: Iterable[str] = (),
    soft: bool = False,
    source: str,
    at: float | None = None,
) -> dict[str, Any]:
    """The JSON body of one invalidation (validated); ``at`` defaults to now (unix ms)."""
    u, p, t = _items("urls", urls), _items("prefixes", prefixes), _items("tags", tags)
    for url in u:
        _check_url(url)
    for prefix in p:
        _check_prefix(prefix)
    if not (u or p or t):
        raise ValueError("nothing to invalidate: give at least one of urls, prefixes or tags")
    if not isinstance(soft, bool):
        raise TypeError(f"soft must be a bool, got {type(soft).__name__}")
    return {
        "urls": u,
        "prefixes": p,
        "tags": t,
        "soft": soft,
        "source": source,
        "at": int(time.time() * 1000) if at is None else at,
    }


class Invalidator:
    """Publishes cache invalidations to the edge fleet over NATS JetStream.

    Create it with ``await Invalidator.connect(...)`` (not the constructor), once per process,
    and close it with ``await inv.close()`` or ``async with``::

        async with await Invalidator.connect("nats://nats.internal:4222", source="catalog") as inv:
            seq = await inv.purge(tags=["product:42"], urls=["shop.example.com/products/42"])
    """

    def __init__(self, nc: NATSClient, *, servers: str | list[str], source: str, timeout: float) -> None:
        self._nc = nc
        self.servers = servers
        self.source = source
        self.timeout = timeout
        self._stream_ready = False
        self._stream_lock = asyncio.Lock()

    @classmethod
    async def connect(
        cls,
        servers: str | list[str] = "nats://127.0.0.1:4222",
        *,
        source: str | None = None,
        connect_timeout: float = 2.0,
        timeout: float = 2.0,
        **nats_options: Any,
    ) -> Invalidator:
        """Connect to NATS (``nats.connect``) within ``connect_timeout`` seconds, in total.

        ``source`` goes into every message (free text: the app's name; default: the host name).
        ``timeout`` is the default for :meth:`purge`. ``nats_options`` are passed to nats-py's
        ``connect`` (credentials, TLS, ...); by default the client reconnects forever once
        connected and reports connection errors as warnings on the ``outpost_fastapi`` logger.
        Raises :class:`InvalidationError` if no server answered in time.
        """
        try:
            from nats.aio.client import Client
        except ImportError:
            raise _missing_nats() from None

        async def error_cb(e: Exception) -> None:
            log.warning("outpost invalidator: NATS connection error: %s", e or type(e).__name__)

        source = source if source is not None else socket.gethostname()
        options: dict[str, Any] = {
            "name": f"outpost-invalidator ({source})",
            "max_reconnect_attempts": -1,
            "error_cb": error_cb,
        }
        options.update(nats_options)
        # nats-py's connect_timeout is per attempt; the deadline below bounds all of them (its own
        # retry loop would otherwise keep trying for max_reconnect_attempts x reconnect_time_wait).
        options["connect_timeout"] = connect_timeout
        nc = Client()
        try:
            await asyncio.wait_for(nc.connect(servers, **options), connect_timeout)
        except BaseException as e:
            last = nc.last_error
            await _close_quietly(nc)
            if not isinstance(e, Exception):
                raise
            if isinstance(e, asyncio.TimeoutError):
                what = "within %.3g s" % connect_timeout
                if last is not None and last is not e:
                    what += f" (last error: {_describe(last)})"
            else:
                what = f"({_describe(e)})"
            raise InvalidationError(
                f"could not connect to NATS at {_servers_text(servers)} {what}: check the NATS URL, "
                f"that nats-server is running and reachable from here, and the credentials if any"
            ) from e
        return cls(nc, servers=servers, source=source, timeout=timeout)

    async def __aenter__(self) -> Invalidator:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def is_connected(self) -> bool:
        return self._nc.is_connected

    async def close(self) -> None:
        """Close the NATS connection (idempotent). Every acknowledged purge is already stored."""
        await _close_quietly(self._nc)

    async def ensure_stream(self, *, timeout: float | None = None) -> None:
        """Make sure the stream ``OUTPOST_INVALIDATIONS`` exists, creating it if it does not.

        An existing stream is used as it is, even with another configuration (a warning is
        logged). :meth:`purge` calls this once by itself; call it at startup to fail fast when
        JetStream is not enabled.
        """
        budget = self.timeout if timeout is None else timeout
        await self._ensure_stream(time.monotonic() + budget, force=True)

    async def purge(
        self,
        urls: Iterable[str] = (),
        prefixes: Iterable[str] = (),
        tags: Iterable[str] = (),
        soft: bool = False,
        *,
        timeout: float | None = None,
        msg_id: str | None = None,
    ) -> int:
        """Invalidate ``urls``, ``prefixes`` and ``tags`` on every edge node; ``soft`` marks stale.

        - ``urls``: ``host/path?query`` or ``https://host/path?query`` (one cached URL each)
        - ``prefixes``: ``host/path/`` (one host) or ``/path/`` (every host)
        - ``tags``: Surrogate-Key tags the origin put on its responses

        Returns the JetStream stream sequence of the stored message once the server has
        acknowledged it. Raises ``ValueError`` / ``TypeError`` for bad arguments (nothing to
        invalidate included) and :class:`InvalidationError` when the message was not
        acknowledged within ``timeout`` seconds (default: the ``timeout`` given to
        :meth:`connect`). ``msg_id`` (the ``Nats-Msg-Id`` header, default a fresh uuid4 hex)
        lets a caller that retries after an error reuse the first attempt's id, so that the
        fleet sees the invalidation once if both attempts were stored (within 2 minutes).
        """
        body = build_message(urls=urls, prefixes=prefixes, tags=tags, soft=soft, source=self.source)
        payload = json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode()
        headers = {"Nats-Msg-Id": msg_id or uuid.uuid4().hex}
        budget = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + budget

        from nats.errors import MaxPayloadError
        from nats.js.errors import NoStreamResponseError

        self._check_open()
        await self._ensure_stream(deadline, force=False)
        for attempt in (1, 2):
            try:
                ack = await self._nc.jetstream().publish(
                    SUBJECT, payload, timeout=_remaining(deadline), stream=STREAM, headers=headers
                )
                return ack.seq
            except NoStreamResponseError as e:
                # Nothing stores outpost.invalidate: the stream was deleted since we checked.
                # Recreate it and publish again (same Nats-Msg-Id).
                if attempt == 1:
                    log.warning("outpost invalidator: no stream for %s; checking %s again", SUBJECT, STREAM)
                    await self._ensure_stream(deadline, force=True)
                    continue
                raise InvalidationError(
                    f"no JetStream stream stores {SUBJECT!r}: the stream {STREAM} exists but does not "
                    f"capture that subject (check its subjects), or JetStream is not enabled"
                ) from e
            except MaxPayloadError as e:
                raise InvalidationError(
                    f"invalidation message of {len(payload)} bytes exceeds the NATS server's max_payload; "
                    f"split it into several purge() calls"
                ) from e
            except Exception as e:
                raise self._failure(f"publishing to {SUBJECT}", e, budget) from e
        raise AssertionError("unreachable")

    # -- internals

    def _check_open(self) -> None:
        if self._nc.is_closed:
            raise InvalidationError("this Invalidator is closed")

    async def _ensure_stream(self, deadline: float, *, force: bool) -> None:
        if self._stream_ready and not force:
            return
        from nats.js.errors import BadRequestError, NotFoundError

        self._check_open()
        async with self._stream_lock:
            if self._stream_ready and not force:
                return
            budget = max(deadline - time.monotonic(), 0.0)
            try:
                try:
                    info = await self._js(deadline).stream_info(STREAM)
                except NotFoundError as e:
                    if e.err_code not in (None, _NO_STREAM):
                        raise
                    try:
                        await self._js(deadline).add_stream(config=stream_config())
                        log.info("outpost invalidator: created JetStream stream %s", STREAM)
                    except BadRequestError as e2:
                        if e2.err_code != _STREAM_NAME_IN_USE:
                            raise
                        # Someone else created it (with another config) in the meantime.
                        info = await self._js(deadline).stream_info(STREAM)
                        self._warn_config(info.config)
                else:
                    self._warn_config(info.config)
            except InvalidationError:
                raise
            except Exception as e:
                raise self._failure(f"checking/creating the stream {STREAM}", e, budget) from e
            self._stream_ready = True

    def _js(self, deadline: float) -> Any:
        return self._nc.jetstream(timeout=_remaining(deadline))

    @staticmethod
    def _warn_config(config: StreamConfig) -> None:
        diffs = _config_differences(config)
        if diffs:
            log.warning(
                "outpost invalidator: stream %s exists with another configuration than the contract's; "
                "left as it is: %s",
                STREAM,
                ", ".join(diffs),
            )

    def _failure(self, doing: str, e: Exception, budget: float) -> InvalidationError:
        import nats.errors
        import nats.js.errors

        where = _servers_text(self.servers)
        if isinstance(e, (asyncio.TimeoutError, nats.errors.TimeoutError)):
            return InvalidationError(
                f"{doing}: no answer from JetStream within {budget:.3g} s: check the NATS URL "
                f"({where}, connected: {self._nc.is_connected}) and that JetStream is enabled "
                f"(nats-server -js, or a jetstream {{}} block in its config)"
            )
        if isinstance(e, (nats.js.errors.ServiceUnavailableError, nats.errors.NoRespondersError)):
            return InvalidationError(
                f"{doing}: the NATS server at {where} does not answer the JetStream API: check that "
                f"JetStream is enabled (nats-server -js, or a jetstream {{}} block in its config) and "
                f"that this account may use it"
            )
        if isinstance(e, (nats.errors.ConnectionClosedError, nats.errors.ConnectionDrainingError)):
            return InvalidationError(f"{doing}: the NATS connection is closed")
        if isinstance(e, nats.js.errors.APIError):
            return InvalidationError(
                f"{doing}: JetStream refused it: {e.description or e} (code={e.code}, err_code={e.err_code})"
            )
        return InvalidationError(f"{doing}: {_describe(e)} (NATS at {where}; is JetStream enabled?)")


def _remaining(deadline: float) -> float:
    # nats-py needs a positive timeout; a spent budget still gets a token wait so the error is
    # a timeout rather than a ValueError.
    return max(deadline - time.monotonic(), 0.001)


def _describe(e: BaseException) -> str:
    text = str(e)
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def _servers_text(servers: str | list[str]) -> str:
    return servers if isinstance(servers, str) else ", ".join(servers)


async def _close_quietly(nc: NATSClient) -> None:
    if nc.is_closed:
        return
    try:
        await nc.close()
    except Exception as e:  # closing must not mask the error that led here
        log.debug("outpost invalidator: error closing the NATS connection: %s", e)


def invalidator_lifespan(
    servers: str | list[str] = "nats://127.0.0.1:4222",
    *,
    state_name: str = "invalidator",
    ensure_stream: bool = True,
    **connect_options: Any,
) -> Callable[[Any], AbstractAsyncContextManager[None]]:
    """A FastAPI/Starlette ``lifespan`` that connects an :class:`Invalidator` at startup.

    It is stored as ``app.state.invalidator`` (``state_name``) and closed at shutdown; with
    ``ensure_stream`` (the default) the stream is checked/created at startup, so a wrong URL or a
    server without JetStream stops the app from starting with a clear error.
    ``connect_options`` go to :meth:`Invalidator.connect` (``source``, ``connect_timeout``,
    ``timeout``, nats-py options)::

        app = FastAPI(lifespan=invalidator_lifespan("nats://nats.internal:4222", source="catalog"))

        @app.put("/products/{pid}")
        async def update_product(pid: int, request: Request):
            ...
            await request.app.state.invalidator.purge(tags=[f"product:{pid}"])
    """

    @asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[None]:
        inv = await Invalidator.connect(servers, **connect_options)
        try:
            if ensure_stream:
                await inv.ensure_stream()
            setattr(app.state, state_name, inv)
            yield
        finally:
            await inv.close()

    return lifespan
