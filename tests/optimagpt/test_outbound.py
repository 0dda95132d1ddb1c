"""The outbound address check: every notation of a link-local or metadata address is refused, and a connection
goes to the address that was checked, so a name that resolves elsewhere later (DNS rebinding) gains nothing."""

from __future__ import annotations

import asyncio
import socket
from typing import Any

import httpcore
import pytest

from optimagpt.outbound import CheckedNetworkBackend, OutboundRefused, resolve_checked, url_check, url_check_resolved


@pytest.mark.parametrize("url", [
    "http://169.254.169.254/latest/meta-data/", "http://2852039166/", "http://0251.0376.0251.0376/",
    "http://[::ffff:169.254.169.254]/", "http://[fe80::1]/", "http://100.100.100.200/", "http://[fd00:ec2::254]/",
    "http://metadata.google.internal/", "http://METADATA.google.internal./", "http://0.0.0.0/",
])
async def test_link_local_and_metadata_addresses_are_refused_in_any_notation(url: str) -> None:
    with pytest.raises(OutboundRefused):
        await url_check_resolved(url)


@pytest.mark.parametrize("url", ["ftp://127.0.0.1/", "http://user:pw@127.0.0.1/", "http:///nohost", "http://h:99999/"])
def test_urls_that_are_not_plain_http_are_refused(url: str) -> None:
    with pytest.raises(OutboundRefused):
        url_check(url)


async def test_loopback_and_private_networks_stay_allowed() -> None:
    assert await resolve_checked("127.0.0.1", 80) == ["127.0.0.1"]
    await url_check_resolved("http://10.1.2.3:8080/mcp")


class _Recording:
    """The inner backend: records where it was asked to connect (nothing is dialled)."""

    def __init__(self) -> None:
        self.hosts: list[str] = []

    async def connect_tcp(self, host: str, port: int, **kwargs: Any) -> str:
        self.hosts.append(host)
        return f"stream to {host}"

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


async def test_a_name_that_rebinds_to_a_metadata_address_is_refused_when_connecting(monkeypatch) -> None:
    """The resolver answers 127.0.0.1 when the URL is checked and 169.254.169.254 a moment later, as a rebinding
    DNS server would; the resolver is the one part faked here (a real one would leave the machine)."""
    answers = iter(["127.0.0.1", "169.254.169.254"])
    loop = asyncio.get_running_loop()

    async def rebinding(host: str, port: int, **kwargs: Any) -> list[Any]:
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (next(answers), port))]

    monkeypatch.setattr(loop, "getaddrinfo", rebinding)
    await url_check_resolved("http://rebind.example/mcp")  # passes: it resolved to loopback
    inner = _Recording()
    backend = CheckedNetworkBackend(inner, httpcore.ConnectError)
    with pytest.raises(httpcore.ConnectError, match="link-local"):
        await backend.connect_tcp("rebind.example", 80)
    assert inner.hosts == []  # nothing was dialled


async def test_the_connection_goes_to_the_checked_address_not_the_name(monkeypatch) -> None:
    loop = asyncio.get_running_loop()

    async def resolver(host: str, port: int, **kwargs: Any) -> list[Any]:
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("10.9.8.7", port))]

    monkeypatch.setattr(loop, "getaddrinfo", resolver)
    inner = _Recording()
    assert await CheckedNetworkBackend(inner, httpcore.ConnectError).connect_tcp("tools.example", 443) \
        == "stream to 10.9.8.7"
    assert inner.hosts == ["10.9.8.7"]
