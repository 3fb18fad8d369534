"""Operator views over HTTP: /metrics (Prometheus), /status.json and /status.

The status page is one self-contained HTML document (no external assets: it
must work on an isolated network) whose inline script polls /status.json and
draws the last minutes as an inline SVG chart.  Numbers come from the
history that :class:`relay.ops.metrics.RelayMetrics` samples once a second.

Neither view carries user or conversation identifiers: only counts, the
node id and error type names.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from quart import Response, jsonify

from relay import __version__
from relay.ops.metrics import CONTENT_TYPE, RECENT_ERRORS_S

if TYPE_CHECKING:
    from quart_trio import QuartTrio

    from relay.ops.metrics import RelayMetrics


def status(m: RelayMetrics, shutting_down: bool) -> dict[str, Any]:
    history = list(m.history)
    series = [
        {
            "t": round(b.at, 3),
            "mps": round((b.committed - a.committed) / max(b.at - a.at, 1e-6), 2),
            "connections": b.connections,
            "errors": b.errors - a.errors,
        }
        for a, b in itertools.pairwise(history)
    ]
    this = {**m.node_summary(), "self": True}
    conns = m.connections()
    return {
        "node": m.node_id,
        "version": __version__,
        "time": time.time(),
        "uptime_s": this["uptime_s"],
        "shutting_down": shutting_down,
        "connections": {
            "websocket": conns.get("websocket", 0),
            "sse": conns.get("sse", 0),
            "total": sum(conns.values()),
        },
        "messages_per_second": this["messages_per_second"],
        "committed": m.committed(),
        "delivered": m.delivered(),
        "slow_consumer_closes": m.slow_consumer_closes(),
        "errors_recent": m.recent_errors(),
        "errors_window_s": int(RECENT_ERRORS_S),
        "series": series,
        # This node first; peers come from the multi-node hook (empty when alone).
        "nodes": [this, *m.peer_nodes()],
    }


def register(app: QuartTrio, m: RelayMetrics, shutting_down: Callable[[], bool]) -> None:
    @app.get("/metrics")
    async def metrics() -> Any:
        return Response(m.exposition(), content_type=CONTENT_TYPE)

    @app.get("/status.json")
    async def status_json() -> Any:
        response = jsonify(status(m, shutting_down()))
        response.headers["Cache-Control"] = "no-store"
        return response

    @app.get("/status")
    async def status_page() -> Any:
        response = Response(PAGE, content_type="text/html; charset=utf-8")
        response.headers["Cache-Control"] = "no-store"
        # Everything is inline: forbid loading anything from elsewhere.
        response.headers["Content-Security-Policy"] = (
            "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
            "connect-src 'self'"
        )
        return response


PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>mls-relay status</title>
<style>
body{font:14px system-ui,sans-serif;margin:24px;color:#1d2330;background:#f6f7f9}
h1{font-size:20px;margin:0 0 4px} .sub{color:#667;margin-bottom:16px}
.cards{display:flex;gap:12px;flex-wrap:wrap;margin-bottom:16px}
.card{background:#fff;border-radius:8px;padding:12px 16px;min-width:150px;
box-shadow:0 1px 2px #0002}
.card b{display:block;font-size:26px;margin-top:4px}
section{background:#fff;border-radius:8px;padding:12px 16px;margin-bottom:16px;
box-shadow:0 1px 2px #0002}
table{border-collapse:collapse;width:100%} td,th{text-align:left;padding:4px 8px;
border-bottom:1px solid #eee} .bad{color:#b00020} .muted{color:#889}
.legend span{margin-right:16px} .k1{color:#2563eb} .k2{color:#16a34a}
</style></head><body>
<h1>mls-relay status</h1>
<div class="sub">node <span id="node">&ndash;</span> &middot; version
<span id="version">&ndash;</span> &middot; up <span id="uptime">&ndash;</span>
&middot; <span id="state" class="muted">loading&hellip;</span></div>
<div class="cards">
<div class="card">Connections<b id="connections">&ndash;</b>
<span class="muted" id="conn-split"></span></div>
<div class="card">Messages / s<b id="mps">&ndash;</b></div>
<div class="card">Messages stored<b id="committed">&ndash;</b></div>
<div class="card">Slow-consumer closes<b id="slow">&ndash;</b></div>
</div>
<section><h2>Last minutes</h2>
<div class="legend"><span class="k1">&#9644; messages/s</span>
<span class="k2">&#9644; connections</span></div>
<svg id="chart" viewBox="0 0 800 200" width="100%" height="200"
 preserveAspectRatio="none" role="img" aria-label="messages per second and connections">
<rect x="0" y="0" width="800" height="200" fill="#fbfcfe"/></svg>
<div class="muted" id="range"></div></section>
<section><h2>Nodes</h2><table><thead><tr><th>node</th><th>connections</th>
<th>messages/s</th><th>stored</th><th>uptime</th></tr></thead>
<tbody id="nodes"></tbody></table></section>
<section><h2>Recent errors</h2><table><thead><tr><th>type</th><th>count</th></tr></thead>
<tbody id="errors"></tbody></table></section>
<script>
"use strict";
const $ = (id) => document.getElementById(id);
const esc = (s) => String(s).replace(/[&<>"']/g, (c) => "&#" + c.charCodeAt(0) + ";");
const dur = (s) => s < 120 ? s + "s" : s < 7200 ? Math.round(s / 60) + "m"
  : Math.round(s / 3600) + "h";
function line(points, key, max, color) {
  if (points.length < 2) return "";
  const t0 = points[0].t, span = Math.max(points[points.length - 1].t - t0, 1);
  const xy = points.map((p) => ((p.t - t0) / span * 800).toFixed(1) + "," +
    (195 - p[key] / max * 185).toFixed(1)).join(" ");
  return '<polyline class="series-' + key + '" fill="none" stroke="' + color +
    '" stroke-width="2" points="' + xy + '"/>';
}
function draw(s) {
  const pts = s.series;
  const maxM = Math.max(1, ...pts.map((p) => p.mps));
  const maxC = Math.max(1, ...pts.map((p) => p.connections));
  let grid = "";
  for (let i = 1; i < 4; i++) grid += '<line x1="0" x2="800" y1="' + (i * 50) +
    '" y2="' + (i * 50) + '" stroke="#e5e7eb"/>';
  $("chart").innerHTML = '<rect x="0" y="0" width="800" height="200" fill="#fbfcfe"/>' +
    grid + line(pts, "mps", maxM, "#2563eb") + line(pts, "connections", maxC, "#16a34a");
  $("range").textContent = pts.length ? "last " + dur(Math.round(pts[pts.length - 1].t -
    pts[0].t)) + " \\u00b7 peak " + maxM + " msg/s, " + maxC + " connections" : "";
}
function render(s) {
  $("node").textContent = s.node; $("version").textContent = s.version;
  $("uptime").textContent = dur(s.uptime_s);
  $("state").textContent = s.shutting_down ? "draining" : "serving";
  $("state").className = s.shutting_down ? "bad" : "muted";
  $("connections").textContent = s.connections.total;
  $("conn-split").textContent = s.connections.websocket + " ws \\u00b7 " +
    s.connections.sse + " sse";
  $("mps").textContent = s.messages_per_second;
  $("committed").textContent = s.committed;
  $("slow").textContent = s.slow_consumer_closes;
  $("nodes").innerHTML = s.nodes.map((n) => "<tr><td>" + esc(n.node) +
    (n.self ? " (this node)" : "") + "</td><td>" +
    Object.values(n.connections).reduce((a, b) => a + b, 0) + "</td><td>" +
    n.messages_per_second + "</td><td>" + n.committed + "</td><td>" + dur(n.uptime_s) +
    "</td></tr>").join("");
  const errs = Object.entries(s.errors_recent).sort((a, b) => b[1] - a[1]);
  $("errors").innerHTML = errs.length ? errs.map(([k, v]) => '<tr><td class="bad">' +
    esc(k) + "</td><td>" + v + "</td></tr>").join("")
    : '<tr><td class="muted" colspan="2">none in the last ' + dur(s.errors_window_s) +
      "</td></tr>";
  draw(s);
}
async function refresh() {
  try {
    const r = await fetch("/status.json", {cache: "no-store"});
    render(await r.json());
  } catch (e) {
    $("state").textContent = "unreachable"; $("state").className = "bad";
  }
}
refresh();
setInterval(refresh, 2000);
</script></body></html>
"""
