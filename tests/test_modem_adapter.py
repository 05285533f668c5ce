"""Regression tests of modem_worker.modem against the project's modem simulator.

Every bug of python-gsmmodem-new 0.13.0 listed in ../shared/modem-notes.md has a test here, named in its
docstring ("bug N"). Pure text/PDU functions are tested without a modem; everything else drives the real
adapter over a pty against simulator. Waiting is done with deadlines (queue/Event timeouts or
polling), never with fixed sleeps.
"""

from __future__ import annotations

import logging
import os
import queue
import select
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from io import StringIO
from pathlib import Path
from typing import Any

import pytest
import serial
import serial.rfc2217
from smspdudecoder.fields import SMSSubmit

from modem_worker.modem import (
    MISSING_PART,
    Modem,
    ModemListener,
    ModemUnavailable,
    ReceivedMessage,
    SendFailed,
    SendOutcomeUnknown,
    StatusReport,
    UnreadableMessage,
    at_fixes,
    read_imei,
)
from modem_worker.sms_text import (
    build_submit_pdus,
    choose_encoding,
    repair_utf16,
    segment,
    text_units,
)
from simulator.device import Simulator
from simulator.model import STAT_REC_UNREAD, SimFullError, StoredSms
from simulator.pdu import build_deliver, build_status_report, local_datetime
from tests.conftest import wait_for

SENDER = "+255711000001"
RECIPIENT = "+255722000002"


# ---------------------------------------------------------------------------- helpers and fixtures


@dataclass
class Harness:
    """A connected Modem plus everything its callbacks produced."""

    modem: Modem
    messages: queue.Queue[ReceivedMessage] = field(default_factory=queue.Queue)
    reports: queue.Queue[StatusReport] = field(default_factory=queue.Queue)
    fatal: queue.Queue[BaseException] = field(default_factory=queue.Queue)
    fail_messages: threading.Event = field(default_factory=threading.Event)
    fail_reports: threading.Event = field(default_factory=threading.Event)
    delivered: list[ReceivedMessage] = field(default_factory=list)
    report_attempts: int = 0
    message_attempts: int = 0

    def get_message(self, timeout: float = 5.0) -> ReceivedMessage:
        return self.messages.get(timeout=timeout)


@pytest.fixture
def sim(tmp_path: Path) -> Iterator[Simulator]:
    simulator = Simulator(tmp_path / "modem0", capacity=255)
    simulator.start()
    try:
        yield simulator
    finally:
        simulator.stop()


@pytest.fixture
def make_modem(sim: Simulator) -> Iterator[Callable[..., Harness]]:
    created: list[Modem] = []

    def factory(connect: bool = True, **kwargs: Any) -> Harness:
        holder: list[Harness] = []

        def on_message(message: ReceivedMessage) -> None:
            holder[0].message_attempts += 1
            if holder[0].fail_messages.is_set():
                raise RuntimeError("broker down")
            holder[0].delivered.append(message)
            holder[0].messages.put(message)

        def on_report(report: StatusReport) -> None:
            holder[0].report_attempts += 1
            if holder[0].fail_reports.is_set():
                raise RuntimeError("broker down")
            holder[0].reports.put(report)

        class FatalListener:
            def boot_line(self, line: str) -> None:
                pass

            def link_lost(self, exc: ModemUnavailable) -> None:
                holder[0].fatal.put(exc)

        kwargs.setdefault("command_timeout_s", 5.0)
        modem = Modem(
            str(sim.link),
            on_message=on_message,
            on_status_report=on_report,
            **{"listener": FatalListener(), **kwargs},
        )
        harness = Harness(modem)
        holder.append(harness)
        created.append(modem)
        if connect:
            modem.connect()
        return harness

    yield factory
    for modem in created:
        modem.close()


def rx_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("modem-rx")]


def store_pdu(sim: Simulator, pdu_hex: str, memory: str = "SM", text: str = "") -> int:
    """Put a raw PDU into a SIM memory without any URC (as if it was there before we connected, or as a
    corrupted record would be). Returns its index."""
    with sim.model.lock:
        slots = sim.model.memories[memory]
        index = next(i for i in range(1, sim.model.capacity + 1) if i not in slots)
        slots[index] = StoredSms(
            index, memory, STAT_REC_UNREAD, pdu_hex, len(pdu_hex) // 2, SENDER, text, 0, None, "deliver"
        )
    return index


def stored(sim: Simulator, memory: str = "SM") -> dict[int, str]:
    """index -> PDU hex of everything in a SIM memory."""
    with sim.model.lock:
        return {i: r.pdu for i, r in sim.model.memories[memory].items()}


def store_silently(sim: Simulator, *texts: str) -> None:
    """Store SMS from SENDER on the SIM without raising +CMTI: only a sweep finds them."""
    sim.model.inject([(SENDER, text, None) for text in texts])


GARBAGE_PDU = "DEADBEEF"  # the library's decoder gives up on it (StopIteration)


# ---------------------------------------------------------------------------- pure functions (bug 5, 13, 4)


def test_gsm7_counting_uses_septets_and_extension_table() -> None:
    """Bug 5: length is counted in septets; extension characters (€, [, ...) cost two."""
    assert choose_encoding("Hello [world] €5") == "gsm7"
    assert text_units("€") == 2
    assert len(segment("a" * 160).parts) == 1
    assert len(segment("a" * 159 + "€").parts) == 2  # 161 septets
    seg = segment("a" * 152 + "€" + "b" * 10)
    # 153 septets per part and the escape sequence is not split: "€" moves whole to part 2.
    assert seg.parts[0] == "a" * 152
    assert seg.parts[1].startswith("€")
    assert "".join(seg.parts) == "a" * 152 + "€" + "b" * 10


def test_ucs2_counting_uses_utf16_units_and_never_splits_a_surrogate_pair() -> None:
    """Bug 5: an emoji is two UTF-16 units; 66 characters with emoji do not fit one part; parts are cut
    between characters."""
    assert choose_encoding("hi 😀") == "ucs2"
    assert text_units("😀") == 2
    assert len(segment("😀" * 35).parts) == 1  # exactly 70 units
    assert len(segment("x" * 62 + "😀" * 4).parts) == 1  # 66 characters = 70 units: fits
    assert len(segment("x" * 63 + "😀" * 4).parts) == 2  # 67 characters = 71 units: two parts
    text = "a" + "😀" * 100
    seg = segment(text)
    assert "".join(seg.parts) == text
    for part in seg.parts:
        assert text_units(part, "ucs2") <= 67
        part.encode("utf-8")  # no lone surrogate anywhere


def test_submit_pdus_decode_independently() -> None:
    """Bug 5: emoji and long texts give valid SUBMIT PDUs (cross-checked with smspdudecoder)."""
    for text in ("plain text", "x" * 400, "😀 emoji " * 20, "héllo ñ§"):
        pdus = build_submit_pdus(RECIPIENT, text, concat_reference=42, request_delivery=True)
        joined = ""
        for seq, pdu in enumerate(pdus, start=1):
            decoded = SMSSubmit.decode(StringIO(pdu.hex))
            assert decoded["recipient"]["number"] == RECIPIENT.lstrip("+")
            assert len(pdu.hex) // 2 - 1 == pdu.tpdu_length
            if len(pdus) > 1:
                concat = decoded["user_data"]["header"]["elements"][0]["data"]
                assert (concat["reference"], concat["parts_count"], concat["part_number"]) == (42, len(pdus), seq)
            joined += decoded["user_data"]["data"]
        assert joined == text


def test_request_delivery_controls_tp_srr_bit() -> None:
    """Bug 13 (unit): TP-SRR follows request_delivery in PDU mode."""
    on = build_submit_pdus(RECIPIENT, "x", concat_reference=0, request_delivery=True)[0]
    off = build_submit_pdus(RECIPIENT, "x", concat_reference=0, request_delivery=False)[0]
    assert SMSSubmit.decode(StringIO(on.hex))["header"]["srr"] is True
    assert SMSSubmit.decode(StringIO(off.hex))["header"]["srr"] is False


def test_repair_utf16_rejoins_surrogates_split_by_the_library() -> None:
    """Bug 4 (unit): the library decodes UCS-2 one unit per character; pairs are rejoined, lone halves
    become U+FFFD instead of breaking a later UTF-8 encode."""
    assert repair_utf16("a\ud83d\ude00b") == "a😀b"
    assert repair_utf16("\ud83d") == "\ufffd"
    assert repair_utf16("plain") == "plain"


def test_invalid_recipient_is_send_failed_before_touching_the_modem(make_modem: Callable[..., Harness]) -> None:
    """A recipient that cannot be encoded is refused (not sent) without a CMGS."""
    h = make_modem()
    with pytest.raises(SendFailed):
        h.modem.send("not a number", "x")


# ---------------------------------------------------------------------------- import (bug 14)


def test_import_with_warnings_as_errors(tmp_path: Path) -> None:
    """Bug 14: `python -W error -c "import modem_worker.modem"` works (fresh bytecode, so the library's
    invalid-escape warnings are really emitted)."""
    env = dict(os.environ, PYTHONPYCACHEPREFIX=str(tmp_path / "pycache"))
    result = subprocess.run(
        [sys.executable, "-W", "error", "-c", "import modem_worker.modem"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr


# ---------------------------------------------------------------------------- connect / port (bug 11, exclusive)


def test_connect_configures_pdu_mode_and_stored_delivery(sim: Simulator, make_modem: Callable[..., Harness]) -> None:
    """SMS are stored on the SIM (CNMI mt=1, +CMTI), never delivered directly; ModemInfo is filled."""
    h = make_modem(connect=False)
    info = h.modem.connect()
    assert info.own_number == "+255700000001"
    assert info.imsi and info.manufacturer and info.model
    log = sim.at_log()
    assert "AT+CMGF=0" in log
    assert "AT+CNMI=2,1,0,2,0" in log
    assert h.modem.alive


def test_port_is_opened_exclusively(sim: Simulator, make_modem: Callable[..., Harness]) -> None:
    """A second adapter on the same port is refused (exclusive=True) and the first keeps working."""
    first = make_modem()
    second = make_modem(connect=False)
    with pytest.raises(ModemUnavailable):
        second.modem.connect()
    assert first.modem.signal_strength() == 20


def test_failed_connect_closes_port_and_stops_read_thread(tmp_path: Path) -> None:
    """Bug 11: a modem that never answers -> ModemUnavailable, the port is closed (an exclusive open
    succeeds again) and no read thread is left behind."""
    master, slave = os.openpty()
    try:
        device = os.ttyname(slave)
        before = len(rx_threads())
        modem = Modem(device, on_message=lambda m: None, on_status_report=lambda r: None, command_timeout_s=0.3)
        with pytest.raises(ModemUnavailable):
            modem.connect()
        assert not modem.alive
        wait_for(lambda: len(rx_threads()) == before, 3, what="read thread to stop")
        probe = serial.Serial(device, exclusive=True)  # would fail if the adapter still held the flock
        probe.close()
    finally:
        os.close(master)
        os.close(slave)


def test_connect_to_missing_port_is_modem_unavailable(tmp_path: Path) -> None:
    """Bug 11: a missing device is ModemUnavailable, not a raw SerialException."""
    modem = Modem(str(tmp_path / "nope"), on_message=lambda m: None, on_status_report=lambda r: None)
    with pytest.raises(ModemUnavailable):
        modem.connect()
    modem.close()
    modem.close()  # idempotent


# ---------------------------------------------------------------------------- receiving (bugs 1, 2, 4, 6)


def test_urc_while_a_command_waits_is_not_lost(sim: Simulator, make_modem: Callable[..., Harness]) -> None:
    """Bug 1: +CMTI arriving while a command waits for its (delayed) reply is routed as a notification and
    the command's reply still parses."""
    h = make_modem()
    sim.set_state(reply_delay_s=0.05)
    stop = threading.Event()
    errors: list[BaseException] = []

    def poll() -> None:
        while not stop.is_set():
            try:
                assert h.modem.signal_strength() == 20
            except BaseException as exc:
                errors.append(exc)
                return

    poller = threading.Thread(target=poll)
    poller.start()
    try:
        wait_for(lambda: "AT+CSQ" in sim.at_log(), what="a pending AT+CSQ")
        for i in range(5):
            sim.inject_sms(SENDER, f"during command {i}")
        got = {h.get_message(timeout=10).text for _ in range(5)}
    finally:
        stop.set()
        poller.join()
    assert got == {f"during command {i}" for i in range(5)}
    assert not errors


def test_urc_burst_all_handled(sim: Simulator, make_modem: Callable[..., Harness]) -> None:
    """Bug 2: 30 +CMTI in ONE write: every one is handled, and the SIM ends up empty."""
    h = make_modem()
    sim.inject_batch([{"from": SENDER, "text": f"burst {i}"} for i in range(30)])
    got = sorted(h.get_message().text for _ in range(30))
    assert got == sorted(f"burst {i}" for i in range(30))
    wait_for(lambda: sim.inbox() == [], what="SIM to be emptied")


def test_receive_emoji_single_and_multipart(sim: Simulator, make_modem: Callable[..., Harness]) -> None:
    """Bug 4: emoji come back as real characters (no lone surrogates), single and concatenated UCS-2."""
    h = make_modem()
    short = "ok 😀👍🏽 done"
    long = "Habari 🇹🇿 " * 20
    sim.inject_sms(SENDER, short)
    first = h.get_message()
    sim.inject_sms(SENDER, long)
    second = h.get_message()
    assert first.text == short
    assert second.text == long
    second.text.encode("utf-8")
    assert second.parts > 1 and second.complete


def test_multipart_receive_is_reassembled(sim: Simulator, make_modem: Callable[..., Harness]) -> None:
    """Bug 6: a 3-part GSM-7 SMS (with extension characters) gives ONE on_message, then all parts are
    deleted."""
    h = make_modem()
    text = "Part [one] costs €5 and {more}. " * 14
    indices = sim.inject_sms(SENDER, text)
    assert len(indices) >= 3
    message = h.get_message()
    assert message.text == text
    assert message.complete and message.parts == len(indices)
    assert sorted(message.sim_indices) == sorted(indices)
    wait_for(lambda: sim.inbox() == [], what="parts deleted")
    with pytest.raises(queue.Empty):
        h.messages.get(timeout=0.2)


def test_direct_cmt_delivery_is_not_lost(sim: Simulator, make_modem: Callable[..., Harness]) -> None:
    """+CMT direct delivery (never configured by us, but a modem may do it) is decoded and delivered."""
    h = make_modem()
    part = build_deliver(SENDER, "direct 😀", local_datetime(int(time.time() * 1000)), "+255754000000")[0]
    sim.write_raw(f"\r\n+CMT: ,{part.tpdu_length}\r\n{part.pdu}\r\n".encode())
    message = h.get_message()
    assert message.text == "direct 😀"
    assert message.sim_indices == ()


# ---------------------------------------------------------------------------- delivery semantics


def test_message_stays_on_sim_until_on_message_succeeds(sim: Simulator, make_modem: Callable[..., Harness]) -> None:
    """An SMS leaves the SIM only after on_message returned; a failed callback is retried by the sweep."""
    h = make_modem()
    h.fail_messages.set()
    sim.inject_sms(SENDER, "keep me")
    long = "long kept message " * 12
    sim.inject_sms(SENDER, long)
    wait_for(lambda: h.message_attempts == 2, what="both (failing) deliveries")
    assert len(sim.inbox()) == 3  # nothing deleted
    assert h.delivered == []
    h.fail_messages.clear()
    assert h.modem.sweep_stored() == 2
    assert sorted(m.text for m in h.delivered) == sorted(["keep me", long])
    assert sim.inbox() == []
    assert h.modem.sweep_stored() == 0
    assert len(h.delivered) == 2


def test_failed_delete_does_not_deliver_twice(
    sim: Simulator, make_modem: Callable[..., Harness], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A message whose AT+CMGD failed after delivery is deleted, not re-delivered, by the next sweep."""
    h = make_modem()
    gsm = h.modem.at_layer
    assert gsm is not None
    real_delete = gsm.delete_stored
    failures = {"left": 1}

    def flaky_delete(memory: str, index: int) -> None:
        if failures["left"]:
            failures["left"] -= 1
            raise at_fixes.TimeoutException()
        real_delete(memory, index)

    monkeypatch.setattr(gsm, "delete_stored", flaky_delete)
    sim.inject_sms(SENDER, "only once")
    assert h.get_message().text == "only once"
    assert [r["text"] for r in sim.inbox()] == ["only once"]
    assert h.modem.sweep_stored() == 0
    assert sim.inbox() == []
    assert [m.text for m in h.delivered] == ["only once"]


def test_incomplete_multipart_is_flushed_after_timeout(sim: Simulator, make_modem: Callable[..., Harness]) -> None:
    """A multipart SMS missing a part is delivered after multipart_timeout_s with "[…]" (complete=False);
    the straggler arriving later comes out alone, and nothing is delivered twice."""
    text = "".join(f"<{i:03d}>" for i in range(80))  # 400 chars -> 3 parts
    indices = sim.inject_sms(SENDER, text)
    assert len(indices) == 3
    with sim.model.lock:
        missing = sim.model.memories["SM"].pop(indices[1])
    h = make_modem(multipart_timeout_s=0.5)
    assert h.modem.sweep_stored() == 0  # buffered, not yet expired
    message = h.get_message(timeout=5)
    assert not message.complete and message.parts == 3
    assert message.text.count(MISSING_PART) == 1
    assert message.text.startswith("<000>") and message.text.endswith("<079>")
    wait_for(lambda: sim.inbox() == [], what="flushed parts deleted")
    with sim.model.lock:
        sim.model.memories["SM"][indices[1]] = missing
    sim.write_raw(f'\r\n+CMTI: "SM",{indices[1]}\r\n'.encode())
    straggler = h.get_message(timeout=5)
    assert not straggler.complete
    assert straggler.text == MISSING_PART + missing.text + MISSING_PART
    wait_for(lambda: sim.inbox() == [], what="straggler deleted")
    assert len(h.delivered) == 2


@pytest.mark.parametrize("memory", ["SM", "SR"])
def test_undecodable_pdu_goes_to_on_unreadable_then_is_deleted(
    sim: Simulator, make_modem: Callable[..., Harness], memory: str
) -> None:
    """Review A: an undecodable stored PDU (SIM or SR memory) is handed to on_unreadable once, with its raw
    hex, and deleted only after that returned; SMS next to it are delivered as usual."""
    unreadable: list[UnreadableMessage] = []
    h = make_modem(on_unreadable=unreadable.append)
    index = store_pdu(sim, GARBAGE_PDU, memory)
    store_silently(sim, "readable neighbour")
    assert h.modem.sweep_stored() == 1
    assert [m.text for m in h.delivered] == ["readable neighbour"]
    assert len(unreadable) == 1
    got = unreadable[0]
    assert (got.memory, got.index, got.pdu_hex) == (memory, index, GARBAGE_PDU)
    assert "undecodable" in got.reason
    assert stored(sim, memory) == {}
    assert sim.inbox() == []
    assert h.modem.sweep_stored() == 0
    assert len(unreadable) == 1


def test_undecodable_pdu_announced_by_cmti_goes_to_on_unreadable_on_the_worker_thread(
    sim: Simulator, make_modem: Callable[..., Harness]
) -> None:
    """Review A: the +CMTI path hands an undecodable PDU to on_unreadable on the adapter's worker thread
    (where on_message runs for notified SMS) and then deletes it."""
    calls: queue.Queue[tuple[UnreadableMessage, str]] = queue.Queue()
    h = make_modem(on_unreadable=lambda m: calls.put((m, threading.current_thread().name)))
    index = store_pdu(sim, GARBAGE_PDU)
    sim.write_raw(f'\r\n+CMTI: "SM",{index}\r\n'.encode())
    message, thread_name = calls.get(timeout=5)
    assert (message.memory, message.index, message.pdu_hex) == ("SM", index, GARBAGE_PDU)
    assert thread_name.startswith("modem-worker")
    wait_for(lambda: stored(sim) == {}, what="undecodable PDU deleted")
    assert calls.empty()
    assert h.modem.alive


def test_undecodable_pdu_without_on_unreadable_stays_and_is_logged_once(
    sim: Simulator, make_modem: Callable[..., Harness], caplog: pytest.LogCaptureFixture
) -> None:
    """Review A: without on_unreadable the PDU stays on the SIM and is logged once, not on every sweep."""
    h = make_modem()
    index = store_pdu(sim, GARBAGE_PDU)
    with caplog.at_level(logging.INFO, logger="modem_worker.modem"):
        assert h.modem.sweep_stored() == 0
        assert h.modem.sweep_stored() == 0
    lines = [r for r in caplog.records if r.levelno >= logging.INFO and "undecodable" in r.getMessage()]
    assert len(lines) == 1, [r.getMessage() for r in lines]
    assert f"SM/{index}" in lines[0].getMessage() and GARBAGE_PDU in lines[0].getMessage()
    assert stored(sim) == {index: GARBAGE_PDU}


def test_failing_on_unreadable_keeps_the_pdu_and_logs_once(
    sim: Simulator, make_modem: Callable[..., Harness], caplog: pytest.LogCaptureFixture
) -> None:
    """Review A: while on_unreadable raises, the PDU stays on the SIM (retried by every sweep, logged once);
    once it returns normally the PDU is deleted."""
    broker_down = threading.Event()
    broker_down.set()
    calls: list[UnreadableMessage] = []

    def on_unreadable(message: UnreadableMessage) -> None:
        calls.append(message)
        if broker_down.is_set():
            raise RuntimeError("broker down")

    h = make_modem(on_unreadable=on_unreadable)
    index = store_pdu(sim, GARBAGE_PDU)
    with caplog.at_level(logging.INFO, logger="modem_worker.modem"):
        assert h.modem.sweep_stored() == 0
        assert h.modem.sweep_stored() == 0
    assert len(calls) == 2
    lines = [r for r in caplog.records if r.levelno >= logging.INFO and "undecodable" in r.getMessage()]
    assert len(lines) == 1, [r.getMessage() for r in lines]
    assert "broker down" in lines[0].getMessage()
    assert stored(sim) == {index: GARBAGE_PDU}
    broker_down.clear()
    assert h.modem.sweep_stored() == 0
    assert len(calls) == 3
    assert stored(sim) == {}


def test_sweep_stops_at_the_first_failed_delivery(
    sim: Simulator, make_modem: Callable[..., Harness], caplog: pytest.LogCaptureFixture
) -> None:
    """Review B: when on_message raises (broker down), the sweep does not try the other stored SMS (each
    would wait out a publish timeout under the delivery lock): one log line, both stay on the SIM, and a
    later sweep with a working callback delivers both."""
    h = make_modem()
    store_silently(sim, "first", "second")
    h.fail_messages.set()
    with caplog.at_level(logging.WARNING, logger="modem_worker.modem"):
        assert h.modem.sweep_stored() == 0
    assert h.message_attempts == 1
    assert [r["text"] for r in sim.inbox()] == ["first", "second"]
    lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(lines) == 1, lines
    assert lines[0].startswith("stopping the sweep: ") and "broker down" in lines[0]
    assert "2 SMS stay on the SIM for the next sweep" in lines[0]
    h.fail_messages.clear()
    assert h.modem.sweep_stored() == 2
    assert sorted(m.text for m in h.delivered) == ["first", "second"]
    assert sim.inbox() == []


def test_sweep_stops_at_the_first_failed_status_report(sim: Simulator, make_modem: Callable[..., Harness]) -> None:
    """Review B: the same for on_status_report: one attempt per sweep, reports kept until it works."""
    h = make_modem()
    when = local_datetime(int(time.time() * 1000))
    for reference in (1, 2):
        pdu, _length = build_status_report(
            reference, RECIPIENT, submitted=when, discharged=when, status=0, smsc="+255754000000"
        )
        store_pdu(sim, pdu, "SR")
    h.fail_reports.set()
    assert h.modem.sweep_stored() == 0
    assert h.report_attempts == 1
    assert len(stored(sim, "SR")) == 2
    h.fail_reports.clear()
    assert h.modem.sweep_stored() == 2
    assert sorted(h.reports.get(timeout=1).reference for _ in range(2)) == [1, 2]
    assert stored(sim, "SR") == {}


def test_concat_part_with_impossible_sequence_is_delivered_alone(
    sim: Simulator, make_modem: Callable[..., Harness], caplog: pytest.LogCaptureFixture
) -> None:
    """Review C: a part numbered 0, or above its part count, is not buffered under that number (which made
    "all parts there" true while a real part was missing, losing text under complete=True): it is delivered
    on its own as a single SMS, and the real message still waits for its real parts."""
    when = local_datetime(int(time.time() * 1000))
    real = build_deliver(SENDER, "A" * 200, when, "+255754000000", concat_ref=7)
    bogus = build_deliver(SENDER, "B" * 200, when, "+255754000000", concat_ref=7)
    assert len(real) == len(bogus) == 2

    def renumbered(pdu: str, seq: int, new_seq: int) -> str:
        udh = f"0500030702{seq:02X}"
        assert pdu.count(udh) == 1
        return pdu.replace(udh, f"0500030702{new_seq:02X}")

    h = make_modem()
    store_pdu(sim, real[0].pdu, text=real[0].text)
    store_pdu(sim, renumbered(bogus[0].pdu, 1, 0), text=bogus[0].text)
    store_pdu(sim, renumbered(bogus[1].pdu, 2, 3), text=bogus[1].text)
    with caplog.at_level(logging.WARNING, logger="modem_worker.modem"):
        assert h.modem.sweep_stored() == 2
    assert sorted((m.text, m.parts, m.complete) for m in h.delivered) == sorted(
        [(bogus[0].text, 1, True), (bogus[1].text, 1, True)]
    )
    assert len([r for r in caplog.records if "cannot be placed" in r.getMessage()]) == 2
    assert [r["text"] for r in sim.inbox()] == [real[0].text]  # the real part 1 waits for part 2
    store_pdu(sim, real[1].pdu, text=real[1].text)
    assert h.modem.sweep_stored() == 1
    whole = h.delivered[-1]
    assert (whole.text, whole.parts, whole.complete) == ("A" * 200, 2, True)
    assert sim.inbox() == []


# ---------------------------------------------------------------------------- sending (bugs 5, 7, 8, 13)


def test_send_emoji(sim: Simulator, make_modem: Callable[..., Harness]) -> None:
    """Bug 5: emoji can be sent; a 66-character text with emoji (71 UTF-16 units) becomes 2 parts."""
    h = make_modem()
    short = "Asante 😀"
    tricky = "x" * 63 + "😀" * 4
    assert h.modem.send(RECIPIENT, short).parts == 1
    assert h.modem.send(RECIPIENT, tricky).parts == 2
    assert [o["text"] for o in sim.outbox()] == [short, tricky]


def test_multipart_send_returns_every_reference(sim: Simulator, make_modem: Callable[..., Harness]) -> None:
    """Bug 7: SendReceipt.references holds the TP-MR of every part, in order; each part gets its report."""
    h = make_modem()
    sim.set_state(delivery_delay_s=0.05)
    receipt = h.modem.send(RECIPIENT, "z" * 500)
    assert receipt.parts == 4 and len(receipt.references) == 4
    assert list(receipt.references) == sim.outbox()[-1]["references"]
    reports = {h.reports.get(timeout=5).reference for _ in range(4)}
    assert reports == set(receipt.references)
    wait_for(lambda: sim.state()["sr_used"] == 0, what="SR memory emptied")


def test_send_refused_is_send_failed(sim: Simulator, make_modem: Callable[..., Harness]) -> None:
    """A +CMS ERROR answer is SendFailed with the code; nothing is in the outbox."""
    h = make_modem()
    sim.set_state(fail_sends=1, cms_error=500)
    with pytest.raises(SendFailed) as info:
        h.modem.send(RECIPIENT, "refused")
    assert info.value.cms_code == 500
    sim.set_state(registered=False)
    with pytest.raises(SendFailed) as info:
        h.modem.send(RECIPIENT, "no network")
    assert info.value.cms_code == 331
    assert not h.modem.is_registered()
    assert sim.outbox() == []


def test_send_timeout_is_outcome_unknown(sim: Simulator, make_modem: Callable[..., Harness]) -> None:
    """Bug 8: +CMGS arriving after send_timeout_s -> SendOutcomeUnknown (the SMS WAS sent); the late answer
    does not corrupt the next command's response."""
    h = make_modem(send_timeout_s=0.3)
    sim.set_state(send_delay_s=1.0)
    with pytest.raises(SendOutcomeUnknown):
        h.modem.send(RECIPIENT, "slow network")
    assert [o["text"] for o in sim.outbox()] == ["slow network"]
    sim.set_state(send_delay_s=0.0)
    assert h.modem.signal_strength() == 20  # queued behind the late +CMGS
    assert h.modem.battery_level() == 100
    receipt = h.modem.send(RECIPIENT, "next one")
    assert receipt.references == (sim.outbox()[-1]["reference"],)


def test_request_delivery_false_is_honoured(sim: Simulator, make_modem: Callable[..., Harness]) -> None:
    """Bug 13: request_delivery=False -> no status report requested (TP-SRR clear), none arrives."""
    sim.set_state(delivery_delay_s=0.0)
    with_reports = make_modem()
    with_reports.modem.send(RECIPIENT, "want report")
    assert with_reports.reports.get(timeout=5).delivered is True
    with_reports.modem.close()  # waits for the worker's delete of the delivered report
    assert sim.state()["sr_used"] == 0

    h = make_modem(request_delivery=False)
    h.modem.send(RECIPIENT, "no report")
    h.modem.ping()  # round trip: a report (delay 0) would have been scheduled before this answer
    with pytest.raises(queue.Empty):
        h.reports.get(timeout=0.5)
    assert sim.state()["sr_used"] == 0


def test_status_report_kept_until_callback_succeeds(sim: Simulator, make_modem: Callable[..., Harness]) -> None:
    """Status reports are deleted from SR memory only after on_status_report returned; failed ones are
    retried by the sweep. A failed delivery maps to delivered=False."""
    h = make_modem()
    sim.set_state(delivery_delay_s=0.0, delivery="failed")
    h.fail_reports.set()
    receipt = h.modem.send(RECIPIENT, "will fail")
    wait_for(lambda: h.report_attempts == 1, what="first (failing) report delivery")
    assert sim.state()["sr_used"] == 1
    h.fail_reports.clear()
    assert h.modem.sweep_stored() == 1
    report = h.reports.get(timeout=1)
    assert report.reference == receipt.references[0]
    assert report.delivered is False and report.status == 0x44
    assert report.recipient == RECIPIENT
    assert sim.state()["sr_used"] == 0


# ---------------------------------------------------------------------------- link health (bugs 9, 10, 12)


def test_non_utf8_byte_does_not_kill_the_read_thread(sim: Simulator, make_modem: Callable[..., Harness]) -> None:
    """Bug 9: a stray non-UTF-8 byte is replaced, the read thread lives on, SMS still arrive."""
    h = make_modem()
    sim.write_raw(b"\r\n\xff\xfe\x80garbage\r\n")
    sim.inject_sms(SENDER, "after garbage")
    assert h.get_message().text == "after garbage"
    assert h.modem.alive
    assert h.modem.signal_strength() == 20


def test_read_thread_death_marks_dead_and_fires_on_fatal(make_modem: Callable[..., Harness]) -> None:
    """Bug 9: if the read thread dies anyway, alive turns False and on_fatal fires (once)."""
    h = make_modem()
    gsm = h.modem.at_layer
    assert gsm is not None

    def boom(size: int = 1) -> bytes:
        raise RuntimeError("read thread bug")

    gsm.serial.read = boom
    assert isinstance(h.fatal.get(timeout=5), ModemUnavailable)
    assert not h.modem.alive
    with pytest.raises(ModemUnavailable):
        h.modem.signal_strength()
    assert h.fatal.empty()


class RecordingListener:
    """A ModemListener that queues what the modem reported."""

    def __init__(self) -> None:
        self.boot_lines: queue.Queue[str] = queue.Queue()
        self.lost: queue.Queue[ModemUnavailable] = queue.Queue()

    def boot_line(self, line: str) -> None:
        self.boot_lines.put(line)

    def link_lost(self, exc: ModemUnavailable) -> None:
        self.lost.put(exc)


def test_listener_hears_boot_lines_and_the_lost_link(sim: Simulator, make_modem: Callable[..., Harness]) -> None:
    """The modem reports its own events to the one listener passed in: boot lines after a reboot, then the lost
    link after an unplug (once); the harness's own listener is replaced by it."""
    recorder = RecordingListener()
    listener: ModemListener = recorder  # mypy checks that it implements the Protocol
    h = make_modem(listener=listener)
    sim.reboot()
    assert recorder.boot_lines.get(timeout=5) == "RDY"
    sim.unplug()
    assert "lost" in str(recorder.lost.get(timeout=5))
    assert not h.modem.alive
    assert recorder.lost.empty()
    assert h.fatal.empty()


def test_unplug_fails_in_flight_command_fast(sim: Simulator, make_modem: Callable[..., Harness]) -> None:
    """Bug 10: unplugging during a command -> on_fatal fires, the command fails with ModemUnavailable at
    once (not after its 10 s timeout), alive is False, ping() is False."""
    h = make_modem(command_timeout_s=10.0)
    sim.set_state(reply_delay_s=30)
    outcome: queue.Queue[tuple[BaseException | None, float]] = queue.Queue()

    def query() -> None:
        start = time.monotonic()
        try:
            h.modem.signal_strength()
            outcome.put((None, time.monotonic() - start))
        except BaseException as exc:
            outcome.put((exc, time.monotonic() - start))

    worker = threading.Thread(target=query)
    worker.start()
    wait_for(lambda: "AT+CSQ" in sim.at_log(), what="AT+CSQ in flight")
    sim.unplug()
    exc, elapsed = outcome.get(timeout=5)
    worker.join()
    assert isinstance(exc, ModemUnavailable)
    assert elapsed < 3
    assert isinstance(h.fatal.get(timeout=5), ModemUnavailable)
    assert not h.modem.alive
    assert not h.modem.ping()


def test_unplug_during_send_is_outcome_unknown(sim: Simulator, make_modem: Callable[..., Harness]) -> None:
    """Bug 10/8: unplug after the PDU went out -> SendOutcomeUnknown quickly, never a silent resend."""
    h = make_modem(send_timeout_s=30)
    sim.set_state(send_delay_s=30)
    outcome: queue.Queue[BaseException | None] = queue.Queue()

    def send() -> None:
        try:
            h.modem.send(RECIPIENT, "in flight")
            outcome.put(None)
        except BaseException as exc:
            outcome.put(exc)

    worker = threading.Thread(target=send)
    worker.start()
    wait_for(lambda: len(sim.outbox()) == 1, what="PDU submitted")
    sim.unplug()
    assert isinstance(outcome.get(timeout=5), SendOutcomeUnknown)
    worker.join()
    assert not h.modem.alive


def test_reconnect_after_replug(sim: Simulator, make_modem: Callable[..., Harness]) -> None:
    """After unplug + replug a new connect() works and SMS stored meanwhile come in via the sweep."""
    h = make_modem()
    sim.unplug()
    h.fatal.get(timeout=5)
    sim.replug()
    sim.inject_sms(SENDER, "while away")  # the +CMTI went to a port nobody had open
    h.modem.close()
    h.modem.connect()
    assert h.modem.ping()
    assert h.modem.sweep_stored() == 1
    assert h.get_message().text == "while away"


def test_busy_515_does_not_slow_later_commands(
    sim: Simulator, make_modem: Callable[..., Harness], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Bug 12: one +CME ERROR: 515 is retried for that command only; later commands are not slowed (the
    library kept a 0.1 s write wait for good)."""
    h = make_modem()
    gsm = h.modem.at_layer
    assert gsm is not None
    real_exchange = gsm.exchange
    busy = {"left": 1}

    def exchange(payload: str, *args: Any) -> list[str] | None:
        if busy["left"] and payload.startswith("AT+CSQ"):
            busy["left"] -= 1
            return ["+CME ERROR: 515"]  # as if the modem answered "busy, try again"
        result: list[str] | None = real_exchange(payload, *args)
        return result

    monkeypatch.setattr(gsm, "exchange", exchange)
    assert h.modem.signal_strength() == 20
    assert busy["left"] == 0
    assert gsm.write_wait_s == 0
    for _ in range(20):
        h.modem.signal_strength()
    # The library's slow path is this wait before every write; checking it (not a wall-clock figure) keeps the
    # test honest on a loaded CI machine.
    assert gsm.write_wait_s == 0


def test_health_queries(sim: Simulator, make_modem: Callable[..., Harness]) -> None:
    """signal_strength (99 -> None), battery_level (AT+CBC), is_registered, ping."""
    h = make_modem()
    sim.set_state(signal=17, battery=42)
    assert h.modem.signal_strength() == 17
    assert h.modem.battery_level() == 42
    assert h.modem.is_registered()
    assert h.modem.ping()
    sim.set_state(signal=99)
    assert h.modem.signal_strength() is None


# ---------------------------------------------------------------------------- load (bugs 1, 2, 3)


def test_load_300_in_while_50_out(sim: Simulator, make_modem: Callable[..., Harness]) -> None:
    """Bugs 1-3 under load: 300 SMS injected (bursts via inject_batch and rapid single injections) while
    50 SMS are sent from another thread with status reports: all 300 received exactly once, all 50 sent,
    no CMS 304 (a command landing inside a PDU), SIM drained."""
    h = make_modem()
    sim.set_state(delivery_delay_s=0.0)
    texts = [f"load message {i:03d}" for i in range(300)]
    send_errors: list[BaseException] = []
    receipts: list[Any] = []

    def inject_with_backpressure(action: Callable[[], object]) -> None:
        # A full SIM makes the (simulated) network retry later, as a real SMSC would.
        deadline = time.monotonic() + 30
        while True:
            try:
                action()
                return
            except SimFullError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.01)

    def injector() -> None:
        for start in (0, 50, 100, 150):
            batch = [{"from": f"+2557110{start + i:05d}", "text": texts[start + i]} for i in range(50)]
            inject_with_backpressure(lambda b=batch: sim.inject_batch(b))  # type: ignore[misc]
        for i in range(200, 300):
            inject_with_backpressure(lambda i=i: sim.inject_sms(SENDER, texts[i]))  # type: ignore[misc]

    def sender() -> None:
        for i in range(50):
            try:
                receipts.append(h.modem.send(RECIPIENT, f"outbound {i:02d}" + (" long" * 40 if i % 10 == 0 else "")))
            except BaseException as exc:
                send_errors.append(exc)

    threads = [threading.Thread(target=injector), threading.Thread(target=sender)]
    for t in threads:
        t.start()
    received: list[str] = []
    deadline = time.monotonic() + 40
    while len(received) < 300 and time.monotonic() < deadline:
        try:
            received.append(h.get_message(timeout=1).text)
        except queue.Empty:
            continue
    for t in threads:
        t.join(timeout=30)
    assert not send_errors, send_errors[:3]
    assert sorted(received) == sorted(texts)  # every text exactly once
    assert len(sim.outbox()) == 50
    assert sorted(o["text"][:11] for o in sim.outbox()) == sorted(f"outbound {i:02d}" for i in range(50))
    with pytest.raises(queue.Empty):
        h.messages.get(timeout=0.2)
    wait_for(lambda: sim.inbox() == [], what="SIM drained")
    assert h.modem.sweep_stored() == 0 or sim.inbox() == []


def test_receive_gsm7_section_sign_and_form_feed(sim: Simulator, make_modem: Callable[..., Harness]) -> None:
    """Library bug: its GSM-7 table has "`" at 0x5F (should be "§") and a broken form-feed entry."""
    h = make_modem()
    text = "Art. §5 ` page\fbreak €[]"
    sim.inject_sms(SENDER, text)
    assert h.get_message().text == text


def test_failed_direct_cmt_delivery_is_retried_by_the_sweep(sim: Simulator, make_modem: Callable[..., Harness]) -> None:
    """A +CMT is not on the SIM: when on_message fails it is kept in memory and delivered by the next sweep."""
    h = make_modem()
    h.fail_messages.set()
    part = build_deliver(SENDER, "direct, retried", local_datetime(int(time.time() * 1000)), "+255754000000")[0]
    sim.write_raw(f"\r\n+CMT: ,{part.tpdu_length}\r\n{part.pdu}\r\n".encode())
    wait_for(lambda: h.message_attempts == 1, what="the failing delivery")
    h.fail_messages.clear()
    assert h.modem.sweep_stored() == 1
    assert [m.text for m in h.delivered] == ["direct, retried"]
    assert h.modem.sweep_stored() == 0


def test_no_prompt_for_the_pdu_is_unavailable_not_failed(
    sim: Simulator, make_modem: Callable[..., Harness], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Nothing was written: the SMS may be sent later (ModemUnavailable), not reported failed for good."""
    h = make_modem()
    gsm = h.modem.at_layer
    assert gsm is not None
    real_write = gsm.write

    def write(data: str, *args: Any, **kwargs: Any) -> Any:
        if data.startswith("AT+CMGS"):
            raise at_fixes.TimeoutException("no prompt")
        return real_write(data, *args, **kwargs)

    monkeypatch.setattr(gsm, "write", write)
    with pytest.raises(ModemUnavailable, match="did not prompt"):
        h.modem.send(RECIPIENT, "later, please")
    assert sim.outbox() == []


# ---------------------------------------------------------------------------- a modem over the network (issue 14)


@pytest.fixture
def tcp_sim() -> Iterator[Simulator]:
    """The simulator on a raw TCP port on loopback, as ser2net serves a modem on another host."""
    simulator = Simulator(None, tcp=("127.0.0.1", 0))
    simulator.start()
    try:
        yield simulator
    finally:
        simulator.stop()


@pytest.fixture
def tcp_modem(tcp_sim: Simulator) -> Iterator[tuple[Modem, queue.Queue[ReceivedMessage], queue.Queue[BaseException]]]:
    """A Modem on ``socket://127.0.0.1:P`` (not yet connected), its received SMS and its lost links."""
    messages: queue.Queue[ReceivedMessage] = queue.Queue()
    lost: queue.Queue[BaseException] = queue.Queue()

    class Listener:
        def boot_line(self, line: str) -> None:
            pass

        def link_lost(self, exc: ModemUnavailable) -> None:
            lost.put(exc)

    modem = Modem(
        tcp_sim.tcp_url,
        on_message=messages.put,
        on_status_report=lambda _r: None,
        listener=Listener(),
        command_timeout_s=5.0,
    )
    yield modem, messages, lost
    modem.close()


def test_a_socket_url_port_sends_and_receives_like_a_local_one(
    tcp_sim: Simulator, tcp_modem: tuple[Modem, queue.Queue[ReceivedMessage], queue.Queue[BaseException]]
) -> None:
    """SMSGW_MODEM_PORT=socket://host:port: the same init dialogue (PDU mode, stored delivery), send and receive
    as over a pty; the simulator saw exactly one client."""
    modem, messages, _ = tcp_modem
    assert tcp_sim.tcp_url.startswith("socket://127.0.0.1:")
    modem.connect()
    assert {"AT+CMGF=0", "AT+CNMI=2,1,0,2,0"} <= set(tcp_sim.at_log())
    receipt = modem.send(RECIPIENT, "over the network")
    assert [o["text"] for o in tcp_sim.outbox()] == ["over the network"]
    assert receipt.references
    tcp_sim.inject_sms(SENDER, "from the network")
    assert messages.get(timeout=5).text == "from the network"
    wait_for(lambda: tcp_sim.inbox() == [], what="the SIM copy deleted")
    assert tcp_sim.client_connected


def test_a_cut_tcp_link_is_a_lost_link_and_a_reconnect_sweeps_what_came_meanwhile(
    tcp_sim: Simulator, tcp_modem: tuple[Modem, queue.Queue[ReceivedMessage], queue.Queue[BaseException]]
) -> None:
    """The TCP connection cut (ser2net restarted, the Pi's link down) -> link_lost fires at once and the modem is
    not alive, as after an unplug; connecting again works and the SMS stored meanwhile come in by the sweep."""
    modem, messages, lost = tcp_modem
    modem.connect()
    assert tcp_sim.drop_client()
    assert "lost" in str(lost.get(timeout=5))
    assert not modem.alive and not modem.ping()
    tcp_sim.inject_sms(SENDER, "while the link was down")  # its +CMTI went nowhere
    modem.connect()
    assert modem.ping()
    assert modem.sweep_stored() == 1
    assert messages.get(timeout=5).text == "while the link was down"


def test_a_closed_tcp_port_is_modem_unavailable_and_the_imei_is_read_over_a_url(
    tcp_sim: Simulator, tcp_modem: tuple[Modem, queue.Queue[ReceivedMessage], queue.Queue[BaseException]]
) -> None:
    """Nothing listening (ser2net down) -> ModemUnavailable naming the URL; the identity check reads the IMEI over
    a URL as over a device, and leaves the port free for the worker's own connection."""
    modem, _, _ = tcp_modem
    assert read_imei(tcp_sim.tcp_url, timeout_s=3) == tcp_sim.state()["imei"]
    wait_for(lambda: not tcp_sim.client_connected, what="the IMEI reader's connection closed")
    tcp_sim.unplug()
    with pytest.raises(ModemUnavailable, match=r"socket://127\.0\.0\.1"):
        modem.connect()
    tcp_sim.replug()
    assert modem.connect().manufacturer


class Rfc2217Bridge:
    """A one-client RFC 2217 server (pyserial's PortManager) in front of the TCP simulator, as ser2net's
    ``telnet(rfc2217)`` accepter is in front of a device."""

    def __init__(self, device_url: str) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"rfc2217://127.0.0.1:{self.listener.getsockname()[1]}"
        self.device_url = device_url
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.serve, daemon=True)
        self.thread.start()

    def serve(self) -> None:
        conn, _ = self.listener.accept()
        device = serial.serial_for_url(self.device_url, timeout=0)  # reads return what is there
        send_lock = threading.Lock()

        class Connection:  # PortManager writes its negotiation answers through write()
            @staticmethod
            def write(data: bytes) -> None:
                with send_lock:
                    conn.sendall(data)

        manager = serial.rfc2217.PortManager(device, Connection())
        try:
            while not self.stop.is_set():
                readable, _, _ = select.select([conn], [], [], 0.01)
                if readable:
                    data = conn.recv(4096)
                    if not data:
                        return
                    device.write(b"".join(manager.filter(data)))
                from_modem = device.read(4096)
                if from_modem:
                    Connection.write(b"".join(manager.escape(from_modem)))
        finally:
            device.close()
            conn.close()

    def close(self) -> None:
        self.stop.set()
        self.listener.close()
        self.thread.join(timeout=5)


def test_an_rfc2217_url_port_connects_sends_and_receives(tcp_sim: Simulator) -> None:
    """SMSGW_MODEM_PORT=rfc2217://host:port: the Telnet COM-port negotiation, then the same AT dialogue."""
    bridge = Rfc2217Bridge(tcp_sim.tcp_url)
    messages: queue.Queue[ReceivedMessage] = queue.Queue()
    modem = Modem(bridge.url, on_message=messages.put, on_status_report=lambda _r: None, command_timeout_s=5.0)
    try:
        assert modem.connect().manufacturer
        modem.send(RECIPIENT, "over rfc2217")
        assert [o["text"] for o in tcp_sim.outbox()] == ["over rfc2217"]
        tcp_sim.inject_sms(SENDER, "back over rfc2217")
        assert messages.get(timeout=5).text == "back over rfc2217"
    finally:
        modem.close()
        bridge.close()
