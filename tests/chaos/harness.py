"""The chaos harness: a whole gateway (scripts/stack.py) with faults played into it while SMS flow both ways.

Two endpoints (reference servers behind flaky fronts, tests/chaos/flaky.py), two modems (simulators), a sync
worker, a result reporter, one or two task pollers; every worker reaches RabbitMQ and the PostgreSQL ledger
through a TCP proxy of the run's own (tests/chaos/proxy.py), so an outage is a cut proxy, never a stopped
service. Each fault is played at a seeded random point of the traffic: when a seeded fraction of the batch sent
just before it has made it through. After the last fault the run waits (bounded, by polling) until everything
arrived, then counts (tests/chaos/counts.py).
"""

from __future__ import annotations

import json
import random
import subprocess
import time
import urllib.parse
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from reference_server.server import ReferenceServer
from scripts.stack import Simulator, Stack, http_json, wait_until
from tests.chaos.counts import Tally, count_inbound, count_outbound, render
from tests.chaos.flaky import FlakyFront
from tests.chaos.proxy import TcpProxy

WORKER_KINDS = ("modem_worker", "sync_worker", "task_poller", "result_reporter")
ENDPOINTS = {"clinic": "clinic-chaos-secret", "helpline": "help&line chaos"}
HTTP_TIMEOUT_S = 3


@dataclass
class Plan:
    """One run: how much traffic, which faults in which order, how long each outage lasts."""

    seed: int
    inbound: int
    outbound: int
    faults: list[str]
    hosts: int = 1
    broker_outage_s: float = 5.0
    ledger_outage_s: float = 8.0
    long_ledger_outage_s: float = 65.0  # the "ledger-long" fault (long form: a database restart or failover)
    unplug_s: float = 5.0
    sticky_s: float = 10.0
    settle_s: float = 150.0
    point_wait_s: float = 60.0  # at most this long for a fault's traffic point (a stalled system gets it anyway)
    flaky: tuple[float, float, float] = (0.08, 0.02, 0.05)  # 500s, time-outs, replies lost after the fact


@dataclass
class Result:
    """What a run found: the tallies by direction and the printed table."""

    plan: Plan
    tallies: dict[str, Tally]
    settled: bool
    played: list[str] = field(default_factory=list)
    exits: list[str] = field(default_factory=list)  # workers that exited on their own (restarted, as compose would)

    @property
    def bad(self) -> int:
        return sum(t.bad for t in self.tallies.values())

    def table(self) -> str:
        head = render(self.tallies, self.plan.seed, self.played)
        if self.exits:
            head += "\n  workers that exited on their own (restarted): " + "; ".join(self.exits)
        return head if self.settled else head + "\n  (did not settle within the bound: counted as it stood)"


def _via(url: str, proxy: TcpProxy) -> str:
    """``url`` with its host and port replaced by the proxy's."""
    parts = urllib.parse.urlsplit(url)
    netloc = parts.netloc.rsplit("@", 1)
    where = f"127.0.0.1:{proxy.port}"
    return urllib.parse.urlunsplit(parts._replace(netloc=f"{netloc[0]}@{where}" if len(netloc) == 2 else where))


def _target(url: str, default_port: int) -> tuple[str, int]:
    parts = urllib.parse.urlsplit(url)
    return parts.hostname or "127.0.0.1", parts.port or default_port


class ChaosRun:
    """One gateway under chaos. Use :func:`chaos_run` (it builds and tears everything down)."""

    def __init__(self, plan: Plan, workdir: Path, amqp_url: str, ledger_url: str, vhost: str) -> None:
        self.plan = plan
        self.rng = random.Random(plan.seed)
        self.vhost = vhost
        self.amqp_proxy = TcpProxy().start(0, _target(amqp_url, 5672))
        self.pg_proxy = TcpProxy().start(0, _target(ledger_url, 5432))
        self.stack = Stack(workdir, _via(amqp_url, self.amqp_proxy))
        self.stack.env["SMSGW_LEDGER_URL"] = _via(ledger_url, self.pg_proxy)
        self.stack.env["SMSGW_MODEM_FAILOVER"] = "5"
        self.servers = {name: ReferenceServer(secret).start() for name, secret in ENDPOINTS.items()}
        self.fronts = {
            name: FlakyFront(server.base_url, random.Random(plan.seed * 31 + i), hold_s=HTTP_TIMEOUT_S + 1).start()
            for i, (name, server) in enumerate(self.servers.items())
        }
        self.sims: dict[str, Simulator] = {}
        self.inbound: dict[str, str] = {}  # sender -> text
        self.outbound: dict[str, str] = {}  # recipient -> text
        self.played: list[str] = []
        self.exits: list[str] = []

    # --- building -------------------------------------------------------------------------------------------

    def fleet_toml(self) -> str:
        clinic, helpline = self.fronts["clinic"], self.fronts["helpline"]
        return f"""
[[endpoints]]
name = "clinic"
sync_url = {json.dumps(clinic.base_url + "/smssync")}
secret = {json.dumps(ENDPOINTS["clinic"])}
task_interval = 1
message_results = true
http_timeout = {HTTP_TIMEOUT_S}

[[endpoints]]
name = "helpline"
sync_url = {json.dumps(helpline.base_url + "/smssync")}
secret = {json.dumps(ENDPOINTS["helpline"])}
tasks = false
http_timeout = {HTTP_TIMEOUT_S}

[modems.modem-a]
[modems.modem-b]
"""

    def host_env(self, host: int) -> dict[str, str]:
        """A "host": a state directory of its own; only the PostgreSQL ledger (and the broker) are shared."""
        return {"SMSGW_STATE_DIR": str(self.stack.workdir / f"state-host{host}")}

    def start(self) -> None:
        """Start simulators and workers; the servers are flaky from the start."""
        self.stack.write_config(self.fleet_toml())
        for front in self.fronts.values():
            front.flaky(*self.plan.flaky)
        for n, letter in enumerate("ab", 1):
            self.sims[letter] = self.stack.start_simulator(f"simulator_{letter}", f"+25575400000{n}")
            self.sims[letter].set_state(send_delay_s=0.05)
            host = 1 if letter == "a" or self.plan.hosts == 1 else 2
            self.stack.start_modem_worker(
                f"modem_worker_{letter}", self.sims[letter], f"modem-{letter}", self.host_env(host)
            )
        self.stack.start("sync_worker", "sync_worker", env=self.host_env(1))
        self.stack.start("result_reporter", "result_reporter", env=self.host_env(1))
        for host in range(1, self.plan.hosts + 1):
            self.stack.start(f"task_poller_{host}", "task_poller", env=self.host_env(host))

    def stop(self) -> None:
        """Stop every process this run started (by PID), the fronts, servers and proxies."""
        try:
            self.stack.stop_all()
        finally:
            for front in self.fronts.values():
                front.stop()
            for server in self.servers.values():
                server.stop()
            self.amqp_proxy.stop()
            self.pg_proxy.stop()

    # --- traffic --------------------------------------------------------------------------------------------

    def send_batch(self, inbound: range, outbound: range) -> None:
        """Inject inbound SMS #``inbound`` (alternating modems) and queue outbound SMS #``outbound`` at clinic."""
        for i in inbound:
            sender, text = (
                f"+2557{self.plan.seed % 100:02d}{i:06d}",
                f"chaos in #{i}" + (" Grüße €" if i % 5 == 0 else ""),
            )
            self.inbound[sender] = text
            self.sims["ab"[i % 2]].inject(sender, text)
        for i in outbound:
            to = f"+2556{self.plan.seed % 100:02d}{i:06d}"
            text = f"chaos out #{i}" + (" ✓ sawa" if i % 7 == 0 else "")
            self.outbound[to] = text
            self.servers["clinic"].queue_outgoing(to, text)

    def progress(self) -> int:
        """Inbound pairs received plus outbound SMS sent so far."""
        received = sum(len(s.received()) for s in self.servers.values())
        return received + sum(len(sim.outbox()) for sim in self.sims.values())

    # --- faults ---------------------------------------------------------------------------------------------

    def begin_fault(self, fault: str) -> tuple[float, Callable[[], None]]:
        """Start ``fault``; returns (seconds it lasts, what ends it)."""
        kind, _, what = fault.partition(":")
        if kind == "kill":
            names = sorted(n for n, p in self.stack.processes.items() if p.argv[2] == what)
            name = self.rng.choice(names)
            self.stack.kill(name)
            self.played.append(f"SIGKILL {name}")
            return self.rng.uniform(0.0, 1.0), lambda: self._restart(name)
        if kind == "broker":
            self.amqp_proxy.cut()
            self.played.append(f"RabbitMQ outage {self.plan.broker_outage_s:.0f}s")
            return self.plan.broker_outage_s, self.amqp_proxy.restore
        if kind in ("ledger", "ledger-long"):
            lasts = self.plan.long_ledger_outage_s if kind == "ledger-long" else self.plan.ledger_outage_s
            self.pg_proxy.cut()
            self.played.append(f"PostgreSQL outage {lasts:.0f}s")
            return lasts, self.pg_proxy.restore
        if kind == "unplug":
            sim = self.sims[self.rng.choice("ab")]
            http_json(f"{sim.control_url}/unplug", {})
            self.played.append(f"unplug {sim.own_number} {self.plan.unplug_s:.0f}s")
            return self.plan.unplug_s, lambda: http_json(f"{sim.control_url}/replug", {})
        if kind == "sticky":
            name = self.rng.choice(sorted(self.fronts))
            self.fronts[name].stick(self.plan.sticky_s)
            self.played.append(f"{name} answers 503 for {self.plan.sticky_s:.0f}s")
            return self.plan.sticky_s, lambda: None
        raise ValueError(f"unknown fault {fault!r}")

    def _restart(self, name: str) -> None:
        self.stack.restart(name)

    def supervise(self) -> bool:
        """Restart every worker that exited on its own, as compose's restart policy does, and note it (a worker
        must wait an outage out, not exit: the run reports each exit). Returns True (a polling helper)."""
        for name, process in list(self.stack.processes.items()):
            code = process.popen.poll()
            if code is not None and process.argv[2] in WORKER_KINDS:
                self.exits.append(f"{name} ({time.strftime('%H:%M:%S')}, exit {code})")
                self.stack.restart(name)
        return True

    # --- the run --------------------------------------------------------------------------------------------

    def play(self, log: Callable[[str], None]) -> None:
        """Send the traffic in batches with one fault after each batch but the last."""
        faults = self.plan.faults
        batches = len(faults) + 1
        cuts_in = [round(self.plan.inbound * k / batches) for k in range(batches + 1)]
        cuts_out = [round(self.plan.outbound * k / batches) for k in range(batches + 1)]
        self.send_batch(range(cuts_in[0], cuts_in[1]), range(cuts_out[0], cuts_out[1]))
        for k, fault in enumerate(faults, 1):
            # A point of the traffic, not of time: when this share of batch k-1 made it through (all earlier
            # batches counted as done, so a system running ahead plays the fault at once).
            done_before = 2 * cuts_in[k - 1] + cuts_out[k - 1]
            size = 2 * (cuts_in[k] - cuts_in[k - 1]) + cuts_out[k] - cuts_out[k - 1]
            point = done_before + int(size * self.rng.uniform(0.1, 0.9))
            try:
                wait_until(
                    lambda point=point: self.supervise() and self.progress() >= point,
                    self.plan.point_wait_s,
                    "traffic",
                    0.1,
                )
            except TimeoutError:
                log(f"  (traffic stalled before {fault}; playing it anyway)")
            lasts, end = self.begin_fault(fault)
            log(f"  {time.strftime('%H:%M:%S')} {self.played[-1]}")
            ends_at = time.monotonic() + lasts
            # The next batch arrives while the fault lasts.
            self.send_batch(range(cuts_in[k], cuts_in[k + 1]), range(cuts_out[k], cuts_out[k + 1]))
            time.sleep(max(0.0, ends_at - time.monotonic()))  # the fault's own length, not a synchronisation
            end()
            self.supervise()

    def count(self, parked: dict[str, int] | None = None) -> dict[str, Tally]:
        """The tallies as things stand; ``parked`` None: ask the broker (slow: rabbitmqctl)."""
        parked = parked_counts(self.vhost) if parked is None else parked
        received = {name: server.received() for name, server in self.servers.items()}
        outbox = [dict(item, modem=f"modem-{letter}") for letter, sim in self.sims.items() for item in sim.outbox()]
        # A modem worker killed or a modem unplugged mid-send leaves at most one send of its modem "unknown".
        interrupting = sum(1 for f in self.played if f.startswith(("SIGKILL modem_worker", "unplug")))
        return {
            "inbound": count_inbound(self.inbound, received, parked["inbound"]),
            "outbound": count_outbound(
                self.outbound,
                self.servers["clinic"].outgoing(),
                outbox,
                parked["outbound"],
                unknown_explained=interrupting,
            ),
        }

    def settle(self) -> bool:
        """Wait (bounded by the plan, by polling) until nothing is missing, then for three more task polls so a
        late second send would be seen. Returns whether it settled."""

        def done() -> bool:
            self.supervise()
            tallies = self.count(parked={"inbound": 0, "outbound": 0})
            missing = sum((t.counts["lost"] or 0) + (t.counts["unreported"] or 0) for t in tallies.values())
            return missing == 0 and all(not sim.inbox() for sim in self.sims.values())

        try:
            wait_until(done, self.plan.settle_s, "the gateway to settle", 0.5)
        except TimeoutError:
            return False
        polls = self.servers["clinic"].state()["counters"]["task_send_polls"]
        try:
            wait_until(
                lambda: self.servers["clinic"].state()["counters"]["task_send_polls"] >= polls + 3, 30, "more polls"
            )
        except TimeoutError:
            return False
        return True


def parked_counts(vhost: str) -> dict[str, int]:
    """Messages in the parked queues of ``vhost`` (asked of the real broker, not through the proxy)."""
    done = subprocess.run(
        ["rabbitmqctl", "list_queues", "-q", "-p", vhost, "name", "messages", "--formatter", "json"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    counts = {"inbound": 0, "outbound": 0}
    for queue in json.loads(done.stdout or "[]"):
        name, messages = str(queue["name"]), int(queue["messages"])
        if name.endswith(".parked"):
            counts["inbound" if name.startswith("smsgw.inbound") else "outbound"] += messages
    return counts


@contextmanager
def chaos_run(plan: Plan, workdir: Path, amqp_url: str, ledger_url: str, vhost: str) -> Iterator[ChaosRun]:
    """Build a :class:`ChaosRun`, start it, and stop everything it started afterwards."""
    run = ChaosRun(plan, workdir, amqp_url, ledger_url, vhost)
    try:
        run.start()
        yield run
    finally:
        run.stop()


def run_plan(
    plan: Plan, workdir: Path, amqp_url: str, ledger_url: str, vhost: str, log: Callable[[str], None]
) -> Result:
    """Play ``plan`` against a fresh gateway and count; the seed is logged first so any run can be repeated."""
    log(f"chaos seed {plan.seed}: {plan.inbound} inbound, {plan.outbound} outbound, {len(plan.faults)} faults")
    with chaos_run(plan, workdir, amqp_url, ledger_url, vhost) as run:
        run.play(log)
        settled = run.settle()
        result = Result(plan, run.count(), settled, list(run.played), list(run.exits))
    log(result.table())
    return result
