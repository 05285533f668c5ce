"""The status pushers' lanes: which endpoints get one, the send-API message store they record in, their
consumers (one per endpoint, its own connection, one event at a time so a message's states go out in order)."""

from __future__ import annotations

import logging
import sys
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from result_reporter.pusher import StatusPusher
from services.broker import Consumer, PublisherThread
from services.config import EndpointConfig, FleetConfig, Settings, redact_url
from services.ledger import LedgerError
from services.ledger.api_messages import ApiMessages, open_api_messages
from services.platforms import Platform, platform_for
from services.runtime import start_supervised
from services.topology import Topology, events_queue_for

log = logging.getLogger(__name__)


def push_endpoints(fleet: FleetConfig) -> tuple[EndpointConfig, ...]:
    """The endpoints served by a status pusher: every rapidpro, kannel and webhook endpoint, and an SMSsync
    endpoint the REST API may send for (``api_key``) whose results are off (its pusher only records states:
    its events queue must not fill up unread)."""
    return tuple(e for e in fleet.endpoints if e.kind != "smssync" or (e.api_key and not e.message_results))


def needs_store(fleet: FleetConfig) -> bool:
    """Whether the reporter records states in the send-API message store (some endpoint takes API messages)."""
    return any(e.kind != "smssync" or e.api_key for e in fleet.endpoints)


def open_store(settings: Settings) -> ApiMessages | None:
    """The send-API message store beside the ledger; None, after one line on stderr, when it cannot be opened."""
    try:
        return open_api_messages(settings.ledger_url, settings.state_dir)
    except (OSError, LedgerError, NotImplementedError) as exc:
        where = redact_url(settings.ledger_url) if settings.ledger_url else settings.state_dir
        reason = " ".join(str(exc).split())
        print(
            f"unhealthy: result_reporter: cannot open the send-API message store ({where}): {reason}", file=sys.stderr
        )
        return None


@dataclass
class PushLane:
    """One endpoint's status pusher: its consumer and platform (None: it only records states)."""

    endpoint: EndpointConfig
    consumer: Consumer
    platform: Platform | None
    thread: threading.Thread | None = None

    def start(self, failed: Callable[[BaseException], None]) -> None:
        """Start consuming; a consumer that dies calls ``failed``."""
        name = self.endpoint.name
        self.thread = start_supervised(self.consumer.run, f"status pusher {name}", failed)
        what = f"pushing states to {self.endpoint.redacted_url}" if self.platform else "recording states only"
        log.info("%s (%s): %s", name, self.endpoint.kind, what)

    def join(self, timeout: float) -> None:
        """Wait for the consumer to finish (after ``consumer.stop()``), then release the HTTP client."""
        if self.thread is not None:
            self.thread.join(timeout=self.endpoint.http_timeout + timeout)
        if self.platform is not None:
            self.platform.close()


def push_lanes(
    settings: Settings,
    endpoints: Sequence[EndpointConfig],
    publisher: PublisherThread,
    topology: Topology,
    store: ApiMessages,
) -> list[PushLane]:
    """A ``PushLane`` per endpoint (connects lazily: nothing is contacted until started)."""
    lanes = []
    for endpoint in endpoints:
        pushes = endpoint.kind != "smssync" and endpoint.message_results
        platform = platform_for(endpoint) if pushes else None
        pusher = StatusPusher(endpoint, store, platform)
        consumer = Consumer(
            settings.amqp_url,
            [events_queue_for(endpoint.name)],
            pusher.handle,
            publisher,
            name=f"smsgw-status-pusher-{endpoint.name}",
            prefetch=settings.prefetch,
            # One at a time: "sent" is pushed before "delivered" (a retried push can still be overtaken; the
            # pusher never records or pushes a state behind the one recorded).
            concurrency=1,
            topology=topology,
            max_retry_age_s=endpoint.max_retry_age,
        )
        lanes.append(PushLane(endpoint, consumer, platform))
    return lanes
