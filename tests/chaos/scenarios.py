"""The two forms of the chaos suite: the short one in the test command, the long one by hand.

Both are a :class:`~tests.chaos.harness.Plan` made from a seed: which faults, in which (seeded) order.
"""

from __future__ import annotations

import random

from tests.chaos.harness import WORKER_KINDS, Plan

SHORT_SEED = 1313


def short_plan(seed: int = SHORT_SEED) -> Plan:
    """~50 inbound, ~30 outbound; each worker kind SIGKILLed once, a RabbitMQ and a PostgreSQL outage, an unplug,
    flaky servers throughout. Well under 3 minutes on a loaded 2-core machine."""
    faults = [f"kill:{kind}" for kind in WORKER_KINDS] + ["broker", "ledger", "unplug"]
    random.Random(seed).shuffle(faults)
    return Plan(seed=seed, inbound=50, outbound=30, faults=faults, settle_s=120.0, point_wait_s=20.0)


def long_plan(seed: int, minutes: float) -> Plan:
    """Every fault repeatedly for about ``minutes`` of traffic, a PostgreSQL outage of >= 60 s, a sticky server,
    two hosts (two modem workers and two task pollers on state directories of their own, one ledger)."""
    rng = random.Random(seed)
    # One round is roughly a minute: 4 kills (~10 s each), a 15 s broker outage, an unplug, a sticky server.
    rounds = max(1, round(minutes))
    faults: list[str] = []
    for _ in range(rounds):
        one = [f"kill:{kind}" for kind in WORKER_KINDS] + ["broker", "ledger", "unplug", "sticky"]
        rng.shuffle(one)
        faults += one
    faults.insert(rng.randrange(len(faults)), "ledger-long")
    return Plan(
        seed=seed,
        inbound=150 * rounds,
        outbound=100 * rounds,
        faults=faults,
        hosts=2,
        broker_outage_s=15.0,
        ledger_outage_s=10.0,
        unplug_s=10.0,
        sticky_s=30.0,
        settle_s=600.0,
    )
