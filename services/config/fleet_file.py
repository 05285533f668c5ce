"""The fleet file: read the TOML file named by ``SMSGW_CONFIG`` into a ``FleetConfig`` (``load_fleet`` picks
the file or the env-only fleet).

Every worker validates the fleet at start-up: an unknown key, a bad regular expression, a duplicate name or a
route to an unknown modem stops it with one line naming the file and the key path (``ConfigError``). Per-endpoint
options share the parser, default and help of the variable they mirror (``_ENDPOINT_OPTIONS``), and so do the
SIM pause keys of ``[modems.<id>]``. ``smsgw config check FILE`` runs the same checks.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import stat
import tomllib
import urllib.parse
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from services.config.fleet import (
    CAP_KEYS,
    ENDPOINT_KINDS,
    MODEM_OPTIONS,
    EndpointConfig,
    FleetConfig,
    ModemLimits,
    Route,
    env_modem_limits,
    fleet_from_env,
)
from services.config.process import Settings
from services.config.sources import ConfigError, not_utf8
from services.config.variables import ENV_VARS, check_xml_keys, default_of
from services.config.worker_env import WorkerEnv

log = logging.getLogger(__name__)

_ENDPOINT_NAME = re.compile(r"[a-z0-9_-]{1,32}")
_MODEM_ID = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_RESERVED_NAMES = frozenset({"parked"})
_PREFIX = re.compile(r"\+?[0-9]{1,15}")

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
# Keys of one endpoint kind only (issue 15): a key of another kind is an error, said with the kind it belongs to.
_SMSSYNC_KEYS = frozenset(
    {
        "sync_url",
        "secret",
        "secret_file",
        "sync_method",
        "sync_format",
        "sync_keys",
        "results_shape",
        "sent_ok_code",
        "task_interval",
        "result_interval",
        "reply_from_server",
        "auto_response",
        "query_codes",
        "tasks",
    }
)
KIND_KEYS: dict[str, frozenset[str]] = {
    "smssync": _SMSSYNC_KEYS | {"signing_key", "signing_key_file"},
    "rapidpro": frozenset({"receive_url"}),
    "kannel": frozenset({"get_url", "username", "password", "password_file"}),
    "webhook": frozenset({"url", "signing_key", "signing_key_file"}),
}
# The URL key of each kind other than smssync (EndpointConfig.kind_url).
KIND_URL_KEYS = {"rapidpro": "receive_url", "kannel": "get_url", "webhook": "url"}
_COMMON_KEYS = frozenset({"name", "kind", "api_key", "api_key_file", *_LIST_KEYS, *_ENDPOINT_OPTIONS} - _SMSSYNC_KEYS)
ENDPOINT_KEYS = _COMMON_KEYS.union(*KIND_KEYS.values())
MODEM_KEYS = frozenset({*CAP_KEYS, *MODEM_OPTIONS})


class _Reader:
    """Typed access to a parsed TOML document; every error names the file and the key path."""

    def __init__(self, source: str, *, read_secrets: bool = True, base_dir: Path | None = None) -> None:
        self.source = source
        # Relative paths in a fleet file name files next to it, whatever folder a worker is started from.
        self.base_dir = base_dir
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

    def resolve(self, name: str) -> Path:
        """``name`` as a path: a relative one is taken from the fleet file's folder (``base_dir``)."""
        path = Path(name).expanduser()
        return path if path.is_absolute() or self.base_dir is None else self.base_dir / path

    def secret_file(self, value: Any, path: str) -> str:
        name = self.string(value, path)
        if not self.read_secrets:
            return ""
        file = self.resolve(name)
        try:
            # Docker/compose secrets end with a newline; a secret never does.
            return file.read_text(encoding="utf-8").strip()
        except UnicodeDecodeError as exc:
            raise self.error(path, f"cannot read the secret file {file}: {not_utf8(exc)}") from None
        except (OSError, ValueError) as exc:  # ValueError: a NUL in the path (open() refuses it)
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
            raise self.error(path, f"cannot read the secret file {file}: {reason}") from None

    def option(self, key: str, var_name: str, value: Any, path: str) -> Any:
        """Parse the option ``key`` with the parser of the variable ``var_name`` it mirrors."""
        var = ENV_VARS[var_name]
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
            if not isinstance(value, str) and _expected(var.default) == "a string":
                # auto_response = 3.5 is a slip (quotes forgotten, or the wrong key), not a text to send
                raise self.error(path, f"expected a string, got {_toml_type(value)} ({value!r}); quote it if meant")
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
    reader.unknown_keys(table, ENDPOINT_KEYS, path)
    name = _endpoint_name(reader, table, path)
    kind = _kind_of(reader, table, path)
    values: dict[str, Any] = {}
    for key, var_name in _ENDPOINT_OPTIONS.items():
        if key in table:
            values[key] = reader.option(key, var_name, table[key], f"{path}.{key}")
        else:
            values[key] = default_of(var_name)
    if values["result_interval"] is None:
        values["result_interval"] = values["task_interval"]
    values["secret_origin"] = f"{reader.source} {path}.secret"
    if "secret_file" in table:  # the file wins: compose secrets keep the value out of the config file
        values["secret"] = reader.secret_file(table["secret_file"], f"{path}.secret_file")
        values["secret_origin"] = f"{reader.source} {path}.secret_file ({reader.resolve(table['secret_file'])})"
    signing_key = _secret(reader, table, path, "signing_key")
    lists = {key: reader.strings(table.get(key, []), f"{path}.{key}") for key in _LIST_KEYS}
    if kind == "smssync":
        for switch in ("inbound", "tasks", "message_results"):
            if values[switch] and not values["sync_url"]:
                raise reader.error(f"{path}.sync_url", f"required with {switch} = true")
    else:
        values.update(_kind_values(reader, table, path, kind))
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
        kind=kind,
        api_key=_secret(reader, table, path, "api_key"),
        **values,
    )


def _endpoint_name(reader: _Reader, table: Mapping[str, Any], path: str) -> str:
    """The endpoint's ``name``, checked (required, a queue-name-safe word, not reserved)."""
    if "name" not in table:
        raise reader.error(f"{path}.name", "required")
    name = reader.string(table["name"], f"{path}.name")
    if not _ENDPOINT_NAME.fullmatch(name):
        raise reader.error(f"{path}.name", f"use 1-32 of a-z, 0-9, '_' or '-', got {name!r}")
    if name in _RESERVED_NAMES:
        # smsgw.inbound.parked is the parked queue of the single-endpoint version's inbound queue.
        raise reader.error(f"{path}.name", f"{name!r} is reserved (it would clash with a parked queue's name)")
    return name


def _kind_of(reader: _Reader, table: Mapping[str, Any], path: str) -> Any:
    """The endpoint's ``kind`` (default smssync); a key that belongs to another kind is an error naming it."""
    kind = reader.string(table.get("kind", "smssync"), f"{path}.kind")
    if kind not in ENDPOINT_KINDS:
        raise reader.error(f"{path}.kind", f"expected one of {', '.join(ENDPOINT_KINDS)}, got {kind!r}")
    for key in table:
        if key in KIND_KEYS[kind] or key in _COMMON_KEYS:
            continue
        owners = " or ".join(f'"{k}"' for k, keys in KIND_KEYS.items() if key in keys)
        raise reader.error(f"{path}.{key}", f'not a key of kind = "{kind}" (it belongs to kind = {owners})')
    return kind


def _secret(reader: _Reader, table: Mapping[str, Any], path: str, key: str) -> str:
    """The secret ``key`` of an endpoint: from ``<key>_file`` when given (it wins), else the inline value."""
    value = reader.string(table.get(key, ""), f"{path}.{key}")
    if f"{key}_file" in table:
        value = reader.secret_file(table[f"{key}_file"], f"{path}.{key}_file")
    return value


def _kind_values(reader: _Reader, table: Mapping[str, Any], path: str, kind: str) -> dict[str, Any]:
    """The settings of a rapidpro, kannel or webhook endpoint: its URL (required, http(s)), its credentials,
    inbound and results on unless switched off, never task polling."""
    url_key = KIND_URL_KEYS[kind]
    if url_key not in table:
        raise reader.error(f"{path}.{url_key}", f'required for kind = "{kind}"')
    url = reader.option(url_key, "SMSGW_SYNC_URL", table[url_key], f"{path}.{url_key}")
    if not url:
        raise reader.error(f"{path}.{url_key}", f'required for kind = "{kind}"')
    if kind == "rapidpro" and not urllib.parse.urlsplit(url).path.rstrip("/").endswith("/receive"):
        raise reader.error(f"{path}.{url_key}", "expected the channel's receive URL (ending in /receive)")
    values: dict[str, Any] = {"kind_url": url, "tasks": False, "reply_from_server": False}
    if "message_results" not in table:  # states go back to the platform unless switched off
        values["message_results"] = True
    if kind == "kannel":
        values["username"] = reader.string(table.get("username", ""), f"{path}.username")
        values["password"] = _secret(reader, table, path, "password")
        has_password = "password" in table or "password_file" in table
        if bool(values["username"]) != has_password:
            missing = "password" if values["username"] else "username"
            raise reader.error(f"{path}.{missing}", "username and password go together (the send API checks both)")
    return values


def _limits(reader: _Reader, raw: Any, path: str, defaults: ModemLimits) -> ModemLimits:
    """One ``[modems.<id>]`` table: caps (0 = unlimited) and SIM pause keys, the rest from ``defaults``."""
    table = reader.table(raw, path)
    reader.unknown_keys(table, MODEM_KEYS, path)
    values: dict[str, Any] = {}
    for key, value in table.items():
        if key in MODEM_OPTIONS:
            values[key] = reader.option(key, MODEM_OPTIONS[key], value, f"{path}.{key}")
        elif isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise reader.error(f"{path}.{key}", f"expected a whole number >= 0 (0 = unlimited), got {value!r}")
        else:
            values[key] = value
    return dataclasses.replace(defaults, **values)


def parse_fleet(
    document: Mapping[str, Any],
    source: str,
    *,
    read_secrets: bool = True,
    modem_defaults: ModemLimits | None = None,
    base_dir: Path | None = None,
) -> FleetConfig:
    """Validate a parsed fleet file; ``read_secrets=False`` leaves ``secret_file``/``signing_key_file`` unread
    (their endpoints' secrets are empty) for workers that never talk to a Sync URL. ``modem_defaults`` (default:
    the variables' defaults) are the limits every ``[modems.<id>]`` table starts from. Relative secret file
    paths are read from ``base_dir`` (the fleet file's folder; None: the current folder).

    Raises:
        ConfigError: one line naming ``source``, the key path and the problem.
    """
    reader = _Reader(source, read_secrets=read_secrets, base_dir=base_dir)
    defaults = ModemLimits() if modem_defaults is None else modem_defaults
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
        limits.append((modem_id, _limits(reader, raw, f"modems.{modem_id}", defaults)))
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
    return FleetConfig(source, endpoints, tuple(routes), tuple(limits), defaults)


def load_fleet_file(path: str, *, read_secrets: bool = True, modem_defaults: ModemLimits | None = None) -> FleetConfig:
    """Read and validate the fleet file at ``path`` (``parse_fleet``).

    Raises:
        ConfigError: the file cannot be read, is not TOML, or does not validate (one line, file and key named).
    """
    try:
        with open(path, "rb") as file:
            document = tomllib.load(file)
            mode = os.fstat(file.fileno()).st_mode
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:  # tomllib decodes the whole file first: a TOML file is UTF-8
        raise ConfigError(f"{path}: not valid TOML: {not_utf8(exc)}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    folder = Path(path).expanduser().absolute().parent
    fleet = parse_fleet(document, path, read_secrets=read_secrets, modem_defaults=modem_defaults, base_dir=folder)
    warn_if_readable_secrets(path, document, mode)
    return fleet


def _inline_secrets(document: Mapping[str, Any]) -> list[str]:
    """The key paths of the secrets written into a (validated) fleet document itself."""
    found = []
    for index, endpoint in enumerate(document.get("endpoints", [])):
        for key in ("secret", "signing_key", "api_key", "password"):
            if endpoint.get(key):
                found.append(f"endpoints[{index}].{key}")
        for url_key in ("sync_url", *KIND_URL_KEYS.values()):
            if urllib.parse.urlsplit(endpoint.get(url_key, "")).password:
                found.append(f"endpoints[{index}].{url_key} (its password)")
    return found


def warn_if_readable_secrets(path: str, document: Mapping[str, Any], mode: int) -> bool:
    """Log one WARNING naming the file and the fix when the fleet file holds secrets and every user of the
    machine may read it (``mode``: its ``st_mode``); returns whether it warned."""
    if not mode & stat.S_IROTH:
        return False
    secrets = _inline_secrets(document)
    if not secrets:
        return False
    log.warning(
        "%s holds secrets (%s) and every user of this machine may read it (mode %s): run `chmod 600 %s`, or move "
        "them into secret_file / signing_key_file",
        path,
        ", ".join(secrets),
        stat.filemode(mode),
        path,
    )
    return True


def load_fleet(
    settings: Settings,
    reads: WorkerEnv | None = None,
    environ: Mapping[str, str] | None = None,
    *,
    read_secrets: bool = True,
) -> FleetConfig:
    """The fleet of this gateway: the ``SMSGW_CONFIG`` file if set, else the env-only ``default`` endpoint.
    Reads the endpoint and SIM limit variables only when ``reads`` declares them (default: both); undeclared
    ones keep their defaults.

    Raises:
        ConfigError: a variable is malformed, or the file is invalid (one line naming the file and key).
    """
    env = os.environ if environ is None else environ
    modem_env = env if reads is None or reads.modems else {}
    if settings.config:
        defaults = env_modem_limits(modem_env)
        return load_fleet_file(settings.config, read_secrets=read_secrets, modem_defaults=defaults)
    endpoint_env = env if reads is None or reads.endpoints else {}
    return fleet_from_env(endpoint_env, modem_env, read_secrets=read_secrets)
