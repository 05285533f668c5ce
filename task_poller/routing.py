"""Where a task message goes: the queue of the first matching route, else the shared outbound queue.

Routes (``[[routes]]`` in the fleet file) name the modems an SMS to a number prefix may leave through: one
modem → that modem's own queue, several → the pool queue they share, no route → the shared queue any healthy
modem takes from. The message carries the allowed modems too (``OutboundSms.modems``), so a modem worker that
finds it on a queue it should not have reached (dead-lettered) does not send it.
"""

from __future__ import annotations

from dataclasses import dataclass

from services.config import FleetConfig
from services.schemas import OutboundSms, task_ledger_key
from services.topology import outbound_queue_for_route


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
