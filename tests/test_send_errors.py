"""The refused-send table (modem_worker/send_errors.py) and its copy in docs/modem.md; USSD answer decoding and the
balance number (modem_worker/modem/ussd.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from modem_worker.modem import decode_ussd_text, first_amount, unpack_septets
from modem_worker.send_errors import SEND_TRIES, TABLE, Kind, classify, markdown_table
from modem_worker.sms_text import encode_gsm7, pack_septets

ROOT = Path(__file__).resolve().parent.parent


def test_docs_show_the_table_of_the_code() -> None:
    docs = (ROOT / "docs" / "modem.md").read_text(encoding="utf-8")
    assert markdown_table() in docs, "regenerate the table in docs/modem.md from send_errors.markdown_table()"


@pytest.mark.parametrize(
    ("codes", "kind"),
    [
        ((1, 21, 28, 29, 30), Kind.RECIPIENT),
        ((8, 10, 50, 69, 331), Kind.SIM),
        ((38, 41, 42, 47, 332, 500), Kind.TRANSIENT),
    ],
)
def test_the_causes_of_the_field_notes_are_classified(codes: tuple[int, ...], kind: Kind) -> None:
    assert {code: classify("CMS", code).kind for code in codes} == dict.fromkeys(codes, kind)


def test_unknown_codes_and_missing_codes_are_transient_an_unencodable_sms_is_permanent() -> None:
    assert classify("CMS", 4711).kind is Kind.TRANSIENT
    assert "not in the table" in classify("CMS", 4711).describe()
    assert classify(None, None).kind is Kind.TRANSIENT
    assert classify("CMS", None, invalid=True).kind is Kind.RECIPIENT
    # A +CME ERROR 30 is "no network service", not the +CMS cause 30 "unknown subscriber".
    assert classify("CME", 30).kind is Kind.SIM and classify("CMS", 30).kind is Kind.RECIPIENT
    assert classify("CMS", 21).describe() == "+CMS ERROR 21 (short message transfer rejected)"


def test_the_table_has_one_row_per_code_and_a_bounded_budget() -> None:
    keys = [(c.source, c.code) for c in TABLE]
    assert len(keys) == len(set(keys))
    assert 1 < SEND_TRIES <= 5


def test_ussd_answers_are_decoded_whatever_the_modem_presents() -> None:
    text = "Salio lako ni TSh 1,234.50"
    ucs2 = text.encode("utf-16-be").hex().upper()
    gsm7 = pack_septets(encode_gsm7(text)).hex().upper()
    assert decode_ussd_text(ucs2, 72) == text
    assert decode_ussd_text(ucs2, 0x11) == text
    assert decode_ussd_text(gsm7, 15) == text
    assert decode_ussd_text(text, 15) == text
    assert decode_ussd_text("1234", 15) == "1234", "a plain number that looks like hex stays as it is"


def test_seven_spare_bits_are_padding_not_an_at_sign() -> None:
    seven = pack_septets(encode_gsm7("1234567"))  # 49 bits in 7 octets: 7 spare bits
    assert len(seven) == 7 and len(unpack_septets(seven)) == 7
    assert decode_ussd_text(seven.hex(), 15) == "1234567"
    eight = pack_septets(encode_gsm7("12345678"))  # 56 bits: no spare bits, 8 septets
    assert decode_ussd_text(eight.hex(), 15) == "12345678"


@pytest.mark.parametrize(
    ("text", "amount"),
    [
        ("Salio lako ni TSh 1,234.50", 1234.5),
        ("Balance: 12345 TZS, valid until 31/12", 12345.0),
        ("Your balance is -20.5", -20.5),
        ("Akaunti 1,5 bonus", 1.0),  # a comma not between groups of three digits ends the number
        ("no number here", None),
    ],
)
def test_the_first_number_is_the_balance(text: str, amount: float | None) -> None:
    assert first_amount(text) == amount
