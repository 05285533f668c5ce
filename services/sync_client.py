"""The one HTTP path to a Sync URL, for every leg: inbound sync, ``?task=send``/``sent``, ``?task=result``, probes.

Every request gets the same treatment, so no leg can forget one:

* a deadline: connecting and the wait for the headers are each bounded by the endpoint's ``http_timeout``, and the
  body must be complete within ``http_timeout`` of the request's start (a server trickling its answer cannot hold
  a poll, a round or an SMS indefinitely);
* the app's User-Agent and Basic auth from ``user:pass@`` in the Sync URL;
* HMAC request signing when the endpoint has a ``signing_key`` (docs/signing.md): applied by the session's auth
  object to every prepared request, redirect hops included;
* redirects followed only to the same host (same scheme and port, or http upgraded to https), re-sent with the
  same method and body by us: requests would turn a 302 POST into a GET, and would carry the secret in the query
  or body to wherever ``Location`` points;
* a ``secret=…`` in the message of a network error is masked before the error leaves this module.

Thread-safe: one ``requests.Session`` per calling thread (requests sessions are not thread-safe).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import threading
import time
import urllib.parse
from dataclasses import dataclass
from typing import Protocol

import requests
import urllib3
from requests.auth import AuthBase, HTTPBasicAuth

from services.config import EndpointConfig, redact_url
from services.sync_protocol import AnswerTooSlow, Endpoint, clip, mask_secrets

log = logging.getLogger(__name__)

REDIRECTS = frozenset({301, 302, 303, 307, 308})
MAX_REDIRECTS = 3
HEADER_TIMESTAMP = "X-SMSGW-Timestamp"
HEADER_SIGNATURE = "X-SMSGW-Signature"

__all__ = [
    "HEADER_SIGNATURE",
    "HEADER_TIMESTAMP",
    "MAX_REDIRECTS",
    "AnswerTooSlow",
    "RedirectRefused",
    "SyncAnswer",
    "SyncAuth",
    "SyncClient",
    "SyncEndpoint",
    "redirect_target",
    "signature",
]


@dataclass(frozen=True)
class SyncAnswer:
    """What a Sync URL answered: the HTTP status and the body, decoded as ``requests`` would."""

    status: int
    text: str


class RedirectRefused(Exception):
    """The Sync URL redirects somewhere the request (with the secret and Basic auth) must not follow."""

    def __init__(self, message: str, answer: SyncAnswer | None = None) -> None:
        super().__init__(message)
        self.answer = answer  # the 3xx answer that was not followed (None: none was read)


class _OwnRedirects(requests.Session):
    """A session that leaves redirects to us: requests reads ``Location`` of every 3xx even with
    ``allow_redirects=False`` (it prepares the next hop for ``Response.next``), and an unreadable one
    (``http://[::1``) raised a bare ValueError out of ``request()``. We read ``Location`` ourselves
    (``redirect_target``), where an unreadable one is a ``RedirectRefused`` like any other refused redirect."""

    def get_redirect_target(self, resp: requests.Response) -> str | None:
        """None: requests prepares no next hop (``SyncClient._follow`` decides about redirects)."""
        return None


def signature(key: str, timestamp: str, method: str, path_query: str, body: bytes) -> str:
    """The ``X-SMSGW-Signature`` value: ``sha256=`` and the hex HMAC-SHA256 (keyed with ``key``, UTF-8) of
    ``<timestamp>.<METHOD>.<path?query>.<body>``, the body as the exact bytes sent (empty for a GET)."""
    message = f"{timestamp}.{method.upper()}.{path_query}.".encode() + body
    return "sha256=" + hmac.new(key.encode("utf-8"), message, hashlib.sha256).hexdigest()


class SyncAuth(AuthBase):
    """Basic auth (when the Sync URL holds ``user:pass@``) and request signing (when a key is set), applied to
    every prepared request. Its repr never shows the credentials or the key."""

    def __init__(self, basic: tuple[str, str] | None, signing_key: str) -> None:
        self._basic = HTTPBasicAuth(*basic) if basic else None
        self._key = signing_key

    def __repr__(self) -> str:
        return f"SyncAuth(basic={self._basic is not None}, signing={bool(self._key)})"

    def __call__(self, request: requests.PreparedRequest) -> requests.PreparedRequest:
        """Add ``Authorization`` and the signature headers to ``request``.

        Raises:
            TypeError: a body that is not bytes or text (a stream cannot be signed; no leg sends one).
        """
        if self._basic is not None:
            request = self._basic(request)
        if not self._key:
            return request
        body = request.body
        if body is None:
            raw = b""
        elif isinstance(body, bytes):
            raw = body
        elif isinstance(body, str):
            # Encoded here so the bytes sent are the bytes signed (http.client would encode a str as Latin-1).
            raw = body.encode("utf-8")
            request.body = raw
            request.headers["Content-Length"] = str(len(raw))
        else:
            raise TypeError(f"cannot sign a request body of type {type(body).__name__}")
        timestamp = str(int(time.time()))
        # path_url is the request target the server reads on its request line (requests' HTTPAdapter sends it
        # as is; through a plain-http proxy the proxy sends it on).
        request.headers[HEADER_TIMESTAMP] = timestamp
        request.headers[HEADER_SIGNATURE] = signature(
            self._key, timestamp, request.method or "GET", request.path_url, raw
        )
        return request


class SyncEndpoint(Protocol):
    """One endpoint's Sync URL as the task and results legs use it: :class:`SyncClient`, or a stub in unit tests."""

    def get(self, **query: str) -> SyncAnswer:
        """GET the Sync URL with ``query`` added. Raises requests.RequestException (no answer)."""

    def post_json(self, body: object, **query: str) -> SyncAnswer:
        """POST ``body`` as JSON with ``query`` added. Raises requests.RequestException (no answer)."""

    def close(self) -> None:
        """Release the connections."""


class SyncClient:
    """HTTP client for one endpoint's Sync URL (thread-safe). ``close()`` it when done."""

    def __init__(self, endpoint: EndpointConfig, url: str | None = None) -> None:
        """A client of ``url`` (default: the endpoint's ``url``, its Sync URL or the URL of its kind); Basic auth
        from ``user:pass@`` in it and the endpoint's signing key apply to every request it sends."""
        self._name = endpoint.name
        self._timeout = endpoint.http_timeout
        self._url = Endpoint.parse(endpoint.url if url is None else url)
        self._auth = SyncAuth(self._url.auth, endpoint.signing_key)
        self._local = threading.local()
        self._sessions: list[requests.Session] = []
        self._lock = threading.Lock()
        # (first URL, final URL) of the redirects already logged: a poll every few seconds must not repeat them.
        self._redirects_logged: set[tuple[str, str]] = set()
        self.redacted_url = redact_url(self._url.url) if url is not None else endpoint.redacted_url

    def __repr__(self) -> str:
        return f"SyncClient({self._name!r}, {self.redacted_url!r})"

    # --- the legs ---------------------------------------------------------------------------------------------

    def get(self, **query: str) -> SyncAnswer:
        """GET the Sync URL with ``query`` appended (values URL-encoded); follows same-host redirects.

        A redirect that may not be followed (another host, a downgrade, a loop) is not an error here: its 3xx
        answer is returned, and the caller reports the status like any other.

        Raises:
            requests.RequestException: network error or time-out (``AnswerTooSlow``: body not in time).
        """
        return self._answer_of_refused("GET", self._url.with_query(**query), None, None)

    def post_json(self, body: object, **query: str) -> SyncAnswer:
        """POST ``body`` as JSON to the Sync URL with ``query`` appended; follows same-host redirects (re-sent as
        a POST with the same body); a redirect that may not be followed is returned as its 3xx answer.

        Raises:
            requests.RequestException: network error or time-out.
            TypeError, ValueError: ``body`` cannot be written as JSON.
        """
        data, content_type = _json_bytes(body)
        return self._answer_of_refused("POST", self._url.with_query(**query), data, content_type)

    def send(self, method: str, body: bytes, content_type: str) -> SyncAnswer:
        """Send an inbound sync request (``body`` as encoded by the sync scheme) to the bare Sync URL.

        Redirects are followed only to the same host, re-sending the same method and body, at most
        ``MAX_REDIRECTS`` times.

        Raises:
            requests.RequestException: network error or time-out.
            RedirectRefused: a redirect to another host or port, down to http, without a Location, to an
                unreadable Location, or more than ``MAX_REDIRECTS`` of them.
        """
        return self._follow(method, self._url.url, body, content_type)

    def send_to(self, method: str, url: str, body: bytes | None, content_type: str | None) -> SyncAnswer:
        """Send a request to ``url`` instead of the client's URL (a RapidPro status URL derived from the receive
        URL, a filled Kannel template, a dlr-url), with every guarantee of ``send``; ``user:pass@`` in ``url``
        is dropped (the client's own credentials apply).

        Raises:
            requests.RequestException: network error or time-out.
            RedirectRefused: as ``send`` says.
        """
        return self._follow(method, Endpoint.parse(url).url, body, content_type)

    def probe(self) -> SyncAnswer:
        """A bare GET of the Sync URL (no query, no secret), redirects not followed: for the @20 query code and
        health checks, which only ask whether something answers.

        Raises:
            requests.RequestException: network error or time-out.
        """
        return self._exchange("GET", self._url.url, None, None)

    def close(self) -> None:
        """Close every thread's session (their connections); the client opens new ones if used again."""
        with self._lock:
            sessions, self._sessions = self._sessions, []
            self._local = threading.local()
        for session in sessions:
            session.close()

    # --- plumbing -----------------------------------------------------------------------------------------------

    def _session(self) -> requests.Session:
        session: requests.Session | None = getattr(self._local, "session", None)
        if session is None:
            session = self._url.session(_OwnRedirects)
            session.auth = self._auth
            with self._lock:
                self._sessions.append(session)
            self._local.session = session
        return session

    def _answer_of_refused(self, method: str, url: str, body: bytes | None, content_type: str | None) -> SyncAnswer:
        """``_follow``, with a refused redirect returned as the 3xx answer that asked for it."""
        try:
            return self._follow(method, url, body, content_type)
        except RedirectRefused as exc:
            if exc.answer is None:  # unreachable: every refusal comes with the answer that caused it
                raise
            log.warning("endpoint %s: %s", self._name, exc)
            return exc.answer

    def _follow(self, method: str, url: str, body: bytes | None, content_type: str | None) -> SyncAnswer:
        """Send, following same-host redirects with the same method and body.

        Raises:
            requests.RequestException: network error or time-out.
            RedirectRefused: as ``send`` says.
        """
        first_url, first_status = url, 0
        for _ in range(MAX_REDIRECTS + 1):
            answer, location = self._exchange_with_location(method, url, body, content_type)
            if answer.status not in REDIRECTS:
                if first_status:
                    self._log_redirect(first_url, url, first_status)
                return answer
            if not location:
                raise RedirectRefused(f"Sync URL answered HTTP {answer.status} without a Location", answer)
            first_status = first_status or answer.status
            url = redirect_target(url, location, answer)
        raise RedirectRefused(
            f"Sync URL redirected more than {MAX_REDIRECTS} times (last to {clip(redact_url(url), 200)})", answer
        )

    def _log_redirect(self, first_url: str, final_url: str, status: int) -> None:
        """One WARNING per first and final URL (without query: it holds the secret) naming the URL to configure."""
        pair = (_without_query(first_url), _without_query(final_url))
        with self._lock:
            if pair in self._redirects_logged:
                return
            self._redirects_logged.add(pair)
        log.warning(
            "endpoint %s: Sync URL redirects (HTTP %d) to %s; set its sync_url to that URL to avoid the extra hop "
            "(logged once)",
            self._name,
            status,
            clip(redact_url(pair[1]), 200),
        )

    def _exchange(self, method: str, url: str, body: bytes | None, content_type: str | None) -> SyncAnswer:
        """One request, no redirect followed. Raises requests.RequestException (masked message)."""
        return self._exchange_with_location(method, url, body, content_type)[0]

    def _exchange_with_location(
        self, method: str, url: str, body: bytes | None, content_type: str | None
    ) -> tuple[SyncAnswer, str | None]:
        """One request: its answer and the ``Location`` header (if any).

        Raises:
            requests.RequestException: network error or time-out; a ``secret=`` in its message is masked.
        """
        headers = {"Content-Type": content_type} if content_type else None
        try:
            deadline = time.monotonic() + self._timeout
            response = self._session().request(
                method, url, data=body, headers=headers, timeout=self._timeout, allow_redirects=False, stream=True
            )
            with response:
                response._content = _read_body(response, deadline, self._timeout)
                return SyncAnswer(response.status_code, response.text), response.headers.get("Location")
        except requests.RequestException as exc:
            # requests puts the URL (and the secret in its query) into its messages; callers log them.
            raise _masked(exc) from None


def redirect_target(url: str, location: str, answer: SyncAnswer | None = None) -> str:
    """The URL a redirect from ``url`` to ``location`` leads to, if the request may follow it.

    We re-send the body ourselves, so requests' own safeguards do not apply: the secret and the Basic-auth
    credentials would go wherever ``Location`` says. Only the same host is followed, on the same scheme and port
    or upgraded from http to https.

    Raises:
        RedirectRefused: another host, a downgrade to http, or a Location that is not a URL (carrying ``answer``).
    """
    try:
        target = urllib.parse.urljoin(url, location)
        old, new = urllib.parse.urlsplit(url), urllib.parse.urlsplit(target)
        same_origin = (old.scheme, old.hostname, old.port) == (new.scheme, new.hostname, new.port)
        upgrade = old.scheme == "http" and new.scheme == "https" and old.hostname == new.hostname
    except ValueError:
        raise RedirectRefused(f"Sync URL redirects to an unreadable Location {clip(location, 80)!r}", answer) from None
    if not (same_origin or upgrade):
        raise RedirectRefused(
            f"Sync URL redirects to another host or to plain http ({clip(redact_url(target), 200)}); not followed "
            "with the request and its secret: set the endpoint's sync_url (SMSGW_SYNC_URL) to the new address if it "
            "is right",
            answer,
        )
    return target


def _without_query(url: str) -> str:
    """``url`` without its query and fragment (the query may carry the secret)."""
    return urllib.parse.urlsplit(url)._replace(query="", fragment="").geturl()


def _read_body(response: requests.Response, deadline: float, timeout: float) -> bytes:
    """The whole body of a streamed ``response``, complete before ``deadline`` (monotonic).

    Raises:
        AnswerTooSlow: the body was not complete in time.
        requests.exceptions.ConnectionError: the connection broke while reading.
    """
    chunks: list[bytes] = []
    while True:
        # read1, not iter_content: read(65536) blocks until 64 KiB or the end of the body, so a server sending a
        # byte now and then (each within the socket time-out) would never be checked against the deadline.
        try:
            chunk = response.raw.read1(65536, decode_content=True)
        except urllib3.exceptions.ReadTimeoutError as exc:
            raise requests.exceptions.ReadTimeout(exc) from None
        except urllib3.exceptions.HTTPError as exc:
            raise requests.exceptions.ConnectionError(exc) from None
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)
        if time.monotonic() > deadline:
            raise AnswerTooSlow(f"body not complete within {timeout:g}s")


def _json_bytes(body: object) -> tuple[bytes, str]:
    """``body`` as JSON bytes, exactly as ``requests`` writes ``json=`` (what servers have seen so far).

    Raises:
        TypeError, ValueError: not serialisable (or NaN/Infinity).
    """
    return json.dumps(body, allow_nan=False).encode("utf-8"), "application/json"


def _masked(exc: requests.RequestException) -> requests.RequestException:
    """``exc`` with any ``secret=…`` in its message masked, keeping its type where possible."""
    message = mask_secrets(str(exc))
    try:
        return type(exc)(message)
    except TypeError:
        return requests.RequestException(message)
