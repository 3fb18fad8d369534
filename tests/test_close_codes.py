"""Close codes have one definition (protocol/closecodes.py) and docs/PROTOCOL.md
lists exactly those: every code with the reason the relay sends with it."""

from __future__ import annotations

import re
from pathlib import Path

import protocol.errors
from protocol.closecodes import CloseCode, CloseReason
from protocol.errors import ProtocolError

ROOT = Path(__file__).resolve().parents[1]


def documented_rows() -> dict[int, str]:
    """PROTOCOL.md's "Close codes" table: code -> the rest of its row."""
    text = (ROOT / "docs" / "PROTOCOL.md").read_text()
    section = text.split("## Close codes", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| (\d{4}) \|(.*)$", section, re.MULTILINE)
    assert len(rows) == len({code for code, _ in rows}), "a code listed twice"
    return {int(code): rest for code, rest in rows}


def refusals_with_close_codes() -> list[type[ProtocolError]]:
    return [
        cls
        for cls in vars(protocol.errors).values()
        if isinstance(cls, type) and issubclass(cls, ProtocolError) and "close_code" in vars(cls)
    ]


def test_the_table_lists_every_close_code_and_no_other():
    assert sorted(documented_rows()) == sorted(CloseCode)


def test_each_close_reason_is_documented_once():
    rows = documented_rows()
    for reason in CloseReason:
        holders = [code for code, row in rows.items() if f"`{reason}`" in row]
        assert len(holders) == 1, (reason, holders)


def test_each_refusal_is_documented_with_its_close_code():
    refusals = refusals_with_close_codes()
    assert len(refusals) >= 5  # ProtocolError, MalformedFrame, FrameTooLarge, ...
    rows = documented_rows()
    for cls in refusals:
        assert isinstance(cls.close_code, CloseCode), cls  # defined once, in the enum
        assert f"`{cls.error}`" in rows[cls.close_code], (cls.error, cls.close_code)
