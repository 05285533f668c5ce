"""Inbound leg of one endpoint: one queued SMS -> one request to its Sync URL -> ack, retry later, or park.

The request is the endpoint kind's (services/platforms/: an SMSsync sync request, courier's receive form, a
Kannel get-url, a signed webhook event); filters, retries, budgets, parking and metrics are the same for every
kind. Only an SMSsync server answers with replies to queue; only it gets query codes and the auto-response.

Every endpoint with ``inbound = true`` has its own copy of each SMS (``smsgw.inbound.<endpoint>``, filled by the
``smsgw.inbound`` fanout exchange) and its own ``SyncForwarder``: its filter, secret, sync scheme, replies and
budgets apply to its copy only, so one endpoint's verdict never touches another's.

Ordering that keeps "nothing lost, nothing doubled":
1. Send the SMS (same ``message_id`` on every attempt and to every endpoint, so a server can de-duplicate).
2. On success, publish the server's replies and the auto-response to the receiving modem's queue *with
   confirms*.
3. Only then ack (the Consumer does it when we return ``Ack``).
A crash between 1 and 3 re-sends the SMS; reply keys are stable (derived from the message_id, the endpoint and
the server's uuid), and the modem side's outbound ledger refuses a key it already sent, so no reply goes out
twice.
"""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import replace

import requests

from services import broker
from services.broker import Ack, BrokerError, Budget, Decision, Delivery, MessagePublisher, Park, Publication, Retry
from services.config import DEFAULT_ENDPOINT, EndpointConfig
from services.platforms import Platform, is_refusal, kannel, rapidpro, smssync, webhook
from services.routing import reply_route
from services.schemas import InboundSms, OutboundSms, SchemaError, SentEvent
from services.sync_client import RedirectRefused, SyncAnswer, SyncClient
from services.sync_protocol import (
    ERROR_PAGE_CHARS,
    Payload,
    ReplyError,
    SyncEncodingError,
    TaskMessage,
    clip,
    describe_body,
    mask_secrets,
    parse_payload,
    status_hint,
)
from services.topology import events_queue_for
from sync_worker import metrics, query_codes
from sync_worker.metrics import init_metrics
from sync_worker.probe import SyncUrlHealth
from sync_worker.query_codes import query_code

log = logging.getLogger(__name__)

# Misconfiguration, not a passing fault: retrying burns the retry budget and hides the problem. Park at once.
PARK_AT_ONCE = {400, 401, 403, 404, 405, 410, 413, 414, 415, 422}
HEADER_REFUSALS = "x-smsgw-refusals"
HEADER_SERVER_ERRORS = "x-smsgw-server-errors"
HEADER_UNREADABLE = "x-smsgw-unreadable-replies"
EMPTY_TEXT_DETAIL = "the server's reply message has an empty text; not sent"
REPLY_NAMESPACE = uuid.UUID("0f9d2a4e-8b51-4f0e-b3c7-2c1e5d6a7b80")


def reply_key(endpoint: str, message_id: str, server_uuid: str) -> str:
    """The outbound-ledger key of a reply (or auto-response) ``endpoint`` gave to SMS ``message_id``.

    Stable across re-sends of the same SMS, so a reply goes out once; different per endpoint (two servers may
    both answer with uuid "1") and per SMS (a server may reuse one uuid for every reply). The ``default``
    endpoint keeps the key it had before endpoints existed, so replies in flight across an upgrade are not
    sent twice.
    """
    name = f"{message_id}/{server_uuid}" if endpoint == DEFAULT_ENDPOINT else f"{endpoint}/{message_id}/{server_uuid}"
    return str(uuid.uuid5(REPLY_NAMESPACE, name))


def query_answer_key(message_id: str) -> str:
    """The ledger key of the answer to a query code: from the message_id alone, so when several endpoints
    answer query codes the sender still gets one answer (the modem's ledger refuses the others)."""
    return str(uuid.uuid5(REPLY_NAMESPACE, f"{message_id}/query"))


class ReplyPublisher:
    """Queues SMS that answer an inbound SMS where services.routing.reply_route says (confirmed): the receiving
    modem's queue with the failover time as TTL, the shared queue when that modem's queue is gone."""

    def __init__(self, publisher: MessagePublisher, endpoint: str, modem_failover_s: float) -> None:
        self._publisher = publisher
        self._endpoint = endpoint
        self._failover_s = modem_failover_s

    def publish(self, sms: InboundSms, outbound: list[OutboundSms]) -> None:
        """Publish ``outbound`` (answers to ``sms``), each confirmed.

        Raises:
            BrokerError: a message was not confirmed (the caller retries the SMS; keys keep it from doubling).
        """
        route = reply_route(sms.modem_id, self._failover_s)
        for message in outbound:
            try:
                self._publisher.publish(
                    Publication(
                        route.queue, message.to_json(), message_id=message.uuid, expiration_ms=route.expiration_ms
                    )
                )
            except broker.PublishRefused:
                # That modem's queue is gone (modem retired): any modem may answer rather than nobody.
                log.warning(
                    "no outbound queue for modem %s; reply %s goes to the shared queue", sms.modem_id, message.uuid
                )
                self._publisher.publish(Publication(route.fallback_queue, message.to_json(), message_id=message.uuid))
            metrics.REPLIES_QUEUED.labels(self._endpoint, message.origin).inc()

    def report_failed(self, uuids: list[str], detail: str) -> None:
        """Publish a failed sent event for each of ``uuids`` (server replies that are not sent; no modem handled
        them) to this endpoint's events queue, each confirmed, so the result reporter answers ``?task=result``.

        Raises:
            BrokerError: an event was not confirmed (the caller retries the SMS; a repeated event is harmless).
        """
        for server_uuid in uuids:
            event = SentEvent(server_uuid, "", "failed", detail, broker.now_ms(), endpoint=self._endpoint)
            self._publisher.publish(
                Publication(events_queue_for(self._endpoint), event.to_json(), message_id=server_uuid)
            )


class SyncForwarder:
    """Handler of one endpoint's inbound queue (thread-safe: the client keeps one HTTP session per thread)."""

    def __init__(
        self,
        endpoint: EndpointConfig,
        publisher: MessagePublisher,
        client: SyncClient,
        *,
        modem_failover_s: float = 0.0,
        health: SyncUrlHealth | None = None,
        platform: Platform | None = None,
    ) -> None:
        """``platform`` (default: the endpoint kind's, over ``client``) sends each SMS."""
        self._endpoint = endpoint
        self._platform = platform or platform_over(endpoint, client)
        # Every request's outcome is the truth about the Sync URL (smsgw_sync_url_up, sync_worker/probe.py).
        self._health = health or SyncUrlHealth(endpoint.name, endpoint.redacted_url)
        self._name = endpoint.name
        self._client = client
        self._refusals = Budget(HEADER_REFUSALS, endpoint.max_refusals, "refusals", "refused")
        self._server_errors = Budget(HEADER_SERVER_ERRORS, endpoint.max_server_errors, "HTTP 500 answers", "http_500")
        # A 200 whose body says nothing readable (200 "{}", an HTML page) may have stored the SMS, like a refusal:
        # the same bound (max_refusals), counted apart, so an outage spends neither.
        self._unreadable = Budget(HEADER_UNREADABLE, endpoint.max_refusals, "unreadable replies", "bad_reply")
        self._replies = ReplyPublisher(publisher, endpoint.name, modem_failover_s)
        self.redacted_url = endpoint.redacted_url
        init_metrics(endpoint.name)
        # The series every forwarded SMS touches, bound once (a labels() look-up per SMS costs a lock and a dict).
        self._accepted = metrics.SYNC_REQUESTS.labels(endpoint.name, "accepted")
        self._sync_seconds = metrics.SYNC_SECONDS.labels(endpoint.name)
        self._end_to_end_seconds = metrics.SYNC_END_TO_END_SECONDS.labels(endpoint.name)

    def handle(self, delivery: Delivery) -> Decision:
        """Forward one inbound SMS; returns what to do with the queue message (never raises for bad input).

        Every retry is marked ``warn``: an SMS that does not reach its server is a WARNING line on its first
        failed attempt and then on attempts 5, 25 and every 100th (the Consumer logs it with the reason), not
        only when it is parked days later.
        """
        decision = self._decide(delivery)
        return replace(decision, warn=True) if isinstance(decision, Retry) else decision

    def _decide(self, delivery: Delivery) -> Decision:
        """What to do with one inbound SMS (``handle`` without the log level of its retries)."""
        try:
            sms = InboundSms.from_json(delivery.body)
        except SchemaError as exc:
            return Park(f"malformed inbound message: {exc}", label="malformed")
        code = query_code(sms.text) if self._endpoint.query_codes else None
        if code is not None:
            # Before the filter: "@40" matches no keyword, and it is a question to us, not the server.
            return self._answer_query(sms, code)
        reason = self._endpoint.filter_reason(sms.sender, sms.text)
        if reason is not None:
            metrics.SMS_FILTERED.labels(self._name, reason).inc()
            log.info("SMS %s not forwarded to endpoint %s (%s); acknowledged", sms.message_id, self._name, reason)
            return Ack()
        return self._forward(sms)

    def _forward(self, sms: InboundSms) -> Decision:
        """Send ``sms`` to the Sync URL and judge the answer (never raises for bad input or bad answers)."""
        try:
            answer = self._send(sms)
        except requests.RequestException as exc:
            metrics.SYNC_REQUESTS.labels(self._name, "network_error").inc()
            # requests puts the URL (and a secret in its query) into its messages: mask before logging/parking.
            return Retry(f"Sync URL unreachable: {type(exc).__name__}: {clip(mask_secrets(str(exc)))}")
        except (UnicodeError, SyncEncodingError) as exc:
            # Retrying cannot help; parked with the reason, it can be replayed after the sync format changes.
            return Park(f"SMS cannot be encoded for the Sync URL: {exc}", label="malformed")
        except RedirectRefused as exc:
            # A misconfiguration (or a hijacked server), not a passing fault: park at once, like a 4xx.
            metrics.SYNC_REQUESTS.labels(self._name, "rejected").inc()
            return Park(str(exc), label="redirect")
        if self._endpoint.kind != "smssync":
            return self._judge_platform(sms, answer)
        try:
            return self._judge(sms, answer)
        except BrokerError as exc:
            # The server accepted the SMS but a reply could not be queued: send again later (same message_id,
            # reply keys derived from it, so nothing goes out twice) rather than ack and lose the reply.
            return Retry(f"accepted, but its replies could not be queued: {exc}")

    def _send(self, sms: InboundSms) -> SyncAnswer:
        """Send ``sms`` as the endpoint's kind does (``Platform.deliver``).

        Raises:
            requests.RequestException: the server could not be reached or did not answer in time.
            SyncEncodingError, UnicodeError: the SMS cannot be written in the configured format.
            RedirectRefused: the Sync URL redirects to another host, to plain http, or in a loop.
        """
        started = time.monotonic()
        try:
            answer = self._platform.deliver(sms)
        except (requests.RequestException, RedirectRefused) as exc:
            self._health.request_failed(f"{type(exc).__name__}: {clip(mask_secrets(str(exc)), 200)}")
            raise
        finally:
            self._sync_seconds.observe(time.monotonic() - started)
        self._health.request_answered(answer.status)
        return answer

    def _answer_query(self, sms: InboundSms, code: str) -> Decision:
        """Answer a query code by SMS to its sender; the SMS itself is not forwarded."""
        text = query_codes.answer(code, sms, self._probe_sync_url, self._endpoint.device_id)
        key = query_answer_key(sms.message_id)
        answer = OutboundSms(key, sms.sender, text, "query_code", broker.now_ms(), endpoint=self._name)
        try:
            self._replies.publish(sms, [answer])
        except BrokerError as exc:
            return Retry(f"query code {code}: the answer could not be queued: {exc}")
        log.info(
            "SMS %s is query code %s: answered by SMS, not forwarded to endpoint %s", sms.message_id, code, self._name
        )
        return Ack()

    def _probe_sync_url(self) -> str:
        """Ask the Sync URL (no secret, no task) and describe what answered, for @20."""
        try:
            probe = self._client.probe()
        except requests.RequestException as exc:
            return f"Sync URL unreachable ({type(exc).__name__})"
        return f"Sync URL HTTP {probe.status}"

    def _judge_http_status(self, answer: SyncAnswer) -> Decision:
        """Park or retry an SMS the Sync URL answered with a status other than 200/201."""
        status = answer.status
        hint = status_hint(status, self._endpoint.secret_origin)
        reason = f"Sync URL answered HTTP {status}{hint}: {_server_error(answer.text)}"
        if status in PARK_AT_ONCE:
            metrics.SYNC_REQUESTS.labels(self._name, "rejected").inc()
            return Park(reason, label=f"http_{status}")
        metrics.SYNC_REQUESTS.labels(self._name, "server_error").inc()
        if status == 500:
            # Some servers store message_id as a primary key and answer 500 to a repeat (the first POST
            # was stored, its answer lost): retrying that until max_retry_age only hides it. 500s are
            # counted on their own; 502/503/504 (a proxy in front of a server that is down) are not.
            return Retry(reason, budget=self._server_errors)
        return Retry(reason)

    def _judge_platform(self, sms: InboundSms, answer: SyncAnswer) -> Decision:
        """Ack, retry or park an SMS from the HTTP status a rapidpro, kannel or webhook endpoint answered: 2xx
        delivered; another 4xx than 408/429 a refusal (bounded by ``max_refusals``, or parked at once with
        ``refusal_is_final``); anything else an outage to wait out."""
        status = answer.status
        if 200 <= status < 300:
            self._count_accepted(sms)
            return Ack()
        reason = (
            f"{self._endpoint.kind} endpoint answered HTTP {status}: {describe_body(answer.text, ERROR_PAGE_CHARS)}"
        )
        if is_refusal(status):
            metrics.SYNC_REQUESTS.labels(self._name, "refused").inc()
            if self._endpoint.refusal_is_final:
                return Park(f"{reason}; not retried (refusal_is_final is on)", label="refused")
            return Retry(reason, budget=self._refusals)
        metrics.SYNC_REQUESTS.labels(self._name, "server_error").inc()
        return Retry(reason)

    def _count_accepted(self, sms: InboundSms) -> None:
        """Count and log an SMS the endpoint accepted."""
        self._accepted.inc()
        self._end_to_end_seconds.observe(max(0.0, time.time() - sms.received_at / 1000))
        log.info("SMS %s accepted by endpoint %s", sms.message_id, self._name)

    def _judge(self, sms: InboundSms, answer: SyncAnswer) -> Decision:
        """Ack, retry or park an SMS from the Sync URL's answer; queues the replies of an accepted one.

        Raises:
            BrokerError: a reply could not be queued (the caller retries the SMS).
        """
        if answer.status not in (200, 201):
            return self._judge_http_status(answer)
        try:
            payload = parse_payload(answer.text, require_uuid=False)
        except ReplyError as exc:
            metrics.SYNC_REQUESTS.labels(self._name, "bad_reply").inc()
            return Retry(f"HTTP {answer.status} with an unreadable reply: {exc}", budget=self._unreadable)
        if payload.success is not True:
            metrics.SYNC_REQUESTS.labels(self._name, "refused").inc()
            reason = f"server refused the SMS (success={payload.success}): {payload.error or self._silent_refusal()}"
            if self._endpoint.refusal_is_final:
                # Some servers store the SMS and then answer success:false: every retry would store a copy.
                return Park(f"{reason}; not retried (refusal_is_final is on)", label="refused")
            # success:false is also how some servers say "wrong secret": bounded retries, then park with
            # the server's own words so an operator can fix it and replay.
            # Count refusals on their own: retries after an outage must not eat this budget.
            return Retry(reason, budget=self._refusals)
        self._count_accepted(sms)
        self._replies.report_failed(self._skip_invalid(sms, payload), EMPTY_TEXT_DETAIL)
        outbound = self._replies_to(sms, payload.task, payload.messages)
        self._replies.publish(sms, outbound)
        if outbound:
            log.info("SMS %s: queued %d outbound SMS from endpoint %s", sms.message_id, len(outbound), self._name)
        return Ack()

    def _silent_refusal(self) -> str:
        """The hint for a refusal without an error text: the usual causes and the settings that fix them."""
        hint = f"no error text; a wrong secret is the usual cause (check {self._endpoint.secret_origin})"
        if self._endpoint.refusal_is_final:
            return hint
        # Without it, a server that stores the SMS before refusing it stores one copy per retry.
        return f"{hint}; if the server stores each refused SMS, set refusal_is_final (SMSGW_REFUSAL_IS_FINAL)"

    def _skip_invalid(self, sms: InboundSms, payload: Payload) -> list[str]:
        """Count and log (one line each) the reply messages of an accepted ``sms`` that are not sent; returns the
        server uuids to report failed (an empty text, when the endpoint sends replies and reports results)."""
        replies_sent = self._endpoint.reply_from_server and payload.task in ("send", None)
        reported = replies_sent and self._endpoint.message_results
        failed: list[str] = []
        for invalid in payload.invalid:
            metrics.REPLIES_SKIPPED.labels(self._name).inc()
            server_uuid = invalid.failed_uuid if reported else None
            if server_uuid is not None:
                failed.append(server_uuid)
            log.warning(
                "SMS %s: reply message from endpoint %s not sent: %s%s",
                sms.message_id,
                self._name,
                invalid.reason,
                "" if server_uuid is None else "; reported failed through ?task=result",
            )
        return failed

    def _replies_to(self, sms: InboundSms, task: str | None, messages: tuple[TaskMessage, ...]) -> list[OutboundSms]:
        """The SMS to send in answer to an accepted ``sms``: the server's replies (if enabled) and the
        auto-response (if configured)."""
        outbound: list[OutboundSms] = []
        now = broker.now_ms()
        if self._endpoint.reply_from_server and task in ("send", None):
            for index, task_message in enumerate(messages):
                # Same SMS re-sent after a crash -> same key -> the ledger sends the reply once; another SMS
                # (or another endpoint) answered with the same server uuid -> another key -> its reply goes out
                # too. A reply without a uuid is named by its position in the answer.
                key = reply_key(self._name, sms.message_id, task_message.uuid or f"#{index}")
                # Reported under the server's uuid when it gave one and the endpoint asks for results: a server
                # that lists it in ?task=result learns its fate; an endpoint whose Message Results API is off
                # has no reporter, so no events are queued for it.
                report = bool(task_message.uuid) and self._endpoint.message_results
                outbound.append(
                    OutboundSms(
                        task_message.uuid or key,
                        task_message.to,
                        task_message.text,
                        "reply",
                        now,
                        report=report,
                        dedup_key=key,
                        endpoint=self._name,
                    )
                )
        elif messages:
            log.info(
                "SMS %s: %d reply messages from endpoint %s not sent (reply_from_server is off or task is %r)",
                sms.message_id,
                len(messages),
                self._name,
                task,
            )
        if self._endpoint.auto_response:
            outbound.append(
                OutboundSms(
                    reply_key(self._name, sms.message_id, "auto"),
                    sms.sender,
                    self._endpoint.auto_response,
                    "auto_response",
                    now,
                    endpoint=self._name,
                )
            )
        return outbound


def platform_over(endpoint: EndpointConfig, client: SyncClient) -> Platform:
    """The ``Platform`` of ``endpoint``'s kind sending through ``client`` (the lane's one HTTP client)."""
    if endpoint.kind == "rapidpro":
        return rapidpro.RapidPro(endpoint, client)
    if endpoint.kind == "kannel":
        return kannel.Kannel(endpoint, client)
    if endpoint.kind == "webhook":
        return webhook.Webhook(endpoint, client)
    return smssync.Smssync(endpoint, client)


def _server_error(body: str) -> str:
    """The server's own error text if the body is SMSsync JSON, else the gist of the body (an HTML error page's
    title, ``describe_body``)."""
    try:
        payload = parse_payload(body)
    except ReplyError:
        return describe_body(body, ERROR_PAGE_CHARS)
    return payload.error or describe_body(body, ERROR_PAGE_CHARS)
