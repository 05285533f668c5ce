"""What a chaos run counts, and the table it prints.

Each inbound SMS has a sender of its own and each outbound SMS a recipient of its own, so every copy the servers
and the simulators hold can be traced to the one SMS it came from, whatever happened on the way.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

COLUMNS = ("lost", "altered", "under two ids", "sent twice", "parked", "unreported")


@dataclass
class Tally:
    """The counts of one direction; ``None`` marks a column that does not apply to it."""

    total: int
    counts: dict[str, int | None] = field(default_factory=lambda: dict.fromkeys(COLUMNS, 0))
    examples: list[str] = field(default_factory=list)

    def add(self, column: str, example: str, n: int = 1) -> None:
        self.counts[column] = (self.counts[column] or 0) + n
        if len(self.examples) < 10:
            self.examples.append(f"{column}: {example}")

    @property
    def bad(self) -> int:
        return sum(n or 0 for n in self.counts.values())


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


def count_outbound(
    expected: Mapping[str, str], outgoing: Iterable[dict[str, Any]], outbox: Iterable[dict[str, Any]], parked: int
) -> Tally:
    """Outbound SMS: each recipient's one SMS left a SIM exactly once, with its text, and its sent result reached
    the server that queued it. ``expected`` maps recipient → text; ``outgoing`` is the server's records,
    ``outbox`` every simulator's outbox."""
    tally = Tally(total=len(expected))
    tally.counts["under two ids"] = None
    sent: Counter[str] = Counter()
    texts: dict[str, list[str]] = defaultdict(list)
    for item in outbox:
        sent[str(item.get("to"))] += 1
        texts[str(item.get("to"))].append(str(item.get("text")))
    records = {str(r.get("to")): r for r in outgoing}
    for to, text in expected.items():
        if sent[to] == 0:
            tally.add("lost", f"to {to} (server status {records.get(to, {}).get('status')!r})")
            continue
        if sent[to] > 1:
            tally.add("sent twice", f"to {to}: {sent[to]} times")
        if any(t != text for t in texts[to]):
            tally.add("altered", f"to {to}: {texts[to]!r}")
        # The server asks (?task=result) for every SMS until its delivery result came (docs/protocol.md).
        status = records.get(to, {}).get("status")
        if status not in ("delivered", "failed"):
            tally.add("unreported", f"to {to}: sent, the server still waits for its result (status {status!r})")
    if parked:
        tally.add("parked", f"{parked} in the outbound/events parked queues", parked)
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
