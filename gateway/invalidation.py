"""Telling every gateway process that a key, a user, an MCP server, a setting or the certificate changed.

Each process caches verified keys and users (accounts.services, accounts.tokens)
and tracks the requests it has in flight per key (gateway/revocation.py). A change
saved through one process reaches that process's caches through Django signals
at once; this module carries it to the others: the signal receivers below send
to a group that every gateway process listens to. In the embedded default there
is one process, and the broadcast only repeats what the signals already did.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from asgiref.sync import async_to_sync
from channels.db import database_sync_to_async
from channels.layers import InMemoryChannelLayer, get_channel_layer
from django.db import transaction
from django.db.models.signals import m2m_changed, post_delete, post_save
from django.dispatch import receiver

from accounts import services as key_cache
from accounts import tokens as user_cache
from accounts.models import ApiKey, User
from certificates.models import GatewayCertificate
from certificates.serving import side as https_side
from certificates.store import stored_bundle
from mcp_servers import runtime as mcp_runtime
from mcp_servers.models import McpServer
from operations.config import settings_apply
from operations.models import GatewaySetting

from .revocation import revoke_calls_of_key, revoke_calls_of_owner

log = logging.getLogger("optimagpt.invalidation")

GROUP = "optimagpt.invalidation"
# Group membership expires on the Redis layer (a day by default); joining again renews it.
REJOIN_S = 3600.0
SEND_TIMEOUT_S = 5.0


def _shared() -> bool:
    """Whether other gateway processes can exist: only with a layer they share (Redis)."""
    return not isinstance(get_channel_layer(), InMemoryChannelLayer)


def _broadcast(message: dict[str, Any]) -> None:
    """Send once the change is committed, so that no process re-reads the old row and caches it again."""
    if _shared():
        transaction.on_commit(lambda: _send(message))


def _send(message: dict[str, Any]) -> None:
    """From sync code: a signal receiver's thread, never the event loop's own."""

    async def send() -> None:
        await asyncio.wait_for(get_channel_layer().group_send(GROUP, {"type": "invalidate", **message}),
                               SEND_TIMEOUT_S)

    try:
        async_to_sync(send)()
    except Exception as exc:  # noqa: BLE001 - other processes then notice within their cache lifetime
        log.warning("could not tell other gateway processes about a change: %s", type(exc).__name__)


@receiver(post_save, sender=ApiKey)
@receiver(post_delete, sender=ApiKey)
def _key_changed(sender: type[ApiKey], instance: ApiKey, **kwargs: Any) -> None:
    _broadcast({"key_id": instance.pk, "digest": instance.digest, "deleted": "created" not in kwargs})


@receiver(post_save, sender=McpServer)
@receiver(post_delete, sender=McpServer)
def _mcp_server_changed(sender: type[McpServer], instance: McpServer, **kwargs: Any) -> None:
    _broadcast({"mcp_server": instance.pk, "mcp_deleted": "created" not in kwargs})


@receiver(post_save, sender=GatewaySetting)
@receiver(post_delete, sender=GatewaySetting)
def _setting_changed(sender: type[GatewaySetting], instance: GatewaySetting, **kwargs: Any) -> None:
    _broadcast({"settings": instance.name})


@receiver(post_save, sender=GatewayCertificate)
@receiver(post_delete, sender=GatewayCertificate)
def _certificate_changed(sender: type[GatewayCertificate], instance: GatewayCertificate, **kwargs: Any) -> None:
    _broadcast({"certificate": instance.fingerprint if "created" in kwargs else ""})


@receiver(post_save, sender=User)
@receiver(post_delete, sender=User)
def _user_changed(sender: type[User], instance: User, **kwargs: Any) -> None:
    _broadcast({"user_id": instance.pk, "inactive": not instance.is_active or "created" not in kwargs})


@receiver(m2m_changed, sender=User.user_permissions.through)
def _permissions_changed(sender: object, instance: object, **kwargs: Any) -> None:
    if kwargs.get("action", "").startswith("post_"):
        _broadcast({"user_id": instance.pk if isinstance(instance, User) else None})


def _apply(message: dict[str, Any]) -> None:
    if "mcp_server" in message:
        mcp_runtime.forget(message["mcp_server"], gone=bool(message.get("mcp_deleted")))
    if "digest" in message:
        key_cache.forget_key(message["digest"])
        if message.get("deleted"):
            revoke_calls_of_key(message["key_id"])
    if "user_id" in message:
        user_cache.forget_user(message["user_id"])
        key_cache.forget_keys_of_user(message["user_id"])
        if message.get("inactive") and message["user_id"] is not None:
            revoke_calls_of_owner(message["user_id"])  # deactivated or deleted: their keys end at once


async def invalidation_listen_forever(stop: asyncio.Event) -> None:
    """Apply the changes other gateway processes announce until `stop` is set (started by optimagpt/server.py).

    In the embedded default (one process, in-memory layer) there is nobody to hear from: it returns at once.
    The receive stays pending across rejoins and is cancelled only at the end: on the Redis pub/sub layer a
    cancelled receive unsubscribes the channel, and a change announced before the next one would be lost.
    """
    if not _shared():
        return
    layer = get_channel_layer()
    channel = await layer.new_channel("invalidation.")
    stopping = asyncio.ensure_future(stop.wait())
    receiving: asyncio.Future[Any] | None = None
    try:
        while not stop.is_set():
            try:
                await asyncio.wait_for(layer.group_add(GROUP, channel), SEND_TIMEOUT_S)
            except Exception as exc:  # noqa: BLE001 - Redis away for a moment: try again shortly
                log.warning("invalidation listener: %s", type(exc).__name__)
                await asyncio.wait({stopping}, timeout=1.0)
                continue
            joined_at = asyncio.get_running_loop().time()
            while not stop.is_set():
                if receiving is None:
                    receiving = asyncio.ensure_future(layer.receive(channel))
                left = REJOIN_S - (asyncio.get_running_loop().time() - joined_at)
                await asyncio.wait({receiving, stopping}, timeout=max(left, 0.0),
                                   return_when=asyncio.FIRST_COMPLETED)
                if not receiving.done():
                    break  # stopping, or time to renew the group membership (the receive goes on)
                done, receiving = receiving, None
                try:
                    message = done.result()
                    if "settings" in message:  # the Configuration page's values, read again in a thread
                        await database_sync_to_async(settings_apply)()
                    if "certificate" in message:  # HTTPS serves the new one to new connections
                        https_side.apply(await database_sync_to_async(stored_bundle)(), source="stored")
                    _apply(message)
                except Exception as exc:  # noqa: BLE001 - Redis away for a moment: join again
                    log.warning("invalidation listener: %s", type(exc).__name__)
                    break
    finally:
        stopping.cancel()
        if receiving is not None:
            receiving.cancel()
            with contextlib.suppress(BaseException):
                await receiving
        with contextlib.suppress(Exception):
            await asyncio.wait_for(layer.group_discard(GROUP, channel), SEND_TIMEOUT_S)
