"""Task leg: poll ``?task=send`` on the Sync URL and queue the messages it returns, each uuid at most once.

Never twice, across restarts, a server that keeps offering the same messages and replicas sharing
``SMSGW_STATE_DIR`` (docs/outbound.md has the full argument):

1. ``ledger.claim(uuid)`` — one SQLite ``BEGIN IMMEDIATE`` transaction; exactly one poller (of any process)
   gets True for a uuid, ever. Everyone else skips it as a duplicate.
2. With the Message Results API on: ``POST ?task=sent`` with the claimed uuids; the ones the server explicitly
   answers without echoing are released again (``ledger.release_claim``) and not sent, as the app does. No
   usable answer (time-out, dropped connection, 5xx, unreadable body) is not a "no": the server may have
   processed it and dropped the uuids from its outbox, so the claims stay and ``?task=sent`` is retried for
   them on the next polls; if that never works they become orphans (below) and are sent anyway.
3. ``ledger.touch`` the claims about to be published (so no replica takes them for orphans), publish
   ``OutboundSms`` with a publisher confirm, then ``ledger.mark_queued``.

A crash between 1 and 3 leaves an ``accepted`` claim: every cycle republishes claims older than
``stale_claim_s``; the modem worker's ``ledger.begin_send`` refuses a uuid already sending or sent, so a
republish can duplicate a queue message but never an SMS.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import requests

from services import broker, metrics
from services.broker import BrokerError, Publication
from services.ledger import Ledger
from services.logs import UnexpectedErrors
from services.schemas import OutboundSms
from services.settings import Settings, redact_url
from services.sync_protocol import (
    Endpoint,
    ReplyError,
    TaskMessage,
    clip,
    parse_message_uuids,
    parse_payload,
    request_with_deadline,
    secrets_match,
    status_hint,
)

log = logging.getLogger(__name__)

MAX_BACKOFF_S = 900.0
PUBLISH_TIMEOUT_S = 30.0
# Distinct unexpected errors whose traceback was logged already (repeats get one line); bounded.


class Publishes(Protocol):
    """What the poller needs of ``broker.PublisherThread`` (confirmed publish from any thread)."""

    def publish(self, publication: Publication, timeout: float = 30.0) -> None:
        """Publish and wait for the confirm; raises BrokerError."""


class PollError(Exception):
    """A poll failed in a way worth backing off for; the message is the one log line."""

    def __init__(self, message: str, outcome: str, status: int | None = None) -> None:
        super().__init__(message)
        self.outcome = outcome  # metric label
        self.status = status  # the HTTP status of a non-2xx answer


@dataclass(frozen=True)
class PollResult:
    """What one poll did (also the metric outcomes)."""

    offered: int = 0  # valid messages in the reply
    queued: int = 0
    duplicates: int = 0
    invalid: int = 0
    not_confirmed: int = 0


class TaskPoller:
    """Poll the Sync URL for tasks and queue their messages; ``run()`` loops until the stop event is set."""

    def __init__(self, settings: Settings, publisher: Publishes, ledger: Ledger) -> None:
        """Raises ConfigError when SMSGW_SYNC_URL is empty."""
        settings.require_sync_url()
        self._settings = settings
        self._endpoint = Endpoint.parse(settings.sync_url)
        self._publisher = publisher
        self._ledger = ledger
        self._session = self._endpoint.session()
        self.redacted_url = redact_url(settings.sync_url)
        # A live poller leaves a claim unrefreshed for at most one request to the Sync URL (?task=sent: at most
        # 3 x SMSGW_HTTP_TIMEOUT, see _request) or one publish (it touches the claims before each publish);
        # only older claims are orphans. Republishing a live one early would still not double-send
        # (begin_send), and the live poller skips a claim no longer ``accepted`` when it touches it.
        self.stale_claim_s = max(30.0, 3 * settings.http_timeout + PUBLISH_TIMEOUT_S + 5)
        # Claims whose ?task=sent got no usable answer: retried first thing on each poll until the server
        # answers, or until they are republished as orphans (by us or a replica) after stale_claim_s.
        self._unconfirmed: dict[str, TaskMessage] = {}
        self._unexpected = UnexpectedErrors(log)

    # --- loop ---------------------------------------------------------------------------------------------

    def run(self, stop: threading.Event) -> None:
        """Poll every ``SMSGW_TASK_INTERVAL`` s (at once again while a poll queued something) until ``stop``.

        Never raises for server or broker trouble: it logs one line and backs off exponentially (capped), so
        a wrong secret or a dead server never becomes a crash loop.
        """
        failures = 0
        while not stop.is_set():
            delay = self._settings.task_interval
            try:
                self.republish_orphans()
                result = self.poll_once()
            except (PollError, sqlite3.Error) as exc:
                failures += 1
                delay = self._backoff(failures)
                outcome = exc.outcome if isinstance(exc, PollError) else "ledger_error"
                metrics.TASK_POLLS.labels(outcome).inc()
                log.error("task poll failed: %s; next poll in %.0fs", exc, delay)
            except Exception as exc:  # last resort: a bug must not become a crash loop
                failures += 1
                delay = self._backoff(failures)
                metrics.TASK_POLLS.labels("internal_error").inc()
                self._unexpected.log(exc, "task poll failed unexpectedly: %s: %s; next poll in %.0fs",
                                     type(exc).__name__, clip(str(exc), 200), delay)
            else:
                if failures:
                    log.info("task poll works again after %d failure(s)", failures)
                failures = 0
                if result.queued:
                    # The server may hold more than one reply's worth: drain it before waiting.
                    continue
            # An Event, not sleep(): the first SIGTERM ends the wait at once.
            stop.wait(delay)

    def _backoff(self, failures: int) -> float:
        interval = self._settings.task_interval
        return min(interval * float(2 ** min(failures, 10)), max(MAX_BACKOFF_S, interval))

    # --- one poll -----------------------------------------------------------------------------------------

    def poll_once(self) -> PollResult:
        """GET ``?task=send``, validate, confirm (Message Results API) and queue new messages.

        Claims left unconfirmed by an earlier poll's ``?task=sent`` are confirmed (and queued) first.

        Raises:
            PollError: the server could not be reached, refused, or answered something unreadable; or the
                broker did not confirm (claims stay and are republished later).
        """
        retried = self._retry_unconfirmed()
        params = {"task": "send"}
        if self._settings.secret:
            params["secret"] = self._settings.secret
        text = self._request("GET", "send", self._endpoint.with_query(**params))
        try:
            payload = parse_payload(text)
        except ReplyError as exc:
            raise PollError(f"unreadable ?task=send reply: {exc}", "bad_reply") from None
        if payload.success is False:
            raise PollError(f"server refused the task poll: {payload.error or 'no error text'}", "refused")
        for reason in payload.skipped:
            metrics.TASK_MESSAGES.labels("invalid").inc()
            log.warning("skipped an invalid task message: %s", reason)
        if not payload.messages:
            metrics.TASK_POLLS.labels("empty").inc()
            log.debug("task poll: nothing to send")
            return PollResult(queued=retried, invalid=len(payload.skipped))
        if payload.task != "send":
            metrics.TASK_POLLS.labels("ignored").inc()
            log.warning(
                "task reply ignored: task is %r, not 'send'; %d message(s) not sent",
                payload.task,
                len(payload.messages),
            )
            return PollResult(queued=retried, invalid=len(payload.skipped))
        if not secrets_match(self._settings.secret, payload.secret):
            metrics.TASK_POLLS.labels("ignored").inc()
            log.warning(
                "task reply ignored: its secret %s SMSGW_SECRET; %d message(s) not sent",
                "is missing, unlike" if payload.secret is None else "does not match",
                len(payload.messages),
            )
            return PollResult(queued=retried, invalid=len(payload.skipped))
        result = self._queue(payload.messages)
        result = PollResult(queued=result.queued + retried, duplicates=result.duplicates,
                            not_confirmed=result.not_confirmed)
        metrics.TASK_POLLS.labels("ok").inc()
        log.info(
            "task poll: %d offered, %d queued, %d already known, %d not confirmed by the server, %d invalid",
            len(payload.messages),
            result.queued,
            result.duplicates,
            result.not_confirmed,
            len(payload.skipped),
        )
        return PollResult(
            offered=len(payload.messages),
            queued=result.queued,
            duplicates=result.duplicates,
            invalid=len(payload.skipped),
            not_confirmed=result.not_confirmed,
        )

    def _queue(self, messages: Sequence[TaskMessage]) -> PollResult:
        # Known uuids are skipped without a write transaction (the common case: a server that offers the same
        # messages on every poll); claim() below is what actually guarantees "once" against races.
        known = self._ledger.known(m.uuid for m in messages)
        claimed: list[TaskMessage] = []
        duplicates = 0
        seen: set[str] = set()
        for message in messages:
            if message.uuid in known or message.uuid in seen or not self._ledger.claim(
                message.uuid, message.to, message.text
            ):
                duplicates += 1
                metrics.TASK_MESSAGES.labels("duplicate").inc()
                log.debug("task message %s already claimed; skipped", message.uuid)
                seen.add(message.uuid)
                continue
            seen.add(message.uuid)
            claimed.append(message)
        not_confirmed = 0
        if claimed and self._settings.message_results:
            confirmed = self._confirm_sent(claimed)
            not_confirmed = len(claimed) - len(confirmed)
            claimed = confirmed
        queued = self._publish_claimed(claimed)
        return PollResult(queued=queued, duplicates=duplicates, not_confirmed=not_confirmed)

    def _retry_unconfirmed(self) -> int:
        """Retry ``?task=sent`` for claims an earlier poll got no usable answer for; queue the echoed ones.

        Claims no longer ``accepted`` (republished as orphans meanwhile, by us or a replica) are dropped.

        Raises:
            PollError: still no usable answer (the claims stay for the next poll or the orphan republish).
        """
        if not self._unconfirmed:
            return 0
        pending: list[TaskMessage] = []
        for message in list(self._unconfirmed.values()):
            entry = self._ledger.get(message.uuid)
            if entry is None or entry.state != "accepted":
                del self._unconfirmed[message.uuid]
                log.debug("unconfirmed task message %s is %s now; no retry", message.uuid,
                          entry.state if entry else "released")
            else:
                pending.append(message)
        if not pending:
            return 0
        log.info("retrying ?task=sent for %d claim(s) left unconfirmed by an earlier poll", len(pending))
        return self._publish_claimed(self._confirm_sent(pending))

    def _confirm_sent(self, messages: list[TaskMessage]) -> list[TaskMessage]:
        """POST ``?task=sent`` (JSON, no secret — as the app) and return the messages the server echoed.

        The claims the server explicitly did not echo are released. Without a usable answer (network error,
        time-out, 5xx, unreadable body) the server may still have processed the POST and dropped the uuids
        from its outbox, so releasing them could lose the SMS: the claims stay ``accepted`` and are retried
        on the next poll (``_retry_unconfirmed``), or republished as orphans after ``stale_claim_s``. A 3xx/4xx
        (but 408/429, which say "later") is a refusal before any work (auth, wrong URL): first-time claims are
        released; claims being retried are kept, since their earlier POST may have been processed and the
        server may never offer them again.

        Raises:
            PollError: no usable answer.
        """
        uuids = [m.uuid for m in messages]
        try:
            text = self._request("POST", "sent", self._endpoint.with_query(task="sent"), {"queued_messages": uuids})
            echoed = set(parse_message_uuids(text))
        except (PollError, ReplyError) as exc:
            if isinstance(exc, PollError) and exc.status is not None and 300 <= exc.status < 500 \
                    and exc.status not in (408, 429):
                fresh = [m for m in messages if m.uuid not in self._unconfirmed]
                for message in fresh:
                    self._ledger.release_claim(message.uuid)
                    metrics.TASK_MESSAGES.labels("not_confirmed").inc()
                if fresh:
                    log.warning("?task=sent refused (HTTP %d): %d task message(s) released, not sent; the server "
                                "may offer them again", exc.status, len(fresh))
                raise
            for message in messages:
                self._unconfirmed[message.uuid] = message
            what = f"unreadable ?task=sent reply: {exc}" if isinstance(exc, ReplyError) else str(exc)
            outcome = exc.outcome if isinstance(exc, PollError) else "bad_reply"
            raise PollError(f"{what}; {len(messages)} claim(s) kept, ?task=sent retried on the next poll",
                            outcome) from None
        confirmed: list[TaskMessage] = []
        for message in messages:
            self._unconfirmed.pop(message.uuid, None)
            if message.uuid in echoed:
                confirmed.append(message)
                continue
            # The app sends only echoed uuids; release the claim so a later offer can be taken again.
            self._ledger.release_claim(message.uuid)
            metrics.TASK_MESSAGES.labels("not_confirmed").inc()
            log.warning("task message %s not confirmed by ?task=sent; not sent", message.uuid)
        return confirmed

    def _publish_claimed(self, messages: Sequence[TaskMessage]) -> int:
        """Publish claimed messages in order; returns how many were queued.

        Before each publish the claims still to publish are touched, so that however long this poll has
        held them none looks like an orphan to a replica; one that is no longer ``accepted`` (a replica
        republished it meanwhile) is skipped rather than queued twice.

        Raises:
            PollError: the broker did not confirm (the rest stay ``accepted``, republished later).
        """
        now = broker.now_ms()
        queued = 0
        for index, message in enumerate(messages):
            if message.uuid not in self._ledger.touch(m.uuid for m in messages[index:]):
                log.warning("task message %s was republished by another poller meanwhile; not queued again",
                            message.uuid)
                continue
            self._publish(OutboundSms(message.uuid, message.to, message.text, "task", now, report=True))
            metrics.TASK_MESSAGES.labels("queued").inc()
            log.info("task message %s queued", message.uuid)
            queued += 1
        return queued

    def _publish(self, message: OutboundSms) -> None:
        """Confirmed publish to the shared outbound queue, then mark the claim queued.

        Raises:
            PollError: not confirmed; the claim stays ``accepted`` and is republished by a later cycle.
        """
        try:
            self._publisher.publish(
                Publication(broker.OUTBOUND_QUEUE, message.to_json(), message_id=message.uuid),
                timeout=PUBLISH_TIMEOUT_S,
            )
        except BrokerError as exc:
            raise PollError(f"broker did not confirm task message {message.uuid}: {exc}", "broker_error") from None
        self._ledger.mark_queued(message.uuid)

    def republish_orphans(self) -> int:
        """Publish claims that were never confirmed on the queue (a poller died in between). Returns the count.

        Raises:
            PollError: the broker did not confirm one (the rest wait for the next cycle).
        """
        count = 0
        for entry in self._ledger.unqueued(older_than_s=self.stale_claim_s):
            if entry.recipient is None or entry.body is None:
                log.error("ledger claim %s has no recipient/text; cannot republish it", entry.uuid)
                continue
            self._publish(OutboundSms(entry.uuid, entry.recipient, entry.body, "task", broker.now_ms(), report=True))
            metrics.TASK_REPUBLISHED.inc()
            log.warning("republished task message %s (its poller stopped before the broker confirm)", entry.uuid)
            count += 1
        return count

    # --- HTTP ---------------------------------------------------------------------------------------------

    def _request(self, method: str, task: str, url: str, body: object = None) -> str:
        """One request to the Sync URL; returns the body text of a 2xx answer.

        Time-outs: connecting and the wait for the headers are each bounded by ``SMSGW_HTTP_TIMEOUT``; the body
        is read against a deadline of ``SMSGW_HTTP_TIMEOUT`` after the start (so a server trickling its answer
        cannot hold a poll, and its claims, indefinitely); one request takes at most about 3 x the setting.

        Raises:
            PollError: network error, time-out or a non-2xx status (the log line says which, never the secret).
        """
        started = time.monotonic()
        try:
            status, text = request_with_deadline(self._session, method, url, json_body=body,
                                                 timeout=self._settings.http_timeout)
        except requests.RequestException as exc:
            raise PollError(f"?task={task}: Sync URL unreachable: {type(exc).__name__}: {clip(str(exc))}",
                            "network_error") from None
        finally:
            metrics.HTTP_SECONDS.labels(task).observe(time.monotonic() - started)
        if not 200 <= status < 300:
            raise PollError(f"?task={task}: Sync URL answered HTTP {status}{status_hint(status)}", "http_error",
                            status)
        return text

    def close(self) -> None:
        """Close the HTTP session."""
        self._session.close()
