"""The errors the modem adapter raises (every one a :class:`ModemError`)."""

from __future__ import annotations


class ModemError(Exception):
    """Base class of every error the adapter raises."""


class ModemUnavailable(ModemError):
    """The port is missing, unplugged, the read thread died, or the modem does not answer."""


class SendFailed(ModemError):
    """The modem or network refused the SMS: it was NOT sent (safe to retry or report as failed).

    ``cms_code`` is the ``+CMS ERROR`` code (or the ``+CME ERROR`` code when ``source`` is "CME"; None without a
    code); ``invalid`` is True when the SMS could not even be encoded (bad number, text too long).
    ``modem_worker.send_errors.classify`` says what it means."""

    def __init__(self, cms_code: int | None, reason: str, *, source: str = "CMS", invalid: bool = False) -> None:
        super().__init__(f"send failed ({cms_code}): {reason}" if cms_code is not None else f"send failed: {reason}")
        self.cms_code = cms_code
        self.reason = reason
        self.source = source
        self.invalid = invalid


class SendOutcomeUnknown(ModemError):
    """The PDU (or part of a multipart SMS) was written but no +CMGS came back (time-out, unplug, a later
    part refused): the SMS MAY have been sent. Never resend blindly. ``references`` holds the TP-MR of the
    parts known to have gone out."""

    def __init__(self, reason: str, references: tuple[int, ...] = ()) -> None:
        super().__init__(reason)
        self.reason = reason
        self.references = references


class SimLocked(ModemError):
    """The SIM needs a PIN or PUK the gateway may not enter (none configured, already rejected, a PUK).
    ``state`` is the ``AT+CPIN?`` answer; ``rejected`` is True when the SIM refused the PIN just entered."""

    def __init__(self, state: str, detail: str, *, rejected: bool = False) -> None:
        super().__init__(detail)
        self.state = state
        self.detail = detail
        self.rejected = rejected
