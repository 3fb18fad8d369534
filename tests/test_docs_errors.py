"""docs/PROTOCOL.md names every error of protocol/errors.py, with the status,
close code and retry flag the relay gives it.

These are static checks of the document against the error tree;
tests/test_documented_errors.py checks the relay's behaviour over sockets."""

from __future__ import annotations

import ast
import inspect
import re
from enum import IntEnum, StrEnum
from pathlib import Path

import protocol.errors as errors_module
from protocol.closecodes import CloseCode, CloseReason
from protocol.errors import RelayError

ROOT = Path(__file__).resolve().parents[1]
PROTOCOL = ROOT / "docs" / "PROTOCOL.md"

#: Bases that group errors for the relay's code and never reach a client
#: themselves (test_bases_left_out_are_never_raised holds them to that).
BASES_NEVER_SENT = {"EpochError"}


def error_classes() -> dict[str, type[RelayError]]:
    """Wire name -> class, for every error class protocol/errors.py defines.

    A base may share its name with a subclass (AuthError and AuthRequired):
    the subclass stands for it.  Every InternalError (RelayError's own name,
    StorageError's) reaches a client as an Incident (relay/base/incidents.py)."""
    out: dict[str, type[RelayError]] = {"InternalError": errors_module.Incident}
    for cls in vars(errors_module).values():
        if not (inspect.isclass(cls) and issubclass(cls, RelayError)):
            continue
        if cls.error == "InternalError":
            continue
        other = out.get(cls.error)
        if other is None or issubclass(cls, other):
            out[cls.error] = cls
        else:
            assert issubclass(other, cls), f"{cls.error} names unrelated classes"
    return out


def doc() -> str:
    return PROTOCOL.read_text()


def section_rows(section: str) -> list[list[str]]:
    body = doc().split(f"\n## {section}\n", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in body.splitlines() if line.startswith("| ") and "---" not in line]
    return [[cell.strip() for cell in row.strip("|").split(" | ")] for row in rows[1:]]


#: Errors of the operator, not of a client: the process refuses to start with
#: "configuration error: ..." (relay/cli.py), which OPERATIONS.md explains.
OPERATOR_ONLY = {"ConfigError"}


def test_operator_errors_are_explained_in_operations_md():
    cli = (ROOT / "relay" / "cli.py").read_text()
    operations = (ROOT / "docs" / "OPERATIONS.md").read_text()
    assert 'f"mls-relay: configuration error: {exc.message}"' in cli
    assert "`configuration error: ...` at start" in operations


def test_every_error_name_is_documented():
    text = doc()
    missing = sorted(
        name
        for name in error_classes()
        if name not in BASES_NEVER_SENT | OPERATOR_ONLY
        and f"`{name}`" not in text
        and f'"{name}"' not in text
    )
    assert missing == [], "error names docs/PROTOCOL.md never mentions"


def test_bases_left_out_are_never_raised():
    classes = {error_classes()[name].__name__ for name in BASES_NEVER_SENT}
    for path in [
        *ROOT.glob("protocol/**/*.py"),
        *ROOT.glob("relay/**/*.py"),
        *ROOT.glob("storage/**/*.py"),
    ]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
                assert node.func.id not in classes, f"{path}:{node.lineno} raises {node.func.id}"
    for name in BASES_NEVER_SENT:
        assert error_classes()[name].__subclasses__(), f"{name} is not a base"


def test_every_close_code_is_in_the_close_code_table():
    table = {
        (row[0], m) for row in section_rows("Close codes") for m in re.findall(r"`(\w+)`", row[1])
    }
    wanted = {
        (str(cls.close_code), name)
        for name, cls in error_classes().items()
        if "close_code" in vars(cls)  # UnsupportedWebSocketVersion: an HTTP refusal only
    }
    assert sorted(wanted - table) == [], "(code, error) rows the close-code table lacks"


def test_the_errors_table_says_which_are_retryable():
    classes = error_classes()
    wrong = {}
    for name_cell, retry, *_ in section_rows("Errors"):
        for name in re.findall(r"`(\w+)`", name_cell):
            if (retry == "yes") != classes[name].retryable:
                wrong[name] = (retry, classes[name].retryable)
    assert wrong == {}, "name: (table, retryable)"


def test_documented_statuses_are_the_real_ones():
    """`Name` (404 ...) and 404 `Name`, wherever PROTOCOL.md writes them."""
    classes = error_classes()
    seen = re.findall(r"`(\w+)` \((\d{3})\b", doc()) + [
        (name, status) for status, name in re.findall(r"\b(\d{3}) `(\w+)`", doc())
    ]
    for name_cell_status, name_cell, *_ in (
        r for r in section_rows("Connecting") if r[0].isdigit()
    ):
        seen += [(name, name_cell_status) for name in re.findall(r"`(\w+)`", name_cell)]
    checked = [(n, s) for n, s in seen if n in classes]
    assert len(checked) >= 20, checked  # the patterns still find what they should
    wrong = sorted(
        {(n, s, classes[n].http_status) for n, s in checked if int(s) != classes[n].http_status}
    )
    assert wrong == [], "(name, documented status, real status)"


def closes_the_relay_sends() -> set[tuple[str, str]]:
    """(code, reason) of every ``x.close(CloseCode.X, CloseReason.Y | "...")`` in relay/."""

    def enum_value(node: ast.expr, enum: type[IntEnum] | type[StrEnum]) -> str | None:
        if (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and node.value.id == enum.__name__
        ):
            return str(enum[node.attr].value)
        return None

    out = set()
    for path in ROOT.glob("relay/**/*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
                continue
            if node.func.attr != "close" or len(node.args) != 2:
                continue
            code = enum_value(node.args[0], CloseCode)
            reason_node = node.args[1]
            reason = enum_value(reason_node, CloseReason)
            if reason is None and isinstance(reason_node, ast.Constant):
                reason = str(reason_node.value)
            if code is not None and reason is not None:
                out.add((code, reason))
    return out


def test_every_close_the_relay_sends_is_in_the_close_code_table():
    sent = closes_the_relay_sends()
    assert len(sent) >= 6, sent  # the scan still finds them
    rows = section_rows("Close codes")
    codes = {row[0] for row in rows}
    table = {(row[0], m) for row in rows for m in re.findall(r"`(\w+)`", row[1])}
    documented = table | {(code, "") for code in codes}  # 1000 sends no reason
    missing = sorted(sent - documented)
    assert missing == [], "(code, reason) the close-code table lacks"


def test_every_close_reason_is_in_the_close_code_table():
    table = {m for row in section_rows("Close codes") for m in re.findall(r"`(\w+)`", row[1])}
    assert sorted(r.value for r in CloseReason if r.value not in table) == []
