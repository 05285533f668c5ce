"""Where an outbound SMS may go (services/routing.py): route -> queue, a reply -> the receiving modem with the
failover TTL, and the hand-back of an SMS a modem cannot send now. Pure functions: no broker needed."""

from __future__ import annotations

import tomllib

import pytest

from services.config import FleetConfig, parse_fleet
from services.routing import (
    HandOn,
    RetryHere,
    TaskRouter,
    hand_back,
    outbound_queue_for_route,
    reply_route,
)
from services.schemas import OutboundSms
from services.topology import OUTBOUND_QUEUE, outbound_queue_for, pool_queue_for

FLEET = """
[[endpoints]]
name = "clinic"
sync_url = "https://clinic.example/smssync"
message_results = true

[[endpoints]]
name = "helpline"
sync_url = "https://helpline.example/smssync"

[[routes]]
prefix = "+25573"
modems = ["modem2"]

[[routes]]
prefix = "+2557"
modems = ["modem3", "modem1"]

[modems.modem1]
[modems.modem2]
[modems.modem3]
"""


@pytest.fixture
def fleet() -> FleetConfig:
    return parse_fleet(tomllib.loads(FLEET), "fleet.toml")


# --- route -> queue ---------------------------------------------------------------------------------------------


def test_a_route_of_one_modem_is_its_queue_of_several_their_pool_of_none_the_shared_queue() -> None:
    assert outbound_queue_for_route([]) == OUTBOUND_QUEUE
    assert outbound_queue_for_route(["modem2"]) == outbound_queue_for("modem2") == "smsgw.outbound.modem2"
    assert outbound_queue_for_route(["modem2", "modem2"]) == "smsgw.outbound.modem2"
    assert outbound_queue_for_route(["modem3", "modem1"]) == pool_queue_for(["modem1", "modem3"])
    assert outbound_queue_for_route(["modem3", "modem1"]) == "smsgw.outbound.pool.modem1+modem3"


def test_the_task_router_picks_the_first_matching_route_and_tells_the_sms_its_modems(fleet: FleetConfig) -> None:
    router = TaskRouter(fleet)
    routed = router.route("clinic", "u-1", "+255730000001", "Habari", 1_700_000_000_000)
    assert routed.queue == "smsgw.outbound.modem2"
    assert routed.sms == OutboundSms(
        uuid="u-1",
        to="+255730000001",
        text="Habari",
        origin="task",
        created_at=1_700_000_000_000,
        report=True,
        dedup_key=routed.sms.dedup_key,
        endpoint="clinic",
        modems=["modem2"],
    )
    pooled = router.route("clinic", "u-2", "+255740000001", "Habari", 0)
    assert (pooled.queue, pooled.sms.modems) == ("smsgw.outbound.pool.modem1+modem3", ["modem3", "modem1"])
    anywhere = router.route("clinic", "u-3", "+254700000001", "Habari", 0)
    assert (anywhere.queue, anywhere.sms.modems) == (OUTBOUND_QUEUE, [])


def test_the_task_router_asks_for_results_only_where_the_endpoint_reports_them(fleet: FleetConfig) -> None:
    router = TaskRouter(fleet)
    assert router.route("clinic", "u-1", "+254700000001", "t", 0).sms.report is True
    assert router.route("helpline", "u-1", "+254700000001", "t", 0).sms.report is False
    # An orphaned claim of an endpoint this fleet no longer has: no events queue, so no events.
    assert router.route("removed", "u-1", "+254700000001", "t", 0).sms.report is False


def test_two_endpoints_offering_one_uuid_are_two_sms(fleet: FleetConfig) -> None:
    router = TaskRouter(fleet)
    clinic = router.route("clinic", "u-1", "+254700000001", "t", 0).sms
    helpline = router.route("helpline", "u-1", "+254700000001", "t", 0).sms
    assert clinic.ledger_key != helpline.ledger_key
    assert (clinic.endpoint, helpline.endpoint) == ("clinic", "helpline")


# --- a reply -> the receiving modem ---------------------------------------------------------------------------


def test_a_reply_goes_to_the_receiving_modem_with_the_failover_time_as_ttl() -> None:
    route = reply_route("modem1", 300)
    assert (route.queue, route.expiration_ms, route.fallback_queue) == (
        "smsgw.outbound.modem1",
        300_000,
        OUTBOUND_QUEUE,
    )
    assert reply_route("modem1", 1.5).expiration_ms == 1500


def test_a_reply_without_failover_waits_for_its_modem() -> None:
    route = reply_route("modem1", 0)
    assert (route.queue, route.expiration_ms) == ("smsgw.outbound.modem1", None)


# --- hand-back of an SMS a modem cannot send now ------------------------------------------------------------------


OWN = "smsgw.outbound.modem1"


@pytest.mark.parametrize("from_queue", [OUTBOUND_QUEUE, "smsgw.outbound.pool.modem1+modem3"])
def test_from_a_shared_or_pool_queue_it_is_retried_and_another_modem_takes_it(from_queue: str) -> None:
    target = hand_back("modem1", from_queue, [], 300, age_ms=1_000)
    assert target == RetryHere(" on modem modem1", failover=True)
    assert hand_back("modem1", from_queue, ["modem1", "modem3"], 0, age_ms=0) == target


def test_from_its_own_queue_an_sms_routed_to_this_modem_waits_for_it() -> None:
    assert hand_back("modem1", OWN, ["modem1"], 300, age_ms=1_000) == RetryHere(
        "; it waits for modem modem1", failover=False
    )


def test_from_its_own_queue_a_reply_keeps_the_rest_of_its_failover_time() -> None:
    target = hand_back("modem1", OWN, [], 300, age_ms=100_000)
    assert target == HandOn(OWN, 200_000, "; any modem may send it in 200s")
    assert target.failover


@pytest.mark.parametrize("age_ms", [300_000, 300_001, 10**9])
def test_once_the_failover_time_is_over_a_reply_goes_to_the_shared_queue(age_ms: int) -> None:
    assert hand_back("modem1", OWN, [], 300, age_ms=age_ms) == HandOn(
        OUTBOUND_QUEUE, None, "; failover time over, any modem may send it"
    )


def test_without_failover_a_reply_goes_back_to_its_modem_without_ttl() -> None:
    assert hand_back("modem1", OWN, [], 0, age_ms=10**9) == HandOn(
        OWN, None, "; it waits for modem modem1 (SMSGW_MODEM_FAILOVER=0)"
    )
