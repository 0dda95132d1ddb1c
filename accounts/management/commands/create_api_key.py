from datetime import timedelta
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.utils import timezone

from accounts.models import SCOPE_INFERENCE, SCOPES, ApiKey, User


class Command(BaseCommand):
    help = "Create an API key and print it once. Only a keyed hash of it is stored."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--name", required=True, help="what the key is for")
        parser.add_argument("--user", help="username of the key's owner (the key acts for them)")
        parser.add_argument("--models", nargs="+", default=[], help="model ids the key may use (default: all)")
        parser.add_argument("--mcp-servers", nargs="+", default=[],
                            help="MCP servers the key may use (default: all open to the API)")
        parser.add_argument("--default-mcp-servers", nargs="+", default=[],
                            help="MCP servers its requests use when they name none")
        parser.add_argument("--rpm", type=int, help="requests per minute")
        parser.add_argument("--tpm", type=int, help="tokens per minute")
        parser.add_argument("--budget", type=int, help="tokens per budget period")
        parser.add_argument("--budget-period", choices=["day", "month"], default="day")
        parser.add_argument("--scopes", nargs="+", choices=[s for s, _ in SCOPES], default=[SCOPE_INFERENCE],
                            help="what the key may do (default: inference only)")
        parser.add_argument("--expires-in-days", type=float, help="the key stops working after this many days")

    def handle(self, *args: Any, name: str, user: str | None, models: list[str], rpm: int | None,
               tpm: int | None, budget: int | None, budget_period: str, expires_in_days: float | None,
               scopes: list[str], mcp_servers: list[str], default_mcp_servers: list[str], **options: Any) -> None:
        owner = None
        if user:
            try:
                owner = User.objects.get(username=user)
            except User.DoesNotExist:
                raise CommandError(f"no user named {user!r}") from None
        for value, flag in ((rpm, "--rpm"), (tpm, "--tpm"), (budget, "--budget")):
            if value is not None and value < 1:
                raise CommandError(f"{flag} must be at least 1")
        key, raw = ApiKey.create_with_raw_key(name=name, owner=owner, scopes=sorted(set(scopes)))
        key.allowed_models = models
        key.allowed_mcp_servers, key.default_mcp_servers = mcp_servers, default_mcp_servers
        key.requests_per_minute, key.tokens_per_minute, key.token_budget = rpm, tpm, budget
        key.budget_period = budget_period
        if expires_in_days is not None:
            key.expires_at = timezone.now() + timedelta(days=expires_in_days)
        key.save()
        self.stdout.write(raw)
