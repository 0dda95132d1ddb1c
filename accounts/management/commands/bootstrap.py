import secrets
from typing import Any

from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandParser

from accounts.models import ApiKey
from accounts.users import user_create

LOCAL_KEY_NAME = "local default"


class Command(BaseCommand):
    help = ("First start: create the admin account and an API key, and print both once. "
            "Later starts change nothing and print nothing secret.")

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--username", default="admin")

    def handle(self, *args: Any, username: str, **options: Any) -> None:
        users = get_user_model()
        if not users.objects.filter(is_superuser=True).exists():
            password = secrets.token_urlsafe(12)
            user_create(username=username, password=password, user_type=users.Type.ADMIN, is_superuser=True)
            self.stdout.write(f"Admin login:   {username} / {password}   (shown once; keep it)")
        else:
            self.stdout.write("Admin login:   the password printed at first start "
                              "(reset it with: ./optimagpt.sh manage changepassword admin)")
        if not ApiKey.objects.filter(name=LOCAL_KEY_NAME).exists():
            owner = users.objects.filter(is_superuser=True).order_by("pk").first()
            _, raw = ApiKey.create_with_raw_key(name=LOCAL_KEY_NAME, owner=owner)
            self.stdout.write(f"API key:       {raw}   (shown once; keep it)")
        else:
            self.stdout.write("API key:       the key printed at first start "
                              "(make another with: ./optimagpt.sh manage create_api_key --name NAME)")
