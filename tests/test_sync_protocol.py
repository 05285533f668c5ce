"""The SMSsync codec against the reply shapes real servers send (protocol-notes §2-3)."""

from __future__ import annotations

import json
import urllib.parse

import pytest
from defusedxml import ElementTree as DefusedElementTree

from services.schemas import InboundSms
from services.sync_protocol import (
    ERROR_PAGE_CHARS,
    Endpoint,
    ReplyError,
    SyncEncodingError,
    SyncScheme,
    describe_body,
    first_json_document,
    parse_message_uuids,
    parse_payload,
    results_body,
    secrets_match,
    sync_form,
)

SEED_TASK_REPLY = (
    '{"payload":{"success":"true","task":"send","secret":"123456","messages":[{"to":"+819029842384",'
    '"message":"Sample Task Message","uuid":"1ba368bd-c467-4374-bf28"}]}}'
    '{"message_uuids":["1ba368bd-c467-4374-bf28"]}'
)


def test_two_documents_back_to_back_take_the_first() -> None:
    payload = parse_payload(SEED_TASK_REPLY)
    assert payload.success is True
    assert payload.task == "send" and payload.secret == "123456"
    assert [m.uuid for m in payload.messages] == ["1ba368bd-c467-4374-bf28"]


def test_php_warning_before_json_is_skipped() -> None:
    body = "<br />\n<b>Warning</b>: Undefined variable $from in index.php<br />\n" + '{"payload":{"success":true}}'
    assert parse_payload(body).success is True


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        ("", "empty"),
        ("<html><body>500 Internal Server Error</body></html>", "not JSON"),
        ("null", "not JSON"),
        ('{"success": true}', "no 'payload'"),
        ("[1, 2]", "not an object"),
    ],
)
def test_unreadable_replies_raise_with_a_reason(body: str, reason: str) -> None:
    with pytest.raises(ReplyError, match=reason):
        parse_payload(body)


def test_success_variants_and_missing_key() -> None:
    assert parse_payload('{"payload":{"success":"TRUE"}}').success is True
    assert parse_payload('{"payload":{"success":"false","error":"Secret Key Mismatch"}}').success is False
    assert parse_payload('{"payload":{"success":1}}').success is False
    assert parse_payload('{"payload":{"task":"send"}}').success is None


def test_invalid_messages_are_skipped_not_fatal() -> None:
    body = json.dumps(
        {
            "payload": {
                "success": True,
                "task": "send",
                "messages": [
                    {"to": None, "message": "x", "uuid": "a"},
                    {"to": "+255700000001", "message": "ok", "uuid": "b"},
                    {"to": "+255700000002", "message": "no uuid"},
                    "junk",
                ],
            }
        }
    )
    payload = parse_payload(body)
    assert [m.uuid for m in payload.messages] == ["b"]
    assert len(payload.skipped) == 3


def test_endpoint_query_and_basic_auth() -> None:
    endpoint = Endpoint.parse("http://u%40x:p%3Ass@127.0.0.1:8000/sync.php?key=1")
    assert endpoint.auth == ("u@x", "p:ss")
    assert endpoint.url == "http://127.0.0.1:8000/sync.php?key=1"
    url = endpoint.with_query(task="send", secret="a&b= c")
    assert url == "http://127.0.0.1:8000/sync.php?key=1&task=send&secret=a%26b%3D+c"
    assert Endpoint.parse("http://h/smssync").with_query(task="sent") == "http://h/smssync?task=sent"


def test_message_uuids_tolerates_wrong_key_and_null() -> None:
    assert parse_message_uuids('{"message_uuids":["a","b"]}') == ["a", "b"]
    assert parse_message_uuids('{"queued_messages":["a"]}') == ["a"]
    assert parse_message_uuids('{"message_uuids":null}') == []
    with pytest.raises(ReplyError):
        parse_message_uuids('{"message_uuids":"abc"}')


def test_secret_compare_and_form_fields() -> None:
    assert secrets_match("s3cret", "s3cret") and not secrets_match("s3cret", "s3cre")
    assert not secrets_match("s3cret", None) and secrets_match("", None)
    sms = InboundSms("id-1", "+255700000001", "hi", 1700000000000, "+255700000009", "dev", "m0", 1)
    form = sync_form(sms, "", "dev")
    assert "secret" not in form and form["sent_timestamp"] == "1700000000000" and form["from"] == "+255700000001"


def test_results_body_shapes() -> None:
    rows = [{"uuid": "a", "sent_result_code": 0}]
    assert results_body(rows, "message_results") == {"message_results": rows}
    assert json.loads(results_body(rows, "message_result_string")["message_result"]) == rows
    assert results_body(rows, "message_result_array") == {"message_result": rows}
    assert first_json_document('  {"a":1} trailing') == {"a": 1}


def test_pathological_replies_are_reply_errors_not_crashes() -> None:
    with pytest.raises(ReplyError, match="nested too deeply"):
        parse_payload("[" * 100000 + "]" * 100000)
    body = (
        '{"payload":{"task":"send","messages":[{"to":"+2557","message":"bad \\ud83d","uuid":"a"},'
        '{"to":"+2557","message":"good","uuid":"b"}]}}'
    )
    payload = parse_payload(body)
    assert [m.uuid for m in payload.messages] == ["b"]
    assert "lone surrogate" in payload.skipped[0]


def test_error_snippets_never_carry_the_secret() -> None:
    with pytest.raises(ReplyError) as caught:
        parse_payload('{"payload":{"success":"true","task":"send","secret":"123456","messages":[')
    assert "123456" not in str(caught.value) and '"secret":"***"' in str(caught.value)
    with pytest.raises(ReplyError) as caught:
        first_json_document("<a href='/x?task=send&secret=s3cret'>moved</a>")
    assert "s3cret" not in str(caught.value)


def test_secret_with_a_lone_surrogate_is_a_mismatch_not_a_crash() -> None:
    assert not secrets_match("s3cret", "s3cret\ud83d")


def test_uuid_optional_only_for_instant_replies() -> None:
    body = '{"payload":{"success":true,"task":"send","messages":[{"to":"+2557","message":"hi"}]}}'
    assert parse_payload(body).messages == ()
    assert [m.uuid for m in parse_payload(body, require_uuid=False).messages] == [""]


FIELDS = {
    "secret": "s&cret=1",
    "from": "+255700000001",
    "message": "Habari <b> & \"x\" 'y' 😀\nline 2\r\nline 3\r",
    "sent_timestamp": "1700000000123",
    "sent_to": "+255700000009",
    "message_id": "id-1",
    "device_id": "d",
}


def test_sync_scheme_urlencoded_is_the_apps_form() -> None:
    body, content_type = SyncScheme().encode(FIELDS)
    assert content_type == "application/x-www-form-urlencoded"
    assert dict(urllib.parse.parse_qsl(body.decode("ascii"), keep_blank_values=True)) == FIELDS


def test_sync_scheme_json_is_a_flat_object_of_strings_with_renamed_keys() -> None:
    body, content_type = SyncScheme("PUT", "json", {"message": "text", "from": "sender"}).encode(FIELDS)
    assert content_type.startswith("application/json")
    document = json.loads(body)
    expected = {("text" if k == "message" else "sender" if k == "from" else k): v for k, v in FIELDS.items()}
    assert document == expected
    assert list(document) == list(expected)  # the app's field order is kept


def test_sync_scheme_xml_round_trips_markup_and_emoji() -> None:
    body, content_type = SyncScheme("POST", "xml", {"message_id": "id"}).encode(FIELDS)
    assert content_type.startswith("application/xml")  # not the app's mislabelled application/json
    root = DefusedElementTree.fromstring(body)
    assert root.tag == "payload"
    parsed = {child.tag: child.text or "" for child in root}
    assert parsed == {("id" if k == "message_id" else k): v for k, v in FIELDS.items()}


@pytest.mark.parametrize("text", ["page\x0cbreak", "bell\x07"])
def test_sync_scheme_xml_refuses_characters_xml_cannot_carry(text: str) -> None:
    with pytest.raises(SyncEncodingError, match=r"XML 1\.0 cannot carry"):
        SyncScheme("POST", "xml").encode({**FIELDS, "message": text})
    # The same text is fine in the other formats.
    assert json.loads(SyncScheme("POST", "json").encode({**FIELDS, "message": text})[0])["message"] == text


def test_sync_scheme_refuses_a_lone_surrogate() -> None:
    with pytest.raises(SyncEncodingError, match="not valid Unicode"):
        SyncScheme("POST", "json").encode({**FIELDS, "message": "half \ud83d"})


WERKZEUG_PAGE = """<!doctype html>
<html lang=en>
  <head>
    <title>UnicodeEncodeError: 'latin-1' codec can't encode character
 // Werkzeug Debugger</title>
    <link rel="stylesheet" href="?__debugger__=yes&amp;cmd=resource&amp;f=style.css">
    <script>var CONSOLE_MODE = false, EVALEX = true;</script>
  </head>
  <body style="background-color: #fff"><div class="debugger"><h1>UnicodeEncodeError</h1></div></body>
</html>"""


@pytest.mark.parametrize(
    ("body", "gist"),
    [
        (
            "<html><head><title>DisallowedHost\n   at /sms</title><style>p{}</style></head></html>",
            "DisallowedHost at /sms",
        ),
        (WERKZEUG_PAGE, "UnicodeEncodeError: 'latin-1' codec can't encode character // Werkzeug Debugger"),
        (
            "<html><head><title>502 Bad Gateway</title></head><body><center>nginx</center></body></html>",
            "502 Bad Gateway",
        ),
        (
            "<!DOCTYPE html><html><head><style>h1{}</style></head><body>\n<h1>Server Error (500)</h1></body></html>",
            "Server Error (500)",
        ),  # Django without DEBUG: no title
        (
            "<br />\n<b>Fatal error</b>:  Uncaught PDOException in /var/www/sms.php:12",
            "Fatal error: Uncaught PDOException in /var/www/sms.php:12",
        ),
        ("<title>Tom &amp; Jerry</title>", "Tom & Jerry"),
        ("Internal Server Error", "Internal Server Error"),
        ('{"error": "db down"}', '{"error": "db down"}'),
        ("   \n ", "empty body"),
        ("<title>secret=hunter2 rejected</title>", "secret=*** rejected"),
    ],
)
def test_describe_body_names_an_html_page_by_its_title_or_first_text_line(body: str, gist: str) -> None:
    assert describe_body(body, 200) == gist


def test_describe_body_is_clipped() -> None:
    described = describe_body("<title>" + "x" * 500 + "</title>", 80)
    assert len(described) == 80 and described.endswith("…")


def test_a_json_parse_error_on_an_html_page_carries_its_title() -> None:
    with pytest.raises(ReplyError, match=r"body is not JSON.*: DisallowedHost at /sms$"):
        parse_payload("<html><head><title>DisallowedHost at /sms</title><style>a { b: c }</style></head></html>")


def test_an_invalid_message_keeps_its_key_wherever_it_stands() -> None:
    bad = {"to": "", "message": "x", "uuid": "b-1"}
    good = {"to": "+1", "message": "ok", "uuid": "g-1"}
    first = parse_payload(json.dumps({"payload": {"task": "send", "messages": [bad]}}))
    moved = parse_payload(json.dumps({"payload": {"task": "send", "messages": [good, bad, {"to": "+2"}]}}))
    assert first.skipped == ("message 0 (uuid b-1): 'to' is missing or empty",)
    assert moved.skipped[0] == "message 1 (uuid b-1): 'to' is missing or empty"
    assert len(moved.skipped_keys) == 2 and moved.skipped_keys[0] == first.skipped_keys[0]
    assert moved.skipped_keys[1] != moved.skipped_keys[0]


@pytest.mark.parametrize("text", ["", "   ", "\n\t "])
def test_an_empty_text_is_an_invalid_message_named_by_its_uuid(text: str) -> None:
    body = json.dumps(
        {"payload": {"task": "send", "messages": [{"to": "+1", "message": text, "uuid": "e-1"}, ONE_GOOD]}}
    )
    payload = parse_payload(body)
    assert [m.uuid for m in payload.messages] == ["g-1"]
    [invalid] = payload.invalid
    assert invalid.reason == "message 0 (uuid e-1): 'message' is empty"
    assert invalid.failed_uuid == "e-1"  # complete but for its text: the server waits for a result of it


def test_only_an_empty_text_is_reported_failed_and_an_instant_reply_needs_a_uuid_for_it() -> None:
    messages = [
        {"to": "", "message": "x", "uuid": "a"},  # no recipient: not a message the server could mean
        {"to": "+1", "message": ""},  # an instant reply without uuid: nothing to report under
    ]
    payload = parse_payload(json.dumps({"payload": {"messages": messages}}), require_uuid=False)
    assert [i.failed_uuid for i in payload.invalid] == [None, None]
    assert payload.skipped == ("message 0 (uuid a): 'to' is missing or empty", "message 1: 'message' is empty")


ONE_GOOD = {"to": "+2", "message": "ok", "uuid": "g-1"}


DJANGO_APPEND_SLASH_PAGE = """<!DOCTYPE html>
<html lang="en"><head><title>RuntimeError
          at /smssync</title><style>html * { padding:0; }</style></head>
<body><div id="summary"><h1>RuntimeError at /smssync</h1>
<pre class="exception_value">You called this URL via POST, but the URL doesn&#x27;t end in a slash and you have
APPEND_SLASH set. Django can&#x27;t redirect to the slash URL while maintaining POST data. Change your form to
point to 127.0.0.1:8000/smssync/ (note the trailing slash), or set APPEND_SLASH=False in your Django settings.</pre>
</div></body></html>"""


def test_describe_body_keeps_the_exception_text_of_a_django_debug_page() -> None:
    gist = describe_body(DJANGO_APPEND_SLASH_PAGE, ERROR_PAGE_CHARS)
    assert gist.startswith("RuntimeError at /smssync: You called this URL via POST")
    assert gist.endswith("or set APPEND_SLASH=False in your Django settings.")


def test_describe_body_prefers_werkzeugs_full_exception_text_to_its_cut_title() -> None:
    page = WERKZEUG_PAGE.replace(
        "<h1>UnicodeEncodeError</h1>",
        "<h1>UnicodeEncodeError</h1><p class=\"errormsg\">UnicodeEncodeError: 'latin-1' codec can't encode "
        "character '\\u2019' in position 3: ordinal not in range(256)</p>",
    )
    assert describe_body(page, ERROR_PAGE_CHARS) == (
        "UnicodeEncodeError: 'latin-1' codec can't encode character '\\u2019' in position 3: ordinal not in range(256)"
    )


def test_a_json_parse_error_keeps_the_fix_a_django_page_names() -> None:
    with pytest.raises(ReplyError, match=r"set APPEND_SLASH=False in your Django settings\.$"):
        parse_payload(DJANGO_APPEND_SLASH_PAGE)
