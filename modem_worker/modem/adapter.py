"""The adapter facade: :class:`Modem` connects, closes, routes the modem's unsolicited lines to its parts and
answers the simple health queries (signal, battery, registration, storage). The delivery contract is in
:mod:`modem_worker.modem`."""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Callable
from typing import Final

from .at_fixes import CommandError, FixedGsmModem, LinkDown, TimeoutException
from .channel import AtChannel, first_match
from .errors import ModemError, ModemUnavailable, SimLocked
from .events import ModemListener, QuietListener
from .identity import IdentityQueries, SimGate, SimUnlock
from .messages import (
    ModemIdentity,
    ModemInfo,
    ReceivedMessage,
    SendReceipt,
    StatusReport,
    StorageUse,
    UnreadableMessage,
)
from .pending import PendingDeletes
from .receiver import Receiver
from .sender import Sender
from .ussd import Ussd

logger = logging.getLogger(__name__)

_CMTI_RE: Final[re.Pattern[str]] = re.compile(r'^\+(?:CMTI|CDSI):\s*"([^"]+)",\s*(\d+)')
_CSQ_RE: Final[re.Pattern[str]] = re.compile(r"^\+CSQ:\s*(\d+)")
_CBC_RE: Final[re.Pattern[str]] = re.compile(r"^\+CBC:\s*\d+\s*,\s*(\d+)")
_CREG_RE: Final[re.Pattern[str]] = re.compile(r"^\+CREG:\s*(?:\d+\s*,\s*)?(\d+)")
_CNUM_RE: Final[re.Pattern[str]] = re.compile(r'^\+CNUM:\s*"[^"]*"\s*,\s*"([^"]+)"')
_SWEEP_MEMORIES: Final[tuple[str, ...]] = ("SM", "ME", "SR")
# Lines a modem writes when it (re)starts. Only a hint: ^BOOT is also periodic noise on Huawei sticks, so the
# supervisor checks the settings before it believes in a reboot.
_BOOT_RE: Final[re.Pattern[str]] = re.compile(r"^(RDY|\^BOOT|\+CFUN:\s*1\b|\+CPIN:\s*READY|SMS DONE|PB DONE)")
_STORAGE_MEMORIES: Final[tuple[str, ...]] = ("SM", "ME")  # where received SMS are stored (SR holds reports)
_CPMS_READ_RE: Final[re.Pattern[str]] = re.compile(r'^\+CPMS:\s*"([^"]+)"\s*,\s*(\d+)\s*,\s*(\d+)')


class Modem:
    """One GSM modem: connect, send, receive (via callbacks), status reports, health queries.

    Callbacks run on the adapter's worker thread, or on the thread calling :meth:`sweep_stored` (the listener's
    ``link_lost`` on the thread that saw the link die). A callback that raises leaves the SIM copy in place for
    the next :meth:`sweep_stored`.
    """

    def __init__(
        self,
        port: str,
        *,
        on_message: Callable[[ReceivedMessage], None],
        on_status_report: Callable[[StatusReport], None],
        on_unreadable: Callable[[UnreadableMessage], None] | None = None,
        baudrate: int = 115200,
        request_delivery: bool = True,
        send_timeout_s: float = 35.0,
        command_timeout_s: float = 10.0,
        multipart_timeout_s: float = 600.0,
        sim_unlock: SimUnlock | None = None,
        listener: ModemListener | None = None,
        pending_deletes: PendingDeletes | None = None,
    ) -> None:
        """Store the configuration; nothing is opened until :meth:`connect`.

        ``listener`` hears the modem's own events: boot-like unsolicited lines (``RDY``, ``+CPIN: READY``, ...,
        a hint that the modem may have restarted) and the loss of the link; without one both are only logged.

        ``sim_unlock`` decides whether a SIM asking for its PIN gets one (without it such a SIM is refused with
        :class:`SimLocked`). ``on_unreadable`` receives stored PDUs that cannot be decoded; the entry is deleted
        from the SIM only after it returned. Without it such entries stay on the SIM (logged once each).

        ``pending_deletes`` remembers delivered copies whose SIM delete failed; pass the same one to every adapter
        of a process so that a later connection deletes such a copy without delivering it again (default: this
        adapter's own, gone with it).
        """
        self.port = port
        self._listener: ModemListener = listener or QuietListener()
        self._baudrate = baudrate
        self._request_delivery = request_delivery
        self._command_timeout_s = command_timeout_s
        self._channel = AtChannel(port)
        self._receiver = Receiver(
            self._channel,
            on_message=on_message,
            on_status_report=on_status_report,
            on_unreadable=on_unreadable,
            multipart_timeout_s=multipart_timeout_s,
            pending_deletes=pending_deletes,
        )
        self._sender = Sender(self._channel, request_delivery=request_delivery, send_timeout_s=send_timeout_s)
        self._identity = IdentityQueries(self._channel)
        self._sim_gate = SimGate(port, sim_unlock)
        self._ussd = Ussd(self._channel)
        self._memories: tuple[str, ...] = ("SM",)
        self._fatal_lock = threading.Lock()
        self._fatal_fired = False

    # ------------------------------------------------------------------ lifecycle

    def connect(self) -> ModemInfo:
        """Open the port exclusively, initialise the modem (PDU mode, SMS stored on the SIM) and start the
        worker thread. Returns the modem's identity.

        Raises ModemUnavailable (port missing or busy, no answer, init refused), SimLocked (the SIM needs a PIN
        or PUK it may not be given); the port is closed and the read thread stopped before it is raised.
        """
        current = self._channel.gsm
        if current is not None and current.alive:
            raise ModemError(f"modem on {self.port} is already connected")
        self.close()  # the remains of a dead connection: its worker and port
        self._fatal_fired = False
        self._receiver.prepare()  # before the port opens: a +CMTI during the init dialogue must not be lost
        gsm = FixedGsmModem(
            self.port,
            baudrate=self._baudrate,
            on_urc=self._on_urc,
            on_link_down=self._link_down,
            request_delivery=self._request_delivery,
            command_timeout_s=self._command_timeout_s,
        )
        gsm.unlock_sim = lambda: self._sim_gate.unlock(gsm)
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
        self._channel.gsm = gsm
        if not gsm.alive:  # died between the init dialogue and here, while link_lost was still muted
            self.close()
            raise ModemUnavailable(f"modem on {self.port} vanished right after connecting")
        self._receiver.start(self.port)
        logger.info("modem on %s connected: %s %s", self.port, info.manufacturer, info.model)
        return info

    def close(self) -> None:
        """Stop the worker, close the port. Idempotent; does not report a lost link."""
        self._receiver.stop()
        gsm, self._channel.gsm = self._channel.gsm, None
        if gsm is not None:
            gsm.close()

    @property
    def alive(self) -> bool:
        """True while the port is open and the read thread runs; False after unplug, a dead read thread or
        close()."""
        return self._channel.alive

    @property
    def at_layer(self) -> FixedGsmModem | None:
        """The AT layer of the current connection (None while closed), for diagnostics and tests."""
        return self._channel.gsm

    def _link_down(self, exc: BaseException) -> None:
        """Called by the AT layer once when the link dies: stop the worker, tell the listener (not while
        connect() is still running: it raises ModemUnavailable itself)."""
        self._receiver.wake_to_stop()
        if self._channel.gsm is None:
            return
        with self._fatal_lock:
            if self._fatal_fired:
                return
            self._fatal_fired = True
        try:
            self._listener.link_lost(ModemUnavailable(f"modem link on {self.port} lost: {exc!r}"))
        except Exception:
            logger.exception("link-lost listener failed")

    def _on_urc(self, lines: list[str]) -> None:
        """Read-thread sink: route SMS/report notifications, USSD answers and boot lines (never issue commands)."""
        head = lines[0]
        match = _CMTI_RE.match(head)
        if match:
            self._receiver.stored(match.group(1), int(match.group(2)))
        elif head.startswith("+CUSD:"):
            self._ussd.answer_arrived(head)  # the network's answer to ussd(), after its OK
        elif head.startswith(("+CMT:", "+CDS:")) and len(lines) > 1:
            # Direct delivery (only if something reconfigured CNMI): handled rather than lost.
            self._receiver.direct(lines[1].strip())
        elif _BOOT_RE.match(head):
            self._listener.boot_line(head)
        else:
            logger.debug("ignored unsolicited line %r", head[:40])

    # ------------------------------------------------------------------ the parts

    def send(self, to: str, text: str) -> SendReceipt:
        """Send ``text`` to ``to`` (see :meth:`Sender.send`, which says what it raises)."""
        return self._sender.send(to, text)

    def sweep_stored(self) -> int:
        """Deliver everything deliverable on the SIM (see :meth:`Receiver.sweep`, which says what it raises)."""
        return self._receiver.sweep(self._memories)

    def ussd(self, code: str, timeout_s: float = 30.0) -> str:
        """The network's decoded answer to the USSD request ``code`` (see :meth:`Ussd.request` for the errors)."""
        return self._ussd.request(code, timeout_s)

    def settings_hold(self) -> bool:
        """True while the settings connect() made still hold (see :meth:`IdentityQueries.settings_hold`)."""
        return self._identity.settings_hold()

    def read_identity(self) -> ModemIdentity:
        """IMEI, ICCID and IMSI (see :meth:`IdentityQueries.read_identity`). Raises ModemUnavailable."""
        return self._identity.read_identity()

    def probe(self, deadline_s: float) -> bool:
        """Watchdog probe: True if ``AT`` is answered within ``deadline_s`` (see :meth:`AtChannel.answers`).
        Never raises."""
        return self._channel.answers(deadline_s)

    def ping(self) -> bool:
        """AT watchdog: True if the modem answers ``AT`` with OK. Never raises.

        While another command (e.g. a send waiting up to ``send_timeout_s``) holds the line, the modem is
        evidently talking, so this returns :attr:`alive` instead of queueing behind it.
        """
        return self._channel.answers(min(self._command_timeout_s, 5.0), lock_wait_s=self._command_timeout_s)

    # ------------------------------------------------------------------ queries

    @staticmethod
    def _query_info(gsm: FixedGsmModem) -> ModemInfo:
        """Read manufacturer, model, IMSI and own number (the last two optional)."""

        def first_line(cmd: str) -> str | None:
            try:
                lines = gsm.write(cmd) or []
            except CommandError:
                return None
            return next((ln.strip() for ln in lines if ln.strip() and ln != "OK"), None)

        own: str | None = None
        try:
            match = first_match(_CNUM_RE, gsm.write("AT+CNUM") or [])
            own = match.group(1) if match else None
        except CommandError:
            own = None
        return ModemInfo(
            own_number=own,
            imsi=first_line("AT+CIMI"),
            manufacturer=first_line("AT+CGMI") or "",
            model=first_line("AT+CGMM") or "",
        )

    @staticmethod
    def _query_memories(gsm: FixedGsmModem) -> tuple[str, ...]:
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
        match = first_match(_CSQ_RE, self._channel.command("AT+CSQ"))
        if match is None:
            raise ModemError("unparsable +CSQ answer")
        value = int(match.group(1))
        return None if value == 99 or value > 31 else value

    def battery_level(self) -> int | None:
        """Return the battery charge in percent (AT+CBC), None if the modem does not report it.

        Raises ModemUnavailable."""
        try:
            lines = self._channel.command("AT+CBC")
        except ModemUnavailable:
            raise
        except ModemError:
            return None
        match = first_match(_CBC_RE, lines)
        return int(match.group(1)) if match else None

    def is_registered(self) -> bool:
        """Return True if registered on the home network or roaming (AT+CREG? stat 1 or 5).

        Raises ModemUnavailable, ModemError."""
        match = first_match(_CREG_RE, self._channel.command("AT+CREG?"))
        return match is not None and int(match.group(1)) in (1, 5)

    def storage_use(self) -> list[StorageUse]:
        """How full the SIM ("SM") and, where the modem has it, the modem's own ("ME") message memory are: each
        memory is selected and read with ``AT+CPMS?`` (its first ``"<mem>",used,total``). A memory the modem
        refuses is left out.

        Raises ModemUnavailable (link lost, no answer), ModemError (no memory could be read).
        """
        gsm = self._channel.require()
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
                match = first_match(_CPMS_READ_RE, lines)
                if match is None or match.group(1).upper() != memory:
                    refused.append(f"{memory}: unreadable answer {lines[:1]!r}")
                    continue
                found.append(StorageUse(memory, int(match.group(2)), int(match.group(3))))
        if not found:
            raise ModemError(f"storage unreadable ({'; '.join(refused) or 'no memory'})")
        return found
