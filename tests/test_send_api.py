"""The send API over real HTTP on loopback, with the stub publisher and the memory store (unit level): each
API's answers, idempotency, backpressure, rate and size limits, outages, the OpenAPI document, the metrics."""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import threading
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest
import requests
from openapi_spec_validator import validate

from send_api import metrics
from send_api.accept import Acceptor, message_id
from send_api.app import build_app
from send_api.limits import RateLimiter
from send_api.openapi import DOCUMENT
from send_api.server import ApiServer, bind
from send_api.settings import Credentials, Keyring
from send_api.web import ApiContext
from services.broker import BrokerUnavailable, Publication
from services.broker.stub import StubPublisher
from services.config import FleetConfig
from services.config.fleet import Route, env_endpoint
from services.ledger.api_messages import MemoryApiMessages
from services.platforms.rapidpro import part_client_id
from services.schemas import OutboundSms
from services.topology import OUTBOUND_QUEUE, outbound_queue_for

ROUTED = "+2557"  # the route prefix of the test fleet: modem0 alone
KEYS = (
    Credentials("rp", "rapidpro", api_key="rp-key"),
    Credentials("kn", "kannel", username="kuser", password="kpass"),
    Credentials("hook", "webhook", api_key="rest-key"),
)


@dataclass
class Api:
    """A running send API and what it publishes and stores into."""

    url: str
    publisher: StubPublisher
    store: MemoryApiMessages
    depths: dict[str, int]

    def published(self) -> list[tuple[str, OutboundSms]]:
        return [(p.routing_key, OutboundSms.from_json(p.body)) for p in self.publisher.published]


def _fleet() -> FleetConfig:
    base = env_endpoint({})
    endpoints = tuple(dataclasses.replace(base, name=c.endpoint) for c in KEYS)
    return FleetConfig("test", endpoints, routes=(Route(ROUTED, ("modem0",)),))


def start_api(*, rate: float = 100.0, max_body: int = 65536, max_queued: int = 50) -> tuple[Api, ApiServer]:
    """A send API on a free loopback port."""
    publisher, store = StubPublisher(), MemoryApiMessages()
    depths: dict[str, int] = {}
    acceptor = Acceptor(
        _fleet(),
        publisher,
        store,
        depths=lambda queue: depths.get(queue, 0),
        rate=RateLimiter(rate),
        max_queued=max_queued,
    )
    server = ApiServer(
        build_app(ApiContext(acceptor, Keyring(KEYS), store, max_body), heartbeat=False), bind("127.0.0.1", 0)
    )
    assert server.start(), "the server did not start"
    return Api(f"http://127.0.0.1:{server.port}", publisher, store, depths), server


@pytest.fixture
def api_factory() -> Iterator[Callable[..., Api]]:
    servers: list[ApiServer] = []

    def make(**kwargs: float) -> Api:
        api, server = start_api(**kwargs)  # type: ignore[arg-type]
        servers.append(server)
        return api

    yield make
    for server in servers:
        server.drain()
        assert server.join(30)
        server.close()


@pytest.fixture
def api(api_factory: Callable[..., Api]) -> Api:
    return api_factory()


def count(api: str, outcome: str) -> float:
    return float(metrics.REQUESTS.labels(api, outcome)._value.get())


# --- RapidPro -----------------------------------------------------------------------------------------------------


def test_rapidpro_send_is_queued_once_even_when_courier_retries(api: Api) -> None:
    form = {"id": "10042", "text": "Habari", "to": "+255700000001", "from": "+255799", "channel": "c-uuid"}
    duplicates = count("rapidpro", "duplicate")
    first = requests.post(f"{api.url}/rapidpro/rp", data=form, headers={"Authorization": "Token rp-key"}, timeout=10)
    assert first.status_code == 200 and "queued" in first.text and "10042" in first.text
    again = requests.post(f"{api.url}/rapidpro/rp", data=form, headers={"Authorization": "Token rp-key"}, timeout=10)
    assert again.status_code == 200 and again.json() == first.json()
    assert count("rapidpro", "duplicate") == duplicates + 1
    [(queue, sms)] = api.published()
    expected_id = message_id("rp", part_client_id("10042", "Habari"), "+255700000001")
    assert queue == outbound_queue_for("modem0")
    assert (sms.uuid, sms.dedup_key, sms.ledger_key) == (expected_id, expected_id, expected_id)
    assert (sms.to, sms.text, sms.origin, sms.report, sms.endpoint, sms.modems) == (
        "+255700000001",
        "Habari",
        "task",
        True,
        "rp",
        ["modem0"],
    )
    assert first.json()["message_id"] == expected_id
    stored = api.store.get(expected_id)
    assert (
        stored is not None
        and stored.client_id == part_client_id("10042", "Habari")
        and [c.state for c in stored.history] == ["queued"]
    )


def test_rapidpro_parts_of_a_split_text_are_each_queued_once(api: Api) -> None:
    # Courier sends a text longer than the channel's max length as several requests with the same id.
    headers = {"Authorization": "Token rp-key"}
    parts = [{"id": "77", "text": text, "to": "+255700000001"} for text in ("part one ", "part two")]
    answers = [requests.post(f"{api.url}/rapidpro/rp", data=form, headers=headers, timeout=10) for form in parts]
    retried = requests.post(f"{api.url}/rapidpro/rp", data=parts[1], headers=headers, timeout=10)
    assert [a.status_code for a in (*answers, retried)] == [200, 200, 200]
    assert {a.json()["id"] for a in answers} == {"77"}
    assert retried.json()["message_id"] == answers[1].json()["message_id"] != answers[0].json()["message_id"]
    assert [sms.text for _, sms in api.published()] == ["part one ", "part two"]


def test_rapidpro_accepts_a_json_body_and_bearer_and_refuses_a_wrong_key(api: Api) -> None:
    body = {"id": 7, "text": "Hi", "to_no_plus": "255800000001"}
    ok = requests.post(f"{api.url}/rapidpro/rp", json=body, headers={"Authorization": "Bearer rp-key"}, timeout=10)
    assert ok.status_code == 200 and ok.json()["id"] == "7"
    [(queue, sms)] = api.published()
    assert queue == OUTBOUND_QUEUE and sms.to == "255800000001" and sms.modems == []
    for endpoint, header in (("rp", "Token nope"), ("rp", ""), ("hook", "Token rest-key"), ("nope", "Token rp-key")):
        refused = requests.post(
            f"{api.url}/rapidpro/{endpoint}", json=body, headers={"Authorization": header}, timeout=10
        )
        assert refused.status_code == 401, (endpoint, header)
        assert "rp-key" not in refused.text and "rest-key" not in refused.text
    assert len(api.published()) == 1


def test_rapidpro_without_an_id_or_a_text_is_a_bad_request(api: Api) -> None:
    headers = {"Authorization": "Token rp-key"}
    no_id = requests.post(
        f"{api.url}/rapidpro/rp", data={"text": "x", "to": "+255700000001"}, headers=headers, timeout=10
    )
    assert no_id.status_code == 400 and "missing id" in no_id.json()["error"]
    no_text = requests.post(
        f"{api.url}/rapidpro/rp", data={"id": "1", "text": "", "to": "+255700000001"}, headers=headers, timeout=10
    )
    assert no_text.status_code == 400 and "empty text" in no_text.json()["error"]
    bad_to = requests.post(
        f"{api.url}/rapidpro/rp", data={"id": "1", "text": "x", "to": "abc"}, headers=headers, timeout=10
    )
    assert bad_to.status_code == 400 and "invalid recipient" in bad_to.json()["error"]
    assert api.published() == []


# --- Kannel -------------------------------------------------------------------------------------------------------


def test_kannel_sendsms_answers_as_kannel_and_keeps_the_dlr_url(api: Api) -> None:
    params = {
        "username": "kuser",
        "password": "kpass",
        "to": "+255700000001 +255700000002",
        "text": "Jambo",
        "dlr-mask": "31",
        "dlr-url": "http://127.0.0.1:9/dlr?type=%d&to=%p",
        "from": "ignored",
        "smsc": "ignored",
    }
    answer = requests.get(f"{api.url}/cgi-bin/sendsms", params=params, timeout=10)
    assert (answer.status_code, answer.text) == (202, "0: Accepted for delivery")
    sent = api.published()
    assert sorted(sms.to for _, sms in sent) == ["+255700000001", "+255700000002"]
    for _, sms in sent:
        stored = api.store.get(sms.uuid)
        assert stored is not None and stored.endpoint == "kn"
        assert (stored.status_url, stored.status_mask) == (params["dlr-url"], 31)
    posted = requests.post(f"{api.url}/cgi-bin/sendsms", data={**params, "to": "+255700000003"}, timeout=10)
    assert posted.status_code == 202 and len(api.published()) == 3


@pytest.mark.parametrize(
    ("change", "status", "text"),
    [
        ({"password": "wrong"}, 403, "Authorization failed for sendsms"),
        ({"username": None}, 403, "Authorization failed for sendsms"),
        ({"to": None}, 400, "Missing receiver number, rejected"),
        ({"to": " "}, 400, "Empty receiver number not allowed, rejected"),
        ({"to": "+2557x"}, 400, "Number(s) has/have been denied by white- and/or black-lists."),
        ({"text": ""}, 400, "Empty text not allowed, rejected."),
        ({"coding": "1"}, 400, "Coding field misformed, rejected"),
        ({"dlr-mask": "x"}, 400, "DLR-Mask field misformed, rejected"),
    ],
)
def test_kannel_rejections_use_kannels_texts(api: Api, change: dict[str, str | None], status: int, text: str) -> None:
    params: dict[str, str | None] = {
        "username": "kuser",
        "password": "kpass",
        "to": "+255700000001",
        "text": "x",
        "dlr-url": "http://127.0.0.1:9/?%d",
        **change,
    }
    answer = requests.get(
        f"{api.url}/cgi-bin/sendsms", params={k: v for k, v in params.items() if v is not None}, timeout=10
    )
    assert (answer.status_code, answer.text) == (status, text)
    assert api.published() == []


def test_kannel_ucs2_text_is_decoded_by_its_charset(api: Api) -> None:
    raw = "Habari 😀".encode("utf-16-be")
    query = f"username=kuser&password=kpass&to=%2B255700000001&coding=2&text={urllib.parse.quote(raw)}"
    answer = requests.get(f"{api.url}/cgi-bin/sendsms?{query}", timeout=10)
    assert answer.status_code == 202
    [(_, sms)] = api.published()
    assert sms.text == "Habari 😀"


# --- REST ---------------------------------------------------------------------------------------------------------


def test_rest_send_twice_with_one_id_queues_once_and_the_state_can_be_read(api: Api) -> None:
    headers = {"Authorization": "Bearer rest-key"}
    body = {"to": ["+255700000001", "+255800000002"], "text": "Hello", "id": "order-1"}
    first = requests.post(f"{api.url}/api/v1/messages", json=body, headers=headers, timeout=10)
    assert first.status_code == 202
    ids = [m["id"] for m in first.json()["messages"]]
    assert [m["duplicate"] for m in first.json()["messages"]] == [False, False]
    again = requests.post(f"{api.url}/api/v1/messages", json=body, headers=headers, timeout=10)
    assert again.status_code == 202 and [m["id"] for m in again.json()["messages"]] == ids
    assert all(m["duplicate"] for m in again.json()["messages"])
    assert len(api.published()) == 2
    looked_up = requests.get(f"{api.url}/api/v1/messages/{ids[0]}", headers=headers, timeout=10)
    assert looked_up.status_code == 200
    assert looked_up.json()["state"] == "queued" and looked_up.json()["to"] == "+255700000001"
    assert [h["state"] for h in looked_up.json()["history"]] == ["queued"]
    other_key = requests.get(
        f"{api.url}/api/v1/messages/{ids[0]}", headers={"Authorization": "Bearer rp-key"}, timeout=10
    )
    assert other_key.status_code == 404, "another endpoint's key sees no message of this one"
    assert requests.get(f"{api.url}/api/v1/messages/{ids[0]}", timeout=10).status_code == 401


def test_rest_ttl_becomes_the_messages_own_deadline(api: Api) -> None:
    headers = {"Authorization": "Bearer rest-key"}
    for body in ({"to": "+255800000001", "text": "x", "ttl": 90}, {"to": "+255800000002", "text": "y"}):
        assert requests.post(f"{api.url}/api/v1/messages", json=body, headers=headers, timeout=10).status_code == 202
    with_ttl, without = (sms for _, sms in api.published())
    assert with_ttl.expires_at == with_ttl.created_at + 90_000, "the modem worker fails it after 90 s unsent"
    assert without.expires_at == 0


def test_rest_modem_and_route_restrict_the_modems(api: Api) -> None:
    headers = {"Authorization": "Bearer rest-key"}
    to_modem = {"to": "+255800000001", "text": "x", "modem": "modem0"}
    assert requests.post(f"{api.url}/api/v1/messages", json=to_modem, headers=headers, timeout=10).status_code == 202
    by_route = {"to": "+255800000002", "text": "x", "route": ROUTED}
    assert requests.post(f"{api.url}/api/v1/messages", json=by_route, headers=headers, timeout=10).status_code == 202
    assert [(q, sms.modems) for q, sms in api.published()] == [(outbound_queue_for("modem0"), ["modem0"])] * 2
    for wrong, said in (({"modem": "modem9"}, "unknown modem"), ({"route": "+1"}, "unknown route")):
        answer = requests.post(
            f"{api.url}/api/v1/messages", json={**to_modem, "modem": "", **wrong}, headers=headers, timeout=10
        )
        assert answer.status_code == 400 and said in answer.json()["error"]


@pytest.mark.parametrize(
    ("body", "said"),
    [
        ({"to": "+255700000001"}, "text"),
        ({"to": [], "text": "x"}, "to:"),
        ({"to": "12", "text": "x"}, "invalid recipient"),
        ({"to": "+255700000001", "text": "x", "colour": "red"}, "unknown field"),
        ({"to": "+255700000001", "text": "x", "ttl": 0}, "ttl"),
    ],
)
def test_rest_bad_requests_say_what_is_wrong(api: Api, body: dict[str, object], said: str) -> None:
    answer = requests.post(
        f"{api.url}/api/v1/messages", json=body, headers={"Authorization": "Bearer rest-key"}, timeout=10
    )
    assert answer.status_code == 400 and said in answer.json()["error"]
    assert api.published() == []


# --- limits and outages -------------------------------------------------------------------------------------------


def test_a_full_queue_is_503_with_retry_after_and_nothing_stored(api: Api) -> None:
    api.depths[outbound_queue_for("modem0")] = 51
    before = count("rest", "backpressure")
    answer = requests.post(
        f"{api.url}/api/v1/messages",
        json={"to": "+255700000001", "text": "x", "id": "bp"},
        headers={"Authorization": "Bearer rest-key"},
        timeout=10,
    )
    assert answer.status_code == 503 and int(answer.headers["Retry-After"]) >= 1
    assert "SMSGW_API_MAX_QUEUED" in answer.json()["error"]
    assert count("rest", "backpressure") == before + 1
    assert api.published() == [] and api.store.get(message_id("hook", "bp", "+255700000001")) is None
    # Another route's queue is not full: its messages still go.
    other = requests.post(
        f"{api.url}/api/v1/messages",
        json={"to": "+255800000001", "text": "x"},
        headers={"Authorization": "Bearer rest-key"},
        timeout=10,
    )
    assert other.status_code == 202


def test_a_key_over_its_rate_gets_429_with_retry_after(api_factory: Callable[..., Api]) -> None:
    api = api_factory(rate=1.0)  # bursts of 10
    headers = {"Authorization": "Bearer rest-key"}
    burst = requests.post(
        f"{api.url}/api/v1/messages",
        json={"to": [f"+25570000{i:04d}" for i in range(10)], "text": "x"},
        headers=headers,
        timeout=10,
    )
    assert burst.status_code == 202
    over = requests.post(
        f"{api.url}/api/v1/messages", json={"to": "+255700000099", "text": "x"}, headers=headers, timeout=10
    )
    assert over.status_code == 429 and int(over.headers["Retry-After"]) >= 1
    # Another key has a bucket of its own.
    kannel = {"username": "kuser", "password": "kpass", "to": "+255700000001", "text": "x"}
    assert requests.get(f"{api.url}/cgi-bin/sendsms", params=kannel, timeout=10).status_code == 202


def test_a_body_over_the_limit_is_413(api_factory: Callable[..., Api]) -> None:
    api = api_factory(max_body=200)
    headers = {"Authorization": "Bearer rest-key"}
    answer = requests.post(
        f"{api.url}/api/v1/messages", json={"to": "+255700000001", "text": "x" * 300}, headers=headers, timeout=10
    )
    assert answer.status_code == 413 and "SMSGW_API_MAX_BODY" in answer.json()["error"]
    kannel = requests.post(f"{api.url}/cgi-bin/sendsms", data={"text": "x" * 300}, timeout=10)
    assert kannel.status_code == 413
    assert api.published() == []


def test_a_broker_outage_is_503_and_the_retry_publishes_once(api: Api) -> None:
    headers = {"Authorization": "Bearer rest-key"}
    body = {"to": "+255700000001", "text": "x", "id": "outage"}
    api.publisher.fail_with = BrokerUnavailable("connection refused")
    down = requests.post(f"{api.url}/api/v1/messages", json=body, headers=headers, timeout=10)
    assert down.status_code == 503 and "Retry-After" in down.headers
    mid = message_id("hook", "outage", "+255700000001")
    stored = api.store.get(mid)
    assert stored is not None and stored.history == (), "stored, never confirmed"
    api.publisher.fail_with = None
    up = requests.post(f"{api.url}/api/v1/messages", json=body, headers=headers, timeout=10)
    assert up.status_code == 202 and up.json()["messages"] == [{"id": mid, "to": "+255700000001", "duplicate": False}]
    assert [sms.uuid for _, sms in api.published()] == [mid]
    stored = api.store.get(mid)
    assert stored is not None and [c.state for c in stored.history] == ["queued"]


# --- the document and the metrics ---------------------------------------------------------------------------------


def test_the_openapi_document_is_valid_and_served(api: Api) -> None:
    validate(DOCUMENT)
    served = requests.get(f"{api.url}/api/v1/openapi.json", timeout=10)
    assert served.status_code == 200 and served.json() == json.loads(json.dumps(DOCUMENT))
    assert set(served.json()["paths"]) == {"/api/v1/messages", "/api/v1/messages/{message_id}"}


def test_every_series_exists_at_zero_from_start_up() -> None:
    metrics.init_metrics(["fresh-endpoint"])
    for api in metrics.APIS:
        for outcome in metrics.OUTCOMES:
            assert metrics.REQUESTS.labels(api, outcome)._value.get() >= 0
    for outcome in metrics.MESSAGE_OUTCOMES:
        assert metrics.MESSAGES.labels("fresh-endpoint", outcome)._value.get() == 0
    names = {m.name for m in metrics.REQUESTS.collect()} | {m.name for m in metrics.MESSAGES.collect()}
    assert names == {"smsgw_api_requests", "smsgw_api_messages"}


class HeldPublisher(StubPublisher):
    """Confirms a publish only once ``release`` is set (a broker slow to confirm)."""

    def __init__(self) -> None:
        super().__init__()
        self.entered = threading.Event()
        self.release = threading.Event()

    def publish(self, publication: Publication, timeout: float = 45.0) -> None:
        self.entered.set()
        assert self.release.wait(30), "never released"
        super().publish(publication, timeout)


def test_drain_stops_accepting_and_finishes_the_request_in_flight() -> None:
    publisher, store = HeldPublisher(), MemoryApiMessages()
    acceptor = Acceptor(_fleet(), publisher, store, depths=lambda _q: 0, rate=RateLimiter(100), max_queued=50)
    server = ApiServer(
        build_app(ApiContext(acceptor, Keyring(KEYS), store, 65536), heartbeat=False), bind("127.0.0.1", 0)
    )
    assert server.start()
    url = f"http://127.0.0.1:{server.port}/api/v1/messages"
    body = {"to": "+255700000001", "text": "x", "id": "in-flight"}
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        pending = pool.submit(requests.post, url, json=body, headers={"Authorization": "Bearer rest-key"}, timeout=30)
        assert publisher.entered.wait(10), "the request reached the publisher"
        server.drain()
        assert not server.join(0.5), "the server waits for the request in flight"
        publisher.release.set()
        assert pending.result().status_code == 202
    assert server.join(30), "drained"
    server.close()
    assert len(publisher.published) == 1
    with pytest.raises(requests.ConnectionError):
        requests.post(url, json=body, headers={"Authorization": "Bearer rest-key"}, timeout=5)
