"""Task leg of one endpoint: poll its ``?task=send`` and queue the messages it returns, each uuid at most once.

Every endpoint with ``tasks = true`` has its own ``TaskPoller`` (on its own thread, ``task_poller.runner``).
Servers number their messages independently, so the ledger key of a message is
``task_ledger_key(endpoint, uuid)``: the same uuid offered by two endpoints is two SMS, and everything below
holds per endpoint.

Never twice, across restarts, a server that keeps offering the same messages and replicas sharing one ledger
(``SMSGW_LEDGER_URL``; docs/outbound.md has the full argument):

1. ``ledger.claim(key)`` — one transaction; exactly one poller (of any process) gets True for a key, ever.
   Everyone else skips it as a duplicate.
2. With the Message Results API on: ``POST ?task=sent`` with the claimed uuids; the ones the server explicitly
   answers without echoing are released again (``ledger.release_claim``) and not sent, as the app does. No
   usable answer (time-out, dropped connection, 5xx, unreadable body) is not a "no": the server may have
   processed it and dropped the uuids from its outbox, so the claims stay and ``?task=sent`` is retried for
   them on the next polls; if that never works they become orphans (below) and are sent anyway.
3. ``ledger.touch`` the claims about to be published (so no replica takes them for orphans), publish
   ``OutboundSms`` (to its route's queue, ``services.routing``) with a publisher confirm, then
   ``ledger.mark_queued``.

A crash between 1 and 3 leaves an ``accepted`` claim: every cycle republishes this endpoint's claims older than
``stale_claim_s``, routed again; the modem worker's ``ledger.begin_send`` refuses a key already sending or
sent, so a republish can duplicate a queue message but never an SMS.

The parts: ``sync_http.py`` the two requests to the Sync URL (and ``PollError``); ``confirm.py`` step 2;
``invalid.py`` the log of invalid task messages; this module the poll loop, the claims and the publishing.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass

from services import broker, liveness
from services.broker import BrokerError, MessagePublisher, Publication
from services.config import EndpointConfig, FleetConfig
from services.ledger import Ledger, LedgerError, watched
from services.logs import UnexpectedErrors
from services.routing import RoutedSms, TaskRouter
from services.schemas import task_ledger_key
from services.sync_client import SyncEndpoint
from services.sync_protocol import Payload, ReplyError, TaskMessage, clip, parse_payload, secrets_match
from task_poller import metrics
from task_poller.confirm import SentConfirmer
from task_poller.invalid import InvalidMessages
from task_poller.sync_http import PollError, TaskRequests

log = logging.getLogger(__name__)

MAX_BACKOFF_S = 900.0
PUBLISH_TIMEOUT_S = 30.0

# Metric outcomes, initialised at 0 for every endpoint at start-up (a dashboard sees a series before its first
# event).
POLL_OUTCOMES = (
    "ok",
    "empty",
    "ignored",
    "refused",
    "bad_reply",
    "network_error",
    "http_error",
    "broker_error",
    "ledger_error",
    "internal_error",
)
MESSAGE_OUTCOMES = ("queued", "duplicate", "invalid", "not_confirmed")
HTTP_TASKS = ("send", "sent")


def init_metrics(endpoint: str) -> None:
    """Create every series of ``endpoint`` at 0."""
    for outcome in POLL_OUTCOMES:
        metrics.TASK_POLLS.labels(endpoint, outcome)
    for outcome in MESSAGE_OUTCOMES:
        metrics.TASK_MESSAGES.labels(endpoint, outcome)
    for task in HTTP_TASKS:
        metrics.HTTP_SECONDS.labels(endpoint, task)
    metrics.TASK_REPUBLISHED.labels(endpoint)
    for reason in metrics.RELEASE_REASONS:
        metrics.TASK_RELEASED.labels(endpoint, reason)


@dataclass(frozen=True)
class PollResult:
    """What one poll did (also the metric outcomes)."""

    offered: int = 0  # valid messages in the reply
    queued: int = 0
    duplicates: int = 0
    invalid: int = 0
    not_confirmed: int = 0


class TaskPoller:
    """Poll one endpoint for tasks and queue their messages; ``run()`` loops until the stop event is set."""

    def __init__(
        self,
        endpoint: EndpointConfig,
        fleet: FleetConfig,
        publisher: MessagePublisher,
        ledger: Ledger,
        client: SyncEndpoint,
        *,
        adopt_strays: bool = False,
    ) -> None:
        """``adopt_strays``: also republish orphaned claims of endpoints this fleet does not poll (removed from
        the file, or ``tasks`` switched off): set it on one poller of the process, so they are not lost.

        Raises ValueError when the endpoint has no Sync URL.
        """
        if not endpoint.sync_url:
            raise ValueError(f"endpoint {endpoint.name!r} has no sync_url to poll")
        self.name = endpoint.name
        self._endpoint = endpoint
        self._publisher = publisher
        # Its calls set smsgw_ledger_up (one gauge and one outage log for the process, whichever poller fails).
        ledger = watched(ledger)
        self._ledger = ledger
        self._requests = TaskRequests(endpoint.name, endpoint.secret, client, endpoint.secret_origin)
        self._router = TaskRouter(fleet)
        self._polled = {e.name for e in fleet.task_endpoints()}
        self._adopt_strays = adopt_strays
        self._secret_name = endpoint.secret_origin
        self.redacted_url = endpoint.redacted_url
        # A live poller leaves a claim unrefreshed for at most one request to the Sync URL (?task=sent: bounded
        # by http_timeout; 3 x is the margin of the older per-phase time-outs) or one publish (it touches the
        # claims before each publish); only older claims are orphans. Republishing a live one early would still
        # not double-send (begin_send), and the live poller skips a claim no longer ``accepted`` when it
        # touches it.
        self.stale_claim_s = max(30.0, 3 * endpoint.http_timeout + PUBLISH_TIMEOUT_S + 5)
        self._unexpected = UnexpectedErrors(log)
        self._invalid = InvalidMessages(self.name, publisher, endpoint.message_results)
        results_setting = (
            "SMSGW_MESSAGE_RESULTS=false"
            if fleet.source == "environment"
            else f"message_results = false for endpoint {self.name!r}"
        )
        self._confirmer = SentConfirmer(self.name, self._requests, ledger, self._key, results_setting)

    def _key(self, uuid: str) -> str:
        return task_ledger_key(self.name, uuid)

    # --- loop ---------------------------------------------------------------------------------------------

    def run(self, stop: threading.Event) -> None:
        """Poll every ``task_interval`` s (at once again while a poll queued something) until ``stop``.

        A poll in progress when ``stop`` is set finishes first. Never raises for server, ledger or broker
        trouble: it logs one line and backs off exponentially (capped), so a wrong secret or a dead server
        never becomes a crash loop.
        """
        try:
            self._poll_until(stop)
        finally:
            liveness.done()

    def _poll_until(self, stop: threading.Event) -> None:
        """The loop of ``run``, stamping the liveness heartbeat every turn (services/liveness.py)."""
        failures = 0
        while not stop.is_set():
            liveness.beat()
            delay = self._endpoint.task_interval
            try:
                self.republish_orphans()
                result = self.poll_once()
            except (PollError, LedgerError) as exc:
                failures += 1
                delay = self._backoff(failures)
                outcome = exc.outcome if isinstance(exc, PollError) else "ledger_error"
                metrics.TASK_POLLS.labels(self.name, outcome).inc()
                log.error("endpoint %s: task poll failed: %s; next poll in %.0fs", self.name, exc, delay)
            except Exception as exc:  # last resort: a bug must not become a crash loop
                failures += 1
                delay = self._backoff(failures)
                metrics.TASK_POLLS.labels(self.name, "internal_error").inc()
                self._unexpected.log(
                    exc,
                    "endpoint %s: task poll failed unexpectedly: %s: %s; next poll in %.0fs",
                    self.name,
                    type(exc).__name__,
                    clip(str(exc), 200),
                    delay,
                )
            else:
                if failures:
                    log.info("endpoint %s: task poll works again after %d failure(s)", self.name, failures)
                failures = 0
                if result.queued:
                    # The server may hold more than one reply's worth: drain it before waiting.
                    continue
            # An Event, not sleep(): the first SIGTERM ends the wait at once.
            liveness.beat(delay)
            stop.wait(delay)

    def _backoff(self, failures: int) -> float:
        interval = self._endpoint.task_interval
        return min(interval * float(2 ** min(failures, 10)), max(MAX_BACKOFF_S, interval))

    # --- one poll -----------------------------------------------------------------------------------------

    def poll_once(self) -> PollResult:
        """GET ``?task=send``, validate, confirm (Message Results API) and queue new messages.

        Claims left unconfirmed by an earlier poll's ``?task=sent`` are confirmed (and queued) first.

        Raises:
            PollError: the server could not be reached, refused, or answered something unreadable; or the
                broker did not confirm (claims stay and are republished later; a failed result of an invalid
                message is published again on the next poll).
            LedgerError: the ledger could not be read or written (nothing is queued unclaimed).
        """
        retried = self._publish_claimed(self._confirmer.retry_unconfirmed())
        text = self._requests.poll_send()
        try:
            payload = parse_payload(text)
        except ReplyError as exc:
            raise PollError(f"unreadable ?task=send reply: {exc}", "bad_reply") from None
        if payload.success is False:
            raise PollError(f"server refused the task poll: {payload.error or 'no error text'}", "refused")
        self._invalid.report(payload, authentic=self._authentic(payload))
        if not self._to_be_queued(payload):
            return PollResult(queued=retried, invalid=len(payload.skipped))
        result = self._queue(payload.messages)
        metrics.TASK_POLLS.labels(self.name, "ok").inc()
        log.info(
            "endpoint %s: task poll: %d offered, %d queued, %d already known, %d not confirmed by the server, "
            "%d invalid",
            self.name,
            len(payload.messages),
            result.queued + retried,
            result.duplicates,
            result.not_confirmed,
            len(payload.skipped),
        )
        return PollResult(
            offered=len(payload.messages),
            queued=result.queued + retried,
            duplicates=result.duplicates,
            invalid=len(payload.skipped),
            not_confirmed=result.not_confirmed,
        )

    def _authentic(self, payload: Payload) -> bool:
        """Whether the reply is one the poller acts on: task ``send`` and the configured secret."""
        return payload.task == "send" and secrets_match(self._endpoint.secret, payload.secret)

    def _to_be_queued(self, payload: Payload) -> bool:
        """Whether the messages of a successful reply are to be queued: there are some, the task is ``send``
        and the reply's secret matches; otherwise the poll is counted (``empty``/``ignored``) and logged."""
        if not payload.messages:
            metrics.TASK_POLLS.labels(self.name, "empty").inc()
            log.debug("endpoint %s: task poll: nothing to send", self.name)
            return False
        if payload.task != "send":
            metrics.TASK_POLLS.labels(self.name, "ignored").inc()
            log.warning(
                "endpoint %s: task reply ignored: task is %r, not 'send'; %d message(s) not sent",
                self.name,
                payload.task,
                len(payload.messages),
            )
            return False
        if not secrets_match(self._endpoint.secret, payload.secret):
            metrics.TASK_POLLS.labels(self.name, "ignored").inc()
            log.warning(
                "endpoint %s: task reply ignored: its secret %s %s; %d message(s) not sent",
                self.name,
                "is missing, unlike" if payload.secret is None else "does not match",
                self._secret_name,
                len(payload.messages),
            )
            return False
        return True

    def _queue(self, messages: Sequence[TaskMessage]) -> PollResult:
        # Known keys are skipped without a write transaction (the common case: a server that offers the same
        # messages on every poll); claim() below is what actually guarantees "once" against races.
        known = self._ledger.known([self._key(m.uuid) for m in messages])
        claimed: list[TaskMessage] = []
        duplicates = 0
        seen: set[str] = set()
        if self._endpoint.message_results:
            # Offered again though taken: the server may never have had our ?task=sent (a poller killed).
            self._confirmer.reconfirm([m for m in messages if self._key(m.uuid) in known])
        for message in messages:
            key = self._key(message.uuid)
            if key in known or key in seen or not self._ledger.claim(key, message.to, message.text, self.name):
                duplicates += 1
                metrics.TASK_MESSAGES.labels(self.name, "duplicate").inc()
                log.debug("endpoint %s: task message %s already claimed; skipped", self.name, message.uuid)
                seen.add(key)
                continue
            seen.add(key)
            claimed.append(message)
        not_confirmed = 0
        if claimed and self._endpoint.message_results:
            confirmed = self._confirmer.confirm(claimed)
            not_confirmed = len(claimed) - len(confirmed)
            claimed = confirmed
        queued = self._publish_claimed(claimed)
        return PollResult(queued=queued, duplicates=duplicates, not_confirmed=not_confirmed)

    def _publish_claimed(self, messages: Sequence[TaskMessage]) -> int:
        """Publish claimed messages in order; returns how many were queued.

        Before each publish the claims still to publish are touched, so that however long this poll has
        held them none looks like an orphan to a replica; one that is no longer ``accepted`` (a replica
        republished it meanwhile) is skipped rather than queued twice.

        Raises:
            PollError: the broker did not confirm (the rest stay ``accepted``, republished later).
            LedgerError: the ledger could not be written (the claims stay ``accepted``).
        """
        now = broker.now_ms()
        keys = [self._key(m.uuid) for m in messages]
        queued = 0
        for index, message in enumerate(messages):
            if keys[index] not in self._ledger.touch(keys[index:]):
                log.warning(
                    "endpoint %s: task message %s was republished by another poller meanwhile; not queued again",
                    self.name,
                    message.uuid,
                )
                continue
            routed = self._router.route(self.name, message.uuid, message.to, message.text, now)
            self._publish(routed)
            metrics.TASK_MESSAGES.labels(self.name, "queued").inc()
            log.info("endpoint %s: task message %s queued on %s", self.name, message.uuid, routed.queue)
            queued += 1
        return queued

    def _publish(self, routed: RoutedSms) -> None:
        """Confirmed publish to the routed queue, then mark the claim queued.

        Raises:
            PollError: not confirmed; the claim stays ``accepted`` and is republished by a later cycle.
            LedgerError: confirmed but not marked queued (the claim is republished later: a duplicate queue
                message that ``begin_send`` keeps from becoming a second SMS).
        """
        sms = routed.sms
        try:
            self._publisher.publish(
                Publication(routed.queue, sms.to_json(), message_id=sms.ledger_key),
                timeout=PUBLISH_TIMEOUT_S,
            )
        except BrokerError as exc:
            raise PollError(f"broker did not confirm task message {sms.uuid}: {exc}", "broker_error") from None
        self._ledger.mark_queued(sms.ledger_key)

    def republish_orphans(self) -> int:
        """Publish this endpoint's claims that were never confirmed on the queue (a poller died in between),
        routed again; with ``adopt_strays`` also those of endpoints this fleet does not poll. Returns the count.

        Raises:
            PollError: the broker did not confirm one (the rest wait for the next cycle).
            LedgerError: the ledger could not be read or written.
        """
        count = 0
        for claim in self._ledger.unqueued(older_than_s=self.stale_claim_s):
            mine = claim.endpoint == self.name
            if not mine and not (self._adopt_strays and claim.endpoint not in self._polled):
                continue  # its own endpoint's poller (here or in a replica) republishes it
            prefix = task_ledger_key(claim.endpoint, "")
            if claim.recipient is None or claim.body is None or not claim.key.startswith(prefix):
                log.error(
                    "ledger claim %s (endpoint %s) has no recipient/text or a foreign key; cannot republish it",
                    claim.key,
                    claim.endpoint,
                )
                continue
            uuid = claim.key[len(prefix) :]
            self._publish(self._router.route(claim.endpoint, uuid, claim.recipient, claim.body, broker.now_ms()))
            # A stray is counted under the adopting endpoint: metric labels are configured names only.
            metrics.TASK_REPUBLISHED.labels(self.name).inc()
            log.warning(
                "endpoint %s: republished task message %s (its poller stopped before the broker confirm)",
                claim.endpoint,
                uuid,
            )
            count += 1
        return count

    def close(self) -> None:
        """Close the HTTP client."""
        self._requests.close()
