"""One config model: per-process settings apart from the fleet, both read from one variable table.

* ``variables``: the ``SMSGW_*`` table (name, default, help, parser) and ``read_var`` (the one place a value is
  read);
* ``worker_env``: ``WorkerEnv``, which variables a worker reads, and so lists in its ``--help``;
* ``process``: ``Settings``, one worker process's settings (broker, metrics, ledger, the modem's port and id);
* ``fleet``: endpoints, routes and every SIM limit (``FleetConfig``); ``env_endpoint`` maps the env-only
  variables onto the endpoint ``default``;
* ``fleet_file``: the ``SMSGW_CONFIG`` TOML file, and ``load_fleet`` (the file, else the env-only fleet);
* ``check``: ``smsgw config check FILE`` (also ``python -m services.config check FILE``).
"""

from services.config.check import main
from services.config.fleet import (
    DEFAULT_ENDPOINT,
    FILTER_REASONS,
    EndpointConfig,
    FleetConfig,
    ModemLimits,
    Route,
    describe_fleet,
    env_endpoint,
    env_modem_limits,
    fleet_from_env,
    require_env_sync_url,
    require_sync_urls,
)
from services.config.fleet_file import ENDPOINT_KEYS, MODEM_KEYS, load_fleet, load_fleet_file, parse_fleet
from services.config.process import Settings, modem_id_from_port, with_amqp_password
from services.config.sources import ConfigError, amqp_urls, read_secret_file, redact_url
from services.config.variables import (
    AUTO_PORT,
    ENV_VARS,
    SYNC_FIELDS,
    EnvVar,
    ResultsShape,
    SyncFormat,
    SyncMethod,
    read_var,
)
from services.config.worker_env import WorkerEnv

__all__ = [
    "AUTO_PORT",
    "DEFAULT_ENDPOINT",
    "ENDPOINT_KEYS",
    "ENV_VARS",
    "FILTER_REASONS",
    "MODEM_KEYS",
    "SYNC_FIELDS",
    "ConfigError",
    "EndpointConfig",
    "EnvVar",
    "FleetConfig",
    "ModemLimits",
    "ResultsShape",
    "Route",
    "Settings",
    "SyncFormat",
    "SyncMethod",
    "WorkerEnv",
    "amqp_urls",
    "describe_fleet",
    "env_endpoint",
    "env_modem_limits",
    "fleet_from_env",
    "load_fleet",
    "load_fleet_file",
    "main",
    "modem_id_from_port",
    "parse_fleet",
    "read_secret_file",
    "read_var",
    "redact_url",
    "require_env_sync_url",
    "require_sync_urls",
    "with_amqp_password",
]
