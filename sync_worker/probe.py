"""A direct probe of each inbound endpoint's Sync URL: ``smsgw_sync_url_up{endpoint}``.

The sync POSTs only tell whether the server works while there are SMS to forward; a dead server of a quiet
gateway would go unnoticed until the next SMS. So sync_worker also sends a bare GET of each endpoint's Sync URL
(``SyncClient.probe``: no query, no secret, redirects not followed -- what the ``@20`` query code does) every
``SMSGW_PROBE_INTERVAL`` seconds, from one small thread per endpoint, and exports the answer:

* 1: any HTTP answer below 500 (a 200, a 404 or a 403 all prove a server is there and answering);
* 0: a network error, a time-out (the endpoint's ``http_timeout``) or a 5xx.

Endpoints with ``inbound = false`` are not probed: sync_worker does not serve them, and the task poller's
``?task=send`` polls (``smsgw_task_polls_total``, alert SmsgwTaskPollsFailing) already watch their Sync URL.
Alert SmsgwSyncUrlFailing (deploy/prometheus/alerts.yml) fires on two failed probes in a row.
"""

from __future__ import annotations

import logging
import threading

import requests

from services.config import EndpointConfig
from services.sync_client import SyncClient
from services.sync_protocol import clip
from sync_worker.metrics import SYNC_URL_UP

log = logging.getLogger(__name__)

# Joining the thread at stop waits at most one probe (bounded by the endpoint's http_timeout) plus this.
_JOIN_MARGIN_S = 5.0


class SyncUrlProbe:
    """Probes one endpoint's Sync URL every ``interval`` seconds from a daemon thread (``start``/``stop``) and sets
    its ``smsgw_sync_url_up`` series; logs when the URL stops and starts answering (not every probe)."""

    def __init__(self, endpoint: EndpointConfig, interval: float, client: SyncClient | None = None) -> None:
        self._endpoint = endpoint
        self._interval = interval
        self._client = client or SyncClient(endpoint)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._up: bool | None = None  # the last result; None before the first probe

    @property
    def up(self) -> bool | None:
        """The result of the last probe (None: none finished yet)."""
        return self._up

    def probe_once(self) -> bool:
        """Probe the Sync URL once, set the gauge and return whether it answered below 500. Never raises: an
        unexpected error counts as a failed probe (and is logged with its traceback) so the thread keeps going."""
        try:
            answer = self._client.probe()
        except requests.RequestException as exc:
            up, why = False, f"{type(exc).__name__}: {clip(str(exc), 200)}"
        except Exception as exc:  # a bug must not stop the probing: it shows as an outage and in the log
            log.exception(
                "endpoint %s: probe of %s failed unexpectedly", self._endpoint.name, self._client.redacted_url
            )
            up, why = False, type(exc).__name__
        else:
            up, why = answer.status < 500, f"HTTP {answer.status}"
        # The series is created here, not earlier: a 0 exported before the first answer would be a false outage.
        SYNC_URL_UP.labels(endpoint=self._endpoint.name).set(1 if up else 0)
        if up != self._up:
            if up:
                log.info("endpoint %s: Sync URL %s answers (%s)", self._endpoint.name, self._client.redacted_url, why)
            else:
                log.warning(
                    "endpoint %s: Sync URL %s does not answer (%s); probing every %gs",
                    self._endpoint.name,
                    self._client.redacted_url,
                    why,
                    self._interval,
                )
        self._up = up
        return up

    def start(self) -> None:
        """Start probing: once at once, then every ``interval`` seconds until ``stop``."""
        self._thread = threading.Thread(target=self._run, name=f"smsgw-probe-{self._endpoint.name}", daemon=True)
        self._thread.start()

    def request_stop(self) -> None:
        """Ask the thread to stop after the probe in flight (returns at once: safe in a signal handler)."""
        self._stop.set()

    def stop(self) -> None:
        """Stop probing (waits for a probe in flight, at most its time-out) and close the HTTP client."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(self._endpoint.http_timeout + _JOIN_MARGIN_S)
        self._client.close()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.probe_once()
            self._stop.wait(self._interval)
