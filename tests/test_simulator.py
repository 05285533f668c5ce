"""The modem simulator against the REAL python-gsmmodem-new library, raw pyserial and the HTTP control API.

Everything runs on a real pty. No sleeps stand in for synchronisation: waits poll a condition with a deadline.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import serial
from gsmmodem.exceptions import CmsError
from gsmmodem.modem import GsmModem, ReceivedSms, StatusReport
from gsmmodem.pdu import Concatenation, decodeSmsPdu
from smspdudecoder.easy import read_incoming_sms

from modem_worker.sms_text import PART_LIMIT, decode_gsm7, encode_address, encode_gsm7, segment, text_units
from simulator import SimFullError, Simulator, build_deliver, decode_pdu
from simulator.pdu import local_datetime
from tests.conftest import wait_for

FINAL = ("OK", "ERROR", "+CMS ERROR:", "+CME ERROR:")
SENDER = "+255712345678"
RECIPIENT = "+255700000002"


class RawPort:
    """A bare pyserial client speaking AT to the simulator."""

    def __init__(self, path: Path | str) -> None:
        # serial_for_url opens a device path as serial.Serial does, and a socket:// URL (the TCP mode) too.
        self.port = serial.serial_for_url(str(path), 115200, timeout=0.05)
        self.buffer = b""

    def close(self) -> None:
        self.port.close()

    def read_until(self, done: Callable[[bytes], bool], timeout: float = 3.0) -> bytes:
        """Read until `done(buffer)`; return and consume the buffer."""
        deadline = time.monotonic() + timeout
        while not done(self.buffer):
            if time.monotonic() > deadline:
                pytest.fail(f"timed out; got {self.buffer!r}")
            self.buffer += self.port.read(self.port.in_waiting or 1)
        data, self.buffer = self.buffer, b""
        return data

    def command(self, line: str, timeout: float = 3.0) -> list[str]:
        """Send one AT command line; return the response lines up to and including the final result."""
        self.port.write(line.encode() + b"\r")
        raw = self.read_until(_has_final, timeout)
        return [x for x in raw.decode("latin-1").split("\r\n") if x]

    def send_pdu(self, pdu_hex: str, tpdu_length: int, terminator: bytes = b"\x1a") -> list[str]:
        """AT+CMGS with the prompt dance; return the lines after the PDU."""
        self.port.write(f"AT+CMGS={tpdu_length}\r".encode())
        assert self.read_until(lambda b: b.endswith(b"> ")) == b"\r\n> "
        self.port.write(pdu_hex.encode() + terminator)
        raw = self.read_until(_has_final)
        return [x for x in raw.decode("latin-1").split("\r\n") if x]


def _has_final(buffer: bytes) -> bool:
    """True when `buffer` ends with a complete final result code line."""
    if not buffer.endswith(b"\r\n"):
        return False
    last = buffer.decode("latin-1").rstrip("\r\n").split("\r\n")[-1]
    return last.startswith(FINAL)


@pytest.fixture
def sim(tmp_path: Path) -> Iterator[Simulator]:
    simulator = Simulator(tmp_path / "modem0", capacity=20)
    simulator.start()
    simulator.set_state(delivery_delay_s=0.05)
    yield simulator
    simulator.stop()


class ModemClient:
    """The real library, with its callbacks recorded."""

    def __init__(self, path: Path) -> None:
        self.received: list[ReceivedSms] = []
        self.reports: list[StatusReport] = []
        self.fatal: list[Exception] = []
        self.modem = GsmModem(
            str(path),
            115200,
            smsReceivedCallbackFunc=self.received.append,
            smsStatusReportCallback=self.reports.append,
        )
        self.modem.fatalErrorCallback = self.fatal.append
        # The serial read timeout only bounds how long close() waits for the reader thread (default 1 s).
        self.modem.timeout = 0.05
        self.modem.connect()

    def close(self) -> None:
        if self.modem.alive:
            self.modem.close()


@pytest.fixture
def client(sim: Simulator) -> Iterator[ModemClient]:
    c = ModemClient(sim.link)
    yield c
    c.close()


@pytest.fixture
def raw(sim: Simulator) -> Iterator[RawPort]:
    port = RawPort(sim.link)
    yield port
    port.close()


# --- the library ---------------------------------------------------------------------------------------------------


def test_connect_dialogue(sim: Simulator, client: ModemClient) -> None:
    log = sim.at_log()
    for cmd in (
        "ATZ",
        "ATE0",
        "AT+CFUN?",
        "AT+CMEE=1",
        "AT+CPIN?",
        "AT+CLAC",
        "AT+CGMI",
        "AT+ZPAS?",
        "AT+COPS=3,0",
        "AT+CMGF=0",
        "AT+CSCA?",
        "AT+CSMP=49,167,0,0",
        "AT+CPMS=?",
        # The library prefers the modem's own memory (ME) whenever AT+CPMS=? lists it.
        'AT+CPMS="ME","ME","ME"',
        "AT+CNMI=2,1,0,2",
        "AT+CLIP=1",
        "AT+CRC=1",
        "AT+CVHU=0",
    ):
        assert cmd in log
    modem = client.modem
    supported = modem.write("AT+CLAC")
    assert "AT+CSCS" in supported and "AT^CVOICE" not in supported
    assert modem.smsc == "+255754000000"
    assert modem.ownNumber == "+255700000001"
    assert modem.signalStrength == 20
    assert modem.networkName == "SIMULATED"
    sim.set_state(signal=7)
    assert modem.signalStrength == 7


@pytest.mark.parametrize(
    "text",
    [
        "Hello from the simulator",
        "Price 10€ [promo] {x} ~^|\\",
        "Habari yako? Nimefika salama.",
        "¿Dónde está la estación? Mañana.",
        "你好，世界",
        "مرحبا بالعالم",
    ],
    ids=["ascii", "gsm-extension", "swahili", "spanish", "chinese", "arabic"],
)
def test_receive_via_library(sim: Simulator, client: ModemClient, text: str) -> None:
    ts = 1_700_000_000_000
    indices = sim.inject_sms(SENDER, text, timestamp_ms=ts)
    assert indices == [1]
    sms = wait_for(lambda: client.received, what="smsReceivedCallback")[0]
    assert (sms.number, sms.text) == (SENDER, text)
    assert sms.time.timestamp() == ts / 1000
    # The library deleted it after the callback (AT+CMGD).
    wait_for(lambda: sim.inbox() == [], what="SIM emptied")


def test_alphanumeric_sender_via_library(sim: Simulator, client: ModemClient) -> None:
    sim.inject_sms("MPESA-TEST", "Confirmed. You received 500")
    sms = wait_for(lambda: client.received)[0]
    assert (sms.number, sms.text) == ("MPESA-TEST", "Confirmed. You received 500")


def test_send_ascii_and_multipart_to_outbox(sim: Simulator, client: ModemClient) -> None:
    client.modem.sendSms(RECIPIENT, "Hello outbox")
    long_text = "".join(f"word{i} " for i in range(50))  # 340 GSM chars: 3 parts
    client.modem.sendSms("+255700000003", long_text)
    outbox = sim.outbox()
    assert [(e["to"], e["text"]) for e in outbox] == [(RECIPIENT, "Hello outbox"), ("+255700000003", long_text)]
    assert outbox[0]["references"] == [0]
    assert outbox[1]["references"] == [1, 2, 3] and outbox[1]["reference"] == 3
    assert sim.at_log().count("AT+CMGS=153") == 2


def test_status_reports(sim: Simulator, client: ModemClient) -> None:
    sent = client.modem.sendSms(RECIPIENT, "report me")
    report = wait_for(lambda: client.reports, what="delivered report")[0]
    assert (report.reference, report.deliveryStatus, report.number) == (0, StatusReport.DELIVERED, RECIPIENT)
    assert report.timeSent is not None and report.timeFinalized >= report.timeSent
    assert sent.reference == 0
    sim.set_state(delivery="failed")
    client.modem.sendSms(RECIPIENT, "fail me")
    report = wait_for(lambda: client.reports[1:], what="failed report")[0]
    assert (report.reference, report.deliveryStatus) == (1, StatusReport.FAILED)
    wait_for(lambda: sim.state()["sr_used"] == 0, what="SR emptied by the library")


def test_no_report_when_delivery_none(sim: Simulator, raw: RawPort) -> None:
    sim.set_state(delivery="none")
    pdu = _submit_pdu(RECIPIENT, "no report please")
    assert raw.send_pdu(*pdu)[-1] == "OK"
    assert sim.outbox()[0]["text"] == "no report please"
    # Nothing may follow: a further command answers straight away with no URC before it.
    assert raw.command("AT") == ["OK"]
    assert sim.state()["sr_used"] == 0


def test_fail_sends_raise_cms_error(sim: Simulator, client: ModemClient) -> None:
    sim.set_state(fail_sends=1, cms_error=38)
    with pytest.raises(CmsError) as err:
        client.modem.sendSms(RECIPIENT, "will fail")
    assert err.value.code == 38
    assert sim.state()["fail_sends"] == 0
    client.modem.sendSms(RECIPIENT, "will pass")
    assert [e["text"] for e in sim.outbox()] == ["will pass"]
    sim.set_state(registered=False)
    with pytest.raises(CmsError) as err:
        client.modem.sendSms(RECIPIENT, "no network")
    assert err.value.code == 331


def test_unplug_and_replug(sim: Simulator, client: ModemClient) -> None:
    sim.inject_sms(SENDER, "before unplug")
    wait_for(lambda: client.received)
    sim.set_state(delivery="none")
    sim.unplug()
    assert not sim.link.exists() and not os.path.islink(sim.link)
    wait_for(lambda: client.fatal, what="fatalErrorCallback after unplug")
    assert not client.modem.alive
    # SMS arriving while unplugged stay on the SIM.
    sim.inject_sms(SENDER, "while unplugged")
    sim.replug()
    assert sim.link.is_symlink() and sim.plugged
    again = ModemClient(sim.link)
    try:
        assert [m.text for m in again.modem.listStoredSms()] == ["while unplugged"]
        again.modem.sendSms(RECIPIENT, "after replug")
        assert sim.outbox()[-1]["text"] == "after replug"
    finally:
        again.close()


# --- raw AT ----------------------------------------------------------------------------------------------------------


def _read_cmgr(raw: RawPort, index: int) -> tuple[str, str]:
    """AT+CMGR=index; return (header, pdu) and check the framing (PDU right after one CR LF)."""
    raw.port.write(f"AT+CMGR={index}\r".encode())
    data = raw.read_until(_has_final)
    assert data.startswith(b"\r\n+CMGR: ")
    header, pdu, rest = data[2:].split(b"\r\n", 2)
    assert rest == b"\r\nOK\r\n"
    return header.decode(), pdu.decode()


@pytest.mark.parametrize(
    "text",
    ["Hello €[]", "Habari", "¿Qué tal?", "你好", "مرحبا", "emoji 😀 ok 👍🏽", "😀" * 80],
    ids=["ext", "swahili", "spanish", "chinese", "arabic", "emoji", "emoji-multipart"],
)
def test_deliver_pdus_decode_independently(sim: Simulator, raw: RawPort, text: str) -> None:
    """The library mangles emoji, so check the stored PDUs with smspdudecoder and our own decoder."""
    indices = sim.inject_sms(SENDER, text, timestamp_ms=1_700_000_000_000)
    urcs = raw.read_until(lambda b: b.count(b"+CMTI") == len(indices))
    assert urcs.decode().split("\r\n")[1::2] == [f'+CMTI: "SM",{i}' for i in indices]
    joined_theirs, joined_ours = "", ""
    for i in indices:
        header, pdu = _read_cmgr(raw, i)
        assert header.startswith("+CMGR: 0,,")
        theirs = read_incoming_sms(pdu)
        ours = decode_pdu(pdu)
        assert theirs["sender"] == ours.address == SENDER
        assert int(theirs["date"].timestamp()) == 1_700_000_000
        assert int(header.rsplit(",", 1)[1]) == ours.tpdu_length
        joined_theirs += theirs["content"]
        joined_ours += ours.text
        if len(indices) > 1:
            assert theirs["partial"]["parts_count"] == len(indices)
    assert joined_theirs == joined_ours == text


def test_multipart_420_chars(sim: Simulator, raw: RawPort) -> None:
    text = ("Sehemu ndefu ya ujumbe. " * 20)[:420]
    indices = sim.inject_sms(SENDER, text)
    assert len(indices) == 3
    raw.read_until(lambda b: b.count(b"+CMTI") == 3)
    parts = []
    for i in indices:
        _, pdu = _read_cmgr(raw, i)
        lib = decodeSmsPdu(pdu)  # the library's own decoder sees the UDH
        (concat,) = [ie for ie in lib["udh"] if isinstance(ie, Concatenation)]
        parts.append((concat.number, concat.parts, concat.reference, lib["text"]))
    assert [p[:2] for p in parts] == [(1, 3), (2, 3), (3, 3)]
    assert len({p[2] for p in parts}) == 1
    assert "".join(p[3] for p in parts) == text
    assert [e["part"][1:] for e in sim.inbox()] == [[3, 1], [3, 2], [3, 3]]
    # CMGL=4 lists the three in one answer, PDUs directly after their headers.
    lines = raw.command("AT+CMGL=4")
    assert [x.split(",")[0] for x in lines[0:6:2]] == ["+CMGL: 1", "+CMGL: 2", "+CMGL: 3"]
    assert lines[-1] == "OK"
    assert raw.command("AT+CMGD=0,4") == ["OK"]
    assert sim.inbox() == []


def test_raw_commands(sim: Simulator, raw: RawPort) -> None:
    assert raw.command("AT") == ["OK"]
    assert raw.command("ATI")[-1] == "OK"
    assert raw.command("AT+ZPAS?") == ["ERROR"]
    assert raw.command("AT+NOSUCH") == ["ERROR"]
    assert raw.command("AT+CNUM") == ['+CNUM: "","+255700000001",145', "OK"]
    sim.set_state(battery=42, signal=99)
    assert raw.command("AT+CBC") == ["+CBC: 0,42", "OK"]
    assert raw.command("AT+CSQ") == ["+CSQ: 99,99", "OK"]
    assert raw.command("AT+CMGF=?") == ["+CMGF: (0,1)", "OK"]
    assert raw.command("AT+CSMS=?") == ["+CSMS: (0,1)", "OK"]
    assert raw.command("AT+CNMI=?")[-1] == "OK"
    assert raw.command("AT+IFC=2,2;+CMMS=2;+CUSD=1") == ["OK"]
    assert raw.command("ATE0 V1 &C1") == ["OK"]
    assert raw.command('AT+CPMS="SM","SM"') == ["+CPMS: 0,20,0,20,0,20", "OK"]
    assert raw.command('AT+CPMS="XX"') == ["+CMS ERROR: 302"]
    assert raw.command("AT+CMGR=5") == ["+CMS ERROR: 321"]
    assert raw.command("AT+CREG?") == ["+CREG: 0,1", "OK"]
    # Esc cancels a prompted PDU; an undecodable or mis-sized PDU is +CMS ERROR: 304.
    assert raw.send_pdu("0011", 7, terminator=b"\x1b") == ["OK"]
    assert raw.send_pdu("00ZZ", 7) == ["+CMS ERROR: 304"]
    pdu, length = _submit_pdu(RECIPIENT, "hi")
    assert raw.send_pdu(pdu, length + 1) == ["+CMS ERROR: 304"]
    assert sim.outbox() == []


def test_direct_delivery_for_kannel_style_cnmi(sim: Simulator, raw: RawPort) -> None:
    """CNMI mt=2/ds=1 (Kannel's default): +CMT and +CDS carry the PDU, nothing is stored."""
    assert raw.command("AT+CNMI=1,2,0,1,0") == ["OK"]
    assert sim.inject_sms(SENDER, "direct") == []
    data = raw.read_until(lambda b: b.count(b"\r\n") >= 3).decode()
    header, pdu = data.split("\r\n")[1:3]
    assert header == f"+CMT: ,{decode_pdu(pdu).tpdu_length}"
    assert decode_pdu(pdu).text == "direct" and sim.inbox() == []
    assert raw.command("AT+CNMA") == ["OK"]
    pdu_hex, length = _submit_pdu(RECIPIENT, "report inline")
    assert raw.send_pdu(pdu_hex, length) == ["+CMGS: 0", "OK"]
    data = raw.read_until(lambda b: b.count(b"\r\n") >= 3).decode()
    header, report_pdu = data.split("\r\n")[1:3]
    report = decode_pdu(report_pdu)
    assert header == f"+CDS: {report.tpdu_length}"
    assert (report.type, report.reference, report.address, report.status) == ("status-report", 0, RECIPIENT, 0)
    assert decodeSmsPdu(report_pdu)["status"] == 0
    assert sim.state()["sr_used"] == 0


def test_echo(sim: Simulator, raw: RawPort) -> None:
    assert raw.command("ATE1") == ["OK"]
    assert raw.command("AT+CSQ") == ["AT+CSQ\r", "+CSQ: 20,99", "OK"]
    assert raw.command("ATE0") == ["ATE0\r", "OK"]
    assert raw.command("AT") == ["OK"]


def _submit_part(number: str, payload: bytes, ref: int, total: int, seq: int) -> tuple[str, int]:
    """A UCS-2 SMS-SUBMIT part built by hand, so that a surrogate pair can be split across parts."""
    udh = bytes((0x05, 0x00, 0x03, ref, total, seq))
    ud = udh + payload
    tpdu = bytes((0x61, 0x00)) + encode_address(number) + bytes((0x00, 0x08, len(ud))) + ud
    return "00" + tpdu.hex().upper(), len(tpdu)


def test_outbox_joins_parts_split_inside_a_surrogate_pair(sim: Simulator, raw: RawPort) -> None:
    sim.set_state(delivery="none")
    encoded = "abc😀def".encode("utf-16-be")
    cut = 8  # inside the emoji's surrogate pair
    # Parts may arrive out of order; the entry appears once all are in.
    assert raw.send_pdu(*_submit_part(RECIPIENT, encoded[cut:], 9, 2, 2))[-1] == "OK"
    assert sim.outbox() == []
    assert raw.send_pdu(*_submit_part(RECIPIENT, encoded[:cut], 9, 2, 1))[-1] == "OK"
    (entry,) = sim.outbox()
    assert (entry["text"], entry["references"], entry["reference"]) == ("abc😀def", [1, 0], 0)


def test_message_reference_wraps(sim: Simulator, raw: RawPort) -> None:
    sim.set_state(delivery="none")
    pdu, length = _submit_pdu(RECIPIENT, "x")
    refs = [int(raw.send_pdu(pdu, length)[0].split(": ")[1]) for _ in range(258)]
    assert refs[:3] == [0, 1, 2] and refs[255:] == [255, 0, 1]


def test_sim_full(tmp_path: Path) -> None:
    with Simulator(tmp_path / "small", capacity=3) as small:
        assert small.inject_sms(SENDER, "x" * 300) == [1, 2]
        with pytest.raises(SimFullError):
            small.inject_sms(SENDER, "y" * 300)  # needs 2 slots, 1 free: refused as a whole
        assert len(small.inbox()) == 2
        assert small.inject_sms(SENDER, "fits") == [3]
        response = requests.post(f"{small.control_url}/sms", json={"from": SENDER, "text": "no room"}, timeout=5)
        assert response.status_code == 507
        assert response.json()["cms_error"] == 322
        port = RawPort(small.link)
        try:
            pdu, length = _submit_pdu(RECIPIENT, "draft")
            port.port.write(f"AT+CMGW={length}\r".encode())
            port.read_until(lambda b: b.endswith(b"> "))
            port.port.write(pdu.encode() + b"\x1a")
            assert port.read_until(_has_final) == b"\r\n+CMS ERROR: 322\r\n"
            assert port.command("AT+CMGD=1") == ["OK"]
            port.port.write(f"AT+CMGW={length}\r".encode())
            port.read_until(lambda b: b.endswith(b"> "))
            port.port.write(pdu.encode() + b"\x1a")
            assert port.read_until(_has_final) == b"\r\n+CMGW: 1\r\n\r\nOK\r\n"
        finally:
            port.close()


def test_reply_delay_lets_urc_arrive_first(sim: Simulator, raw: RawPort) -> None:
    sim.set_state(reply_delay_s=0.3)
    raw.port.write(b"AT+CSQ\r")
    wait_for(lambda: "AT+CSQ" in sim.at_log(), what="command received")
    sim.inject_sms(SENDER, "during reply")
    data = raw.read_until(_has_final).decode()
    assert data.index('+CMTI: "SM",1') < data.index("+CSQ:")


def test_send_delay(sim: Simulator, raw: RawPort) -> None:
    sim.set_state(send_delay_s=0.2)
    pdu, length = _submit_pdu(RECIPIENT, "slow")
    t0 = time.monotonic()
    assert raw.send_pdu(pdu, length)[-1] == "OK"
    assert time.monotonic() - t0 >= 0.2


# --- control API over HTTP ----------------------------------------------------------------------------------------


def test_control_api(sim: Simulator, raw: RawPort) -> None:
    url = sim.control_url
    assert requests.get(f"{url}/health", timeout=5).json()["ok"] is True
    r = requests.post(
        f"{url}/sms", json={"from": SENDER, "text": "via http", "timestamp": 1_700_000_000_000}, timeout=5
    )
    assert r.status_code == 200 and r.json() == {"indices": [1], "pending": 0}
    raw.read_until(lambda b: b'+CMTI: "SM",1' in b)
    inbox = requests.get(f"{url}/inbox", timeout=5).json()
    assert inbox == [
        {
            "index": 1,
            "from": SENDER,
            "text": "via http",
            "timestamp": 1_700_000_000_000,
            "part": None,
            "read": False,
            "memory": "SM",
        }
    ]
    # A batch: every +CMTI in ONE write, so they arrive together.
    r = requests.post(
        f"{url}/sms/batch", json={"messages": [{"from": SENDER, "text": f"b{i}"} for i in range(3)]}, timeout=5
    )
    assert r.json() == {"indices": [[2], [3], [4]]}
    burst = raw.read_until(lambda b: b.count(b"+CMTI") == 3)
    assert burst == b"".join(f'\r\n+CMTI: "SM",{i}\r\n'.encode() for i in (2, 3, 4))
    # State: partial update answers the full state; bad values are refused and change nothing.
    state = requests.post(f"{url}/state", json={"signal": 12, "delivery": "failed"}, timeout=5).json()
    assert state["signal"] == 12 and state["delivery"] == "failed" and state["delivery_delay_s"] == 0.05
    assert requests.post(f"{url}/state", json={"signal": 40}, timeout=5).status_code == 400
    assert requests.post(f"{url}/state", json={"bogus": 1}, timeout=5).status_code == 400
    assert requests.get(f"{url}/state", timeout=5).json()["signal"] == 12
    assert requests.post(f"{url}/sms", json={"text": "no sender"}, timeout=5).status_code == 400
    assert requests.post(f"{url}/sms", data=b"{nope", timeout=5).status_code == 400
    assert requests.get(f"{url}/nothing", timeout=5).status_code == 404
    # Raw bytes (including a non-UTF-8 one) reach the client untouched.
    r = requests.post(f"{url}/raw", json={"hex": "0d0aff0d0a"}, timeout=5)
    assert r.json()["written"] == 5
    assert raw.read_until(lambda b: len(b) >= 5) == b"\r\n\xff\r\n"
    # Outbox and log.
    pdu, length = _submit_pdu(RECIPIENT, "from raw")
    raw.send_pdu(pdu, length)
    outbox = requests.get(f"{url}/outbox", timeout=5).json()
    assert [(e["to"], e["text"], e["reference"], e["references"]) for e in outbox] == [(RECIPIENT, "from raw", 0, [0])]
    assert requests.get(f"{url}/log", timeout=5).json()[-1] == f"AT+CMGS={length}"
    # Unplug / replug over HTTP.
    assert requests.post(f"{url}/unplug", timeout=5).json() == {"plugged": False}
    assert not os.path.lexists(sim.link)
    assert requests.post(f"{url}/raw", json={"hex": "00"}, timeout=5).json()["written"] == 0
    assert requests.post(f"{url}/replug", timeout=5).json()["plugged"] is True
    assert sim.link.is_symlink()
    assert len(requests.get(f"{url}/inbox", timeout=5).json()) == 4


def test_cli_help_and_sigterm(tmp_path: Path) -> None:
    help_text = subprocess.run(
        [sys.executable, "-m", "simulator", "--help"], capture_output=True, text=True, check=True
    ).stdout
    for word in ("--link", "--control-port", "--own-number", "--capacity", "--smsc", "/sms/batch", "/unplug"):
        assert word in help_text
    link = tmp_path / "cli-modem"
    proc = subprocess.Popen(
        [sys.executable, "-m", "simulator", "--link", str(link), "--control-port", "0"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        started: dict[str, Any] = {}
        for line in proc.stdout:
            record = json.loads(line)
            if record["message"] == "started":
                started = record
                break
        assert link.is_symlink()
        assert requests.get(f"{started['control_url']}/health", timeout=5).json()["ok"] is True
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
        rest = [json.loads(x)["message"] for x in proc.stdout.read().splitlines()]
        assert "stopped" in rest
        assert not os.path.lexists(link)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# --- codec details -------------------------------------------------------------------------------------------------


def test_split_never_breaks_escapes_or_surrogates() -> None:
    seg = segment("a" * 152 + "€" + "b" * 10)
    assert seg.encoding == "gsm7" and seg.parts[0] == "a" * 152 and seg.parts[1].startswith("€")
    assert all(len(encode_gsm7(p)) <= PART_LIMIT["gsm7"] for p in seg.parts)
    seg = segment("x" * 66 + "😀" + "y" * 10)
    assert seg.encoding == "ucs2" and seg.parts[0] == "x" * 66 and seg.parts[1].startswith("😀")
    assert all(text_units(p, "ucs2") <= PART_LIMIT["ucs2"] for p in seg.parts)
    assert segment("€" * 80).parts == ("€" * 80,)  # 160 septets: still one SMS
    assert segment("€" * 80).encoding == "gsm7"
    assert segment("😀" * 35).parts == ("😀" * 35,)  # 70 UTF-16 units: still one SMS


def test_gsm7_decode_of_undefined_escapes() -> None:
    # TS 23.038 6.2.1.1: ESC + a code the extension table lacks shows the default-table character,
    # ESC ESC (reserved) shows a space, and a dangling ESC at the end is dropped.
    assert decode_gsm7([0x1B, 0x41, 0x1B, 0x65, 0x1B, 0x1B, 0x42, 0x1B]) == "A€ B"


def test_alphanumeric_and_national_addresses() -> None:
    for sender in ("MPESA-TEST", "0712345678", SENDER):
        (part,) = build_deliver(sender, "hi", local_datetime(1_700_000_000_000), "+255754000000")
        assert decode_pdu(part.pdu).address == sender
        assert read_incoming_sms(part.pdu)["sender"] == sender
    assert encode_address("MPESA", allow_alphanumeric=True)[1] == 0xD0


def _submit_pdu(number: str, text: str) -> tuple[str, int]:
    """An SMS-SUBMIT built by the library's own encoder (status report requested)."""
    from gsmmodem.pdu import encodeSmsSubmitPdu

    (pdu,) = encodeSmsSubmitPdu(number, text, reference=0)
    return str(pdu), pdu.tpduLength


# --- field faults (issue 7) ----------------------------------------------------------------------------------------


def _lines(data: bytes) -> list[str]:
    """The non-empty lines of raw modem output."""
    return [x for x in data.decode("latin-1").split("\r\n") if x]


def test_hang_until_port_reopened(sim: Simulator, raw: RawPort) -> None:
    state = sim.set_state(hang=True)
    assert state["hang"] is True
    raw.port.write(b"AT\r")
    # The bytes reached the modem and were ignored: no answer can come for them any more.
    wait_for(lambda: sim.state()["hang_discarded_bytes"] >= 3, what="input discarded")
    # An SMS arriving meanwhile is stored on the SIM as usual, but announced with no +CMTI.
    assert sim.inject_sms(SENDER, "during the hang") == [1]
    assert [m["text"] for m in sim.inbox()] == ["during the hang"]
    assert raw.port.in_waiting == 0
    # Even the control API's raw write is swallowed.
    assert requests.post(f"{sim.control_url}/raw", json={"hex": "0d0a"}, timeout=5).json()["written"] == 0
    # Close and reopen the port (what a USB reset does): the modem answers again.
    raw.close()
    raw.port = serial.Serial(str(sim.link), 115200, timeout=0.05)
    wait_for(lambda: sim.state()["hang"] is False, what="hang ended by the reopen")
    assert raw.command("AT") == ["OK"]
    assert raw.command("AT+CMGL=4")[0].startswith("+CMGL: 1,0,,")


def test_hang_ended_over_the_api(sim: Simulator, raw: RawPort) -> None:
    requests.post(f"{sim.control_url}/state", json={"hang": True}, timeout=5).raise_for_status()
    raw.port.write(b"AT+CSQ")  # half a command: forgotten when the hang ends
    wait_for(lambda: sim.state()["hang_discarded_bytes"] >= 6, what="input discarded")
    assert raw.port.in_waiting == 0
    sim.set_state(hang=False)
    assert raw.command("AT") == ["OK"]


def test_reboot_drops_settings_and_keeps_stored_sms(sim: Simulator, raw: RawPort) -> None:
    assert raw.command("AT+CNMI=2,1,0,2,0;+CMEE=1") == ["OK"]
    sim.inject_sms(SENDER, "stored before the reboot")
    raw.read_until(lambda b: b"+CMTI" in b)
    # A send is half-way: the prompt is out, the PDU not yet typed.
    pdu, length = _submit_pdu(RECIPIENT, "lost with the session")
    raw.port.write(f"AT+CMGS={length}\r".encode())
    raw.read_until(lambda b: b.endswith(b"> "))
    answer = requests.post(f"{sim.control_url}/reboot", timeout=5).json()
    assert answer == {"rebooted": True, "boots": 1}
    boot = raw.read_until(lambda b: b"+CPIN:" in b and b.endswith(b"\r\n"))
    assert _lines(boot) == ["RDY", "^BOOT:20952483,0,0,0,72", "+CFUN: 1", "+CPIN: READY"]
    # The PDU typed after the reboot is not sent, and it does not spoil the next command.
    raw.port.write(pdu.encode() + b"\x1a")
    # Power-on settings: echo on, text mode, no new-SMS indications, plain ERROR.
    assert raw.command("AT+CMGF?") == ["AT+CMGF?\r", "+CMGF: 1", "OK"]
    assert raw.command("AT+CNMI?") == ["AT+CNMI?\r", "+CNMI: 0,0,0,0,0", "OK"]
    assert raw.command("AT+CMEE?") == ["AT+CMEE?\r", "+CMEE: 0", "OK"]
    assert raw.command("AT+CSCS?") == ["AT+CSCS?\r", '+CSCS: "IRA"', "OK"]
    assert raw.command("AT+CMGL=4") == ["AT+CMGL=4\r", "+CMS ERROR: 302"]  # PDU commands in text mode
    assert sim.outbox() == []
    state = sim.state()
    assert (state["echo"], state["cmgf"], state["cnmi"], state["cmee"], state["boots"]) == (True, 1, [0, 0], 0, 1)
    # SMS arriving now are stored silently (+CNMI off); everything stored survived.
    sim.inject_sms(SENDER, "after the reboot")
    assert raw.port.in_waiting == 0
    assert [m["text"] for m in sim.inbox()] == ["stored before the reboot", "after the reboot"]
    # Re-initialised, the modem works as before.
    assert raw.command("ATE0") == ["ATE0\r", "OK"]
    assert raw.command("AT+CMGF=0;+CNMI=2,1,0,2,0") == ["OK"]
    assert raw.send_pdu(pdu, length)[-1] == "OK"
    assert [e["text"] for e in sim.outbox()] == ["lost with the session"]


def test_library_reconnects_after_reboot(sim: Simulator, client: ModemClient) -> None:
    client.close()
    sim.reboot()
    sim.inject_sms(SENDER, "while rebooting")  # <mem3> is back to SM after a power-on
    again = ModemClient(sim.link)
    try:
        assert [m.text for m in again.modem.listStoredSms(memory="SM")] == ["while rebooting"]
        again.modem.sendSms(RECIPIENT, "after the reboot")
        assert sim.outbox()[-1]["text"] == "after the reboot"
    finally:
        again.close()


def test_pin_unlock_and_puk(tmp_path: Path) -> None:
    with Simulator(tmp_path / "locked", pin="1234") as sim:
        port = RawPort(sim.link)
        try:
            state = sim.state()
            assert (state["sim_status"], state["pin_tries_left"], state["pin_attempts"]) == ("SIM PIN", 3, 0)
            assert port.command("AT+CPIN?") == ["+CPIN: SIM PIN", "OK"]
            assert port.command("AT+CMGL=4") == ["+CME ERROR: 11"]
            assert port.command("AT+CIMI") == ["+CME ERROR: 11"]
            assert port.command("AT+CREG?") == ["+CREG: 0,0", "OK"]
            assert port.command("AT+CCID")[-1] == "OK"  # the ICCID is readable on a locked SIM
            # An SMS cannot reach a locked SIM: it waits in the network.
            assert sim.inject_sms(SENDER, "waits for the PIN") == []
            assert sim.state()["network_pending"] == 1
            assert port.command('AT+CPIN="0000"') == ["+CME ERROR: 16"]
            assert sim.state()["pin_tries_left"] == 2
            # The right PIN (unquoted works too) unlocks; the waiting SMS arrives after the OK.
            port.port.write(b"AT+CPIN=1234\r")
            out = port.read_until(lambda b: b"+CMTI" in b and b.endswith(b"\r\n"))
            assert _lines(out) == ["OK", '+CMTI: "SM",1']
            assert port.command("AT+CPIN?") == ["+CPIN: READY", "OK"]
            state = sim.state()
            assert (state["sim_status"], state["pin_tries_left"], state["pin_attempts"]) == ("READY", 3, 2)
            # A reboot (a power cut) asks for the PIN again.
            sim.reboot()
            port.read_until(lambda b: b"+CPIN: SIM PIN\r\n" in b)
            assert port.command("ATE0") == ["ATE0\r", "OK"]
            assert port.command("AT+CPIN?") == ["+CPIN: SIM PIN", "OK"]
            assert port.command("AT+CMGL=4") == ["ERROR"]  # +CMEE is off after a reboot
            assert port.command("AT+CMEE=1") == ["OK"]
            # Three wrong PINs block the SIM: SIM PUK, everything SIM-related fails with +CME ERROR: 12.
            for _ in range(3):
                assert port.command('AT+CPIN="9999"') == ["+CME ERROR: 16"]
            assert port.command("AT+CPIN?") == ["+CPIN: SIM PUK", "OK"]
            assert port.command('AT+CPIN="1234"') == ["+CME ERROR: 12"]
            assert port.command("AT+CMGL=4") == ["+CME ERROR: 12"]
            _, length = _submit_pdu(RECIPIENT, "never")
            assert port.command(f"AT+CMGS={length}") == ["+CME ERROR: 12"]
            state = sim.state()
            assert (state["sim_status"], state["pin_tries_left"], state["pin_attempts"]) == ("SIM PUK", 0, 6)
            sim.reboot()  # the SIM keeps its lock over a power cut
            assert sim.state()["sim_status"] == "SIM PUK"
            # A new SIM without PIN (over the API): ready again.
            assert requests.post(f"{sim.control_url}/state", json={"pin": None}, timeout=5).json()["sim_status"] == (
                "READY"
            )
        finally:
            port.close()


def test_pin_set_over_the_api_locks_at_once(sim: Simulator, raw: RawPort) -> None:
    assert sim.set_state(pin="4321")["sim_status"] == "SIM PIN"
    assert raw.command("AT+CPIN?") == ["+CPIN: SIM PIN", "OK"]
    assert raw.command('AT+CPIN="4321"') == ["OK"]
    assert raw.command('AT+CPIN="4321"') == ["+CME ERROR: 3"]  # not asked for: refused, still counted
    assert sim.state()["pin_attempts"] == 2
    assert requests.post(f"{sim.control_url}/state", json={"pin": "12"}, timeout=5).status_code == 400


def test_library_connect_with_pin(tmp_path: Path) -> None:
    """python-gsmmodem enters the PIN it is given (AT+CPIN=<pin>) once the SIM asks."""
    with Simulator(tmp_path / "locked", pin="1234") as sim:
        modem = GsmModem(str(sim.link), 115200)
        modem.timeout = 0.05
        try:
            modem.connect(pin="1234")
            assert sim.state()["sim_status"] == "READY"
            assert [c for c in sim.at_log() if c.startswith("AT+CPIN=")] == ['AT+CPIN="1234"']
        finally:
            modem.close()


def _luhn_ok(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch) * (2 if i % 2 else 1)
        total += d - 9 if d > 9 else d
    return total % 10 == 0


def test_identity_derived_from_link_and_stable(tmp_path: Path, sim: Simulator, raw: RawPort) -> None:
    state = sim.state()
    imei, iccid, imsi = state["imei"], state["iccid"], state["imsi"]
    assert len(imei) == 15 and _luhn_ok(imei)
    assert len(iccid) == 19 and iccid.startswith("89") and _luhn_ok(iccid)
    assert len(imsi) == 15 and imsi.startswith("64004")
    assert raw.command("AT+CGSN") == [imei, "OK"]
    assert raw.command("AT+CCID") == [f"+CCID: {iccid}", "OK"]
    assert raw.command("AT^ICCID?") == [f"+CCID: {iccid}", "OK"]
    assert raw.command("AT+CIMI") == [imsi, "OK"]
    assert f"IMEI: {imei}" in raw.command("ATI")
    # The same link gives the same identity, another link another one.
    same = Simulator(sim.link)
    other = Simulator(tmp_path / "modem1")
    assert same.state()["imei"] == imei and same.state()["iccid"] == iccid
    assert other.state()["imei"] != imei and other.state()["iccid"] != iccid and other.state()["imsi"] != imsi
    # Settable (another modem behind the same port).
    sim.set_state(imei="490154203237518")
    assert raw.command("AT+CGSN") == ["490154203237518", "OK"]
    assert requests.post(f"{sim.control_url}/state", json={"imei": "123"}, timeout=5).status_code == 400


def test_reject_numbers(sim: Simulator, raw: RawPort) -> None:
    sim.set_state(delivery="none")
    state = requests.post(
        f"{sim.control_url}/state", json={"reject_numbers": ["+2557000000"], "reject_cms": 21}, timeout=5
    ).json()
    assert (state["reject_numbers"], state["reject_cms"]) == (["+2557000000"], 21)
    assert raw.send_pdu(*_submit_pdu(RECIPIENT, "to a phone that is off")) == ["+CMS ERROR: 21"]
    assert raw.send_pdu(*_submit_pdu("+255711111111", "to another one"))[-1] == "OK"
    assert [e["to"] for e in sim.outbox()] == ["+255711111111"]
    sim.set_state(reject_numbers=[])
    assert raw.send_pdu(*_submit_pdu(RECIPIENT, "now it works"))[-1] == "OK"


def test_block_after_n_sends(sim: Simulator, raw: RawPort) -> None:
    sim.set_state(delivery="none")
    state = requests.post(f"{sim.control_url}/state", json={"block_after": 2, "block_cms": 8}, timeout=5).json()
    assert (state["block_after"], state["block_remaining"], state["blocked"]) == (2, 2, False)
    sim.set_state(fail_sends=1, cms_error=38)
    assert raw.send_pdu(*_submit_pdu(RECIPIENT, "failed: not counted")) == ["+CMS ERROR: 38"]
    assert raw.send_pdu(*_submit_pdu(RECIPIENT, "one"))[-1] == "OK"
    assert raw.send_pdu(*_submit_pdu("+255711111111", "two"))[-1] == "OK"
    assert sim.state()["blocked"] is True
    for number in (RECIPIENT, "+255722222222"):
        assert raw.send_pdu(*_submit_pdu(number, "barred")) == ["+CMS ERROR: 8"]
    assert [e["text"] for e in sim.outbox()] == ["one", "two"]
    state = sim.set_state(block_after=None)
    assert (state["block_after"], state["block_remaining"], state["blocked"]) == (None, None, False)
    assert raw.send_pdu(*_submit_pdu(RECIPIENT, "lifted"))[-1] == "OK"


def _read_cusd(raw: RawPort, request: str) -> str:
    """Send a USSD request; return the +CUSD URC line that follows the OK."""
    raw.port.write(f"{request}\r".encode())
    out = raw.read_until(lambda b: b"+CUSD:" in b and b.endswith(b"\r\n"))
    lines = _lines(out)
    assert lines[0] == "OK"
    (urc,) = lines[1:]
    return urc


def test_ussd_balance(sim: Simulator, raw: RawPort) -> None:
    text = "Salio lako ni TSh 1,234.50"
    state = requests.post(f"{sim.control_url}/state", json={"ussd": {"*100#": text}}, timeout=5).json()
    assert state["ussd"] == {"*100#": text} and state["ussd_encoding"] == "ucs2"
    urc = _read_cusd(raw, 'AT+CUSD=1,"*100#",15')
    assert urc == f'+CUSD: 0,"{text.encode("utf-16-be").hex().upper()}",72'
    sim.set_state(ussd_encoding="gsm7")
    urc = _read_cusd(raw, 'AT+CUSD=1,"*100#",15')
    head, hex_text, dcs = urc.split(",", 1)[0], urc.split('"')[1], urc.rsplit(",", 1)[1]
    assert (head, dcs) == ("+CUSD: 0", "15")
    from modem_worker.sms_text import unpack_septets

    packed = bytes.fromhex(hex_text)
    assert decode_gsm7(unpack_septets(packed, len(text))) == text
    # A request packed as GSM-7 hex (Huawei style) is understood too.
    from modem_worker.sms_text import pack_septets

    packed_request = pack_septets(encode_gsm7("*100#")).hex().upper()
    assert _read_cusd(raw, f'AT+CUSD=1,"{packed_request}",15').startswith("+CUSD: 0,")
    # Unknown code: +CUSD: 4 (operation not supported); cancelling a session is a plain OK.
    assert _read_cusd(raw, 'AT+CUSD=1,"*999#",15') == "+CUSD: 4"
    assert raw.command("AT+CUSD=2") == ["OK"]
    assert raw.command("AT+CUSD=1") == ["OK"]


def test_ussd_answer_decodes_with_the_worker_decoder(sim: Simulator, raw: RawPort) -> None:
    """Both encodings come back to the text through the modem adapter's own decoder."""
    from modem_worker.modem import decode_ussd_text

    text = "Salio lako ni TSh 1,234.50"
    sim.set_state(ussd={"*100#": text})
    for encoding in ("ucs2", "gsm7"):
        sim.set_state(ussd_encoding=encoding)
        urc = _read_cusd(raw, 'AT+CUSD=1,"*100#",15')
        assert decode_ussd_text(urc.split('"')[1], int(urc.rsplit(",", 1)[1])) == text


def _strip_noise(lines: list[str]) -> list[str]:
    noise = ("^RSSI:", "^BOOT:", "RING", "+CREG: 1", "^MODE:")
    return [x for x in lines if not x.startswith(noise)]


def _noisy_session(sim: Simulator, raw: RawPort, seed: int) -> list[bytes]:
    """A fixed command sequence under noise; returns the raw answers."""
    sim.set_state(noise=True, noise_seed=seed, noise_rate=0.5)
    out: list[bytes] = []
    for cmd in ("AT+CSQ", "AT+CMGL=4", "AT+CPMS?", "AT", "AT+CSQ", "AT+CNMI?"):
        raw.port.write(cmd.encode() + b"\r")
        out.append(raw.read_until(_has_final))
    return out


def test_noise_interleaves_whole_lines_only(sim: Simulator, raw: RawPort) -> None:
    sim.set_state(delivery="none")
    sim.inject_sms(SENDER, "one")
    sim.inject_sms(SENDER, "two")
    raw.read_until(lambda b: b.count(b"+CMTI") == 2)
    assert raw.command("AT+CMGL=4")[-1] == "OK"  # both read now: the sessions below change nothing
    first = _noisy_session(sim, raw, seed=7)
    noisy = [line for chunk in first for line in _lines(chunk) if _strip_noise([line]) == []]
    assert noisy, "noise_rate 0.5 over 6 replies gives noise lines"
    # Every noise line is a whole line; without them the answers are the normal ones.
    for chunk in first:
        assert _strip_noise(_lines(chunk))[-1] == "OK"
    cmgl = _strip_noise(_lines(first[1]))
    assert [x.split(",")[0] for x in cmgl[0:4:2]] == ["+CMGL: 1", "+CMGL: 2"]
    assert all(decode_pdu(pdu).type == "deliver" for pdu in cmgl[1:4:2])
    # The same seed replays the same noise; the prompt exchange never carries any.
    assert _noisy_session(sim, raw, seed=7) == first
    pdu, length = _submit_pdu(RECIPIENT, "through the noise")
    for _ in range(5):
        raw.port.write(f"AT+CMGS={length}\r".encode())
        assert raw.read_until(lambda b: b.endswith(b"> ")) == b"\r\n> "
        raw.port.write(pdu.encode() + b"\x1a")
        assert _strip_noise(_lines(raw.read_until(_has_final)))[-1] == "OK"
    assert len(sim.outbox()) == 5
    sim.set_state(noise=False)
    assert raw.command("AT") == ["OK"]


def test_storage_full_keeps_sms_in_the_network(sim: Simulator, raw: RawPort) -> None:
    sim.inject_sms(SENDER, "already stored")
    raw.read_until(lambda b: b"+CMTI" in b)
    state = requests.post(f"{sim.control_url}/state", json={"storage": "full"}, timeout=5).json()
    assert state["storage"] == "full"
    r = requests.post(f"{sim.control_url}/sms", json={"from": SENDER, "text": "waits"}, timeout=5)
    assert r.status_code == 200 and r.json() == {"indices": [], "pending": 1}
    assert raw.port.in_waiting == 0  # no +CMTI
    assert raw.command("AT+CPMS?") == ['+CPMS: "SM",20,20,"SM",20,20,"SM",20,20', "OK"]
    assert raw.command('AT+CPMS="ME","ME","ME"') == ["+CPMS: 20,20,20,20,20,20", "OK"]
    pdu, length = _submit_pdu(RECIPIENT, "draft")
    raw.port.write(f"AT+CMGW={length}\r".encode())
    raw.read_until(lambda b: b.endswith(b"> "))
    raw.port.write(pdu.encode() + b"\x1a")
    assert raw.read_until(_has_final) == b"\r\n+CMS ERROR: 322\r\n"
    assert raw.command('AT+CPMS="SM","SM","SM"')[-1] == "OK"
    # Storage frees up: the network delivers what waited, in order.
    state = sim.set_state(storage=None)
    assert (state["storage"], state["network_pending"]) == ("normal", 0)
    assert raw.read_until(lambda b: b"+CMTI" in b) == b'\r\n+CMTI: "SM",2\r\n'
    assert [m["text"] for m in sim.inbox()] == ["already stored", "waits"]
    assert raw.command("AT+CPMS?") == ['+CPMS: "SM",2,20,"SM",2,20,"SM",2,20', "OK"]


def test_me_memory(tmp_path: Path) -> None:
    with Simulator(tmp_path / "me", capacity=10, me_capacity=30) as sim:
        port = RawPort(sim.link)
        try:
            assert port.command("AT+CPMS=?") == ['+CPMS: ("SM","ME","SR"),("SM","ME"),("SM","ME")', "OK"]
            r = requests.post(
                f"{sim.control_url}/sms", json={"from": SENDER, "text": "in ME", "memory": "ME"}, timeout=5
            )
            assert r.json()["indices"] == [1]
            assert port.read_until(lambda b: b"+CMTI" in b) == b'\r\n+CMTI: "ME",1\r\n'
            sim.inject_sms(SENDER, "in SM")
            port.read_until(lambda b: b"+CMTI" in b)
            assert [(m["memory"], m["text"]) for m in sim.inbox()] == [("SM", "in SM"), ("ME", "in ME")]
            assert port.command('AT+CPMS="ME"') == ["+CPMS: 1,30,1,10,1,10", "OK"]
            assert port.command("AT+CPMS?") == ['+CPMS: "ME",1,30,"SM",1,10,"SM",1,10', "OK"]
            lines = port.command("AT+CMGL=4")
            assert lines[0].startswith("+CMGL: 1,0,,") and decode_pdu(lines[1]).text == "in ME"
            # <mem3> = ME: the network stores there from now on.
            assert port.command('AT+CPMS="ME","ME","ME"') == ["+CPMS: 1,30,1,30,1,30", "OK"]
            sim.inject_sms(SENDER, "follows mem3")
            assert port.read_until(lambda b: b"+CMTI" in b) == b'\r\n+CMTI: "ME",2\r\n'
            assert port.command("AT+CMGD=1") == ["OK"]
            assert sim.state()["me_used"] == 1
            assert (
                requests.post(
                    f"{sim.control_url}/sms", json={"from": SENDER, "text": "x", "memory": "SR"}, timeout=5
                ).status_code
                == 400
            )
        finally:
            port.close()


def test_state_shows_every_fault(sim: Simulator) -> None:
    state = requests.get(f"{sim.control_url}/state", timeout=5).json()
    for key in (
        "hang", "pin", "reject_numbers", "reject_cms", "block_after", "block_cms", "ussd", "ussd_encoding",
        "noise", "noise_seed", "noise_rate", "storage", "imei", "iccid", "imsi", "sim_status", "pin_attempts",
        "pin_tries_left", "block_remaining", "blocked", "network_pending", "boots", "me_used", "me_capacity",
    ):  # fmt: skip
        assert key in state, key
    assert (state["hang"], state["pin"], state["storage"], state["noise"]) == (False, None, "normal", False)


def test_cli_fault_flags(tmp_path: Path) -> None:
    link = tmp_path / "cli-faults"
    identity = {"--imei": "490154203237518", "--iccid": "8925504123456789012", "--imsi": "640041234567890"}
    argv = [sys.executable, "-m", "simulator", "--link", str(link), "--control-port", "0"]
    argv += ["--pin", "1234", "--me-capacity", "50", *(x for pair in identity.items() for x in pair)]
    proc = subprocess.Popen(
        argv,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        started: dict[str, Any] = {}
        for line in proc.stdout:
            record = json.loads(line)
            assert "1234" not in line  # the PIN is never logged
            if record["message"] == "started":
                started = record
                break
        state = requests.get(f"{started['control_url']}/state", timeout=5).json()
        assert (state["imei"], state["iccid"], state["imsi"]) == tuple(identity.values())
        assert (state["sim_status"], state["me_capacity"]) == ("SIM PIN", 50)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    bad = subprocess.run(
        [sys.executable, "-m", "simulator", "--link", str(link), "--control-port", "0", "--pin", "x"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert bad.returncode == 2


def test_library_reconnect_ends_a_hang(sim: Simulator, client: ModemClient) -> None:
    sim.set_state(hang=True)
    sim.inject_sms(SENDER, "stored during the hang")
    client.close()  # what a watchdog does: close the port...
    again = ModemClient(sim.link)  # ...and open it again: the whole connect dialogue is answered
    try:
        assert sim.state()["hang"] is False
        assert [m.text for m in again.modem.listStoredSms(memory="ME")] == ["stored during the hang"]
    finally:
        again.close()


# --- TCP mode (ser2net-like, issue 14) -----------------------------------------------------------------------------


@pytest.fixture
def tcp_sim() -> Iterator[Simulator]:
    simulator = Simulator(None, tcp=("127.0.0.1", 0))
    simulator.start()
    yield simulator
    simulator.stop()


def _tcp_endpoint(sim: Simulator) -> tuple[str, int]:
    host, _, port = sim.tcp_url.removeprefix("socket://").rpartition(":")
    return host, int(port)


def _closed_by_peer(sock: socket.socket) -> bool:
    """True when the peer closed ``sock`` (recv ends), waiting up to its time-out."""
    try:
        return sock.recv(64) == b""
    except ConnectionResetError:
        return True


def test_tcp_mode_serves_one_client_and_refuses_a_second_like_ser2net(tcp_sim: Simulator) -> None:
    """Raw AT over TCP; a second client while one is connected is accepted and closed at once (ser2net's default),
    the first keeps the line; once the first left, the next client is served."""
    first = RawPort(tcp_sim.tcp_url)
    try:
        assert first.command("AT") == ["OK"]
        wait_for(lambda: tcp_sim.client_connected, what="the first client connected")
        with socket.create_connection(_tcp_endpoint(tcp_sim), timeout=5) as second:
            assert _closed_by_peer(second)
        assert first.command("AT+CMGF=0") == ["OK"]
        health = requests.get(f"{tcp_sim.control_url}/health", timeout=5).json()
        assert health == {"ok": True, "plugged": True, "tcp": tcp_sim.tcp_url, "client": True}
    finally:
        first.close()
    wait_for(lambda: not tcp_sim.client_connected, what="the first client gone")
    again = RawPort(tcp_sim.tcp_url)
    try:
        assert again.command("AT+CMGF?") == ["+CMGF: 0", "OK"]  # the modem behind kept its settings
    finally:
        again.close()


def test_tcp_drop_cuts_the_client_and_unplug_refuses_connections_until_replug(tcp_sim: Simulator) -> None:
    """POST /drop ends the client's connection (it may connect again); /unplug stops listening (connections
    refused), /replug listens on the same port again. In pty mode /drop is a 409."""
    url = tcp_sim.control_url
    client = RawPort(tcp_sim.tcp_url)
    assert client.command("AT") == ["OK"]
    wait_for(lambda: tcp_sim.client_connected, what="the client connected")
    assert requests.post(f"{url}/drop", json={}, timeout=5).json() == {"dropped": True}
    with pytest.raises(serial.SerialException, match="disconnected"):
        client.read_until(lambda _b: False)
    client.close()
    wait_for(lambda: not tcp_sim.client_connected, what="the drop seen")
    assert requests.post(f"{url}/drop", json={}, timeout=5).json() == {"dropped": False}
    endpoint = _tcp_endpoint(tcp_sim)
    assert requests.post(f"{url}/unplug", json={}, timeout=5).json() == {"plugged": False}
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(endpoint, timeout=5).close()
    assert requests.post(f"{url}/replug", json={}, timeout=5).json()["link"] == tcp_sim.tcp_url
    assert _tcp_endpoint(tcp_sim) == endpoint
    back = RawPort(tcp_sim.tcp_url)
    try:
        assert back.command("AT") == ["OK"]
    finally:
        back.close()


def test_drop_needs_the_tcp_mode(sim: Simulator) -> None:
    answer = requests.post(f"{sim.control_url}/drop", json={}, timeout=5)
    assert answer.status_code == 409 and "--tcp" in answer.json()["error"]


def test_cli_tcp_mode(tmp_path: Path) -> None:
    """``--tcp HOST:0`` listens on a free port, logged at start; a client connects by its URL; a bad
    address or --tcp with --link is a usage error (exit 2)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "simulator", "--tcp", "127.0.0.1:0", "--control-port", "0"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        started: dict[str, Any] = {}
        for line in proc.stdout:
            record = json.loads(line)
            if record["message"] == "started":
                started = record
                break
        assert started["link"].startswith("socket://127.0.0.1:") and not started["link"].endswith(":0")
        raw = RawPort(started["link"])
        try:
            assert raw.command("AT+CGMI")[-1] == "OK"
        finally:
            raw.close()
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
    for argv in (["--tcp", "nonsense"], ["--tcp", "127.0.0.1:1", "--link", str(tmp_path / "x")]):
        bad = subprocess.run(
            [sys.executable, "-m", "simulator", *argv, "--control-port", "0"],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        assert bad.returncode == 2 and bad.stderr.strip()


def test_tcp_reconnect_ends_a_hang_like_reopening_the_pty(tcp_sim: Simulator) -> None:
    """A hung modem behind ser2net: the worker's watchdog reconnects, which ends the hang as a pty reopen does."""
    first = RawPort(tcp_sim.tcp_url)
    assert first.command("AT") == ["OK"]
    tcp_sim.set_state(hang=True)
    first.port.write(b"AT\r")
    first.close()
    wait_for(lambda: not tcp_sim.client_connected, what="the first client gone")
    assert tcp_sim.state()["hang"] is True  # a disconnect alone does not end it
    again = RawPort(tcp_sim.tcp_url)
    try:
        wait_for(lambda: tcp_sim.state()["hang"] is False, what="the hang ended by the reconnect")
        assert again.command("AT") == ["OK"]
    finally:
        again.close()
