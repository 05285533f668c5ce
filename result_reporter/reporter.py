"""Results leg: hold sent/delivery events unacked and report them through the Message Results API in rounds.

One ``ResultReporter`` serves one endpoint (a Sync URL with ``message_results = true``): it reads that
endpoint's events queue only, so results go back to the server that queued the message, and runs its own
rounds on its own thread, so a dead or slow server never holds another endpoint's results.

Every ``result_interval`` seconds of its endpoint (one *round*):

1. take the events received since the last round from the ``BatchConsumer`` and merge them per uuid (latest
   sent event for ``sent_*``, latest delivery event for ``delivered_*``); park malformed ones; ack at once the
   uuids whose row would be exactly what the server already accepted (a duplicate, e.g. a SentEvent the modem
   worker republished for a redelivered queue copy);
2. ``GET ?task=result&secret=…`` — the uuids the server waits for;
3. ``POST ?task=result&secret=…`` one row per waited-for uuid we hold (shape: the endpoint's ``results_shape``);
4. ack those events only once the server accepted (HTTP 2xx; an empty body counts, an explicit
   ``success:false`` does not).

Acks are the durability boundary: until the server has a report, its events stay unacked on the broker, so a
crash, a failed POST or a lost connection redelivers them (merging by uuid makes a repeat harmless). Events
for uuids the server does not wait for are kept ``keep_rounds`` rounds (it may ask later), then acked and
counted — they are reports the server declined, not SMS.

What was reported is remembered per uuid (bounded LRU): a later event only changes its own half of the row,
so a late or duplicate SentEvent never turns a reported delivery back into "pending". A delivery report whose
sent event was reported before a restart carries the send's outcome itself (``DeliveryEvent.sent_*``, filled
by the modem worker from the ledger it owns), so the reporter reads no ledger.

One row the server keeps refusing must not block the others: after ``SPLIT_AFTER_ROUNDS`` refused rounds the
rows are posted one by one; a row refused ``MAX_ROW_REFUSALS`` times in rounds where the server accepted other
rows is parked with the server's error text. A server that refuses (or cannot take) every row parks nothing.
See docs/outbound.md, "When the server refuses".
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, get_args

import requests

from result_reporter import metrics
from services import liveness
from services.broker import BrokerError, HeldDelivery
from services.config import EndpointConfig
from services.logs import UnexpectedErrors
from services.result_codes import Convention, result_row
from services.schemas import DeliveryEvent, SchemaError, SentEvent, decode_event
from services.settings import ResultsShape
from services.sync_protocol import (
    ReplyError,
    clip,
    describe_body,
    parse_message_uuids,
    parse_payload,
    results_body,
    status_hint,
)

log = logging.getLogger(__name__)

KEEP_ROUNDS = 5  # rounds an event for a uuid the server does not wait for is kept before it is dropped
REPORTED_CACHE_SIZE = 10_000  # uuids whose reported sent/delivery events are remembered (LRU)
SPLIT_AFTER_ROUNDS = 3  # consecutive refused rounds after which rows are posted one by one
MAX_ROW_REFUSALS = 5  # a row refused this often (in rounds where other rows were accepted) is parked
ASKED_AGAIN_ROUNDS = 3  # rounds a server may ask again for a final result it accepted before we suspect the shape
SPLIT_GIVE_UP = 3  # a split round stops after this many refusals in a row while no row was accepted yet
# HTTP statuses that say something about the server, never about one row: they end a split round at once and
# never count against a row (auth, wrong URL or method, time-outs, rate limits, gateways, unavailability).
SERVER_STATUSES = frozenset({401, 403, 404, 405, 407, 408, 429, 501, 502, 503, 504})
MAX_ERROR_CHARS = 300
# Every outcome label the reporter counts; each endpoint's series start at 0 so rates and alerts see them.
ROUND_OUTCOMES = ("ok", "idle", "split", "refused", "http_error", "bad_reply", "network_error", "internal_error")
ROW_OUTCOMES = ("accepted", "refused", "parked", "duplicate", "not_requested")
SENT_OUTCOMES: dict[str, Literal["sent", "failed", "unknown"]] = {
    "sent": "sent",
    "failed": "failed",
    "unknown": "unknown",
}


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


class Answer(Protocol):
    """An HTTP answer (``services.sync_client.SyncAnswer``)."""

    @property
    def status(self) -> int:
        """The HTTP status."""

    @property
    def text(self) -> str:
        """The body as text."""


class ResultsClient(Protocol):
    """What the reporter needs of ``services.sync_client.SyncClient`` (one endpoint's Sync URL)."""

    def get(self, **query: Any) -> Answer:
        """GET the Sync URL with ``query`` added. Raises requests.RequestException (no answer)."""

    def post_json(self, body: Any, **query: Any) -> Answer:
        """POST ``body`` as JSON with ``query`` added. Raises requests.RequestException (no answer)."""


def init_metrics(endpoint: str) -> None:
    """Create every result series of ``endpoint`` at 0 (a series that never moved is still visible)."""
    for outcome in ROUND_OUTCOMES:
        metrics.RESULT_ROUNDS.labels(endpoint, outcome)
    for outcome in ROW_OUTCOMES:
        metrics.RESULT_ROWS.labels(endpoint, outcome)
    metrics.RESULT_EVENTS_HELD.labels(endpoint).set(0)
    metrics.HTTP_SECONDS.labels(endpoint, "result")


class RoundError(Exception):
    """A round could not talk to the server; the events stay held for the next round."""


@dataclass
class _Pending:
    """What we hold for one uuid."""

    sent: SentEvent | None = None
    delivery: DeliveryEvent | None = None
    deliveries: list[HeldDelivery] = field(default_factory=list)
    declined_rounds: int = 0
    refusals: int = 0  # times refused on its own in a round where the server accepted other rows
    last_refused_round: int = -1  # round number of the last refusal on its own (any round); -1: never
    last_error: str = ""


@dataclass(frozen=True)
class _Reported:
    """The events the server's current row for a uuid was built from (the row is recomputed from them)."""

    sent: SentEvent | None
    delivery: DeliveryEvent | None


@dataclass(frozen=True)
class _Refusal:
    """A POST that got an answer, but not "accepted"."""

    reason: str
    row_level: bool  # could be caused by the rows posted (success:false, most 4xx, 500); False: the server
    http_status: int | None = None  # None: HTTP 2xx with success:false


@dataclass(frozen=True)
class RoundResult:
    """What one round did."""

    reported: int = 0  # rows accepted by the server
    waiting: int = 0  # held uuids the server did not ask for (yet)
    dropped: int = 0  # uuids dropped after KEEP_ROUNDS rounds unasked
    duplicates: int = 0  # uuids acked without a POST: their row is what the server already accepted
    refused: int = 0  # rows refused on their own in a split round (kept, or parked)
    parked: int = 0  # uuids parked after MAX_ROW_REFUSALS refusals


def _same_send(a: SentEvent, b: SentEvent) -> bool:
    """The same send outcome (a republished SentEvent carries the ledger's time, not the modem's)."""
    return (a.outcome, a.detail, a.cms_error) == (b.outcome, b.detail, b.cms_error)


class ResultReporter:
    """Merge one endpoint's held events per uuid and report them to it each round; not thread-safe (one loop
    thread per endpoint)."""

    def __init__(
        self,
        endpoint: EndpointConfig,
        consumer: HoldsDeliveries,
        client: ResultsClient,
        *,
        keep_rounds: int = KEEP_ROUNDS,
    ) -> None:
        """``consumer`` holds the deliveries of ``events_queue_for(endpoint.name)``; ``client`` talks to
        ``endpoint.sync_url`` (the caller owns and closes it). Initialises the endpoint's metrics at 0."""
        self.endpoint = endpoint
        self._name = endpoint.name
        self._consumer = consumer
        self._client = client
        self._keep_rounds = keep_rounds
        self._convention = Convention.for_sent_ok_code(endpoint.sent_ok_code)
        self._pending: dict[str, _Pending] = {}
        self._reported: OrderedDict[str, _Reported] = OrderedDict()
        self._refused_rounds = 0  # consecutive rounds whose POST was refused; >= SPLIT_AFTER_ROUNDS: split
        self._round_no = 0
        self._unexpected = UnexpectedErrors(log)
        # uuid -> consecutive rounds the server asked again for a final result it had accepted; bounded by the
        # uuids of one ?task=result answer that are also in ``_reported``.
        self._asked_again: dict[str, int] = {}
        self._shape_warned = False
        init_metrics(endpoint.name)

    def run(self, stop: threading.Event) -> None:
        """A round every ``endpoint.result_interval`` s until ``stop``; a round in progress finishes first.

        Never ends over an exception of a round: an unexpected one (a bug, a pathological reply) is logged in
        one line — with its traceback the first time that error (type and raising line) occurs — and the next
        round runs as usual. The events stay held (unacked), so nothing is lost.
        """
        try:
            self._rounds_until(stop)
        finally:
            liveness.done()

    def _rounds_until(self, stop: threading.Event) -> None:
        """The loop of ``run``, stamping the liveness heartbeat every turn (services/liveness.py)."""
        liveness.beat(self.endpoint.result_interval)
        while not stop.wait(self.endpoint.result_interval):
            liveness.beat()
            try:
                self.round()
            except RoundError as exc:
                log.error("%s: result round failed, reports kept for the next round: %s", self._name, exc)
            except Exception as exc:  # last resort: the loop must outlive any bug or pathological reply
                self._count_round("internal_error")
                self._unexpected.log(
                    exc,
                    "%s: result round failed unexpectedly (%s: %s), reports kept for the next round",
                    self._name,
                    type(exc).__name__,
                    clip(str(exc), MAX_ERROR_CHARS),
                )
            liveness.beat(self.endpoint.result_interval)

    def round(self) -> RoundResult:
        """One round (see the module docstring).

        Raises:
            RoundError: the server could not be reached, answered unusably or refused every row; nothing of
                what it did not accept was acked.
        """
        self._round_no += 1
        self.collect()
        duplicates = self._ack_duplicates()
        if not self._pending:
            self._count_round("idle")
            return RoundResult(duplicates=duplicates)
        status, text = self._request(lambda: self._client.get(**self._query()))
        if not 200 <= status < 300:
            self._count_round("http_error")
            raise RoundError(f"GET ?task=result answered HTTP {status}{status_hint(status)}: {describe_body(text)}")
        try:
            waited = set(parse_message_uuids(text))
        except ReplyError as exc:
            self._count_round("bad_reply")
            raise RoundError(f"unreadable ?task=result reply: {exc}") from None
        self._note_asked_again(waited)
        asked = [uuid for uuid in self._pending if uuid in waited]
        reported = refused = parked = 0
        if asked:
            if self._refused_rounds >= SPLIT_AFTER_ROUNDS:
                reported, refused, parked = self._post_split(asked)
            else:
                self._post_batch(asked)
                reported = len(asked)
        dropped = 0
        for uuid in [u for u in self._pending if u not in waited]:
            entry = self._pending[uuid]
            entry.declined_rounds += 1
            if entry.declined_rounds >= self._keep_rounds:
                del self._pending[uuid]
                self._consumer.ack(entry.deliveries)
                dropped += 1
                self._count_rows("not_requested")
                self._log_dropped(uuid, entry)
        metrics.RESULT_EVENTS_HELD.labels(self._name).set(sum(len(e.deliveries) for e in self._pending.values()))
        self._count_round("split" if refused else "ok")
        waiting = sum(1 for uuid in self._pending if uuid not in waited)
        log.info(
            "%s: result round: %d reported, %d not asked for (yet), %d dropped, %d duplicates, %d refused, %d parked",
            self._name,
            reported,
            waiting,
            dropped,
            duplicates,
            refused,
            parked,
        )
        return RoundResult(
            reported=reported, waiting=waiting, dropped=dropped, duplicates=duplicates, refused=refused, parked=parked
        )

    def _log_dropped(self, uuid: str, entry: _Pending) -> None:
        """One line for a report dropped unasked: INFO for a delivery report whose sent result went out before
        (many servers stop asking once they have the sent result: nothing is wrong), WARNING otherwise."""
        delivery_only = entry.sent is None and entry.delivery is not None
        if delivery_only and entry.delivery is not None and (uuid in self._reported or entry.delivery.sent_outcome):
            log.info(
                "%s: dropped the delivery report of %s: the server no longer asks for it after its sent result "
                "(usual for servers that do not track deliveries)",
                self._name,
                uuid,
            )
            return
        log.warning(
            "%s: dropped the report of %s: the server did not ask for it in %d rounds",
            self._name,
            uuid,
            self._keep_rounds,
        )

    def _note_asked_again(self, waited: set[str]) -> None:
        """Warn once when the server keeps asking (``ASKED_AGAIN_ROUNDS`` rounds in a row) for results it
        accepted and that are final (a delivery report, or a send that failed): it answered 2xx but did not find
        the rows in the body, which usually means it reads another ``results_shape``."""
        if self._shape_warned:
            return
        final = [uuid for uuid in waited if uuid not in self._pending and self._is_final(uuid)]
        self._asked_again = {uuid: self._asked_again.get(uuid, 0) + 1 for uuid in final}
        stuck = sorted(uuid for uuid, rounds in self._asked_again.items() if rounds >= ASKED_AGAIN_ROUNDS)
        if not stuck:
            return
        self._shape_warned = True
        shape = self.endpoint.results_shape
        others = " or ".join(other for other in get_args(ResultsShape) if other != shape)
        log.warning(
            "%s: the server still asks for %d final result(s) it accepted %d rounds ago (e.g. %s): it probably "
            "reads another body than results_shape %s; try %s (results_shape, SMSGW_RESULTS_SHAPE). Logged once",
            self._name,
            len(stuck),
            ASKED_AGAIN_ROUNDS,
            stuck[0],
            shape,
            others,
        )

    def _is_final(self, uuid: str) -> bool:
        """Whether the accepted row of ``uuid`` was final: a delivery report, or a send that did not succeed."""
        reported = self._reported.get(uuid)
        if reported is None:
            return False
        return reported.delivery is not None or (reported.sent is not None and reported.sent.outcome != "sent")

    # --- posting ------------------------------------------------------------------------------------------

    def _post_batch(self, asked: list[str]) -> None:
        """All asked rows in one POST (the normal case). Raises RoundError when it was not accepted."""
        resolved = {uuid: self._resolve(uuid) for uuid in asked}
        refusal = self._post([self._build(uuid, *resolved[uuid]) for uuid in asked])
        if refusal is not None:
            self._count_rows("refused", len(asked))
            self._count_round("http_error" if refusal.http_status else "refused")
            self._refused_rounds += 1
            split = (
                "; rows will be posted one by one from the next round"
                if self._refused_rounds >= SPLIT_AFTER_ROUNDS
                else ""
            )
            raise RoundError(f"server refused the results: {refusal.reason}{split}")
        self._refused_rounds = 0
        for uuid in asked:
            self._accepted(uuid, resolved[uuid])
        self._count_rows("accepted", len(asked))

    def _post_split(self, asked: list[str]) -> tuple[int, int, int]:
        """Post the rows one by one to isolate the ones the server refuses; returns (accepted, refused, parked).

        A refusal counts against a row only if the server accepted another row in the same round, and only
        for answers a row can cause (``_Refusal.row_level``); rows not refused before go first. The round ends
        early (RoundError, nothing counted) on a network error or a server-level status, and after
        ``SPLIT_GIVE_UP`` refusals in a row while nothing was accepted yet: then the server refuses everything
        and we must neither hammer it nor blame the rows.
        """
        order = sorted(asked, key=lambda u: self._pending[u].last_refused_round)
        accepted: list[str] = []
        refused: list[tuple[str, str]] = []
        for uuid in order:
            resolved = self._resolve(uuid)
            refusal = self._post([self._build(uuid, *resolved)])
            if refusal is None:
                self._accepted(uuid, resolved)
                accepted.append(uuid)
                self._count_rows("accepted")
                continue
            self._count_rows("refused")
            self._pending[uuid].last_refused_round = self._round_no
            if not refusal.row_level:
                self._count_round("http_error")
                raise RoundError(f"server failed while posting rows one by one: {refusal.reason}")
            refused.append((uuid, refusal.reason))
            if not accepted and len(refused) >= SPLIT_GIVE_UP:
                self._count_round("refused")
                raise RoundError(f"server refused {len(refused)} rows one by one and accepted none: {refusal.reason}")
        if not accepted:
            self._count_round("refused")
            reason = refused[-1][1] if refused else "no rows"
            raise RoundError(f"server refused every row posted one by one: {reason}")
        if not refused:
            self._refused_rounds = 0  # back to one POST per round
            return len(accepted), 0, 0
        parked = 0
        for uuid, reason in refused:
            entry = self._pending[uuid]
            entry.refusals += 1
            entry.last_error = reason
            if entry.refusals < MAX_ROW_REFUSALS:
                log.warning(
                    "%s: the server refused the result row of %s (%d/%d, accepting other rows): %s",
                    self._name,
                    uuid,
                    entry.refusals,
                    MAX_ROW_REFUSALS,
                    reason,
                )
            elif self._park(uuid, entry):
                parked += 1
        return len(accepted), len(refused), parked

    def _park(self, uuid: str, entry: _Pending) -> bool:
        """Park every event of a row the server keeps refusing; True when all were parked."""
        reason = (
            f"the Sync server refused this result row {entry.refusals} times while accepting other rows: "
            f"{entry.last_error}"
        )
        left: list[HeldDelivery] = []
        for held in entry.deliveries:
            if not self._consumer.is_live(held):
                continue
            try:
                self._consumer.park(held, reason, label="refused")
            except BrokerError as exc:
                log.warning(
                    "%s: could not park the refused report of %s (%s); retried next round", self._name, uuid, exc
                )
                left.append(held)
        entry.deliveries = left
        if left:
            return False
        del self._pending[uuid]
        self._count_rows("parked")
        log.error(
            "%s: parked the report of %s: %s (see `sync_worker parked list --queue events --endpoint %s`)",
            self._name,
            uuid,
            reason,
            self._name,
        )
        return True

    def _accepted(self, uuid: str, resolved: tuple[SentEvent | None, DeliveryEvent | None]) -> None:
        """The server has the row of ``uuid``: remember what it was built from, then ack its events."""
        entry = self._pending.pop(uuid)
        self._remember(uuid, _Reported(*resolved))
        # Acked only now: the server has the report. A dead channel means redelivery, merged again.
        self._consumer.ack(entry.deliveries)

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
                    log.warning("%s: could not park a malformed event (%s); it stays unacked", self._name, park_exc)
                continue
            entry = self._pending.setdefault(event.uuid, _Pending())
            entry.deliveries.append(held)
            entry.declined_rounds = 0  # a new event gets its own KEEP_ROUNDS rounds
            # Latest state wins, per kind: a redelivered or older event must not overwrite a newer one.
            if isinstance(event, SentEvent):
                if entry.sent is None or event.timestamp >= entry.sent.timestamp:
                    entry.sent = event
            elif entry.delivery is None or event.timestamp >= entry.delivery.timestamp:
                entry.delivery = event
        held_count = sum(len(e.deliveries) for e in self._pending.values())
        metrics.RESULT_EVENTS_HELD.labels(self._name).set(held_count)
        return held_count

    def _ack_duplicates(self) -> int:
        """Ack, without a POST, the held uuids whose row is exactly the one the server already accepted."""
        duplicates = 0
        for uuid in [u for u in self._pending if u in self._reported]:
            reported = self._reported[uuid]
            sent, delivery = self._resolve(uuid)
            if self._build(uuid, sent, delivery) != self._build(uuid, reported.sent, reported.delivery):
                continue
            entry = self._pending.pop(uuid)
            self._consumer.ack(entry.deliveries)
            self._reported.move_to_end(uuid)
            duplicates += 1
        if duplicates:
            self._count_rows("duplicate", duplicates)
        return duplicates

    def _resolve(self, uuid: str) -> tuple[SentEvent | None, DeliveryEvent | None]:
        """The sent and delivery events the row of ``uuid`` is built from: what we hold, completed by (and never
        regressing behind) what was already reported."""
        entry = self._pending[uuid]
        reported = self._reported.get(uuid)
        sent, delivery = entry.sent, entry.delivery
        if reported is not None:
            old_sent, old_delivery = reported.sent, reported.delivery
            if old_sent is not None and (
                sent is None or _same_send(sent, old_sent) or sent.timestamp < old_sent.timestamp
            ):
                sent = old_sent  # a republished SentEvent carries a later time; the first one is the send's
            if old_delivery is not None and (delivery is None or delivery.timestamp < old_delivery.timestamp):
                delivery = old_delivery
        if sent is None and delivery is not None:
            sent = _sent_from_delivery(delivery)
        return sent, delivery

    def _build(self, uuid: str, sent: SentEvent | None, delivery: DeliveryEvent | None) -> dict[str, Any]:
        return result_row(uuid, sent, delivery, self._convention)

    def _remember(self, uuid: str, reported: _Reported) -> None:
        self._reported[uuid] = reported
        self._reported.move_to_end(uuid)
        while len(self._reported) > REPORTED_CACHE_SIZE:
            self._reported.popitem(last=False)

    # --- HTTP and metrics ---------------------------------------------------------------------------------

    def _query(self) -> dict[str, str]:
        query = {"task": "result"}
        if self.endpoint.secret:
            query["secret"] = self.endpoint.secret
        return query

    def _post(self, rows: list[dict[str, Any]]) -> _Refusal | None:
        """POST the rows; None when the server accepted them, else why not.

        Raises:
            RoundError: network error (no answer at all).
        """
        body = results_body(rows, self.endpoint.results_shape)
        status, text = self._request(lambda: self._client.post_json(body, **self._query()))
        if not 200 <= status < 300:
            detail = f": {describe_body(text, MAX_ERROR_CHARS)}" if text.strip() else ""
            row_level = status not in SERVER_STATUSES and status < 501 and not 300 <= status < 400
            return _Refusal(f"POST ?task=result answered HTTP {status}{status_hint(status)}{detail}", row_level, status)
        if text.strip():
            try:
                payload = parse_payload(text)
            except ReplyError:
                payload = None  # 2xx with a body that is not SMSsync JSON: accepted (the seed PHP sends none)
            if payload is not None and payload.success is False:
                return _Refusal(clip(payload.error or "success:false without an error text", MAX_ERROR_CHARS), True)
        return None

    def _request(self, call: Callable[[], Answer]) -> tuple[int, str]:
        """(status, body text) of ``call``'s answer. Raises RoundError when no answer came (network error)."""
        liveness.beat()  # a round of many requests (rows one by one) is progress, not a stuck loop
        started = time.monotonic()
        try:
            answer = call()
        except requests.RequestException as exc:
            self._count_round("network_error")
            raise RoundError(f"Sync URL unreachable: {type(exc).__name__}: {clip(str(exc))}") from None
        finally:
            metrics.HTTP_SECONDS.labels(self._name, "result").observe(time.monotonic() - started)
        return answer.status, answer.text

    def _count_round(self, outcome: str) -> None:
        metrics.RESULT_ROUNDS.labels(self._name, outcome).inc()

    def _count_rows(self, outcome: str, rows: int = 1) -> None:
        metrics.RESULT_ROWS.labels(self._name, outcome).inc(rows)


def _sent_from_delivery(delivery: DeliveryEvent) -> SentEvent | None:
    """The send a delivery report is about, from the fields the modem worker copied from its ledger (a report
    whose sent event was reported before a restart); None when the report does not carry a final send."""
    outcome = SENT_OUTCOMES.get(delivery.sent_outcome or "")
    if outcome is None or delivery.sent_timestamp is None:
        return None
    return SentEvent(
        delivery.uuid,
        delivery.modem_id,
        outcome,
        delivery.sent_detail or outcome,
        delivery.sent_timestamp,
        delivery.sent_cms_error,
        endpoint=delivery.endpoint,
    )
