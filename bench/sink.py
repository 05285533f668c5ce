"""A minimal Sync URL for the benchmark: answers success at once and records arrival time + message text.

    python -m bench.sink --port PORT

* ``POST <any path>`` with the SMSsync form (``from``, ``message``, ...): records ``[time.time(), message]`` and
  answers ``{"payload": {"success": true, "error": null}}``. A message starting with ``BENCH R <seq>`` is
  answered with one reply (``task: send``) to its sender, text ``REPLY <seq>``.
* ``GET /_count``: ``{"count": n}``; ``GET /_records``: every record; ``POST /_reset``: forget them.

Runs as its own process so that it does not share a GIL with the injector.
"""

from __future__ import annotations

import argparse
import json
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

OK_BODY = json.dumps({"payload": {"success": True, "error": None}}).encode()


class SinkServer(ThreadingHTTPServer):
    """Keeps the records of one run."""

    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128

    def __init__(self, address: tuple[str, int]) -> None:
        super().__init__(address, SinkHandler)
        self.lock = threading.Lock()
        self.records: list[tuple[float, str]] = []


class SinkHandler(BaseHTTPRequestHandler):
    """Answers at once; HTTP/1.1 keep-alive like a real server behind a proxy."""

    server: SinkServer
    protocol_version = "HTTP/1.1"
    # http.server writes the headers and the body in two send() calls: with Nagle on, the body waits for the
    # client's delayed ACK (~40 ms per request on Linux). A real server answers in one segment.
    disable_nagle_algorithm = True

    def log_message(self, format: str, *args: Any) -> None:
        """No access log (it would cost more than the answer)."""

    def _send(self, body: bytes) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        """``/_count``, ``/_records``."""
        with self.server.lock:
            if self.path.startswith("/_count"):
                body = json.dumps({"count": len(self.server.records)}).encode()
            else:
                body = json.dumps(self.server.records).encode()
        self._send(body)

    def do_POST(self) -> None:
        """A Sync POST (record + answer) or ``/_reset``."""
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        arrived = time.time()
        if self.path.startswith("/_reset"):
            with self.server.lock:
                self.server.records.clear()
            self._send(b"{}")
            return
        form = urllib.parse.parse_qs(raw.decode("utf-8", "replace"))
        message = form.get("message", [""])[0]
        with self.server.lock:
            self.server.records.append((arrived, message))
        if message.startswith("BENCH R "):
            seq = message.split()[2]
            body = json.dumps(
                {
                    "payload": {
                        "success": True,
                        "error": None,
                        "task": "send",
                        "messages": [
                            {"to": form.get("from", [""])[0], "message": f"REPLY {seq}", "uuid": f"bench-r-{seq}"}
                        ],
                    }
                }
            ).encode()
            self._send(body)
            return
        self._send(OK_BODY)


def main(argv: list[str] | None = None) -> int:
    """Serve until killed."""
    parser = argparse.ArgumentParser(prog="python -m bench.sink")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args(argv)
    server = SinkServer(("127.0.0.1", args.port))
    server.serve_forever(poll_interval=0.5)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
