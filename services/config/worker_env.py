"""Which ``SMSGW_*`` variables one worker reads (``WorkerEnv``), and its ``--help`` made from the same list."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from services.config.variables import ENDPOINT_VARS, ENV_VARS, MODEM_VARS, PROCESS_VARS

# Every worker reads these (broker, fleet file, metrics, logging, liveness).
COMMON_VARS = (
    "SMSGW_AMQP_URL",
    "SMSGW_AMQP_PASSWORD_FILE",
    "SMSGW_CONFIG",
    "SMSGW_METRICS_PORT",
    "SMSGW_METRICS_ADDR",
    "SMSGW_LOG_LEVEL",
    "SMSGW_LIVENESS_TIMEOUT",
    "SMSGW_HEARTBEAT_DIR",
)


# A variable a worker reads brings its file twin along (a secret from a file: a compose secret).
FILE_TWINS = {"SMSGW_LEDGER_URL": "SMSGW_LEDGER_URL_FILE"}


@dataclass(frozen=True)
class WorkerEnv:
    """The variables one worker reads: ``COMMON_VARS``, its own ``process`` variables, the endpoint variables
    when it loads the fleet's endpoints (``endpoints``) and the SIM limit defaults when it applies them
    (``modems``). Its loaders read exactly ``names`` and its ``--help`` lists exactly ``names``."""

    process: tuple[str, ...] = ()
    endpoints: bool = False
    modems: bool = False

    def __post_init__(self) -> None:
        unknown = [name for name in self.process if name not in PROCESS_VARS]
        if unknown:
            raise ValueError(f"not process variables: {unknown}")

    @property
    def process_names(self) -> tuple[str, ...]:
        """The process variables read: the common ones, then the worker's own (each followed by its file twin,
        ``FILE_TWINS``)."""
        own = (twin for name in self.process for twin in (name, FILE_TWINS.get(name)) if twin is not None)
        return tuple(dict.fromkeys((*COMMON_VARS, *own)))

    @property
    def names(self) -> tuple[str, ...]:
        """Every variable read, in ``--help`` order."""
        endpoint = tuple(ENDPOINT_VARS) if self.endpoints else ()
        modem = tuple(MODEM_VARS) if self.modems else ()
        return (*self.process_names, *endpoint, *modem)

    def describe(self) -> str:
        """The ``--help`` epilog: every variable read, grouped by kind."""
        sections = [describe(self.process_names)]
        if self.endpoints:
            title = "endpoint variables (without SMSGW_CONFIG: the one endpoint 'default'; with it: ignored)"
            sections.append(describe(tuple(ENDPOINT_VARS), title))
        if self.modems:
            sections.append(describe(tuple(MODEM_VARS), "SIM limits (defaults of every [modems.<id>] table)"))
        return "\n\n".join(sections)


def describe(names: Sequence[str], title: str = "environment variables") -> str:
    """Format the help text of the given variables, for a worker's ``--help`` epilog."""
    lines = [f"{title}:"]
    for name in names:
        var = ENV_VARS[name]
        default = "(required)" if var.default is None else f"[default: {var.default!r}]"
        lines.append(f"  {name:<24} {var.help} {default}")
    return "\n".join(lines)
