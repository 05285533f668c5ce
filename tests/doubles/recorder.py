"""A loopback HTTP server that records every request with its raw request target, for the platform doubles."""

from __future__ import annotations

import threading
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass(frozen=True)
class Recorded:
    """One request as received: the raw target (path and query, percent-encoding untouched) and body bytes."""

    method: str
    target: str
    headers: dict[str, str]  # names lower-cased
    body: bytes
    status: int = 0  # what the double answered

    @property
    def path(self) -> str:
        """The path of the target, still percent-encoded."""
        return urllib.parse.urlsplit(self.target).path

    @property
    def query(self) -> dict[str, str]:
        """The query string, decoded (the first value of each name)."""
        return _first(urllib.parse.parse_qs(urllib.parse.urlsplit(self.target).query, keep_blank_values=True))

    @property
    def form(self) -> dict[str, str]:
        """The query and an urlencoded body merged (the body wins), as Go's ``Request.ParseForm`` does."""
        fields = self.query
        if self.method in ("POST", "PUT") and "json" not in self.headers.get("content-type", ""):
            fields.update(_first(urllib.parse.parse_qs(self.body.decode("utf-8"), keep_blank_values=True)))
        return fields


def _first(values: dict[str, list[str]]) -> dict[str, str]:
    return {name: items[0] for name, items in values.items()}


# (request) -> (status, content type, body)
Answer = Callable[[Recorded], tuple[int, str, bytes]]


class RecordingServer:
    """Serves ``answer`` on 127.0.0.1 (an ephemeral port) and keeps every request with the status it got."""

    def __init__(self, answer: Answer) -> None:
        self._answer = answer
        self._lock = threading.Lock()
        self._requests: list[Recorded] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: object) -> None:
                pass  # quiet: the tests read the recorded requests instead

            def _handle(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                request = Recorded(
                    self.command,
                    self.path,
                    {k.lower(): v for k, v in self.headers.items()},
                    self.rfile.read(length),
                )
                status, content_type, body = server._answer(request)
                server._record(Recorded(request.method, request.target, request.headers, request.body, status))
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_POST = do_PUT = _handle  # noqa: N815

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def start(self) -> RecordingServer:
        """Start serving; returns self."""
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and close the socket."""
        self._server.shutdown()
        self._server.server_close()

    @property
    def base_url(self) -> str:
        """``http://127.0.0.1:<port>``."""
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def _record(self, request: Recorded) -> None:
        with self._lock:
            self._requests.append(request)

    def requests(self) -> list[Recorded]:
        """Every request so far, in arrival order."""
        with self._lock:
            return list(self._requests)

    def wait_for(self, predicate: Callable[[list[Recorded]], bool], timeout: float, what: str) -> list[Recorded]:
        """The requests once ``predicate`` holds for them; AssertionError naming ``what`` after ``timeout`` s."""
        deadline = time.monotonic() + timeout
        while True:
            requests = self.requests()
            if predicate(requests):
                return requests
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout} s waiting for {what}; got {requests!r}")
            time.sleep(0.05)
