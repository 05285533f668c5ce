"""Invalid task messages: each counted on every poll, but logged once while the server keeps offering it.

A message that is complete but for its text (empty or white space only) is not sent either; its uuid is one the
server waits for, so where the endpoint uses the Message Results API it is reported failed: a failed sent event
on the endpoint's events queue (confirmed before the line is logged), which the result reporter answers
``?task=result`` with.
"""

from __future__ import annotations

import logging
from collections import OrderedDict

from services import broker
from services.broker import BrokerError, MessagePublisher, Publication
from services.schemas import SentEvent
from services.sync_protocol import InvalidMessage, Payload
from services.topology import events_queue_for
from task_poller import metrics
from task_poller.sync_http import PollError

# The poller's logger: these lines are part of its log, under the name operators filter on.
log = logging.getLogger("task_poller.poller")

INVALID_REMEMBERED = 1000  # invalid task messages already reported (LRU): each is logged once, not every poll
EMPTY_TEXT_DETAIL = "the task message has an empty text; not sent"


class InvalidMessages:
    """Reports the invalid task messages of one endpoint's replies (bounded memory: ``INVALID_REMEMBERED``)."""

    def __init__(self, endpoint_name: str, publisher: MessagePublisher, message_results: bool) -> None:
        """``message_results``: the endpoint asks for results, so an empty task message is reported failed."""
        self._name = endpoint_name
        self._publisher = publisher
        self._message_results = message_results
        self._seen: OrderedDict[str, None] = OrderedDict()

    def report(self, payload: Payload, *, authentic: bool) -> None:
        """Count every invalid task message of the reply; log each one once (WARNING) while the server keeps
        offering it, not on every poll. ``authentic``: the reply is one the poller acts on (task ``send``, its
        secret matches); only then is an empty message reported failed to the server.

        Raises:
            PollError: a failed event was not confirmed by the broker (reported again on the next poll).
        """
        for invalid in payload.invalid:
            metrics.TASK_MESSAGES.labels(self._name, "invalid").inc()
            if invalid.key in self._seen:
                self._seen.move_to_end(invalid.key)
                log.debug("endpoint %s: the invalid task message is offered again: %s", self._name, invalid.reason)
                continue
            reported = authentic and self._message_results and invalid.failed_uuid is not None
            if reported:
                self._report_failed(invalid)
            self._seen[invalid.key] = None
            while len(self._seen) > INVALID_REMEMBERED:
                self._seen.popitem(last=False)
            log.warning(
                "endpoint %s: skipped an invalid task message, not sent: %s%s (logged once while the server keeps "
                'offering it; counted in smsgw_task_messages_total{outcome="invalid"})',
                self._name,
                invalid.reason,
                "; reported failed through ?task=result" if reported else "",
            )

    def _report_failed(self, invalid: InvalidMessage) -> None:
        """Publish a failed sent event for ``invalid``'s uuid (confirmed). Raises PollError (not confirmed)."""
        assert invalid.failed_uuid is not None
        event = SentEvent(invalid.failed_uuid, "", "failed", EMPTY_TEXT_DETAIL, broker.now_ms(), endpoint=self._name)
        try:
            self._publisher.publish(
                Publication(events_queue_for(self._name), event.to_json(), message_id=invalid.failed_uuid)
            )
        except BrokerError as exc:
            raise PollError(
                f"broker did not confirm the failed result of task message {invalid.failed_uuid}: {exc}",
                "broker_error",
            ) from None
