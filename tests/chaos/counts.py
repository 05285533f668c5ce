"""What a chaos run counts, and the table it prints.

Each inbound SMS has a sender of its own and each outbound SMS a recipient of its own, so every copy the servers
and the simulators hold can be traced to the one SMS it came from, whatever happened on the way.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

COLUMNS = ("lost", "altered", "under two ids", "sent twice", "parked", "unreported", "unknown")
# Not failures by themselves: an outbound SMS whose send a crash or an unplug interrupted is reported "Outcome
# unknown" (it may or may not have left; never resent blindly, services/ledger). Each such fault can leave at
# most one per modem, so only more of them than the run's faults explain are counted as bad.
INFO_COLUMNS = frozenset({"unknown"})
UNKNOWN_PREFIX = "Outcome unknown"  # services/result_codes.py: the sent_result_message of an unknown outcome


@dataclass
class Tally:
    """The counts of one direction; ``None`` marks a column that does not apply to it."""

    total: int
    counts: dict[str, int | None] = field(default_factory=lambda: dict.fromkeys(COLUMNS, 0))
    examples: list[str] = field(default_factory=list)
    unknown_explained: int = 0  # "unknown" outcomes the run's faults can explain (modem worker kills, unplugs)

    def add(self, column: str, example: str, n: int = 1) -> None:
        self.counts[column] = (self.counts[column] or 0) + n
        if len(self.examples) < 20:
            self.examples.append(f"{column}: {example}")

    @property
    def unexplained_unknown(self) -> int:
        """The "unknown" outcomes beyond what the faults explain: sends interrupted by nothing the run did."""
        return max(0, (self.counts.get("unknown") or 0) - self.unknown_explained)

    @property
    def bad(self) -> int:
        failures = sum(n or 0 for column, n in self.counts.items() if column not in INFO_COLUMNS)
        return failures + self.unexplained_unknown


def count_inbound(
    expected: Mapping[str, str], received_by_endpoint: Mapping[str, list[dict[str, Any]]], parked: int
) -> Tally:
    """Inbound (SMS, endpoint) pairs: every endpoint must hold each sender's one SMS once, with its text.

    ``expected`` maps sender → text; ``received_by_endpoint`` is each reference server's ``received()`` list.
    A repeat of the same message_id is the protocol's retry (the server dedupes it), not a duplicate.
    """
    tally = Tally(total=len(expected) * len(received_by_endpoint))
    tally.counts["sent twice"] = None
    tally.counts["unreported"] = None
    tally.counts["unknown"] = None
    for endpoint, received in received_by_endpoint.items():
        by_sender: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for record in received:
            by_sender[str(record.get("from"))].append(record)
        for sender, text in expected.items():
            copies = by_sender.get(sender, [])
            if not copies:
                tally.add("lost", f"{sender} at {endpoint}")
                continue
            if any(copy.get("message") != text for copy in copies):
                tally.add("altered", f"{sender} at {endpoint}: {[c.get('message') for c in copies]!r}")
            ids = {copy.get("message_id") for copy in copies}
            if len(ids) > 1:
                tally.add("under two ids", f"{sender} at {endpoint}: {sorted(map(str, ids))}")
    if parked:
        tally.add("parked", f"{parked} in the inbound parked queues", parked)
    return tally


def _copy(item: Mapping[str, Any]) -> str:
    """One copy that left a SIM, as the verdict names it: modem, simulator time, TP-MR(s)."""
    at = item.get("at")
    when = time.strftime("%H:%M:%S", time.localtime(at / 1000)) + f".{at % 1000:03d}" if isinstance(at, int) else "?"
    return f"{item.get('modem', '?')} at {when} TP-MR {item.get('references', item.get('reference', '?'))}"


def _reported_unknown(record: Mapping[str, Any]) -> bool:
    """Whether the gateway reported this SMS's outcome as unknown (in any result row the server stored)."""
    rows = [record, *record.get("results", [])]
    return any(str(row.get("sent_result_message") or "").startswith(UNKNOWN_PREFIX) for row in rows)


def count_outbound(
    expected: Mapping[str, str],
    outgoing: Iterable[dict[str, Any]],
    outbox: Iterable[dict[str, Any]],
    parked: int,
    *,
    unknown_explained: int = 0,
) -> Tally:
    """Outbound SMS: each recipient's one SMS left a SIM exactly once, with its text, and its sent result reached
    the server that queued it. ``expected`` maps recipient → text; ``outgoing`` is the server's records (they give
    each SMS's uuid, named in the verdict), ``outbox`` every simulator's outbox (an item may say its ``modem``).

    An SMS reported "Outcome unknown" (a send a SIGKILL or an unplug interrupted) that left once or never is
    counted "unknown", not lost: the design reports it and never resends it blindly. ``unknown_explained`` is how
    many such sends the run's faults can explain; more are bad. Left twice is always bad.
    """
    tally = Tally(total=len(expected), unknown_explained=unknown_explained)
    tally.counts["under two ids"] = None
    copies: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for item in outbox:
        copies[str(item.get("to"))].append(item)
    records = {str(r.get("to")): r for r in outgoing}
    for to, text in expected.items():
        record = records.get(to, {})
        name = f"{record.get('uuid', '?')} to {to}"
        sent = copies.get(to, [])
        unknown = _reported_unknown(record)
        if unknown:
            tally.add("unknown", f"{name}: reported unknown, left a SIM {len(sent)} time(s)")
        if not sent:
            if not unknown:
                tally.add("lost", f"{name} (server status {record.get('status')!r})")
            continue
        if len(sent) > 1:
            tally.add("sent twice", f"{name}: {len(sent)} times: {'; '.join(_copy(c) for c in sent)}")
        if any(c.get("text") != text for c in sent):
            tally.add("altered", f"{name}: {[c.get('text') for c in sent]!r}")
        # The server asks (?task=result) for every SMS until its delivery result came (docs/protocol.md).
        status = record.get("status")
        if status not in ("delivered", "failed"):
            tally.add("unreported", f"{name}: sent, the server still waits for its result (status {status!r})")
    if parked:
        tally.add("parked", f"{parked} in the outbound/events parked queues", parked)
    if tally.unexplained_unknown:
        tally.examples.append(
            f"unknown: {tally.counts['unknown']} reported unknown, more than the {unknown_explained} sends the "
            "faults could interrupt"
        )
    return tally


def render(tallies: Mapping[str, Tally], seed: int, faults: Iterable[str]) -> str:
    """The table a run prints (and a failing test shows), with the seed to reproduce it."""
    width = max(len(c) for c in COLUMNS)
    lines = [f"chaos run, seed {seed}; faults: {', '.join(faults) or 'none'}"]
    lines.append(f"{'':<10}{'total':>8}" + "".join(f"{c:>{width + 2}}" for c in COLUMNS))
    for name, tally in tallies.items():
        cells = "".join(f"{'-' if tally.counts[c] is None else tally.counts[c]:>{width + 2}}" for c in COLUMNS)
        lines.append(f"{name:<10}{tally.total:>8}{cells}")
    for name, tally in tallies.items():
        lines.extend(f"  {name} {example}" for example in tally.examples)
    return "\n".join(lines)
