"""The supervised inference process, with the real model: requests, cancellation, crash recovery."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from node_agent.runtimes.llama_cpp import LlamaCppProcess, ProcessConfig
from tests.conftest import NO_END


async def _wait_state(process: LlamaCppProcess, state: str, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while process.state != state:
        assert time.monotonic() < deadline, f"state stayed {process.state}, wanted {state}"
        await asyncio.sleep(0.05)


async def _request(process: LlamaCppProcess, request: dict[str, Any]) -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = []
    done = asyncio.Event()

    async def sink(raw: str, event: dict[str, Any]) -> None:
        events.append(event)
        if event["type"] in ("end", "error"):
            done.set()

    assert process.submit(request["id"], json.dumps(request), sink)
    await asyncio.wait_for(done.wait(), 60)
    return events


@pytest.fixture
async def process(model_path: Path):
    proc = LlamaCppProcess(ProcessConfig(model_path=str(model_path), n_ctx=2048, threads=2, n_gpu_layers=0),
                           on_state=lambda: None)
    proc.start()
    await _wait_state(proc, "online")
    yield proc
    await proc.stop()
    assert proc.state == "offline"


async def test_it_streams_token_deltas_then_ends_with_usage(process: LlamaCppProcess) -> None:
    events = await _request(process, {"op": "chat", "id": "a", "stream": True,
                                      "body": {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 5}})
    assert [e["type"] for e in events] == ["delta"] * (len(events) - 1) + ["end"]
    assert events[-1]["usage"]["completion_tokens"] == 5


async def test_cancel_stops_generation_within_a_second(process: LlamaCppProcess) -> None:
    events: list[dict[str, Any]] = []

    async def sink(raw: str, event: dict[str, Any]) -> None:
        events.append(event)

    process.submit("long", json.dumps({"op": "chat", "id": "long", "stream": True, "body": {
        "messages": [{"role": "user", "content": "Write a long story."}], "max_tokens": 2000,
        "logit_bias": NO_END}}), sink)
    while len(events) < 3:
        await asyncio.sleep(0.01)
    process.cancel("long")
    started = time.monotonic()
    # The next request can only start once the cancelled one has stopped.
    after = await _request(process, {"op": "chat", "id": "next", "stream": False,
                                     "body": {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1}})
    assert after[-1]["type"] == "end"
    assert time.monotonic() - started < 1.0


async def test_a_bad_request_is_an_error_event_and_the_process_lives_on(process: LlamaCppProcess) -> None:
    events = await _request(process, {"op": "chat", "id": "bad", "stream": False, "body": {
        "messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function", "function": {"name": "f"}}],
        "tool_choice": {"type": "function", "function": {"name": "missing"}}}})
    assert events[-1]["type"] == "error" and events[-1]["error"]["status"] == 400
    assert process.state == "online"


async def test_a_killed_process_is_restarted_a_started_reply_fails_and_an_unanswered_one_is_replayed(
        process: LlamaCppProcess) -> None:
    streaming: list[dict[str, Any]] = []
    queued: list[dict[str, Any]] = []

    async def sink_of(events: list[dict[str, Any]]):
        async def sink(raw: str, event: dict[str, Any]) -> None:
            events.append(event)
        return sink

    process.submit("doomed", json.dumps({"op": "chat", "id": "doomed", "stream": True, "body": {
        "messages": [{"role": "user", "content": "Write a long story."}], "max_tokens": 2000}}),
        await sink_of(streaming))
    # Queued behind the long reply inside the worker: it has had no answer when the process dies.
    process.submit("behind", json.dumps({"op": "chat", "id": "behind", "stream": False, "body": {
        "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3}}), await sink_of(queued))
    while not streaming:
        await asyncio.sleep(0.01)
    first_pid = process.pid
    assert first_pid is not None
    os.kill(first_pid, signal.SIGKILL)
    await _wait_state(process, "starting", 5)
    # Sent while the process restarts: it waits for the new one instead of being refused.
    meanwhile = asyncio.create_task(_request(process, {"op": "chat", "id": "meanwhile", "stream": False, "body": {
        "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1}}))
    await _wait_state(process, "online", 30)
    assert process.pid != first_pid
    assert streaming[-1]["type"] == "error" and streaming[-1]["error"]["code"] == "executor_lost", \
        "a reply already under way cannot be resumed: it ends with an error, never with duplicated text"
    assert (await asyncio.wait_for(meanwhile, 30))[-1]["type"] == "end"
    deadline = time.monotonic() + 30
    while not queued and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert [e["type"] for e in queued] == ["end"] and queued[0]["usage"]["completion_tokens"] <= 3


async def test_a_process_that_hangs_with_work_is_killed_and_restarted(model_path: Path) -> None:
    proc = LlamaCppProcess(ProcessConfig(model_path=str(model_path), n_ctx=512, threads=2, n_gpu_layers=0,
                                         hang_timeout_s=1.0), on_state=lambda: None)
    proc.start()
    try:
        await _wait_state(proc, "online")
        hung_pid = proc.pid
        assert hung_pid is not None
        os.kill(hung_pid, signal.SIGSTOP)  # alive, but makes no progress at all
        events: list[dict[str, Any]] = []

        async def sink(raw: str, event: dict[str, Any]) -> None:
            events.append(event)

        assert proc.submit("stuck", json.dumps({"op": "chat", "id": "stuck", "stream": False, "body": {
            "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}}), sink)
        await _wait_state(proc, "starting", 10)
        assert "hung" in proc.last_error
        await _wait_state(proc, "online", 30)
        assert proc.pid != hung_pid
        deadline = time.monotonic() + 30
        while not events and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert events and events[-1]["type"] == "end", "the unanswered request is served by the new process"
    finally:
        await proc.stop()


async def test_it_gives_up_after_three_crashes_in_a_row(tmp_path: Path) -> None:
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 64)
    proc = LlamaCppProcess(ProcessConfig(model_path=str(bad), n_ctx=512, threads=1, n_gpu_layers=0),
                           on_state=lambda: None)
    proc.start()
    await _wait_state(proc, "failed", 60)
    assert proc.last_error
    await proc.stop()


async def test_a_body_with_newlines_is_one_request_and_cannot_smuggle_another(process: LlamaCppProcess) -> None:
    # Whitespace in the client's JSON is the client's: on a line-framed pipe the second line of this body
    # ran as a request of its own (untracked, 100000 tokens), and the first line, not JSON alone, was lost.
    smuggled = json.dumps({"op": "completion", "id": "INJ", "stream": False,
                           "body": {"prompt": "Once upon a time", "max_tokens": 100000}})
    raw = ('{"op":"chat","id":"a","stream":false,"body":{"messages":[{"role":"user","content":"Hi"}],'
           '"max_tokens":2,"pad":[\n' + smuggled + '\n]}}')
    events: list[dict[str, Any]] = []
    done = asyncio.Event()

    async def sink(line: str, event: dict[str, Any]) -> None:
        events.append(event)
        done.set()

    assert process.submit("a", raw, sink)
    await asyncio.wait_for(done.wait(), 30)
    assert events[-1]["type"] == "end" and events[-1]["usage"]["completion_tokens"] == 2
    pretty = json.dumps({"op": "chat", "id": "b", "stream": False, "body": {
        "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1}}, indent=2)
    started = time.monotonic()
    after = await _request(process, json.loads(pretty) | {"id": "b"})
    assert after[-1]["type"] == "end"
    assert time.monotonic() - started < 5, "nothing smuggled holds the process"


async def test_max_tokens_and_cancel_hold_for_tokens_that_never_make_whole_characters(
        process: LlamaCppProcess) -> None:
    # Token 187 is the byte 0xF0 alone: text made of it never completes a character.
    body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 5, "logit_bias": {"187": 100}}
    started = time.monotonic()
    events = await _request(process, {"op": "chat", "id": "short", "stream": True, "body": body})
    assert events[-1]["type"] == "end"
    assert events[-1]["finish_reason"] == "length" and events[-1]["usage"]["completion_tokens"] == 5
    unstreamed = await _request(process, {"op": "chat", "id": "short2", "stream": False, "body": body})
    assert unstreamed[-1]["usage"]["completion_tokens"] == 5
    assert time.monotonic() - started < 10

    sink_events: list[dict[str, Any]] = []

    async def sink(line: str, event: dict[str, Any]) -> None:
        sink_events.append(event)

    assert process.submit("long", json.dumps({"op": "chat", "id": "long", "stream": True, "body": {
        **body, "max_tokens": 2000}}), sink)
    await asyncio.sleep(1.0)  # it generates, and sends nothing: no token completes a character
    process.cancel("long")
    started = time.monotonic()
    after = await _request(process, {"op": "chat", "id": "next", "stream": False,
                                     "body": {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1}})
    assert after[-1]["type"] == "end"
    assert time.monotonic() - started < 2.0, "the cancelled request stopped within a token"


async def test_token_ids_outside_the_vocabulary_are_refused_and_the_process_lives_on(
        process: LlamaCppProcess) -> None:
    pid = process.pid
    events = await _request(process, {"op": "embedding", "id": "oov", "body": {"input": [1000000000]}})
    assert events[-1]["type"] == "error" and events[-1]["error"]["status"] == 400
    assert "vocabulary" in events[-1]["error"]["message"]
    events = await _request(process, {"op": "chat", "id": "bias", "stream": False, "body": {
        "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1, "logit_bias": {"999999999": 5}}})
    assert events[-1]["type"] == "error" and events[-1]["error"]["status"] == 400
    ok = await _request(process, {"op": "embedding", "id": "fine", "body": {"input": [[28120, 905], [1, 2]]}})
    assert ok[-1]["type"] == "error" and ok[-1]["error"]["status"] == 400, "special tokens alone make no text"
    ok = await _request(process, {"op": "embedding", "id": "fine2", "body": {"input": [[28120, 905], [19556]]}})
    assert ok[-1]["type"] == "end" and len(ok[-1]["embeddings"]) == 2
    assert ok[-1]["usage"]["prompt_tokens"] == 3, "usage is the sum of the inputs' own tokens"
    assert process.pid == pid and process.state == "online"


async def test_a_request_that_crashes_the_process_twice_fails_alone_and_never_fails_the_executor(
        process: LlamaCppProcess) -> None:
    # Three requests in a row, each killing the process whenever it is being computed (as a request that
    # makes llama.cpp abort would): each is replayed once, then fails alone; the model stays up.
    for culprit in ("x", "y", "z"):
        events: list[dict[str, Any]] = []

        async def sink(line: str, event: dict[str, Any], events: list[dict[str, Any]] = events) -> None:
            events.append(event)

        assert process.submit(culprit, json.dumps({"op": "chat", "id": culprit, "stream": False, "body": {
            "messages": [{"role": "user", "content": "Write a long story."}], "max_tokens": 500}}), sink)
        for _ in range(2):
            deadline = time.monotonic() + 30
            while culprit not in process._computing:
                assert time.monotonic() < deadline, "the request was not begun"
                await asyncio.sleep(0.005)
            assert process.pid is not None
            os.kill(process.pid, signal.SIGKILL)
            await asyncio.sleep(0.2)
        deadline = time.monotonic() + 30
        while not events:
            assert time.monotonic() < deadline, "the culprit got no answer"
            await asyncio.sleep(0.05)
        assert events[-1]["type"] == "error" and events[-1]["error"]["code"] == "request_crashed"
        await _wait_state(process, "online", 30)
    after = await _request(process, {"op": "chat", "id": "after", "stream": False,
                                     "body": {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1}})
    assert after[-1]["type"] == "end" and process.state == "online"
