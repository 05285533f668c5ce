"""The modem's serial line: a pseudo-terminal whose slave device is published as a symlink.

The simulator keeps its own slave fd open while plugged so that reading the master never fails with EIO just
because no client has the port open yet; closing the master (unplug) hangs the line up for the client.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import logging
import os
import select
import struct
import threading
import tty
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Literal

from . import jsonlog

_WRITE_STALL_S = 2.0  # how long a write may wait for a client that does not read before data is dropped

PortEvent = Literal["open", "close"]
_IN_OPEN = 0x20
_IN_CLOSE_WRITE = 0x08
_IN_CLOSE_NOWRITE = 0x10
_IN_EVENT = struct.Struct("iIII")  # wd, mask, cookie, len (then len bytes of name: none for a watched file)


class PortWatch:
    """Reports every open and close of the pty slave device by clients, through Linux inotify on the device
    node (/dev/pts/N). The simulator keeps its own slave fd open for the whole plug-in, so every event seen
    is a client's: that is how a hung modem notices that the worker closed and reopened the port."""

    def __init__(self, device: str) -> None:
        """Watch `device`. Raises OSError when inotify is unavailable."""
        libc = ctypes.CDLL(None, use_errno=True)
        fd = libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1 failed")
        mask = _IN_OPEN | _IN_CLOSE_WRITE | _IN_CLOSE_NOWRITE
        if libc.inotify_add_watch(fd, os.fsencode(device), mask) < 0:
            err = ctypes.get_errno()
            os.close(fd)
            raise OSError(err, f"inotify_add_watch {device} failed")
        self.fd = fd

    def read_events(self) -> list[PortEvent]:
        """Drain the queued events, oldest first (empty when none)."""
        events: list[PortEvent] = []
        while True:
            try:
                data = os.read(self.fd, 4096)  # whole events only: the kernel never splits one
            except (BlockingIOError, OSError):
                return events
            if not data:
                return events
            offset = 0
            while offset + _IN_EVENT.size <= len(data):
                _, mask, _, name_len = _IN_EVENT.unpack_from(data, offset)
                offset += _IN_EVENT.size + name_len
                if mask & _IN_OPEN:
                    events.append("open")
                if mask & (_IN_CLOSE_WRITE | _IN_CLOSE_NOWRITE):
                    events.append("close")

    def close(self) -> None:
        """Stop watching."""
        with contextlib.suppress(OSError):
            os.close(self.fd)


class PtyLink:
    """One plug-in of the modem: a pty pair, the symlink to its slave, and a reader thread on the master."""

    def __init__(
        self,
        link: Path,
        on_data: Callable[[bytes], None],
        on_port_event: Callable[[PortEvent], None] | None = None,
    ) -> None:
        """Prepare (not open) a link at `link`; `on_data` is called in the reader thread with each chunk read,
        `on_port_event` (same thread, always before data read after it) when a client opens or closes the port.
        """
        self.link = link
        self._on_data = on_data
        self._on_port_event = on_port_event
        self._watch: PortWatch | None = None
        # Held while port events are read and handled: lets a caller discard the events of opens that happened
        # before a moment (the start of a hang) without the reader handling them after it.
        self._events_lock = threading.Lock()
        self._write_lock = threading.Lock()
        self._master: int | None = None
        self._slave: int | None = None
        self._wake_r: int | None = None
        self._wake_w: int | None = None
        self._closing = threading.Event()
        self._reader: threading.Thread | None = None
        self.device = ""

    @property
    def is_open(self) -> bool:
        """True between open() and close()."""
        return self._master is not None

    def open(self) -> None:
        """Create the pty (slave in raw mode), point the symlink at it and start the reader thread.

        Raises OSError when the pty or the symlink cannot be created (FileExistsError when `link` is a
        regular file or directory, which is never replaced).
        """
        if self.link.exists() and not self.link.is_symlink():
            raise FileExistsError(f"{self.link} exists and is not a symlink; refusing to replace it")
        master, slave = os.openpty()
        # Raw mode: no echo, no CR/LF translation, byte-at-a-time reads, like a real serial line.
        tty.setraw(slave)
        fcntl.fcntl(master, fcntl.F_SETFL, fcntl.fcntl(master, fcntl.F_GETFL) | os.O_NONBLOCK)
        self.device = os.ttyname(slave)
        tmp = self.link.with_name(f".{self.link.name}.{os.getpid()}.tmp")
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        os.symlink(self.device, tmp)
        os.replace(tmp, self.link)  # atomic: a client never sees the path missing during a replug's creation
        self._master, self._slave = master, slave
        try:
            self._watch = PortWatch(self.device)
        except OSError as exc:
            # Without inotify a hang can still be ended by POST /state {"hang": false} or /reboot.
            jsonlog.event("port_watch_unavailable", error=str(exc))
            self._watch = None
        self._wake_r, self._wake_w = os.pipe()
        self._closing.clear()
        self._reader = threading.Thread(target=self._read_loop, name=f"sim-pty-{self.link.name}", daemon=True)
        self._reader.start()
        jsonlog.event("plugged", link=str(self.link), device=self.device)

    def close(self) -> None:
        """Stop the reader, close both pty ends (the client's reads then fail) and remove the symlink if it
        still points at this pty. Idempotent."""
        if self._master is None:
            return
        self._closing.set()
        if self._wake_w is not None:
            with contextlib.suppress(OSError):
                os.write(self._wake_w, b"x")
        if self._reader is not None and self._reader is not threading.current_thread():
            self._reader.join(timeout=5)
        with self._write_lock:
            # Closing under the write lock: no writer can hit a closed (or reused) fd number.
            for fd in (self._master, self._slave, self._wake_r, self._wake_w):
                if fd is not None:
                    with contextlib.suppress(OSError):
                        os.close(fd)
            self._master = self._slave = self._wake_r = self._wake_w = None
            if self._watch is not None:
                self._watch.close()
                self._watch = None
        with contextlib.suppress(OSError):
            if os.readlink(self.link) == self.device:
                self.link.unlink()
        jsonlog.event("unplugged", link=str(self.link), device=self.device)

    @contextlib.contextmanager
    def past_port_events_dropped(self) -> Iterator[None]:
        """Discard the port events already queued and hold further handling for the `with` block: what
        happens inside it (a hang starting) is only affected by opens and closes that come after it."""
        with self._events_lock:
            watch = self._watch
            if watch is not None:
                dropped = watch.read_events()
                if dropped:
                    jsonlog.event("port_events_dropped", events=dropped, level=logging.DEBUG)
            yield

    @property
    def closing(self) -> threading.Event:
        """Set while the link is being closed (lets long waits in the AT engine end early)."""
        return self._closing

    def write(self, data: bytes) -> bool:
        """Write `data` to the modem side of the line (the client reads it). Returns False when the link is
        closed or the client stopped reading for too long (the rest is dropped and logged)."""
        if not data:
            return True
        with self._write_lock:
            master = self._master
            if master is None:
                return False
            view = memoryview(data)
            while view:
                try:
                    n = os.write(master, view)
                    view = view[n:]
                except BlockingIOError:
                    _, writable, _ = select.select([], [master], [], _WRITE_STALL_S)
                    if not writable:
                        jsonlog.event("write_dropped", bytes=len(view), reason="client not reading")
                        return False
                except OSError as exc:
                    jsonlog.event("write_failed", error=str(exc))
                    return False
            return True

    def _read_loop(self) -> None:
        """Read the master until close(), handing each chunk to on_data; errors in on_data are logged, not
        fatal, so one bad command cannot kill the modem."""
        master, wake, watch = self._master, self._wake_r, self._watch
        assert master is not None and wake is not None
        fds = [master, wake] + ([watch.fd] if watch is not None else [])
        while not self._closing.is_set():
            try:
                readable, _, _ = select.select(fds, [], [], 1.0)
            except (OSError, ValueError):
                return
            if wake in readable or self._closing.is_set():
                return
            if watch is not None and watch.fd in readable:
                # Port events first: bytes a client wrote after reopening must see the modem it reopened.
                with self._events_lock:
                    for event in watch.read_events():
                        if self._on_port_event is not None:
                            try:
                                self._on_port_event(event)
                            except Exception:  # the reader must survive any bug in event handling
                                jsonlog.log.exception("port_event_error")
            if master not in readable:
                continue
            try:
                chunk = os.read(master, 4096)
            except BlockingIOError:
                continue
            except OSError as exc:
                jsonlog.event("read_failed", error=str(exc))
                return
            if not chunk:
                return
            try:
                self._on_data(chunk)
            except Exception:  # the reader must survive any bug in command handling
                jsonlog.log.exception("at_engine_error")
