"""The ``SMSGW_*`` variable table: every variable's name, default, help line and parser, in one place.

Three kinds of variable: *process* variables configure one worker process (``services.config.process``);
*endpoint* variables describe the env-only endpoint ``default`` (``services.config.fleet.env_endpoint``); *modem*
variables are the SIM limits every ``[modems.<id>]`` starts from. A worker declares which it reads
(``services.config.worker_env.WorkerEnv``): its loader reads exactly those, through ``read_var`` (the one place a
value is read), and its ``--help`` lists exactly those. A bad value stops the worker with one line naming the
variable (``ConfigError``), instead of failing later on the first SMS.
"""

from __future__ import annotations

import math
import os
import re
import urllib.parse
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

from services.config.modem_port import ModemPortError, parse_modem_port, parse_port_globs
from services.config.sources import ConfigError, amqp_urls, redact_url, split_url

ResultsShape = Literal["message_results", "message_result_string", "message_result_array"]
_RESULTS_SHAPES: tuple[ResultsShape, ...] = (
    "message_results",
    "message_result_string",
    "message_result_array",
)
SyncMethod = Literal["POST", "PUT"]
_SYNC_METHODS: tuple[SyncMethod, ...] = ("POST", "PUT")
SyncFormat = Literal["urlencoded", "json", "xml"]
_SYNC_FORMATS: tuple[SyncFormat, ...] = ("urlencoded", "json", "xml")
_LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
# The fields of an inbound sync request, in the app's order; SMSGW_SYNC_KEYS may rename each of them.
SYNC_FIELDS = ("secret", "from", "message", "sent_timestamp", "sent_to", "message_id", "device_id")
AUTO_PORT = "auto"  # SMSGW_MODEM_PORT=auto: find the port by SMSGW_MODEM_IMEI
_XML_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]*")


@dataclass(frozen=True)
class EnvVar:
    """How one setting is read: variable name, default (as text), help line and parser."""

    name: str
    default: str | None  # None: required
    help: str
    parse: Callable[[str, str], Any]


def _str(name: str, raw: str) -> str:
    return raw


#: The state directory of a host install, when the worker may write there.
SYSTEM_STATE_DIR = "/var/lib/smsgw"


def default_state_dir() -> str:
    """An absolute state directory, the same from any folder a worker starts in: ``SYSTEM_STATE_DIR`` when it
    is (or its parent folder is) a writable directory, else ``$XDG_STATE_HOME/smsgw`` (``~/.local/state/smsgw``)."""
    system = SYSTEM_STATE_DIR
    probe = system if os.path.isdir(system) else os.path.dirname(system)
    if os.path.isdir(probe) and os.access(probe, os.W_OK | os.X_OK):
        return system
    xdg = os.environ.get("XDG_STATE_HOME", "")
    base = xdg if os.path.isabs(xdg) else os.path.join(os.path.expanduser("~"), ".local", "state")
    return os.path.join(base, "smsgw")


def _state_dir(name: str, raw: str) -> str:
    # Empty: an absolute default. A relative var/state made two workers started from two folders use two ledgers.
    return raw.strip() or default_state_dir()


def _bool(name: str, raw: str) -> bool:
    value = raw.strip().lower()
    if value in {"1", "true", "yes", "on"}:
        return True
    if value in {"0", "false", "no", "off", ""}:
        return False
    raise ConfigError(f"{name}: expected true/false, got {raw!r}")


def _number(minimum: float, maximum: float | None = None) -> Callable[[str, str], float]:
    def parse(name: str, raw: str) -> float:
        try:
            value = float(raw)
        except ValueError:
            raise ConfigError(f"{name}: expected a number, got {raw!r}") from None
        if not math.isfinite(value):  # float() reads "nan" and "inf"; neither is a usable time or count
            raise ConfigError(f"{name}: expected a finite number, got {raw!r}")
        if value < minimum or (maximum is not None and value > maximum):
            bound = f">= {minimum}" if maximum is None else f"between {minimum} and {maximum}"
            raise ConfigError(f"{name}: must be {bound}, got {raw!r}")
        return value

    return parse


def _port(name: str, raw: str) -> int:
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{name}: expected a TCP port number, got {raw!r}") from None
    if not 0 <= value <= 65535:
        raise ConfigError(f"{name}: port out of range: {raw!r}")
    return value


_T = TypeVar("_T")


def _optional(parse: Callable[[str, str], _T]) -> Callable[[str, str], _T | None]:
    """``parse``, except that an empty value is None (the setting then falls back to another)."""

    def parse_optional(name: str, raw: str) -> _T | None:
        return None if raw.strip() == "" else parse(name, raw)

    return parse_optional


def _matching(pattern: str, expected: str) -> Callable[[str, str], str]:
    """A parser of an optional text (empty = off) that, stripped, must match ``pattern`` in full."""

    def parse(name: str, raw: str) -> str:
        value = raw.strip()
        if value and not re.fullmatch(pattern, value):
            raise ConfigError(f"{name}: expected {expected}, got {raw!r}")
        return value

    return parse


# A USSD code (``*100#``): digits, ``*``, ``#``, ``+`` only, since it goes into an AT command.
_ussd_code = _matching(r"[0-9*#+]{1,40}", "a USSD code such as *100# (digits, * # + only)")
_imei = _matching(r"\d{14,17}", "the modem's IMEI (14-17 digits, AT+CGSN)")


def _int(minimum: int) -> Callable[[str, str], int]:
    def parse(name: str, raw: str) -> int:
        try:
            value = int(raw)
        except ValueError:
            raise ConfigError(f"{name}: expected a whole number, got {raw!r}") from None
        if value < minimum:
            raise ConfigError(f"{name}: must be >= {minimum}, got {raw!r}")
        return value

    return parse


def _amqp_url(name: str, raw: str) -> str:
    # Several brokers of one RabbitMQ cluster, comma separated: a worker connects to the first that answers.
    for url in amqp_urls(raw):
        parts = split_url(name, url)
        if parts.scheme not in {"amqp", "amqps"} or not parts.hostname:
            raise ConfigError(f"{name}: expected amqp://user:pass@host:port/vhost, got scheme {parts.scheme!r}")
    if not amqp_urls(raw):
        raise ConfigError(f"{name}: expected amqp://user:pass@host:port/vhost, got an empty value")
    return raw


def _ledger_url(name: str, raw: str) -> str:
    if raw == "":
        return raw  # the SQLite file in SMSGW_STATE_DIR
    try:  # the URL holds the database password: the message shows none of it
        parts = urllib.parse.urlsplit(raw)
        parts.port  # noqa: B018 - parsed (and range-checked) only when asked for
    except ValueError as exc:
        raise ConfigError(f"{name}: not a valid URL ({exc})") from None
    scheme = parts.scheme
    if scheme not in {"sqlite", "postgresql", "postgres"}:
        raise ConfigError(f"{name}: expected sqlite:///path or postgresql://user:pass@host/db, got scheme {scheme!r}")
    return raw


def _sync_url(name: str, raw: str) -> str:
    if raw == "":
        return raw  # checked by the workers that need it (require_sync_url)
    parts = split_url(name, raw)
    if parts.scheme not in {"http", "https"} or not parts.hostname:
        raise ConfigError(f"{name}: expected an http(s) URL, got {redact_url(raw)!r}")
    return raw


def _keywords(name: str, raw: str) -> tuple[str, ...]:
    return tuple(k.strip() for k in raw.split(",") if k.strip())


_C = TypeVar("_C", bound=str)


def _choice(options: tuple[_C, ...], normalise: Callable[[str], str] = str.strip) -> Callable[[str, str], _C]:
    """A parser accepting one of ``options`` (after ``normalise``), else a ConfigError listing them."""

    def parse(name: str, raw: str) -> _C:
        value = normalise(raw)
        for option in options:
            if value == option:
                return option
        raise ConfigError(f"{name}: expected one of {', '.join(options)}, got {raw!r}")

    return parse


def _sync_keys(name: str, raw: str) -> tuple[tuple[str, str], ...]:
    """``field=key`` pairs renaming the fields of the sync request (the app's configurable key names)."""
    pairs: list[tuple[str, str]] = []
    for item in (part.strip() for part in raw.split(",")):
        if not item:
            continue
        sync_field, separator, key = (text.strip() for text in item.partition("="))
        if not separator or not sync_field or not key:
            raise ConfigError(f"{name}: expected field=key pairs such as 'message=text', got {item!r}")
        if sync_field not in SYNC_FIELDS:
            raise ConfigError(f"{name}: unknown field {sync_field!r}; the fields are {', '.join(SYNC_FIELDS)}")
        if not key.isprintable() or any(ch.isspace() for ch in key):
            raise ConfigError(f"{name}: key {key!r} of {sync_field!r} holds spaces or control characters")
        if any(sync_field == known for known, _ in pairs):
            raise ConfigError(f"{name}: field {sync_field!r} is renamed twice")
        pairs.append((sync_field, key))
    renamed = dict(pairs)
    sent_keys = [renamed.get(f, f) for f in SYNC_FIELDS]
    clashes = sorted({k for k in sent_keys if sent_keys.count(k) > 1})
    if clashes:
        raise ConfigError(f"{name}: two fields would be sent under the same key {clashes[0]!r}")
    return tuple(pairs)


def _modem_port_setting(parse: Callable[[str, str], _T]) -> Callable[[str, str], _T]:
    """A parser of services.config.modem_port, its ModemPortError raised as the ConfigError of every setting."""

    def parse_setting(name: str, raw: str) -> _T:
        try:
            return parse(name, raw)
        except ModemPortError as exc:
            raise ConfigError(str(exc)) from None

    return parse_setting


def _modem_id(name: str, raw: str) -> str:
    if raw and not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", raw):
        raise ConfigError(f"{name}: use 1-64 letters, digits, '.', '_' or '-', got {raw!r}")
    return raw


def _table(*variables: EnvVar) -> dict[str, EnvVar]:
    """The variables by name."""
    return {var.name: var for var in variables}


# Per-process variables (services.config.process.Settings).
PROCESS_VARS = _table(
    EnvVar(
        "SMSGW_AMQP_URL",
        "amqp://guest:guest@127.0.0.1:5672/%2F",
        "RabbitMQ URL; the vhost in the path is honoured",
        _amqp_url,
    ),
    EnvVar(
        "SMSGW_AMQP_PASSWORD_FILE",
        "",
        "file holding the RabbitMQ password, put into every URL of "
        "SMSGW_AMQP_URL (which then names the user only: amqp://smsgw@rabbitmq/%2F); empty = the URL's own",
        _str,
    ),
    EnvVar(
        "SMSGW_CONFIG",
        "",
        "fleet configuration file (TOML: endpoints, routes, per-modem limits); empty = "
        "one endpoint named 'default' from the SMSGW_* variables below",
        _str,
    ),
    EnvVar(
        "SMSGW_METRICS_PORT",
        "",
        "port of /metrics; empty = the worker's own default (modem_worker 9101, "
        "sync_worker 9102, task_poller 9103, result_reporter 9104, send_api 9105); 0 = off",
        _optional(_port),
    ),
    EnvVar("SMSGW_METRICS_ADDR", "127.0.0.1", "address /metrics binds to (compose sets 0.0.0.0 for Prometheus)", _str),
    EnvVar(
        "SMSGW_LOG_LEVEL",
        "INFO",
        "DEBUG shows message bodies; INFO never does",
        _choice(_LOG_LEVELS, lambda raw: raw.strip().upper()),
    ),
    EnvVar(
        "SMSGW_LIVENESS_TIMEOUT",
        "300",
        "seconds a worker's main loop (consumer I/O loop, poll or report loop, "
        "modem supervisor loop) may go without a turn before --check says unhealthy and the worker exits with "
        "code 70 for its restart policy; longer than the longest legitimate wait",
        _number(10, 86400),
    ),
    EnvVar(
        "SMSGW_HEARTBEAT_DIR",
        "",
        "directory of the heartbeat files --check reads; empty = smsgw-heartbeat-<uid> in the system's tmp directory",
        _str,
    ),
    EnvVar("SMSGW_PREFETCH", "16", "unacked deliveries per consumer", _int(1)),
    EnvVar(
        "SMSGW_STATE_DIR",
        "",
        "directory of the outbound ledger (shared by the modem workers and task pollers of one host); empty = "
        "/var/lib/smsgw when writable, else ~/.local/state/smsgw",
        _state_dir,
    ),
    EnvVar(
        "SMSGW_LEDGER_URL",
        "",
        "never-twice ledger: sqlite:///path (one host) or "
        "postgresql://user:pass@host/db (shared by hosts); empty = SQLite in SMSGW_STATE_DIR",
        _ledger_url,
    ),
    EnvVar(
        "SMSGW_LEDGER_URL_FILE",
        "",
        "file holding SMSGW_LEDGER_URL (wins over it; e.g. a compose secret, so the database password is never in "
        "the environment); trailing newline stripped",
        _str,
    ),
    EnvVar(
        "SMSGW_LEDGER_RETENTION_DAYS",
        "90",
        "days the outbound ledger remembers a sent uuid (never-twice window)",
        _number(1),
    ),
    EnvVar(
        "SMSGW_PROBE_INTERVAL",
        "30",
        "seconds without a POST after which sync_worker probes an inbound endpoint's Sync URL "
        "(a bare GET; 0: never): smsgw_sync_url_up, alert SmsgwSyncUrlFailing",
        _number(0, 3600),
    ),
    EnvVar(
        "SMSGW_MODEM_FAILOVER",
        "300",
        "seconds a reply queued for one modem waits for it before another "
        "modem may send it; 0 = wait for that modem forever",
        _number(0),
    ),
    EnvVar(
        "SMSGW_MODEM_PORT",
        "",
        "serial device of this worker's modem, auto (found by SMSGW_MODEM_IMEI), or a modem on another host: "
        "socket://HOST:PORT (ser2net raw TCP) or rfc2217://HOST:PORT",
        _modem_port_setting(parse_modem_port),
    ),
    EnvVar("SMSGW_MODEM_ID", "", "name of this modem (default: derived from the port)", _modem_id),
    EnvVar("SMSGW_MODEM_BAUDRATE", "115200", "serial speed", _int(1200)),
    EnvVar(
        "SMSGW_MODEM_IMEI",
        "",
        "IMEI this worker's modem must have; another modem on the port is refused; required with SMSGW_MODEM_PORT=auto",
        _imei,
    ),
    EnvVar(
        "SMSGW_MODEM_PORT_GLOB",
        "/dev/ttyUSB*,/dev/ttyACM*,/dev/serial/by-id/*",
        "comma list of glob patterns SMSGW_MODEM_PORT=auto searches for the modem with SMSGW_MODEM_IMEI",
        _modem_port_setting(parse_port_globs),
    ),
    EnvVar(
        "SMSGW_MODEM_WATCHDOG",
        "30",
        "seconds between two watchdog probes (AT, and a check that the modem "
        "kept its settings); also the SIM sweep and health reading interval",
        _number(1, 3600),
    ),
    EnvVar(
        "SMSGW_MODEM_RESET_COMMAND",
        "",
        "shell command run (with a time-out, capped back-off) when reopening "
        "the port does not bring the modem back, e.g. a USB power cycle with uhubctl; empty = none",
        _str,
    ),
    EnvVar(
        "SMSGW_SIM_PIN",
        "",
        "PIN entered once when the SIM asks for it (never logged); a rejected PIN is never tried again automatically",
        _str,
    ),
    EnvVar("SMSGW_SIM_PIN_FILE", "", "file holding the SIM PIN (wins over SMSGW_SIM_PIN; e.g. a Docker secret)", _str),
    EnvVar(
        "SMSGW_SEND_INTERVAL",
        "0",
        "minimum seconds between two SMS sent by one modem (operators block SIMs that send in bursts); "
        "0 = as fast as the modem",
        _number(0, 3600),
    ),
    EnvVar(
        "SMSGW_OUTBOUND_MAX_AGE",
        "0",
        "seconds an outbound SMS may wait for a modem; older ones are not sent but reported failed "
        "(stale reminders); 0 = never expire",
        _number(0),
    ),
    EnvVar(
        "SMSGW_BALANCE_USSD",
        "",
        "USSD code that asks the SIM's balance (e.g. *100#); its first number becomes smsgw_sim_balance; empty = off",
        _ussd_code,
    ),
    EnvVar("SMSGW_BALANCE_INTERVAL", "3600", "seconds between two balance requests (SMSGW_BALANCE_USSD)", _number(10)),
    # send_api (issue 15)
    EnvVar("SMSGW_API_ADDR", "127.0.0.1", "address the send API binds to (compose sets 0.0.0.0)", _str),
    EnvVar("SMSGW_API_PORT", "8090", "port of the send API (RapidPro, Kannel, REST)", _port),
    EnvVar(
        "SMSGW_API_MAX_QUEUED",
        "1000",
        "messages an outbound queue may hold before the send API answers 503 + Retry-After (backpressure)",
        _int(1),
    ),
    EnvVar(
        "SMSGW_API_RATE",
        "10",
        "messages per second one API key (endpoint) may send, bursts of 10 times that; more: 429 + Retry-After",
        _number(0.001),
    ),
    EnvVar("SMSGW_API_MAX_BODY", "65536", "bytes a send API request body may have; more: 413", _int(64)),
)

# The env-only endpoint 'default' (services.config.fleet.env_endpoint); a fleet file has the same keys.
ENDPOINT_VARS = _table(
    EnvVar("SMSGW_SYNC_URL", "", "the SMSsync Sync URL (user:pass@ in it becomes Basic auth)", _sync_url),
    EnvVar("SMSGW_SECRET", "", "secret sent with every sync and task request; empty = none", _str),
    EnvVar(
        "SMSGW_SECRET_FILE",
        "",
        "file holding SMSGW_SECRET (wins over it; e.g. a compose secret); trailing newline stripped",
        _str,
    ),
    EnvVar("SMSGW_DEVICE_ID", "smssync-gateway", "device_id sent to the Sync URL", _str),
    EnvVar(
        "SMSGW_KEYWORDS",
        "",
        "comma list; only SMS containing one (case-insensitive) are forwarded; empty = all",
        _keywords,
    ),
    EnvVar("SMSGW_REPLY_FROM_SERVER", "true", "send the messages in the Sync URL's reply as SMS", _bool),
    EnvVar("SMSGW_AUTO_RESPONSE", "", "text sent to every sender whose SMS was accepted; empty = off", _str),
    EnvVar(
        "SMSGW_QUERY_CODES",
        "false",
        "answer SMS '@10' (signal), '@20' (Sync URL status), '@30' (battery), '@40' (all) by SMS instead of "
        "forwarding them",
        _bool,
    ),
    EnvVar("SMSGW_HTTP_TIMEOUT", "30", "seconds for each HTTP request to the Sync URL", _number(0.1, 600)),
    EnvVar(
        "SMSGW_MAX_RETRY_AGE",
        "604800",
        "seconds an inbound SMS is retried before it is parked",
        _number(1),
    ),
    EnvVar(
        "SMSGW_SYNC_METHOD",
        "POST",
        "HTTP method of inbound sync requests: POST or PUT",
        _choice(_SYNC_METHODS, lambda raw: raw.strip().upper()),
    ),
    EnvVar(
        "SMSGW_SYNC_FORMAT",
        "urlencoded",
        "body of inbound sync requests: urlencoded (the app's default), json (flat object of strings) or "
        "xml (root <payload>)",
        _choice(_SYNC_FORMATS, lambda raw: raw.strip().lower()),
    ),
    EnvVar(
        "SMSGW_SYNC_KEYS",
        "",
        "rename sync fields, comma list of field=key (e.g. 'message=text,from=sender'); fields: "
        + ", ".join(SYNC_FIELDS),
        _sync_keys,
    ),
    EnvVar("SMSGW_MAX_REFUSALS", "10", "times a success:false reply is retried before parking", _int(1)),
    EnvVar(
        "SMSGW_REFUSAL_IS_FINAL",
        "false",
        "park an inbound SMS at the first success:false instead of retrying it (for a server that stores the "
        "SMS and then refuses: each retry would store another copy)",
        _bool,
    ),
    EnvVar(
        "SMSGW_MAX_SERVER_ERRORS",
        "24",
        "HTTP 500 answers to one SMS before it is parked (some servers answer 500 to a repeated message_id)",
        _int(1),
    ),
    EnvVar("SMSGW_TASK_INTERVAL", "60", "seconds between ?task=send polls", _number(1)),
    EnvVar(
        "SMSGW_RESULT_INTERVAL",
        "",
        "seconds between ?task=result rounds (default: SMSGW_TASK_INTERVAL)",
        _optional(_number(1)),
    ),
    EnvVar(
        "SMSGW_MESSAGE_RESULTS",
        "false",
        "Message Results API: ?task=sent before sending, ?task=result reports",
        _bool,
    ),
    EnvVar(
        "SMSGW_RESULTS_SHAPE",
        "message_results",
        "POST ?task=result body: message_results (docs), message_result_string (app), message_result_array",
        _choice(_RESULTS_SHAPES),
    ),
    EnvVar("SMSGW_SENT_OK_CODE", "0", "sent_result_code for a successful send (docs 0, app -1)", _int(-1)),
    EnvVar("SMSGW_INBOUND", "true", "POST inbound SMS to the Sync URL (false: an outbound-only server)", _bool),
    EnvVar("SMSGW_TASKS", "true", "poll ?task=send on the Sync URL (false: an inbound-only server)", _bool),
)

# SIM limits: the defaults of every [modems.<id>] table (services.config.fleet.ModemLimits).
MODEM_VARS = _table(
    EnvVar(
        "SMSGW_SIM_BLOCK_AFTER",
        "5",
        "failed sends in a row to different recipients that pause the SIM "
        "(operator barring suspected); 0 = only SIM-level refusals pause it",
        _int(0),
    ),
    EnvVar(
        "SMSGW_SIM_PAUSE",
        "1800",
        "seconds a paused SIM sends nothing; doubles while pauses repeat (at most "
        "a day), back to this after a successful send",
        _number(1),
    ),
)


def check_xml_keys(sync_keys: Sequence[tuple[str, str]], name: str) -> None:
    """Raise ConfigError (naming ``name``) when a field would be sent under a key XML cannot carry."""
    renamed = dict(sync_keys)
    for key in (renamed.get(f, f) for f in SYNC_FIELDS):
        if not _XML_NAME.fullmatch(key):
            raise ConfigError(f"{name}: {key!r} is not a valid XML element name (sync format xml)")


ENV_VARS: dict[str, EnvVar] = {**PROCESS_VARS, **ENDPOINT_VARS, **MODEM_VARS}


def default_of(name: str) -> Any:
    """The parsed default of variable ``name`` (what a worker that does not read it uses)."""
    var = ENV_VARS[name]
    return var.parse(name, var.default or "")


def read_var(environ: Mapping[str, str], name: str) -> Any:
    """Read and parse variable ``name`` from ``environ`` (its default when unset): the one place a value is read.

    Raises:
        ConfigError: the value is malformed (or missing when required); the message names the variable.
    """
    var = ENV_VARS[name]
    raw = environ.get(name, var.default)
    if raw is None:
        raise ConfigError(f"{name}: required")
    return var.parse(name, raw)
