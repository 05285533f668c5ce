"""Fuzz the PDU codecs: the simulator's builders and decoder round-trip arbitrary GSM-7 and UCS-2 text, numbers
and alphanumeric senders (also through the adapter's decoder, ``decode_stored_pdu``), and both decoders take
arbitrary hex with nothing escaping but their documented error (``PduError``, ``ValueError``)."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta, timezone

from hypothesis import example, given
from hypothesis import strategies as st

from modem_worker.modem.stored_pdu import DeliverPdu, StatusReportPdu, decode_stored_pdu
from modem_worker.sms_text import GSM7_BASIC, GSM7_ESCAPE, GSM7_EXTENSION, TextTooLong, build_submit_pdus, repair_utf16
from simulator.pdu import PduError, build_deliver, build_status_report, decode_pdu, decode_text
from tests.fuzzing import FUZZ


def _is_number(address: str) -> bool:
    """What ``encode_address`` sends as a number (spaces ignored), not as an alphanumeric sender."""
    return re.fullmatch(r"\+?[0-9]{1,20}", address.replace(" ", "")) is not None


_GSM7 = GSM7_BASIC[:GSM7_ESCAPE] + GSM7_BASIC[GSM7_ESCAPE + 1 :] + "".join(GSM7_EXTENSION)
gsm7_texts = st.text(st.sampled_from(_GSM7), max_size=400)
# Any text an SMS can carry: the BMP and beyond (surrogate pairs on the air), no lone surrogates.
ucs2_texts = st.text(st.characters(exclude_categories=["Cs"]), max_size=200)
numbers = st.from_regex(r"\+?[0-9]{1,20}", fullmatch=True)
# Alphanumeric senders (TON 5): 1-11 septets of GSM-7, not all digits.
alphanumeric = st.text(st.sampled_from(_GSM7), min_size=1, max_size=11).filter(
    lambda name: not _is_number(name) and len(name) + sum(c in GSM7_EXTENSION for c in name) <= 11
)
stamps = st.datetimes(min_value=datetime(2000, 1, 1), max_value=datetime(2099, 12, 31)).map(
    lambda when: when.replace(microsecond=0)
)
zones = st.integers(-48, 56).map(lambda quarters: timezone(timedelta(minutes=15 * quarters)))


@FUZZ
@given(sender=numbers | alphanumeric, text=gsm7_texts | ucs2_texts, when=stamps, zone=zones, ref=st.integers(0, 255))
@example(sender="+255700000001", text="€" * 77, when=datetime(2024, 1, 1), zone=UTC, ref=7)  # an escape at a cut
@example(sender="Bank", text="😀" * 34, when=datetime(2024, 1, 1), zone=UTC, ref=0)  # a pair at a part boundary
@example(sender=":", text="", when=datetime(2069, 1, 1), zone=UTC, ref=0)  # was: decoded as 1969 (strptime's %y)
def test_a_deliver_round_trips_through_both_decoders(
    sender: str, text: str, when: datetime, zone: timezone, ref: int
) -> None:
    stamped = when.replace(tzinfo=zone)
    parts = build_deliver(sender, text, stamped, "+255700000000", concat_ref=ref)
    decoded = [decode_pdu(part.pdu) for part in parts]
    expected_sender = sender.replace(" ", "") if _is_number(sender) else sender
    assert {pdu.address for pdu in decoded} == {expected_sender}
    assert {pdu.timestamp for pdu in decoded} == {stamped}
    assert decode_text(decoded[0].encoding, b"".join(pdu.payload for pdu in decoded)) == text
    if len(parts) > 1:
        assert [pdu.concat for pdu in decoded] == [(ref, len(parts), seq) for seq in range(1, len(parts) + 1)]
    # The adapter's decoder (the library's, GSM-7 tables corrected) reads the same SMS.
    stored = [decode_stored_pdu(part.pdu) for part in parts]
    assert all(isinstance(pdu, DeliverPdu) for pdu in stored)
    assert repair_utf16("".join(pdu.raw_text for pdu in stored if isinstance(pdu, DeliverPdu))) == text
    assert {pdu.smsc_time for pdu in stored if isinstance(pdu, DeliverPdu)} == {stamped}


@FUZZ
@given(number=numbers, text=gsm7_texts | ucs2_texts, ref=st.integers(0, 255), delivery=st.booleans())
@example(number="+1", text="", ref=0, delivery=True)
def test_a_submit_round_trips(number: str, text: str, ref: int, delivery: bool) -> None:
    try:
        pdus = build_submit_pdus(number, text, concat_reference=ref, request_delivery=delivery)
    except TextTooLong:
        return
    decoded = [decode_pdu(pdu.hex) for pdu in pdus]
    assert all(pdu.type == "submit" and pdu.address == number for pdu in decoded)
    assert all(pdu.status_report_requested == delivery for pdu in decoded)
    assert [pdu.tpdu_length for pdu in decoded] == [pdu.tpdu_length for pdu in pdus]
    assert decode_text(decoded[0].encoding, b"".join(pdu.payload for pdu in decoded)) == text


@FUZZ
@given(reference=st.integers(0, 255), recipient=numbers, status=st.integers(0, 255), when=stamps, zone=zones)
@example(reference=0, recipient="0", status=0, when=datetime(2069, 1, 1), zone=UTC)  # was: decoded as 1969
def test_a_status_report_round_trips(
    reference: int, recipient: str, status: int, when: datetime, zone: timezone
) -> None:
    stamped = when.replace(tzinfo=zone)
    pdu_hex, _ = build_status_report(
        reference, recipient, submitted=stamped, discharged=stamped, status=status, smsc=None
    )
    pdu = decode_pdu(pdu_hex)
    assert (pdu.type, pdu.reference, pdu.address, pdu.status, pdu.discharge) == (
        "status-report",
        reference,
        recipient,
        status,
        stamped,
    )
    report = decode_stored_pdu(pdu_hex)
    assert isinstance(report, StatusReportPdu)
    assert (report.reference, report.recipient, report.status) == (reference, recipient, status)


# Arbitrary PDUs: random bytes, and real PDUs with bytes flipped, cut or appended (the decoders' hard cases).
_real = st.builds(
    lambda sender, text: build_deliver(sender, text, datetime(2024, 5, 1, tzinfo=UTC), None)[0].pdu,
    numbers | alphanumeric,
    gsm7_texts | ucs2_texts,
)


@st.composite
def mangled_pdus(draw: st.DrawFn) -> str:
    raw = bytearray(bytes.fromhex(draw(_real)))
    for _ in range(draw(st.integers(1, 4))):
        raw[draw(st.integers(0, len(raw) - 1))] = draw(st.integers(0, 255))
    cut = draw(st.integers(0, len(raw)))
    return (bytes(raw[:cut]) + draw(st.binary(max_size=4))).hex()


pdus = st.one_of(st.binary(max_size=60).map(bytes.hex), mangled_pdus(), st.text(max_size=40))


@FUZZ
@given(pdu=pdus)
@example(pdu="")
@example(pdu="00")
@example(pdu="zz")
def test_the_simulator_decoder_raises_only_pdu_error(pdu: str) -> None:
    try:
        decode_pdu(pdu)
    except PduError as exc:
        assert str(exc)


@FUZZ
@given(pdu=pdus)
@example(pdu="")
@example(pdu="0000")
def test_the_adapter_decoder_raises_only_value_error(pdu: str) -> None:
    try:
        decoded = decode_stored_pdu(pdu)
    except ValueError as exc:
        assert str(exc)
        return
    if isinstance(decoded, DeliverPdu):
        assert isinstance(decoded.text, str) and decoded.smsc_time.tzinfo is not None
        decoded.text.encode("utf-8")  # repaired: no lone surrogate reaches a queue
    else:
        assert 0 <= decoded.status <= 255


@FUZZ
@given(number=numbers | st.text(max_size=25), text=st.text(st.characters(codec=None), max_size=300))
@example(number="+255700000001", text="\ud83d")  # a lone surrogate (JSON allows it; a task message may carry it)
@example(number="", text="x")
def test_encoding_any_task_raises_only_value_error(number: str, text: str) -> None:
    """What a server may hand over (any number, any text): SUBMIT PDUs, or a ValueError (``TextTooLong`` is one)."""
    try:
        pdus = build_submit_pdus(number, text, concat_reference=1, request_delivery=True)
    except ValueError as exc:
        assert str(exc)
        return
    assert pdus and all(decode_pdu(pdu.hex).type == "submit" for pdu in pdus)
