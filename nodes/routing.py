from django.urls import path

from node_agent.settings import LINK_PATH

from .consumers import NodeLinkConsumer

websocket_urlpatterns = [
    path(LINK_PATH.lstrip("/"), NodeLinkConsumer.as_asgi()),
]
