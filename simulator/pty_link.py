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
import tty
from collections.abc import Callable, Iterator
from pathlib import Path

from . import jsonlog
from .link import PortEvent, ReaderLink

_WRITE_STALL_S = 2.0  # how long a write may wait for a client that does not read before data is dropped

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


class PtyLink(ReaderLink):
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
        super().__init__(on_data, on_port_event)
        self.link = link
        self._watch: PortWatch | None = None
        self._master: int | None = None
        self._slave: int | None = None
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
        self._start_reader(f"sim-pty-{self.link.name}")
        jsonlog.event("plugged", link=str(self.link), device=self.device)

    def close(self) -> None:
        """Stop the reader, close both pty ends (the client's reads then fail) and remove the symlink if it
        still points at this pty. Idempotent."""
        super().close()

    def _release(self) -> None:
        for fd in (self._master, self._slave):
            if fd is not None:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._master = self._slave = None
        if self._watch is not None:
            self._watch.close()
            self._watch = None

    def _after_close(self) -> None:
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

    def _fds(self) -> list[int]:
        # Read once per turn: close() sets these to None only after the reader stopped.
        assert self._master is not None
        return [self._master] + ([self._watch.fd] if self._watch is not None else [])

    def _on_readable(self, readable: list[int]) -> bool:
        """Port events first, then the master's bytes; False at the line's end or a read error."""
        watch, master = self._watch, self._master
        if watch is not None and watch.fd in readable:
            # Port events first: bytes a client wrote after reopening must see the modem it reopened.
            with self._events_lock:
                for event in watch.read_events():
                    self._handle_port_event(event)
        if master is None or master not in readable:
            return True
        try:
            chunk = os.read(master, 4096)
        except BlockingIOError:
            return True
        except OSError as exc:
            jsonlog.event("read_failed", error=str(exc))
            return False
        if not chunk:
            return False
        self._deliver(chunk)
        return True
