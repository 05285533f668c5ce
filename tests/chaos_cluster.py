"""The gateway on a 3-node RabbitMQ cluster losing a node while SMS flow (by hand; it takes minutes):

    python -m tests.chaos_cluster [--outage-s 30] [--after-s 60] [--drain-s 900] [--keep]

A cluster (``scripts/rabbit_cluster.py``) and the whole gateway (``scripts/stack.py``: two simulators with their
modem workers, sync worker, task poller, result reporter, the reference server) with ``SMSGW_AMQP_URL`` listing
the three nodes. SMS flow in (simulator inject) and out (reference server queue → ``?task=send``) throughout:

(a) the node leading most of the gateway's queues is SIGKILLed, stays down ``--outage-s``, and is restarted;
(b) the node holding most of the workers' connections is SIGKILLed for good.

Then the traffic stops and the run waits (up to ``--drain-s``) until every SMS arrived and every result was
reported, and prints: lost / received under two ids / sent twice / parked / unreported (no sent result, no
delivery report), the longest wait per phase, the connections per node before each kill and at the end, and what
the workers' logs said (warnings, errors, handler crashes, nacks, parks). Exit 0 only when nothing was lost,
doubled, parked or left unreported.

Not part of the CI test command (``tests/test_cluster_harness.py`` covers the harness's pieces cheaply).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from scripts.rabbit_cluster import RabbitCluster
from scripts.stack import ReferenceServerProcess, Stack

SECRET = "cluster-chaos-secret"
WORKERS = ("modem_worker_a", "modem_worker_b", "sync_worker", "task_poller", "result_reporter")
# The connections that say the consumers are up (the task poller connects when it first has a message).
CONSUMERS = {"smsgw-modem-modem-a", "smsgw-modem-modem-b", "smsgw-sync-default", "smsgw-result-reporter-default"}
# What the log summary counts in WARNING and ERROR lines.
MARKERS = (
    "handler crashed",
    "broker nacked",
    "parked a message",
    "publish failed",
    "connection lost",
    "kept on the SIM",
)
INBOUND_EVERY_S = 0.5
OUTBOUND_EVERY_S = 1.0


@dataclass
class Traffic:
    """SMS flowing in and out at a steady rate, and when each one was first seen at its far end."""

    stack: Stack
    server: ReferenceServerProcess
    injected: dict[str, float] = field(default_factory=dict)  # inbound text → when injected
    queued: dict[str, float] = field(default_factory=dict)  # outbound text → when queued
    arrived: dict[str, float] = field(default_factory=dict)  # inbound text → first seen at the server
    sent: dict[str, float] = field(default_factory=dict)  # outbound text → first seen in an outbox
    errors: list[str] = field(default_factory=list)
    stop_sending: threading.Event = field(default_factory=threading.Event)
    stop_watching: threading.Event = field(default_factory=threading.Event)
    threads: list[threading.Thread] = field(default_factory=list)
    phase: str = "warm-up"

    def start(self) -> None:
        for target in (self._send_loop, self._watch_loop):
            thread = threading.Thread(target=target, daemon=True)
            thread.start()
            self.threads.append(thread)

    def _send_loop(self) -> None:
        sims = list(self.stack.simulators.values())
        n = 0
        next_out = time.monotonic()
        while not self.stop_sending.wait(INBOUND_EVERY_S):
            n += 1
            text = f"in {self.phase} #{n} {uuid.uuid4().hex[:8]}"
            try:
                sims[n % len(sims)].inject(f"+25570{n:07d}", text)
                self.injected[text] = time.monotonic()
            except OSError as exc:
                self.errors.append(f"inject {n}: {exc}")
            if time.monotonic() >= next_out:
                next_out += OUTBOUND_EVERY_S
                out = f"out {self.phase} #{n} {uuid.uuid4().hex[:8]}"
                try:
                    self.server.queue([{"to": f"+25571{n:07d}", "message": out}])
                    self.queued[out] = time.monotonic()
                except OSError as exc:
                    self.errors.append(f"queue {n}: {exc}")

    def _watch_loop(self) -> None:
        while not self.stop_watching.wait(1.0):
            try:
                self.observe()
            except (OSError, ValueError) as exc:
                self.errors.append(f"watch: {exc}")

    def observe(self) -> None:
        """Note the first time each SMS shows up at its far end."""
        now = time.monotonic()
        for record in self.server.received():
            self.arrived.setdefault(str(record["message"]), now)
        for sim in self.stack.simulators.values():
            for row in sim.outbox():
                self.sent.setdefault(str(row["text"]), now)

    def stop(self) -> None:
        self.stop_sending.set()
        self.stop_watching.set()
        for thread in self.threads:
            thread.join(timeout=30)


@dataclass
class Tally:
    """What a run counts; every number but ``longest_*`` must be 0."""

    inbound: int
    outbound: int
    lost_inbound: int
    under_two_ids: int
    lost_outbound: int
    sent_twice: int
    parked: int
    unreported: int
    no_delivery_report: int
    longest_inbound_s: float
    longest_outbound_s: float

    def clean(self) -> bool:
        return not (
            self.lost_inbound
            or self.under_two_ids
            or self.lost_outbound
            or self.sent_twice
            or self.parked
            or self.unreported
            or self.no_delivery_report
        )

    def lines(self) -> list[str]:
        shown = {name: value if isinstance(value, int) else f"{value:.1f}" for name, value in vars(self).items()}
        return [f"{name:<22} {value}" for name, value in shown.items()]


def tally(traffic: Traffic, parked: int) -> Tally:
    """Count lost, doubled, parked and unreported SMS from the server's and the simulators' own records."""
    received = traffic.server.received()
    ids_per_text = Counter(str(r["message"]) for r in received)
    sent_per_text: Counter[str] = Counter()
    for sim in traffic.stack.simulators.values():
        sent_per_text.update(str(row["text"]) for row in sim.outbox())
    outgoing = traffic.server.outgoing()
    waits_in = [traffic.arrived[t] - at for t, at in traffic.injected.items() if t in traffic.arrived]
    waits_out = [traffic.sent[t] - at for t, at in traffic.queued.items() if t in traffic.sent]
    return Tally(
        inbound=len(traffic.injected),
        outbound=len(traffic.queued),
        lost_inbound=sum(1 for t in traffic.injected if t not in ids_per_text),
        under_two_ids=sum(1 for n in ids_per_text.values() if n > 1),
        lost_outbound=sum(1 for t in traffic.queued if t not in sent_per_text),
        sent_twice=sum(1 for n in sent_per_text.values() if n > 1),
        parked=parked,
        unreported=sum(1 for o in outgoing if o["sent_result_code"] is None),
        no_delivery_report=sum(1 for o in outgoing if o["delivered_result_code"] is None),
        longest_inbound_s=max(waits_in, default=0.0),
        longest_outbound_s=max(waits_out, default=0.0),
    )


def longest_wait_per_phase(sent_at: dict[str, float], seen_at: dict[str, float]) -> dict[str, float]:
    """Phase (the second word of each text) → the longest time from sending to first seen, of that phase's SMS."""
    longest: dict[str, float] = {}
    for text, at in sent_at.items():
        if text in seen_at:
            phase = text.split()[1]
            longest[phase] = max(longest.get(phase, 0.0), seen_at[text] - at)
    return longest


def parked_messages(cluster: RabbitCluster) -> int:
    """Messages in the gateway's parked queues, summed over the cluster."""
    rows = cluster.table("list_queues", "name", "messages")
    return sum(int(row[1]) for row in rows if len(row) > 1 and row[0].endswith(".parked") and row[1].isdigit())


def log_summary(stack: Stack) -> dict[str, dict[str, int]]:
    """Per worker: lines at WARNING and ERROR, handler crashes, nacks, parks (from its JSON log)."""
    summary: dict[str, dict[str, int]] = {}
    for name in WORKERS:
        counts: Counter[str] = Counter()
        for line in stack.log_text(name).splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                counts["non-json"] += 1
                continue
            message, level = str(record.get("message", "")), str(record.get("level", "?"))
            counts[level] += 1
            if level in ("INFO", "DEBUG"):
                continue
            for needle in MARKERS:
                if needle in message:
                    counts[needle] += 1
        summary[name] = {k: v for k, v in counts.items() if k not in ("INFO", "DEBUG")}
    return summary


def gateway_queues(cluster: RabbitCluster) -> dict[str, str]:
    """The gateway's work queues → their leaders (delay and parked queues left out)."""
    leaders = cluster.queue_leaders()
    return {q: n for q, n in leaders.items() if q.startswith("smsgw.") and ".delay" not in q and "parked" not in q}


def busiest(counts: dict[str, int]) -> str:
    """The key with the highest count (the first such one)."""
    return max(counts, key=lambda k: counts[k])


def print_spread(cluster: RabbitCluster, when: str) -> dict[str, list[str]]:
    spread = cluster.connections_per_node()
    print(f"-- connections per node {when}:", flush=True)
    for node, names in spread.items():
        print(f"   {node}: {len(names)}  {sorted(Counter(names).items())}", flush=True)
    return spread


def new_stack(cluster: RabbitCluster, workdir: Path) -> Stack:
    env = {"SMSGW_MESSAGE_RESULTS": "true", "SMSGW_TASK_INTERVAL": "1", "SMSGW_RESULT_INTERVAL": "1"}
    return Stack(workdir, cluster.amqp_url(), "", SECRET, env=env)


def connected(cluster: RabbitCluster) -> set[str]:
    return {name for names in cluster.connections_per_node().values() for name in names}


def start_gateway(stack: Stack, cluster: RabbitCluster) -> ReferenceServerProcess:
    """The reference server and every worker on the cluster; returns when the consumers hold their
    connections and the queues exist."""
    server = stack.start_reference_server("reference_server", SECRET)
    stack.sync_url = server.url
    for suffix, number in (("a", "+255754000001"), ("b", "+255754000002")):
        sim = stack.start_simulator(f"simulator_{suffix}", number)
        stack.start_modem_worker(f"modem_worker_{suffix}", sim, f"modem-{suffix}")
    for name in ("sync_worker", "task_poller", "result_reporter"):
        stack.start(name, name)
    wait(lambda: connected(cluster) >= CONSUMERS, 120, f"connections {sorted(CONSUMERS)}")
    wait(lambda: len(gateway_queues(cluster)) >= 5, 120, "the gateway's queues")
    return server


def wait(predicate: Callable[[], object], timeout: float, what: str) -> None:
    """Poll ``predicate`` every second until truthy. Raises TimeoutError naming ``what``."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(1.0)


def run_scenarios(cluster: RabbitCluster, traffic: Traffic, outage_s: float, after_s: float) -> list[str]:
    """(a) kill the leading node for ``outage_s`` and restart it; (b) kill the busiest node for good. Returns
    what happened, one line per step."""
    notes: list[str] = []
    traffic.phase = "steady"
    time.sleep(20)  # steady traffic before the first kill (the run's own pacing, not a synchronisation)
    leaders = gateway_queues(cluster)
    print(f"-- queue leaders: {sorted(Counter(leaders.values()).items())}", flush=True)
    print_spread(cluster, "before (a)")
    leader = busiest(Counter(leaders.values()))
    traffic.phase = "leader-down"
    started = time.monotonic()
    pid = cluster.kill(leader)
    notes.append(f"(a) killed {leader} (pid {pid}, leading {sum(1 for n in leaders.values() if n == leader)} queues)")
    time.sleep(outage_s)
    cluster.restart(leader)
    notes.append(f"(a) {leader} back after {time.monotonic() - started:.1f}s")
    traffic.phase = "leader-back"
    time.sleep(after_s)
    spread = print_spread(cluster, "before (b)")
    victim = busiest({node: len(names) for node, names in spread.items()})
    traffic.phase = "node-gone"
    pid = cluster.kill(victim)
    notes.append(f"(b) killed {victim} for good (pid {pid}, holding {len(spread[victim])} connections)")
    time.sleep(after_s)
    return notes


def drain(traffic: Traffic, cluster: RabbitCluster, timeout: float) -> float:
    """Stop the traffic and wait until every SMS arrived and every result was reported (or ``timeout``);
    returns how long that took."""
    traffic.stop_sending.set()
    started = time.monotonic()

    def done() -> bool:
        t = tally(traffic, 0)
        return not (t.lost_inbound or t.lost_outbound or t.unreported or t.no_delivery_report)

    try:
        wait(done, timeout, "every SMS to arrive and be reported")
    except TimeoutError as exc:
        print(f"!! {exc}", flush=True)
    traffic.stop()
    return time.monotonic() - started


def report(traffic: Traffic, cluster: RabbitCluster, stack: Stack, notes: list[str], drained_s: float) -> Tally:
    result = tally(traffic, parked_messages(cluster))
    print("\n== cluster run", flush=True)
    for line in notes:
        print("   " + line)
    print(f"   drained in {drained_s:.1f}s after the traffic stopped")
    for line in result.lines():
        print("   " + line)
    for what, sent_at, seen_at in (
        ("inbound", traffic.injected, traffic.arrived),
        ("outbound", traffic.queued, traffic.sent),
    ):
        per_phase = longest_wait_per_phase(sent_at, seen_at)
        print(f"   longest {what} wait per phase: " + ", ".join(f"{p} {s:.1f}s" for p, s in per_phase.items()))
    print_spread(cluster, "at the end")
    print(f"-- queue leaders at the end: {sorted(Counter(gateway_queues(cluster).values()).items())}")
    print("-- worker logs (non-INFO lines and markers):")
    for name, counts in log_summary(stack).items():
        print(f"   {name:<16} {dict(sorted(counts.items()))}")
    print(f"== {'clean' if result.clean() else 'NOT CLEAN'}", flush=True)
    if traffic.errors:
        print(f"-- driver errors ({len(traffic.errors)}): {traffic.errors[:5]}")
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--outage-s", type=float, default=30.0, help="how long the leading node stays down")
    parser.add_argument("--after-s", type=float, default=60.0, help="traffic after each step")
    parser.add_argument("--drain-s", type=float, default=900.0, help="longest wait for the backlog at the end")
    parser.add_argument("--keep", action="store_true", help="keep the work dir (logs) and the nodes' dirs")
    args = parser.parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="smsgw-cluster-chaos-"))
    print(f"work dir {workdir}", flush=True)
    with RabbitCluster(keep_dir=args.keep) as cluster:
        print(f"SMSGW_AMQP_URL={cluster.amqp_url()}", flush=True)
        stack = new_stack(cluster, workdir)
        traffic: Traffic | None = None
        try:
            traffic = Traffic(stack, start_gateway(stack, cluster))
            traffic.start()
            notes = run_scenarios(cluster, traffic, args.outage_s, args.after_s)
            drained = drain(traffic, cluster, args.drain_s)
            result = report(traffic, cluster, stack, notes, drained)
        finally:
            if traffic is not None:
                traffic.stop()
            stack.stop_all()
    return 0 if result.clean() else 1


if __name__ == "__main__":
    sys.exit(main())
