"""JSON control API of the simulator (routes in docs/simulator.md), on http.server's ThreadingHTTPServer."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any

from . import jsonlog
from .model import CMS_MEMORY_FULL, SimFullError

if TYPE_CHECKING:
    from .device import Simulator

MAX_BODY = 4 * 1024 * 1024


class ApiError(Exception):
    """A request the API refuses; carries the HTTP status and JSON body."""

    def __init__(self, status: int, message: str, **extra: Any) -> None:
        """Build an error answered as `{"error": message, **extra}` with `status`."""
        super().__init__(message)
        self.status = status
        self.body: dict[str, Any] = {"error": message, **extra}


class ControlServer(ThreadingHTTPServer):
    """The HTTP server, bound to one Simulator."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], simulator: Simulator) -> None:
        """Bind to `address` (port 0 = any free port). Raises OSError when the port is taken."""
        self.simulator = simulator
        super().__init__(address, ControlHandler)


class ControlHandler(BaseHTTPRequestHandler):
    """Routes one request to the Simulator."""

    server: ControlServer
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        """GET /health, /inbox, /outbox, /state, /log."""
        self._handle("GET")

    def do_POST(self) -> None:
        """POST /sms, /sms/batch, /state, /unplug, /replug, /drop, /reboot, /raw."""
        self._handle("POST")

    def log_message(self, format: str, *args: Any) -> None:
        """Route http.server's access log to the JSON logger at debug level instead of stderr."""
        jsonlog.event("http", level=logging.DEBUG, line=format % args)

    def _handle(self, method: str) -> None:
        """Dispatch, turning ApiError and bad input into JSON error answers."""
        sim = self.server.simulator
        path = self.path.split("?", 1)[0].rstrip("/") or "/"
        try:
            body = self._json_body() if method == "POST" else None
            status, result = self._route(sim, method, path, body)
        except ApiError as exc:
            status, result = exc.status, exc.body
        except SimFullError:
            status, result = HTTPStatus.INSUFFICIENT_STORAGE, {"error": "SIM full", "cms_error": CMS_MEMORY_FULL}
        except (ValueError, KeyError, TypeError) as exc:
            status, result = HTTPStatus.BAD_REQUEST, {"error": f"bad request: {exc}"}
        self._send(status, result)

    def _route(self, sim: Simulator, method: str, path: str, body: Any) -> tuple[int, Any]:
        """Perform the call; return (status, JSON-able result). Raises ApiError/ValueError/SimFullError."""
        getters: dict[str, Callable[[], Any]] = {
            "/health": lambda: _health(sim),
            "/inbox": sim.inbox,
            "/outbox": sim.outbox,
            "/state": sim.state,
            "/log": sim.at_log,
        }
        posters: dict[str, Callable[[Simulator, dict[str, Any]], Any]] = {
            "/sms": _post_sms,
            "/sms/batch": _post_batch,
            "/state": lambda s, b: s.set_state(**b),
            "/unplug": _post_unplug,
            "/replug": _post_replug,
            "/drop": _post_drop,
            "/reboot": _post_reboot,
            "/raw": _post_raw,
        }
        if method == "GET" and path in getters:
            return HTTPStatus.OK, getters[path]()
        if method == "POST" and path in posters:
            return HTTPStatus.OK, posters[path](sim, _object(body))
        raise ApiError(HTTPStatus.NOT_FOUND, f"no route {method} {path}")

    def _json_body(self) -> Any:
        """Read and parse the JSON request body (empty body = {}). Raises ApiError on bad JSON/size."""
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_BODY:
            raise ApiError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, "body too large")
        raw = self.rfile.read(length) if length else b""
        if not raw.strip():
            return {}
        try:
            return json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ApiError(HTTPStatus.BAD_REQUEST, f"invalid JSON: {exc}") from exc

    def _send(self, status: int, result: Any) -> None:
        """Write a JSON answer."""
        payload = json.dumps(result, ensure_ascii=False).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)


def _object(value: Any) -> dict[str, Any]:
    """Require a JSON object. Raises ApiError otherwise."""
    if not isinstance(value, dict):
        raise ApiError(HTTPStatus.BAD_REQUEST, "expected a JSON object")
    return value


def _text(msg: dict[str, Any], key: str, allow_empty: bool = False) -> str:
    """Require a string field. Raises ApiError when missing, mistyped or (unless allowed) empty."""
    value = msg.get(key)
    if not isinstance(value, str) or (not value and not allow_empty):
        raise ApiError(HTTPStatus.BAD_REQUEST, f'"{key}" must be a non-empty string')
    return value


def _epoch_ms(value: Any) -> int | None:
    """Optional epoch-milliseconds field. Raises ApiError when present but not a number."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ApiError(HTTPStatus.BAD_REQUEST, '"timestamp" must be epoch milliseconds')
    return int(value)


def _post_sms(sim: Simulator, msg: dict[str, Any]) -> dict[str, Any]:
    """POST /sms."""
    memory = msg.get("memory")
    if memory is not None and not isinstance(memory, str):
        raise ApiError(HTTPStatus.BAD_REQUEST, '"memory" must be "SM" or "ME"')
    indices = sim.inject_sms(
        _text(msg, "from"),
        _text(msg, "text", allow_empty=True),
        _epoch_ms(msg.get("timestamp")),
        memory.upper() if memory else None,
    )
    return {"indices": indices, "pending": sim.state()["network_pending"]}


def _post_batch(sim: Simulator, body: dict[str, Any]) -> dict[str, Any]:
    """POST /sms/batch."""
    messages = body.get("messages")
    if not isinstance(messages, list):
        raise ApiError(HTTPStatus.BAD_REQUEST, '"messages" must be a list')
    checked = [
        {
            "from": _text(m, "from"),
            "text": _text(m, "text", allow_empty=True),
            "timestamp": _epoch_ms(m.get("timestamp")),
            "memory": m.get("memory"),
        }
        for m in (_object(x) for x in messages)
    ]
    return {"indices": sim.inject_batch(checked)}


def _post_unplug(sim: Simulator, _body: dict[str, Any]) -> dict[str, Any]:
    """POST /unplug."""
    sim.unplug()
    return {"plugged": False}


def _post_replug(sim: Simulator, _body: dict[str, Any]) -> dict[str, Any]:
    """POST /replug."""
    sim.replug()
    return {"plugged": True, "link": sim.address}


def _post_drop(sim: Simulator, _body: dict[str, Any]) -> dict[str, Any]:
    """POST /drop (TCP mode): cut the client's connection; 409 in pty mode."""
    if not sim.tcp_mode:
        raise ApiError(HTTPStatus.CONFLICT, "POST /drop needs the TCP mode (--tcp); cut a pty with POST /unplug")
    return {"dropped": sim.drop_client()}


def _health(sim: Simulator) -> dict[str, Any]:
    """GET /health: plugged, and in TCP mode where to connect and whether a client is connected."""
    health: dict[str, Any] = {"ok": True, "plugged": sim.plugged}
    if sim.tcp_mode:
        health.update(tcp=sim.tcp_url, client=sim.client_connected)
    return health


def _post_reboot(sim: Simulator, _body: dict[str, Any]) -> dict[str, Any]:
    """POST /reboot."""
    sim.reboot()
    return {"rebooted": True, "boots": sim.state()["boots"]}


def _post_raw(sim: Simulator, body: dict[str, Any]) -> dict[str, Any]:
    """POST /raw: write bytes given as hex."""
    data = bytes.fromhex(_text(body, "hex", allow_empty=True))
    return {"written": len(data) if sim.write_raw(data) else 0, "plugged": sim.plugged}
