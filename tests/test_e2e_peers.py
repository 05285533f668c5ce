"""The whole gateway (real processes) against the two third-party SMSsync servers of protocol-notes §3."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from scripts.stack import ROOT, Stack
from tests.conftest import wait_for
from tests.peers.runners import LykmapipoPeer, SeedPhpPeer, require_peer

pytestmark = pytest.mark.peers


@pytest.fixture
def seedphp() -> Iterator[SeedPhpPeer]:
    require_peer("seedphp")
    peer = SeedPhpPeer.start()
    yield peer
    peer.stop()


@pytest.fixture
def lykmapipo() -> Iterator[LykmapipoPeer]:
    require_peer("lykmapipo")
    peer = LykmapipoPeer.start(secret="s3cret")
    yield peer
    peer.stop()


def test_seed_php_sample_end_to_end(seedphp: SeedPhpPeer, fresh_amqp_url: str, tmp_path: Path) -> None:
    stack = Stack(
        tmp_path,
        fresh_amqp_url,
        seedphp.url,
        "123456",
        env={
            "SMSGW_MESSAGE_RESULTS": "true",
            "SMSGW_TASK_INTERVAL": "1",
            "SMSGW_RESULT_INTERVAL": "1",
        },
    )
    try:
        simulator = stack.start_simulator("simulator", "+255754000001")
        stack.start_modem_worker("modem_worker", simulator, "modem-a")
        for name in ("sync_worker", "task_poller", "result_reporter"):
            stack.start(name, name)
        texts = {"+255700000301": "Hello seed", "+255700000302": "Habari 😀 ñ 你好"}
        for sender, text in texts.items():
            simulator.inject(sender, text)
        wait_for(lambda: len(seedphp.received()) >= 2, timeout=60, what="both SMS in test.txt")
        assert {m["from"]: m["message"] for m in seedphp.received()} == texts

        # The seed answers every SMS with the same reply uuid: each sender still gets its reply, once.
        # Its task reply (two JSON documents back to back, success "true") is sent once, however often polled.
        def replies_and_task() -> bool:
            texts_out = [(o["to"], o["text"]) for o in simulator.outbox()]
            return len(texts_out) >= 3

        wait_for(replies_and_task, timeout=60, what="2 replies + the task message")
        wait_for(lambda: len(seedphp.log().result_bodies) >= 1, timeout=60, what="a ?task=result POST")
        polls_then = seedphp.log_text().count("task=send")
        # More polls (each offers the same task message again) must not send anything twice.
        wait_for(lambda: seedphp.log_text().count("task=send") >= polls_then + 3, timeout=30, what="more polls")
        outbox = sorted((o["to"], o["text"]) for o in simulator.outbox())
        assert outbox == sorted(
            [
                ("+255700000301", "Your message has been received"),
                ("+255700000302", "Your message has been received"),
                ("+819029842384", "Sample Task Message"),
            ]
        )
        result = json.loads(seedphp.log().result_bodies[-1])
        assert result["message_results"][0]["uuid"] == "1ba368bd-c467-4374-bf28"
    finally:
        stack.stop_all()


def test_lykmapipo_smssync_end_to_end(lykmapipo: LykmapipoPeer, fresh_amqp_url: str, tmp_path: Path) -> None:
    stack = Stack(
        tmp_path,
        fresh_amqp_url,
        lykmapipo.url,
        "s3cret",
        env={
            "SMSGW_MESSAGE_RESULTS": "true",
            "SMSGW_TASK_INTERVAL": "1",
            "SMSGW_RESULT_INTERVAL": "1",
            "SMSGW_RESULTS_SHAPE": "message_result_array",
            "SMSGW_MAX_REFUSALS": "2",
        },
    )
    try:
        simulator = stack.start_simulator("simulator", "+255754000001")
        stack.start_modem_worker("modem_worker", simulator, "modem-a")
        for name in ("sync_worker", "task_poller", "result_reporter"):
            stack.start(name, name)
        simulator.inject("+255700000401", "hello peer 👋")
        simulator.inject("+255700000402", "fail")  # the peer's handler refuses this one
        wait_for(
            lambda: ("+255700000401", "got: hello peer 👋") in [(o["to"], o["text"]) for o in simulator.outbox()],
            timeout=60,
            what="the peer's reply",
        )
        # Its ?task=sent answers with the wrong key (queued_messages); the task SMS must still go out, once.
        wait_for(
            lambda: "hello from lykmapipo peer" in [o["text"] for o in simulator.outbox()],
            timeout=60,
            what="the peer's task message",
        )
        wait_for(
            lambda: any(r for r in lykmapipo.state()["delivered"] if r),
            timeout=60,
            what="a delivery report at the peer",
        )
        reports = [row for batch in lykmapipo.state()["delivered"] if batch for row in batch]
        assert {row["uuid"] for row in reports} >= {"out-0001"}

        # The refused SMS is retried a bounded number of times, then parked with the peer's words.
        def parked() -> str:
            return subprocess.run(
                [sys.executable, "-m", "sync_worker", "parked", "list"],
                env=stack.base_env(),
                cwd=ROOT,
                capture_output=True,
                text=True,
                timeout=60,
                check=True,
            ).stdout

        assert "rejected by peer" in wait_for(parked, timeout=60, what="the refused SMS parked")
        assert [o["text"] for o in simulator.outbox()].count("hello from lykmapipo peer") == 1
    finally:
        stack.stop_all()
