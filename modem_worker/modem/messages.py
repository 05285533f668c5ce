"""What the modem adapter hands out: received SMS, send receipts, status reports, identity and storage figures."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime


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


@dataclass(frozen=True)
class ModemIdentity:
    """Who the modem is: IMEI (the device), ICCID (the SIM card) and IMSI (the subscriber); "" when unknown."""

    imei: str
    iccid: str
    imsi: str
