"""Sending: SMS-SUBMIT PDUs built by :mod:`modem_worker.sms_text`, written with AT+CMGS under the command lock,
and every way that can end mapped to what the caller may do next (retry, report, never resend)."""

from __future__ import annotations

import logging
import random
import re
import threading
from datetime import UTC, datetime
from typing import Final

from modem_worker.sms_text import SubmitPdu, build_submit_pdus

from .at_fixes import CTRL_Z, CmeError, CmsError, CommandError, FixedGsmModem, LinkDown, TimeoutException
from .channel import AtChannel, first_match
from .errors import ModemUnavailable, SendFailed, SendOutcomeUnknown
from .messages import SendReceipt

logger = logging.getLogger(__name__)

_PROMPT_TIMEOUT_S: Final[float] = 5.0
_CMGS_RE: Final[re.Pattern[str]] = re.compile(r"^\+CMGS:\s*(\d+)")


def _error_source(exc: CommandError) -> str:
    """ "CME" for a ``+CME ERROR`` (27.007 codes), else "CMS" (27.005 / 24.011 codes)."""
    return "CME" if isinstance(exc, CmeError) else "CMS"


class Sender:
    """Sends SMS through the connection of one :class:`AtChannel`."""

    def __init__(self, channel: AtChannel, *, request_delivery: bool, send_timeout_s: float) -> None:
        """``request_delivery`` sets TP-SRR; ``send_timeout_s`` bounds the wait for +CMGS after the PDU."""
        self._channel = channel
        self._request_delivery = request_delivery
        self._send_timeout_s = send_timeout_s
        self._concat_ref = random.randrange(256)
        self._ref_lock = threading.Lock()

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
        gsm = self._channel.require()
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
        match = first_match(_CMGS_RE, answer)
        if match is None:
            raise SendOutcomeUnknown(f"answer without +CMGS: {answer[-1:]}")
        return int(match.group(1))
