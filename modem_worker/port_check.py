"""Whether the modem worker's serial port can be used, for its ``--check`` (without opening it).

A network modem (``socket://host:port``, ``rfc2217://host:port``) is checked by a TCP connection to its endpoint,
closed at once: ser2net serves one client at a time and refuses (closes) a second one, so the check never disturbs
the running worker's connection.
"""

from __future__ import annotations

import glob
import os
import socket
import stat
from pathlib import Path

from services.config import AUTO_PORT, Settings
from services.config.modem_port import ModemPortError, modem_port_address

CONNECT_TIMEOUT_S = 3.0  # a ser2net on the LAN answers a connect in milliseconds; a healthcheck must not hang

PROC_TTY_DRIVERS = "/proc/tty/drivers"
# Driver types of /proc/tty/drivers that are a serial port a modem can sit behind: real UARTs and USB serial
# (ttyS, ttyUSB, ttyACM, ttyAMA...: "serial") and pty slaves (the simulator). Not: consoles, /dev/tty, pty masters.
SERIAL_TTY_KINDS = frozenset({"serial", "pty:slave"})


def modem_port_problem(settings: Settings) -> str | None:
    """Why the modem worker's port cannot be used (``check_modem_port``), or None. With SMSGW_MODEM_PORT=auto, at
    least one device matching SMSGW_MODEM_PORT_GLOB must be usable (which one is the modem, by its IMEI, only
    the running worker can tell: asking would disturb it)."""
    if settings.modem_port != AUTO_PORT:
        try:
            address = modem_port_address("SMSGW_MODEM_PORT", settings.modem_port)
        except ModemPortError as exc:
            return str(exc)
        if address is not None:
            return check_modem_endpoint(settings.modem_port, *address)
        return check_modem_port(settings.modem_port)
    candidates = sorted({path for pattern in settings.modem_port_glob for path in glob.glob(pattern)})
    if not candidates:
        return (
            f"SMSGW_MODEM_PORT=auto: no device matches SMSGW_MODEM_PORT_GLOB "
            f"({', '.join(settings.modem_port_glob)}): modem unplugged, or not mapped into the container"
        )
    problems = [check_modem_port(path) for path in candidates]
    return None if None in problems else problems[0]


def check_modem_endpoint(url: str, host: str, port: int, timeout_s: float = CONNECT_TIMEOUT_S) -> str | None:
    """Why the network modem at ``url`` (``host``:``port``) cannot be used (one line naming SMSGW_MODEM_PORT), or
    None when its TCP endpoint accepts a connection within ``timeout_s``. The connection is closed at once; whether
    the modem behind it answers is the running worker's business (``smsgw_modem_up``)."""
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return None
    except TimeoutError:
        reason = f"no answer within {timeout_s:g} s"
    except OSError as exc:
        reason = exc.strerror or str(exc) or type(exc).__name__
    return (
        f"modem port {url} (SMSGW_MODEM_PORT): {host}:{port} does not accept a connection ({reason}): "
        "ser2net or the modem's host down, or a wrong host or port"
    )


def check_modem_port(path: str) -> str | None:
    """Why the modem port ``path`` cannot be used (one line naming SMSGW_MODEM_PORT), or None when it exists, is a
    serial port (a tty of a serial or pty-slave driver, ``tty_kind``: ``/dev/null`` is refused) and this process
    may read and write it.

    The port is deliberately not opened: the check also runs inside the container of a modem worker that holds the
    port open exclusively, where opening it would fail although all is well (or, without exclusivity, disturb the
    running worker's AT dialogue). Whether the modem answers is the running worker's business
    (``smsgw_modem_up``).
    """
    if not path:
        return "SMSGW_MODEM_PORT is empty"
    try:
        info = os.stat(path)
    except OSError as exc:
        return _missing_port(path, exc)
    if not stat.S_ISCHR(info.st_mode):
        return f"modem port {path} (SMSGW_MODEM_PORT) is not a serial device (not a character device)"
    kind = tty_kind(info.st_rdev)
    if kind is not None and kind not in SERIAL_TTY_KINDS:
        return (
            f"modem port {path} (SMSGW_MODEM_PORT) is not a serial port (device "
            f"{os.major(info.st_rdev)}:{os.minor(info.st_rdev)}, {kind}): point it at the modem's tty"
        )
    if not os.access(path, os.R_OK | os.W_OK):
        return (
            f"no read/write permission on modem port {path} (SMSGW_MODEM_PORT) for uid {os.getuid()}: add the "
            "user to the device's group (often dialout) or map the device with its permissions"
        )
    return None


def tty_kind(rdev: int, drivers: str | None = None) -> str | None:
    """What the character device ``rdev`` is, by the kernel's tty driver table (``/proc/tty/drivers``, or the
    text ``drivers``): the driver's type (``serial``, ``pty:slave``, ``console``, ``system:/dev/tty``...), ``"not
    a tty"`` when no tty driver owns its major/minor (``/dev/null``), or None when the table cannot be read.

    Why the driver table and not ``isatty()``/termios: those need the port open, and the running worker holds it
    (exclusively; a second open would fail, or else disturb its AT dialogue). The table names every tty driver with
    its device numbers, so ``os.stat`` alone tells a serial port from ``/dev/null`` or a console, without touching
    the port. Docker does not mask ``/proc/tty``; where it is unreadable the check falls back to "a character
    device" (None).
    """
    if drivers is None:
        try:
            drivers = Path(PROC_TTY_DRIVERS).read_text(encoding="ascii", errors="replace")
        except OSError:
            return None
    major, minor = os.major(rdev), os.minor(rdev)
    for line in drivers.splitlines():
        fields = line.split()
        if len(fields) < 5 or not fields[2].isdigit() or int(fields[2]) != major:
            continue
        low, _, high = fields[3].partition("-")
        if low.isdigit() and int(low) <= minor <= int(high if high.isdigit() else low):
            return fields[4]
    return "not a tty"


def _missing_port(path: str, exc: OSError) -> str:
    """Why ``os.stat(path)`` failed, for ``check_modem_port``."""
    if not isinstance(exc, FileNotFoundError):
        return f"modem port {path} (SMSGW_MODEM_PORT) cannot be examined: {exc.strerror or exc}"
    if os.path.islink(path):
        return (
            f"modem port {path} (SMSGW_MODEM_PORT) links to {os.readlink(path)}, which does not exist: "
            "modem unplugged, or its simulator stopped"
        )
    return (
        f"modem port {path} (SMSGW_MODEM_PORT) does not exist: modem unplugged, a wrong name, or the device "
        "not mapped into the container"
    )
