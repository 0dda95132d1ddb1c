import io

import pytest
from django.core.exceptions import ValidationError
from django.core.management import call_command

from accounts.models import PERMISSIONS, User
from accounts.users import UserRuleBroken, user_create, user_delete, user_set_type
from tests.factories import PASSWORD

pytestmark = pytest.mark.django_db


def test_an_admin_starts_with_every_permission_and_a_user_with_chat(admin: User, member: User) -> None:
    assert all(admin.has_perm(f"accounts.{codename}") for codename, _ in PERMISSIONS)
    assert admin.is_staff and not admin.is_superuser
    assert member.has_perm("accounts.chat") and not member.has_perm("accounts.manage_users")
    assert not member.is_staff


def test_passwords_go_through_djangos_validators(db) -> None:
    with pytest.raises(ValidationError):
        user_create(username="carl", password="short", user_type=User.Type.USER)
    with pytest.raises(ValidationError):
        user_create(username="carl", password="12345678901", user_type=User.Type.USER)
    assert not User.objects.filter(username="carl").exists()


def test_nobody_can_delete_their_own_account(admin: User, member: User) -> None:
    user_create(username="ada2", password=PASSWORD, user_type=User.Type.ADMIN)
    with pytest.raises(UserRuleBroken, match="own account"):
        user_delete(actor=admin, user=admin)
    user_delete(actor=admin, user=member)
    assert not User.objects.filter(pk=member.pk).exists()


def test_the_last_admin_can_be_neither_deleted_nor_demoted(admin: User, member: User) -> None:
    with pytest.raises(UserRuleBroken, match="At least one Admin"):
        user_delete(actor=member, user=admin)
    with pytest.raises(UserRuleBroken):
        user_set_type(user=admin, user_type=User.Type.USER)
    admin.refresh_from_db()
    assert admin.user_type == User.Type.ADMIN and admin.is_staff
    second = user_create(username="ada2", password=PASSWORD, user_type=User.Type.ADMIN)
    user_set_type(user=admin, user_type=User.Type.USER)
    with pytest.raises(UserRuleBroken):
        user_delete(actor=admin, user=second)


def test_create_user_reads_the_password_from_stdin(db, monkeypatch) -> None:
    monkeypatch.setattr("sys.stdin", io.StringIO(PASSWORD + "\n"))
    out = io.StringIO()
    call_command("create_user", "dana", "--type", "admin", stdout=out)
    dana = User.objects.get(username="dana")
    assert dana.check_password(PASSWORD) and dana.user_type == User.Type.ADMIN
    assert PASSWORD not in out.getvalue()
