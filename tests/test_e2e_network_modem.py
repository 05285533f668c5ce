"""Issue 14, item 3 acceptance: a modem on another host, behind ser2net, black-box.

A real modem worker process with ``SMSGW_MODEM_PORT=socket://127.0.0.1:P`` talks to the simulator in TCP mode
(``python -m simulator --tcp``, ser2net-like), with RabbitMQ and a Sync server on loopback: an SMS texted to the
simulator reaches the server once, an outgoing SMS is sent once, and both keep working when the TCP link is cut
(the client dropped) and when the far end goes away and comes back (listener closed, then open again). The worker's
``--check`` connects to the endpoint without disturbing the worker. The settings' URL parsing is checked here too.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from reference_server.server import ReferenceServer
from scripts.stack import ROOT, Simulator, Stack
from services import broker
from services.broker import Publication, PublisherThread
from services.config import ConfigError, modem_id_from_port
from services.config.modem_port import modem_port_address
from services.config.variables import PROCESS_VARS
from services.schemas import OutboundSms
from services.topology import OUTBOUND_QUEUE
from tests.conftest import wait_for

SECRET = "s3cret"
# A probe every second: a cut link is found within seconds (it is also seen at once by the read thread).
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


def _messages(server: ReferenceServer) -> list[str]:
    return sorted(m["message"] for m in server.received())


def _publish_outbound(stack: Stack, modem_id: str, to: str, text: str) -> str:
    publisher = PublisherThread(stack.amqp_url, "test", [modem_id])
    try:
        sms = OutboundSms(str(uuid.uuid4()), to, text, "task", broker.now_ms(), report=True)
        publisher.publish(Publication(OUTBOUND_QUEUE, sms.to_json(), message_id=sms.uuid))
    finally:
        publisher.close()
    return sms.uuid


def _sent(simulator: Simulator) -> list[str]:
    return sorted(o["text"] for o in simulator.outbox())


def _connected(simulator: Simulator) -> bool:
    return bool(simulator.health()["client"])


def _connects(stack: Stack) -> int:
    """How often the worker connected to and initialised the modem (one INFO line per connection)."""
    return sum(
        r.get("logger") == "modem_worker.worker" and ": connected (" in r.get("message", "")
        for r in _log_records(stack, "modem_worker")
    )


def _log_records(stack: Stack, name: str) -> list[dict[str, Any]]:
    """The JSON log lines of the process ``name`` (anything else in its log skipped)."""
    records = []
    for line in stack.log_text(name).splitlines():
        with contextlib.suppress(ValueError):
            record = json.loads(line)
            if isinstance(record, dict):
                records.append(record)
    return records


def _link_downs(stack: Stack) -> int:
    """How often the worker's AT layer logged its modem link down (one ERROR line per lost link). Only that
    logger's lines: others quote the LinkDown ("... is down") of the same loss, e.g. a housekeeping query it cut."""
    return sum(
        r.get("logger") == "modem_worker.modem.at_fixes"
        and r.get("level") == "ERROR"
        and "is down" in r.get("message", "")
        for r in _log_records(stack, "modem_worker")
    )


def _check(stack: Stack, modem_id: str, port: str) -> subprocess.CompletedProcess[str]:
    """``python -m modem_worker --check`` with the worker's settings."""
    return subprocess.run(
        [sys.executable, "-m", "modem_worker", "--check"],
        env={**stack.base_env(), "SMSGW_MODEM_PORT": port, "SMSGW_MODEM_ID": modem_id},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_a_modem_behind_ser2net_sends_receives_and_recovers_when_the_link_is_cut(
    stack: Stack, server: ReferenceServer
) -> None:
    simulator = stack.start_tcp_simulator("simulator", "+255754000001")
    assert simulator.tcp_url and simulator.port.startswith("socket://127.0.0.1:")
    modem_id = f"net-{uuid.uuid4().hex[:8]}"
    stack.start_modem_worker("modem_worker", simulator, modem_id)
    stack.start("sync_worker", "sync_worker")
    wait_for(lambda: _connected(simulator), timeout=30, what="the worker connected over TCP")

    simulator.inject("+255743000001", "over the network")
    wait_for(lambda: _messages(server) == ["over the network"], timeout=30, what="the SMS at the server")
    # The worker deletes an SMS from the SIM only after the broker confirmed it, so it reaches the server just
    # before (or even after) it leaves the SIM. A link cut in between leaves the copy on the SIM: the worker
    # remembers it and deletes it after the reconnect without publishing it again (tests/
    # test_modem_pending_deletes.py). This test is about the link, so it cuts it only once the SIM is empty.
    wait_for(lambda: simulator.inbox() == [], timeout=30, what="the SMS deleted from the SIM")
    _publish_outbound(stack, modem_id, "+255743000002", "out over the network")
    wait_for(lambda: _sent(simulator) == ["out over the network"], timeout=30, what="the outgoing SMS sent")
    # --check while the worker holds the one connection: the probe is refused by the simulator, as by ser2net,
    # and the worker's connection stays.
    healthy = _check(stack, modem_id, simulator.port)
    assert healthy.returncode == 0 and healthy.stdout.strip() == "ok", healthy.stderr

    # The link cut (the TCP connection dropped): the worker reconnects like after an unplug.
    assert simulator.drop()
    wait_for(lambda: _link_downs(stack) >= 1, timeout=30, what="the worker to see the drop")
    # The worker's own line, not only the simulator's client flag: that flag still names the dropped connection
    # until the simulator's reader has seen its end.
    wait_for(
        lambda: _connects(stack) >= 2 and _connected(simulator),
        timeout=30,
        what="the worker reconnected after the drop",
    )
    simulator.inject("+255743000003", "after the drop")
    wait_for(lambda: len(server.received()) == 2, timeout=30, what="the SMS after the drop")
    # As above: the SMS confirmed by the broker is deleted from the SIM before the link goes.
    wait_for(lambda: simulator.inbox() == [], timeout=30, what="the SMS after the drop deleted from the SIM")

    # The far end gone (ser2net or the Pi down: connections refused) while an SMS arrives and one is queued.
    downs = _link_downs(stack)
    simulator.unplug()
    wait_for(lambda: _link_downs(stack) > downs, timeout=30, what="the worker to see the link down")
    down = _check(stack, modem_id, simulator.port)
    assert down.returncode == 1 and "does not accept a connection" in down.stderr, down.stderr
    # The modem itself still receives: the SMS waits on its SIM (its +CMTI went nowhere), found by the sweep.
    simulator.inject("+255743000004", "while the link was down")
    _publish_outbound(stack, modem_id, "+255743000005", "queued while the link was down")
    simulator.replug()
    wait_for(lambda: _connected(simulator), timeout=60, what="the worker reconnected after the outage")
    everything = sorted(["over the network", "after the drop", "while the link was down"])
    wait_for(lambda: _messages(server) == everything, timeout=60, what="every SMS at the server")
    wait_for(
        lambda: _sent(simulator) == ["out over the network", "queued while the link was down"],
        timeout=60,
        what="the SMS queued during the outage sent",
    )
    received = server.received()
    assert len({m["message_id"] for m in received}) == 3
    repeated = [(m["message"], m["repeats"]) for m in received if m["repeats"]]
    assert repeated == [], f"an SMS reached the Sync URL twice: {repeated}"
    outbox = simulator.outbox()
    assert len(outbox) == 2, f"an outgoing SMS was sent twice: {[(o['text'], o['at']) for o in outbox]}"
    wait_for(lambda: simulator.inbox() == [], timeout=10, what="the SIM emptied")
    assert "back after" in stack.log_text("modem_worker")


def test_a_send_whose_answer_a_dropped_link_cut_off_is_reported_unknown_and_never_resent(stack: Stack) -> None:
    """The PDU reached the modem (it is in the simulator's outbox) but the TCP link dropped before its ``+CMGS``
    answer: the worker cannot know whether it left, reports it "unknown" and, after the reconnect, never sends it
    again (docs/reliability.md). The double send suspected behind the flaky test above, checked directly."""
    simulator = stack.start_tcp_simulator("simulator", "+255754000001")
    modem_id = f"net-{uuid.uuid4().hex[:8]}"
    stack.start_modem_worker("modem_worker", simulator, modem_id)
    wait_for(lambda: _connects(stack) >= 1 and _connected(simulator), timeout=30, what="the worker connected")
    simulator.set_state(send_delay_s=3)  # the +CMGS answer comes 3 s after the PDU: the link is cut in between
    in_flight = _publish_outbound(stack, modem_id, "+255743000006", "cut in flight")
    wait_for(lambda: _sent(simulator) == ["cut in flight"], timeout=30, what="the PDU at the modem")
    assert simulator.drop()
    wait_for(
        lambda: f"outbound {in_flight} unknown" in stack.log_text("modem_worker"),
        timeout=30,
        what="the cut send reported unknown",
    )
    simulator.set_state(send_delay_s=0)
    wait_for(lambda: _connects(stack) >= 2 and _connected(simulator), timeout=60, what="the worker reconnected")
    # "unknown" is final (recorded, acked): the next SMS leaves through the reconnected modem, the cut one never.
    _publish_outbound(stack, modem_id, "+255743000007", "after the cut")
    wait_for(lambda: "after the cut" in _sent(simulator), timeout=60, what="the next SMS sent")
    assert _sent(simulator) == ["after the cut", "cut in flight"], "the SMS cut in flight was sent again"
    assert f"outbound {in_flight} sent" not in stack.log_text("modem_worker")


# --- the settings (no services) ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("port", "address", "modem_id"),
    [
        ("socket://127.0.0.1:3333", ("127.0.0.1", 3333), "127.0.0.1-3333"),
        ("rfc2217://pi-modem0.lan:2217", ("pi-modem0.lan", 2217), "pi-modem0.lan-2217"),
        ("rfc2217://[::1]:2217?poll_modem", ("::1", 2217), "__1-2217"),
        ("/dev/serial/by-id/usb-Quectel-if02", None, "usb-Quectel-if02"),
    ],
)
def test_network_modem_urls_are_accepted_with_a_sane_default_modem_id(
    port: str, address: tuple[str, int] | None, modem_id: str
) -> None:
    assert PROCESS_VARS["SMSGW_MODEM_PORT"].parse("SMSGW_MODEM_PORT", port) == port
    assert modem_port_address("SMSGW_MODEM_PORT", port) == address
    assert modem_id_from_port(port) == modem_id


@pytest.mark.parametrize(
    ("port", "says"),
    [
        ("tcp://127.0.0.1:3333", "expected a serial device path, auto, socket://HOST:PORT or rfc2217://HOST:PORT"),
        ("socket://127.0.0.1", "expected socket://HOST:PORT (TCP port 1-65535)"),
        ("socket://host:0", "expected socket://HOST:PORT"),
        ("socket://host:70000", "expected socket://HOST:PORT"),
        ("socket://host:3333/dev/ttyUSB0", "expected socket://HOST:PORT"),
        ("socket://host:3333?timeout=3", "unknown socket:// option 'timeout'"),
    ],
)
def test_a_bad_network_modem_url_is_one_clear_config_error(port: str, says: str) -> None:
    with pytest.raises(ConfigError) as caught:
        PROCESS_VARS["SMSGW_MODEM_PORT"].parse("SMSGW_MODEM_PORT", port)
    message = str(caught.value)
    assert message.startswith("SMSGW_MODEM_PORT: ") and says in message and "\n" not in message


def test_auto_does_not_search_the_network() -> None:
    """SMSGW_MODEM_PORT=auto searches local devices only: a URL among its patterns is one clear config error."""
    parse = PROCESS_VARS["SMSGW_MODEM_PORT_GLOB"].parse
    assert parse("SMSGW_MODEM_PORT_GLOB", "/dev/ttyUSB*, /dev/ttyACM*") == ("/dev/ttyUSB*", "/dev/ttyACM*")
    with pytest.raises(ConfigError, match=r"^SMSGW_MODEM_PORT_GLOB: SMSGW_MODEM_PORT=auto searches local serial"):
        parse("SMSGW_MODEM_PORT_GLOB", "/dev/ttyUSB*,socket://pi:3333")
