from django.http import HttpRequest, HttpResponse
from django.shortcuts import redirect, render

from nodes.models import Executor, Node


def home(request: HttpRequest) -> HttpResponse:
    """The gateway's front page: the Nodes page for those who manage nodes; otherwise what is linked and where
    the API is."""
    if request.user.is_authenticated and request.user.has_perm("accounts.manage_nodes"):
        return redirect("nodes")
    nodes = Node.objects.filter(connected=True).count()
    models = (Executor.objects.filter(state=Executor.State.ONLINE, node__connected=True)
              .values_list("model_id", flat=True).distinct())
    return render(request, "chat/home.html", {"nodes": nodes, "models": sorted(set(models))})
