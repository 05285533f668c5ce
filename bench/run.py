"""Benchmark of the real gateway processes (not a test): throughput, latency, reply round trip, footprint.

    python -m bench.run [--modems 4] [--count 2000] [--rate 50] [--duration 20] [--sync-workers 1] ...

Starts, in a vhost of its own on the local RabbitMQ (deleted at the end, even on error): a sink Sync URL
(``bench.sink``, own process), N modem simulators (SIM capacity 255), N modem workers and the sync worker(s)
with ``SMSGW_LOG_LEVEL=WARNING``, then measures

1. throughput: ``--count`` SMS injected with ``POST /sms/batch`` (chunks of ``--batch`` per modem, one injector
   thread per modem, retried while the SIM is full) until all reached the sink; lost/duplicated counted;
2. latency at a fixed rate: ``--rate`` SMS/s for ``--duration`` s with ``POST /sms``, round-robin over the
   modems; from the POST to the arrival at the sink;
3. reply round trip: ``--replies`` SMS, one at a time; the sink answers each with a ``task: send`` reply;
   from ``POST /sms`` to the reply in that simulator's ``GET /outbox`` (polled every 5 ms);
4. peak RSS (VmHWM) of every worker, then idle RSS and idle CPU over ``--idle-seconds``;
5. the raw limit of the same path without the gateway: pika publish-with-confirm (persistent, quorum queue,
   one BlockingConnection) -> ``bench.raw_consumer`` (own process: consume, POST to the same sink, ack).

Timestamps are wall-clock ``time.time()`` on both sides (same machine); every SMS text carries its phase,
sequence number and send time (``BENCH <phase> <seq> <ms>``).
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import os
import shutil
import signal
import sys
import threading
import time
import urllib.error
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

import pika

from bench.instrument import BenchStack, Instrument, check_tools
from bench.measure import CpuWindow, find_pid, percentile, status_mb
from bench.report import report
from scripts.stack import ROOT, Simulator, Stack, delete_vhost, ensure_vhost, free_port, http_json, wait_until

SIM_CAPACITY = 255
RAW_QUEUE = "bench.raw"


# ---------------------------------------------------------------------------------------------- the sink


@dataclass
class Sink:
    """Client of ``bench.sink``."""

    url: str

    def count(self) -> int:
        return int(http_json(f"{self.url}/_count")["count"])

    def records(self) -> list[tuple[float, str]]:
        return [(float(t), str(m)) for t, m in http_json(f"{self.url}/_records", timeout=60)]

    def reset(self) -> None:
        http_json(f"{self.url}/_reset", {})

    def wait_for(self, expected: int, timeout: float, stall: float = 30.0) -> int:
        """Wait until ``expected`` records (bounded by ``timeout``, or ``stall`` s without progress)."""
        deadline = time.monotonic() + timeout
        last, last_change = -1, time.monotonic()
        while time.monotonic() < deadline:
            count = self.count()
            if count >= expected:
                return count
            if count != last:
                last, last_change = count, time.monotonic()
            elif time.monotonic() - last_change > stall:
                break
            time.sleep(0.05)
        return self.count()


def parse_records(records: list[tuple[float, str]], prefix: str) -> list[tuple[int, float]]:
    """(seq, arrival) of the records whose text starts with ``prefix`` (``"BENCH T"``, ``"RAW"``)."""
    out: list[tuple[int, float]] = []
    width = len(prefix.split())
    for arrived, text in records:
        if text.startswith(prefix + " "):
            out.append((int(text.split()[width]), arrived))
    return out


@dataclass
class Delivered:
    """Outcome of one injected set: what arrived, once or more, and when."""

    expected: int
    arrivals: list[tuple[int, float]]

    @property
    def unique(self) -> set[int]:
        return {seq for seq, _ in self.arrivals}

    @property
    def lost(self) -> int:
        return self.expected - len(self.unique)

    @property
    def duplicated(self) -> int:
        return sum(n - 1 for n in Counter(seq for seq, _ in self.arrivals).values() if n > 1)

    def first_arrival(self) -> dict[int, float]:
        first: dict[int, float] = {}
        for seq, arrived in self.arrivals:
            first[seq] = min(arrived, first.get(seq, arrived))
        return first


# ---------------------------------------------------------------------------------------------- the gateway


def start_simulator(stack: Stack, name: str, own_number: str) -> Simulator:
    """A simulator with the largest SIM (255 slots, stated even though it is the default), so bursts fit."""
    simulator = stack.start_simulator(name, own_number, None, "--capacity", str(SIM_CAPACITY))
    # No status reports: they would add load (and events nobody consumes) to the reply phase.
    simulator.set_state(delivery="none")
    return simulator


def sender_of(seq: int) -> str:
    return f"+2557{seq % 100_000_000:08d}"


def post_batch(simulator: Simulator, messages: list[dict[str, Any]], deadline: float) -> None:
    """POST /sms/batch, retrying while the SIM is full (HTTP 507) until ``deadline``."""
    while True:
        try:
            http_json(f"{simulator.control_url}/sms/batch", {"messages": messages}, timeout=30)
            return
        except urllib.error.HTTPError as exc:
            if exc.code != 507 or time.monotonic() > deadline:
                raise
            time.sleep(0.005)


def throughput_phase(
    sims: list[Simulator], sink: Sink, count: int, batch: int, timeout: float, cpu: CpuWindow
) -> dict[str, Any]:
    """Inject ``count`` SMS as fast as the SIMs take them; wait until all arrive."""
    sink.reset()
    sent_at: dict[int, float] = {}
    errors: list[BaseException] = []
    deadline = time.monotonic() + timeout
    start_gate = threading.Event()

    def inject(index: int) -> None:
        seqs = list(range(index, count, len(sims)))
        start_gate.wait()
        try:
            for offset in range(0, len(seqs), batch):
                chunk = seqs[offset : offset + batch]
                now = time.time()
                for seq in chunk:
                    sent_at[seq] = now
                messages = [{"from": sender_of(seq), "text": f"BENCH T {seq} {int(now * 1000)}"} for seq in chunk]
                post_batch(sims[index], messages, deadline)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=inject, args=(i,), daemon=True) for i in range(len(sims))]
    for thread in threads:
        thread.start()
    cpu.start()
    started = time.time()
    start_gate.set()
    for thread in threads:
        thread.join(timeout=timeout)
    injected_at = time.time()
    sink.wait_for(count, max(1.0, deadline - time.monotonic()))
    cpu.stop()
    if errors:
        print(f"  injection error: {errors[0]!r}", flush=True)
    delivered = Delivered(count, parse_records(sink.records(), "BENCH T"))
    first = delivered.first_arrival()
    times = sorted(first.values())
    latencies = [1000 * (first[s] - sent_at[s]) for s in first if s in sent_at]
    result: dict[str, Any] = {
        "count": count,
        "lost": delivered.lost,
        "duplicated": delivered.duplicated,
        "injection_s": injected_at - started,
    }
    if len(times) >= 2:
        result["first_to_last"] = (len(times) - 1) / (times[-1] - times[0])
        result["start_to_last"] = len(times) / (times[-1] - started)
        result["lat_p50"], result["lat_p99"] = percentile(latencies, 50), percentile(latencies, 99)
        # A long silence means a stall (a lost +CMTI picked up by the 30 s SIM sweep, a broker alarm...).
        result["max_gap"] = max(b - a for a, b in itertools.pairwise(times))
    return result


def latency_phase(sims: list[Simulator], sink: Sink, rate: float, duration: float) -> dict[str, Any]:
    """``rate`` SMS/s for ``duration`` s (POST /sms each, round-robin); latency POST -> sink."""
    sink.reset()
    total = max(1, int(rate * duration))
    sent_at: dict[int, float] = {}
    late = 0
    t0 = time.monotonic() + 0.2
    for seq in range(total):
        due = t0 + seq / rate
        pause = due - time.monotonic()
        if pause > 0:
            time.sleep(pause)
        elif pause < -0.02:
            late += 1
        now = time.time()
        sent_at[seq] = now
        sims[seq % len(sims)].inject(sender_of(seq), f"BENCH L {seq} {int(now * 1000)}")
    achieved = total / (time.monotonic() - t0)
    sink.wait_for(total, 60)
    delivered = Delivered(total, parse_records(sink.records(), "BENCH L"))
    first = delivered.first_arrival()
    latencies = [1000 * (first[s] - sent_at[s]) for s in first]
    return {
        "count": total,
        "achieved_rate": achieved,
        "late_posts": late,
        "lost": delivered.lost,
        "duplicated": delivered.duplicated,
        "p50": percentile(latencies, 50),
        "p90": percentile(latencies, 90),
        "p99": percentile(latencies, 99),
        "max": max(latencies, default=float("nan")),
    }


def reply_phase(sims: list[Simulator], count: int) -> dict[str, Any]:
    """One SMS at a time; the sink replies; time until the reply is in that simulator's outbox."""
    round_trips: list[float] = []
    missing = 0
    for seq in range(count):
        simulator = sims[seq % len(sims)]
        expected = f"REPLY {seq}"
        started = time.time()
        simulator.inject(sender_of(seq), f"BENCH R {seq} {int(started * 1000)}")
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if any(item.get("text") == expected for item in simulator.outbox()):
                round_trips.append(1000 * (time.time() - started))
                break
            time.sleep(0.005)
        else:
            missing += 1
        time.sleep(0.05)
    outboxes = [s.outbox() for s in sims]
    sent = Counter(item.get("text") for box in outboxes for item in box)
    doubled = sum(n - 1 for text, n in sent.items() if str(text).startswith("REPLY ") and n > 1)
    return {
        "count": count,
        "missing": missing,
        "duplicated": doubled,
        "p50": percentile(round_trips, 50),
        "p99": percentile(round_trips, 99),
        "max": max(round_trips, default=float("nan")),
    }


def idle_phase(pids: dict[str, int], seconds: float) -> dict[str, tuple[float, float]]:
    """(RSS MB, CPU %) of each process over ``seconds`` of idleness."""
    window = CpuWindow(pids)
    window.start()
    time.sleep(seconds)
    window.stop()
    return {name: (status_mb(pid, "VmRSS"), window.pct(name)) for name, pid in pids.items()}


# ---------------------------------------------------------------------------------------------- raw limit


def raw_phase(stack: Stack, sink: Sink, count: int, publishers: int, timeout: float) -> dict[str, Any]:
    """pika confirm-publish -> quorum queue -> consumer process -> POST to the sink -> ack."""
    stack.start(
        "raw_consumer",
        "bench.raw_consumer",
        "--amqp-url",
        stack.amqp_url,
        "--queue",
        RAW_QUEUE,
        "--sink",
        f"{sink.url}/smssync",
    )
    connections = [pika.BlockingConnection(pika.URLParameters(stack.amqp_url)) for _ in range(publishers)]
    try:
        channels = [c.channel() for c in connections]
        for channel in channels:
            channel.queue_declare(RAW_QUEUE, durable=True, arguments={"x-queue-type": "quorum"})
            channel.confirm_delivery()
        properties = pika.BasicProperties(delivery_mode=pika.DeliveryMode.Persistent, content_type="text/plain")
        sink.reset()
        channels[0].basic_publish("", RAW_QUEUE, b"RAW W 0 0", properties, mandatory=True)
        if sink.wait_for(1, 60) < 1:
            raise RuntimeError("raw consumer did not start (see its log)")
        sink.reset()

        def publish(index: int) -> None:
            for seq in range(index, count, publishers):
                body = f"RAW {seq} {int(time.time() * 1000)}".encode()
                channels[index].basic_publish("", RAW_QUEUE, body, properties, mandatory=True)

        threads = [threading.Thread(target=publish, args=(i,), daemon=True) for i in range(publishers)]
        started = time.time()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=timeout)
        published = time.time()
        sink.wait_for(count, timeout)
    finally:
        for connection in connections:
            with contextlib.suppress(Exception):
                connection.close()
    delivered = Delivered(count, parse_records(sink.records(), "RAW"))
    times = sorted(delivered.first_arrival().values())
    result: dict[str, Any] = {
        "count": count,
        "lost": delivered.lost,
        "duplicated": delivered.duplicated,
        "publish_rate": count / max(1e-9, published - started),
    }
    if len(times) >= 2:
        result["first_to_last"] = (len(times) - 1) / (times[-1] - times[0])
        result["start_to_last"] = len(times) / (times[-1] - started)
    return result


# ---------------------------------------------------------------------------------------------- main


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench.run", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--modems", type=int, default=4, help="simulators and modem workers (default 4)")
    parser.add_argument("--sync-workers", type=int, default=1, help="sync_worker processes (default 1)")
    parser.add_argument("--count", type=int, default=2000, help="SMS of the throughput phase (default 2000)")
    parser.add_argument("--batch", type=int, default=50, help="SMS per POST /sms/batch (default 50)")
    parser.add_argument("--rate", type=float, default=50, help="SMS/s of the latency phase (default 50)")
    parser.add_argument("--duration", type=float, default=20, help="seconds of the latency phase (default 20)")
    parser.add_argument("--replies", type=int, default=40, help="SMS of the reply round-trip phase (default 40)")
    parser.add_argument("--idle-seconds", type=float, default=10, help="idle window (default 10)")
    parser.add_argument("--raw-count", type=int, default=None, help="messages of the raw phase (default --count)")
    parser.add_argument(
        "--raw-publishers", type=int, default=1, help="publisher connections of the raw phase (default 1)"
    )
    parser.add_argument("--timeout", type=float, default=300, help="bound of each phase in seconds (default 300)")
    parser.add_argument("--log-level", default="WARNING", help="SMSGW_LOG_LEVEL of the workers (default WARNING)")
    tools = parser.add_mutually_exclusive_group()
    tools.add_argument(
        "--callgrind",
        metavar="DIR",
        type=Path,
        help="run the workers under valgrind callgrind; print instructions per SMS of the throughput phase",
    )
    tools.add_argument(
        "--profile",
        metavar="DIR",
        type=Path,
        help="run the workers under cProfile; snapshots around the throughput phase (python -m bench.profile)",
    )
    parser.add_argument(
        "--skip",
        action="append",
        default=[],
        choices=("throughput", "latency", "replies", "raw"),
        help="skip a phase (repeatable)",
    )
    return parser


def _raise_on_term(signum: int, _frame: FrameType | None) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


@contextlib.contextmanager
def _vhost(name: str) -> Iterator[str]:
    url = ensure_vhost(name)
    try:
        yield url
    finally:
        delete_vhost(name)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print the figures; returns 0 (misses are reported, not failures)."""
    args = _parser().parse_args(argv)
    signal.signal(signal.SIGTERM, _raise_on_term)
    vhost = f"smsgw-bench-{uuid.uuid4().hex[:8]}"
    workdir = ROOT / "var" / f"bench-{vhost}"  # var/ is git-ignored; logs are kept for inspection
    shutil.rmtree(workdir, ignore_errors=True)
    print(
        f"bench: vhost {vhost}, logs in {workdir / 'logs'}, {os.cpu_count()} CPUs, "
        f"load average {os.getloadavg()[0]:.2f} at start",
        flush=True,
    )
    mode, out_dir = ("callgrind", args.callgrind) if args.callgrind else ("profile", args.profile)
    if out_dir is not None:
        check_tools(mode)
        out_dir.mkdir(parents=True, exist_ok=True)
    else:
        mode = ""
    with _vhost(vhost) as amqp_url:
        sink_port = free_port()
        stack = BenchStack(
            workdir,
            amqp_url,
            f"http://127.0.0.1:{sink_port}/smssync",
            "bench-secret",
            env={
                "SMSGW_DEVICE_ID": "bench-gateway",
                "SMSGW_LOG_LEVEL": args.log_level,
                "SMSGW_AUTO_RESPONSE": "",
            },
            mode=mode,
            out_dir=out_dir.resolve() if out_dir is not None else None,
        )
        try:
            return _run(args, stack, Sink(f"http://127.0.0.1:{sink_port}"), sink_port)
        finally:
            stack.stop_all()
            print(f"bench: stopped {len(stack.processes)} processes, deleting vhost {vhost}", flush=True)


def _phase(name: str) -> Callable[[], None]:
    started = time.monotonic()
    print(f"-- {name} ...", flush=True)
    return lambda: print(f"   ({time.monotonic() - started:.1f} s)", flush=True)


def _run(args: argparse.Namespace, stack: BenchStack, sink: Sink, sink_port: int) -> int:
    stack.start("sink", "bench.sink", "--port", str(sink_port))
    wait_until(lambda: sink.count() >= 0, 20, "sink")
    sims = [start_simulator(stack, f"simulator{i}", f"+25575400{i:04d}") for i in range(args.modems)]
    for i, simulator in enumerate(sims):
        stack.start_modem_worker(f"modem_worker{i}", simulator, f"modem{i}")
    for j in range(args.sync_workers):
        stack.start(f"sync_worker{j}", "sync_worker")
    workers = {name: p.pid for name, p in stack.processes.items() if name.startswith(("modem_worker", "sync_worker"))}

    done = _phase("warm-up: one SMS per modem through the whole gateway")
    for i, simulator in enumerate(sims):
        simulator.inject(sender_of(i), f"BENCH W {i} 0")
    # Under callgrind or cProfile the workers start many times slower.
    bound = 120 if args.callgrind is None and args.profile is None else 900
    if sink.wait_for(len(sims), bound, stall=bound) < len(sims):
        raise RuntimeError(f"warm-up SMS did not arrive; see {stack.workdir / 'logs'}")
    done()

    watched = dict(workers)
    watched["sink"] = stack.processes["sink"].pid
    for i in range(len(sims)):
        watched[f"simulator{i}"] = stack.processes[f"simulator{i}"].pid
    watched["bench (injector)"] = os.getpid()
    rabbit = find_pid("beam.smp")
    if rabbit is not None:
        watched["rabbitmq (shared)"] = rabbit
    instrument = Instrument(stack.mode, stack.out_dir, workers) if stack.mode and stack.out_dir else None
    cpu = CpuWindow(watched, inner=[instrument] if instrument is not None else [])

    results: dict[str, dict[str, Any]] = {}
    if "throughput" not in args.skip:
        done = _phase(f"throughput: {args.count} SMS over {len(sims)} modems, batches of {args.batch}")
        results["throughput"] = throughput_phase(sims, sink, args.count, args.batch, args.timeout, cpu)
        done()
    if "latency" not in args.skip:
        done = _phase(f"latency: {args.rate:g} SMS/s for {args.duration:g} s")
        results["latency"] = latency_phase(sims, sink, args.rate, args.duration)
        done()
    if "replies" not in args.skip:
        done = _phase(f"reply round trip: {args.replies} SMS, one at a time")
        results["replies"] = reply_phase(sims, args.replies)
        done()
    if instrument is not None:
        instrument.idle(max(args.idle_seconds, 10.0))
    peak = {name: status_mb(pid, "VmHWM") for name, pid in workers.items()}
    done = _phase(f"idle: {args.idle_seconds:g} s")
    time.sleep(2)
    idle = idle_phase(workers, args.idle_seconds)
    done()
    if "raw" not in args.skip:
        raw_count = args.raw_count or args.count
        done = _phase(f"raw limit: {raw_count} messages, {args.raw_publishers} publisher connection(s)")
        results["raw"] = raw_phase(stack, sink, raw_count, args.raw_publishers, args.timeout)
        done()
    report(args, results, cpu, peak, idle)
    if instrument is not None:
        instrument.report(args.count)
    return 0


if __name__ == "__main__":
    sys.exit(main())
