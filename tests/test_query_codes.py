"""Query codes (@10-@40): recognising them and wording the answer."""

from __future__ import annotations

import dataclasses

import pytest

from services.schemas import InboundSms
from sync_worker.query_codes import answer, describe_battery, describe_signal, query_code

SMS = InboundSms(
    "id-1", "+255700000001", "@40", 1700000000000, "+255700000009", "gw-1", "m0", 1, modem_signal=17, modem_battery=42
)


@pytest.mark.parametrize(
    ("text", "code"),
    [("@10", "@10"), (" @40\n", "@40"), ("@50", None), ("@10 hi", None), ("email me @10am", None), ("", None)],
)
def test_only_a_bare_code_is_a_query(text: str, code: str | None) -> None:
    assert query_code(text) == code


def test_signal_in_dbm_and_unknowns() -> None:
    assert describe_signal(0) == "signal 0/31 (-113 dBm)"
    assert describe_signal(31) == "signal 31/31 (-51 dBm)"
    assert describe_signal(None) == "signal unknown"
    assert describe_battery(None) == "battery unknown"


def test_each_code_answers_its_part_and_probes_only_when_asked() -> None:
    probes: list[str] = []

    def probe() -> str:
        probes.append("probe")
        return "Sync URL HTTP 200"

    assert answer("@10", SMS, probe, "gw-1") == "gw-1: signal 17/31 (-79 dBm)"
    assert answer("@30", SMS, probe, "gw-1") == "gw-1: battery 42%"
    assert probes == []
    assert answer("@20", SMS, probe, "gw-1") == "gw-1: Sync URL HTTP 200"
    unknown = dataclasses.replace(SMS, modem_signal=None, modem_battery=None)
    assert answer("@40", unknown, probe, "gw-1") == "gw-1: signal unknown, Sync URL HTTP 200, battery unknown"
    assert probes == ["probe", "probe"]
    with pytest.raises(ValueError, match="not a query code"):
        answer("@99", SMS, probe, "gw-1")
