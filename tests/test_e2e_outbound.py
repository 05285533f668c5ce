"""Issue 3 acceptance, black-box: task_poller + modem_worker + result_reporter as real processes.

The Sync server here is deliberately awkward: it answers ``?task=send`` with two JSON documents back to back,
keeps offering every message even after ``?task=sent`` acknowledged it, and answers 403 to a wrong secret.
"""

from __future__ import annotations

import json
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from scripts.stack import Simulator, Stack
from tests.conftest import wait_for
from tests.http_stub import HttpStub, Request

SECRET = "p&ss=w ord"  # must survive URL encoding
TEXTS = [
    "Reminder: clinic opens at 8",
    "Kumbusho: kliniki saa mbili 🏥",
    "Recordatorio: mañana a las 8",
    "提醒：明天八点开门",
    "تذكير: العيادة تفتح الساعة 8",
    "Long " + "notice " * 40,
]


class AwkwardServer:
    """A Sync server that queues 12 SMS and records everything the gateway asks."""

    def __init__(self) -> None:
        self.messages = [
            {"to": f"+2557500{i:05d}", "message": TEXTS[i % len(TEXTS)] + f" #{i}", "uuid": str(uuid.uuid4())}
            for i in range(12)
        ]
        self.acknowledged: set[str] = set()
        self.results: dict[str, dict[str, Any]] = {}
        self.secrets_seen: list[str | None] = []
        self.polls = 0
        self.lock = threading.Lock()
        self.stub = HttpStub(self.respond)

    def respond(self, request: Request) -> tuple[int, str]:
        task = request.query.get("task")
        with self.lock:
            if request.method == "POST" and task == "sent":
                uuids = json.loads(request.body)["queued_messages"]
                self.acknowledged.update(uuids)
                return 200, json.dumps({"message_uuids": uuids})
            self.secrets_seen.append(request.query.get("secret"))
            if request.query.get("secret") != SECRET:
                return 403, '{"payload":{"success":false,"error":"wrong secret"}}'
            if task == "send":
                self.polls += 1
                first = {"payload": {"success": "true", "task": "send", "secret": SECRET, "messages": self.messages}}
                return 200, json.dumps(first) + json.dumps({"message_uuids": [m["uuid"] for m in self.messages]})
            if task == "result" and request.method == "GET":
                return 200, json.dumps(
                    {"message_uuids": [m["uuid"] for m in self.messages if m["uuid"] not in self.results]}
                )
            if task == "result":
                for row in json.loads(request.body)["message_results"]:
                    self.results[row["uuid"]] = row
                return 200, ""
        return 404, "{}"


@pytest.fixture
def server() -> Iterator[AwkwardServer]:
    srv = AwkwardServer()
    srv.stub.start()
    yield srv
    srv.stub.stop()


@pytest.fixture
def stack(fresh_amqp_url: str, server: AwkwardServer, tmp_path: Path) -> Iterator[Stack]:
    st = Stack(
        tmp_path,
        fresh_amqp_url,
        server.stub.url,
        SECRET,
        env={
            "SMSGW_MESSAGE_RESULTS": "true",
            "SMSGW_TASK_INTERVAL": "1",
            "SMSGW_RESULT_INTERVAL": "1",
        },
    )
    yield st
    st.stop_all()


def texts_sent(simulator: Simulator) -> list[str]:
    return sorted(o["text"] for o in simulator.outbox())


def expected(server: AwkwardServer) -> list[str]:
    return sorted(m["message"] for m in server.messages)


def test_twelve_tasks_sent_once_acknowledged_and_reported(stack: Stack, server: AwkwardServer) -> None:
    simulator = stack.start_simulator("simulator", "+255754000001")
    stack.start_modem_worker("modem_worker", simulator, "modem-a")
    stack.start("task_poller", "task_poller")
    stack.start("result_reporter", "result_reporter")
    wait_for(lambda: texts_sent(simulator) == expected(server), timeout=60, what="12 SMS in the outbox")
    wait_for(lambda: len(server.results) == 12, timeout=60, what="a result row for every uuid")
    polls_then = server.polls
    wait_for(lambda: server.polls >= polls_then + 3, timeout=30, what="three more polls")
    assert texts_sent(simulator) == expected(server), "no SMS may be sent twice"
    assert server.acknowledged == {m["uuid"] for m in server.messages}
    assert all(row["sent_result_code"] == 0 for row in server.results.values())
    assert set(server.secrets_seen) == {SECRET}, "no request may carry a wrong secret"
    for name in ("modem_worker", "task_poller", "result_reporter"):
        log_text = stack.log_text(name)
        assert SECRET not in log_text and "p%26ss" not in log_text and "Kumbusho" not in log_text


@pytest.mark.parametrize("victim", ["task_poller", "modem_worker"])
def test_kill_9_mid_batch_sends_each_once(stack: Stack, server: AwkwardServer, victim: str) -> None:
    simulator = stack.start_simulator("simulator", "+255754000001")
    # Slow sends down so the kill lands in the middle of the batch.
    simulator.set_state(send_delay_s=0.3)
    stack.start_modem_worker("modem_worker", simulator, "modem-a")
    stack.start("task_poller", "task_poller")
    wait_for(lambda: len(simulator.outbox()) >= 3, timeout=60, what="the batch to start")
    stack.kill(victim)
    stack.restart(victim)
    wait_for(lambda: len(simulator.outbox()) >= 12, timeout=90, what="the rest of the batch")
    polls_then = server.polls
    wait_for(lambda: server.polls >= polls_then + 3, timeout=30, what="three more polls")
    assert texts_sent(simulator) == expected(server)


def test_two_poller_replicas_never_send_twice(stack: Stack, server: AwkwardServer) -> None:
    simulator = stack.start_simulator("simulator", "+255754000001")
    stack.start_modem_worker("modem_worker", simulator, "modem-a")
    stack.start("task_poller", "task_poller")
    stack.start("task_poller_2", "task_poller")
    wait_for(lambda: len(simulator.outbox()) >= 12, timeout=60, what="12 SMS in the outbox")
    polls_then = server.polls
    wait_for(lambda: server.polls >= polls_then + 4, timeout=30, what="more polls by both replicas")
    assert texts_sent(simulator) == expected(server)
