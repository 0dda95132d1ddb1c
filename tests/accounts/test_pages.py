"""The login, users and API-key pages, for an admin, a user without the permission and a visitor."""

from __future__ import annotations

import pytest
from django.conf import settings
from django.test import Client

from accounts.models import ApiKey, User
from tests.factories import PASSWORD

pytestmark = pytest.mark.django_db(transaction=True)

NEW_PASSWORD = "a-fresh-password-for-zoe"


def _as(user: User | None) -> Client:
    client = Client()
    if user is not None:
        client.force_login(user)
    return client


def test_logging_in_and_out(admin: User) -> None:
    client = Client()
    assert client.get("/login/").status_code == 200
    response = client.post("/login/", {"username": "ada", "password": PASSWORD, "next": "/manage/users/"})
    assert response.status_code == 302 and response["Location"] == "/manage/users/"
    assert client.get("/manage/users/").status_code == 200
    assert client.get("/logout/").status_code == 405  # logging out changes state: POST only
    assert client.post("/logout/").status_code == 302
    assert client.get("/manage/users/").status_code == 302


def test_a_wrong_password_is_refused_without_echo_and_repeats_are_throttled(admin: User) -> None:
    client = Client()
    for _ in range(settings.OPTIMAGPT_LOGIN_FAILURES):
        response = client.post("/login/", {"username": "ada", "password": "not-it-at-all"})
        assert response.status_code == 401 and b"Incorrect username or password" in response.content
        assert b"not-it-at-all" not in response.content
    response = client.post("/login/", {"username": "ada", "password": PASSWORD})
    assert response.status_code == 429 and int(response["Retry-After"]) > 0


def test_login_does_not_redirect_to_other_sites(admin: User) -> None:
    response = Client().post("/login/", {"username": "ada", "password": PASSWORD, "next": "https://evil.example/"})
    assert response["Location"] == "/"


@pytest.mark.parametrize("page", ["/manage/users/", "/manage/api-keys/"])
def test_pages_need_their_permission(admin: User, member: User, page: str) -> None:
    assert _as(admin).get(page).status_code == 200
    assert _as(member).get(page).status_code == 403
    visitor = _as(None).get(page)
    assert visitor.status_code == 302 and visitor["Location"].startswith("/login/")


def test_buttons_show_only_with_the_permission(admin: User, member: User) -> None:
    assert b'href="/manage/users/"' in _as(admin).get("/", follow=True).content  # admins land on the chat
    assert b'href="/manage/users/"' not in _as(member).get("/").content
    assert b'href="/manage/api-keys/"' not in _as(member).get("/").content


def test_an_admin_creates_a_user_and_a_user_cannot(admin: User, member: User) -> None:
    form = {"first_name": "Zoe", "last_name": "Z", "username": "zoe", "password": NEW_PASSWORD, "user_type": "user"}
    assert _as(member).post("/manage/users/", form).status_code == 403
    assert not User.objects.filter(username="zoe").exists()
    response = _as(admin).post("/manage/users/", form, follow=True)
    assert response.status_code == 200 and NEW_PASSWORD.encode() not in response.content
    assert User.objects.get(username="zoe").has_perm("accounts.chat")
    weak = _as(admin).post("/manage/users/", {**form, "username": "zed", "password": "password"})
    assert weak.status_code == 400 and not User.objects.filter(username="zed").exists()


def test_delete_and_demote_follow_the_admin_rules(admin: User, member: User) -> None:
    client = _as(admin)
    page = client.post(f"/manage/users/{admin.pk}/delete/", follow=True)
    assert b"You cannot delete your own account." in page.content and User.objects.filter(pk=admin.pk).exists()
    page = client.post(f"/manage/users/{admin.pk}/type/", {"user_type": "user"}, follow=True)
    assert b"At least one Admin must remain." in page.content
    assert User.objects.get(pk=admin.pk).user_type == "admin"
    assert _as(member).post(f"/manage/users/{admin.pk}/delete/").status_code == 403
    assert client.post(f"/manage/users/{member.pk}/delete/").status_code == 302
    assert not User.objects.filter(pk=member.pk).exists()


def test_a_new_api_key_is_shown_once_and_revoking_stops_it_at_once(admin: User, member: User) -> None:
    client = _as(admin)
    response = client.post("/manage/api-keys/", {"name": "ci", "owner": admin.pk, "allowed_models": "a, b",
                                                 "requests_per_minute": 10, "budget_period": "day"})
    assert response.status_code == 200 and response["Cache-Control"] == "no-store"
    key = ApiKey.objects.get(name="ci")
    raw = response.context["new_key"]
    assert raw.startswith(key.prefix) and raw.encode() in response.content
    assert key.allowed_models == ["a", "b"] and key.requests_per_minute == 10
    listing = client.get("/manage/api-keys/")
    assert raw.encode() not in listing.content and key.prefix.encode() in listing.content
    assert _as(None).get("/v1/models", headers={"Authorization": f"Bearer {raw}"}).status_code == 200
    assert _as(member).post(f"/manage/api-keys/{key.pk}/revoke/").status_code == 403
    assert client.post(f"/manage/api-keys/{key.pk}/revoke/").status_code == 302
    assert _as(None).get("/v1/models", headers={"Authorization": f"Bearer {raw}"}).status_code == 401


def _actions(admin: User, member: User) -> list[tuple[str, dict]]:
    key, _ = ApiKey.create_with_raw_key(name="kept")
    return [
        ("/manage/users/", {"username": "mallory", "password": NEW_PASSWORD, "user_type": "admin"}),
        (f"/manage/users/{admin.pk}/delete/", {}),
        (f"/manage/users/{admin.pk}/type/", {"user_type": "user"}),
        ("/manage/api-keys/", {"name": "sneaky", "budget_period": "day"}),
        (f"/manage/api-keys/{key.pk}/revoke/", {}),
    ]


def test_no_action_works_without_its_permission_or_without_logging_in(admin: User, member: User) -> None:
    for path, form in _actions(admin, member):
        assert _as(member).post(path, form).status_code == 403, path
        visitor = _as(None).post(path, form)
        assert visitor.status_code == 302 and visitor["Location"].startswith("/login/"), path
    assert not User.objects.filter(username="mallory").exists()
    assert User.objects.get(pk=admin.pk).user_type == "admin"
    assert ApiKey.objects.filter(name="kept").exists() and not ApiKey.objects.filter(name="sneaky").exists()


def test_the_pages_styles_are_served_with_debug_off() -> None:
    assert not settings.DEBUG
    for path in ("/static/css/optimagpt.css", "/static/admin/css/base.css"):
        response = Client().get(path)
        assert response.status_code == 200 and response["Content-Type"].startswith("text/css")
