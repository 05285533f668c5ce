"""Issue 15 acceptance, black-box: RapidPro's courier, Kannel clients, the REST API with webhooks, and an SMSsync
endpoint beside a RapidPro one.

Every worker is the real process an operator runs (scripts/stack.py) reading a fleet file; the modems are
simulators on ptys, RabbitMQ is real (one vhost per test), the platforms are the doubles of tests/doubles
(courier's External channel, a Kannel client with its dlr-url, a webhook receiver verifying signatures with the
recipe of docs/integrations.md). "Nothing sent twice" is checked with a sentinel: a later message to the same
routed modem goes through the same queue, so once it is out, a duplicate published before it would be out too.
Stack logs are in ``<tmp_path>/logs``.
"""

from __future__ import annotations

import json
import re
import signal
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

import pytest

from reference_server.server import ReferenceServer
from scripts.stack import Simulator, Stack
from tests.conftest import free_port, wait_for
from tests.doubles.courier import Courier
from tests.doubles.kannel import (
    ACCEPTED,
    AUTH_FAILED,
    DLR_ALL,
    DLR_DELIVERED,
    DLR_SMSC_SUBMIT,
    KannelCallbacks,
    sendsms,
)
from tests.doubles.webhook import RFC3339, WebhookReceiver
from tests.test_e2e_fleet import metric, modem_up, toml_str, tracebacks

RAPIDPRO_KEY = "rp-4pi-k3y"
KANNEL_PASSWORD = "kannel-pa55"
SHOP_KEY = "shop-4pi-k3y"
SIGNING_KEY = "whk-s1gning-k3y"
CLINIC_SECRET = "clinic-s3cret"
ROUTED = "+25573"  # prefix routed to modem-a alone
SECRETS = (RAPIDPRO_KEY, KANNEL_PASSWORD, SHOP_KEY, SIGNING_KEY, CLINIC_SECRET)


# --- helpers ---------------------------------------------------------------------------------------------------


class Api:
    """The send_api worker of a stack: its port, its metrics port, and JSON requests to it."""

    def __init__(self, stack: Stack, env: dict[str, str] | None = None) -> None:
        self.port, self.metrics_port = free_port(), free_port()
        stack.start(
            "send_api",
            "send_api",
            env={
                "SMSGW_API_ADDR": "127.0.0.1",
                "SMSGW_API_PORT": str(self.port),
                "SMSGW_METRICS_PORT": str(self.metrics_port),
                "SMSGW_API_RATE": "1000",
                **(env or {}),
            },
        )
        wait_for(self._serving, timeout=60, interval=0.2, what="send_api serving its OpenAPI document")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _serving(self) -> bool:
        try:
            return self.request("GET", "/api/v1/openapi.json")[0] == 200
        except OSError:
            return False

    def request(self, method: str, path: str, payload: Any = None, key: str = "") -> tuple[int, Any, dict[str, str]]:
        """(status, the JSON answer or its text, headers with lower-cased names)."""
        headers = {"Content-Type": "application/json"} if payload is not None else {}
        if key:
            headers["Authorization"] = f"Bearer {key}"
        data = json.dumps(payload).encode() if payload is not None else None
        request = urllib.request.Request(f"{self.url}{path}", data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                status, body, got = response.status, response.read(), response.headers.items()
        except urllib.error.HTTPError as exc:
            status, body, got = exc.code, exc.read(), exc.headers.items()
        try:
            answer: Any = json.loads(body)
        except ValueError:
            answer = body.decode("utf-8", "replace")
        return status, answer, {k.lower(): v for k, v in got}


def message_ids(answer: Any) -> list[str]:
    """Every message id in a REST API answer (``id`` / ``message_id`` at any depth), in order."""
    found: list[str] = []
    if isinstance(answer, dict):
        for name, value in answer.items():
            if name in ("id", "message_id") and isinstance(value, str):
                found.append(value)
            else:
                found += message_ids(value)
    elif isinstance(answer, list):
        for item in answer:
            found += message_ids(item)
    return list(dict.fromkeys(found))


def sent_texts(*simulators: Simulator) -> Counter[str]:
    """How often each text left through any of ``simulators``."""
    return Counter(o["text"] for sim in simulators for o in sim.outbox())


def start_modems(stack: Stack, *letters: str) -> dict[str, Simulator]:
    """A simulator and a modem worker for each of ``letters`` (modem-a, modem-b ...), once each modem is up."""
    sims: dict[str, Simulator] = {}
    for n, letter in enumerate(letters, 1):
        sims[letter] = stack.start_simulator(f"simulator_{letter}", f"+25575400000{n}")
        port = free_port()
        stack.start_modem_worker(
            f"modem_worker_{letter}", sims[letter], f"modem-{letter}", env={"SMSGW_METRICS_PORT": str(port)}
        )
        wait_for(partial(modem_up, port, f"modem-{letter}"), timeout=60, what=f"modem-{letter} up")
    return sims


def assert_clean_logs(stack: Stack) -> None:
    """No traceback and no secret in any worker's log."""
    for name in stack.processes:
        text = stack.log_text(name)
        assert tracebacks(text) == [], f"{name} logged a traceback"
        leaked = [secret for secret in SECRETS if secret in text]
        assert not leaked, f"{name} logged a secret"


def is_rfc3339_utc_now(value: str) -> bool:
    """Whether ``value`` is RFC 3339 and within 10 minutes of now."""
    if not RFC3339.match(value):
        return False
    at = datetime.fromisoformat(re.sub(r"(\.\d{6})\d+", r"\1", value).replace("Z", "+00:00"))
    return abs((datetime.now(UTC) - at).total_seconds()) < 600


@pytest.fixture
def stack(fresh_amqp_url: str, tmp_path: Path) -> Iterator[Stack]:
    st = Stack(tmp_path, fresh_amqp_url)
    yield st
    st.stop_all()


@pytest.fixture
def courier() -> Iterator[Courier]:
    double = Courier().start()
    yield double
    double.stop()


def rapidpro_endpoint(courier: Courier, keywords: str = "") -> str:
    return f"""
[[endpoints]]
name = "rapidpro"
kind = "rapidpro"
receive_url = {toml_str(courier.receive_url)}
api_key = {toml_str(RAPIDPRO_KEY)}
{keywords}
"""


# --- 1. RapidPro: a flow message out once despite courier's retry; sent/delivered and an inbound SMS back ----


def test_rapidpro_flow_message_goes_out_once_and_courier_gets_states_and_inbound(
    stack: Stack, courier: Courier
) -> None:
    stack.write_config(
        rapidpro_endpoint(courier)
        + f"""
[[routes]]
prefix = "{ROUTED}"
modems = ["modem-a"]

[modems.modem-a]
[modems.modem-b]
"""
    )
    sims = start_modems(stack, "a", "b")
    stack.start("sync_worker", "sync_worker")
    stack.start("result_reporter", "result_reporter")
    api = Api(stack)
    courier.response_check = "queued"  # the channel's "Response content", as docs/integrations.md says
    send_url = f"{api.url}/rapidpro/rapidpro"
    send = partial(courier.send, send_url, authorization=f"Token {RAPIDPRO_KEY}", to=f"{ROUTED}0000001")

    # Courier's client times out after sending; courier sends the same id again (it cannot know it arrived).
    text = "Your clinic visit is tomorrow at 9"
    [first] = send(message_id=10071, text=text, time_out_after_sending=True)
    assert first.outcome == "connection_failed"
    [retry] = send(message_id=10071, text=text)
    assert retry.outcome == "ok" and retry.status in (200, 201, 202), retry
    wait_for(lambda: text in sent_texts(sims["a"]), timeout=60, what="the flow message sent by modem-a")
    # Much later, once more (courier's next retry after a lost answer): still accepted, nothing sent again.
    [late] = send(message_id=10071, text=text)
    assert late.outcome == "ok", late
    [sentinel] = send(message_id=10072, text="sentinel after the retries")
    assert sentinel.outcome == "ok", sentinel
    wait_for(lambda: "sentinel after the retries" in sent_texts(sims["a"]), timeout=60, what="the sentinel sent")
    assert sent_texts(sims["a"], sims["b"])[text] == 1, "a retried id must never be sent twice"
    assert sent_texts(sims["b"]) == Counter(), "routed messages leave only through the routed modem"
    duplicates = metric(api.metrics_port, "smsgw_api_messages_total", endpoint="rapidpro", outcome="duplicate")
    assert duplicates is not None and duplicates >= 1

    # sent then delivered reach courier with RapidPro's id.
    wait_for(
        lambda: {"sent", "delivered"} <= set(courier.statuses(10071)),
        timeout=60,
        what="sent and delivered of message 10071 at courier",
    )
    states = courier.statuses(10071)
    assert "failed" not in states and states.index("sent") < states.index("delivered"), states
    assert all(call.status == 200 for call in courier.calls()), "courier refused a call of the gateway"

    # An SMS texted to the gateway reaches courier's receive URL with from, text and an RFC 3339 date.
    sims["b"].inject("+255700000001", "JOIN the reminders")
    received = wait_for(lambda: courier.accepted("receive"), timeout=60, what="the inbound SMS at courier")
    assert [(f["from"], f["text"]) for f in received] == [("+255700000001", "JOIN the reminders")]
    assert is_rfc3339_utc_now(received[0]["date"]), received[0]
    assert_clean_logs(stack)


# --- 2. Kannel: sendsms with dlr-mask 31, its dlr-url called with 8 then 1; wrong password; inbound get_url --


def test_kannel_client_sends_gets_its_dlrs_and_inbound_calls_the_get_url(stack: Stack) -> None:
    callbacks = KannelCallbacks().start()
    try:
        _kannel_scenario(stack, callbacks)
    finally:
        stack.stop_all()
        callbacks.stop()


def _kannel_scenario(stack: Stack, callbacks: KannelCallbacks) -> None:
    stack.write_config(f"""
[[endpoints]]
name = "kannel"
kind = "kannel"
get_url = {toml_str(callbacks.get_url())}
username = "app"
password = {toml_str(KANNEL_PASSWORD)}
""")
    sims = start_modems(stack, "a")
    stack.start("sync_worker", "sync_worker")
    stack.start("result_reporter", "result_reporter")
    api = Api(stack)
    params = {
        "username": "app",
        "password": KANNEL_PASSWORD,
        "to": "+255754000020",
        "text": "Kannel says hello",
        "dlr-mask": str(DLR_ALL),
        "dlr-url": callbacks.dlr_url("k1"),
    }
    status, body, _ = sendsms(api.url, params)
    assert (status, body.strip()) == (202, ACCEPTED)
    wait_for(
        lambda: callbacks.dlr_types("k1") == [DLR_SMSC_SUBMIT, DLR_DELIVERED],
        timeout=60,
        what="the dlr-url called with 8 (sent) then 1 (delivered)",
    )
    [first_dlr, _] = callbacks.dlr_calls()
    assert first_dlr.query["to"] == "+255754000020" and first_dlr.query["id"], "%p and %I filled"

    status, body, _ = sendsms(api.url, {**params, "password": "wrong", "text": "must not be sent"})
    assert (status, body.strip()) == (403, AUTH_FAILED)
    status, body, _ = sendsms(api.url, {**params, "text": "by POST"}, method="POST")
    assert (status, body.strip()) == (202, ACCEPTED)
    wait_for(lambda: "by POST" in sent_texts(sims["a"]), timeout=60, what="the POSTed sendsms sent")
    assert sent_texts(sims["a"]) == Counter({"Kannel says hello": 1, "by POST": 1})

    sims["a"].inject("+255700000002", "HELP me please")
    [inbound] = wait_for(callbacks.inbound, timeout=60, what="the get_url called for the inbound SMS")
    assert inbound["from"] == "+255700000002" and inbound["text"] == "HELP me please"
    assert inbound["to"] == "+255754000001" and inbound["word"] == "HELP" and inbound["rest"] == "me please"
    assert inbound["nplus"] == "+255700000002" and inbound["id"]  # %q: %p with a leading 00 as +
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d", inbound["time"]) and inbound["epoch"].isdigit()  # Kannel's %t
    assert not any("%" in value for value in inbound.values()), f"a placeholder left unfilled: {inbound}"
    assert_clean_logs(stack)


# --- 3. REST API: the same id twice is one SMS; signed webhook events; 503 + Retry-After under a full queue ---


def test_rest_api_is_idempotent_webhooks_verify_and_a_full_queue_answers_503(stack: Stack) -> None:
    receiver = WebhookReceiver(SIGNING_KEY).start()
    try:
        _rest_api_scenario(stack, receiver)
    finally:
        stack.stop_all()
        receiver.stop()


def _rest_api_scenario(stack: Stack, receiver: WebhookReceiver) -> None:
    stack.write_config(f"""
[[endpoints]]
name = "shop"
kind = "webhook"
url = {toml_str(receiver.url)}
signing_key = {toml_str(SIGNING_KEY)}
api_key = {toml_str(SHOP_KEY)}
""")
    sims = start_modems(stack, "a")
    stack.start("sync_worker", "sync_worker")
    stack.start("result_reporter", "result_reporter")
    api = Api(stack, env={"SMSGW_API_MAX_QUEUED": "5"})
    order = {"id": "order-4711", "to": "+255754000010", "text": "Your order has shipped"}
    first = api.request("POST", "/api/v1/messages", order, SHOP_KEY)
    again = api.request("POST", "/api/v1/messages", order, SHOP_KEY)
    assert first[0] == 202 and again[0] == 202, (first, again)
    [message_id] = message_ids(first[1])
    assert message_ids(again[1]) == [message_id], "a retried request answers the same message"
    assert api.request("POST", "/api/v1/messages", order, "wrong key")[0] == 401
    sentinel = {"id": "order-4712", "to": "+255754000011", "text": "sentinel"}
    assert api.request("POST", "/api/v1/messages", sentinel, SHOP_KEY)[0] == 202
    wait_for(lambda: "sentinel" in sent_texts(sims["a"]), timeout=60, what="the sentinel sent")
    assert sent_texts(sims["a"])["Your order has shipped"] == 1, "the same id twice must be one SMS"

    # Signed events: sent and delivered of the message, received for an SMS texted in; all verify.
    wait_for(
        lambda: {"sms:sent", "sms:delivered"} <= {e["event"] for e in receiver.verified() if e.get("id") == message_id},
        timeout=60,
        what="sms:sent and sms:delivered at the webhook",
    )
    [sent_event] = [e for e in receiver.verified("sms:sent") if e["id"] == message_id]
    assert sent_event["client_id"] == "order-4711" and sent_event["to"] == "+255754000010"
    assert is_rfc3339_utc_now(sent_event["at"])
    sims["a"].inject("+255700000003", "Where is my parcel?")
    [received] = wait_for(lambda: receiver.verified("sms:received"), timeout=60, what="sms:received")
    assert received["from"] == "+255700000003" and received["text"] == "Where is my parcel?"
    assert is_rfc3339_utc_now(received["received_at"]) and received["id"]
    assert [e.signature_error for e in receiver.events() if e.signature_error is not None] == [], "every event verifies"
    status, state, _ = api.request("GET", f"/api/v1/messages/{message_id}", key=SHOP_KEY)
    assert status == 200 and "delivered" in json.dumps(state), state

    # Backpressure: no modem takes work, so the outbound queue fills past SMSGW_API_MAX_QUEUED = 5.
    stack.kill("modem_worker_a", signal.SIGTERM)
    accepted, refused = _fill_until_refused(api)
    assert len(accepted) >= 5, f"refused before the limit: {len(accepted)} accepted"
    status, answer, headers = refused
    assert status == 503 and int(headers["retry-after"]) > 0, (status, answer, headers)
    # Nothing accepted is lost: the modem comes back and sends every accepted message.
    stack.restart("modem_worker_a")
    wait_for(
        lambda: set(accepted) <= set(sent_texts(sims["a"])), timeout=90, what="the accepted backlog sent after restart"
    )
    assert max(sent_texts(sims["a"]).values()) == 1
    assert_clean_logs(stack)


def _fill_until_refused(api: Api) -> tuple[list[str], tuple[int, Any, dict[str, str]]]:
    """POST new messages, one every 0.1 s (a paced client: send_api reads a queue's depth at most once a second),
    until one is refused; (the accepted texts, the refusal). Fails after 200 requests."""
    accepted: list[str] = []
    for n in range(200):
        if n:
            time.sleep(0.1)  # pacing the client, not waiting for a state
        text = f"backlog #{n}"
        answer = api.request(
            "POST", "/api/v1/messages", {"id": f"bulk-{n}", "to": "+255754000012", "text": text}, SHOP_KEY
        )
        if answer[0] != 202:
            return accepted, answer
        accepted.append(text)
    pytest.fail(f"200 messages accepted with no modem and SMSGW_API_MAX_QUEUED=5: {accepted[-1]}")


# --- 4. an SMSsync endpoint and a RapidPro endpoint side by side, each getting its own SMS ---------------------


def test_smssync_and_rapidpro_endpoints_side_by_side_each_get_their_own_sms(stack: Stack, courier: Courier) -> None:
    clinic = ReferenceServer(CLINIC_SECRET).start()
    try:
        _side_by_side_scenario(stack, courier, clinic)
    finally:
        stack.stop_all()
        clinic.stop()


def _side_by_side_scenario(stack: Stack, courier: Courier, clinic: ReferenceServer) -> None:
    stack.write_config(
        f"""
[[endpoints]]
name = "clinic"
sync_url = {toml_str(clinic.url)}
secret = {toml_str(CLINIC_SECRET)}
keywords = ["REG"]
message_results = true
task_interval = 1
result_interval = 1
reply_from_server = false
"""
        + rapidpro_endpoint(courier, 'keywords = ["JOIN"]')
    )
    sims = start_modems(stack, "a")
    for name in ("sync_worker", "task_poller", "result_reporter"):
        stack.start(name, name)
    api = Api(stack)
    clinic_uuid = clinic.queue_outgoing("+255754000030", "clinic: your results are ready")
    [result] = courier.send(
        f"{api.url}/rapidpro/rapidpro",
        message_id=20001,
        text="rapidpro: welcome to the flow",
        to="+255754000031",
        authorization=f"Token {RAPIDPRO_KEY}",
    )
    assert result.outcome == "ok", result
    sims["a"].inject("+255700000004", "REG 1001 Amina")
    sims["a"].inject("+255700000005", "JOIN reminders")

    wait_for(
        lambda: {"clinic: your results are ready", "rapidpro: welcome to the flow"} <= set(sent_texts(sims["a"])),
        timeout=60,
        what="both endpoints' messages sent",
    )
    wait_for(lambda: clinic.received() and courier.accepted("receive"), timeout=60, what="both inbound SMS")
    wait_for(lambda: "delivered" in courier.statuses(20001), timeout=60, what="delivered at courier")
    wait_for(
        lambda: any(r["uuid"] == clinic_uuid and r["status"] in ("sent", "delivered") for r in clinic.outgoing()),
        timeout=60,
        what="the clinic's result",
    )
    assert [m["message"] for m in clinic.received()] == ["REG 1001 Amina"]
    assert [f["text"] for f in courier.accepted("receive")] == ["JOIN reminders"]
    assert set(courier.statuses(20001)) <= {"sent", "delivered"}
    assert {r.form.get("id") for r in courier.calls() if r.form.get("id")} == {"20001"}, "only its own states"
    counters = clinic.state()["counters"]
    assert counters["unknown_result_uuids"] == 0 and counters["auth_failures"] == 0
    assert max(sent_texts(sims["a"]).values()) == 1
    assert_clean_logs(stack)
