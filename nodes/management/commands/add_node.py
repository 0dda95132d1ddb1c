"""Verify a node that listens (python -m node_agent --listen :8022) and register it for the gateway to dial."""

from __future__ import annotations

from typing import Any

from asgiref.sync import async_to_sync
from django.core.management.base import BaseCommand, CommandError, CommandParser

from nodes.outbound import ProbeFailed, node_probe
from nodes.services import node_add_dialed


class Command(BaseCommand):
    help = ("Connect to a listening node, check that it holds the node access key (and prove ours), pin its "
            "certificate, and register it; the gateway then keeps a link to it.")

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("host")
        parser.add_argument("--port", type=int, default=8022)
        parser.add_argument("--name", default="", help="name shown on the gateway (default: the node's own)")

    def handle(self, *args: Any, host: str, port: int, name: str, **options: Any) -> None:
        try:
            probe = async_to_sync(node_probe)(host=host, port=port)
        except ProbeFailed as exc:
            raise CommandError(f"cannot verify {host}:{port}: {exc}") from None
        node = node_add_dialed(name=name or probe.name or host, host=host, port=port, node_id=probe.node_id,
                               fingerprint=probe.fingerprint, version=probe.version)
        if node is None:
            raise CommandError(f"the node at {host}:{port} ({probe.node_id}) is registered already")
        self.stdout.write(f"Registered {node.name} ({probe.node_id}), {probe.executors} models; certificate "
                          f"SHA-256 {probe.fingerprint}")
