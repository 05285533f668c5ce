"""The simulated modem's state: SIM memories (SM, SR), outbox, network/behaviour knobs and AT session settings.

Everything here is guarded by `ModemModel.lock`; methods that touch state take it themselves (it is re-entrant,
so the AT engine may hold it across a multi-step command). Nothing here does I/O: methods return the bytes of
the unsolicited result codes (URCs) to write, and the caller writes them to the pty.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from . import jsonlog
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
SR = "SR"
MEMORIES = (SM, SR)

# 27.005 <stat> values in PDU mode.
STAT_REC_UNREAD = 0
STAT_REC_READ = 1
STAT_STO_UNSENT = 2
STAT_STO_SENT = 3

AT_LOG_LIMIT = 100_000

CMS_MEMORY_FULL = 322
CMS_NO_NETWORK = 331

Delivery = Literal["delivered", "failed", "none"]


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
class Behaviour:
    """The knobs of POST /state (see docs/simulator.md)."""

    signal: int = 20
    battery: int = 100
    registered: bool = True
    fail_sends: int = 0
    cms_error: int = 500
    delivery: Delivery = "delivered"
    delivery_delay_s: float = 1.0
    reply_delay_s: float = 0.0
    send_delay_s: float = 0.0

    def update(self, changes: dict[str, Any]) -> None:
        """Validate and apply a subset of fields; nothing is applied if any value is invalid.

        Raises ValueError naming the offending key.
        """
        staged = asdict(self)
        for key, value in changes.items():
            if key not in staged:
                raise ValueError(f"unknown state key {key!r}")
            staged[key] = _validate(key, value)
        for key, value in staged.items():
            setattr(self, key, value)


def _validate(key: str, value: Any) -> Any:
    """Check one Behaviour value; return it. Raises ValueError when out of range or mistyped."""
    ranges: dict[str, tuple[float, float]] = {
        "signal": (0, 31),
        "battery": (0, 100),
        "fail_sends": (0, 1_000_000),
        "cms_error": (0, 999),
    }
    if key == "registered":
        if not isinstance(value, bool):
            raise ValueError("registered must be a boolean")
    elif key == "delivery":
        if value not in ("delivered", "failed", "none"):
            raise ValueError('delivery must be "delivered", "failed" or "none"')
    elif key in ranges:
        lo, hi = ranges[key]
        # 99 is +CSQ's "not known or not detectable".
        valid = (
            isinstance(value, int)
            and not isinstance(value, bool)
            and (lo <= value <= hi or (key == "signal" and value == 99))
        )
        if not valid:
            raise ValueError(f"{key} must be an integer in [{lo:g}, {hi:g}]" + (" or 99" if key == "signal" else ""))
    else:  # the *_delay_s keys
        if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 3600:
            raise ValueError(f"{key} must be a number of seconds in [0, 3600]")
        value = float(value)
    return value


@dataclass
class Session:
    """AT settings of the current connection; a replug (new pty = modem rebooted) resets them."""

    echo: bool = False  # a simulator convenience: real modems start with echo on
    cmee: int = 1
    # +CNMI <mt>, <ds>. Default 1/2 (store + notify) rather than a real modem's 0/0 so that an un-configured
    # client still sees +CMTI/+CDSI.
    cnmi_mt: int = 1
    cnmi_ds: int = 2
    mem_read: str = SM
    cscs: str = "GSM"
    creg_n: int = 0
    cmgf: int = 0
    smsc: str = ""


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
    ) -> None:
        """Create an empty SIM with `capacity` slots per memory (SM and SR)."""
        if capacity < 1 or capacity > 255:
            raise ValueError("capacity must be within 1..255")
        self.lock = threading.RLock()
        self.own_number = own_number
        self.capacity = capacity
        self.default_smsc = smsc
        self.clock_ms = clock_ms
        self.behaviour = Behaviour()
        self.session = Session(smsc=smsc)
        self.memories: dict[str, dict[int, StoredSms]] = {SM: {}, SR: {}}
        self.outbox: list[dict[str, Any]] = []
        # Bounded: a long benchmark must not grow the simulator without limit.
        self.at_log: deque[str] = deque(maxlen=AT_LOG_LIMIT)
        self._pending: dict[tuple[str, int, int], _PendingParts] = {}
        self._next_mr = 0
        self._next_concat_ref = 1

    # --- SIM memory ---------------------------------------------------------------------------------------------

    def free_slots(self, memory: str) -> int:
        """Number of free indices in `memory`."""
        with self.lock:
            return self.capacity - len(self.memories[memory])

    def _store(self, memory: str, record: StoredSms) -> int:
        """Store `record` at the lowest free index (1-based) of `memory` and return the index.

        Raises SimFullError when the memory is full.
        """
        slots = self.memories[memory]
        for index in range(1, self.capacity + 1):
            if index not in slots:
                record.index = index
                record.memory = memory
                slots[index] = record
                return index
        raise SimFullError(memory)

    def reset_session(self) -> None:
        """Forget AT settings (the modem rebooted); SIM contents, outbox and counters stay."""
        with self.lock:
            self.session = Session(smsc=self.default_smsc)

    # --- incoming SMS -------------------------------------------------------------------------------------------

    def inject(self, messages: Sequence[tuple[str, str, int | None]]) -> tuple[list[list[int]], list[bytes]]:
        """Deliver SMS `(sender, text, timestamp_ms or None)` from the network to the modem.

        Stores every part in SM (unless +CNMI mt=2/3 asks for direct +CMT delivery) and returns the indices per
        message and one URC chunk per part (+CMTI, or +CMT with the PDU; none when mt=0). All or nothing:
        raises SimFullError when the parts do not all fit, PduError (a ValueError) when a sender is unusable.
        """
        with self.lock:
            built = []
            for sender, text, ts in messages:
                ts_ms = self.clock_ms() if ts is None else int(ts)
                ref = self._next_concat_ref
                parts = build_deliver(sender, text, local_datetime(ts_ms), self.session.smsc, ref)
                if len(parts) > 1:
                    # Only multipart texts consume a concatenation reference, as with a real SMSC.
                    self._next_concat_ref = (ref + 1) % 256
                built.append((sender, ts_ms, parts))
            direct = self.session.cnmi_mt in (2, 3)
            needed = 0 if direct else sum(len(parts) for _, _, parts in built)
            if needed > self.free_slots(SM):
                jsonlog.event("sim_full", parts=needed, free=self.free_slots(SM))
                raise SimFullError(SM)
            indices: list[list[int]] = []
            urcs: list[bytes] = []
            for sender, ts_ms, parts in built:
                got: list[int] = []
                for p in parts:
                    if direct:
                        urcs.append(f"\r\n+CMT: ,{p.tpdu_length}\r\n{p.pdu}\r\n".encode())
                        continue
                    record = StoredSms(
                        0, SM, STAT_REC_UNREAD, p.pdu, p.tpdu_length, sender, p.text, ts_ms, p.part, "deliver"
                    )
                    index = self._store(SM, record)
                    got.append(index)
                    if self.session.cnmi_mt == 1:
                        urcs.append(f'\r\n+CMTI: "SM",{index}\r\n'.encode())
                indices.append(got)
                jsonlog.event(
                    "sms_injected",
                    sender=sender,
                    parts=len(parts),
                    indices=got,
                    direct=direct,
                    encoding=parts[0].encoding,
                )
            return indices, urcs

    def inbox(self) -> list[dict[str, Any]]:
        """Received SMS still stored in SM, by index (the GET /inbox shape, plus "read")."""
        with self.lock:
            return [
                {
                    "index": r.index,
                    "from": r.sender,
                    "text": r.text,
                    "timestamp": r.timestamp_ms,
                    "part": list(r.part) if r.part else None,
                    "read": r.stat == STAT_REC_READ,
                }
                for _, r in sorted(self.memories[SM].items())
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
        """AT+CMGW: store a PDU written by the client in SM. Raises SimFullError when SM is full."""
        with self.lock:
            record = StoredSms(
                0, SM, stat, pdu, sms.tpdu_length, sms.address, sms.text, self.clock_ms(), sms.concat, "stored"
            )
            return self._store(SM, record)

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
                    "next_reference": self._next_mr,
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
