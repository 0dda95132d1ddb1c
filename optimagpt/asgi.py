"""ASGI entry point: HTTP through Django, the node link through Channels.

`get_asgi_application()` runs before the consumers are imported, so the app
registry is ready when they load their models.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import os
from typing import Any
from urllib.parse import urlsplit

from django.core.asgi import get_asgi_application
from django.core.exceptions import DisallowedHost, ImproperlyConfigured, RequestAborted
from django.core.handlers.asgi import ASGIHandler, get_script_prefix
from django.core.handlers.exception import convert_exception_to_response
from django.http import HttpResponse, HttpResponseNotAllowed
from django.http.response import HttpResponseBase
from django.urls import ResolverMatch, get_resolver, set_script_prefix

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "optimagpt.settings")
django_asgi_app = get_asgi_application()

from gateway.checks import check_secret_key  # noqa: E402
from operations.record import request_finished, request_open  # noqa: E402
from optimagpt.addresses import client_address  # noqa: E402
from optimagpt.api import direct_view  # noqa: E402
from optimagpt.errors import error_body  # noqa: E402

for _error in check_secret_key(None):
    raise ImproperlyConfigured(f"{_error.msg} {_error.hint}")

CLIENT_CLOSED = 499  # the request log's status for a client that left before its answer was sent (as nginx's)

# Paths served by the lean handler: the OpenAI API and OptimaGPT's own, both authenticated by key or JWT.
API_PREFIXES = ("/v1/", "/optima/v1/")


class ApiHandler(ASGIHandler):
    """Django for the OpenAI API paths, without the parts that cost thread hops.

    settings.MIDDLEWARE costs a thread hop per sync-style middleware in an async
    request, and the request_started signal and response.close() a hop each
    (bench/README.md, "Measurements behind the code"). The API needs none of the middleware: it authenticates
    by key (no session, so no CSRF), sets no cookies and answers JSON. Nor does it send the request signals
    (3% of a 1-token request's CPU even inline): their receivers only tidy database connections, and this
    event-loop thread holds none: the API's queries run through channels' database_sync_to_async, which tidies
    connections in the thread that owns them. The inference endpoints skip django-ninja too (optimagpt/api.py).
    """

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        # No ThreadSensitiveContext: it starts a fresh thread for each request's
        # first sync call; the few the API makes share one thread.
        await self.handle(scope, receive, send)

    def resolve_request(self, request: Any) -> ResolverMatch:
        """The view for the path, remembered: resolving walks every URL pattern (7% of a request's CPU)."""
        match = _resolved(settings.ROOT_URLCONF, request.path_info)
        request.resolver_match = match
        return match

    def load_middleware(self, is_async: bool = False) -> None:
        self._view_middleware: list[Any] = []
        self._template_response_middleware: list[Any] = []
        self._exception_middleware: list[Any] = []
        # BaseHandler's own private handlers, which django-stubs does not declare.
        chain = self._get_response_async if is_async else self._get_response  # type: ignore[attr-defined]
        self._middleware_chain = convert_exception_to_response(chain)

    async def handle(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        """ASGIHandler.handle (Django 5.2) without the request signals, the view in this task."""
        try:
            body_file = await self.read_body(receive)
        except RequestAborted:
            return
        set_script_prefix(get_script_prefix(scope))
        request, error_response = self.create_request(scope, body_file)
        if request is not None:
            try:
                request.get_host()  # ALLOWED_HOSTS, which CommonMiddleware checks on the pages
            except DisallowedHost:
                request, error_response = None, _json_error(400, "The Host header is not one this gateway serves.",
                                                            "invalid_host")
        if request is None:
            assert error_response is not None, "create_request gives a request or an error response"
            body_file.close()
            await self.send_response(error_response, send)
            error_response.close()
            return

        record = request_open(method=request.method or "", path=request.path, client=client_address(request))

        direct = direct_view(request.method or "", request.path_info)

        async def process_request() -> Any:
            response = await (direct(request) if direct is not None else self.run_get_response(request))
            if isinstance(response, HttpResponseNotAllowed):  # django-ninja's is plain text
                allowed = response["Allow"]
                response = _json_error(405, f"{request.method} is not allowed on {request.path}; it takes {allowed}.",
                                       "method_not_allowed")
                response["Allow"] = allowed
            attempt = record.attempt
            if attempt is not None and attempt.node_name and settings.OPTIMAGPT_PROVENANCE_HEADERS:
                response["x-optimagpt-node"] = attempt.node_name  # which node and weights answered
                if attempt.sha256:
                    response["x-optimagpt-model-sha256"] = attempt.sha256
            try:
                await self.send_response(response, send)
            except asyncio.CancelledError:
                pass  # client disconnected while we were sending
            return response

        # As in Django: a client that disconnects cancels the view, so a streamed generation stops on the node
        # too. The view runs in this task and a watcher task cancels it (Django runs both in tasks of their own and
        # waits for the first: one task and an asyncio.wait more per request).
        handler = asyncio.current_task()
        assert handler is not None, "an ASGI application runs in a task"
        left = False

        async def watch() -> None:
            nonlocal left
            try:
                await self.listen_for_disconnect(receive)
            except RequestAborted:
                left = True
                handler.cancel()

        watcher = asyncio.create_task(watch())
        try:
            response = await process_request()
        except asyncio.CancelledError:
            if not left:  # cancelled from outside: the server is stopping
                raise
            handler.uncancel()
            status = CLIENT_CLOSED
        else:
            if left and handler.cancelling():  # it came as the answer was being sent, which went on without it
                handler.uncancel()
            _close(response)
            status = response.status_code
        finally:
            watcher.cancel()
        body_file.close()
        request_finished(record, status)


from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402
from channels.security.websocket import WebsocketDenier  # noqa: E402
from django.conf import settings  # noqa: E402
from django.http.request import split_domain_port, validate_host  # noqa: E402

from nodes.routing import websocket_urlpatterns  # noqa: E402


class SplitByPath:
    """OpenAI API paths to the lean handler, everything else (admin, pages) to full Django."""

    def __init__(self, api: Any, site: Any) -> None:
        self.api = api
        self.site = site

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        app = self.api if scope["path"].startswith(API_PREFIXES) else self.site
        await app(scope, receive, send)


@functools.lru_cache(maxsize=512)
def _resolved(urlconf: str, path: str) -> ResolverMatch:
    """A path's resolution, kept (only a path that resolves: Resolver404 is raised, not kept). Paths with an id
    in them (a stored response's) each take an entry; the least recently used go past 512."""
    return get_resolver(urlconf).resolve(path)


def _close(response: HttpResponseBase) -> None:
    """HttpResponseBase.close (Django 5.2) without the request_finished signal (see ApiHandler)."""
    for closer in response._resource_closers:  # type: ignore[attr-defined]
        with contextlib.suppress(Exception):
            closer()
    response._resource_closers.clear()  # type: ignore[attr-defined]
    response.closed = True


def _json_error(status: int, message: str, code: str) -> HttpResponse:
    return HttpResponse(json.dumps(error_body(message, code=code)), status=status, content_type="application/json")


class BodySizeLimit:
    """Refuse request bodies over OPTIMAGPT_MAX_BODY_BYTES with 413 before reading them into memory.

    (A body that trickles in is timed out below ASGI, in optimagpt/server.py: daphne hands a request on
    only once its body is whole.)
    """

    def __init__(self, app: Any, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        for name, value in scope.get("headers", ()):
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    declared = -1
                if declared < 0 or declared > self.limit:
                    return await self._refuse(send, 413, f"The request body is larger than {self.limit} bytes.",
                                              "request_too_large")
        received = 0
        refused = False

        async def counted_receive() -> dict[str, Any]:
            nonlocal received, refused
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    # A chunked body that grew past the limit: end it as a client disconnect.
                    refused = True
                    return {"type": "http.disconnect"}
            return message

        await self.app(scope, counted_receive, send)
        if refused:
            await self._refuse(send, 413, f"The request body is larger than {self.limit} bytes.", "request_too_large")

    async def _refuse(self, send: Any, status: int, message: str, code: str) -> None:
        body = json.dumps(error_body(message, code=code)).encode()
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(body)).encode()), (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})


class SameOriginWebSocket:
    """WebSocket handshakes only from this gateway's own origin.

    Browsers send cookies with any page's WebSocket, so the console socket (session auth) must know who
    opened it. Channels' AllowedHostsOriginValidator compares the Origin's host name alone, so a page on
    another port of an allowed host (another app on the same machine) passed. Here the Origin's host
    and port must equal the Host header's (itself one of ALLOWED_HOSTS), or the Origin be listed in
    CSRF_TRUSTED_ORIGINS. Node agents send their gateway URL's origin, which is the same.
    """

    DEFAULT_PORTS = {"http": 80, "https": 443, "ws": 80, "wss": 443}

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> Any:
        if scope["type"] == "websocket" and not self.allowed(dict(scope.get("headers", ()))):
            return await WebsocketDenier()(scope, receive, send)
        return await self.app(scope, receive, send)

    @classmethod
    def _host_port(cls, netloc: str, scheme: str) -> tuple[str, int | None]:
        domain, port = split_domain_port(netloc)
        return domain, int(port) if port else cls.DEFAULT_PORTS.get(scheme)

    @classmethod
    def allowed(cls, headers: dict[bytes, bytes]) -> bool:
        origin = headers.get(b"origin", b"").decode("latin-1").strip()
        host = headers.get(b"host", b"").decode("latin-1").strip().lower()
        if not origin or not host:
            return False
        if origin in settings.CSRF_TRUSTED_ORIGINS:
            return True
        parts = urlsplit(origin)
        # The scheme is not compared: behind a TLS proxy the page is https and the socket here plain.
        if parts.scheme not in ("http", "https") or not parts.netloc:
            return False
        domain, port = cls._host_port(parts.netloc.lower(), parts.scheme)
        host_domain, host_port = cls._host_port(host, parts.scheme)
        return bool(domain) and validate_host(domain, settings.ALLOWED_HOSTS) and (domain, port) == (
            host_domain, host_port)


application = ProtocolTypeRouter({
    "http": BodySizeLimit(SplitByPath(ApiHandler(), django_asgi_app), settings.OPTIMAGPT_MAX_BODY_BYTES),
    "websocket": SameOriginWebSocket(URLRouter(websocket_urlpatterns)),
})
