"""``smsgw``: the operator's command (installed by ``pip install``), one entry point for what is done by hand.

* ``smsgw parked list|replay|purge``: parked messages of one work queue (``--queue``, ``--endpoint``);
* ``smsgw config check [FILE]``: validate a fleet file (``services.config``);
* ``smsgw check WORKER``: that worker's health check (``--check``: it runs here and its loops turn, settings,
  broker, topology; no such worker running is unhealthy, exit 1);
* ``smsgw modem-worker|sync-worker|task-poller|result-reporter [ARGS]`` (``sync_worker``, the package name, works
  too, here and in ``smsgw check``): run a worker, exactly as
  ``python -m <worker> [ARGS]`` does;
* ``smsgw compose-modems DEVICE[=ID]...`` and any other command a worker package provides.

This module names no worker: the workers and their commands are entry points of the installed package
(pyproject.toml: ``[project.entry-points."smsgw.workers"]`` — name -> the worker's ``__main__:main`` — and
``"smsgw.commands"`` — name -> a ``main(argv) -> int``), loaded only when their command runs.

Exit codes everywhere: 0 ok, 1 unhealthy / the broker failed, 2 a configuration or usage error.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import sys
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import EntryPoint, entry_points

from services import broker
from services.config import DEFAULT_ENDPOINT, ConfigError, FleetConfig, Settings, amqp_urls, load_fleet
from services.config import main as config_main
from services.logs import quiet_libraries
from services.topology import (
    OUTBOUND_QUEUE,
    Topology,
    events_queue_for,
    inbound_queue_for,
    parked_queue_for,
)

log = logging.getLogger(__name__)

PROG = "smsgw"
# Entry point groups the worker packages fill (pyproject.toml): workers run as ``python -m <worker>`` does (and
# have a ``--check``); commands are further operator commands.
WORKER_GROUP = "smsgw.workers"
COMMAND_GROUP = "smsgw.commands"
QUEUE_ALIASES = ("inbound", "outbound", "events")


# --- smsgw parked ------------------------------------------------------------------------------------------------


def _parked_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=f"{PROG} parked",
        description="List, replay or purge the parked messages of one work queue. The broker is SMSGW_AMQP_URL; "
        "the endpoints come from SMSGW_CONFIG (or the env-only 'default' endpoint).",
    )
    parser.add_argument("action", choices=("list", "replay", "purge"))
    parser.add_argument(
        "--queue",
        default="inbound",
        help="inbound or events (of --endpoint), outbound (the shared queue), or a full work queue name such as "
        "smsgw.outbound.modem1 [default: inbound]",
    )
    parser.add_argument(
        "--endpoint",
        default=None,
        help="the endpoint whose inbound/events queue is meant [default: 'default', or the only endpoint]",
    )
    parser.add_argument("--limit", type=int, default=None, help="replay (list: show) at most this many")
    parser.add_argument("--show-body", action="store_true", help="list: include message bodies (contain SMS text)")
    parser.add_argument("--yes", action="store_true", help="purge: confirm deleting the parked messages for good")
    return parser


@dataclass(frozen=True)
class _Target:
    """The work queue a parked command acts on, and the topology to declare around it."""

    work_queue: str
    topology: Topology


class UsageError(Exception):
    """The command line names a queue or endpoint that does not exist (exit 2)."""


def _endpoint_name(fleet: FleetConfig, requested: str | None) -> str:
    """The endpoint ``--endpoint`` names, else ``default``, else the fleet's only endpoint.

    Raises:
        UsageError: no such endpoint, or several endpoints and none named.
    """
    names = fleet.endpoint_names
    source = "the environment (no SMSGW_CONFIG)" if fleet.source == "environment" else fleet.source
    if requested is not None:
        if requested not in names:
            raise UsageError(f"unknown endpoint {requested!r} in {source}; endpoints: {', '.join(names)}")
        return requested
    if DEFAULT_ENDPOINT in names:
        return DEFAULT_ENDPOINT
    if len(names) == 1:
        return names[0]
    raise UsageError(f"{source} has several endpoints; name one with --endpoint ({', '.join(names)})")


def resolve_target(fleet: FleetConfig, queue: str, endpoint: str | None) -> _Target:
    """The work queue of ``--queue``/``--endpoint`` and the fleet's topology (``Topology.of(fleet)``).

    Raises:
        UsageError: an unknown alias, endpoint or queue name, or an endpoint without that queue.
    """
    topology = Topology.of(fleet)
    if queue in ("inbound", "events"):
        name = _endpoint_name(fleet, endpoint)
        if queue == "inbound":
            if name not in topology.inbound_endpoints:
                raise UsageError(f"endpoint {name!r} has inbound = false: it has no inbound queue")
            return _Target(inbound_queue_for(name), topology)
        return _Target(events_queue_for(name), topology)
    if endpoint is not None:
        raise UsageError("--endpoint applies to --queue inbound or events only")
    if queue == "outbound":
        return _Target(OUTBOUND_QUEUE, topology)
    if not queue.startswith("smsgw.") or queue.endswith(".parked"):
        raise UsageError(
            f"unknown queue {queue!r}: use inbound, outbound, events, or a work queue name such as "
            "smsgw.outbound.modem1 (without .parked)"
        )
    return _Target(queue, topology)


def vhost_of(amqp_url: str) -> str:
    """The RabbitMQ vhost of ``amqp_url`` (of its first broker): the URL's path, unquoted; none = ``/``."""
    urls = amqp_urls(amqp_url)
    path = urllib.parse.urlsplit(urls[0]).path if urls else ""
    return urllib.parse.unquote(path[1:]) if len(path) > 1 else "/"


def _row(message: broker.ParkedMessage, show_body: bool) -> str:
    parked_at = (
        datetime.datetime.fromtimestamp(message.parked_at_ms / 1000, datetime.UTC).isoformat()
        if message.parked_at_ms
        else None
    )
    row: dict[str, object] = {
        "message_id": message.message_id,
        "queue": message.source_queue,
        "parked_at": parked_at,
        "reason": message.reason,
    }
    if show_body:
        row["body"] = message.body.decode("utf-8", "replace")
    return json.dumps(row, ensure_ascii=False)


def _run_parked(
    args: argparse.Namespace, amqp_url: str, target: _Target, out: Callable[[str], None], note: Callable[[str], None]
) -> int:
    """Run one parked action against the broker; returns the exit code.

    Raises:
        BrokerError: the broker is unreachable, refused, or the queue does not exist.
    """
    queues = broker.ParkedQueues(amqp_url, target.work_queue, topology=target.topology)
    parked = parked_queue_for(target.work_queue)
    where = f"{parked} (vhost {vhost_of(amqp_url)})"
    if args.action == "list":
        messages = queues.list()
        shown = messages if args.limit is None else messages[: max(args.limit, 0)]
        for message in shown:
            out(_row(message, args.show_body))
        # Always a count line, also at zero: an empty answer must be told apart from a wrong queue or vhost. On
        # ``note`` (stderr), so stdout stays one JSON object per line for scripts and jq.
        note(f"{len(messages)} parked message(s) in {where}")
        return 0
    if args.action == "replay":
        out(f"replayed {queues.replay(args.limit)} message(s) from {where} into {target.work_queue}")
        return 0
    if not args.yes:
        print(f"purge deletes the parked messages of {where} for good; add --yes to confirm", file=sys.stderr)
        return 2
    out(f"purged {queues.purge()} message(s) from {where}")
    return 0


def _stderr(line: str) -> None:
    print(line, file=sys.stderr)


def parked_main(argv: list[str], *, out: Callable[[str], None] = print, note: Callable[[str], None] = _stderr) -> int:
    """``smsgw parked list|replay|purge``: list (one JSON line each on ``out``, then a count line on ``note``),
    replay or purge the parked messages of one work queue. Returns the exit code: 0 done, 1 the broker failed,
    2 a usage or configuration error (one line on stderr)."""
    args = _parked_parser().parse_args(argv)
    try:
        settings = Settings.from_env()
        fleet = load_fleet(settings, read_secrets=False)  # queue names only
        target = resolve_target(fleet, args.queue, args.endpoint)
    except (ConfigError, UsageError) as exc:
        print(f"{PROG} parked: {exc}", file=sys.stderr)
        return 2
    try:
        return _run_parked(args, settings.amqp_url, target, out, note)
    except broker.BrokerError as exc:
        if "NOT_FOUND" in str(exc):  # a full queue name that no worker ever declared (a typo, another vhost)
            print(
                f"{PROG} parked {args.action}: no queue {parked_queue_for(target.work_queue)} in vhost "
                f"{vhost_of(settings.amqp_url)}: check --queue and SMSGW_AMQP_URL",
                file=sys.stderr,
            )
        else:
            print(f"{PROG} parked {args.action} failed: {exc}", file=sys.stderr)
        return 1


# --- smsgw (dispatch) ---------------------------------------------------------------------------------------------


def command_name(name: str) -> str:
    """``name`` as the commands spell it: ``sync_worker`` (the package, ``python -m sync_worker``) is
    ``sync-worker``; both are accepted everywhere a worker is named."""
    return name.replace("_", "-")


def workers() -> dict[str, EntryPoint]:
    """The installed workers: command name (``modem-worker``) -> entry point of the worker's ``__main__.main``."""
    return {point.name: point for point in entry_points(group=WORKER_GROUP)}


def plugin_commands() -> dict[str, EntryPoint]:
    """The operator commands worker packages provide: command name -> entry point of a ``main(argv) -> int``."""
    return {point.name: point for point in entry_points(group=COMMAND_GROUP)}


def _run(point: EntryPoint, argv: list[str]) -> int:
    """Run the ``main(argv)`` of ``point`` (imported only now: a modem worker's imports are not needed for
    ``smsgw parked``); returns its exit code."""
    command: Callable[[list[str]], int] = point.load()
    return command(argv)


def _summary(point: EntryPoint) -> str:
    """The first paragraph of the docstring of the module ``point`` lives in, for ``smsgw --help``."""
    try:
        command = point.load()
    except Exception as exc:  # one broken package must not take the help of every other command with it
        return f"(cannot be loaded: {exc})"
    doc = sys.modules[command.__module__].__doc__ or ""
    return " ".join(doc.strip().split("\n\n")[0].split()).replace("``", "")


def _check_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog=f"{PROG} check",
        description="A worker's health check, as `python -m <worker> --check`: that worker runs on this machine "
        "(with the same SMSGW_HEARTBEAT_DIR) and its main loops turn, settings, fleet file, broker, topology (and what "
        "that worker needs besides). Exit 0 healthy, 1 unhealthy (also: no such worker running), 2 configuration "
        "error.",
    )
    installed = workers()
    parser.add_argument("worker", choices=tuple(installed), type=command_name)
    args = parser.parse_args(argv)
    return _run(installed[args.worker], ["--check"])


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="smssync-gateway: GSM modems as an SMSsync endpoint. Configured by SMSGW_* environment "
        "variables and the fleet file SMSGW_CONFIG (README.md).",
        epilog="Exit codes: 0 ok, 1 unhealthy or the broker failed, 2 configuration or usage error. "
        f"`{PROG} COMMAND --help` shows a command's options.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.add_parser("parked", help="list, replay or purge parked messages (--queue, --endpoint)", add_help=False)
    sub.add_parser("config", help="config check [FILE]: validate a fleet file (default: $SMSGW_CONFIG)", add_help=False)
    sub.add_parser(
        "check", help="check WORKER: a worker's health check (it runs, settings, broker, topology)", add_help=False
    )
    for name, point in {**plugin_commands(), **workers()}.items():
        sub.add_parser(name, help=_summary(point), add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    """The ``smsgw`` console script; returns the exit code."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        _parser().print_help(sys.stderr)
        return 2
    command, rest = command_name(argv[0]), argv[1:]
    installed = workers()
    if command in installed:
        return _run(installed[command], rest)
    # The operator commands log only problems, as plain lines on stderr (stdout is their answer).
    logging.basicConfig(level=logging.WARNING, format=f"{PROG}: %(levelname)s %(name)s: %(message)s")
    quiet_libraries(logging.WARNING)  # a broker problem is the command's own one line, not pika's five
    operator_commands: dict[str, Callable[[list[str]], int]] = {
        "parked": parked_main,
        "config": config_main,
        "check": _check_main,
    }
    if command in operator_commands:
        return operator_commands[command](rest)
    provided = plugin_commands()
    if command in provided:
        return _run(provided[command], rest)
    _parser().parse_args([command, *rest])  # --help, or "invalid choice" with the list of commands (exit 2)
    return 2


if __name__ == "__main__":
    sys.exit(main())
