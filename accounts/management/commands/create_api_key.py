from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError

from accounts.models import ApiKey


class Command(BaseCommand):
    help = "Create an API key and print it once. Only a keyed hash of it is stored."

    def add_arguments(self, parser):  # type: ignore[no-untyped-def]
        parser.add_argument("--name", required=True, help="what the key is for")
        parser.add_argument("--user", help="username of the key's owner")

    def handle(self, *args, name: str, user: str | None, **options):  # type: ignore[no-untyped-def]
        owner = None
        if user:
            try:
                owner = get_user_model().objects.get(username=user)
            except get_user_model().DoesNotExist:
                raise CommandError(f"no user named {user!r}") from None
        _, raw = ApiKey.create_with_raw_key(name=name, owner=owner)
        self.stdout.write(raw)
