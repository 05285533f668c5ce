"""What a handler decides about a delivery (outcomes as values): ``Ack``, ``Retry`` (with an optional
``Budget``), ``Park`` or ``Move``. ``services.broker.outcome`` says what each one means for the broker."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from services.broker.messages import HEADER_CRASHES, Delivery

HANDLER_CRASH_LIMIT = 5  # handler exceptions before the consumer parks the message itself


@dataclass(frozen=True)
class Ack:
    """The effect is durable: remove the message."""


@dataclass(frozen=True)
class Budget:
    """A retry budget of its own, for failures that retrying rarely cures (a server refusing, a handler bug):
    counted in ``header`` on each retry copy apart from other retries (an outage must not spend it); the
    ``limit``-th such retry parks the message instead, saying "gave up after N <noun>"."""

    header: str
    limit: int
    noun: str
    label: str  # metric label of the park


CRASHES = Budget(HEADER_CRASHES, HANDLER_CRASH_LIMIT, "crashes", "crash")


@dataclass(frozen=True)
class Retry:
    """Try again later, through a delay queue; with a ``budget``, park once that budget is spent.

    ``warn``: the failure matters to an operator before the message is parked (an inbound SMS not reaching its
    server): the retry is logged at WARNING on the first attempt of the streak and then on attempts 5, 25 and
    every 100th (``is_warning_attempt``), at INFO otherwise. Without it every retry is INFO (a modem worker's
    SMS waiting for its modem).
    """

    reason: str
    budget: Budget | None = None
    warn: bool = False


def is_warning_attempt(attempt: int) -> bool:
    """Whether retry number ``attempt`` (1-based) of a ``Retry(warn=True)`` is logged at WARNING: 1, 5, 25, then
    every 100th — visible within minutes, and still a line a day or so while the retries go on for days."""
    return attempt in (1, 5, 25) or attempt % 100 == 0


@dataclass(frozen=True)
class Park:
    """Give up: move to the parked queue with the reason (kept in headers for the parked CLI)."""

    reason: str
    label: str = "error"  # low-cardinality metric label


@dataclass(frozen=True)
class Move:
    """Hand the message on to another work queue (confirmed publish, then ack), e.g. a reply whose modem is
    down going back to its modem's queue with the rest of its failover TTL. ``expiration_ms`` None: no TTL."""

    routing_key: str
    reason: str
    expiration_ms: int | None = None
    headers: dict[str, Any] | None = None  # set on the moved copy (over the delivery's own), e.g. a try count


# There is deliberately no "requeue now" decision: on a quorum queue every requeue counts towards
# x-delivery-limit, so a handler that requeues while waiting for something (a modem coming back) would get its
# message parked after DELIVERY_LIMIT tight loops. Waiting goes through a delay queue (Retry).
Decision = Ack | Retry | Park | Move
Handler = Callable[[Delivery], Decision]
