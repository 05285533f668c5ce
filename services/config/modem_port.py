"""What ``SMSGW_MODEM_PORT`` may name besides a local serial device: a modem on another host, reached through a
pyserial URL (``socket://host:port``: ser2net's raw TCP; ``rfc2217://host:port``: RFC 2217), and what
``SMSGW_MODEM_PORT=auto`` may search (local devices only). Errors are :class:`ModemPortError`, one line naming the
variable; ``services.config.variables`` turns them into its ``ConfigError``."""

from __future__ import annotations

import urllib.parse

# The URL schemes accepted, with the URL options pyserial knows for each (any other option fails at open).
_URL_OPTIONS: dict[str, frozenset[str]] = {
    "socket": frozenset({"logging"}),
    "rfc2217": frozenset({"logging", "ign_set_control", "poll_modem", "timeout"}),
}
_PORT_FORMS = "a serial device path, auto, socket://HOST:PORT or rfc2217://HOST:PORT"


class ModemPortError(ValueError):
    """A modem port setting that cannot be used (the message is one line naming the variable)."""


def modem_port_address(name: str, port: str) -> tuple[str, int] | None:
    """The (host, TCP port) of a network modem port (``socket://host:port``, ``rfc2217://host:port``), None for
    a local device path or ``auto``.

    Raises:
        ModemPortError: ``port`` is a URL of another scheme, or without a host and a TCP port 1-65535, or with a
            path, a user or an option pyserial does not know.
    """
    if "://" not in port:
        return None
    parts = urllib.parse.urlsplit(port.strip())
    options = _URL_OPTIONS.get(parts.scheme)
    if options is None:
        raise ModemPortError(f"{name}: expected {_PORT_FORMS}, got {port!r}")
    try:
        tcp_port = parts.port
    except ValueError:  # out of range or not a number
        tcp_port = None
    if not parts.hostname or not tcp_port or parts.path not in ("", "/") or parts.username:
        raise ModemPortError(f"{name}: expected {parts.scheme}://HOST:PORT (TCP port 1-65535), got {port!r}")
    unknown = sorted(set(urllib.parse.parse_qs(parts.query, keep_blank_values=True)) - options)
    if unknown:
        known = ", ".join(sorted(options))
        raise ModemPortError(f"{name}: unknown {parts.scheme}:// option {unknown[0]!r} (known: {known})")
    return parts.hostname, tcp_port


def parse_modem_port(name: str, raw: str) -> str:
    """SMSGW_MODEM_PORT: a device path or auto as given, a network modem URL checked and stripped. Raises
    ModemPortError."""
    return raw if modem_port_address(name, raw) is None else raw.strip()


def parse_port_globs(name: str, raw: str) -> tuple[str, ...]:
    """SMSGW_MODEM_PORT_GLOB: the comma list of local device patterns ``auto`` searches. Raises ModemPortError for
    a URL among them: auto cannot search the network for a modem."""
    patterns = tuple(p.strip() for p in raw.split(",") if p.strip())
    for pattern in patterns:
        if "://" in pattern:
            raise ModemPortError(
                f"{name}: SMSGW_MODEM_PORT=auto searches local serial devices only, got {pattern!r}; "
                "name a network modem in SMSGW_MODEM_PORT itself (socket://HOST:PORT)"
            )
    return patterns
