from functools import cache

from django.conf import settings
from django.contrib.auth.decorators import login_required, permission_required
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import redirect, render
from django.templatetags.static import static
from django.views.decorators.http import require_GET, require_POST

from accounts.tokens import access_token_for_session
from accounts.users import signed_in
from nodes.models import Executor, Node


def home(request: HttpRequest) -> HttpResponse:
    """The gateway's front page: OptimaChat for those who may chat, the Nodes page for node managers who may
    not; otherwise what is linked and where the API is."""
    if request.user.is_authenticated and request.user.has_perm("accounts.chat"):
        return _chat_page(request)
    if request.user.is_authenticated and request.user.has_perm("accounts.manage_nodes"):
        return redirect("nodes")
    nodes = Node.objects.filter(connected=True).count()
    models = (Executor.objects.filter(state=Executor.State.ONLINE, node__connected=True)
              .values_list("model_id", flat=True).distinct())
    return render(request, "chat/home.html", {"nodes": nodes, "models": sorted(set(models))})


def _chat_page(request: HttpRequest) -> HttpResponse:
    # Like every page, it runs only its own script files (optimagpt/csp.py): a second wall behind the chat
    # putting what users and models write on the page as text.
    return render(request, "chat/chat.html", {"section": "chat"})


@require_POST
@login_required
@permission_required("accounts.chat", raise_exception=True)
def chat_token_view(request: HttpRequest) -> HttpResponse:
    """A short-lived access token for the chat page's API calls (POST with the CSRF token of the session)."""
    return JsonResponse(access_token_for_session(signed_in(request)))


# -- OptimaChat as an installable app -------------------------------------------------------------
@require_GET
def manifest_view(request: HttpRequest) -> JsonResponse:
    """The web app manifest: browsers install OptimaChat as a window of its own from it (over HTTPS or
    from localhost)."""
    icons = [{"src": static("icons/optimachat-192.png"), "sizes": "192x192", "type": "image/png"},
             {"src": static("icons/optimachat-512.png"), "sizes": "512x512", "type": "image/png"},
             {"src": static("icons/optimachat-maskable-512.png"), "sizes": "512x512", "type": "image/png",
              "purpose": "maskable"}]
    manifest = {"id": "/", "name": "OptimaChat", "short_name": "OptimaChat", "description":
                "Chat with the models of your own OptimaGPT gateway.", "start_url": "/", "scope": "/",
                "display": "standalone", "background_color": "#f7f8fa", "theme_color": "#2563eb", "icons": icons}
    return JsonResponse(manifest, content_type="application/manifest+json")


@cache
def _service_worker() -> bytes:
    return (settings.BASE_DIR / "static/js/sw.js").read_bytes()


@require_GET
def service_worker_view(request: HttpRequest) -> HttpResponse:
    """The service worker, from the site's root so that its scope is the whole site; never cached by the
    browser's HTTP cache, so a new version is seen on the next visit."""
    response = HttpResponse(_service_worker(), content_type="text/javascript")
    response["Cache-Control"] = "no-cache"
    return response


@require_GET
def offline_view(request: HttpRequest) -> HttpResponse:
    """What the installed app shows when the gateway cannot be reached (the service worker keeps it)."""
    return render(request, "chat/offline.html")
