"""Parsers of the list-valued settings: trusted proxies and push providers.

Here, beside the settings, so that :func:`relay.base.config.validate` refuses a
bad value at start-up with the same rules the edge (relay/edge/gate.py) and
the pusher (relay/offline/push.py) apply, without importing either.
"""

from __future__ import annotations

import ipaddress
import re
from urllib.parse import urlsplit

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

#: A push provider's name (it is named in registrations and metrics).
_NAME = re.compile(r"[A-Za-z0-9_.\-]+")


def parse_networks(text: str) -> list[Network]:
    """``"10.0.0.0/8, ::1"`` -> networks; ValueError naming a bad entry."""
    out: list[Network] = []
    for item in (part.strip() for part in text.split(",")):
        if item:
            try:
                out.append(ipaddress.ip_network(item, strict=False))
            except ValueError:
                raise ValueError(f"{item!r} is not an IP address or network") from None
    return out


def parse_providers(text: str) -> dict[str, str]:
    """``"name=https://h/p,other=http://..."`` -> ``{name: url}``; ValueError if malformed."""
    import httpx  # here: reading the settings need not load the HTTP client

    providers: dict[str, str] = {}
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        name, sep, url = (s.strip() for s in item.partition("="))
        if not sep or not _NAME.fullmatch(name):
            raise ValueError(f"push provider {item!r}: expected name=URL")
        # Refused here what would fail every push later: control characters
        # (httpx.InvalidURL at each request), a port out of range.
        usable = url.isprintable()
        try:
            parts = urlsplit(url)
            _ = parts.port  # ValueError when out of range
            httpx.URL(url)
        except (ValueError, httpx.InvalidURL):
            usable = False
        if not usable or parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"push provider {name!r}: URL must be http(s)://host/...")
        if name in providers:
            raise ValueError(f"push provider {name!r} is configured twice")
        providers[name] = url
    return providers
