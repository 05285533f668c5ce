"""Stored PDUs (``AT+CMGR``/``AT+CMGL``/``+CMT``/``+CDS``) decoded with the library's decoder, whose GSM-7 tables
:mod:`modem_worker.modem.at_fixes` corrected at import, into typed values."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

from modem_worker.sms_text import repair_utf16

from .at_fixes import gsm_pdu


@dataclass(frozen=True)
class DeliverPdu:
    """A decoded SMS-DELIVER. ``raw_text`` is one UTF-16 unit per character (as the library decodes
    UCS-2): join the raw texts of all parts, then :func:`repair_utf16`, so a surrogate pair split across
    two parts is restored too. ``concat`` is ``(reference, total, seq)`` for a concatenated part."""

    sender: str
    raw_text: str
    smsc_time: datetime
    concat: tuple[int, int, int] | None

    @property
    def text(self) -> str:
        """The text of this PDU alone, with surrogate pairs decoded."""
        return repair_utf16(self.raw_text)


@dataclass(frozen=True)
class StatusReportPdu:
    """A decoded SMS-STATUS-REPORT (TP-MR, recipient, TP-Status, discharge time)."""

    reference: int
    recipient: str
    status: int
    finalized_at: datetime | None


def _fixed_tz(value: Any) -> datetime | None:
    """Turn the library's datetime (custom tzinfo) into one with a plain ``timezone`` offset, in this century."""
    if not isinstance(value, datetime):
        return None
    offset = value.utcoffset() or timedelta(0)
    # The library reads two-digit years with %y (69-99: the 1900s); an SMSC stamps 20yy.
    century = 100 if value.year < 2000 else 0
    return value.replace(year=value.year + century, tzinfo=timezone(offset))


def decode_stored_pdu(pdu_hex: str) -> DeliverPdu | StatusReportPdu:
    """Decode a PDU read with CMGR/CMGL/+CMT/+CDS using the library's decoder.

    Raises ValueError if the PDU cannot be decoded or is neither SMS-DELIVER nor SMS-STATUS-REPORT.
    """
    try:
        decoded: dict[str, Any] = gsm_pdu.decodeSmsPdu(pdu_hex)
    except Exception as exc:  # the library raises anything from StopIteration to KeyError on bad input
        raise ValueError(f"undecodable PDU: {exc!r}") from exc
    kind = decoded.get("type")
    if kind == "SMS-DELIVER":
        concat: tuple[int, int, int] | None = None
        for ie in decoded.get("udh") or []:
            if isinstance(ie, gsm_pdu.Concatenation) and ie.parts:
                concat = (int(ie.reference), int(ie.parts), int(ie.number))
        smsc_time = _fixed_tz(decoded.get("time")) or datetime.now(UTC)
        return DeliverPdu(
            sender=str(decoded.get("number") or ""),
            raw_text=str(decoded.get("text") or ""),
            smsc_time=smsc_time,
            concat=concat,
        )
    if kind == "SMS-STATUS-REPORT":
        return StatusReportPdu(
            reference=int(decoded["reference"]),
            recipient=str(decoded.get("number") or ""),
            status=int(decoded["status"]),
            finalized_at=_fixed_tz(decoded.get("discharge")),
        )
    raise ValueError(f"unexpected PDU type {kind!r}")
