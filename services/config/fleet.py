"""The fleet: which Sync URLs (endpoints) the gateway serves, how outbound SMS are routed to modems, SIM limits.

Process-wide settings (broker, metrics port, log level, a modem worker's port and id) stay in ``SMSGW_*``
environment variables (``services.settings``). The fleet comes from the TOML file named by ``SMSGW_CONFIG``;
without it, today's variables describe one endpoint named ``default``, so an env-only deployment keeps working
unchanged. Every worker loads the fleet the same way (``load_fleet``) and validates it at start-up: an unknown
key, a bad regular expression, a duplicate name or a route to an unknown modem stops it with one line naming
the file and the key path (``ConfigError``). ``python -m services.config check FILE`` runs the same checks.

Example (docs/operations.md explains every key)::

    [[endpoints]]
    name = "clinic"
    sync_url = "https://clinic.example/smssync"
    secret_file = "/run/secrets/clinic"
    keywords = ["REG", "ANC"]

    [[routes]]
    prefix = "+25573"
    modems = ["modem2"]

    [modems.modem2]
    max_per_minute = 6
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from services.settings import (
    ENV_VARS,
    SYNC_FIELDS,
    ConfigError,
    ResultsShape,
    Settings,
    SyncFormat,
    SyncMethod,
    check_xml_keys,
    redact_url,
)

DEFAULT_ENDPOINT = "default"
_ENDPOINT_NAME = re.compile(r"[a-z0-9_-]{1,32}")
_MODEM_ID = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_RESERVED_NAMES = frozenset({"parked"})
_PREFIX = re.compile(r"\+?[0-9]{1,15}")


@dataclass(frozen=True)
class EndpointConfig:
    """One SMSsync server the gateway serves: its URL, filters, switches and protocol options."""

    name: str
    sync_url: str
    secret: str = field(repr=False)
    signing_key: str = field(repr=False)
    keywords: tuple[str, ...]
    patterns: tuple[re.Pattern[str], ...]
    allow_senders: tuple[str, ...]
    block_senders: tuple[str, ...]
    inbound: bool
    tasks: bool
    message_results: bool
    sync_method: SyncMethod
    sync_format: SyncFormat
    sync_keys: tuple[tuple[str, str], ...]
    results_shape: ResultsShape
    sent_ok_code: int
    task_interval: float
    result_interval: float
    reply_from_server: bool
    auto_response: str
    query_codes: bool
    max_refusals: int
    max_server_errors: int
    max_retry_age: float
    device_id: str
    http_timeout: float
    refusal_is_final: bool = False  # park an inbound SMS at the first success:false (SMSGW_REFUSAL_IS_FINAL)

    @property
    def redacted_url(self) -> str:
        """The Sync URL with its password and secret masked (for logs)."""
        return redact_url(self.sync_url)

    def filter_reason(self, sender: str, text: str) -> str | None:
        """Why an SMS from ``sender`` is not forwarded to this endpoint (a metric label), or None to forward it.

        ``block_senders`` wins over ``allow_senders``; keywords (substrings) and patterns (regular expressions,
        searched) are matched case-insensitively, and an SMS matching either is forwarded; none of both = all.
        """
        if any(sender.startswith(prefix) for prefix in self.block_senders):
            return "blocked_sender"
        if self.allow_senders and not any(sender.startswith(prefix) for prefix in self.allow_senders):
            return "sender_not_allowed"
        if not self.keywords and not self.patterns:
            return None
        folded = text.casefold()
        if any(keyword.casefold() in folded for keyword in self.keywords):
            return None
        if any(pattern.search(text) for pattern in self.patterns):
            return None
        return "no_match"


FILTER_REASONS = ("blocked_sender", "sender_not_allowed", "no_match")


@dataclass(frozen=True)
class Route:
    """Outbound SMS to numbers starting with ``prefix`` leave through one of ``modems``."""

    prefix: str
    modems: tuple[str, ...]

    def matches(self, number: str) -> bool:
        """Whether ``number`` starts with this route's prefix."""
        return number.startswith(self.prefix)


@dataclass(frozen=True)
class ModemLimits:
    """Per-SIM limits (0 = unlimited): pacing per minute, a daily cap, and a cap per recipient and hour."""

    max_per_minute: int = 0
    max_per_day: int = 0
    max_per_recipient_per_hour: int = 0


@dataclass(frozen=True)
class FleetConfig:
    """Endpoints, routes and per-modem limits, validated. Build with ``load_fleet``."""

    source: str  # the file, or "environment"
    endpoints: tuple[EndpointConfig, ...]
    routes: tuple[Route, ...] = ()
    modem_limits: tuple[tuple[str, ModemLimits], ...] = ()

    @property
    def endpoint_names(self) -> tuple[str, ...]:
        """Every endpoint's name, in file order."""
        return tuple(e.name for e in self.endpoints)

    @property
    def modems(self) -> tuple[str, ...]:
        """The modems the file names under ``[modems.<id>]``."""
        return tuple(modem_id for modem_id, _ in self.modem_limits)

    def endpoint(self, name: str) -> EndpointConfig:
        """The endpoint called ``name``. Raises KeyError when there is none."""
        for endpoint in self.endpoints:
            if endpoint.name == name:
                return endpoint
        raise KeyError(name)

    def inbound_endpoints(self) -> tuple[EndpointConfig, ...]:
        """Endpoints that receive inbound SMS."""
        return tuple(e for e in self.endpoints if e.inbound)

    def task_endpoints(self) -> tuple[EndpointConfig, ...]:
        """Endpoints polled for ``?task=send``."""
        return tuple(e for e in self.endpoints if e.tasks)

    def result_endpoints(self) -> tuple[EndpointConfig, ...]:
        """Endpoints with the Message Results API on."""
        return tuple(e for e in self.endpoints if e.message_results)

    def route_for(self, number: str) -> Route | None:
        """The first route whose prefix ``number`` starts with, or None (any healthy modem)."""
        for route in self.routes:
            if route.matches(number):
                return route
        return None

    def limits_for(self, modem_id: str) -> ModemLimits:
        """The limits of ``modem_id`` (none configured: unlimited)."""
        for known, limits in self.modem_limits:
            if known == modem_id:
                return limits
        return ModemLimits()

    def pools_of(self, modem_id: str) -> tuple[tuple[str, ...], ...]:
        """The modem sets of routes with several modems that include ``modem_id`` (each one shared queue)."""
        pools = {tuple(sorted(r.modems)) for r in self.routes if len(r.modems) > 1 and modem_id in r.modems}
        return tuple(sorted(pools))

    def all_pools(self) -> tuple[tuple[str, ...], ...]:
        """The modem sets of every route with several modems."""
        return tuple(sorted({tuple(sorted(r.modems)) for r in self.routes if len(r.modems) > 1}))


# --- per-endpoint options: TOML key -> the environment variable whose parser, default and help it shares ----
_ENDPOINT_OPTIONS: dict[str, str] = {
    "sync_method": "SMSGW_SYNC_METHOD",
    "sync_format": "SMSGW_SYNC_FORMAT",
    "sync_keys": "SMSGW_SYNC_KEYS",
    "results_shape": "SMSGW_RESULTS_SHAPE",
    "sent_ok_code": "SMSGW_SENT_OK_CODE",
    "task_interval": "SMSGW_TASK_INTERVAL",
    "result_interval": "SMSGW_RESULT_INTERVAL",
    "reply_from_server": "SMSGW_REPLY_FROM_SERVER",
    "auto_response": "SMSGW_AUTO_RESPONSE",
    "query_codes": "SMSGW_QUERY_CODES",
    "max_refusals": "SMSGW_MAX_REFUSALS",
    "refusal_is_final": "SMSGW_REFUSAL_IS_FINAL",
    "max_server_errors": "SMSGW_MAX_SERVER_ERRORS",
    "max_retry_age": "SMSGW_MAX_RETRY_AGE",
    "device_id": "SMSGW_DEVICE_ID",
    "http_timeout": "SMSGW_HTTP_TIMEOUT",
    "message_results": "SMSGW_MESSAGE_RESULTS",
    "inbound": "SMSGW_INBOUND",
    "tasks": "SMSGW_TASKS",
    "sync_url": "SMSGW_SYNC_URL",
    "secret": "SMSGW_SECRET",
}
_LIST_KEYS = ("keywords", "patterns", "allow_senders", "block_senders")
_ENDPOINT_KEYS = frozenset({"name", "secret_file", "signing_key", "signing_key_file", *_LIST_KEYS, *_ENDPOINT_OPTIONS})
_LIMIT_KEYS = {f.name for f in ModemLimits.__dataclass_fields__.values()}


class _Reader:
    """Typed access to a parsed TOML document; every error names the file and the key path."""

    def __init__(self, source: str, *, read_secrets: bool = True) -> None:
        self.source = source
        # Workers that never talk to a Sync URL (modem workers, the parked CLI) do not read secret files: they
        # need not be mounted in their containers (each container gets only the secrets it uses).
        self.read_secrets = read_secrets

    def error(self, path: str, problem: str) -> ConfigError:
        return ConfigError(f"{self.source}: {path}: {problem}")

    def table(self, value: Any, path: str) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise self.error(path, f"expected a table, got {_toml_type(value)}")
        return value

    def unknown_keys(self, table: Mapping[str, Any], allowed: frozenset[str] | set[str], path: str) -> None:
        for key in table:
            if key not in allowed:
                known = ", ".join(sorted(allowed))
                raise self.error(f"{path}.{key}" if path else key, f"unknown key; known keys: {known}")

    def strings(self, value: Any, path: str) -> tuple[str, ...]:
        if not isinstance(value, list):
            raise self.error(path, f"expected a list of strings, got {_toml_type(value)}")
        for index, item in enumerate(value):
            if not isinstance(item, str) or not item:
                raise self.error(f"{path}[{index}]", f"expected a non-empty string, got {_toml_type(item)}")
        return tuple(value)

    def string(self, value: Any, path: str) -> str:
        if not isinstance(value, str):
            raise self.error(path, f"expected a string, got {_toml_type(value)}")
        return value

    def secret_file(self, value: Any, path: str) -> str:
        name = self.string(value, path)
        if not self.read_secrets:
            return ""
        try:
            # Docker/compose secrets end with a newline; a secret never does.
            return Path(name).read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise self.error(path, f"cannot read the secret file: {exc.strerror or exc}") from None

    def option(self, key: str, value: Any, path: str) -> Any:
        """Parse a per-endpoint option with the parser of the environment variable it mirrors."""
        var = ENV_VARS[_ENDPOINT_OPTIONS[key]]
        if key == "result_interval":
            # SMSGW_RESULT_INTERVAL is read as text (empty = the task interval); in the file the key is simply
            # omitted for that, and a value is seconds, parsed and bounded like task_interval.
            var = ENV_VARS["SMSGW_TASK_INTERVAL"]
        if key == "sync_keys" and isinstance(value, dict):
            value = ",".join(f"{k}={self.string(v, f'{path}.{k}')}" for k, v in value.items())
        if isinstance(value, bool):
            text = "true" if value else "false"
            if var.default not in ("true", "false"):
                raise self.error(path, f"expected {_expected(var.default)}, got a boolean")
        elif isinstance(value, (int, float, str)):
            if var.default in ("true", "false") and not isinstance(value, bool):
                raise self.error(path, f"expected true or false, got {_toml_type(value)}")
            text = str(value)
        else:
            raise self.error(path, f"expected {_expected(var.default)}, got {_toml_type(value)}")
        try:
            return var.parse(path, text)
        except ConfigError as exc:
            raise ConfigError(f"{self.source}: {exc}") from None


def _expected(default: str | None) -> str:
    if default in ("true", "false"):
        return "true or false"
    try:
        float(default or "")
    except ValueError:
        return "a string"
    return "a number"


def _toml_type(value: Any) -> str:
    return {
        bool: "a boolean",
        int: "a number",
        float: "a number",
        str: "a string",
        list: "a list",
        dict: "a table",
    }.get(type(value), type(value).__name__)


def _compile(reader: _Reader, patterns: Sequence[str], path: str) -> tuple[re.Pattern[str], ...]:
    compiled = []
    for index, pattern in enumerate(patterns):
        try:
            compiled.append(re.compile(pattern, re.IGNORECASE))
        except re.error as exc:
            raise reader.error(f"{path}[{index}]", f"bad regular expression {pattern!r}: {exc}") from None
    return tuple(compiled)


def _endpoint(reader: _Reader, raw: Any, path: str) -> EndpointConfig:
    table = reader.table(raw, path)
    reader.unknown_keys(table, _ENDPOINT_KEYS, path)
    if "name" not in table:
        raise reader.error(f"{path}.name", "required")
    name = reader.string(table["name"], f"{path}.name")
    if not _ENDPOINT_NAME.fullmatch(name):
        raise reader.error(f"{path}.name", f"use 1-32 of a-z, 0-9, '_' or '-', got {name!r}")
    if name in _RESERVED_NAMES:
        # smsgw.inbound.parked is the parked queue of the single-endpoint version's inbound queue.
        raise reader.error(f"{path}.name", f"{name!r} is reserved (it would clash with a parked queue's name)")
    values: dict[str, Any] = {}
    for key, var_name in _ENDPOINT_OPTIONS.items():
        default = ENV_VARS[var_name].default or ""
        if key in table:
            values[key] = reader.option(key, table[key], f"{path}.{key}")
        elif key == "result_interval":
            values[key] = ""
        else:
            values[key] = ENV_VARS[var_name].parse(var_name, default)
    if not values["result_interval"]:
        values["result_interval"] = values["task_interval"]
    if "secret_file" in table:  # the file wins: compose secrets keep the value out of the config file
        values["secret"] = reader.secret_file(table["secret_file"], f"{path}.secret_file")
    signing_key = reader.string(table.get("signing_key", ""), f"{path}.signing_key")
    if "signing_key_file" in table:
        signing_key = reader.secret_file(table["signing_key_file"], f"{path}.signing_key_file")
    lists = {key: reader.strings(table.get(key, []), f"{path}.{key}") for key in _LIST_KEYS}
    for switch in ("inbound", "tasks", "message_results"):
        if values[switch] and not values["sync_url"]:
            raise reader.error(f"{path}.sync_url", f"required with {switch} = true")
    if values["sync_format"] == "xml":
        try:
            check_xml_keys(values["sync_keys"], f"{path}.sync_keys")
        except ConfigError as exc:
            raise ConfigError(f"{reader.source}: {exc}") from None
    return EndpointConfig(
        name=name,
        signing_key=signing_key,
        keywords=lists["keywords"],
        patterns=_compile(reader, lists["patterns"], f"{path}.patterns"),
        allow_senders=lists["allow_senders"],
        block_senders=lists["block_senders"],
        **values,
    )


def _limits(reader: _Reader, raw: Any, path: str) -> ModemLimits:
    table = reader.table(raw, path)
    reader.unknown_keys(table, _LIMIT_KEYS, path)
    values: dict[str, int] = {}
    for key, value in table.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise reader.error(f"{path}.{key}", f"expected a whole number >= 0 (0 = unlimited), got {value!r}")
        values[key] = value
    return ModemLimits(**values)


def parse_fleet(document: Mapping[str, Any], source: str, *, read_secrets: bool = True) -> FleetConfig:
    """Validate a parsed fleet file; ``read_secrets=False`` leaves ``secret_file``/``signing_key_file`` unread
    (their endpoints' secrets are empty) for workers that never talk to a Sync URL.

    Raises:
        ConfigError: one line naming ``source``, the key path and the problem.
    """
    reader = _Reader(source, read_secrets=read_secrets)
    reader.unknown_keys(document, {"endpoints", "routes", "modems"}, "")
    raw_endpoints = document.get("endpoints", [])
    if not isinstance(raw_endpoints, list) or not raw_endpoints:
        raise reader.error("endpoints", "expected at least one [[endpoints]] table")
    endpoints = tuple(_endpoint(reader, raw, f"endpoints[{i}]") for i, raw in enumerate(raw_endpoints))
    seen: set[str] = set()
    for index, endpoint in enumerate(endpoints):
        if endpoint.name in seen:
            raise reader.error(f"endpoints[{index}].name", f"duplicate endpoint name {endpoint.name!r}")
        seen.add(endpoint.name)
    modem_table = reader.table(document.get("modems", {}), "modems")
    limits: list[tuple[str, ModemLimits]] = []
    for modem_id, raw in modem_table.items():
        if not _MODEM_ID.fullmatch(modem_id):
            raise reader.error(f"modems.{modem_id}", "a modem id is 1-64 letters, digits, '.', '_' or '-'")
        limits.append((modem_id, _limits(reader, raw, f"modems.{modem_id}")))
    known = {modem_id for modem_id, _ in limits}
    raw_routes = document.get("routes", [])
    if not isinstance(raw_routes, list):
        raise reader.error("routes", f"expected [[routes]] tables, got {_toml_type(raw_routes)}")
    routes: list[Route] = []
    for index, raw in enumerate(raw_routes):
        path = f"routes[{index}]"
        table = reader.table(raw, path)
        reader.unknown_keys(table, {"prefix", "modems"}, path)
        prefix = reader.string(table.get("prefix", ""), f"{path}.prefix")
        if not _PREFIX.fullmatch(prefix):
            raise reader.error(f"{path}.prefix", f"expected a number prefix such as '+25573', got {prefix!r}")
        if "modems" not in table:
            raise reader.error(f"{path}.modems", "required: the modems this prefix leaves through")
        modems = reader.strings(table["modems"], f"{path}.modems")
        if not modems:
            raise reader.error(f"{path}.modems", "expected at least one modem")
        for position, modem_id in enumerate(modems):
            if modem_id not in known:
                raise reader.error(
                    f"{path}.modems[{position}]", f"unknown modem {modem_id!r}: declare it as [modems.{modem_id}]"
                )
        routes.append(Route(prefix, tuple(dict.fromkeys(modems))))
    return FleetConfig(source, endpoints, tuple(routes), tuple(limits))


def load_fleet_file(path: str, *, read_secrets: bool = True) -> FleetConfig:
    """Read and validate the fleet file at ``path``.

    Raises:
        ConfigError: the file cannot be read, is not TOML, or does not validate (one line, file and key named).
    """
    try:
        with open(path, "rb") as file:
            document = tomllib.load(file)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    return parse_fleet(document, path, read_secrets=read_secrets)


def fleet_from_settings(settings: Settings) -> FleetConfig:
    """The env-only fleet: one endpoint named ``default`` from today's ``SMSGW_*`` variables, no routes."""
    endpoint = EndpointConfig(
        name=DEFAULT_ENDPOINT,
        sync_url=settings.sync_url,
        secret=settings.secret,
        signing_key="",
        keywords=settings.keywords,
        patterns=(),
        allow_senders=(),
        block_senders=(),
        inbound=settings.inbound,
        tasks=settings.tasks,
        message_results=settings.message_results,
        sync_method=settings.sync_method,
        sync_format=settings.sync_format,
        sync_keys=settings.sync_keys,
        results_shape=settings.results_shape,
        sent_ok_code=settings.sent_ok_code,
        task_interval=settings.task_interval,
        result_interval=settings.result_interval,
        reply_from_server=settings.reply_from_server,
        auto_response=settings.auto_response,
        query_codes=settings.query_codes,
        max_refusals=settings.max_refusals,
        refusal_is_final=settings.refusal_is_final,
        max_server_errors=settings.max_server_errors,
        max_retry_age=settings.max_retry_age,
        device_id=settings.device_id,
        http_timeout=settings.http_timeout,
    )
    return FleetConfig("environment", (endpoint,))


def load_fleet(settings: Settings, *, read_secrets: bool = True) -> FleetConfig:
    """The fleet of this gateway: the ``SMSGW_CONFIG`` file if set, else the env-only ``default`` endpoint.

    Raises:
        ConfigError: the file is invalid (one line naming the file and key).
    """
    if settings.config:
        return load_fleet_file(settings.config, read_secrets=read_secrets)
    return fleet_from_settings(settings)


def require_sync_urls(fleet: FleetConfig, endpoints: Sequence[EndpointConfig], what: str) -> None:
    """Raise ConfigError when no endpoint serves ``what`` (a worker with nothing to do is a configuration
    error, said at start-up rather than discovered as silence)."""
    if not endpoints:
        if fleet.source == "environment":
            raise ConfigError(f"SMSGW_SYNC_URL: required by this worker ({what})")
        raise ConfigError(f"{fleet.source}: endpoints: no endpoint has {what}")


def describe_fleet(fleet: FleetConfig) -> str:
    """A one-line summary for start-up logs and ``config check`` (never secrets)."""

    def legs(e: EndpointConfig) -> str:
        switches = (("inbound", e.inbound), ("tasks", e.tasks), ("results", e.message_results))
        return "+".join(name for name, on in switches if on) or "off"

    names = ", ".join(f"{e.name} ({legs(e)})" for e in fleet.endpoints)
    return (
        f"{len(fleet.endpoints)} endpoint(s): {names}; {len(fleet.routes)} route(s); "
        f"{len(fleet.modem_limits)} modem(s) with limits"
    )


def main(argv: list[str] | None = None, *, out: Callable[[str], None] = print) -> int:
    """``python -m services.config check FILE``: validate a fleet file; exit 0 (valid) or 2 (one line why)."""
    parser = argparse.ArgumentParser(prog="python -m services.config", description="Validate a fleet file.")
    sub = parser.add_subparsers(dest="command", required=True)
    check = sub.add_parser("check", help="validate FILE (default: $SMSGW_CONFIG)")
    check.add_argument("file", nargs="?", default=os.environ.get("SMSGW_CONFIG", ""))
    args = parser.parse_args(argv)
    if not args.file:
        print("config check: name a file (or set SMSGW_CONFIG)", file=sys.stderr)
        return 2
    try:
        fleet = load_fleet_file(args.file)
    except ConfigError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return 2
    out(f"ok: {args.file}: {describe_fleet(fleet)}")
    return 0


__all__ = [
    "DEFAULT_ENDPOINT",
    "FILTER_REASONS",
    "SYNC_FIELDS",
    "EndpointConfig",
    "FleetConfig",
    "ModemLimits",
    "Route",
    "fleet_from_settings",
    "load_fleet",
    "load_fleet_file",
    "parse_fleet",
]

if __name__ == "__main__":
    sys.exit(main())
