"""Who the modem is and whether it is still the modem we set up: IMEI/ICCID/IMSI, the settings check that tells
a restart, the SIM PIN (entered only as :class:`SimUnlock` allows), and the IMEI read before any initialisation."""

from __future__ import annotations

import contextlib
import logging
import re
import time
from typing import Final, Protocol

from .at_fixes import CommandError, FixedGsmModem
from .channel import AtChannel, first_match
from .errors import ModemError, ModemUnavailable, SimLocked
from .messages import ModemIdentity

logger = logging.getLogger(__name__)

_CMGF_RE: Final[re.Pattern[str]] = re.compile(r"^\+CMGF:\s*(\d)")
_CNMI_RE: Final[re.Pattern[str]] = re.compile(r"^\+CNMI:\s*\d+\s*,\s*(\d+)")
_CPIN_RE: Final[re.Pattern[str]] = re.compile(r"^\+CPIN:\s*(.+?)\s*$")
_IMEI_RE: Final[re.Pattern[str]] = re.compile(r"^(?:\+C?GSN:\s*)?\"?(\d{14,17})\"?$")
_ICCID_RE: Final[re.Pattern[str]] = re.compile(r"^(?:[+^]I?CCID:\s*)?\"?([0-9A-Fa-f]{18,22})\"?$")
_IMSI_RE: Final[re.Pattern[str]] = re.compile(r"^(?:\+CIMI:\s*)?\"?(\d{6,15})\"?$")
_PIN_READY_WAIT_S: Final[float] = 10.0


class SimUnlock(Protocol):
    """Decides whether a SIM asking for its PIN gets one (see ``modem_worker.sim_pin``)."""

    def pin_to_try(self) -> str:
        """The PIN to enter now. Raises SimLocked when none may be tried."""

    def accepted(self) -> None:
        """The SIM took the PIN just given."""

    def rejected(self) -> None:
        """The SIM refused the PIN just given."""


class SimGate:
    """The init dialogue's SIM check (instead of the library's, which sent whatever PIN it had, even to a SIM
    asking for its PUK, and on every reconnect)."""

    def __init__(self, port: str, sim_unlock: SimUnlock | None) -> None:
        """Without ``sim_unlock`` a SIM asking for its PIN is refused with SimLocked."""
        self._port = port
        self._sim_unlock = sim_unlock

    def _sim_state(self, gsm: FixedGsmModem) -> str:
        """``AT+CPIN?``: "READY", "SIM PIN", "SIM PUK", ... Raises LinkDown, TimeoutException, CommandError."""
        match = first_match(_CPIN_RE, [ln.strip() for ln in gsm.write("AT+CPIN?", timeout=15) or []])
        if match is None:
            raise CommandError("AT+CPIN?")
        return match.group(1).strip('"').upper()

    def unlock(self, gsm: FixedGsmModem) -> None:
        """The init dialogue's SIM check (instead of the library's): nothing when the SIM is ready; the PIN
        ``sim_unlock`` allows, once, when it asks for its PIN; SimLocked for anything else (a PUK, a rejected
        PIN, no PIN to give). Raises SimLocked, LinkDown, TimeoutException, CommandError."""
        state = self._sim_state(gsm)
        if state == "READY":
            return
        if state != "SIM PIN":
            raise SimLocked(state, f"the SIM asks for {state}, which the gateway never enters")
        if self._sim_unlock is None:
            raise SimLocked(state, "the SIM asks for its PIN and none is configured")
        pin = self._sim_unlock.pin_to_try()  # raises SimLocked when it must not be tried
        try:
            gsm.write(f'AT+CPIN="{pin}"', timeout=15)
        except CommandError as exc:
            self._sim_unlock.rejected()
            raise SimLocked(state, f"the SIM rejected the configured PIN ({exc})", rejected=True) from exc
        self._sim_unlock.accepted()
        logger.info("SIM PIN accepted by the modem on %s", self._port)
        # The SIM is busy for a moment after its PIN (CME 14); the init dialogue needs it ready.
        deadline = time.monotonic() + _PIN_READY_WAIT_S
        while time.monotonic() < deadline:
            with contextlib.suppress(CommandError):
                if self._sim_state(gsm) == "READY":
                    return
            time.sleep(0.2)


class IdentityQueries:
    """The identity and settings of the modem on one :class:`AtChannel`."""

    def __init__(self, channel: AtChannel) -> None:
        """Queries go through ``channel``."""
        self._channel = channel

    def settings_hold(self) -> bool:
        """True while the settings :meth:`connect` made still hold: echo off, PDU mode (``AT+CMGF?`` 0), new SMS
        stored and announced (``AT+CNMI?`` mt 1). False once the modem reset them, i.e. it restarted.

        Raises ModemUnavailable (no answer), ModemError (refused or unreadable answer: cannot tell).
        """
        cmgf = self._channel.command("AT+CMGF?")
        cnmi = self._channel.command("AT+CNMI?")
        echoed = any(line.strip().upper().startswith("AT") for line in cmgf + cnmi)
        mode = first_match(_CMGF_RE, cmgf)
        indication = first_match(_CNMI_RE, cnmi)
        if mode is None or indication is None:
            raise ModemError(f"unreadable +CMGF/+CNMI answer: {(cmgf + cnmi)[:4]}")
        return not echoed and mode.group(1) == "0" and indication.group(1) == "1"

    def read_identity(self) -> ModemIdentity:
        """IMEI (``AT+CGSN``), ICCID (``AT+CCID``, else ``AT^ICCID?``) and IMSI (``AT+CIMI``) of the connected
        modem and SIM; a value the modem refuses or garbles is "". Raises ModemUnavailable."""
        imei = self._identity_value(("AT+CGSN",), _IMEI_RE)
        iccid = self._identity_value(("AT+CCID", "AT^ICCID?"), _ICCID_RE)
        imsi = self._identity_value(("AT+CIMI",), _IMSI_RE)
        return ModemIdentity(imei=imei, iccid=iccid.upper(), imsi=imsi)

    def _identity_value(self, commands: tuple[str, ...], pattern: re.Pattern[str]) -> str:
        """The first answer line matching ``pattern`` of the first command that has one, else "". Raises
        ModemUnavailable."""
        for command in commands:
            try:
                lines = self._channel.command(command)
            except ModemUnavailable:
                raise
            except ModemError:
                continue
            match = first_match(pattern, [line.strip() for line in lines])
            if match:
                return match.group(1)
        return ""


def read_imei(port: str, *, baudrate: int = 115200, timeout_s: float = 3.0) -> str | None:
    """The IMEI (``AT+CGSN``) of the modem on ``port``, read without the init dialogue, so no setting of the
    modem changes. None when the port cannot be opened (missing, or busy: another worker has it), the device does
    not answer or answers no IMEI. Never raises."""
    gsm = FixedGsmModem(
        port,
        baudrate=baudrate,
        on_urc=lambda _lines: None,
        on_link_down=lambda _exc: None,
        request_delivery=False,
        command_timeout_s=timeout_s,
    )
    try:
        gsm.open_port()
        lines = gsm.write("AT+CGSN") or []
    except Exception as exc:  # serial errors, no answer, refused: this port has no IMEI to offer now
        logger.debug("no IMEI from %s: %r", port, exc)
        return None
    finally:
        gsm.close()
    for line in lines:
        match = _IMEI_RE.match(line.strip())
        if match:
            return match.group(1)
    return None
