"""A webhook receiver that verifies every event's signature with the recipe docs/integrations.md gives users: the
Python code of its "Webhooks" section is loaded from the document itself and run, so a recipe that stopped
matching what the gateway sends fails the e2e tests, not a user."""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from tests.doubles.recorder import Recorded, RecordingServer

DOC = Path(__file__).resolve().parents[2] / "docs" / "integrations.md"
SignatureCheck = Callable[[str, str, bytes, "str | None", "str | None"], "str | None"]


def _webhooks_section() -> str:
    text = DOC.read_text(encoding="utf-8")
    return text.split("\n## Webhooks", 1)[1].split("\n## ", 1)[0]


def docs_python_recipe() -> SignatureCheck:
    """``webhook_signature_error`` exactly as docs/integrations.md defines it (its Python block, executed)."""
    section = _webhooks_section().split("\n### Python", 1)[1]
    code = section.split("```python\n", 1)[1].split("\n```", 1)[0]
    namespace: dict[str, Any] = {"__name__": "integrations_recipe"}
    exec(compile(code, f"{DOC}:webhooks", "exec"), namespace)  # our own documentation's code, on purpose
    return cast(SignatureCheck, namespace["webhook_signature_error"])


def docs_shell_recipe() -> str:
    """The shell recipe of docs/integrations.md (it reads ``$TS``, ``$SIG``, ``$TARGET``, ``$SIGNING_KEY`` and
    ``body.json`` in the current directory, and prints ``verified`` when the signature matches)."""
    section = _webhooks_section().split("\n### Shell", 1)[1]
    return section.split("```sh\n", 1)[1].split("\n```", 1)[0]


@dataclass(frozen=True)
class Event:
    """One event as received: its JSON, and why its signature did not verify (None = it did)."""

    payload: dict[str, Any]
    signature_error: str | None
    request: Recorded


class WebhookReceiver:
    """Serves a webhook ``url`` on loopback: verifies each POST with the docs' recipe and ``signing_key``,
    answers 401 (with the reason) when it fails, else ``status`` (200 unless a test plays a broken receiver)."""

    def __init__(self, signing_key: str, path: str = "/hooks/sms") -> None:
        self.signing_key = signing_key
        self.path = path
        self.status = 200
        self._check = docs_python_recipe()
        self._lock = threading.Lock()
        self._events: list[Event] = []
        self._server = RecordingServer(self._answer)

    def start(self) -> WebhookReceiver:
        """Serve; returns self."""
        self._server.start()
        return self

    def stop(self) -> None:
        """Stop serving."""
        self._server.stop()

    @property
    def url(self) -> str:
        """The endpoint's ``url`` (with a query string, so the signature's path?query part is exercised)."""
        return f"{self._server.base_url}{self.path}?source=smsgw&x=a%20b"

    def _answer(self, request: Recorded) -> tuple[int, str, bytes]:
        if request.method != "POST" or request.path != self.path:
            return 404, "application/json", b'{"error": "not found"}'
        error = self._check(
            self.signing_key,
            request.target,
            request.body,
            request.headers.get("x-smsgw-timestamp"),
            request.headers.get("x-smsgw-signature"),
        )
        try:
            payload = json.loads(request.body)
        except ValueError:
            payload = {"unparsable": request.body.decode("utf-8", "replace")}
        event = Event(payload if isinstance(payload, dict) else {"not_an_object": payload}, error, request)
        with self._lock:
            self._events.append(event)
        if error is not None:
            return 401, "application/json", json.dumps({"error": error}).encode()
        return self.status, "application/json", b'{"ok": true}'

    def events(self, event: str | None = None) -> list[Event]:
        """Every event received (also unverified ones), or those of one type (``sms:received`` ...)."""
        with self._lock:
            return [e for e in self._events if event is None or e.payload.get("event") == event]

    def verified(self, event: str | None = None) -> list[dict[str, Any]]:
        """The payloads of the events whose signature verified."""
        return [e.payload for e in self.events(event) if e.signature_error is None]


RFC3339 = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?(Z|[+-]\d{2}:\d{2})$")
