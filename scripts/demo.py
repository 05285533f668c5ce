"""The demo: the whole gateway on this machine, a simulated modem and the reference Sync server.

    scripts/demo [--duration SECONDS] [--check] [--vhost NAME] [--server-port P] [--simulator-port P]

Starts, on the local RabbitMQ (vhost ``smsgw-demo``): the reference Sync server (http://127.0.0.1:8700/),
a modem simulator (control API http://127.0.0.1:8801), modem_worker, sync_worker, task_poller and
result_reporter, each worker serving /metrics on a free loopback port. It then texts the gateway a few SMS and
queues two outgoing SMS on the server, prints the handles an operator needs (the outbox form and curl lines, the
``smsgw parked`` command for this vhost, the metrics URLs) and then one status line whenever something changes,
including SMS that were parked. Ctrl-C (or SIGTERM) stops it: each child gets exactly one SIGTERM and drains; a
second Ctrl-C makes them exit at once. ``--check`` exits 0 only if every SMS made the whole round trip (used by
the tests).
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import pika

from scripts.stack import ROOT, Simulator, Stack, delete_vhost, ensure_vhost, free_port, http_json, wait_until
from services import broker
from services.topology import (
    OUTBOUND_QUEUE,
    Topology,
    events_queue_for,
    inbound_queue_for,
    outbound_queue_for,
    parked_queue_for,
)

DEMO_VHOST = "smsgw-demo"
SECRET = "demo secret&=1"
MODEM_ID = "demo-modem"
ENDPOINT = "default"  # env-only settings: one endpoint of this name
SAMPLE_SMS = [
    ("+255700000101", "Hello from the field clinic"),
    ("+255700000102", "Habari! Dawa zimefika salama."),
    ("+34600000103", "¿Llegó el envío? Gracias."),
    ("+8613800000104", "你好，收到了吗？"),
    ("+255700000105", "Stock report 😀 " + "long text " * 30),
]
QUEUED_SMS = [
    {"to": "+255700000201", "message": "Reminder: clinic opens at 8am"},
    {"to": "+255700000202", "message": "Kumbusho: kliniki inafunguliwa saa 2 asubuhi 🏥"},
]
#: The workers, in start order, each with its own metrics port (the workers' default ports may be taken).
WORKERS = ("modem_worker", "sync_worker", "task_poller", "result_reporter")
#: Parked queues are polled this often (seconds): one short AMQP connection each time.
PARKED_POLL_S = 5.0


def _port_in_use(port: int) -> bool:
    """True when something accepts connections on 127.0.0.1:``port``."""
    with socket.socket() as sock:
        sock.settimeout(1.0)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def _smsgw_command() -> str:
    """How to call the installed ``smsgw`` from the repository root (the venv's script; its module otherwise)."""
    script = Path(sys.executable).parent / "smsgw"
    if not script.exists():
        return f"{shlex.quote(sys.executable)} -m services.cli"
    try:
        return str(script.relative_to(Path.cwd()))
    except ValueError:
        return str(script)


@dataclass(frozen=True)
class Handles:
    """Where the operator reaches each part of the running demo."""

    server_url: str
    simulator_url: str
    amqp_url: str
    vhost: str
    metrics: dict[str, str]
    logs: Path

    def banner(self) -> str:
        """The text printed once everything runs: every URL and command line an operator needs."""
        smsgw = f"SMSGW_AMQP_URL={shlex.quote(self.amqp_url)} {_smsgw_command()}"
        metrics = "\n".join(f"      {name:<16} {url}" for name, url in self.metrics.items())
        return f"""
smssync-gateway demo is running (from {ROOT})
  reference Sync server : {self.server_url}/   (what the server received and sent; refreshes every 2 s)
  queue an outgoing SMS : {self.server_url}/outbox   (a form), or
      curl -s --data-urlencode to=+255700000301 --data-urlencode 'text=Hello from the demo' {self.server_url}/outbox
  text the gateway      : curl -s -XPOST {self.simulator_url}/sms -d '{{"from":"+255700000001","text":"Habari 😀"}}'
  modem simulator       : {self.simulator_url}/inbox, /outbox, /state (docs/simulator.md), e.g.
      curl -s -XPOST {self.simulator_url}/state -d '{{"fail_sends":1,"cms_error":21}}'  (next send refused)
  parked SMS            : {smsgw} parked list --queue inbound
      (also --queue outbound, --queue events; 'parked replay' puts them back; new ones show below)
  metrics (Prometheus)  :
{metrics}
  RabbitMQ vhost        : {self.vhost} (deleted when the demo stops)
  logs                  : {self.logs}

Ctrl-C to stop (every worker finishes what it is doing, then exits).
"""


@dataclass
class ParkedWatch:
    """Polls the parked queues of the demo's work queues and reports each newly parked message once.

    Counts come from passive queue declares (nothing is taken off a queue); reasons from ``ParkedQueues.list``,
    only when a count grew.
    """

    amqp_url: str
    work_queues: tuple[str, ...]
    topology: Topology
    counts: dict[str, int] = field(default_factory=dict)
    _seen: set[tuple[str, str | None, int | None]] = field(default_factory=set)
    _error: str = ""

    def poll(self, out: Callable[[str], None]) -> None:
        """Refresh ``counts`` and print a line per newly parked message (queue, message id, reason); a broker
        error is printed once (until the next successful poll), never raised."""
        try:
            counts = self._counts()
            for work_queue, count in counts.items():
                if count > self.counts.get(work_queue, 0):
                    for message in broker.ParkedQueues(self.amqp_url, work_queue, self.topology).list():
                        key = (work_queue, message.message_id, message.parked_at_ms)
                        if key not in self._seen:
                            self._seen.add(key)
                            out(f"PARKED in {parked_queue_for(work_queue)}: {message.message_id} — {message.reason}")
            self.counts = counts
            self._error = ""
        except broker.BrokerError as exc:
            if str(exc) != self._error:
                out(f"cannot read the parked queues: {exc}")
            self._error = str(exc)

    def _counts(self) -> dict[str, int]:
        """Parked message count per work queue (0 for a parked queue not declared yet).

        Raises:
            BrokerError: the broker is unreachable or refused.
        """
        connection = broker.connect(self.amqp_url, "smsgw-demo-parked-watch")
        try:
            counts: dict[str, int] = {}
            channel = connection.channel()
            for work_queue in self.work_queues:
                try:
                    declared = channel.queue_declare(parked_queue_for(work_queue), passive=True)
                    counts[work_queue] = int(declared.method.message_count)
                except pika.exceptions.ChannelClosedByBroker:  # 404: no worker declared it yet
                    counts[work_queue] = 0
                    channel = connection.channel()
            return counts
        except (pika.exceptions.AMQPError, OSError) as exc:
            raise broker.BrokerUnavailable(f"connection lost: {exc!r}") from None
        finally:
            broker.close_quietly(connection)


@dataclass(frozen=True)
class Progress:
    """One look at the demo: what reached the server, what the modem sent, what is parked."""

    demo_received: int
    other_received: int
    outgoing: dict[str, int]
    outgoing_total: int
    all_delivered: bool
    modem_sent: int
    sim_holds: int
    parked: int

    @classmethod
    def read(cls, state: dict[str, Any], simulator: Simulator, parked: int) -> Progress:
        """Progress from the server's ``/_state``, the simulator and the parked count.

        The server lists each SMS once (a repeated message_id only bumps its ``repeats``); the demo's own SMS are
        told apart from others (texted in by hand, or a straggler part of a multipart SMS forwarded on its own)
        by sender and text, so the count can never pass its total.
        """
        received = state.get("received", [])
        wanted = set(SAMPLE_SMS)
        demo = {(m.get("from"), m.get("message")) for m in received} & wanted
        outgoing = state.get("outgoing", [])
        statuses: dict[str, int] = {}
        for item in outgoing:
            statuses[str(item.get("status", "?"))] = statuses.get(str(item.get("status", "?")), 0) + 1
        return cls(
            demo_received=len(demo),
            other_received=sum(1 for m in received if (m.get("from"), m.get("message")) not in wanted),
            outgoing=statuses,
            outgoing_total=len(outgoing),
            all_delivered=all(item.get("status") == "delivered" for item in outgoing),
            modem_sent=len(simulator.outbox()),
            sim_holds=len(simulator.inbox()),
            parked=parked,
        )

    def line(self) -> str:
        """The status line: distinct SMS at each stage (not requests)."""
        others = f" (+{self.other_received} other)" if self.other_received else ""
        outgoing = ", ".join(f"{count} {status}" for status, count in sorted(self.outgoing.items())) or "none"
        return (
            f"server received {self.demo_received}/{len(SAMPLE_SMS)} demo SMS{others} | "
            f"outgoing: {outgoing} | modem sent {self.modem_sent} SMS | SIM holds {self.sim_holds} part(s) | "
            f"parked {self.parked}"
        )

    def round_trip_done(self) -> bool:
        """Every demo SMS reached the server and every outgoing SMS (queued + replies) was delivered."""
        expected_outgoing = len(SAMPLE_SMS) + len(QUEUED_SMS)
        return (
            self.demo_received == len(SAMPLE_SMS)
            and self.modem_sent >= expected_outgoing
            and self.outgoing_total == expected_outgoing
            and self.all_delivered
        )


class StopSignals:
    """Ctrl-C / SIGTERM handling of the demo: the first sets ``stopping`` (the demo then SIGTERMs each child
    once, and they drain); a second one sends every live child its second SIGTERM, which makes it exit at
    once. The children run in their own sessions, so the terminal's SIGINT reaches the demo alone."""

    def __init__(self) -> None:
        self.stopping = threading.Event()
        #: True after a second signal: the children were told to exit at once, without draining.
        self.hurried = False
        #: Set once the processes start; a second signal before that has no child to hurry.
        self.stack: Stack | None = None
        signal.signal(signal.SIGINT, self._on_signal)
        signal.signal(signal.SIGTERM, self._on_signal)

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        if not self.stopping.is_set():
            print(f"\n{signal.Signals(signum).name}: stopping; the workers drain (again to stop at once)", flush=True)
            self.stopping.set()
            return
        print(f"{signal.Signals(signum).name} again: the children exit at once", flush=True)
        self.hurried = True
        for process in self.stack.processes.values() if self.stack else ():
            if process.popen.poll() is None:
                os.kill(process.pid, signal.SIGTERM)


def main(argv: list[str] | None = None) -> int:
    """Run the demo; returns the exit code: 0; 1 when a process it started did not exit 0 after its SIGTERM, or
    (--check) the round trip did not complete; 2 when a port it needs is taken."""
    parser = argparse.ArgumentParser(
        prog="scripts/demo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--duration", type=float, default=0, help="stop after this many seconds (0 = Ctrl-C)")
    parser.add_argument("--check", action="store_true", help="verify the round trip, then exit 0/1")
    parser.add_argument("--vhost", default=DEMO_VHOST, help="RabbitMQ vhost to use (created, removed at exit)")
    parser.add_argument("--server-port", type=int, default=8700)
    parser.add_argument("--simulator-port", type=int, default=8801)
    args = parser.parse_args(argv)
    if args.check:
        args.server_port, args.simulator_port = free_port(), free_port()
    for what, port, option in (
        ("reference server", args.server_port, "--server-port"),
        ("simulator", args.simulator_port, "--simulator-port"),
    ):
        # Without this, the demo would talk to whatever answers there (a demo still running, or left over from
        # one that was killed) and report that server's SMS as its own.
        if _port_in_use(port):
            print(
                f"scripts/demo: port {port} for the {what} is in use (another demo still running?); "
                f"stop it or choose another port with {option}",
                file=sys.stderr,
            )
            return 2

    # Installed first: a Ctrl-C while RabbitMQ is slow to create the vhost must stop the demo too.
    signals = StopSignals()
    workdir = ROOT / "var" / f"demo-{args.vhost}"  # var/ is git-ignored
    shutil.rmtree(workdir, ignore_errors=True)
    amqp_url = ensure_vhost(args.vhost)
    if signals.stopping.is_set():
        delete_vhost(args.vhost)
        return 0
    server_url = f"http://127.0.0.1:{args.server_port}"
    stack = Stack(
        workdir,
        amqp_url,
        f"{server_url}/smssync",
        SECRET,
        env={
            "SMSGW_DEVICE_ID": "demo-gateway",
            "SMSGW_TASK_INTERVAL": "3",
            "SMSGW_RESULT_INTERVAL": "3",
            "SMSGW_MESSAGE_RESULTS": "true",
            "SMSGW_AUTO_RESPONSE": "",
        },
        own_session=True,
    )
    signals.stack = stack
    metrics_ports = {worker: free_port() for worker in WORKERS}
    try:
        stack.start(
            "reference_server",
            "reference_server",
            "--port",
            str(args.server_port),
            "--reply",
            env={"SMSSYNC_REFERENCE_SECRET": SECRET},
        )
        wait_until(lambda: http_json(f"{server_url}/_state"), 20, "reference server")
        simulator = stack.start_simulator("simulator", "+255754000001", args.simulator_port)
        for worker in WORKERS:
            env = {"SMSGW_METRICS_PORT": str(metrics_ports[worker])}
            if worker == "modem_worker":
                stack.start_modem_worker(worker, simulator, MODEM_ID, env=env)
            else:
                stack.start(worker, worker, env=env)
        handles = Handles(
            server_url,
            simulator.control_url,
            amqp_url,
            args.vhost,
            {worker: f"http://127.0.0.1:{port}/metrics" for worker, port in metrics_ports.items()},
            workdir / "logs",
        )
        print(handles.banner(), flush=True)
        for sender, text in SAMPLE_SMS:
            simulator.inject(sender, text)
        http_json(f"{server_url}/_outgoing", {"messages": QUEUED_SMS})
        ok = _watch(stack, args, signals.stopping, simulator, amqp_url, server_url)
    finally:
        stack.stop_all()
        delete_vhost(args.vhost)
    codes = {name: process.popen.returncode for name, process in stack.processes.items()}
    print("demo stopped; exit codes: " + ", ".join(f"{name} {code}" for name, code in codes.items()), flush=True)
    if any(code != 0 for code in codes.values()):
        why = "stopped at once by the second signal" if signals.hurried else "did not exit cleanly"
        print(f"scripts/demo: a process {why}; see the logs in {workdir / 'logs'}", flush=True)
        return 1
    return 0 if ok or not args.check else 1


def _watch(
    stack: Stack,
    args: argparse.Namespace,
    stopping: threading.Event,
    simulator: Simulator,
    amqp_url: str,
    server_url: str,
) -> bool:
    """Print a status line whenever it changes and each newly parked SMS; with --check, return whether the full
    round trip happened within the deadline."""
    deadline = time.monotonic() + (args.duration or (120 if args.check else float("inf")))
    topology = Topology().with_modems([MODEM_ID])
    watch = ParkedWatch(
        amqp_url,
        (inbound_queue_for(ENDPOINT), OUTBOUND_QUEUE, outbound_queue_for(MODEM_ID), events_queue_for(ENDPOINT)),
        topology,
    )
    next_parked_poll = time.monotonic()
    last = ""
    while not stopping.is_set() and time.monotonic() < deadline:
        if time.monotonic() >= next_parked_poll:
            watch.poll(lambda text: print(text, flush=True))
            next_parked_poll = time.monotonic() + PARKED_POLL_S
        try:
            progress = Progress.read(http_json(f"{server_url}/_state"), simulator, sum(watch.counts.values()))
        except OSError as exc:  # the server or the simulator died: say so, keep watching (Ctrl-C stops)
            line = f"cannot read the demo's state ({exc}); see the logs in {stack.workdir / 'logs'}"
        else:
            line = progress.line()
            if args.check and progress.round_trip_done():
                print(line, flush=True)
                print("demo check: every SMS made the round trip", flush=True)
                return True
        if line != last:
            print(line, flush=True)
            last = line
        stopping.wait(1.0)
    if args.check:
        print("demo check FAILED; see the logs in", stack.workdir / "logs", flush=True)
    return False


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    sys.exit(main())
