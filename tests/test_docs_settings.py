"""docs/OPERATIONS.md's settings table is relay/base/config.py: every setting is in
it with its real default, and every variable it names is a setting.

A default that is empty in Config but computed at start is documented in
words; those words are pinned in COMPUTED so that changing either side is
seen here."""

from __future__ import annotations

import re
from dataclasses import MISSING, fields
from pathlib import Path

import pytest

from relay.base.config import Config, _env_name, from_env

ROOT = Path(__file__).resolve().parents[1]
OPERATIONS = ROOT / "docs" / "OPERATIONS.md"
README = ROOT / "README.md"

#: Config fields that are not settings: from_env never reads them.
NOT_SETTINGS = {"secret_source"}

#: Empty in Config, filled in at start; the table says how.
COMPUTED = {
    "DATABASE_URL": "SQLite in `RELAY_DATA_DIR`",
    "RELAY_JWT_SECRET": "generated (dev only)",
    "RELAY_NODE_ID": "hostname-pid",
    "RELAY_BLOB_URL": "(empty: `<data dir>/blobs`)",
}
#: Ways the table writes an empty default.
EMPTY = re.compile(r'^(none|""|\(empty[^)]*\))$')


def settings() -> dict[str, object]:
    out: dict[str, object] = {}
    for f in fields(Config):
        if f.name not in NOT_SETTINGS:
            assert f.default is not MISSING, f.name
            out[_env_name(f.name)] = f.default
    return out


def table_rows(text: str, section: str) -> list[list[str]]:
    body = text.split(f"\n## {section}\n", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in body.splitlines() if line.startswith("| `")]
    return [[cell.strip() for cell in row.strip("|").split(" | ")] for row in rows]


def documented_defaults() -> dict[str, str]:
    """Variable -> default cell; `A` / `B` rows with `x / y` defaults are split."""
    out: dict[str, str] = {}
    for name_cell, default_cell, *_ in table_rows(OPERATIONS.read_text(), "Configure"):
        names = re.findall(r"`([A-Z][A-Z0-9_]*)`", name_cell)
        defaults = default_cell.split(" / ") if len(names) > 1 else [default_cell]
        assert len(defaults) == len(names), (name_cell, default_cell)
        for name, default in zip(names, defaults, strict=True):
            assert name not in out, f"{name} is in the table twice"
            out[name] = default.strip()
    return out


def agrees(doc: str, name: str, real: object) -> bool:
    if name in COMPUTED:
        return real == "" and doc == COMPUTED[name]
    if real == "":
        return bool(EMPTY.match(doc))
    # "0 (keep all)", "0 (auto)", "`mls-relay:`": the value, then why.
    value = re.sub(r"\s*\(.*\)$", "", doc).strip("`")
    if isinstance(real, bool):
        return value == str(real).lower()
    if isinstance(real, int | float):
        try:
            return float(value) == float(real)
        except ValueError:
            return False
    return value == real


def test_not_settings_are_really_not_read_from_the_environment():
    for name in NOT_SETTINGS:
        default = next(f.default for f in fields(Config) if f.name == name)
        assert getattr(from_env({_env_name(name): "from-env"}), name) == default


def test_every_setting_is_in_the_table_and_every_row_is_a_setting():
    real, documented = settings(), documented_defaults()
    assert sorted(set(real) - set(documented)) == [], "settings the table lacks"
    assert sorted(set(documented) - set(real)) == [], "rows naming no setting"


def test_the_table_gives_each_setting_its_real_default():
    real, documented = settings(), documented_defaults()
    wrong = {
        name: (documented[name], real[name])
        for name in sorted(set(real) & set(documented))
        if not agrees(documented[name], name, real[name])
    }
    assert wrong == {}, "name: (table, relay/base/config.py)"


@pytest.mark.parametrize("doc", [OPERATIONS, README], ids=lambda p: p.name)
def test_every_variable_the_docs_name_is_a_setting(doc):
    named = set(re.findall(r"\b(?:RELAY_[A-Z0-9_]*[A-Z0-9])\b", doc.read_text()))
    assert sorted(named - set(settings())) == []


def test_the_readme_table_agrees_with_config():
    units = {"KiB": 1024, "MiB": 1024 * 1024}
    real = settings()
    wrong = {}
    for name_cell, default_cell, *_ in table_rows(README.read_text(), "Production"):
        names = re.findall(r"`([A-Z][A-Z0-9_]*)`", name_cell)
        defaults = default_cell.split(" / ")
        if len(defaults) != len(names):
            continue  # "generated" for a pair: words, checked in OPERATIONS.md
        for name, cell in zip(names, defaults, strict=True):
            m = re.fullmatch(r"([0-9.]+)(?: (KiB|MiB))?", cell.strip())
            if m and float(m[1]) * units.get(m[2] or "", 1) != float(real[name]):  # type: ignore[arg-type]
                wrong[name] = (cell, real[name])
    assert wrong == {}, "name: (README, relay/base/config.py)"


#: Units the prose writes defaults in, as multiples of the setting's own unit
#: (sizes in bytes, durations in the unit its name ends with).
PROSE_UNITS = {"": 1, "KiB": 1024, "MiB": 1024**2, "GiB": 1024**3, "s": 1, "ms": 1, "h": 3600}
PROSE_DEFAULT = re.compile(
    r"`(RELAY_[A-Z0-9_]+|PORT)`(?: \(|, )(?:default )?([0-9][0-9,]*(?:\.[0-9]+)?)"
    r"(?: ?(KiB|MiB|GiB|ms|s|h|days?)\b)?"
)


def test_defaults_quoted_in_prose_are_the_real_ones():
    """`RELAY_X` (5 s ..., `RELAY_X`, 4 MiB, `RELAY_X` (default 2 ...: anywhere in the docs."""
    real = settings()
    docs = [README, *sorted((ROOT / "docs").glob("*.md"))]
    quoted, wrong = 0, []
    for doc in docs:
        for m in PROSE_DEFAULT.finditer(doc.read_text()):
            name, number, unit = m[1], float(m[2].replace(",", "")), m[3] or ""
            if unit.startswith("day"):
                number, unit = number * 86400, ""
            value = number * PROSE_UNITS[unit]
            quoted += 1
            if name not in real or float(real[name]) != value:  # type: ignore[arg-type]
                wrong.append((doc.name, m[0], real.get(name)))
    assert quoted >= 20, quoted  # the pattern still finds them
    assert wrong == [], "(doc, text, relay/base/config.py)"
