"""The modem's serial line as a raw TCP port, the way ser2net serves a modem on another host.

One client at a time, raw bytes both ways (no telnet, no RFC 2217 negotiation). A second client while one is
connected is refused the way ser2net refuses it by default (no ``kickolduser``): its connection is accepted and
closed at once, and the first client keeps the line. Bytes the modem writes while no client is connected are
dropped, as ser2net drops them (it does not buffer for a client to come).

A client connecting is the port's "open" event and its disconnect the "close" event, as the pty's inotify watch
reports them, so a hung modem ends its hang when the worker reconnects, exactly as when it reopens a pty.
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Callable

from . import jsonlog
from .link import PortEvent, ReaderLink

_WRITE_STALL_S = 2.0  # how long a write may wait for a client that does not read before data is dropped


class TcpLink(ReaderLink):
    """One plug-in of the modem as a TCP listener on ``host``:``port``, with a reader thread."""

    def __init__(
        self,
        host: str,
        port: int,
        on_data: Callable[[bytes], None],
        on_port_event: Callable[[PortEvent], None] | None = None,
    ) -> None:
        """Prepare (not open) a listener; ``port`` 0 picks a free port at :meth:`open` (see :attr:`port`).
        ``on_data`` and ``on_port_event`` are called in the reader thread, as for :class:`PtyLink`."""
        super().__init__(on_data, on_port_event)
        self.host = host
        self.port = port
        self._listener: socket.socket | None = None
        self._client: socket.socket | None = None

    @property
    def is_open(self) -> bool:
        """True between open() and close()."""
        return self._listener is not None

    @property
    def device(self) -> str:
        """Where a client connects: ``socket://host:port`` (after open(), the bound port)."""
        return f"socket://{self.host}:{self.port}"

    @property
    def connected(self) -> bool:
        """True while a client is connected."""
        return self._client is not None

    def open(self) -> None:
        """Listen on ``host``:``port`` and start the reader thread. Raises OSError when the port cannot be bound."""
        listener = socket.create_server((self.host, self.port), reuse_port=False, backlog=4)
        self.port = int(listener.getsockname()[1])  # a reopen (replug) listens on the same port again
        self._listener = listener
        self._start_reader(f"sim-tcp-{self.port}")
        jsonlog.event("plugged", link=self.device, device=self.device)

    def close(self) -> None:
        """Stop the reader, close the client's connection and the listener (new connections are refused).
        Idempotent."""
        super().close()

    def _release(self) -> None:
        for sock in (self._client, self._listener):
            if sock is not None:
                sock.close()
        self._client = self._listener = None

    def _after_close(self) -> None:
        jsonlog.event("unplugged", link=self.device, device=self.device)

    def drop_client(self) -> bool:
        """Cut the client's connection (the listener stays: the client may connect again). False when no client
        was connected."""
        with self._write_lock:
            client = self._client
            if client is None:
                return False
            # Only the reader thread closes the socket (it may be in select() on it); shutdown ends the
            # connection for both sides now, and the reader then sees its end and reports "close".
            with contextlib.suppress(OSError):
                client.shutdown(socket.SHUT_RDWR)
        jsonlog.event("tcp_client_dropped", port=self.port)
        return True

    def write(self, data: bytes) -> bool:
        """Send ``data`` to the client. False when no client is connected (dropped, as ser2net does) or the client
        stopped reading for too long."""
        if not data:
            return True
        with self._write_lock:
            client = self._client
            if client is None:
                return False
            try:
                client.sendall(data)
            except TimeoutError:
                jsonlog.event("write_dropped", bytes=len(data), reason="client not reading")
                return False
            except OSError as exc:
                jsonlog.event("write_failed", error=str(exc))
                return False
            return True

    def _fds(self) -> list[int]:
        # Only the reader thread replaces or closes these (close() runs after it stopped), so they are open here.
        assert self._listener is not None
        client = self._client
        return [self._listener.fileno()] + ([client.fileno()] if client is not None else [])

    def _on_readable(self, readable: list[int]) -> bool:
        """Accept a new client, read the connected one; the reader goes on until close()."""
        listener, client = self._listener, self._client
        if listener is not None and listener.fileno() in readable:
            self._accept(listener)
        if client is not None and client.fileno() in readable:
            self._read_client(client)
        return True

    def _accept(self, listener: socket.socket) -> None:
        """Take a new connection: the client, or refused (closed at once) while another is connected."""
        try:
            sock, peer = listener.accept()
        except OSError:
            return
        if self._client is not None:
            sock.close()
            jsonlog.event("tcp_client_refused", peer=f"{peer[0]}:{peer[1]}", reason="another client is connected")
            return
        sock.settimeout(_WRITE_STALL_S)  # bounds sendall(); reads happen only after select() said readable
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # AT replies are small: send them now
        with self._write_lock:
            self._client = sock
        jsonlog.event("tcp_client_connected", peer=f"{peer[0]}:{peer[1]}")
        self._port_event("open")

    def _read_client(self, client: socket.socket) -> None:
        """Read one chunk from the client and hand it on; at its end (or an error) close it and report "close"."""
        try:
            chunk = client.recv(4096)
        except (BlockingIOError, TimeoutError):
            return
        except OSError:
            chunk = b""
        if not chunk:
            with self._write_lock:
                self._client = None
                client.close()
            jsonlog.event("tcp_client_disconnected")
            self._port_event("close")
            return
        self._deliver(chunk)

    def _port_event(self, event: PortEvent) -> None:
        """Report a connect or disconnect as it happens (none is queued, so there is nothing to drop)."""
        with self._events_lock:
            self._handle_port_event(event)
