"""Smoke tests: each third-party peer starts and answers as the transcripts in protocol-notes §3 say.

Run ``tests/peers/install.sh`` first. Without php/node or the install these tests skip, except under CI
(env ``CI`` set), where they fail.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from tests.peers import runners
from tests.peers.runners import (
    SEEDPHP_SECRET,
    SEEDPHP_TASK_UUID,
    LykmapipoPeer,
    SeedPhpPeer,
    parse_seedphp_log,
    require_peer,
)

pytestmark = pytest.mark.peers

SMS = {
    "from": "+254700000001",
    "message": "hello world",
    "message_id": "7f3c1e2a-0000-4000-8000-000000000001",
    "sent_to": "+254700000099",
    "device_id": "dev-1",
    "sent_timestamp": "1700000000000",
}


@pytest.fixture
def seedphp() -> Iterator[SeedPhpPeer]:
    require_peer("seedphp")
    with SeedPhpPeer.start() as peer:
        yield peer


@pytest.fixture
def lykmapipo() -> Iterator[LykmapipoPeer]:
    require_peer("lykmapipo")
    with LykmapipoPeer.start(secret="s3cret") as peer:
        yield peer


# --- seed PHP sample ------------------------------------------------------------------------------------------


def test_seedphp_sync_post_logs_and_replies(seedphp: SeedPhpPeer) -> None:
    response = requests.post(seedphp.url, data={**SMS, "secret": SEEDPHP_SECRET}, timeout=10)
    assert response.status_code == 200
    assert response.headers["Content-Type"].startswith("application/json")
    assert response.json() == {
        "payload": {
            "success": True,
            "task": "send",
            "secret": "123456",
            "messages": [{"to": SMS["from"], "message": "Your message has been received", "uuid": SEEDPHP_TASK_UUID}],
        }
    }
    assert seedphp.received() == [SMS]


def test_seedphp_wrong_secret_gets_the_same_success(seedphp: SeedPhpPeer) -> None:
    response = requests.post(seedphp.url, data={**SMS, "secret": "wrong"}, timeout=10)
    assert response.status_code == 200
    assert response.json()["payload"]["success"] is True
    # The sample logs the message whatever the secret.
    assert [m["message_id"] for m in seedphp.received()] == [SMS["message_id"]]


def test_seedphp_task_send_returns_two_concatenated_json_documents(seedphp: SeedPhpPeer) -> None:
    response = requests.get(seedphp.url, params={"task": "send", "secret": SEEDPHP_SECRET}, timeout=10)
    assert response.status_code == 200
    with pytest.raises(json.JSONDecodeError, match="Extra data"):
        json.loads(response.text)
    first, end = json.JSONDecoder().raw_decode(response.text)
    assert first == {
        "payload": {
            "success": "true",
            "task": "send",
            "secret": "123456",
            "messages": [{"to": "+819029842384", "message": "Sample Task Message", "uuid": SEEDPHP_TASK_UUID}],
        }
    }
    assert json.loads(response.text[end:]) == {"message_uuids": [SEEDPHP_TASK_UUID]}


def test_seedphp_task_sent_echoes_and_result_is_empty(seedphp: SeedPhpPeer) -> None:
    sent = requests.post(
        seedphp.url, params={"task": "sent"}, json={"queued_messages": [SEEDPHP_TASK_UUID, "x-2"]}, timeout=10
    )
    assert sent.json() == {"message_uuids": [SEEDPHP_TASK_UUID, "x-2"]}
    poll = requests.get(seedphp.url, params={"task": "result", "secret": SEEDPHP_SECRET}, timeout=10)
    assert poll.json() == {"message_uuids": [SEEDPHP_TASK_UUID]}
    rows = [{"uuid": SEEDPHP_TASK_UUID, "sent_result_code": 0, "sent_result_message": "SMSSync Message Sent"}]
    result = requests.post(
        seedphp.url,
        params={"task": "result", "secret": SEEDPHP_SECRET},
        json={"message_results": rows},
        timeout=10,
    )
    assert result.status_code == 200
    assert result.text == ""
    log = seedphp.log()
    assert [json.loads(b) for b in log.sent_bodies] == [{"queued_messages": [SEEDPHP_TASK_UUID, "x-2"]}]
    assert [json.loads(b) for b in log.result_bodies] == [{"message_results": rows}]


def test_seedphp_display_errors_prepends_html_warnings() -> None:
    require_peer("seedphp")
    with SeedPhpPeer.start(display_errors=True) as peer:
        fields = {k: v for k, v in SMS.items() if k != "from"}
        response = requests.post(peer.url, data={**fields, "secret": SEEDPHP_SECRET}, timeout=10)
    assert response.status_code == 200
    assert "<b>Warning</b>" in response.text
    start = response.text.index('{"payload"')
    assert start > 0
    document, _ = json.JSONDecoder().raw_decode(response.text, start)
    assert document["payload"]["messages"][0]["to"] is None


def test_seedphp_runs_are_isolated() -> None:
    require_peer("seedphp")
    with SeedPhpPeer.start() as first, SeedPhpPeer.start() as second:
        assert first.workdir != second.workdir
        requests.post(first.url, data={**SMS, "secret": SEEDPHP_SECRET}, timeout=10)
        assert len(first.received()) == 1
        assert second.received() == []
    assert not first.alive()
    assert not first.workdir.exists()


def test_parse_seedphp_log_handles_multiline_messages() -> None:
    text = (
        "From: +1\nMessage: line one\nline two\nTimestamp: 1\nMessages Id:m-1\nSent to: \nDevice ID: \n\n\n"
        '{"queued_messages":["a"]}\n\n'
        'message {"message_result":"[]"}\n\n'
    )
    log = parse_seedphp_log(text)
    assert log.messages == [
        {
            "from": "+1",
            "message": "line one\nline two",
            "sent_timestamp": "1",
            "message_id": "m-1",
            "sent_to": "",
            "device_id": "",
        }
    ]
    assert log.sent_bodies == ['{"queued_messages":["a"]}']
    assert log.result_bodies == ['{"message_result":"[]"}']


def test_seedphp_without_seed_docs_is_skipped_for_the_docs_not_for_php(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # A clone without ../shared: install.sh installs neither the sample nor php, so the docs are the reason.
    monkeypatch.setattr(runners, "SEED_DOCS", tmp_path / "shared" / "seed" / "smssync-docs.txt")
    monkeypatch.setattr(runners, "SEEDPHP_DIR", tmp_path / ".peers" / "seedphp")
    monkeypatch.setattr(shutil, "which", lambda name: None)
    reason = runners.missing_reason("seedphp")
    assert reason is not None
    assert "seed docs are not at" in reason and "php is not installed" not in reason


def test_scripts_test_summarises_failures_errors_and_skips() -> None:
    script = (runners.REPO_ROOT / "scripts" / "test").read_text(encoding="utf-8")
    assert 'pytest -rfEs "$@"' in script


# --- npm smssync (lykmapipo) ------------------------------------------------------------------------------------


def test_lykmapipo_sync_post_replies_without_secret(lykmapipo: LykmapipoPeer) -> None:
    response = requests.post(lykmapipo.url, data={**SMS, "secret": "s3cret"}, timeout=10)
    assert response.status_code == 200
    assert response.json() == {
        "payload": {
            "success": True,
            "task": "send",
            "messages": [{"to": SMS["from"], "message": "got: hello world", "uuid": "reply-1"}],
        }
    }
    received = lykmapipo.received()
    assert len(received) == 1
    assert {k: received[0][k] for k in SMS} == SMS


def test_lykmapipo_wrong_secret_is_http_200_success_false(lykmapipo: LykmapipoPeer) -> None:
    response = requests.post(lykmapipo.url, data={**SMS, "secret": "wrong"}, timeout=10)
    assert response.status_code == 200
    assert response.json() == {"payload": {"success": False, "error": "Secret Key Mismatch"}}
    assert lykmapipo.received() == []


def test_lykmapipo_handler_error(lykmapipo: LykmapipoPeer) -> None:
    response = requests.post(lykmapipo.url, json={**SMS, "message": "fail", "secret": "s3cret"}, timeout=10)
    assert response.json() == {"payload": {"success": False, "error": "rejected by peer"}}


def test_lykmapipo_task_flow_uses_wrong_sent_key(lykmapipo: LykmapipoPeer) -> None:
    send = requests.get(lykmapipo.url, params={"task": "send", "secret": "s3cret"}, timeout=10)
    assert send.json() == {
        "payload": {
            "task": "send",
            "secret": "s3cret",
            "messages": [{"to": "+254700000010", "message": "hello from lykmapipo peer", "uuid": "out-0001"}],
        }
    }
    sent = requests.post(lykmapipo.url, params={"task": "sent"}, json={"queued_messages": ["out-0001"]}, timeout=10)
    # The peer answers with queued_messages, not the documented message_uuids.
    assert sent.json() == {"queued_messages": ["out-0001"]}
    again = requests.get(lykmapipo.url, params={"task": "send", "secret": "s3cret"}, timeout=10)
    assert again.json()["payload"]["messages"] == []
    poll = requests.get(lykmapipo.url, params={"task": "result", "secret": "s3cret"}, timeout=10)
    assert poll.json() == {"message_uuids": ["out-0001"]}
    rows = [{"uuid": "out-0001", "sent_result_code": -1, "delivered_result_code": -1}]
    result = requests.post(lykmapipo.url, params={"task": "result"}, json={"message_result": rows}, timeout=10)
    assert result.json() == {"payload": {"success": True, "error": None}}
    state = lykmapipo.state()
    assert state["queued"] == ["out-0001"]
    assert state["delivered"] == [rows]


def test_lykmapipo_stop_by_pid() -> None:
    require_peer("lykmapipo")
    peer = LykmapipoPeer.start()
    url = peer.url
    peer.stop()
    assert not peer.alive()
    with pytest.raises(requests.ConnectionError):
        requests.get(url, timeout=2)
