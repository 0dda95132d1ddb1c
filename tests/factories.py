"""Rows the in-process tests start from: users, API keys and nodes, each made one way everywhere.

The async variants run the same function in a thread (`sync_to_async`), for async tests.
"""

from __future__ import annotations

import uuid
from typing import Any

from asgiref.sync import sync_to_async
from django.utils import timezone

from accounts.models import ApiKey, User
from accounts.users import user_create
from nodes.models import Node

PASSWORD = "correct-horse-battery-staple"


def user_make(username: str, *, admin: bool = False, password: str = PASSWORD) -> User:
    """A person with the default permissions of their type (an Admin: every permission; a User: Chat)."""
    return user_create(username=username, password=password, user_type=User.Type.ADMIN if admin else User.Type.USER)


def key_make(name: str = "tests", *, owner: User | None = None, scopes: list[str] | None = None,
             **limits: Any) -> tuple[ApiKey, str]:
    """A saved API key and its raw text, with `limits` (allowed_models, rate and token limits) set on it."""
    key, raw = ApiKey.create_with_raw_key(name=name, owner=owner, scopes=scopes)
    if limits:
        for field, value in limits.items():
            setattr(key, field, value)
        key.save()
    return key, raw


def node_make(name: str, *, connected: bool = True, **fields: Any) -> Node:
    """A node row as a linked node leaves it: heard from now, its link on channel `chan-<name>`."""
    defaults: dict[str, Any] = {"node_id": uuid.uuid4(), "connected": connected, "channel_name": f"chan-{name}",
                                "last_seen": timezone.now()}
    return Node.objects.create(name=name, **{**defaults, **fields})


auser_make = sync_to_async(user_make)
akey_make = sync_to_async(key_make)
anode_make = sync_to_async(node_make)
