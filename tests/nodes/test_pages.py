"""The executors pages: each action needs Executor Management; failures are messages and change nothing."""

from __future__ import annotations

import pytest
from django.contrib.auth.models import Permission
from django.test import Client
from django.utils import timezone

from accounts.models import User
from gateway.routing import load, router
from nodes.models import Executor, Node
from nodes.status import Demand, node_status
from tests.factories import node_make

pytestmark = pytest.mark.django_db(transaction=True)


def _status(node: Node) -> str:
    """The colour as the pages show it, from the router's own load numbers (executors queried afresh)."""
    return node_status(node, Demand(in_flight=load.in_flight, queued=router.queued))


def _as(user: User | None) -> Client:
    client = Client()
    if user is not None:
        client.force_login(user)
    return client


@pytest.fixture
def local() -> Executor:
    node = node_make("far-node", connected=False)
    return Executor.objects.create(node=node, key="m.gguf", model_id="m", state="offline", valid=True,
                                   settings={"enabled": False, "n_ctx": 0, "replicas": 1})


def _actions(executor: Executor) -> list[tuple[str, str]]:
    pk = executor.pk
    return [("get", "/manage/executors/"), ("get", "/manage/executors/?format=json"),
            ("get", f"/manage/executors/{pk}/"), ("post", f"/manage/executors/{pk}/"),
            ("post", f"/manage/executors/{pk}/start/"), ("post", f"/manage/executors/{pk}/stop/"),
            ("post", f"/manage/executors/{pk}/delete/"), ("post", "/manage/executors/")]


def test_every_action_is_refused_without_the_permission_and_changes_nothing(
        member: User, local: Executor) -> None:
    for method, path in _actions(local):
        response = getattr(_as(member), method)(path, {"replicas": 2, "name": "x", "model_id": "x",
                                                       "base_url": "http://127.0.0.1:9/v1"})
        assert response.status_code == 403, (method, path)
        response = getattr(_as(None), method)(path)
        assert response.status_code == 302 and "/login/" in response["Location"], (method, path)
    assert Executor.objects.count() == 1 and Executor.objects.get().settings["replicas"] == 1


def test_the_menu_shows_executors_only_with_the_permission(admin: User, member: User) -> None:
    assert b'href="/manage/executors/"' in _as(admin).get("/manage/users/").content
    member.user_permissions.add(*admin.user_permissions.filter(codename="manage_users"))
    assert b'href="/manage/executors/"' not in _as(member).get("/manage/users/").content


def test_the_list_shows_models_and_a_start_on_a_disconnected_node_explains_itself(
        admin: User, local: Executor) -> None:
    page = _as(admin).get("/manage/executors/")
    assert page.status_code == 200 and b"far-node" in page.content and b"Start" in page.content
    response = _as(admin).post(f"/manage/executors/{local.pk}/start/", follow=True)
    assert b"is not connected" in response.content
    local.refresh_from_db()
    assert local.state == "offline" and local.settings["enabled"] is False
    data = _as(admin).get("/manage/executors/?format=json").json()["data"]
    assert [(e["model_id"], e["state"], e["node"]["connected"]) for e in data] == [("m", "offline", False)]


def test_bad_settings_are_shown_on_the_form(admin: User, local: Executor) -> None:
    response = _as(admin).post(f"/manage/executors/{local.pk}/", {"replicas": 0, "n_ctx": -3})
    assert response.status_code == 400
    assert b"greater than or equal to 1" in response.content


def test_a_remote_upstream_added_on_the_page_keeps_its_key_secret(admin: User) -> None:
    secret = "sk-remote-" + "s" * 30
    response = _as(admin).post("/manage/executors/", {
        "name": "cloud", "model_id": "cloud-model", "base_url": "http://127.0.0.1:9/v1", "api_key": secret,
        "enabled": "on"}, follow=True)
    assert response.status_code == 200
    remote = Executor.objects.get(key="cloud")
    # Nothing listens on port 9: it is saved, marked failed with the reason, and not routed.
    assert remote.state == "failed" and remote.error.startswith("unreachable")
    assert remote.upstream_key() == secret and secret not in remote.upstream_key_encrypted
    for page in ("/manage/executors/", f"/manage/executors/{remote.pk}/", "/manage/executors/?format=json"):
        assert secret.encode() not in _as(admin).get(page).content
    assert _as(admin).post(f"/manage/executors/{remote.pk}/delete/").status_code == 302
    assert not Executor.objects.filter(key="cloud").exists()


def test_the_settings_form_sends_only_what_changed(local: Executor) -> None:
    from nodes.forms import ExecutorSettingsForm

    local.settings = {"enabled": True, "alias": "", "description": "", "n_ctx": 0, "n_gpu_layers": None,
                      "threads": 0, "replicas": 1, "chat_format": "", "embedding": None, "max_tokens": 0}
    form = ExecutorSettingsForm.for_executor(local, {"enabled": "on", "replicas": "2", "embedding": "",
                                                     "n_ctx": "", "alias": "smol"})
    assert form.is_valid(), form.errors
    assert form.changes() == {"replicas": 2, "alias": "smol"}
    form = ExecutorSettingsForm.for_executor(local, {"enabled": "on", "replicas": "1", "embedding": "true"})
    assert form.is_valid() and form.changes() == {"embedding": True}


def test_node_actions_need_node_management_and_change_nothing_without_it(
        admin: User, member: User, local: Executor) -> None:
    node = local.node
    for method, path in (("get", "/manage/nodes/"), ("get", "/manage/nodes/new/"), ("post", "/manage/nodes/new/"),
                         ("get", "/manage/nodes/new/name/"), ("post", f"/manage/nodes/{node.pk}/activation/"),
                         ("post", f"/manage/nodes/{node.pk}/delete/")):
        assert getattr(_as(member), method)(path, {"activated": "false", "host": "x", "port": 1,
                                                   "name": "x"}).status_code == 403, (method, path)
        assert getattr(_as(None), method)(path).status_code == 302, (method, path)
    node.refresh_from_db()
    assert node.activated and Node.objects.count() == 1
    assert b"New Node" in _as(admin).get("/manage/nodes/").content
    member.user_permissions.add(*admin.user_permissions.filter(codename="manage_executors"))
    page = _as(member).get("/manage/executors/")
    assert page.status_code == 200 and b"New Node" not in page.content and b'href="/manage/nodes/"' not in page.content


def test_status_colours_follow_link_and_models() -> None:
    node = node_make("n")
    assert _status(node) == "green"
    executor = Executor.objects.create(node=node, key="a.gguf", model_id="a", state="starting")
    assert _status(node) == "amber"
    executor.state = "failed"
    executor.save()
    assert _status(node) == "red"
    Executor.objects.create(node=node, key="notes.gguf", model_id="notes", state="failed", valid=False)
    executor.delete()
    assert _status(node) == "green", "an invalid file does not make the node red"
    Node.objects.filter(pk=node.pk).update(last_seen=timezone.now() - timezone.timedelta(minutes=1))
    node.refresh_from_db()
    assert _status(node) == "red", "silent for three heartbeats"
    node.activated = False
    assert _status(node) == "grey"


def test_the_wizard_suggests_a_name_and_reports_an_unreachable_node(admin: User) -> None:
    page = _as(admin).get("/manage/nodes/new/")
    assert page.status_code == 200 and b'value="8022"' in page.content
    first = _as(admin).get("/manage/nodes/new/name/").json()["name"]
    assert "-" in first
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, not listening: refused
        response = _as(admin).post("/manage/nodes/new/", {"name": "n1", "host": "127.0.0.1", "port": port,
                                                           "step": "verify"})
    assert response.status_code == 400 and b"nothing is listening" in response.content
    bad = _as(admin).post("/manage/nodes/new/", {"name": "n1", "host": "http://x/", "port": 8022})
    assert bad.status_code == 400 and b"without scheme" in bad.content
    assert not Node.objects.exists()


def test_a_node_with_more_requests_than_processes_or_a_queue_for_its_model_is_amber() -> None:
    from gateway.routing import router

    node = node_make("busy")
    executor = Executor.objects.create(node=node, key="a.gguf", model_id="a", state="online", replicas_online=2)
    target = router.Target(executor_pk=executor.pk, executor_key="a.gguf", channel_name="c", node_pk=node.pk, model="a")
    held = []
    for _ in range(2):
        router.acquire(target)
        held.append(target)
    assert _status(node) == "green", "two requests, two processes: busy but nothing waits"
    router.acquire(target)
    held.append(target)
    assert _status(node) == "amber", "a request waits on the node"
    for t in held:
        router.release(t)
    assert _status(node) == "green"
    queue = router._queues.setdefault("a", router.ModelQueue("a"))
    queue.length = 1  # a request waits at the gateway for this node's model
    try:
        assert _status(node) == "amber"
    finally:
        del router._queues["a"]


def test_the_front_page_is_the_chat_and_the_nodes_page_for_node_managers_who_may_not_chat(
        admin: User, member: User) -> None:
    assert b'id="chat"' in _as(admin).get("/").content
    assert b'id="chat"' in _as(member).get("/").content
    admin.user_permissions.set(Permission.objects.filter(codename="manage_nodes"))
    admin.is_superuser = False
    admin.save()
    assert _as(User.objects.get(pk=admin.pk)).get("/")["Location"] == "/manage/nodes/"
    visitor = _as(None).get("/")
    assert visitor.status_code == 200 and b'id="chat"' not in visitor.content
