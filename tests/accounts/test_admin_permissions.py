"""Django admin pages check the product's permissions, for an admin, a user without them and a visitor."""

import pytest
from django.test import Client

from accounts.models import User

pytestmark = pytest.mark.django_db

PAGES = {
    "/admin/accounts/user/": "accounts.manage_users",
    "/admin/accounts/apikey/": "accounts.manage_api_keys",
    "/admin/nodes/node/": "accounts.manage_nodes",
    "/admin/nodes/executor/": "accounts.manage_executors",
    "/admin/mcp_servers/mcpserver/": "accounts.manage_mcp",
}


def _client(user: User | None) -> Client:
    client = Client()
    if user is not None:
        client.force_login(user)
    return client


@pytest.mark.parametrize("page", PAGES)
def test_an_admin_sees_every_management_page(admin: User, page: str) -> None:
    assert _client(admin).get(page).status_code == 200


@pytest.mark.parametrize("page", PAGES)
def test_a_staff_admin_without_the_permission_is_refused(admin: User, page: str) -> None:
    codename = PAGES[page].split(".")[1]
    admin.user_permissions.remove(*admin.user_permissions.filter(codename=codename))
    admin = User.objects.get(pk=admin.pk)  # drop the permission cache
    assert _client(admin).get(page).status_code == 403


@pytest.mark.parametrize("page", PAGES)
def test_a_user_and_a_visitor_are_sent_to_log_in(member: User, page: str) -> None:
    for user in (member, None):
        response = _client(user).get(page)
        assert response.status_code == 302 and "/admin/login/" in response["Location"]


def test_the_last_admin_cannot_be_deleted_through_the_admin(admin: User) -> None:
    other = User.objects.create_user(username="x", password="irrelevant-pass-123", user_type="user")
    client = _client(admin)
    response = client.post(f"/admin/accounts/user/{admin.pk}/delete/", {"post": "yes"})
    assert response.status_code == 403
    assert User.objects.filter(pk=admin.pk).exists()
    response = client.post(f"/admin/accounts/user/{other.pk}/delete/", {"post": "yes"})
    assert response.status_code == 302 and not User.objects.filter(pk=other.pk).exists()
