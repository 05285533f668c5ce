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

import contextlib
import logging
import queue
import random
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Final, Protocol

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
from modem_worker.sms_text import SubmitPdu, build_submit_pdus, decode_gsm7, repair_utf16

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
# Supervisor support (identity, SIM PIN, reboot detection).
_CMGF_RE: Final[re.Pattern[str]] = re.compile(r"^\+CMGF:\s*(\d)")
_CNMI_RE: Final[re.Pattern[str]] = re.compile(r"^\+CNMI:\s*\d+\s*,\s*(\d+)")
_CPIN_RE: Final[re.Pattern[str]] = re.compile(r"^\+CPIN:\s*(.+?)\s*$")
_IMEI_RE: Final[re.Pattern[str]] = re.compile(r"^(?:\+C?GSN:\s*)?\"?(\d{14,17})\"?$")
_ICCID_RE: Final[re.Pattern[str]] = re.compile(r"^(?:[+^]I?CCID:\s*)?\"?([0-9A-Fa-f]{18,22})\"?$")
_IMSI_RE: Final[re.Pattern[str]] = re.compile(r"^(?:\+CIMI:\s*)?\"?(\d{6,15})\"?$")
# Lines a modem writes when it (re)starts. Only a hint: ^BOOT is also periodic noise on Huawei sticks, so the
# supervisor checks the settings before it believes in a reboot.
_BOOT_RE: Final[re.Pattern[str]] = re.compile(r"^(RDY|\^BOOT|\+CFUN:\s*1\b|\+CPIN:\s*READY|SMS DONE|PB DONE)")
_PIN_READY_WAIT_S: Final[float] = 10.0
_STORAGE_MEMORIES: Final[tuple[str, ...]] = ("SM", "ME")  # where received SMS are stored (SR holds reports)
_CPMS_READ_RE: Final[re.Pattern[str]] = re.compile(r'^\+CPMS:\s*"([^"]+)"\s*,\s*(\d+)\s*,\s*(\d+)')
_CUSD_RE: Final[re.Pattern[str]] = re.compile(r'^\+CUSD:\s*(\d+)\s*(?:,\s*"([^"]*)"\s*(?:,\s*(\d+))?)?')
USSD_CODE_RE: Final[re.Pattern[str]] = re.compile(r"[0-9*#+]{1,40}")
_HEX_RE: Final[re.Pattern[str]] = re.compile(r"(?:[0-9A-Fa-f]{2})+")
# The first number of a balance text: "1,234.50" (thousands separators), "1234.5", "-20".
_AMOUNT_RE: Final[re.Pattern[str]] = re.compile(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?|-?\d+(?:\.\d+)?")


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


@dataclass(frozen=True)
class StorageUse:
    """How full one message memory is (``AT+CPMS?``): ``memory`` "SM" (SIM) or "ME" (modem), ``used`` of
    ``total`` slots."""

    memory: str
    used: int
    total: int

    @property
    def ratio(self) -> float:
        """``used / total`` (1.0 for a memory without slots: nothing more fits)."""
        return self.used / self.total if self.total > 0 else 1.0


class ModemError(Exception):
    """Base class of every error the adapter raises."""


class ModemUnavailable(ModemError):
    """The port is missing, unplugged, the read thread died, or the modem does not answer."""


class SendFailed(ModemError):
    """The modem or network refused the SMS: it was NOT sent (safe to retry or report as failed).

    ``cms_code`` is the ``+CMS ERROR`` code (or the ``+CME ERROR`` code when ``source`` is "CME"; None without a
    code); ``invalid`` is True when the SMS could not even be encoded (bad number, text too long).
    ``modem_worker.send_errors.classify`` says what it means."""

    def __init__(self, cms_code: int | None, reason: str, *, source: str = "CMS", invalid: bool = False) -> None:
        super().__init__(f"send failed ({cms_code}): {reason}" if cms_code is not None else f"send failed: {reason}")
        self.cms_code = cms_code
        self.reason = reason
        self.source = source
        self.invalid = invalid


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


def unpack_septets(data: bytes) -> list[int]:
    """Unpack GSM-7 septets packed LSB-first into octets (the inverse of ``sms_text.pack_septets``)."""
    septets: list[int] = []
    acc = 0
    nbits = 0
    for octet in data:
        acc |= octet << nbits
        nbits += 8
        while nbits >= 7:
            septets.append(acc & 0x7F)
            acc >>= 7
            nbits -= 7
    if len(data) * 8 % 7 == 0 and septets and septets[-1] == 0:
        septets.pop()  # 7 spare bits at the end are padding (23.038 6.1.2.3.1), not an "@"
    return septets


def _ussd_alphabet(dcs: int | None) -> str:
    """The alphabet a USSD data coding scheme (23.038 §5, CBS coding) announces: "gsm7", "8bit" or "ucs2"."""
    if dcs is None:
        return "gsm7"
    if dcs == 0x11:  # UCS-2 preceded by a language
        return "ucs2"
    if dcs & 0xC0 == 0x40:  # general data coding: bits 3-2 give the alphabet
        return {0: "gsm7", 1: "8bit", 2: "ucs2"}.get((dcs >> 2) & 0x03, "gsm7")
    return "gsm7"


def decode_ussd_text(text: str, dcs: int | None) -> str:
    """The text of a ``+CUSD`` answer: UCS-2 hex or packed GSM-7 hex (what modems in the default character set
    answer, depending on ``dcs``) decoded, plain text as it is."""
    if not _HEX_RE.fullmatch(text) or text.isdigit():  # digits only: a plain-text number, not hex
        return text
    data = bytes.fromhex(text)
    alphabet = _ussd_alphabet(dcs)
    if alphabet == "ucs2" and len(data) % 2 == 0:
        return repair_utf16(data.decode("utf-16-be", "replace"))
    if alphabet == "gsm7":
        decoded = decode_gsm7(unpack_septets(data)).rstrip("\r")
        # A plain-text answer that happens to look like hex ("CAFE") decodes into control characters and
        # Greek capitals: keep it. Real answers are mostly ASCII.
        ascii_share = sum(ch.isascii() and (ch.isprintable() or ch in "\r\n") for ch in decoded) / max(1, len(decoded))
        if decoded and ascii_share >= 0.8:
            return decoded
    return text


def first_amount(text: str) -> float | None:
    """The first number in ``text`` ("Salio lako ni TSh 1,234.50" -> 1234.5), None when there is none.
    Commas are read as thousands separators only between groups of three digits."""
    match = _AMOUNT_RE.search(text)
    return float(match.group(0).replace(",", "")) if match else None


def _error_source(exc: CommandError) -> str:
    """ "CME" for a ``+CME ERROR`` (27.007 codes), else "CMS" (27.005 / 24.011 codes)."""
    return "CME" if isinstance(exc, CmeError) else "CMS"


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
        sim_unlock: SimUnlock | None = None,
        on_boot: Callable[[str], None] | None = None,
    ) -> None:
        """Store the configuration; nothing is opened until :meth:`connect`.

        ``sim_unlock`` decides whether a SIM asking for its PIN gets one (without it such a SIM is refused with
        :class:`SimLocked`); ``on_boot`` receives boot-like unsolicited lines (``RDY``, ``+CPIN: READY``, ...) on
        the read thread, as a hint that the modem may have restarted (it must not block).

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
        self._sim_unlock = sim_unlock
        self._on_boot = on_boot
        self._gsm: FixedGsmModem | None = None
        self._worker: threading.Thread | None = None
        self._events: queue.Queue[_Event | None] = queue.Queue()
        self._ussd_answers: queue.Queue[str] = queue.Queue()  # +CUSD lines that came as URCs
        self._ussd_lock = threading.Lock()
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

        Raises ModemUnavailable (port missing or busy, no answer, init refused), SimLocked (the SIM needs a PIN
        or PUK it may not be given); the port is closed and the read thread stopped before it is raised.
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
        gsm.unlock_sim = lambda: self._unlock_sim(gsm)
        try:
            gsm.connect()
            info = self._query_info(gsm)
            self._memories = self._query_memories(gsm)
        except SimLocked:
            gsm.close()
            raise
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

    # ------------------------------------------------------------------ housekeeping: USSD, storage

    def ussd(self, code: str, timeout_s: float = 30.0) -> str:
        """Run the USSD request ``code`` (``AT+CUSD=1,"<code>",15``) and return the network's answer text,
        decoded (GSM-7 or UCS-2 hex as the modem presents it, or plain text).

        The whole dialogue holds the command lock: no other command (a send, a probe) can take the answer,
        which comes either inside the command's reply or as an unsolicited ``+CUSD:`` line after its OK.

        Raises ModemUnavailable (link lost, no answer to the command), ModemError (``code`` not a USSD string,
        refused, no ``+CUSD`` within ``timeout_s``, an answer without text).
        """
        if not USSD_CODE_RE.fullmatch(code):
            raise ModemError(f"not a USSD code: {code!r} (digits, * # + only)")
        gsm = self._require()
        with self._ussd_lock, gsm.command_lock:
            while not self._ussd_answers.empty():  # a late answer to an earlier request
                self._ussd_answers.get_nowait()
            lines = self._command(f'AT+CUSD=1,"{code}",15', timeout=timeout_s)
            line = next((ln for ln in lines if ln.startswith("+CUSD:")), None)
            if line is None:
                try:
                    line = self._ussd_answers.get(timeout=timeout_s)
                except queue.Empty:
                    try:
                        self._command("AT+CUSD=2")  # end the session so the next request is not refused
                    except ModemUnavailable:
                        raise
                    except ModemError:
                        pass
                    raise ModemError(f"no USSD answer to {code} within {timeout_s:g} s") from None
        match = _CUSD_RE.match(line)
        if match is None or match.group(2) is None:
            raise ModemError(f"USSD answer without text: {line[:60]!r}")
        dcs = int(match.group(3)) if match.group(3) else None
        return decode_ussd_text(match.group(2), dcs)

    def storage_use(self) -> list[StorageUse]:
        """How full the SIM ("SM") and, where the modem has it, the modem's own ("ME") message memory are: each
        memory is selected and read with ``AT+CPMS?`` (its first ``"<mem>",used,total``). A memory the modem
        refuses is left out.

        Raises ModemUnavailable (link lost, no answer), ModemError (no memory could be read).
        """
        gsm = self._require()
        found: list[StorageUse] = []
        refused: list[str] = []
        with gsm.command_lock:
            for memory in (m for m in _STORAGE_MEMORIES if m in self._memories):
                try:
                    gsm.select_memory(memory)
                    lines = gsm.write("AT+CPMS?") or []
                except (LinkDown, TimeoutException) as exc:
                    raise ModemUnavailable(f"reading {memory} storage: no answer ({exc!r})") from exc
                except CommandError as exc:
                    refused.append(f"{memory}: {exc}")
                    continue
                match = self._first_match(_CPMS_READ_RE, lines)
                if match is None or match.group(1).upper() != memory:
                    refused.append(f"{memory}: unreadable answer {lines[:1]!r}")
                    continue
                found.append(StorageUse(memory, int(match.group(2)), int(match.group(3))))
        if not found:
            raise ModemError(f"storage unreadable ({'; '.join(refused) or 'no memory'})")
        return found

    # ---------------------------------------------------------- supervisor support: probe, settings, identity, PIN

    def probe(self, deadline_s: float) -> bool:
        """Watchdog probe: True if ``AT`` is answered within ``deadline_s``. The deadline is fixed: URCs and
        noise lines arriving meanwhile do not extend it. Never raises.

        While another command holds the line for longer than ``deadline_s`` (a send waits up to
        ``send_timeout_s``) this returns :attr:`alive`: that command ends with its own time-out, and the next
        probe tells.
        """
        gsm = self._gsm
        if gsm is None or not gsm.alive:
            return False
        if not gsm.command_lock.acquire(timeout=deadline_s):
            return self.alive
        try:
            gsm.write("AT", timeout=deadline_s)
            return True
        except (LinkDown, TimeoutException, CommandError):
            return False
        finally:
            gsm.command_lock.release()

    def settings_hold(self) -> bool:
        """True while the settings :meth:`connect` made still hold: echo off, PDU mode (``AT+CMGF?`` 0), new SMS
        stored and announced (``AT+CNMI?`` mt 1). False once the modem reset them, i.e. it restarted.

        Raises ModemUnavailable (no answer), ModemError (refused or unreadable answer: cannot tell).
        """
        cmgf = self._command("AT+CMGF?")
        cnmi = self._command("AT+CNMI?")
        echoed = any(line.strip().upper().startswith("AT") for line in cmgf + cnmi)
        mode = self._first_match(_CMGF_RE, cmgf)
        indication = self._first_match(_CNMI_RE, cnmi)
        if mode is None or indication is None:
            raise ModemError(f"unreadable +CMGF/+CNMI answer: {(cmgf + cnmi)[:4]}")
        return not echoed and mode.group(1) == "0" and indication.group(1) == "1"

    def read_identity(self) -> ModemIdentity:
        """IMEI (``AT+CGSN``), ICCID (``AT+CCID``, else ``AT^ICCID?``) and IMSI (``AT+CIMI``) of the connected
        modem and SIM; a value the modem refuses or garbles is "". Raises ModemUnavailable."""
        imei = self._identity_value(("AT+CGSN",), _IMEI_RE)
        iccid = self._identity_value(("AT+CCID", "AT^ICCID?"), _ICCID_RE)
        imsi = self._identity_value(("AT+CIMI",), _IMSI_RE)
        return ModemIdentity(imei=imei, iccid=iccid.upper(), imsi=imsi)

    def _identity_value(self, commands: tuple[str, ...], pattern: re.Pattern[str]) -> str:
        """The first answer line matching ``pattern`` of the first command that has one, else "". Raises
        ModemUnavailable."""
        for command in commands:
            try:
                lines = self._command(command)
            except ModemUnavailable:
                raise
            except ModemError:
                continue
            match = self._first_match(pattern, [line.strip() for line in lines])
            if match:
                return match.group(1)
        return ""

    def _sim_state(self, gsm: FixedGsmModem) -> str:
        """``AT+CPIN?``: "READY", "SIM PIN", "SIM PUK", ... Raises LinkDown, TimeoutException, CommandError."""
        match = self._first_match(_CPIN_RE, [ln.strip() for ln in gsm.write("AT+CPIN?", timeout=15) or []])
        if match is None:
            raise CommandError("AT+CPIN?")
        return match.group(1).strip('"').upper()

    def _unlock_sim(self, gsm: FixedGsmModem) -> None:
        """The init dialogue's SIM check (instead of the library's): nothing when the SIM is ready; the PIN
        ``sim_unlock`` allows, once, when it asks for its PIN; SimLocked for anything else (a PUK, a rejected
        PIN, no PIN to give). Raises SimLocked, LinkDown, TimeoutException, CommandError."""
        state = self._sim_state(gsm)
        if state == "READY":
            return
        if state != "SIM PIN":
            raise SimLocked(state, f"the SIM asks for {state}, which the gateway never enters")
        if self._sim_unlock is None:
            raise SimLocked(state, "the SIM asks for its PIN and none is configured")
        pin = self._sim_unlock.pin_to_try()  # raises SimLocked when it must not be tried
        try:
            gsm.write(f'AT+CPIN="{pin}"', timeout=15)
        except CommandError as exc:
            self._sim_unlock.rejected()
            raise SimLocked(state, f"the SIM rejected the configured PIN ({exc})", rejected=True) from exc
        self._sim_unlock.accepted()
        logger.info("SIM PIN accepted by the modem on %s", self.port)
        # The SIM is busy for a moment after its PIN (CME 14); the init dialogue needs it ready.
        deadline = time.monotonic() + _PIN_READY_WAIT_S
        while time.monotonic() < deadline:
            with contextlib.suppress(CommandError):
                if self._sim_state(gsm) == "READY":
                    return
            time.sleep(0.2)

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
            raise SendFailed(None, str(exc), invalid=True) from exc
        references: list[int] = []
        for number, pdu in enumerate(pdus, start=1):
            try:
                references.append(self._send_part(gsm, pdu))
            except SendOutcomeUnknown as exc:
                raise SendOutcomeUnknown(f"part {number}/{len(pdus)}: {exc.reason}", tuple(references)) from exc
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
                prompt = (
                    gsm.write(f"AT+CMGS={pdu.tpdu_length}", timeout=_PROMPT_TIMEOUT_S, expectedResponseTermSeq="> ")
                    or []
                )
            except (CmsError, CmeError) as exc:
                raise SendFailed(exc.code, f"AT+CMGS refused: {exc}", source=_error_source(exc)) from exc
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
                raise SendFailed(exc.code, f"network refused the SMS: {exc}", source=_error_source(exc)) from exc
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
        elif head.startswith("+CUSD:"):
            self._ussd_answers.put(head)  # the network's answer to ussd(), after its OK
        elif head.startswith(("+CMT:", "+CDS:")) and len(lines) > 1:
            # Direct delivery (only if something reconfigured CNMI): handled rather than lost.
            self._events.put(_DirectEvent(lines[1].strip()))
        elif self._on_boot is not None and _BOOT_RE.match(head):
            self._on_boot(head)
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
                seq,
                total,
                reference,
                decoded.sender,
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
            logger.error("undecodable PDU in a +CMT could not be handed over (%s): %s; pdu=%s", failure, reason, pdu)
            return
        if location in self._unreadable_logged:
            logger.debug("undecodable PDU at %s/%d still on the SIM (%s)", memory, index, failure)
            return
        self._unreadable_logged[location] = None
        if len(self._unreadable_logged) > _UNDELETED_MAX:
            del self._unreadable_logged[next(iter(self._unreadable_logged))]
        logger.error(
            "undecodable PDU at %s/%d left on the SIM (%s; logged once): %s; pdu=%s",
            memory,
            index,
            failure,
            reason,
            pdu,
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
                key[1],
                self._multipart_timeout_s,
                len(buffer.parts),
                total,
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


# ---------------------------------------------------------------------------- supervisor support (identity, PIN)


@dataclass(frozen=True)
class ModemIdentity:
    """Who the modem is: IMEI (the device), ICCID (the SIM card) and IMSI (the subscriber); "" when unknown."""

    imei: str
    iccid: str
    imsi: str


class SimLocked(ModemError):
    """The SIM needs a PIN or PUK the gateway may not enter (none configured, already rejected, a PUK).
    ``state`` is the ``AT+CPIN?`` answer; ``rejected`` is True when the SIM refused the PIN just entered."""

    def __init__(self, state: str, detail: str, *, rejected: bool = False) -> None:
        super().__init__(detail)
        self.state = state
        self.detail = detail
        self.rejected = rejected


class SimUnlock(Protocol):
    """Decides whether a SIM asking for its PIN gets one (see ``modem_worker.sim_pin``)."""

    def pin_to_try(self) -> str:
        """The PIN to enter now. Raises SimLocked when none may be tried."""

    def accepted(self) -> None:
        """The SIM took the PIN just given."""

    def rejected(self) -> None:
        """The SIM refused the PIN just given."""


def read_imei(port: str, *, baudrate: int = 115200, timeout_s: float = 3.0) -> str | None:
    """The IMEI (``AT+CGSN``) of the modem on ``port``, read without the init dialogue, so no setting of the
    modem changes. None when the port cannot be opened (missing, or busy: another worker has it), the device does
    not answer or answers no IMEI. Never raises."""
    gsm = FixedGsmModem(
        port,
        baudrate=baudrate,
        on_urc=lambda _lines: None,
        on_link_down=lambda _exc: None,
        request_delivery=False,
        command_timeout_s=timeout_s,
    )
    try:
        gsm.open_port()
        lines = gsm.write("AT+CGSN") or []
    except Exception as exc:  # serial errors, no answer, refused: this port has no IMEI to offer now
        logger.debug("no IMEI from %s: %r", port, exc)
        return None
    finally:
        gsm.close()
    for line in lines:
        match = _IMEI_RE.match(line.strip())
        if match:
            return match.group(1)
    return None
