"""docs/PROTOCOL.md describes the relay's whole surface, and nothing else:
its route tables are the HTTP app's routes, and the frame types it names are
the requests the relay parses and the events it sends, both ways.

The WebSocket path (/v1/ws) is served before the app (relay/edge/server.py) and is
documented under "Connecting"; everything else on the port is the Quart app."""

from __future__ import annotations

import re
from pathlib import Path

from protocol import events
from protocol.requests import _PARSERS
from relay.node import Relay
from storage import open_storage

from . import harness

PROTOCOL = Path(__file__).resolve().parents[1] / "docs" / "PROTOCOL.md"
ROUTE_ROW = re.compile(r"^\| `(GET|POST|PUT|DELETE) (/[^`]*)`((?:, `/[^`]*`)*) \|", re.MULTILINE)


def documented_routes() -> set[tuple[str, str]]:
    out = set()
    for method, path, more in ROUTE_ROW.findall(PROTOCOL.read_text()):
        for p in [path, *re.findall(r"`(/[^`]*)`", more)]:
            out.add((method, re.sub(r"<[^>]+>", "<>", p)))
    return out


def app_routes(tmp_path: Path) -> set[tuple[str, str]]:
    url = f"sqlite:///{tmp_path}/r.db"
    app = Relay(harness.test_config(url), open_storage(url)).http_app()
    out = set()
    for rule in app.url_map.iter_rules():
        if rule.endpoint == "static":
            continue
        for method in rule.methods or ():
            if method not in ("HEAD", "OPTIONS"):
                out.add((method, re.sub(r"<[^>]+>", "<>", rule.rule)))
    return out


def test_the_route_tables_are_the_apps_routes(tmp_path):
    documented, served = documented_routes(), app_routes(tmp_path)
    assert len(documented) >= 10, documented
    assert sorted(served - documented) == [], "routes PROTOCOL.md does not document"
    assert sorted(documented - served) == [], "documented routes the relay does not serve"


def frame_types_in_doc() -> set[str]:
    text = PROTOCOL.read_text()
    return set(re.findall(r"`(#[a-zA-Z]+)", text)) | set(re.findall(r'"t": "(#[a-zA-Z]+)"', text))


def test_every_request_and_event_is_documented_and_nothing_else():
    requests = set(_PARSERS)
    sent = set(re.findall(r'"(#[a-zA-Z]+)"', Path(events.__file__).read_text()))
    assert {"#send", "#subscribe"} <= requests and {"#message", "#hello"} <= sent
    documented = frame_types_in_doc()
    assert sorted(requests - documented) == [], "requests PROTOCOL.md does not name"
    assert sorted(sent - documented) == [], "events PROTOCOL.md does not name"
    assert sorted(documented - requests - sent) == [], "frame types the relay does not know"
