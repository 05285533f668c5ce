"""USSD: a request and the network's answer (inside the command's reply or as a later +CUSD URC), the answer
text decoded (GSM-7 or UCS-2 hex, or plain), and the first amount in it (a balance)."""

from __future__ import annotations

import queue
import re
import threading
from typing import Final

from modem_worker.sms_text import decode_gsm7, repair_utf16, unpack_septets

from .channel import AtChannel
from .errors import ModemError, ModemUnavailable

_CUSD_RE: Final[re.Pattern[str]] = re.compile(r'^\+CUSD:\s*(\d+)\s*(?:,\s*"([^"]*)"\s*(?:,\s*(\d+))?)?')
USSD_CODE_RE: Final[re.Pattern[str]] = re.compile(r"[0-9*#+]{1,40}")
_HEX_RE: Final[re.Pattern[str]] = re.compile(r"(?:[0-9A-Fa-f]{2})+")
# The first number of a balance text: "1,234.50" (thousands separators), "1234.5", "-20".
_AMOUNT_RE: Final[re.Pattern[str]] = re.compile(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?|-?\d+(?:\.\d+)?")


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


class Ussd:
    """USSD dialogues on one :class:`AtChannel`, one at a time."""

    def __init__(self, channel: AtChannel) -> None:
        """No dialogue yet."""
        self._channel = channel
        self._answers: queue.Queue[str] = queue.Queue()  # +CUSD lines that came as URCs
        self._lock = threading.Lock()

    def answer_arrived(self, line: str) -> None:
        """A ``+CUSD:`` URC (read thread): the network's answer to :meth:`request`, after its OK."""
        self._answers.put(line)

    def request(self, code: str, timeout_s: float = 30.0) -> str:
        """Run the USSD request ``code`` (``AT+CUSD=1,"<code>",15``) and return the network's answer text,
        decoded (GSM-7 or UCS-2 hex as the modem presents it, or plain text).

        The whole dialogue holds the command lock: no other command (a send, a probe) can take the answer,
        which comes either inside the command's reply or as an unsolicited ``+CUSD:`` line after its OK.

        Raises ModemUnavailable (link lost, no answer to the command), ModemError (``code`` not a USSD string,
        refused, no ``+CUSD`` within ``timeout_s``, an answer without text).
        """
        if not USSD_CODE_RE.fullmatch(code):
            raise ModemError(f"not a USSD code: {code!r} (digits, * # + only)")
        gsm = self._channel.require()
        with self._lock, gsm.command_lock:
            while not self._answers.empty():  # a late answer to an earlier request
                self._answers.get_nowait()
            lines = self._channel.command(f'AT+CUSD=1,"{code}",15', timeout=timeout_s)
            line = next((ln for ln in lines if ln.startswith("+CUSD:")), None)
            if line is None:
                try:
                    line = self._answers.get(timeout=timeout_s)
                except queue.Empty:
                    try:
                        self._channel.command("AT+CUSD=2")  # end the session so the next request is not refused
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
