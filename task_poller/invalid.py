"""Invalid task messages: each counted on every poll, but logged once while the server keeps offering it."""

from __future__ import annotations

import logging
from collections import OrderedDict

from services.sync_protocol import Payload
from task_poller import metrics

# The poller's logger: these lines are part of its log, under the name operators filter on.
log = logging.getLogger("task_poller.poller")

INVALID_REMEMBERED = 1000  # invalid task messages already reported (LRU): each is logged once, not every poll


class InvalidMessages:
    """Reports the invalid task messages of one endpoint's replies (bounded memory: ``INVALID_REMEMBERED``)."""

    def __init__(self, endpoint_name: str) -> None:
        self._name = endpoint_name
        self._seen: OrderedDict[str, None] = OrderedDict()

    def report(self, payload: Payload) -> None:
        """Count every invalid task message of the reply; log each one once (WARNING) while the server keeps
        offering it, not on every poll."""
        keys = payload.skipped_keys if len(payload.skipped_keys) == len(payload.skipped) else payload.skipped
        for reason, key in zip(payload.skipped, keys, strict=True):
            metrics.TASK_MESSAGES.labels(self._name, "invalid").inc()
            if key in self._seen:
                self._seen.move_to_end(key)
                log.debug("endpoint %s: the invalid task message is offered again: %s", self._name, reason)
                continue
            self._seen[key] = None
            while len(self._seen) > INVALID_REMEMBERED:
                self._seen.popitem(last=False)
            log.warning(
                "endpoint %s: skipped an invalid task message, not sent: %s (logged once while the server keeps "
                'offering it; counted in smsgw_task_messages_total{outcome="invalid"})',
                self._name,
                reason,
            )
