"""Issue 15, inbound per kind, black-box: an SMS texted to the simulator reaches a RapidPro receive URL (from,
text, RFC 3339 date), a Kannel get-url (placeholders filled) and a webhook (valid signature), and an SMSsync
endpoint beside them, each once -- through the real modem worker and sync worker processes, RabbitMQ and
loopback HTTP servers."""

from __future__ import annotations

import datetime
import json
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

import pytest

from scripts.stack import Stack
from services.sync_client import HEADER_SIGNATURE, HEADER_TIMESTAMP, signature
from tests.conftest import wait_for
from tests.http_stub import HttpStub, Request

WEBHOOK_KEY = "whsec-e2e"
SENDER = "+255700000001"
TEXT = "REG Amina 34 Arusha"


@pytest.fixture
def stack(fresh_amqp_url: str, tmp_path: Path) -> Iterator[Stack]:
    st = Stack(tmp_path, fresh_amqp_url)
    yield st
    st.stop_all()


def verifies(request: Request, key: str) -> bool:
    """docs/signing.md's recipe: HMAC-SHA256 of ``<timestamp>.<METHOD>.<path?query>.<body>``."""
    timestamp = request.headers.get(HEADER_TIMESTAMP.lower(), "")
    path_query = request.path + (f"?{urllib.parse.urlencode(request.query)}" if request.query else "")
    return signature(key, timestamp, request.method, path_query, request.body) == request.headers.get(
        HEADER_SIGNATURE.lower()
    )


def test_an_sms_reaches_every_kind_of_endpoint_once(stack: Stack) -> None:
    servers = {name: HttpStub(lambda request: (200, "")).start() for name in ("rapidpro", "kannel", "webhook")}
    smssync = HttpStub(lambda request: (200, json.dumps({"payload": {"success": True}}))).start()
    try:
        base = {name: server.url.removesuffix("/smssync") for name, server in servers.items()}
        stack.write_config(f"""
[[endpoints]]
name = "classic"
sync_url = "{smssync.url}"
tasks = false

[[endpoints]]
name = "rp"
kind = "rapidpro"
receive_url = "{base["rapidpro"]}/c/ex/5a1e/receive"
api_key = "rp-key"

[[endpoints]]
name = "kn"
kind = "kannel"
get_url = "{base["kannel"]}/sms?from=%p&to=%P&text=%a&kw=%k&time=%T&smsc=%i&id=%I"
username = "app"
password = "pw"

[[endpoints]]
name = "wh"
kind = "webhook"
url = "{base["webhook"]}/events"
signing_key = "{WEBHOOK_KEY}"
""")
        simulator = stack.start_simulator("simulator", "+255754000001")
        stack.start_modem_worker("modem_worker", simulator, "modem-a")
        stack.start("sync_worker", "sync_worker")
        simulator.inject(SENDER, TEXT)
        everyone = [*servers.values(), smssync]
        wait_for(lambda: all(s.requests for s in everyone), timeout=60, what="the SMS at every endpoint")
    finally:
        stack.stop_all()
        for server in [*servers.values(), smssync]:
            server.stop()

    (receive,) = servers["rapidpro"].requests
    assert (receive.method, receive.path) == ("POST", "/c/ex/5a1e/receive")
    assert receive.form["from"] == SENDER and receive.form["text"] == TEXT
    date = datetime.datetime.fromisoformat(receive.form["date"])
    assert date.tzinfo is not None and date.utcoffset() == datetime.timedelta(0)
    assert receive.form["date"].endswith("Z")

    (get,) = servers["kannel"].requests
    assert (get.method, get.path) == ("GET", "/sms")
    assert get.query["from"] == SENDER and get.query["text"] == TEXT and get.query["kw"] == "REG"
    assert get.query["to"] == "+255754000001" and get.query["smsc"] == "modem-a"
    assert get.query["time"].isdigit() and get.query["id"]

    (event,) = servers["webhook"].requests
    assert verifies(event, WEBHOOK_KEY)
    assert not verifies(event, "another key")
    body = json.loads(event.body)
    assert (body["event"], body["from"], body["text"], body["modem"]) == ("sms:received", SENDER, TEXT, "modem-a")
    assert body["id"] == get.query["id"]  # one message_id for every endpoint: a platform can de-duplicate

    (classic,) = [r for r in smssync.requests if r.method == "POST"]  # the Sync URL probe GETs it too
    assert classic.form["from"] == SENDER and classic.form["message"] == TEXT
