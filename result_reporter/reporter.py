"""Results leg: hold sent/delivery events unacked and report them through the Message Results API in rounds.

Every ``SMSGW_RESULT_INTERVAL`` seconds (one *round*):

1. take the events received since the last round from the ``BatchConsumer`` and merge them per uuid (latest
   sent event for ``sent_*``, latest delivery event for ``delivered_*``); park malformed ones;
2. ``GET ?task=result&secret=…`` — the uuids the server waits for;
3. ``POST ?task=result&secret=…`` one row per waited-for uuid we hold (shape: ``SMSGW_RESULTS_SHAPE``);
4. ack those events only once the server accepted (HTTP 2xx; an empty body counts, an explicit
   ``success:false`` does not).

Acks are the durability boundary: until the server has a report, its events stay unacked on the broker, so a
crash, a failed POST or a lost connection redelivers them (merging by uuid makes a repeat harmless). Events
for uuids the server does not wait for are kept ``keep_rounds`` rounds (it may ask later), then acked and
counted — they are reports the server declined, not SMS.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import requests

from services import metrics
from services.broker import BrokerError, HeldDelivery
from services.ledger import Ledger
from services.result_codes import Convention, result_row
from services.schemas import DeliveryEvent, SchemaError, SentEvent, decode_event
from services.settings import Settings, redact_url
from services.sync_protocol import (
    USER_AGENT,
    Endpoint,
    ReplyError,
    parse_message_uuids,
    parse_payload,
    results_body,
)

log = logging.getLogger(__name__)

KEEP_ROUNDS = 5  # rounds an event for a uuid the server does not wait for is kept before it is dropped
SENT_CACHE_SIZE = 10_000  # sent events already reported, to fill sent_* when a delivery report follows


class HoldsDeliveries(Protocol):
    """What the reporter needs of ``broker.BatchConsumer``."""

    def take(self, timeout: float = 0.0) -> list[HeldDelivery]:
        """New deliveries since the last call."""

    def ack(self, items: list[HeldDelivery]) -> int:
        """Ack the live ones; returns how many."""

    def park(self, held: HeldDelivery, reason: str, label: str = "error") -> None:
        """Park one delivery (raises BrokerError)."""

    def is_live(self, held: HeldDelivery) -> bool:
        """Whether ``held`` can still be settled."""


class RoundError(Exception):
    """A round could not talk to the server; the events stay held for the next round."""


@dataclass
class _Pending:
    """What we hold for one uuid."""

    sent: SentEvent | None = None
    delivery: DeliveryEvent | None = None
    deliveries: list[HeldDelivery] = field(default_factory=list)
    declined_rounds: int = 0


@dataclass(frozen=True)
class RoundResult:
    """What one round did."""

    reported: int = 0  # rows accepted by the server
    waiting: int = 0  # held uuids the server did not ask for (yet)
    dropped: int = 0  # uuids dropped after KEEP_ROUNDS rounds unasked


class ResultReporter:
    """Merge held events per uuid and report them each round; not thread-safe (one loop thread)."""

    def __init__(
        self,
        settings: Settings,
        consumer: HoldsDeliveries,
        *,
        ledger: Ledger | None = None,
        keep_rounds: int = KEEP_ROUNDS,
    ) -> None:
        """Raises ConfigError when SMSGW_SYNC_URL is empty."""
        settings.require_sync_url()
        self._settings = settings
        self._consumer = consumer
        self._ledger = ledger
        self._keep_rounds = keep_rounds
        self._convention = Convention.for_sent_ok_code(settings.sent_ok_code)
        self._endpoint = Endpoint.parse(settings.sync_url)
        self._session = requests.Session()
        self._session.headers["User-Agent"] = USER_AGENT
        if self._endpoint.auth:
            self._session.auth = self._endpoint.auth
        self._pending: dict[str, _Pending] = {}
        self._reported_sent: OrderedDict[str, SentEvent] = OrderedDict()
        self.redacted_url = redact_url(settings.sync_url)

    def run(self, stop: threading.Event) -> None:
        """A round every ``SMSGW_RESULT_INTERVAL`` s until ``stop``; a round in progress finishes first."""
        while not stop.wait(self._settings.result_interval):
            try:
                self.round()
            except RoundError as exc:
                log.error("result round failed, reports kept for the next round: %s", exc)

    def round(self) -> RoundResult:
        """One round (see the module docstring).

        Raises:
            RoundError: the server could not be reached or answered unusably; nothing was acked.
        """
        self.collect()
        if not self._pending:
            metrics.RESULT_ROUNDS.labels("idle").inc()
            return RoundResult()
        try:
            waited = set(parse_message_uuids(self._request("GET", self._query())))
        except ReplyError as exc:
            metrics.RESULT_ROUNDS.labels("bad_reply").inc()
            raise RoundError(f"unreadable ?task=result reply: {exc}") from None
        asked = [uuid for uuid in self._pending if uuid in waited]
        reported = 0
        if asked:
            rows = [self._row(uuid) for uuid in asked]
            self._post(rows)
            for uuid in asked:
                entry = self._pending.pop(uuid)
                # Acked only now: the server has the report. A dead channel means redelivery, merged again.
                self._consumer.ack(entry.deliveries)
                if entry.sent is not None:
                    self._remember_sent(entry.sent)
            reported = len(asked)
            metrics.RESULT_ROWS.labels("accepted").inc(reported)
        dropped = 0
        for uuid in [u for u in self._pending if u not in waited]:
            entry = self._pending[uuid]
            entry.declined_rounds += 1
            if entry.declined_rounds >= self._keep_rounds:
                del self._pending[uuid]
                self._consumer.ack(entry.deliveries)
                dropped += 1
                metrics.RESULT_ROWS.labels("not_requested").inc()
                log.warning(
                    "dropped the report of %s: the server did not ask for it in %d rounds", uuid, self._keep_rounds
                )
        metrics.RESULT_EVENTS_HELD.set(sum(len(e.deliveries) for e in self._pending.values()))
        metrics.RESULT_ROUNDS.labels("ok").inc()
        waiting = len(self._pending)
        log.info("result round: %d reported, %d not asked for (yet), %d dropped", reported, waiting, dropped)
        return RoundResult(reported=reported, waiting=waiting, dropped=dropped)

    # --- events -------------------------------------------------------------------------------------------

    def collect(self) -> int:
        """Merge new deliveries; forget held ones whose connection died (the broker redelivers them).

        Returns the number of deliveries now held. Called by ``round()``; tests call it to wait for events.
        """
        for uuid in list(self._pending):
            entry = self._pending[uuid]
            entry.deliveries = [d for d in entry.deliveries if self._consumer.is_live(d)]
            if not entry.deliveries:
                del self._pending[uuid]
        for held in self._consumer.take():
            if not self._consumer.is_live(held):
                continue
            try:
                event = decode_event(held.delivery.body)
            except SchemaError as exc:
                try:
                    self._consumer.park(held, f"malformed event: {exc}", label="malformed")
                except BrokerError as park_exc:
                    log.warning("could not park a malformed event (%s); it stays unacked", park_exc)
                continue
            entry = self._pending.setdefault(event.uuid, _Pending())
            entry.deliveries.append(held)
            # Latest state wins, per kind: a redelivered or older event must not overwrite a newer one.
            if isinstance(event, SentEvent):
                if entry.sent is None or event.timestamp >= entry.sent.timestamp:
                    entry.sent = event
            elif entry.delivery is None or event.timestamp >= entry.delivery.timestamp:
                entry.delivery = event
        held_count = sum(len(e.deliveries) for e in self._pending.values())
        metrics.RESULT_EVENTS_HELD.set(held_count)
        return held_count

    def _row(self, uuid: str) -> dict[str, Any]:
        entry = self._pending[uuid]
        sent = entry.sent or self._reported_sent.get(uuid) or self._sent_from_ledger(uuid)
        return result_row(uuid, sent, entry.delivery, self._convention)

    def _sent_from_ledger(self, uuid: str) -> SentEvent | None:
        """A delivery report whose sent event was reported before a restart: rebuild sent_* from the ledger."""
        if self._ledger is None:
            return None
        entry = self._ledger.get(uuid)
        if entry is None or entry.state not in ("sent", "failed", "unknown"):
            return None
        outcome: Literal["sent", "failed", "unknown"] = (
            "sent" if entry.state == "sent" else "failed" if entry.state == "failed" else "unknown"
        )
        return SentEvent(
            uuid,
            entry.modem_id or "",
            outcome,
            entry.detail or entry.state,
            entry.updated_at,
            entry.cms_error,
        )

    def _remember_sent(self, event: SentEvent) -> None:
        self._reported_sent[event.uuid] = event
        self._reported_sent.move_to_end(event.uuid)
        while len(self._reported_sent) > SENT_CACHE_SIZE:
            self._reported_sent.popitem(last=False)

    # --- HTTP ---------------------------------------------------------------------------------------------

    def _query(self) -> str:
        params = {"task": "result"}
        if self._settings.secret:
            params["secret"] = self._settings.secret
        return self._endpoint.with_query(**params)

    def _post(self, rows: list[dict[str, Any]]) -> None:
        """POST the rows; returns when the server accepted them.

        Raises:
            RoundError: network error, non-2xx, or an explicit ``success:false``.
        """
        body = results_body(rows, self._settings.results_shape)
        text = self._request("POST", self._query(), body)
        if text.strip():
            try:
                payload = parse_payload(text)
            except ReplyError:
                payload = None  # 2xx with a body that is not SMSsync JSON: accepted (the seed PHP sends none)
            if payload is not None and payload.success is False:
                metrics.RESULT_ROWS.labels("refused").inc(len(rows))
                metrics.RESULT_ROUNDS.labels("refused").inc()
                raise RoundError(f"server refused the results: {payload.error or 'no error text'}")

    def _request(self, method: str, url: str, body: object = None) -> str:
        started = time.monotonic()
        try:
            response = self._session.request(
                method, url, json=body, timeout=self._settings.http_timeout, allow_redirects=method == "GET"
            )
        except requests.RequestException as exc:
            metrics.RESULT_ROUNDS.labels("network_error").inc()
            raise RoundError(f"Sync URL unreachable: {type(exc).__name__}") from None
        finally:
            metrics.HTTP_SECONDS.labels("result").observe(time.monotonic() - started)
        if not 200 <= response.status_code < 300:
            metrics.RESULT_ROUNDS.labels("http_error").inc()
            hint = " (check SMSGW_SECRET)" if response.status_code in (401, 403) else ""
            raise RoundError(f"{method} ?task=result answered HTTP {response.status_code}{hint}")
        return response.text

    def close(self) -> None:
        """Close the HTTP session."""
        self._session.close()
