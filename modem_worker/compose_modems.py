"""``smsgw compose-modems DEVICE[=ID]...``: write the compose.override.yaml that runs one modem worker per device.

Each service (``modem_worker_1``, ``modem_worker_2``, ... in argument order) extends the tracked template
``deploy/compose/modem.yaml`` and adds only its ``SMSGW_MODEM_ID`` and its ``SMSGW_MODEM_PORT``: the host device as
the container sees it, under ``/dev/host`` (the template bind-mounts the host's ``/dev`` there instead of a
``devices:`` entry, so an unplugged modem does not stop ``docker compose up``). The template also mounts the fleet
file, so adding a modem never edits a tracked file. The file goes to stdout::

    docker run --rm smssync-gateway:local smsgw compose-modems \\
        /dev/serial/by-id/usb-Quectel_EC25_0123456-if02-port0=modem1 \\
        /dev/serial/by-id/usb-Quectel_EC25_0123457-if02-port0=modem2 > compose.override.yaml

Exit codes: 0 written, 2 a usage error (one line on stderr, nothing on stdout).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from services.config import ENV_VARS, ConfigError

PROG = "smsgw compose-modems"
TEMPLATE = "deploy/compose/modem.yaml"
TEMPLATE_SERVICE = "modem-worker"
HOST_DEV = "/dev/"
# Where the template mounts the host's /dev in the container.
CONTAINER_DEV = "/dev/host/"
# /dev/ttyUSB0, /dev/ttyACM1: numbered in plug order, so a reboot may swap two modems (and their SIMs' queues).
_UNSTABLE_DEVICE = re.compile(r"^/dev/tty(USB|ACM)\d+$")


class UsageError(Exception):
    """A device or modem id that cannot go into the override (exit 2)."""


@dataclass(frozen=True)
class Modem:
    """One modem worker to write: its host device, its modem id and its position (from 1)."""

    device: str
    modem_id: str
    number: int

    @property
    def service(self) -> str:
        """The compose service name, ``modem_worker_<number>`` as in the docs. (Older overrides named it
        ``modem_worker_<id>``; any service name works, only SMSGW_MODEM_ID names the queue, rows and metrics.)"""
        return f"modem_worker_{self.number}"

    @property
    def container_port(self) -> str:
        """The device as the worker sees it: the host's ``/dev/X`` is ``/dev/host/X`` in the container."""
        return CONTAINER_DEV + self.device.removeprefix(HOST_DEV)


def parse_modems(arguments: Sequence[str], prefix: str = "modem") -> list[Modem]:
    """``DEVICE`` or ``DEVICE=ID`` arguments as modems; a device without an id gets ``<prefix><n>`` (n = its
    position, from 1).

    Raises:
        UsageError: a device that is not under ``/dev/`` or holds ``:`` or white space, an invalid id, or a
            device or id given twice.
    """
    modems: list[Modem] = []
    for position, argument in enumerate(arguments, start=1):
        device, separator, modem_id = argument.partition("=")
        if not separator:
            modem_id = f"{prefix}{position}"
        if not device.startswith(HOST_DEV) or ":" in device or any(ch.isspace() for ch in device):
            raise UsageError(
                f"{argument!r}: expected the host device as an absolute path under /dev/ without ':' or spaces, "
                "e.g. /dev/serial/by-id/usb-...-if02-port0 (a udev symlink of your own works too)"
            )
        try:
            ENV_VARS["SMSGW_MODEM_ID"].parse("SMSGW_MODEM_ID", modem_id)
        except ConfigError as exc:
            raise UsageError(f"{argument!r}: {exc}") from None
        if not modem_id:
            raise UsageError(f"{argument!r}: empty modem id after '='")
        for earlier in modems:
            if earlier.device == device:
                raise UsageError(f"{device}: given twice (one worker per modem)")
            if earlier.modem_id == modem_id:
                raise UsageError(f"modem id {modem_id!r} given twice: each modem needs its own")
        modems.append(Modem(device, modem_id, position))
    if not modems:
        raise UsageError("name at least one device")
    return modems


def render(modems: Sequence[Modem]) -> str:
    """The compose.override.yaml text for ``modems`` (YAML; strings quoted as JSON, which YAML reads as is)."""
    lines = [
        f"# Written by `{PROG}` ({len(modems)} modem(s)). Untracked (.gitignore): edit it freely, or write it again.",
        "# Each modem worker extends the tracked template and adds its modem id and device (the host's /dev is",
        "# /dev/host in the container; the template also mounts config/, the fleet file). Guide:",
        '# docs/operations.md, "2. Modems"; `docker compose config` shows the merged result.',
        "",
        "x-modem: &modem",
        "  extends:",
        f"    file: {TEMPLATE}",
        f"    service: {TEMPLATE_SERVICE}",
        "  depends_on:          # never inherited through extends",
        "    rabbitmq:",
        "      condition: service_healthy",
        "",
        "services:",
    ]
    for modem in modems:
        lines += [
            f"  {modem.service}:",
            "    <<: *modem",
            "    environment:",
            f"      SMSGW_MODEM_ID: {json.dumps(modem.modem_id)}",
            f"      SMSGW_MODEM_PORT: {json.dumps(modem.container_port)}",
        ]
    return "\n".join(lines) + "\n"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Print a compose.override.yaml that runs one modem worker per DEVICE (each extending "
        f"{TEMPLATE}). Redirect it: `... > compose.override.yaml`.",
        epilog="Prefer stable device names (ls -l /dev/serial/by-id/) over /dev/ttyUSBn, which change with plug "
        "order. The id names the modem's queue (smsgw.outbound.<id>), ledger rows and metrics: keep it.",
    )
    parser.add_argument(
        "devices",
        nargs="+",
        metavar="DEVICE[=ID]",
        help="host device of a modem's AT port, optionally with its modem id [default id: modem1, modem2, ...]",
    )
    parser.add_argument("--id-prefix", default="modem", help="prefix of the default ids [default: modem]")
    return parser


def main(argv: list[str], *, out: Callable[[str], None] = print) -> int:
    """``smsgw compose-modems``: print the override for the devices of ``argv``; returns the exit code (0 written,
    2 a usage error, one line on stderr)."""
    args = _parser().parse_args(argv)
    try:
        modems = parse_modems(args.devices, args.id_prefix)
    except UsageError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 2
    for modem in modems:
        if _UNSTABLE_DEVICE.match(modem.device):
            print(
                f"{PROG}: warning: {modem.device} may name another modem after a reboot; prefer its "
                "/dev/serial/by-id/ name",
                file=sys.stderr,
            )
    out(render(modems).rstrip("\n"))
    return 0
