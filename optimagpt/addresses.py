"""Who is on the other end of a request: the client's address, through trusted reverse proxies only.

`REMOTE_ADDR` is the peer of the TCP connection. Behind a reverse proxy that is the proxy, so every
client would share one address (one throttle, one lockout); `X-Forwarded-For` names the client, but
anyone can send that header. It is believed only from the proxies in OPTIMAGPT_TRUSTED_PROXIES, and
only as far back as the chain of trusted proxies goes.
"""

from __future__ import annotations

import ipaddress
from functools import lru_cache

from django.conf import settings
from django.http import HttpRequest

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@lru_cache(maxsize=1)
def _trusted(proxies: tuple[str, ...]) -> tuple[Network, ...]:
    return tuple(ipaddress.ip_network(p, strict=False) for p in proxies)


def _is_trusted(address: str) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in network for network in _trusted(tuple(settings.OPTIMAGPT_TRUSTED_PROXIES)))


def client_address(request: HttpRequest) -> str:
    """The client's IP address: REMOTE_ADDR, or from a trusted proxy the last untrusted X-Forwarded-For hop."""
    address = str(request.META.get("REMOTE_ADDR") or "?")
    if not _is_trusted(address):
        return address
    hops = [h.strip() for h in str(request.META.get("HTTP_X_FORWARDED_FOR", "")).split(",") if h.strip()]
    for hop in reversed(hops):  # the proxies append: the rightmost hops are the ones we can trust
        address = hop
        if not _is_trusted(hop):
            break
    return address


def address_block(address: str) -> str:
    """The unit a client controls: one IPv4 address, or an IPv6 /64 (anyone holding one has all of it)."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address[:64]
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.ip_network(f"{ip}/64", strict=False))
    return str(ip)
