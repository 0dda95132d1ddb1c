"""The Configuration page: validated values stored and audited, applied at once, reset to the environment's;
System Tracing; the node access key's rotation with its grace period. Settings Access is needed."""

from __future__ import annotations

import math
import time

import pytest
from django.conf import settings
from django.test import Client

from accounts.models import User
from node_agent.protocol import auth_message, new_nonce
from operations import config, nodekeys
from operations.models import GatewaySetting, SettingChange

pytestmark = pytest.mark.django_db(transaction=True)

PAGES = ["/manage/settings/", "/manage/diagnostics/", "/manage/requests/", "/manage/diagnostics/logs/",
         "/manage/diagnostics/traces/"]


def _as(user: User | None) -> Client:
    client = Client()
    if user is not None:
        client.force_login(user)
    return client


@pytest.mark.parametrize("page", PAGES)
def test_each_operations_page_needs_settings_access(page: str, admin: User, outsider: User, member: User) -> None:
    assert _as(admin).get(page).status_code == 200
    assert _as(outsider).get(page).status_code == 403
    assert _as(member).get(page).status_code == 403
    anonymous = _as(None).get(page)
    assert anonymous.status_code == 302 and anonymous["Location"].startswith("/login/")


def test_a_granted_settings_access_opens_the_pages_and_shows_them_in_the_menu(outsider: User) -> None:
    from django.contrib.auth.models import Permission

    outsider.user_permissions.add(Permission.objects.get(codename="access_settings"))
    page = _as(User.objects.get(pk=outsider.pk)).get("/manage/settings/")
    assert page.status_code == 200
    assert b'href="/manage/diagnostics/"' in page.content and b'href="/manage/requests/"' in page.content


def test_a_saved_value_applies_at_once_is_audited_and_shows_where_it_comes_from(admin: User) -> None:
    client = _as(admin)
    before = settings.OPTIMAGPT_QUEUE_MAX_LENGTH
    page = client.get("/manage/settings/").content.decode()
    assert "built-in default" in page or "environment" in page
    response = client.post("/manage/settings/", {"action": "save", "OPTIMAGPT_QUEUE_MAX_LENGTH": "7",
                                                 "OPTIMAGPT_ROUTING": "round_robin"})
    assert response.status_code == 302
    assert settings.OPTIMAGPT_QUEUE_MAX_LENGTH == 7 and settings.OPTIMAGPT_ROUTING == "round_robin"
    assert GatewaySetting.objects.get(name="OPTIMAGPT_QUEUE_MAX_LENGTH").value == 7
    change = SettingChange.objects.get(name="OPTIMAGPT_QUEUE_MAX_LENGTH")
    assert (change.username, change.old, change.new) == ("ada", str(before), "7")
    page = client.get("/manage/settings/").content.decode()
    assert "Configuration page, by ada" in page
    assert "round_robin" in page and "OPTIMAGPT_QUEUE_MAX_LENGTH" in page

    # Reset: the environment's value again, and that is audited too.
    assert client.post("/manage/settings/", {"action": "reset:OPTIMAGPT_QUEUE_MAX_LENGTH"}).status_code == 302
    assert settings.OPTIMAGPT_QUEUE_MAX_LENGTH == before
    assert not GatewaySetting.objects.filter(name="OPTIMAGPT_QUEUE_MAX_LENGTH").exists()
    assert SettingChange.objects.filter(name="OPTIMAGPT_QUEUE_MAX_LENGTH").count() == 2


@pytest.mark.parametrize(("name", "raw", "message"), [
    ("OPTIMAGPT_QUEUE_MAX_LENGTH", "-1", "Queue length must be at least 0."),
    ("OPTIMAGPT_QUEUE_MAX_LENGTH", "ten", "Queue length must be a whole number."),
    ("OPTIMAGPT_REQUEST_DEADLINE_S", "0", "Request deadline must be more than 0 s."),
    ("OPTIMAGPT_REQUEST_DEADLINE_S", "inf", "Request deadline must be a finite number."),
    ("OPTIMAGPT_ROUTING", "random", "Routing strategy must be one of least_busy, round_robin."),
    ("OPTIMAGPT_IP_AUTH_FAILURES_PER_MINUTE", "0", "Failed authentications per address must be at least 1."),
])
def test_an_invalid_value_is_refused_with_a_message_and_nothing_is_saved(admin: User, name: str, raw: str,
                                                                        message: str) -> None:
    before = getattr(settings, name)
    response = _as(admin).post("/manage/settings/", {"action": "save", name: raw,
                                                    "OPTIMAGPT_QUEUE_MAX_WAIT_S": "12"})
    assert response.status_code == 400
    assert message in response.content.decode()
    assert getattr(settings, name) == before
    assert settings.OPTIMAGPT_QUEUE_MAX_WAIT_S != 12 or config.environment()["OPTIMAGPT_QUEUE_MAX_WAIT_S"] == 12
    assert not GatewaySetting.objects.exists() and not SettingChange.objects.exists()


def test_a_stored_value_that_is_no_longer_valid_leaves_the_environments_in_force(admin: User) -> None:
    GatewaySetting.objects.create(name="OPTIMAGPT_ROUTING", value="fastest")
    config.settings_apply()
    assert settings.OPTIMAGPT_ROUTING == config.environment()["OPTIMAGPT_ROUTING"]


def test_tracing_switches_on_for_a_while_off_by_hand_and_off_at_start(admin: User) -> None:
    client = _as(admin)
    assert not config.tracing_on()
    assert b"Switch on" in client.get("/manage/settings/").content
    client.post("/manage/settings/", {"action": "tracing", "tracing": "on"})
    assert config.tracing_on()
    assert abs(config.tracing_until() - (time.time() + settings.OPTIMAGPT_TRACING_MAX_S)) < 5
    assert b"Switch off" in client.get("/manage/settings/").content
    client.post("/manage/settings/", {"action": "tracing", "tracing": "off"})
    assert not config.tracing_on()

    client.post("/manage/settings/", {"action": "tracing", "tracing": "on"})
    config.tracing_off_at_start()  # what a gateway does when it starts
    config.settings_apply()
    assert not config.tracing_on()
    assert [c.new.split(" ")[0] for c in SettingChange.objects.filter(name="System Tracing").order_by("pk")] == [
        "on", "off", "on"]


def test_tracing_switches_itself_off_after_its_longest_time(admin: User, settings: object) -> None:
    settings.OPTIMAGPT_TRACING_MAX_S = 0.3  # type: ignore[attr-defined]
    config.tracing_switch(username="ada", on=True)
    assert config.tracing_on()
    time.sleep(0.4)
    assert not config.tracing_on()


def _auth(key: str, nonce: str) -> dict[str, object]:
    return auth_message(key=key, hello={"nonce": nonce}, node_id="11111111-2222-3333-4444-555555555555",
                        node_nonce=new_nonce(), name="n", version="1")


def test_a_rotated_node_key_is_shown_once_and_the_old_one_is_accepted_only_for_its_grace(admin: User) -> None:
    old = settings.OPTIMAGPT_NODE_ACCESS_KEY
    client = _as(admin)
    page = client.get("/manage/settings/").content.decode()
    assert old not in page and "set" in page
    response = client.post("/manage/settings/", {"action": "rotate", "grace_hours": str(0.5 / 3600)})
    assert response.status_code == 200
    new = response.context["new_key"]
    assert len(new) >= 40 and new in response.content.decode() and old not in response.content.decode()
    # Stored encrypted: the key is in no row as text, and the page does not show it again.
    stored = " ".join(str(row.value) for row in GatewaySetting.objects.all())
    assert new not in stored and old not in stored
    assert new not in client.get("/manage/settings/").content.decode()
    assert "rotated" in SettingChange.objects.get(name="Node access key").new
    assert new not in " ".join(f"{c.old} {c.new}" for c in SettingChange.objects.all())

    nonce = new_nonce()
    assert nodekeys.handshake_key(_auth(new, nonce), gateway_nonce=nonce)[:2] == (new, math.inf)
    key, until, refusal = nodekeys.handshake_key(_auth(old, nonce), gateway_nonce=nonce)
    assert key == old and refusal is None and until < time.time() + 1
    time.sleep(0.6)
    assert nodekeys.handshake_key(_auth(old, nonce), gateway_nonce=nonce) == ("", 0.0, "access key mismatch")
    assert nodekeys.handshake_key(_auth("a-key-nobody-has", nonce), gateway_nonce=nonce)[2] == "access key mismatch"


def test_a_grace_period_out_of_range_is_refused(admin: User) -> None:
    client = _as(admin)
    response = client.post("/manage/settings/", {"action": "rotate", "grace_hours": "-1"}, follow=True)
    assert "The grace period must be between 0 and 30 days." in response.content.decode()
    response = client.post("/manage/settings/", {"action": "rotate", "grace_hours": "soon"}, follow=True)
    assert "The grace period must be a number of hours." in response.content.decode()
    assert not GatewaySetting.objects.exists()


def test_the_pages_need_a_post_with_csrf(admin: User) -> None:
    client = Client(enforce_csrf_checks=True)
    client.force_login(admin)
    assert client.post("/manage/settings/", {"action": "tracing", "tracing": "on"}).status_code == 403
    assert not config.tracing_on()
