from channels.auth import AuthMiddlewareStack
from django.urls import path

from node_agent.settings import LINK_PATH

from .console import ConsoleConsumer
from .consumers import NodeLinkConsumer

websocket_urlpatterns = [
    path(LINK_PATH.lstrip("/"), NodeLinkConsumer.as_asgi()),
    # Pages' live updates: the browser's session cookie says who watches (nodes are not browsers: no session).
    path("ws/console/", AuthMiddlewareStack(ConsoleConsumer.as_asgi())),
]
