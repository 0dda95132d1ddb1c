"""Live updates for the node console pages: a WebSocket per open page, for logged-in users with Node Management.

Node links publish metrics, log lines, executor and link changes to one group;
each page's socket receives them (only its node's, with `?node=<id>`) and the
page's script draws them. Nothing is sent that the pages do not already show.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qs

from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncJsonWebsocketConsumer

from .consumers import CONSOLE_GROUP

CLOSE_FORBIDDEN = 4403


@database_sync_to_async
def _may_watch(user: Any) -> bool:
    return bool(user is not None and user.is_authenticated and user.is_active
                and user.has_perm("accounts.manage_nodes"))


class ConsoleConsumer(AsyncJsonWebsocketConsumer):
    node_filter: int | None = None

    async def connect(self) -> None:
        if not await _may_watch(self.scope.get("user")):
            await self.close(CLOSE_FORBIDDEN)
            return
        node = parse_qs(self.scope.get("query_string", b"").decode()).get("node", [""])[0]
        self.node_filter = int(node) if node.isdigit() else None
        await self.channel_layer.group_add(CONSOLE_GROUP, self.channel_name)
        await self.accept()

    async def disconnect(self, code: int) -> None:
        await self.channel_layer.group_discard(CONSOLE_GROUP, self.channel_name)

    async def receive_json(self, content: Any, **kwargs: Any) -> None:
        pass  # the page only listens

    async def console_event(self, message: dict[str, Any]) -> None:
        event = message["event"]
        if self.node_filter is None or event.get("node") == self.node_filter:
            await self.send_json(event)
