"""SMS text handling the library gets wrong: encoding choice, length counting, segmentation, SUBMIT PDUs.

python-gsmmodem-new 0.13.0 counts length in code points (an emoji is two UTF-16 units on the air),
raises ``ValueError`` when encoding characters outside the BMP, and splits UCS-2 text in the middle of
surrogate pairs. Everything here is pure (no I/O) so it can be unit-tested without a modem. The modem
simulator (``simulator.pdu``) builds and decodes its PDUs with the same primitives: this module is the one GSM-7
codec of the project (tables, septet packing and unpacking, segmentation, user data).

Rules implemented (3GPP TS 23.038 / 23.040):

* GSM 7-bit default alphabet plus the extension table (escape ``0x1B`` + code, counts as 2 septets);
  a message is GSM-7 if every character is in one of the two tables, UCS-2 (really UTF-16-BE) otherwise.
* single part: 160 septets / 70 UTF-16 units; concatenated: 153 septets / 67 units per part (the
  6-octet UDH with an 8-bit reference takes the rest).
* a part boundary never splits an escape sequence or a surrogate pair.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Final, Literal

logger = logging.getLogger(__name__)

Encoding = Literal["gsm7", "ucs2"]

# GSM 03.38 default alphabet, index = septet value. Index 0x1B is the escape to the extension table and is
# deliberately not a printable character (the library maps the text character U+001B onto it).
GSM7_BASIC: Final[str] = (
    "@£$¥èéùìòÇ\nØø\rÅåΔ_ΦΓΛΩΠΨΣΘΞ\x00ÆæßÉ !\"#¤%&'()*+,-./0123456789:;<=>?"
    "¡ABCDEFGHIJKLMNOPQRSTUVWXYZÄÖÑÜ§¿abcdefghijklmnopqrstuvwxyzäöñüà"
)
GSM7_ESCAPE: Final[int] = 0x1B
GSM7_EXTENSION: Final[dict[str, int]] = {
    "\f": 0x0A,
    "^": 0x14,
    "{": 0x28,
    "}": 0x29,
    "\\": 0x2F,
    "[": 0x3C,
    "~": 0x3D,
    "]": 0x3E,
    "|": 0x40,
    "€": 0x65,
}
_BASIC_INDEX: Final[dict[str, int]] = {ch: i for i, ch in enumerate(GSM7_BASIC) if i != GSM7_ESCAPE}
_EXTENSION_REVERSE: Final[dict[int, str]] = {v: k for k, v in GSM7_EXTENSION.items()}

SINGLE_LIMIT: Final[dict[Encoding, int]] = {"gsm7": 160, "ucs2": 70}
PART_LIMIT: Final[dict[Encoding, int]] = {"gsm7": 153, "ucs2": 67}
MAX_PARTS: Final[int] = 255  # the concatenation IE carries the part count in one octet

_NUMBER_RE: Final[re.Pattern[str]] = re.compile(r"^\+?[0-9]{1,20}$")


class TextTooLong(ValueError):
    """The text needs more than 255 concatenated parts."""


@dataclass(frozen=True)
class Segmentation:
    """How a text goes on the air: its encoding and the text of every part (``text_units`` gives lengths)."""

    encoding: Encoding
    parts: tuple[str, ...]


def char_units(ch: str, encoding: Encoding) -> int:
    """Return how many septets (GSM-7) or UTF-16 units (UCS-2) one character takes.

    Raises ValueError if ``encoding`` is gsm7 and the character is not in the GSM-7 tables.
    """
    if encoding == "ucs2":
        return 2 if ord(ch) > 0xFFFF else 1
    if ch in _BASIC_INDEX:
        return 1
    if ch in GSM7_EXTENSION:
        return 2
    raise ValueError(f"character U+{ord(ch):04X} is not in the GSM 7-bit alphabet")


def is_gsm7(text: str) -> bool:
    """Return True if every character of ``text`` is in the GSM-7 default or extension table."""
    return all(ch in _BASIC_INDEX or ch in GSM7_EXTENSION for ch in text)


def choose_encoding(text: str) -> Encoding:
    """Return "gsm7" when the whole text fits the GSM-7 tables, otherwise "ucs2"."""
    return "gsm7" if is_gsm7(text) else "ucs2"


def text_units(text: str, encoding: Encoding | None = None) -> int:
    """Return the on-air length of ``text`` in septets or UTF-16 units (encoding chosen if not given)."""
    enc = encoding or choose_encoding(text)
    return sum(char_units(ch, enc) for ch in text)


def segment(text: str) -> Segmentation:
    """Split ``text`` into SMS parts.

    One part if it fits 160 septets / 70 UTF-16 units, otherwise parts of at most 153 septets / 67 units;
    a character (escape sequence, surrogate pair) is never split across parts. An empty text gives one
    empty part.

    Raises TextTooLong if more than 255 parts would be needed.
    """
    enc = choose_encoding(text)
    if text_units(text, enc) <= SINGLE_LIMIT[enc]:
        return Segmentation(enc, (text,))
    limit = PART_LIMIT[enc]
    parts: list[str] = []
    current: list[str] = []
    used = 0
    for ch in text:
        units = char_units(ch, enc)
        if used + units > limit:
            parts.append("".join(current))
            current, used = [], 0
        current.append(ch)
        used += units
    if current:
        parts.append("".join(current))
    if len(parts) > MAX_PARTS:
        raise TextTooLong(f"text needs {len(parts)} parts, at most {MAX_PARTS} are possible")
    return Segmentation(enc, tuple(parts))


def encode_gsm7(text: str) -> list[int]:
    """Return the unpacked septets of ``text`` (extension characters as escape + code).

    Raises ValueError if a character is not in the GSM-7 tables.
    """
    out: list[int] = []
    for ch in text:
        idx = _BASIC_INDEX.get(ch)
        if idx is not None:
            out.append(idx)
        elif ch in GSM7_EXTENSION:
            out.extend((GSM7_ESCAPE, GSM7_EXTENSION[ch]))
        else:
            raise ValueError(f"character U+{ord(ch):04X} is not in the GSM 7-bit alphabet")
    return out


def decode_gsm7(septets: Iterable[int]) -> str:
    """Return the text of unpacked GSM-7 septets.

    Per TS 23.038 6.2.1.1, an escape followed by a code the extension table does not define displays the
    character of the default table for that code, and ESC ESC (reserved for a further extension table)
    displays a space. A dangling escape at the end is dropped.
    """
    out: list[str] = []
    escaped = False
    for value in septets:
        s = value & 0x7F
        if escaped:
            if s == GSM7_ESCAPE:
                out.append(" ")
            else:
                out.append(_EXTENSION_REVERSE.get(s, GSM7_BASIC[s]))
            escaped = False
        elif s == GSM7_ESCAPE:
            escaped = True
        else:
            out.append(GSM7_BASIC[s])
    return "".join(out)


def pack_septets(septets: Sequence[int], fill_bits: int = 0) -> bytes:
    """Pack septets LSB-first into octets, after ``fill_bits`` zero bits (used to align after a UDH)."""
    out = bytearray()
    acc = 0
    nbits = fill_bits
    for s in septets:
        acc |= (s & 0x7F) << nbits
        nbits += 7
        while nbits >= 8:
            out.append(acc & 0xFF)
            acc >>= 8
            nbits -= 8
    if nbits > 0:
        out.append(acc & 0xFF)
    return bytes(out)


def unpack_septets(data: bytes, count: int | None = None, skip_bits: int = 0) -> list[int]:
    """Unpack GSM-7 septets packed LSB-first into octets (the inverse of :func:`pack_septets`), after skipping
    the first ``skip_bits`` bits (a UDH and its fill bits).

    ``count`` None unpacks every whole septet in ``data``; then 7 spare zero bits at the end are padding
    (23.038 6.1.2.3.1), not an "@", and are dropped.

    Raises ValueError when ``data`` is too short for ``count`` septets.
    """
    whole = (len(data) * 8 - skip_bits) // 7 if count is None else count
    if skip_bits + whole * 7 > len(data) * 8:
        raise ValueError("user data shorter than its declared septet count")
    value = int.from_bytes(data, "little") >> skip_bits
    septets = [(value >> (7 * i)) & 0x7F for i in range(whole)]
    if count is None and (len(data) * 8 - skip_bits) % 7 == 0 and septets and septets[-1] == 0:
        septets.pop()
    return septets


def repair_utf16(text: str) -> str:
    """Repair text decoded one UTF-16 unit per character (the library's UCS-2 decoder).

    Surrogate pairs come back from the library as two lone surrogates, which later break any UTF-8 encode.
    Re-encoding them with ``surrogatepass`` restores the original UTF-16-BE bytes, which are then decoded
    properly; a genuinely unpaired surrogate becomes U+FFFD instead of poisoning the string.
    """
    if not any(0xD800 <= ord(ch) <= 0xDFFF for ch in text):
        return text
    return text.encode("utf-16-be", "surrogatepass").decode("utf-16-be", "replace")


def encode_semi_octets(digits: str) -> bytes:
    """Encode a digit string as swapped-nibble BCD (TS 23.040 9.1.2.3), padding an odd length with F."""
    if len(digits) % 2:
        digits += "F"
    return bytes(int(digits[i + 1] + digits[i], 16) for i in range(0, len(digits), 2))


def encode_alphanumeric_address(name: str) -> bytes:
    """Encode an alphanumeric TP-OA/TP-DA/TP-RA address field (TS 23.040 9.1.2.5: TON 5, GSM 7-bit packed).

    The length octet counts useful semi-octets (7 bits per septet, rounded up to a nibble).
    Raises ValueError for an empty name, one longer than 11 septets, or one not in the GSM-7 tables.
    """
    if not name:
        raise ValueError("empty address")
    septets = encode_gsm7(name)
    if len(septets) > 11:
        raise ValueError(f"alphanumeric address {name!r} longer than 11 septets")
    return bytes(((len(septets) * 7 + 3) // 4, 0xD0)) + pack_septets(septets)


def encode_address(address: str, *, allow_alphanumeric: bool = False) -> bytes:
    """Encode a TP-DA/TP-OA/TP-RA address field (length in digits, TON/NPI, semi-octets).

    A number (spaces ignored: an optional "+" followed by 1-20 digits) is international (TON 1) with "+",
    unknown (TON 0) without. Anything else is encoded as an alphanumeric address when ``allow_alphanumeric``
    is set (see :func:`encode_alphanumeric_address`, used for network-side originators), and rejected otherwise.

    Raises ValueError for an address that cannot be encoded.
    """
    compact = address.replace(" ", "")
    if not _NUMBER_RE.match(compact):
        if allow_alphanumeric:
            return encode_alphanumeric_address(address)
        raise ValueError("recipient must be digits with an optional leading +")
    toa = 0x91 if compact.startswith("+") else 0x81
    digits = compact.lstrip("+")
    return bytes((len(digits), toa)) + encode_semi_octets(digits)


@dataclass(frozen=True)
class SubmitPdu:
    """One SMS-SUBMIT ready for ``AT+CMGS``: ``hex`` includes the empty SMSC field, ``tpdu_length`` excludes it."""

    hex: str
    tpdu_length: int


# TP-VP relative 0xA7 = 24 hours, the same validity the library's AT+CSMP=49,167 asks for in text mode.
_VALIDITY_24H: Final[int] = 0xA7


def data_coding_scheme(encoding: Encoding) -> int:
    """TP-DCS of a text in ``encoding``: 0x00 GSM 7-bit default alphabet, 0x08 UCS-2."""
    return 0x00 if encoding == "gsm7" else 0x08


def concat_header(reference: int, total: int, seq: int) -> bytes:
    """The UDH of part ``seq`` of ``total``: one concatenation IE with an 8-bit reference (IEI 00)."""
    return bytes((0x05, 0x00, 0x03, reference & 0xFF, total, seq))


def encode_user_data(text: str, encoding: Encoding, udh: bytes = b"") -> tuple[int, bytes]:
    """``(TP-UDL, TP-UD)`` of one part: ``udh`` (may be empty) then the text.

    GSM-7: the UDH is padded with fill bits up to a septet boundary and UDL counts septets; UCS-2: UTF-16-BE
    (surrogate pairs kept; a lone surrogate is carried as is, as some handsets send it) and UDL counts octets.
    """
    if encoding == "gsm7":
        septets = encode_gsm7(text)
        header_bits = len(udh) * 8
        fill = (7 - header_bits % 7) % 7
        return (header_bits + fill) // 7 + len(septets), udh + pack_septets(septets, fill)
    user_data = udh + text.encode("utf-16-be", "surrogatepass")
    return len(user_data), user_data


def build_submit_pdus(number: str, text: str, *, concat_reference: int, request_delivery: bool) -> list[SubmitPdu]:
    """Build the SMS-SUBMIT PDU(s) for ``text`` to ``number``.

    Unlike the library, the TP-SRR bit follows ``request_delivery``, UCS-2 payloads are UTF-16-BE (emoji
    work), and parts are cut by :func:`segment`. ``concat_reference`` (0-255) goes into the concatenation
    UDH of multipart messages. TP-MR is 0: the modem assigns the real reference and answers it in +CMGS.

    Raises ValueError for a bad number, TextTooLong for an over-long text.
    """
    seg = segment(text)
    address = encode_address(number)
    multipart = len(seg.parts) > 1
    first = 0x01 | 0x10  # SMS-SUBMIT, TP-VPF relative
    if request_delivery:
        first |= 0x20  # TP-SRR
    if multipart:
        first |= 0x40  # TP-UDHI
    dcs = data_coding_scheme(seg.encoding)
    pdus: list[SubmitPdu] = []
    for seq, part in enumerate(seg.parts, start=1):
        udh = concat_header(concat_reference, len(seg.parts), seq) if multipart else b""
        udl, user_data = encode_user_data(part, seg.encoding, udh)
        tpdu = bytes((first, 0x00)) + address + bytes((0x00, dcs, _VALIDITY_24H, udl)) + user_data
        pdus.append(SubmitPdu(hex=("00" + tpdu.hex()).upper(), tpdu_length=len(tpdu)))
    return pdus
