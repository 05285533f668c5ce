"""task_poller against the real broker, the reference Sync server and protocol-quirk stubs on loopback."""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pika
import pytest
from prometheus_client import REGISTRY

from reference_server.server import ReferenceServer
from result_reporter.reporter import ResultReporter
from services import broker
from services.broker import BatchConsumer, BrokerUnavailable, MessagePublisher, PublisherThread
from services.broker.stub import StubPublisher
from services.config import EndpointConfig, FleetConfig, fleet_from_env, parse_fleet
from services.ledger import Ledger, open_ledger
from services.schemas import OutboundSms, SentEvent, task_ledger_key
from services.sync_client import SyncClient
from services.sync_protocol import USER_AGENT
from services.topology import (
    EVENTS_QUEUE,
    OUTBOUND_QUEUE,
    Topology,
    declare_topology,
    outbound_queue_for,
    pool_queue_for,
)
from task_poller.confirm import RECONFIRM_TRIES
from task_poller.poller import TaskPoller, init_metrics
from task_poller.runner import PollerGroup
from task_poller.sync_http import PollError
from tests.conftest import wait_for
from tests.http_stub import HttpStub, Request

SECRET = "s3cret"


def take(url: str, queue: str = OUTBOUND_QUEUE, topology: Topology | None = None) -> list[OutboundSms]:
    """Everything on ``queue`` right now (consumed); ``topology`` is declared first (so its queues exist)."""
    connection = pika.BlockingConnection(pika.URLParameters(url))
    found: list[OutboundSms] = []
    try:
        channel = connection.channel()
        if topology is not None:
            declare_topology(channel, topology)
        while True:
            method, _props, body = channel.basic_get(queue, auto_ack=True)
            if method is None:
                return found
            found.append(OutboundSms.from_json(body))
    finally:
        connection.close()


def take_outbound(url: str) -> list[OutboundSms]:
    """Everything on the shared outbound queue right now (consumed)."""
    return take(url)


@pytest.fixture
def publisher(clean_broker: str) -> Iterator[PublisherThread]:
    p = PublisherThread(clean_broker, "test-task-poller")
    yield p
    p.close()


@pytest.fixture
def server() -> Iterator[ReferenceServer]:
    with ReferenceServer(SECRET) as s:
        yield s


# Ledgers and pollers the helpers opened in the running test; closed after it (autouse fixture below).
_opened: list[Ledger | TaskPoller] = []


@pytest.fixture(autouse=True)
def _close_opened() -> Iterator[None]:
    yield
    while _opened:
        _opened.pop().close()


def ledger_of(state: Path) -> Ledger:
    ledger = open_ledger("", str(state))
    _opened.append(ledger)
    return ledger


def env_fleet(sync_url: str, **env: str) -> FleetConfig:
    """The env-only fleet (one endpoint "default"), as with today's variables."""
    return fleet_from_env(
        {
            "SMSGW_SYNC_URL": sync_url,
            "SMSGW_SECRET": SECRET,
            "SMSGW_HTTP_TIMEOUT": "5",
            **env,
        }
    )


def poller_for(
    endpoint: EndpointConfig, fleet: FleetConfig, publisher: MessagePublisher, ledger: Ledger, **kwargs: bool
) -> TaskPoller:
    poller = TaskPoller(endpoint, fleet, publisher, ledger, SyncClient(endpoint), **kwargs)
    _opened.append(poller)
    return poller


def make_poller(
    sync_url: str,
    publisher: MessagePublisher,
    state: Path,
    *,
    ledger: Ledger | None = None,
    interval: float | None = None,
    **env: str,
) -> TaskPoller:
    fleet = env_fleet(sync_url, **env)
    endpoint = fleet.endpoints[0]
    if interval is not None:  # below the 1 s the settings allow: fast loop tests
        endpoint = dataclasses.replace(endpoint, task_interval=interval)
    return poller_for(endpoint, fleet, publisher, ledger or ledger_of(state))


def file_fleet(
    endpoints: Sequence[dict[str, Any]], routes: Sequence[dict[str, Any]] = (), modems: Sequence[str] = ()
) -> FleetConfig:
    """A fleet as a config file would give it."""
    return parse_fleet(
        {"endpoints": list(endpoints), "routes": list(routes), "modems": {m: {} for m in modems}}, "test.toml"
    )


def test_message_results_flow_with_reference_server(
    clean_broker: str, publisher: PublisherThread, server: ReferenceServer, tmp_path: Path
) -> None:
    uuids = [server.queue_outgoing("+255700000001", f"hello {i}", f"u-{i}") for i in range(3)]
    poller = make_poller(server.url, publisher, tmp_path, SMSGW_MESSAGE_RESULTS="true")
    result = poller.poll_once()
    assert (result.offered, result.queued, result.duplicates) == (3, 3, 0)
    queued = take_outbound(clean_broker)
    assert sorted(m.uuid for m in queued) == uuids
    assert all(m.origin == "task" and m.report and m.to == "+255700000001" for m in queued)
    # The env-only endpoint: bare uuids as ledger keys, events to the default endpoint, any modem.
    assert all(m.endpoint == "default" and m.ledger_key == m.uuid and m.modems == [] for m in queued)
    assert {o["uuid"]: o["status"] for o in server.outgoing()} == dict.fromkeys(uuids, "queued")
    ledger = ledger_of(tmp_path)
    assert all(ledger.claim_state(u) == "queued" for u in uuids)
    # The server no longer offers them; a second poll queues nothing.
    assert poller.poll_once().queued == 0
    assert take_outbound(clean_broker) == []


def test_without_message_results_each_uuid_is_queued_once(
    clean_broker: str, publisher: PublisherThread, server: ReferenceServer, tmp_path: Path
) -> None:
    server.queue_outgoing("+255700000001", "hi", "u-1")
    poller = make_poller(server.url, publisher, tmp_path)
    assert poller.poll_once().queued == 1
    # The server keeps offering it (it is never told): known to the ledger, skipped.
    second = poller.poll_once()
    assert (second.offered, second.queued, second.duplicates) == (1, 0, 1)
    [message] = take_outbound(clean_broker)
    assert message.uuid == "u-1"
    assert not message.report  # no Message Results API: no events for it
    assert server.state()["counters"]["task_sent_posts"] == 0


def test_quirky_server(clean_broker: str, publisher: PublisherThread, tmp_path: Path) -> None:
    """Seed-PHP style: two JSON docs back to back, string success; secret with & = space; URL with a query;
    Basic auth from the URL; ?task=sent answered with the queued_messages key and only one uuid echoed."""
    secret = "a&b= c"

    def respond(request: Request) -> tuple[int, str]:
        if request.method == "GET" and request.query.get("task") == "send":
            payload = {
                "payload": {
                    "success": "true",
                    "task": "send",
                    "secret": secret,
                    "messages": [
                        {"to": "+81902", "message": "one", "uuid": "q-1"},
                        {"to": "+81903", "message": "two", "uuid": "q-2"},
                        {"to": None, "message": "bad", "uuid": "q-3"},
                        {"to": "+81904", "message": "no uuid"},
                    ],
                }
            }
            return 200, json.dumps(payload) + json.dumps({"message_uuids": ["q-1"]})
        if request.method == "POST" and request.query.get("task") == "sent":
            return 200, json.dumps({"queued_messages": ["q-1"]})
        return 404, ""

    stub = HttpStub(respond).start()
    try:
        url = stub.url.replace("http://", "http://user:p%40ss@") + "?x=1"
        poller = make_poller(url, publisher, tmp_path, SMSGW_SECRET=secret, SMSGW_MESSAGE_RESULTS="true")
        result = poller.poll_once()
    finally:
        stub.stop()
    assert (result.offered, result.queued, result.invalid, result.not_confirmed) == (2, 1, 2, 1)
    get, post = stub.requests
    assert get.query == {"x": "1", "task": "send", "secret": secret}
    assert get.headers["user-agent"] == USER_AGENT
    assert get.headers["authorization"] == "Basic dXNlcjpwQHNz"  # user:p@ss
    assert post.query == {"x": "1", "task": "sent"}  # no secret, as the app
    assert json.loads(post.body) == {"queued_messages": ["q-1", "q-2"]}
    assert [m.uuid for m in take_outbound(clean_broker)] == ["q-1"]
    # The unconfirmed claim is released: it is neither republished nor blocked from a later offer.
    assert ledger_of(tmp_path).claim_state("q-2") is None


@pytest.mark.parametrize(
    ("payload", "why"),
    [
        (
            {"task": "send", "secret": "wrong", "messages": [{"to": "+1", "message": "m", "uuid": "w-1"}]},
            "does not match",
        ),
        ({"task": "send", "messages": [{"to": "+1", "message": "m", "uuid": "w-1"}]}, "is missing"),
        ({"task": "alert", "secret": SECRET, "messages": [{"to": "+1", "message": "m", "uuid": "w-1"}]}, "not 'send'"),
    ],
)
def test_untrusted_task_is_ignored_with_one_line(
    clean_broker: str,
    publisher: PublisherThread,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    payload: dict[str, object],
    why: str,
) -> None:
    stub = HttpStub(lambda r: (200, json.dumps({"payload": payload}))).start()
    try:
        poller = make_poller(stub.url, publisher, tmp_path, SMSGW_MESSAGE_RESULTS="true")
        with caplog.at_level(logging.INFO, logger="task_poller.poller"):
            assert poller.poll_once().queued == 0
    finally:
        stub.stop()
    assert len(stub.requests) == 1  # no ?task=sent
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and "ignored" in lines[0] and why in lines[0]
    assert SECRET not in lines[0] and "wrong" not in lines[0]
    assert take_outbound(clean_broker) == []
    assert ledger_of(tmp_path).known(["w-1"]) == set()


def test_http_403_backs_off_without_crashing(
    clean_broker: str, publisher: PublisherThread, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    stub = HttpStub(lambda r: (403, '{"payload":{"success":false,"error":"bad secret"}}')).start()
    poller = make_poller(stub.url, publisher, tmp_path, SMSGW_TASK_INTERVAL="1")
    with pytest.raises(PollError, match=r"HTTP 403.*SMSGW_SECRET"):
        poller.poll_once()
    stop = threading.Event()
    thread = threading.Thread(target=poller.run, args=(stop,), daemon=True)
    times: list[float] = []
    try:
        with caplog.at_level(logging.ERROR, logger="task_poller.poller"):
            thread.start()
            wait_for(lambda: len(stub.requests) >= 2, timeout=10, what="first poll of the run loop")
            times = [time.monotonic()]
            wait_for(lambda: len(stub.requests) >= 3, timeout=10, what="second poll after back-off")
            times.append(time.monotonic())
    finally:
        stop.set()
        thread.join(timeout=5)
        stub.stop()
    assert not thread.is_alive()
    assert times[1] - times[0] >= 1.8  # interval 1 s, doubled after a failure
    assert all("HTTP 403" in r.getMessage() and "endpoint default" in r.getMessage() for r in caplog.records)


def test_orphaned_claim_is_republished(
    clean_broker: str, publisher: PublisherThread, tmp_path: Path, server: ReferenceServer
) -> None:
    ledger = ledger_of(tmp_path)
    assert ledger.claim("orphan-1", "+255700000002", "left behind", "default")  # a poller died right after this
    poller = make_poller(server.url, publisher, tmp_path)
    poller.stale_claim_s = 0
    assert poller.republish_orphans() == 1
    [message] = take_outbound(clean_broker)
    assert (message.uuid, message.to, message.text, message.origin, message.endpoint) == (
        "orphan-1",
        "+255700000002",
        "left behind",
        "task",
        "default",
    )
    assert ledger.claim_state("orphan-1") == "queued"
    assert poller.republish_orphans() == 0


def test_two_pollers_in_threads_never_queue_a_uuid_twice(
    clean_broker: str, server: ReferenceServer, tmp_path: Path
) -> None:
    uuids = [server.queue_outgoing("+255700000001", f"m{i}", f"r-{i}") for i in range(30)]
    publishers = [PublisherThread(clean_broker, f"test-replica-{i}") for i in range(2)]
    try:
        pollers = [make_poller(server.url, p, tmp_path) for p in publishers]
        barrier = threading.Barrier(2)

        def hammer(poller: TaskPoller) -> None:
            for _ in range(5):
                barrier.wait()
                poller.poll_once()

        threads = [threading.Thread(target=hammer, args=(p,)) for p in pollers]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=30)
    finally:
        for p in publishers:
            p.close()
    queued = [m.uuid for m in take_outbound(clean_broker)]
    assert sorted(queued) == sorted(uuids)


def _env(amqp: str, sync_url: str, state: Path, **extra: str) -> dict[str, str]:
    return {
        **os.environ,
        "SMSGW_AMQP_URL": amqp,
        "SMSGW_SYNC_URL": sync_url,
        "SMSGW_SECRET": SECRET,
        "SMSGW_STATE_DIR": str(state),
        "SMSGW_METRICS_PORT": "0",
        "SMSGW_TASK_INTERVAL": "1",
        **extra,
    }


def test_two_poller_processes_share_the_ledger_and_drain_on_sigterm(
    clean_broker: str, server: ReferenceServer, tmp_path: Path
) -> None:
    uuids = {server.queue_outgoing("+255700000001", f"m{i}", f"p-{i}") for i in range(20)}
    env = _env(clean_broker, server.url, tmp_path)
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "task_poller"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
        for _ in range(2)
    ]
    seen: list[str] = []
    try:

        def all_seen_and_repolled() -> bool:
            seen.extend(m.uuid for m in take_outbound(clean_broker))
            # Both replicas keep polling a server that re-offers everything (no ?task=sent without the API).
            return set(seen) == uuids and server.state()["counters"]["task_send_polls"] >= 8

        wait_for(all_seen_and_repolled, timeout=90, interval=0.2, what="20 uuids queued and several re-polls")
        started = time.monotonic()
        for p in procs:
            p.send_signal(signal.SIGTERM)
        codes = [p.wait(timeout=10) for p in procs]
        assert time.monotonic() - started < 5  # the idle wait is an Event, not a sleep
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(timeout=10)
    outputs = [p.stdout.read().decode() if p.stdout else "" for p in procs]
    assert codes == [0, 0], outputs
    seen.extend(m.uuid for m in take_outbound(clean_broker))
    assert sorted(seen) == sorted(uuids)  # each exactly once
    assert all(SECRET not in out for out in outputs)


def test_cli_help_and_check(clean_broker: str, tmp_path: Path) -> None:
    help_text = subprocess.run(
        [sys.executable, "-m", "task_poller", "--help"], capture_output=True, text=True, check=True
    ).stdout
    for name in (
        "SMSGW_TASK_INTERVAL",
        "SMSGW_MESSAGE_RESULTS",
        "SMSGW_STATE_DIR",
        "SMSGW_SECRET",
        "SMSGW_CONFIG",
        "SMSGW_LEDGER_URL",
    ):
        assert name in help_text
    env = _env(clean_broker, "", tmp_path)
    missing = subprocess.run(
        [sys.executable, "-m", "task_poller", "--check"],
        check=False,
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert missing.returncode == 2 and "SMSGW_SYNC_URL" in missing.stderr, "a health check must fail unconfigured"
    env["SMSGW_SYNC_URL"] = "http://127.0.0.1:9/smssync"
    env["SMSGW_HEARTBEAT_DIR"] = str(tmp_path / "heartbeat")
    done = subprocess.run(
        [sys.executable, "-m", "task_poller", "--check"],
        check=False,
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 1 and "task_poller is not running here" in done.stderr, done.stderr  # config fine
    bad = subprocess.run(
        [sys.executable, "-m", "task_poller"],
        check=False,
        env={**env, "SMSGW_TASK_INTERVAL": "zero"},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert bad.returncode == 2 and "SMSGW_TASK_INTERVAL" in bad.stderr
    off = subprocess.run(
        [sys.executable, "-m", "task_poller", "--check"],
        check=False,
        env={**env, "SMSGW_TASKS": "false"},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert off.returncode == 2 and "SMSGW_TASKS" in off.stderr and len(off.stderr.splitlines()) == 1


# --- regressions: ?task=sent without a usable answer, unexpected errors, live claims ------------------------


def _task_reply(messages: list[dict[str, str]], secret: str = SECRET) -> str:
    return json.dumps({"payload": {"task": "send", "secret": secret, "messages": messages}})


def test_sent_answered_too_late_is_retried_and_queued_not_lost(
    clean_broker: str, publisher: PublisherThread, tmp_path: Path
) -> None:
    """The server processes ?task=sent (drops the uuids from its outbox) but answers after our time-out: the
    claims must stay, ?task=sent is retried on the next poll and the echoed uuids are queued — exactly once."""
    outbox = {u: {"to": "+255700000009", "message": f"text {u}", "uuid": u} for u in ("late-1", "late-2")}
    acknowledged: set[str] = set()
    may_answer = threading.Event()
    sent_posts: list[list[str]] = []

    def respond(request: Request) -> tuple[int, str]:
        if request.query.get("task") == "send":
            return 200, _task_reply(list(outbox.values()))
        uuids = json.loads(request.body)["queued_messages"]
        sent_posts.append(uuids)
        for uuid in uuids:  # what the docs tell servers to do
            outbox.pop(uuid, None)
            acknowledged.add(uuid)
        if len(sent_posts) == 1:
            may_answer.wait(timeout=30)  # answers only after the poller gave up on it
        return 200, json.dumps({"message_uuids": [u for u in uuids if u in acknowledged]})

    stub = HttpStub(respond).start()
    try:
        poller = make_poller(stub.url, publisher, tmp_path, SMSGW_MESSAGE_RESULTS="true", SMSGW_HTTP_TIMEOUT="0.5")
        with pytest.raises(PollError, match=r"Timeout.*2 claim.*kept") as failed:
            poller.poll_once()
        assert failed.value.outcome == "network_error"
        may_answer.set()
        ledger = ledger_of(tmp_path)
        assert {ledger.claim_state(u) for u in ("late-1", "late-2")} == {"accepted"}
        assert take_outbound(clean_broker) == []
        assert outbox == {}  # the server will never offer them again

        second = poller.poll_once()  # retries ?task=sent first, then polls (nothing offered any more)
        assert second.queued == 2
        assert sent_posts == [["late-1", "late-2"], ["late-1", "late-2"]]
        assert sorted(m.uuid for m in take_outbound(clean_broker)) == ["late-1", "late-2"]
        assert {ledger.claim_state(u) for u in ("late-1", "late-2")} == {"queued"}

        assert poller.poll_once().queued == 0  # nothing left to retry: no third ?task=sent
        assert len(sent_posts) == 2
        poller.stale_claim_s = 0
        assert poller.republish_orphans() == 0
        assert take_outbound(clean_broker) == []
    finally:
        may_answer.set()
        stub.stop()


@pytest.mark.parametrize(
    ("status", "body", "kept"),
    [
        (200, "<b>Warning</b>: database went away", True),  # unreadable: may have been processed
        (500, "Internal Server Error", True),  # may have failed after committing
        (200, "", True),
        (403, '{"payload":{"success":false}}', False),  # refused before any work: released as before
        (404, "not found", False),
        (429, "slow down", True),  # "later", not a refusal
    ],
)
def test_sent_without_usable_answer_keeps_claims_for_the_orphan_republish(
    clean_broker: str, publisher: PublisherThread, tmp_path: Path, status: int, body: str, kept: bool
) -> None:
    messages = [{"to": "+255700000010", "message": "hello", "uuid": "keep-1"}]

    def respond(request: Request) -> tuple[int, str]:
        if request.query.get("task") == "send":
            return 200, _task_reply(messages)  # keeps offering it
        return status, body

    stub = HttpStub(respond).start()
    try:
        poller = make_poller(stub.url, publisher, tmp_path, SMSGW_MESSAGE_RESULTS="true")
        with pytest.raises(PollError):
            poller.poll_once()
        state = ledger_of(tmp_path).claim_state("keep-1")
        if not kept:
            assert state is None
            return
        assert state == "accepted"
        # Still no usable answer on the retry: the claim stays, nothing is queued yet.
        with pytest.raises(PollError, match="kept"):
            poller.poll_once()
        assert take_outbound(clean_broker) == []
        # After stale_claim_s the orphan mechanism sends it (sending beats losing it) — once.
        poller.stale_claim_s = 0
        assert poller.republish_orphans() == 1
        assert [m.uuid for m in take_outbound(clean_broker)] == ["keep-1"]
        posts_before = sum(r.method == "POST" for r in stub.requests)
        for _ in range(RECONFIRM_TRIES + 2):  # the re-offer is a duplicate; ?task=sent is tried again, bounded
            again = poller.poll_once()
            assert (again.queued, again.duplicates) == (0, 1)
        assert sum(r.method == "POST" for r in stub.requests) == posts_before + RECONFIRM_TRIES
        assert take_outbound(clean_broker) == []
    finally:
        stub.stop()


def test_a_message_offered_again_after_its_poller_died_before_task_sent_is_confirmed_once_queued(
    clean_broker: str, publisher: PublisherThread, server: ReferenceServer, tmp_path: Path
) -> None:
    """A poller SIGKILLed between its claim and ?task=sent (chaos short form, seed 23): the orphan republish sends
    the SMS, but the server, never told, kept it pending, offered it forever and never asked for its result."""
    uuid = server.queue_outgoing("+255700000013", "left pending", "pending-1")
    ledger = ledger_of(tmp_path)
    assert ledger.claim(uuid, "+255700000013", "left pending", "default")  # the killed poller's claim
    poller = make_poller(server.url, publisher, tmp_path, ledger=ledger, SMSGW_MESSAGE_RESULTS="true")
    first = poller.poll_once()
    assert (first.queued, first.duplicates) == (0, 1)
    assert server.outgoing()[0]["status"] == "pending", "an accepted claim may still be released: not confirmed"
    poller.stale_claim_s = 0
    assert poller.republish_orphans() == 1
    assert [m.uuid for m in take_outbound(clean_broker)] == [uuid]
    posts = server.state()["counters"]["task_sent_posts"]
    assert poller.poll_once().duplicates == 1
    assert server.outgoing()[0]["status"] == "queued", "told the server: it now asks for the result"
    assert server.state()["counters"]["task_sent_posts"] == posts + 1
    assert poller.poll_once().offered == 0, "no longer offered"
    assert take_outbound(clean_broker) == [], "and not sent again"


def test_a_refusal_of_a_retried_task_sent_keeps_the_claim(
    clean_broker: str, publisher: PublisherThread, tmp_path: Path
) -> None:
    # The first ?task=sent got no usable answer, so the server may have taken the uuid out of its outbox: a
    # 403 on the retry must not release it (nobody would offer it again: lost).
    answers = iter([(500, "Internal Server Error"), (403, '{"payload":{"success":false}}')])

    def respond(request: Request) -> tuple[int, str]:
        if request.query.get("task") == "send":
            return 200, _task_reply([{"to": "+255700000010", "message": "hello", "uuid": "retried-1"}])
        return next(answers, (403, "{}"))

    stub = HttpStub(respond).start()
    try:
        poller = make_poller(stub.url, publisher, tmp_path, SMSGW_MESSAGE_RESULTS="true")
        for _ in range(2):
            with pytest.raises(PollError):
                poller.poll_once()
        assert ledger_of(tmp_path).claim_state("retried-1") == "accepted"
        poller.stale_claim_s = 0
        assert poller.republish_orphans() == 1
        assert [m.uuid for m in take_outbound(clean_broker)] == ["retried-1"]
    finally:
        stub.stop()


def _run_in_thread(poller: TaskPoller) -> tuple[threading.Thread, threading.Event, list[BaseException]]:
    stop = threading.Event()
    died: list[BaseException] = []

    def target() -> None:
        try:
            poller.run(stop)
        except BaseException as exc:  # the regression: run() used to die here
            died.append(exc)
            raise

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread, stop, died


@pytest.mark.parametrize(
    "body",
    [
        '{"payload":{"task":"send","secret":"s3cret","messages":[{"to":"+1555","message":"hi \\ud83d",'
        '"uuid":"sur-1"}]}}',
        '{"payload":{"task":"send","secret":"s3cret\\udc00","messages":[{"to":"+1555","message":"hi",'
        '"uuid":"sur-2"}]}}',
        '{"payload":{"task":"send","secret":"s3cret","messages":[{"to":"+1555","message":"hi","uuid":"sur-\\ud800"}]}}',
        '{"payload":' + "[" * 100_000 + "]" * 100_000 + "}",
    ],
    ids=["surrogate-text", "surrogate-secret", "surrogate-uuid", "deep-nesting"],
)
def test_run_survives_pathological_replies_and_keeps_polling(
    clean_broker: str, publisher: PublisherThread, tmp_path: Path, body: str
) -> None:
    stub = HttpStub(lambda r: (200, body)).start()
    poller = make_poller(stub.url, publisher, tmp_path, interval=0.05)
    thread, stop, died = _run_in_thread(poller)
    try:
        wait_for(lambda: len(stub.requests) >= 4 or died, timeout=15, what="four polls by one run() loop")
        assert not died and thread.is_alive()
    finally:
        stop.set()
        thread.join(timeout=10)
        stub.stop()
    assert not thread.is_alive() and not died
    assert take_outbound(clean_broker) == []


def test_unexpected_error_logs_traceback_once_backs_off_and_recovers(
    clean_broker: str,
    publisher: PublisherThread,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from services.sync_protocol import parse_payload as real_parse
    from task_poller import poller as poller_module

    broken = threading.Event()
    broken.set()

    def parse(text: str) -> object:
        if broken.is_set():
            raise RuntimeError("a bug nobody anticipated")
        return real_parse(text)

    monkeypatch.setattr(poller_module, "parse_payload", parse)
    stub = HttpStub(lambda r: (200, _task_reply([]))).start()
    poller = make_poller(stub.url, publisher, tmp_path, interval=0.05)
    with caplog.at_level(logging.INFO, logger="task_poller.poller"):
        thread, stop, died = _run_in_thread(poller)
        try:
            wait_for(lambda: len(stub.requests) >= 4 or died, timeout=15, what="four failing polls")
            failing = len(stub.requests)
            broken.clear()
            wait_for(
                lambda: any("works again" in r.getMessage() for r in caplog.records) or died,
                timeout=15,
                what="the loop to recover",
            )
        finally:
            stop.set()
            thread.join(timeout=10)
            stub.stop()
    assert not died and not thread.is_alive()
    crashes = [r for r in caplog.records if "failed unexpectedly" in r.getMessage()]
    assert len(crashes) >= failing - 1 >= 3
    assert all(
        r.levelno == logging.ERROR and "RuntimeError: a bug nobody anticipated" in r.getMessage() for r in crashes
    )
    assert [bool(r.exc_info) for r in crashes] == [True] + [False] * (len(crashes) - 1)  # traceback once
    # Backed off like any failed poll: 0.1, 0.2, 0.4 ... not a busy loop.
    gaps = [b.created - a.created for a, b in itertools.pairwise(crashes)]
    assert all(later > earlier for earlier, later in itertools.pairwise(gaps))


class _ReplicaRacesEachPublish(StubPublisher):
    """Before each publish of the live poller, a replica on the same ledger runs its orphan republish."""

    def __init__(self, replica: TaskPoller) -> None:
        super().__init__()
        self.replica = replica
        self.republished: list[int] = []

    def publish(self, publication: broker.Publication, timeout: float = 45.0) -> None:
        self.republished.append(self.replica.republish_orphans())
        super().publish(publication, timeout)


def _uuids(publisher: StubPublisher) -> list[str]:
    """The uuids of the OutboundSms ``publisher`` was given, in publish order."""
    return [OutboundSms.from_json(p.body).uuid for p in publisher.published]


def test_live_claims_are_touched_before_each_publish_so_no_replica_republishes_them(tmp_path: Path) -> None:
    messages = [{"to": "+255700000011", "message": f"live {i}", "uuid": f"live-{i}"} for i in range(3)]

    def respond(request: Request) -> tuple[int, str]:
        if request.query.get("task") == "send":
            return 200, _task_reply(messages)
        # A slow ?task=sent: when it answers, the claims are older than the replica's stale_claim_s below.
        time.sleep(1.5)
        return 200, json.dumps({"message_uuids": json.loads(request.body)["queued_messages"]})

    stub = HttpStub(respond).start()
    replica_publisher = StubPublisher()
    try:
        replica = make_poller(stub.url, replica_publisher, tmp_path)
        replica.stale_claim_s = 1.0
        racing = _ReplicaRacesEachPublish(replica)
        live = make_poller(stub.url, racing, tmp_path, SMSGW_MESSAGE_RESULTS="true")
        assert live.poll_once().queued == 3
    finally:
        stub.stop()
    assert racing.republished == [0, 0, 0]
    assert _uuids(racing) == ["live-0", "live-1", "live-2"] and replica_publisher.published == []  # each once


def test_claim_republished_meanwhile_is_not_queued_again(server: ReferenceServer, tmp_path: Path) -> None:
    for i in range(2):
        server.queue_outgoing("+255700000012", f"taken {i}", f"taken-{i}")
    ledger = ledger_of(tmp_path)

    class TakeOverSecond(StubPublisher):
        def publish(self, publication: broker.Publication, timeout: float = 45.0) -> None:
            # A replica republished the second claim while this poll published the first.
            ledger.mark_queued("taken-1")
            super().publish(publication, timeout)

    publisher = TakeOverSecond()
    poller = make_poller(server.url, publisher, tmp_path, ledger=ledger)
    assert poller.poll_once().queued == 1
    assert _uuids(publisher) == ["taken-0"]


def test_a_broker_outage_keeps_the_claims_and_the_next_cycle_republishes_them(
    server: ReferenceServer, tmp_path: Path
) -> None:
    server.queue_outgoing("+255700000013", "during an outage", "out-1")
    publisher = StubPublisher()
    publisher.fail_with = BrokerUnavailable("connection refused")
    poller = make_poller(server.url, publisher, tmp_path, SMSGW_MESSAGE_RESULTS="true")
    with pytest.raises(PollError, match="broker did not confirm task message out-1") as failed:
        poller.poll_once()
    assert failed.value.outcome == "broker_error"
    assert publisher.published == []
    ledger = ledger_of(tmp_path)
    assert ledger.claim_state("out-1") == "accepted"  # claimed and confirmed, never queued: an orphan
    publisher.fail_with = None
    poller.stale_claim_s = 0.0
    assert poller.republish_orphans() == 1
    assert _uuids(publisher) == ["out-1"]
    assert ledger.claim_state("out-1") == "queued"
    assert poller.poll_once().queued == 0  # the server no longer offers it: nothing twice


# --- the fleet: several endpoints, routes, per-endpoint keys ------------------------------------------------


def _toml_endpoint(name: str, url: str, secret: str, **options: object) -> str:
    lines = ["[[endpoints]]", f'name = "{name}"', f'sync_url = "{url}"', f'secret = "{secret}"']
    lines += [f"{key} = {json.dumps(value)}" for key, value in options.items()]
    return "\n".join(lines) + "\n"


def test_one_process_polls_two_endpoints_and_queues_each_message_once_with_its_endpoint(
    clean_broker: str, tmp_path: Path
) -> None:
    with ReferenceServer("alpha-secret") as alpha, ReferenceServer("beta-secret") as beta:
        # Both servers number their messages from the same space: "same-1" is two different SMS.
        expected = {
            ("alpha", alpha.queue_outgoing("+255700000021", "from alpha", "same-1")),
            ("alpha", alpha.queue_outgoing("+255700000022", "alpha only", "a-1")),
            ("beta", beta.queue_outgoing("+255700000023", "from beta", "same-1")),
            ("beta", beta.queue_outgoing("+255700000024", "beta only", "b-1")),
        }
        config = tmp_path / "fleet.toml"
        config.write_text(
            _toml_endpoint("alpha", alpha.url, "alpha-secret", task_interval=1, message_results=True, inbound=False)
            + _toml_endpoint("beta", beta.url, "beta-secret", task_interval=1, inbound=False)
        )
        env = {
            **os.environ,
            "SMSGW_AMQP_URL": clean_broker,
            "SMSGW_CONFIG": str(config),
            "SMSGW_STATE_DIR": str(tmp_path / "state"),
            "SMSGW_METRICS_PORT": "0",
        }
        proc = subprocess.Popen(
            [sys.executable, "-m", "task_poller"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
        seen: list[OutboundSms] = []
        try:

            def all_seen_and_beta_repolled() -> bool:
                seen.extend(take_outbound(clean_broker))
                # beta (no Message Results API) keeps offering everything: re-polls must not queue again.
                return len(seen) >= 4 and beta.state()["counters"]["task_send_polls"] >= 4

            wait_for(all_seen_and_beta_repolled, timeout=30, interval=0.2, what="4 messages and beta re-polled")
            proc.send_signal(signal.SIGTERM)
            code = proc.wait(timeout=15)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=10)
        output = proc.stdout.read().decode() if proc.stdout else ""
        assert code == 0, output
        seen.extend(take_outbound(clean_broker))
        assert sorted((m.endpoint, m.uuid) for m in seen) == sorted(expected)  # each exactly once
        by_endpoint = {(m.endpoint, m.uuid): m for m in seen}
        assert by_endpoint["alpha", "same-1"].text == "from alpha"
        assert by_endpoint["beta", "same-1"].text == "from beta"
        assert {m.ledger_key for m in seen} == {"alpha/same-1", "alpha/a-1", "beta/same-1", "beta/b-1"}
        # Events only for the endpoint with the Message Results API on.
        assert {m.endpoint: m.report for m in seen} == {"alpha": True, "beta": False}
        assert {o["uuid"]: o["status"] for o in alpha.outgoing()} == {"same-1": "queued", "a-1": "queued"}
        assert "alpha-secret" not in output and "beta-secret" not in output
    ledger = ledger_of(tmp_path / "state")
    assert {ledger.claim_state(k) for k in ("alpha/same-1", "beta/same-1", "alpha/a-1", "beta/b-1")} == {"queued"}


ROUTED_MODEMS = ("tp-m1", "tp-m2", "tp-m3")


def test_prefix_routes_pick_the_modem_queue_or_the_pool_queue(
    clean_broker: str, server: ReferenceServer, tmp_path: Path
) -> None:
    fleet = file_fleet(
        [{"name": "clinic", "sync_url": server.url, "secret": SECRET}],
        routes=[
            {"prefix": "+25573", "modems": ["tp-m1"]},
            {"prefix": "+25574", "modems": ["tp-m2", "tp-m3"]},
            {"prefix": "+2557", "modems": ["tp-m3"]},
        ],  # first match wins: not for +25573/+25574
        modems=ROUTED_MODEMS,
    )
    topology = Topology.of(fleet)
    one, pool = outbound_queue_for("tp-m1"), pool_queue_for(["tp-m2", "tp-m3"])
    for queue in (one, pool, outbound_queue_for("tp-m3")):
        take(clean_broker, queue, topology)  # leftovers of an earlier run
    server.queue_outgoing("+255730000001", "to m1", "r-1")
    server.queue_outgoing("+255740000001", "to the pool", "r-2")
    server.queue_outgoing("+255750000001", "to m3", "r-3")
    server.queue_outgoing("+255600000001", "anywhere", "r-4")
    publisher = PublisherThread(clean_broker, "test-routes", topology=topology)
    try:
        poller = poller_for(fleet.endpoint("clinic"), fleet, publisher, ledger_of(tmp_path))
        assert poller.poll_once().queued == 4
    finally:
        publisher.close()
    [to_m1] = take(clean_broker, one)
    [to_pool] = take(clean_broker, pool)
    [to_m3] = take(clean_broker, outbound_queue_for("tp-m3"))
    [anywhere] = take_outbound(clean_broker)
    assert (to_m1.uuid, to_m1.modems) == ("r-1", ["tp-m1"])
    assert (to_pool.uuid, to_pool.modems) == ("r-2", ["tp-m2", "tp-m3"])
    assert (to_m3.uuid, to_m3.modems) == ("r-3", ["tp-m3"])
    assert (anywhere.uuid, anywhere.modems) == ("r-4", [])
    assert {m.endpoint for m in (to_m1, to_pool, to_m3, anywhere)} == {"clinic"}
    assert {m.ledger_key for m in (to_m1, to_pool, to_m3, anywhere)} == {
        "clinic/r-1",
        "clinic/r-2",
        "clinic/r-3",
        "clinic/r-4",
    }


def test_orphans_are_republished_by_their_endpoint_routed_again_and_strays_adopted(
    clean_broker: str, server: ReferenceServer, tmp_path: Path
) -> None:
    fleet = file_fleet(
        [
            {"name": "clinic", "sync_url": server.url, "secret": SECRET, "message_results": True},
            {"name": "helpline", "sync_url": server.url, "secret": SECRET},
        ],
        routes=[{"prefix": "+25573", "modems": ["tp-m1"]}],
        modems=ROUTED_MODEMS,
    )
    topology = Topology.of(fleet)
    take(clean_broker, outbound_queue_for("tp-m1"), topology)
    ledger = ledger_of(tmp_path)
    # Pollers died right after these claims: one of each endpoint, one of an endpoint no longer configured.
    assert ledger.claim("clinic/o-1", "+255730000009", "routed orphan", "clinic")
    assert ledger.claim("helpline/o-2", "+255600000009", "helpline orphan", "helpline")
    assert ledger.claim("gone/o-3", "+255600000008", "stray orphan", "gone")
    publisher = PublisherThread(clean_broker, "test-orphans", topology=topology)
    try:
        clinic = poller_for(fleet.endpoint("clinic"), fleet, publisher, ledger, adopt_strays=True)
        helpline = poller_for(fleet.endpoint("helpline"), fleet, publisher, ledger)
        clinic.stale_claim_s = helpline.stale_claim_s = 0
        assert helpline.republish_orphans() == 1  # its own only
        assert clinic.republish_orphans() == 2  # its own and the stray
        assert clinic.republish_orphans() == helpline.republish_orphans() == 0
    finally:
        publisher.close()
    [routed] = take(clean_broker, outbound_queue_for("tp-m1"))
    assert (routed.uuid, routed.endpoint, routed.modems, routed.report, routed.ledger_key) == (
        "o-1",
        "clinic",
        ["tp-m1"],
        True,
        "clinic/o-1",
    )
    shared = {m.uuid: m for m in take_outbound(clean_broker)}
    assert (shared["o-2"].endpoint, shared["o-2"].report, shared["o-2"].ledger_key) == (
        "helpline",
        False,
        "helpline/o-2",
    )
    # A removed endpoint has no events queue: sent, but not reported.
    assert (shared["o-3"].endpoint, shared["o-3"].report, shared["o-3"].ledger_key) == ("gone", False, "gone/o-3")
    assert {ledger.claim_state(k) for k in ("clinic/o-1", "helpline/o-2", "gone/o-3")} == {"queued"}


def test_a_hanging_server_does_not_delay_another_endpoints_polls(clean_broker: str, tmp_path: Path) -> None:
    release = threading.Event()

    def hang(request: Request) -> tuple[int, str]:
        release.wait(timeout=30)  # far longer than its http_timeout
        return 200, _task_reply([])

    slow_stub = HttpStub(hang).start()
    fast_stub = HttpStub(lambda r: (200, _task_reply([]))).start()
    fleet = file_fleet(
        [
            {"name": "slow", "sync_url": slow_stub.url, "secret": SECRET, "http_timeout": 4},
            {"name": "fast", "sync_url": fast_stub.url, "secret": SECRET},
        ]
    )
    ledger = ledger_of(tmp_path)
    publisher = PublisherThread(clean_broker, "test-hang", topology=Topology.of(fleet))
    pollers = [poller_for(dataclasses.replace(e, task_interval=0.2), fleet, publisher, ledger) for e in fleet.endpoints]
    group = PollerGroup(pollers, ledger, retention_s=90 * 86400)
    stop = threading.Event()
    runner = threading.Thread(target=group.run, args=(stop,), daemon=True)
    try:
        runner.start()
        wait_for(lambda: slow_stub.requests, timeout=10, what="the slow endpoint's first poll")
        hung_at = time.monotonic()
        wait_for(lambda: len(fast_stub.requests) >= 5, timeout=10, what="five polls of the fast endpoint")
        # All while the slow endpoint's first poll was still waiting for its answer.
        assert time.monotonic() - hung_at < 3.5
        assert len(slow_stub.requests) == 1
    finally:
        stop.set()
        release.set()
        runner.join(timeout=15)
        group.close()
        publisher.close()
        slow_stub.stop()
        fast_stub.stop()
    assert not runner.is_alive()  # drained: the poll in progress finished, then every thread stopped


def test_claims_past_the_retention_are_pruned_at_start(tmp_path: Path) -> None:
    ledger = ledger_of(tmp_path)
    assert ledger.claim("old-1", "+255700000031", "old", "default")
    ledger.mark_queued("old-1")
    assert ledger.claim("live-1", "+255700000032", "publishing", "default")  # accepted: never pruned
    # retention -1 s: every queued claim is "old".
    group = PollerGroup([], ledger, retention_s=-1, prune_interval_s=3600)
    stop = threading.Event()
    runner = threading.Thread(target=group.run, args=(stop,), daemon=True)
    runner.start()
    try:
        wait_for(lambda: ledger.claim_state("old-1") is None, timeout=10, what="the first prune")
    finally:
        stop.set()
        runner.join(timeout=10)
    assert not runner.is_alive()
    assert ledger.claim_state("live-1") == "accepted"


def test_metrics_of_every_endpoint_and_outcome_start_at_zero() -> None:
    init_metrics("metrics-ep")
    for outcome in ("ok", "empty", "network_error", "http_error", "ledger_error", "internal_error"):
        assert REGISTRY.get_sample_value("smsgw_task_polls_total", {"endpoint": "metrics-ep", "outcome": outcome}) == 0
    for outcome in ("queued", "duplicate", "invalid", "not_confirmed"):
        assert (
            REGISTRY.get_sample_value("smsgw_task_messages_total", {"endpoint": "metrics-ep", "outcome": outcome}) == 0
        )
    assert REGISTRY.get_sample_value("smsgw_task_republished_total", {"endpoint": "metrics-ep"}) == 0
    for reason in ("sent_refused", "send_timeout"):
        assert REGISTRY.get_sample_value("smsgw_task_released_total", {"endpoint": "metrics-ep", "reason": reason}) == 0
    assert (
        REGISTRY.get_sample_value("smsgw_http_request_seconds_count", {"endpoint": "metrics-ep", "task": "sent"}) == 0
    )


def test_config_without_a_task_endpoint_stops_with_one_line(clean_broker: str, tmp_path: Path) -> None:
    config = tmp_path / "fleet.toml"
    config.write_text(_toml_endpoint("inbound-only", "http://127.0.0.1:9/smssync", SECRET, tasks=False))
    env = {
        **os.environ,
        "SMSGW_AMQP_URL": clean_broker,
        "SMSGW_CONFIG": str(config),
        "SMSGW_STATE_DIR": str(tmp_path),
        "SMSGW_METRICS_PORT": "0",
    }
    done = subprocess.run(
        [sys.executable, "-m", "task_poller", "--check"],
        check=False,
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 2
    assert len(done.stderr.splitlines()) == 1 and str(config) in done.stderr and "tasks" in done.stderr


# --- issue 8: one line per distinct problem, servers that differ ------------------------------------------------


def test_the_same_invalid_task_message_is_logged_once_not_on_every_poll(
    clean_broker: str, publisher: PublisherThread, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    offers = iter(
        [
            [{"to": "", "message": "x", "uuid": "bad-1"}],
            [{"to": "+255700000011", "message": "ok", "uuid": "good-1"}, {"to": "", "message": "x", "uuid": "bad-1"}],
            [{"to": "", "message": "x", "uuid": "bad-1"}, {"to": "+2557", "message": "y"}],
        ]
    )
    stub = HttpStub(lambda r: (200, _task_reply(next(offers)))).start()
    before = REGISTRY.get_sample_value("smsgw_task_messages_total", {"endpoint": "default", "outcome": "invalid"})
    try:
        poller = make_poller(stub.url, publisher, tmp_path)
        with caplog.at_level(logging.WARNING, logger="task_poller.poller"):
            for _ in range(3):  # bad-1 on every poll, at another position in the second one
                poller.poll_once()
    finally:
        stub.stop()
    lines = [r.getMessage() for r in caplog.records if "invalid task message" in r.getMessage()]
    assert len(lines) == 2, lines  # bad-1 once, the message without a uuid once
    assert "'to' is missing" in lines[0] and "'uuid' is missing" in lines[1]
    after = REGISTRY.get_sample_value("smsgw_task_messages_total", {"endpoint": "default", "outcome": "invalid"})
    assert after == (before or 0) + 4  # still counted on every poll


@pytest.mark.parametrize("status", [403, 404, 405])
def test_a_refused_task_sent_counts_the_released_messages_and_names_both_causes(
    clean_broker: str, publisher: PublisherThread, tmp_path: Path, status: int, caplog: pytest.LogCaptureFixture
) -> None:
    def respond(request: Request) -> tuple[int, str]:
        if request.query.get("task") == "send":
            return 200, _task_reply([{"to": "+255700000012", "message": "hi", "uuid": f"rel-{status}"}])
        return status, "<html><head><title>Method Not Allowed</title><style>p{}</style></head></html>"

    init_metrics("default")
    labels = {"endpoint": "default", "reason": "sent_refused"}
    released = REGISTRY.get_sample_value("smsgw_task_released_total", labels)
    assert released is not None  # the series exists from start-up
    stub = HttpStub(respond).start()
    try:
        poller = make_poller(stub.url, publisher, tmp_path, SMSGW_MESSAGE_RESULTS="true")
        with pytest.raises(PollError) as raised, caplog.at_level(logging.WARNING, logger="task_poller.poller"):
            poller.poll_once()
    finally:
        stub.stop()
    # The operator's list of what to queue again at the server: one line naming the uuids.
    [line] = [r.getMessage() for r in caplog.records if "released unsent" in r.getMessage()]
    assert f"HTTP {status}" in line and f"task message(s) rel-{status} released unsent" in line
    assert "queue them again" in line
    message = str(raised.value)
    assert f"HTTP {status}" in message and "Method Not Allowed" in message and "<style" not in message
    assert "1 task message(s) released unsent" in message
    assert "secret" in message and "SMSGW_MESSAGE_RESULTS=false" in message
    assert REGISTRY.get_sample_value("smsgw_task_released_total", labels) == released + 1
    assert ledger_of(tmp_path).claim_state(f"rel-{status}") is None


def test_a_file_endpoint_is_told_its_own_message_results_key(
    clean_broker: str, publisher: PublisherThread, tmp_path: Path
) -> None:
    def respond(request: Request) -> tuple[int, str]:
        if request.query.get("task") == "send":
            return 200, _task_reply([{"to": "+255700000013", "message": "hi", "uuid": "kept-500"}])
        return 500, "<!DOCTYPE html><html><head><title>UnicodeEncodeError</title></head><body>…</body></html>"

    stub = HttpStub(respond).start()
    try:
        fleet = file_fleet([{"name": "php", "sync_url": stub.url, "secret": SECRET, "message_results": True}])
        poller = poller_for(fleet.endpoints[0], fleet, publisher, ledger_of(tmp_path))
        with pytest.raises(PollError) as raised:
            poller.poll_once()
    finally:
        stub.stop()
    message = str(raised.value)
    assert "UnicodeEncodeError" in message and "claim(s) kept" in message
    assert "message_results = false for endpoint 'php'" in message
    assert ledger_of(tmp_path).claim_state(task_ledger_key("php", "kept-500")) == "accepted"


# --- issue 13: protocol edges that lost or wasted -------------------------------------------------------------


def take_events(url: str) -> list[SentEvent]:
    """Every message of the default endpoint's events queue right now (consumed; declared first)."""
    connection = pika.BlockingConnection(pika.URLParameters(url))
    events: list[SentEvent] = []
    try:
        channel = connection.channel()
        declare_topology(channel, Topology())
        while True:
            method, _props, body = channel.basic_get(EVENTS_QUEUE, auto_ack=True)
            if method is None:
                return events
            events.append(SentEvent.from_json(body))
    finally:
        connection.close()


EMPTY_OFFER = [
    {"to": "+255700000020", "message": "", "uuid": "empty-1"},
    {"to": "+255700000021", "message": " \n\t", "uuid": "blank-1"},
    {"to": "+255700000022", "message": "real text", "uuid": "good-20"},
]


def test_an_empty_task_message_is_not_sent_named_once_and_reported_failed(
    clean_broker: str, publisher: PublisherThread, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    sent_posts: list[list[str]] = []

    def respond(request: Request) -> tuple[int, str]:
        if request.query.get("task") == "send":
            return 200, _task_reply(EMPTY_OFFER)  # offered on every poll
        sent_posts.append(json.loads(request.body)["queued_messages"])
        return 200, json.dumps({"message_uuids": sent_posts[-1]})

    assert take_events(clean_broker) == []  # declares the events queue
    stub = HttpStub(respond).start()
    try:
        poller = make_poller(stub.url, publisher, tmp_path, SMSGW_MESSAGE_RESULTS="true")
        with caplog.at_level(logging.WARNING, logger="task_poller.poller"):
            first, second = poller.poll_once(), poller.poll_once()
    finally:
        stub.stop()
    assert (first.queued, first.invalid, second.queued, second.invalid) == (1, 2, 0, 2)
    assert [m.uuid for m in take_outbound(clean_broker)] == ["good-20"], "no empty SMS queued"
    assert sent_posts == [["good-20"]]
    events = take_events(clean_broker)
    assert sorted((e.uuid, e.outcome) for e in events) == [("blank-1", "failed"), ("empty-1", "failed")]
    assert all("empty text" in e.detail for e in events), "reported once, not on every poll"
    lines = [r.getMessage() for r in caplog.records if "invalid task message" in r.getMessage()]
    assert len(lines) == 2
    assert "(uuid empty-1): 'message' is empty; reported failed through ?task=result" in lines[0]
    assert "(uuid blank-1)" in lines[1]


@pytest.mark.parametrize("case", ["results_off", "wrong_secret"])
def test_an_empty_task_message_is_reported_only_where_results_are_asked_for(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, case: str
) -> None:
    secret = "not-ours" if case == "wrong_secret" else SECRET
    stub = HttpStub(lambda _r: (200, _task_reply(EMPTY_OFFER[:1], secret=secret))).start()
    publisher = StubPublisher()
    try:
        results = "false" if case == "results_off" else "true"
        poller = make_poller(stub.url, publisher, tmp_path, SMSGW_MESSAGE_RESULTS=results)
        with caplog.at_level(logging.WARNING, logger="task_poller.poller"):
            assert poller.poll_once().invalid == 1
    finally:
        stub.stop()
    assert publisher.published == []
    [line] = [r.getMessage() for r in caplog.records if "invalid task message" in r.getMessage()]
    assert "(uuid empty-1): 'message' is empty" in line and "reported failed" not in line


def test_a_failed_result_the_broker_did_not_confirm_is_reported_on_the_next_poll(tmp_path: Path) -> None:
    stub = HttpStub(lambda _r: (200, _task_reply(EMPTY_OFFER[:1]))).start()
    publisher = StubPublisher()
    try:
        poller = make_poller(stub.url, publisher, tmp_path, SMSGW_MESSAGE_RESULTS="true")
        publisher.fail_with = BrokerUnavailable("broker down")
        with pytest.raises(PollError, match="failed result of task message empty-1") as raised:
            poller.poll_once()
        assert raised.value.outcome == "broker_error"
        publisher.fail_with = None
        poller.poll_once()
    finally:
        stub.stop()
    [event] = [SentEvent.from_json(p.body) for p in publisher.published]
    assert (event.uuid, event.outcome) == ("empty-1", "failed")


def released_by_time_out() -> float:
    labels = {"endpoint": "default", "reason": "send_timeout"}
    return REGISTRY.get_sample_value("smsgw_task_released_total", labels) or 0.0


def test_a_task_send_that_times_out_is_counted_as_a_possible_loss_with_one_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    init_metrics("default")
    before = released_by_time_out()
    hold = threading.Event()

    def respond(_request: Request) -> tuple[int, str]:
        hold.wait(timeout=30)  # the server hands its messages out, but its answer comes too late
        return 200, _task_reply(EMPTY_OFFER[2:])

    stub = HttpStub(respond).start()
    try:
        poller = make_poller(stub.url, StubPublisher(), tmp_path, SMSGW_HTTP_TIMEOUT="0.5")
        with pytest.raises(PollError) as raised, caplog.at_level(logging.WARNING, logger="task_poller.poller"):
            poller.poll_once()
    finally:
        hold.set()
        stub.stop()
    assert raised.value.outcome == "network_error"
    assert released_by_time_out() == before + 1
    [line] = [r.getMessage() for r in caplog.records if "?task=send got no answer in time" in r.getMessage()]
    assert "never offers them again" in line and 'reason="send_timeout"' in line


def test_a_task_send_that_never_connects_is_no_possible_loss(tmp_path: Path) -> None:
    before = released_by_time_out()
    poller = make_poller("http://127.0.0.1:9/smssync", StubPublisher(), tmp_path, SMSGW_HTTP_TIMEOUT="0.5")
    with pytest.raises(PollError, match="unreachable"):
        poller.poll_once()
    assert released_by_time_out() == before


def test_the_server_that_asks_learns_the_empty_task_message_failed(
    clean_broker: str, publisher: PublisherThread, tmp_path: Path
) -> None:
    """End to end: the poller skips the empty message, and the result reporter answers ?task=result for it."""
    results: list[dict[str, Any]] = []

    def respond(request: Request) -> tuple[int, str]:
        task = request.query.get("task")
        if task == "send":
            return 200, _task_reply(EMPTY_OFFER[:1])
        if task == "result" and request.method == "GET":  # a server that waits for every uuid it handed out
            return 200, json.dumps({"message_uuids": ["empty-1"]})
        results.extend(json.loads(request.body)["message_results"])
        return 200, '{"payload":{"success":true}}'

    take_events(clean_broker)  # declares the events queue
    stub = HttpStub(respond).start()
    fleet = env_fleet(stub.url, SMSGW_MESSAGE_RESULTS="true")
    consumer = BatchConsumer(clean_broker, EVENTS_QUEUE, publisher, name="test-empty-results", topology=Topology())
    consuming = threading.Thread(target=consumer.run, daemon=True)
    consuming.start()
    client = SyncClient(fleet.endpoints[0])
    try:
        assert make_poller(stub.url, publisher, tmp_path, SMSGW_MESSAGE_RESULTS="true").poll_once().invalid == 1
        reporter = ResultReporter(fleet.endpoints[0], consumer, client)
        wait_for(lambda: reporter.collect() >= 1, what="the failed event held")
        assert reporter.round().reported == 1
    finally:
        consumer.stop()
        consuming.join(timeout=10)
        client.close()
        stub.stop()
    [row] = results
    assert row["uuid"] == "empty-1" and row["sent_result_code"] != 0
    assert row["sent_result_message"] == "Failed to send SMS: the task message has an empty text; not sent"
    assert take_outbound(clean_broker) == []


def test_a_wrong_vhost_is_an_error_at_start_up_not_silence_until_a_message_comes(
    amqp_url: str, server: ReferenceServer, tmp_path: Path
) -> None:
    wrong = amqp_url.rsplit("/", 1)[0] + "/no-such-vhost-16"
    proc = subprocess.Popen(
        [sys.executable, "-m", "task_poller"],
        env=_env(wrong, server.url, tmp_path),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines: list[str] = []
    stdout = proc.stdout
    assert stdout is not None
    # A reader thread: readline() on the test's thread could block past wait_for's deadline.
    reader = threading.Thread(target=lambda: lines.extend(iter(stdout.readline, "")), daemon=True)
    reader.start()
    try:
        refusal = wait_for(
            lambda: [line for line in list(lines) if "ERROR" in line and "refused" in line],
            timeout=30,
            what="the vhost refusal at start-up",
        )
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        reader.join(timeout=10)
    assert "'no-such-vhost-16'" in refusal[0] and "SMSGW_AMQP_URL" in refusal[0]
    assert "task_poller: RabbitMQ" in refusal[0]  # the start-up check's line, not a publisher outage line
