"""The fleet: which Sync URLs (endpoints) the gateway serves, how outbound SMS are routed to modems, and every
SIM limit (pacing, caps, pause after failed sends).

The fleet comes from the TOML file named by ``SMSGW_CONFIG`` (``services.config.fleet_file.load_fleet``);
without it, the endpoint variables describe one endpoint named ``default`` (``env_endpoint``, the one place they
are mapped), so an env-only deployment keeps working unchanged. The SIM limit variables (``SMSGW_SIM_BLOCK_AFTER``,
``SMSGW_SIM_PAUSE``) are the defaults of every modem, which a ``[modems.<id>]`` table may override.

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
    sim_pause = 3600
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

from services.config.sources import ConfigError, read_secret_file, redact_url
from services.config.variables import (
    ENDPOINT_VARS,
    MODEM_VARS,
    ResultsShape,
    SyncFormat,
    SyncMethod,
    check_xml_keys,
    default_of,
    read_var,
)

DEFAULT_ENDPOINT = "default"

#: What an endpoint speaks (issue 15): SMSsync (today's legs), RapidPro's External channel, Kannel's HTTP
#: interface, or signed JSON webhooks. services/platforms/ has one module per kind.
EndpointKind = Literal["smssync", "rapidpro", "kannel", "webhook"]
ENDPOINT_KINDS: tuple[EndpointKind, ...] = ("smssync", "rapidpro", "kannel", "webhook")


@dataclass(frozen=True)
class EndpointConfig:
    """One platform the gateway serves (an SMSsync server by default; ``kind``): its URL, filters, switches and
    protocol options."""

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
    # Where an operator changes the secret, for hints ("SMSGW_SECRET", "/etc/smsgw/fleet.toml endpoints[1].secret").
    secret_origin: str = "SMSGW_SECRET"  # noqa: S105 - the name of a setting, not a secret
    kind: EndpointKind = "smssync"
    # The kind's URL: rapidpro receive_url, kannel get_url (a template), webhook url ("" for smssync).
    kind_url: str = ""
    api_key: str = field(default="", repr=False)  # what callers of the send API present for this endpoint
    username: str = ""  # kannel: /cgi-bin/sendsms credentials
    password: str = field(default="", repr=False)

    @property
    def url(self) -> str:
        """The URL inbound SMS go to: the Sync URL, or the kind's URL (``kind_url``)."""
        return self.sync_url if self.kind == "smssync" else self.kind_url

    @property
    def redacted_url(self) -> str:
        """The endpoint's URL (``url``) with its password and secret masked (for logs)."""
        return redact_url(self.url)

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
    """Every limit of one SIM: pacing per minute, a daily cap and a cap per recipient and hour (0 = unlimited),
    and the pause after failed sends (``sim_block_after`` failures in a row pause it for ``sim_pause`` s)."""

    max_per_minute: int = 0
    max_per_day: int = 0
    max_per_recipient_per_hour: int = 0
    sim_block_after: int = field(default_factory=lambda: int(default_of("SMSGW_SIM_BLOCK_AFTER")))
    sim_pause: float = field(default_factory=lambda: float(default_of("SMSGW_SIM_PAUSE")))


# The [modems.<id>] keys that are counts (0 = unlimited), and the ones that default to a SIM limit variable.
CAP_KEYS = ("max_per_minute", "max_per_day", "max_per_recipient_per_hour")
MODEM_OPTIONS = {name.removeprefix("SMSGW_").lower(): name for name in MODEM_VARS}


@dataclass(frozen=True)
class FleetConfig:
    """Endpoints, routes and per-modem limits, validated. Build with ``load_fleet``."""

    source: str  # the file, or "environment"
    endpoints: tuple[EndpointConfig, ...]
    routes: tuple[Route, ...] = ()
    modem_limits: tuple[tuple[str, ModemLimits], ...] = ()
    modem_defaults: ModemLimits = field(default_factory=ModemLimits)  # of every modem without its own table

    @property
    def endpoint_names(self) -> tuple[str, ...]:
        """Every endpoint's name, in file order."""
        return tuple(e.name for e in self.endpoints)

    @property
    def modems(self) -> tuple[str, ...]:
        """The modems the file names under ``[modems.<id>]``."""
        return tuple(modem_id for modem_id, _ in self.modem_limits)

    @property
    def device_id(self) -> str:
        """The device id a modem stamps on the SMS it receives (``sent_to`` when the SIM does not know its own
        number): the first inbound endpoint's (env-only: ``SMSGW_DEVICE_ID``), else the first endpoint's."""
        inbound = self.inbound_endpoints()
        return (inbound or self.endpoints)[0].device_id

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
        """The limits of ``modem_id`` (its ``[modems.<id>]`` table, else the defaults of every modem)."""
        for known, limits in self.modem_limits:
            if known == modem_id:
                return limits
        return self.modem_defaults

    def pools_of(self, modem_id: str) -> tuple[tuple[str, ...], ...]:
        """The modem sets of routes with several modems that include ``modem_id`` (each one shared queue)."""
        pools = {tuple(sorted(r.modems)) for r in self.routes if len(r.modems) > 1 and modem_id in r.modems}
        return tuple(sorted(pools))

    def all_pools(self) -> tuple[tuple[str, ...], ...]:
        """The modem sets of every route with several modems."""
        return tuple(sorted({tuple(sorted(r.modems)) for r in self.routes if len(r.modems) > 1}))


def env_endpoint(environ: Mapping[str, str], *, read_secrets: bool = True) -> EndpointConfig:
    """The env-only endpoint ``default`` from the endpoint variables (``ENDPOINT_VARS``): the one place they are
    read. ``read_secrets=False`` leaves ``SMSGW_SECRET_FILE`` unread (for workers that never talk to a Sync URL).

    Raises:
        ConfigError: a value is malformed; the message names the variable.
    """
    values = {name.removeprefix("SMSGW_").lower(): read_var(environ, name) for name in ENDPOINT_VARS}
    # A secret from a file (a compose secret) wins over the variable: the value never sits in the environment.
    secret_file = values.pop("secret_file")
    if secret_file and read_secrets:
        values["secret"] = read_secret_file("SMSGW_SECRET_FILE", secret_file)
    values["secret_origin"] = f"SMSGW_SECRET_FILE ({secret_file})" if secret_file else "SMSGW_SECRET"
    if values["result_interval"] is None:
        values["result_interval"] = values["task_interval"]
    if values["sync_format"] == "xml":
        check_xml_keys(values["sync_keys"], "SMSGW_SYNC_KEYS")
    return EndpointConfig(
        name=DEFAULT_ENDPOINT, signing_key="", patterns=(), allow_senders=(), block_senders=(), **values
    )


def env_modem_limits(environ: Mapping[str, str]) -> ModemLimits:
    """The SIM limits every modem starts from: the SIM limit variables (``MODEM_VARS``), no caps.

    Raises:
        ConfigError: a value is malformed; the message names the variable.
    """
    return ModemLimits(**{key: read_var(environ, name) for key, name in MODEM_OPTIONS.items()})


def fleet_from_env(
    environ: Mapping[str, str], modem_environ: Mapping[str, str] | None = None, *, read_secrets: bool = True
) -> FleetConfig:
    """The env-only fleet: the endpoint ``default`` (``env_endpoint``), no routes, every modem at the SIM limit
    variables of ``modem_environ`` (default: ``environ``).

    Raises:
        ConfigError: a value is malformed; the message names the variable.
    """
    endpoint = env_endpoint(environ, read_secrets=read_secrets)
    modem_defaults = env_modem_limits(environ if modem_environ is None else modem_environ)
    return FleetConfig("environment", (endpoint,), modem_defaults=modem_defaults)


def require_sync_urls(fleet: FleetConfig, endpoints: Sequence[EndpointConfig], what: str) -> None:
    """Raise ConfigError when no endpoint serves ``what`` (a worker with nothing to do is a configuration
    error, said at start-up rather than discovered as silence)."""
    if not endpoints:
        if fleet.source == "environment":
            raise ConfigError(f"SMSGW_SYNC_URL: required by this worker ({what})")
        raise ConfigError(f"{fleet.source}: endpoints: no endpoint has {what}")


def require_env_sync_url(fleet: FleetConfig) -> None:
    """Raise ConfigError when the fleet is env-only and ``SMSGW_SYNC_URL`` is empty (a file validates its own
    endpoints)."""
    if fleet.source == "environment" and not fleet.endpoint(DEFAULT_ENDPOINT).sync_url:
        raise ConfigError("SMSGW_SYNC_URL: required by this worker")


def describe_fleet(fleet: FleetConfig) -> str:
    """A one-line summary for start-up logs and ``config check`` (never secrets)."""

    def legs(e: EndpointConfig) -> str:
        switches = (("inbound", e.inbound), ("tasks", e.tasks), ("results", e.message_results))
        return "+".join(name for name, on in switches if on) or "off"

    def kind(e: EndpointConfig) -> str:
        return "" if e.kind == "smssync" else f" [{e.kind}]"

    names = ", ".join(f"{e.name}{kind(e)} ({legs(e)})" for e in fleet.endpoints)
    return (
        f"{len(fleet.endpoints)} endpoint(s): {names}; {len(fleet.routes)} route(s); "
        f"{len(fleet.modem_limits)} modem(s) with limits"
    )
