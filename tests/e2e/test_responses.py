"""The Responses API with the official openai SDK, unmodified, against real daphne and node processes.

The real model (the session's SmolLM2 node) where the behaviour is the model's: text, streaming, a chain of
turns, json_schema, the window. The node simulator's scripted replies where a tool call must happen, and a
real MCP server (tests/mcp/server.py) for MCP tools.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import jsonschema
import openai
import pytest

from tests.conftest import MODEL_ID
from tests.processes import REPO, Gateway, McpTestServer, SimulatedNodes, free_port, mcp_server_add, wait_for

pytestmark = pytest.mark.e2e

PERSON_SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
    "required": ["name", "age"],
    "additionalProperties": False,
}
WEATHER = {"type": "function", "name": "get_weather", "description": "Current weather in a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}
PATCH = {"type": "custom", "name": "apply_patch", "description": "Apply a patch to the files",
         "format": {"type": "grammar", "syntax": "lark", "definition": "start: /.+/"}}
CALC = {"type": "mcp", "server_label": "calc", "require_approval": "never"}
SLOW_REPLY = " ".join(f"t{i}" for i in range(60))  # six seconds, a word every 0.1 s


def _events(stream: object) -> list[object]:
    return list(stream)  # type: ignore[call-overload]


# -- the real model -------------------------------------------------------------------------------------------
def test_a_response_is_made_stored_listed_and_deleted(client: openai.OpenAI) -> None:
    reply = client.responses.create(model=MODEL_ID, input="Say hello.", max_output_tokens=12, temperature=0)
    assert reply.id.startswith("resp_") and reply.object == "response" and reply.model == MODEL_ID
    assert reply.status in ("completed", "incomplete") and reply.error is None
    assert reply.output[0].type == "message" and reply.output[0].id.startswith("msg_")
    assert reply.output_text.strip()
    usage = reply.usage
    assert usage is not None and usage.input_tokens > 0 and 0 < usage.output_tokens <= 12
    assert usage.total_tokens == usage.input_tokens + usage.output_tokens
    assert usage.input_tokens_details.cached_tokens == 0 and usage.output_tokens_details.reasoning_tokens == 0
    assert reply.store is True and reply.temperature == 0 and reply.max_output_tokens == 12
    assert reply.tools == [] and reply.tool_choice == "auto" and reply.truncation == "disabled"

    again = client.responses.retrieve(reply.id)
    assert again.output_text == reply.output_text and again.usage == reply.usage and again.status == reply.status
    assert again.created_at == reply.created_at and again.completed_at == reply.completed_at >= reply.created_at
    items = client.responses.input_items.list(reply.id)
    assert [(i.type, i.role, i.content[0].text) for i in items.data] == [("message", "user", "Say hello.")]
    assert items.data[0].id.startswith("msg_")

    deleted = client.responses.delete(reply.id)
    assert deleted is None  # the SDK returns nothing for a 200 here; the body is checked below
    with pytest.raises(openai.NotFoundError) as exc:
        client.responses.retrieve(reply.id)
    assert exc.value.status_code == 404 and reply.id in exc.value.message


def test_the_delete_answer_is_openais(gateway: Gateway, client: openai.OpenAI, api_key: str) -> None:
    reply = client.responses.create(model=MODEL_ID, input="Hi", max_output_tokens=2)
    answer = httpx.delete(f"{gateway.url}/v1/responses/{reply.id}", headers={"Authorization": f"Bearer {api_key}"})
    assert answer.status_code == 200 and answer.json() == {"id": reply.id, "object": "response", "deleted": True}
    again = httpx.delete(f"{gateway.url}/v1/responses/{reply.id}", headers={"Authorization": f"Bearer {api_key}"})
    assert again.status_code == 404 and again.json()["error"]["code"] == "not_found"


def test_store_false_keeps_nothing(client: openai.OpenAI) -> None:
    reply = client.responses.create(model=MODEL_ID, input="Hi", max_output_tokens=3, store=False)
    assert reply.store is False and reply.output_text
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(reply.id)
    with pytest.raises(openai.NotFoundError) as exc:
        client.responses.create(model=MODEL_ID, input="And?", previous_response_id=reply.id, max_output_tokens=2)
    assert exc.value.body["param"] == "previous_response_id"


def test_a_stream_has_openais_events_in_order(client: openai.OpenAI) -> None:
    with client.responses.stream(model=MODEL_ID, input="Count to five.", max_output_tokens=10, temperature=0) as stream:
        events = _events(stream)
    final = events[-1].response  # (get_final_response() wants response.completed; 10 tokens may cut it short)
    kinds = [e.type for e in events]
    deltas = [e for e in events if e.type == "response.output_text.delta"]
    assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]
    assert kinds[4:4 + len(deltas)] == ["response.output_text.delta"] * len(deltas) and deltas
    assert kinds[4 + len(deltas):] == ["response.output_text.done", "response.content_part.done",
                                       "response.output_item.done",
                                       "response.completed" if final.status == "completed" else "response.incomplete"]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert events[0].response.status == "in_progress" and events[0].response.output == []
    assert "".join(d.delta for d in deltas) == final.output_text == events[-2].item.content[0].text
    assert final.usage is not None and final.usage.output_tokens <= 10
    assert client.responses.retrieve(final.id).output_text == final.output_text


def test_the_stream_is_sse_with_event_names_and_no_done_line(gateway: Gateway, api_key: str) -> None:
    with httpx.stream("POST", gateway.url + "/v1/responses", headers={"Authorization": f"Bearer {api_key}"},
                      json={"model": MODEL_ID, "input": "Hi", "max_output_tokens": 3, "stream": True},
                      timeout=60) as answer:
        assert answer.status_code == 200 and answer.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in answer.iter_lines() if line]
    assert "data: [DONE]" not in lines
    names = [line.removeprefix("event: ") for line in lines if line.startswith("event: ")]
    datas = [json.loads(line.removeprefix("data: ")) for line in lines if line.startswith("data: ")]
    assert names == [d["type"] for d in datas] and names[0] == "response.created"
    assert names[-1] in ("response.completed", "response.incomplete")


def test_a_chain_of_three_turns_is_rebuilt_from_what_was_stored(client: openai.OpenAI) -> None:
    first = client.responses.create(model=MODEL_ID, instructions="Answer in one word.",
                                    input="My name is Ada.", max_output_tokens=5, temperature=0)
    second = client.responses.create(model=MODEL_ID, previous_response_id=first.id, input="What is my name?",
                                     max_output_tokens=5, temperature=0)
    third = client.responses.create(model=MODEL_ID, previous_response_id=second.id, input="Say it again.",
                                    max_output_tokens=5, temperature=0)
    assert third.previous_response_id == second.id and second.previous_response_id == first.id
    # The same turns sent by hand, without the first request's instructions (they applied to it alone):
    # exactly as many prompt tokens, so the gateway fed the model exactly that.
    by_hand = client.responses.create(model=MODEL_ID, max_output_tokens=5, temperature=0, store=False, input=[
        {"role": "user", "content": "My name is Ada."},
        {"role": "assistant", "content": first.output_text},
        {"role": "user", "content": "What is my name?"},
        {"role": "assistant", "content": second.output_text},
        {"role": "user", "content": "Say it again."}])
    assert third.usage.input_tokens == by_hand.usage.input_tokens > second.usage.input_tokens
    assert third.output_text == by_hand.output_text, "same prompt, greedy sampling: same answer"
    assert third.instructions is None and first.instructions == "Answer in one word."
    items = client.responses.input_items.list(third.id)
    assert [i.content[0].text for i in items.data] == ["Say it again."]


def test_json_schema_is_enforced(client: openai.OpenAI) -> None:
    reply = client.responses.create(
        model=MODEL_ID, input="Invent a person.", max_output_tokens=60, temperature=0,
        text={"format": {"type": "json_schema", "name": "person", "schema": PERSON_SCHEMA, "strict": True}})
    jsonschema.validate(json.loads(reply.output_text), PERSON_SCHEMA)
    assert reply.text.format.type == "json_schema" and reply.text.format.name == "person"


def test_max_output_tokens_makes_an_incomplete_response(client: openai.OpenAI) -> None:
    reply = client.responses.create(model=MODEL_ID, input="Tell me a long story about a dragon.", max_output_tokens=2)
    assert reply.status == "incomplete" and reply.incomplete_details.reason == "max_output_tokens"
    assert reply.usage.output_tokens == 2


def test_truncation_auto_drops_the_oldest_turns_and_disabled_refuses(client: openai.OpenAI) -> None:
    turns = []
    for i in range(80):  # far more than the test node's window (4096 tokens, node_agent/settings.py's --ctx)
        turns.append({"role": "user", "content": f"Question {i}: " + "tell me about the sea " * 12})
        turns.append({"role": "assistant", "content": "The sea is wide. " * 10})
    turns.append({"role": "user", "content": "Say yes."})
    with pytest.raises(openai.BadRequestError) as exc:
        client.responses.create(model=MODEL_ID, input=turns, max_output_tokens=4)
    assert exc.value.body["code"] == "context_length_exceeded"
    reply = client.responses.create(model=MODEL_ID, input=turns, max_output_tokens=4, truncation="auto",
                                    instructions="Be brief.")
    assert reply.status in ("completed", "incomplete") and reply.truncation == "auto"
    assert 2048 < reply.usage.input_tokens <= 4096 - 4


@pytest.mark.parametrize("fields, status, param", [
    ({"model": "no-such-model", "input": "Hi"}, 404, "model"),
    ({"model": MODEL_ID, "input": "Hi", "temperature": 5}, 400, "temperature"),
    ({"model": MODEL_ID, "input": "Hi", "previous_response_id": "resp_nothere"}, 404, "previous_response_id"),
    ({"model": MODEL_ID, "input": "Hi", "tools": [{"type": "mcp", "server_label": "x",
                                                   "server_url": "https://mcp.example.com"}]}, 400, "tools"),
    ({"model": MODEL_ID, "input": [{"role": "user", "content": [{"type": "input_image",
                                                                 "image_url": "https://example.com/a.png"}]}]},
     400, "input"),
    ({"model": MODEL_ID, "input": "Hi", "background": True, "store": False}, 400, None),
    ({"model": "no-such-model", "input": "Hi", "background": True}, 404, "model"),
    ({"model": MODEL_ID, "input": "Hi", "tool_choice": "required"}, 400, "tool_choice"),
])
def test_bad_requests_get_openais_errors(gateway: Gateway, api_key: str, fields: dict[str, object], status: int,
                                         param: str | None) -> None:
    answer = httpx.post(gateway.url + "/v1/responses", headers={"Authorization": f"Bearer {api_key}"}, json=fields,
                        timeout=60)
    assert answer.status_code == status, answer.text
    error = answer.json()["error"]
    assert error["message"] and error["type"] and (param is None or error["param"] == param), error


def test_unknown_paths_and_methods_under_responses_get_an_error_body(gateway: Gateway, api_key: str) -> None:
    headers = {"Authorization": f"Bearer {api_key}"}
    for method, path in (("GET", "/v1/responses/r/unknown"), ("PUT", "/v1/responses/r")):
        answer = httpx.request(method, gateway.url + path, headers=headers)
        assert answer.status_code in (404, 405) and answer.json()["error"]["message"], (method, path, answer.text)
    answer = httpx.get(gateway.url + "/v1/responses/resp_x/input_items?limit=500", headers=headers)
    assert answer.status_code == 400 and answer.json()["error"]["param"] == "limit"


def test_hosted_tools_are_left_out_and_named_in_a_header(client: openai.OpenAI) -> None:
    raw = client.responses.with_raw_response.create(
        model=MODEL_ID, input="Hi", max_output_tokens=2,
        tools=[{"type": "web_search_preview"}, {"type": "code_interpreter", "container": {"type": "auto"}}])
    assert raw.headers["x-optimagpt-ignored-tools"] == "web_search_preview, code_interpreter"
    reply = raw.parse()
    assert [t.type for t in reply.tools] == ["web_search_preview", "code_interpreter"]
    assert [o.type for o in reply.output] == ["message"]


def test_input_items_are_paged(client: openai.OpenAI) -> None:
    turns = [{"role": "user", "content": f"turn {i}"} for i in range(5)]
    reply = client.responses.create(model=MODEL_ID, input=turns, max_output_tokens=1)
    newest = client.responses.input_items.list(reply.id, limit=2)
    assert [i.content[0].text for i in newest.data] == ["turn 4", "turn 3"] and newest.has_more
    rest = client.responses.input_items.list(reply.id, limit=10, after=newest.last_id)
    assert [i.content[0].text for i in rest.data] == ["turn 2", "turn 1", "turn 0"] and not rest.has_more
    oldest = client.responses.input_items.list(reply.id, order="asc", limit=1)
    assert oldest.data[0].content[0].text == "turn 0" and oldest.first_id == oldest.last_id
    every = [i.content[0].text for i in client.responses.input_items.list(reply.id, order="asc", limit=1)]
    assert every == [f"turn {i}" for i in range(5)], "the SDK's auto-paging follows has_more and after"


def test_another_owners_responses_are_404_on_every_endpoint(gateway: Gateway, client: openai.OpenAI) -> None:
    mine = client.responses.create(model=MODEL_ID, input="Hi", max_output_tokens=2)
    other = openai.OpenAI(base_url=gateway.url + "/v1", api_key=gateway.create_api_key("someone-else"),
                          max_retries=0, timeout=60)
    for attempt in (lambda: other.responses.retrieve(mine.id), lambda: other.responses.delete(mine.id),
                    lambda: other.responses.input_items.list(mine.id), lambda: other.responses.cancel(mine.id),
                    lambda: other.responses.create(model=MODEL_ID, input="x", previous_response_id=mine.id)):
        with pytest.raises(openai.NotFoundError):
            attempt()
    assert client.responses.retrieve(mine.id).id == mine.id, "and it is still there for its owner"


# -- scripted tools, MCP, failures, background ------------------------------------------------------------------
@dataclass
class Stack:
    gateway: Gateway
    client: openai.OpenAI
    key: str
    sims: dict[str, SimulatedNodes]


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    base = tmp_path_factory.mktemp("responses")
    gateway = Gateway(data_dir=base, port=free_port())
    server = McpTestServer(log_dir=base)
    sims = {model: SimulatedNodes(gateway=gateway, log_dir=base, prefix=f"sim-{model}", model=model, **behaviour)
            for model, behaviour in {
                "weather": {"tool_call": "get_weather", "tool_args": '{"city": "Paris"}', "tokens": 2},
                "patcher": {"tool_call": "apply_patch", "tool_args": json.dumps({"input": "*** Begin Patch\n"})},
                "adder": {"tool_call": "add", "tool_args": '{"a": 2, "b": 40}'},
                "slow": {"reply": SLOW_REPLY, "token_rate": 10.0},
                "doomed": {"tokens": 200, "token_rate": 10.0},
            }.items()}
    try:
        gateway.start()
        server.start()
        for sim in sims.values():
            sim.start()
        browser = gateway.admin_browser("responses-admin", "a-long-admin-password-9")
        assert mcp_server_add(browser, "calc", url=server.url)["status"] == "connected"
        key = gateway.create_api_key("responses")
        client = openai.OpenAI(base_url=gateway.url + "/v1", api_key=key, max_retries=0, timeout=60)
        yield Stack(gateway, client, key, sims)
    finally:
        for sim in sims.values():
            sim.stop()
        server.stop()
        gateway.stop()


def test_a_function_tool_round_trip(stack: Stack) -> None:
    first = stack.client.responses.create(model="weather", input="Weather in Paris?", tools=[WEATHER])
    [call] = first.output
    assert call.type == "function_call" and call.name == "get_weather" and call.id.startswith("fc_")
    assert json.loads(call.arguments) == {"city": "Paris"} and call.call_id and call.status == "completed"
    assert first.status == "completed" and first.output_text == ""
    second = stack.client.responses.create(
        model="weather", previous_response_id=first.id, tools=[WEATHER],
        input=[{"type": "function_call_output", "call_id": call.call_id, "output": "sunny, 21 C"}])
    assert second.output_text == "Tool result: sunny, 21 C"
    # Without the chain the client sends the call back itself: the same answer.
    by_hand = stack.client.responses.create(model="weather", tools=[WEATHER], store=False, input=[
        {"role": "user", "content": "Weather in Paris?"},
        {"type": "function_call", "call_id": call.call_id, "name": "get_weather", "arguments": call.arguments},
        {"type": "function_call_output", "call_id": call.call_id, "output": "sunny, 21 C"}])
    assert by_hand.output_text == second.output_text


def test_a_streamed_function_call_has_its_argument_events(stack: Stack) -> None:
    with stack.client.responses.stream(model="weather", input="Weather?", tools=[WEATHER]) as stream:
        events = _events(stream)
        final = stream.get_final_response()
    kinds = [e.type for e in events]
    assert kinds == ["response.created", "response.in_progress", "response.output_item.added",
                     "response.function_call_arguments.delta", "response.function_call_arguments.done",
                     "response.output_item.done", "response.completed"]
    assert events[2].item.type == "function_call" and events[2].item.arguments == ""
    assert events[4].arguments == '{"city": "Paris"}' and events[4].name == "get_weather"
    assert final.output[0].arguments == '{"city": "Paris"}'


def test_a_custom_tool_is_called_with_one_string_and_takes_its_output_back(stack: Stack) -> None:
    first = stack.client.responses.create(model="patcher", input="Fix the bug.", tools=[PATCH])
    [call] = first.output
    assert call.type == "custom_tool_call" and call.name == "apply_patch" and call.input == "*** Begin Patch\n"
    second = stack.client.responses.create(
        model="patcher", previous_response_id=first.id, tools=[PATCH],
        input=[{"type": "custom_tool_call_output", "call_id": call.call_id, "output": "patched 1 file"}])
    assert second.output_text == "Tool result: patched 1 file"
    with stack.client.responses.stream(model="patcher", input="Fix it.", tools=[PATCH]) as stream:
        kinds = [e.type for e in _events(stream)]
    assert "response.custom_tool_call_input.done" in kinds and "response.function_call_arguments.delta" not in kinds


def test_an_mcp_server_runs_on_the_gateway_with_list_and_call_items(stack: Stack) -> None:
    reply = stack.client.responses.create(model="adder", input="What is 2 + 40?", tools=[CALC])
    kinds = [o.type for o in reply.output]
    assert kinds == ["mcp_list_tools", "mcp_call", "message"], kinds
    listing, call, message = reply.output
    assert listing.server_label == "calc" and "add" in [t.name for t in listing.tools]
    assert call.server_label == "calc" and call.name == "add" and json.loads(call.arguments) == {"a": 2, "b": 40}
    assert call.output == "42" and call.error is None
    assert reply.output_text == "Tool result: 42"
    # The next turn knows the tools already: no second listing; the call and its result are in its history.
    after = stack.client.responses.create(model="adder", previous_response_id=reply.id, input="Thanks", tools=[CALC])
    assert "mcp_list_tools" not in [o.type for o in after.output]
    with stack.client.responses.stream(model="adder", input="2 + 40?", tools=[CALC]) as stream:
        kinds = [e.type for e in _events(stream)]
    for kind in ("response.mcp_list_tools.completed", "response.mcp_call_arguments.done",
                 "response.mcp_call.in_progress", "response.mcp_call.completed", "response.output_text.delta"):
        assert kind in kinds, (kind, kinds)
    assert kinds.index("response.mcp_call.completed") < kinds.index("response.output_text.delta")


def test_an_unregistered_mcp_server_is_refused(stack: Stack) -> None:
    with pytest.raises(openai.BadRequestError) as exc:
        stack.client.responses.create(model="adder", input="x", tools=[{"type": "mcp", "server_label": "nope"}])
    assert exc.value.body["code"] == "mcp_server_not_found"


def test_a_node_killed_mid_stream_fails_the_response_and_keeps_the_partial_output(stack: Stack) -> None:
    sim = stack.sims["doomed"]
    kinds: list[str] = []
    failed = None
    with stack.client.responses.stream(model="doomed", input="Go on.") as stream:
        for event in stream:
            kinds.append(event.type)
            if kinds.count("response.output_text.delta") == 5:
                sim.kill()
            if event.type == "response.failed":
                failed = event.response
    assert failed is not None, kinds
    assert kinds[-1] == "response.failed" and failed.error.code == "node_disconnected"
    stored = stack.client.responses.retrieve(failed.id)
    assert stored.status == "failed" and stored.error.code == "node_disconnected"
    assert stored.output[0].status == "incomplete" and stored.output_text.startswith("t0 t1 t2 t3 t4")


def test_a_client_that_leaves_a_stream_stops_the_node_and_the_response_is_kept_cancelled(stack: Stack) -> None:
    with httpx.stream("POST", stack.gateway.url + "/v1/responses", headers={"Authorization": f"Bearer {stack.key}"},
                      json={"model": "slow", "input": "Hi", "stream": True}, timeout=60) as answer:
        deltas, response_id = 0, ""
        for line in answer.iter_lines():
            if line.startswith("data: "):
                event = json.loads(line[6:])
                if event["type"] == "response.created":
                    response_id = event["response"]["id"]
                deltas += event["type"] == "response.output_text.delta"
                if deltas == 3:
                    break
    # The simulated model serves one request at a time: had it gone on, this would wait the six seconds left.
    started = time.monotonic()
    assert stack.client.responses.create(model="slow", input="Hi", max_output_tokens=1).output_text == "t0 "
    assert time.monotonic() - started < 4
    stored = wait_for(lambda: (r := stack.client.responses.retrieve(response_id)).status == "cancelled" and r, 10,
                      "the response to be stored cancelled")
    assert stored.output_text.startswith("t0 t1 t2") and stored.output[0].status == "incomplete"


def test_a_background_response_runs_without_the_client_and_is_polled(stack: Stack) -> None:
    queued = stack.client.responses.create(model="slow", input="Take your time.", background=True)
    assert queued.status == "queued" and queued.background is True and queued.output == []
    seen = wait_for(lambda: (r := stack.client.responses.retrieve(queued.id)).status == "in_progress" and r.output
                    and r, 20, "partial output while it runs", interval_s=0.2)
    assert seen.output_text.startswith("t0 ")
    done = wait_for(lambda: (r := stack.client.responses.retrieve(queued.id)).status == "completed" and r, 30,
                    "the background response to complete", interval_s=0.25)
    assert done.output_text == SLOW_REPLY and done.usage.output_tokens == 60


def test_a_background_stream_whose_client_leaves_still_completes(stack: Stack) -> None:
    with httpx.stream("POST", stack.gateway.url + "/v1/responses", headers={"Authorization": f"Bearer {stack.key}"},
                      json={"model": "slow", "input": "Hi", "background": True, "stream": True}, timeout=60) as answer:
        assert answer.status_code == 200
        lines = answer.iter_lines()
        response_id = None
        for line in lines:
            if line.startswith("data: "):
                response_id = json.loads(line[6:])["response"]["id"]
                break
    assert response_id is not None  # and the connection is closed here, at the first event
    done = wait_for(lambda: (r := stack.client.responses.retrieve(response_id)).status == "completed" and r, 30,
                    "the background response to complete after its client left", interval_s=0.25)
    assert done.usage.output_tokens == 60


def test_a_background_response_is_cancelled(stack: Stack) -> None:
    queued = stack.client.responses.create(model="slow", input="Hi", background=True)
    wait_for(lambda: stack.client.responses.retrieve(queued.id).output, 20, "some output", interval_s=0.2)
    cancelled = stack.client.responses.cancel(queued.id)
    assert cancelled.status == "cancelled" and cancelled.output_text.startswith("t0")
    time.sleep(1)
    later = stack.client.responses.retrieve(queued.id)
    assert later.status == "cancelled" and later.output_text == cancelled.output_text, "it stopped"
    assert stack.client.responses.cancel(queued.id).status == "cancelled", "cancelling again changes nothing"
    plain = stack.client.responses.create(model="slow", input="Hi", max_output_tokens=1)
    with pytest.raises(openai.BadRequestError):
        stack.client.responses.cancel(plain.id)


def test_a_background_response_of_a_gateway_that_stopped_is_failed(tmp_path) -> None:
    gateway = Gateway(data_dir=tmp_path, port=free_port())
    sim = SimulatedNodes(gateway=gateway, log_dir=tmp_path, model="slow", tokens=1000, token_rate=5.0)
    gateway.start()
    sim.start()
    try:
        key = gateway.create_api_key("restart")
        client = openai.OpenAI(base_url=gateway.url + "/v1", api_key=key, max_retries=0, timeout=60)
        queued = client.responses.create(model="slow", input="Hi", background=True)
        wait_for(lambda: client.responses.retrieve(queued.id).status == "in_progress", 20, "it to start")
        gateway.kill()  # no chance to store anything
        gateway.start(migrate=False)
        stored = client.responses.retrieve(queued.id)
        assert stored.status == "failed" and stored.error.code == "gateway_stopped"
        assert "stopped before it finished" in stored.error.message
    finally:
        sim.stop()
        gateway.stop()


def test_the_agents_sdk_runs_a_tool_through_responses_and_chat_completions(stack: Stack) -> None:
    """openai-agents, unmodified: its Responses model (the default) and its Chat Completions model."""
    script = r'''
import asyncio, json, sys
from agents import Agent, OpenAIChatCompletionsModel, Runner, function_tool, set_default_openai_client, \
    set_tracing_disabled
from openai import AsyncOpenAI

url, key = sys.argv[1], sys.argv[2]
client = AsyncOpenAI(base_url=url, api_key=key, max_retries=0)
set_default_openai_client(client, use_for_tracing=False)
set_tracing_disabled(True)
calls = []

@function_tool
def get_weather(city: str) -> str:
    """Current weather in a city."""
    calls.append(city)
    return f"sunny in {city}"

async def main():
    responses = Agent(name="weather", instructions="Use the tool.", tools=[get_weather], model="weather")
    first = await Runner.run(responses, "Weather in Paris?")
    chat = Agent(name="weather-chat", instructions="Use the tool.", tools=[get_weather],
                 model=OpenAIChatCompletionsModel(model="weather", openai_client=client))
    second = await Runner.run(chat, "Weather in Paris?")
    print(json.dumps({"responses": first.final_output, "chat": second.final_output, "calls": calls,
                      "kinds": [type(i).__name__ for i in first.new_items]}))

asyncio.run(main())
'''
    done = subprocess.run([sys.executable, "-c", script, stack.gateway.url + "/v1", stack.key], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["calls"] == ["Paris", "Paris"]
    assert result["responses"] == result["chat"] == "Tool result: sunny in Paris"
    assert result["kinds"] == ["ToolCallItem", "ToolCallOutputItem", "MessageOutputItem"]
