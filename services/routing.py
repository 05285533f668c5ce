"""Where an outbound SMS may go: the one place for every worker that publishes or hands back outbound SMS.

* **A route** (``[[routes]]`` in the fleet file) names the modems an SMS to a number prefix may leave through: one
  modem → that modem's own queue, several → the pool queue they share, no route → the shared queue any healthy
  modem takes from (``outbound_queue_for_route``). The task poller routes the server's messages so
  (``TaskRouter``); the message carries the allowed modems too (``OutboundSms.modems``), so a modem worker that
  finds it on a queue it should not have reached (dead-lettered) hands it to its route instead of sending it.
* **A reply** (a server's answer to an inbound SMS, an auto-response) leaves through the SIM the sender texted, so
  the answer comes from the number they know: the receiving modem's queue, with the failover time
  (``SMSGW_MODEM_FAILOVER``) as a per-message TTL — if that modem is down or gone for longer, the broker moves it
  to the shared queue and any modem sends it — and the shared queue at once when that modem's queue is gone
  (``reply_route``).
* **A hand-back**: an SMS a modem took but cannot send now (modem down, SIM capped or paused) keeps its failover
  clock: back to the own queue with the *rest* of the failover time, the shared queue once it is over, or a
  delayed retry where it waits anyway (``hand_back``).

Queue names themselves live in services/topology.py; this module decides which one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from services.config import FleetConfig
from services.schemas import OutboundSms, task_ledger_key
from services.topology import OUTBOUND_QUEUE, outbound_queue_for, pool_queue_for


def outbound_queue_for_route(modem_ids: Sequence[str]) -> str:
    """The queue of SMS routed to ``modem_ids``: the modem's own queue for one, a pool queue for several,
    the shared queue for none."""
    if not modem_ids:
        return OUTBOUND_QUEUE
    if len(set(modem_ids)) == 1:
        return outbound_queue_for(modem_ids[0])
    return pool_queue_for(modem_ids)


def failover_ms(failover_s: float) -> int:
    """``SMSGW_MODEM_FAILOVER`` (seconds, never negative) in whole milliseconds, as message TTLs take it."""
    return int(failover_s * 1000)


# --- route -> queue (task_poller) --------------------------------------------------------------------------------


@dataclass(frozen=True)
class RoutedSms:
    """An outbound SMS and the work queue it is published to."""

    queue: str
    sms: OutboundSms


class TaskRouter:
    """Builds the ``OutboundSms`` of a task message of one endpoint and picks its queue from the fleet's routes."""

    def __init__(self, fleet: FleetConfig) -> None:
        self._fleet = fleet

    def route(self, endpoint: str, uuid: str, to: str, text: str, created_at: int) -> RoutedSms:
        """The routed SMS for the server's message ``uuid`` of ``endpoint``.

        Its sent and delivery events are asked for only when ``endpoint`` has the Message Results API on (an
        endpoint unknown to this fleet, e.g. an orphaned claim of a removed endpoint, gets none: it has no
        events queue). Its ledger key is ``task_ledger_key(endpoint, uuid)``, so two endpoints offering the same
        uuid are two SMS.
        """
        try:
            report = self._fleet.endpoint(endpoint).message_results
        except KeyError:
            report = False
        route = self._fleet.route_for(to)
        modems = list(route.modems) if route else []
        key = task_ledger_key(endpoint, uuid)
        sms = OutboundSms(
            uuid=uuid,
            to=to,
            text=text,
            origin="task",
            created_at=created_at,
            report=report,
            dedup_key="" if key == uuid else key,
            endpoint=endpoint,
            modems=modems,
        )
        return RoutedSms(outbound_queue_for_route(modems), sms)


# --- a reply -> the receiving modem (sync_worker) -----------------------------------------------------------------


@dataclass(frozen=True)
class ReplyRoute:
    """Where a reply goes: ``queue`` with ``expiration_ms`` (None: no TTL), else ``fallback_queue`` (no TTL) when
    the broker refuses ``queue`` because it does not exist (the modem was retired)."""

    queue: str
    expiration_ms: int | None
    fallback_queue: str = OUTBOUND_QUEUE


def reply_route(receiving_modem: str, failover_s: float) -> ReplyRoute:
    """The route of a reply to an SMS ``receiving_modem`` received, with failover time ``failover_s`` (0: the
    reply waits for that modem however long it is down)."""
    return ReplyRoute(outbound_queue_for(receiving_modem), failover_ms(failover_s) if failover_s > 0 else None)


# --- hand-back of an SMS a modem cannot send now (modem_worker) ----------------------------------------------------


@dataclass(frozen=True)
class RetryHere:
    """Not handed on: a delayed retry of the queue it came from. ``failover``: another modem may take it meanwhile
    (it counts as handed on). ``note`` ends the reason (after what keeps the modem from sending)."""

    note: str
    failover: bool


@dataclass(frozen=True)
class HandOn:
    """Handed on: published to ``queue`` with ``expiration_ms`` as TTL (None: none), then acked. Always a
    failover. ``note`` ends the reason."""

    queue: str
    expiration_ms: int | None
    note: str
    failover: bool = True


HandBack = RetryHere | HandOn


def hand_back(
    modem_id: str, from_queue: str, allowed_modems: Sequence[str], failover_s: float, age_ms: int
) -> HandBack:
    """Where an SMS modem ``modem_id`` took from ``from_queue`` but cannot send now goes (not claimed in the
    ledger; ``allowed_modems``: its route, empty = any modem; ``age_ms``: since it was created).

    * From the modem's own queue, allowed through any modem (a reply): back to the own queue with the rest of
      its failover time as TTL (then the broker moves it to the shared queue), or straight to the shared queue
      once that time is up; failover 0 (SMSGW_MODEM_FAILOVER=0): back without a TTL, it waits for this modem.
    * From the own queue, routed to this modem alone: it waits (a delayed retry).
    * From a pool or the shared queue: a delayed retry, and another modem takes it meanwhile.
    """
    own_queue = outbound_queue_for(modem_id)
    if from_queue != own_queue:
        return RetryHere(f" on modem {modem_id}", failover=True)
    if allowed_modems:
        return RetryHere(f"; it waits for modem {modem_id}", failover=False)
    total_ms = failover_ms(failover_s)
    if not total_ms:
        return HandOn(own_queue, None, f"; it waits for modem {modem_id} (SMSGW_MODEM_FAILOVER=0)")
    rest_ms = total_ms - age_ms
    if rest_ms <= 0:
        return HandOn(OUTBOUND_QUEUE, None, "; failover time over, any modem may send it")
    return HandOn(own_queue, rest_ms, f"; any modem may send it in {rest_ms / 1000:.0f}s")
