"""Where the gateway may connect on its own: one check for every outbound URL (remote upstreams, MCP servers).

A URL an admin typed must not make the gateway call the cloud's metadata service
or anything link-local: those hand out credentials to whoever asks from the
machine. The check runs on the addresses a name resolves to, so every notation
(2852039166, 0251.0376.0251.0376, [::ffff:169.254.169.254], a name that points
there) is caught; and the connection is made to the very address that was
checked (`CheckedNetworkBackend`), so a name that resolves elsewhere a moment
later (DNS rebinding) gains nothing. Loopback and private networks stay allowed:
self-hosted services are often on the same machine or LAN.
"""

from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import Iterable
from typing import Any
from urllib.parse import urlsplit

RESOLVE_TIMEOUT_S = 10.0
# Cloud metadata services outside the link-local ranges (those are refused whole), and their names.
METADATA_ADDRESSES = frozenset(ipaddress.ip_address(a) for a in ("100.100.100.200", "fd00:ec2::254"))
METADATA_HOSTNAMES = frozenset(("metadata", "metadata.google.internal", "metadata.goog", "metadata.azure.com",
                                "instance-data", "instance-data.ec2.internal"))
REFUSED = "points to a link-local, metadata or otherwise reserved address, which the gateway does not call"


class OutboundRefused(ValueError):
    """A URL or address the gateway will not connect to; the message says why, without probing anything."""


def address_refused(address: str) -> bool:
    """Whether the gateway refuses to connect to this IP address."""
    ip = ipaddress.ip_address(address.split("%")[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_link_local or ip in METADATA_ADDRESSES or ip.is_multicast or ip.is_unspecified


def url_check(url: str, *, name: str = "the URL") -> None:
    """Refuse what is wrong with `url` before any lookup: not http(s), no host, credentials, a metadata name."""
    parts = urlsplit(url)
    if parts.username is not None or parts.password is not None or "@" in parts.netloc:
        raise OutboundRefused(f"{name} must not hold credentials")
    host = parts.hostname
    if not host or parts.scheme not in ("http", "https"):
        raise OutboundRefused(f"{name} must be an http or https URL with a host")
    try:
        parts.port  # noqa: B018 - raises ValueError for a port out of range
    except ValueError:
        raise OutboundRefused(f"{name} has an invalid port") from None
    if host.rstrip(".").lower() in METADATA_HOSTNAMES:
        raise OutboundRefused(f"{name} {REFUSED}")


async def resolve_checked(host: str, port: int) -> list[str]:
    """The addresses `host` resolves to, all allowed; OutboundRefused if any is not; OSError if none resolve."""
    if host.rstrip(".").lower() in METADATA_HOSTNAMES:
        raise OutboundRefused(f"the host {REFUSED}")
    infos = await asyncio.wait_for(asyncio.get_running_loop().getaddrinfo(host, port, type=0), RESOLVE_TIMEOUT_S)
    addresses = list(dict.fromkeys(str(info[4][0]) for info in infos))
    if any(address_refused(a) for a in addresses):
        raise OutboundRefused(f"the host {REFUSED}")
    if not addresses:
        raise OSError(f"{host} does not resolve")
    return addresses


async def url_check_resolved(url: str, *, name: str = "the URL") -> None:
    """url_check, then the host's addresses; an unknown name passes (it cannot reach anything)."""
    url_check(url, name=name)
    parts = urlsplit(url)
    try:
        await resolve_checked(parts.hostname or "", parts.port or (443 if parts.scheme == "https" else 80))
    except (TimeoutError, OSError):
        return


class CheckedNetworkBackend:
    """An httpcore (or httpcore2) network backend that connects only to checked addresses.

    httpcore asks its backend for a TCP stream to the URL's host; this one resolves
    the host itself, refuses it if any address is refused, and connects the inner
    backend to the address it checked. TLS still verifies the URL's host name:
    httpcore sends that as SNI and checks the certificate against it. Redirects
    and new connections of a pool pass here again.
    """

    def __init__(self, inner: Any, connect_error: type[Exception]) -> None:
        self.inner = inner
        self.connect_error = connect_error  # what the library raises for a failed connection (httpcore.ConnectError)

    async def connect_tcp(self, host: str, port: int, timeout: float | None = None,
                          local_address: str | None = None, socket_options: Iterable[Any] | None = None) -> Any:
        try:
            addresses = await resolve_checked(host, port)
        except OutboundRefused as exc:
            raise self.connect_error(str(exc)) from None
        except (TimeoutError, OSError) as exc:
            raise self.connect_error(f"{host} could not be resolved ({type(exc).__name__})") from None
        error: Exception | None = None
        for address in addresses:
            try:
                return await self.inner.connect_tcp(address, port, timeout=timeout, local_address=local_address,
                                                    socket_options=socket_options)
            except Exception as exc:  # noqa: BLE001 - try the host's next address, as a resolver-using client would
                error = exc
        raise error or self.connect_error(f"{host} does not resolve")

    async def connect_unix_socket(self, path: str, timeout: float | None = None,
                                  socket_options: Iterable[Any] | None = None) -> Any:
        raise self.connect_error("the gateway does not connect to unix sockets here")

    async def sleep(self, seconds: float) -> None:
        await self.inner.sleep(seconds)


def checked_pool(pool_class: Any, backend_class: Any, connect_error: type[Exception], ssl_context: Any,
                 **limits: Any) -> Any:
    """An httpcore (or httpcore2) connection pool over CheckedNetworkBackend, for an httpx transport's `_pool`.

    httpx's transports build their pool without a way to pass a network backend; the
    pool class takes one (httpcore's documented extension point), so callers build the
    transport and put this pool in it.
    """
    return pool_class(ssl_context=ssl_context, network_backend=CheckedNetworkBackend(backend_class(), connect_error),
                      **limits)
