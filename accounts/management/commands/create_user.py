import sys
from typing import Any

from django.core.exceptions import ValidationError
from django.core.management.base import BaseCommand, CommandError, CommandParser

from accounts.models import User
from accounts.users import user_create


class Command(BaseCommand):
    help = "Create a user. The password is read from standard input, so it never shows in the process list."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("username")
        parser.add_argument("--type", choices=User.Type.values, default=User.Type.USER)
        parser.add_argument("--first-name", default="")
        parser.add_argument("--last-name", default="")

    def handle(self, *args: Any, username: str, type: str, first_name: str, last_name: str,
               **options: Any) -> None:
        if User.objects.filter(username=username).exists():
            raise CommandError(f"a user named {username!r} exists already")
        password = sys.stdin.readline().rstrip("\n")
        try:
            user_create(username=username, password=password, user_type=type, first_name=first_name,
                        last_name=last_name)
        except ValidationError as exc:
            raise CommandError("; ".join(exc.messages)) from None
        self.stdout.write(f"created {type} {username}")
