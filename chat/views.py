from django.contrib.auth.decorators import login_required, permission_required
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import redirect, render
from django.views.decorators.http import require_POST

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
