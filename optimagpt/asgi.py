"""ASGI entry point: HTTP through Django, the node link through Channels.

`get_asgi_application()` runs before the consumers are imported, so the app
registry is ready when they load their models.
"""

from __future__ import annotations

import json
import os
from typing import Any

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "optimagpt.settings")
django_asgi_app = get_asgi_application()

from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402
from channels.security.websocket import AllowedHostsOriginValidator  # noqa: E402
from django.conf import settings  # noqa: E402

from nodes.routing import websocket_urlpatterns  # noqa: E402


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
    "http": BodySizeLimit(django_asgi_app, settings.OPTIMAGPT_MAX_BODY_BYTES),
    # Nodes are not browsers and send no Origin; the validator still stops
    # cross-site pages from opening the link in a logged-in admin's browser.
    "websocket": AllowedHostsOriginValidator(URLRouter(websocket_urlpatterns)),
})
