from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from nodes.enrollment import token_create


class Command(BaseCommand):
    help = ("Make a node enrollment token and print it once: a new node exchanges it for a credential of its own "
            "(python -m node_agent join --gateway-url URL --token TOKEN).")

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--ttl", type=float, default=3600, help="seconds it can be used for (default 3600)")
        parser.add_argument("--uses", type=int, default=1, help="how many nodes it may enroll (default 1; 0: any)")
        parser.add_argument("--name", default="", help="what it is for, shown in the token list")

    def handle(self, *args: Any, ttl: float, uses: int, name: str, **options: Any) -> None:
        try:
            _, raw = token_create(name=name, ttl_s=ttl, uses=uses or None, username="manage.py")
        except ValueError as exc:
            raise CommandError(str(exc)) from None
        self.stdout.write(raw)
