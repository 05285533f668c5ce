"""The reporter's two requests to one endpoint's Sync URL: ``GET ?task=result`` (which uuids the server waits
for) and ``POST ?task=result`` (the rows, in the endpoint's ``results_shape``), and what counts as accepted."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import requests

from result_reporter import metrics
from result_reporter.shape import post_404_hint, rows_not_understood_hint
from services import liveness
from services.config import EndpointConfig
from services.sync_client import SyncAnswer, SyncEndpoint
from services.sync_protocol import ReplyError, clip, describe_body, parse_payload, results_body, status_hint

MAX_ERROR_CHARS = 300
# HTTP statuses that say something about the server, never about one row: they end a split round at once and
# never count against a row (auth, wrong URL or method, time-outs, rate limits, gateways, unavailability).
SERVER_STATUSES = frozenset({401, 403, 404, 405, 407, 408, 429, 501, 502, 503, 504})


class RoundError(Exception):
    """A round could not talk to the server; the events stay held for the next round."""


@dataclass(frozen=True)
class Refusal:
    """A POST that got an answer, but not "accepted"."""

    reason: str
    row_level: bool  # could be caused by the rows posted (success:false, most 4xx, 500); False: the server
    http_status: int | None = None  # None: HTTP 2xx with success:false


class ResultsRequests:
    """``?task=result`` of one endpoint through its client (the caller owns and closes it)."""

    def __init__(self, endpoint: EndpointConfig, client: SyncEndpoint) -> None:
        self._endpoint = endpoint
        self._client = client

    def waited_for(self) -> tuple[int, str]:
        """(status, body text) of ``GET ?task=result``. Raises RoundError when no answer came."""
        return self._request(lambda: self._client.get(**self._query()))

    def post(self, rows: list[dict[str, Any]]) -> Refusal | None:
        """POST the rows; None when the server accepted them (HTTP 2xx; an empty body or one that is not SMSsync
        JSON counts, an explicit ``success:false`` does not), else why not.

        Raises:
            RoundError: network error (no answer at all).
        """
        body = results_body(rows, self._endpoint.results_shape)
        status, text = self._request(lambda: self._client.post_json(body, **self._query()))
        if not 200 <= status < 300:
            detail = f": {describe_body(text, MAX_ERROR_CHARS)}" if text.strip() else ""
            row_level = status not in SERVER_STATUSES and status < 501 and not 300 <= status < 400
            hint = status_hint(status, self._endpoint.secret_origin)
            if status == 404:
                hint += post_404_hint(self._endpoint.results_shape)
            elif status in (400, 422):
                hint += self._not_understood()
            return Refusal(f"POST ?task=result answered HTTP {status}{hint}{detail}", row_level, status)
        if text.strip():
            try:
                payload = parse_payload(text)
            except ReplyError:
                payload = None  # 2xx with a body that is not SMSsync JSON: accepted (the seed PHP sends none)
            if payload is not None and payload.success is False:
                error = clip(payload.error or "success:false without an error text", MAX_ERROR_CHARS)
                return Refusal(error + self._not_understood(), True)
        return None

    def _not_understood(self) -> str:
        return rows_not_understood_hint(self._endpoint.results_shape, self._endpoint.sent_ok_code)

    def _query(self) -> dict[str, str]:
        query = {"task": "result"}
        if self._endpoint.secret:
            query["secret"] = self._endpoint.secret
        return query

    def _request(self, call: Callable[[], SyncAnswer]) -> tuple[int, str]:
        """(status, body text) of ``call``'s answer. Raises RoundError when no answer came (network error)."""
        liveness.beat()  # a round of many requests (rows one by one) is progress, not a stuck loop
        name = self._endpoint.name
        started = time.monotonic()
        try:
            answer = call()
        except requests.RequestException as exc:
            metrics.RESULT_ROUNDS.labels(name, "network_error").inc()
            raise RoundError(f"Sync URL unreachable: {type(exc).__name__}: {clip(str(exc))}") from None
        finally:
            metrics.HTTP_SECONDS.labels(name, "result").observe(time.monotonic() - started)
        return answer.status, answer.text
