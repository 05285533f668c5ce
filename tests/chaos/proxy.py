"""A small threaded TCP proxy that a test puts between the workers and a service (RabbitMQ, PostgreSQL).

The machine's real services are shared with other tests and must never be stopped; cutting the proxy is the
outage instead: ``cut()`` closes every open connection and refuses new ones (the listening socket stays bound, a
new connection is accepted and closed at once, so clients see a reset, as after a restart), ``restore()`` lets
connections through again.

    proxy = TcpProxy().start(0, ("127.0.0.1", 5432))
    url = f"postgresql://postgres@127.0.0.1:{proxy.port}/test"
    proxy.cut(); ...; proxy.restore(); proxy.stop()
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading


class TcpProxy:
    """Forwards every connection on ``127.0.0.1:<port>`` to ``target``, one thread per direction."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._listener: socket.socket | None = None
        self._target: tuple[str, int] = ("127.0.0.1", 0)
        self._open: set[socket.socket] = set()
        self._cut = False
        self._stopped = threading.Event()
        self.connections = 0  # accepted and forwarded so far (a test can check that clients came back)

    @property
    def port(self) -> int:
        """The port the proxy listens on.

        Raises:
            RuntimeError: not started.
        """
        if self._listener is None:
            raise RuntimeError("proxy not started")
        return int(self._listener.getsockname()[1])

    @property
    def is_cut(self) -> bool:
        """Whether the proxy refuses connections right now."""
        return self._cut

    def start(self, listen_port: int, target: tuple[str, int]) -> TcpProxy:
        """Listen on ``127.0.0.1:listen_port`` (0 = any free port) and forward to ``target``; returns self.

        Raises:
            OSError: the port cannot be bound.
        """
        self._target = target
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", listen_port))
        listener.listen(128)
        self._listener = listener
        threading.Thread(target=self._accept_loop, name=f"proxy-{self.port}", daemon=True).start()
        return self

    def cut(self) -> None:
        """Close every forwarded connection and refuse new ones until ``restore()``."""
        with self._lock:
            self._cut = True
            sockets, self._open = self._open, set()
        for sock in sockets:
            _close(sock)

    def restore(self) -> None:
        """Forward new connections again."""
        with self._lock:
            self._cut = False

    def stop(self) -> None:
        """Stop listening and close every connection."""
        self._stopped.set()
        self.cut()
        if self._listener is not None:
            _close(self._listener)

    def _accept_loop(self) -> None:
        assert self._listener is not None
        while not self._stopped.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return  # stopped
            if self._cut:
                _close(client)  # refused: the client sees its connection reset at once
                continue
            try:
                upstream = socket.create_connection(self._target, timeout=10)
            except OSError:
                _close(client)
                continue
            upstream.settimeout(None)
            with self._lock:
                if self._cut:  # cut while connecting
                    _close(client)
                    _close(upstream)
                    continue
                self._open.update((client, upstream))
                self.connections += 1
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(source, sink), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while chunk := source.recv(65536):
                sink.sendall(chunk)
        except OSError:
            pass  # the other side or cut() closed it
        finally:
            with self._lock:
                self._open.discard(source)
                self._open.discard(sink)
            _close(source)
            _close(sink)


def _close(sock: socket.socket) -> None:
    """Shut down and close ``sock`` (a reset for the peer); ignore a socket already closed."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    sock.close()
