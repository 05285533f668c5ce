"""The AT layer of python-gsmmodem-new 0.13.0, with its bugs fixed in one subclass.

``FixedGsmModem`` keeps the library's connect dialogue and PDU decoder but owns the serial read loop, the
command/response matching and the error parsing, because that is where the library loses data:

* URCs (+CMTI, +CDSI, +CDS, +CMT) are routed to the notification sink even while a command waits for its
  reply (the library appended them to the reply), and every URC line of a burst is handled on its own (the
  library handed the burst over as one notification and acted on the first line only).
* bytes from the modem are decoded with ``errors="replace"``: one non-UTF-8 byte no longer kills the read
  thread. If the thread dies anyway (unplug, EIO), ``alive`` turns False, the command in flight fails at
  once with :class:`LinkDown` instead of waiting out its timeout, and the link-down callback fires once.
* ``+CME ERROR: 515``/``14`` is retried with a back-off (tenacity) local to that command; the library raised a
  global write wait that slowed every later command for good.
* a failed ``connect()`` closes the port and stops the read thread.
* ``+CMGS:`` arriving after its send timed out is recognised as late (logged, not fed to the next command).
* the serial port is opened with ``exclusive=True`` (flock), so two workers cannot share one modem.
* a port given as a pyserial URL (``socket://host:port``, a ser2net raw TCP port, or ``rfc2217://host:port``) is
  opened with ``serial.serial_for_url`` (:class:`_UrlSerialComms`), the one place where the library's serial
  layer opens its port; everything above it (read loop, watchdog, identity) is the same as for a local device.

Multi-step sequences (CPMS + CMGR, AT+CMGS + PDU) must hold :attr:`FixedGsmModem.command_lock`
(a re-entrant lock that every single command also takes) so no other thread's command lands in between.

The library is imported with its DeprecationWarnings/SyntaxWarnings (invalid escapes, ``is not "ON"``)
silenced, so that ``python -W error`` can import this module.
"""

from __future__ import annotations

import contextlib
import logging
import re
import threading
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final

from tenacity import RetryCallState, Retrying, retry_if_exception, stop_after_attempt, wait_incrementing

with warnings.catch_warnings():
    # The library's sources contain invalid escape sequences and `is not "literal"`; compiling them emits
    # DeprecationWarning/SyntaxWarning, which `-W error` would turn into an ImportError.
    warnings.simplefilter("ignore", DeprecationWarning)
    warnings.simplefilter("ignore", SyntaxWarning)
    from gsmmodem import pdu as gsm_pdu
    from gsmmodem.exceptions import CmeError, CmsError, CommandError, TimeoutException
    from gsmmodem.modem import GsmModem
    from gsmmodem.serial_comms import SerialComms

import serial

from modem_worker.sms_text import GSM7_BASIC, GSM7_ESCAPE, GSM7_EXTENSION

logger = logging.getLogger(__name__)

# Bug: the library's GSM 7-bit tables are wrong in two places: 0x5F is "`" instead of "§", and the extension
# table maps form feed as {"ÿ": 10} (an int), so a received "§" became "`" and a form feed vanished. Its decoder
# reads these module globals on every call, so replacing them with the 23.038 tables of sms_text fixes every
# decode path at once. (0x1B keeps the library's ESC character, which its encoder looks up.)
gsm_pdu.GSM7_BASIC = GSM7_BASIC[:GSM7_ESCAPE] + "\x1b" + GSM7_BASIC[GSM7_ESCAPE + 1 :]
gsm_pdu.GSM7_EXTENDED = {char: chr(code) for char, code in GSM7_EXTENSION.items()}

__all__ = [
    "CTRL_Z",
    "CmeError",
    "CmsError",
    "CommandError",
    "FixedGsmModem",
    "LinkDown",
    "TimeoutException",
    "gsm_pdu",  # the library's PDU module, its GSM-7 tables corrected above
]

CTRL_Z: Final[str] = "\x1a"
ESC: Final[str] = "\x1b"

# Final result codes that end a command's response. Stricter than the library's regex, which matched any
# line merely *starting* with OK.
_FINAL_RE: Final[re.Pattern[str]] = re.compile(r"^(OK|ERROR|NO CARRIER|COMMAND NOT SUPPORT|\+CM[ES] ERROR:.*)$")
_CM_ERROR_RE: Final[re.Pattern[str]] = re.compile(r"^\+(CM[ES]) ERROR: ?(\d+)$")
# Unsolicited result codes we care about. None of them is ever the answer to a command we send.
# Huawei-style status lines are URCs too (never the answer to a command); other "^" lines may be (^ICCID:).
_URC_PREFIXES: Final[tuple[str, ...]] = (
    "+CMTI:",
    "+CDSI:",
    "+CMT:",
    "+CDS:",
    "RING",
    "+CRING:",
    "+CLIP:",
    "^RSSI:",
    "^BOOT:",
    "^MODE:",
    "^HCSQ:",
    "^SRVST:",
    "^SIMST:",
    "^DSFLOWRPT:",
    "^SYSSTART",
)
# Unsolicited lines that can also answer a command (+CREG: answers AT+CREG?), so they stay in a pending response:
# a PDU listing skips them instead of taking one for the PDU (the SMS would be parked as undecodable and deleted).
_NOISE_PREFIXES: Final[tuple[str, ...]] = (*_URC_PREFIXES, "^", "+CREG:", "+CGREG:", "+CEREG:", "+CUSD:")
# URCs whose PDU follows on the next line.
_TWO_LINE_URCS: Final[tuple[str, ...]] = ("+CMT:", "+CDS:")
_BUSY_CME_CODES: Final[frozenset[int]] = frozenset({14, 515})  # SIM busy / "please wait, init in progress"
_BUSY_RETRIES: Final[int] = 3
# The pyserial URL schemes SMSGW_MODEM_PORT accepts (a network modem); anything else is a local device path.
URL_SCHEMES: Final[tuple[str, ...]] = ("socket://", "rfc2217://")


def is_port_url(port: str) -> bool:
    """True when ``port`` names a network modem (``socket://`` or ``rfc2217://``), not a local device."""
    return port.lower().startswith(URL_SCHEMES)


class LinkDown(Exception):
    """The serial link is gone (unplugged, EIO, read thread dead, or closed)."""


@dataclass
class _Pending:
    """The command currently waiting for its response (filled by the read thread)."""

    prompt: bytes | None
    is_pdu: bool
    lines: list[str] = field(default_factory=list)
    done: threading.Event = field(default_factory=threading.Event)
    error: BaseException | None = None


class _UrlSerialComms(SerialComms):  # type: ignore[misc]  # the library is untyped
    """The library's serial layer, opening a URL port through ``serial.serial_for_url``.

    ``SerialComms.connect`` builds ``serial.Serial(port=...)``, which only knows device paths. Placed between
    ``GsmModem`` and ``SerialComms`` in :class:`FixedGsmModem`'s MRO, this ``connect`` is the one the library's own
    ``GsmModem.connect`` reaches through ``super()``, so URL and device ports share every line above it.
    """

    rxThread: threading.Thread | None = None  # noqa: N815 - the library's attribute

    def connect(self) -> None:
        """Open the port (a device path, or a ``socket://``/``rfc2217://`` URL) and start the read thread.

        Raises serial.SerialException (device missing or busy; for a URL: connection refused, unreachable or
        timed out), ValueError (a malformed URL).
        """
        port: str = self.port
        if not is_port_url(port):
            SerialComms.connect(self)
            return
        # dsrdtr/rtscts and exclusive are a local line's settings: a TCP port has no such lines or lock (ser2net
        # itself holds the device and serves one client at a time).
        self.serial = serial.serial_for_url(port, baudrate=self.baudrate, timeout=self.timeout)
        self.alive = True
        self.rxThread = threading.Thread(target=self._readLoop, daemon=True)
        self.rxThread.start()


class FixedGsmModem(GsmModem, _UrlSerialComms):  # type: ignore[misc]  # the library is untyped
    """``gsmmodem.modem.GsmModem`` with a correct read loop, URC routing and command locking.

    ``on_urc`` receives a list of lines per URC (one line, or header + PDU for +CMT/+CDS) on the read
    thread; it must not block or issue commands. ``on_link_down`` is called once, on the read thread or the
    writing thread, when the link dies (not on :meth:`close`).
    """

    # Serial read timeout: bounds how long close() waits for the read thread when cancel_read() is missing.
    timeout = 0.2

    def __init__(
        self,
        port: str,
        *,
        baudrate: int,
        on_urc: Callable[[list[str]], None],
        on_link_down: Callable[[BaseException], None],
        request_delivery: bool,
        command_timeout_s: float,
    ) -> None:
        # mt=1: new SMS are stored on the SIM and announced with +CMTI (never delivered directly with +CMT,
        # which would leave nothing on the SIM to retry from); ds=2: status reports stored, +CDSI.
        super().__init__(
            port,
            baudrate,
            requestDelivery=request_delivery,
            AT_CNMI="2,1,0,2,0",
            exclusive=True,
        )
        self._on_urc = on_urc
        self._on_link_down = on_link_down
        self._command_timeout_s = command_timeout_s
        self._state_lock = threading.Lock()
        self._pending: _Pending | None = None
        self._urc_header: str | None = None
        self._swallow_ok = False
        self._link_error: BaseException | None = None
        self._closing = False
        self._memory: str | None = None
        self.rxThread: threading.Thread | None = None

    # ------------------------------------------------------------------ lifecycle

    @property
    def command_lock(self) -> threading.RLock:
        """Re-entrant lock serialising commands; hold it across every multi-step sequence."""
        lock: threading.RLock = self._txLock
        return lock

    @property
    def write_wait_s(self) -> float:
        """The library's global wait before every write: stays 0 here (a busy answer backs off per command)."""
        wait: float = self._writeWait
        return wait

    def connect(self, pin: str | None = None, waitingForModemToStartInSeconds: float = 0) -> None:  # noqa: N803
        """Open the port (exclusively), start the read thread and run the library's init dialogue.

        On any failure the port is closed and the read thread stopped before the exception propagates
        (the library left both behind). Raises serial.SerialException, TimeoutException, CommandError,
        LinkDown.
        """
        try:
            GsmModem.connect(self, pin, waitingForModemToStartInSeconds)  # reaches _UrlSerialComms.connect
            self._memory = None  # the init dialogue ran AT+CPMS itself
        except BaseException:
            self.close()
            raise

    # ------------------------------------------------------------------ supervisor hooks (SIM PIN, identity)

    # Set by the adapter before connect(): called by the init dialogue instead of the library's PIN logic (which
    # sent whatever PIN it had, even to a SIM asking for its PUK, and on every reconnect). Raises to stop connect.
    unlock_sim: Callable[[], None] | None = None

    def _unlockSim(self, pin: str | None) -> None:  # noqa: N802 - library hook name
        """Library hook of the init dialogue: delegate to :attr:`unlock_sim` (the library's own logic without it)."""
        if self.unlock_sim is not None:
            self.unlock_sim()
            return
        super()._unlockSim(pin)

    def open_port(self) -> None:
        """Open the port (exclusively) and start the read thread, without the init dialogue: for reading the
        modem's identity without changing any of its settings. Raises serial.SerialException."""
        _UrlSerialComms.connect(self)

    def close(self) -> None:
        """Stop the read thread and close the port; idempotent, never fires the link-down callback."""
        self._closing = True
        self.alive = False
        port = getattr(self, "serial", None)
        if port is not None:
            with contextlib.suppress(Exception):  # best effort: the port may already be gone
                port.cancel_read()
        thread = self.rxThread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=5)
        if port is not None:
            with contextlib.suppress(Exception):  # closing a dead port can fail; nothing left to do
                port.close()
        self._fail_pending(LinkDown("port closed"))

    # ------------------------------------------------------------------ read side

    def _readLoop(self) -> None:  # noqa: N802 - library hook name
        """Read thread: split the byte stream into lines (or the ``> `` prompt) and dispatch them."""
        threading.current_thread().name = f"modem-rx {self.port}"
        buf = bytearray()
        try:
            while self.alive:
                chunk: bytes = self.serial.read(self.serial.in_waiting or 1)
                if not chunk:
                    continue
                buf.extend(chunk)
                while True:
                    pos = buf.find(b"\r\n")
                    if pos < 0:
                        break
                    raw = bytes(buf[:pos])
                    del buf[: pos + 2]
                    if raw:
                        # errors="replace": one stray byte must not kill the thread (library bug).
                        self._on_line(raw.decode("utf-8", "replace"))
                if buf:
                    self._check_prompt(buf)
        except Exception as exc:
            if self.alive and not self._closing:
                self._link_down(exc)
            return
        except BaseException as exc:  # pragma: no cover - interpreter shutdown
            self._link_down(exc)
            raise

    def _check_prompt(self, buf: bytearray) -> None:
        """Complete a pending AT+CMGS when its ``> `` prompt (not CR LF terminated) has arrived."""
        with self._state_lock:
            pending = self._pending
            if pending is None or pending.prompt is None or pending.done.is_set():
                return
            if buf.endswith(pending.prompt):
                pending.lines.append(bytes(buf).decode("utf-8", "replace"))
                buf.clear()
                pending.done.set()

    def _on_line(self, line: str) -> None:
        """Route one line: to the pending command's response, or to the URC sink."""
        if self._urc_header is not None:
            header, self._urc_header = self._urc_header, None
            self._emit_urc([header, line])
            return
        if line.startswith(_URC_PREFIXES):
            # A URC is never part of a response, whether or not a command is pending (library bug 1).
            if line.startswith(_TWO_LINE_URCS):
                self._urc_header = line
            else:
                self._emit_urc([line])
            return
        with self._state_lock:
            pending = self._pending
            active = pending is not None and not pending.done.is_set()
            if line.startswith("+CMGS:") and not (active and pending is not None and pending.is_pdu):
                # The answer to a send that already timed out (SendOutcomeUnknown was raised). Feeding it
                # and its OK to the next command would shift every later response by one.
                self._swallow_ok = True
                late = line
            else:
                late = None
                if self._swallow_ok and line == "OK":
                    self._swallow_ok = False
                    return
                self._swallow_ok = False
                if active and pending is not None:
                    pending.lines.append(line)
                    # The prompt ends up CR LF terminated when a URC directly follows it in the stream.
                    prompt_seen = pending.prompt is not None and line.endswith(pending.prompt.decode())
                    if prompt_seen or _FINAL_RE.match(line):
                        pending.done.set()
                    return
        if late is not None:
            logger.warning("late %s for a send that already timed out", late)
            return
        # Stray final codes / unknown unsolicited lines: let the sink log them.
        self._emit_urc([line])

    def _emit_urc(self, lines: list[str]) -> None:
        """Hand one URC to the sink; a failing sink must not kill the read thread."""
        try:
            self._on_urc(lines)
        except Exception:
            logger.exception("URC handler failed for %s", lines[0][:20])

    def _handleModemNotification(self, lines: list[str]) -> None:  # noqa: N802 - library hook name
        """Library hook (unused by our read loop): never spawn a thread per notification."""
        self._emit_urc(list(lines))

    def _fail_pending(self, exc: BaseException) -> None:
        """Wake the command in flight (if any) so it raises ``exc`` instead of waiting out its timeout."""
        with self._state_lock:
            pending = self._pending
            if pending is not None and not pending.done.is_set():
                pending.error = exc
                pending.done.set()

    def _link_down(self, exc: BaseException) -> None:
        """Mark the link dead, wake the command in flight, close the port, fire the callback once."""
        with self._state_lock:
            if self._link_error is not None or self._closing:
                return
            self._link_error = exc
            self.alive = False
        logger.error("modem link on %s is down: %s", self.port, exc)
        self._fail_pending(LinkDown(str(exc)))
        with contextlib.suppress(Exception):  # the device is gone; closing is best effort
            self.serial.close()
        try:
            self._on_link_down(exc)
        except Exception:
            logger.exception("link-down callback failed")

    # ------------------------------------------------------------------ write side

    def write(  # noqa: PLR0917 - the library's signature, called positionally by its own code
        self,
        data: str,
        waitForResponse: bool = True,  # noqa: N803
        timeout: float | None = None,
        parseError: bool = True,  # noqa: N803
        writeTerm: str = "\r",  # noqa: N803
        expectedResponseTermSeq: str | None = None,  # noqa: N803
    ) -> list[str] | None:
        """Send one command (library signature) and return its response lines.

        Raises LinkDown (at once, also when the link dies while waiting), TimeoutException (no final
        result code within ``timeout``, default ``command_timeout_s``), CmeError/CmsError/CommandError
        (if ``parseError``). ``+CME ERROR: 515``/``14`` is retried up to 3 times with a short back-off
        (:data:`_BUSY_BACKOFF`), except for a PDU body (re-sending that without a new prompt would be garbage).
        """
        wait_s = self._command_timeout_s if timeout is None else float(timeout)
        is_pdu = writeTerm == CTRL_Z

        def exchange() -> list[str] | None:
            lines = self.exchange(data + writeTerm, waitForResponse, wait_s, expectedResponseTermSeq, is_pdu)
            return _checked(data, lines, parseError)

        try:
            return exchange()  # the common case, without the retry machinery's cost on every command
        except CmeError as exc:
            if is_pdu or exc.code not in _BUSY_CME_CODES:
                raise
            busy: CmeError | None = exc

        def attempt() -> list[str] | None:
            # The first attempt is the answer already received: the back-off starts from it.
            nonlocal busy
            answer, busy = busy, None
            if answer is not None:
                raise answer
            return exchange()

        # Back off for this command only; the library raised a write wait that never came back down after the
        # first 515 (every later command slept 0.1 s).
        return _BUSY_BACKOFF(attempt)

    def exchange(self, payload: str, wait: bool, timeout: float, prompt: str | None, is_pdu: bool) -> list[str] | None:
        """Write ``payload`` and wait for the final result code (or ``prompt``); return the raw lines.

        Raises LinkDown, TimeoutException. No error parsing here (see :meth:`write`).
        """
        with self._txLock:
            if not self.alive or self._link_error is not None:
                raise LinkDown(f"modem link on {self.port} is down")
            pending = _Pending(prompt=prompt.encode() if prompt else None, is_pdu=is_pdu)
            if wait:
                with self._state_lock:
                    self._pending = pending
            try:
                # Never the PIN (AT+CPIN="1234"): only the command name goes to the log.
                shown = "AT+CPIN=***" if payload.upper().startswith("AT+CPIN=") else payload[:16].strip()
                logger.debug("write: %s", shown)
                try:
                    self.serial.write(payload.encode("ascii", "replace"))
                except Exception as exc:
                    self._link_down(exc)
                    raise LinkDown(str(exc)) from exc
                if not wait:
                    return None
                if not pending.done.wait(timeout):
                    raise TimeoutException(list(pending.lines) or None)
                if pending.error is not None:
                    raise LinkDown(str(pending.error)) from pending.error
                return list(pending.lines)
            finally:
                if wait:
                    with self._state_lock:
                        self._pending = None

    def abort_prompt(self) -> None:
        """Write ESC so a modem still waiting for a PDU body drops the half-started AT+CMGS."""
        with contextlib.suppress(LinkDown):
            self.exchange(ESC, False, 0, None, False)

    # ------------------------------------------------------------------ SMS storage (call under command_lock)

    def select_memory(self, memory: str) -> None:
        """Make ``memory`` ("SM", "SR", ...) the read/delete memory (AT+CPMS), skipping it if already set."""
        with self._txLock:
            if self._memory != memory:
                self.write(f'AT+CPMS="{memory}"')
                self._memory = memory

    def read_stored_pdu(self, memory: str, index: int) -> str | None:
        """Return the PDU hex stored at ``index`` of ``memory``, or None if the slot is empty.

        Raises LinkDown, TimeoutException, CommandError (other than "invalid index").
        """
        with self._txLock:
            self.select_memory(memory)
            try:
                lines = self.write(f"AT+CMGR={index}") or []
            except CmsError as exc:
                if exc.code == 321:  # invalid memory index: already read and deleted
                    return None
                raise
        for i, line in enumerate(lines):
            if line.startswith("+CMGR:"):
                return _pdu_after(lines, i)
        return None

    def list_stored_pdus(self, memory: str) -> list[tuple[int, str]]:
        """Return ``(index, pdu_hex)`` for every message in ``memory`` (AT+CMGL=4, PDU mode)."""
        with self._txLock:
            self.select_memory(memory)
            lines = self.write("AT+CMGL=4", timeout=max(self._command_timeout_s, 30.0)) or []
        out: list[tuple[int, str]] = []
        for i, line in enumerate(lines):
            if line.startswith("+CMGL:"):
                try:
                    index = int(line.split(":", 1)[1].split(",")[0])
                except ValueError:
                    logger.warning("unparsable +CMGL header %r", line[:40])
                    continue
                pdu = _pdu_after(lines, i)
                if pdu is not None:
                    out.append((index, pdu))
        return out

    def delete_stored(self, memory: str, index: int) -> None:
        """Delete the message at ``index`` of ``memory`` (AT+CMGD). Raises LinkDown, TimeoutException,
        CommandError."""
        with self._txLock:
            self.select_memory(memory)
            self.write(f"AT+CMGD={index}")


def _checked(command: str, lines: list[str] | None, parse_error: bool) -> list[str] | None:
    """The response ``lines`` of ``command``, or the error its final result code reports (when ``parse_error``).

    Raises CmeError, CmsError, CommandError."""
    if lines is None or not parse_error:
        return lines
    status = lines[-1] if lines else ""
    if "ERROR" in status:
        match = _CM_ERROR_RE.match(status)
        if match is None:
            raise CommandError(command)
        kind, code = match.group(1), int(match.group(2))
        raise CmeError(command, code) if kind == "CME" else CmsError(command, code)
    if status == "COMMAND NOT SUPPORT":
        raise CommandError(command)
    return lines


def _is_busy(exc: BaseException) -> bool:
    """True for ``+CME ERROR: 515``/``14``: the SIM or the modem is still initialising."""
    return isinstance(exc, CmeError) and exc.code in _BUSY_CME_CODES


def _log_busy(state: RetryCallState) -> None:
    """Log one busy answer before its back-off."""
    exc = state.outcome.exception() if state.outcome is not None else None
    logger.debug("modem busy (%r), retry %d", exc, state.attempt_number)


# A busy answer: 3 more tries, 0.2, 0.4 and 0.6 s apart; then the CmeError goes to the caller.
_BUSY_BACKOFF: Final[Retrying] = Retrying(
    retry=retry_if_exception(_is_busy),
    stop=stop_after_attempt(_BUSY_RETRIES + 1),
    wait=wait_incrementing(start=0.2, increment=0.2),
    before_sleep=_log_busy,
    reraise=True,
)


def _pdu_after(lines: list[str], header: int) -> str | None:
    """The PDU line following the ``+CMGR:``/``+CMGL:`` header at ``lines[header]``, skipping unsolicited noise
    lines in between; None when the response ends (or the next header comes) first."""
    for line in lines[header + 1 :]:
        if line.startswith(("+CMGL:", "+CMGR:")) or _FINAL_RE.match(line):
            return None
        if not line.startswith(_NOISE_PREFIXES):
            return line.strip()
    return None
