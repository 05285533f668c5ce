"""The poller's two requests to one endpoint's Sync URL (``?task=send``, ``?task=sent``), timed and turned into
``PollError`` when no usable answer came."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import requests

from services import liveness
from services.sync_client import SyncAnswer, SyncEndpoint
from services.sync_protocol import clip, describe_body, status_hint
from task_poller import metrics

# The poller's logger: these lines are part of its log, under the name operators filter on.
log = logging.getLogger("task_poller.poller")


class PollError(Exception):
    """A poll failed in a way worth backing off for; the message is the one log line."""

    def __init__(self, message: str, outcome: str, status: int | None = None) -> None:
        super().__init__(message)
        self.outcome = outcome  # metric label
        self.status = status  # the HTTP status of a non-2xx answer


class TaskRequests:
    """``?task=send`` and ``?task=sent`` of one endpoint through its ``SyncClient``."""

    def __init__(
        self,
        endpoint_name: str,
        secret: str,
        client: SyncEndpoint,
        secret_origin: str = "SMSGW_SECRET",  # noqa: S107 - the name of a setting, not a secret
    ) -> None:
        self._name = endpoint_name
        self._secret = secret
        self._secret_origin = secret_origin
        self._client = client

    def poll_send(self) -> str:
        """GET ``?task=send`` (with the secret, if any); the body of a 2xx answer. Raises PollError."""
        query = {"task": "send"}
        if self._secret:
            query["secret"] = self._secret
        return self._request("send", lambda: self._client.get(**query))

    def post_sent(self, uuids: list[str]) -> str:
        """POST ``?task=sent`` (JSON, no secret — as the app); the body of a 2xx answer. Raises PollError."""
        return self._request("sent", lambda: self._client.post_json({"queued_messages": uuids}, task="sent"))

    def close(self) -> None:
        """Close the HTTP client."""
        self._client.close()

    def _request(self, task: str, call: Callable[[], SyncAnswer]) -> str:
        """One request to the Sync URL; returns the body text of a 2xx answer.

        The client bounds the whole answer by the endpoint's ``http_timeout``, so a server trickling its answer
        cannot hold a poll (and its claims) indefinitely.

        Raises:
            PollError: network error, time-out or a non-2xx status (the log line says which, never the secret).
        """
        liveness.beat()  # each request is bounded by http_timeout: a poll of several is progress
        started = time.monotonic()
        try:
            answer = call()
        except requests.RequestException as exc:
            if task == "send" and isinstance(exc, requests.exceptions.ReadTimeout):
                self._lost_on_hand_out(exc)
            raise PollError(
                f"?task={task}: Sync URL unreachable: {type(exc).__name__}: {clip(str(exc))}", "network_error"
            ) from None
        finally:
            metrics.HTTP_SECONDS.labels(self._name, task).observe(time.monotonic() - started)
        if not 200 <= answer.status < 300:
            raise PollError(
                f"?task={task}: Sync URL answered HTTP {answer.status}"
                f"{status_hint(answer.status, self._secret_origin)}: {describe_body(answer.text)}",
                "http_error",
                answer.status,
            )
        return answer.text

    def _lost_on_hand_out(self, exc: requests.exceptions.ReadTimeout) -> None:
        """Count and say (one WARNING) that a ``?task=send`` the server received got no answer in time: a server
        that marks messages sent when it hands them out has dropped them from its outbox, and they are not sent.
        The same loss as a release (``smsgw_task_released_total``), but how many messages is unknown."""
        metrics.TASK_RELEASED.labels(self._name, "send_timeout").inc()
        log.warning(
            "endpoint %s: ?task=send got no answer in time (%s: %s): any messages it handed out are not sent, and a "
            "server that marks messages sent when it hands them out never offers them again: check its outbox "
            '(counted in smsgw_task_released_total{reason="send_timeout"})',
            self._name,
            type(exc).__name__,
            clip(str(exc)),
        )
