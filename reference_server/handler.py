"""The reference server's HTTP plumbing: read a request, route it to the protocol or an admin page, send the reply.

Admin endpoints (loopback tool, no secret, never signed): ``GET /_state``, ``POST /_outgoing``, ``POST /_config``,
``GET /`` (operator HTML page), ``GET /outbox`` (a form to queue an outgoing SMS by hand) and ``POST /outbox``
(form-encoded ``to`` and ``text``, as that form or ``curl --data-urlencode`` sends them: queued for the next
``?task=send``; answers 303 to ``/`` with ``queued <uuid>`` as the body). Every other request on the Sync path
goes to ``reference_server/protocol.py``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, ClassVar
from urllib.parse import parse_qs, urlsplit

from reference_server.bodies import MAX_BODY_BYTES, flatten_form, outbox_form, parse_json_object
from reference_server.errors import BadRequestError, TooLargeError
from reference_server.pages import render_html, render_outbox_form
from reference_server.protocol import Reply, SyncProtocol, SyncRequest
from reference_server.state import ServerState

logger = logging.getLogger("reference_server")

_HTML = "text/html; charset=utf-8"


class ReferenceHTTPServer(ThreadingHTTPServer):
    """The listening socket; carries the state, its protocol and the Sync path for the request handlers."""

    daemon_threads = True
    # Restarting on the same port right after a stop must not fail with "address in use".
    allow_reuse_address = True
    # socketserver's default listen backlog of 5 resets connections when many clients connect at once.
    request_queue_size = 128

    def __init__(self, address: tuple[str, int], state: ServerState, sync_path: str) -> None:
        super().__init__(address, RequestHandler)
        self.state = state
        self.protocol = SyncProtocol(state)
        self.sync_path = sync_path


class RequestHandler(BaseHTTPRequestHandler):
    """Request handler; the server instance carries the state and the Sync path."""

    server: ReferenceHTTPServer
    protocol_version = "HTTP/1.1"
    # Headers and body go out in separate writes on a keep-alive connection; with Nagle on, the body waits for
    # the client's delayed ACK (~40 ms per request).
    disable_nagle_algorithm = True
    server_version = "smssync-reference/0.1"
    admin_paths: ClassVar[frozenset[str]] = frozenset({"/", "/_state", "/_outgoing", "/_config", "/outbox"})

    _status: int = 0
    _task: str | None = None

    def log_message(self, format: str, *args: Any) -> None:
        # The stdlib access log prints the request line, query string (the secret!) included; we log our own.
        return

    def do_GET(self) -> None:
        self._dispatch()

    def do_POST(self) -> None:
        self._dispatch()

    def do_PUT(self) -> None:
        self._dispatch()

    # --- plumbing -------------------------------------------------------------------------------------------

    def _route_path(self) -> str:
        return urlsplit(self.path).path

    def _read_body(self) -> bytes:
        """The request body (Content-Length or chunked).

        Raises:
            BadRequestError: malformed framing.
            TooLargeError: body over MAX_BODY_BYTES.
        """
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            return self._read_chunked()
        length_header = self.headers.get("Content-Length")
        if not length_header:
            return b""
        try:
            length = int(length_header)
        except ValueError as exc:
            raise BadRequestError("bad Content-Length") from exc
        if length < 0:
            raise BadRequestError("bad Content-Length")
        if length > MAX_BODY_BYTES:
            raise TooLargeError
        return self.rfile.read(length)

    def _read_chunked(self) -> bytes:
        """A chunked body. Raises BadRequestError (bad chunk size) or TooLargeError."""
        chunks: list[bytes] = []
        total = 0
        while True:
            line = self.rfile.readline(1024).strip()
            try:
                size = int(line.split(b";")[0], 16)
            except ValueError as exc:
                raise BadRequestError("bad chunk size") from exc
            if size == 0:
                # Trailers, up to the empty line.
                while self.rfile.readline(1024).strip():
                    pass
                return b"".join(chunks)
            total += size
            if total > MAX_BODY_BYTES:
                raise TooLargeError
            chunks.append(self.rfile.read(size))
            self.rfile.readline(8)

    def _send(self, reply: Reply) -> None:
        self.send_response(reply.status)
        self.send_header("Content-Type", reply.content_type)
        self.send_header("Content-Length", str(len(reply.body)))
        self.send_header("Cache-Control", "no-cache, must-revalidate")
        for key, value in reply.headers.items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(reply.body)
        self._status = reply.status

    def _dispatch(self) -> None:
        started = time.monotonic()
        self._status = 0
        self._task = None
        state = self.server.state
        state.count("requests")
        try:
            self._send(self._route())
        except TooLargeError:
            self.close_connection = True
            self._send(Reply.failure(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, "request body too large"))
        except BadRequestError as exc:
            state.count("bad_requests")
            self._send(Reply.failure(HTTPStatus.BAD_REQUEST, str(exc)))
        except Exception:
            logger.exception("request failed", extra={"method": self.command, "path": self._route_path()})
            self.close_connection = True
            self._send(Reply.failure(HTTPStatus.INTERNAL_SERVER_ERROR, "internal error"))
        finally:
            # Path only: the query string may carry the secret.
            logger.info(
                "request",
                extra={
                    "method": self.command,
                    "path": self._route_path(),
                    "task": self._task,
                    "status": self._status,
                    "duration_ms": round((time.monotonic() - started) * 1000, 1),
                    "client": self.client_address[0],
                },
            )

    # --- routing --------------------------------------------------------------------------------------------

    def _is_sync_path(self, path: str) -> bool:
        sync_path = self.server.sync_path
        return path in (sync_path, sync_path.rstrip("/") + "/") or (sync_path == "/" and path == "")

    def _route(self) -> Reply:
        path = self._route_path()
        query = flatten_form(parse_qs(urlsplit(self.path).query, keep_blank_values=True))
        # When the Sync path is "/", protocol traffic (a POST, or a GET with a task) wins over the HTML page.
        if self._is_sync_path(path) and (self.command != "GET" or "task" in query or path not in self.admin_paths):
            self._task = query.get("task")
            request = SyncRequest(
                method=self.command,
                target=self.path,  # as received (path and query string, not re-encoded)
                path=path,
                query=query,
                body=self._read_body(),
                content_type=self.headers.get("Content-Type", ""),
                timestamp=self.headers.get("X-SMSGW-Timestamp"),
                signature=self.headers.get("X-SMSGW-Signature"),
            )
            return self.server.protocol.handle(request)
        if path in self.admin_paths:
            return self._admin(path, self._read_body())
        self._read_body()
        return Reply.json(HTTPStatus.NOT_FOUND, {"error": "not found"})

    # --- admin --------------------------------------------------------------------------------------------

    def _admin(self, path: str, body: bytes) -> Reply:
        """The admin endpoint ``path`` (405 for a method it does not take).

        Raises:
            BadRequestError: a body the endpoint cannot read, or values it refuses (nothing is changed then).
        """
        state = self.server.state
        answers: dict[tuple[str, str], Callable[[], Reply]] = {
            ("/", "GET"): lambda: Reply(
                HTTPStatus.OK, render_html(state.snapshot(), self.server.sync_path).encode("utf-8"), _HTML
            ),
            ("/_state", "GET"): lambda: Reply.json(HTTPStatus.OK, state.snapshot()),
            ("/_outgoing", "POST"): lambda: self._queue_outgoing(parse_json_object(body or b"{}", "malformed JSON")),
            ("/_config", "POST"): lambda: Reply.json(
                HTTPStatus.OK, state.configure(parse_json_object(body or b"{}", "malformed JSON"))
            ),
            ("/outbox", "GET"): self._outbox_page,
            ("/outbox", "POST"): lambda: self._queue_from_form(body),
        }
        answer = answers.get((path, self.command))
        if answer is None:
            return Reply.json(HTTPStatus.METHOD_NOT_ALLOWED, {"error": "method not allowed"})
        return answer()

    def _outbox_page(self) -> Reply:
        host = self.headers.get("Host") or "{}:{}".format(*self.server.server_address[:2])
        page = render_outbox_form(self.server.sync_path, f"http://{host}").encode("utf-8")
        return Reply(HTTPStatus.OK, page, _HTML)

    def _queue_outgoing(self, data: dict[str, Any]) -> Reply:
        """``POST /_outgoing``: one message, or ``messages``; all validated before any is queued.

        Raises:
            BadRequestError: not an array of objects with string ``to`` and ``message``, or a uuid reused.
        """
        items = data.get("messages", [data])
        if not isinstance(items, list) or not all(isinstance(i, dict) for i in items):
            raise BadRequestError("'messages' must be an array of objects")
        # Validate all before queueing any, so a bad batch changes nothing.
        for item in items:
            if not isinstance(item.get("to"), str) or not isinstance(item.get("message"), str):
                raise BadRequestError("each message needs string 'to' and 'message'")
        queued = [self.server.state.queue_outgoing(i["to"], i["message"], i.get("uuid")) for i in items]
        return Reply.json(HTTPStatus.OK, {"queued": [q["uuid"] for q in queued]})

    def _queue_from_form(self, body: bytes) -> Reply:
        """``POST /outbox``: queue the form's SMS. Raises BadRequestError (see ``bodies.outbox_form``)."""
        to, text = outbox_form(body, self.headers.get("Content-Type", ""))
        record = self.server.state.queue_outgoing(to, text, source="form")
        logger.info("outgoing SMS queued from the form", extra={"uuid": record["uuid"], "chars": len(text)})
        # 303: a browser goes back to the page (where the SMS shows as pending); curl prints the body.
        return Reply(
            HTTPStatus.SEE_OTHER,
            f"queued {record['uuid']} for {to}; the gateway sends it after its next ?task=send poll\n".encode(),
            "text/plain; charset=utf-8",
            {"Location": "/"},
        )
