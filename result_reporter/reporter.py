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

The parts: ``events.py`` holds the events merged per uuid and what was reported; ``results_http.py`` the two
requests and what counts as accepted; ``shape.py`` the hint for a wrong ``results_shape``; this module the round.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from result_reporter import metrics
from result_reporter.events import HeldEvents, HoldsDeliveries, PendingRow
from result_reporter.pusher import StateRecorder
from result_reporter.results_http import MAX_ERROR_CHARS, ResultsRequests, RoundError
from result_reporter.shape import ShapeWatch
from services import liveness
from services.broker import BrokerError, HeldDelivery
from services.config import EndpointConfig
from services.ledger import LedgerError
from services.ledger.api_messages import ApiMessages
from services.logs import OutageLog, UnexpectedErrors
from services.result_codes import Convention, result_row
from services.sync_client import SyncEndpoint
from services.sync_protocol import ReplyError, clip, describe_body, parse_message_uuids, status_hint

log = logging.getLogger(__name__)

KEEP_ROUNDS = 5  # rounds an event for a uuid the server does not wait for is kept before it is dropped ...
# ... and for at least this long: a server asks for a uuid's result only once it knows the SMS was sent, i.e.
# after the task poller's next ?task=sent, which may come minutes later (a slow poll interval, a server or
# ledger outage); with a short result_interval, KEEP_ROUNDS alone would drop results before they are asked for.
KEEP_AT_LEAST_S = 600.0
SPLIT_AFTER_ROUNDS = 3  # consecutive refused rounds after which rows are posted one by one
MAX_ROW_REFUSALS = 5  # a row refused this often (in rounds where other rows were accepted) is parked
SPLIT_GIVE_UP = 3  # a split round stops after this many refusals in a row while no row was accepted yet
# Every outcome label the reporter counts; each endpoint's series start at 0 so rates and alerts see them.
ROUND_OUTCOMES = ("ok", "idle", "split", "refused", "http_error", "bad_reply", "network_error", "internal_error")
ROW_OUTCOMES = ("accepted", "refused", "parked", "duplicate", "not_requested")


def init_metrics(endpoint: str) -> None:
    """Create every result series of ``endpoint`` at 0 (a series that never moved is still visible)."""
    for outcome in ROUND_OUTCOMES:
        metrics.RESULT_ROUNDS.labels(endpoint, outcome)
    for outcome in ROW_OUTCOMES:
        metrics.RESULT_ROWS.labels(endpoint, outcome)
    metrics.RESULT_EVENTS_HELD.labels(endpoint).set(0)
    metrics.HTTP_SECONDS.labels(endpoint, "result")


@dataclass(frozen=True)
class RoundResult:
    """What one round did."""

    reported: int = 0  # rows accepted by the server
    waiting: int = 0  # held uuids the server did not ask for (yet)
    dropped: int = 0  # uuids dropped after KEEP_ROUNDS rounds unasked
    duplicates: int = 0  # uuids acked without a POST: their row is what the server already accepted
    refused: int = 0  # rows refused on their own in a split round (kept, or parked)
    parked: int = 0  # uuids parked after MAX_ROW_REFUSALS refusals


class ResultReporter:
    """Merge one endpoint's held events per uuid and report them to it each round; not thread-safe (one loop
    thread per endpoint)."""

    def __init__(
        self,
        endpoint: EndpointConfig,
        consumer: HoldsDeliveries,
        client: SyncEndpoint,
        *,
        keep_rounds: int = KEEP_ROUNDS,
        keep_at_least_s: float = KEEP_AT_LEAST_S,
        clock: Callable[[], float] = time.monotonic,
        store: ApiMessages | None = None,
    ) -> None:
        """``consumer`` holds the deliveries of ``events_queue_for(endpoint.name)``; ``client`` talks to
        ``endpoint.sync_url`` (the caller owns and closes it); ``store``: the send-API message store, for an
        endpoint the REST API may send for (its states are recorded before their events are acked).
        Initialises the endpoint's metrics at 0."""
        self._states = StateRecorder(store) if store is not None else None
        self.endpoint = endpoint
        self._name = endpoint.name
        self._consumer = consumer
        self._requests = ResultsRequests(endpoint, client)
        self._keep_rounds = keep_rounds
        self._keep_at_least_s = keep_at_least_s
        self._clock = clock
        convention = Convention.for_sent_ok_code(endpoint.sent_ok_code)
        self._events = HeldEvents(
            endpoint.name, consumer, lambda uuid, sent, delivery: result_row(uuid, sent, delivery, convention)
        )
        self._shape_watch = ShapeWatch(endpoint.name, endpoint.results_shape)
        self._refused_rounds = 0  # consecutive rounds whose POST was refused; >= SPLIT_AFTER_ROUNDS: split
        self._round_no = 0
        self._unexpected = UnexpectedErrors(log)
        # A server that keeps failing is one problem: one line when it starts, one every few minutes while it
        # lasts, one when rounds work again (not one per round: 996 lines in 100 s against a failing server).
        self._failing = OutageLog(log, f"{endpoint.name}: result rounds failing, reports kept for the next round")
        init_metrics(endpoint.name)

    def run(self, stop: threading.Event) -> None:
        """A round every ``endpoint.result_interval`` s until ``stop``; a round in progress finishes first.

        Never ends over an exception of a round: a failing server (``RoundError``) is logged as an outage, one
        WARNING line when rounds start failing, again every few minutes while they go on failing and one INFO
        line when a round works again (``OutageLog``); an unexpected error (a bug, a pathological reply) is
        logged in one line — with its traceback the first time that error (type and raising line) occurs — and
        the next round runs as usual. The events stay held (unacked), so nothing is lost.
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
                self._failing.failed(str(exc), retry_in_s=self.endpoint.result_interval)
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
        self._record_states()
        duplicates = self._events.ack_duplicates()
        if duplicates:
            self._count_rows("duplicate", duplicates)
        pending = self._events.pending
        if not pending and not self._shape_watch.watching:
            self._count_round("idle")
            return RoundResult(duplicates=duplicates)
        waited = self._waited_for()
        self._shape_watch.note(waited, pending, self._events.is_final)
        if not pending:  # asked only for the shape hint (a quiet gateway gets it too)
            self._count_round("idle")
            return RoundResult(duplicates=duplicates)
        asked = [uuid for uuid in pending if uuid in waited]
        reported = refused = parked = 0
        if asked:
            if self._refused_rounds >= SPLIT_AFTER_ROUNDS:
                reported, refused, parked = self._post_split(asked)
            else:
                self._post_batch(asked)
                reported = len(asked)
        dropped = self._drop_unasked(waited)
        metrics.RESULT_EVENTS_HELD.labels(self._name).set(self._events.held_count())
        self._count_round("split" if refused else "ok")
        self._failing.recovered()  # the server answered and took what it asked for
        waiting = sum(1 for uuid in pending if uuid not in waited)
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

    def _record_states(self) -> None:
        """Record the held events' states in the send-API message store (REST API messages of this endpoint),
        before any of them is acked; a state already recorded is not written again.

        Raises:
            RoundError: the store did not answer (nothing is acked: the round is tried again).
        """
        if self._states is None:
            return
        try:
            for entry in self._events.pending.values():
                for event in (entry.sent, entry.delivery):
                    if event is not None:
                        self._states.record(event)
        except LedgerError as exc:
            raise RoundError(f"the send-API message store did not answer: {clip(str(exc), MAX_ERROR_CHARS)}") from None

    def _waited_for(self) -> set[str]:
        """The uuids the server waits for (``GET ?task=result``).

        Raises:
            RoundError: no answer, not 2xx, or an unreadable one (counted).
        """
        status, text = self._requests.waited_for()
        if not 200 <= status < 300:
            self._count_round("http_error")
            raise RoundError(
                f"GET ?task=result answered HTTP {status}{status_hint(status, self.endpoint.secret_origin)}: "
                f"{describe_body(text)}"
            )
        try:
            return set(parse_message_uuids(text))
        except ReplyError as exc:
            self._count_round("bad_reply")
            raise RoundError(f"unreadable ?task=result reply: {exc}") from None

    def _drop_unasked(self, waited: set[str]) -> int:
        """Count a round unasked for every held uuid the server did not wait for; ack (drop) those unasked
        ``keep_rounds`` rounds and ``keep_at_least_s`` seconds. Returns how many were dropped."""
        pending = self._events.pending
        dropped = 0
        now = self._clock()
        for uuid in [u for u in pending if u not in waited]:
            entry = pending[uuid]
            entry.declined_rounds += 1
            if entry.unasked_since is None:
                entry.unasked_since = now
            if entry.declined_rounds >= self._keep_rounds and now - entry.unasked_since >= self._keep_at_least_s:
                del pending[uuid]
                self._consumer.ack(entry.deliveries)
                dropped += 1
                self._count_rows("not_requested")
                self._log_dropped(uuid, entry)
        return dropped

    def _log_dropped(self, uuid: str, entry: PendingRow) -> None:
        """One line for a report dropped unasked: INFO for a delivery report whose sent result went out before
        (many servers stop asking once they have the sent result: nothing is wrong), WARNING otherwise."""
        delivery_only = entry.sent is None and entry.delivery is not None
        if (
            delivery_only
            and entry.delivery is not None
            and (self._events.was_reported(uuid) or entry.delivery.sent_outcome)
        ):
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

    # --- posting ------------------------------------------------------------------------------------------

    def _post_batch(self, asked: list[str]) -> None:
        """All asked rows in one POST (the normal case). Raises RoundError when it was not accepted."""
        resolved = {uuid: self._events.resolve(uuid) for uuid in asked}
        refusal = self._requests.post([self._events.row(uuid, resolved[uuid]) for uuid in asked])
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
            self._events.accepted(uuid, resolved[uuid])
        self._shape_watch.accepted(uuid for uuid in asked if self._events.is_final(uuid))
        self._count_rows("accepted", len(asked))

    def _post_split(self, asked: list[str]) -> tuple[int, int, int]:
        """Post the rows one by one to isolate the ones the server refuses; returns (accepted, refused, parked).

        A refusal counts against a row only if the server accepted another row in the same round, and only
        for answers a row can cause (``Refusal.row_level``); rows not refused before go first. The round ends
        early (RoundError, nothing counted) on a network error or a server-level status, and after
        ``SPLIT_GIVE_UP`` refusals in a row while nothing was accepted yet: then the server refuses everything
        and we must neither hammer it nor blame the rows.
        """
        pending = self._events.pending
        order = sorted(asked, key=lambda u: pending[u].last_refused_round)
        accepted: list[str] = []
        refused: list[tuple[str, str]] = []
        for uuid in order:
            resolved = self._events.resolve(uuid)
            refusal = self._requests.post([self._events.row(uuid, resolved)])
            if refusal is None:
                self._events.accepted(uuid, resolved)
                self._shape_watch.accepted([uuid] if self._events.is_final(uuid) else [])
                accepted.append(uuid)
                self._count_rows("accepted")
                continue
            self._count_rows("refused")
            pending[uuid].last_refused_round = self._round_no
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
            entry = pending[uuid]
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

    def _park(self, uuid: str, entry: PendingRow) -> bool:
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
        del self._events.pending[uuid]
        self._count_rows("parked")
        log.error(
            "%s: parked the report of %s: %s (see `sync_worker parked list --queue events --endpoint %s`)",
            self._name,
            uuid,
            reason,
            self._name,
        )
        return True

    def collect(self) -> int:
        """Merge new deliveries; forget held ones whose connection died (the broker redelivers them).

        Returns the number of deliveries now held. Called by ``round()``; tests call it to wait for events.
        """
        held_count = self._events.collect()
        metrics.RESULT_EVENTS_HELD.labels(self._name).set(held_count)
        return held_count

    # --- metrics ------------------------------------------------------------------------------------------

    def _count_round(self, outcome: str) -> None:
        metrics.RESULT_ROUNDS.labels(self._name, outcome).inc()

    def _count_rows(self, outcome: str, rows: int = 1) -> None:
        metrics.RESULT_ROWS.labels(self._name, outcome).inc(rows)
