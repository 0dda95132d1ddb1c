"""/optima/v1/models and /optima/v1/capabilities, in process: grouping by model id, and 503 while nothing serves."""

from __future__ import annotations

import pytest
from django.test import AsyncClient

from nodes.models import Executor
from tests.factories import akey_make, anode_make

pytestmark = pytest.mark.django_db(transaction=True)


async def _get(path: str) -> tuple[int, dict]:
    _, raw = await akey_make("optima")
    response = await AsyncClient().get(path, headers={"Authorization": f"Bearer {raw}"})
    return response.status_code, response.json()


async def test_capabilities_are_503_in_openai_form_while_nothing_can_serve() -> None:
    node = await anode_make("starting")
    await Executor.objects.acreate(node=node, key="m.gguf", model_id="m", state="starting")
    status, body = await _get("/optima/v1/capabilities")
    assert status == 503
    assert body["error"]["code"] == "not_ready" and body["canChat"] is False and body["numNodes"] == 1


async def test_capabilities_say_what_can_be_served() -> None:
    node = await anode_make("n")
    await Executor.objects.acreate(node=node, key="e.gguf", model_id="e", state="online", embedding=True)
    status, body = await _get("/optima/v1/capabilities")
    assert status == 200
    assert body == {"canChat": False, "canEmbed": True, "numNodes": 1, "routing": "least_busy"}


async def test_models_are_one_entry_per_id_with_the_smallest_window_and_only_running_ones() -> None:
    a, b, gone = await anode_make("a"), await anode_make("b"), await anode_make("gone", connected=False)
    await Executor.objects.acreate(node=a, key="m.gguf", model_id="m", name="M", state="online", n_ctx=4096,
                                   description="")
    await Executor.objects.acreate(node=b, key="m.gguf", model_id="m", name="M", state="online", n_ctx=2048,
                                   description="the m model")
    await Executor.objects.acreate(node=b, key="off.gguf", model_id="off", state="offline", n_ctx=2048)
    await Executor.objects.acreate(node=gone, key="g.gguf", model_id="g", state="online", n_ctx=2048)
    await Executor.objects.acreate(node=a, key="embed:e.gguf", model_id="e", name="E", state="online",
                                   embedding=True, embedding_length=384)
    status, body = await _get("/optima/v1/models")
    assert status == 200
    assert body["chat_models"] == [{"id": "m", "name": "M", "owned_by": "optimagpt", "ctx_max": 2048,
                                    "description": "the m model"}]
    assert body["embed_models"] == [{"id": "e", "name": "E", "owned_by": "optimagpt", "dimensions": 384,
                                     "description": ""}]


async def test_optima_endpoints_need_credentials() -> None:
    for path in ("/optima/v1/models", "/optima/v1/capabilities", "/optima/v1/executors"):
        response = await AsyncClient().get(path)
        assert response.status_code == 401 and response.json()["error"]["code"] == "missing_api_key"


async def test_a_remote_upstreams_key_that_no_header_can_carry_is_400_not_500(admin) -> None:
    """Found by the schemathesis run once /docs described the body: a non-ASCII key failed in the HTTP client."""
    _, raw = await akey_make("manager", owner=admin, scopes=["management"])
    for key in ("ключ", "two words", "tab\there"):
        response = await AsyncClient().post("/optima/v1/executors", {
            "name": "r", "model_id": "r", "base_url": "https://upstream.example/v1", "api_key": key},
            content_type="application/json", headers={"Authorization": f"Bearer {raw}"})
        assert response.status_code == 400, (key, response.content)
        assert response.json()["error"]["param"] == "api_key"

