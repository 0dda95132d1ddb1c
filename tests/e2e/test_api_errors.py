"""Bad input through the real stack gets OpenAI's error body, the right status, and no secret echoed."""

from __future__ import annotations

import httpx
import openai
import pytest

from tests.conftest import MODEL_ID

pytestmark = pytest.mark.e2e


def _post(gateway, path: str, *, headers: dict[str, str], **kwargs) -> httpx.Response:
    return httpx.post(gateway.url + path, headers=headers, timeout=30, **kwargs)


def _assert_openai_error(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    return error


@pytest.mark.parametrize("header", ["Bearer", "ApiKey", "X-API-Key"])
def test_each_key_header_form_is_accepted(gateway, node, api_key, header) -> None:
    headers = {"X-API-Key": api_key} if header == "X-API-Key" else {"Authorization": f"{header} {api_key}"}
    assert httpx.get(gateway.url + "/v1/models", headers=headers, timeout=10).status_code == 200


def test_a_missing_key_is_401(gateway, node) -> None:
    error = _assert_openai_error(httpx.get(gateway.url + "/v1/models", timeout=10), 401)
    assert error["code"] == "missing_api_key"


def test_a_wrong_key_is_401_and_not_echoed(gateway, node) -> None:
    wrong = "sk-optima-this-is-not-a-real-key-but-looks-like-one"
    client = openai.OpenAI(base_url=gateway.url + "/v1", api_key=wrong, max_retries=0)
    with pytest.raises(openai.AuthenticationError) as exc:
        client.chat.completions.create(model=MODEL_ID, messages=[{"role": "user", "content": "x"}])
    assert exc.value.body["code"] == "invalid_api_key"
    assert wrong not in str(exc.value.body)
    assert wrong not in gateway.log()


def test_an_unknown_model_is_404(client) -> None:
    with pytest.raises(openai.NotFoundError) as exc:
        client.chat.completions.create(model="gpt-17", messages=[{"role": "user", "content": "x"}])
    assert exc.value.body["param"] == "model"


def test_malformed_json_is_400(gateway, node, api_key) -> None:
    response = _post(gateway, "/v1/chat/completions", content=b'{"model": "x", "messages": [',
                     headers={"Authorization": f"Bearer {api_key}", "Content-Type": "application/json"})
    assert "not valid JSON" in _assert_openai_error(response, 400)["message"]


@pytest.mark.parametrize("body, param", [
    ({"model": MODEL_ID, "messages": "hello"}, "messages"),
    ({"model": MODEL_ID, "messages": []}, "messages"),
    ({"model": MODEL_ID, "messages": [{"role": "wizard", "content": "x"}]}, "messages"),
    ({"model": 42, "messages": [{"role": "user", "content": "x"}]}, "model"),
    ({"model": MODEL_ID, "messages": [{"role": "user", "content": "x"}], "temperature": "hot"}, "temperature"),
    ({"model": MODEL_ID, "messages": [{"role": "user", "content": "x"}], "temperature": 7}, "temperature"),
    ({"model": MODEL_ID, "messages": [{"role": "user", "content": "x"}], "stream": "maybe"}, "stream"),
    ({"model": MODEL_ID, "messages": [{"role": "user", "content": "x"}], "max_tokens": -5}, "max_tokens"),
    ({"model": MODEL_ID, "messages": [{"role": "user", "content": "x"}], "max_tokens": 0}, "max_tokens"),
    ({"model": MODEL_ID, "messages": [{"role": "user", "content": "x"}], "max_tokens": 10**12}, "max_tokens"),
    ({"model": MODEL_ID, "messages": [{"role": "user", "content": "x"}], "max_completion_tokens": -1},
     "max_completion_tokens"),
    ({"model": MODEL_ID, "messages": [{"role": "user", "content": "x"}], "n": 9}, "n"),
    ({"model": MODEL_ID, "messages": [{"role": "user", "content": "x"}], "n": 0}, "n"),
    ({"model": MODEL_ID, "messages": [{"role": "user", "content": "x"}], "logprobs": True}, "logprobs"),
    ({"model": MODEL_ID, "messages": [{"role": "user", "content": "x"}], "tool_choice": "required"}, None),
    ({"messages": [{"role": "user", "content": "x"}]}, "model"),
])
def test_an_invalid_body_is_400_naming_the_field(gateway, node, api_key, body, param) -> None:
    response = _post(gateway, "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {api_key}"})
    error = _assert_openai_error(response, 400)
    assert error["type"] == "invalid_request_error"
    if param:
        assert error["param"] == param


def test_a_body_over_the_size_limit_is_413(gateway, node, api_key) -> None:
    huge = "x" * (9 * 1024 * 1024)
    response = _post(gateway, "/v1/chat/completions", headers={"Authorization": f"Bearer {api_key}"},
                     json={"model": MODEL_ID, "messages": [{"role": "user", "content": huge}]})
    assert _assert_openai_error(response, 413)["code"] == "request_too_large"


def test_a_prompt_longer_than_the_context_window_is_400(client) -> None:
    with pytest.raises(openai.BadRequestError) as exc:
        client.chat.completions.create(model=MODEL_ID, messages=[{"role": "user", "content": "word " * 6000}],
                                       max_tokens=5)
    assert "context" in exc.value.body["message"]


def test_an_unenforceable_schema_is_400_and_the_node_keeps_serving(client) -> None:
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(
            model=MODEL_ID, messages=[{"role": "user", "content": "x"}], max_tokens=5,
            response_format={"type": "json_schema", "json_schema": {"name": "bad", "schema": {"$ref": "#/nowhere"}}})
    assert client.chat.completions.create(model=MODEL_ID, messages=[{"role": "user", "content": "x"}],
                                          max_tokens=1).choices
