"""task_poller against the real broker, the reference Sync server and protocol-quirk stubs on loopback."""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pika
import pytest

from reference_server.server import ReferenceServer
from services import broker
from services.broker import PublisherThread
from services.ledger import Ledger
from services.schemas import OutboundSms
from services.settings import Settings
from services.sync_protocol import USER_AGENT
from task_poller.poller import PollError, TaskPoller
from tests.conftest import wait_for
from tests.http_stub import HttpStub, Request

SECRET = "s3cret"


def take_outbound(url: str) -> list[OutboundSms]:
    """Everything on the shared outbound queue right now (consumed)."""
    connection = pika.BlockingConnection(pika.URLParameters(url))
    found: list[OutboundSms] = []
    try:
        channel = connection.channel()
        while True:
            method, _props, body = channel.basic_get(broker.OUTBOUND_QUEUE, auto_ack=True)
            if method is None:
                return found
            found.append(OutboundSms.from_json(body))
    finally:
        connection.close()


@pytest.fixture
def publisher(clean_broker: str) -> Iterator[PublisherThread]:
    p = PublisherThread(clean_broker, "test-task-poller")
    yield p
    p.close()


@pytest.fixture
def server() -> Iterator[ReferenceServer]:
    with ReferenceServer(SECRET) as s:
        yield s


def make_poller(amqp: str, sync_url: str, publisher: PublisherThread, state: Path, **env: str) -> TaskPoller:
    settings = Settings.from_env({
        "SMSGW_AMQP_URL": amqp, "SMSGW_SYNC_URL": sync_url, "SMSGW_SECRET": SECRET,
        "SMSGW_STATE_DIR": str(state), "SMSGW_HTTP_TIMEOUT": "5", **env,
    })
    return TaskPoller(settings, publisher, Ledger(state))


def test_message_results_flow_with_reference_server(clean_broker: str, publisher: PublisherThread,
                                                    server: ReferenceServer, tmp_path: Path) -> None:
    uuids = [server.queue_outgoing("+255700000001", f"hello {i}", f"u-{i}") for i in range(3)]
    poller = make_poller(clean_broker, server.url, publisher, tmp_path, SMSGW_MESSAGE_RESULTS="true")
    result = poller.poll_once()
    assert (result.offered, result.queued, result.duplicates) == (3, 3, 0)
    queued = take_outbound(clean_broker)
    assert sorted(m.uuid for m in queued) == uuids
    assert all(m.origin == "task" and m.report and m.to == "+255700000001" for m in queued)
    assert {o["uuid"]: o["status"] for o in server.outgoing()} == dict.fromkeys(uuids, "queued")
    ledger = Ledger(tmp_path)
    assert all(ledger.get(u).state == "queued" for u in uuids)  # type: ignore[union-attr]
    # The server no longer offers them; a second poll queues nothing.
    assert poller.poll_once().queued == 0
    assert take_outbound(clean_broker) == []


def test_without_message_results_each_uuid_is_queued_once(clean_broker: str, publisher: PublisherThread,
                                                          server: ReferenceServer, tmp_path: Path) -> None:
    server.queue_outgoing("+255700000001", "hi", "u-1")
    poller = make_poller(clean_broker, server.url, publisher, tmp_path)
    assert poller.poll_once().queued == 1
    # The server keeps offering it (it is never told): known to the ledger, skipped.
    second = poller.poll_once()
    assert (second.offered, second.queued, second.duplicates) == (1, 0, 1)
    assert [m.uuid for m in take_outbound(clean_broker)] == ["u-1"]
    assert server.state()["counters"]["task_sent_posts"] == 0


def test_quirky_server(clean_broker: str, publisher: PublisherThread, tmp_path: Path) -> None:
    """Seed-PHP style: two JSON docs back to back, string success; secret with & = space; URL with a query;
    Basic auth from the URL; ?task=sent answered with the queued_messages key and only one uuid echoed."""
    secret = "a&b= c"

    def respond(request: Request) -> tuple[int, str]:
        if request.method == "GET" and request.query.get("task") == "send":
            payload = {"payload": {"success": "true", "task": "send", "secret": secret, "messages": [
                {"to": "+81902", "message": "one", "uuid": "q-1"},
                {"to": "+81903", "message": "two", "uuid": "q-2"},
                {"to": None, "message": "bad", "uuid": "q-3"},
                {"to": "+81904", "message": "no uuid"},
            ]}}
            return 200, json.dumps(payload) + json.dumps({"message_uuids": ["q-1"]})
        if request.method == "POST" and request.query.get("task") == "sent":
            return 200, json.dumps({"queued_messages": ["q-1"]})
        return 404, ""

    stub = HttpStub(respond).start()
    try:
        url = stub.url.replace("http://", "http://user:p%40ss@") + "?x=1"
        settings = Settings.from_env({"SMSGW_AMQP_URL": clean_broker, "SMSGW_SYNC_URL": url, "SMSGW_SECRET": secret,
                                      "SMSGW_STATE_DIR": str(tmp_path), "SMSGW_MESSAGE_RESULTS": "true"})
        poller = TaskPoller(settings, publisher, Ledger(tmp_path))
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
    assert Ledger(tmp_path).get("q-2") is None


@pytest.mark.parametrize(
    ("payload", "why"),
    [
        ({"task": "send", "secret": "wrong", "messages": [{"to": "+1", "message": "m", "uuid": "w-1"}]},
         "does not match"),
        ({"task": "send", "messages": [{"to": "+1", "message": "m", "uuid": "w-1"}]}, "is missing"),
        ({"task": "alert", "secret": SECRET, "messages": [{"to": "+1", "message": "m", "uuid": "w-1"}]},
         "not 'send'"),
    ],
)
def test_untrusted_task_is_ignored_with_one_line(clean_broker: str, publisher: PublisherThread, tmp_path: Path,
                                                 caplog: pytest.LogCaptureFixture, payload: dict[str, object],
                                                 why: str) -> None:
    stub = HttpStub(lambda r: (200, json.dumps({"payload": payload}))).start()
    try:
        poller = make_poller(clean_broker, stub.url, publisher, tmp_path, SMSGW_MESSAGE_RESULTS="true")
        with caplog.at_level(logging.INFO, logger="task_poller.poller"):
            assert poller.poll_once().queued == 0
    finally:
        stub.stop()
    assert len(stub.requests) == 1  # no ?task=sent
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and "ignored" in lines[0] and why in lines[0]
    assert SECRET not in lines[0] and "wrong" not in lines[0]
    assert take_outbound(clean_broker) == []
    assert Ledger(tmp_path).known(["w-1"]) == set()


def test_http_403_backs_off_without_crashing(clean_broker: str, publisher: PublisherThread, tmp_path: Path,
                                             caplog: pytest.LogCaptureFixture) -> None:
    stub = HttpStub(lambda r: (403, '{"payload":{"success":false,"error":"bad secret"}}')).start()
    poller = make_poller(clean_broker, stub.url, publisher, tmp_path, SMSGW_TASK_INTERVAL="1")
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
    assert all("HTTP 403" in r.getMessage() for r in caplog.records)


def test_orphaned_claim_is_republished(clean_broker: str, publisher: PublisherThread, tmp_path: Path,
                                       server: ReferenceServer) -> None:
    ledger = Ledger(tmp_path)
    assert ledger.claim("orphan-1", "+255700000002", "left behind")  # a poller died right after this
    poller = make_poller(clean_broker, server.url, publisher, tmp_path)
    poller.stale_claim_s = 0
    assert poller.republish_orphans() == 1
    [message] = take_outbound(clean_broker)
    assert (message.uuid, message.to, message.text, message.origin) == ("orphan-1", "+255700000002", "left behind",
                                                                        "task")
    assert ledger.get("orphan-1").state == "queued"  # type: ignore[union-attr]
    assert poller.republish_orphans() == 0


def test_two_pollers_in_threads_never_queue_a_uuid_twice(clean_broker: str, server: ReferenceServer,
                                                        tmp_path: Path) -> None:
    uuids = [server.queue_outgoing("+255700000001", f"m{i}", f"r-{i}") for i in range(30)]
    publishers = [PublisherThread(clean_broker, f"test-replica-{i}") for i in range(2)]
    try:
        pollers = [make_poller(clean_broker, server.url, p, tmp_path) for p in publishers]
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
    return {**os.environ, "SMSGW_AMQP_URL": amqp, "SMSGW_SYNC_URL": sync_url, "SMSGW_SECRET": SECRET,
            "SMSGW_STATE_DIR": str(state), "SMSGW_METRICS_PORT": "0", "SMSGW_TASK_INTERVAL": "1", **extra}


def test_two_poller_processes_share_the_ledger_and_drain_on_sigterm(clean_broker: str, server: ReferenceServer,
                                                                   tmp_path: Path) -> None:
    uuids = {server.queue_outgoing("+255700000001", f"m{i}", f"p-{i}") for i in range(20)}
    env = _env(clean_broker, server.url, tmp_path)
    procs = [subprocess.Popen([sys.executable, "-m", "task_poller"], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT) for _ in range(2)]
    seen: list[str] = []
    try:
        def all_seen_and_repolled() -> bool:
            seen.extend(m.uuid for m in take_outbound(clean_broker))
            # Both replicas keep polling a server that re-offers everything (no ?task=sent without the API).
            return set(seen) == uuids and server.state()["counters"]["task_send_polls"] >= 8

        wait_for(all_seen_and_repolled, timeout=30, interval=0.2, what="20 uuids queued and several re-polls")
        started = time.monotonic()
        for p in procs:
            p.send_signal(signal.SIGTERM)
        codes = [p.wait(timeout=10) for p in procs]
        assert time.monotonic() - started < 5  # the idle wait is an Event, not a sleep
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    outputs = [p.stdout.read().decode() if p.stdout else "" for p in procs]
    assert codes == [0, 0], outputs
    seen.extend(m.uuid for m in take_outbound(clean_broker))
    assert sorted(seen) == sorted(uuids)  # each exactly once
    assert all(SECRET not in out for out in outputs)


def test_cli_help_and_check(clean_broker: str, tmp_path: Path) -> None:
    help_text = subprocess.run([sys.executable, "-m", "task_poller", "--help"], capture_output=True, text=True,
                               check=True).stdout
    for name in ("SMSGW_TASK_INTERVAL", "SMSGW_MESSAGE_RESULTS", "SMSGW_STATE_DIR", "SMSGW_SECRET"):
        assert name in help_text
    env = _env(clean_broker, "", tmp_path)
    missing = subprocess.run([sys.executable, "-m", "task_poller", "--check"], check=False, env=env,
                             capture_output=True, text=True, timeout=30)
    assert missing.returncode == 2 and "SMSGW_SYNC_URL" in missing.stderr, "a health check must fail unconfigured"
    env["SMSGW_SYNC_URL"] = "http://127.0.0.1:9/smssync"
    done = subprocess.run([sys.executable, "-m", "task_poller", "--check"], check=False, env=env,
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 0 and "ok" in done.stdout, done.stderr
    bad = subprocess.run([sys.executable, "-m", "task_poller"], check=False, env={**env, "SMSGW_TASK_INTERVAL": "zero"},
                         capture_output=True, text=True, timeout=30)
    assert bad.returncode == 2 and "SMSGW_TASK_INTERVAL" in bad.stderr


# --- regressions: ?task=sent without a usable answer, unexpected errors, live claims ------------------------


def _task_reply(messages: list[dict[str, str]], secret: str = SECRET) -> str:
    return json.dumps({"payload": {"task": "send", "secret": secret, "messages": messages}})


def test_sent_answered_too_late_is_retried_and_queued_not_lost(clean_broker: str, publisher: PublisherThread,
                                                               tmp_path: Path) -> None:
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
        poller = make_poller(clean_broker, stub.url, publisher, tmp_path, SMSGW_MESSAGE_RESULTS="true",
                             SMSGW_HTTP_TIMEOUT="0.5")
        with pytest.raises(PollError, match=r"ReadTimeout.*2 claim.*kept") as failed:
            poller.poll_once()
        assert failed.value.outcome == "network_error"
        may_answer.set()
        ledger = Ledger(tmp_path)
        assert {ledger.get(u).state for u in ("late-1", "late-2")} == {"accepted"}  # type: ignore[union-attr]
        assert take_outbound(clean_broker) == []
        assert outbox == {}  # the server will never offer them again

        second = poller.poll_once()  # retries ?task=sent first, then polls (nothing offered any more)
        assert second.queued == 2
        assert sent_posts == [["late-1", "late-2"], ["late-1", "late-2"]]
        assert sorted(m.uuid for m in take_outbound(clean_broker)) == ["late-1", "late-2"]
        assert {ledger.get(u).state for u in ("late-1", "late-2")} == {"queued"}  # type: ignore[union-attr]

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
        clean_broker: str, publisher: PublisherThread, tmp_path: Path, status: int, body: str, kept: bool) -> None:
    messages = [{"to": "+255700000010", "message": "hello", "uuid": "keep-1"}]

    def respond(request: Request) -> tuple[int, str]:
        if request.query.get("task") == "send":
            return 200, _task_reply(messages)  # keeps offering it
        return status, body

    stub = HttpStub(respond).start()
    try:
        poller = make_poller(clean_broker, stub.url, publisher, tmp_path, SMSGW_MESSAGE_RESULTS="true")
        with pytest.raises(PollError):
            poller.poll_once()
        entry = Ledger(tmp_path).get("keep-1")
        if not kept:
            assert entry is None
            return
        assert entry is not None and entry.state == "accepted"
        # Still no usable answer on the retry: the claim stays, nothing is queued yet.
        with pytest.raises(PollError, match="kept"):
            poller.poll_once()
        assert take_outbound(clean_broker) == []
        # After stale_claim_s the orphan mechanism sends it (sending beats losing it) — once.
        poller.stale_claim_s = 0
        assert poller.republish_orphans() == 1
        assert [m.uuid for m in take_outbound(clean_broker)] == ["keep-1"]
        posts_before = sum(r.method == "POST" for r in stub.requests)
        third = poller.poll_once()  # no retry any more (it is queued); the re-offer is a duplicate
        assert (third.queued, third.duplicates) == (0, 1)
        assert sum(r.method == "POST" for r in stub.requests) == posts_before
        assert take_outbound(clean_broker) == []
    finally:
        stub.stop()


def test_a_refusal_of_a_retried_task_sent_keeps_the_claim(
        clean_broker: str, publisher: PublisherThread, tmp_path: Path) -> None:
    # The first ?task=sent got no usable answer, so the server may have taken the uuid out of its outbox: a
    # 403 on the retry must not release it (nobody would offer it again: lost).
    answers = iter([(500, "Internal Server Error"), (403, '{"payload":{"success":false}}')])

    def respond(request: Request) -> tuple[int, str]:
        if request.query.get("task") == "send":
            return 200, _task_reply([{"to": "+255700000010", "message": "hello", "uuid": "retried-1"}])
        return next(answers, (403, "{}"))

    stub = HttpStub(respond).start()
    try:
        poller = make_poller(clean_broker, stub.url, publisher, tmp_path, SMSGW_MESSAGE_RESULTS="true")
        for _ in range(2):
            with pytest.raises(PollError):
                poller.poll_once()
        entry = Ledger(tmp_path).get("retried-1")
        assert entry is not None and entry.state == "accepted"
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
        '{"payload":{"task":"send","secret":"s3cret","messages":[{"to":"+1555","message":"hi",'
        '"uuid":"sur-\\ud800"}]}}',
        '{"payload":' + "[" * 100_000 + "]" * 100_000 + "}",
    ],
    ids=["surrogate-text", "surrogate-secret", "surrogate-uuid", "deep-nesting"],
)
def test_run_survives_pathological_replies_and_keeps_polling(clean_broker: str, publisher: PublisherThread,
                                                             tmp_path: Path, body: str) -> None:
    stub = HttpStub(lambda r: (200, body)).start()
    poller = make_poller(clean_broker, stub.url, publisher, tmp_path)
    poller._settings = dataclasses.replace(poller._settings, task_interval=0.05)
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
        clean_broker: str, publisher: PublisherThread, tmp_path: Path, caplog: pytest.LogCaptureFixture,
        monkeypatch: pytest.MonkeyPatch) -> None:
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
    poller = make_poller(clean_broker, stub.url, publisher, tmp_path)
    poller._settings = dataclasses.replace(poller._settings, task_interval=0.05)
    with caplog.at_level(logging.INFO, logger="task_poller.poller"):
        thread, stop, died = _run_in_thread(poller)
        try:
            wait_for(lambda: len(stub.requests) >= 4 or died, timeout=15, what="four failing polls")
            failing = len(stub.requests)
            broken.clear()
            wait_for(lambda: any("works again" in r.getMessage() for r in caplog.records) or died, timeout=15,
                     what="the loop to recover")
        finally:
            stop.set()
            thread.join(timeout=10)
            stub.stop()
    assert not died and not thread.is_alive()
    crashes = [r for r in caplog.records if "failed unexpectedly" in r.getMessage()]
    assert len(crashes) >= failing - 1 >= 3
    assert all(r.levelno == logging.ERROR and "RuntimeError: a bug nobody anticipated" in r.getMessage()
               for r in crashes)
    assert [bool(r.exc_info) for r in crashes] == [True] + [False] * (len(crashes) - 1)  # traceback once
    # Backed off like any failed poll: 0.1, 0.2, 0.4 ... not a busy loop.
    gaps = [b.created - a.created for a, b in itertools.pairwise(crashes)]
    assert all(later > earlier for earlier, later in itertools.pairwise(gaps))


class _AgedClaimsLedger(Ledger):
    """Claims look an hour old at once: a poll that has held them a long time (slow ?task=sent trickle)."""

    def claim(self, uuid: str, recipient: str, body: str) -> bool:
        claimed = super().claim(uuid, recipient, body)
        db = sqlite3.connect(self.path)
        try:
            with db:
                db.execute("UPDATE outbound SET updated_at = updated_at - 3600000 WHERE uuid = ?", (uuid,))
        finally:
            db.close()
        return claimed


class _ReplicaRacesEachPublish:
    """Before each publish of the live poller, a replica on the same ledger runs its orphan republish."""

    def __init__(self, inner: PublisherThread, replica: TaskPoller) -> None:
        self.inner, self.replica = inner, replica
        self.republished: list[int] = []

    def publish(self, publication: broker.Publication, timeout: float = 30.0) -> None:
        self.republished.append(self.replica.republish_orphans())
        self.inner.publish(publication, timeout)


def test_live_claims_are_touched_before_each_publish_so_no_replica_republishes_them(
        clean_broker: str, server: ReferenceServer, tmp_path: Path) -> None:
    uuids = [server.queue_outgoing("+255700000011", f"live {i}", f"live-{i}") for i in range(3)]
    publishers = [PublisherThread(clean_broker, f"test-live-{i}") for i in range(2)]
    try:
        replica = make_poller(clean_broker, server.url, publishers[1], tmp_path)
        racing = _ReplicaRacesEachPublish(publishers[0], replica)
        settings = Settings.from_env({"SMSGW_AMQP_URL": clean_broker, "SMSGW_SYNC_URL": server.url,
                                      "SMSGW_SECRET": SECRET, "SMSGW_STATE_DIR": str(tmp_path),
                                      "SMSGW_MESSAGE_RESULTS": "true"})
        live = TaskPoller(settings, racing, _AgedClaimsLedger(tmp_path))
        assert live.poll_once().queued == 3
    finally:
        for p in publishers:
            p.close()
    assert racing.republished == [0, 0, 0]
    assert sorted(m.uuid for m in take_outbound(clean_broker)) == sorted(uuids)  # each exactly once


def test_claim_republished_meanwhile_is_not_queued_again(clean_broker: str, publisher: PublisherThread,
                                                         server: ReferenceServer, tmp_path: Path) -> None:
    for i in range(2):
        server.queue_outgoing("+255700000012", f"taken {i}", f"taken-{i}")
    ledger = Ledger(tmp_path)

    class TakeOverSecond:
        def publish(self, publication: broker.Publication, timeout: float = 30.0) -> None:
            # A replica republished the second claim while this poll published the first.
            ledger.mark_queued("taken-1")
            publisher.publish(publication, timeout)

    poller = TaskPoller(make_poller(clean_broker, server.url, publisher, tmp_path)._settings, TakeOverSecond(),
                        ledger)
    assert poller.poll_once().queued == 1
    assert [m.uuid for m in take_outbound(clean_broker)] == ["taken-0"]
