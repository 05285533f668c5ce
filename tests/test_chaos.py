"""The chaos suite, short form (issue 13): the whole gateway as real processes, with every worker kind SIGKILLed
once at a seeded random point, a RabbitMQ outage and a PostgreSQL outage (a TCP proxy of the test's own is cut; the
machine's services are never stopped), a modem unplug and flaky servers, while ~50 inbound and ~30 outbound SMS
flow. Nothing may be lost, altered, duplicated under two ids, sent twice, parked or left unreported.

The long form runs by hand: ``python -m tests.chaos --long [--seed N] [--minutes M]`` (tests/chaos/__main__.py).
"""

from __future__ import annotations

import urllib.parse
from pathlib import Path

from tests.chaos.harness import run_plan
from tests.chaos.scenarios import SHORT_SEED, short_plan


def test_chaos_short_form_loses_nothing_and_sends_nothing_twice(
    fresh_amqp_url: str, fresh_pg_url: str, tmp_path: Path
) -> None:
    plan = short_plan(SHORT_SEED)
    vhost = urllib.parse.unquote(urllib.parse.urlsplit(fresh_amqp_url).path.lstrip("/"))
    lines: list[str] = []
    result = run_plan(plan, tmp_path, fresh_amqp_url, fresh_pg_url, vhost, lines.append)
    report = "\n".join(lines)
    print(report)  # the seed and the table, also when the test passes (pytest -s / the captured output)
    assert result.settled, f"the gateway did not settle after the last fault\n{report}"
    assert result.bad == 0, f"the chaos run found lost, doubled, parked or unreported SMS\n{report}"
    assert len(result.played) == len(plan.faults), "every fault was played"
    assert result.tallies["inbound"].total == 100 and result.tallies["outbound"].total == 30
