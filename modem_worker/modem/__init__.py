"""Typed adapter around python-gsmmodem-new: the only place that talks AT to a modem.

:class:`Modem` (``adapter``) is the facade the worker uses: it connects, closes and routes the modem's unsolicited
lines to its parts: ``sender`` (AT+CMGS), ``receiver`` and ``reassembly`` (URCs, SIM sweep, concatenated SMS),
``identity`` (IMEI/ICCID/IMSI, settings check, SIM PIN), ``ussd`` (requests, answer decoding). ``at_fixes`` is
the library with its bugs fixed; GSM-7 and SMS-SUBMIT encoding live in :mod:`modem_worker.sms_text`. The modem
reports its own events (boot lines, a lost link) to one :class:`ModemListener`.

Delivery contract ("an SMS leaves the SIM only after the broker confirmed it"):

* New SMS are stored on the SIM (CNMI mt=1) and announced with +CMTI. A single worker thread reads the
  message, hands it to ``on_message`` and deletes it from the SIM only after ``on_message`` returned
  normally. If ``on_message`` raises, the message stays on the SIM and :meth:`Modem.sweep_stored` retries it.
* Concatenated parts stay on the SIM, buffered in memory by (sender, reference, total), until every part
  is there; then ``on_message`` gets the joined text once and all parts are deleted. A message still
  incomplete after ``multipart_timeout_s`` is delivered with what arrived (``complete=False``, missing parts
  as "[…]") so nothing is held forever; a straggler arriving later comes out as its own fragment.
* A copy whose SIM deletion failed after delivery is remembered in a :class:`PendingDeletes`, and deleted
  without a second delivery when it is seen again. The worker owns that memory for its whole process and passes it
  to the adapter it opens for each connection, so a delete a lost link cut off is finished by the sweep after the
  reconnect, without a second publish. The memory is bounded (oldest entries dropped) and dies with the process:
  after a worker restart such a copy is delivered again, under the same ``message_id`` downstream (the designed
  at-least-once, docs/reliability.md).
* Status reports (+CDSI, SR memory) go to ``on_status_report`` and are deleted after it returns.
* A stored PDU that cannot be decoded goes to ``on_unreadable`` (raw hex and reason) and is deleted only after
  it returned, so the raw copy is kept somewhere before it leaves the SIM. Without that callback, or while it
  raises, it stays on the SIM and is logged once (not on every sweep).
* A concatenated part whose sequence number is 0 or above its part count cannot be placed in its message: it
  is delivered on its own as a single SMS (``parts=1``) rather than buffered under an impossible number.
* :meth:`Modem.sweep_stored` stops at the first ``on_message``/``on_status_report`` failure (the broker is
  most likely down): the rest stays on the SIM for the next sweep instead of each SMS waiting out a timeout.

Bugs of the library fixed here or in :mod:`modem_worker.modem.at_fixes` are listed in that module and in
``tests/test_modem_adapter.py``.
"""

from modem_worker.sms_text import unpack_septets

from .adapter import Modem
from .errors import ModemError, ModemUnavailable, SendFailed, SendOutcomeUnknown, SimLocked
from .events import ModemListener, QuietListener
from .identity import SimUnlock, read_imei
from .messages import (
    ModemIdentity,
    ModemInfo,
    ReceivedMessage,
    SendReceipt,
    StatusReport,
    StorageUse,
    UnreadableMessage,
)
from .pending import PendingDeletes
from .reassembly import MISSING_PART
from .ussd import USSD_CODE_RE, decode_ussd_text, first_amount

__all__ = [
    "MISSING_PART",
    "USSD_CODE_RE",
    "Modem",
    "ModemError",
    "ModemIdentity",
    "ModemInfo",
    "ModemListener",
    "ModemUnavailable",
    "PendingDeletes",
    "QuietListener",
    "ReceivedMessage",
    "SendFailed",
    "SendOutcomeUnknown",
    "SendReceipt",
    "SimLocked",
    "SimUnlock",
    "StatusReport",
    "StorageUse",
    "UnreadableMessage",
    "decode_ussd_text",
    "first_amount",
    "read_imei",
    "unpack_septets",
]
