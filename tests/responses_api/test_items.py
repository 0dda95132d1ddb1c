"""Responses items to chat messages and back: the translation every request goes through."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from responses_api.items import chat_messages, chat_request, chat_tools, echoed, stored_items
from responses_api.runner import _custom_input
from responses_api.schemas import ResponseIn


def _body(**fields: object) -> ResponseIn:
    return ResponseIn.model_validate({"model": "m", **fields})


def test_a_string_input_is_one_user_message_with_an_id_and_parts() -> None:
    items = stored_items(_body(input="Hello").items())
    assert len(items) == 1
    assert items[0]["id"].startswith("msg_") and items[0]["type"] == "message" and items[0]["role"] == "user"
    assert items[0]["content"] == [{"type": "input_text", "text": "Hello"}]


def test_instructions_come_first_and_developer_turns_are_system_turns() -> None:
    body = _body(instructions="Be brief.", input=[{"role": "developer", "content": "No jokes."},
                                                  {"role": "user", "content": [{"type": "input_text", "text": "Hi"}]}])
    chat = chat_request(body, [], stored_items(body.items()), chat_tools(body), stream=False)
    assert chat["messages"] == [{"role": "system", "content": "Be brief."}, {"role": "system", "content": "No jokes."},
                                {"role": "user", "content": "Hi"}]


def test_calls_join_the_assistant_turn_before_them_and_outputs_follow_as_tool_turns() -> None:
    items = stored_items(_body(input=[
        {"role": "user", "content": "Weather in Paris and a patch?"},
        {"type": "reasoning", "id": "rs_1", "summary": []},
        {"role": "assistant", "content": [{"type": "output_text", "text": "Checking."}]},
        {"type": "function_call", "call_id": "c1", "name": "get_weather", "arguments": '{"city":"Paris"}'},
        {"type": "custom_tool_call", "call_id": "c2", "name": "apply_patch", "input": "*** Begin Patch"},
        {"type": "function_call_output", "call_id": "c1", "output": "sunny"},
        {"type": "custom_tool_call_output", "call_id": "c2", "output": [{"type": "input_text", "text": "done"}]},
    ]).items())
    messages = chat_messages(items)
    assert messages == [
        {"role": "user", "content": "Weather in Paris and a patch?"},
        {"role": "assistant", "content": "Checking.", "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}},
            {"id": "c2", "type": "function", "function": {"name": "apply_patch",
                                                          "arguments": json.dumps({"input": "*** Begin Patch"})}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
        {"role": "tool", "tool_call_id": "c2", "content": "done"},
    ]


def test_an_mcp_call_brings_its_result_and_a_tool_list_is_not_shown() -> None:
    messages = chat_messages([
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "2+40?"}]},
        {"type": "mcp_list_tools", "id": "mcpl_1", "server_label": "calc", "tools": [{"name": "add"}]},
        {"type": "mcp_call", "id": "mcp_1", "server_label": "calc", "name": "add", "arguments": '{"a":2,"b":40}',
         "output": "42", "error": None},
        {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "42."}]},
    ])
    assert messages == [
        {"role": "user", "content": "2+40?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "mcp_1", "type": "function", "function": {"name": "calc_add", "arguments": '{"a":2,"b":40}'}}]},
        {"role": "tool", "tool_call_id": "mcp_1", "content": "42"},
        {"role": "assistant", "content": "42."},
    ]


def test_tools_become_functions_hosted_ones_are_left_out_and_named() -> None:
    body = _body(input="x", tools=[
        {"type": "function", "name": "f", "parameters": {"type": "object", "properties": {"a": {"type": "string"}}}},
        {"type": "custom", "name": "apply_patch", "format": {"type": "grammar", "syntax": "lark", "definition": "x"}},
        {"type": "web_search_preview"}, {"type": "code_interpreter", "container": {"type": "auto"}},
        {"type": "mcp", "server_label": "calc", "require_approval": "never"}])
    tools = chat_tools(body)
    assert tools.ignored == ["web_search_preview", "code_interpreter"]
    assert tools.custom == {"apply_patch"}
    assert [t["function"]["name"] for t in tools.tools] == ["f", "apply_patch"]
    assert tools.tools[1]["function"]["parameters"]["required"] == ["input"]
    chat = chat_request(body, [], stored_items(body.items()), tools, stream=True)
    assert chat["tools"][-1] == {"type": "mcp", "server_label": "calc", "require_approval": "never"}


def test_settings_map_onto_the_chat_completion() -> None:
    body = _body(input="x", max_output_tokens=7, temperature=0.5, top_p=0.9, user="u", truncation="auto",
                 text={"format": {"type": "json_schema", "name": "p", "schema": {"type": "object"}, "strict": True}},
                 tools=[{"type": "function", "name": "f"}], tool_choice={"type": "function", "name": "f"},
                 parallel_tool_calls=False)
    chat = chat_request(body, [], stored_items(body.items()), chat_tools(body), stream=False)
    assert chat["max_tokens"] == 7 and chat["temperature"] == 0.5 and chat["top_p"] == 0.9 and chat["user"] == "u"
    assert chat["truncation"] == "auto" and chat["parallel_tool_calls"] is False
    assert chat["tool_choice"] == {"type": "function", "function": {"name": "f"}}
    assert chat["response_format"] == {"type": "json_schema",
                                       "json_schema": {"name": "p", "schema": {"type": "object"}, "strict": True}}
    settings = echoed(body)
    assert settings["text"]["format"]["name"] == "p" and settings["truncation"] == "auto"
    assert settings["tool_choice"] == {"type": "function", "name": "f"}


@pytest.mark.parametrize("fields, where", [
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]}, "input"),
    ({"tools": [{"type": "mcp", "server_label": "calc", "server_url": "https://example.com/mcp"}]}, "tools"),
    ({"background": True, "store": False}, None),
    ({"top_logprobs": 2}, "top_logprobs"),
    ({"max_output_tokens": 0}, "max_output_tokens"),
    ({"truncation": "sometimes"}, "truncation"),
    ({"input": [{"type": "function_call_output", "output": "x"}]}, "input"),
])
def test_bad_requests_are_refused(fields: dict[str, object], where: str | None) -> None:
    with pytest.raises(ValidationError) as exc:
        _body(**{"input": "x", **fields})
    if where is not None:
        assert exc.value.errors()[0]["loc"][0] == where


def test_a_custom_tool_input_is_the_string_the_model_wrote() -> None:
    assert _custom_input(json.dumps({"input": "*** Begin Patch\n"})) == "*** Begin Patch\n"
    assert _custom_input("not json") == "not json"
