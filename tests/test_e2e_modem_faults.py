"""Issue 7 acceptance (the modem's lifecycle), black-box: real worker processes, the pty simulator with its faults,
RabbitMQ and a Sync server on loopback. Hang, reboot, SIM PIN, IMEI mismatch, SMSGW_MODEM_PORT=auto."""

from __future__ import annotations

import signal
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from reference_server.server import ReferenceServer
from scripts.stack import Simulator, Stack, http_json
from services import broker
from services.broker import Publication, PublisherThread
from services.schemas import OutboundSms
from services.topology import OUTBOUND_QUEUE
from tests.conftest import wait_for

SECRET = "s3cret"
IMEI_A, IMEI_B = "356938035643801", "356938035643802"
# Short intervals keep these tests at seconds: a probe every second, a reconnect within 2 s.
FAST = {"SMSGW_MODEM_WATCHDOG": "1", "SMSGW_METRICS_PORT": "0"}


@pytest.fixture
def server() -> Iterator[ReferenceServer]:
    srv = ReferenceServer(SECRET, reply=False).start()
    yield srv
    srv.stop()


@pytest.fixture
def stack(clean_broker: str, server: ReferenceServer, tmp_path: Path) -> Iterator[Stack]:
    st = Stack(tmp_path, clean_broker, server.url, SECRET, env=dict(FAST))
    yield st
    st.stop_all()


def _state(simulator: Simulator) -> dict[str, Any]:
    return dict(http_json(f"{simulator.control_url}/state"))


def _modem_id() -> str:
    return f"fault-{uuid.uuid4().hex[:8]}"


def _messages(server: ReferenceServer) -> list[str]:
    return sorted(m["message"] for m in server.received())


def _assert_once(server: ReferenceServer, texts: list[str]) -> None:
    received = server.received()
    assert sorted(m["message"] for m in received) == sorted(texts)
    assert len({m["message_id"] for m in received}) == len(texts)
    assert all(m["repeats"] == 0 for m in received), "an SMS reached the Sync URL twice"


def _lines(stack: Stack, name: str, level: str, needle: str = "") -> list[str]:
    return [ln for ln in stack.log_text(name).splitlines() if level in ln and needle in ln]


def _publish_outbound(stack: Stack, modem_id: str, to: str, text: str) -> str:
    publisher = PublisherThread(stack.amqp_url, "test", [modem_id])
    try:
        sms = OutboundSms(str(uuid.uuid4()), to, text, "task", broker.now_ms(), report=True)
        publisher.publish(Publication(OUTBOUND_QUEUE, sms.to_json(), message_id=sms.uuid))
    finally:
        publisher.close()
    return sms.uuid


def _up(stack: Stack, simulator: Simulator, modem_id: str, **env: str) -> None:
    stack.start_modem_worker("modem_worker", simulator, modem_id, env=env)
    stack.start("sync_worker", "sync_worker")


def test_a_hung_modem_is_reopened_and_every_sms_arrives_once_within_a_minute(
    stack: Stack, server: ReferenceServer
) -> None:
    simulator = stack.start_simulator("simulator", "+255754000001")
    modem_id = _modem_id()
    _up(stack, simulator, modem_id)
    simulator.inject("+255741000001", "before the hang")
    wait_for(lambda: _messages(server) == ["before the hang"], timeout=30, what="the first SMS")
    hung_at = time.monotonic()
    simulator.set_state(hang=True)
    during = [f"during the hang {i}" for i in range(3)]
    for text in during:
        simulator.inject("+255741000002", text)
    wait_for(lambda: not _state(simulator)["hang"], timeout=30, what="the worker to reopen the port")
    after = [f"after the hang {i}" for i in range(2)]
    for text in after:
        simulator.inject("+255741000003", text)
    everything = sorted(["before the hang", *during, *after])
    wait_for(
        lambda: _messages(server) == everything,
        timeout=60 - (time.monotonic() - hung_at),
        what="every SMS within a minute of the hang",
    )
    _assert_once(server, everything)
    wait_for(lambda: simulator.inbox() == [], timeout=10, what="the SIM emptied")
    # One episode: one WARNING when it started, one INFO when the modem was back.
    assert len(_lines(stack, "modem_worker", "WARNING", "reopening the port")) == 1
    assert len(_lines(stack, "modem_worker", "INFO", "back after")) == 1


def test_a_rebooted_modem_is_reinitialised_inbound_and_outbound_keep_working(
    stack: Stack, server: ReferenceServer
) -> None:
    simulator = stack.start_simulator("simulator", "+255754000001")
    modem_id = _modem_id()
    _up(stack, simulator, modem_id)
    simulator.inject("+255742000001", "before the reboot")
    wait_for(lambda: _messages(server) == ["before the reboot"], timeout=30, what="the first SMS")
    http_json(f"{simulator.control_url}/reboot", {})
    # The reboot reset echo, PDU mode and +CNMI: a worker that did not notice would never hear of new SMS.
    wait_for(
        lambda: _state(simulator)["cnmi"][0] == 1 and not _state(simulator)["echo"],
        timeout=20,
        what="the worker to re-initialise the modem",
    )
    simulator.inject("+255742000002", "after the reboot")
    wait_for(lambda: len(server.received()) == 2, timeout=30, what="the SMS after the reboot")
    _assert_once(server, ["after the reboot", "before the reboot"])
    _publish_outbound(stack, modem_id, "+255742000003", "outbound after the reboot")
    wait_for(
        lambda: [o["text"] for o in simulator.outbox()] == ["outbound after the reboot"],
        timeout=30,
        what="the outbound SMS sent",
    )
    assert len(_lines(stack, "modem_worker", "WARNING", "restarted")) == 1


def test_the_right_pin_unlocks_the_sim_and_again_after_a_reboot(stack: Stack, server: ReferenceServer) -> None:
    simulator = stack.start_simulator("simulator", "+255754000001", None, "--pin", "1234")
    _up(stack, simulator, _modem_id(), SMSGW_SIM_PIN="1234")
    simulator.inject("+255743000001", "pin ok")
    wait_for(lambda: _messages(server) == ["pin ok"], timeout=30, what="the SMS through an unlocked SIM")
    assert _state(simulator)["pin_attempts"] == 1
    # A modem that restarts asks for its PIN again: the PIN the SIM accepted is entered again (it is right).
    http_json(f"{simulator.control_url}/reboot", {})
    wait_for(
        lambda: _state(simulator)["sim_status"] == "READY" and _state(simulator)["cnmi"][0] == 1,
        timeout=20,
        what="the SIM unlocked again after the reboot",
    )
    simulator.inject("+255743000002", "pin ok after the reboot")
    wait_for(lambda: len(server.received()) == 2, timeout=30, what="the SMS after the reboot")
    assert _state(simulator)["pin_attempts"] == 2
    assert "1234" not in stack.log_text("modem_worker"), "the PIN is never logged"


def test_a_wrong_pin_is_tried_once_and_the_worker_stops_with_one_line(
    stack: Stack, server: ReferenceServer, tmp_path: Path
) -> None:
    simulator = stack.start_simulator("simulator", "+255754000001", None, "--pin", "1234")
    pin_file = tmp_path / "sim-pin"
    pin_file.write_text("9999\n")
    simulator.inject("+255744000001", "waits in the network for the locked SIM")
    _up(stack, simulator, _modem_id(), SMSGW_SIM_PIN_FILE=str(pin_file))
    wait_for(lambda: _lines(stack, "modem_worker", "CRITICAL"), timeout=30, what="the CRITICAL line")
    process = stack.processes["modem_worker"]
    assert process.popen.poll() is None, "blocked, not exited: compose must not restart it into the PIN"
    # A restarted worker (compose, an operator) does not enter the rejected PIN again.
    stack.kill("modem_worker", signal.SIGTERM)
    assert process.popen.returncode == 3
    stack.restart("modem_worker")
    wait_for(lambda: len(_lines(stack, "modem_worker", "CRITICAL")) >= 2, timeout=30, what="the second CRITICAL")
    state = _state(simulator)
    assert state["pin_attempts"] == 1 and state["sim_status"] == "SIM PIN", "one try burnt, never the PUK"
    critical = _lines(stack, "modem_worker", "CRITICAL")
    assert len(critical) == 2 and "rejected" in critical[0] and "SMSGW_SIM_PIN" in critical[0]
    assert "9999" not in stack.log_text("modem_worker")
    assert server.received() == [], "a locked SIM receives nothing (the network holds the SMS)"


def test_another_modems_imei_is_refused_and_nothing_is_sent(stack: Stack, server: ReferenceServer) -> None:
    simulator = stack.start_simulator("simulator", "+255754000001", None, "--imei", IMEI_A)
    modem_id = _modem_id()
    _publish_outbound(stack, modem_id, "+255745000001", "must not leave through another SIM")
    simulator.inject("+255745000002", "stays on the SIM")
    _up(stack, simulator, modem_id, SMSGW_MODEM_IMEI=IMEI_B)
    wait_for(lambda: _lines(stack, "modem_worker", "ERROR", "refused the modem"), timeout=30, what="the refusal")
    # Looked at again (the modem may come back on another port) without initialising it or logging again.
    wait_for(
        lambda: http_json(f"{simulator.control_url}/log").count("AT+CGSN") >= 3,
        timeout=30,
        what="three identity checks",
    )
    assert len(_lines(stack, "modem_worker", "ERROR", "refused the modem")) == 1
    assert set(http_json(f"{simulator.control_url}/log")) == {"AT+CGSN"}, "only the IMEI was read"
    assert simulator.outbox() == [] and len(simulator.inbox()) == 1 and server.received() == []


def test_auto_port_picks_the_simulator_whose_imei_matches(stack: Stack, server: ReferenceServer) -> None:
    other = stack.start_simulator("sim_a", "+255754000001", None, "--imei", IMEI_A)
    mine = stack.start_simulator("sim_b", "+255754000002", None, "--imei", IMEI_B)
    other.inject("+255746000001", "for the other modem")
    mine.inject("+255746000002", "for this modem")
    stack.start(
        "modem_worker",
        "modem_worker",
        env={
            "SMSGW_MODEM_PORT": "auto",
            "SMSGW_MODEM_IMEI": IMEI_B,
            "SMSGW_MODEM_ID": _modem_id(),
            "SMSGW_MODEM_PORT_GLOB": str(stack.workdir / "*.tty"),
        },
    )
    stack.start("sync_worker", "sync_worker")
    wait_for(lambda: _messages(server) == ["for this modem"], timeout=30, what="the SMS of the matching modem")
    assert len(other.inbox()) == 1, "the other modem was not taken"
    info = [ln for ln in _lines(stack, "modem_worker", "INFO", "IMEI") if IMEI_B in ln]
    assert info and str(mine.link) in info[0]
