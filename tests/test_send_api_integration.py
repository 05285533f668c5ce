"""The send API against real services: RabbitMQ (a vhost of the test's own, confirmed publishes, real queue
depths), the SQL message store on SQLite and PostgreSQL, HTTP on loopback; and ``python -m send_api`` as a
process (serves, ``--check``, drains on SIGTERM)."""

from __future__ import annotations

import concurrent.futures
import dataclasses
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pika
import pytest
import requests

from send_api.accept import Acceptor, message_id
from send_api.app import build_app
from send_api.limits import QueueDepths, RateLimiter
from send_api.server import ApiServer, bind
from send_api.settings import Credentials, Keyring
from send_api.web import ApiContext
from services.broker import Publication, PublisherThread
from services.config import FleetConfig
from services.config.fleet import Route, env_endpoint
from services.ledger.api_messages import ApiMessages, open_api_messages
from services.platforms.rapidpro import part_client_id
from services.schemas import OutboundSms
from services.topology import OUTBOUND_QUEUE, Topology, declare_topology, outbound_queue_for
from tests.conftest import wait_for

ROOT = Path(__file__).resolve().parents[1]
KEYS = (
    Credentials("rp", "rapidpro", api_key="rp-key"),
    Credentials("kn", "kannel", username="kuser", password="kpass"),
    Credentials("hook", "webhook", api_key="rest-key"),
)
MAX_QUEUED = 5


@dataclass
class LiveApi:
    url: str
    amqp_url: str
    store: ApiMessages

    def queued(self, queue: str) -> list[OutboundSms]:
        """Take every message off ``queue`` (acked)."""
        connection = pika.BlockingConnection(pika.URLParameters(self.amqp_url))
        try:
            channel = connection.channel()
            found: list[OutboundSms] = []
            while True:
                method, _, body = channel.basic_get(queue, auto_ack=True)
                if method is None:
                    return found
                found.append(OutboundSms.from_json(body))
        finally:
            connection.close()


@pytest.fixture
def live_api(fresh_amqp_url: str, ledger_url: str, tmp_path: Path) -> Iterator[LiveApi]:
    base = env_endpoint({})
    fleet = FleetConfig(
        "test", tuple(dataclasses.replace(base, name=c.endpoint) for c in KEYS), routes=(Route("+2557", ("m0",)),)
    )
    store = open_api_messages(ledger_url, str(tmp_path))
    publisher = PublisherThread(fresh_amqp_url, "test-send-api", topology=Topology.of(fleet, ["m0"]))
    depths = QueueDepths(fresh_amqp_url)
    acceptor = Acceptor(fleet, publisher, store, depths=depths, rate=RateLimiter(100), max_queued=MAX_QUEUED)
    server = ApiServer(
        build_app(ApiContext(acceptor, Keyring(KEYS), store, 65536), heartbeat=False), bind("127.0.0.1", 0)
    )
    assert server.start()
    try:
        yield LiveApi(f"http://127.0.0.1:{server.port}", fresh_amqp_url, store)
    finally:
        server.drain()
        assert server.join(30)
        server.close()
        publisher.close()
        depths.close()
        store.close()


def test_courier_retrying_one_id_puts_one_message_on_the_queue_and_one_row_in_the_store(live_api: LiveApi) -> None:
    form = {"id": "991", "text": "Karibu", "to": "+255700000001", "channel": "c"}

    def post() -> requests.Response:
        return requests.post(
            f"{live_api.url}/rapidpro/rp", data=form, headers={"Authorization": "Token rp-key"}, timeout=30
        )

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(lambda _: post(), range(4)))
    answers.append(post())
    assert [a.status_code for a in answers] == [200] * 5
    expected = message_id("rp", part_client_id("991", "Karibu"), "+255700000001")
    assert {a.json()["message_id"] for a in answers} == {expected}
    [sms] = wait_for(lambda: live_api.queued(outbound_queue_for("m0")), what="the message on m0's queue")
    assert (sms.uuid, sms.ledger_key, sms.origin, sms.report, sms.endpoint, sms.modems) == (
        expected,
        expected,
        "task",
        True,
        "rp",
        ["m0"],
    )
    assert live_api.queued(outbound_queue_for("m0")) == [], "exactly one copy was published"
    stored = live_api.store.get(expected)
    assert (
        stored is not None
        and stored.client_id == part_client_id("991", "Karibu")
        and [c.state for c in stored.history] == ["queued"]
    )


def test_kannel_over_real_services(live_api: LiveApi) -> None:
    params = {"username": "kuser", "password": "kpass", "to": "+255800000001", "text": "Hi", "dlr-mask": "31"}
    params["dlr-url"] = "http://127.0.0.1:9/dlr?status=%d"
    accepted = requests.get(f"{live_api.url}/cgi-bin/sendsms", params=params, timeout=30)
    assert (accepted.status_code, accepted.text) == (202, "0: Accepted for delivery")
    refused = requests.get(f"{live_api.url}/cgi-bin/sendsms", params={**params, "password": "no"}, timeout=30)
    assert (refused.status_code, refused.text) == (403, "Authorization failed for sendsms")
    [sms] = wait_for(lambda: live_api.queued(OUTBOUND_QUEUE), what="the Kannel message on the shared queue")
    stored = live_api.store.get(sms.uuid)
    assert stored is not None and (stored.status_url, stored.status_mask) == (params["dlr-url"], 31)


def test_a_full_queue_is_503_with_retry_after(live_api: LiveApi) -> None:
    connection = pika.BlockingConnection(pika.URLParameters(live_api.amqp_url))
    try:
        channel = connection.channel()
        declare_topology(channel, Topology(modems=("m0",)))
        channel.confirm_delivery()
        for index in range(MAX_QUEUED + 1):
            sms = OutboundSms(f"filler-{index}", "+255800000009", "x", "task", 0)
            channel.basic_publish("", OUTBOUND_QUEUE, Publication(OUTBOUND_QUEUE, sms.to_json()).body)
    finally:
        connection.close()
    body = {"to": "+255800000001", "text": "x", "id": "full"}
    answer = requests.post(
        f"{live_api.url}/api/v1/messages", json=body, headers={"Authorization": "Bearer rest-key"}, timeout=30
    )
    assert answer.status_code == 503 and int(answer.headers["Retry-After"]) >= 1
    assert live_api.store.get(message_id("hook", "full", "+255800000001")) is None
    routed = {"to": "+255700000001", "text": "x", "id": "routed"}  # m0's own queue is empty: accepted
    ok = requests.post(
        f"{live_api.url}/api/v1/messages", json=routed, headers={"Authorization": "Bearer rest-key"}, timeout=30
    )
    assert ok.status_code == 202


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_the_worker_serves_answers_its_check_and_drains_on_sigterm(fresh_amqp_url: str, tmp_path: Path) -> None:
    port = _free_port()
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("SMSGW_")},
        "SMSGW_AMQP_URL": fresh_amqp_url,
        "SMSGW_API_PORT": str(port),
        "SMSGW_METRICS_PORT": "0",
        "SMSGW_STATE_DIR": str(tmp_path / "state"),
        "SMSGW_HEARTBEAT_DIR": str(tmp_path / "heartbeat"),
    }
    worker = subprocess.Popen(
        [sys.executable, "-m", "send_api"], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:

        def answers() -> bool:
            try:
                return requests.get(f"http://127.0.0.1:{port}/api/v1/openapi.json", timeout=2).status_code == 200
            except requests.ConnectionError:
                assert worker.poll() is None, worker.communicate()
                return False

        wait_for(answers, timeout=60, what="send_api answering")
        check = subprocess.run(
            [sys.executable, "-m", "send_api", "--check"],
            check=False,
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert (check.returncode, check.stdout.strip()) == (0, "ok"), check.stderr
        refused = requests.post(f"http://127.0.0.1:{port}/api/v1/messages", json={}, timeout=10)
        assert refused.status_code == 401, "env-only: no endpoint has an api_key"
        worker.send_signal(signal.SIGTERM)
        out, err = worker.communicate(timeout=60)
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.communicate()
    assert worker.returncode == 0, err
    assert "send_api stopped" in out and "no endpoint" in out
    assert "rest-key" not in out
