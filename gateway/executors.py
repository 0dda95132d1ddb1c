"""Managing executors from the gateway: settings of local ones (applied by their node), remote upstreams.

A local executor's settings live on its node: the gateway sends the change over
the link, the node validates, keeps and applies it (restarting the model's
processes), and answers with the executor as it now is, which is what the row
then says. A remote upstream is configured in the database alone.
"""

from __future__ import annotations

from typing import Any

from channels.db import database_sync_to_async
from django.db import IntegrityError, transaction

from node_agent.executors import ExecutorSettings, SettingsError
from nodes.models import Executor
from nodes.services import executor_reported
from nodes.signals import executors_changed
from optimagpt.errors import Conflict, InvalidRequest
from optimagpt.outbound import OutboundRefused

from .connectors.remote import (
    remote_address_check,
    remote_probe,
    same_origin,
    upstream_for,
)
from .dispatch import node_configure

REMOTE_FIELDS = frozenset({"enabled", "model_id", "description", "base_url", "upstream_model", "api_key",
                           "embedding"})


async def executor_configure(*, executor: Executor, changes: dict[str, Any]) -> Executor:
    """Change an executor's settings (see ExecutorSettings for a local one, REMOTE_FIELDS for a remote one)."""
    if executor.is_remote:
        return await executor_remote_update(executor=executor, changes=changes)
    try:
        ExecutorSettings.parse(changes, base=ExecutorSettings.parse(executor.settings or {}))
    except SettingsError as exc:
        raise InvalidRequest(str(exc)) from None
    node = await database_sync_to_async(lambda: executor.node)()
    if not node.connected or not node.channel_name:
        raise Conflict(f"The node {node.name!r} is not connected; its models can be changed once it is.")
    report = await node_configure(channel_name=node.channel_name, executor_key=executor.key, changes=changes)
    return await database_sync_to_async(executor_reported)(node_pk=node.pk, report=report)


async def executor_remote_create(*, name: str, model_id: str, base_url: str, upstream_model: str = "",
                                 api_key: str = "", description: str = "", embedding: bool = False,
                                 enabled: bool = True) -> Executor:
    """Register an OpenAI-compatible upstream as an executor of `model_id`, and check that it answers."""
    executor = Executor(key=name, model_id=model_id, base_url=base_url, upstream_model=upstream_model,
                        description=description, embedding=embedding, enabled=enabled, name=name,
                        architecture="remote")
    _check_key(api_key)
    await _check_address(base_url)
    executor.set_upstream_key(api_key)
    await _probe_into(executor)
    try:
        await database_sync_to_async(_save_new)(executor)
    except IntegrityError:
        raise Conflict(f"A remote upstream named {name!r} exists already.") from None
    return executor


def _check_key(api_key: str) -> None:
    """The key goes in an Authorization header, which carries printable ASCII only."""
    if any(not "!" <= c <= "~" for c in api_key):
        raise InvalidRequest("api_key may hold printable ASCII characters only (no spaces)", param="api_key")


def _save_new(executor: Executor) -> None:
    with transaction.atomic():
        executor.save()
    executors_changed.send(sender=Executor)


async def executor_remote_update(*, executor: Executor, changes: dict[str, Any]) -> Executor:
    unknown = sorted(set(changes) - REMOTE_FIELDS)
    if unknown:
        raise InvalidRequest(f"unknown field {unknown[0]!r} for a remote upstream")
    if "base_url" in changes:
        await _check_address(changes["base_url"])
        # The stored key was given for the old host: it goes to a new one only if given again.
        if not same_origin(changes["base_url"], executor.base_url) and "api_key" not in changes \
                and executor.upstream_key_encrypted:
            raise InvalidRequest("base_url names another host: give its api_key again (the stored key is "
                                 "never sent to a host it was not given for)", param="api_key")
    for field, value in changes.items():
        if field == "api_key":
            _check_key(value)
            executor.set_upstream_key(value)
        else:
            setattr(executor, field, value)
    await _probe_into(executor)
    await database_sync_to_async(_save)(executor)
    return executor


async def _check_address(base_url: str) -> None:
    try:
        await remote_address_check(base_url)
    except OutboundRefused as exc:
        raise InvalidRequest(str(exc), param="base_url") from None


def _save(executor: Executor) -> None:
    executor.save()
    executors_changed.send(sender=Executor)


async def _probe_into(executor: Executor) -> None:
    """Online when enabled and the upstream answers for the model; the reason in `error` when not."""
    if not executor.enabled:
        executor.state, executor.error = Executor.State.OFFLINE, ""
        return
    problem = await remote_probe(upstream_for(executor))
    executor.state = Executor.State.FAILED if problem else Executor.State.ONLINE
    executor.error = problem


async def executor_delete(*, executor: Executor) -> None:
    if not executor.is_remote:
        raise Conflict("A model on a node goes away when its file is removed from the node's folder; "
                       "stop it to free its memory.")
    await database_sync_to_async(_delete)(executor)


def _delete(executor: Executor) -> None:
    executor.delete()
    executors_changed.send(sender=Executor)
