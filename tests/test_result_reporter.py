"""result_reporter against the real broker, the reference Sync server and scriptable stubs on loopback.

The modem worker's side is faked: tests publish SentEvent/DeliveryEvent to the events queues themselves.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pika
import pytest
import requests
from prometheus_client import REGISTRY

from reference_server.server import ReferenceServer
from result_reporter import reporter as reporter_module
from result_reporter.reporter import (
    MAX_ROW_REFUSALS,
    ROUND_OUTCOMES,
    ROW_OUTCOMES,
    SPLIT_AFTER_ROUNDS,
    SPLIT_GIVE_UP,
    ResultReporter,
)
from result_reporter.results_http import RoundError
from services import broker
from services.broker import BatchConsumer, HeldDelivery, Publication, PublisherThread
from services.config import EndpointConfig, fleet_from_env
from services.schemas import DeliveryEvent, SentEvent
from services.sync_client import SyncClient
from services.topology import (
    EVENTS_QUEUE,
    OUTBOUND_QUEUE,
    Topology,
    declare_topology,
    events_queue_for,
    parked_queue_for,
)
from tests.conftest import wait_for
from tests.http_stub import HttpStub, Request

SECRET = "s3 cr&t="
T0 = 1_700_000_000_000


def sent(uuid: str, outcome: str = "sent", cms: int | None = None, ts: int = T0, detail: str = "sent") -> SentEvent:
    return SentEvent(uuid, "m1", outcome, detail, ts, cms)  # type: ignore[arg-type]


def delivered(uuid: str, outcome: str = "delivered", ts: int = T0 + 5000, **sent_fields: Any) -> DeliveryEvent:
    return DeliveryEvent(uuid, "m1", outcome, "status report", ts, **sent_fields)  # type: ignore[arg-type]


def endpoint_of(
    sync_url: str, name: str = "default", secret: str = SECRET, interval: float | None = None, **env: str
) -> EndpointConfig:
    """An endpoint as the env-only fleet builds it from ``SMSGW_*`` (renamed; ``interval`` may be below the 1 s
    the setting allows: run() tests need quick rounds)."""
    fleet = fleet_from_env(
        {
            "SMSGW_SYNC_URL": sync_url,
            "SMSGW_SECRET": secret,
            "SMSGW_HTTP_TIMEOUT": "5",
            "SMSGW_MESSAGE_RESULTS": "true",
            **env,
        }
    )
    endpoint = dataclasses.replace(fleet.endpoints[0], name=name)
    return endpoint if interval is None else dataclasses.replace(endpoint, result_interval=interval)


def purge(url: str, *endpoints: str) -> None:
    """Declare and empty the events queues (and their parked queues) of ``endpoints``: clean_broker only empties
    the default endpoint's."""
    connection = pika.BlockingConnection(pika.URLParameters(url))
    try:
        channel = connection.channel()
        declare_topology(channel, Topology(event_endpoints=endpoints))
        for name in endpoints:
            channel.queue_purge(events_queue_for(name))
            channel.queue_purge(parked_queue_for(events_queue_for(name)))
    finally:
        connection.close()


def consumers_of(url: str, queue: str) -> int:
    connection = pika.BlockingConnection(pika.URLParameters(url))
    try:
        return int(connection.channel().queue_declare(queue, passive=True).method.consumer_count)
    finally:
        connection.close()


def drain_with_headers(url: str, name: str) -> list[tuple[bytes, dict[str, Any]]]:
    """Like ``drain_queue``, with each message's headers (parked messages carry their park reason)."""
    connection = pika.BlockingConnection(pika.URLParameters(url))
    messages: list[tuple[bytes, dict[str, Any]]] = []
    try:
        channel = connection.channel()
        while True:
            method, props, body = channel.basic_get(name, auto_ack=True)
            if method is None:
                return messages
            messages.append((body, dict(props.headers or {})))
    finally:
        connection.close()


def drain_queue(url: str, name: str) -> list[bytes]:
    """Consume everything ready on ``name`` (after the reporter stopped, unacked events are back there)."""
    connection = pika.BlockingConnection(pika.URLParameters(url))
    bodies: list[bytes] = []
    try:
        channel = connection.channel()
        while True:
            method, _props, body = channel.basic_get(name, auto_ack=True)
            if method is None:
                return bodies
            bodies.append(body)
    finally:
        connection.close()


class Harness:
    """A ResultReporter of one endpoint on a BatchConsumer of its events queue, with a publisher to fake the
    modem worker."""

    def __init__(
        self,
        amqp: str,
        sync_url: str,
        keep_rounds: int = 5,
        secret: str = SECRET,
        clock: Callable[[], float] | None = None,
        interval: float | None = None,
        name: str = "default",
        **env: str,
    ) -> None:
        self.amqp = amqp
        self.endpoint = endpoint_of(sync_url, name, secret, interval, **env)
        self.queue = events_queue_for(name)
        topology = Topology(event_endpoints=(name,))
        self.publisher = PublisherThread(amqp, f"test-results-{name}", topology)
        self.consumer = BatchConsumer(
            amqp, self.queue, self.publisher, name=f"test-results-{name}", prefetch=500, topology=topology
        )
        self.client = SyncClient(self.endpoint)
        # Without a clock: rounds alone decide when an unasked report is dropped (the time bound has its own test).
        self.reporter = ResultReporter(
            self.endpoint,
            self.consumer,
            self.client,
            keep_rounds=keep_rounds,
            keep_at_least_s=0.0 if clock is None else 600.0,
            clock=clock or time.monotonic,
        )
        self.thread = threading.Thread(target=self.consumer.run, daemon=True)
        self.thread.start()
        wait_for(self.consumer.connected.is_set, what="events consumer connected")
        self.stopped = False

    def publish(self, *events: SentEvent | DeliveryEvent | bytes) -> None:
        for event in events:
            body = event if isinstance(event, bytes) else event.to_json()
            self.publisher.publish(Publication(self.queue, body))

    def held(self, n: int) -> None:
        wait_for(lambda: self.reporter.collect() >= n, what=f"{n} events held")

    def stop(self) -> list[bytes]:
        """Stop consuming; returns the events that went back to the queue (i.e. were not acked)."""
        if not self.stopped:
            self.stopped = True
            self.consumer.stop()
            self.thread.join(timeout=10)
            self.publisher.close()
            self.client.close()
        return drain_queue(self.amqp, self.queue)


@pytest.fixture
def harnesses() -> Iterator[list[Harness]]:
    made: list[Harness] = []
    yield made
    for h in made:
        h.stop()


def test_reports_to_reference_server(clean_broker: str, harnesses: list[Harness]) -> None:
    uuids = ["ok", "nosvc", "unknown", "undelivered"]
    with ReferenceServer(SECRET) as server:
        for name in uuids:
            server.queue_outgoing("+255700000001", f"text {name}", name)
        # What the task poller does with the Message Results API on: the server now waits for their results.
        requests.post(server.url + "?task=sent", json={"queued_messages": uuids}, timeout=5).raise_for_status()
        h = Harness(clean_broker, server.url)
        harnesses.append(h)
        h.publish(
            sent("ok"),
            delivered("ok"),
            sent("nosvc", "failed", 331, detail="no network"),
            sent("unknown", "unknown", detail="timeout after PDU"),
            sent("undelivered"),
            delivered("undelivered", "failed"),
        )
        h.held(6)
        assert h.reporter.round().reported == 4
        by_uuid = {o["uuid"]: o for o in server.outgoing()}
    assert by_uuid["ok"]["status"] == "delivered"
    assert by_uuid["ok"]["sent_timestamp"] == T0 and by_uuid["ok"]["delivered_timestamp"] == T0 + 5000
    assert by_uuid["nosvc"]["status"] == "failed" and by_uuid["nosvc"]["sent_result_code"] == 4
    assert by_uuid["unknown"]["sent_result_message"].startswith("Outcome unknown")
    assert by_uuid["undelivered"]["status"] == "sent" and by_uuid["undelivered"]["delivered_result_code"] == 1
    assert h.stop() == []  # every event acked


class ScriptedServer:
    """A Sync URL whose ?task=result answers are set by the test."""

    def __init__(self) -> None:
        self.waiting: list[str] = []
        self.get_body: str | None = None  # None: {"message_uuids": waiting}
        self.post_status = 200
        self.post_body = '{"payload":{"success":true,"error":null}}'
        # Decides per POST from its rows: (status, body), or None for post_status/post_body.
        self.refuse: Callable[[list[dict[str, Any]]], tuple[int, str] | None] | None = None
        self.stub = HttpStub(self.respond).start()

    def respond(self, request: Request) -> tuple[int, str]:
        if request.query.get("task") != "result":
            return 404, ""
        if request.method == "GET":
            return 200, self.get_body if self.get_body is not None else json.dumps({"message_uuids": self.waiting})
        if self.refuse is not None:
            answer = self.refuse(json.loads(request.body)["message_results"])
            if answer is not None:
                return answer
        return self.post_status, self.post_body

    def posts(self) -> list[dict[str, Any]]:
        return [json.loads(r.body) for r in self.stub.requests if r.method == "POST"]

    def posted_rows(self) -> list[list[dict[str, Any]]]:
        """The rows of each POST (message_results shape), in order."""
        return [p["message_results"] for p in self.posts()]


@pytest.fixture
def scripted() -> Iterator[ScriptedServer]:
    s = ScriptedServer()
    yield s
    s.stub.stop()


@pytest.mark.parametrize("shape", ["message_results", "message_result_string", "message_result_array"])
def test_latest_state_per_uuid_and_body_shape(
    clean_broker: str, harnesses: list[Harness], scripted: ScriptedServer, shape: str
) -> None:
    scripted.waiting = ["u-1", "not-held"]
    h = Harness(clean_broker, scripted.stub.url + "?site=a", SMSGW_RESULTS_SHAPE=shape, SMSGW_SENT_OK_CODE="-1")
    harnesses.append(h)
    # An older sent event redelivered after the newer one must not win; the delivery report adds delivered_*.
    h.publish(sent("u-1", ts=T0 + 10), delivered("u-1"), sent("u-1", "failed", 500, ts=T0))
    h.held(3)
    assert h.reporter.round().reported == 1
    get, post = scripted.stub.requests
    for request in (get, post):
        assert request.query == {"site": "a", "task": "result", "secret": SECRET}
    body = json.loads(post.body)
    if shape == "message_results":
        rows = body["message_results"]
    elif shape == "message_result_string":
        rows = json.loads(body["message_result"])
    else:
        rows = body["message_result"]
    assert rows == [
        {
            "uuid": "u-1",
            "sent_result_code": -1,
            "sent_result_message": "SMSSync Message Sent",
            "sent_timestamp": T0 + 10,
            "delivered_result_code": -1,
            "delivered_result_message": "SMS Delivered",
            "delivered_timestamp": T0 + 5000,
        }
    ]
    assert h.stop() == []


def test_failed_post_keeps_events_unacked(
    clean_broker: str, harnesses: list[Harness], scripted: ScriptedServer
) -> None:
    scripted.waiting = ["u-1"]
    h = Harness(clean_broker, scripted.stub.url)
    harnesses.append(h)
    h.publish(sent("u-1"))
    h.held(1)
    for status, body, match in (
        (500, "<html>oops</html>", "HTTP 500"),
        (200, '{"payload":{"success":false,"error":"nope"}}', "refused.*nope"),
    ):
        scripted.post_status, scripted.post_body = status, body
        with pytest.raises(RoundError, match=match):
            h.reporter.round()
    # A lost server answer is retried next round; then an empty 200 body (seed PHP) counts as accepted.
    scripted.post_status, scripted.post_body = 200, ""
    assert h.reporter.round().reported == 1
    assert len(scripted.posts()) == 3
    assert h.stop() == []


def test_unacked_events_survive_a_stop(clean_broker: str, harnesses: list[Harness], scripted: ScriptedServer) -> None:
    scripted.waiting = ["u-1"]
    scripted.post_status = 503
    h = Harness(clean_broker, scripted.stub.url)
    harnesses.append(h)
    h.publish(sent("u-1"), delivered("u-1"))
    h.held(2)
    with pytest.raises(RoundError):
        h.reporter.round()
    back = h.stop()
    assert sorted(json.loads(b)["schema"] for b in back) == ["delivery_event/1", "sent_event/1"]


def test_not_requested_reports_are_kept_then_dropped(
    clean_broker: str, harnesses: list[Harness], scripted: ScriptedServer
) -> None:
    h = Harness(clean_broker, scripted.stub.url, keep_rounds=3)
    harnesses.append(h)
    h.publish(sent("late"), sent("never"))
    h.held(2)
    first = h.reporter.round()
    assert (first.reported, first.waiting, first.dropped) == (0, 2, 0)
    scripted.waiting = ["late"]  # the server asks later: still reported
    assert h.reporter.round().reported == 1
    scripted.waiting = []
    assert h.reporter.round().dropped == 1  # "never": third round unasked
    assert [r["uuid"] for p in scripted.posts() for r in p["message_results"]] == ["late"]
    assert h.stop() == []


def test_an_unasked_report_is_kept_for_ten_minutes_however_short_the_rounds(
    clean_broker: str, harnesses: list[Harness], scripted: ScriptedServer
) -> None:
    """A server asks for a result only once ?task=sent told it the SMS left, which may be minutes later than a short
    result_interval's KEEP_ROUNDS rounds: the report is kept KEEP_AT_LEAST_S too (found by the chaos suite)."""
    now = [1000.0]
    h = Harness(clean_broker, scripted.stub.url, keep_rounds=2, clock=lambda: now[0])
    harnesses.append(h)
    h.publish(sent("slow-confirm"))
    h.held(1)
    for _ in range(5):  # rounds within the ten minutes: kept
        now[0] += 60
        assert h.reporter.round().dropped == 0
    scripted.waiting = ["slow-confirm"]  # the server learnt it was sent: asked and reported
    assert h.reporter.round().reported == 1
    h.publish(sent("never-asked"))
    h.held(1)
    scripted.waiting = []
    assert h.reporter.round().dropped == 0
    now[0] += 599
    assert h.reporter.round().dropped == 0  # two rounds, but under ten minutes unasked
    now[0] += 2
    assert h.reporter.round().dropped == 1  # both bounds reached


def test_late_delivery_report_gets_sent_fields_from_the_event(
    clean_broker: str, harnesses: list[Harness], scripted: ScriptedServer
) -> None:
    # After a restart the reporter remembers nothing: a delivery report whose sent event was reported before
    # carries the send's outcome itself (the modem worker copies it from its ledger). No ledger is read here.
    scripted.waiting = ["u-9", "u-10", "u-11"]
    h = Harness(clean_broker, scripted.stub.url)
    harnesses.append(h)
    h.publish(
        delivered("u-9", sent_outcome="sent", sent_detail="sent", sent_timestamp=T0 - 1000),
        delivered("u-10", "failed", sent_outcome="unknown", sent_detail="timeout after PDU", sent_timestamp=T0 - 2000),
        delivered("u-11"),
    )  # an older modem worker: no sent_* at all
    h.held(3)
    assert h.reporter.round().reported == 3
    rows = {row["uuid"]: row for row in scripted.posts()[0]["message_results"]}
    assert (rows["u-9"]["sent_result_code"], rows["u-9"]["sent_timestamp"]) == (0, T0 - 1000)
    assert rows["u-9"]["delivered_result_code"] == 0
    assert rows["u-10"]["sent_timestamp"] == T0 - 2000
    assert rows["u-10"]["sent_result_message"].startswith("Outcome unknown")
    assert "timeout after PDU" in rows["u-10"]["sent_result_message"]
    # Without them a delivery still implies the SMS left: "sent", without a time.
    assert (rows["u-11"]["sent_result_code"], rows["u-11"]["sent_timestamp"]) == (0, None)
    assert h.stop() == []


def test_malformed_event_is_parked(clean_broker: str, harnesses: list[Harness], scripted: ScriptedServer) -> None:
    h = Harness(clean_broker, scripted.stub.url)
    harnesses.append(h)
    h.publish(b'{"schema":"sent_event/9"}', b"not json")
    parked: list[bytes] = []

    def both_parked() -> bool:
        h.reporter.collect()  # decodes what arrived and parks what it cannot read
        parked.extend(drain_queue(clean_broker, parked_queue_for(h.queue)))
        return len(parked) >= 2

    wait_for(both_parked, what="two parked events")
    assert sorted(parked) == sorted([b'{"schema":"sent_event/9"}', b"not json"])
    assert h.reporter.round().reported == 0
    assert scripted.stub.requests == []  # nothing held: no HTTP at all
    assert h.stop() == []  # the originals were acked after parking


# --- reported state is remembered: late and duplicate events (review A) -------------------------------------


def test_late_duplicate_sent_event_does_not_reset_delivered(
    clean_broker: str, tmp_path: Path, harnesses: list[Harness], scripted: ScriptedServer
) -> None:
    scripted.waiting = ["u-1"]  # a server that keeps asking (it waits for a final delivery state, say)
    h = Harness(clean_broker, scripted.stub.url)
    harnesses.append(h)
    h.publish(sent("u-1"))
    h.held(1)
    assert h.reporter.round().reported == 1
    h.publish(delivered("u-1"))
    h.held(1)
    assert h.reporter.round().reported == 1
    [second] = scripted.posted_rows()[1]
    assert (second["sent_timestamp"], second["delivered_result_code"]) == (T0, 0)  # sent_* from memory
    # The modem worker republishes the SentEvent (with the ledger's time) for a redelivered queue copy, and a
    # broker redelivery repeats the delivery report: the server already has exactly that row.
    h.publish(sent("u-1", ts=T0 + 1), delivered("u-1"))
    h.held(2)
    result = h.reporter.round()
    assert (result.reported, result.duplicates) == (0, 1)
    assert len(scripted.posts()) == 2  # no POST: nothing new, and above all no "pending" row
    assert h.stop() == []  # the duplicates were acked


def test_sent_event_after_its_delivery_keeps_delivered(
    clean_broker: str, tmp_path: Path, harnesses: list[Harness], scripted: ScriptedServer
) -> None:
    scripted.waiting = ["u-2"]
    h = Harness(clean_broker, scripted.stub.url)
    harnesses.append(h)
    h.publish(delivered("u-2"))
    h.held(1)
    assert h.reporter.round().reported == 1
    h.publish(sent("u-2"))
    h.held(1)
    assert h.reporter.round().reported == 1  # it adds sent_timestamp ...
    first, second = (rows[0] for rows in scripted.posted_rows())
    assert (first["sent_timestamp"], first["delivered_result_code"]) == (None, 0)
    assert second == {**first, "sent_timestamp": T0}  # ... and keeps delivered_* as reported
    # A redelivered copy of that SentEvent, and an older failed delivery report, change nothing: no POST.
    h.publish(sent("u-2"), delivered("u-2", "failed", ts=T0 + 1000))
    h.held(2)
    assert h.reporter.round().duplicates == 1
    assert len(scripted.posts()) == 2
    assert h.stop() == []


# --- one refusing row must not block the others (review B) --------------------------------------------------

BAD_ROW_ERROR = "invalid sent_result_message for bad"


def refuse_bad(rows: list[dict[str, Any]]) -> tuple[int, str] | None:
    if any(row["uuid"] == "bad" for row in rows):
        return 200, json.dumps({"payload": {"success": False, "error": BAD_ROW_ERROR}})
    return None


def test_refused_row_is_isolated_then_parked(
    clean_broker: str, harnesses: list[Harness], scripted: ScriptedServer
) -> None:
    scripted.waiting = ["bad", *(f"g{n}" for n in range(10))]
    scripted.refuse = refuse_bad
    h = Harness(clean_broker, scripted.stub.url)
    harnesses.append(h)
    h.publish(sent("bad"), sent("g0"))
    h.held(2)
    for _ in range(SPLIT_AFTER_ROUNDS):
        with pytest.raises(RoundError, match=BAD_ROW_ERROR):
            h.reporter.round()  # one POST with both rows, refused as a whole
    assert [len(rows) for rows in scripted.posted_rows()] == [2] * SPLIT_AFTER_ROUNDS
    # Now rows go one by one: the good ones are accepted, "bad" is refused while others are accepted.
    for n in range(1, MAX_ROW_REFUSALS + 1):
        h.publish(sent(f"g{n}"))
        h.held(3 if n == 1 else 2)
        result = h.reporter.round()
        assert (result.reported, result.refused) == (2 if n == 1 else 1, 1)
        assert result.parked == (1 if n == MAX_ROW_REFUSALS else 0)
    assert all(len(rows) == 1 for rows in scripted.posted_rows()[SPLIT_AFTER_ROUNDS:])
    [(body, headers)] = drain_with_headers(clean_broker, parked_queue_for(EVENTS_QUEUE))
    assert json.loads(body)["uuid"] == "bad"
    assert BAD_ROW_ERROR in headers[broker.HEADER_PARK_REASON]
    assert f"{MAX_ROW_REFUSALS} times" in headers[broker.HEADER_PARK_REASON]
    # A round without refusals (still one by one) switches back to one POST per round.
    h.publish(sent("g6"), sent("g7"))
    h.held(2)
    assert h.reporter.round().reported == 2
    h.publish(sent("g8"), sent("g9"))
    h.held(2)
    assert h.reporter.round().reported == 2
    assert [len(rows) for rows in scripted.posted_rows()[-3:]] == [1, 1, 2]
    reported = {row["uuid"] for rows in scripted.posted_rows() for row in rows}
    assert reported == {"bad", *(f"g{n}" for n in range(10))}
    assert h.stop() == []  # everything acked: reported, or parked with the server's reason


def _server_down() -> tuple[int, str]:
    raise ConnectionAbortedError("the stub drops the connection")  # the client sees no answer at all


@pytest.mark.parametrize(
    ("status", "body"),
    [
        (200, '{"payload":{"success":false,"error":"database is read-only"}}'),
        (500, "<b>Fatal error</b>: Uncaught PDOException"),
        (503, ""),
        (None, ""),  # network error on every POST
    ],
)
def test_server_refusing_every_row_parks_nothing(
    clean_broker: str, harnesses: list[Harness], scripted: ScriptedServer, status: int | None, body: str
) -> None:
    uuids = [f"r{n}" for n in range(5)]
    scripted.waiting = uuids
    if status is None:
        scripted.refuse = lambda rows: _server_down()
    else:
        scripted.refuse = lambda rows: (status, body)
    h = Harness(clean_broker, scripted.stub.url)
    harnesses.append(h)
    h.publish(*(sent(u) for u in uuids))
    h.held(len(uuids))
    rounds = SPLIT_AFTER_ROUNDS + MAX_ROW_REFUSALS + 3
    per_round: list[int] = []
    for _ in range(rounds):
        before = len(scripted.posts())
        with pytest.raises(RoundError):
            h.reporter.round()
        per_round.append(len(scripted.posts()) - before)
    # A whole-server failure is never blamed on rows: nothing parked, nothing acked, and split rounds give up
    # after a few single-row POSTs (one, for an answer no row can cause) instead of trying every row.
    assert drain_with_headers(clean_broker, parked_queue_for(EVENTS_QUEUE)) == []
    if status is None:
        assert per_round == [1] * rounds
    else:
        assert per_round[:SPLIT_AFTER_ROUNDS] == [1] * SPLIT_AFTER_ROUNDS
        assert all(1 <= n <= SPLIT_GIVE_UP for n in per_round[SPLIT_AFTER_ROUNDS:])
        if status != 503:  # rows refused in a split round go last next time: every row gets probed
            probed = {rows[0]["uuid"] for rows in scripted.posted_rows()[SPLIT_AFTER_ROUNDS:]}
            assert probed == set(uuids)
    scripted.refuse = None  # the server recovers: every report gets through
    assert h.reporter.round().reported == len(uuids)
    assert h.stop() == []


# --- review C: a new event restarts the "not asked for" count ----------------------------------------------


def test_new_event_resets_declined_rounds(
    clean_broker: str, harnesses: list[Harness], scripted: ScriptedServer
) -> None:
    h = Harness(clean_broker, scripted.stub.url, keep_rounds=3)
    harnesses.append(h)
    h.publish(sent("x"))
    h.held(1)
    assert [h.reporter.round().dropped for _ in range(2)] == [0, 0]  # two rounds unasked
    h.publish(delivered("x"))
    h.held(2)
    # Without the reset the delivery report would be dropped after this one round.
    assert [h.reporter.round().dropped for _ in range(3)] == [0, 0, 1]
    assert scripted.posts() == []
    assert h.stop() == []


# --- review D: the run loop outlives any exception of a round -----------------------------------------------


@pytest.mark.parametrize("parser", ["real", "unguarded"])
def test_run_loop_survives_pathological_reply(
    clean_broker: str,
    harnesses: list[Harness],
    scripted: ScriptedServer,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    parser: str,
) -> None:
    scripted.get_body = "[" * 100_000 + "]" * 100_000  # nested deeper than any decoder's recursion limit
    if parser == "unguarded":  # a parser without a depth guard: RecursionError reaches the loop
        monkeypatch.setattr(reporter_module, "parse_message_uuids", lambda body: json.loads(body)["message_uuids"])
    caplog.set_level(logging.WARNING, logger=reporter_module.__name__)
    h = Harness(clean_broker, scripted.stub.url, interval=0.01)
    harnesses.append(h)
    h.publish(sent("u-1"))
    h.held(1)
    stop = threading.Event()
    loop = threading.Thread(target=h.reporter.run, args=(stop,), daemon=True)
    loop.start()
    try:
        wait_for(lambda: len(scripted.stub.requests) >= 3 or not loop.is_alive(), what="three rounds")
        assert loop.is_alive()  # survived every round so far
    finally:
        stop.set()
        loop.join(timeout=10)
    assert not loop.is_alive()
    if parser == "unguarded":  # a bug: one line each, its traceback once
        failures = [r for r in caplog.records if "result round failed" in r.getMessage()]
        assert len(failures) >= 3
        assert sum(1 for r in failures if r.exc_info) == 1
        assert failures[0].exc_info and "RecursionError" in failures[0].getMessage()
        assert all("RecursionError" in r.getMessage() for r in failures)
    else:  # an unreadable reply of a server: one problem, one line for every round it lasts
        failures = [r for r in caplog.records if "result rounds failing" in r.getMessage()]
        assert [r.levelno for r in failures] == [logging.WARNING], [r.getMessage() for r in failures]
        assert "unreadable ?task=result reply" in failures[0].getMessage()
    assert scripted.posts() == []
    assert [json.loads(b)["uuid"] for b in h.stop()] == ["u-1"]  # still unacked: nothing lost


def test_a_failing_server_is_one_line_not_one_per_round(
    clean_broker: str, harnesses: list[Harness], scripted: ScriptedServer, caplog: pytest.LogCaptureFixture
) -> None:
    scripted.waiting = ["f-1"]
    scripted.refuse = lambda rows: (500, "<b>Fatal error</b>: Uncaught PDOException")
    caplog.set_level(logging.INFO, logger=reporter_module.__name__)
    h = Harness(clean_broker, scripted.stub.url, interval=0.01)
    harnesses.append(h)
    h.publish(sent("f-1"))
    h.held(1)
    stop = threading.Event()
    loop = threading.Thread(target=h.reporter.run, args=(stop,), daemon=True)
    loop.start()
    try:
        wait_for(lambda: len(scripted.posts()) >= 50, timeout=60, what="50 failed rounds")
        lines = [r for r in caplog.records if r.levelno >= logging.WARNING]
        assert len(lines) == 1, [r.getMessage() for r in lines]
        assert lines[0].levelno == logging.WARNING
        assert "default: result rounds failing, reports kept for the next round: server refused the results" in (
            lines[0].getMessage()
        )
        assert "HTTP 500" in lines[0].getMessage()
        scripted.refuse = None  # the server recovers: one line says so
        wait_for(lambda: any("works again" in r.getMessage() for r in caplog.records), what="the recovery line")
    finally:
        stop.set()
        loop.join(timeout=10)
    recovered = [r for r in caplog.records if "works again" in r.getMessage()]
    assert len(recovered) == 1 and recovered[0].levelno == logging.INFO
    assert "default: result rounds failing" in recovered[0].getMessage()
    assert h.stop() == []  # reported once the server took it


def test_process_reports_and_drains_on_sigterm(clean_broker: str, tmp_path: Path) -> None:
    with ReferenceServer(SECRET) as server:
        server.queue_outgoing("+255700000001", "hi", "p-1")
        # What the task poller does with the Message Results API on: the server now waits for p-1's result.
        requests.post(server.url + "?task=sent", json={"queued_messages": ["p-1"]}, timeout=5)
        env = {
            **os.environ,
            "SMSGW_AMQP_URL": clean_broker,
            "SMSGW_SYNC_URL": server.url,
            "SMSGW_SECRET": SECRET,
            "SMSGW_STATE_DIR": str(tmp_path),
            "SMSGW_METRICS_PORT": "0",
            "SMSGW_RESULT_INTERVAL": "1",
            "SMSGW_MESSAGE_RESULTS": "true",
        }
        proc = subprocess.Popen(
            [sys.executable, "-m", "result_reporter"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
        try:
            publisher = PublisherThread(clean_broker, "test-results-proc")
            publisher.publish(Publication(EVENTS_QUEUE, sent("p-1").to_json()))
            publisher.publish(Publication(EVENTS_QUEUE, delivered("p-1").to_json()))
            publisher.close()
            wait_for(lambda: server.outgoing()[0]["status"] == "delivered", timeout=20, what="delivered status")
            started = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            code = proc.wait(timeout=10)
            assert time.monotonic() - started < 5
        finally:
            if proc.poll() is None:
                proc.kill()
        output = proc.stdout.read().decode() if proc.stdout else ""
    assert code == 0, output
    assert SECRET not in output
    assert drain_queue(clean_broker, EVENTS_QUEUE) == []


def test_cli_help_and_check(clean_broker: str, tmp_path: Path) -> None:
    help_text = subprocess.run(
        [sys.executable, "-m", "result_reporter", "--help"], capture_output=True, text=True, check=True
    ).stdout
    for name in ("SMSGW_RESULT_INTERVAL", "SMSGW_RESULTS_SHAPE", "SMSGW_SENT_OK_CODE"):
        assert name in help_text
    env = {
        **os.environ,
        "SMSGW_AMQP_URL": clean_broker,
        "SMSGW_METRICS_PORT": "0",
        "SMSGW_SYNC_URL": "http://127.0.0.1:9/smssync",
        "SMSGW_HEARTBEAT_DIR": str(tmp_path / "heartbeat"),  # not the machine's: another test's reporter may run
    }
    done = subprocess.run(
        [sys.executable, "-m", "result_reporter", "--check"],
        check=False,
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    # Configuration and broker fine, but no result_reporter runs here: a health check that cannot fail is none.
    assert done.returncode == 1 and "result_reporter is not running here" in done.stderr, done.stderr
    assert len(done.stderr.splitlines()) == 1


# --- issue 6: one process, every endpoint with message_results = true, each in its own rounds ---------------


class _NoDeliveries:
    """A consumer that never holds anything (for tests that need no broker)."""

    def take(self, timeout: float = 0.0) -> list[HeldDelivery]:
        return []

    def ack(self, items: list[HeldDelivery]) -> int:
        return 0

    def park(self, held: HeldDelivery, reason: str, label: str = "error") -> None:
        raise AssertionError("nothing to park")

    def is_live(self, held: HeldDelivery) -> bool:
        return False


def test_metrics_of_an_endpoint_start_at_zero() -> None:
    endpoint = endpoint_of("http://127.0.0.1:9/smssync", name="metrics-zero")
    client = SyncClient(endpoint)
    try:
        reporter = ResultReporter(endpoint, _NoDeliveries(), client)
        for outcome in ROUND_OUTCOMES:
            labels = {"endpoint": "metrics-zero", "outcome": outcome}
            assert REGISTRY.get_sample_value("smsgw_result_rounds_total", labels) == 0, outcome
        for outcome in ROW_OUTCOMES:
            labels = {"endpoint": "metrics-zero", "outcome": outcome}
            assert REGISTRY.get_sample_value("smsgw_result_rows_total", labels) == 0, outcome
        assert REGISTRY.get_sample_value("smsgw_result_events_held", {"endpoint": "metrics-zero"}) == 0
        labels = {"endpoint": "metrics-zero", "task": "result"}
        assert REGISTRY.get_sample_value("smsgw_http_request_seconds_count", labels) == 0
        # An idle round (nothing held) makes no request and is counted under the endpoint's own label.
        assert reporter.round().reported == 0
        idle = {"endpoint": "metrics-zero", "outcome": "idle"}
        assert REGISTRY.get_sample_value("smsgw_result_rounds_total", idle) == 1
    finally:
        client.close()


def test_each_endpoint_reports_its_own_events_to_its_own_server(clean_broker: str, harnesses: list[Harness]) -> None:
    purge(clean_broker, "rr-a", "rr-b")
    servers = {"rr-a": ScriptedServer(), "rr-b": ScriptedServer()}
    try:
        for name, server in servers.items():
            server.waiting = [f"{name}-1", f"{name}-2"]
        a = Harness(clean_broker, servers["rr-a"].stub.url, name="rr-a", secret="secret-a")
        b = Harness(
            clean_broker,
            servers["rr-b"].stub.url,
            name="rr-b",
            secret="secret-b",
            SMSGW_RESULTS_SHAPE="message_result_array",
        )
        harnesses.extend((a, b))
        a.publish(sent("rr-a-1"), sent("rr-a-2"))
        b.publish(sent("rr-b-1"), delivered("rr-b-1"), sent("rr-b-2"))
        a.held(2)
        b.held(3)
        assert (a.reporter.round().reported, b.reporter.round().reported) == (2, 2)
        a_rows = [row["uuid"] for post in servers["rr-a"].posts() for row in post["message_results"]]
        b_rows = [row["uuid"] for post in servers["rr-b"].posts() for row in post["message_result"]]
        assert sorted(a_rows) == ["rr-a-1", "rr-a-2"]
        assert sorted(b_rows) == ["rr-b-1", "rr-b-2"]
        # Each server gets its own secret, nothing of the other's.
        assert {r.query["secret"] for r in servers["rr-a"].stub.requests} == {"secret-a"}
        assert {r.query["secret"] for r in servers["rr-b"].stub.requests} == {"secret-b"}
        assert a.stop() == [] and b.stop() == []
    finally:
        for server in servers.values():
            server.stub.stop()


class HangingServer(ScriptedServer):
    """A Sync URL that answers nothing until ``release()`` (a server that accepts connections but hangs)."""

    def __init__(self) -> None:
        self.gate = threading.Event()
        super().__init__()

    def respond(self, request: Request) -> tuple[int, str]:
        self.gate.wait(timeout=60)
        return super().respond(request)

    def release(self) -> None:
        self.gate.set()


def write_fleet(path: Path, endpoints: dict[str, dict[str, Any]]) -> Path:
    """A fleet file with one [[endpoints]] table per entry (values: strings, numbers, booleans)."""

    def toml(value: Any) -> str:
        return ("true" if value else "false") if isinstance(value, bool) else json.dumps(value)

    tables = [
        "[[endpoints]]\n" + f"name = {toml(name)}\n" + "".join(f"{k} = {toml(v)}\n" for k, v in keys.items())
        for name, keys in endpoints.items()
    ]
    path.write_text("\n".join(tables), encoding="utf-8")
    return path


def start_reporter(env: dict[str, str], log_path: Path) -> subprocess.Popen[bytes]:
    with log_path.open("wb") as log_file:
        return subprocess.Popen(
            [sys.executable, "-m", "result_reporter"],
            env={**os.environ, **env},
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )


def sigterm(proc: subprocess.Popen[bytes]) -> int:
    """First SIGTERM: the process drains and exits on its own (fails the test after 15 s)."""
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        pytest.fail("result_reporter did not exit within 15 s of SIGTERM")


def test_process_serves_every_results_endpoint_in_its_own_rounds(clean_broker: str, tmp_path: Path) -> None:
    names = ("rr-live", "rr-hang", "rr-off")
    purge(clean_broker, *names)
    live, hang, off = ScriptedServer(), HangingServer(), ScriptedServer()
    live.waiting = ["live-1", "live-2"]
    hang.waiting = ["hang-1"]
    off.waiting = ["off-1"]
    fleet = write_fleet(
        tmp_path / "fleet.toml",
        {
            "rr-live": {
                "sync_url": live.stub.url,
                "secret": "secret-live",
                "inbound": False,
                "tasks": False,
                "message_results": True,
                "result_interval": 1,
            },
            # Hangs far longer than a round: with one loop for both, the live endpoint's results would wait for it.
            "rr-hang": {
                "sync_url": hang.stub.url,
                "secret": "secret-hang",
                "inbound": False,
                "tasks": False,
                "message_results": True,
                "result_interval": 1,
                "http_timeout": 60,
                "results_shape": "message_result_string",
            },
            "rr-off": {
                "sync_url": off.stub.url,
                "secret": "secret-off",
                "inbound": False,
                "tasks": False,
                "message_results": False,
            },
        },
    )
    log_path = tmp_path / "reporter.log"
    proc = start_reporter(
        {"SMSGW_AMQP_URL": clean_broker, "SMSGW_CONFIG": str(fleet), "SMSGW_METRICS_PORT": "0"}, log_path
    )
    publisher = PublisherThread(clean_broker, "test-results-fleet", Topology(event_endpoints=names))
    try:
        for name, event in (
            ("rr-hang", sent("hang-1")),
            ("rr-live", sent("live-1")),
            ("rr-live", delivered("live-1")),
            ("rr-live", sent("live-2")),
            ("rr-off", sent("off-1")),
        ):
            publisher.publish(Publication(events_queue_for(name), event.to_json()))
        wait_for(lambda: hang.stub.requests, timeout=20, what="the hanging endpoint's first request")

        def live_reported() -> set[str]:
            return {row["uuid"] for rows in live.posted_rows() for row in rows}

        # The live server gets its results while the other one still hangs on its first request.
        wait_for(lambda: live_reported() == {"live-1", "live-2"}, timeout=20, what="the live endpoint's results")
        assert hang.posts() == [] and len(hang.stub.requests) == 1
        hang.release()
        wait_for(hang.posts, timeout=20, what="the hanging endpoint's results, once it answers")
        assert [row["uuid"] for row in json.loads(hang.posts()[0]["message_result"])] == ["hang-1"]
        assert off.stub.requests == []  # results off: not one ?task=result request
        assert {r.query["secret"] for r in live.stub.requests} == {"secret-live"}
        assert {r.query["secret"] for r in hang.stub.requests} == {"secret-hang"}
        code = sigterm(proc)
    finally:
        hang.release()
        publisher.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for server in (live, hang, off):
            server.stub.stop()
    output = log_path.read_text(encoding="utf-8")
    assert code == 0, output
    for secret in ("secret-live", "secret-hang", "secret-off"):
        assert secret not in output
    # Every reported event was acked before the exit; rr-off's events are not ours and stay queued.
    assert drain_queue(clean_broker, events_queue_for("rr-live")) == []
    assert drain_queue(clean_broker, events_queue_for("rr-hang")) == []
    assert [json.loads(b)["uuid"] for b in drain_queue(clean_broker, events_queue_for("rr-off"))] == ["off-1"]


def test_process_with_results_off_makes_no_requests(
    clean_broker: str, tmp_path: Path, scripted: ScriptedServer
) -> None:
    scripted.waiting = ["p-1"]  # a server that would answer ?task=result
    log_path = tmp_path / "reporter.log"
    proc = start_reporter(
        {
            "SMSGW_AMQP_URL": clean_broker,
            "SMSGW_SYNC_URL": scripted.stub.url,
            "SMSGW_SECRET": SECRET,
            "SMSGW_METRICS_PORT": "0",
            "SMSGW_RESULT_INTERVAL": "1",
            "SMSGW_MESSAGE_RESULTS": "false",
        },
        log_path,
    )
    try:
        publisher = PublisherThread(clean_broker, "test-results-off")
        publisher.publish(Publication(EVENTS_QUEUE, sent("p-1").to_json()))
        publisher.close()
        wait_for(
            lambda: "makes no ?task=result requests" in log_path.read_text(encoding="utf-8"),
            timeout=20,
            what="the results-off line",
        )
        assert consumers_of(clean_broker, EVENTS_QUEUE) == 0  # it does not even take the events
        code = sigterm(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    output = log_path.read_text(encoding="utf-8")
    assert code == 0, output
    assert output.count("makes no ?task=result requests") == 1  # said once
    assert scripted.stub.requests == []
    assert [json.loads(b)["uuid"] for b in drain_queue(clean_broker, EVENTS_QUEUE)] == ["p-1"]


# --- third-party servers: task -> sent -> result legs end to end --------------------------------------------


def _poll_task(amqp: str, sync_url: str, secret: str, state: Path) -> list[str]:
    """One poll of the real task poller (Message Results API on); returns the uuids it queued."""
    from services.ledger import open_ledger  # the other legs' modules: only these peer tests need them
    from task_poller.poller import TaskPoller

    fleet = fleet_from_env(
        {
            "SMSGW_AMQP_URL": amqp,
            "SMSGW_SYNC_URL": sync_url,
            "SMSGW_SECRET": secret,
            "SMSGW_STATE_DIR": str(state),
            "SMSGW_MESSAGE_RESULTS": "true",
        }
    )
    endpoint = fleet.endpoints[0]
    publisher = PublisherThread(amqp, "test-peer-poller")
    client = SyncClient(endpoint)
    ledger = open_ledger("", str(state))
    try:
        TaskPoller(endpoint, fleet, publisher, ledger, client).poll_once()
    finally:
        ledger.close()
        client.close()
        publisher.close()
    return [json.loads(b)["uuid"] for b in drain_queue(amqp, OUTBOUND_QUEUE)]


@pytest.mark.peers
def test_seedphp_task_sent_and_result_legs(clean_broker: str, tmp_path: Path, harnesses: list[Harness]) -> None:
    from tests.peers.runners import SeedPhpPeer, require_peer

    require_peer("seedphp")
    with SeedPhpPeer.start() as peer:
        # Two JSON documents back to back, success "true", message_uuids echo of whatever we send.
        assert _poll_task(clean_broker, peer.url, "123456", tmp_path) == ["1ba368bd-c467-4374-bf28"]
        h = Harness(clean_broker, peer.url, secret="123456")
        harnesses.append(h)
        h.publish(sent("1ba368bd-c467-4374-bf28"))
        h.held(1)
        # It answers the result POST with 200 text/html and an empty body: accepted.
        assert h.reporter.round().reported == 1
        assert h.stop() == []


@pytest.mark.peers
def test_lykmapipo_task_sent_and_result_legs(clean_broker: str, tmp_path: Path, harnesses: list[Harness]) -> None:
    from tests.peers.runners import LykmapipoPeer, require_peer

    require_peer("lykmapipo")
    with LykmapipoPeer.start(secret="s3cret") as peer:
        # It answers ?task=sent with the queued_messages key instead of message_uuids.
        assert _poll_task(clean_broker, peer.url, "s3cret", tmp_path) == ["out-0001"]
        assert peer.state()["queued"] == ["out-0001"]
        h = Harness(
            clean_broker, peer.url, secret="s3cret", SMSGW_RESULTS_SHAPE="message_result_array", SMSGW_SENT_OK_CODE="-1"
        )
        harnesses.append(h)
        h.publish(sent("out-0001"), delivered("out-0001"))
        h.held(2)
        assert h.reporter.round().reported == 1
        [[row]] = peer.state()["delivered"]
        assert (row["uuid"], row["sent_result_code"], row["delivered_result_code"]) == ("out-0001", -1, -1)
        assert h.stop() == []


# --- issue 8: one line per distinct problem, servers that read another body shape -------------------------------


def test_a_server_asking_again_for_final_results_it_accepted_gets_one_shape_warning(
    clean_broker: str, harnesses: list[Harness], scripted: ScriptedServer, caplog: pytest.LogCaptureFixture
) -> None:
    # It answers 2xx to every POST but never finds the rows (it reads another key): it keeps asking.
    scripted.waiting = ["failed-send", "sent-only"]
    h = Harness(clean_broker, scripted.stub.url, keep_rounds=20)
    harnesses.append(h)
    h.publish(sent("failed-send", "failed", 331, detail="no network"), sent("sent-only"))
    h.held(2)
    assert h.reporter.round().reported == 2
    with caplog.at_level(logging.WARNING, logger="result_reporter.reporter"):
        for index in range(5):  # something held, so each round asks the server what it waits for
            h.publish(sent(f"other-{index}"))
            h.held(1)
            h.reporter.round()
    warnings = [r.getMessage() for r in caplog.records if "results_shape" in r.getMessage()]
    assert len(warnings) == 1, warnings
    # Only the final result counts: "sent-only" may legitimately wait for its delivery report.
    assert "1 final result(s)" in warnings[0] and "failed-send" in warnings[0]
    assert "results_shape message_results" in warnings[0]
    assert "message_result_string or message_result_array" in warnings[0] and "SMSGW_RESULTS_SHAPE" in warnings[0]


def test_a_quiet_gateway_gets_the_shape_warning_without_busy_rounds(
    clean_broker: str, harnesses: list[Harness], scripted: ScriptedServer, caplog: pytest.LogCaptureFixture
) -> None:
    scripted.waiting = ["failed-send"]
    h = Harness(clean_broker, scripted.stub.url, keep_rounds=20)
    harnesses.append(h)
    h.publish(sent("failed-send", "failed", 331, detail="no network"))
    h.held(1)
    assert h.reporter.round().reported == 1
    with caplog.at_level(logging.WARNING, logger="result_reporter.reporter"):
        for _ in range(4):  # nothing new to report: the rounds still ask whether the server let go of it
            h.reporter.round()
    warnings = [r.getMessage() for r in caplog.records if "results_shape" in r.getMessage()]
    assert len(warnings) == 1 and "failed-send" in warnings[0], warnings
    gets = sum(1 for r in scripted.stub.requests if r.method == "GET")
    h.reporter.round()  # warned: quiet rounds are idle again
    assert sum(1 for r in scripted.stub.requests if r.method == "GET") == gets


def test_a_server_that_lets_go_of_an_accepted_result_ends_the_shape_watch(
    clean_broker: str, harnesses: list[Harness], scripted: ScriptedServer, caplog: pytest.LogCaptureFixture
) -> None:
    scripted.waiting = ["failed-send"]
    h = Harness(clean_broker, scripted.stub.url, keep_rounds=20)
    harnesses.append(h)
    h.publish(sent("failed-send", "failed", 331, detail="no network"))
    h.held(1)
    assert h.reporter.round().reported == 1
    scripted.waiting = []  # it read our shape
    with caplog.at_level(logging.WARNING, logger="result_reporter.reporter"):
        for _ in range(4):
            h.reporter.round()
    assert [r for r in caplog.records if "results_shape" in r.getMessage()] == []
    assert sum(1 for r in scripted.stub.requests if r.method == "GET") == 2  # one round to see it, then idle


def test_a_404_to_the_results_post_hints_at_the_shape(
    clean_broker: str, harnesses: list[Harness], scripted: ScriptedServer
) -> None:
    scripted.waiting = ["u-404"]
    scripted.post_status, scripted.post_body = 404, "Not Found"
    h = Harness(clean_broker, scripted.stub.url, SMSGW_RESULTS_SHAPE="message_result_string")
    harnesses.append(h)
    h.publish(sent("u-404"))
    h.held(1)
    with pytest.raises(RoundError) as caught:
        h.reporter.round()
    assert "HTTP 404 (it answers GET ?task=result, so it probably reads another body than results_shape " in str(
        caught.value
    )
    assert "try message_results or message_result_array (results_shape, SMSGW_RESULTS_SHAPE)" in str(caught.value)


def test_a_server_refusing_rows_it_does_not_understand_names_sent_ok_code_and_the_shape(
    clean_broker: str, harnesses: list[Harness], scripted: ScriptedServer
) -> None:
    scripted.waiting = ["u-code"]
    scripted.post_body = '{"payload":{"success":false,"error":"unknown sent_result_code 0"}}'
    h = Harness(clean_broker, scripted.stub.url)  # sent_ok_code 0 (the docs) against a server reading -1
    harnesses.append(h)
    h.publish(sent("u-code"))
    h.held(1)
    with pytest.raises(RoundError) as caught:
        h.reporter.round()
    assert "unknown sent_result_code 0" in str(caught.value)
    assert "try sent_ok_code -1 instead of 0 (SMSGW_SENT_OK_CODE)" in str(caught.value)
    assert "message_result_string or message_result_array" in str(caught.value)


def test_a_delivery_report_the_server_no_longer_asks_for_is_dropped_at_info(
    clean_broker: str, harnesses: list[Harness], scripted: ScriptedServer, caplog: pytest.LogCaptureFixture
) -> None:
    scripted.waiting = ["u-1"]
    h = Harness(clean_broker, scripted.stub.url, keep_rounds=2)
    harnesses.append(h)
    h.publish(sent("u-1"))
    h.held(1)
    assert h.reporter.round().reported == 1
    scripted.waiting = []  # many servers stop asking once they have the sent result
    h.publish(delivered("u-1"), sent("never-asked"))
    h.held(2)
    with caplog.at_level(logging.INFO, logger="result_reporter.reporter"):
        h.reporter.round()
        assert h.reporter.round().dropped == 2
    dropped = {r.getMessage().split(": ", 1)[1]: r.levelno for r in caplog.records if "dropped the" in r.getMessage()}
    assert sorted(dropped.values()) == [logging.INFO, logging.WARNING]
    assert [level for text, level in dropped.items() if "delivery report of u-1" in text] == [logging.INFO]
    assert [level for text, level in dropped.items() if "never-asked" in text] == [logging.WARNING]
    assert h.stop() == []


def test_an_html_error_page_is_named_by_its_title(
    clean_broker: str, harnesses: list[Harness], scripted: ScriptedServer
) -> None:
    scripted.waiting = ["u-1"]
    scripted.post_status = 500
    scripted.post_body = "<html><head><title>UnicodeEncodeError // Werkzeug Debugger</title><style>x{}</style>"
    h = Harness(clean_broker, scripted.stub.url)
    harnesses.append(h)
    h.publish(sent("u-1"))
    h.held(1)
    with pytest.raises(RoundError, match=r"HTTP 500: UnicodeEncodeError // Werkzeug Debugger$"):
        h.reporter.round()
