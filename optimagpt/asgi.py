"""ASGI entry point: HTTP through Django, the node link through Channels.

`get_asgi_application()` runs before the consumers are imported, so the app
registry is ready when they load their models.
"""

from __future__ import annotations

import json
import os
from typing import Any

from django.core.asgi import get_asgi_application
from django.core.handlers.asgi import ASGIHandler
from django.core.handlers.exception import convert_exception_to_response

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "optimagpt.settings")
django_asgi_app = get_asgi_application()

API_PREFIX = "/v1/"


class ApiHandler(ASGIHandler):
    """Django without middleware, for the OpenAI API paths.

    Django runs each sync-style middleware of an async request through a thread
    hop; the seven in settings.MIDDLEWARE cost about 4 ms per request here. The
    API needs none of them: it authenticates by key (no session, so no CSRF),
    sets no cookies and answers JSON (no clickjacking).
    """

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        # Django wraps each request in a ThreadSensitiveContext, which starts a
        # fresh thread for the request's first sync call. API requests make two
        # or three tiny sync calls (connection upkeep, response close); the shared
        # sync thread serves them without a thread start per request.
        await self.handle(scope, receive, send)

    def load_middleware(self, is_async: bool = False) -> None:
        self._view_middleware = []
        self._template_response_middleware = []
        self._exception_middleware = []
        self._middleware_chain = convert_exception_to_response(
            self._get_response_async if is_async else self._get_response
        )

from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402
from channels.security.websocket import AllowedHostsOriginValidator  # noqa: E402
from django.conf import settings  # noqa: E402

from nodes.routing import websocket_urlpatterns  # noqa: E402


class SplitByPath:
    """OpenAI API paths to the lean handler, everything else (admin, pages) to full Django."""

    def __init__(self, api: Any, site: Any) -> None:
        self.api = api
        self.site = site

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        app = self.api if scope["path"].startswith(API_PREFIX) else self.site
        await app(scope, receive, send)


class BodySizeLimit:
    """Refuse request bodies over OPTIMAGPT_MAX_BODY_BYTES with 413 before reading them into memory."""

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
                    return await self._refuse(send)
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
            await self._refuse(send)

    async def _refuse(self, send: Any) -> None:
        body = json.dumps({"error": {"message": f"The request body is larger than {self.limit} bytes.",
                                     "type": "invalid_request_error", "param": None,
                                     "code": "request_too_large"}}).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


application = ProtocolTypeRouter({
    "http": BodySizeLimit(SplitByPath(ApiHandler(), django_asgi_app), settings.OPTIMAGPT_MAX_BODY_BYTES),
    # Nodes are not browsers and send no Origin; the validator still stops
    # cross-site pages from opening the link in a logged-in admin's browser.
    "websocket": AllowedHostsOriginValidator(URLRouter(websocket_urlpatterns)),
})
