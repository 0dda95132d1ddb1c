from django.http import HttpRequest, HttpResponse
from django.shortcuts import render

from nodes.models import Executor, Node


def home(request: HttpRequest) -> HttpResponse:
    """The gateway's front page: what is linked and where the API and admin are."""
    nodes = Node.objects.filter(connected=True).count()
    models = (Executor.objects.filter(state=Executor.State.ONLINE, node__connected=True)
              .values_list("model_id", flat=True).distinct())
    return render(request, "chat/home.html", {"nodes": nodes, "models": sorted(set(models))})
