"""A scriptable HTTP server on loopback for protocol tests: records every request, answers via a callable."""

from __future__ import annotations

import threading
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass
class Request:
    """One request the stub received."""

    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: bytes

    @property
    def form(self) -> dict[str, str]:
        """The body parsed as application/x-www-form-urlencoded."""
        return dict(urllib.parse.parse_qsl(self.body.decode("utf-8"), keep_blank_values=True))


Responder = Callable[[Request], tuple[int, str]]


@dataclass
class HttpStub:
    """Start with ``start()``; ``respond`` decides (status, body) for each request."""

    respond: Responder
    requests: list[Request] = field(default_factory=list)
    content_type: str = "application/json; charset=utf-8"
    location: str | None = None  # sent as the Location header of 3xx answers

    def start(self) -> HttpStub:
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: object) -> None:
                pass

            def _handle(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                parts = urllib.parse.urlsplit(self.path)
                request = Request(
                    self.command,
                    parts.path,
                    dict(urllib.parse.parse_qsl(parts.query)),
                    {k.lower(): v for k, v in self.headers.items()},
                    self.rfile.read(length),
                )
                stub.requests.append(request)
                status, body = stub.respond(request)
                data = body.encode("utf-8")
                self.send_response(status)
                self.send_header("Content-Type", stub.content_type)
                if stub.location and 300 <= status < 400:
                    self.send_header("Location", stub.location)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_PUT = _handle  # noqa: N815

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}/smssync"

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
