"""Status pushes: the states of the messages a rapidpro, kannel or webhook endpoint sent, told to it one by one.

These kinds have no ``?task=result`` rounds: the platform waits to be told. Per event of the endpoint's events
queue, ``StatusPusher.handle``:

1. records the state in the send-API message store (``ApiMessages.record_state``), so ``GET
   /api/v1/messages/<id>`` shows it -- a store that does not answer is an outage: the event is retried later;
2. tells the platform (``Platform.report``: courier's ``sent``/``delivered``/``failed`` URL, the Kannel
   dlr-url, the signed webhook event);
3. acks only once the platform answered 2xx (or there was nothing to tell).

A failed push (network, time-out, 5xx, 408, 429) is retried through the broker's delay tiers until the
endpoint's ``max_retry_age``; a refusal (another 4xx) ``max_refusals`` times, then parked with the reason.

A state never goes back: a "sent" that arrives after "delivered" (a retried push overtaken by the next one) is
neither recorded nor pushed. With no platform (an SMSsync endpoint whose results are off, or a kind whose
``message_results`` is false) the pusher only records states, for the REST API.
"""

from __future__ import annotations

import logging

import requests

from result_reporter import metrics
from services.broker import Ack, Budget, Decision, Delivery, Park, Retry
from services.config import EndpointConfig
from services.ledger import LedgerError
from services.ledger.api_messages import ApiMessage, ApiMessages, MessageState, StateChange
from services.platforms import PUSH_STATES, Platform, is_refusal, push_state
from services.schemas import DeliveryEvent, SchemaError, SentEvent, decode_event
from services.sync_client import RedirectRefused
from services.sync_protocol import ERROR_PAGE_CHARS, clip, describe_body, mask_secrets

log = logging.getLogger(__name__)

HEADER_PUSH_REFUSALS = "x-smsgw-push-refusals"
PUSH_OUTCOMES = ("ok", "retry", "parked")
# How far each state is along a message's life: a state never replaces one further along.
_PROGRESS: dict[MessageState, int] = {"queued": 0, "unknown": 1, "sent": 2, "delivered": 3, "failed": 3}


def init_push_metrics(endpoint: str) -> None:
    """Create ``smsgw_status_pushes_total`` of ``endpoint`` at 0 for every state and outcome."""
    for state in PUSH_STATES:
        for outcome in PUSH_OUTCOMES:
            metrics.STATUS_PUSHES.labels(endpoint, state, outcome)


class StateRecorder:
    """Records the states modem events report in the send-API message store, for the messages it knows."""

    def __init__(self, store: ApiMessages) -> None:
        self._store = store

    def record(self, event: SentEvent | DeliveryEvent) -> tuple[ApiMessage | None, bool]:
        """Record the state ``event`` reports; returns the message (None: not a send-API message) and whether the
        state is to be pushed (False: the message is already further along; nothing recorded). The state it
        already has is pushed again: a crash between recording and pushing must not lose the push.

        Raises:
            LedgerError: the store did not answer.
        """
        message = self._store.get(event.uuid)
        if message is None:
            return None, True
        state = push_state(event)
        if _PROGRESS[state] < _PROGRESS[message.state]:
            return message, False
        if state == message.state:
            return message, True
        change = StateChange(state, event.timestamp, clip(f"{event.detail} (modem {event.modem_id})", 200))
        return self._store.record_state(event.uuid, change) or message, True


class StatusPusher:
    """Handler of one endpoint's events queue (see the module docstring); thread-safe if its platform is."""

    def __init__(self, endpoint: EndpointConfig, store: ApiMessages, platform: Platform | None) -> None:
        self._endpoint = endpoint
        self._name = endpoint.name
        self._states = StateRecorder(store)
        self._platform = platform
        self._refusals = Budget(HEADER_PUSH_REFUSALS, max(1, endpoint.max_refusals), "refusals", "refused")
        init_push_metrics(endpoint.name)

    def handle(self, delivery: Delivery) -> Decision:
        """Record and push the state of one event; what to do with it (never raises for bad input)."""
        try:
            event = decode_event(delivery.body)
        except SchemaError as exc:
            return Park(f"malformed event: {exc}", label="malformed")
        state = push_state(event)
        try:
            message, news = self._states.record(event)
        except LedgerError as exc:
            return Retry(f"the send-API message store did not answer: {clip(str(exc))}", warn=True)
        if not news:
            log.info("%s: %s of %s is older than its recorded state; not pushed", self._name, state, event.uuid)
            return Ack()
        if self._platform is None:
            return Ack()
        return self._push(delivery, state, event, message)

    def _push(
        self, delivery: Delivery, state: MessageState, event: SentEvent | DeliveryEvent, message: ApiMessage | None
    ) -> Decision:
        """Tell the platform and judge its answer."""
        assert self._platform is not None
        try:
            answer = self._platform.report(state, event, message)
        except requests.RequestException as exc:
            self._count(state, "retry")
            return Retry(f"status push unreachable: {type(exc).__name__}: {clip(mask_secrets(str(exc)))}", warn=True)
        except RedirectRefused as exc:
            self._count(state, "parked")
            return Park(str(exc), label="redirect")
        if answer is None:
            log.debug("%s: nothing to push for %s of %s", self._name, state, event.uuid)
            return Ack()
        if 200 <= answer.status < 300:
            self._count(state, "ok")
            log.info("%s: pushed %s of %s", self._name, state, event.uuid)
            return Ack()
        reason = (
            f"{self._endpoint.kind} endpoint answered the {state} push of {event.uuid} with HTTP {answer.status}: "
            f"{describe_body(answer.text, ERROR_PAGE_CHARS)}"
        )
        if is_refusal(answer.status):
            spent = delivery.count(HEADER_PUSH_REFUSALS) + 1
            self._count(state, "parked" if spent >= self._refusals.limit else "retry")
            return Retry(reason, budget=self._refusals, warn=True)
        self._count(state, "retry")
        return Retry(reason, warn=True)

    def _count(self, state: MessageState, outcome: str) -> None:
        metrics.STATUS_PUSHES.labels(self._name, state, outcome).inc()
