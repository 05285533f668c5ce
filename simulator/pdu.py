"""SMS TPDU codecs for the modem simulator (3GPP TS 23.040 / 23.038).

python-gsmmodem-new only encodes SMS-SUBMIT, and its decoder mangles UCS-2 surrogate pairs, so the simulator
does not use it: it builds SMS-DELIVER and SMS-STATUS-REPORT PDUs (what a network delivers to a modem) and
decodes any of DELIVER / SUBMIT / STATUS-REPORT (what a client hands to the modem). The text primitives (GSM 03.38
tables, septet packing, segmentation, address encoding) are shared with the adapter in ``modem_worker.sms_text``;
the tests cross-check the PDUs against an independent decoder (smspdudecoder).

All PDUs here are "PDU mode" strings as exchanged over AT (27.005): the SMSC address field comes first, and
the TPDU length reported in `+CMGR:`/`+CMGS=` excludes it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, timezone
from typing import Literal

from modem_worker.sms_text import Encoding as TextEncoding
from modem_worker.sms_text import (
    TextTooLong,
    concat_header,
    data_coding_scheme,
    decode_gsm7,
    encode_address,
    encode_semi_octets,
    encode_user_data,
    segment,
    unpack_septets,
)

TP_STATUS_DELIVERED = 0x00
TP_STATUS_FAILED = 0x44  # permanent error: "SM delivery failed" family, what the library calls FAILED (68)

# What a received TP-DCS can announce: the two text alphabets we send, plus 8-bit data.
Encoding = Literal[TextEncoding, "8bit"]


class PduError(ValueError):
    """A PDU could not be decoded or a value cannot be encoded."""


# --- text ----------------------------------------------------------------------------------------------------


def _septets(data: bytes, count: int) -> list[int]:
    """``count`` septets unpacked from ``data`` by the shared codec. Raises PduError when ``data`` is too short."""
    try:
        return unpack_septets(data, count)
    except ValueError as exc:
        raise PduError(str(exc)) from exc


# --- addresses and timestamps -----------------------------------------------------------------------------------


def _from_semi_octets(data: bytes, ndigits: int) -> str:
    """Decode swap-nibble BCD to a string of `ndigits` digits (0-9, *, #, a, b, c for the odd nibble values)."""
    table = "0123456789*#abc"
    out: list[str] = []
    for b in data:
        for nibble in (b & 0x0F, b >> 4):
            if nibble == 0x0F:
                continue
            out.append(table[nibble])
    return "".join(out[:ndigits])


def _encode_address(address: str) -> bytes:
    """Encode a TP-OA/TP-RA field: a number, or else an alphanumeric sender (see sms_text.encode_address).

    Raises PduError when the address cannot be encoded.
    """
    try:
        return encode_address(address, allow_alphanumeric=True)
    except ValueError as exc:
        raise PduError(str(exc)) from exc


def encode_smsc(address: str | None) -> bytes:
    """Encode the SMSC field that prefixes a PDU-mode PDU (length counts octets incl. the type octet)."""
    if not address:
        return b"\x00"
    if address.startswith("+"):
        digits, toa = address[1:], 0x91
    else:
        digits, toa = address, 0x81
    body = encode_semi_octets(digits)
    return bytes((len(body) + 1, toa)) + body


def _decode_address(data: bytes, pos: int) -> tuple[str, int]:
    """Decode an address field at `pos`; return (address, position after it)."""
    ndigits = data[pos]
    toa = data[pos + 1]
    nbytes = (ndigits + 1) // 2
    body = data[pos + 2 : pos + 2 + nbytes]
    if len(body) < nbytes:
        raise PduError("truncated address field")
    ton = (toa >> 4) & 0x07
    if ton == 5:
        text = decode_gsm7(_septets(body, (ndigits * 4) // 7))
        return text, pos + 2 + nbytes
    number = _from_semi_octets(body, ndigits)
    return ("+" + number if ton == 1 else number), pos + 2 + nbytes


def encode_timestamp(when: datetime) -> bytes:
    """Encode an aware datetime as the 7-octet TP-SCTS/TP-DT (seconds resolution, zone in quarter hours).

    Raises PduError for a naive datetime.
    """
    offset = when.utcoffset()
    if offset is None:
        raise PduError("timestamp needs a timezone")
    quarters = round(offset.total_seconds() / 900)
    tz = encode_semi_octets(f"{abs(quarters):02d}")[0]
    if quarters < 0:
        tz |= 0x08  # sign bit sits in the tens nibble, which is the low nibble after the swap
    return encode_semi_octets(when.strftime("%y%m%d%H%M%S")) + bytes((tz,))


def decode_timestamp(data: bytes) -> datetime:
    """Decode a 7-octet TP-SCTS/TP-DT to an aware datetime.

    Raises PduError on a malformed value.
    """
    if len(data) != 7:
        raise PduError("timestamp must be 7 octets")
    digits = _from_semi_octets(data[:6], 12)
    tzb = data[6]
    negative = bool(tzb & 0x08)
    quarters = int(_from_semi_octets(bytes((tzb & 0xF7,)), 2))
    tz = timezone(timedelta(minutes=15 * quarters) * (-1 if negative else 1))
    try:
        # TP-SCTS years have two digits; strptime's %y puts 69-99 in the 1900s, an SMSC stamps this century.
        return datetime.strptime("20" + digits, "%Y%m%d%H%M%S").replace(tzinfo=tz)
    except ValueError as exc:
        raise PduError(f"bad timestamp {data.hex()}") from exc


def local_datetime(epoch_ms: int) -> datetime:
    """Convert epoch milliseconds to an aware datetime in the host's local zone (an SMSC stamps local time)."""
    return datetime.fromtimestamp(epoch_ms / 1000, UTC).astimezone()


# --- building PDUs ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DeliverPart:
    """One stored SMS-DELIVER: the PDU-mode hex, its TPDU length and what went into it."""

    pdu: str
    tpdu_length: int
    text: str
    encoding: Encoding
    part: tuple[int, int, int] | None  # (reference, total, sequence) when concatenated


def build_deliver(
    sender: str,
    text: str,
    when: datetime,
    smsc: str | None,
    concat_ref: int = 0,
) -> list[DeliverPart]:
    """Build the SMS-DELIVER PDU(s) carrying `text` from `sender`, stamped `when` by `smsc`.

    Long texts become concatenated parts with an 8-bit-reference UDH (IEI 00) using `concat_ref` (0-255).
    Raises PduError when the sender cannot be encoded or the text needs more than 255 parts.
    """
    try:
        seg = segment(text)
    except TextTooLong as exc:
        raise PduError(str(exc)) from exc
    encoding, chunks = seg.encoding, seg.parts
    smsc_field = encode_smsc(smsc)
    oa = _encode_address(sender)
    scts = encode_timestamp(when)
    total = len(chunks)
    parts: list[DeliverPart] = []
    for seq, chunk in enumerate(chunks, start=1):
        udh = concat_header(concat_ref, total, seq) if total > 1 else b""
        udl, ud = encode_user_data(chunk, encoding, udh)
        dcs = data_coding_scheme(encoding)
        # TP-MTI=00 (DELIVER), TP-MMS=1 (no more messages waiting), TP-UDHI when a header is present.
        first = 0x04 | (0x40 if udh else 0x00)
        tpdu = bytes((first,)) + oa + bytes((0x00, dcs)) + scts + bytes((udl,)) + ud
        parts.append(
            DeliverPart(
                pdu=(smsc_field + tpdu).hex().upper(),
                tpdu_length=len(tpdu),
                text=chunk,
                encoding=encoding,
                part=(concat_ref & 0xFF, total, seq) if total > 1 else None,
            )
        )
    return parts


def build_status_report(
    reference: int,
    recipient: str,
    *,
    submitted: datetime,
    discharged: datetime,
    status: int,
    smsc: str | None,
) -> tuple[str, int]:
    """Build an SMS-STATUS-REPORT PDU for the message with TP-MR `reference`; return (pdu hex, tpdu length).

    Raises PduError when the recipient cannot be encoded.
    """
    # TP-MTI=10 (STATUS-REPORT), TP-MMS=1; TP-SRQ=0: this reports on an SMS-SUBMIT.
    tpdu = (
        bytes((0x06, reference & 0xFF))
        + _encode_address(recipient)
        + encode_timestamp(submitted)
        + encode_timestamp(discharged)
        + bytes((status & 0xFF,))
    )
    return (encode_smsc(smsc) + tpdu).hex().upper(), len(tpdu)


# --- decoding -----------------------------------------------------------------------------------------------------


@dataclass
class DecodedPdu:
    """A decoded PDU-mode PDU. Fields not carried by a PDU type keep their defaults."""

    type: Literal["deliver", "submit", "status-report"]
    smsc: str | None
    tpdu_length: int
    address: str  # originator (DELIVER), destination (SUBMIT), recipient (STATUS-REPORT)
    reference: int | None = None  # TP-MR (SUBMIT, STATUS-REPORT)
    status_report_requested: bool = False  # TP-SRR (SUBMIT) / TP-SRI (DELIVER)
    encoding: Encoding = "gsm7"
    text: str = ""
    # Raw payload without UDH: unpacked septets (gsm7) or bytes (ucs2/8bit), so that concatenated parts can be
    # joined before decoding; a surrogate pair or escape split across parts still decodes correctly.
    payload: bytes = b""
    concat: tuple[int, int, int] | None = None  # (reference, total, sequence)
    timestamp: datetime | None = None  # TP-SCTS
    discharge: datetime | None = None  # TP-DT
    status: int | None = None  # TP-ST
    udh: bytes = field(default=b"")


def _decode_dcs(dcs: int) -> Encoding:
    """Map a TP-DCS octet to the alphabet (general data coding and message class groups)."""
    group = dcs >> 4
    if group <= 0x07:  # general data coding / automatic deletion groups: bits 3..2 carry the alphabet
        alphabet = (dcs >> 2) & 0x03
        return "ucs2" if alphabet == 2 else "8bit" if alphabet == 1 else "gsm7"
    if group == 0x0E:  # message waiting, store, UCS-2
        return "ucs2"
    if group == 0x0F:
        return "8bit" if dcs & 0x04 else "gsm7"
    return "gsm7"


def _concat_from_udh(udh: bytes) -> tuple[int, int, int] | None:
    """Find a concatenation IE (8-bit IEI 00 or 16-bit IEI 08) in a UDH."""
    pos = 0
    while pos + 2 <= len(udh):
        iei, ie_len = udh[pos], udh[pos + 1]
        data = udh[pos + 2 : pos + 2 + ie_len]
        if iei == 0x00 and ie_len == 3 and len(data) == 3:
            return data[0], data[1], data[2]
        if iei == 0x08 and ie_len == 4 and len(data) == 4:
            return (data[0] << 8) | data[1], data[2], data[3]
        pos += 2 + ie_len
    return None


def decode_text(encoding: Encoding, payload: bytes) -> str:
    """Decode a payload as produced in DecodedPdu.payload (septet values or bytes) to text."""
    if encoding == "gsm7":
        return decode_gsm7(list(payload))
    if encoding == "ucs2":
        # 'replace' rather than 'surrogatepass': a lone surrogate must not leak into JSON/UTF-8 consumers.
        return payload.decode("utf-16-be", "replace")
    return payload.decode("latin-1")


def _decode_user_data(data: bytes, pos: int, udl: int, udhi: bool, encoding: Encoding) -> tuple[bytes, bytes]:
    """Split the user data at `pos` into (udh, payload); gsm7 payloads come back as unpacked septets."""
    ud = data[pos:]
    udh = b""
    if encoding == "gsm7":
        if udhi:
            if not ud:
                raise PduError("missing UDH")
            udhl = ud[0]
            udh = ud[1 : 1 + udhl]
            header_septets = math.ceil((udhl + 1) * 8 / 7)
            septets = _septets(ud, udl)[header_septets:]
        else:
            septets = _septets(ud, udl)
        return udh, bytes(septets)
    if len(ud) < udl:
        raise PduError("user data shorter than TP-UDL")
    ud = ud[:udl]
    if udhi:
        udhl = ud[0]
        udh = ud[1 : 1 + udhl]
        ud = ud[1 + udhl :]
    return udh, ud


def decode_pdu(pdu_hex: str) -> DecodedPdu:
    """Decode a PDU-mode PDU (SMSC field first) of type SMS-DELIVER, SMS-SUBMIT or SMS-STATUS-REPORT.

    Raises PduError when the hex or the structure is invalid.
    """
    try:
        data = bytes.fromhex(pdu_hex.strip())
        return _decode(data)
    except PduError:
        raise
    except (ValueError, IndexError) as exc:
        raise PduError(f"undecodable PDU: {exc}") from exc


def _decode_smsc(data: bytes) -> tuple[str | None, int]:
    """The SMSC field that starts a PDU-mode PDU: (address or None, position of the TPDU)."""
    smsc_len = data[0]
    if not smsc_len:
        return None, 1
    toa = data[1]
    number = _from_semi_octets(data[2 : 1 + smsc_len], 2 * (smsc_len - 1))
    return ("+" + number if (toa >> 4) & 0x07 == 1 else number), 1 + smsc_len


def _decode(data: bytes) -> DecodedPdu:
    """Decode the bytes of a PDU-mode PDU; see decode_pdu."""
    smsc, pos = _decode_smsc(data)
    tpdu_length = len(data) - pos
    first = data[pos]
    mti = first & 0x03
    if mti == 0x00:
        return _decode_deliver(data, pos + 1, first, DecodedPdu("deliver", smsc, tpdu_length, ""))
    if mti == 0x01:
        return _decode_submit(data, pos + 1, first, DecodedPdu("submit", smsc, tpdu_length, ""))
    if mti == 0x02:
        return _decode_status_report(data, pos + 1, DecodedPdu("status-report", smsc, tpdu_length, ""))
    raise PduError(f"unsupported TP-MTI {mti}")


def _decode_deliver(data: bytes, pos: int, first: int, pdu: DecodedPdu) -> DecodedPdu:
    """Fill ``pdu`` from the SMS-DELIVER TPDU whose first octet ``first`` precedes ``pos``."""
    udhi = bool(first & 0x40)
    pdu.address, pos = _decode_address(data, pos)
    pdu.encoding = _decode_dcs(data[pos + 1])
    pdu.timestamp = decode_timestamp(data[pos + 2 : pos + 9])
    pdu.status_report_requested = bool(first & 0x20)
    _fill_user_data(pdu, data, pos + 10, data[pos + 9], udhi)
    return pdu


def _decode_submit(data: bytes, pos: int, first: int, pdu: DecodedPdu) -> DecodedPdu:
    """Fill ``pdu`` from the SMS-SUBMIT TPDU whose first octet ``first`` precedes ``pos``."""
    udhi = bool(first & 0x40)
    pdu.reference = data[pos]
    pdu.address, pos = _decode_address(data, pos + 1)
    pdu.encoding = _decode_dcs(data[pos + 1])
    pdu.status_report_requested = bool(first & 0x20)
    pos += 2
    vpf = (first >> 3) & 0x03
    pos += {0: 0, 2: 1, 1: 7, 3: 7}[vpf]
    _fill_user_data(pdu, data, pos + 1, data[pos], udhi)
    return pdu


def _decode_status_report(data: bytes, pos: int, pdu: DecodedPdu) -> DecodedPdu:
    """Fill ``pdu`` from the SMS-STATUS-REPORT TPDU after its first octet (at ``pos``)."""
    pdu.reference = data[pos]
    pdu.address, pos = _decode_address(data, pos + 1)
    pdu.timestamp = decode_timestamp(data[pos : pos + 7])
    pdu.discharge = decode_timestamp(data[pos + 7 : pos + 14])
    pdu.status = data[pos + 14]
    return pdu


def _fill_user_data(pdu: DecodedPdu, data: bytes, pos: int, udl: int, udhi: bool) -> None:
    """Set the UDH, payload, text and concatenation of ``pdu`` from the user data at ``pos``."""
    udh, payload = _decode_user_data(data, pos, udl, udhi, pdu.encoding)
    pdu.udh = udh
    pdu.payload = payload
    pdu.text = decode_text(pdu.encoding, payload)
    pdu.concat = _concat_from_udh(udh) if udhi else None
