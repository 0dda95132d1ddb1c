import socket
from types import SimpleNamespace

import pytest
from twisted.internet import tcp
from twisted.internet.protocol import Protocol
from twisted.internet.testing import MemoryReactor
from twisted.web.http import _parseContentType

from optimagpt.server import _media_type, _skip_work_nobody_reads, _write_at_once


@pytest.mark.parametrize("header", [
    b"application/json", b"Application/JSON; charset=utf-8", b"multipart/form-data; boundary=x",
    b"application/x-www-form-urlencoded", b" application/x-www-form-urlencoded ", b"garbage", b"", b"text/",
    b"a/b/c", b"text/plain;charset=latin-1",
])
def test_the_fast_media_type_parser_agrees_with_twisteds(header: bytes) -> None:
    assert _media_type(header) == _parseContentType(header)


def _connection() -> tuple[object, socket.socket, MemoryReactor]:
    """A real Twisted TCP server connection, with _write_at_once, on one end of a socket pair; Twisted's own
    memory reactor stands in for the event loop, so the test sees what waits for a turn of it."""
    class Server(tcp.Server):
        pass

    _write_at_once(Server)
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    theirs.settimeout(5)
    reactor = MemoryReactor()
    connection = Server(ours, Protocol(), ("127.0.0.1", 1), SimpleNamespace(_realPortNumber=8000), 1, reactor)
    return connection, theirs, reactor


def _received(peer: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        data += peer.recv(size - len(data))
    return data


def test_a_write_to_an_idle_connection_goes_out_at_once() -> None:
    connection, peer, reactor = _connection()
    connection.write(b"HTTP/1.1 200 OK\r\n\r\n")
    assert _received(peer, 19) == b"HTTP/1.1 200 OK\r\n\r\n"
    connection.writeSequence([b"one ", b"two"])
    assert _received(peer, 7) == b"one two"
    assert connection not in reactor.getWriters()  # no turn of the loop was asked for


def test_what_the_socket_cannot_take_waits_for_the_loop_and_later_writes_keep_their_order() -> None:
    connection, peer, reactor = _connection()
    big = bytes(range(256)) * 40_000  # 10 MB: more than a socket's buffers hold
    connection.write(big)
    assert connection in reactor.getWriters()  # the rest waits until the socket can take it
    connection.write(b"tail")  # behind the rest, never before it
    received = bytearray()
    while len(received) < len(big) + 4:
        connection.doWrite()  # what the event loop calls once the socket takes more
        received += peer.recv(1 << 20)
    assert bytes(received) == big + b"tail"
    assert connection not in reactor.getWriters()


def test_twisteds_second_access_log_line_is_no_longer_made() -> None:
    """daphne keeps the access log (--access-log); Twisted's own line per request went to a log nobody reads."""
    import io

    from daphne.http_protocol import HTTPFactory
    from twisted.web import http
    from twisted.web.test.requesthelper import DummyChannel

    factory = HTTPFactory(server=None)
    factory._logFile = log = io.StringIO()
    request = http.Request(DummyChannel())
    request.method, request.uri, request.clientproto, request.code = b"GET", b"/healthz", b"HTTP/1.1", 200
    http.HTTPFactory.log(factory, request)
    assert "/healthz" in log.getvalue()  # what Twisted itself does, so the check below can fail
    log.truncate(0)
    _skip_work_nobody_reads(http)
    factory.log(request)
    assert log.getvalue() == ""


def test_daphne_reads_twisted_web_http_without_the_deprecation_proxy() -> None:
    import daphne.http_protocol
    from twisted.web import http

    _skip_work_nobody_reads(http)
    assert type(http).__name__ == "_ModuleProxy"
    assert type(daphne.http_protocol.http) is SimpleNamespace
    assert daphne.http_protocol.http.Request is http.Request
    assert daphne.http_protocol.http.HTTPFactory is http.HTTPFactory


def test_autobahns_debug_line_arguments_are_plain_words() -> None:
    import autobahn.twisted.websocket
    import autobahn.websocket.protocol
    from autobahn.websocket.protocol import WebSocketProtocol
    from twisted.web import http

    _skip_work_nobody_reads(http)
    for module in (autobahn.websocket.protocol, autobahn.twisted.websocket):
        assert module.hltype(WebSocketProtocol.sendData) == "<WebSocketProtocol.sendData>"
        assert module.hlval("tcp4:127.0.0.1:5555") == "tcp4:127.0.0.1:5555"
        assert module.hlval(42, color="blue", bold=False) == "42"
