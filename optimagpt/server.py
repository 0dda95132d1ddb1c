"""Run the gateway under daphne: `python -m optimagpt.server -b 127.0.0.1 -p 8000` (daphne's own flags).

Daphne alone would be `python -m daphne ... optimagpt.asgi:application`. This wrapper adds HTTPS beside
HTTP on OPTIMAGPT_HTTPS_PORT (certificates/serving.py; `--https-port`, and `--tls-cert`/`--tls-key` for
certificate files the deployment manages) and one more thing: once daphne has stopped, the process ends with
os._exit instead of a normal interpreter shutdown. On CPython 3.11 that
shutdown can segfault while garbage-collecting a channel layer's pending
asyncio.Queue.get (python/cpython#113566), turning a clean SIGTERM into exit
code 139. Everything worth finishing (requests, links, database writes) has
finished by the time daphne returns.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
from typing import Any

from optimagpt.env import env_bool

APPLICATION = "optimagpt.asgi:application"


def _media_type(line: bytes) -> bytes:
    """The media type of a Content-Type header, lower case; text/plain when it has none.

    Twisted parses every POST's Content-Type with the email package, a costly step
    (bench/README.md, "Measurements behind the code"), only to learn whether to parse
    a form body, which daphne never asks it for. This returns the same answer
    for every well-formed header.
    """
    media = line.split(b";", 1)[0].strip().lower()
    return media if media.count(b"/") == 1 and not media.startswith(b"/") else b"text/plain"


def _speed_up_twisted() -> None:
    from twisted.internet import tcp
    from twisted.web import http

    if hasattr(http, "_parseContentType"):
        http._parseContentType = _media_type

    # Twisted leaves Nagle's algorithm on: a stream's small writes then wait for the
    # client's delayed ACK, and streamed replies arrive late. uvicorn and asyncio servers
    # turn it off too (bench/README.md, "Measurements behind the code").
    accept = tcp.Server.__init__

    def accept_without_nagle(self: tcp.Server, *args: Any, **kwargs: Any) -> None:
        accept(self, *args, **kwargs)
        self.setTcpNoDelay(True)

    tcp.Server.__init__ = accept_without_nagle  # type: ignore[method-assign] # a patch of Twisted's class

    # Twisted listens with a backlog of 50 connections waiting to be accepted. A burst of a few hundred
    # clients overflowed it (the kernel's ListenOverflows counter): their handshakes were retried after
    # 1, 3, 7 s, and one whose retries ran out got a reset. 1024 (capped by net.core.somaxconn) absorbs
    # such a burst; a larger backlog= in a -e endpoint string still wins.
    listen = tcp.Port.__init__
    backlog = int(os.environ.get("OPTIMAGPT_LISTEN_BACKLOG") or 1024)

    def listen_with_backlog(self: tcp.Port, port: int, factory: Any, backlog_asked: int = 50,
                            interface: str = "", reactor: Any = None) -> None:
        listen(self, port, factory, max(backlog_asked, backlog), interface, reactor)

    tcp.Port.__init__ = listen_with_backlog  # type: ignore[method-assign,assignment] # a patch of Twisted's class

    _write_at_once(tcp.Server)
    _time_out_slow_requests(http)
    _skip_work_nobody_reads(http)


def _write_at_once(connection: Any) -> None:
    """A write to a connection with nothing waiting to go out is sent at once, as asyncio's transports do.

    Twisted only buffers a write and asks the event loop to say when the socket can take it: an epoll_ctl to
    start watching, a turn of the loop, the send, an epoll_ctl to stop. Every answer and every frame to a node
    paid that; the socket of an idle connection takes a small write whole. What it does not take, and any
    write behind data still waiting, goes Twisted's way (in order, with its flow control and its errors).
    """
    from twisted.internet import abstract

    buffered_write = abstract.FileDescriptor.write
    tls_write, tls_write_sequence = connection.write, connection.writeSequence

    def write(self: Any, data: bytes) -> None:
        if self.TLS:  # started on this connection (startTLS): through its TLS layer, as before
            return tls_write(self, data)
        if (type(data) is bytes and data and self.connected and not self.disconnecting
                and not self._writeDisconnected and not self._tempDataBuffer
                and self.offset == len(self.dataBuffer)):
            try:
                sent = self.socket.send(data)
            except OSError:  # would block, or an error that Twisted's own write path will meet and report
                sent = 0
            if sent == len(data):
                return
            data = data[sent:]
        buffered_write(self, data)

    def write_sequence(self: Any, iovec: Any) -> None:
        if self.TLS:
            return tls_write_sequence(self, iovec)
        write(self, b"".join(iovec))

    connection.write = write
    connection.writeSequence = write_sequence


def _plain_type(obj: Any) -> str:
    return f"<{getattr(obj, '__qualname__', type(obj).__qualname__)}>"


def _plain_value(val: Any, color: str = "", bold: bool = True) -> str:
    return f"{val}"


def _skip_work_nobody_reads(http: Any) -> None:
    """Per request, the libraries under daphne did work whose result nobody reads (bench/README.md,
    "Measurements behind the code", each timed alone):

    - Twisted formatted a combined-log line for every request into Twisted's log, which daphne sends nowhere
      (below verbosity 2) or beside its own access log, the one the gateway keeps (OPTIMAGPT_ACCESS_LOG).
    - daphne reaches twisted.web.http through Twisted's deprecation proxy, which looks every attribute up
      for warnings, several times a request: it gets the module's names directly.
    - autobahn colours (click.style) and inspects the arguments of a debug line for every frame it sends
      and every read on a link, whether or not debug logging is on: the same words, plain, should anyone
      turn autobahn's debug log on.
    """
    import types

    import autobahn.twisted.websocket
    import autobahn.websocket.protocol
    import daphne.http_protocol

    daphne.http_protocol.HTTPFactory.log = lambda self, request: None
    daphne.http_protocol.http = types.SimpleNamespace(**vars(http))
    for module in (autobahn.websocket.protocol, autobahn.twisted.websocket):
        module.hltype, module.hlval = _plain_type, _plain_value  # type: ignore[attr-defined]


def _time_out_slow_requests(http: Any) -> None:
    """A request whose head and body have not all arrived OPTIMAGPT_BODY_TIMEOUT_S after its first line gets
    408 and its connection closed.

    Twisted's idle timeout restarts with every byte, so a client sending one a second held a connection and
    its buffer for as long as it liked; daphne sees a request only once its body is whole, so the clock
    must run here. WebSocket handshakes have no body and pass as soon as their headers are in.
    """
    from django.conf import settings
    from twisted.internet import reactor as installed_reactor

    reactor: Any = installed_reactor  # the asyncio reactor; Twisted types the module attribute as an interface

    timeout_s = settings.OPTIMAGPT_BODY_TIMEOUT_S
    from optimagpt.errors import error_body

    body = json.dumps(error_body(f"The request did not arrive within {timeout_s:g} s.",
                                 code="request_timeout")).encode()
    answer = (b"HTTP/1.1 408 Request Timeout\r\nContent-Type: application/json\r\nConnection: close\r\n"
              b"Content-Length: %d\r\n\r\n" % len(body)) + body
    line_received = http.HTTPChannel.lineReceived
    all_content_received = http.HTTPChannel.allContentReceived
    connection_lost = http.HTTPChannel.connectionLost

    def too_slow(channel: Any) -> None:
        channel._optimagpt_timer = None
        if channel.transport is not None:
            channel.transport.write(answer)
            channel.transport.loseConnection()

    def stop_clock(channel: Any) -> None:
        timer = getattr(channel, "_optimagpt_timer", None)
        if timer is not None and timer.active():
            timer.cancel()
        channel._optimagpt_timer = None

    def on_line(self: Any, line: bytes) -> Any:
        if getattr(self, "_optimagpt_timer", None) is None:
            self._optimagpt_timer = reactor.callLater(timeout_s, too_slow, self)
        return line_received(self, line)

    def on_all_content(self: Any) -> Any:
        stop_clock(self)
        return all_content_received(self)

    def on_lost(self: Any, reason: Any) -> Any:
        stop_clock(self)
        return connection_lost(self, reason)

    http.HTTPChannel.lineReceived = on_line
    http.HTTPChannel.allContentReceived = on_all_content
    http.HTTPChannel.connectionLost = on_lost


def _start_background_work(cli: Any) -> None:
    """Once daphne's reactor runs: dial the nodes that listen, publish this process's request counts (and,
    with Redis, its in-flight counts per executor for the other processes' routers, and listen for key and
    user changes made in the others), check the MCP servers, prune old node history; on shutdown, hang up,
    give the leases back and stop those loops."""
    import asyncio

    import daphne.server  # noqa: F401 - installs the asyncio reactor, which must come before any other import of it
    from twisted.internet import reactor as installed_reactor

    reactor: Any = installed_reactor  # the asyncio reactor; Twisted types the module attribute as an interface
    from twisted.internet.defer import Deferred

    def start() -> None:
        from django.conf import settings

        from certificates.serving import side
        from gateway.invalidation import invalidation_listen_forever
        from gateway.routing.shared import share_forever
        from gateway.stats import publish_forever
        from mcp_servers.services import mcp_check_forever
        from nodes.housekeeping import prune_forever
        from nodes.outbound import OWNER, dialer_start
        from operations.diagnostics import gateway_logs_forever
        from operations.requestlog import request_log_forever
        from operations.tasks import request_log_prune
        from operations.tracing import tracing_forever
        from responses_api.background import background_stop_all
        from responses_api.services import responses_written
        from responses_api.tasks import responses_prune

        side.attach(cli.server.http_factory, asyncio.get_event_loop())  # HTTPS, if there is a certificate
        dialer = dialer_start()
        stopping = asyncio.Event()
        loops = [asyncio.ensure_future(publish_forever(owner=OWNER, stop=stopping)),
                 asyncio.ensure_future(share_forever(owner=OWNER, stop=stopping)),
                 asyncio.ensure_future(invalidation_listen_forever(stopping)),
                 asyncio.ensure_future(mcp_check_forever(stopping)),
                 asyncio.ensure_future(request_log_forever(stopping)),
                 asyncio.ensure_future(tracing_forever(stopping)),
                 asyncio.ensure_future(gateway_logs_forever(stopping)),
                 asyncio.ensure_future(side.watch_forever(stopping))]
        # With a Celery worker, its beat runs the pruning (CELERY_BEAT_SCHEDULE); without one, this process does.
        if not settings.CELERY_WORKER:
            loops.append(asyncio.ensure_future(prune_forever(stopping, [responses_prune, request_log_prune])))

        async def stop_all() -> None:
            stopping.set()
            await background_stop_all()  # each is stored as failed: nobody is left to finish it
            await responses_written()
            await dialer.stop()
            await asyncio.gather(*loops)

        def stop() -> Deferred:
            return Deferred.fromFuture(asyncio.ensure_future(asyncio.wait_for(stop_all(), 10)))

        reactor.addSystemEventTrigger("before", "shutdown", stop)

    reactor.callWhenRunning(lambda: asyncio.get_event_loop().call_soon(start))
    reactor.callWhenRunning(_calm_the_garbage_collector)


def _calm_the_garbage_collector() -> None:
    """Move what start-up made (Django, the URL map, the models) out of the collector's sight, and collect
    the young generation less often: each request makes a few thousand short-lived objects, and full
    collections over the long-lived ones were the gateway's longest pauses under load (p99)."""
    import gc

    gc.collect()
    gc.freeze()
    gc.set_threshold(20_000, 50, 100)


def _forget_links_of_a_previous_run() -> None:
    """With the in-memory channel layer this process is the only gateway, so every link a node row still
    claims belonged to a run that has ended. Requests routed to those dead channels would wait for
    their timeouts; the nodes dial again within seconds. (With Redis, other processes' links are alive:
    rows of a crashed process go stale with their heartbeats.)"""
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "optimagpt.settings")
    import django

    django.setup()
    from django.conf import settings
    from django.db import DatabaseError

    if settings.CHANNEL_LAYERS["default"]["BACKEND"] != "channels.layers.InMemoryChannelLayer":
        return
    from nodes.services import nodes_unlink_all

    try:
        nodes_unlink_all(reason="the gateway restarted")
    except DatabaseError as exc:  # not migrated yet: there is nothing to forget
        logging.getLogger("optimagpt.server").debug("no node links to forget: %s", exc)


def _fail_responses_of_a_previous_run() -> None:
    """Background responses that a stopped gateway process was making are failed, never left in progress:
    with the in-memory layer (this is the only process) all of them, with Redis those gone stale."""
    from django.conf import settings
    from django.db import DatabaseError

    from responses_api.services import responses_fail_stopped

    try:
        responses_fail_stopped(
            every=settings.CHANNEL_LAYERS["default"]["BACKEND"] == "channels.layers.InMemoryChannelLayer")
    except DatabaseError as exc:  # not migrated yet: there is nothing to fail
        logging.getLogger("optimagpt.server").debug("no responses to fail: %s", exc)


def _apply_stored_settings() -> None:
    """The Configuration page's values over the environment's; System Tracing off, as after every restart."""
    from django.db import DatabaseError

    from operations.config import settings_apply, tracing_off_at_start

    try:
        tracing_off_at_start()
        settings_apply()
    except DatabaseError as exc:  # not migrated yet: nothing is stored
        logging.getLogger("optimagpt.server").debug("no stored settings: %s", exc)


HTTPS_FLAGS = {"--tls-cert": "OPTIMAGPT_TLS_CERT_FILE", "--tls-key": "OPTIMAGPT_TLS_KEY_FILE",
               "--https-port": "OPTIMAGPT_HTTPS_PORT"}


def _take_https_flags(argv: list[str]) -> list[str]:
    """Our HTTPS flags become the settings they stand for (before Django reads them); daphne gets the rest."""
    rest: list[str] = []
    args = iter(argv)
    for arg in args:
        flag, equals, value = arg.partition("=")
        if flag in HTTPS_FLAGS:
            os.environ[HTTPS_FLAGS[flag]] = value if equals else next(args, "")
        else:
            rest.append(arg)
    return rest


def _bind_address(argv: list[str]) -> str:
    """The address daphne binds HTTP to (-b/--bind; its default 127.0.0.1): HTTPS binds the same."""
    for i, arg in enumerate(argv):
        if arg in ("-b", "--bind") and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--bind="):
            return arg.partition("=")[2]
    return "127.0.0.1"


def _prepare_https(argv: list[str]) -> None:
    """What HTTPS serves from the start: the deployment's files, else the certificate stored from the page."""
    from pathlib import Path

    from django.conf import settings
    from django.db import DatabaseError

    from certificates.serving import side
    from certificates.store import stored_bundle

    cert, key = settings.OPTIMAGPT_TLS_CERT_FILE, settings.OPTIMAGPT_TLS_KEY_FILE
    side.configure(interface=_bind_address(argv), port=settings.OPTIMAGPT_HTTPS_PORT,
                   files=(Path(cert), Path(key)) if cert else None)
    stored = None
    if not cert:
        try:
            stored = stored_bundle()
        except DatabaseError as exc:  # not migrated yet: nothing is stored
            logging.getLogger("optimagpt.server").debug("no stored certificate: %s", exc)
    side.load_at_start(stored)


def _use_uvloop() -> None:
    """uvloop under daphne's Twisted, unless OPTIMAGPT_UVLOOP is false: +10% requests/s in one gateway process
    (bench/README.md, routing.py). daphne makes its loop when daphne.server is first imported: this comes first."""
    if not env_bool("OPTIMAGPT_UVLOOP", True):
        return
    try:
        import uvloop
    except ImportError:  # not on this platform (Windows): the standard loop
        return
    assert "daphne.server" not in sys.modules, "daphne has made its event loop already"
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


def main(argv: list[str]) -> None:
    _use_uvloop()
    from daphne.cli import CommandLineInterface

    argv = _take_https_flags(argv)
    _forget_links_of_a_previous_run()  # sets Django up, whose settings the patches below read
    _apply_stored_settings()
    _fail_responses_of_a_previous_run()
    _prepare_https(argv)
    _speed_up_twisted()
    cli = CommandLineInterface()
    _start_background_work(cli)
    # No access log unless asked for (OPTIMAGPT_ACCESS_LOG: a path, or - for stdout):
    # a line per request is work on the hot path that the request log does not need.
    access_log = os.environ.get("OPTIMAGPT_ACCESS_LOG")
    defaults = ["--access-log", access_log] if access_log else ["--verbosity", "0"]
    code = 0
    try:
        cli.run([*defaults, *argv, APPLICATION])
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException:
        logging.getLogger("optimagpt.server").exception("daphne failed")
        code = 1
    try:
        from gateway.usage import usage_flush_sync

        usage_flush_sync()
    except Exception:
        logging.getLogger("optimagpt.server").exception("could not write the last usage")
    try:
        from operations.requestlog import request_log_write_sync

        request_log_write_sync()
    except Exception:
        logging.getLogger("optimagpt.server").exception("could not write the last request log entries")
    try:
        from responses_api.services import responses_write_sync

        responses_write_sync()
    except Exception:
        logging.getLogger("optimagpt.server").exception("could not write the last stored responses")
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    main(sys.argv[1:])
