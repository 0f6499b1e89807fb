"""The client's address and scheme: the TCP peer, or what exactly the proxies the operator trusts saw.

``CHATAPP_TRUSTED_PROXY_COUNT`` (``TRUSTED_PROXY_COUNT``) says how many proxies stand in front of
daphne. Each of them appends the address it received the connection from to ``X-Forwarded-For``,
so the entry that many places from the right end is the address the outermost trusted proxy saw:
the client. Everything left of it was written by the client (or proxies we do not know) and is
never read. With the default 0 the header is ignored and the client is the TCP peer.

:class:`TrustedProxyMiddleware` wraps the whole ASGI application (``chatapp/asgi.py``) and
rewrites ``scope["client"]`` (Django's ``REMOTE_ADDR``) and ``scope["scheme"]`` once, for HTTP
and websockets alike, with :func:`client_address`: the one place the client's address is
computed. Daphne must run without ``--proxy-headers``, which would replace the peer with the
client-controlled left end of the header before this runs.

Why not a library: daphne's ``--proxy-headers`` takes the leftmost entry (the client's choice);
uvicorn's and hypercorn's proxy middlewares would bring a second ASGI server into the deployment for
thirty lines, and neither normalises the entries (ports, brackets, IPv4-mapped IPv6) or refuses
a malformed one; Werkzeug's ProxyFix is WSGI only.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from typing import Any

from django.conf import settings

# Headers by which some proxy tells who its client was. Only X-Forwarded-For is read; any of
# them beyond what the trusted proxies explain means an unknown party wrote it.
FORWARDING_META = ("HTTP_X_FORWARDED_FOR", "HTTP_FORWARDED", "HTTP_X_REAL_IP")


def forwarded_entries(values: Iterable[str]) -> list[str]:
    """The X-Forwarded-For entries of every such header, left to right (repeated headers concatenate)."""
    return [entry.strip() for value in values for entry in value.split(",") if entry.strip()]


def normalize_address(value: str) -> str | None:
    """A bare IP address in canonical form (``[v6]:port`` and ``v4:port`` forms accepted; an
    IPv4-mapped IPv6 address becomes the IPv4 address), or None if ``value`` is not one."""
    text = value.strip()
    if text.startswith("["):
        text = text[1:].partition("]")[0]
    elif text.count(":") == 1:
        text = text.partition(":")[0]
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return str(address)


def client_address(*, peer: str | None, forwarded_for: list[str], trusted_hops: int) -> str | None:
    """The client's address: the entry ``trusted_hops`` from the right of ``forwarded_for``, else the
    TCP ``peer``.

    The peer is kept when nothing is trusted, and when the header is shorter than the trusted chain or
    its entry there is not an address: the request did not come through every trusted proxy (or one
    is misconfigured), and then nothing in the header can be believed.
    """
    peer_address = normalize_address(peer) if peer else None
    if trusted_hops <= 0 or len(forwarded_for) < trusted_hops:
        return peer_address
    return normalize_address(forwarded_for[-trusted_hops]) or peer_address


def forwarded_scheme(values: Iterable[str], *, trusted_hops: int, websocket: bool) -> str | None:
    """The scheme the client used, from X-Forwarded-Proto, only when proxies are trusted: the value
    the nearest trusted proxy wrote (the last one). None when it says nothing usable."""
    if trusted_hops <= 0:
        return None
    entries = forwarded_entries(values)
    proto = entries[-1].lower() if entries else ""
    if proto not in ("http", "https"):
        return None
    if websocket:
        return "wss" if proto == "https" else "ws"
    return proto


def forwarded_beyond_trust(meta: Mapping[str, Any]) -> bool:
    """True when a request's forwarding headers say more than the trusted proxies explain: more
    X-Forwarded-For entries than trusted hops, or (with no proxy trusted) any forwarding header. The
    request then passed a proxy (or a client) we do not trust, and its peer proves nothing."""
    hops = settings.TRUSTED_PROXY_COUNT
    if len(forwarded_entries([meta.get("HTTP_X_FORWARDED_FOR", "")])) > max(hops, 0):
        return True
    return hops <= 0 and any(meta.get(name) for name in FORWARDING_META)


def _header_values(scope: Mapping[str, Any], name: bytes) -> list[str]:
    return [value.decode("latin-1") for key, value in scope.get("headers", []) if key.lower() == name]


class TrustedProxyMiddleware:
    """ASGI middleware: ``scope["client"]`` and ``scope["scheme"]`` from the peer and the trusted proxies."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> Any:
        if scope["type"] in ("http", "websocket"):
            scope = dict(scope)
            hops = settings.TRUSTED_PROXY_COUNT
            peer_host, peer_port = scope.get("client") or (None, 0)
            address = client_address(
                peer=str(peer_host) if peer_host else None,
                forwarded_for=forwarded_entries(_header_values(scope, b"x-forwarded-for")),
                trusted_hops=hops,
            )
            if address is not None:
                # A port only belongs to the peer; a forwarded client's is unknown.
                from_peer = address == normalize_address(str(peer_host or ""))
                scope["client"] = (address, int(peer_port or 0) if from_peer else 0)
            scheme = forwarded_scheme(
                _header_values(scope, b"x-forwarded-proto"), trusted_hops=hops, websocket=scope["type"] == "websocket"
            )
            if scheme is not None:
                scope["scheme"] = scheme
        return await self.app(scope, receive, send)
