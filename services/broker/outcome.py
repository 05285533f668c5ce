"""What a handler's decision means for the broker, as a value (pure: no I/O, no metrics, no logs).

``decide`` runs a handler the way every consumer does (a crash or a broker outage inside the handler becomes a
retry); ``outcome_of`` turns the decision into the one copy to publish, confirmed, before the original is acked:
a retry copy into the delay queues (attempts counted, a spent budget or retry age parks instead), a parked copy
with the reason, or the moved copy. ``Consumer`` applies it to RabbitMQ and ``StubBroker`` to its in-memory
queues, so both apply a decision the same way.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass

from services.broker.decisions import CRASHES, Decision, Handler, Move, Park, Retry
from services.broker.errors import BrokerUnavailable
from services.broker.messages import HEADER_ATTEMPTS, HEADER_CRASHES, HEADER_FIRST_ATTEMPT_MS, Delivery, Publication
from services.broker.parking import parked_copy
from services.topology import DELAY_TIERS_S, EXCHANGE, RETRY_EXCHANGE, retry_routing_key

# The package's one logger: the broker's log lines keep the logger name they had before it became a package.
log = logging.getLogger(__package__)


@dataclass(frozen=True)
class Outcome:
    """A decision as it is applied: ``decision`` after budgets and the retry age (a spent ``Retry`` becomes a
    ``Park``), and ``copy``, the message to publish (confirmed) before the original is acked (None: just ack).
    For a ``Retry``, ``attempt`` is the retry's number (1-based) and ``tier_s`` its delay."""

    decision: Decision
    copy: Publication | None = None
    attempt: int = 0
    tier_s: int = 0


def decide(handler: Handler, delivery: Delivery) -> Decision:
    """``handler``'s decision about ``delivery``; a handler that raises gets a retry instead (never raises)."""
    try:
        return handler(delivery)
    except BrokerUnavailable as exc:
        # The handler's own publish (a reply, an event) found the broker away: not a bug, try later.
        return Retry(f"broker unavailable during handling: {exc}")
    except Exception as exc:
        return after_crash(delivery, exc)


def after_crash(delivery: Delivery, exc: Exception) -> Decision:
    """A handler bug must neither lose the message nor loop it: retry it later through a delay queue (the bug may
    depend on a passing state), park it with the error after HANDLER_CRASH_LIMIT crashes. The traceback is logged
    once per message, later crashes in one line."""
    crashes = delivery.count(HEADER_CRASHES) + 1
    if crashes == 1:
        log.exception("handler crashed on a message from %s; retrying it later", delivery.queue)
    else:
        log.error("handler crashed again (%d) on a message from %s: %r", crashes, delivery.queue, exc)
    return Retry(f"handler crashed: {exc!r}", budget=CRASHES)


def choose_delay_tier(attempt: int) -> int:
    """Back-off tier (seconds) for retry number ``attempt`` (1-based): exponential with jitter, capped.

    Jitter spreads a burst of failures (a server outage) over neighbouring tiers so they do not all come back
    in the same second.
    """
    ideal = min(2.0 ** (attempt - 1), float(DELAY_TIERS_S[-1]))
    jittered = random.uniform(ideal * 0.5, ideal * 1.5)
    return min(DELAY_TIERS_S, key=lambda tier: abs(tier - jittered))


def outcome_of(delivery: Delivery, decision: Decision, *, max_retry_age_s: float | None, now_ms: int) -> Outcome:
    """What ``decision`` about ``delivery`` takes at ``now_ms``: the copy to publish before the ack, if any."""
    decision = _within_budget(delivery, decision)
    if isinstance(decision, Retry):
        first = delivery.first_attempt_ms or now_ms
        age_s = (now_ms - first) / 1000
        if max_retry_age_s is None or age_s < max_retry_age_s:
            return _retry(delivery, decision, first)
        decision = Park(
            f"gave up after {delivery.attempts} retries over {age_s:.0f}s: {decision.reason}", label="max_age"
        )
    if isinstance(decision, Move):
        headers = {**delivery.headers, **(decision.headers or {})}
        moved = Publication(
            decision.routing_key, delivery.body, EXCHANGE, headers, delivery.message_id, decision.expiration_ms
        )
        return Outcome(decision, moved)
    if isinstance(decision, Park):
        copy = parked_copy(
            delivery.queue,
            delivery.body,
            decision.reason,
            message_id=delivery.message_id,
            headers=delivery.headers,
            at_ms=now_ms,
        )
        return Outcome(decision, copy)
    return Outcome(decision)


def _within_budget(delivery: Delivery, decision: Decision) -> Decision:
    """``decision``, or a ``Park`` when it is a ``Retry`` whose budget this retry would spend."""
    if isinstance(decision, Retry) and decision.budget is not None:
        spent = delivery.count(decision.budget.header) + 1
        if spent >= decision.budget.limit:
            return Park(f"{decision.reason}; gave up after {spent} {decision.budget.noun}", label=decision.budget.label)
    return decision


def _retry(delivery: Delivery, decision: Retry, first_attempt_ms: int) -> Outcome:
    """The retry copy: through the delay queue of a tier, attempts (and the budget's own counter) counted."""
    attempt = delivery.attempts + 1
    tier = choose_delay_tier(attempt)
    headers = {**delivery.headers, HEADER_ATTEMPTS: attempt, HEADER_FIRST_ATTEMPT_MS: first_attempt_ms}
    if decision.budget is not None:
        headers[decision.budget.header] = delivery.count(decision.budget.header) + 1
    copy = Publication(
        retry_routing_key(delivery.queue, tier), delivery.body, RETRY_EXCHANGE, headers, delivery.message_id
    )
    return Outcome(decision, copy, attempt, tier)
