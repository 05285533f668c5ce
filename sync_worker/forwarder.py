"""Inbound leg: one queued SMS -> one POST to the Sync URL -> ack, retry later, or park.

Ordering that keeps "nothing lost, nothing doubled":
1. POST the SMS (same ``message_id`` on every attempt, so a server can de-duplicate).
2. On success, publish the server's replies and the auto-response to the outbound queue *with confirms*.
3. Only then ack (the Consumer does it when we return ``Ack``).
A crash between 1 and 3 re-POSTs the SMS; reply uuids are stable (server uuid, else derived from the
message_id), and the modem side's outbound ledger refuses a uuid it already sent, so no reply goes out twice.
"""

from __future__ import annotations

import logging
import threading
import time
import urllib.parse
import uuid
from dataclasses import dataclass

import requests

from services import broker, metrics
from services.broker import Ack, BrokerError, Budget, Decision, Delivery, Park, Publication, PublisherThread, Retry
from services.schemas import InboundSms, OutboundSms, SchemaError
from services.settings import Settings, redact_url
from services.sync_protocol import (
    Endpoint,
    ReplyError,
    SyncEncodingError,
    SyncScheme,
    TaskMessage,
    clip,
    mask_secrets,
    parse_payload,
    sync_form,
)
from sync_worker import query_codes
from sync_worker.query_codes import query_code

log = logging.getLogger(__name__)

# Misconfiguration, not a passing fault: retrying burns the retry budget and hides the problem. Park at once.
PARK_AT_ONCE = {400, 401, 403, 404, 405, 410, 413, 414, 415, 422}
REDIRECTS = {301, 302, 303, 307, 308}
MAX_REDIRECTS = 3
HEADER_REFUSALS = "x-smsgw-refusals"
HEADER_SERVER_ERRORS = "x-smsgw-server-errors"
REPLY_NAMESPACE = uuid.UUID("0f9d2a4e-8b51-4f0e-b3c7-2c1e5d6a7b80")


@dataclass(frozen=True)
class _Answer:
    status: int
    text: str


class SyncForwarder:
    """Handler for the inbound queue (thread-safe: one HTTP session per handler thread)."""

    def __init__(self, settings: Settings, publisher: PublisherThread) -> None:
        settings.require_sync_url()
        self._settings = settings
        self._endpoint = Endpoint.parse(settings.sync_url)
        self._refusals = Budget(HEADER_REFUSALS, settings.max_refusals, "refusals", "refused")
        self._server_errors = Budget(HEADER_SERVER_ERRORS, settings.max_server_errors, "HTTP 500 answers", "http_500")
        self._scheme = SyncScheme(settings.sync_method, settings.sync_format, dict(settings.sync_keys))
        self._publisher = publisher
        self._local = threading.local()
        self._keywords = tuple(k.casefold() for k in settings.keywords)
        self.redacted_url = redact_url(settings.sync_url)

    def _session(self) -> requests.Session:
        session: requests.Session | None = getattr(self._local, "session", None)
        if session is None:  # one per handler thread: requests sessions are not thread-safe
            session = self._local.session = self._endpoint.session()
        return session

    def handle(self, delivery: Delivery) -> Decision:
        """Forward one inbound SMS; returns what to do with the queue message (never raises for bad input)."""
        try:
            sms = InboundSms.from_json(delivery.body)
        except SchemaError as exc:
            return Park(f"malformed inbound message: {exc}", label="malformed")
        code = query_code(sms.text) if self._settings.query_codes else None
        if code is not None:
            # Before the keyword filter: "@40" matches no keyword, and it is a question to us, not the server.
            return self._answer_query(sms, code)
        if self._keywords and not any(k in sms.text.casefold() for k in self._keywords):
            metrics.SMS_FILTERED.inc()
            log.info("SMS %s matches no keyword; not forwarded (acknowledged)", sms.message_id)
            return Ack()
        return self._forward(sms)

    def _forward(self, sms: InboundSms) -> Decision:
        """POST ``sms`` to the Sync URL and judge the answer (never raises for bad input or bad answers)."""
        try:
            answer = self._post(sms)
        except requests.RequestException as exc:
            metrics.SYNC_REQUESTS.labels("network_error").inc()
            # requests puts the URL (and a secret in its query) into its messages: mask before logging/parking.
            return Retry(f"Sync URL unreachable: {type(exc).__name__}: {clip(mask_secrets(str(exc)))}")
        except (UnicodeError, SyncEncodingError) as exc:
            # Retrying cannot help; parked with the reason, it can be replayed after SMSGW_SYNC_FORMAT changes.
            return Park(f"SMS cannot be encoded for the Sync URL: {exc}", label="malformed")
        except RedirectRefused as exc:
            # A misconfiguration (or a hijacked server), not a passing fault: park at once, like a 4xx.
            metrics.SYNC_REQUESTS.labels("rejected").inc()
            return Park(str(exc), label="redirect")
        try:
            return self._judge(sms, answer)
        except BrokerError as exc:
            # The server accepted the SMS but a reply could not be queued: post again later (same message_id,
            # reply keys derived from it, so nothing goes out twice) rather than ack and lose the reply.
            return Retry(f"accepted, but its replies could not be queued: {exc}")

    def _answer_query(self, sms: InboundSms, code: str) -> Decision:
        """Answer a query code by SMS to its sender; the SMS itself is not forwarded."""
        text = query_codes.answer(code, sms, self._probe_sync_url)
        # Derived from the message_id: a redelivered query is answered once (the outbound ledger refuses a
        # second send under the same key).
        reply_uuid = str(uuid.uuid5(REPLY_NAMESPACE, f"{sms.message_id}/query"))
        try:
            self._publish_outbound(sms, [OutboundSms(reply_uuid, sms.sender, text, "query_code", broker.now_ms())])
        except BrokerError as exc:
            return Retry(f"query code {code}: the answer could not be queued: {exc}")
        log.info("SMS %s is query code %s: answered by SMS, not forwarded to the Sync URL", sms.message_id, code)
        return Ack()

    def _probe_sync_url(self) -> str:
        """GET the Sync URL (no secret, no task) and describe what answered, for @20."""
        try:
            response = self._session().get(
                self._endpoint.url, timeout=self._settings.http_timeout, allow_redirects=False
            )
        except requests.RequestException as exc:
            return f"Sync URL unreachable ({type(exc).__name__})"
        return f"Sync URL HTTP {response.status_code}"

    def _post(self, sms: InboundSms) -> _Answer:
        """Send ``sms`` to the Sync URL in the configured scheme, following redirects with the same method.

        Raises:
            requests.RequestException: the server could not be reached or did not answer in time.
            SyncEncodingError: the SMS cannot be written in the configured format.
            RedirectRefused: the Sync URL redirects to another host or to plain http.
        """
        url = self._endpoint.url
        body, content_type = self._scheme.encode(
            sync_form(sms, self._settings.secret, self._settings.device_id)
        )
        headers = {"Content-Type": content_type}
        started = time.monotonic()
        try:
            for _ in range(MAX_REDIRECTS + 1):
                response = self._session().request(
                    self._scheme.method, url, data=body, headers=headers, timeout=self._settings.http_timeout,
                    allow_redirects=False,
                )
                if response.status_code not in REDIRECTS:
                    return _Answer(response.status_code, response.text)
                location = response.headers.get("Location")
                if not location:
                    raise RedirectRefused(f"Sync URL answered HTTP {response.status_code} without a Location")
                # Re-send ourselves: requests would turn a 301/302 POST into a GET (the task branch of most
                # servers) and the SMS would be "accepted" by a handler that never saw it.
                url = _redirect_target(url, location)
                log.warning("Sync URL redirects (HTTP %d); update SMSGW_SYNC_URL to avoid the extra hop",
                            response.status_code)
            raise RedirectRefused(f"Sync URL redirected more than {MAX_REDIRECTS} times (last to {redact_url(url)})")
        finally:
            metrics.SYNC_SECONDS.observe(time.monotonic() - started)

    def _judge_http_status(self, answer: _Answer) -> Decision:
        """Park or retry an SMS the Sync URL answered with a status other than 200/201."""
        status = answer.status
        reason = f"Sync URL answered HTTP {status}: {_server_error(answer.text)}"
        if status in PARK_AT_ONCE:
            metrics.SYNC_REQUESTS.labels("rejected").inc()
            return Park(reason, label=f"http_{status}")
        metrics.SYNC_REQUESTS.labels("server_error").inc()
        if status == 500:
            # Some servers store message_id as a primary key and answer 500 to a repeat (the first POST
            # was stored, its answer lost): retrying that until SMSGW_MAX_RETRY_AGE only hides it. 500s
            # are counted on their own; 502/503/504 (a proxy in front of a server that is down) are not.
            return Retry(reason, budget=self._server_errors)
        return Retry(reason)

    def _judge(self, sms: InboundSms, answer: _Answer) -> Decision:
        """Ack, retry or park an SMS from the Sync URL's answer; queues the replies of an accepted one.

        Raises:
            BrokerError: a reply could not be queued (the caller retries the SMS).
        """
        if answer.status not in (200, 201):
            return self._judge_http_status(answer)
        try:
            payload = parse_payload(answer.text, require_uuid=False)
        except ReplyError as exc:
            metrics.SYNC_REQUESTS.labels("bad_reply").inc()
            return Retry(f"unreadable reply: {exc}")
        if payload.success is not True:
            metrics.SYNC_REQUESTS.labels("refused").inc()
            reason = f"server refused the SMS (success={payload.success}): {payload.error or 'no error text'}"
            # success:false is also how some servers say "wrong secret": bounded retries, then park with
            # the server's own words so an operator can fix it and replay.
            # Count refusals on their own: retries after an outage must not eat this budget.
            return Retry(reason, budget=self._refusals)
        metrics.SYNC_REQUESTS.labels("accepted").inc()
        metrics.SYNC_END_TO_END_SECONDS.observe(max(0.0, time.time() - sms.received_at / 1000))
        log.info("SMS %s accepted by the Sync URL", sms.message_id)
        for reason in payload.skipped:
            metrics.REPLIES_SKIPPED.inc()
            log.warning("skipped a reply message of SMS %s: %s", sms.message_id, reason)
        self._queue_replies(sms, payload.task, payload.messages)
        return Ack()

    def _queue_replies(self, sms: InboundSms, task: str | None, messages: tuple[TaskMessage, ...]) -> None:
        """Publish replies (confirmed) before the SMS is acked; raises BrokerError so the SMS is requeued."""
        outbound: list[OutboundSms] = []
        now = broker.now_ms()
        if self._settings.reply_from_server and task in ("send", None):
            for index, task_message in enumerate(messages):
                # Same SMS re-posted after a crash -> same key -> the ledger sends the reply once; another SMS
                # answered with the same server uuid -> another key -> its reply goes out too. A reply without
                # a uuid is named by its position in the answer.
                server_uuid = task_message.uuid or f"#{index}"
                key = str(uuid.uuid5(REPLY_NAMESPACE, f"{sms.message_id}/{server_uuid}"))
                # Reported under the server's uuid when it gave one: a server that lists it in ?task=result
                # learns its fate; one that does not ask is never told (the reporter only answers questions).
                outbound.append(
                    OutboundSms(task_message.uuid or key, task_message.to, task_message.text, "reply", now,
                                report=bool(task_message.uuid), dedup_key=key)
                )
        elif messages:
            log.info(
                "SMS %s: %d reply messages not sent (SMSGW_REPLY_FROM_SERVER is off or task is %r)",
                sms.message_id,
                len(messages),
                task,
            )
        if self._settings.auto_response:
            auto_uuid = str(uuid.uuid5(REPLY_NAMESPACE, f"{sms.message_id}/auto"))
            outbound.append(
                OutboundSms(auto_uuid, sms.sender, self._settings.auto_response, "auto_response", now)
            )
        self._publish_outbound(sms, outbound)
        if outbound:
            log.info("SMS %s: queued %d outbound SMS", sms.message_id, len(outbound))

    def _publish_outbound(self, sms: InboundSms, outbound: list[OutboundSms]) -> None:
        """Publish answers to ``sms`` (confirmed) on its modem's queue. Raises BrokerError when not confirmed."""
        # Replies leave through the SIM the sender texted, so the answer comes from the number they know.
        routing_key = broker.outbound_queue_for(sms.modem_id)
        for message in outbound:
            try:
                self._publisher.publish(Publication(routing_key, message.to_json(), message_id=message.uuid))
            except broker.PublishRefused:
                # That modem's queue is gone (modem retired): any modem may answer rather than nobody.
                log.warning("no outbound queue for modem %s; reply %s goes to the shared queue", sms.modem_id,
                            message.uuid)
                self._publisher.publish(
                    Publication(broker.OUTBOUND_QUEUE, message.to_json(), message_id=message.uuid)
                )
            metrics.REPLIES_QUEUED.labels(message.origin).inc()


class RedirectRefused(Exception):
    """The Sync URL redirects somewhere the SMS (with the secret and Basic auth) must not follow."""


def _redirect_target(url: str, location: str) -> str:
    """The URL a redirect from ``url`` leads to, if the body may follow it.

    We re-send the body ourselves (see ``_post``), so requests' own safeguards do not apply: the secret and the
    Basic-auth credentials would go wherever ``Location`` says. Only the same host is followed, on the same
    scheme and port or upgraded from http to https.

    Raises:
        RedirectRefused: another host, a downgrade to http, or a Location that is not a URL.
    """
    try:
        target = urllib.parse.urljoin(url, location)
        old, new = urllib.parse.urlsplit(url), urllib.parse.urlsplit(target)
        same_origin = (old.scheme, old.hostname, old.port) == (new.scheme, new.hostname, new.port)
        upgrade = old.scheme == "http" and new.scheme == "https" and old.hostname == new.hostname
    except ValueError:
        raise RedirectRefused(f"Sync URL redirects to an unreadable Location {clip(location, 80)!r}") from None
    if not (same_origin or upgrade):
        raise RedirectRefused(
            f"Sync URL redirects to another host or to plain http ({redact_url(target)}); not followed with the "
            "SMS and its secret: set SMSGW_SYNC_URL to the new address if it is right"
        )
    return target


def _server_error(body: str) -> str:
    """The server's own error text if the body is SMSsync JSON, else the start of the body."""
    try:
        payload = parse_payload(body)
    except ReplyError:
        return clip(body) or "empty body"
    return payload.error or clip(body)
