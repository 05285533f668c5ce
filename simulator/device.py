"""The simulated modem as one object: link (a pty, or a ser2net-like TCP port) + AT engine + state + control API +
status-report timers.

Tests embed it directly (`with Simulator(path) as sim: ...`); `python -m simulator` wraps it.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

from . import jsonlog
from .at_engine import AtEngine
from .control_api import ControlServer
from .identity import derive_identity
from .link import PortEvent
from .model import SIM_PIN, ModemModel, ReportRequest
from .pty_link import PtyLink
from .tcp_link import TcpLink

DEFAULT_OWN_NUMBER = "+255700000001"
DEFAULT_SMSC = "+255754000000"
DEFAULT_CAPACITY = 255  # the largest real SIMs; --capacity 20 for a small one

# What a modem prints while it boots (POST /reboot): Huawei-style ^BOOT, the SIM state once it is read.
BOOT_LINES = ("RDY", "^BOOT:20952483,0,0,0,72", "+CFUN: 1")


class Simulator:
    """A GSM modem in PDU mode on a pty published at `link` (or, with `tcp`, on a raw TCP port as ser2net serves
    one), with a JSON control API on 127.0.0.1.

    All public methods are thread-safe. Methods mirror the control API (docs/simulator.md).
    """

    def __init__(
        self,
        link: Path | str | None,
        control_port: int = 0,
        *,
        own_number: str = DEFAULT_OWN_NUMBER,
        capacity: int = DEFAULT_CAPACITY,
        smsc: str = DEFAULT_SMSC,
        control_host: str = "127.0.0.1",
        me_capacity: int | None = None,
        pin: str | None = None,
        imei: str | None = None,
        iccid: str | None = None,
        imsi: str | None = None,
        tcp: tuple[str, int] | None = None,
    ) -> None:
        """Configure (not start) a simulator; `control_port=0` picks a free port at start(). IMEI, ICCID and
        IMSI default to values derived from the link path (stable per link); `pin` locks the SIM. With `tcp`
        (host, port; `link` None) the modem is served on that TCP port instead of a pty (port 0: a free one).

        Raises ValueError for a capacity outside 1..255, a malformed PIN / identity, or not exactly one of `link`
        and `tcp`.
        """
        if (link is None) == (tcp is None):
            raise ValueError("give exactly one of a link path and a TCP address")
        self._link = None if link is None else Path(link)
        self._tcp = tcp
        self.model = ModemModel(own_number=own_number, capacity=capacity, smsc=smsc, me_capacity=me_capacity)
        derived = derive_identity(
            str(self._link.absolute()) if self._link is not None else f"tcp://{tcp[0]}:{tcp[1]}" if tcp else ""
        )
        self.model.apply_behaviour(
            {
                "imei": imei or derived.imei,
                "iccid": iccid or derived.iccid,
                "imsi": imsi or derived.imsi,
                **({"pin": pin} if pin is not None else {}),
            }
        )
        self._control_host = control_host
        self._control_port = control_port
        self._server: ControlServer | None = None
        self._server_thread: threading.Thread | None = None
        self._plug_lock = threading.Lock()  # serialises plug/unplug; never held while writing
        self._pty: PtyLink | TcpLink | None = None
        self._timers: set[threading.Timer] = set()
        self._timers_lock = threading.Lock()
        self._stopped = threading.Event()

    # --- lifecycle ----------------------------------------------------------------------------------------------

    def start(self) -> None:
        """Plug the modem in (create the pty and symlink) and start the control API.

        Raises OSError when the pty, symlink or port cannot be set up.
        """
        self._stopped.clear()
        self._server = ControlServer((self._control_host, self._control_port), self)
        self._server_thread = threading.Thread(
            target=self._server.serve_forever, name="sim-control", kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._server_thread.start()
        try:
            self.replug()
        except OSError:
            self.stop()
            raise
        jsonlog.event(
            "started",
            link=self.address,
            control_url=self.control_url,
            own_number=self.model.own_number,
            capacity=self.model.capacity,
            imei=self.model.behaviour.imei,
            pin_required=self.model.sim_status == SIM_PIN,
        )

    def stop(self) -> None:
        """Unplug, cancel pending status reports and stop the control API. Idempotent."""
        self._stopped.set()
        with self._timers_lock:
            for timer in self._timers:
                timer.cancel()
            self._timers.clear()
        self.unplug()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._server_thread is not None:
            self._server_thread.join(timeout=5)
            self._server_thread = None
        jsonlog.event("stopped", link=self.address)

    def __enter__(self) -> Simulator:
        """Start and return the simulator."""
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        """Stop the simulator."""
        self.stop()

    @property
    def control_url(self) -> str:
        """Base URL of the control API, e.g. http://127.0.0.1:8801 (only valid after start())."""
        if self._server is None:
            raise RuntimeError("simulator not started")
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    @property
    def link(self) -> Path:
        """The symlink to the pty (the port a client opens). Raises RuntimeError in TCP mode."""
        if self._link is None:
            raise RuntimeError("a simulator in TCP mode has no link path (see tcp_url)")
        return self._link

    @property
    def tcp_mode(self) -> bool:
        """True when the modem is served on a TCP port (``--tcp``), not a pty."""
        return self._tcp is not None

    @property
    def tcp_url(self) -> str:
        """``socket://host:port`` a client connects to (TCP mode; the bound port once started). Raises
        RuntimeError in pty mode."""
        if self._tcp is None:
            raise RuntimeError("a simulator in pty mode has no TCP address (see link)")
        pty = self._pty
        return pty.device if isinstance(pty, TcpLink) else f"socket://{self._tcp[0]}:{self._tcp[1]}"

    @property
    def address(self) -> str:
        """Where a client reaches the modem: the link path, or ``socket://host:port`` in TCP mode."""
        return self.tcp_url if self._tcp is not None else str(self.link)

    @property
    def client_connected(self) -> bool:
        """TCP mode: True while a client is connected (always False in pty mode)."""
        pty = self._pty
        return isinstance(pty, TcpLink) and pty.connected

    def drop_client(self) -> bool:
        """TCP mode: cut the client's connection (the port keeps listening; the client may connect again).
        False when no client was connected. Raises RuntimeError in pty mode (use unplug)."""
        pty = self._pty
        if self._tcp is None:
            raise RuntimeError("drop is for a simulator in TCP mode; a pty is cut with unplug")
        return isinstance(pty, TcpLink) and pty.drop_client()

    @property
    def plugged(self) -> bool:
        """True while the pty exists."""
        pty = self._pty
        return pty is not None and pty.is_open

    def unplug(self) -> None:
        """Close the pty (the client's reads fail with EIO) and remove the symlink; in TCP mode close the client's
        connection and stop listening (connections are refused). Idempotent."""
        with self._plug_lock:
            pty, self._pty = self._pty, None
            if pty is not None:
                pty.close()

    def replug(self) -> None:
        """Create a fresh pty at the same link path (TCP mode: listen again on the same port), as if the modem were
        re-enumerated: SIM contents, outbox and counters survive, AT settings are reset. A plugged modem is
        unplugged first.

        Raises OSError when the pty or symlink cannot be created, or the TCP port cannot be bound.
        """
        with self._plug_lock:
            if self._pty is not None:
                self._pty.close()
                self._pty = None
            self.model.reset_session()
            with self.model.lock:
                self.model.behaviour.hang = False  # a re-enumerated modem is a fresh one
            pty: PtyLink | TcpLink
            engine_holder: list[AtEngine] = []

            def on_data(chunk: bytes) -> None:
                engine = engine_holder[0]
                with self.model.lock:
                    hung = self.model.behaviour.hang
                    if hung:
                        self.model.hang_discarded_bytes += len(chunk)
                if hung:
                    engine.reset_input()  # a hung modem ignores input, and forgets what it had half-read
                else:
                    engine.feed(chunk)

            def on_port_event(event: PortEvent) -> None:
                with self.model.lock:
                    ends_hang = event == "open" and self.model.behaviour.hang
                    if ends_hang:
                        self.model.behaviour.hang = False
                jsonlog.event("port_" + ("opened" if event == "open" else "closed"), level=logging.DEBUG)
                if self._tcp is not None and event == "open":
                    engine_holder[0].reset_input()  # a new connection starts a clean line, not the old client's
                if ends_hang:
                    engine_holder[0].reset_input()
                    jsonlog.event("hang_ended", reason="port reopened")

            def gated_write(data: bytes) -> bool:
                with self.model.lock:
                    hung = self.model.behaviour.hang
                return False if hung else pty.write(data)  # a hung modem says nothing, not even URCs

            if self._tcp is not None:
                host, port = self._tcp
                pty = TcpLink(host, port, on_data, on_port_event)
            else:
                pty = PtyLink(self.link, on_data, on_port_event)
            engine = AtEngine(self.model, gated_write, pty.closing, self._schedule_report)
            engine_holder.append(engine)
            pty.open()
            if isinstance(pty, TcpLink):
                self._tcp = (pty.host, pty.port)  # port 0 was bound to a free port: a replug listens on it again
            self._pty = pty

    # --- I/O towards the client ---------------------------------------------------------------------------------

    def reboot(self) -> None:
        """The modem restarts on its own (POST /reboot): AT settings back to power-on defaults (echo on, text
        mode, no +CNMI, +CMEE 0), a pending command or `> ` prompt is lost, the hang ends, a PIN is asked again;
        the boot lines (RDY, ^BOOT, +CFUN: 1, +CPIN: ...) are written. Stored SMS and counters stay."""
        with self.model.lock:
            self.model.reboot()
            boot = [*BOOT_LINES, f"+CPIN: {self.model.sim_status}"]
        jsonlog.event("rebooted", boots=self.model.boots, sim_status=self.model.sim_status)
        self.write_raw("".join(f"\r\n{line}\r\n" for line in boot).encode())

    def write_raw(self, data: bytes) -> bool:
        """Write bytes to the client as if the modem sent them (URC bursts, garbage). False when unplugged or
        while the modem hangs."""
        pty = self._pty
        with self.model.lock:
            hung = self.model.behaviour.hang
        return pty.write(data) if pty is not None and not hung else False

    def _schedule_report(self, req: ReportRequest) -> None:
        """Produce the status report for `req` after its delay, on a timer thread."""
        if self._stopped.is_set():
            return

        def fire() -> None:
            with self._timers_lock:
                self._timers.discard(timer)
            if not self._stopped.is_set():
                self.write_raw(self.model.status_report(req))

        timer = threading.Timer(req.delay_s, fire)
        timer.daemon = True
        with self._timers_lock:
            self._timers.add(timer)
        timer.start()

    # --- API mirrored by the control server ---------------------------------------------------------------------

    def inject_sms(
        self, sender: str, text: str, timestamp_ms: int | None = None, memory: str | None = None
    ) -> list[int]:
        """Deliver an SMS from the network: store its part(s) in `memory` (default SM) and raise one +CMTI per
        part (each in its own write). Returns the indices ([] while it waits in the network: SIM locked or
        `storage` full).

        Raises SimFullError when the parts do not fit, PduError (ValueError) for an unusable sender,
        ValueError for an unknown memory.
        """
        indices, urcs = self.model.inject([(sender, text, timestamp_ms, memory)])
        for urc in urcs:
            self.write_raw(urc)
        return indices[0]

    def inject_batch(self, messages: Iterable[Mapping[str, Any]]) -> list[list[int]]:
        """Deliver several SMS (`{"from", "text", "timestamp"?}` each) and write all their URCs in ONE write.

        Raises SimFullError (nothing stored) when they do not all fit, KeyError/ValueError on bad input.
        """
        batch = [
            (str(m["from"]), str(m["text"]), _timestamp(m.get("timestamp")), _memory(m.get("memory"))) for m in messages
        ]
        indices, urcs = self.model.inject(batch)
        self.write_raw(b"".join(urcs))
        return indices

    def inbox(self) -> list[dict[str, Any]]:
        """Received SMS still on the SIM: `{"index", "from", "text", "timestamp", "part", "read"}`."""
        return self.model.inbox()

    def outbox(self) -> list[dict[str, Any]]:
        """SMS the client sent: `{"to", "text", "reference", "references", "at", "parts"}`, parts joined."""
        return self.model.outbox_copy()

    def state(self) -> dict[str, Any]:
        """The full state document (GET /state)."""
        return self.model.state()

    def set_state(self, **changes: Any) -> dict[str, Any]:
        """Change behaviour knobs (POST /state); returns the full state.

        Raises ValueError for an unknown key or invalid value (nothing is changed then).
        """
        pty = self._pty
        if changes.get("hang") is True and pty is not None:
            # Only a reopen AFTER the hang began may end it, not the client's own open a moment ago.
            with pty.past_port_events_dropped():
                urcs = self.model.apply_behaviour(changes)
        else:
            urcs = self.model.apply_behaviour(changes)
        # Never log a PIN, even the simulator's.
        logged: dict[str, Any] = {k: ("***" if k == "pin" and v else v) for k, v in changes.items()}
        jsonlog.event("state_changed", **logged)
        if urcs:
            self.write_raw(b"".join(urcs))
        return self.model.state()

    def at_log(self) -> list[str]:
        """AT command lines received so far, in order."""
        return self.model.log_copy()


def _memory(value: Any) -> str | None:
    """Validate an optional storage memory name. Raises ValueError when it is not a string."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise ValueError('memory must be "SM" or "ME"')
    return value.upper()


def _timestamp(value: Any) -> int | None:
    """Validate an optional epoch-ms timestamp. Raises ValueError when it is not a number."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError("timestamp must be epoch milliseconds")
    return int(value)
