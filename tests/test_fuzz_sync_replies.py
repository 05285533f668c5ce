"""Fuzz the readers of what a Sync URL answers: the inbound sync reply and ``?task=send`` (``parse_payload``),
``?task=sent`` (``parse_message_uuids``), ``?task=result`` (the reporter's reading of a POST's answer) and
redirects (``redirect_target``). Arbitrary JSON (wrong types, huge numbers, nested nulls, lone surrogates) and
arbitrary non-JSON text: nothing escapes but the documented rejection, and every rejection is one line."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from result_reporter.results_http import Refusal, ResultsRequests
from services.config import env_endpoint
from services.sync_client import RedirectRefused, SyncAnswer, SyncClient, redirect_target
from services.sync_protocol import (
    Payload,
    ReplyError,
    describe_body,
    first_json_document,
    parse_message_uuids,
    parse_payload,
)
from tests.fuzzing import FUZZ, json_values, numbers, one_line, texts
from tests.http_stub import HttpStub

# The keys the readers look for, so that the fuzzer reaches past "no 'payload' object".
_REPLY_KEYS = (
    st.sampled_from(
        [
            *("payload", "success", "error", "task", "secret", "messages", "to", "message", "uuid"),
            *("message_uuids", "queued_messages", "message_result", "message_results"),
        ]
    )
    | texts
)
_JSON = json_values(_REPLY_KEYS)


def _dumped(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)


# A body: a JSON document (as is, or with noise around it as PHP servers send), or any text at all.
bodies = st.one_of(
    _JSON.map(_dumped),
    st.tuples(texts, _JSON.map(_dumped), texts).map("".join),
    st.text(max_size=200),
    st.binary(max_size=100).map(lambda raw: raw.decode("utf-8", "replace")),
)

_task_message = st.fixed_dictionaries(
    {},
    optional={"to": _JSON | texts, "message": _JSON | texts, "uuid": _JSON | numbers | texts},
)
# A reply shaped like a task reply, its values fuzzed.
task_replies = st.fixed_dictionaries(
    {
        "payload": st.fixed_dictionaries(
            {},
            optional={
                "success": _JSON,
                "task": _JSON,
                "secret": _JSON,
                "error": _JSON,
                "messages": st.lists(_task_message | _JSON, max_size=4) | _JSON,
            },
        )
    }
).map(_dumped)


def _check_payload(payload: Payload) -> None:
    """What every caller of ``parse_payload`` relies on."""
    assert payload.success in (True, False, None)
    assert len(payload.skipped) == len(payload.skipped_keys)
    for reason in payload.skipped:
        assert one_line(reason), reason
    for message in payload.messages:
        for value in (message.to, message.text, message.uuid):
            value.encode("utf-8")  # no lone surrogate reaches a queue
        assert message.to.strip() and message.to == message.to.strip()


@FUZZ
@given(body=bodies | task_replies, require_uuid=st.booleans())
@example(body='{"payload": {"messages": [{"to": "1", "message": "x", "uuid": 1e400}]}}', require_uuid=True)
@example(body="[" * 100_000, require_uuid=True)
@example(body='<b>Warning</b>: {"payload": null}', require_uuid=False)
def test_parse_payload_reads_or_rejects_in_one_line(body: str, require_uuid: bool) -> None:
    try:
        payload = parse_payload(body, require_uuid=require_uuid)
    except ReplyError as exc:
        assert one_line(str(exc)), str(exc)
        return
    _check_payload(payload)


@FUZZ
@given(reply=task_replies, require_uuid=st.booleans())
@example(reply='{"payload": {"messages": [{"to": "+255700000001", "message": "", "uuid": "u1"}]}}', require_uuid=True)
@example(reply='{"payload": {"messages": [{"to": "+255700000001", "message": ""}]}}', require_uuid=False)
def test_an_empty_text_is_an_invalid_task_message(reply: str, require_uuid: bool) -> None:
    """Issue 13: an empty text is not an SMS to send; it is skipped with a reason naming the message."""
    try:
        payload = parse_payload(reply, require_uuid=require_uuid)
    except ReplyError:
        return
    assert all(message.text for message in payload.messages)


@FUZZ
@given(body=bodies)
@example(body='{"message_uuids": [1e400, 1]}')
@example(body='{"queued_messages": [true, null]}')
def test_parse_message_uuids_reads_or_rejects_in_one_line(body: str) -> None:
    try:
        uuids = parse_message_uuids(body)
    except ReplyError as exc:
        assert one_line(str(exc)), str(exc)
        return
    assert all(isinstance(uuid, str) for uuid in uuids)


@FUZZ
@given(body=bodies)
def test_first_json_document_and_describe_body(body: str) -> None:
    try:
        first_json_document(body)
    except ReplyError as exc:
        assert one_line(str(exc)), str(exc)
    gist = describe_body(body)
    assert one_line(gist) and len(gist) <= 80, gist


class _Answering:
    """A ``SyncEndpoint`` answering every request with one fixed answer."""

    def __init__(self, answer: SyncAnswer) -> None:
        self.answer = answer

    def get(self, **query: str) -> SyncAnswer:
        return self.answer

    def post_json(self, body: object, **query: str) -> SyncAnswer:
        return self.answer

    def close(self) -> None:
        pass


_ENDPOINT = env_endpoint({"SMSGW_SYNC_URL": "http://127.0.0.1:9/sms", "SMSGW_SECRET": "s3cret"})


@FUZZ
@given(status=st.integers(100, 599) | st.sampled_from([200, 201, 204]), body=bodies | task_replies)
@example(status=200, body='{"payload": {"success": false, "error": "line one\\nline two"}}')
@example(status=200, body='{"payload": {"success": "FALSE", "error": {"deep": [null]}}}')
def test_task_result_answer_is_accepted_or_refused_in_one_line(status: int, body: str) -> None:
    """``POST ?task=result``: accepted (None) or a ``Refusal`` whose reason is one line, whatever came back."""
    requests = ResultsRequests(_ENDPOINT, _Answering(SyncAnswer(status, body)))
    refusal = requests.post([{"uuid": "u1", "sent_result_code": 0}])
    if refusal is None:
        assert 200 <= status < 300
        return
    assert isinstance(refusal, Refusal)
    assert one_line(refusal.reason), refusal.reason
    assert "s3cret" not in refusal.reason


# Locations servers send, and the ones that break URL parsers: unclosed IPv6 brackets, bad ports, controls.
locations = st.one_of(
    st.text(max_size=60),
    st.tuples(
        st.sampled_from(["", "http://", "https://", "//", "ftp://", "http://[", "https://user:pw@"]),
        st.sampled_from(["", "127.0.0.1", "[::1", "[::1]", "host:99999", "host:-1", "host:x", "[v1.x]", "exa mple"]),
        st.sampled_from(["", ":80", ":443", ":", ":0"]),
        st.text(max_size=20),
    ).map("".join),
)


@FUZZ
@given(location=locations, url=st.sampled_from(["http://127.0.0.1:8080/sms?secret=x", "https://h.example/s"]))
@example(location="http://[::1]:99999/", url="http://127.0.0.1:8080/sms")
@example(location="//[::1", url="http://127.0.0.1:8080/sms")
@example(location="http://[::1", url="http://127.0.0.1:8080/sms")
@example(location="A:\x0c", url="http://127.0.0.1:8080/sms")  # was: the refusal spanned two lines
def test_redirect_target_follows_or_refuses_in_one_line(location: str, url: str) -> None:
    try:
        target = redirect_target(url, location)
    except RedirectRefused as exc:
        assert one_line(str(exc)), str(exc)
        return
    assert target.startswith(("http://", "https://"))


# What an HTTP header can carry: printable Latin-1 (http.server sends it so), no line breaks.
_header_text = st.text(st.characters(min_codepoint=0x20, max_codepoint=0xFF, exclude_characters="\x7f"), max_size=40)
header_locations = st.one_of(
    _header_text,
    st.tuples(
        st.sampled_from(["", "http://", "https://", "//", "/", "http://127.0.0.1:{port}", "http://[::1"]),
        _header_text,
    ).map("".join),
)


@pytest.fixture(scope="module")
def redirecting_server() -> Iterator[HttpStub]:
    """A loopback Sync URL answering 307 with whatever ``location`` holds (the fuzzed ``Location``)."""
    stub = HttpStub(lambda request: (307, "moved")).start()
    yield stub
    stub.stop()


# requests' Session.send reads the next hop's Location itself (even with allow_redirects=False) and raises a
# bare ValueError on an unclosed IPv6 bracket: the "handler crashed" with a traceback.
@FUZZ
@given(location=header_locations)
@example(location="http://[::1")
@example(location="http://127.0.0.1:{port}/other")
@example(location="/\x80")  # requests decodes the next hop's Location as UTF-8 itself: UnicodeDecodeError
@example(location="http://127.0.0.1:99999/")
@example(location="\x85")  # was: the too-many-redirects message on two lines (NEL in the last URL)
def test_a_redirect_through_the_real_client_is_followed_or_refused(redirecting_server: HttpStub, location: str) -> None:
    """End to end over loopback HTTP: a fuzzed ``Location`` is followed (same host) or refused in one line;
    it never surfaces as a network error (which would be waited out as an outage) or any other exception."""
    port = redirecting_server.url.split(":")[2].split("/")[0]
    redirecting_server.location = location.replace("{port}", port)
    endpoint = env_endpoint({"SMSGW_SYNC_URL": redirecting_server.url, "SMSGW_HTTP_TIMEOUT": "5"})
    client = SyncClient(endpoint)
    try:
        answer = client.send("POST", b"from=1", "application/x-www-form-urlencoded")
    except RedirectRefused as exc:
        assert one_line(str(exc)), str(exc)
    else:
        assert answer.status == 307 and not location.strip()  # only a missing Location is answered as is
    finally:
        client.close()
