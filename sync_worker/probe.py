"""Whether each inbound endpoint's Sync URL works: ``smsgw_sync_url_up{endpoint}``, from its real requests first.

The truth about a Sync URL is the outcome of its real requests: ``SyncUrlHealth`` keeps one endpoint's state, and
the forwarder (sync_worker/forwarder.py) reports every POST's outcome to it. A POST (or GET, with
``sync_method = "GET"``) is judged as the forwarder judges it:

* up: an HTTP answer the server gave as a server -- 2xx, 3xx, 401 and 403 (credentials: the SMS are parked with
  the server's words, alert SmsgwInboundParked; the server itself is there);
* down: a network error or time-out, a redirect the client refuses, any 5xx, and any other 4xx (404, 400, 410
  ...: the URL is not a working Sync URL -- the forwarder parks those SMS at once too).

A quiet gateway has no requests to judge, so ``SyncUrlProbe`` sends a bare GET (``SyncClient.probe``: no query,
no secret, redirects not followed) -- but only when there has been no real request for ``SMSGW_PROBE_INTERVAL``
seconds, and ``SMSGW_PROBE_INTERVAL=0`` switches it off. A GET is not what an SMSsync server is built to serve,
so the probe says less than a POST:

* a network error or time-out is down: nothing answers, whatever the last POST said;
* 2xx, 3xx, 401, 403 and 405 (the URL exists and takes POSTs only) are up;
* 500 and 501 say nothing: several real SMSsync servers answer every GET with 500 while accepting every POST.
  The state stays what the real requests last said (none yet: no series at all, rather than a false outage);
* 502-504 and other 5xx (a proxy in front of a server that is down) and other 4xx are down;
* but any HTTP answer is up while the last real request succeeded: a probe never contradicts a successful POST.
  Only a failed real request, or a probe that gets no answer at all, turns such a state to down.

Endpoints with ``inbound = false`` are not probed: sync_worker does not serve them, and the task poller's
``?task=send`` polls (``smsgw_task_polls_total``, alert SmsgwTaskPollsFailing) already watch their Sync URL.
Alert SmsgwSyncUrlFailing (deploy/prometheus/alerts.yml) fires when the state has been down for a minute.
"""

from __future__ import annotations

import logging
import threading
import time

import requests
from prometheus_client import Gauge

from services.config import EndpointConfig
from services.sync_client import SyncClient
from services.sync_protocol import clip
from sync_worker.metrics import SYNC_URL_UP

log = logging.getLogger(__name__)

# Joining the thread at stop waits at most one probe (bounded by the endpoint's http_timeout) plus this.
_JOIN_MARGIN_S = 5.0
# 4xx answers that say "who are you", not "no such Sync URL": the server is there.
AUTH_STATUSES = frozenset({401, 403})
# GET answers that say nothing about the server (see the module docstring).
PROBE_SILENT_STATUSES = frozenset({500, 501})


def request_is_up(status: int) -> bool:
    """Whether a real request to a Sync URL answered with HTTP ``status`` shows a working Sync URL."""
    return status < 400 or status in AUTH_STATUSES


def probe_verdict(status: int) -> bool | None:
    """What a bare GET answered with HTTP ``status`` says: True up, False down, None nothing."""
    if status in PROBE_SILENT_STATUSES:
        return None
    return request_is_up(status) or status == 405


class SyncUrlHealth:
    """One endpoint's Sync URL state (thread-safe): the outcome of its last real request, or of a probe where no
    real request says otherwise; sets ``smsgw_sync_url_up`` and logs each change of state (not every request)."""

    def __init__(self, endpoint: str, redacted_url: str) -> None:
        self._endpoint = endpoint
        self._url = redacted_url
        self._lock = threading.Lock()
        self._up: bool | None = None  # None: nothing known yet, and no series exported
        self._last_request_ok: bool | None = None  # the last real request's verdict
        self._last_activity = time.monotonic()  # the last real request or probe
        self._gauge: Gauge | None = None  # smsgw_sync_url_up{endpoint}, bound at the first verdict

    @property
    def up(self) -> bool | None:
        """The current state (None: no request or probe has said anything yet)."""
        return self._up

    def idle_for(self) -> float:
        """Seconds since the last real request or probe."""
        return time.monotonic() - self._last_activity

    def request_answered(self, status: int) -> None:
        """Record a real request the Sync URL answered with HTTP ``status``."""
        up = request_is_up(status)
        self._record(up, f"a request answered HTTP {status}", real=True)

    def request_failed(self, why: str) -> None:
        """Record a real request that got no usable answer (network error, time-out, refused redirect)."""
        self._record(False, why, real=True)

    def probe_answered(self, verdict: bool | None, why: str) -> None:
        """Record a probe the Sync URL answered, with its ``probe_verdict``."""
        self._record(verdict, why, real=False)

    def probe_failed(self, why: str) -> None:
        """Record a probe that got no answer at all: down, whatever the last real request said."""
        self._record(False, why, real=False, answered=False)

    def _record(self, up: bool | None, why: str, *, real: bool, answered: bool = True) -> None:
        with self._lock:
            self._last_activity = time.monotonic()
            if real:
                self._last_request_ok = up
            elif answered and self._last_request_ok:
                # The server answers, and its last real request succeeded: whatever its GET says, no outage
                # (and a server that answers again after a probe got nothing is back).
                up = True
            elif up is None:
                return  # a GET answered 500/501 and no real request succeeded: says nothing
            if up == self._up:
                return  # the usual case, once per POST: nothing to export or log
            self._up = up
            # Under the lock: two threads' verdicts must reach the gauge in the order they were recorded. The
            # series is created here, not earlier: a 0 exported before the first verdict would be a false outage.
            if self._gauge is None:
                self._gauge = SYNC_URL_UP.labels(self._endpoint)
            self._gauge.set(1 if up else 0)
        source = "request" if real else "probe"
        if up:
            log.info("endpoint %s: Sync URL %s works (%s: %s)", self._endpoint, self._url, source, why)
        else:
            log.warning("endpoint %s: Sync URL %s does not work (%s: %s)", self._endpoint, self._url, source, why)


class SyncUrlProbe:
    """Probes one endpoint's Sync URL from a daemon thread (``start``/``stop``) whenever it has had no real
    request or probe for ``interval`` seconds; the verdicts go to ``health``. ``interval`` 0: never probes."""

    def __init__(
        self, endpoint: EndpointConfig, interval: float, health: SyncUrlHealth, client: SyncClient | None = None
    ) -> None:
        self._endpoint = endpoint
        self._interval = interval
        self._health = health
        self._client = client or SyncClient(endpoint)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def probe_once(self) -> bool | None:
        """Probe the Sync URL once and record the verdict; returns it (None: the answer said nothing). Never
        raises: an unexpected error counts as a failed probe (logged with its traceback) so the thread goes on."""
        try:
            answer = self._client.probe()
        except requests.RequestException as exc:
            self._health.probe_failed(f"{type(exc).__name__}: {clip(str(exc), 200)}")
            return False
        except Exception as exc:  # a bug must not stop the probing: it shows as an outage and in the log
            log.exception(
                "endpoint %s: probe of %s failed unexpectedly", self._endpoint.name, self._client.redacted_url
            )
            self._health.probe_failed(type(exc).__name__)
            return False
        verdict = probe_verdict(answer.status)
        self._health.probe_answered(verdict, f"GET answered HTTP {answer.status}")
        return verdict

    def start(self) -> None:
        """Start probing (no thread at all with interval 0): once at once, then whenever idle for ``interval``."""
        if self._interval <= 0:
            log.info("endpoint %s: Sync URL probe off (SMSGW_PROBE_INTERVAL=0)", self._endpoint.name)
            return
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
        self.probe_once()
        while not self._stop.is_set():
            # Real requests are the better witness: wait until there has been none for a whole interval.
            remaining = self._interval - self._health.idle_for()
            if remaining > 0:
                self._stop.wait(remaining)
                continue
            self.probe_once()
