"""The worker's request shaping, without a model: tool calls, messages, streaming chunks."""

from __future__ import annotations

import argparse
import json

import pytest

from node_agent.runtimes.llama_cpp_worker import (
    RequestError,
    Worker,
    _forced_tool,
    _normalize_message,
    _parse_tool_call,
    _with_tool_instructions,
)

WEATHER = {"type": "function", "function": {"name": "weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}}}}


def test_a_tool_call_is_parsed_from_tags_or_bare_json() -> None:
    assert _parse_tool_call('<tool_call>{"name": "weather", "arguments": {"city": "Oslo"}}</tool_call>') == (
        "weather", '{"city": "Oslo"}')
    assert _parse_tool_call('{"name": "weather", "parameters": {"city": "Oslo"}}') == ("weather", '{"city": "Oslo"}')
    assert _parse_tool_call("It is sunny in Oslo.") is None
    assert _parse_tool_call('{"temperature": 3}') is None


def test_a_named_tool_choice_constrains_to_its_parameters() -> None:
    forced = _forced_tool([WEATHER], {"type": "function", "function": {"name": "weather"}})
    assert forced == {"named": True, "name": "weather", "schema": WEATHER["function"]["parameters"]}
    with pytest.raises(RequestError):
        _forced_tool([WEATHER], {"type": "function", "function": {"name": "nope"}})


def test_required_means_any_tool_by_name_and_auto_means_none_forced() -> None:
    other = {"type": "function", "function": {"name": "time"}}
    required = _forced_tool([WEATHER, other], "required")
    assert required["names"] == ["weather", "time"]
    assert [o["properties"]["name"]["const"] for o in required["schema"]["anyOf"]] == ["weather", "time"]
    assert _forced_tool([WEATHER], "auto") is None
    assert _forced_tool(None, "required") is None


def test_openai_message_shapes_become_plain_turns() -> None:
    parts = _normalize_message({"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text",
                                                                                               "text": "b"}]})
    assert parts == {"role": "user", "content": "ab"}
    call = _normalize_message({"role": "assistant", "content": None, "tool_calls": [
        {"id": "1", "type": "function", "function": {"name": "weather", "arguments": '{"city": "Oslo"}'}}]})
    body = call["content"].removeprefix("<tool_call>\n").removesuffix("\n</tool_call>")
    assert json.loads(body) == {"name": "weather", "arguments": {"city": "Oslo"}}


def test_tools_are_described_in_the_system_turn() -> None:
    with_system = _with_tool_instructions([{"role": "system", "content": "Be brief."},
                                           {"role": "user", "content": "Weather?"}], [WEATHER])
    assert with_system[0]["content"].startswith("Be brief.") and '"name": "weather"' in with_system[0]["content"]
    without = _with_tool_instructions([{"role": "user", "content": "Weather?"}], [WEATHER])
    assert without[0]["role"] == "system" and "<tool_call>" in without[0]["content"]


def test_streamed_pieces_are_joined_per_interval_and_the_first_goes_at_once(monkeypatch) -> None:
    import node_agent.runtimes.llama_cpp_worker as worker_module

    clock = iter([100.0, 100.01, 100.02, 100.06, 100.07])
    monkeypatch.setattr(worker_module.time, "monotonic", lambda: next(clock))
    worker = object.__new__(Worker)
    worker.args = argparse.Namespace(stream_interval_ms=50)
    assert list(worker._coalesced(iter(["a", "b", "c", "d", "e"]))) == ["a", "bcd", "e"]
    worker.args = argparse.Namespace(stream_interval_ms=0)
    assert list(worker._coalesced(iter(["a", "b"]))) == ["a", "b"]


def test_the_backtrace_of_a_crash_stays_out_of_the_executors_error() -> None:
    from node_agent.runtimes.llama_cpp import _BACKTRACE_LINE

    said = ["ggml.c:1234: GGML_ASSERT(id < n_vocab) failed", "[New LWP 4242]", "0x00007f1c2a in __wait4 ()",
            "#0  0x00007f in ?? ()", "#1  0x0000563 in ggml_abort ()", "Using host libthread_db library"]
    assert [line for line in said if not _BACKTRACE_LINE.match(line)] == [said[0]]
