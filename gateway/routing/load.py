"""How many requests each executor has in flight: this process's own, and the other gateway processes'.

The router counts its own here as it hands out and takes back slots; gateway/routing/shared.py
publishes them through Redis and fills in the others'; the Nodes page reads the sum. This module
imports nothing of the project, so every reader can import it.
"""

from __future__ import annotations

import asyncio
from collections import Counter

mine: Counter[int] = Counter()  # executor pk -> requests this process has on it
others: Counter[int] = Counter()  # executor pk -> requests the other gateway processes have on it (with Redis)
changed = asyncio.Event()  # set when `mine` changes, for the next publication


def in_flight(executor_pk: int) -> int:
    """Requests on the executor from every gateway process."""
    return mine[executor_pk] + others[executor_pk]


def add(executor_pk: int) -> None:
    mine[executor_pk] += 1
    changed.set()


def remove(executor_pk: int) -> None:
    mine[executor_pk] -= 1
    if mine[executor_pk] <= 0:
        del mine[executor_pk]
    changed.set()
