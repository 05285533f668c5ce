"""A flaky or sticky Sync server: an HTTP front on loopback that forwards to a reference server and misbehaves.

* flaky: each request, with probability ``error_rate``, is answered 500 without reaching the server; with
  probability ``timeout_rate`` it is held for ``hold_s`` (longer than the gateway's ``http_timeout``) and then
  dropped without reaching the server, so the gateway's read times out. Faults come before the server sees the
  request on purpose: a lost ``?task=send`` answer is a loss the protocol cannot prevent (docs/protocol.md), not
  one the suite should count against the gateway. A reply lost *after* an inbound POST reached the server is
  also played (``lost_reply_rate``): the gateway must send it again under the same message_id.
* sticky: ``stick(seconds)`` answers every request 503 until that time has passed (a server in maintenance).

The decisions come from a seeded ``random.Random``, so a run is reproducible in its schedule.
"""

from __future__ import annotations

import random
import sys
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class _QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that went away (a worker SIGKILLed mid-request) is part of the run, not an error to print."""
        if not isinstance(sys.exc_info()[1], OSError):
            super().handle_error(request, client_address)


class FlakyFront:
    """Forward ``/…`` on its own port to ``backend_base_url``, injecting failures. Thread-safe."""

    def __init__(self, backend_base_url: str, rng: random.Random, *, hold_s: float = 4.0) -> None:
        self.backend = backend_base_url
        self.hold_s = hold_s
        self.error_rate = 0.0
        self.timeout_rate = 0.0
        self.lost_reply_rate = 0.0
        self.injected: dict[str, int] = {"500": 0, "timeout": 0, "lost_reply": 0, "503": 0}
        self._rng = rng
        self._lock = threading.Lock()
        self._sticky_until = 0.0
        self._httpd = _QuietServer(("127.0.0.1", 0), _handler_for(self))

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self._httpd.server_address[1]}"

    def start(self) -> FlakyFront:
        """Serve on a daemon thread; returns self."""
        threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True).start()
        return self

    def stop(self) -> None:
        """Stop serving and release the port."""
        self._httpd.shutdown()
        self._httpd.server_close()

    def flaky(self, error_rate: float, timeout_rate: float, lost_reply_rate: float = 0.0) -> None:
        """Set the failure rates (0 = healthy)."""
        with self._lock:
            self.error_rate, self.timeout_rate, self.lost_reply_rate = error_rate, timeout_rate, lost_reply_rate

    def stick(self, seconds: float) -> None:
        """Answer 503 to everything for ``seconds`` from now."""
        with self._lock:
            self._sticky_until = time.monotonic() + seconds

    def decide(self, is_inbound_post: bool) -> str:
        """What to do with one request: ``forward``, ``503``, ``500``, ``timeout`` or ``lost_reply``."""
        with self._lock:
            if time.monotonic() < self._sticky_until:
                verdict = "503"
            else:
                roll = self._rng.random()
                if roll < self.error_rate:
                    verdict = "500"
                elif roll < self.error_rate + self.timeout_rate:
                    verdict = "timeout"
                elif is_inbound_post and roll < self.error_rate + self.timeout_rate + self.lost_reply_rate:
                    verdict = "lost_reply"
                else:
                    return "forward"
            self.injected[verdict] += 1
            return verdict

    def forward(self, method: str, path: str, headers: dict[str, str], body: bytes | None) -> tuple[int, str, bytes]:
        """Send the request on to the backend; returns (status, content type, body) of its answer."""
        request = urllib.request.Request(self.backend + path, data=body, method=method, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return response.status, response.headers.get("Content-Type", ""), response.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.headers.get("Content-Type", ""), exc.read()


def _handler_for(front: FlakyFront) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:
            pass  # the suite counts outcomes; per-request lines would drown the run's output

        def do_GET(self) -> None:
            self._handle()

        def do_POST(self) -> None:
            self._handle()

        def do_PUT(self) -> None:
            self._handle()

        def _handle(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else None
            verdict = front.decide(self.command in ("POST", "PUT") and "task=" not in self.path)
            if verdict == "timeout":
                time.sleep(front.hold_s)  # longer than the gateway's http_timeout: its read times out
                self.close_connection = True
                return
            if verdict in ("500", "503"):
                self._answer(int(verdict), "application/json", b'{"payload":{"success":false,"error":"chaos"}}')
                return
            headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "content-length")}
            status, content_type, answer = front.forward(self.command, self.path, headers, body)
            if verdict == "lost_reply":
                self.close_connection = True  # the server stored it; the gateway never hears so
                return
            self._answer(status, content_type, answer)

        def _answer(self, status: int, content_type: str, body: bytes) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type or "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    return Handler
