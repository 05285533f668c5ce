"""A threaded loopback TCP proxy a test can cut and restore: an outage of a shared service (PostgreSQL, RabbitMQ)
without stopping the service other tests use.

``cut()`` closes every proxied connection and, until ``restore()``, accepts new ones only to close them at once
(the client sees its connection refused or reset, as when the server is down); the listening port stays the same,
so the clients' URL does not change.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from types import TracebackType

_CHUNK = 65536


class TcpProxy:
    """Forwards ``127.0.0.1:port`` to ``target_host:target_port``; ``with TcpProxy(...) as proxy`` starts and
    closes it."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self._target = (target_host, target_port)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._lock = threading.Lock()
        self._open: set[socket.socket] = set()
        self._cut = False
        self._closed = False
        self.refused = 0  # connections closed at once because the proxy was cut
        self._acceptor = threading.Thread(target=self._accept_loop, name=f"tcp-proxy-{self.port}", daemon=True)

    def __enter__(self) -> TcpProxy:
        self._acceptor.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    @property
    def is_cut(self) -> bool:
        """True between ``cut()`` and ``restore()``."""
        with self._lock:
            return self._cut

    def cut(self) -> None:
        """Close every proxied connection and refuse new ones until ``restore()``."""
        with self._lock:
            self._cut = True
            victims, self._open = self._open, set()
        for sock in victims:
            _close(sock)

    def restore(self) -> None:
        """Proxy new connections again."""
        with self._lock:
            self._cut = False

    def close(self) -> None:
        """Stop listening and close every connection."""
        with self._lock:
            self._closed = True
        self.cut()
        _close(self._listener)
        if self._acceptor.is_alive():
            self._acceptor.join(timeout=5)

    def _accept_loop(self) -> None:
        while True:
            try:
                client, _addr = self._listener.accept()
            except OSError:  # closed
                return
            with self._lock:
                closed, cut = self._closed, self._cut
            if closed:
                _close(client)
                return
            if cut:
                self.refused += 1
                _close(client)
                continue
            self._connect(client)

    def _connect(self, client: socket.socket) -> None:
        try:
            upstream = socket.create_connection(self._target, timeout=10)
        except OSError:
            _close(client)
            return
        upstream.settimeout(None)
        with self._lock:
            if self._cut:  # cut while connecting
                _close(client)
                _close(upstream)
                return
            self._open.update((client, upstream))
        for source, sink in ((client, upstream), (upstream, client)):
            threading.Thread(target=self._pump, args=(source, sink), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        """Copy ``source`` to ``sink`` until either side closes; then close both."""
        try:
            while data := source.recv(_CHUNK):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            with self._lock:
                self._open.discard(source)
                self._open.discard(sink)
            _close(source)
            _close(sink)


def _close(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    with contextlib.suppress(OSError):
        sock.close()
