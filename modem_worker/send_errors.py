"""What a refused send means, and what the modem worker does about it: ONE table, used by the code and printed in
docs/modem.md (``tests/test_send_errors.py`` checks that the two agree).

The causes are the RP-/CP-cause values of 3GPP TS 24.011 §8.2.5.4 and §8.1.4.2 that a modem reports as
``+CMS ERROR: <n>`` (27.005 §3.2.5 passes them through below 128) plus the modem-side values 300-511 of
27.005 §3.2.5, and the few ``+CME ERROR`` values (27.007 §9.2) modems answer to ``AT+CMGS`` when the SIM itself
is the problem. Three kinds:

* ``recipient``: permanent for this recipient or this message (unassigned number, rejected, unknown subscriber).
  Reported failed at once, never retried: another try or another SIM gets the same answer.
* ``transient``: the network (or the modem) cannot take it *now*. Retried, at most ``SEND_TRIES`` tries in all,
  through another modem where the SMS's route allows; reported failed after the last.
* ``sim``: every SMS through this SIM will fail (operator barring, facility not subscribed, no network service).
  The SIM is paused (``modem_worker.sim_guard``) and the SMS handed back, not failed, so another modem sends it.

A code the table does not know counts as transient: a bounded number of tries costs little, a wrongly failed SMS
is lost to its recipient.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Final

SEND_TRIES: Final[int] = 3  # tries of one SMS that the network refused (transient or SIM-level), in all modems


class Kind(StrEnum):
    """What a refused send means for the SMS and the SIM."""

    RECIPIENT = "recipient"
    TRANSIENT = "transient"
    SIM = "sim"


# What the worker does for each kind (the docs' last column).
ACTIONS: Final[dict[Kind, str]] = {
    Kind.RECIPIENT: "reported failed at once",
    Kind.TRANSIENT: f"tried again, {SEND_TRIES} tries in all, then failed",
    Kind.SIM: "SIM paused; SMS handed back",
}


@dataclass(frozen=True)
class Cause:
    """One refusal: ``source`` CMS or CME (which ``+CM? ERROR`` it came as; None when the modem gave no code),
    ``code``, ``kind`` and the standard's wording."""

    source: str | None
    code: int | None
    kind: Kind
    meaning: str

    def describe(self) -> str:
        """``+CMS ERROR 21 (short message transfer rejected)``, for details reported to the server and logs."""
        if self.code is None:
            return self.meaning
        return f"+{self.source} ERROR {self.code} ({self.meaning})"


def _causes(source: str, kind: Kind, *rows: tuple[int, str]) -> list[Cause]:
    return [Cause(source, code, kind, meaning) for code, meaning in rows]


TABLE: Final[tuple[Cause, ...]] = tuple(
    sorted(
        [
            *_causes(
                "CMS",
                Kind.RECIPIENT,
                (1, "unassigned (unallocated) number"),
                (21, "short message transfer rejected"),
                (28, "unidentified subscriber"),
                (29, "facility rejected"),
                (30, "unknown subscriber"),
                (96, "invalid mandatory information"),
            ),
            *_causes(
                "CMS",
                Kind.SIM,
                (8, "operator determined barring"),
                (10, "call barred"),
                (50, "requested facility not subscribed"),
                (69, "requested facility not implemented"),
                (310, "SIM not inserted"),
                (311, "SIM PIN required"),
                (313, "SIM failure"),
                (316, "SIM PUK required"),
                (330, "SMSC address unknown"),
                (331, "no network service"),
            ),
            *_causes(
                "CMS",
                Kind.TRANSIENT,
                (27, "destination out of service"),
                (38, "network out of order"),
                (41, "temporary failure"),
                (42, "congestion"),
                (47, "resources unavailable, unspecified"),
                (111, "protocol error, unspecified"),
                (127, "interworking, unspecified"),
                (332, "network time-out"),
                (500, "unknown error"),
            ),
            *_causes(
                "CME",
                Kind.SIM,
                (10, "SIM not inserted"),
                (11, "SIM PIN required"),
                (12, "SIM PUK required"),
                (13, "SIM failure"),
                (30, "no network service"),
            ),
        ],
        key=lambda c: (c.source != "CMS", c.code or 0),
    )
)

_BY_KEY: Final[dict[tuple[str | None, int | None], Cause]] = {(c.source, c.code): c for c in TABLE}

INVALID: Final[Cause] = Cause(None, None, Kind.RECIPIENT, "the number or text cannot be sent as an SMS")
NO_CODE: Final[Cause] = Cause(None, None, Kind.TRANSIENT, "refused without a cause (plain ERROR)")


def classify(source: str | None, code: int | None, *, invalid: bool = False) -> Cause:
    """The cause of a refused send: ``source`` "CMS"/"CME" and ``code`` as the modem answered (None: no code),
    ``invalid`` when the SMS could not even be encoded (bad number, text too long). Unknown codes are transient."""
    if invalid:
        return INVALID
    if code is None:
        return NO_CODE
    known = _BY_KEY.get((source, code))
    return known or Cause(source, code, Kind.TRANSIENT, "cause not in the table: treated as transient")


def markdown_table() -> str:
    """The table as Markdown, exactly as docs/modem.md shows it."""
    lines = ["| answer | code | meaning | class | what the gateway does |", "|---|---|---|---|---|"]
    for cause in TABLE:
        lines.append(
            f"| `+{cause.source} ERROR` | {cause.code} | {cause.meaning} | {cause.kind} | {ACTIONS[cause.kind]} |"
        )
    for cause in (INVALID, NO_CODE):
        lines.append(f"| (none) | - | {cause.meaning} | {cause.kind} | {ACTIONS[cause.kind]} |")
    lines.append(f"| any other code | - | not in this table | transient | {ACTIONS[Kind.TRANSIENT]} |")
    return "\n".join(lines)
