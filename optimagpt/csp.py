"""A strict Content-Security-Policy on the gateway's own pages: only their own script and style files run, no
inline script or style, no plugin, no frame; nothing a user or a model writes can load or run anything.

Django admin keeps its own ways. The API's docs page runs Swagger UI from our own static files under a
policy of its own: Swagger UI's React sets inline styles, so styles may be inline there, scripts never.
"""

from __future__ import annotations

from collections.abc import Callable

from django.http import HttpRequest, HttpResponse

PAGE_CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
            "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'self'")
DOCS_CSP = ("default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
            "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'self'")
EXEMPT_PREFIXES = ("/admin/",)


class ContentSecurityPolicyMiddleware:
    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        response = self.get_response(request)
        if response.get("Content-Type", "").startswith("text/html") and not request.path.startswith(EXEMPT_PREFIXES):
            policy = DOCS_CSP if request.path.startswith("/docs") else PAGE_CSP
            response.headers.setdefault("Content-Security-Policy", policy)
        return response
