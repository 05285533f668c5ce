"""The reference SMSsync server over real HTTP (requests), plus its CLI."""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import requests

import reference_server.__main__ as reference_cli
from reference_server.errors import BadRequestError
from reference_server.server import ReferenceServer
from services.config import fleet_from_env
from services.sync_client import SyncClient
from services.sync_protocol import SyncScheme
from tests.conftest import free_port, wait_for

SECRET = "s3cret-ref"
SMS = {
    "from": "+255700000001",
    "message": "hello reference server",
    "message_id": "5b0c7f0e-1111-4c1a-9f00-000000000001",
    "sent_to": "+255700000099",
    "device_id": "modem0",
    "sent_timestamp": "1700000000000",
}
OK = {"payload": {"success": True, "error": None}}
TIMEOUT = 10


@pytest.fixture
def server() -> Iterator[ReferenceServer]:
    with ReferenceServer(SECRET) as srv:
        yield srv


@pytest.fixture
def reply_server() -> Iterator[ReferenceServer]:
    with ReferenceServer(SECRET, reply=True) as srv:
        yield srv


def _sms(**overrides: str) -> dict[str, str]:
    return {**SMS, "message_id": str(uuid.uuid4()), **overrides}


# --- incoming SMS --------------------------------------------------------------------------------------------


def test_form_post_is_recorded(server: ReferenceServer) -> None:
    response = requests.post(server.url, data={**SMS, "secret": SECRET}, timeout=TIMEOUT)
    assert response.status_code == 200
    assert response.headers["Content-Type"] == "application/json; charset=utf-8"
    assert response.json() == OK
    [record] = server.received()
    assert {k: record[k] for k in SMS} == SMS
    assert record["repeats"] == 0
    assert record["received_at"]


def test_json_body_and_query_secret_and_multipart_are_accepted(server: ReferenceServer) -> None:
    assert requests.post(server.url, json={**_sms(), "secret": SECRET}, timeout=TIMEOUT).json() == OK
    assert requests.post(server.url, params={"secret": SECRET}, data=_sms(), timeout=TIMEOUT).json() == OK
    # The docs' own curl example uses multipart (-F).
    multipart = {k: (None, v) for k, v in {**_sms(message="multi"), "secret": SECRET}.items()}
    assert requests.post(server.url, files=multipart, timeout=TIMEOUT).json() == OK
    # PUT is an app option; trailing slash must work too.
    assert requests.put(server.url + "/", data={**_sms(), "secret": SECRET}, timeout=TIMEOUT).json() == OK
    assert len(server.received()) == 4
    assert server.received()[2]["message"] == "multi"


@pytest.mark.parametrize("content_type", ["application/xml", "text/xml", "application/json"])
def test_xml_body_is_accepted_even_when_labelled_json(server: ReferenceServer, content_type: str) -> None:
    # The app sends its XML scheme as application/json (a bug); the body's first byte decides.
    sms = _sms(message="<b> & 😀")
    body = SyncScheme("POST", "xml").encode({**sms, "secret": SECRET})[0]
    response = requests.post(server.url, data=body, headers={"Content-Type": content_type}, timeout=TIMEOUT)
    assert response.json() == OK
    [record] = server.received()
    assert {k: record[k] for k in sms} == sms


@pytest.mark.parametrize("secret", ["wrong", None, ""])
def test_wrong_or_missing_secret_is_403(server: ReferenceServer, secret: str | None) -> None:
    data = dict(SMS) if secret is None else {**SMS, "secret": secret}
    response = requests.post(server.url, data=data, timeout=TIMEOUT)
    assert response.status_code == 403
    payload = response.json()["payload"]
    assert payload["success"] is False
    assert payload["error"]
    assert SECRET not in response.text
    assert server.received() == []
    assert server.state()["counters"]["auth_failures"] == 1


def test_duplicate_message_id_is_recorded_once(reply_server: ReferenceServer) -> None:
    first = requests.post(reply_server.url, data={**SMS, "secret": SECRET}, timeout=TIMEOUT).json()
    second = requests.post(reply_server.url, data={**SMS, "secret": SECRET}, timeout=TIMEOUT).json()
    third = requests.post(reply_server.url, data={**SMS, "secret": SECRET}, timeout=TIMEOUT).json()
    assert first["payload"]["task"] == "send"
    # Repeats are acknowledged but not answered again (the phone would send the reply twice).
    assert second == third == OK
    [record] = reply_server.received()
    assert record["repeats"] == 2
    assert reply_server.state()["counters"]["duplicates"] == 2
    assert len(reply_server.outgoing()) == 1


def test_reply_mode_answers_with_instant_sms(reply_server: ReferenceServer) -> None:
    text = "x" * 35 + "abcdefghij"
    response = requests.post(reply_server.url, data={**_sms(message=text), "secret": SECRET}, timeout=TIMEOUT)
    payload = response.json()["payload"]
    assert payload["success"] is True
    assert payload["task"] == "send"
    assert payload["secret"] == SECRET
    [message] = payload["messages"]
    assert message["to"] == SMS["from"]
    assert message["message"] == "Thanks, received: " + text[:40]
    assert uuid.UUID(message["uuid"]).version == 4
    # The reply is tracked for results but never offered to task=send (the phone already has it).
    [out] = reply_server.outgoing()
    assert (out["uuid"], out["status"], out["source"]) == (message["uuid"], "queued", "reply")
    poll = requests.get(reply_server.url, params={"task": "send", "secret": SECRET}, timeout=TIMEOUT)
    assert poll.json()["payload"]["messages"] == []
    waiting = requests.get(reply_server.url, params={"task": "result", "secret": SECRET}, timeout=TIMEOUT)
    assert waiting.json() == {"message_uuids": [message["uuid"]]}


@pytest.mark.parametrize(
    ("body", "content_type"),
    [
        (b"message=no+sender&secret=" + SECRET.encode(), "application/x-www-form-urlencoded"),
        (b'{"from": "+1", "secret": "', "application/json"),
        (b"[1, 2]", "application/json"),
        (b"<payload><from>+1</from>", "application/xml"),
        (b"<payload><from><b>+1</b></from></payload>", "application/xml"),
        # An entity expansion ("billion laughs") is refused before it is expanded.
        (b'<?xml version="1.0" encoding="no-such-codec"?><payload><from>+1</from></payload>', "application/xml"),
        (
            b'<!DOCTYPE p [<!ENTITY a "aaaaaaaaaa"><!ENTITY b "&a;&a;&a;&a;">]><payload><from>&b;</from></payload>',
            "application/xml",
        ),
    ],
)
def test_bad_sync_bodies_are_400(server: ReferenceServer, body: bytes, content_type: str) -> None:
    response = requests.post(server.url, data=body, headers={"Content-Type": content_type}, timeout=TIMEOUT)
    assert response.status_code == 400
    assert response.json()["payload"]["success"] is False
    assert server.received() == []


def test_unknown_task_and_path(server: ReferenceServer) -> None:
    assert requests.get(server.url, params={"task": "foo", "secret": SECRET}, timeout=TIMEOUT).status_code == 400
    assert requests.get(server.url, params={"secret": SECRET}, timeout=TIMEOUT).status_code == 400
    assert requests.post(server.base_url + "/other", data=SMS, timeout=TIMEOUT).status_code == 404


def test_concurrent_posts_are_all_recorded(server: ReferenceServer) -> None:
    def post(i: int) -> int:
        data = {**_sms(message=f"sms {i}"), "secret": SECRET}
        return requests.post(server.url, data=data, timeout=TIMEOUT).status_code

    with ThreadPoolExecutor(max_workers=16) as pool:
        statuses = list(pool.map(post, range(80)))
    assert statuses == [200] * 80
    assert sorted(m["message"] for m in server.received()) == sorted(f"sms {i}" for i in range(80))


# --- tasks ------------------------------------------------------------------------------------------------------


def test_task_send_sent_cycle(server: ReferenceServer) -> None:
    admin = requests.post(
        server.base_url + "/_outgoing",
        json={"messages": [{"to": "+1", "message": "one", "uuid": "u-1"}, {"to": "+2", "message": "two"}]},
        timeout=TIMEOUT,
    )
    assert admin.status_code == 200
    u1, u2 = admin.json()["queued"]
    assert u1 == "u-1"
    u3 = server.queue_outgoing("+3", "three")

    def poll() -> dict[str, Any]:
        response = requests.get(server.url, params={"task": "send", "secret": SECRET}, timeout=TIMEOUT)
        assert response.status_code == 200
        payload = response.json()["payload"]
        assert isinstance(payload, dict)
        return payload

    payload = poll()
    assert payload["success"] is True
    assert payload["task"] == "send"
    assert payload["secret"] == SECRET
    assert payload["messages"] == [
        {"to": "+1", "message": "one", "uuid": u1},
        {"to": "+2", "message": "two", "uuid": u2},
        {"to": "+3", "message": "three", "uuid": u3},
    ]
    # Not acknowledged yet: offered again.
    assert [m["uuid"] for m in poll()["messages"]] == [u1, u2, u3]

    # App style: JSON body, no secret. Unknown uuids are not echoed.
    sent = requests.post(
        server.url, params={"task": "sent"}, json={"queued_messages": [u1, "unknown", u3]}, timeout=TIMEOUT
    )
    assert sent.json() == {"message_uuids": [u1, u3]}
    assert [m["uuid"] for m in poll()["messages"]] == [u2]
    statuses = {o["uuid"]: o["status"] for o in server.outgoing()}
    assert statuses == {u1: "queued", u2: "pending", u3: "queued"}

    # A retried acknowledgement is echoed again; acknowledged SMS never come back.
    again = requests.post(server.url, params={"task": "sent"}, json={"queued_messages": [u1]}, timeout=TIMEOUT)
    assert again.json() == {"message_uuids": [u1]}
    empty = requests.post(server.url, params={"task": "sent"}, timeout=TIMEOUT)
    assert empty.json() == {"message_uuids": []}
    form = requests.post(server.url, params={"task": "sent"}, data={"queued_messages[]": [u2]}, timeout=TIMEOUT)
    assert form.json() == {"message_uuids": [u2]}
    assert poll()["messages"] == []


def test_task_send_wrong_secret_is_403(server: ReferenceServer) -> None:
    server.queue_outgoing("+1", "secret stuff")
    for params in ({"task": "send", "secret": "nope"}, {"task": "send"}, {"task": "result", "secret": "x"}):
        response = requests.get(server.url, params=params, timeout=TIMEOUT)
        assert response.status_code == 403
        assert response.json()["payload"]["success"] is False
        assert "secret stuff" not in response.text
    wrong_sent = requests.post(
        server.url, params={"task": "sent", "secret": "nope"}, json={"queued_messages": []}, timeout=TIMEOUT
    )
    assert wrong_sent.status_code == 403


def _queue_and_ack(server: ReferenceServer, *uuids: str) -> None:
    for u in uuids:
        server.queue_outgoing("+255700000002", f"msg {u}", u)
    ack = requests.post(server.url, params={"task": "sent"}, json={"queued_messages": list(uuids)}, timeout=TIMEOUT)
    assert ack.json() == {"message_uuids": list(uuids)}


def test_task_result_all_three_shapes(server: ReferenceServer) -> None:
    _queue_and_ack(server, "a", "b", "c", "d")
    server.queue_outgoing("+1", "not acknowledged", "e")
    waiting = requests.get(server.url, params={"task": "result", "secret": SECRET}, timeout=TIMEOUT)
    assert waiting.json() == {"message_uuids": ["a", "b", "c", "d"]}

    docs_rows = [
        {
            "uuid": "a",
            "sent_result_code": 0,
            "sent_result_message": "SMSSync Message Sent",
            "delivered_result_code": 0,
            "delivered_result_message": "SMS Delivered",
            "sent_timestamp": 1700000000001,
            "delivered_timestamp": 1700000000002,
        },
        {"uuid": "zzz-unknown", "sent_result_code": 0},
    ]
    array_rows = [{"uuid": "b", "sent_result_code": 1, "sent_result_message": "Failed to send SMS"}]
    string_rows = [
        {"uuid": "c", "sent_result_code": "-1", "sent_result_message": "sent", "delivered_result_code": "-1"}
    ]
    params = {"task": "result", "secret": SECRET}
    for body in (
        {"message_results": docs_rows},
        {"message_result": array_rows},
        {"message_result": json.dumps(string_rows)},
    ):
        response = requests.post(server.url, params=params, json=body, timeout=TIMEOUT)
        assert response.status_code == 200
        assert response.json() == OK

    by_uuid = {o["uuid"]: o for o in server.outgoing()}
    assert by_uuid["a"]["status"] == "delivered"
    assert by_uuid["a"]["delivered_result_message"] == "SMS Delivered"
    assert by_uuid["a"]["sent_timestamp"] == 1700000000001
    assert by_uuid["a"]["results"][0]["sent_result_message"] == "SMSSync Message Sent"
    assert by_uuid["b"]["status"] == "failed"
    assert by_uuid["b"]["sent_result_code"] == 1
    # Android's -1 (RESULT_OK) is sent; -1 is not "delivered" under the docs' convention (0).
    assert by_uuid["c"]["status"] == "sent"
    assert by_uuid["c"]["sent_result_code"] == -1
    assert by_uuid["d"]["status"] == "queued"
    assert by_uuid["e"]["status"] == "pending"
    assert server.state()["counters"]["unknown_result_uuids"] == 1

    # Still waiting: c (no delivery report) and d (nothing yet).
    waiting = requests.get(server.url, params=params, timeout=TIMEOUT)
    assert waiting.json() == {"message_uuids": ["c", "d"]}

    # Switching to the Android convention re-derives the status.
    server.configure(delivered_ok_code=-1)
    assert {o["uuid"]: o["status"] for o in server.outgoing()}["c"] == "delivered"


def test_task_result_errors(server: ReferenceServer) -> None:
    _queue_and_ack(server, "a")
    rows = {"message_results": [{"uuid": "a", "sent_result_code": 0}]}
    assert (
        requests.post(server.url, params={"task": "result", "secret": "bad"}, json=rows, timeout=TIMEOUT).status_code
        == 403
    )
    assert requests.post(server.url, params={"task": "result"}, json=rows, timeout=TIMEOUT).status_code == 403
    bad_shapes = [{"nothing": []}, {"message_result": "not json"}, {"message_results": [{"no_uuid": 1}]}]
    for body in bad_shapes:
        response = requests.post(server.url, params={"task": "result", "secret": SECRET}, json=body, timeout=TIMEOUT)
        assert response.status_code == 400, body
    assert server.outgoing()[0]["results"] == []


# --- admin: config, state, page ------------------------------------------------------------------------------


def test_fail_status_simulates_an_outage(server: ReferenceServer) -> None:
    config = requests.post(server.base_url + "/_config", json={"fail_status": 503, "fail_count": 2}, timeout=TIMEOUT)
    assert config.json()["fail_status"] == 503
    for _ in range(2):
        response = requests.post(server.url, data={**SMS, "secret": SECRET}, timeout=TIMEOUT)
        assert response.status_code == 503
        assert response.headers["Content-Type"].startswith("text/html")
    assert server.received() == []
    assert requests.post(server.url, data={**SMS, "secret": SECRET}, timeout=TIMEOUT).json() == OK
    assert len(server.received()) == 1
    assert server.state()["config"]["fail_status"] is None

    # Without a count the outage lasts until cleared.
    server.configure(fail_status=500)
    for _ in range(3):
        assert requests.get(server.url, params={"task": "send", "secret": SECRET}, timeout=TIMEOUT).status_code == 500
    server.configure(fail_status=None)
    assert requests.get(server.url, params={"task": "send", "secret": SECRET}, timeout=TIMEOUT).status_code == 200
    assert server.state()["counters"]["injected_failures"] == 5


def test_success_as_string_reply_and_secret_config(server: ReferenceServer) -> None:
    requests.post(
        server.base_url + "/_config", json={"success_as_string": True, "reply": True}, timeout=TIMEOUT
    ).raise_for_status()
    payload = requests.post(server.url, data={**_sms(), "secret": SECRET}, timeout=TIMEOUT).json()["payload"]
    assert payload["success"] == "true"
    assert payload["task"] == "send"
    poll = requests.get(server.url, params={"task": "send", "secret": SECRET}, timeout=TIMEOUT).json()
    assert poll["payload"]["success"] == "true"

    response = requests.post(server.base_url + "/_config", json={"secret": "rotated"}, timeout=TIMEOUT)
    assert "rotated" not in response.text
    assert requests.post(server.url, data={**_sms(), "secret": SECRET}, timeout=TIMEOUT).status_code == 403
    assert requests.post(server.url, data={**_sms(), "secret": "rotated"}, timeout=TIMEOUT).status_code == 200
    assert server.secret == "rotated"


def test_bad_admin_requests(server: ReferenceServer) -> None:
    base = server.base_url
    assert requests.post(base + "/_config", json={"nope": 1}, timeout=TIMEOUT).status_code == 400
    assert requests.post(base + "/_config", json={"fail_status": "x"}, timeout=TIMEOUT).status_code == 400
    assert requests.post(base + "/_outgoing", json={"to": "+1"}, timeout=TIMEOUT).status_code == 400
    assert requests.post(base + "/_outgoing", data=b"{", timeout=TIMEOUT).status_code == 400
    assert requests.get(base + "/_config", timeout=TIMEOUT).status_code == 405
    server.queue_outgoing("+1", "x", "dup")
    dup = requests.post(base + "/_outgoing", json={"to": "+1", "message": "x", "uuid": "dup"}, timeout=TIMEOUT)
    assert dup.status_code == 400
    with pytest.raises(BadRequestError):
        server.queue_outgoing("+1", "y", "dup")
    with pytest.raises(BadRequestError):
        server.configure(colour="blue")
    assert len(server.outgoing()) == 1


def test_state_and_page_never_show_the_secret(reply_server: ReferenceServer) -> None:
    body = "<script>alert(1)</script> & hi"
    requests.post(reply_server.url, data={**_sms(message=body), "secret": SECRET}, timeout=TIMEOUT)
    reply_server.queue_outgoing("+255700000003", "outgoing body")

    state = requests.get(reply_server.base_url + "/_state", timeout=TIMEOUT)
    assert SECRET not in state.text
    document = state.json()
    assert set(document) == {"received", "outgoing", "counters", "config"}
    assert document["config"]["secret_set"] is True
    assert document["received"][0]["message"] == body
    assert {o["status"] for o in document["outgoing"]} == {"queued", "pending"}

    page = requests.get(reply_server.base_url + "/", timeout=TIMEOUT)
    assert page.status_code == 200
    assert page.headers["Content-Type"].startswith("text/html")
    assert '<meta http-equiv="refresh" content="2">' in page.text
    assert SECRET not in page.text
    assert "&lt;script&gt;alert(1)&lt;/script&gt; &amp; hi" in page.text
    assert "<script>" not in page.text
    assert "outgoing body" in page.text
    assert "pending" in page.text


def test_the_gateways_probe_is_not_a_bad_request(server: ReferenceServer) -> None:
    client = SyncClient(fleet_from_env({"SMSGW_SYNC_URL": server.url}).endpoints[0])
    try:
        answer = client.probe()  # what sync_worker sends when it is quiet
    finally:
        client.close()
    assert answer.status == 405  # "takes POSTs only": the probe counts it as up
    counters = server.state()["counters"]
    assert (counters["probes"], counters["bad_requests"]) == (1, 0)


def test_an_sms_handed_out_to_a_gateway_without_the_results_api_is_not_pending_for_ever(
    server: ReferenceServer,
) -> None:
    server.queue_outgoing("+255700000004", "no results api")

    def status_on_the_page() -> str:
        page = requests.get(server.base_url + "/", timeout=TIMEOUT).text
        return page.split("no results api</td><td>admin</td><td><b>", 1)[1].split("</b>", 1)[0]

    poll = {"task": "send", "secret": SECRET}
    requests.get(server.url, params=poll, timeout=TIMEOUT)
    assert status_on_the_page() == "pending"  # handed out once: a gateway with the API acknowledges next
    requests.get(server.url, params=poll, timeout=TIMEOUT)  # offered again: it never acknowledges
    assert status_on_the_page() == "sent — results off"
    requests.post(server.url, params={"task": "sent"}, json={"queued_messages": []}, timeout=TIMEOUT)
    assert status_on_the_page() == "pending"  # a gateway that does acknowledge: really still pending


def test_root_sync_path_coexists_with_the_page() -> None:
    with ReferenceServer(SECRET, path="/") as srv:
        assert srv.url.endswith(":" + str(srv.port) + "/")
        assert requests.post(srv.url, data={**SMS, "secret": SECRET}, timeout=TIMEOUT).json() == OK
        assert requests.get(srv.url, params={"task": "send", "secret": SECRET}, timeout=TIMEOUT).json()["payload"]
        assert requests.get(srv.url, timeout=TIMEOUT).headers["Content-Type"].startswith("text/html")


def test_stop_and_restart() -> None:
    srv = ReferenceServer(SECRET).start()
    url = srv.url
    with pytest.raises(RuntimeError):
        srv.start()
    srv.stop()
    srv.stop()
    with pytest.raises(requests.ConnectionError):
        requests.get(url, timeout=2)


# --- CLI ------------------------------------------------------------------------------------------------------


def test_cli_serves_and_logs_json_without_the_secret(tmp_path: Path) -> None:
    port = free_port()
    secret = "cli-secret-value"
    log_path = tmp_path / "server.log"
    repo_root = Path(__file__).resolve().parents[1]
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "reference_server", "--port", str(port), "--secret", secret, "--reply"],
            cwd=repo_root,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
    try:
        base = f"http://127.0.0.1:{port}"

        def answers() -> bool:
            try:
                return requests.get(base + "/_state", timeout=1).status_code == 200
            except requests.ConnectionError:
                assert process.poll() is None, log_path.read_text()
                return False

        wait_for(answers, timeout=15, what="reference server CLI")
        reply = requests.post(base + "/smssync", data={**SMS, "secret": secret}, timeout=TIMEOUT).json()
        assert reply["payload"]["messages"][0]["to"] == SMS["from"]
        assert (
            requests.get(base + "/smssync", params={"task": "send", "secret": "bad"}, timeout=TIMEOUT).status_code
            == 403
        )
        requests.get(base + "/smssync", params={"task": "send", "secret": secret}, timeout=TIMEOUT)
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=10) == 0

    lines = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()]
    assert secret not in log_path.read_text()
    messages = [line["message"] for line in lines]
    assert "reference server started" in messages
    assert "sms received" in messages
    assert "secret mismatch" in messages
    requests_logged = [line for line in lines if line["message"] == "request"]
    assert {r["status"] for r in requests_logged} >= {200, 403}
    assert all(r["path"] in ("/_state", "/smssync") for r in requests_logged)


# --- request signing (docs/signing.md) ---------------------------------------------------------------------------

SIGNING_KEY = "ref-signing-key"


def _signing_client(server: ReferenceServer) -> SyncClient:
    base = fleet_from_env({"SMSGW_SYNC_URL": server.url}).endpoints[0]
    return SyncClient(dataclasses.replace(base, signing_key=SIGNING_KEY, http_timeout=TIMEOUT))


def test_signing_key_accepts_signed_requests_on_every_leg() -> None:
    with ReferenceServer(SECRET, signing_key=SIGNING_KEY) as server:
        client = _signing_client(server)
        try:
            body, content_type = SyncScheme().encode({**SMS, "secret": SECRET})
            assert client.send("POST", body, content_type).status == 200
            uuid_ = server.queue_outgoing("+255700000002", "hi")
            polled = client.get(task="send", secret=SECRET)
            assert polled.status == 200 and uuid_ in polled.text
            assert client.post_json({"queued_messages": [uuid_]}, task="sent").status == 200
            assert client.get(task="result", secret=SECRET).status == 200
        finally:
            client.close()
        assert [r["message_id"] for r in server.received()] == [SMS["message_id"]]
        assert server.outgoing()[0]["status"] == "queued"
        assert server.state()["counters"]["signature_failures"] == 0


def test_signing_key_refuses_unsigned_badly_signed_and_stale_requests_with_401() -> None:
    with ReferenceServer(SECRET, signing_key=SIGNING_KEY) as server:
        data = {**SMS, "secret": SECRET}
        unsigned = requests.post(server.url, data=data, timeout=TIMEOUT)
        forged = requests.get(
            server.url,
            params={"task": "send", "secret": SECRET},
            headers={"X-SMSGW-Timestamp": str(int(time.time())), "X-SMSGW-Signature": "sha256=" + "0" * 64},
            timeout=TIMEOUT,
        )
        stale_at = str(int(time.time()) - 301)
        message = f"{stale_at}.GET./smssync?task=result.".encode()
        stale_signature = "sha256=" + hmac.new(SIGNING_KEY.encode(), message, hashlib.sha256).hexdigest()
        stale = requests.get(
            server.url + "?task=result",
            headers={"X-SMSGW-Timestamp": stale_at, "X-SMSGW-Signature": stale_signature},
            timeout=TIMEOUT,
        )
        for response, reason in ((unsigned, "missing"), (forged, "does not match"), (stale, "5 minutes")):
            assert response.status_code == 401
            payload = response.json()["payload"]
            assert payload["success"] is False and reason in payload["error"]
            assert SIGNING_KEY not in response.text
        assert server.received() == []
        state = server.state()
        assert state["counters"]["signature_failures"] == 3
        assert state["config"]["signing_key_set"] is True and SIGNING_KEY not in json.dumps(state)
        # Admin endpoints are a loopback tool and never signed; a key can be turned off there.
        server.configure(signing_key="")
        assert requests.post(server.url, data=data, timeout=TIMEOUT).json() == OK


def test_cli_takes_the_signing_key_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SMSSYNC_REFERENCE_SIGNING_KEY", "from-env")
    assert reference_cli.parse_args(["--secret", "s"]).signing_key == "from-env"
    assert reference_cli.parse_args(["--secret", "s", "--signing-key", "k"]).signing_key == "k"
    monkeypatch.delenv("SMSSYNC_REFERENCE_SIGNING_KEY")
    assert reference_cli.parse_args(["--secret", "s"]).signing_key == ""


# --- the outbox form (GET/POST /outbox) ----------------------------------------------------------------------


def test_outbox_form_queues_an_sms_for_the_next_task_send(server: ReferenceServer) -> None:
    form = requests.get(server.base_url + "/outbox", timeout=TIMEOUT)
    assert form.status_code == 200
    assert form.headers["Content-Type"].startswith("text/html")
    assert '<form method="post" action="/outbox">' in form.text
    assert f"{server.base_url}/outbox" in form.text  # the curl line names this server
    assert 'href="/outbox"' in requests.get(server.base_url + "/", timeout=TIMEOUT).text

    # What curl --data-urlencode (and a browser) send: '+' encoded as %2B.
    answer = requests.post(
        server.base_url + "/outbox",
        data={"to": "+255 700 000 301", "text": "Habari 😀 & karibu"},
        allow_redirects=False,
        timeout=TIMEOUT,
    )
    assert answer.status_code == 303
    assert answer.headers["Location"] == "/"
    [record] = server.outgoing()
    assert answer.text.startswith(f"queued {record['uuid']} for +255700000301")
    assert (record["to"], record["message"], record["source"], record["status"]) == (
        "+255700000301",
        "Habari 😀 & karibu",
        "form",
        "pending",
    )
    polled = requests.get(server.url, params={"task": "send", "secret": SECRET}, timeout=TIMEOUT).json()
    assert polled["payload"]["messages"] == [
        {"to": "+255700000301", "message": "Habari 😀 & karibu", "uuid": record["uuid"]}
    ]


def test_outbox_form_from_curl_with_data_urlencode() -> None:
    curl = shutil.which("curl")
    if curl is None:
        pytest.skip("curl is not installed")
    with ReferenceServer(SECRET) as srv:
        done = subprocess.run(
            [
                curl,
                "-s",
                "--data-urlencode",
                "to=+255700000302",
                "--data-urlencode",
                "text=Habari",
                srv.base_url + "/outbox",
            ],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        )
        [record] = srv.outgoing()
        assert done.stdout.startswith(f"queued {record['uuid']} for +255700000302")
        assert (record["to"], record["message"]) == ("+255700000302", "Habari")


@pytest.mark.parametrize(
    ("data", "content_type", "error"),
    [
        (b"to=%2B255700000301", "application/x-www-form-urlencoded", "needs the form fields 'to' and 'text'"),
        (b"to=%2B255700000301&text=+++", "application/x-www-form-urlencoded", "needs the form fields"),
        (b"text=hello", "application/x-www-form-urlencoded", "needs the form fields"),
        (b"to=clinic&text=hello", "application/x-www-form-urlencoded", "must be a phone number"),
        # curl -d to=+255...: the unencoded '+' arrives as a blank; taken as is, the SMS would go to another number.
        (b"to=+255700000301&text=hello", "application/x-www-form-urlencoded", "--data-urlencode"),
        (b'{"to": "+255700000301", "text": "hi"}', "application/json", "JSON goes to POST /_outgoing"),
        (b"to=\xff&text=hi", "application/x-www-form-urlencoded", "not UTF-8"),
    ],
)
def test_outbox_form_refuses_bad_input_and_queues_nothing(
    server: ReferenceServer, data: bytes, content_type: str, error: str
) -> None:
    answer = requests.post(
        server.base_url + "/outbox", data=data, headers={"Content-Type": content_type}, timeout=TIMEOUT
    )
    assert answer.status_code == 400
    assert error in answer.json()["payload"]["error"]
    assert server.outgoing() == []
