"""Users: creation with the product's two types, and the rules that keep an Admin in charge."""

from __future__ import annotations

from django.contrib.auth.models import Permission
from django.contrib.auth.password_validation import validate_password
from django.db import transaction
from django.http import HttpRequest

from .models import PERMISSIONS, User

# A User (not an Admin) starts with what OptimaChat needs.
USER_DEFAULT_PERMISSIONS = ("chat",)


class UserRuleBroken(Exception):
    """The change would leave the gateway without an Admin, or delete the acting user."""


def _product_permissions(codenames: tuple[str, ...] | list[str]) -> list[Permission]:
    return list(Permission.objects.filter(content_type__app_label="accounts", codename__in=codenames))


def user_create(*, username: str, password: str, user_type: str, first_name: str = "", last_name: str = "",
                is_superuser: bool = False) -> User:
    """Create a user; Django's password validators apply (ValidationError). An Admin gets every permission."""
    user = User(username=username, first_name=first_name, last_name=last_name, user_type=user_type)
    validate_password(password, user)
    user.set_password(password)
    user.is_staff = user_type == User.Type.ADMIN
    user.is_superuser = is_superuser
    with transaction.atomic():
        user.save()
        codenames = [c for c, _ in PERMISSIONS] if user.is_staff else list(USER_DEFAULT_PERMISSIONS)
        user.user_permissions.set(_product_permissions(codenames))
    return user


def ensure_another_admin(user: User) -> None:
    """Refuse when `user` is the last active Admin; rows are locked so two requests cannot both pass."""
    admins = list(User.objects.select_for_update().filter(user_type=User.Type.ADMIN, is_active=True)
                  .values_list("pk", flat=True))
    if user.pk in admins and len(admins) <= 1:
        raise UserRuleBroken("At least one Admin must remain.")


def user_set_type(*, user: User, user_type: str) -> User:
    with transaction.atomic():
        if user_type != User.Type.ADMIN:
            ensure_another_admin(user)
        user.user_type = user_type
        user.is_staff = user_type == User.Type.ADMIN
        user.save(update_fields=["user_type", "is_staff"])
        if user.is_staff:
            user.user_permissions.add(*_product_permissions([c for c, _ in PERMISSIONS]))
    return user


def user_delete(*, actor: User, user: User) -> None:
    if actor.pk == user.pk:
        raise UserRuleBroken("You cannot delete your own account.")
    with transaction.atomic():
        ensure_another_admin(user)
        user.delete()


def signed_in(request: HttpRequest) -> User:
    """The user of a request that login_required (or the admin site) let through."""
    user = request.user
    assert isinstance(user, User), "only signed-in users get here"
    return user
