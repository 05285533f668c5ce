"""The README's demo command: the whole gateway, the round trip, the handles it prints, a graceful Ctrl-C."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pika
import pytest
import requests

from scripts.demo import QUEUED_SMS, SAMPLE_SMS, WORKERS, ParkedWatch, Progress
from scripts.stack import ROOT
from services.broker import (
    HEADER_PARK_REASON,
    HEADER_PARKED_AT_MS,
    HEADER_SOURCE_QUEUE,
)
from services.topology import (
    INBOUND_QUEUE,
    OUTBOUND_QUEUE,
    PARKED_EXCHANGE,
    Topology,
    declare_topology,
    parked_queue_for,
)
from tests.conftest import free_port, require_broker, wait_for


def test_demo_round_trip() -> None:
    require_broker()
    vhost = f"smsgw-test-demo-{uuid.uuid4().hex[:8]}"
    result = subprocess.run(
        [sys.executable, "-m", "scripts.demo", "--check", "--vhost", vhost],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "every SMS made the round trip" in result.stdout


@pytest.fixture
def demo(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], Path, str]]:
    """The demo as the operator runs it (no --check), its stdout in a file; killed by PID if a test fails."""
    require_broker()
    vhost = f"smsgw-test-demo-{uuid.uuid4().hex[:8]}"
    out = tmp_path / "demo.out"
    with out.open("wb") as sink:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "scripts.demo",
                "--vhost",
                vhost,
                "--duration",
                "180",
                "--server-port",
                str(free_port()),
                "--simulator-port",
                str(free_port()),
            ],
            # Its own process group, as a shell gives a foreground job: the test can signal it like a terminal.
            cwd=ROOT,
            stdout=sink,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        yield process, out, vhost
    finally:
        if process.poll() is None:
            # SIGTERM: the demo stops its children (in their own sessions, a SIGKILL of the demo would orphan them).
            process.terminate()
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=30)


def _text(out: Path) -> str:
    return out.read_text(encoding="utf-8", errors="replace")


def test_demo_prints_the_handles_and_ctrl_c_drains_every_worker_once(
    demo: tuple[subprocess.Popen[bytes], Path, str],
) -> None:
    process, out, vhost = demo
    wait_for(lambda: "Ctrl-C to stop" in _text(out), 90, 0.2, "the demo's banner")
    banner = _text(out)
    server = re.search(r"reference Sync server : (http://127\.0\.0\.1:\d+)/", banner)
    assert server, banner
    server_url = server.group(1)

    # The handles: the outbox form and its curl line, the parked command for this vhost, the metrics URLs.
    assert f"{server_url}/outbox   (a form)" in banner
    curl = "curl -s --data-urlencode to=+255700000301 --data-urlencode 'text=Hello from the demo'"
    assert f"{curl} {server_url}/outbox" in banner
    parked = f"SMSGW_AMQP_URL=amqp://guest:guest@127.0.0.1:5672/{vhost} .venv/bin/smsgw parked list --queue inbound"
    assert parked in banner
    assert re.search(r"text the gateway      : curl -s -XPOST http://127\.0\.0\.1:\d+/sms -d ", banner)
    metrics = dict(re.findall(r"^ {6}(\w+) +(http://127\.0\.0\.1:\d+/metrics)$", banner, re.MULTILINE))
    assert sorted(metrics) == sorted(WORKERS)
    assert len(set(metrics.values())) == len(WORKERS)  # each worker on its own port
    for worker, url in metrics.items():
        page = wait_for(lambda: _get(url), 30, 0.2, f"{worker} metrics at {url}")  # noqa: B023 (called at once)
        assert "smsgw_" in page, worker

    # An SMS queued through the form goes out like the demo's own, and the status line counts distinct SMS.
    queued = requests.post(
        f"{server_url}/outbox",
        data={"to": "+255700000301", "text": "Hello from the demo"},
        allow_redirects=False,
        timeout=10,
    )
    assert queued.status_code == 303, queued.text
    expected = len(SAMPLE_SMS) + len(QUEUED_SMS) + 1
    wait_for(lambda: f"outgoing: {expected} delivered" in _text(out), 90, 0.2, "every outgoing SMS delivered")
    status_lines = [line for line in _text(out).splitlines() if line.startswith("server received ")]
    assert all(f"/{len(SAMPLE_SMS)} demo SMS |" in line for line in status_lines), status_lines
    assert f"server received {len(SAMPLE_SMS)}/{len(SAMPLE_SMS)} demo SMS | " in status_lines[-1]
    assert "parked 0" in status_lines[-1]

    # Ctrl-C: the terminal sends SIGINT to the whole foreground process group, the demo's (its PID). Children
    # in that group too would drain on it and then take the demo's SIGTERM as the second signal (exit at once).
    os.killpg(process.pid, signal.SIGINT)
    assert process.wait(timeout=90) == 0, _text(out)[-3000:]
    text = _text(out)
    assert "SIGINT: stopping; the workers drain" in text
    stopped = re.search(r"^demo stopped; exit codes: (.*)$", text, re.MULTILINE)
    assert stopped, text[-3000:]
    codes = dict(item.rsplit(" ", 1) for item in stopped.group(1).split(", "))
    assert set(codes) == {*WORKERS, "reference_server", "simulator"}
    assert set(codes.values()) == {"0"}, codes
    logs = ROOT / "var" / f"demo-{vhost}" / "logs"
    for worker in WORKERS:
        log = (logs / f"{worker}.log").read_text(encoding="utf-8")
        # One signal each: the first SIGTERM drains; a second (the old SIGINT + SIGTERM) would exit at once.
        assert log.count("draining") == 1, (worker, log[-2000:])
        assert "second SIGTERM" not in log and "second SIGINT" not in log, (worker, log[-2000:])


def _get(url: str) -> str:
    try:
        response = requests.get(url, timeout=5)
    except requests.RequestException:
        return ""
    return response.text if response.status_code == 200 else ""


def test_demo_refuses_a_port_that_is_taken() -> None:
    # A demo left running (or orphaned) on 8700 used to answer instead of the new one: its SMS were counted
    # as the new demo's (the status line said "received 10/5").
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        started = time.monotonic()
        result = subprocess.run(
            [sys.executable, "-m", "scripts.demo", "--server-port", str(port), "--vhost", "smsgw-test-never-made"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    assert result.returncode == 2
    assert result.stderr.strip() == (
        f"scripts/demo: port {port} for the reference server is in use (another demo still running?); "
        "stop it or choose another port with --server-port"
    )
    assert time.monotonic() - started < 30  # refused before touching RabbitMQ


class _Simulator:
    """Stands in for the simulator's control API in the status-line test."""

    def __init__(self, sent: int, held: int) -> None:
        self._sent, self._held = sent, held

    def outbox(self) -> list[dict[str, object]]:
        return [{}] * self._sent

    def inbox(self) -> list[dict[str, object]]:
        return [{}] * self._held


def test_status_line_counts_distinct_demo_sms_and_never_passes_its_total() -> None:
    demo = [{"from": sender, "message": text, "repeats": 3} for sender, text in SAMPLE_SMS]
    others = [
        {"from": "+255700000001", "message": "Habari 😀", "repeats": 0},  # texted in by hand (the banner's curl)
        {"from": SAMPLE_SMS[4][0], "message": "long text long text", "repeats": 0},  # a straggler part on its own
    ]
    state = {"received": [*demo, *others], "outgoing": [{"status": "delivered"}, {"status": "pending"}]}
    progress = Progress.read(state, _Simulator(sent=7, held=0), parked=1)  # type: ignore[arg-type]
    assert progress.line() == (
        f"server received {len(SAMPLE_SMS)}/{len(SAMPLE_SMS)} demo SMS (+2 other) | outgoing: 1 delivered, "
        "1 pending | modem sent 7 SMS | SIM holds 0 part(s) | parked 1"
    )
    assert not progress.round_trip_done()
    half = Progress.read({"received": demo[:2], "outgoing": []}, _Simulator(0, 3), parked=0)  # type: ignore[arg-type]
    assert half.line().startswith(f"server received 2/{len(SAMPLE_SMS)} demo SMS | outgoing: none |")


def test_parked_watch_reports_each_parked_sms_once_with_its_reason(clean_broker: str) -> None:
    lines: list[str] = []
    modem_queue = "smsgw.outbound.demo-modem"
    watch = ParkedWatch(clean_broker, (INBOUND_QUEUE, OUTBOUND_QUEUE, modem_queue), Topology().with_modems(["x"]))
    watch.poll(lines.append)  # the modem queue was never declared here: counted 0, no error
    assert lines == []
    assert watch.counts == {INBOUND_QUEUE: 0, OUTBOUND_QUEUE: 0, modem_queue: 0}

    connection = pika.BlockingConnection(pika.URLParameters(clean_broker))
    try:
        channel = connection.channel()
        declare_topology(channel)
        channel.confirm_delivery()
        reason = "HTTP 500 from the Sync URL: DisallowedHost at /sms"
        channel.basic_publish(
            PARKED_EXCHANGE,
            INBOUND_QUEUE,
            b"{}",
            pika.BasicProperties(
                message_id="parked-1",
                headers={HEADER_PARK_REASON: reason, HEADER_PARKED_AT_MS: 1, HEADER_SOURCE_QUEUE: INBOUND_QUEUE},
            ),
        )
        watch.poll(lines.append)
        assert lines == [f"PARKED in {parked_queue_for(INBOUND_QUEUE)}: parked-1 — {reason}"]
        assert watch.counts[INBOUND_QUEUE] == 1
        watch.poll(lines.append)  # still parked: not reported again
        assert len(lines) == 1
        # The watch only looked: the message is still parked, for `smsgw parked replay`.
        assert channel.queue_declare(parked_queue_for(INBOUND_QUEUE), passive=True).method.message_count == 1
    finally:
        connection.channel().queue_purge(parked_queue_for(INBOUND_QUEUE))
        connection.close()
