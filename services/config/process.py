"""Per-process settings: what one worker process needs besides the fleet (broker, metrics, logging, liveness,
ledger, and for a modem worker its modem's port, identity and supervision), validated at start-up.

The fleet (endpoints, routes, SIM limits) is ``services.config.fleet``. A worker reads only the process
variables it declares (``WorkerEnv.process_names``); the others keep their defaults.
"""

from __future__ import annotations

import os
import re
import urllib.parse
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from services.config.sources import ConfigError, amqp_urls, read_secret_file, redact_url
from services.config.variables import AUTO_PORT, PROCESS_VARS, default_of, read_var


@dataclass(frozen=True)
class Settings:
    """One worker process's settings, validated. Build with ``Settings.from_env()``."""

    amqp_url: str
    config: str
    metrics_port: int | None  # None: the worker's default port
    metrics_addr: str
    log_level: str
    liveness_timeout: float
    heartbeat_dir: str
    prefetch: int
    state_dir: str
    ledger_url: str
    ledger_retention_days: float
    probe_interval: float
    modem_failover: float
    modem_port: str
    modem_id: str
    modem_baudrate: int
    modem_imei: str
    modem_port_glob: tuple[str, ...]
    modem_watchdog: float
    modem_reset_command: str
    sim_pin: str = field(repr=False)  # a secret: never in a repr or a log line
    sim_pin_file: str
    send_interval: float
    outbound_max_age: float
    balance_ussd: str
    balance_interval: float

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, names: Collection[str] | None = None) -> Settings:
        """Read and validate the process variables in ``names`` (default: all of them); the others keep their
        defaults.

        Raises:
            ConfigError: a value is malformed; the message names the variable.
        """
        env = os.environ if environ is None else environ
        wanted = PROCESS_VARS if names is None else names
        values = {
            name.removeprefix("SMSGW_").lower(): read_var(env, name) if name in wanted else default_of(name)
            for name in PROCESS_VARS
        }
        # A password from a file (a compose secret) wins over the URL's: the value never sits in the environment.
        password_file = values.pop("amqp_password_file")
        if password_file:
            password = read_secret_file("SMSGW_AMQP_PASSWORD_FILE", password_file)
            values["amqp_url"] = with_amqp_password(values["amqp_url"], password)
        # The ledger URL from a file (a compose secret) wins too: it holds the database password.
        ledger_url_file = values.pop("ledger_url_file")
        if ledger_url_file:
            url = read_secret_file("SMSGW_LEDGER_URL_FILE", ledger_url_file).strip()
            values["ledger_url"] = PROCESS_VARS["SMSGW_LEDGER_URL"].parse("SMSGW_LEDGER_URL_FILE", url)
        values["modem_id"] = _modem_id(values)
        names_of_fields = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in names_of_fields})

    def require_modem_port(self) -> None:
        """Raises ConfigError when SMSGW_MODEM_PORT is empty."""
        if not self.modem_port:
            raise ConfigError("SMSGW_MODEM_PORT: required by this worker")
        if self.modem_port == AUTO_PORT and not self.modem_imei:
            raise ConfigError("SMSGW_MODEM_PORT=auto: set SMSGW_MODEM_IMEI to the IMEI of the modem to find")


def _modem_id(values: Mapping[str, Any]) -> str:
    """SMSGW_MODEM_ID, else derived from the IMEI (port auto) or the port."""
    modem_id: str = values["modem_id"]
    if not modem_id and values["modem_port"] == AUTO_PORT and values["modem_imei"]:
        return f"imei-{values['modem_imei']}"  # the port may change; the IMEI does not
    if not modem_id and values["modem_port"]:
        return modem_id_from_port(values["modem_port"])
    return modem_id


def with_amqp_password(raw: str, password: str) -> str:
    """``raw`` (``SMSGW_AMQP_URL``: one URL or a comma list of one cluster's nodes) with ``password``, URL-quoted,
    as the password of every URL (replacing one already there), so any character may be used in it.

    Raises:
        ConfigError: a URL names no user to go with the password.
    """
    quoted = urllib.parse.quote(password, safe="")
    urls = []
    for url in amqp_urls(raw):
        parts = urllib.parse.urlsplit(url)
        userinfo, _, hostport = parts.netloc.rpartition("@")
        user = userinfo.partition(":")[0]
        if not user:
            raise ConfigError(
                "SMSGW_AMQP_PASSWORD_FILE: SMSGW_AMQP_URL names no user for the password "
                f"(expected amqp://USER@host:port/vhost, got {redact_url(url)!r})"
            )
        urls.append(urllib.parse.urlunsplit(parts._replace(netloc=f"{user}:{quoted}@{hostport}")))
    return ",".join(urls)


def modem_id_from_port(port: str) -> str:
    """Derive a label-safe modem id from a serial device path (``/dev/ttyUSB0`` -> ``ttyUSB0``) or a network
    modem URL (``socket://pi-1.lan:3333`` -> ``pi-1.lan-3333``)."""
    tail = port.rstrip("/").rsplit("/", 1)[-1]
    if "://" in port:
        parts = urllib.parse.urlsplit(port)
        tail = f"{parts.hostname or ''}-{parts.netloc.rpartition(':')[2]}"
    cleaned = re.sub(r"[^A-Za-z0-9_.-]", "_", tail)[:64]
    return cleaned or "modem"
