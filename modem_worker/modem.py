"""Typed adapter around python-gsmmodem-new: the only place that talks AT to a modem.

Delivery contract ("an SMS leaves the SIM only after the broker confirmed it"):

* New SMS are stored on the SIM (CNMI mt=1) and announced with +CMTI. A single worker thread reads the
  message, hands it to ``on_message`` and deletes it from the SIM only after ``on_message`` returned
  normally. If ``on_message`` raises, the message stays on the SIM and :meth:`Modem.sweep_stored` retries it.
* Concatenated parts stay on the SIM, buffered in memory by (sender, reference, total), until every part
  is there; then ``on_message`` gets the joined text once and all parts are deleted. A message still
  incomplete after ``multipart_timeout_s`` is delivered with what arrived (``complete=False``, missing parts
  as "[…]") so nothing is held forever; a straggler arriving later comes out as its own fragment.
* A part whose SIM deletion failed after delivery is remembered, and deleted without a second delivery
  when it is seen again.
* Status reports (+CDSI, SR memory) go to ``on_status_report`` and are deleted after it returns.
* A stored PDU that cannot be decoded goes to ``on_unreadable`` (raw hex and reason) and is deleted only after
  it returned, so the raw copy is kept somewhere before it leaves the SIM. Without that callback, or while it
  raises, it stays on the SIM and is logged once (not on every sweep).
* A concatenated part whose sequence number is 0 or above its part count cannot be placed in its message: it
  is delivered on its own as a single SMS (``parts=1``) rather than buffered under an impossible number.
* :meth:`Modem.sweep_stored` stops at the first ``on_message``/``on_status_report`` failure (the broker is
  most likely down): the rest stays on the SIM for the next sweep instead of each SMS waiting out a timeout.

Bugs of the library fixed here or in :mod:`modem_worker.at_fixes` are listed in that module and in
``tests/test_modem_adapter.py``.
"""

from __future__ import annotations

import logging
import queue
import random
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Final

from modem_worker.at_fixes import (
    CTRL_Z,
    CmeError,
    CmsError,
    CommandError,
    DeliverPdu,
    FixedGsmModem,
    LinkDown,
    StatusReportPdu,
    TimeoutException,
    decode_stored_pdu,
)
from modem_worker.sms_text import SubmitPdu, build_submit_pdus, repair_utf16

logger = logging.getLogger(__name__)

MISSING_PART: Final[str] = "[…]"
_PROMPT_TIMEOUT_S: Final[float] = 5.0
_CLOSED_RETENTION_MIN_S: Final[float] = 600.0
_UNDELETED_MAX: Final[int] = 2000
_CMTI_RE: Final[re.Pattern[str]] = re.compile(r'^\+(?:CMTI|CDSI):\s*"([^"]+)",\s*(\d+)')
_CMGS_RE: Final[re.Pattern[str]] = re.compile(r"^\+CMGS:\s*(\d+)")
_CSQ_RE: Final[re.Pattern[str]] = re.compile(r"^\+CSQ:\s*(\d+)")
_CBC_RE: Final[re.Pattern[str]] = re.compile(r"^\+CBC:\s*\d+\s*,\s*(\d+)")
_CREG_RE: Final[re.Pattern[str]] = re.compile(r"^\+CREG:\s*(?:\d+\s*,\s*)?(\d+)")
_CNUM_RE: Final[re.Pattern[str]] = re.compile(r'^\+CNUM:\s*"[^"]*"\s*,\s*"([^"]+)"')
_SWEEP_MEMORIES: Final[tuple[str, ...]] = ("SM", "ME", "SR")


# ---------------------------------------------------------------------------- public types


@dataclass(frozen=True)
class ReceivedMessage:
    """A whole SMS (concatenated parts joined). ``parts`` is the part count announced in the UDH (1 for a
    single SMS); ``complete`` is False when parts were missing at the multipart timeout."""

    sender: str
    text: str
    smsc_time: datetime
    sim_indices: tuple[int, ...]
    parts: int
    complete: bool


@dataclass(frozen=True)
class SendReceipt:
    """Outcome of a successful hand-over to the network: the TP-MR of every part, in order."""

    references: tuple[int, ...]
    parts: int
    sent_at: datetime


@dataclass(frozen=True)
class StatusReport:
    """A delivery report. ``delivered`` is None while the SMSC still tries (TP-Status 0x20-0x3F), False when
    it gave up (0x40 and above), True when the SMS reached the handset (below 0x20)."""

    reference: int
    recipient: str
    delivered: bool | None
    status: int
    finalized_at: datetime | None


@dataclass(frozen=True)
class ModemInfo:
    """Identity of the connected modem and SIM."""

    own_number: str | None
    imsi: str | None
    manufacturer: str
    model: str


@dataclass(frozen=True)
class UnreadableMessage:
    """A stored PDU (in ``memory`` at ``index``) that cannot be decoded as SMS-DELIVER or SMS-STATUS-REPORT.
    ``pdu_hex`` is the PDU as the modem listed it; ``reason`` says why decoding failed."""

    memory: str
    index: int
    pdu_hex: str
    reason: str


class ModemError(Exception):
    """Base class of every error the adapter raises."""


class ModemUnavailable(ModemError):
    """The port is missing, unplugged, the read thread died, or the modem does not answer."""


class SendFailed(ModemError):
    """The modem or network refused the SMS: it was NOT sent (safe to retry or report as failed)."""

    def __init__(self, cms_code: int | None, reason: str) -> None:
        super().__init__(f"send failed ({cms_code}): {reason}" if cms_code is not None else f"send failed: {reason}")
        self.cms_code = cms_code
        self.reason = reason


class SendOutcomeUnknown(ModemError):
    """The PDU (or part of a multipart SMS) was written but no +CMGS came back (time-out, unplug, a later
    part refused): the SMS MAY have been sent. Never resend blindly. ``references`` holds the TP-MR of the
    parts known to have gone out."""

    def __init__(self, reason: str, references: tuple[int, ...] = ()) -> None:
        super().__init__(reason)
        self.reason = reason
        self.references = references


# ---------------------------------------------------------------------------- internal bookkeeping

_Location = tuple[str, int, str]  # (memory, index, pdu hex) of a stored copy
_Key = tuple[str, int, int]  # (sender, concat reference, total parts)


@dataclass
class _Part:
    raw_text: str
    smsc_time: datetime
    location: _Location | None  # None for a direct +CMT delivery (nothing on the SIM)


@dataclass
class _Buffer:
    """Parts of one concatenated SMS seen so far (all still on the SIM)."""

    first_seen: float
    parts: dict[int, _Part] = field(default_factory=dict)
    duplicates: list[_Location] = field(default_factory=list)
    failed: bool = False  # on_message raised: only sweep_stored() retries it


@dataclass
class _Closed:
    """A concatenated SMS already delivered: the raw text of each delivered part, for de-duplication."""

    texts: dict[int, str]
    complete: bool
    at: float


@dataclass(frozen=True)
class _StoredEvent:
    memory: str
    index: int


@dataclass(frozen=True)
class _DirectEvent:
    pdu: str


@dataclass(frozen=True)
class _Tick:
    """No event within the tick interval: only check multipart time-outs."""


class _CallbackFailed(Exception):
    """on_message/on_status_report raised: the SMS stays on the SIM, a sweep stops here. The message says
    what failed; whoever catches it logs it."""


_TICK: Final[_Tick] = _Tick()
_Event = _StoredEvent | _DirectEvent | _Tick  # None in the queue stops the worker


def _status_delivered(status: int) -> bool | None:
    """Map TP-Status (23.040 9.2.3.15) to delivered True / pending None / failed False."""
    if status < 0x20:
        return True
    if status < 0x40:
        return None
    return False


# ---------------------------------------------------------------------------- the adapter


class Modem:
    """One GSM modem: connect, send, receive (via callbacks), status reports, health queries.

    Callbacks run on the adapter's worker thread, or on the thread calling :meth:`sweep_stored` (``on_fatal``
    on the thread that saw the link die). A callback that raises leaves the SIM copy in place for the next
    :meth:`sweep_stored`.
    """

    def __init__(
        self,
        port: str,
        *,
        on_message: Callable[[ReceivedMessage], None],
        on_status_report: Callable[[StatusReport], None],
        on_fatal: Callable[[BaseException], None] | None = None,
        on_unreadable: Callable[[UnreadableMessage], None] | None = None,
        baudrate: int = 115200,
        request_delivery: bool = True,
        send_timeout_s: float = 35.0,
        command_timeout_s: float = 10.0,
        multipart_timeout_s: float = 600.0,
    ) -> None:
        """Store the configuration; nothing is opened until :meth:`connect`.

        ``on_unreadable`` receives stored PDUs that cannot be decoded; the entry is deleted from the SIM only
        after it returned. Without it such entries stay on the SIM (logged once each).
        """
        self.port = port
        self._on_message = on_message
        self._on_status_report = on_status_report
        self._on_fatal = on_fatal
        self._on_unreadable = on_unreadable
        self._baudrate = baudrate
        self._request_delivery = request_delivery
        self._send_timeout_s = send_timeout_s
        self._command_timeout_s = command_timeout_s
        self._multipart_timeout_s = multipart_timeout_s
        self._gsm: FixedGsmModem | None = None
        self._worker: threading.Thread | None = None
        self._events: queue.Queue[_Event | None] = queue.Queue()
        # Held across read -> on_message -> delete, by the worker and by sweep_stored(), so one stored SMS is
        # never handled by both at once (which would deliver it twice).
        self._delivery_lock = threading.RLock()
        self._buffers: dict[_Key, _Buffer] = {}
        # +CMT PDUs whose delivery failed. Nothing is on the SIM to fall back on, so they wait here for the
        # next sweep (lost only if the process dies first; we configure the modem to store SMS, +CMT comes
        # only from modems that ignore that).
        self._direct_retry: list[str] = []
        self._closed: dict[_Key, _Closed] = {}
        self._undeleted: dict[tuple[str, int], str] = {}
        # Undecodable entries already logged (insertion-ordered, bounded): logged once, not on every sweep.
        self._unreadable_logged: dict[_Location, None] = {}
        # Successful on_message/on_status_report calls and SIM deletions so far (sweep_stored() reports deltas).
        self._delivered_count = 0
        self._deleted_count = 0
        self._memories: tuple[str, ...] = ("SM",)
        self._concat_ref = random.randrange(256)
        self._ref_lock = threading.Lock()
        self._fatal_lock = threading.Lock()
        self._fatal_fired = False
        self._stopping = threading.Event()

    # ------------------------------------------------------------------ lifecycle

    def connect(self) -> ModemInfo:
        """Open the port exclusively, initialise the modem (PDU mode, SMS stored on the SIM) and start the
        worker thread. Returns the modem's identity.

        Raises ModemUnavailable (port missing or busy, no answer, init refused); the port is closed and the
        read thread stopped before it is raised.
        """
        if self._gsm is not None and self._gsm.alive:
            raise ModemError(f"modem on {self.port} is already connected")
        self.close()  # the remains of a dead connection: its worker and port
        self._fatal_fired = False
        # Fresh per connection, before the port opens: a +CMTI during the init dialogue must not be lost.
        self._stopping = threading.Event()
        self._events = queue.Queue()
        gsm = FixedGsmModem(
            self.port,
            baudrate=self._baudrate,
            on_urc=self._on_urc,
            on_link_down=self._link_down,
            request_delivery=self._request_delivery,
            command_timeout_s=self._command_timeout_s,
        )
        try:
            gsm.connect()
            info = self._query_info(gsm)
            self._memories = self._query_memories(gsm)
        except Exception as exc:
            gsm.close()
            raise ModemUnavailable(f"cannot initialise modem on {self.port}: {exc!r}") from exc
        with self._delivery_lock:
            # Buffers refer to SIM slots of the previous session; the next sweep rebuilds them.
            self._buffers.clear()
        self._gsm = gsm
        if not gsm.alive:  # died between the init dialogue and here, while on_fatal was still muted
            self.close()
            raise ModemUnavailable(f"modem on {self.port} vanished right after connecting")
        self._worker = threading.Thread(
            target=self._work, args=(self._events, self._stopping), name=f"modem-worker {self.port}", daemon=True
        )
        self._worker.start()
        logger.info("modem on %s connected: %s %s", self.port, info.manufacturer, info.model)
        return info

    def close(self) -> None:
        """Stop the worker, close the port. Idempotent; does not call ``on_fatal``."""
        # Let the worker finish the item in hand (e.g. the delete after a confirmed delivery) before the
        # port goes; otherwise that SMS would stay on the SIM and be delivered again after a restart.
        self._stopping.set()
        self._events.put(None)
        worker = self._worker
        if worker is not None and worker is not threading.current_thread():
            worker.join(timeout=10)
        self._worker = None
        gsm, self._gsm = self._gsm, None
        if gsm is not None:
            gsm.close()

    @property
    def alive(self) -> bool:
        """True while the port is open and the read thread runs; False after unplug, a dead read thread or
        close()."""
        gsm = self._gsm
        if gsm is None or not gsm.alive:
            return False
        thread = gsm.rxThread
        return thread is not None and thread.is_alive()

    def _link_down(self, exc: BaseException) -> None:
        """Called by the AT layer once when the link dies: stop the worker, tell the owner (not while
        connect() is still running: it raises ModemUnavailable itself)."""
        self._events.put(None)
        if self._gsm is None:
            return
        with self._fatal_lock:
            if self._fatal_fired:
                return
            self._fatal_fired = True
        if self._on_fatal is not None:
            try:
                self._on_fatal(ModemUnavailable(f"modem link on {self.port} lost: {exc!r}"))
            except Exception:
                logger.exception("on_fatal callback failed")

    def _require(self) -> FixedGsmModem:
        """Return the live AT layer. Raises ModemUnavailable when not connected or the link is down."""
        gsm = self._gsm
        if gsm is None or not gsm.alive:
            raise ModemUnavailable(f"modem on {self.port} is not connected")
        return gsm

    # ------------------------------------------------------------------ simple queries

    def _command(self, command: str, timeout: float | None = None) -> list[str]:
        """Run one AT command; map link loss and silence to ModemUnavailable, error answers to ModemError."""
        gsm = self._require()
        try:
            return gsm.write(command, timeout=timeout) or []
        except (LinkDown, TimeoutException) as exc:
            raise ModemUnavailable(f"{command}: no answer from modem on {self.port} ({exc!r})") from exc
        except CommandError as exc:
            raise ModemError(f"{command}: {exc}") from exc

    @staticmethod
    def _first_match(pattern: re.Pattern[str], lines: list[str]) -> re.Match[str] | None:
        """Return the match of the first line matching ``pattern``, or None."""
        for line in lines:
            match = pattern.match(line)
            if match:
                return match
        return None

    def _query_info(self, gsm: FixedGsmModem) -> ModemInfo:
        """Read manufacturer, model, IMSI and own number (the last two optional)."""

        def first_line(cmd: str) -> str | None:
            try:
                lines = gsm.write(cmd) or []
            except CommandError:
                return None
            return next((ln.strip() for ln in lines if ln.strip() and ln != "OK"), None)

        own: str | None = None
        try:
            match = self._first_match(_CNUM_RE, gsm.write("AT+CNUM") or [])
            own = match.group(1) if match else None
        except CommandError:
            own = None
        return ModemInfo(
            own_number=own,
            imsi=first_line("AT+CIMI"),
            manufacturer=first_line("AT+CGMI") or "",
            model=first_line("AT+CGMM") or "",
        )

    def _query_memories(self, gsm: FixedGsmModem) -> tuple[str, ...]:
        """The read/delete memories sweep_stored() lists (from AT+CPMS=?), default ("SM",)."""
        try:
            lines = gsm.write("AT+CPMS=?") or []
        except CommandError:
            return ("SM",)
        line = next((ln for ln in lines if ln.startswith("+CPMS:")), "")
        first_group = line.split(")", 1)[0]
        found = tuple(m for m in _SWEEP_MEMORIES if f'"{m}"' in first_group)
        return found or ("SM",)

    def signal_strength(self) -> int | None:
        """Return the RSSI (AT+CSQ) 0-31, None when unknown (99). Raises ModemUnavailable, ModemError."""
        match = self._first_match(_CSQ_RE, self._command("AT+CSQ"))
        if match is None:
            raise ModemError("unparsable +CSQ answer")
        value = int(match.group(1))
        return None if value == 99 or value > 31 else value

    def battery_level(self) -> int | None:
        """Return the battery charge in percent (AT+CBC), None if the modem does not report it.

        Raises ModemUnavailable."""
        try:
            lines = self._command("AT+CBC")
        except ModemUnavailable:
            raise
        except ModemError:
            return None
        match = self._first_match(_CBC_RE, lines)
        return int(match.group(1)) if match else None

    def is_registered(self) -> bool:
        """Return True if registered on the home network or roaming (AT+CREG? stat 1 or 5).

        Raises ModemUnavailable, ModemError."""
        match = self._first_match(_CREG_RE, self._command("AT+CREG?"))
        return match is not None and int(match.group(1)) in (1, 5)

    def ping(self) -> bool:
        """AT watchdog: True if the modem answers ``AT`` with OK. Never raises.

        While another command (e.g. a send waiting up to ``send_timeout_s``) holds the line, the modem is
        evidently talking, so this returns :attr:`alive` instead of queueing behind it.
        """
        gsm = self._gsm
        if gsm is None or not gsm.alive:
            return False
        if not gsm.command_lock.acquire(timeout=self._command_timeout_s):
            return self.alive
        try:
            gsm.write("AT", timeout=min(self._command_timeout_s, 5.0))
            return True
        except (LinkDown, TimeoutException, CommandError):
            return False
        finally:
            gsm.command_lock.release()

    # ------------------------------------------------------------------ sending

    def _next_concat_ref(self) -> int:
        """Return the next 8-bit concatenation reference (distinct for consecutive multipart sends)."""
        with self._ref_lock:
            self._concat_ref = (self._concat_ref + 1) % 256
            return self._concat_ref

    def send(self, to: str, text: str) -> SendReceipt:
        """Send ``text`` to ``to`` (GSM-7 or UCS-2, concatenated if long) and return every part's TP-MR.

        Raises SendFailed (refused, nothing sent; also for an invalid number or an over-long text),
        SendOutcomeUnknown (written but unconfirmed, or a later part failed after earlier ones went out:
        never resend blindly), ModemUnavailable (not connected, link lost or no prompt before anything was
        written: safe to send later).
        """
        gsm = self._require()
        try:
            pdus = build_submit_pdus(
                to, text, concat_reference=self._next_concat_ref(), request_delivery=self._request_delivery
            )
        except ValueError as exc:
            raise SendFailed(None, str(exc)) from exc
        references: list[int] = []
        for number, pdu in enumerate(pdus, start=1):
            try:
                references.append(self._send_part(gsm, pdu))
            except SendOutcomeUnknown as exc:
                raise SendOutcomeUnknown(
                    f"part {number}/{len(pdus)}: {exc.reason}", tuple(references)
                ) from exc
            except (SendFailed, ModemUnavailable) as exc:
                if references:
                    # Earlier parts are out: a resend would duplicate them on the handset.
                    raise SendOutcomeUnknown(
                        f"part {number}/{len(pdus)} not sent after {len(references)} went out: {exc}",
                        tuple(references),
                    ) from exc
                raise
        logger.info("sent SMS in %d part(s), references %s", len(pdus), references)
        return SendReceipt(tuple(references), len(pdus), datetime.now(UTC))

    def _send_part(self, gsm: FixedGsmModem, pdu: SubmitPdu) -> int:
        """AT+CMGS=<len>, wait for ``> ``, write PDU + Ctrl-Z, return the +CMGS reference.

        The whole exchange holds the command lock: another thread's command landing between the prompt
        and the PDU is what produced ``+CMS ERROR: 304`` with the bare library.
        """
        with gsm.command_lock:
            try:
                prompt = gsm.write(
                    f"AT+CMGS={pdu.tpdu_length}", timeout=_PROMPT_TIMEOUT_S, expectedResponseTermSeq="> "
                ) or []
            except (CmsError, CmeError) as exc:
                raise SendFailed(exc.code, f"AT+CMGS refused: {exc}") from exc
            except CommandError as exc:
                raise SendFailed(None, f"AT+CMGS refused: {exc}") from exc
            except TimeoutException as exc:
                # No prompt: the PDU was never written, so the SMS may go later (here or through another
                # modem) rather than be reported failed for a modem that was busy. ESC makes a modem that
                # prompts late drop it.
                gsm.abort_prompt()
                raise ModemUnavailable("modem did not prompt for the PDU") from exc
            except LinkDown as exc:
                raise ModemUnavailable(f"modem link lost before sending: {exc}") from exc
            if not prompt or not prompt[-1].endswith("> "):
                raise SendFailed(None, f"unexpected answer to AT+CMGS: {prompt[-1:]}")
            try:
                answer = gsm.write(pdu.hex, timeout=self._send_timeout_s, writeTerm=CTRL_Z) or []
            except (CmsError, CmeError) as exc:
                raise SendFailed(exc.code, f"network refused the SMS: {exc}") from exc
            except CommandError as exc:
                raise SendFailed(None, f"modem refused the PDU: {exc}") from exc
            except TimeoutException as exc:
                raise SendOutcomeUnknown(f"no +CMGS within {self._send_timeout_s:g} s") from exc
            except LinkDown as exc:
                raise SendOutcomeUnknown(f"modem link lost after the PDU was written: {exc}") from exc
        match = self._first_match(_CMGS_RE, answer)
        if match is None:
            raise SendOutcomeUnknown(f"answer without +CMGS: {answer[-1:]}")
        return int(match.group(1))

    # ------------------------------------------------------------------ receiving: URCs and worker

    def _on_urc(self, lines: list[str]) -> None:
        """Read-thread sink: queue SMS/report notifications for the worker (never issue commands here)."""
        head = lines[0]
        match = _CMTI_RE.match(head)
        if match:
            self._events.put(_StoredEvent(match.group(1), int(match.group(2))))
        elif head.startswith(("+CMT:", "+CDS:")) and len(lines) > 1:
            # Direct delivery (only if something reconfigured CNMI): handled rather than lost.
            self._events.put(_DirectEvent(lines[1].strip()))
        else:
            logger.debug("ignored unsolicited line %r", head[:40])

    def _work(self, events: queue.Queue[_Event], stopping: threading.Event) -> None:
        """Worker thread: handle queued notifications one at a time, flush expired multipart buffers.

        ``events``/``stopping`` belong to one connection, so a worker of a dead connection can never take
        events of the next one.
        """
        tick = max(0.05, min(1.0, self._multipart_timeout_s / 4))
        while not stopping.is_set():
            try:
                event: _Event | None = events.get(timeout=tick)
            except queue.Empty:
                event = _TICK
            if event is None or stopping.is_set():
                return
            try:
                with self._delivery_lock:
                    if isinstance(event, _StoredEvent):
                        self._handle_stored_event(event)
                    elif isinstance(event, _DirectEvent):
                        self._process_direct(event.pdu)
                    self._flush_expired(include_failed=False)
            except _CallbackFailed as exc:
                logger.warning("%s; kept on the SIM for the next sweep", exc)
            except (LinkDown, ModemUnavailable) as exc:
                logger.warning("modem link lost while handling a notification: %s", exc)
            except (TimeoutException, CommandError) as exc:
                # Left on the SIM: the next sweep_stored() picks it up.
                logger.warning("reading a notified SMS failed (%r); left for the next sweep", exc)
            except Exception:
                logger.exception("unexpected error handling a modem notification")

    def _process_direct(self, pdu: str) -> None:
        """Handle a +CMT PDU; keeps it for the next sweep when delivery fails. Raises _CallbackFailed then."""
        try:
            self._process(None, pdu)
        except _CallbackFailed:
            self._direct_retry.append(pdu)
            raise

    def _handle_stored_event(self, event: _StoredEvent) -> None:
        """Read the slot a +CMTI/+CDSI announced and process it. Raises LinkDown, TimeoutException,
        CommandError, ModemUnavailable (the SMS then stays on the SIM for the sweep)."""
        gsm = self._require()
        pdu = gsm.read_stored_pdu(event.memory, event.index)
        if pdu is None:
            logger.debug("slot %s/%d already empty (handled by a sweep)", event.memory, event.index)
            return
        self._process((event.memory, event.index, pdu), pdu)

    def sweep_stored(self) -> int:
        """List every stored message (AT+CMGL=4 on SM and SR memory) and deliver what is deliverable:
        single SMS, completed or expired multipart SMS (incl. ones whose delivery failed before), status
        reports, undecodable entries (to ``on_unreadable``). Returns how many ``on_message``/
        ``on_status_report`` calls succeeded.

        Stops at the first ``on_message``/``on_status_report`` that raises (logged, not re-raised): the
        broker is most likely down, and trying every other stored SMS would hold the delivery lock for one
        publish timeout each. What is left stays on the SIM for the next sweep.

        Raises ModemUnavailable (link lost / no answer), ModemError (listing refused).
        """
        with self._delivery_lock:
            gsm = self._require()
            entries: list[_Location] = []
            for memory in self._memories:
                try:
                    entries += [(memory, index, pdu) for index, pdu in gsm.list_stored_pdus(memory)]
                except (LinkDown, TimeoutException) as exc:
                    raise ModemUnavailable(f"listing {memory} failed: {exc!r}") from exc
                except CommandError as exc:
                    raise ModemError(f"listing {memory} failed: {exc}") from exc
            delivered_before, deleted_before = self._delivered_count, self._deleted_count
            try:
                while self._direct_retry:
                    self._process(None, self._direct_retry[0])
                    self._direct_retry.pop(0)
                for location in entries:
                    self._process(location, location[2])
                for key in [k for k, b in self._buffers.items() if b.failed and self._is_ready(k, b)]:
                    self._deliver_buffer(key)
                self._flush_expired(include_failed=True)
            except _CallbackFailed as exc:
                left = max(0, len(entries) - (self._deleted_count - deleted_before))
                logger.warning("stopping the sweep: %s; %d SMS stay on the SIM for the next sweep", exc, left)
            return self._delivered_count - delivered_before

    # ------------------------------------------------------------------ receiving: processing (delivery lock held)

    def _process(self, location: _Location | None, pdu: str) -> None:
        """Handle one stored (or directly delivered) PDU.

        Raises _CallbackFailed when on_message/on_status_report raised (the SMS stays on the SIM)."""
        if location is not None and self._undeleted.get(location[:2]) == pdu:
            # Delivered before, only the delete failed: finish the delete, never deliver twice.
            self._delete([location])
            return
        try:
            decoded = decode_stored_pdu(pdu)
        except ValueError as exc:
            self._unreadable(location, pdu, str(exc))
            return
        if isinstance(decoded, StatusReportPdu):
            self._deliver_report(location, decoded)
            return
        if decoded.concat is not None and decoded.concat[1] > 1 and not 1 <= decoded.concat[2] <= decoded.concat[1]:
            reference, total, seq = decoded.concat
            # Buffered under an impossible number it would count towards "all parts there" while a real
            # part is missing, and the message would come out complete=True with text lost.
            logger.warning(
                "concatenated part with sequence %d of %d (ref %d) from %s cannot be placed: delivered on its own",
                seq, total, reference, decoded.sender,
            )
        elif decoded.concat is not None and decoded.concat[1] > 1:
            self._add_part(location, decoded)
            return
        message = ReceivedMessage(
            sender=decoded.sender,
            text=decoded.text,
            smsc_time=decoded.smsc_time,
            sim_indices=(location[1],) if location else (),
            parts=1,
            complete=True,
        )
        self._deliver(message, [location] if location else [])

    def _unreadable(self, location: _Location | None, pdu: str, reason: str) -> None:
        """An undecodable PDU: hand it to on_unreadable and delete it after that returned; otherwise keep it
        on the SIM and log it once per (memory, index, pdu)."""
        # A direct +CMT has no SIM slot: it is handed over as memory "+CMT", index -1.
        memory, index = (location[0], location[1]) if location is not None else ("+CMT", -1)
        failure = "no on_unreadable callback"
        if self._on_unreadable is not None:
            try:
                self._on_unreadable(UnreadableMessage(memory=memory, index=index, pdu_hex=pdu, reason=reason))
            except Exception as exc:
                failure = f"on_unreadable failed ({exc!r})"
            else:
                logger.warning("undecodable PDU at %s/%d handed over and deleted: %s", memory, index, reason)
                if location is not None:
                    self._delete([location])
                return
        if location is None:
            # Not on the SIM, so it cannot wait there; logged in full so an operator still has the PDU.
            logger.error("undecodable PDU in a +CMT could not be handed over (%s): %s; pdu=%s", failure, reason,
                         pdu)
            return
        if location in self._unreadable_logged:
            logger.debug("undecodable PDU at %s/%d still on the SIM (%s)", memory, index, failure)
            return
        self._unreadable_logged[location] = None
        if len(self._unreadable_logged) > _UNDELETED_MAX:
            del self._unreadable_logged[next(iter(self._unreadable_logged))]
        logger.error(
            "undecodable PDU at %s/%d left on the SIM (%s; logged once): %s; pdu=%s",
            memory, index, failure, reason, pdu,
        )

    def _add_part(self, location: _Location | None, sms: DeliverPdu) -> None:
        """Buffer one concatenated part (still on the SIM); deliver the message once all parts are there.
        Raises _CallbackFailed when on_message raised."""
        assert sms.concat is not None
        reference, total, seq = sms.concat
        key: _Key = (sms.sender, reference, total)
        closed = self._closed.get(key)
        if closed is not None and closed.texts.get(seq) == sms.raw_text:
            # Already delivered in a message: a duplicate copy, only the SIM slot is left to clear.
            logger.debug("duplicate part %d/%d of an already delivered SMS", seq, total)
            if location is not None:
                self._delete([location])
            return
        buffer = self._buffers.get(key)
        if buffer is None:
            first_seen = time.monotonic()
            if closed is not None and not closed.complete and seq not in closed.texts:
                # Straggler of a message already delivered incomplete: flush it on the next tick as its own
                # fragment instead of holding it for another full timeout.
                first_seen -= self._multipart_timeout_s
            buffer = self._buffers[key] = _Buffer(first_seen=first_seen)
        existing = buffer.parts.get(seq)
        if existing is not None:
            if location is not None and existing.location != location and location not in buffer.duplicates:
                buffer.duplicates.append(location)  # same part stored twice: delete both copies later
            return
        buffer.parts[seq] = _Part(sms.raw_text, sms.smsc_time, location)
        if len(buffer.parts) == total:
            self._deliver_buffer(key)

    def _is_ready(self, key: _Key, buffer: _Buffer) -> bool:
        """True when the buffered message is complete or has waited multipart_timeout_s."""
        return len(buffer.parts) == key[2] or time.monotonic() - buffer.first_seen >= self._multipart_timeout_s

    def _flush_expired(self, *, include_failed: bool) -> None:
        """Deliver multipart buffers older than multipart_timeout_s with the parts that arrived. Raises
        _CallbackFailed at the first on_message that raised."""
        now = time.monotonic()
        retention = max(2 * self._multipart_timeout_s, _CLOSED_RETENTION_MIN_S)
        for key in [k for k, c in self._closed.items() if now - c.at > retention]:
            del self._closed[key]
        for key, buffer in list(self._buffers.items()):
            if (include_failed or not buffer.failed) and now - buffer.first_seen >= self._multipart_timeout_s:
                self._deliver_buffer(key)

    def _deliver_buffer(self, key: _Key) -> None:
        """Deliver one buffered multipart SMS (complete or not); delete its parts after on_message. Raises
        _CallbackFailed (the buffer is then marked failed: only sweep_stored() retries it)."""
        buffer = self._buffers[key]
        sender, _reference, total = key
        complete = len(buffer.parts) == total
        raw = "".join(buffer.parts[s].raw_text if s in buffer.parts else MISSING_PART for s in range(1, total + 1))
        locations = [p.location for _, p in sorted(buffer.parts.items()) if p.location is not None]
        locations += buffer.duplicates
        message = ReceivedMessage(
            sender=sender,
            # Repair after joining: a surrogate pair split across two parts becomes one character again.
            text=repair_utf16(raw),
            smsc_time=min(p.smsc_time for p in buffer.parts.values()),
            sim_indices=tuple(loc[1] for loc in locations),
            parts=total,
            complete=complete,
        )
        if not complete:
            logger.warning(
                "multipart SMS (ref %d) incomplete after %.0f s: delivering %d of %d parts",
                key[1], self._multipart_timeout_s, len(buffer.parts), total,
            )
        try:
            self._deliver(message, locations)
        except _CallbackFailed:
            buffer.failed = True
            raise
        del self._buffers[key]
        closed = self._closed.setdefault(key, _Closed(texts={}, complete=False, at=time.monotonic()))
        closed.texts.update({s: p.raw_text for s, p in buffer.parts.items()})
        closed.complete = closed.complete or complete
        closed.at = time.monotonic()

    def _deliver(self, message: ReceivedMessage, locations: list[_Location]) -> None:
        """Call on_message; only after it returned, delete the SIM copies. Raises _CallbackFailed when
        on_message raised."""
        try:
            self._on_message(message)
        except Exception as exc:
            # Not confirmed by the broker: the SIM copy is the only copy, keep it for the next sweep.
            raise _CallbackFailed(f"on_message failed ({exc!r}) for the SMS at SIM {message.sim_indices}") from exc
        self._delivered_count += 1
        logger.debug("delivered SMS from %s: %r", message.sender, message.text)
        self._delete(locations)

    def _deliver_report(self, location: _Location | None, sr: StatusReportPdu) -> None:
        """Call on_status_report; delete the SR copy only after it returned. Raises _CallbackFailed when
        on_status_report raised."""
        report = StatusReport(
            reference=sr.reference,
            recipient=sr.recipient,
            delivered=_status_delivered(sr.status),
            status=sr.status,
            finalized_at=sr.finalized_at,
        )
        try:
            self._on_status_report(report)
        except Exception as exc:
            raise _CallbackFailed(f"on_status_report failed ({exc!r}) for report {sr.reference}") from exc
        self._delivered_count += 1
        self._delete([location] if location else [])

    def _delete(self, locations: list[_Location]) -> None:
        """Delete delivered copies from the SIM. A failed delete is remembered so that the copy, when seen
        again, is deleted without being delivered a second time."""
        gsm = self._gsm
        for memory, index, pdu in locations:
            self._undeleted[(memory, index)] = pdu
            if gsm is None:
                continue
            try:
                gsm.delete_stored(memory, index)
            except (LinkDown, TimeoutException, CommandError) as exc:
                logger.warning("deleting %s/%d failed (%r); will delete on the next sweep", memory, index, exc)
                continue
            del self._undeleted[(memory, index)]
            self._unreadable_logged.pop((memory, index, pdu), None)
            self._deleted_count += 1
        if len(self._undeleted) > _UNDELETED_MAX:
            for stale in list(self._undeleted)[: len(self._undeleted) - _UNDELETED_MAX]:
                del self._undeleted[stale]
