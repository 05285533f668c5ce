"""The platform doubles of tests/doubles behave like the real ones (they must be right to be worth anything):
courier's send requests and its receive/status answers (nyaruka/courier handlers/external), the Kannel
callbacks, and the webhook receiver running the verification recipe of docs/integrations.md."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from services.sync_client import signature
from tests.doubles.courier import Courier, split_text
from tests.doubles.kannel import KannelCallbacks
from tests.doubles.recorder import Recorded, RecordingServer
from tests.doubles.webhook import WebhookReceiver, docs_python_recipe, docs_shell_recipe


def post(url: str, body: bytes, content_type: str = "application/x-www-form-urlencoded") -> tuple[int, str]:
    request = urllib.request.Request(url, data=body, method="POST", headers={"Content-Type": content_type})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


@pytest.fixture
def courier() -> Iterator[Courier]:
    double = Courier().start()
    yield double
    double.stop()


class Gateway:
    """A stand-in send URL: answers each request with the next of ``answers`` (status, body, delay)."""

    def __init__(self, *answers: tuple[int, str, float]) -> None:
        self.answers = list(answers)
        self.server = RecordingServer(self._answer).start()

    def _answer(self, request: Recorded) -> tuple[int, str, bytes]:
        status, body, delay = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        if delay:
            time.sleep(delay)  # plays a slow gateway (the client's time-out is what is tested)
        return status, "text/plain", body.encode()


def test_courier_sends_the_default_urlencoded_body_with_its_headers(courier: Courier) -> None:
    gateway = Gateway((202, "Accepted", 0))
    try:
        results = courier.send(
            f"{gateway.server.base_url}/rapidpro/courier",
            message_id=10071,
            text="Habari & karibu + 100% ~ü",
            to="+255754000010",
            authorization="Token k3y",
        )
        [request] = gateway.server.requests()
    finally:
        gateway.server.stop()
    assert [r.outcome for r in results] == ["ok"]
    assert request.method == "POST" and request.path == "/rapidpro/courier"
    assert request.headers["content-type"] == "application/x-www-form-urlencoded"
    assert request.headers["authorization"] == "Token k3y"
    # Go's url.QueryEscape: space as +, everything but [A-Za-z0-9-_.~] percent-encoded (UTF-8).
    assert request.body.decode() == (
        "id=10071&text=Habari+%26+karibu+%2B+100%25+~%C3%BC&to=%2B255754000010&from=%2B255754000001"
        f"&channel={courier.channel_uuid}"
    )
    assert request.form["text"] == "Habari & karibu + 100% ~ü"


def test_courier_json_body_and_split_at_max_length_keep_the_id(courier: Courier) -> None:
    courier.content_type, courier.max_length = "json", 20
    gateway = Gateway((200, "ok", 0))
    try:
        courier.send(gateway.server.base_url + "/rapidpro/x", message_id=7, text="one two three four five six", to="+1")
        requests = gateway.server.requests()
    finally:
        gateway.server.stop()
    bodies = [json.loads(r.body) for r in requests]
    assert [b["text"] for b in bodies] == ["one two three four", "five six"]
    assert {b["id"] for b in bodies} == {"7"}  # courier JSON-encodes every variable as a string
    assert all(r.headers["content-type"] == "application/json" for r in requests)
    assert split_text("x" * 45, 20) == ["x" * 20, "x" * 20, "x" * 5]


@pytest.mark.parametrize(
    ("answer", "check", "outcome"),
    [
        ((503, "busy", 0.0), "", "connection_failed"),
        ((404, "no", 0.0), "", "response_status"),
        ((200, "queued", 0.0), "Accepted", "response_unexpected"),
        ((200, "0: Accepted", 0.0), "Accepted", "ok"),
        ((200, "late", 2.0), "", "connection_failed"),  # courier's client times out
    ],
)
def test_courier_classifies_answers_as_courier_does(
    courier: Courier, answer: tuple[int, str, float], check: str, outcome: str
) -> None:
    courier.response_check = check
    gateway = Gateway(answer)
    try:
        [result] = courier.send(gateway.server.base_url + "/s", message_id=1, text="hi", to="+1", timeout_s=0.5)
    finally:
        gateway.server.stop()
    assert result.outcome == outcome


def test_a_time_out_after_sending_leaves_the_request_with_the_gateway(courier: Courier) -> None:
    gateway = Gateway((202, "Accepted", 0))
    try:
        [result] = courier.send(
            gateway.server.base_url + "/s", message_id=3, text="hi", to="+1", time_out_after_sending=True
        )
        requests = gateway.server.wait_for(lambda r: len(r) == 1, 10, "the abandoned request")
    finally:
        gateway.server.stop()
    assert result.outcome == "connection_failed"
    assert requests[0].form["id"] == "3"


def test_courier_receive_and_status_urls_validate_as_courier_does(courier: Courier) -> None:
    base = courier.receive_url.removesuffix("/receive")
    form = urllib.parse.urlencode
    assert (
        post(
            courier.receive_url, form({"from": "+255700000001", "text": "Hi", "date": "2026-12-06T00:53:52Z"}).encode()
        )[0]
        == 200
    )
    assert (
        post(
            courier.receive_url,
            form({"from": "+2557", "text": "x", "date": "2026-12-06T00:53:52.123456789+03:00"}).encode(),
        )[0]
        == 200
    )
    status, body = post(
        courier.receive_url, form({"from": "+2557", "text": "x", "date": "2026-12-06 00:53:52"}).encode()
    )
    assert status == 400 and "RFC 3339" in body
    status, body = post(courier.receive_url, form({"text": "no sender"}).encode())
    assert status == 400 and "'from'" in body
    assert post(f"{base}/sent", b"id=10071")[0] == 200
    assert post(f"{base}/delivered", b"id=10071")[0] == 200
    assert post(f"{base}/failed", b"id=abc")[0] == 400
    assert post(f"{base}/sent", b"")[0] == 400
    assert (
        post(courier.receive_url.replace(courier.channel_uuid, "00000000-0000-0000-0000-000000000000"), b"from=1")[0]
        == 404
    )
    assert courier.statuses(10071) == ["sent", "delivered"]
    assert [f["text"] for f in courier.accepted("receive")] == ["Hi", "x"]
    assert len(courier.calls("receive")) == 4  # refused calls are recorded too


def test_kannel_callbacks_record_dlr_types_and_inbound_queries() -> None:
    callbacks = KannelCallbacks().start()
    try:
        template = callbacks.dlr_url("r1")
        assert "%d" in template and "%p" in template
        for kind in ("8", "1"):
            filled = template.replace("%d", kind).replace("%p", "%2B2557").replace("%T", "1").replace("%I", "m")
            with urllib.request.urlopen(filled, timeout=10) as response:
                assert response.status == 200
        get_url = callbacks.get_url().replace("%p", "%2B255700000001").replace("%a", "Hello+there")
        with urllib.request.urlopen(get_url, timeout=10):
            pass
        assert callbacks.dlr_types("r1") == [8, 1]
        assert callbacks.dlr_types("other") == []
        [inbound] = callbacks.inbound()
        assert inbound["from"] == "+255700000001" and inbound["text"] == "Hello there"
    finally:
        callbacks.stop()


def signed_post(url: str, key: str, body: bytes, *, timestamp: int | None = None) -> tuple[int, str]:
    parts = urllib.parse.urlsplit(url)
    target = parts.path + (f"?{parts.query}" if parts.query else "")
    ts = str(int(time.time()) if timestamp is None else timestamp)
    request = urllib.request.Request(
        url,
        data=body,
        method="POST",
        headers={
            "Content-Type": "application/json",
            "X-SMSGW-Timestamp": ts,
            "X-SMSGW-Signature": signature(key, ts, "POST", target, body),
        },
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def test_the_webhook_receiver_verifies_with_the_docs_recipe() -> None:
    receiver = WebhookReceiver("whk-s3cret").start()
    try:
        event = json.dumps({"event": "sms:sent", "id": "m1"}).encode()
        assert signed_post(receiver.url, "whk-s3cret", event)[0] == 200
        assert signed_post(receiver.url, "another key", event)[0] == 401
        assert signed_post(receiver.url, "whk-s3cret", event, timestamp=int(time.time()) - 600)[0] == 401
        assert post(receiver.url, event, "application/json")[0] == 401  # unsigned
        assert receiver.verified() == [{"event": "sms:sent", "id": "m1"}]
        assert [e.signature_error is None for e in receiver.events("sms:sent")] == [True, False, False, False]
    finally:
        receiver.stop()
    # The recipe is the documented code, checked against the gateway's own signing function.
    check = docs_python_recipe()
    now = str(int(time.time()))
    good = signature("k", now, "POST", "/a?b=c%20d", b"{}")
    assert check("k", "/a?b=c%20d", b"{}", now, good) is None
    assert check("k", "/a?b=c d", b"{}", now, good) == "X-SMSGW-Signature does not match"


def test_the_docs_shell_recipe_verifies_a_saved_request(tmp_path: Path) -> None:
    if shutil.which("openssl") is None:
        pytest.skip("openssl not installed")
    body = b'{"event": "sms:received", "text": "Habari \\u00fc"}\n'
    (tmp_path / "body.json").write_bytes(body)
    ts = str(int(time.time()))
    env = {"PATH": "/usr/bin:/bin", "TS": ts, "TARGET": "/hooks/sms?x=a%20b", "SIGNING_KEY": "k3y"}
    for key, expected in (("k3y", "verified"), ("wrong", "signature does not match")):
        env["SIG"] = signature(key, ts, "POST", env["TARGET"], body)
        result = subprocess.run(
            ["sh", "-c", docs_shell_recipe()],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        assert result.stdout.strip() == expected, result.stderr
