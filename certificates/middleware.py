"""Browsers that open a page over HTTP are sent to the same page over HTTPS, when an admin asks for it.

Only page navigations (GET or HEAD asking for HTML): API calls, health checks, metrics and node links keep
working over HTTP as before, since a client that does not follow redirects (or re-sends a POST as GET)
would break. Only while this process really serves HTTPS, so nobody is sent to a port that is closed.
"""

from __future__ import annotations

from collections.abc import Callable

from django.http import HttpRequest, HttpResponse, HttpResponseRedirect

from operations.config import https_redirect_on

from .serving import side

# Paths that machines call: never redirected, whatever they accept.
MACHINE_PATHS = ("/v1/", "/optima/", "/api/", "/metrics", "/healthz", "/readyz", "/ws/", "/openapi.json")


class HttpsRedirectMiddleware:
    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        listening = side.listening
        if (listening is not None and not request.is_secure() and request.method in ("GET", "HEAD")
                and "text/html" in request.headers.get("Accept", "") and not request.path.startswith(MACHINE_PATHS)
                and https_redirect_on()):
            host = request.get_host().rsplit(":", 1)[0] if not request.get_host().endswith("]") else request.get_host()
            port = "" if listening.port == 443 else f":{listening.port}"
            return HttpResponseRedirect(f"https://{host}{port}{request.get_full_path()}")
        return self.get_response(request)
