"""The simulated modem's state: memories (SM, ME, SR), outbox, behaviour and fault knobs, SIM lock, AT session.

Everything here is guarded by `ModemModel.lock`; methods that touch state take it themselves (it is re-entrant,
so the AT engine may hold it across a multi-step command). Nothing here does I/O: methods return the bytes of
the unsolicited result codes (URCs) to write, and the caller writes them to the pty.
"""

from __future__ import annotations

import random
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from . import jsonlog
from .behaviour import Behaviour, Delivery
from .pdu import (
    TP_STATUS_DELIVERED,
    TP_STATUS_FAILED,
    DecodedPdu,
    Encoding,
    build_deliver,
    build_status_report,
    decode_text,
    local_datetime,
)

SM = "SM"
ME = "ME"
SR = "SR"
MEMORIES = (SM, ME, SR)
STORE_MEMORIES = (SM, ME)  # where SMS can be stored (<mem2>/<mem3> of +CPMS); SR holds status reports only

# 27.005 <stat> values in PDU mode.
STAT_REC_UNREAD = 0
STAT_REC_READ = 1
STAT_STO_UNSENT = 2
STAT_STO_SENT = 3

AT_LOG_LIMIT = 100_000

CMS_MEMORY_FULL = 322
CMS_NO_NETWORK = 331

# +CPIN states (27.007 8.3) and the PIN tries a SIM allows before it asks for the PUK.
SIM_READY = "READY"
SIM_PIN = "SIM PIN"
SIM_PUK = "SIM PUK"
PIN_TRIES = 3


class SimFullError(Exception):
    """The SIM has too few free slots for the message(s) (27.005 +CMS ERROR: 322)."""


@dataclass
class StoredSms:
    """One record in SM or SR memory."""

    index: int
    memory: str
    stat: int
    pdu: str
    tpdu_length: int
    sender: str
    text: str
    timestamp_ms: int
    part: tuple[int, int, int] | None
    kind: Literal["deliver", "status-report", "stored"]


@dataclass
class Session:
    """AT settings of the current connection: a replug resets them to the simulator's convenient profile below,
    a reboot to a real modem's power-on profile (power_on)."""

    echo: bool = False  # a simulator convenience: real modems start with echo on
    cmee: int = 1
    # +CNMI <mt>, <ds>. Default 1/2 (store + notify) rather than a real modem's 0/0 so that an un-configured
    # client still sees +CMTI/+CDSI.
    cnmi_mode: int = 2
    cnmi_mt: int = 1
    cnmi_ds: int = 2
    mem_read: str = SM
    mem_write: str = SM
    mem_store: str = SM  # <mem3>: where the network's SMS are stored
    cscs: str = "GSM"
    creg_n: int = 0
    cmgf: int = 0
    smsc: str = ""

    @classmethod
    def power_on(cls, smsc: str) -> Session:
        """The settings of a real modem right after it booted (POST /reboot): echo on, text mode, no new-SMS
        indications, plain ERROR, the IRA character set. A worker must configure all of these again."""
        return cls(echo=True, cmee=0, cnmi_mode=0, cnmi_mt=0, cnmi_ds=0, cscs="IRA", cmgf=1, smsc=smsc)


@dataclass
class _PendingParts:
    """Parts of one concatenated outgoing SMS received so far."""

    total: int
    encoding: Encoding
    parts: dict[int, tuple[int, bytes, Encoding]] = field(default_factory=dict)  # seq -> (mr, payload, enc)


@dataclass(frozen=True)
class ReportRequest:
    """A status report to produce `delay_s` after a successful SMS-SUBMIT."""

    reference: int
    recipient: str
    submitted_ms: int
    delivery: Delivery
    delay_s: float


class ModemModel:
    """State of one simulated modem plus the operations the AT engine and control API perform on it."""

    def __init__(
        self,
        own_number: str,
        capacity: int,
        smsc: str,
        clock_ms: Callable[[], int] = lambda: int(time.time() * 1000),
        *,
        me_capacity: int | None = None,
    ) -> None:
        """Create an empty SIM with `capacity` slots per SIM memory (SM and SR) and `me_capacity` (default:
        `capacity`) in the modem's own memory (ME).

        Raises ValueError for a capacity outside 1..255.
        """
        if capacity < 1 or capacity > 255:
            raise ValueError("capacity must be within 1..255")
        me_capacity = capacity if me_capacity is None else me_capacity
        if me_capacity < 1 or me_capacity > 255:
            raise ValueError("ME capacity must be within 1..255")
        self.lock = threading.RLock()
        self.own_number = own_number
        self.capacity = capacity
        self.capacities: dict[str, int] = {SM: capacity, ME: me_capacity, SR: capacity}
        self.default_smsc = smsc
        self.clock_ms = clock_ms
        self.behaviour = Behaviour()
        self.session = Session(smsc=smsc)
        self.memories: dict[str, dict[int, StoredSms]] = {SM: {}, ME: {}, SR: {}}
        self.outbox: list[dict[str, Any]] = []
        # Bounded: a long benchmark must not grow the simulator without limit.
        self.at_log: deque[str] = deque(maxlen=AT_LOG_LIMIT)
        self._pending: dict[tuple[str, int, int], _PendingParts] = {}
        self._next_mr = 0
        self._next_concat_ref = 1
        # SMS the network could not deliver yet (storage full, SIM locked): retried in order, like an SMSC.
        self.network_pending: list[tuple[str, str, int, str | None]] = []
        self.sim_status = SIM_READY
        self.pin_tries_left = PIN_TRIES
        self.pin_attempts = 0  # every AT+CPIN=<pin> received, right or wrong
        self.block_remaining: int | None = None  # successful sends left before the operator bars the SIM
        self.boots = 0
        self.hang_discarded_bytes = 0
        self.noise_rng = random.Random(0)

    # --- SIM memory ---------------------------------------------------------------------------------------------

    def free_slots(self, memory: str) -> int:
        """Number of free indices in `memory` (0 for SM/ME while the `storage` fault says full)."""
        with self.lock:
            if memory in STORE_MEMORIES and self.behaviour.storage == "full":
                return 0
            return self.capacities[memory] - len(self.memories[memory])

    def used_slots(self, memory: str) -> int:
        """Used indices of `memory` as +CPMS reports them (all of SM/ME while the `storage` fault says full)."""
        with self.lock:
            if memory in STORE_MEMORIES and self.behaviour.storage == "full":
                return self.capacities[memory]
            return len(self.memories[memory])

    def _store(self, memory: str, record: StoredSms) -> int:
        """Store `record` at the lowest free index (1-based) of `memory` and return the index.

        Raises SimFullError when the memory is full (or the `storage` fault says so).
        """
        if self.free_slots(memory) <= 0:
            raise SimFullError(memory)
        slots = self.memories[memory]
        for index in range(1, self.capacities[memory] + 1):
            if index not in slots:
                record.index = index
                record.memory = memory
                slots[index] = record
                return index
        raise SimFullError(memory)

    def reset_session(self) -> None:
        """Forget AT settings (the modem was re-enumerated); SIM contents, outbox and counters stay."""
        with self.lock:
            self.session = Session(smsc=self.default_smsc)

    def reboot(self) -> None:
        """The modem restarted: power-on AT settings, the hang ends, a PIN-protected SIM asks for its PIN again
        (the tries left and a PUK lock survive: the SIM counts them). Stored SMS, outbox and counters stay."""
        with self.lock:
            self.session = Session.power_on(self.default_smsc)
            self.behaviour.hang = False
            if self.behaviour.pin is not None and self.sim_status == SIM_READY:
                self.sim_status = SIM_PIN
            self.boots += 1

    # --- SIM lock (PIN) -----------------------------------------------------------------------------------------

    def enter_pin(self, pin: str) -> str | None:
        """AT+CPIN=<pin>: count the attempt and unlock on the right PIN. Returns None on success, else the
        reason: "not needed" (SIM ready), "puk" (SIM blocked), "wrong" (a try used up)."""
        with self.lock:
            self.pin_attempts += 1
            if self.sim_status == SIM_READY:
                return "not needed"
            if self.sim_status == SIM_PUK:
                return "puk"
            if pin == self.behaviour.pin:
                self.sim_status = SIM_READY
                self.pin_tries_left = PIN_TRIES
                jsonlog.event("pin_accepted", attempts=self.pin_attempts)
                return None
            self.pin_tries_left -= 1
            if self.pin_tries_left <= 0:
                self.sim_status = SIM_PUK
            # Never log the PIN itself, right or wrong.
            jsonlog.event("pin_rejected", tries_left=self.pin_tries_left, sim_status=self.sim_status)
            return "wrong"

    # --- faults set through the control API ---------------------------------------------------------------------

    def apply_behaviour(self, changes: dict[str, Any]) -> list[bytes]:
        """Validate and apply POST /state changes with their side effects (a new PIN locks the SIM again,
        block_after restarts its count, a noise seed restarts the noise sequence). Returns the URCs of SMS the
        network can now deliver (storage freed). Raises ValueError (nothing changed) on invalid input."""
        with self.lock:
            self.behaviour.update(changes)
            if "pin" in changes:
                self.sim_status = SIM_READY if self.behaviour.pin is None else SIM_PIN
                self.pin_tries_left = PIN_TRIES
            if "block_after" in changes:
                self.block_remaining = self.behaviour.block_after
            if "noise" in changes or "noise_seed" in changes:
                self.noise_rng = random.Random(self.behaviour.noise_seed)
            return self.deliver_pending()

    def send_refusal(self, address: str) -> int | None:
        """The +CMS ERROR code a send to `address` fails with because of an operator fault (barred SIM,
        rejected recipient), or None when it may go. Called with the lock held, before fail_sends."""
        b = self.behaviour
        if self.block_remaining is not None and self.block_remaining <= 0:
            return b.block_cms
        if any(address.startswith(prefix) for prefix in b.reject_numbers):
            return b.reject_cms
        return None

    def count_sent(self) -> None:
        """One send succeeded: count it towards block_after."""
        with self.lock:
            if self.block_remaining is not None and self.block_remaining > 0:
                self.block_remaining -= 1
                if self.block_remaining == 0:
                    jsonlog.event("sim_barred", cms_error=self.behaviour.block_cms)

    # --- incoming SMS -------------------------------------------------------------------------------------------

    def _network_blocked(self) -> bool:
        """True while the network cannot hand SMS to the modem: SIM locked, or storage full (`storage` fault)."""
        return self.sim_status != SIM_READY or self.behaviour.storage == "full"

    def inject(
        self, messages: Sequence[tuple[str, str, int | None] | tuple[str, str, int | None, str | None]]
    ) -> tuple[list[list[int]], list[bytes]]:
        """Deliver SMS `(sender, text, timestamp_ms or None[, memory or None])` from the network to the modem.

        Stores every part in `memory` (default: +CPMS <mem3>, SM unless the client chose ME; unless +CNMI
        mt=2/3 asks for direct +CMT delivery) and
        returns the indices per message and one URC chunk per part (+CMTI, or +CMT with the PDU; none when
        mt=0). While the SIM is locked or the `storage` fault is on, the messages stay pending in the network
        (indices []) and arrive later in order. All or nothing: raises SimFullError when the parts do not all
        fit, PduError (a ValueError) when a sender is unusable, ValueError for an unknown memory.
        """
        with self.lock:
            staged: list[tuple[str, str, int, str | None]] = []
            for message in messages:
                sender, text, ts = message[:3]
                memory = message[3] if len(message) > 3 else None
                if memory is not None and memory not in STORE_MEMORIES:
                    raise ValueError(f"memory must be one of {', '.join(STORE_MEMORIES)}")
                ts_ms = self.clock_ms() if ts is None else int(ts)
                build_deliver(sender, text, local_datetime(ts_ms), self.session.smsc, 0)  # PduError early
                staged.append((sender, text, ts_ms, memory))
            direct = self.session.cnmi_mt in (2, 3)
            if self.network_pending or (self._network_blocked() and not (direct and self.sim_status == SIM_READY)):
                self.network_pending.extend(staged)
                jsonlog.event("sms_pending_in_network", count=len(staged), pending=len(self.network_pending))
                return [[] for _ in staged], self.deliver_pending()
            return self._deliver(staged)

    def _deliver(self, staged: Sequence[tuple[str, str, int, str | None]]) -> tuple[list[list[int]], list[bytes]]:
        """Store (or deliver directly) validated messages; all or nothing. Raises SimFullError."""
        built = []
        for sender, text, ts_ms, memory in staged:
            ref = self._next_concat_ref
            parts = build_deliver(sender, text, local_datetime(ts_ms), self.session.smsc, ref)
            if len(parts) > 1:
                # Only multipart texts consume a concatenation reference, as with a real SMSC.
                self._next_concat_ref = (ref + 1) % 256
            built.append((sender, ts_ms, memory or self.session.mem_store, parts))
        direct = self.session.cnmi_mt in (2, 3)
        if not direct:
            for memory in STORE_MEMORIES:
                needed = sum(len(parts) for _, _, mem, parts in built if mem == memory)
                if needed > self.free_slots(memory):
                    jsonlog.event("sim_full", memory=memory, parts=needed, free=self.free_slots(memory))
                    raise SimFullError(memory)
        indices: list[list[int]] = []
        urcs: list[bytes] = []
        for sender, ts_ms, memory, parts in built:
            got: list[int] = []
            for p in parts:
                if direct:
                    urcs.append(f"\r\n+CMT: ,{p.tpdu_length}\r\n{p.pdu}\r\n".encode())
                    continue
                record = StoredSms(
                    0, memory, STAT_REC_UNREAD, p.pdu, p.tpdu_length, sender, p.text, ts_ms, p.part, "deliver"
                )
                index = self._store(memory, record)
                got.append(index)
                if self.session.cnmi_mt == 1:
                    urcs.append(f'\r\n+CMTI: "{memory}",{index}\r\n'.encode())
            indices.append(got)
            jsonlog.event(
                "sms_injected",
                sender=sender,
                parts=len(parts),
                memory=memory,
                indices=got,
                direct=direct,
                encoding=parts[0].encoding,
            )
        return indices, urcs

    def deliver_pending(self) -> list[bytes]:
        """Retry SMS pending in the network, oldest first, while the modem accepts them. Returns their URCs."""
        with self.lock:
            urcs: list[bytes] = []
            while self.network_pending and not self._network_blocked():
                try:
                    _, got = self._deliver(self.network_pending[:1])
                except SimFullError:
                    break  # the SMSC retries later; order is kept
                del self.network_pending[0]
                urcs += got
            return urcs

    def inbox(self) -> list[dict[str, Any]]:
        """Received SMS still stored in SM then ME, by index (the GET /inbox shape, plus "read", "memory")."""
        with self.lock:
            return [
                {
                    "index": r.index,
                    "from": r.sender,
                    "text": r.text,
                    "timestamp": r.timestamp_ms,
                    "part": list(r.part) if r.part else None,
                    "read": r.stat == STAT_REC_READ,
                    "memory": r.memory,
                }
                for memory in STORE_MEMORIES
                for _, r in sorted(self.memories[memory].items())
                if r.kind == "deliver"
            ]

    # --- outgoing SMS -------------------------------------------------------------------------------------------

    def submit(self, sms: DecodedPdu) -> tuple[int, ReportRequest | None]:
        """Accept a decoded SMS-SUBMIT: assign the TP-MR, record it in the outbox (joining concatenated parts),
        and say whether a status report is due. Network/failure knobs are checked by the caller.

        Returns (TP-MR, report request or None).
        """
        with self.lock:
            mr = self._next_mr
            self._next_mr = (mr + 1) % 256
            now = self.clock_ms()
            if sms.concat is None:
                self.outbox.append(
                    {"to": sms.address, "text": sms.text, "reference": mr, "references": [mr], "at": now, "parts": 1}
                )
                jsonlog.event("sms_sent", to=sms.address, reference=mr, parts=1, chars=len(sms.text))
            else:
                ref, total, seq = sms.concat
                key = (sms.address, ref, total)
                pending = self._pending.setdefault(key, _PendingParts(total, sms.encoding))
                pending.parts[seq] = (mr, sms.payload, sms.encoding)
                jsonlog.event("sms_part_sent", to=sms.address, reference=mr, concat_ref=ref, part=seq, total=total)
                if len(pending.parts) >= total:
                    del self._pending[key]
                    ordered = [pending.parts[s] for s in sorted(pending.parts)]
                    self.outbox.append(
                        {
                            "to": sms.address,
                            "text": _join_parts(ordered),
                            "reference": ordered[-1][0],
                            "references": [p[0] for p in ordered],
                            "at": now,
                            "parts": total,
                        }
                    )
                    jsonlog.event("sms_sent", to=sms.address, reference=ordered[-1][0], parts=total)
            report = None
            if sms.status_report_requested and self.behaviour.delivery != "none":
                report = ReportRequest(mr, sms.address, now, self.behaviour.delivery, self.behaviour.delivery_delay_s)
            return mr, report

    def status_report(self, req: ReportRequest) -> bytes:
        """Produce the status report for `req` now: store it in SR with +CDSI (CNMI ds=2), send it as +CDS
        (ds=1) or store it silently (ds=0). Returns the URC bytes (may be empty)."""
        with self.lock:
            status = TP_STATUS_DELIVERED if req.delivery == "delivered" else TP_STATUS_FAILED
            now = self.clock_ms()
            pdu, length = build_status_report(
                req.reference,
                req.recipient,
                submitted=local_datetime(req.submitted_ms),
                discharged=local_datetime(now),
                status=status,
                smsc=self.session.smsc,
            )
            ds = self.session.cnmi_ds
            if ds == 1:
                jsonlog.event("status_report", reference=req.reference, status=status, direct=True)
                return f"\r\n+CDS: {length}\r\n{pdu}\r\n".encode()
            record = StoredSms(0, SR, STAT_REC_UNREAD, pdu, length, req.recipient, "", now, None, "status-report")
            try:
                index = self._store(SR, record)
            except SimFullError:
                jsonlog.event("status_report_dropped", reference=req.reference, reason="SR memory full")
                return b""
            jsonlog.event("status_report", reference=req.reference, status=status, index=index)
            return f'\r\n+CDSI: "SR",{index}\r\n'.encode() if ds == 2 else b""

    def store_written(self, sms: DecodedPdu, pdu: str, stat: int) -> int:
        """AT+CMGW: store a PDU written by the client in <mem2> (SM or ME). Raises SimFullError when it is full."""
        with self.lock:
            memory = self.session.mem_write
            record = StoredSms(
                0, memory, stat, pdu, sms.tpdu_length, sms.address, sms.text, self.clock_ms(), sms.concat, "stored"
            )
            return self._store(memory, record)

    # --- control API views --------------------------------------------------------------------------------------

    def state(self) -> dict[str, Any]:
        """The GET /state document: the behaviour knobs plus read-only facts (prefixed by nothing, additive)."""
        with self.lock:
            doc = asdict(self.behaviour)
            doc.update(
                {
                    "own_number": self.own_number,
                    "capacity": self.capacity,
                    "smsc": self.session.smsc,
                    "sm_used": len(self.memories[SM]),
                    "sr_used": len(self.memories[SR]),
                    "me_used": len(self.memories[ME]),
                    "me_capacity": self.capacities[ME],
                    "next_reference": self._next_mr,
                    "network_pending": len(self.network_pending),
                    "sim_status": self.sim_status,
                    "pin_tries_left": self.pin_tries_left,
                    "pin_attempts": self.pin_attempts,
                    "block_remaining": self.block_remaining,
                    "blocked": self.block_remaining is not None and self.block_remaining <= 0,
                    "boots": self.boots,
                    "hang_discarded_bytes": self.hang_discarded_bytes,
                    "echo": self.session.echo,
                    "cmgf": self.session.cmgf,
                    "cnmi": [self.session.cnmi_mt, self.session.cnmi_ds],
                    "cmee": self.session.cmee,
                }
            )
            return doc

    def outbox_copy(self) -> list[dict[str, Any]]:
        """A deep-enough copy of the outbox for callers outside the lock."""
        with self.lock:
            return [dict(e, references=list(e["references"])) for e in self.outbox]

    def log_copy(self) -> list[str]:
        """A copy of the AT command log."""
        with self.lock:
            return list(self.at_log)


def _join_parts(parts: Sequence[tuple[int, bytes, Encoding]]) -> str:
    """Join part payloads before decoding so an escape or surrogate pair split across parts survives; fall
    back to per-part decoding when the parts use different alphabets."""
    encodings = {enc for _, _, enc in parts}
    if len(encodings) == 1:
        return decode_text(parts[0][2], b"".join(p for _, p, _ in parts))
    return "".join(decode_text(enc, p) for _, p, enc in parts)
