"""Stable identities (IMEI, ICCID, IMSI) for a simulated modem, derived from its link path, and the USSD codec.

Two simulators on different links get different identities; the same link gets the same ones on every start,
so that a worker configured with `SMSGW_MODEM_IMEI` recognises "its" modem after a restart.
"""

from __future__ import annotations

import contextlib
import hashlib
from dataclasses import dataclass
from typing import Literal

from modem_worker.sms_text import decode_gsm7, encode_gsm7, pack_septets, unpack_septets

IMEI_TAC = "35693803"  # a type allocation code (8 digits) + 6 serial digits + Luhn check digit
ICCID_PREFIX = "8925504"  # 89 (telecom) + 255 (Tanzania) + issuer 04; 11 account digits + Luhn = 19 digits
IMSI_PREFIX = "64004"  # MCC 640 / MNC 04, the simulated operator (+COPS numeric); 10 MSIN digits


@dataclass(frozen=True)
class Identity:
    """What AT+CGSN, AT+CCID and AT+CIMI answer."""

    imei: str
    iccid: str
    imsi: str


def luhn_digit(digits: str) -> str:
    """The Luhn check digit for `digits` (as IMEIs and ICCIDs use)."""
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2 == 0:  # doubled: every second digit counting from the right of the payload
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return str((10 - total % 10) % 10)


def derive_identity(link_name: str) -> Identity:
    """Identities derived from `link_name` (the absolute link path): stable and distinct per link."""
    digest = hashlib.sha256(link_name.encode("utf-8")).hexdigest()
    number = str(int(digest, 16))
    imei_body = IMEI_TAC + number[:6]
    iccid_body = ICCID_PREFIX + number[6:17]
    return Identity(
        imei=imei_body + luhn_digit(imei_body),
        iccid=iccid_body + luhn_digit(iccid_body),
        imsi=IMSI_PREFIX + number[17:27],
    )


UssdEncoding = Literal["ucs2", "gsm7"]


def encode_ussd(text: str, encoding: UssdEncoding) -> str:
    """Encode a USSD answer as modems print it in +CUSD: UCS-2 hex, or GSM-7 packed hex (falling back to
    UCS-2 when the text has characters outside the GSM alphabet)."""
    if encoding == "gsm7":
        try:
            return pack_septets(encode_gsm7(text)).hex().upper()
        except ValueError:
            pass
    return text.encode("utf-16-be").hex().upper()


def decode_ussd_request(value: str) -> list[str]:
    """Candidate plain-text readings of an AT+CUSD request string: as given, and, when it is hex, as GSM-7
    packed or UCS-2 hex (some modems, e.g. Huawei, want the request packed)."""
    out = [value]
    if value and len(value) % 2 == 0 and all(c in "0123456789abcdefABCDEF" for c in value):
        raw = bytes.fromhex(value)
        septets = unpack_septets(raw, len(raw) * 8 // 7)  # never too short: the count comes from the length
        out.append(decode_gsm7(septets).rstrip("\r@"))  # padding: CR or a zero septet (@)
        if len(raw) % 2 == 0:
            with contextlib.suppress(UnicodeDecodeError):
                out.append(raw.decode("utf-16-be"))
    return out
