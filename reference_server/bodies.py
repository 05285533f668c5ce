"""Request bodies of the reference server: the sync body in every shape the app and the docs send (form,
multipart, JSON, XML) and the ``POST /outbox`` form; each read into a flat dict, or refused in one line."""

from __future__ import annotations

import email.parser
import email.policy
import json
import re
from collections.abc import Mapping
from typing import Any
from urllib.parse import parse_qs
from xml.etree import ElementTree

from defusedxml import DefusedXmlException
from defusedxml import ElementTree as DefusedElementTree

from reference_server.errors import BadRequestError

#: Bodies larger than this are refused with 413 (the server is a test tool, not a file store).
MAX_BODY_BYTES = 1024 * 1024

#: What the outbox form accepts as a destination: an international or local number, digits only after the '+'.
_PHONE_NUMBER = re.compile(r"\+?[0-9]{3,20}")


def parse_body(body: bytes, content_type: str) -> dict[str, Any]:
    """Body as a dict: JSON (by content type or by shape), XML, multipart or form-urlencoded.

    Raises:
        BadRequestError: undecodable JSON, JSON that is not an object, bad XML or a form body not in UTF-8.
    """
    media = content_type.split(";", maxsplit=1)[0].strip().lower()
    if not body.strip():
        return {}
    # The app labels its XML bodies application/json (a bug), so the body's first byte decides too.
    if media in ("application/xml", "text/xml") or media.endswith("+xml") or body.lstrip()[:1] == b"<":
        return parse_xml_payload(body)
    if (
        media == "application/json"
        or media.endswith("+json")
        or (media in ("", "text/plain") and body.lstrip()[:1] in (b"{", b"["))
    ):
        return parse_json_object(body, "malformed JSON body")
    if media == "multipart/form-data":
        return dict(parse_multipart(body, content_type))
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BadRequestError("form body is not UTF-8") from exc
    return dict(flatten_form(parse_qs(text, keep_blank_values=True)))


def parse_json_object(body: bytes, what: str) -> dict[str, Any]:
    """A JSON object from ``body``.

    Raises:
        BadRequestError: ``what: <the decoder's error>`` for undecodable JSON, or JSON that is not an object.
    """
    try:
        document = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BadRequestError(f"{what}: {exc}") from exc
    if not isinstance(document, dict):
        raise BadRequestError("JSON body must be an object")
    return document


def parse_xml_payload(body: bytes) -> dict[str, Any]:
    """An XML sync body (``<payload><from>…</from>…</payload>``) as a flat dict of strings.

    Raises:
        BadRequestError: not well-formed XML, an unknown encoding, a DTD or entities (refused by defusedxml),
            or nested elements.
    """
    try:
        root = DefusedElementTree.fromstring(body, forbid_dtd=True)
    except (ElementTree.ParseError, DefusedXmlException, LookupError, ValueError) as exc:
        raise BadRequestError(f"malformed XML body: {exc}") from exc
    fields: dict[str, Any] = {}
    for child in root:
        if len(child):
            raise BadRequestError(f"XML element <{child.tag}> must hold text, not elements")
        fields[child.tag] = child.text or ""
    return fields


def parse_multipart(body: bytes, content_type: str) -> dict[str, str]:
    """Text fields of a multipart/form-data body (the docs' ``curl -F`` example); file parts are ignored."""
    parser = email.parser.BytesParser(policy=email.policy.HTTP)
    message = parser.parsebytes(b"Content-Type: " + content_type.encode("latin-1") + b"\r\n\r\n" + body)
    fields: dict[str, str] = {}
    if not message.is_multipart():
        raise BadRequestError("malformed multipart body")
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        if not isinstance(name, str) or part.get_filename():
            continue
        payload = part.get_payload(decode=True)
        if isinstance(payload, bytes):
            charset = part.get_content_charset() or "utf-8"
            fields[name] = payload.decode(charset, errors="replace")
    return fields


def flatten_form(values: Mapping[str, list[str]]) -> dict[str, str]:
    """First value of each form field."""
    return {key: items[0] for key, items in values.items() if items}


def outbox_form(body: bytes, content_type: str) -> tuple[str, str]:
    """``to`` and ``text`` of a ``POST /outbox`` form (urlencoded or multipart), ``to`` without blanks.

    Raises:
        BadRequestError: another body type, a field missing or empty, or ``to`` not a phone number.
    """
    media = content_type.split(";", maxsplit=1)[0].strip().lower()
    if media == "multipart/form-data":
        fields = parse_multipart(body, content_type)
    elif media in ("", "application/x-www-form-urlencoded"):
        try:
            fields = flatten_form(parse_qs(body.decode("utf-8"), keep_blank_values=True))
        except UnicodeDecodeError as exc:
            raise BadRequestError("form body is not UTF-8") from exc
    else:
        raise BadRequestError(f"POST /outbox takes a form (to, text), not {media}; JSON goes to POST /_outgoing")
    raw_to = fields.get("to", "")
    to = "".join(raw_to.split())
    text = fields.get("text", "")
    if not to or not text.strip():
        raise BadRequestError("POST /outbox needs the form fields 'to' and 'text'; nothing was queued")
    # A '+' sent unencoded (curl -d to=+255...) arrives as a leading blank; taken as is, the SMS would go to a
    # local number instead of the international one.
    if raw_to[:1].isspace() or not _PHONE_NUMBER.fullmatch(to):
        raise BadRequestError(
            f"'to' must be a phone number such as +255700000001, not {raw_to!r} (curl: send the fields with "
            "--data-urlencode, which keeps the '+'); nothing was queued"
        )
    return to, text
