"""A strict Content-Security-Policy on the gateway's own pages: only their own script and style files run, no
inline script or style, no plugin, no frame; nothing a user or a model writes can load or run anything.

Django admin and the API's docs page (which loads Swagger UI with inline script) keep their own ways.
"""

from __future__ import annotations

from collections.abc import Callable

from django.http import HttpRequest, HttpResponse

PAGE_CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
            "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'self'")
EXEMPT_PREFIXES = ("/admin/", "/docs")


class ContentSecurityPolicyMiddleware:
    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        response = self.get_response(request)
        if response.get("Content-Type", "").startswith("text/html") and not request.path.startswith(EXEMPT_PREFIXES):
            response.headers.setdefault("Content-Security-Policy", PAGE_CSP)
        return response
