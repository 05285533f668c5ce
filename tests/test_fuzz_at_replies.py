"""Fuzz the modem adapter's reading of AT replies: the AT layer (``FixedGsmModem``: response matching, URC routing,
error codes), the stored-SMS listings (``+CMGR``/``+CMGL``), identity and settings answers, USSD answers
(``decode_ussd_text``, ``first_amount``). Arbitrary lines, stray bytes that are not UTF-8, unsolicited lines in
the middle of a response: nothing escapes but the documented errors.

The serial port is an in-memory stand-in (pyserial's class patched in the library's module for the test), so the
real read thread and command matching run; a real pty link is what ``tests/test_modem_adapter.py`` uses."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any
from unittest import mock

from hypothesis import example, given
from hypothesis import strategies as st

from modem_worker.modem.at_fixes import CommandError, FixedGsmModem, TimeoutException
from modem_worker.modem.channel import AtChannel
from modem_worker.modem.errors import ModemError, ModemUnavailable
from modem_worker.modem.identity import IdentityQueries
from modem_worker.modem.ussd import Ussd, decode_ussd_text, first_amount
from tests.fuzzing import FUZZ

_URC_PREFIXES = ("+CMTI:", "+CDSI:", "+CMT:", "+CDS:", "RING", "+CRING:", "+CLIP:", "^RSSI:", "^BOOT:")


class ScriptedSerial:
    """A serial port whose modem answers each written command from ``script`` (command prefix -> reply bytes;
    unknown commands get ``OK``)."""

    def __init__(self, script: dict[str, bytes], **_settings: Any) -> None:
        self.script = script
        self.timeout = 0.2
        self._buffer = bytearray()
        self._ready = threading.Condition()
        self._cancelled = False

    @property
    def in_waiting(self) -> int:
        return len(self._buffer)

    def write(self, data: bytes) -> int:
        command = data.decode("ascii", "replace").strip("\r\x1a")
        reply = next((answer for prefix, answer in self.script.items() if command.startswith(prefix)), b"\r\nOK\r\n")
        with self._ready:
            self._buffer.extend(reply)
            self._ready.notify_all()
        return len(data)

    def read(self, size: int = 1) -> bytes:
        with self._ready:
            self._ready.wait_for(lambda: self._buffer or self._cancelled, timeout=self.timeout)
            chunk = bytes(self._buffer[:size])
            del self._buffer[:size]
            return chunk

    def cancel_read(self) -> None:
        with self._ready:
            self._cancelled = True
            self._ready.notify_all()

    def close(self) -> None:
        self.cancel_read()


@contextmanager
def scripted_modem(script: dict[str, bytes], timeout_s: float = 5.0) -> Iterator[tuple[FixedGsmModem, list[list[str]]]]:
    """An open ``FixedGsmModem`` on a ``ScriptedSerial`` (commands time out after ``timeout_s``), and the URCs it
    routed to its sink."""
    urcs: list[list[str]] = []
    gsm = FixedGsmModem(
        "/dev/fuzz",
        baudrate=115200,
        on_urc=urcs.append,
        on_link_down=lambda _exc: None,
        request_delivery=False,
        command_timeout_s=timeout_s,
    )
    with mock.patch("gsmmodem.serial_comms.serial.Serial", lambda **settings: ScriptedSerial(script, **settings)):
        gsm.open_port()
    try:
        yield gsm, urcs
    finally:
        gsm.close()


def _reply(lines: list[bytes], final: bytes) -> bytes:
    return b"".join(b"\r\n" + line + b"\r\n" for line in [*lines, final])


# One line from a modem: typical answers and URCs, text, and raw bytes (never CR LF, which ends a line).
_line_starts = st.sampled_from(
    [
        *(b"", b"OK", b"+CMGL: ", b"+CMGR: ", b"+CMTI: ", b"+CMT: ", b"+CDS: ", b"+CUSD: ", b"^ICCID: ", b"+CGSN: "),
        *(b"+CMGF: ", b"+CNMI: ", b"+CREG: ", b"RING", b"^RSSI:", b"> ", b"\xff\xfe", b"+CME ERROR: "),
    ]
)
lines = st.tuples(_line_starts, st.binary(max_size=30)).map(b"".join).map(lambda raw: raw.replace(b"\r\n", b"\n"))
finals = st.one_of(
    st.sampled_from([b"OK", b"ERROR", b"COMMAND NOT SUPPORT", b"NO CARRIER"]),
    st.integers(0, 999).filter(lambda code: code not in (14, 515)).map(lambda code: b"+CME ERROR: %d" % code),
    st.integers(0, 999).map(lambda code: b"+CMS ERROR: %d" % code),
)


@FUZZ
@given(body=st.lists(lines, max_size=6), final=finals)
@example(body=[b'+CMTI: "SM",3', b"+CMT: ,22", b"0791", b"\xff"], final=b"OK")
@example(body=[b"+CME ERROR: x"], final=b"ERROR")
def test_a_command_returns_its_response_or_a_command_error(body: list[bytes], final: bytes) -> None:
    # A "+CMT:"/"+CDS:" header takes the next line (maybe the final code) as its PDU: then the reply never ends, and
    # a short time-out keeps the run fast; otherwise a long one, so that a loaded machine never times out.
    two_line_urc = any(line.startswith((b"+CMT:", b"+CDS:")) for line in body)
    with scripted_modem({"AT+CSQ": _reply(body, final)}, 0.5 if two_line_urc else 10.0) as (gsm, urcs):
        try:
            response = gsm.write("AT+CSQ")
        except TimeoutException:
            assert two_line_urc
            return
        except CommandError as exc:  # CmeError and CmsError are CommandErrors
            errors = [final, *body]
            assert any(b"ERROR" in line or line == b"COMMAND NOT SUPPORT" for line in errors), exc
            return
    assert response is not None
    # A URC is never part of a response (library bug 1): it went to the sink.
    assert not any(line.startswith(_URC_PREFIXES) for line in response)
    assert all(isinstance(urc, list) and urc for urc in urcs)


# Lines without "+CMT:"/"+CDS:", which take the next line (the final OK) as their PDU, so the reply never ends: the
# command test above covers that with a short time-out; the others would wait out theirs (listings: 30 s).
_listing_lines = lines.filter(lambda line: not line.startswith((b"+CMT:", b"+CDS:")))
_pdu_lines = st.one_of(_listing_lines, st.binary(max_size=40).map(lambda raw: raw.hex().upper().encode()))
listings = st.lists(
    st.tuples(st.sampled_from([b"+CMGL: ", b"+CMGL:", b"+CMGR: "]), st.binary(max_size=12), _pdu_lines).map(
        lambda parts: [(parts[0] + parts[1]).replace(b"\r\n", b"\n"), parts[2]]
    ),
    max_size=4,
).map(lambda pairs: [line for pair in pairs for line in pair])


@FUZZ
@given(listing=listings | st.lists(_listing_lines, max_size=6), final=finals)
@example(listing=[b"+CMGL: 1,0,,22", b"+CREG: 1", b"0791AA"], final=b"OK")
@example(listing=[b"+CMGL: \xd9\xa3,0", b"00"], final=b"OK")
def test_stored_sms_listings_give_index_and_pdu_pairs(listing: list[bytes], final: bytes) -> None:
    script = {"AT+CMGL": _reply(listing, final), "AT+CMGR": _reply(listing, final)}
    with scripted_modem(script) as (gsm, _urcs):
        try:
            listed = gsm.list_stored_pdus("SM")
            stored = gsm.read_stored_pdu("SM", 1)
        except (CommandError, TimeoutException):
            return
    assert all(isinstance(index, int) and isinstance(pdu, str) for index, pdu in listed)
    assert stored is None or isinstance(stored, str)


@FUZZ
@given(
    answers=st.fixed_dictionaries({c: st.lists(_listing_lines, max_size=3) for c in ("AT+CGSN", "AT+CCID", "AT+CIMI")})
)
@example(answers={"AT+CGSN": [b'"356938035643809"'], "AT+CCID": [b"^ICCID: 8925\xff"], "AT+CIMI": [b"+CIMI: 1"]})
def test_identity_answers_give_values_or_empty(answers: dict[str, list[bytes]]) -> None:
    script = {command: _reply(body, b"OK") for command, body in answers.items()}
    channel = AtChannel("/dev/fuzz")
    with scripted_modem(script) as (gsm, _urcs):
        channel.gsm = gsm
        try:
            identity = IdentityQueries(channel).read_identity()
        except ModemUnavailable as exc:  # no final code: the reply never ended
            assert str(exc)
            return
    assert identity.imei == "" or identity.imei.isdigit()
    assert identity.imsi == "" or identity.imsi.isdigit()
    assert identity.iccid == identity.iccid.upper()


@FUZZ
@given(cmgf=st.lists(_listing_lines, max_size=3), cnmi=st.lists(_listing_lines, max_size=3))
@example(cmgf=[b"+CMGF: 0"], cnmi=[b"+CNMI: 2,1,0,2,0"])
@example(cmgf=[b"+CMGF: \xd9\xa3"], cnmi=[b"+CNMI: 2 , 1"])
def test_the_settings_check_answers_or_says_it_cannot_tell(cmgf: list[bytes], cnmi: list[bytes]) -> None:
    channel = AtChannel("/dev/fuzz")
    with scripted_modem({"AT+CMGF?": _reply(cmgf, b"OK"), "AT+CNMI?": _reply(cnmi, b"OK")}) as (gsm, _urcs):
        channel.gsm = gsm
        try:
            holds = IdentityQueries(channel).settings_hold()
        except ModemError as exc:
            assert str(exc)
            return
    assert isinstance(holds, bool)


_cusd_texts = st.one_of(
    st.text(max_size=60),
    st.binary(max_size=40).map(lambda raw: raw.hex().upper()),
    st.sampled_from(["C8329BFD06", "00480065006C006C006F", "D83DDE00", "CAFE", "1234"]),
)


@FUZZ
@given(text=_cusd_texts, dcs=st.none() | st.integers(-1, 300))
@example(text="D83D", dcs=0x48)  # a lone surrogate in UCS-2 hex
@example(text="00", dcs=0x0F)
@example(text="", dcs=None)
def test_a_ussd_text_decodes_to_valid_text(text: str, dcs: int | None) -> None:
    decoded = decode_ussd_text(text, dcs)
    decoded.encode("utf-8")  # repaired or kept: never a lone surrogate (it goes into a log line and a metric)
    amount = first_amount(decoded)
    assert amount is None or isinstance(amount, float)


@FUZZ
@given(
    status=st.integers(0, 9).map(str) | st.text(max_size=3),
    text=_cusd_texts.map(lambda t: t.replace('"', "")),
    dcs=st.sampled_from(["", ",15", ",72", ",x", ",999999999999"]),
    # Not "OK" (an early end: the answer would be waited for as a URC, which this test does not send).
    before=st.lists(_listing_lines.filter(lambda line: line not in (b"OK", b"NO CARRIER")), max_size=2),
)
@example(status="0", text="C8329BFD06", dcs=",15", before=[])
@example(status="2", text="", dcs="", before=[b"+CUSD: 4"])
def test_a_ussd_answer_is_text_or_a_modem_error(status: str, text: str, dcs: str, before: list[bytes]) -> None:
    cusd = f'+CUSD: {status},"{text}"{dcs}'.encode("utf-8", "surrogatepass").replace(b"\r\n", b"\n")
    channel = AtChannel("/dev/fuzz")
    with scripted_modem({"AT+CUSD=1": _reply([*before, cusd], b"OK")}) as (gsm, _urcs):
        channel.gsm = gsm
        try:
            answer = Ussd(channel).request("*100#", timeout_s=10.0)  # the answer is in the reply: no wait
        except ModemError as exc:
            assert str(exc)
            return
    answer.encode("utf-8")
