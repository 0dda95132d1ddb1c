"""A node's colour on the Nodes pages, from its rows and the load numbers the router counts."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from .models import Executor, Node


@dataclass(frozen=True)
class Demand:
    """What requests ask of executors now: `in_flight(executor pk)` from every gateway process, and
    `queued(model id)`, the requests waiting for a slot of that model in this process."""

    in_flight: Callable[[int], int]
    queued: Callable[[str], int]


def node_status(node: Node, demand: Demand) -> str:
    """grey deactivated or not approved; red activated but not linked (or silent, or a model gave up after
    crashing); amber linked but a model is starting or stopping, or requests are queued (more in flight
    than processes serving, or waiting at the gateway); green linked and healthy.

    Uses the executors prefetched or queried: pass nodes from `prefetch_related("executors")`.
    """
    if not node.activated or not node.approved:
        return "grey"
    if not node.connected or node.last_seen is None or node.last_seen < Node.live_cutoff():
        return "red"
    executors = list(node.executors.all())
    # A file that is not a valid model is a note on its executor, not the node erroring.
    states = {e.state for e in executors if e.valid}
    if Executor.State.FAILED in states:
        return "red"
    if states & {Executor.State.STARTING, Executor.State.STOPPING}:
        return "amber"
    slots = sum(e.replicas_online * e.parallel for e in executors if e.state == Executor.State.ONLINE)
    if sum(demand.in_flight(e.pk) for e in executors) > max(slots, 1):
        return "amber"
    if any(demand.queued(e.model_id) for e in executors):
        return "amber"
    return "green"
