"""What every line of the modem shares (the pty of pty_link.py, the TCP port of tcp_link.py): a reader thread
woken out of ``select()`` by a pipe at close, the write and port-event locks, and the hand-over of data and port
events to the AT engine that no bug in it can kill."""

from __future__ import annotations

import contextlib
import os
import select
import threading
from collections.abc import Callable, Iterator
from typing import Literal

from . import jsonlog

PortEvent = Literal["open", "close"]
# A select() timeout, so that a reader whose wake-up byte was lost still sees `closing` within this.
_SELECT_S = 1.0


class ReaderLink:
    """One plug-in of the modem: a reader thread (:meth:`_start_reader`) on the file descriptors a subclass
    names (:meth:`_fds`), which hands what is readable to :meth:`_on_readable` until :meth:`close`."""

    def __init__(
        self,
        on_data: Callable[[bytes], None],
        on_port_event: Callable[[PortEvent], None] | None = None,
    ) -> None:
        """``on_data`` is called in the reader thread with each chunk read, ``on_port_event`` (same thread) when a
        client opens or closes the port."""
        self._on_data = on_data
        self._on_port_event = on_port_event
        # Held while port events are read and handled: lets a caller discard the events of opens that happened
        # before a moment (the start of a hang) without the reader handling them after it.
        self._events_lock = threading.Lock()
        self._write_lock = threading.Lock()
        self._wake_r: int | None = None
        self._wake_w: int | None = None
        self._closing = threading.Event()
        self._reader: threading.Thread | None = None

    @property
    def is_open(self) -> bool:
        """True between open() and close()."""
        raise NotImplementedError

    @property
    def closing(self) -> threading.Event:
        """Set while the link is being closed (lets long waits in the AT engine end early)."""
        return self._closing

    @contextlib.contextmanager
    def past_port_events_dropped(self) -> Iterator[None]:
        """Hold the handling of port events for the ``with`` block: what happens inside it (a hang starting) is
        only affected by opens and closes handled after it."""
        with self._events_lock:
            yield

    def close(self) -> None:
        """Stop the reader, then release the line (:meth:`_release`, under the write lock, so that no writer hits
        a closed or reused descriptor) and the wake-up pipe. Idempotent."""
        if not self.is_open:
            return
        self._closing.set()
        if self._wake_w is not None:
            with contextlib.suppress(OSError):
                os.write(self._wake_w, b"x")
        if self._reader is not None and self._reader is not threading.current_thread():
            self._reader.join(timeout=5)
        with self._write_lock:
            self._release()
            for fd in (self._wake_r, self._wake_w):
                if fd is not None:
                    with contextlib.suppress(OSError):
                        os.close(fd)
            self._wake_r = self._wake_w = None
        self._after_close()

    # ------------------------------------------------------------------------------------------- for subclasses

    def _start_reader(self, name: str) -> None:
        """Create the wake-up pipe and start the reader thread called ``name``."""
        self._wake_r, self._wake_w = os.pipe()
        self._closing.clear()
        self._reader = threading.Thread(target=self._read_loop, name=name, daemon=True)
        self._reader.start()

    def _fds(self) -> list[int]:
        """The descriptors the reader waits on now (read again at every turn)."""
        raise NotImplementedError

    def _on_readable(self, readable: list[int]) -> bool:
        """Handle what ``select()`` found readable among :meth:`_fds`; False ends the reader."""
        raise NotImplementedError

    def _release(self) -> None:
        """Close the line itself (called by :meth:`close` under the write lock, after the reader stopped)."""
        raise NotImplementedError

    def _after_close(self) -> None:
        """What to do once closed (log it, remove a symlink)."""

    def _deliver(self, chunk: bytes) -> None:
        """Hand ``chunk`` to ``on_data``; an error there is logged, not fatal, so one bad command cannot kill the
        modem."""
        try:
            self._on_data(chunk)
        except Exception:  # the reader must survive any bug in command handling
            jsonlog.log.exception("at_engine_error")

    def _handle_port_event(self, event: PortEvent) -> None:
        """Report a port event (the caller holds the events lock); never fatal for the reader."""
        if self._on_port_event is None:
            return
        try:
            self._on_port_event(event)
        except Exception:  # the reader must survive any bug in event handling
            jsonlog.log.exception("port_event_error")

    def _read_loop(self) -> None:
        """Wait on the line's descriptors and the wake-up pipe until close()."""
        wake = self._wake_r
        assert wake is not None
        while not self._closing.is_set():
            try:
                readable, _, _ = select.select([*self._fds(), wake], [], [], _SELECT_S)
            except (OSError, ValueError):
                return
            if wake in readable or self._closing.is_set():
                return
            if not self._on_readable(readable):
                return
