"""The SIM PIN of one modem, and the rule that protects the SIM's three tries.

A SIM locks itself (asks for its PUK) after three wrong PINs. A worker that entered a wrong PIN on every
(re)start would lock it within three restarts, so:

* a PIN is entered at most once per worker process (a PIN the SIM accepted is entered again when the modem
  restarts and asks for it: it is known to be right);
* a PIN the SIM rejected is remembered in ``SMSGW_STATE_DIR`` (a hash of modem id and PIN, never the PIN
  itself), and never entered again automatically, also not after a restart. A *different* PIN (the operator
  fixed the setting) is tried once; deleting the file allows the same PIN again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import time
from pathlib import Path

from modem_worker.modem import SimLocked
from services.config import ConfigError, Settings, read_secret_file

log = logging.getLogger(__name__)

_PIN_RE = re.compile(r"\d{4,8}")


def configured_pin(settings: Settings) -> str | None:
    """The PIN from ``SMSGW_SIM_PIN_FILE`` (wins) or ``SMSGW_SIM_PIN``; None when neither is set.

    Raises:
        ConfigError: the file cannot be read, or the PIN is not 4-8 digits (the message never shows it).
    """
    if settings.sim_pin_file:
        raw = read_secret_file("SMSGW_SIM_PIN_FILE", settings.sim_pin_file)  # one line also for a non-UTF-8 file
        name = "SMSGW_SIM_PIN_FILE"
    else:
        raw, name = settings.sim_pin, "SMSGW_SIM_PIN"
    pin = raw.strip()
    if not pin:
        return None
    if not _PIN_RE.fullmatch(pin):
        raise ConfigError(f"{name}: a SIM PIN is 4 to 8 digits (value not shown)")
    return pin


class SimPin:
    """Gives the configured PIN to a SIM that asks for it, at most once per process and never a PIN that SIM
    rejected before (see the module docstring). Implements ``modem_worker.modem.SimUnlock``."""

    def __init__(self, pin: str | None, state_dir: str, modem_id: str) -> None:
        self._pin = pin
        self._modem_id = modem_id
        self._path = Path(state_dir) / f"sim-pin-{modem_id}.json"
        self._tried = False
        self._accepted = False  # the SIM took it: entering it again after a modem restart is safe

    @property
    def record_path(self) -> Path:
        """The file that remembers a rejected PIN (deleting it allows that PIN again)."""
        return self._path

    def _fingerprint(self) -> str:
        assert self._pin is not None
        return hashlib.sha256(f"{self._modem_id}\0{self._pin}".encode()).hexdigest()

    def _rejected_before(self) -> bool:
        try:
            record = json.loads(self._path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return False
        except (OSError, ValueError) as exc:  # unreadable: the safe reading is "rejected", never burn a try
            log.warning("modem %s: cannot read %s (%s); not entering the PIN", self._modem_id, self._path, exc)
            return True
        return isinstance(record, dict) and record.get("rejected_pin_sha256") == self._fingerprint()

    def pin_to_try(self) -> str:
        """The PIN to enter now; counts as tried. Raises SimLocked (with what the operator does) when there is
        none, it was entered already by this process, or the SIM rejected it before."""
        if self._pin is None:
            raise SimLocked(
                "SIM PIN",
                "the SIM asks for its PIN and none is configured: set SMSGW_SIM_PIN or "
                "SMSGW_SIM_PIN_FILE, then restart the worker",
            )
        if self._accepted:
            return self._pin
        if self._tried:
            raise SimLocked(
                "SIM PIN",
                "the SIM asks for its PIN again and this worker already entered it once: "
                "check the SIM in a phone, then restart the worker",
            )
        if self._rejected_before():
            raise SimLocked(
                "SIM PIN",
                f"the configured PIN was rejected before and is not tried again (the SIM "
                f"allows 3 tries): fix SMSGW_SIM_PIN, or delete {self._path} to allow it "
                f"once more, then restart the worker",
            )
        self._tried = True
        return self._pin

    def accepted(self) -> None:
        """The SIM took the PIN: it may be entered again when the modem restarts and asks for it."""
        self._accepted = True

    def rejected(self) -> None:
        """Remember (durably) that the SIM rejected the configured PIN. A failed write is logged: this process
        still never enters it again."""
        if self._pin is None:
            return
        try:
            self._path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self._path.with_suffix(".tmp")
            tmp.write_text(
                json.dumps({"rejected_pin_sha256": self._fingerprint(), "at": int(time.time())}), encoding="utf-8"
            )
            os.replace(tmp, self._path)
        except OSError as exc:
            log.error(
                "modem %s: cannot record the rejected PIN in %s (%s); a restart would try it again",
                self._modem_id,
                self._path,
                exc,
            )
