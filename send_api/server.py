"""uvicorn on a thread of its own, on a socket bound before it starts (a taken port stops the worker at once,
with one line): ``drain()`` stops accepting connections and waits for the requests in flight."""

from __future__ import annotations

import logging
import socket
import threading
import time

import uvicorn
from starlette.applications import Starlette

log = logging.getLogger(__name__)

DRAIN_S = 30  # requests in flight get this long after the first SIGTERM (a confirm waits at most 45 s)


def bind(addr: str, port: int) -> socket.socket:
    """A listening TCP socket on ``addr``:``port``. Raises OSError (port taken, address not here)."""
    family = socket.AF_INET6 if ":" in addr else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((addr, port))
        sock.listen(128)
    except OSError:
        sock.close()
        raise
    return sock


class ApiServer:
    """The HTTP server of ``app`` on ``sock``, on its own thread (uvicorn installs no signal handlers there: the
    worker's own handle SIGTERM)."""

    def __init__(self, app: Starlette, sock: socket.socket) -> None:
        self._sock = sock
        config = uvicorn.Config(
            app,
            log_config=None,  # our JSON logging stays; uvicorn's loggers propagate to it
            access_log=False,  # no per-request line: URLs of Kannel requests carry the password
            lifespan="on",
            timeout_graceful_shutdown=DRAIN_S,
            server_header=False,
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._run, name="send-api-http", daemon=True)

    @property
    def port(self) -> int:
        """The port it listens on."""
        return int(self._sock.getsockname()[1])

    def _run(self) -> None:
        try:
            self._server.run(sockets=[self._sock])
        except BaseException:  # a SystemExit of uvicorn's start-up must not end silently
            log.exception("send_api: the HTTP server stopped")

    def start(self, timeout_s: float = 30.0) -> bool:
        """Start serving; whether it serves within ``timeout_s``."""
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while not self._server.started and self._thread.is_alive() and time.monotonic() < deadline:
            self._thread.join(0.05)
        return self._server.started

    def drain(self) -> None:
        """Stop accepting; the requests in flight finish (up to DRAIN_S)."""
        self._server.should_exit = True

    def join(self, timeout_s: float | None = None) -> bool:
        """Wait for the server to end; whether it did."""
        self._thread.join(timeout_s)
        return not self._thread.is_alive()

    @property
    def running(self) -> bool:
        """Whether the server thread still runs."""
        return self._thread.is_alive()

    def close(self) -> None:
        """Close the listening socket."""
        self._sock.close()
